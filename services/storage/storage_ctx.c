/* SPDX-License-Identifier: ISC */
/*
 * storage_ctx: CTX_GET, the answer a worker needs before calling the
 * model: the bot's settings and the conversation's last N turns.
 *
 * Callers: storage_dispatch.c (CTX_GET), storage_bots.c (the bot is
 * known), storage_commit.c (a turn was committed; a context key must be
 * forgotten), storage.c (Redis came back).
 *
 * The context of (bot, conversation) is a Redis list at
 * troupe:ctx:<bot_id>:<conversation_id>, one OpenAI message JSON object
 * per element, oldest first, trimmed to the last 2N elements and expiring
 * [storage] context_ttl_s after its last write.  An empty element is a
 * marker at the head of a list rebuilt from PostgreSQL: "known, maybe
 * empty", so that a new conversation costs PostgreSQL one read, not one
 * per turn.  Readers skip it.
 *
 * Read path: LRANGE key -2N -1 alone.  Redis never stores an empty list
 * (a list whose last element goes is deleted), and every list we write
 * holds at least the marker, so an empty reply means exactly "no key": a
 * miss, with no EXISTS round trip.  On a miss the turns are read from
 * PostgreSQL (reader connection), answered, and written back with MULTI
 * DEL RPUSH EXPIRE EXEC, unless a commit touched the same conversation
 * after the read was queued (then the snapshot may be older than what is
 * stored, and the next read rebuilds again).  storage_commit.c appends
 * with RPUSHX, which does nothing when the key is absent, so a partial
 * list is never created.
 *
 * A webhook's CTX_GET (nonce set, POST /api/v1/execute) records
 * troupe:nonce:<bot_id>:<nonce> with SET NX EX 600 once the bot is known;
 * a nonce already there is a replay: 409/4017 "nonce already used".
 *
 * Redis down (not connected, or the LRANGE failed or timed out): the
 * context is read from PostgreSQL exactly as on a miss, and not written
 * back (PostgreSQL holds every committed turn, so the answer is the same
 * as Redis would give).  Turns committed meanwhile queue their key's
 * deletion (storage_ctx_forget), sent first once Redis is back, so the
 * cache never serves a context older than PostgreSQL.  Webhook nonces
 * have no such fallback: they fail closed, 503/5030 "replay check
 * unavailable" (a nonce must never be accepted twice).
 *
 * Failures: unknown bot 404/4006; a nonce while Redis is down 503/5030;
 * PostgreSQL needed and down 503/5030 "storage unavailable".  It must
 * never answer a context it could not read in full.
 *
 * DIAGNOSTICS: PostgreSQL statement errors warn; lost invalidations warn.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coze.h"
#include "storage.h"
#include "trace.h"

#define CTX_CONV_MAX 1024
#define CTX_FORGET_MAX 65536

static const char ctx_rebuild_sql[] =
        "SELECT query, answer FROM ("
        " SELECT query, answer, seq FROM chats"
        " WHERE bot_id = $1 AND conversation_id = $2"
        " ORDER BY seq DESC LIMIT $3::int) t ORDER BY seq";

static uint64_t
ctx_hash(struct mstr bot, struct mstr conv)
{
	uint64_t h = 14695981039346656037ULL;
	uint32_t i;

	for (i = 0; i < bot.n; i++) {
		h ^= (unsigned char)bot.p[i];
		h *= 1099511628211ULL;
	}
	h ^= ':';
	h *= 1099511628211ULL;
	for (i = 0; i < conv.n; i++) {
		h ^= (unsigned char)conv.p[i];
		h *= 1099511628211ULL;
	}
	return (h);
}

void
storage_ctx_committed(struct storage *st, struct mstr bot, struct mstr conv)
{
	st->epoch_slot[ctx_hash(bot, conv) % STORAGE_EPOCH_SLOTS] =
	        st->commit_epoch;
}

static void
ctx_req_free(struct storage_ctx_req *req)
{
	struct storage *st = req->st;

	storage_bot_unref(req->bot);
	free(req);
	st->nctx--;
	storage_stop_check(st);
}

/* Answer req and free it. */
static void
ctx_reply(struct storage_ctx_req *req, uint64_t status, int64_t code,
          const char *msg, const char *ctx, size_t ctxlen)
{
	struct storage *st = req->st;
	struct ctx_reply r;

	memset(&r, 0, sizeof(r));
	r.status = status;
	r.code = code;
	r.msg = MSTR(msg);
	r.upstream = r.model = r.system_prompt = r.context = MSTR_NULL;
	r.plugins = MSTR_NULL;
	if (status == 200 && req->bot != NULL) {
		r.plugins = (struct mstr){req->bot->plugins,
		                          (uint32_t)req->bot->plugins_len};
		r.created_at = req->created_at;
		r.first_event_ms = req->bot->ttfe_ms;
		r.total_ms = req->bot->total_ms;
		r.upstream = MSTR(req->bot->upstream);
		r.model = MSTR(req->bot->model);
		r.system_prompt = MSTR(req->bot->system_prompt);
		r.context_turns = req->bot->context_turns;
		r.context = (struct mstr){ctx ? ctx : "", (uint32_t)ctxlen};
	}
	if (status != 200)
		log_req(LOG_L_DEBUG, req->head.reqid, req->head.traceparent,
		        req->bot_id, "CTX_GET: %llu %lld %s",
		        (unsigned long long)status, (long long)code, msg);
	/* The run will not start: free its conversation at once rather
	 * than when the lock expires. */
	if (status != 200 && req->locked)
		(void)storage_chat_finish(st, req->conversation_id.p,
		                          req->chat_id.p, "", NULL, NULL);
	if (st->m.ctx_seconds != NULL)
		histo_observe(st->m.ctx_seconds,
		              (double)(now_mono_ns() - req->t0_ns) / 1e9);
	if (trace_enabled) {
		struct trace_span ts = {.name = "storage.ctx",
		                        .kind = TRACE_INTERNAL,
		                        .start_ns =
		                                trace_wall_of_mono(req->t0_ns),
		                        .http_status = (int)status,
		                        .error = status >= 500,
		                        .bot_id = req->bot_id};
		char ctp[TRACE_TP_LEN];

		if (trace_child(req->head.traceparent, ts.name, 0, ctp) == 0)
			trace_end((struct mstr){ctp, TRACE_TP_LEN},
			          req->head.traceparent, &ts);
	}
	if (req->reply_to[0] != '\0' &&
	    msg_send_ctx_reply(st->svc.ipc, req->reply_to, &req->head, &r) ==
	            -1) {
		storage_count(st->m.err_send);
		log_req(LOG_L_WARN, req->head.reqid, req->head.traceparent,
		        req->bot_id, "CTX_REPLY to %s refused (backlog full)",
		        req->reply_to);
	}
	ctx_req_free(req);
}

static void
ctx_unavailable(struct storage_ctx_req *req, const char *what)
{
	storage_count(req->st->m.ctx_unavailable);
	ctx_reply(req, 503, 5030, what, NULL, 0);
}

/* A rebuild PostgreSQL cannot answer: in L2 (a spool, and chats spooled
 * or the reader down) the run goes on with no history (serve from cache:
 * the cache has none), else 503. */
static void
ctx_rebuild_failed(struct storage_ctx_req *req)
{
	struct storage *st = req->st;

	if (st->spool == NULL ||
	    (!st->spooling && storage_pg_up(st->reader))) {
		ctx_unavailable(req, "storage unavailable");
		return;
	}
	storage_count(req->st->m.ctx_none);
	ctx_reply(req, 200, 0, "", "", 0);
}

/* Refuse a CTX_GET at once: 400/4000 with why, to its reply_to. */
static void
ctx_refuse(struct storage *st, const struct msg *m, const char *why)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct ctx_reply r;
	char *to;

	storage_count(st->m.ctx_invalid);
	if (m->reply_to.n == 0 || (to = mstr_dup(m->reply_to)) == NULL)
		return;
	memset(&r, 0, sizeof(r));
	r.status = 400;
	r.code = 4000;
	r.msg = MSTR(why);
	r.upstream = r.model = r.system_prompt = r.context = MSTR_NULL;
	r.plugins = MSTR_NULL;
	if (msg_send_ctx_reply(st->svc.ipc, to, &h, &r) == -1)
		storage_count(st->m.err_send);
	free(to);
}

void
storage_ctx_bad(struct storage *st, const struct msg *m)
{
	ctx_refuse(st, m, "undecodable CTX_GET");
}

void
storage_ctx_get(struct storage *st, const struct msg *m,
                const struct ctx_get *b)
{
	struct storage_ctx_req *req;
	struct buf key = {0};
	size_t sz;
	char *p;

	if (b->conversation_id.n > CTX_CONV_MAX ||
	    !storage_text_utf8_ok(b->conversation_id.p,
	                          b->conversation_id.n) ||
	    !storage_text_utf8_ok(b->bot_id.p, b->bot_id.n)) {
		ctx_refuse(st, m, "invalid conversation or bot id");
		return;
	}
	/* v3: the ids name Redis keys; they are ours (coze.h) or were
	 * checked by the edge. */
	if (b->chat_id.n > 0 &&
	    (!coze_id_ok(b->chat_id) || !coze_id_ok(b->conversation_id) ||
	     b->user_id.n > CTX_CONV_MAX ||
	     !storage_text_utf8_ok(b->user_id.p, b->user_id.n))) {
		ctx_refuse(st, m, "invalid chat, conversation or user id");
		return;
	}
	/* webhook: the nonce names a Redis key (the edge checked it). */
	if (b->nonce.n > 0 &&
	    (b->nonce.n > STORAGE_NONCE_MAX ||
	     !storage_text_utf8_ok(b->nonce.p, b->nonce.n) ||
	     memchr(b->nonce.p, '\0', b->nonce.n) != NULL ||
	     memchr(b->bot_id.p, '\0', b->bot_id.n) != NULL)) {
		ctx_refuse(st, m, "invalid nonce or bot id");
		return;
	}
	if (storage_text_ctx_key(&key, b->bot_id, b->conversation_id) == -1)
		goto oom;
	sz = sizeof(*req) + storage_head_size(m) + b->bot_id.n + 1 +
	     b->conversation_id.n + 1 + b->chat_id.n + 1 + b->user_id.n + 1 +
	     b->nonce.n + 1 + key.len + 1;
	if ((req = calloc(1, sz)) == NULL)
		goto oom;
	req->st = st;
	req->t0_ns = now_mono_ns();
	p = storage_head_copy(m, &req->head, &req->reply_to, req->blob, 1);
	memcpy(p, b->bot_id.p, b->bot_id.n);
	req->bot_id = (struct mstr){p, b->bot_id.n};
	p += b->bot_id.n;
	*p++ = '\0';
	memcpy(p, b->conversation_id.p, b->conversation_id.n);
	req->conversation_id = (struct mstr){p, b->conversation_id.n};
	p += b->conversation_id.n;
	*p++ = '\0';
	memcpy(p, b->chat_id.p, b->chat_id.n);
	req->chat_id = (struct mstr){p, b->chat_id.n};
	p += b->chat_id.n;
	*p++ = '\0';
	memcpy(p, b->user_id.p, b->user_id.n);
	req->user_id = (struct mstr){p, b->user_id.n};
	p += b->user_id.n;
	*p++ = '\0';
	memcpy(p, b->nonce.p, b->nonce.n);
	req->nonce = (struct mstr){p, b->nonce.n};
	p += b->nonce.n;
	*p++ = '\0';
	req->lock_ms = b->lock_ms;
	memcpy(p, key.b, key.len);
	p[key.len] = '\0';
	req->key = p;
	req->keylen = key.len;
	buf_free(&key);
	st->nctx++;
	if (st->svc.stopping) {
		ctx_reply(req, 503, MSG_CODE_STOPPING, "storage stopping",
		          NULL, 0);
		return;
	}
	storage_bots_get(st, req);
	return;
oom:
	buf_free(&key);
	log_warnx("%s: out of memory", __func__);
}

static void ctx_lrange_done(void *, const redisReply *);
static void ctx_rebuild_done(void *, const PGresult *);
static void ctx_read(struct storage_ctx_req *);
static void ctx_rebuild(struct storage_ctx_req *);

/* SET NX answered: OK, the nonce is new; nil, it was seen. */
static void
ctx_nonce_done(void *arg, const redisReply *reply)
{
	struct storage_ctx_req *req = arg;
	struct storage *st = req->st;

	if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
		storage_count(st->m.err_redis);
		storage_count(st->m.nonce_unavailable);
		ctx_unavailable(req, "replay check unavailable");
		return;
	}
	if (reply->type == REDIS_REPLY_NIL) {
		storage_count(st->m.nonce_replayed);
		ctx_reply(req, 409, 4017, "nonce already used", NULL, 0);
		return;
	}
	storage_count(st->m.nonce_ok);
	ctx_read(req);
}

/* A webhook's CTX_GET, the bot known: remember its nonce for
 * STORAGE_NONCE_TTL_S, refusing one already remembered (a replay). */
static void
ctx_nonce(struct storage_ctx_req *req)
{
	struct storage *st = req->st;
	struct buf key = {0};
	char ttl[24];
	const char *argv[6];
	size_t argl[6];
	int i;

	if (buf_addf(&key, "troupe:nonce:%s:", req->bot_id.p) == -1 ||
	    buf_add(&key, req->nonce.p, req->nonce.n) == -1 ||
	    buf_add(&key, "", 1) == -1) {
		buf_free(&key);
		log_warnx("%s: out of memory", __func__);
		ctx_reply(req, 500, 5000, "out of memory", NULL, 0);
		return;
	}
	snprintf(ttl, sizeof(ttl), "%d", STORAGE_NONCE_TTL_S);
	argv[0] = "SET";
	argv[1] = key.b;
	argv[2] = "1";
	argv[3] = "NX";
	argv[4] = "EX";
	argv[5] = ttl;
	for (i = 0; i < 6; i++)
		argl[i] = strlen(argv[i]);
	argl[1] = key.len - 1;
	if (storage_redis_cmd(st->redis, ctx_nonce_done, req, 6, argv, argl) ==
	    -1) {
		storage_count(st->m.nonce_unavailable);
		ctx_unavailable(req, "replay check unavailable");
	}
	buf_free(&key);
}

void
storage_ctx_have_bot(struct storage_ctx_req *req, struct storage_bot *bot,
                     enum storage_bot_status status)
{
	struct storage *st = req->st;

	switch (status) {
	case STORAGE_BOT_ABSENT:
		storage_count(st->m.ctx_unknown_bot);
		ctx_reply(req, 404, 4006, "bot not found", NULL, 0);
		return;
	case STORAGE_BOT_UNAVAILABLE:
		ctx_unavailable(req, "storage unavailable");
		return;
	case STORAGE_BOT_FOUND:
		break;
	}
	storage_bot_ref(bot);
	req->bot = bot;
	if (req->nonce.n > 0) {
		ctx_nonce(req);
		return;
	}
	if (req->chat_id.n > 0) {
		storage_chat_lock(req);
		return;
	}
	ctx_read(req);
}

void
storage_ctx_locked(struct storage_ctx_req *req, uint64_t status, int64_t code,
                   const char *msg)
{
	if (status != 200) {
		if (status == 503)
			storage_count(req->st->m.ctx_unavailable);
		ctx_reply(req, status, code, msg, NULL, 0);
		return;
	}
	ctx_read(req);
}

/* The bot is known (and the lock taken): read the context. */
static void
ctx_read(struct storage_ctx_req *req)
{
	struct storage *st = req->st;
	struct storage_bot *bot = req->bot;
	char lo[24];
	const char *argv[4];
	size_t argl[4];

	if (req->conversation_id.n == 0 || bot->context_turns == 0) {
		storage_count(st->m.ctx_none);
		ctx_reply(req, 200, 0, "", "", 0);
		return;
	}
	snprintf(lo, sizeof(lo), "-%llu",
	         (unsigned long long)(2 * bot->context_turns));
	argv[0] = "LRANGE";
	argv[1] = req->key;
	argv[2] = lo;
	argv[3] = "-1";
	argl[0] = 6;
	argl[1] = req->keylen;
	argl[2] = strlen(lo);
	argl[3] = 2;
	if (!storage_redis_up(st->redis) ||
	    storage_redis_cmd(st->redis, ctx_lrange_done, req, 4, argv,
	                      argl) == -1) {
		storage_count(st->m.ctx_fallback);
		ctx_rebuild(req);
	}
}

static void
ctx_rebuild(struct storage_ctx_req *req)
{
	struct storage *st = req->st;
	const char *values[3];
	char n[24];

	snprintf(n, sizeof(n), "%llu",
	         (unsigned long long)req->bot->context_turns);
	values[0] = req->bot_id.p; /* NUL-terminated in the blob */
	values[1] = req->conversation_id.p;
	values[2] = n;
	req->epoch = st->commit_epoch;
	if (storage_pg_query(st->reader, ctx_rebuild_sql, 3, values,
	                     ctx_rebuild_done, req) == -1)
		ctx_rebuild_failed(req);
}

static void
ctx_lrange_done(void *arg, const redisReply *reply)
{
	struct storage_ctx_req *req = arg;
	struct storage *st = req->st;
	struct mstr *v;
	struct buf b = {0};
	size_t i;

	if (reply == NULL) {
		/* Lost or timed out: PostgreSQL has every turn. */
		storage_count(st->m.err_redis);
		storage_count(st->m.ctx_fallback);
		ctx_rebuild(req);
		return;
	}
	if (reply->type != REDIS_REPLY_ARRAY || reply->elements == 0) {
		/* No key (or not a list: the write-back replaces it). */
		storage_count(st->m.ctx_miss);
		ctx_rebuild(req);
		return;
	}
	if ((v = calloc(reply->elements, sizeof(*v))) == NULL)
		goto oom;
	for (i = 0; i < reply->elements; i++) {
		const redisReply *e = reply->element[i];
		if (e->type == REDIS_REPLY_STRING)
			v[i] = (struct mstr){e->str, (uint32_t)e->len};
		else
			v[i] = MSTR_NULL;
	}
	if (storage_text_ctx_join(&b, v, reply->elements) == -1) {
		free(v);
		buf_free(&b);
		goto oom;
	}
	free(v);
	storage_count(st->m.ctx_hit);
	ctx_reply(req, 200, 0, "", b.b, b.len);
	buf_free(&b);
	return;
oom:
	log_warnx("%s: out of memory", __func__);
	ctx_reply(req, 500, 5000, "out of memory", NULL, 0);
}

static void
ctx_writeback(struct storage_ctx_req *req, struct buf *msgs, const size_t *off,
              int nmsg)
{
	struct storage *st = req->st;
	const char **argv = NULL;
	size_t *argl = NULL, i;
	char ttl[24];
	int n = 0, ok = 1;

	if (!storage_redis_up(st->redis))
		return;
	if (storage_health_defer(st))
		return; /* tier L1+: the next read rebuilds (docs/tiers.md) */
	if (st->epoch_slot[ctx_hash(req->bot_id, req->conversation_id) %
	                   STORAGE_EPOCH_SLOTS] > req->epoch)
		return; /* a commit overtook this read: let the next rebuild */
	if ((argv = calloc((size_t)nmsg + 3, sizeof(*argv))) == NULL ||
	    (argl = calloc((size_t)nmsg + 3, sizeof(*argl))) == NULL)
		goto out;
	snprintf(ttl, sizeof(ttl), "%lld", (long long)st->conf.context_ttl_s);

	argv[0] = "MULTI";
	argl[0] = 5;
	ok &= storage_redis_cmd(st->redis, NULL, NULL, 1, argv, argl) == 0;
	argv[0] = "DEL";
	argl[0] = 3;
	argv[1] = req->key;
	argl[1] = req->keylen;
	ok &= storage_redis_cmd(st->redis, NULL, NULL, 2, argv, argl) == 0;
	argv[0] = "RPUSH";
	argl[0] = 5;
	argv[2] = ""; /* the "known" marker */
	argl[2] = 0;
	n = 3;
	for (i = 0; i < (size_t)nmsg; i++, n++) {
		argv[n] = msgs->b + off[i];
		argl[n] = off[i + 1] - off[i];
	}
	ok &= storage_redis_cmd(st->redis, NULL, NULL, n, argv, argl) == 0;
	argv[0] = "EXPIRE";
	argl[0] = 6;
	argv[2] = ttl;
	argl[2] = strlen(ttl);
	ok &= storage_redis_cmd(st->redis, NULL, NULL, 3, argv, argl) == 0;
	argv[0] = "EXEC";
	argl[0] = 4;
	/* If an earlier part was refused, EXEC still closes the MULTI
	 * (the connection is going down anyway in that case). */
	ok &= storage_redis_cmd(st->redis, NULL, NULL, 1, argv, argl) == 0;
	if (!ok)
		log_debug("%s: write-back of %s not sent", __func__, req->key);
out:
	free(argv);
	free(argl);
}

static void
ctx_rebuild_done(void *arg, const PGresult *res)
{
	struct storage_ctx_req *req = arg;
	struct storage *st = req->st;
	struct buf msgs = {0}, joined = {0};
	size_t *off = NULL;
	int i, nrow, nmsg;

	if (res == NULL) {
		ctx_rebuild_failed(req);
		return;
	}
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		storage_count(st->m.err_pg);
		log_req(LOG_L_WARN, req->head.reqid, req->head.traceparent,
		        req->bot_id, "context rebuild: %s",
		        storage_pg_error(res));
		ctx_unavailable(req, "storage unavailable");
		return;
	}
	nrow = PQntuples(res);
	nmsg = 2 * nrow;
	if ((off = calloc((size_t)nmsg + 1, sizeof(*off))) == NULL)
		goto oom;
	for (i = 0; i < nrow; i++) {
		if (storage_text_msg_json(&msgs, "user", PQgetvalue(res, i, 0),
		                          (size_t)PQgetlength(res, i, 0)) ==
		    -1)
			goto oom;
		off[2 * i + 1] = msgs.len;
		if (storage_text_msg_json(
		            &msgs, "assistant", PQgetvalue(res, i, 1),
		            (size_t)PQgetlength(res, i, 1)) == -1)
			goto oom;
		off[2 * i + 2] = msgs.len;
	}
	for (i = 0; i < nmsg; i++) {
		if ((i > 0 && buf_add(&joined, ",", 1) == -1) ||
		    buf_add(&joined, msgs.b + off[i], off[i + 1] - off[i]) ==
		            -1)
			goto oom;
	}
	ctx_writeback(req, &msgs, off, nmsg);
	ctx_reply(req, 200, 0, "", joined.b, joined.len);
	free(off);
	buf_free(&msgs);
	buf_free(&joined);
	return;
oom:
	free(off);
	buf_free(&msgs);
	buf_free(&joined);
	log_warnx("%s: out of memory", __func__);
	ctx_reply(req, 500, 5000, "out of memory", NULL, 0);
}

/* Deletions that wait for Redis. */

static void
forget_add(struct storage *st, const char *key, size_t n)
{
	char *k, **v;

	if (st->nforget >= CTX_FORGET_MAX) {
		storage_count(st->m.invalidations_lost);
		log_warnx(
		        "%s: %zu context invalidations waiting for Redis; "
		        "dropping %.*s (it may serve a stale context until it "
		        "expires)",
		        __func__, st->nforget, (int)n, key);
		return;
	}
	if (st->nforget == st->capforget) {
		size_t c = st->capforget ? st->capforget * 2 : 64;
		if ((v = realloc(st->forget, c * sizeof(*v))) == NULL)
			goto lost;
		st->forget = v;
		st->capforget = c;
	}
	if ((k = strndup(key, n)) == NULL)
		goto lost;
	st->forget[st->nforget++] = k;
	return;
lost:
	storage_count(st->m.invalidations_lost);
	log_warnx("%s: out of memory: lost the invalidation of %.*s", __func__,
	          (int)n, key);
}

struct forget_op {
	struct storage *st;
	size_t n;
	char key[];
};

static void
forget_done(void *arg, const redisReply *reply)
{
	struct forget_op *f = arg;

	if (reply == NULL || reply->type == REDIS_REPLY_ERROR)
		forget_add(f->st, f->key, f->n);
	free(f);
}

void
storage_ctx_forget(struct storage *st, const char *key, size_t n)
{
	struct forget_op *f;
	const char *argv[2] = {"DEL", NULL};
	size_t argl[2] = {3, n};

	if (!storage_redis_up(st->redis) ||
	    (f = malloc(sizeof(*f) + n + 1)) == NULL) {
		forget_add(st, key, n);
		return;
	}
	f->st = st;
	f->n = n;
	memcpy(f->key, key, n);
	f->key[n] = '\0';
	argv[1] = f->key;
	if (storage_redis_cmd(st->redis, forget_done, f, 2, argv, argl) ==
	    -1) {
		forget_add(st, key, n);
		free(f);
	}
}

/* Send the deletions that waited for Redis. */
static void
ctx_forget_flush(struct storage *st)
{
	char **v = st->forget;
	size_t i, n = st->nforget;

	if (n == 0)
		return;
	log_info("redis: deleting %zu context keys written while it was "
	         "unreachable",
	         n);
	st->forget = NULL;
	st->nforget = st->capforget = 0;
	/* Sent first on the new connection: before any read of them. */
	for (i = 0; i < n; i++) {
		storage_ctx_forget(st, v[i], strlen(v[i]));
		free(v[i]);
	}
	free(v);
}

void
storage_ctx_redis_up(struct storage *st)
{
	/* First the deletions, then what the v3 chats did in memory, then
	 * the limit script: all before any other command on the new
	 * connection. */
	ctx_forget_flush(st);
	storage_chat_redis_up(st);
	storage_limit_redis_up(st);
}
