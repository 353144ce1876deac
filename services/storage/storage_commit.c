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
 * Failures: writer down, statement failed or timed out: 503/5030
 * "storage unavailable", Retry-After 1, for every row of the batch.  A
 * batch refused for its data (not a transient SQLSTATE) is retried one
 * row per statement, so one bad row cannot fail its neighbours; that row
 * gets 500/5000.  Rows are checked on arrival (valid UTF-8 without NUL,
 * token counts that fit an int) and refused with 400/4000 so they never
 * reach a batch.  A row whose deadline passed while queued is not written
 * and gets 504/5040: the edge has answered the client with an error, so
 * the turn must not appear in the history either.  A Redis failure after
 * COMMIT does not fail the chat: the key is deleted (now, or when Redis
 * is back) so the next read rebuilds it from PostgreSQL.  It must never
 * acknowledge a row that is not committed.
 *
 * DIAGNOSTICS: refused batches and failed statements warn.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "coze.h"
#include "storage.h"

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
	cJSON *msgs;      /* the messages to store, checked */
	int solo;         /* write alone (its batch was refused) */
	int inserted;     /* new row (not a resend of a stored one) */
	int redis_failed; /* the context update failed */
	char *key;        /* context key, once committed */
	size_t keylen;
	char blob[];
};

struct storage_batch {
	struct storage *st;
	struct storage_rows rows;
	size_t n;
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
	struct chat_reply cr;
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
		persist_refuse(st, m, b, 503, 5030, "storage stopping", 1);
		goto out;
	}
	if (!storage_pg_accepting(st->writer)) {
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
	if (res == NULL) {
		/* Lost or timed out: it may or may not have committed;
		 * either way nothing is acknowledged (a resend is safe). */
		storage_count(st->m.err_pg);
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
	ok &= storage_text_pg_array_int(&a[11], r->v3 ? r->created_at : 0) ==
	      0;
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
	struct buf a[COMMIT_NPARAM];
	const char *values[COMMIT_NPARAM];
	uint64_t now = now_wall_ms();
	int i, ok = 1;

	storage_chat_kick(st);
	if (st->batch != NULL || st->nrows == 0)
		return;
	if (!storage_pg_accepting(st->writer)) {
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
		batch_fail(bt, 503, 5030, "storage unavailable", 1);
	} else
		st->batch = bt;
	for (i = 0; i < COMMIT_NPARAM; i++)
		buf_free(&a[i]);
}
