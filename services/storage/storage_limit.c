/* SPDX-License-Identifier: ISC */
/*
 * storage_limit: the inbound rate limits of troupe-auth (LIMIT_CHECK),
 * kept in Redis so that every edge, auth and storage process shares them.
 *
 * One Lua script does the whole check atomically: GCRA (the generic cell
 * rate algorithm) on the key troupe:rl:<tenant>|<bot>|<route>, whose only
 * value is the theoretical arrival time (TAT) in microseconds, with a PX
 * expiry of the time until the limit is whole again.  The clock is Redis's
 * own (TIME), so several storages (or hosts) agree.  With emission
 * interval T = window / limit and capacity C = limit + burst, a key at
 * rest lets C requests through at once, then one per T; a refused request
 * changes nothing.  The script is loaded with SCRIPT LOAD when Redis
 * connects and called with EVALSHA; before its SHA-1 is known, or when
 * Redis answers NOSCRIPT (restarted, SCRIPT FLUSH), the same call is sent
 * as EVAL, which caches it again.
 *
 * LIMIT_REPLY: status 0 allowed, 1 limited, 2 unknown (Redis down,
 * failing or timed out: auth applies [limits] on_redis_down); remaining,
 * retry_after_ms (limited: when one more request fits), reset_ms (when
 * the key is whole again).  A LIMIT_CHECK with limit 0, window 0 or a key
 * over 512 bytes is answered unknown and counted invalid.
 *
 * Callers: storage_dispatch.c (LIMIT_CHECK), storage_ctx.c (Redis up),
 * storage.c (metrics at start).  Never blocks, never answers "allowed"
 * without Redis having counted the request.
 *
 * DIAGNOSTICS: a script error warns (once per connection); everything
 * else is counted (troupe_storage_limit_checks_total).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

#define LIMIT_KEY_PREFIX "troupe:rl:"
#define LIMIT_KEY_MAX 512

/*
 * KEYS[1] the limit's key; ARGV limit, window_ms, burst, cost.  Returns
 * {limited 0|1, remaining, retry_after_ms, reset_ms}.
 */
static const char limit_lua[] =
        "local limit = tonumber(ARGV[1]) "
        "local window = tonumber(ARGV[2]) * 1000 "
        "local burst = tonumber(ARGV[3]) "
        "local cost = tonumber(ARGV[4]) "
        "local t = redis.call('TIME') "
        "local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) "
        "local T = window / limit "
        "local tau = (limit + burst) * T "
        "local tat = tonumber(redis.call('GET', KEYS[1]) or '0') "
        "if tat < now then tat = now end "
        "local new = tat + cost * T "
        "if new - tau > now then "
        " return {1, 0, math.ceil((new - tau - now) / 1000),"
        " math.ceil((tat - now) / 1000)} end "
        "local px = math.ceil((new - now) / 1000) "
        "if px < 1 then px = 1 end "
        "redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', px) "
        "return {0, math.floor((now + tau - new) / T), 0, px}";

struct limit_op {
	struct storage *st;
	struct msg_head head;
	char *reply_to;
	char *key; /* the Redis key, NUL-terminated */
	size_t keylen;
	struct mstr reqkey; /* the request's key, in blob */
	char args[4][24];
	int evalsha; /* sent with EVALSHA (NOSCRIPT: resend) */
	char blob[];
};

void
storage_limit_init(struct storage *st)
{
	struct metrics *mx = st->svc.metrics;
	struct storage_metrics *m = &st->m;
	char l[160];
	static const char f[] = "troupe_storage_limit_checks_total";
	static const char hp[] = "LIMIT_CHECK answers by outcome (unknown: "
	                         "Redis down or failing)";

#define LBL(r)                                                                \
	(snprintf(l, sizeof(l), "service=\"%s\",result=\"%s\"", st->svc.name, \
	          r),                                                         \
	 l)
	m->limit_allowed = metrics_counter(mx, f, hp, LBL("allowed"));
	m->limit_limited = metrics_counter(mx, f, hp, LBL("limited"));
	m->limit_unknown = metrics_counter(mx, f, hp, LBL("unknown"));
	m->limit_invalid = metrics_counter(mx, f, hp, LBL("invalid"));
	m->limit_noscript = metrics_counter(mx, f, hp, LBL("noscript"));
#undef LBL
	st->limit_sha[0] = '\0';
}

static void
limit_send(struct storage *st, const char *to, const struct msg_head *h,
           struct mstr key, uint64_t status, uint64_t remaining,
           uint64_t retry_ms, uint64_t reset_ms)
{
	struct limit_reply r;

	switch (status) {
	case 0:
		storage_count(st->m.limit_allowed);
		break;
	case 1:
		storage_count(st->m.limit_limited);
		break;
	default:
		storage_count(st->m.limit_unknown);
		break;
	}
	memset(&r, 0, sizeof(r));
	r.key = key;
	r.status = status;
	r.remaining = remaining;
	r.retry_after_ms = retry_ms;
	r.reset_ms = reset_ms;
	if (to[0] != '\0' &&
	    msg_send_limit_reply(st->svc.ipc, to, h, &r) == -1) {
		storage_count(st->m.err_send);
		log_req(LOG_L_DEBUG, h->reqid, h->traceparent, MSTR_NULL,
		        "LIMIT_REPLY to %s refused (backlog full)", to);
	}
}

static void
limit_done(struct limit_op *op, uint64_t status, uint64_t remaining,
           uint64_t retry_ms, uint64_t reset_ms)
{
	struct storage *st = op->st;

	limit_send(st, op->reply_to, &op->head, op->reqkey, status, remaining,
	           retry_ms, reset_ms);
	free(op);
	st->nadmin--;
	storage_stop_check(st);
}

static int limit_eval(struct limit_op *);

static uint64_t
limit_int(const redisReply *e)
{
	return (e->type == REDIS_REPLY_INTEGER && e->integer > 0
	                ? (uint64_t)e->integer
	                : 0);
}

static void
limit_eval_done(void *arg, const redisReply *reply)
{
	struct limit_op *op = arg;
	struct storage *st = op->st;
	size_t i;

	if (reply != NULL && reply->type == REDIS_REPLY_ERROR &&
	    strncmp(reply->str, "NOSCRIPT", 8) == 0 && op->evalsha) {
		/* Redis forgot it: EVAL caches it again. */
		storage_count(st->m.limit_noscript);
		st->limit_sha[0] = '\0';
		op->evalsha = 0;
		if (limit_eval(op) == -1)
			limit_done(op, 2, 0, 0, 0);
		return;
	}
	if (reply == NULL || reply->type != REDIS_REPLY_ARRAY ||
	    reply->elements != 4) {
		storage_count(st->m.err_redis);
		if (reply != NULL && reply->type == REDIS_REPLY_ERROR)
			log_req(LOG_L_WARN, op->head.reqid,
			        op->head.traceparent, MSTR_NULL,
			        "redis: limit script: %s", reply->str);
		limit_done(op, 2, 0, 0, 0);
		return;
	}
	for (i = 0; i < 4; i++)
		if (reply->element[i]->type != REDIS_REPLY_INTEGER) {
			storage_count(st->m.err_redis);
			limit_done(op, 2, 0, 0, 0);
			return;
		}
	limit_done(op, limit_int(reply->element[0]) ? 1 : 0,
	           limit_int(reply->element[1]), limit_int(reply->element[2]),
	           limit_int(reply->element[3]));
}

/* Send the script (EVALSHA if its SHA-1 is known); -1 if Redis is not
 * connected. */
static int
limit_eval(struct limit_op *op)
{
	struct storage *st = op->st;
	const char *argv[8];
	size_t argl[8];
	int i;

	op->evalsha = st->limit_sha[0] != '\0';
	argv[0] = op->evalsha ? "EVALSHA" : "EVAL";
	argv[1] = op->evalsha ? st->limit_sha : limit_lua;
	argv[2] = "1";
	argv[3] = op->key;
	for (i = 0; i < 4; i++)
		argv[4 + i] = op->args[i];
	for (i = 0; i < 8; i++)
		argl[i] = strlen(argv[i]);
	argl[3] = op->keylen;
	return (storage_redis_cmd(st->redis, limit_eval_done, op, 8, argv,
	                          argl));
}

void
storage_limit_check(struct storage *st, const struct msg *m,
                    const struct limit_check *b)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct limit_op *op;
	size_t sz;
	char *p, *to;

	if (b->key.n == 0 || b->key.n > LIMIT_KEY_MAX || b->limit == 0 ||
	    b->window_ms == 0 || b->window_ms > 86400000ULL * 366 ||
	    b->limit > 1000000000ULL || b->burst > 1000000000ULL ||
	    b->cost > 1000000ULL) {
		storage_count(st->m.limit_invalid);
		if ((to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender)) !=
		    NULL)
			limit_send(st, to, &h, b->key, 2, 0, 0, 0);
		free(to);
		return;
	}
	if (!storage_redis_up(st->redis) || st->svc.stopping) {
		if ((to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender)) !=
		    NULL)
			limit_send(st, to, &h, b->key, 2, 0, 0, 0);
		free(to);
		return;
	}
	sz = sizeof(*op) + storage_head_size(m) + b->key.n + 1 +
	     sizeof(LIMIT_KEY_PREFIX) + b->key.n;
	if ((op = calloc(1, sz)) == NULL) {
		log_warnx("%s: out of memory", __func__);
		return;
	}
	op->st = st;
	p = storage_head_copy(m, &op->head, &op->reply_to, op->blob, 1);
	memcpy(p, b->key.p, b->key.n);
	op->reqkey = (struct mstr){p, b->key.n};
	p += b->key.n;
	*p++ = '\0';
	op->key = p;
	memcpy(p, LIMIT_KEY_PREFIX, sizeof(LIMIT_KEY_PREFIX) - 1);
	memcpy(p + sizeof(LIMIT_KEY_PREFIX) - 1, b->key.p, b->key.n);
	op->keylen = sizeof(LIMIT_KEY_PREFIX) - 1 + b->key.n;
	p[op->keylen] = '\0';
	snprintf(op->args[0], sizeof(op->args[0]), "%llu",
	         (unsigned long long)b->limit);
	snprintf(op->args[1], sizeof(op->args[1]), "%llu",
	         (unsigned long long)b->window_ms);
	snprintf(op->args[2], sizeof(op->args[2]), "%llu",
	         (unsigned long long)b->burst);
	snprintf(op->args[3], sizeof(op->args[3]), "%llu",
	         (unsigned long long)(b->cost ? b->cost : 1));
	st->nadmin++;
	if (limit_eval(op) == -1)
		limit_done(op, 2, 0, 0, 0);
}

static void
limit_load_done(void *arg, const redisReply *reply)
{
	struct storage *st = arg;

	if (reply == NULL || reply->type != REDIS_REPLY_STRING ||
	    reply->len != 40) {
		if (reply != NULL && reply->type == REDIS_REPLY_ERROR)
			log_warnx("redis: SCRIPT LOAD of the limit script: "
			          "%s",
			          reply->str);
		return; /* EVAL until the next connection */
	}
	memcpy(st->limit_sha, reply->str, 40);
	st->limit_sha[40] = '\0';
}

void
storage_limit_redis_up(struct storage *st)
{
	const char *argv[3] = {"SCRIPT", "LOAD", limit_lua};
	size_t argl[3] = {6, 4, sizeof(limit_lua) - 1};

	st->limit_sha[0] = '\0';
	(void)storage_redis_cmd(st->redis, limit_load_done, st, 3, argv, argl);
}
