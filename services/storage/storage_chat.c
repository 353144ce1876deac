/* SPDX-License-Identifier: ISC */
/*
 * storage_chat: v3 chats in Redis and the questions clients ask about
 * them.  A v3 run (CTX_GET with a chat_id) takes its conversation's lock,
 * troupe:lock:conv:<conversation_id> = chat_id with an expiry, and
 * records its chat as in progress in the hash troupe:chat:<chat_id>
 * (status, conversation_id, bot_id, user_id, created_at), both in one
 * EVAL so no other client can slip between them.  When the chat is
 * stored (storage_commit.c) or cannot start (storage_ctx.c), one more
 * EVAL sets the hash's final status and deletes the lock only if it
 * still holds this chat_id (a lock that expired and was taken by the
 * next chat is left alone).
 *
 * CHAT_QUERY (from auth or the dispatcher, answered to the edge named in
 * reply_to): v3.retrieve gives the chat object, v3.list the chat's
 * messages, v3.cancel cancels a chat no worker runs.  PostgreSQL (reader
 * connection) is asked first: a stored chat is final.  Only when it has
 * no row is the Redis hash read (a chat in progress, or one that ended
 * without being stored).  Objects are rendered with common/coze.h only.
 *
 * Callers: storage_ctx.c (lock), storage_commit.c (finish),
 * storage_dispatch.c (CHAT_QUERY).  Never blocks; a dependency that is
 * down gives 503/5030, never a guess.
 *
 * DIAGNOSTICS: statement and script errors warn.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "coze.h"
#include "storage.h"

#define CHAT_LOCK_PREFIX "troupe:lock:conv:"
#define CHAT_KEY_PREFIX "troupe:chat:"
#define CHAT_KEY_MAX 64 /* prefix + an id of at most 32 digits */
#define CHAT_LOCK_DEFAULT_MS 600000
#define CHAT_LOCK_MAX_MS 86400000
#define CHAT_HASH_EXTRA_MS 3600000 /* the hash outlives the lock by 1 h */

/*
 * KEYS[1] lock, KEYS[2] chat hash; ARGV chat_id, lock_ms, now (unix s),
 * conversation_id, bot_id, user_id, hash ttl ms.  {0, holder} if another
 * chat holds the lock; {1, created_at} once it is ours (a duplicate run
 * of the same chat finds it ours already and keeps the first created_at).
 */
static const char lock_lua[] =
        "local v = redis.call('GET', KEYS[1]) "
        "if v and v ~= ARGV[1] then return {0, v} end "
        "if not v then "
        " redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end "
        "if redis.call('HSETNX', KEYS[2], 'created_at', ARGV[3]) == 1 then "
        " redis.call('HSET', KEYS[2], 'status', 'in_progress',"
        " 'conversation_id', ARGV[4], 'bot_id', ARGV[5],"
        " 'user_id', ARGV[6]) end "
        "redis.call('PEXPIRE', KEYS[2], ARGV[7]) "
        "return {1, redis.call('HGET', KEYS[2], 'created_at')}";

/*
 * KEYS[1] lock, KEYS[2] chat hash; ARGV chat_id, status ("" deletes the
 * hash), hash ttl ms.  Returns 1 if the lock was ours and is gone.
 */
static const char finish_lua[] =
        "if ARGV[2] == '' then redis.call('DEL', KEYS[2]) "
        "elseif redis.call('EXISTS', KEYS[2]) == 1 then "
        " redis.call('HSET', KEYS[2], 'status', ARGV[2]) "
        " redis.call('PEXPIRE', KEYS[2], ARGV[3]) end "
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        " redis.call('DEL', KEYS[1]) return 1 end "
        "return 0";

/* KEYS[1] chat hash, KEYS[2] lock: {the hash's fields, the lock's
 * holder or nil}. */
static const char read_lua[] = "return {redis.call('HGETALL', KEYS[1]),"
                               " redis.call('GET', KEYS[2])}";

static void
chat_keys(char *lock, char *chat, const char *conv, const char *chat_id)
{
	snprintf(lock, CHAT_KEY_MAX, CHAT_LOCK_PREFIX "%s", conv);
	snprintf(chat, CHAT_KEY_MAX, CHAT_KEY_PREFIX "%s", chat_id);
}

static void
chat_lock_done(void *arg, const redisReply *reply)
{
	struct storage_ctx_req *req = arg;
	const redisReply *e0, *e1;
	char msg[128];

	if (reply == NULL) {
		storage_count(req->st->m.err_redis);
		storage_count(req->st->m.lock_unavailable);
		storage_ctx_locked(req, 503, 5030,
		                   "context store unavailable");
		return;
	}
	if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
	    (e0 = reply->element[0])->type != REDIS_REPLY_INTEGER ||
	    (e1 = reply->element[1])->type != REDIS_REPLY_STRING) {
		storage_count(req->st->m.err_redis);
		log_warnx("redis: conversation lock: %s",
		          reply->type == REDIS_REPLY_ERROR
		                  ? reply->str
		                  : "unexpected reply");
		storage_count(req->st->m.lock_unavailable);
		storage_ctx_locked(req, 503, 5030,
		                   "context store unavailable");
		return;
	}
	if (e0->integer == 0) {
		snprintf(msg, sizeof(msg),
		         "conversation busy: chat %.*s is running",
		         (int)(e1->len > 32 ? 32 : e1->len), e1->str);
		storage_count(req->st->m.lock_busy);
		storage_ctx_locked(req, 409, 4016, msg);
		return;
	}
	storage_count(req->st->m.lock_taken);
	req->locked = 1;
	req->created_at = strtoull(e1->str, NULL, 10);
	storage_ctx_locked(req, 200, 0, "");
}

void
storage_chat_lock(struct storage_ctx_req *req)
{
	struct storage *st = req->st;
	char lock[CHAT_KEY_MAX], chat[CHAT_KEY_MAX], ms[24], now[24], ttl[24];
	const char *argv[12];
	size_t argl[12];
	uint64_t lock_ms = req->lock_ms;
	int i;

	if (lock_ms == 0)
		lock_ms = CHAT_LOCK_DEFAULT_MS;
	if (lock_ms > CHAT_LOCK_MAX_MS)
		lock_ms = CHAT_LOCK_MAX_MS;
	chat_keys(lock, chat, req->conversation_id.p, req->chat_id.p);
	snprintf(ms, sizeof(ms), "%llu", (unsigned long long)lock_ms);
	snprintf(now, sizeof(now), "%llu",
	         (unsigned long long)(now_wall_ms() / 1000));
	snprintf(ttl, sizeof(ttl), "%llu",
	         (unsigned long long)(lock_ms + CHAT_HASH_EXTRA_MS));
	argv[0] = "EVAL";
	argv[1] = lock_lua;
	argv[2] = "2";
	argv[3] = lock;
	argv[4] = chat;
	argv[5] = req->chat_id.p;
	argv[6] = ms;
	argv[7] = now;
	argv[8] = req->conversation_id.p;
	argv[9] = req->bot_id.p;
	argv[10] = req->user_id.p;
	argv[11] = ttl;
	for (i = 0; i < 12; i++)
		argl[i] = strlen(argv[i]);
	if (storage_redis_cmd(st->redis, chat_lock_done, req, 12, argv,
	                      argl) == -1) {
		storage_count(req->st->m.lock_unavailable);
		storage_ctx_locked(req, 503, 5030,
		                   "context store unavailable");
	}
}

int
storage_chat_finish(struct storage *st, const char *conv, const char *chat_id,
                    const char *status, storage_redis_cb cb, void *arg)
{
	char lock[CHAT_KEY_MAX], chat[CHAT_KEY_MAX], ttl[24];
	const char *argv[8];
	size_t argl[8];
	int i;

	chat_keys(lock, chat, conv, chat_id);
	snprintf(ttl, sizeof(ttl), "%d", CHAT_HASH_EXTRA_MS);
	argv[0] = "EVAL";
	argv[1] = finish_lua;
	argv[2] = "2";
	argv[3] = lock;
	argv[4] = chat;
	argv[5] = chat_id;
	argv[6] = status;
	argv[7] = ttl;
	for (i = 0; i < 8; i++)
		argl[i] = strlen(argv[i]);
	return (storage_redis_cmd(st->redis, cb, arg, 8, argv, argl));
}

/* CHAT_QUERY */

enum chat_op { Q_RETRIEVE, Q_LIST, Q_CANCEL };

struct storage_chat_q {
	TAILQ_ENTRY(storage_chat_q) entry; /* st->chat_waiting */
	struct storage *st;
	enum chat_op op;
	struct msg_head head;
	char *reply_to;
	char *chat_id, *conv, *bot_id; /* bot_id: from the hash, for cancel */
	uint64_t created_at;
	int conv_known; /* PostgreSQL has the conversation */
	char blob[];
};

static const char q_chat_sql[] =
        "SELECT c.status, c.bot_id,"
        " extract(epoch FROM c.created_at)::bigint,"
        " coalesce(extract(epoch FROM c.completed_at)::bigint, 0),"
        " coalesce(c.last_error, ''), c.prompt_tokens, c.completion_tokens,"
        " EXISTS (SELECT 1 FROM conversations WHERE id = $2) "
        "FROM (SELECT 1) x LEFT JOIN chats c ON c.chat_id = $1"
        " AND c.conversation_id = $2 AND c.route = 'v3.chat'";

static const char q_list_sql[] =
        "SELECT c.status, c.bot_id,"
        " EXISTS (SELECT 1 FROM conversations WHERE id = $2),"
        " m.id, m.role, m.type, m.content, m.content_type, m.created_at "
        "FROM (SELECT 1) x LEFT JOIN chats c ON c.chat_id = $1"
        " AND c.conversation_id = $2 AND c.route = 'v3.chat' "
        "LEFT JOIN messages m ON m.chat_id = c.chat_id ORDER BY m.seq";

static void
q_send(struct storage *st, const char *to, const struct msg_head *h,
       uint64_t status, int64_t code, const char *msg, struct mstr data,
       uint64_t retry_after)
{
	struct chat_reply cr;

	switch (status) {
	case 200:
		storage_count(st->m.q_ok);
		break;
	case 400:
		storage_count(st->m.q_invalid);
		break;
	case 404:
		storage_count(st->m.q_not_found);
		break;
	case 409:
		storage_count(st->m.q_finished);
		break;
	case 503:
		storage_count(st->m.q_unavailable);
		break;
	default:
		storage_count(st->m.q_error);
		break;
	}
	memset(&cr, 0, sizeof(cr));
	cr.status = status;
	cr.code = code;
	cr.msg = MSTR(msg);
	cr.data = status == 200 ? data : MSTR_NULL;
	cr.retry_after = retry_after;
	if (to[0] == '\0')
		return;
	if (msg_send_chat_reply(st->svc.ipc, to, h, &cr) == -1) {
		storage_count(st->m.err_send);
		log_req(LOG_L_WARN, h->reqid, h->traceparent, MSTR_NULL,
		        "CHAT_REPLY to %s refused (backlog full)", to);
	}
}

/* Answer q and free it. */
static void
q_reply(struct storage_chat_q *q, uint64_t status, int64_t code,
        const char *msg, struct mstr data)
{
	struct storage *st = q->st;

	q_send(st, q->reply_to, &q->head, status, code, msg, data,
	       status == 503 ? 1 : 0);
	free(q->bot_id);
	free(q);
	st->nadmin--;
	storage_stop_check(st);
}

/* 4200 is for retrieve and list of a conversation nobody knows; a
 * cancel of anything unknown is 4201 (v3-design). */
static void
q_not_found(struct storage_chat_q *q)
{
	if (q->conv_known || q->op == Q_CANCEL)
		q_reply(q, 404, 4201, "chat not found", MSTR_NULL);
	else
		q_reply(q, 404, 4200, "conversation not found", MSTR_NULL);
}

static void
q_finished(struct storage_chat_q *q, const char *status)
{
	char msg[96];

	snprintf(msg, sizeof(msg), "chat already finished: %.32s", status);
	q_reply(q, 409, 4202, msg, MSTR_NULL);
}

/* Answer the chat object c. */
static void
q_chat(struct storage_chat_q *q, const struct coze_chat *c)
{
	struct buf b = {0};

	if (coze_chat_json(&b, c) == -1) {
		buf_free(&b);
		q_reply(q, 500, 5000, "out of memory", MSTR_NULL);
		return;
	}
	q_reply(q, 200, 0, "", (struct mstr){b.b, (uint32_t)b.len});
	buf_free(&b);
}

static void
q_cancel_done(void *arg, const redisReply *reply)
{
	struct storage_chat_q *q = arg;
	struct coze_chat c;

	if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
		storage_count(q->st->m.err_redis);
		q_reply(q, 503, 5030, "context store unavailable", MSTR_NULL);
		return;
	}
	memset(&c, 0, sizeof(c));
	c.id = MSTR(q->chat_id);
	c.conversation_id = MSTR(q->conv);
	c.bot_id = MSTR(q->bot_id);
	c.status = "canceled";
	c.created_at = q->created_at;
	c.completed_at = now_wall_ms() / 1000;
	q_chat(q, &c);
}

/* The chat's Redis hash and its conversation's lock (PostgreSQL has no
 * row). */
static void
q_hash_done(void *arg, const redisReply *reply)
{
	struct storage_chat_q *q = arg;
	struct coze_chat c;
	const redisReply *hash, *lock;
	const char *status = NULL, *conv = NULL, *bot = "";
	size_t i, nconv = 0;
	uint64_t created = 0;
	int lost;

	if (reply == NULL || reply->type != REDIS_REPLY_ARRAY ||
	    reply->elements != 2 ||
	    (hash = reply->element[0])->type != REDIS_REPLY_ARRAY) {
		storage_count(q->st->m.err_redis);
		q_reply(q, 503, 5030, "context store unavailable", MSTR_NULL);
		return;
	}
	lock = reply->element[1];
	for (i = 0; i + 1 < hash->elements; i += 2) {
		const redisReply *k = hash->element[i],
		                 *v = hash->element[i + 1];
		if (k->type != REDIS_REPLY_STRING ||
		    v->type != REDIS_REPLY_STRING)
			continue;
		if (strcmp(k->str, "status") == 0)
			status = v->str;
		else if (strcmp(k->str, "conversation_id") == 0) {
			conv = v->str;
			nconv = v->len;
		} else if (strcmp(k->str, "bot_id") == 0)
			bot = v->str;
		else if (strcmp(k->str, "created_at") == 0)
			created = strtoull(v->str, NULL, 10);
	}
	if (status == NULL || conv == NULL || nconv != strlen(q->conv) ||
	    memcmp(conv, q->conv, nconv) != 0) {
		q_not_found(q);
		return;
	}
	/* In progress, but its lock is gone (it lasts until the run's
	 * deadline + 5 s) and PostgreSQL has no row: the run was lost (its
	 * worker died).  Say failed, so that pollers stop. */
	lost = strcmp(status, "in_progress") == 0 &&
	       (lock->type != REDIS_REPLY_STRING ||
	        strcmp(lock->str, q->chat_id) != 0);
	if (lost)
		status = "failed";
	switch (q->op) {
	case Q_LIST:
		/* Messages are stored with the chat, when it ends. */
		q_reply(q, 200, 0, "", MSTR_LIT("[]"));
		return;
	case Q_CANCEL:
		if (strcmp(status, "in_progress") != 0) {
			q_finished(q, status);
			return;
		}
		/* No worker runs it (the dispatcher asked): it will never
		 * end by itself.  Mark it canceled and free its
		 * conversation. */
		if ((q->bot_id = strdup(bot)) == NULL) {
			q_reply(q, 500, 5000, "out of memory", MSTR_NULL);
			return;
		}
		q->created_at = created;
		if (storage_chat_finish(q->st, q->conv, q->chat_id, "canceled",
		                        q_cancel_done, q) == -1) {
			q_reply(q, 503, 5030, "context store unavailable",
			        MSTR_NULL);
		}
		return;
	case Q_RETRIEVE:
		break;
	}
	memset(&c, 0, sizeof(c));
	c.id = MSTR(q->chat_id);
	c.conversation_id = MSTR(q->conv);
	c.bot_id = MSTR(bot);
	c.status = status;
	c.created_at = created;
	if (strcmp(status, "failed") == 0) {
		c.failed_at = lost ? now_wall_ms() / 1000 : created;
		c.error_code = 5000;
		c.error_msg = lost ? MSTR_LIT("chat lost: its run ended "
		                              "without a result")
		                   : MSTR_LIT("chat not stored");
	}
	q_chat(q, &c);
}

static void
q_ask_redis(struct storage_chat_q *q)
{
	char lock[CHAT_KEY_MAX], chat[CHAT_KEY_MAX];
	const char *argv[5];
	size_t argl[5];
	int i;

	chat_keys(lock, chat, q->conv, q->chat_id);
	argv[0] = "EVAL";
	argv[1] = read_lua;
	argv[2] = "2";
	argv[3] = chat;
	argv[4] = lock;
	for (i = 0; i < 5; i++)
		argl[i] = strlen(argv[i]);
	if (storage_redis_cmd(q->st->redis, q_hash_done, q, 5, argv, argl) ==
	    -1)
		q_reply(q, 503, 5030, "context store unavailable", MSTR_NULL);
}

/* Fill the error of c from a stored last_error ({code, msg}); the
 * message points into *json, which the caller frees. */
static void
q_last_error(struct coze_chat *c, const char *text, cJSON **json)
{
	const cJSON *code, *msg;

	*json = NULL;
	if (text[0] == '\0' || (*json = cJSON_Parse(text)) == NULL)
		return;
	code = cJSON_GetObjectItemCaseSensitive(*json, "code");
	msg = cJSON_GetObjectItemCaseSensitive(*json, "msg");
	if (cJSON_IsNumber(code))
		c->error_code = (int64_t)code->valuedouble;
	if (cJSON_IsString(msg))
		c->error_msg = MSTR(msg->valuestring);
}

static int
q_pg_failed(struct storage_chat_q *q, const PGresult *res)
{
	if (res == NULL) {
		q_reply(q, 503, 5030, "storage unavailable", MSTR_NULL);
		return (1);
	}
	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) < 1) {
		storage_count(q->st->m.err_pg);
		log_req(LOG_L_WARN, q->head.reqid, q->head.traceparent,
		        MSTR_NULL, "chat query: %s", storage_pg_error(res));
		q_reply(q, 500, 5000, "storage error", MSTR_NULL);
		return (1);
	}
	return (0);
}

static void
q_chat_done(void *arg, const PGresult *res)
{
	struct storage_chat_q *q = arg;
	struct coze_chat c;
	cJSON *err = NULL;
	const char *status;
	uint64_t end;

	if (q_pg_failed(q, res))
		return;
	q->conv_known = PQgetvalue(res, 0, 7)[0] == 't';
	if (PQgetisnull(res, 0, 0)) {
		q_ask_redis(q);
		return;
	}
	status = PQgetvalue(res, 0, 0);
	if (q->op == Q_CANCEL) {
		q_finished(q, status);
		return;
	}
	memset(&c, 0, sizeof(c));
	c.id = MSTR(q->chat_id);
	c.conversation_id = MSTR(q->conv);
	c.bot_id = MSTR(PQgetvalue(res, 0, 1));
	c.status = status;
	c.created_at = strtoull(PQgetvalue(res, 0, 2), NULL, 10);
	end = strtoull(PQgetvalue(res, 0, 3), NULL, 10);
	if (strcmp(status, "failed") == 0)
		c.failed_at = end;
	else
		c.completed_at = end;
	q_last_error(&c, PQgetvalue(res, 0, 4), &err);
	c.input_tokens = strtoull(PQgetvalue(res, 0, 5), NULL, 10);
	c.output_tokens = strtoull(PQgetvalue(res, 0, 6), NULL, 10);
	q_chat(q, &c);
	cJSON_Delete(err);
}

static void
q_list_done(void *arg, const PGresult *res)
{
	struct storage_chat_q *q = arg;
	struct coze_msg msg;
	struct buf b = {0};
	int i, n;

	if (q_pg_failed(q, res))
		return;
	q->conv_known = PQgetvalue(res, 0, 2)[0] == 't';
	if (PQgetisnull(res, 0, 0)) {
		q_ask_redis(q);
		return;
	}
	n = PQntuples(res);
	if (buf_adds(&b, "[") == -1)
		goto oom;
	for (i = 0; i < n; i++) {
		if (PQgetisnull(res, i, 3))
			continue; /* a chat stored without messages */
		memset(&msg, 0, sizeof(msg));
		msg.id = MSTR(PQgetvalue(res, i, 3));
		msg.conversation_id = MSTR(q->conv);
		msg.bot_id = MSTR(PQgetvalue(res, i, 1));
		msg.chat_id = MSTR(q->chat_id);
		msg.role = MSTR(PQgetvalue(res, i, 4));
		msg.type = MSTR(PQgetvalue(res, i, 5));
		msg.content = (struct mstr){PQgetvalue(res, i, 6),
		                            (uint32_t)PQgetlength(res, i, 6)};
		msg.content_type = MSTR(PQgetvalue(res, i, 7));
		msg.created_at = msg.updated_at =
		        strtoull(PQgetvalue(res, i, 8), NULL, 10);
		if ((b.len > 1 && buf_adds(&b, ",") == -1) ||
		    coze_msg_json(&b, &msg) == -1)
			goto oom;
	}
	if (buf_adds(&b, "]") == -1)
		goto oom;
	q_reply(q, 200, 0, "", (struct mstr){b.b, (uint32_t)b.len});
	buf_free(&b);
	return;
oom:
	buf_free(&b);
	q_reply(q, 500, 5000, "out of memory", MSTR_NULL);
}

static size_t
chat_slot(struct mstr id)
{
	uint64_t h = 14695981039346656037ULL;
	uint32_t i;

	for (i = 0; i < id.n; i++) {
		h ^= (unsigned char)id.p[i];
		h *= 1099511628211ULL;
	}
	return (h % STORAGE_EPOCH_SLOTS);
}

void
storage_chat_pending(struct storage *st, struct mstr chat_id, int delta)
{
	uint32_t *c = &st->chat_pending[chat_slot(chat_id)];

	if (delta > 0)
		(*c)++;
	else if (*c > 0)
		(*c)--;
}

static void
q_start(struct storage_chat_q *q)
{
	const char *values[2];
	struct buf b = {0};
	int rc;

	/* L2 (chats spooled, PostgreSQL down): a chat in the spool is
	 * served from its record, any other from its Redis hash. */
	if (q->st->spooling && !storage_pg_up(q->st->reader)) {
		if (q->op != Q_CANCEL) {
			rc = storage_commit_spooled(q->st, q->chat_id, q->conv,
			                            q->op == Q_LIST, &b);
			if (rc == 1)
				q_reply(q, 200, 0, "",
				        (struct mstr){b.b, (uint32_t)b.len});
			buf_free(&b);
			if (rc == 1)
				return;
		}
		q_ask_redis(q);
		return;
	}
	values[0] = q->chat_id;
	values[1] = q->conv;
	if (storage_pg_query(
	            q->st->reader, q->op == Q_LIST ? q_list_sql : q_chat_sql,
	            2, values, q->op == Q_LIST ? q_list_done : q_chat_done,
	            q) == -1)
		q_reply(q, 503, 5030, "storage unavailable", MSTR_NULL);
}

void
storage_chat_kick(struct storage *st)
{
	struct storage_chat_q *q, *next;

	if (st->nchat_waiting == 0)
		return;
	for (q = TAILQ_FIRST(&st->chat_waiting); q != NULL; q = next) {
		next = TAILQ_NEXT(q, entry);
		if (st->chat_pending[chat_slot(MSTR(q->chat_id))] > 0)
			continue;
		TAILQ_REMOVE(&st->chat_waiting, q, entry);
		st->nchat_waiting--;
		q_start(q);
	}
}

void
storage_chat_query_bad(struct storage *st, const struct msg *m)
{
	struct msg_head h = msg_head_reply(m, NULL);
	char *to;

	if (m->reply_to.n == 0 || (to = mstr_dup(m->reply_to)) == NULL)
		return;
	q_send(st, to, &h, 500, 5000, "undecodable CHAT_QUERY", MSTR_NULL, 0);
	free(to);
}

void
storage_chat_query(struct storage *st, const struct msg *m,
                   const struct chat_request *b)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct storage_chat_q *q;
	enum chat_op op;
	char *to = NULL, *p;
	size_t sz;

	if (m->reply_to.n == 0)
		return; /* nobody to answer */
	if ((to = mstr_dup(m->reply_to)) == NULL)
		return;
	if (mstr_eq(b->route, "v3.retrieve"))
		op = Q_RETRIEVE;
	else if (mstr_eq(b->route, "v3.list"))
		op = Q_LIST;
	else if (mstr_eq(b->route, "v3.cancel"))
		op = Q_CANCEL;
	else {
		q_send(st, to, &h, 400, 4000, "unknown route", MSTR_NULL, 0);
		goto out;
	}
	if (!coze_id_ok(b->chat_id) || !coze_id_ok(b->history_id)) {
		q_send(st, to, &h, 400, 4000,
		       "chat_id and conversation_id must be ids", MSTR_NULL,
		       0);
		goto out;
	}
	if (st->svc.stopping) {
		q_send(st, to, &h, 503, MSG_CODE_STOPPING, "storage stopping", MSTR_NULL,
		       1);
		goto out;
	}
	sz = sizeof(*q) + storage_head_size(m) + b->chat_id.n + 1 +
	     b->history_id.n + 1;
	if ((q = calloc(1, sz)) == NULL) {
		q_send(st, to, &h, 500, 5000, "out of memory", MSTR_NULL, 0);
		goto out;
	}
	q->st = st;
	q->op = op;
	p = storage_head_copy(m, &q->head, &q->reply_to, q->blob, 0);
	q->chat_id = p;
	memcpy(p, b->chat_id.p, b->chat_id.n);
	p[b->chat_id.n] = '\0';
	p += b->chat_id.n + 1;
	q->conv = p;
	memcpy(p, b->history_id.p, b->history_id.n);
	p[b->history_id.n] = '\0';
	st->nadmin++;
	if (st->chat_pending[chat_slot(MSTR(q->chat_id))] > 0) {
		/* Its persist is queued or being committed here: answer
		 * from what it stores, once it is stored (or failed). */
		TAILQ_INSERT_TAIL(&st->chat_waiting, q, entry);
		st->nchat_waiting++;
		goto out;
	}
	q_start(q);
out:
	free(to);
}
