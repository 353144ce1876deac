/* SPDX-License-Identifier: ISC */
/*
 * troupe-storage: main, configuration, the peer table, status and stop.
 *
 * It opens its mailbox and reports READY=1 at once, then connects to
 * Redis and PostgreSQL (two connections: the group-commit writer and the
 * reader) on the loop, retrying each with back-off for as long as it
 * runs.  Until a dependency is up, requests that need it get 503; its
 * state shows in STATUS= and in the troupe_storage_*_up gauges, never by
 * blocking the start.  Migrations run on every PostgreSQL connection
 * before it serves (storage_schema.c).
 *
 * Callers: systemd (units/troupe-storage.service), the test harness.
 * On SIGTERM it refuses new work with 503, finishes the batches it holds
 * (bounded by the timeouts), then leaves.  It must never block the loop.
 *
 * DIAGNOSTICS: a bad config is fatal (exit 1); dependencies going up and
 * down are logged by storage_redis.c and storage_pg.c; messages of an
 * unknown type or from an unknown sender are counted and warned about.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"
#include "trace.h"

static struct storage storage;

static const char storage_help[] =
        "Config keys ([storage] section, or TROUPE_STORAGE_<KEY>):\n"
        "  redis             127.0.0.1:6379 | unix:/path/redis.sock\n"
        "  postgres          libpq conninfo (host=127.0.0.1 port=5432 "
        "dbname=troupe user=troupe)\n"
        "  bot_cache_ms      2000     bot_cache_max   10000\n"
        "  batch_max         512      queue_max       65536\n"
        "  read_queue_max    10000    context_ttl_s   86400\n"
        "  pg_timeout_ms     5000     redis_timeout_ms 1000\n"
        "  spool_dir         L2 spool directory ($STATE_DIRECTORY, else "
        "the parent of [ipc] rundir)\n"
        "  spool_max_bytes   1073741824 (0: no spool, 503 while "
        "PostgreSQL is down)\n";

/* Peers: who may talk to storage, and through which switch. */
struct storage_peer {
	const char *prefix; /* of the sender's mailbox name */
	enum proc kind;
	int (*dispatch)(struct storage *, const struct msg *);
};

static const struct storage_peer peers[] = {
        {"worker", PROC_WORKER, storage_dispatch_worker},
        {"troupectl-", PROC_TOOL, storage_dispatch_tool},
        {"auth", PROC_AUTH, storage_dispatch_auth},
        {"dispatcher", PROC_DISPATCHER, storage_dispatch_dispatcher},
};

size_t
storage_head_size(const struct msg *m)
{
	return (m->reqid.n + 1 + m->traceparent.n + 1 +
	        (m->reply_to.n ? m->reply_to.n : m->sender.n) + 1);
}

static char *
head_str(char *p, struct mstr s, struct mstr *out)
{
	memcpy(p, s.p, s.n);
	p[s.n] = '\0';
	if (out != NULL)
		*out = (struct mstr){p, s.n};
	return (p + s.n + 1);
}

char *
storage_head_copy(const struct msg *m, struct msg_head *h, char **to, char *p,
                  int or_sender)
{
	struct mstr dst = m->reply_to;

	if (dst.n == 0 && or_sender)
		dst = m->sender;
	p = head_str(p, m->reqid, &h->reqid);
	p = head_str(p, m->traceparent, &h->traceparent);
	h->deadline_ms = m->deadline_ms;
	h->reply_to = MSTR_NULL;
	*to = p;
	return (head_str(p, dst, NULL));
}

static void
storage_on_msg(void *arg, const struct msg *m)
{
	struct storage *st = arg;
	const struct storage_peer *p = NULL;
	enum proc kind = proc_of(m->sender);
	const char *name = msg_name(m->type);
	size_t i, n;
	int rc;

	trace_mark();
	for (i = 0; i < nitems(peers); i++) {
		n = strlen(peers[i].prefix);
		if (peers[i].kind == kind && m->sender.n >= n &&
		    memcmp(m->sender.p, peers[i].prefix, n) == 0) {
			p = &peers[i];
			break;
		}
	}
	if (p == NULL || !msg_route_ok(m->type, kind, PROC_STORAGE))
		rc = DISPATCH_UNHANDLED;
	else
		rc = p->dispatch(st, m);
	if (rc == DISPATCH_OK)
		return;
	storage_count(rc == DISPATCH_BAD ? st->m.err_bad_msg
	                                 : st->m.err_unknown_msg);
	/* The first ten, then one in a thousand: a confused peer must not
	 * flood the journal. */
	if (++st->nodd > 10 && st->nodd % 1000 != 0)
		return;
	if (rc == DISPATCH_BAD)
		log_req(LOG_L_WARN, m->reqid, m->traceparent, MSTR_NULL,
		        "undecodable %s from %.*s dropped (%llu odd messages "
		        "so "
		        "far)",
		        name ? name : "?", (int)m->sender.n, m->sender.p,
		        (unsigned long long)st->nodd);
	else
		log_req(LOG_L_WARN, m->reqid, m->traceparent, MSTR_NULL,
		        "message %s (0x%04x) from %.*s not handled here: "
		        "dropped "
		        "(%llu odd messages so far)",
		        name ? name : "unknown", m->type, (int)m->sender.n,
		        m->sender.p, (unsigned long long)st->nodd);
}

void
storage_status(struct storage *st)
{
	char s[sizeof(st->status)];
	int r = st->redis && storage_redis_up(st->redis);
	int w = st->writer && storage_pg_up(st->writer);
	int d = st->reader && storage_pg_up(st->reader);

	storage_gauge(st->m.redis_up, r);
	storage_gauge(st->m.writer_up, w);
	storage_gauge(st->m.reader_up, d);
	storage_commit_gauges(st);
	if (st->spooling)
		snprintf(s, sizeof(s),
		         "degraded L2: chats spooled to disk (%s); redis %s, "
		         "postgres writer %s, reader %s",
		         st->spool_cause, r ? "up" : "down", w ? "up" : "down",
		         d ? "up" : "down");
	else if (r && w && d)
		snprintf(s, sizeof(s),
		         "serving: redis up, postgres up "
		         "(schema v%d)",
		         st->schema_version);
	else
		snprintf(s, sizeof(s),
		         "degraded: redis %s, postgres writer "
		         "%s, reader %s",
		         r ? "up" : "down", w ? "up" : "down",
		         d ? "up" : "down");
	storage_health_check(st);
	if (strcmp(s, st->status) == 0)
		return;
	snprintf(st->status, sizeof(st->status), "%s", s);
	log_info("status: %s", s);
	svc_status(&st->svc, "%s", s);
}

static void
storage_redis_state(struct storage_redis *r, int up, void *arg)
{
	struct storage *st = arg;

	(void)r;
	if (up)
		storage_ctx_redis_up(st);
	storage_status(st);
}

static void
storage_pg_state(struct storage_pg *pg, int up, void *arg)
{
	struct storage *st = arg;

	/* Rows waiting for a writer that is gone: L2 (spooled), else 503
	 * now, not later. */
	if (!up && pg == st->writer)
		storage_commit_writer_down(st);
	storage_status(st);
}

/* End of every loop turn: start a batch with what this turn brought. */
static void
storage_idle(struct loop *l, void *arg)
{
	struct storage *st = arg;

	(void)l;
	storage_commit_kick(st);
	storage_gauge(st->m.queue_rows, (double)st->nrows);
	storage_gauge(st->m.read_queue, (double)storage_pg_queued(st->reader));
	storage_gauge(st->m.redis_pending,
	              (double)storage_redis_pending(st->redis));
	storage_gauge(st->m.bot_cache_entries, (double)storage_bots_count(st));
	storage_commit_gauges(st);
}

void
storage_stop_check(struct storage *st)
{
	if (!st->svc.stopping || st->svc.stopped)
		return;
	if (storage_commit_busy(st) || st->nctx > 0 || st->nadmin > 0)
		return;
	log_info("stop: nothing pending");
	svc_stop_done(&st->svc);
}

static void
storage_stop_timeout(struct loop *l, void *arg)
{
	struct storage *st = arg;

	(void)l;
	if (st->svc.stopped)
		return;
	log_warnx("stop: still busy (%zu rows queued, batch %s, %zu "
	          "contexts, %zu admin) after the grace time: leaving",
	          st->nrows, st->batch ? "in flight" : "none", st->nctx,
	          st->nadmin);
	storage_commit_refuse_all(st);
	svc_stop_done(&st->svc);
}

static void
storage_on_stop(struct svc *s, void *arg)
{
	struct storage *st = arg;

	(void)s;
	/* New work gets 503 from here on (storage_commit_persist and
	 * storage_ctx_get look at svc.stopping). */
	loop_timer_set(st->stop_timer, st->conf.pg_timeout_ms +
	                                       st->conf.redis_timeout_ms +
	                                       1000);
	storage_stop_check(st);
}

static void
conf_str(char **dst, const char *key, const char *def)
{
	char *v = strdup(conf_get("storage", key, def));

	if (v == NULL)
		fatalx("out of memory");
	free(*dst);
	*dst = v;
}

/* Read the numeric keys into c; 0, or -1 with err filled. */
static int
storage_conf_numbers(struct storage_conf *c, char *err, size_t errlen)
{
	const struct {
		const char *key;
		int64_t def, min, max;
		int64_t *out;
	} keys[] = {
	        {"bot_cache_ms", 2000, 0, 3600000, &c->bot_cache_ms},
	        {"bot_cache_max", 10000, 16, 10000000, &c->bot_cache_max},
	        {"batch_max", 512, 1, 4096, &c->batch_max},
	        {"queue_max", 65536, 1, 10000000, &c->queue_max},
	        {"read_queue_max", 10000, 1, 10000000, &c->read_queue_max},
	        {"pg_timeout_ms", 5000, 10, 600000, &c->pg_timeout_ms},
	        {"redis_timeout_ms", 1000, 10, 600000, &c->redis_timeout_ms},
	        {"context_ttl_s", 86400, 1, 365 * 86400LL, &c->context_ttl_s},
	        {"spool_max_bytes", 1LL << 30, 0, 1LL << 50,
	         &c->spool_max_bytes},
	};
	size_t i;

	for (i = 0; i < nitems(keys); i++)
		if (conf_get_int("storage", keys[i].key, keys[i].def,
		                 keys[i].min, keys[i].max, keys[i].out, err,
		                 errlen) == -1)
			return (-1);
	return (0);
}

/* [storage] spool_dir; else systemd's $STATE_DIRECTORY; else the
 * parent of [ipc] rundir (var/ under ./troupe run, the test root);
 * else /var/lib/troupe. */
static void
spool_dir_conf(struct storage *st)
{
	const char *v = conf_get("storage", "spool_dir", NULL), *e;
	char d[1024], *slash;

	if (v != NULL && *v != '\0') {
		conf_str(&st->conf.spool_dir, "spool_dir", v);
		return;
	}
	if ((e = getenv("STATE_DIRECTORY")) != NULL && *e != '\0')
		snprintf(d, sizeof(d), "%.*s", (int)strcspn(e, ":"), e);
	else if ((e = conf_get("ipc", "rundir", NULL)) != NULL && *e != '\0') {
		snprintf(d, sizeof(d), "%s", e);
		while ((slash = strrchr(d, '/')) != NULL && slash[1] == '\0')
			*slash = '\0'; /* trailing slashes */
		if ((slash = strrchr(d, '/')) == NULL)
			snprintf(d, sizeof(d), ".");
		else if (slash == d)
			d[1] = '\0';
		else
			*slash = '\0';
	} else
		snprintf(d, sizeof(d), "/var/lib/troupe");
	free(st->conf.spool_dir);
	if ((st->conf.spool_dir = strdup(d)) == NULL)
		fatalx("out of memory");
}

static int
storage_on_reload(struct svc *s, void *arg)
{
	struct storage *st = arg;
	struct storage_conf c = st->conf;
	char err[256];

	(void)s;
	if (storage_conf_numbers(&c, err, sizeof(err)) == -1) {
		log_warnx("reload: %s", err);
		return (-1);
	}
	st->conf.bot_cache_ms = c.bot_cache_ms;
	st->conf.bot_cache_max = c.bot_cache_max;
	st->conf.batch_max = c.batch_max;
	st->conf.queue_max = c.queue_max;
	st->conf.context_ttl_s = c.context_ttl_s;
	st->conf.pg_timeout_ms = c.pg_timeout_ms;
	st->conf.redis_timeout_ms = c.redis_timeout_ms;
	if (st->spool != NULL && c.spool_max_bytes > 0) {
		st->conf.spool_max_bytes = c.spool_max_bytes;
		storage_spool_set_max(st->spool, (uint64_t)c.spool_max_bytes);
	} else if (c.spool_max_bytes != st->conf.spool_max_bytes)
		log_warnx("reload: turning the spool on or off applies after "
		          "a restart");
	storage_pg_set_timeout(st->writer, c.pg_timeout_ms);
	storage_pg_set_timeout(st->reader, c.pg_timeout_ms);
	storage_redis_set_timeout(st->redis, c.redis_timeout_ms);
	if (c.read_queue_max != st->conf.read_queue_max)
		log_warnx("reload: read_queue_max applies after a restart");
	if (strcmp(conf_get("storage", "redis", "127.0.0.1:6379"),
	           st->conf.redis) != 0 ||
	    strcmp(conf_get("storage", "postgres",
	                    "host=127.0.0.1 port=5432 dbname=troupe "
	                    "user=troupe"),
	           st->conf.postgres) != 0)
		log_warnx("reload: new redis/postgres addresses apply after "
		          "a restart");
	return (0);
}

static void
storage_metrics_init(struct storage *st)
{
	struct metrics *mx = st->svc.metrics;
	struct storage_metrics *m = &st->m;
	char l[160];
	const char *svc = st->svc.name;

#define LBL(...) (snprintf(l, sizeof(l), __VA_ARGS__), l)
#define ROWS "troupe_storage_rows_total"
#define ROWS_H "CHAT_PERSIST rows by outcome"
	m->batches = metrics_counter(mx, "troupe_storage_batches_total",
	                             "Group-commit batches committed",
	                             LBL("service=\"%s\"", svc));
	m->batch_rows = metrics_counter(
	        mx, "troupe_storage_batch_rows_total",
	        "Rows in committed batches (rows per batch = this / batches)",
	        LBL("service=\"%s\"", svc));
	m->rows_stored =
	        metrics_counter(mx, ROWS, ROWS_H,
	                        LBL("service=\"%s\",result=\"stored\"", svc));
	m->rows_duplicate = metrics_counter(
	        mx, ROWS, ROWS_H,
	        LBL("service=\"%s\",result=\"duplicate\"", svc));
	m->rows_failed =
	        metrics_counter(mx, ROWS, ROWS_H,
	                        LBL("service=\"%s\",result=\"failed\"", svc));
	m->rows_refused =
	        metrics_counter(mx, ROWS, ROWS_H,
	                        LBL("service=\"%s\",result=\"refused\"", svc));
	m->rows_invalid =
	        metrics_counter(mx, ROWS, ROWS_H,
	                        LBL("service=\"%s\",result=\"invalid\"", svc));
	m->rows_expired =
	        metrics_counter(mx, ROWS, ROWS_H,
	                        LBL("service=\"%s\",result=\"expired\"", svc));
	m->rows_spooled =
	        metrics_counter(mx, ROWS, ROWS_H,
	                        LBL("service=\"%s\",result=\"spooled\"", svc));
	m->rows_replayed = metrics_counter(
	        mx, ROWS, ROWS_H,
	        LBL("service=\"%s\",result=\"replayed\"", svc));
	m->spool_bytes = metrics_gauge(
	        mx, "troupe_storage_spool_bytes",
	        "Bytes of spooled chats not yet replayed to PostgreSQL (L2)",
	        LBL("service=\"%s\"", svc));
	m->spool_records = metrics_gauge(
	        mx, "troupe_storage_spool_records",
	        "Spooled chats not yet replayed to PostgreSQL (L2)",
	        LBL("service=\"%s\"", svc));
	m->degraded_l2 = metrics_gauge(
	        mx, "troupe_storage_degraded",
	        "1 while in the degraded tier (L2: chats spooled to disk)",
	        LBL("service=\"%s\",tier=\"L2\"", svc));
	m->spool_enter =
	        metrics_counter(mx, "troupe_storage_degraded_enter_total",
	                        "Times the degraded tier was entered",
	                        LBL("service=\"%s\",tier=\"L2\"", svc));
	m->spool_fsyncs = metrics_counter(
	        mx, "troupe_storage_spool_fsyncs_total",
	        "fdatasync calls on the spool (one per spooled batch)",
	        LBL("service=\"%s\"", svc));
#define CTX "troupe_storage_ctx_requests_total"
#define CTX_H "CTX_GET requests by outcome"
	m->ctx_hit = metrics_counter(
	        mx, CTX, CTX_H, LBL("service=\"%s\",result=\"hit\"", svc));
	m->ctx_miss = metrics_counter(
	        mx, CTX, CTX_H, LBL("service=\"%s\",result=\"miss\"", svc));
	m->ctx_none = metrics_counter(
	        mx, CTX, CTX_H, LBL("service=\"%s\",result=\"none\"", svc));
	m->ctx_unknown_bot = metrics_counter(
	        mx, CTX, CTX_H,
	        LBL("service=\"%s\",result=\"unknown_bot\"", svc));
	m->ctx_unavailable = metrics_counter(
	        mx, CTX, CTX_H,
	        LBL("service=\"%s\",result=\"unavailable\"", svc));
	m->ctx_invalid = metrics_counter(
	        mx, CTX, CTX_H, LBL("service=\"%s\",result=\"invalid\"", svc));
#define BOT "troupe_storage_bot_cache_total"
#define BOT_H "Bot lookups: cache hits, loads, stale copies served"
	m->bot_hit = metrics_counter(
	        mx, BOT, BOT_H, LBL("service=\"%s\",result=\"hit\"", svc));
	m->bot_load = metrics_counter(
	        mx, BOT, BOT_H, LBL("service=\"%s\",result=\"load\"", svc));
	m->bot_stale = metrics_counter(
	        mx, BOT, BOT_H, LBL("service=\"%s\",result=\"stale\"", svc));
	m->redis_append_failed = metrics_counter(
	        mx, "troupe_storage_context_update_failures_total",
	        "Committed turns whose Redis context update failed (key "
	        "invalidated)",
	        LBL("service=\"%s\"", svc));
	m->invalidations_lost =
	        metrics_counter(mx, "troupe_storage_invalidations_lost_total",
	                        "Context invalidations dropped (queue full "
	                        "while Redis was down)",
	                        LBL("service=\"%s\"", svc));
#define ERR "troupe_storage_errors_total"
#define ERR_H "Errors by kind"
	m->err_pg = metrics_counter(
	        mx, ERR, ERR_H, LBL("service=\"%s\",kind=\"postgres\"", svc));
	m->err_redis = metrics_counter(
	        mx, ERR, ERR_H, LBL("service=\"%s\",kind=\"redis\"", svc));
	m->err_send = metrics_counter(
	        mx, ERR, ERR_H, LBL("service=\"%s\",kind=\"send\"", svc));
	m->err_bad_msg = metrics_counter(
	        mx, ERR, ERR_H,
	        LBL("service=\"%s\",kind=\"bad_message\"", svc));
	m->err_unknown_msg = metrics_counter(
	        mx, ERR, ERR_H,
	        LBL("service=\"%s\",kind=\"unknown_message\"", svc));
#define ADM "troupe_storage_admin_requests_total"
#define ADM_H "Admin requests by outcome"
	m->admin_ok = metrics_counter(
	        mx, ADM, ADM_H, LBL("service=\"%s\",result=\"ok\"", svc));
	m->admin_failed = metrics_counter(
	        mx, ADM, ADM_H, LBL("service=\"%s\",result=\"failed\"", svc));
#define LOCK "troupe_storage_chat_locks_total"
#define LOCK_H "v3 conversation locks asked for, by outcome"
	m->lock_taken = metrics_counter(
	        mx, LOCK, LOCK_H, LBL("service=\"%s\",result=\"taken\"", svc));
	m->lock_busy = metrics_counter(
	        mx, LOCK, LOCK_H, LBL("service=\"%s\",result=\"busy\"", svc));
	m->lock_unavailable = metrics_counter(
	        mx, LOCK, LOCK_H,
	        LBL("service=\"%s\",result=\"unavailable\"", svc));
#define NONCE "troupe_storage_webhook_nonces_total"
#define NONCE_H "Webhook nonces checked, by outcome (replayed: refused 409)"
	m->nonce_ok = metrics_counter(
	        mx, NONCE, NONCE_H, LBL("service=\"%s\",result=\"new\"", svc));
	m->nonce_replayed = metrics_counter(
	        mx, NONCE, NONCE_H,
	        LBL("service=\"%s\",result=\"replayed\"", svc));
#define CQ "troupe_storage_chat_queries_total"
#define CQ_H "CHAT_QUERY answers (retrieve, list, cancel) by outcome"
	m->q_ok = metrics_counter(mx, CQ, CQ_H,
	                          LBL("service=\"%s\",result=\"ok\"", svc));
	m->q_not_found = metrics_counter(
	        mx, CQ, CQ_H, LBL("service=\"%s\",result=\"not_found\"", svc));
	m->q_finished = metrics_counter(
	        mx, CQ, CQ_H, LBL("service=\"%s\",result=\"finished\"", svc));
	m->q_invalid = metrics_counter(
	        mx, CQ, CQ_H, LBL("service=\"%s\",result=\"invalid\"", svc));
	m->q_unavailable = metrics_counter(
	        mx, CQ, CQ_H,
	        LBL("service=\"%s\",result=\"unavailable\"", svc));
	m->q_error = metrics_counter(
	        mx, CQ, CQ_H, LBL("service=\"%s\",result=\"error\"", svc));
#define KC "troupe_storage_key_checks_total"
#define KC_H "KEY_CHECK answers by outcome"
	m->key_valid = metrics_counter(
	        mx, KC, KC_H, LBL("service=\"%s\",result=\"valid\"", svc));
	m->key_invalid = metrics_counter(
	        mx, KC, KC_H, LBL("service=\"%s\",result=\"invalid\"", svc));
	m->key_unavailable = metrics_counter(
	        mx, KC, KC_H,
	        LBL("service=\"%s\",result=\"unavailable\"", svc));
	m->redis_up = metrics_gauge(mx, "troupe_storage_redis_up",
	                            "1 while the Redis connection serves",
	                            LBL("service=\"%s\"", svc));
#define PGUP "troupe_storage_postgres_up"
#define PGUP_H "1 while the PostgreSQL connection serves"
	m->writer_up = metrics_gauge(
	        mx, PGUP, PGUP_H, LBL("service=\"%s\",conn=\"writer\"", svc));
	m->reader_up = metrics_gauge(
	        mx, PGUP, PGUP_H, LBL("service=\"%s\",conn=\"reader\"", svc));
	m->schema_version = metrics_gauge(mx, "troupe_storage_schema_version",
	                                  "PostgreSQL schema version in use",
	                                  LBL("service=\"%s\"", svc));
	m->queue_rows =
	        metrics_gauge(mx, "troupe_storage_queue_rows",
	                      "CHAT_PERSIST rows waiting for the next batch",
	                      LBL("service=\"%s\"", svc));
	m->read_queue =
	        metrics_gauge(mx, "troupe_storage_read_queue",
	                      "Statements queued on the reader connection",
	                      LBL("service=\"%s\"", svc));
	m->redis_pending =
	        metrics_gauge(mx, "troupe_storage_redis_pending",
	                      "Redis commands sent and not yet answered",
	                      LBL("service=\"%s\"", svc));
	m->bot_cache_entries = metrics_gauge(
	        mx, "troupe_storage_bot_cache_entries",
	        "Entries in the bot cache", LBL("service=\"%s\"", svc));
	m->commit_seconds = metrics_histo(mx, "troupe_storage_commit_seconds",
	                                  "Time to write and commit one batch",
	                                  LBL("service=\"%s\"", svc));
	m->ctx_seconds = metrics_histo(mx, "troupe_storage_ctx_seconds",
	                               "Time to answer a CTX_GET",
	                               LBL("service=\"%s\"", svc));
#undef LBL
}

static const struct svc_def storage_def = {
        .kind = "storage",
        .summary = "Troupe storage: bots, contexts (Redis) and chats "
                   "(PostgreSQL, group commit)",
        .help_extra = storage_help,
        .on_msg = storage_on_msg,
        .on_reload = storage_on_reload,
        .on_stop = storage_on_stop,
        .on_metrics = NULL,
        .arg = &storage,
};

int
main(int argc, char **argv)
{
	struct storage *st = &storage;
	struct storage_redis_hooks rh = {storage_redis_state, st};
	struct storage_pg_hooks ph = {storage_schema_setup, storage_pg_state,
	                              st};
	char err[256];

	svc_init(&st->svc, &storage_def, argc, argv);
	(void)TRACE_INIT(&st->svc);
	TAILQ_INIT(&st->rows);
	TAILQ_INIT(&st->chat_waiting);
	conf_str(&st->conf.redis, "redis", "127.0.0.1:6379");
	conf_str(&st->conf.postgres, "postgres",
	         "host=127.0.0.1 port=5432 dbname=troupe user=troupe");
	if (storage_conf_numbers(&st->conf, err, sizeof(err)) == -1)
		fatalx("config: %s", err);
	spool_dir_conf(st);
	if (storage_text_redis_addr(st->conf.redis, &st->redis_addr, err,
	                            sizeof(err)) == -1)
		fatalx("config: [storage] redis: %s", err);
	storage_metrics_init(st);
	storage_health_init(st);
	storage_limit_init(st);
	if (storage_chat_init(st) == -1)
		fatalx("out of memory");
	storage_gauge(st->m.schema_version, 0);

	if ((st->stop_timer = loop_timer_new(
	             st->svc.loop, storage_stop_timeout, st)) == NULL ||
	    (st->redis = storage_redis_new(st->svc.loop, &st->redis_addr,
	                                   st->conf.redis_timeout_ms, &rh)) ==
	            NULL ||
	    (st->writer =
	             storage_pg_new(st->svc.loop, "writer", st->conf.postgres,
	                            st->conf.pg_timeout_ms, 2, &ph)) == NULL ||
	    (st->reader = storage_pg_new(
	             st->svc.loop, "reader", st->conf.postgres,
	             st->conf.pg_timeout_ms, (size_t)st->conf.read_queue_max,
	             &ph)) == NULL)
		fatalx("out of memory");
	if (st->conf.spool_max_bytes > 0)
		(void)storage_commit_spool_open(st);
	if (loop_idle(st->svc.loop, storage_idle, st) == -1)
		fatal("loop_idle");
	storage_status(st);
	svc_ready(&st->svc, st->status);
	return (svc_run(&st->svc));
}
