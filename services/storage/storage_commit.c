/* SPDX-License-Identifier: ISC */
/*
 * storage_commit: CHAT_PERSIST by group commit.  A finished turn is
 * queued; whenever the writer connection is idle and rows wait, all of
 * them (up to [storage] batch_max) go out as ONE statement:
 *
 *   INSERT INTO chats (...) SELECT * FROM unnest($1::text[], ...)
 *   ON CONFLICT (chat_id) DO NOTHING RETURNING chat_id
 *
 * one implicit transaction, so one COMMIT (one WAL flush) per batch; the
 * rows that queue while it runs form the next batch.  Only when the
 * statement has returned PGRES_TUPLES_OK (committed) are the turns added
 * to their Redis contexts (RPUSHX, LTRIM, EXPIRE, pipelined; only for
 * rows actually inserted, so a resent CHAT_PERSIST adds nothing twice),
 * and then CHAT_REPLY 200 carrying the worker's data goes to the edge
 * named by reply_to.  A 200 means stored (PRODUCT.md §4.5).
 *
 * Callers: storage_dispatch.c (CHAT_PERSIST), storage.c (kick on every
 * loop turn, refusal when the writer goes down, stop).
 *
 * L2 (a spool configured, storage_spool.c): when the writer is down, or
 * a batch is lost or fails transiently, rows are appended to the spool
 * instead, one fdatasync per loop turn, and only then answered as after
 * a COMMIT (Redis context, v3 status, reply).  When the writer is back
 * the spool is replayed in order through the same statement (ON CONFLICT
 * DO NOTHING: exactly once), new rows still going to the spool behind
 * it, and then emptied.  docs/services/storage.md has the record format.
 *
 * Failures without a spool: writer down, statement failed or timed out:
 * 503/5030 "storage unavailable", Retry-After 1, for every row of the
 * batch.  A batch refused for its data (not a transient SQLSTATE) is
 * retried one row per statement, so one bad row cannot fail its
 * neighbours; that row gets 500/5000.  Rows are checked on arrival (valid
 * UTF-8 without NUL, token counts that fit an int) and refused with 400/4000
 * so they never reach a batch.  A row whose deadline passed while queued is
 * not written and gets 504/5040: the edge has answered the client with an
 * error, so the turn must not appear in the history either.  A Redis failure
 * after COMMIT does not fail the chat: the key is deleted (now, or when Redis
 * is back) so the next read rebuilds it from PostgreSQL.  It must never
 * acknowledge a row that is neither committed nor synced to the spool.
 *
 * DIAGNOSTICS: refused batches and failed statements warn; entering and
 * leaving L2 are logged with the cause; a full spool warns every 30 s.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "coze.h"
#include "storage.h"
#include "trace.h"

#define COMMIT_ID_MAX 256

#define COMMIT_MSGS_MAX 1000 /* messages of one v3 chat */
#define COMMIT_NCHAT 12      /* parameters: chats */
#define COMMIT_NMSG 10       /* messages */
#define COMMIT_NCONV 4       /* conversations */
#define COMMIT_NPARAM (COMMIT_NCHAT + COMMIT_NMSG + COMMIT_NCONV)

/*
 * One statement, so one implicit transaction: the chats (v1 and v3), the
 * messages and the conversations of v3 chats.  v1 rows leave the v3
 * columns at what a v1 chat is (completed, no error, created now).
 */
static const char commit_sql[] =
        "WITH c AS (INSERT INTO chats (chat_id, conversation_id, bot_id,"
        " user_id, query, answer, prompt_tokens, completion_tokens, status,"
        " route, last_error, created_at, completed_at) "
        "SELECT t.a, t.b, t.c, t.d, t.e, t.f, t.g, t.h, t.i, t.j,"
        " nullif(t.k, ''),"
        " coalesce(to_timestamp(nullif(t.l, 0)), clock_timestamp()),"
        " CASE WHEN t.j = 'v3.chat' THEN clock_timestamp() END "
        "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
        " $5::text[], $6::text[], $7::int[], $8::int[], $9::text[],"
        " $10::text[], $11::text[], $12::bigint[])"
        " AS t(a, b, c, d, e, f, g, h, i, j, k, l) "
        "ON CONFLICT (chat_id) DO NOTHING RETURNING chat_id), "
        "m AS (INSERT INTO messages (id, chat_id, conversation_id, bot_id,"
        " seq, role, type, content, content_type, created_at) "
        "SELECT * FROM unnest($13::text[], $14::text[], $15::text[],"
        " $16::text[], $17::int[], $18::text[], $19::text[], $20::text[],"
        " $21::text[], $22::bigint[]) "
        "ON CONFLICT (id) DO NOTHING), "
        "v AS (INSERT INTO conversations (id, bot_id, user_id, created_at) "
        "SELECT DISTINCT ON (t.id) t.id, t.b, t.u, t.ca"
        " FROM unnest($23::text[], $24::text[], $25::text[], $26::bigint[])"
        " AS t(id, b, u, ca) "
        "ON CONFLICT (id) DO NOTHING) "
        "SELECT chat_id FROM c";

struct storage_row {
	TAILQ_ENTRY(storage_row) entry;
	struct storage_batch *batch;
	struct storage *st;
	struct msg_head head;
	char *reply_to;
	/* NUL-terminated copies in blob. */
	struct mstr chat_id, conversation_id, bot_id, user_id, query, answer,
	        reply;
	uint64_t prompt_tokens, completion_tokens, context_turns;
	/* v3 (route "v3.chat") */
	int v3;
	uint64_t reply_kind; /* 0 CHAT_REPLY, 1 CHAT_EVENT, 2 none */
	char status[16];     /* completed, failed, canceled */
	struct mstr last_error;
	uint64_t created_at;
	cJSON *msgs;         /* the messages to store, checked */
	int solo;            /* write alone (its batch was refused) */
	int replayed;        /* read back from the spool */
	uint64_t spooled_at; /* unix s, when it was spooled */
	int inserted;        /* new row (not a resend of a stored one) */
	int redis_failed;    /* the context update failed */
	uint64_t trace_ns;   /* unix ns: CHAT_PERSIST taken (its span) */
	char *key;           /* context key, once committed */
	size_t keylen;
	char blob[];
};

struct storage_batch {
	struct storage *st;
	struct storage_rows rows;
	size_t n;
	int replay;        /* rows read back from the spool */
	uint64_t next_off; /* the spool offset after them */
	size_t redis_pending;
	uint64_t t0_ns;
};

static void
row_free(struct storage_row *r)
{
	if (r->v3)
		storage_chat_pending(r->st, r->chat_id, -1);
	free(r->key);
	cJSON_Delete(r->msgs);
	free(r);
}

/* Send CHAT_REPLY for r. */
static void
row_reply(struct storage *st, struct storage_row *r, uint64_t status,
          int64_t code, const char *msg, uint64_t retry_after)
{
	struct chat_reply cr;
	struct chat_event ev;
	int rc;

	memset(&cr, 0, sizeof(cr));
	cr.status = status;
	cr.code = code;
	cr.msg = MSTR(msg);
	cr.data = status == 200 ? r->reply : MSTR_NULL;
	cr.retry_after = retry_after;
	/* A v3 chat that will not be stored is over all the same: free
	 * its conversation (the hash says failed unless PostgreSQL has
	 * the row: a lost statement may have committed). */
	if (status != 200 && r->v3)
		(void)storage_chat_finish(st, r->conversation_id.p,
		                          r->chat_id.p, "failed", NULL, NULL);
	/* Outages are logged once by storage_pg.c and counted here; one
	 * line per row would flood the journal. */
	if (status != 200)
		log_req(status == 500 ? LOG_L_WARN : LOG_L_DEBUG,
		        r->head.reqid, r->head.traceparent, r->bot_id,
		        "chat %s not stored: %llu %s", r->chat_id.p,
		        (unsigned long long)status, msg);
	if (trace_enabled && r->trace_ns != 0) {
		struct trace_span ts = {.name = "storage.commit",
		                        .kind = TRACE_INTERNAL,
		                        .start_ns = r->trace_ns,
		                        .http_status = (int)status,
		                        .error = status >= 500,
		                        .bot_id = r->bot_id};
		char ctp[TRACE_TP_LEN];

		if (trace_child(r->head.traceparent, ts.name, 0, ctp) == 0)
			trace_end((struct mstr){ctp, TRACE_TP_LEN},
			          r->head.traceparent, &ts);
	}
	if (r->reply_to[0] == '\0' || r->reply_kind == 2)
		return;
	if (status == 200 && r->reply_kind == 1) {
		memset(&ev, 0, sizeof(ev));
		ev.sse = r->reply;
		ev.last = 1;
		rc = msg_send_chat_event(st->svc.ipc, r->reply_to, &r->head,
		                         &ev);
	} else
		rc = msg_send_chat_reply(st->svc.ipc, r->reply_to, &r->head,
		                         &cr);
	if (rc == -1) {
		storage_count(st->m.err_send);
		log_req(LOG_L_WARN, r->head.reqid, r->head.traceparent,
		        r->bot_id, "answer to %s refused (backlog full)",
		        r->reply_to);
	}
}

static void
reply_now(struct storage *st, const struct msg *m, uint64_t status,
          int64_t code, const char *msg, uint64_t retry_after)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct chat_reply cr = {0};
	char *to;

	if (m->reply_to.n == 0 || (to = mstr_dup(m->reply_to)) == NULL)
		return;
	cr.status = status;
	cr.code = code;
	cr.msg = MSTR(msg);
	cr.data = MSTR_NULL;
	cr.retry_after = retry_after;
	if (msg_send_chat_reply(st->svc.ipc, to, &h, &cr) == -1)
		storage_count(st->m.err_send);
	free(to);
}

static int
persist_is_v3(const struct chat_persist *b)
{
	return (mstr_eq(b->route, "v3.chat"));
}

/* Refuse a CHAT_PERSIST on arrival: free a v3 chat's conversation, and
 * answer unless nobody waits (reply_kind 2). */
static void
persist_refuse(struct storage *st, const struct msg *m,
               const struct chat_persist *b, uint64_t status, int64_t code,
               const char *msg, uint64_t retry_after)
{
	char conv[COZE_ID_LEN * 2], chat[COZE_ID_LEN * 2];

	if (persist_is_v3(b) && coze_id_ok(b->chat_id) &&
	    coze_id_ok(b->conversation_id)) {
		/* coze_id_ok: at most 32 digits */
		snprintf(conv, sizeof(conv), "%.*s", (int)b->conversation_id.n,
		         b->conversation_id.p);
		snprintf(chat, sizeof(chat), "%.*s", (int)b->chat_id.n,
		         b->chat_id.p);
		(void)storage_chat_finish(st, conv, chat, "failed", NULL,
		                          NULL);
	}
	if (persist_is_v3(b) && b->reply_kind == 2)
		return;
	reply_now(st, m, status, code, msg, retry_after);
}

void
storage_commit_bad(struct storage *st, const struct msg *m)
{
	storage_count(st->m.rows_invalid);
	reply_now(st, m, 500, 5000, "undecodable CHAT_PERSIST", 0);
}

static const char *
persist_invalid(const struct chat_persist *b)
{
	if (b->chat_id.n == 0 || b->chat_id.n > COMMIT_ID_MAX)
		return ("bad chat_id");
	/* A ':' would make the context key ambiguous (another bot's
	 * conversation); bot.add refuses such ids, so no run has one. */
	if (!storage_text_bot_id_ok(b->bot_id.p, b->bot_id.n))
		return ("bad bot_id");
	if (b->conversation_id.n > 1024 || b->user_id.n > 1024)
		return ("conversation or user id too long");
	if (!storage_text_utf8_ok(b->chat_id.p, b->chat_id.n) ||
	    !storage_text_utf8_ok(b->bot_id.p, b->bot_id.n) ||
	    !storage_text_utf8_ok(b->conversation_id.p,
	                          b->conversation_id.n) ||
	    !storage_text_utf8_ok(b->user_id.p, b->user_id.n))
		return ("ids must be valid UTF-8");
	if (!storage_text_utf8_ok(b->query.p, b->query.n))
		return ("query is not valid UTF-8 text");
	if (!storage_text_utf8_ok(b->answer.p, b->answer.n))
		return ("answer is not valid UTF-8 text");
	if (b->prompt_tokens > INT_MAX || b->completion_tokens > INT_MAX)
		return ("token count out of range");
	if (b->context_turns > 1000)
		return ("context_turns out of range");
	if (b->route.n != 0 && !mstr_eq(b->route, "v1.chat") &&
	    !persist_is_v3(b))
		return ("unknown route");
	if (!persist_is_v3(b))
		return (NULL);
	if (!coze_id_ok(b->chat_id) || !coze_id_ok(b->conversation_id))
		return ("v3: chat_id and conversation_id must be ids");
	if (!mstr_eq(b->status, "completed") &&
	    !mstr_eq(b->status, "failed") && !mstr_eq(b->status, "canceled"))
		return ("v3: status must be completed, failed or canceled");
	if (b->reply_kind > 2)
		return ("v3: reply_kind must be 0, 1 or 2");
	if (!storage_text_utf8_ok(b->last_error.p, b->last_error.n) ||
	    !storage_text_utf8_ok(b->messages.p, b->messages.n))
		return ("v3: messages and last_error must be UTF-8 text");
	if (b->created_at > (uint64_t)INT64_MAX / 1000)
		return ("v3: created_at out of range");
	return (NULL);
}

static int
msg_str(const cJSON *o, const char *name, size_t max, int need)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

	if (v == NULL)
		return (!need);
	return (cJSON_IsString(v) && strlen(v->valuestring) <= max &&
	        (!need || v->valuestring[0] != '\0'));
}

/*
 * Parse and check the messages of a v3 persist: a JSON array (or "") of
 * {id, role, type, content, content_type?, created_at?}.  *out is NULL
 * for none.  The reason, or NULL.
 */
static const char *
persist_msgs(const struct chat_persist *b, cJSON **out)
{
	cJSON *a, *e;
	const cJSON *id, *ca;
	char *text;
	int n = 0;

	*out = NULL;
	if (b->messages.n == 0)
		return (NULL);
	if ((text = mstr_dup(b->messages)) == NULL)
		return ("out of memory");
	a = cJSON_Parse(text);
	free(text);
	if (!cJSON_IsArray(a)) {
		cJSON_Delete(a);
		return ("v3: messages must be a JSON array");
	}
	cJSON_ArrayForEach(e, a)
	{
		if (++n > COMMIT_MSGS_MAX)
			goto bad;
		id = cJSON_GetObjectItemCaseSensitive(e, "id");
		ca = cJSON_GetObjectItemCaseSensitive(e, "created_at");
		if (!cJSON_IsObject(e) || !cJSON_IsString(id) ||
		    !coze_id_ok(MSTR(id->valuestring)) ||
		    !msg_str(e, "role", 32, 1) || !msg_str(e, "type", 32, 1) ||
		    !cJSON_IsString(
		            cJSON_GetObjectItemCaseSensitive(e, "content")) ||
		    !msg_str(e, "content_type", 32, 0) ||
		    (ca != NULL &&
		     (!cJSON_IsNumber(ca) || ca->valuedouble < 0 ||
		      ca->valuedouble > 1e12)))
			goto bad;
	}
	*out = a;
	return (NULL);
bad:
	cJSON_Delete(a);
	return ("v3: bad message (want at most 1000 of {id, role, type, "
	        "content, content_type?, created_at?})");
}

static char *
copy_field(char *p, struct mstr *dst, struct mstr src)
{
	memcpy(p, src.p, src.n);
	p[src.n] = '\0';
	*dst = (struct mstr){p, src.n};
	return (p + src.n + 1);
}

void
storage_commit_persist(struct storage *st, const struct msg *m,
                       const struct chat_persist *b)
{
	struct storage_row *r;
	const char *why;
	cJSON *msgs = NULL;
	size_t sz;
	char *p;

	if ((why = persist_invalid(b)) != NULL ||
	    (persist_is_v3(b) && (why = persist_msgs(b, &msgs)) != NULL)) {
		storage_count(st->m.rows_invalid);
		/* Clients control this (a query in bad UTF-8): debug only. */
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, b->bot_id,
		        "CHAT_PERSIST refused: %s", why);
		persist_refuse(st, m, b, 400, 4000, why, 0);
		return;
	}
	if (st->svc.stopping) {
		storage_count(st->m.rows_refused);
		persist_refuse(st, m, b, 503, MSG_CODE_STOPPING,
		               "storage stopping", 1);
		goto out;
	}
	/* With a spool (L2) a writer that is down is no refusal. */
	if (!storage_pg_accepting(st->writer) && st->spool == NULL) {
		storage_count(st->m.rows_refused);
		persist_refuse(st, m, b, 503, 5030, "storage unavailable", 1);
		goto out;
	}
	if (st->nrows >= (size_t)st->conf.queue_max) {
		storage_count(st->m.rows_refused);
		persist_refuse(st, m, b, 503, 5030, "storage overloaded", 1);
		goto out;
	}
	sz = sizeof(*r) + storage_head_size(m) + b->chat_id.n +
	     b->conversation_id.n + b->bot_id.n + b->user_id.n + b->query.n +
	     b->answer.n + b->reply.n + b->last_error.n + 8;
	if ((r = calloc(1, sz)) == NULL) {
		log_warnx("%s: out of memory", __func__);
		persist_refuse(st, m, b, 503, 5030, "storage out of memory",
		               1);
		goto out;
	}
	p = storage_head_copy(m, &r->head, &r->reply_to, r->blob, 0);
	r->trace_ns = trace_in_ns;
	p = copy_field(p, &r->chat_id, b->chat_id);
	p = copy_field(p, &r->conversation_id, b->conversation_id);
	p = copy_field(p, &r->bot_id, b->bot_id);
	p = copy_field(p, &r->user_id, b->user_id);
	p = copy_field(p, &r->query, b->query);
	p = copy_field(p, &r->answer, b->answer);
	p = copy_field(p, &r->reply, b->reply);
	(void)copy_field(p, &r->last_error, b->last_error);
	r->prompt_tokens = b->prompt_tokens;
	r->completion_tokens = b->completion_tokens;
	r->context_turns = b->context_turns;
	r->v3 = persist_is_v3(b);
	r->reply_kind = r->v3 ? b->reply_kind : 0;
	snprintf(r->status, sizeof(r->status), "%.*s",
	         r->v3 ? (int)b->status.n : 9,
	         r->v3 ? b->status.p : "completed");
	r->created_at = b->created_at;
	if (r->v3 && r->created_at == 0)
		r->created_at = now_wall_ms() / 1000;
	r->msgs = msgs;
	msgs = NULL;
	r->st = st;
	if (r->v3)
		storage_chat_pending(st, r->chat_id, 1);
	TAILQ_INSERT_TAIL(&st->rows, r, entry);
	st->nrows++;
	/* The batch starts at the end of this loop turn (storage.c's idle
	 * callback), with every row that arrived in it. */
out:
	cJSON_Delete(msgs);
}

void
storage_commit_refuse_all(struct storage *st)
{
	struct storage_row *r;

	while ((r = TAILQ_FIRST(&st->rows)) != NULL) {
		TAILQ_REMOVE(&st->rows, r, entry);
		st->nrows--;
		storage_count(st->m.rows_failed);
		row_reply(st, r, 503, 5030, "storage unavailable", 1);
		row_free(r);
	}
	storage_stop_check(st);
}

int
storage_commit_busy(const struct storage *st)
{
	return (st->nrows > 0 || st->batch != NULL || st->nappending > 0);
}

static void
batch_free(struct storage_batch *bt)
{
	struct storage_row *r;

	while ((r = TAILQ_FIRST(&bt->rows)) != NULL) {
		TAILQ_REMOVE(&bt->rows, r, entry);
		row_free(r);
	}
	free(bt);
}

/* Every row of bt gets the same error. */
static void
batch_fail(struct storage_batch *bt, uint64_t status, int64_t code,
           const char *msg, uint64_t retry_after)
{
	struct storage *st = bt->st;
	struct storage_row *r;

	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		storage_count(st->m.rows_failed);
		row_reply(st, r, status, code, msg, retry_after);
	}
	batch_free(bt);
}

/* The batch is committed and its Redis updates are over: answer. */
static void
batch_finish(struct storage_batch *bt)
{
	struct storage *st = bt->st;
	struct storage_row *r;

	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		if (r->redis_failed && r->key != NULL) {
			storage_count(st->m.redis_append_failed);
			storage_ctx_forget(st, r->key, r->keylen);
		}
		row_reply(st, r, 200, 0, "", 0);
	}
	batch_free(bt);
	storage_stop_check(st);
}

static void
batch_redis_one_done(struct storage_batch *bt)
{
	if (--bt->redis_pending == 0) {
		bt->st->nappending--;
		batch_finish(bt);
	}
}

static void
row_redis_done(void *arg, const redisReply *reply)
{
	struct storage_row *r = arg;

	if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
		if (!r->redis_failed && reply != NULL)
			log_warnx("redis: context %s: %s", r->key, reply->str);
		r->redis_failed = 1;
	}
	batch_redis_one_done(r->batch);
}

/* A v3 chat's hash and lock (storage_chat_finish): a failure only means
 * the lock expires by itself (and retrieve asks PostgreSQL first). */
static void
row_finish_done(void *arg, const redisReply *reply)
{
	struct storage_row *r = arg;

	if (reply != NULL && reply->type == REDIS_REPLY_ERROR)
		log_warnx("redis: chat %s: %s", r->chat_id.p, reply->str);
	batch_redis_one_done(r->batch);
}

/* Append each inserted turn to its context. */
static void
batch_append(struct storage_batch *bt)
{
	struct storage *st = bt->st;
	struct storage_row *r;
	struct buf key = {0}, u = {0}, a = {0};
	const char *argv[4];
	size_t argl[4];
	char lo[24], ttl[24];

	snprintf(ttl, sizeof(ttl), "%lld", (long long)st->conf.context_ttl_s);
	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		/* Only a completed chat is part of the context. */
		if (!r->inserted || r->context_turns == 0 ||
		    r->conversation_id.n == 0 ||
		    (r->v3 && strcmp(r->status, "completed") != 0))
			continue;
		buf_reset(&key);
		if (storage_text_ctx_key(&key, r->bot_id,
		                         r->conversation_id) == -1 ||
		    (r->key = strndup(key.b, key.len)) == NULL) {
			/* Cannot even name it: nothing to delete either;
			 * the context may miss this turn until it expires. */
			log_warnx("%s: out of memory", __func__);
			continue;
		}
		r->keylen = key.len;
		if (r->redis_failed || !storage_redis_up(st->redis)) {
			r->redis_failed = 1;
			continue;
		}
		buf_reset(&u);
		buf_reset(&a);
		if (storage_text_msg_json(&u, "user", r->query.p,
		                          r->query.n) == -1 ||
		    storage_text_msg_json(&a, "assistant", r->answer.p,
		                          r->answer.n) == -1) {
			r->redis_failed = 1;
			continue;
		}
		argv[0] = "RPUSHX";
		argl[0] = 6;
		argv[1] = r->key;
		argl[1] = r->keylen;
		argv[2] = u.b;
		argl[2] = u.len;
		argv[3] = a.b;
		argl[3] = a.len;
		if (storage_redis_cmd(st->redis, row_redis_done, r, 4, argv,
		                      argl) == 0)
			bt->redis_pending++;
		else
			r->redis_failed = 1;
		snprintf(lo, sizeof(lo), "-%llu",
		         (unsigned long long)(2 * r->context_turns));
		argv[0] = "LTRIM";
		argl[0] = 5;
		argv[2] = lo;
		argl[2] = strlen(lo);
		argv[3] = "-1";
		argl[3] = 2;
		if (storage_redis_cmd(st->redis, row_redis_done, r, 4, argv,
		                      argl) == 0)
			bt->redis_pending++;
		else
			r->redis_failed = 1;
		argv[0] = "EXPIRE";
		argl[0] = 6;
		argv[2] = ttl;
		argl[2] = strlen(ttl);
		if (storage_redis_cmd(st->redis, row_redis_done, r, 3, argv,
		                      argl) == 0)
			bt->redis_pending++;
		else
			r->redis_failed = 1;
	}
	buf_free(&key);
	buf_free(&u);
	buf_free(&a);
	/* Then (same connection, so after the context updates) each v3
	 * chat's final status, and its conversation's lock released.  A
	 * resent chat too: releasing is idempotent. */
	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		if (r->v3 &&
		    storage_chat_finish(st, r->conversation_id.p, r->chat_id.p,
		                        r->status, row_finish_done, r) == 0)
			bt->redis_pending++;
	}
	if (bt->redis_pending == 0)
		batch_finish(bt);
	else
		st->nappending++;
}

static int
cmp_str(const void *a, const void *b)
{
	return (strcmp(*(const char *const *)a, *(const char *const *)b));
}

/* ---------------------------------------------------------------- L2 */

/*
 * A spool record is one row: a version byte (1), the flags byte (bit 0:
 * v3), prompt_tokens, completion_tokens, context_turns, created_at,
 * spooled_at (unix s) (u64 little endian each), then u32-length-prefixed
 * strings: chat_id, conversation_id, bot_id, user_id, query, answer,
 * last_error, status, the messages as JSON ("" for none).
 */
#define SPOOL_REC_V1 1

static int
rec_u64(struct buf *b, uint64_t v)
{
	unsigned char p[8];
	int i;

	for (i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
	return (buf_add(b, p, 8));
}

static int
rec_str(struct buf *b, const char *s, size_t n)
{
	unsigned char p[4];
	int i;

	for (i = 0; i < 4; i++)
		p[i] = (unsigned char)((uint32_t)n >> (8 * i));
	return (buf_add(b, p, 4) == -1 || buf_add(b, s, n) == -1 ? -1 : 0);
}

static int
row_encode(const struct storage_row *r, struct buf *b)
{
	unsigned char h[2] = {SPOOL_REC_V1, (unsigned char)(r->v3 ? 1 : 0)};
	char *msgs = NULL;
	int ok = 1;

	buf_reset(b);
	if (r->msgs != NULL &&
	    (msgs = cJSON_PrintUnformatted(r->msgs)) == NULL)
		return (-1);
	ok &= buf_add(b, h, 2) == 0;
	ok &= rec_u64(b, r->prompt_tokens) == 0;
	ok &= rec_u64(b, r->completion_tokens) == 0;
	ok &= rec_u64(b, r->context_turns) == 0;
	ok &= rec_u64(b, r->created_at) == 0;
	ok &= rec_u64(b, r->spooled_at) == 0;
	ok &= rec_str(b, r->chat_id.p, r->chat_id.n) == 0;
	ok &= rec_str(b, r->conversation_id.p, r->conversation_id.n) == 0;
	ok &= rec_str(b, r->bot_id.p, r->bot_id.n) == 0;
	ok &= rec_str(b, r->user_id.p, r->user_id.n) == 0;
	ok &= rec_str(b, r->query.p, r->query.n) == 0;
	ok &= rec_str(b, r->answer.p, r->answer.n) == 0;
	ok &= rec_str(b, r->last_error.p, r->last_error.n) == 0;
	ok &= rec_str(b, r->status, strlen(r->status)) == 0;
	ok &= rec_str(b, msgs ? msgs : "", msgs ? strlen(msgs) : 0) == 0;
	free(msgs);
	return (ok ? 0 : -1);
}

struct rec_reader {
	const unsigned char *p;
	size_t n;
	int bad;
};

static uint64_t
rd_u64(struct rec_reader *rd)
{
	uint64_t v = 0;
	int i;

	if (rd->n < 8) {
		rd->bad = 1;
		return (0);
	}
	for (i = 0; i < 8; i++)
		v |= (uint64_t)rd->p[i] << (8 * i);
	rd->p += 8;
	rd->n -= 8;
	return (v);
}

static struct mstr
rd_str(struct rec_reader *rd)
{
	struct mstr s = MSTR_NULL;
	uint32_t len;

	if (rd->n < 4) {
		rd->bad = 1;
		return (s);
	}
	len = (uint32_t)rd->p[0] | (uint32_t)rd->p[1] << 8 |
	      (uint32_t)rd->p[2] << 16 | (uint32_t)rd->p[3] << 24;
	if (rd->n - 4 < len) {
		rd->bad = 1;
		return (s);
	}
	s = (struct mstr){(const char *)rd->p + 4, len};
	rd->p += 4 + len;
	rd->n -= 4 + len;
	return (s);
}

/* A row read back from the spool: nobody to answer (reply_kind 2, no
 * reply_to, no deadline).  NULL if the record does not decode. */
static struct storage_row *
row_decode(struct storage *st, const struct buf *b)
{
	struct rec_reader rd = {(const unsigned char *)b->b, b->len, 0};
	struct storage_row *r;
	struct mstr f[9];
	uint64_t num[5];
	cJSON *msgs = NULL;
	char *text;
	size_t sz, i;
	int v3;
	char *p;

	if (rd.n < 2 || rd.p[0] != SPOOL_REC_V1)
		return (NULL);
	v3 = rd.p[1] & 1;
	rd.p += 2;
	rd.n -= 2;
	for (i = 0; i < nitems(num); i++)
		num[i] = rd_u64(&rd);
	sz = sizeof(*r) + 3 + 16;
	for (i = 0; i < nitems(f); i++) {
		f[i] = rd_str(&rd);
		sz += f[i].n + 1;
	}
	if (rd.bad || rd.n != 0 || f[0].n == 0 || f[7].n >= 16)
		return (NULL);
	if (f[8].n > 0) {
		if ((text = mstr_dup(f[8])) == NULL)
			return (NULL);
		msgs = cJSON_Parse(text);
		free(text);
		if (!cJSON_IsArray(msgs)) {
			cJSON_Delete(msgs);
			return (NULL);
		}
	}
	if ((r = calloc(1, sz)) == NULL) {
		cJSON_Delete(msgs);
		return (NULL);
	}
	/* Empty request id, trace and reply_to. */
	r->head.reqid = (struct mstr){r->blob, 0};
	r->head.traceparent = (struct mstr){r->blob + 1, 0};
	r->reply_to = r->blob + 2;
	p = r->blob + 3;
	p = copy_field(p, &r->chat_id, f[0]);
	p = copy_field(p, &r->conversation_id, f[1]);
	p = copy_field(p, &r->bot_id, f[2]);
	p = copy_field(p, &r->user_id, f[3]);
	p = copy_field(p, &r->query, f[4]);
	p = copy_field(p, &r->answer, f[5]);
	p = copy_field(p, &r->reply, MSTR_LIT(""));
	(void)copy_field(p, &r->last_error, f[6]);
	snprintf(r->status, sizeof(r->status), "%.*s", (int)f[7].n, f[7].p);
	r->prompt_tokens = num[0];
	r->completion_tokens = num[1];
	r->context_turns = num[2];
	r->created_at = num[3];
	r->spooled_at = num[4];
	r->v3 = v3;
	r->reply_kind = 2;
	r->replayed = 1;
	r->msgs = msgs;
	r->st = st;
	if (r->v3)
		storage_chat_pending(st, r->chat_id, 1);
	return (r);
}

void
storage_commit_gauges(struct storage *st)
{
	uint64_t bytes = 0, recs = 0;

	if (st->spool != NULL) {
		recs = storage_spool_records(st->spool);
		recs = recs > st->spool_replayed ? recs - st->spool_replayed
		                                 : 0;
		bytes = storage_spool_bytes(st->spool);
		if (st->spool_off > STORAGE_SPOOL_HDR)
			bytes -= st->spool_off - STORAGE_SPOOL_HDR;
		if (st->m.spool_fsyncs != NULL)
			*st->m.spool_fsyncs = storage_spool_syncs(st->spool);
	}
	storage_gauge(st->m.spool_bytes, (double)bytes);
	storage_gauge(st->m.spool_records, (double)recs);
	storage_gauge(st->m.degraded_l2, st->spooling);
}

/* Enter L2: from now on persists go to the spool. */
static void
l2_enter(struct storage *st, const char *cause)
{
	if (st->spooling || st->spool == NULL)
		return;
	st->spooling = 1;
	st->replay_solo = 0;
	snprintf(st->spool_cause, sizeof(st->spool_cause), "%s", cause);
	storage_count(st->m.spool_enter);
	log_warnx("L2: entering degraded tier L2 (%s): chats are spooled to "
	          "%s/storage-spool until PostgreSQL is back",
	          cause, st->conf.spool_dir);
	storage_commit_gauges(st);
	storage_status(st);
}

/* Leave L2: the spool is replayed; empty it. */
static void
l2_leave(struct storage *st)
{
	static uint64_t warned_ms;
	uint64_t n = st->spool_replayed;

	if (storage_spool_clear(st->spool) == -1) {
		/* Stay in L2 (new rows keep going to the spool, behind
		 * the replayed ones, which replay again harmlessly). */
		if (now_wall_ms() - warned_ms > 30000) {
			warned_ms = now_wall_ms();
			log_warn("L2: emptying the spool");
		}
		return;
	}
	st->spooling = 0;
	st->spool_off = 0;
	st->nspool_idx = 0;
	st->spool_replayed = 0;
	st->replay_solo = 0;
	log_info("L2: leaving degraded tier L2: %llu spooled chats "
	         "replayed to PostgreSQL (entered on: %s)",
	         (unsigned long long)n, st->spool_cause);
	st->spool_cause[0] = '\0';
	storage_commit_gauges(st);
	storage_status(st);
}

/* Remember where a v3 chat's record is (a later record of the same
 * chat, a resend, wins: lookups go from the end). */
static int
idx_add(struct storage *st, const char *chat_id, uint64_t off)
{
	struct storage_spool_ent *e;
	size_t cap;

	if (st->nspool_idx == st->capspool_idx) {
		cap = st->capspool_idx ? st->capspool_idx * 2 : 256;
		if ((e = reallocarray(st->spool_idx, cap, sizeof(*e))) == NULL)
			return (-1);
		st->spool_idx = e;
		st->capspool_idx = cap;
	}
	e = &st->spool_idx[st->nspool_idx++];
	snprintf(e->chat_id, sizeof(e->chat_id), "%s", chat_id);
	e->off = off;
	return (0);
}

static void
spooled_chat(const struct storage_row *r, struct buf *out, int *rc)
{
	struct coze_chat c;
	const cJSON *f;
	cJSON *err = NULL;

	memset(&c, 0, sizeof(c));
	c.id = r->chat_id;
	c.conversation_id = r->conversation_id;
	c.bot_id = r->bot_id;
	c.status = r->status;
	c.created_at = r->created_at;
	if (strcmp(r->status, "failed") == 0)
		c.failed_at = r->spooled_at;
	else
		c.completed_at = r->spooled_at;
	if (r->last_error.n > 0 &&
	    (err = cJSON_Parse(r->last_error.p)) != NULL) {
		f = cJSON_GetObjectItemCaseSensitive(err, "code");
		if (cJSON_IsNumber(f))
			c.error_code = (int64_t)f->valuedouble;
		f = cJSON_GetObjectItemCaseSensitive(err, "msg");
		if (cJSON_IsString(f))
			c.error_msg = MSTR(f->valuestring);
	}
	c.input_tokens = r->prompt_tokens;
	c.output_tokens = r->completion_tokens;
	if (coze_chat_json(out, &c) == 0)
		*rc = 1;
	cJSON_Delete(err);
}

static const char *
msg_field(const cJSON *e, const char *name, const char *def)
{
	const cJSON *f = cJSON_GetObjectItemCaseSensitive(e, name);

	return (cJSON_IsString(f) ? f->valuestring : def);
}

static void
spooled_msgs(const struct storage_row *r, struct buf *out, int *rc)
{
	struct coze_msg m;
	const cJSON *e, *f;
	int first = 1;

	if (buf_adds(out, "[") == -1)
		return;
	cJSON_ArrayForEach(e, r->msgs)
	{
		memset(&m, 0, sizeof(m));
		m.id = MSTR(msg_field(e, "id", ""));
		m.conversation_id = r->conversation_id;
		m.bot_id = r->bot_id;
		m.chat_id = r->chat_id;
		m.role = MSTR(msg_field(e, "role", ""));
		m.type = MSTR(msg_field(e, "type", ""));
		m.content = MSTR(msg_field(e, "content", ""));
		m.content_type = MSTR(msg_field(e, "content_type", "text"));
		f = cJSON_GetObjectItemCaseSensitive(e, "created_at");
		m.created_at = cJSON_IsNumber(f) ? (uint64_t)f->valuedouble
		                                 : r->created_at;
		m.updated_at = m.created_at;
		if ((!first && buf_adds(out, ",") == -1) ||
		    coze_msg_json(out, &m) == -1)
			return;
		first = 0;
	}
	if (buf_adds(out, "]") == 0)
		*rc = 1;
}

int
storage_commit_spooled(struct storage *st, const char *chat_id,
                       const char *conv, int list, struct buf *out)
{
	struct storage_row *r;
	struct buf rec = {0};
	uint64_t off;
	size_t i;
	int rc = -1;

	if (st->spool == NULL || !st->spooling)
		return (0);
	for (i = st->nspool_idx; i > 0; i--)
		if (strcmp(st->spool_idx[i - 1].chat_id, chat_id) == 0)
			break;
	if (i == 0)
		return (0);
	off = st->spool_idx[i - 1].off;
	r = storage_spool_next(st->spool, &off, &rec) == 1
	            ? row_decode(st, &rec)
	            : NULL;
	buf_free(&rec);
	if (r == NULL)
		return (-1);
	if (strcmp(r->chat_id.p, chat_id) != 0 ||
	    strcmp(r->conversation_id.p, conv) != 0)
		rc = 0;
	else if (list)
		spooled_msgs(r, out, &rc);
	else
		spooled_chat(r, out, &rc);
	row_free(r);
	return (rc);
}

/* Append the waiting rows to the spool, one fdatasync, then answer them
 * as after a COMMIT (context update, v3 status, reply). */
static void
spool_rows(struct storage *st)
{
	static uint64_t warned_ms;
	struct storage_batch *bt;
	struct storage_row *r;
	struct buf rec = {0};
	uint64_t now = now_wall_ms(), off;
	int full;

	if ((bt = calloc(1, sizeof(*bt))) == NULL)
		return;
	bt->st = st;
	TAILQ_INIT(&bt->rows);
	while ((r = TAILQ_FIRST(&st->rows)) != NULL) {
		TAILQ_REMOVE(&st->rows, r, entry);
		st->nrows--;
		if (r->head.deadline_ms != 0 && r->head.deadline_ms < now) {
			storage_count(st->m.rows_expired);
			row_reply(st, r, 504, 5040, "deadline exceeded", 0);
			row_free(r);
			continue;
		}
		r->spooled_at = now / 1000;
		if (!r->v3)
			r->created_at = r->spooled_at;
		off = storage_spool_tail(st->spool);
		if (row_encode(r, &rec) == -1 ||
		    storage_spool_append(st->spool, rec.b, rec.len) == -1) {
			full = errno == ENOSPC;
			if (now - warned_ms > 30000) {
				warned_ms = now;
				if (full)
					log_warnx("L2: spool full "
					          "(spool_max_bytes %lld): "
					          "chats refused with 503",
					          (long long)st->conf
					                  .spool_max_bytes);
				else
					log_warn("L2: spool append");
			}
			storage_count(st->m.rows_refused);
			row_reply(st, r, 503, 5030,
			          full ? "storage unavailable (spool full)"
			               : "storage unavailable",
			          1);
			row_free(r);
			continue;
		}
		if (r->v3)
			(void)idx_add(st, r->chat_id.p, off);
		r->batch = bt;
		TAILQ_INSERT_TAIL(&bt->rows, r, entry);
		bt->n++;
	}
	buf_free(&rec);
	if (bt->n == 0) {
		free(bt);
		storage_stop_check(st);
		return;
	}
	if (storage_spool_sync(st->spool) == -1) {
		log_warn("L2: spool fdatasync (%zu chats refused)", bt->n);
		batch_fail(bt, 503, 5030, "storage unavailable", 1);
		storage_stop_check(st);
		return;
	}
	st->commit_epoch++;
	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		/* A resend of a spooled chat adds its turn to the context
		 * again: the spool cannot tell (PostgreSQL will). */
		r->inserted = 1;
		storage_count(st->m.rows_spooled);
		storage_ctx_committed(st, r->bot_id, r->conversation_id);
	}
	storage_commit_gauges(st);
	batch_append(bt);
}

/* A batch whose outcome is unknown or transiently failed: with a spool,
 * enter L2 and put its rows back ahead of the queue, in order (they are
 * spooled at the end of this loop turn).  -1 without a spool. */
static int
batch_to_spool(struct storage_batch *bt, const char *cause)
{
	struct storage *st = bt->st;
	struct storage_row *r;

	if (st->spool == NULL || st->svc.stopping)
		return (-1);
	l2_enter(st, cause);
	while ((r = TAILQ_LAST(&bt->rows, storage_rows)) != NULL) {
		TAILQ_REMOVE(&bt->rows, r, entry);
		r->batch = NULL;
		TAILQ_INSERT_HEAD(&st->rows, r, entry);
		st->nrows++;
	}
	free(bt);
	return (0);
}

static void batch_send(struct storage *, struct storage_batch *);

/* Read the next records from the spool into a batch and send it. */
static void
replay_next(struct storage *st)
{
	static uint64_t warned_ms;
	struct storage_batch *bt;
	struct storage_row *r;
	struct buf rec = {0};
	uint64_t off = st->spool_off;
	size_t max = st->replay_solo ? 1 : (size_t)st->conf.batch_max;
	int rc;

	if ((bt = calloc(1, sizeof(*bt))) == NULL)
		return;
	bt->st = st;
	bt->replay = 1;
	TAILQ_INIT(&bt->rows);
	while (bt->n < max &&
	       (rc = storage_spool_next(st->spool, &off, &rec)) == 1) {
		if ((r = row_decode(st, &rec)) == NULL) {
			if (bt->n > 0)
				break; /* it comes first next time */
			/* Checked by its CRC yet not a row (or no
			 * memory): it cannot ever be stored. */
			log_warnx("L2: spool record at offset %llu does not "
			          "decode: skipped",
			          (unsigned long long)st->spool_off);
			storage_count(st->m.rows_failed);
			st->spool_off = off;
			st->spool_replayed++;
			continue;
		}
		r->batch = bt;
		TAILQ_INSERT_TAIL(&bt->rows, r, entry);
		bt->n++;
		bt->next_off = off;
	}
	buf_free(&rec);
	if (rc == -1 && bt->n == 0 && now_wall_ms() - warned_ms > 30000) {
		warned_ms = now_wall_ms();
		log_warn("L2: reading the spool at offset %llu",
		         (unsigned long long)st->spool_off);
	}
	if (bt->n == 0) {
		free(bt);
		return;
	}
	batch_send(st, bt);
}

/* A replay batch is over: on success move past its records; on a
 * transient failure retry them later (the rows in PostgreSQL already
 * are skipped by ON CONFLICT DO NOTHING, so a retry is harmless). */
static void
replay_done(struct storage_batch *bt, const PGresult *res)
{
	struct storage *st = bt->st;
	const char *state = NULL;
	int n;

	if (res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK) {
		storage_count(st->m.err_pg);
		if (res != NULL) {
			state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
			log_warnx("L2: replay of %zu spooled chats refused "
			          "(SQLSTATE %s): %s",
			          bt->n, state ? state : "none",
			          storage_pg_error(res));
		}
		if (res == NULL || storage_text_sqlstate_transient(state)) {
			batch_free(bt);
			storage_stop_check(st);
			return;
		}
		if (bt->n > 1) {
			/* One at a time until past this batch. */
			st->replay_solo = (int)bt->n;
			batch_free(bt);
			return;
		}
		/* One chat PostgreSQL refuses for its data: it never
		 * can be stored; skip it so that the rest replays. */
		log_warnx("L2: spooled chat %s refused by PostgreSQL: "
		          "dropped from the replay",
		          TAILQ_FIRST(&bt->rows)->chat_id.p);
		storage_count(st->m.rows_failed);
		n = 0;
	} else {
		n = PQntuples(res);
		if (st->m.rows_stored != NULL)
			*st->m.rows_stored += (uint64_t)n;
		if (st->m.rows_duplicate != NULL && bt->n > (size_t)n)
			*st->m.rows_duplicate += bt->n - (size_t)n;
		if (st->m.rows_replayed != NULL)
			*st->m.rows_replayed += bt->n;
		storage_count(st->m.batches);
		if (st->m.batch_rows != NULL)
			*st->m.batch_rows += bt->n;
	}
	if (st->replay_solo > 0)
		st->replay_solo--;
	st->spool_off = bt->next_off;
	st->spool_replayed += bt->n;
	log_debug("L2: %zu spooled chats replayed (%d new)", bt->n, n);
	batch_free(bt);
	storage_commit_gauges(st);
	storage_stop_check(st);
}

/* L2, every loop turn: spool what waits, then replay when the writer
 * serves; leave L2 once the spool is replayed. */
static void
commit_l2(struct storage *st)
{
	/* Rows of a batch whose commit is still out come back ahead of
	 * the queue if it fails: spool nothing before it is over. */
	if (st->batch != NULL && !st->batch->replay)
		return;
	if (st->nrows > 0)
		spool_rows(st);
	if (st->batch != NULL || st->svc.stopping ||
	    !storage_pg_up(st->writer) || !storage_pg_idle(st->writer))
		return;
	if (storage_spool_at_end(st->spool, st->spool_off))
		l2_leave(st);
	else
		replay_next(st);
}

void
storage_commit_writer_down(struct storage *st)
{
	if (st->spool != NULL && !st->svc.stopping)
		l2_enter(st, "postgres writer down");
	else
		storage_commit_refuse_all(st);
}

int
storage_commit_spool_open(struct storage *st)
{
	char path[1024], err[1200];
	struct storage_row *r;
	struct buf rec = {0};
	uint64_t dropped, off, at;

	if ((size_t)snprintf(path, sizeof(path), "%s/storage-spool",
	                     st->conf.spool_dir) >= sizeof(path)) {
		log_warnx("L2: spool_dir too long: running without a spool");
		return (-1);
	}
	st->spool =
	        storage_spool_open(path, (uint64_t)st->conf.spool_max_bytes,
	                           &dropped, err, sizeof(err));
	if (st->spool == NULL) {
		log_warnx("L2: %s: running without a spool (PostgreSQL "
		          "down means 503)",
		          err);
		return (-1);
	}
	if (dropped > 0)
		log_warnx("L2: %s: cut a torn tail of %llu bytes (a record "
		          "never acknowledged)",
		          path, (unsigned long long)dropped);
	/* Index its v3 chats (CHAT_QUERY while spooling). */
	off = 0;
	for (;;) {
		at = off < STORAGE_SPOOL_HDR ? STORAGE_SPOOL_HDR : off;
		if (storage_spool_next(st->spool, &off, &rec) != 1)
			break;
		if ((r = row_decode(st, &rec)) == NULL)
			continue;
		if (r->v3)
			(void)idx_add(st, r->chat_id.p, at);
		row_free(r);
	}
	buf_free(&rec);
	if (storage_spool_records(st->spool) > 0) {
		log_info("L2: %s holds %llu chats from a previous run: "
		         "replaying",
		         path,
		         (unsigned long long)storage_spool_records(st->spool));
		l2_enter(st, "spool not empty at start");
	}
	storage_commit_gauges(st);
	return (0);
}

static void
batch_done(void *arg, const PGresult *res)
{
	struct storage_batch *bt = arg;
	struct storage *st = bt->st;
	struct storage_row *r;
	const char **ids = NULL, **hit, *state, *key;
	char *used = NULL;
	int i, n;

	st->batch = NULL;
	if (bt->replay) {
		replay_done(bt, res);
		return;
	}
	if (res == NULL) {
		/* Lost or timed out: it may or may not have committed;
		 * either way nothing is acknowledged (a resend is safe).
		 * With a spool: L2, the rows are spooled and answered (a
		 * replay of a row that did commit inserts nothing). */
		storage_count(st->m.err_pg);
		if (batch_to_spool(bt, "commit lost (connection lost or "
		                       "statement timed out)") == 0)
			return;
		batch_fail(bt, 503, 5030, "storage unavailable", 1);
		storage_stop_check(st);
		return;
	}
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		storage_count(st->m.err_pg);
		state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
		log_warnx("postgres writer: batch of %zu rows refused "
		          "(SQLSTATE %s): %s",
		          bt->n, state ? state : "none",
		          storage_pg_error(res));
		if (storage_text_sqlstate_transient(state) &&
		    batch_to_spool(bt, "commit failed (transient SQLSTATE)") ==
		            0)
			return;
		if (!storage_text_sqlstate_transient(state) && bt->n > 1) {
			/* Retry row by row, in order, ahead of the queue. */
			while ((r = TAILQ_LAST(&bt->rows, storage_rows)) !=
			       NULL) {
				TAILQ_REMOVE(&bt->rows, r, entry);
				r->solo = 1;
				TAILQ_INSERT_HEAD(&st->rows, r, entry);
				st->nrows++;
			}
			batch_free(bt);
			return;
		}
		if (!storage_text_sqlstate_transient(state))
			batch_fail(bt, 500, 5000, "storage refused the chat",
			           0);
		else
			batch_fail(bt, 503, 5030, "storage unavailable", 1);
		storage_stop_check(st);
		return;
	}

	if (st->m.commit_seconds != NULL)
		histo_observe(st->m.commit_seconds,
		              (double)(now_mono_ns() - bt->t0_ns) / 1e9);
	storage_health_commit(st, now_mono_ns() - bt->t0_ns);
	log_debug("batch of %zu rows committed in %.2f ms", bt->n,
	          (double)(now_mono_ns() - bt->t0_ns) / 1e6);
	storage_count(st->m.batches);
	if (st->m.batch_rows != NULL)
		*st->m.batch_rows += bt->n;
	n = PQntuples(res);
	if (n > 0 && ((ids = calloc((size_t)n, sizeof(*ids))) == NULL ||
	              (used = calloc((size_t)n, 1)) == NULL)) {
		/* Cannot tell new rows from resent ones: skip the context
		 * update and invalidate instead (safe, just slower). */
		TAILQ_FOREACH(r, &bt->rows, entry)
		{
			r->inserted = 1;
			r->redis_failed = 1;
		}
		log_warnx("%s: out of memory", __func__);
	} else if (n > 0) {
		for (i = 0; i < n; i++)
			ids[i] = PQgetvalue(res, i, 0);
		qsort(ids, (size_t)n, sizeof(*ids), cmp_str);
		/* A chat_id twice in one batch (a resend that caught up
		 * with its original) was inserted once: one row owns it. */
		TAILQ_FOREACH(r, &bt->rows, entry)
		{
			key = r->chat_id.p;
			hit = bsearch(&key, ids, (size_t)n, sizeof(*ids),
			              cmp_str);
			if (hit != NULL && !used[hit - ids]) {
				used[hit - ids] = 1;
				r->inserted = 1;
			}
		}
	}
	free(ids);
	free(used);
	st->commit_epoch++;
	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		if (r->inserted) {
			storage_count(st->m.rows_stored);
			storage_ctx_committed(st, r->bot_id,
			                      r->conversation_id);
		} else
			storage_count(st->m.rows_duplicate);
	}
	batch_append(bt);
}

static int
arr_s(struct buf *b, const char *s)
{
	return (storage_text_pg_array_str(b, s, strlen(s)));
}

/* The v3 columns of r's chat (a[8..11]), and its messages and
 * conversation (a[12..25]); v1 rows add their v1 values only. */
static int
row_arrays(const struct storage_row *r, struct buf *a)
{
	struct buf *m = a + COMMIT_NCHAT, *v = m + COMMIT_NMSG;
	const cJSON *e, *f;
	const char *ctype;
	uint64_t ca;
	int ok = 1, seq = 0;

	ok &= arr_s(&a[8], r->status) == 0;
	ok &= arr_s(&a[9], r->v3 ? "v3.chat" : "v1.chat") == 0;
	ok &= storage_text_pg_array_str(&a[10], r->last_error.p,
	                                r->last_error.n) == 0;
	/* A replayed v1 chat keeps the time it was spooled. */
	ok &= storage_text_pg_array_int(
	              &a[11], r->v3 || r->replayed ? r->created_at : 0) == 0;
	if (!r->v3)
		return (ok ? 0 : -1);
	cJSON_ArrayForEach(e, r->msgs)
	{
		f = cJSON_GetObjectItemCaseSensitive(e, "content_type");
		ctype = cJSON_IsString(f) ? f->valuestring : "text";
		f = cJSON_GetObjectItemCaseSensitive(e, "created_at");
		ca = cJSON_IsNumber(f) ? (uint64_t)f->valuedouble
		                       : r->created_at;
		ok &= arr_s(&m[0], cJSON_GetObjectItemCaseSensitive(e, "id")
		                           ->valuestring) == 0;
		ok &= arr_s(&m[1], r->chat_id.p) == 0;
		ok &= arr_s(&m[2], r->conversation_id.p) == 0;
		ok &= arr_s(&m[3], r->bot_id.p) == 0;
		ok &= storage_text_pg_array_int(&m[4], (uint64_t)seq++) == 0;
		ok &= arr_s(&m[5], cJSON_GetObjectItemCaseSensitive(e, "role")
		                           ->valuestring) == 0;
		ok &= arr_s(&m[6], cJSON_GetObjectItemCaseSensitive(e, "type")
		                           ->valuestring) == 0;
		ok &= arr_s(&m[7],
		            cJSON_GetObjectItemCaseSensitive(e, "content")
		                    ->valuestring) == 0;
		ok &= arr_s(&m[8], ctype) == 0;
		ok &= storage_text_pg_array_int(&m[9], ca) == 0;
	}
	ok &= arr_s(&v[0], r->conversation_id.p) == 0;
	ok &= arr_s(&v[1], r->bot_id.p) == 0;
	ok &= arr_s(&v[2], r->user_id.p) == 0;
	ok &= storage_text_pg_array_int(&v[3], r->created_at) == 0;
	return (ok ? 0 : -1);
}

void
storage_commit_kick(struct storage *st)
{
	struct storage_batch *bt;
	struct storage_row *r;
	uint64_t now = now_wall_ms();

	storage_chat_kick(st);
	if (st->spooling) {
		commit_l2(st);
		return;
	}
	if (st->batch != NULL || st->nrows == 0)
		return;
	if (!storage_pg_accepting(st->writer)) {
		if (st->spool != NULL && !st->svc.stopping) {
			l2_enter(st, "postgres writer down");
			commit_l2(st);
		} else
			storage_commit_refuse_all(st);
		return;
	}
	if (!storage_pg_idle(st->writer))
		return;
	if ((bt = calloc(1, sizeof(*bt))) == NULL)
		return;
	bt->st = st;
	TAILQ_INIT(&bt->rows);
	while ((r = TAILQ_FIRST(&st->rows)) != NULL &&
	       bt->n < (size_t)st->conf.batch_max) {
		if (r->solo && bt->n > 0)
			break;
		TAILQ_REMOVE(&st->rows, r, entry);
		st->nrows--;
		if (r->head.deadline_ms != 0 && r->head.deadline_ms < now) {
			storage_count(st->m.rows_expired);
			row_reply(st, r, 504, 5040, "deadline exceeded", 0);
			row_free(r);
			continue;
		}
		r->batch = bt;
		TAILQ_INSERT_TAIL(&bt->rows, r, entry);
		bt->n++;
		if (r->solo)
			break;
	}
	if (bt->n == 0) {
		free(bt);
		storage_stop_check(st);
		return;
	}

	batch_send(st, bt);
}

/* Build the statement's arrays from bt's rows and send it. */
static void
batch_send(struct storage *st, struct storage_batch *bt)
{
	struct storage_row *r;
	struct buf a[COMMIT_NPARAM];
	const char *values[COMMIT_NPARAM];
	int i, ok = 1;

	memset(a, 0, sizeof(a));
	for (i = 0; i < COMMIT_NPARAM; i++)
		ok &= storage_text_pg_array_begin(&a[i]) == 0;
	TAILQ_FOREACH(r, &bt->rows, entry)
	{
		ok &= storage_text_pg_array_str(&a[0], r->chat_id.p,
		                                r->chat_id.n) == 0;
		ok &= storage_text_pg_array_str(&a[1], r->conversation_id.p,
		                                r->conversation_id.n) == 0;
		ok &= storage_text_pg_array_str(&a[2], r->bot_id.p,
		                                r->bot_id.n) == 0;
		ok &= storage_text_pg_array_str(&a[3], r->user_id.p,
		                                r->user_id.n) == 0;
		ok &= storage_text_pg_array_str(&a[4], r->query.p,
		                                r->query.n) == 0;
		ok &= storage_text_pg_array_str(&a[5], r->answer.p,
		                                r->answer.n) == 0;
		ok &= storage_text_pg_array_int(&a[6], r->prompt_tokens) == 0;
		ok &= storage_text_pg_array_int(&a[7], r->completion_tokens) ==
		      0;
		ok &= row_arrays(r, a) == 0;
	}
	for (i = 0; i < COMMIT_NPARAM; i++) {
		ok &= storage_text_pg_array_end(&a[i]) == 0;
		values[i] = a[i].b;
	}
	bt->t0_ns = now_mono_ns();
	if (!ok || storage_pg_query(st->writer, commit_sql, COMMIT_NPARAM,
	                            values, batch_done, bt) == -1) {
		if (!ok)
			log_warnx("%s: out of memory", __func__);
		if (bt->replay)
			batch_free(bt); /* retried on a later turn */
		else
			batch_fail(bt, 503, 5030, "storage unavailable", 1);
	} else
		st->batch = bt;
	for (i = 0; i < COMMIT_NPARAM; i++)
		buf_free(&a[i]);
}
