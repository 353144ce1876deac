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
 * Redis down (not connected, or a lock EVAL lost or timed out): storage
 * is the only Redis client, so its own memory is authoritative meanwhile.
 * A table of chats (by chat_id, with the conversation lock each holds,
 * indexed by conversation_id) takes the lock and the hash: the same
 * answers (409/4016 busy, created_at kept on a duplicate run), finishes
 * update it, CHAT_QUERY reads it.  A finish of a chat the table does not
 * know (it started before the outage) is remembered and replayed.  When
 * Redis is back, before any other command on the new connection, every
 * entry is written to Redis (the lock with its remaining time, the hash)
 * and leaves memory once Redis confirmed it; then the remembered finishes
 * run.  What the switch cannot see: a lock taken in Redis before the
 * outage is unknown to memory, so a chat started during the outage in a
 * conversation whose chat was still running may run beside it (at most
 * until that chat ends); after the switch back, memory's lock replaces
 * Redis's.  A retrieve of a chat memory does not know while Redis is down
 * is 503 (it may be in progress in Redis), not 404.  The table holds at
 * most CHAT_MEM_MAX chats (finished ones are dropped first); full, a lock
 * is 503.
 *
 * Callers: storage_ctx.c (lock, Redis up), storage_commit.c (finish),
 * storage_dispatch.c (CHAT_QUERY), storage.c (init).  Never blocks; a
 * dependency that is down gives 503/5030 or the memory answer, never a
 * guess.
 *
 * DIAGNOSTICS: statement and script errors warn; the switch back logs one
 * line with what memory held (storage_redis.c logs the switches).
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

/*
 * The switch back: KEYS[1] lock, KEYS[2] chat hash; ARGV chat_id, lock ms
 * ("0": memory holds no lock), status ("" deletes the hash),
 * conversation_id, bot_id, user_id, created_at, hash ttl ms.
 */
static const char sync_lua[] =
        "if ARGV[2] ~= '0' then "
        " redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end "
        "if ARGV[3] == '' then redis.call('DEL', KEYS[2]) else "
        " redis.call('HSET', KEYS[2], 'status', ARGV[3],"
        " 'conversation_id', ARGV[4], 'bot_id', ARGV[5],"
        " 'user_id', ARGV[6], 'created_at', ARGV[7]) "
        " redis.call('PEXPIRE', KEYS[2], ARGV[8]) end "
        "return 1";

static void
chat_keys(char *lock, char *chat, const char *conv, const char *chat_id)
{
	snprintf(lock, CHAT_KEY_MAX, CHAT_LOCK_PREFIX "%s", conv);
	snprintf(chat, CHAT_KEY_MAX, CHAT_KEY_PREFIX "%s", chat_id);
}

/* The memory table (Redis down). */

#define CHAT_MEM_MAX 65536
#define CHAT_MEM_BUCKETS 4096
#define CHAT_FIN_MAX 65536
#define CHAT_ID_MAX 40 /* ids: at most 32 digits (coze_id_ok) */

struct mem_chat {
	TAILQ_ENTRY(mem_chat) all; /* oldest first */
	struct mem_chat *cnext;    /* by chat_id */
	struct mem_chat *lnext;    /* by conversation, while locked */
	int locked;
	uint64_t lock_until, hash_until; /* monotonic ms */
	uint64_t created_at;             /* unix s */
	char chat_id[CHAT_ID_MAX], conv[CHAT_ID_MAX];
	char status[16];
	char *bot, *user;
};

struct mem_fin {
	char conv[CHAT_ID_MAX], chat_id[CHAT_ID_MAX], status[16];
};

struct storage_chat_mem {
	struct mem_chat *cb[CHAT_MEM_BUCKETS], *lb[CHAT_MEM_BUCKETS];
	TAILQ_HEAD(, mem_chat) all;
	size_t n;
	struct mem_fin *fin; /* finishes of chats memory did not know */
	size_t nfin, capfin;
};

static uint64_t
mem_now(void)
{
	return (now_mono_ns() / 1000000);
}

static size_t
mem_slot(const char *s)
{
	uint64_t h = 14695981039346656037ULL;

	for (; *s != '\0'; s++) {
		h ^= (unsigned char)*s;
		h *= 1099511628211ULL;
	}
	return (h % CHAT_MEM_BUCKETS);
}

static void
mem_gauge(struct storage *st)
{
	storage_gauge(st->m.mem_chats, (double)st->chat_mem->n);
}

static void
mem_unlock(struct storage_chat_mem *cm, struct mem_chat *e)
{
	struct mem_chat **pp;

	if (!e->locked)
		return;
	for (pp = &cm->lb[mem_slot(e->conv)]; *pp != NULL; pp = &(*pp)->lnext)
		if (*pp == e) {
			*pp = e->lnext;
			break;
		}
	e->locked = 0;
	e->lnext = NULL;
}

static void
mem_remove(struct storage *st, struct mem_chat *e)
{
	struct storage_chat_mem *cm = st->chat_mem;
	struct mem_chat **pp;

	mem_unlock(cm, e);
	for (pp = &cm->cb[mem_slot(e->chat_id)]; *pp != NULL;
	     pp = &(*pp)->cnext)
		if (*pp == e) {
			*pp = e->cnext;
			break;
		}
	TAILQ_REMOVE(&cm->all, e, all);
	cm->n--;
	free(e->bot);
	free(e->user);
	free(e);
	mem_gauge(st);
}

/* Drop e's expired parts; whether it is still there. */
static int
mem_fresh(struct storage *st, struct mem_chat *e, uint64_t now)
{
	if (now >= e->hash_until) {
		mem_remove(st, e);
		return (0);
	}
	if (e->locked && now >= e->lock_until)
		mem_unlock(st->chat_mem, e);
	return (1);
}

static struct mem_chat *
mem_find(struct storage *st, const char *chat_id)
{
	struct mem_chat *e;

	for (e = st->chat_mem->cb[mem_slot(chat_id)]; e != NULL; e = e->cnext)
		if (strcmp(e->chat_id, chat_id) == 0)
			return (mem_fresh(st, e, mem_now()) ? e : NULL);
	return (NULL);
}

/* The chat holding conv's lock in memory, or NULL. */
static struct mem_chat *
mem_holder(struct storage *st, const char *conv)
{
	struct mem_chat *e;

	for (e = st->chat_mem->lb[mem_slot(conv)]; e != NULL; e = e->lnext)
		if (strcmp(e->conv, conv) == 0) {
			if (!mem_fresh(st, e, mem_now()) || !e->locked)
				return (NULL);
			return (e);
		}
	return (NULL);
}

/* Room for one more entry: expired ones go, then the oldest without a
 * lock; 0, or -1 if every entry holds a lock. */
static int
mem_room(struct storage *st)
{
	struct storage_chat_mem *cm = st->chat_mem;
	struct mem_chat *e, *next;
	uint64_t now = mem_now();

	if (cm->n < CHAT_MEM_MAX)
		return (0);
	for (e = TAILQ_FIRST(&cm->all); e != NULL; e = next) {
		next = TAILQ_NEXT(e, all);
		(void)mem_fresh(st, e, now);
	}
	for (e = TAILQ_FIRST(&cm->all); e != NULL && cm->n >= CHAT_MEM_MAX;
	     e = next) {
		next = TAILQ_NEXT(e, all);
		if (!e->locked)
			mem_remove(st, e);
	}
	return (cm->n < CHAT_MEM_MAX ? 0 : -1);
}

/* Take req's lock in memory; calls storage_ctx_locked(). */
static void
mem_lock(struct storage_ctx_req *req, uint64_t lock_ms)
{
	struct storage *st = req->st;
	struct storage_chat_mem *cm = st->chat_mem;
	struct mem_chat *e, *holder;
	uint64_t now = mem_now();
	char msg[128];
	size_t b;

	holder = mem_holder(st, req->conversation_id.p);
	if (holder != NULL && strcmp(holder->chat_id, req->chat_id.p) != 0) {
		snprintf(msg, sizeof(msg),
		         "conversation busy: chat %.32s is running",
		         holder->chat_id);
		storage_count(st->m.lock_busy);
		storage_ctx_locked(req, 409, 4016, msg);
		return;
	}
	if ((e = mem_find(st, req->chat_id.p)) == NULL) {
		if (mem_room(st) == -1 ||
		    (e = calloc(1, sizeof(*e))) == NULL ||
		    (e->bot = strdup(req->bot_id.p)) == NULL ||
		    (e->user = strdup(req->user_id.p)) == NULL) {
			if (e != NULL) {
				free(e->bot);
				free(e);
			}
			storage_count(st->m.mem_full);
			storage_count(st->m.lock_unavailable);
			storage_ctx_locked(req, 503, 5030,
			                   "context store unavailable");
			return;
		}
		snprintf(e->chat_id, sizeof(e->chat_id), "%s", req->chat_id.p);
		snprintf(e->conv, sizeof(e->conv), "%s",
		         req->conversation_id.p);
		snprintf(e->status, sizeof(e->status), "in_progress");
		e->created_at = now_wall_ms() / 1000;
		b = mem_slot(e->chat_id);
		e->cnext = cm->cb[b];
		cm->cb[b] = e;
		TAILQ_INSERT_TAIL(&cm->all, e, all);
		cm->n++;
		mem_gauge(st);
	}
	e->hash_until = now + lock_ms + CHAT_HASH_EXTRA_MS;
	if (holder == NULL) {
		e->locked = 1;
		e->lock_until = now + lock_ms;
		b = mem_slot(e->conv);
		e->lnext = cm->lb[b];
		cm->lb[b] = e;
	}
	storage_count(st->m.mem_lock);
	storage_count(st->m.lock_taken);
	req->locked = 1;
	req->created_at = e->created_at;
	storage_ctx_locked(req, 200, 0, "");
}

/* A finish in memory; 1 if memory knew the chat. */
static int
mem_finish(struct storage *st, const char *conv, const char *chat_id,
           const char *status)
{
	struct mem_chat *e = mem_find(st, chat_id);

	if (e == NULL)
		return (0);
	if (status[0] == '\0') {
		mem_remove(st, e);
		return (1);
	}
	snprintf(e->status, sizeof(e->status), "%s", status);
	e->hash_until = mem_now() + CHAT_HASH_EXTRA_MS;
	if (e->locked && strcmp(e->conv, conv) == 0)
		mem_unlock(st->chat_mem, e);
	return (1);
}

/* Remember the finish of a chat memory does not know, for Redis. */
static void
mem_fin_add(struct storage *st, const char *conv, const char *chat_id,
            const char *status)
{
	struct storage_chat_mem *cm = st->chat_mem;
	struct mem_fin *f;
	size_t c;

	if (cm->nfin == cm->capfin) {
		c = cm->capfin ? cm->capfin * 2 : 64;
		if (c > CHAT_FIN_MAX ||
		    (f = realloc(cm->fin, c * sizeof(*f))) == NULL) {
			storage_count(st->m.mem_full);
			return; /* its lock expires by itself */
		}
		cm->fin = f;
		cm->capfin = c;
	}
	f = &cm->fin[cm->nfin++];
	snprintf(f->conv, sizeof(f->conv), "%s", conv);
	snprintf(f->chat_id, sizeof(f->chat_id), "%s", chat_id);
	snprintf(f->status, sizeof(f->status), "%s", status);
}

int
storage_chat_init(struct storage *st)
{
	struct metrics *mx = st->svc.metrics;
	struct storage_metrics *m = &st->m;
	static const char ff[] = "troupe_storage_redis_fallback_total";
	static const char fh[] = "Requests served without Redis (ctx: "
	                         "context from PostgreSQL; lock: v3 lock "
	                         "in memory; nonce: refused 503; full: "
	                         "memory table full, 503)";
	static const char sf[] = "troupe_storage_memory_synced_total";
	static const char sh[] = "v3 chats written from memory to Redis "
	                         "after an outage, by outcome";
	char l[160];

#define LBL(k, v)                                                             \
	(snprintf(l, sizeof(l), "service=\"%s\"," k "=\"%s\"", st->svc.name,  \
	          v),                                                         \
	 l)
	m->ctx_fallback = metrics_counter(mx, ff, fh, LBL("kind", "ctx"));
	m->mem_lock = metrics_counter(mx, ff, fh, LBL("kind", "lock"));
	m->nonce_unavailable =
	        metrics_counter(mx, ff, fh, LBL("kind", "nonce"));
	m->mem_full = metrics_counter(mx, ff, fh, LBL("kind", "full"));
	m->mem_synced = metrics_counter(mx, sf, sh, LBL("result", "ok"));
	m->mem_sync_failed =
	        metrics_counter(mx, sf, sh, LBL("result", "failed"));
#undef LBL
	snprintf(l, sizeof(l), "service=\"%s\"", st->svc.name);
	m->mem_chats = metrics_gauge(
	        mx, "troupe_storage_memory_chats",
	        "v3 chats (locks, hashes) held in memory while Redis is or "
	        "was down",
	        l);
	if ((st->chat_mem = calloc(1, sizeof(*st->chat_mem))) == NULL)
		return (-1);
	TAILQ_INIT(&st->chat_mem->all);
	return (0);
}

struct mem_sync {
	struct storage *st;
	char chat_id[CHAT_ID_MAX];
};

static void
mem_sync_done(void *arg, const redisReply *reply)
{
	struct mem_sync *ms = arg;
	struct storage *st = ms->st;
	struct mem_chat *e;

	if (reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
		storage_count(st->m.mem_sync_failed);
		if (reply != NULL && reply->type == REDIS_REPLY_ERROR)
			log_warnx("redis: chat %s from memory: %s",
			          ms->chat_id, reply->str);
		free(ms);
		return;
	}
	storage_count(st->m.mem_synced);
	/* Redis has it now.  A change since (a finish while Redis was up)
	 * went to Redis after this, on the same connection, so Redis has
	 * that too: memory may forget the chat either way. */
	if ((e = mem_find(st, ms->chat_id)) != NULL)
		mem_remove(st, e);
	free(ms);
}

void
storage_chat_redis_up(struct storage *st)
{
	struct storage_chat_mem *cm = st->chat_mem;
	struct mem_chat *e, *next;
	struct mem_sync *ms;
	struct mem_fin *fin;
	char lock[CHAT_KEY_MAX], chat[CHAT_KEY_MAX], lms[24], created[24],
	        ttl[24];
	const char *argv[13];
	size_t argl[13], i, nfin = cm->nfin, sent = 0;
	uint64_t now = mem_now();
	int k;

	if (cm->n == 0 && cm->nfin == 0)
		return;
	for (e = TAILQ_FIRST(&cm->all); e != NULL; e = next) {
		next = TAILQ_NEXT(e, all);
		if (!mem_fresh(st, e, now))
			continue;
		if ((ms = malloc(sizeof(*ms))) == NULL)
			break;
		ms->st = st;
		memcpy(ms->chat_id, e->chat_id, sizeof(ms->chat_id));
		chat_keys(lock, chat, e->conv, e->chat_id);
		snprintf(lms, sizeof(lms), "%llu",
		         (unsigned long long)(e->locked ? e->lock_until - now
		                                        : 0));
		snprintf(created, sizeof(created), "%llu",
		         (unsigned long long)e->created_at);
		snprintf(ttl, sizeof(ttl), "%llu",
		         (unsigned long long)(e->hash_until - now));
		argv[0] = "EVAL";
		argv[1] = sync_lua;
		argv[2] = "2";
		argv[3] = lock;
		argv[4] = chat;
		argv[5] = e->chat_id;
		argv[6] = lms;
		argv[7] = e->status;
		argv[8] = e->conv;
		argv[9] = e->bot;
		argv[10] = e->user;
		argv[11] = created;
		argv[12] = ttl;
		for (k = 0; k < 13; k++)
			argl[k] = strlen(argv[k]);
		if (storage_redis_cmd(st->redis, mem_sync_done, ms, 13, argv,
		                      argl) == -1) {
			free(ms);
			break;
		}
		sent++;
	}
	log_info("redis: back: writing %zu v3 chats and %zu finishes kept "
	         "in memory while it was down",
	         sent, nfin);
	fin = cm->fin;
	cm->fin = NULL;
	cm->nfin = cm->capfin = 0;
	for (i = 0; i < nfin; i++)
		(void)storage_chat_finish(st, fin[i].conv, fin[i].chat_id,
		                          fin[i].status, NULL, NULL);
	free(fin);
}

static uint64_t
chat_lock_ms(const struct storage_ctx_req *req)
{
	uint64_t lock_ms = req->lock_ms;

	if (lock_ms == 0)
		lock_ms = CHAT_LOCK_DEFAULT_MS;
	if (lock_ms > CHAT_LOCK_MAX_MS)
		lock_ms = CHAT_LOCK_MAX_MS;
	return (lock_ms);
}

static void
chat_lock_done(void *arg, const redisReply *reply)
{
	struct storage_ctx_req *req = arg;
	const redisReply *e0, *e1;
	char msg[128];

	if (reply == NULL) {
		/* Lost or timed out: memory is authoritative now. */
		storage_count(req->st->m.err_redis);
		mem_lock(req, chat_lock_ms(req));
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
	uint64_t lock_ms = chat_lock_ms(req);
	int i;

	if (!storage_redis_up(st->redis)) {
		mem_lock(req, lock_ms);
		return;
	}
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
	                      argl) == -1)
		mem_lock(req, lock_ms);
}

int
storage_chat_finish(struct storage *st, const char *conv, const char *chat_id,
                    const char *status, storage_redis_cb cb, void *arg)
{
	char lock[CHAT_KEY_MAX], chat[CHAT_KEY_MAX], ttl[24];
	const char *argv[8];
	size_t argl[8];
	int i, known;

	/* Memory first (it may hold the chat while Redis is or was
	 * down), then Redis. */
	known = mem_finish(st, conv, chat_id, status);
	if (!storage_redis_up(st->redis)) {
		if (!known)
			mem_fin_add(st, conv, chat_id, status);
		return (-1);
	}
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

/* The cancel of q is recorded: answer the canceled chat. */
static void
q_canceled(struct storage_chat_q *q)
{
	struct coze_chat c;

	memset(&c, 0, sizeof(c));
	c.id = MSTR(q->chat_id);
	c.conversation_id = MSTR(q->conv);
	c.bot_id = MSTR(q->bot_id);
	c.status = "canceled";
	c.created_at = q->created_at;
	c.completed_at = now_wall_ms() / 1000;
	q_chat(q, &c);
}

static void
q_cancel_done(void *arg, const redisReply *reply)
{
	struct storage_chat_q *q = arg;

	if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
		storage_count(q->st->m.err_redis);
		q_reply(q, 503, 5030, "context store unavailable", MSTR_NULL);
		return;
	}
	q_canceled(q);
}

/* Answer q from its chat's hash (status, conversation, bot, created_at)
 * and whether the conversation's lock is held by this chat. */
static void
q_hash_answer(struct storage_chat_q *q, const char *status, const char *conv,
              size_t nconv, const char *bot, uint64_t created, int lock_ours)
{
	struct coze_chat c;
	int lost;

	if (status == NULL || conv == NULL || nconv != strlen(q->conv) ||
	    memcmp(conv, q->conv, nconv) != 0) {
		q_not_found(q);
		return;
	}
	/* In progress, but its lock is gone (it lasts until the run's
	 * deadline + 5 s) and PostgreSQL has no row: the run was lost (its
	 * worker died).  Say failed, so that pollers stop. */
	lost = strcmp(status, "in_progress") == 0 && !lock_ours;
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
			/* Redis down: memory has recorded it. */
			if (!storage_redis_up(q->st->redis))
				q_canceled(q);
			else
				q_reply(q, 503, 5030,
				        "context store unavailable",
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

static void q_ask_memory(struct storage_chat_q *);

/* The chat's Redis hash and its conversation's lock (PostgreSQL has no
 * row). */
static void
q_hash_done(void *arg, const redisReply *reply)
{
	struct storage_chat_q *q = arg;
	const redisReply *hash, *lock;
	const char *status = NULL, *conv = NULL, *bot = "";
	size_t i, nconv = 0;
	uint64_t created = 0;

	if (reply == NULL) {
		storage_count(q->st->m.err_redis);
		q_ask_memory(q);
		return;
	}
	if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
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
	q_hash_answer(q, status, conv, nconv, bot, created,
	              lock->type == REDIS_REPLY_STRING &&
	                      strcmp(lock->str, q->chat_id) == 0);
}

/* Redis down: the memory table answers; a chat it does not know may be
 * in progress in Redis, so that is 503, not 404. */
static void
q_ask_memory(struct storage_chat_q *q)
{
	struct mem_chat *e = mem_find(q->st, q->chat_id);
	struct mem_chat *h;

	if (e == NULL) {
		q_reply(q, 503, 5030, "context store unavailable", MSTR_NULL);
		return;
	}
	h = mem_holder(q->st, e->conv);
	q_hash_answer(q, e->status, e->conv, strlen(e->conv), e->bot,
	              e->created_at, h == e);
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
	if (!storage_redis_up(q->st->redis) ||
	    storage_redis_cmd(q->st->redis, q_hash_done, q, 5, argv, argl) ==
	            -1)
		q_ask_memory(q);
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
		q_send(st, to, &h, 503, MSG_CODE_STOPPING, "storage stopping",
		       MSTR_NULL, 1);
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
