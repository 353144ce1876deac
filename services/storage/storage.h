/* SPDX-License-Identifier: ISC */
/*
 * storage: the state of troupe-storage shared by its files, and their
 * entry points.  troupe-storage is the only process that talks to Redis
 * (conversation contexts) and PostgreSQL (bots, chats): workers ask it for
 * a bot and its context (CTX_GET), hand it finished turns (CHAT_PERSIST,
 * written by group commit, acknowledged to the edge only after COMMIT),
 * and troupectl manages bots, their plugins and API keys through it
 * (ADMIN_REQUEST).  For the v3 chat
 * API it also holds each conversation's lock and the chats in progress
 * (Redis), answers retrieve, message list and the cancel of a chat no
 * worker runs (CHAT_QUERY), and checks API keys (KEY_CHECK).
 *
 * Files: storage.c (main, config, peer table, status, stop),
 * storage_dispatch.c (one switch per peer), storage_ctx.c (CTX_GET, the
 * Redis context), storage_commit.c (CHAT_PERSIST, group commit),
 * storage_bots.c (bot cache, admin ops), storage_chat.c (v3 lock, chat
 * hash, CHAT_QUERY), storage_keys.c (API keys), storage_plugins.c (a
 * bot's plugins), storage_schema.c
 * (migrations), storage_pg.c (a non-blocking libpq connection on the
 * loop), storage_redis.c (hiredis 0.14 async on the loop), storage_text.c
 * (pure text helpers).  Everything runs on the loop thread, and nothing
 * here may block it: Redis or PostgreSQL being down or slow gives clear
 * 503s, never a crash or a hang.
 */
#ifndef TROUPE_STORAGE_H
#define TROUPE_STORAGE_H

#include <sys/queue.h>

#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#include "proto.h"
#include "storage_spool.h"
#include "storage_text.h"
#include "svc.h"

/* storage_pg.c: one PostgreSQL connection with a FIFO of statements, one
 * in flight at a time. */
struct storage_pg;
/* A statement's outcome: NULL if the connection failed, timed out or was
 * never there; else its result (check PQresultStatus).  Owned by the
 * caller of the callback, which clears it after. */
typedef void (*storage_pg_cb)(void *arg, const PGresult *res);
struct storage_pg_hooks {
	/* Connected: run setup statements with storage_pg_setup_query(),
	 * then call storage_pg_setup_done().  NULL: ready at once. */
	void (*on_setup)(struct storage_pg *, void *arg);
	/* Ready for statements (up 1), or no longer (up 0). */
	void (*on_state)(struct storage_pg *, int up, void *arg);
	void *arg;
};

/* Start connecting (on the loop) to conninfo; NULL on ENOMEM. */
struct storage_pg *storage_pg_new(struct loop *, const char *name,
                                  const char *conninfo, int64_t timeout_ms,
                                  size_t max_queue,
                                  const struct storage_pg_hooks *);
/* Close, failing what is queued (callbacks run with NULL). */
void storage_pg_free(struct storage_pg *);
/* Queue one statement with nparams text parameters (copied; NULL is SQL
 * NULL).  -1 if not accepting (storage_pg_accepting) or the queue is full; the
 * callback then never runs.  The callback never runs before this returns. */
int storage_pg_query(struct storage_pg *, const char *sql, int nparams,
                     const char *const *values, storage_pg_cb, void *arg);
/* Queue a parameterless, possibly multi-statement string during setup
 * (or when ready); the callback gets the first failed result, else the
 * last one. */
int storage_pg_setup_query(struct storage_pg *, const char *sql, storage_pg_cb,
                           void *arg);
/* End setup: ok, the connection serves; else it is dropped and retried. */
void storage_pg_setup_done(struct storage_pg *, int ok);
/* Whether the connection serves now. */
int storage_pg_up(const struct storage_pg *);
/* Whether storage_pg_query() accepts statements now: when up, and while
 * connecting before the first success since start (they wait for it). */
int storage_pg_accepting(const struct storage_pg *);
/* Whether up with nothing in flight or queued. */
int storage_pg_idle(const struct storage_pg *);
/* Statements queued or in flight. */
size_t storage_pg_queued(const struct storage_pg *);
/* Change the statement/connect timeout. */
void storage_pg_set_timeout(struct storage_pg *, int64_t ms);
const char *storage_pg_name(const struct storage_pg *);
/* The error text of res on one line (a static buffer, valid until the
 * next call). */
const char *storage_pg_error(const PGresult *res);

/* storage_redis.c: one hiredis async context on the loop, rebuilt with
 * back-off whenever it is lost, with per-command timeouts. */
struct storage_redis;
/* A command's reply, or NULL if it failed (connection lost, timed out);
 * valid only during the call. */
typedef void (*storage_redis_cb)(void *arg, const redisReply *reply);
struct storage_redis_hooks {
	/* Connected (up 1) or lost (up 0).  Commands may be sent from
	 * here when up. */
	void (*on_state)(struct storage_redis *, int up, void *arg);
	void *arg;
};

/* Start connecting to addr; NULL on ENOMEM. */
struct storage_redis *storage_redis_new(struct loop *,
                                        const struct storage_redis_addr *,
                                        int64_t timeout_ms,
                                        const struct storage_redis_hooks *);
/* Close, failing pending commands (callbacks run with NULL). */
void storage_redis_free(struct storage_redis *);
/* Whether the connection serves now. */
int storage_redis_up(const struct storage_redis *);
/* Send one command (arguments copied; cb may be NULL).  -1 if not
 * connected (while connecting before the first success since start, it
 * is queued instead); the callback then never runs.  Otherwise the
 * callback runs exactly once, never before this returns. */
int storage_redis_cmd(struct storage_redis *, storage_redis_cb, void *arg,
                      int argc, const char **argv, const size_t *argvlen);
/* Commands sent and not yet answered. */
size_t storage_redis_pending(const struct storage_redis *);
void storage_redis_set_timeout(struct storage_redis *, int64_t ms);

/* The service's configuration ([storage] section). */
struct storage_conf {
	char *redis;
	char *postgres;
	int64_t bot_cache_ms;
	int64_t bot_cache_max;
	int64_t batch_max;
	int64_t queue_max;
	int64_t read_queue_max;
	int64_t pg_timeout_ms;
	int64_t redis_timeout_ms;
	int64_t context_ttl_s;
	char *spool_dir;         /* L2 spool directory */
	int64_t spool_max_bytes; /* bound of the spool file */
};

struct storage_metrics {
	uint64_t *batches, *batch_rows;
	uint64_t *rows_stored, *rows_duplicate, *rows_failed, *rows_refused,
	        *rows_invalid, *rows_expired, *rows_spooled, *rows_replayed;
	uint64_t *ctx_hit, *ctx_miss, *ctx_none, *ctx_unknown_bot,
	        *ctx_unavailable, *ctx_invalid;
	uint64_t *bot_hit, *bot_load, *bot_stale;
	uint64_t *redis_append_failed, *invalidations_lost;
	uint64_t *err_pg, *err_redis, *err_send, *err_bad_msg,
	        *err_unknown_msg;
	uint64_t *admin_ok, *admin_failed;
	uint64_t *lock_taken, *lock_busy, *lock_unavailable;
	uint64_t *nonce_ok, *nonce_replayed;
	uint64_t *q_ok, *q_not_found, *q_finished, *q_invalid, *q_unavailable,
	        *q_error;
	uint64_t *key_valid, *key_invalid, *key_unavailable;
	/* Redis down (storage_chat.c registers these): contexts read from
	 * PostgreSQL, nonces refused, v3 chats kept in memory. */
	uint64_t *ctx_fallback, *nonce_unavailable;
	uint64_t *mem_lock, *mem_full, *mem_synced, *mem_sync_failed;
	double *mem_chats;
	/* LIMIT_CHECK answers (storage_limit.c). */
	uint64_t *limit_allowed, *limit_limited, *limit_unknown,
	        *limit_invalid, *limit_noscript;
	double *redis_up, *writer_up, *reader_up, *schema_version;
	double *queue_rows, *read_queue, *redis_pending, *bot_cache_entries;
	double *spool_bytes, *spool_records, *degraded_l2;
	uint64_t *spool_enter, *spool_fsyncs;
	struct histo *commit_seconds, *ctx_seconds;
};

/* Count one event (the pointer is NULL if the registry ran out of
 * memory). */
static inline void
storage_count(uint64_t *c)
{
	if (c != NULL)
		(*c)++;
}

static inline void
storage_gauge(double *g, double v)
{
	if (g != NULL)
		*g = v;
}

/* A bot as read from PostgreSQL: immutable, shared by reference. */
struct storage_bot {
	int refs;
	uint64_t context_turns;
	uint64_t ttfe_ms, total_ms; /* the bot's deadlines */
	char *id, *upstream, *model, *system_prompt;
	/* Its plugins for CTX_REPLY, secrets included: a JSON array
	 * [{name, url, description, parameters, auth, header, secret,
	 * timeout_ms}], "[]" if none. */
	char *plugins;
	size_t plugins_len;
};

enum storage_bot_status {
	STORAGE_BOT_FOUND,
	STORAGE_BOT_ABSENT,
	STORAGE_BOT_UNAVAILABLE,
};

/* One CTX_GET being answered (storage_ctx.c); waits on a bot load in
 * storage_bots.c. */
struct storage_ctx_req {
	TAILQ_ENTRY(storage_ctx_req) entry; /* a bot entry's waiters */
	struct storage *st;
	struct storage_bot *bot; /* a reference, once known */
	struct msg_head head;    /* strings point into blob */
	char *reply_to;
	struct mstr bot_id, conversation_id;
	/* v3 (chat_id non-empty): the conversation lock and the chat in
	 * progress (storage_chat.c); NUL-terminated in blob. */
	struct mstr chat_id, user_id;
	/* webhook (nonce non-empty): refuse a nonce seen for this bot
	 * within STORAGE_NONCE_TTL_S; NUL-terminated in blob. */
	struct mstr nonce;
	uint64_t lock_ms;
	uint64_t created_at; /* unix s, from the chat's Redis hash */
	int locked;          /* the lock is ours: release it on failure */
	char *key;           /* the Redis key, NUL-terminated */
	size_t keylen;
	uint64_t epoch; /* commit epoch when the rebuild was queued */
	uint64_t t0_ns;
	char blob[];
};
TAILQ_HEAD(storage_ctx_reqs, storage_ctx_req);

struct storage_bot_entry;
struct storage_row;
struct storage_chat_q;
struct storage_chat_mem;
TAILQ_HEAD(storage_chat_qs, storage_chat_q);
struct storage_batch;
TAILQ_HEAD(storage_rows, storage_row);
struct storage_spool_ent {
	char chat_id[40]; /* coze ids: at most 32 digits */
	uint64_t off;     /* of its record in the spool */
};

/* Commit epochs per hashed context key: a rebuild queued before a commit
 * touching its key must not write its (older) snapshot back to Redis. */
#define STORAGE_EPOCH_SLOTS 4096

/* How long a webhook nonce is remembered (troupe:nonce:<bot>:<nonce>):
 * longer than the edge's +-300 s timestamp window, so a replay is
 * refused by one or the other. */
#define STORAGE_NONCE_TTL_S 600
#define STORAGE_NONCE_MAX 64

struct storage {
	struct svc svc;
	struct storage_conf conf;
	struct storage_redis_addr redis_addr;
	struct storage_redis *redis;
	struct storage_pg *writer, *reader;
	int schema_version;

	/* Group commit (storage_commit.c). */
	struct storage_rows rows; /* waiting for the next batch */
	size_t nrows;
	struct storage_batch *batch; /* in flight on the writer */
	size_t nappending;           /* committed batches awaiting Redis */
	uint64_t commit_epoch;
	/* L2 (storage_commit.c): while spooling, persists are appended to
	 * the spool and answered once synced; when the writer is back the
	 * spool is replayed from spool_off through the group commit. */
	struct storage_spool *spool; /* NULL: no spool, 503 as before */
	int spooling;
	int replay_solo;         /* replay one record per statement */
	uint64_t spool_off;      /* next record to replay */
	uint64_t spool_replayed; /* records replayed so far */
	/* v3 chats in the spool, for CHAT_QUERY while spooling. */
	struct storage_spool_ent *spool_idx;
	size_t nspool_idx, capspool_idx;
	char spool_cause[160];
	uint64_t epoch_slot[STORAGE_EPOCH_SLOTS];
	/* v3 persists queued or in flight, per hashed chat_id: a
	 * CHAT_QUERY about such a chat waits for its commit
	 * (storage_chat.c), so that a client told "canceled" or "done"
	 * never reads an older state. */
	uint32_t chat_pending[STORAGE_EPOCH_SLOTS];
	struct storage_chat_qs chat_waiting;
	size_t nchat_waiting;

	/* Bot cache (storage_bots.c). */
	struct storage_bot_entry **bot_tab;
	size_t bot_tabsize, bot_count;

	/* v3 locks and chats while Redis is down (storage_chat.c). */
	struct storage_chat_mem *chat_mem;
	/* The GCRA script's SHA-1 once loaded, "" before (storage_limit.c). */
	char limit_sha[41];

	/* Context keys to delete once Redis is back (storage_ctx.c). */
	char **forget;
	size_t nforget, capforget;

	size_t nctx;   /* CTX_GETs being answered */
	size_t nadmin; /* admin statements in flight */
	uint64_t nodd; /* undecodable or unexpected messages */

	struct storage_metrics m;
	struct loop_timer *stop_timer;
	char status[256];
};

/* storage.c */
/* Bytes storage_head_copy() needs for the head of m. */
size_t storage_head_size(const struct msg *m);
/* Copy the request id, trace and deadline of m into *h, and the mailbox
 * to answer (reply_to; if empty and or_sender, the sender) into *to, all
 * NUL-terminated in p (of storage_head_size(m) bytes); returns the byte
 * after what it used. */
char *storage_head_copy(const struct msg *m, struct msg_head *h, char **to,
                        char *p, int or_sender);
/* Refresh STATUS= (and the log) after a dependency went up or down. */
void storage_status(struct storage *);
/* While stopping: finish the stop once no persist is pending. */
void storage_stop_check(struct storage *);

/* storage_dispatch.c: one switch per peer kind. */
enum { DISPATCH_OK, DISPATCH_BAD, DISPATCH_UNHANDLED };
int storage_dispatch_worker(struct storage *, const struct msg *);
int storage_dispatch_tool(struct storage *, const struct msg *);
int storage_dispatch_auth(struct storage *, const struct msg *);
int storage_dispatch_dispatcher(struct storage *, const struct msg *);

/* storage_ctx.c */
/* Answer a CTX_GET (now or later). */
void storage_ctx_get(struct storage *, const struct msg *,
                     const struct ctx_get *);
/* Answer an undecodable CTX_GET with 400. */
void storage_ctx_bad(struct storage *, const struct msg *);
/* The bot of a waiting CTX_GET is known (storage_bots.c calls this). */
void storage_ctx_have_bot(struct storage_ctx_req *, struct storage_bot *,
                          enum storage_bot_status);
/* Record that a turn of (bot, conversation) was committed now. */
void storage_ctx_committed(struct storage *, struct mstr bot_id,
                           struct mstr conversation_id);
/* Delete a context key from Redis, now or once Redis is back. */
void storage_ctx_forget(struct storage *, const char *key, size_t keylen);
/* Redis is (back) up: send the deletions that waited. */
void storage_ctx_redis_up(struct storage *);

/* The lock of a v3 CTX_GET is taken (status 200: go on with the
 * context), or not (answer status, code, msg); storage_chat.c calls
 * this. */
void storage_ctx_locked(struct storage_ctx_req *, uint64_t status,
                        int64_t code, const char *msg);

/* storage_chat.c: v3 chats in Redis (the conversation lock, the chat in
 * progress) and CHAT_QUERY. */
/* Take the conversation lock for req's chat and record the chat as in
 * progress; calls storage_ctx_locked() now or later. */
void storage_chat_lock(struct storage_ctx_req *);
/* Set the chat's Redis hash to status (completed, failed, canceled; ""
 * deletes it) and release the conversation lock if it still holds
 * chat_id, in one EVAL; cb (may be NULL) gets the reply.  The memory
 * table (Redis down) is updated at once; -1 if Redis is not connected
 * (cb then never runs; the finish is replayed once Redis is back). */
int storage_chat_finish(struct storage *, const char *conversation_id,
                        const char *chat_id, const char *status,
                        storage_redis_cb, void *arg);
/* A v3 persist of chat_id was queued (delta 1) or is over (-1). */
void storage_chat_pending(struct storage *, struct mstr chat_id, int delta);
/* Start the CHAT_QUERYs whose chat has no persist pending any more
 * (every loop turn). */
void storage_chat_kick(struct storage *);
/* Answer a CHAT_QUERY (v3.retrieve, v3.list, v3.cancel). */
void storage_chat_query(struct storage *, const struct msg *,
                        const struct chat_request *);
/* Answer an undecodable CHAT_QUERY with 500. */
void storage_chat_query_bad(struct storage *, const struct msg *);

/* Register the Redis-down metrics and set up the memory table; -1 on
 * ENOMEM (storage.c, at start). */
int storage_chat_init(struct storage *);
/* Redis is (back) up: write what the memory table holds to Redis, and
 * the finishes of chats it did not know; entries leave memory once Redis
 * confirmed them (storage_ctx_redis_up calls this). */
void storage_chat_redis_up(struct storage *);

/* storage_limit.c: inbound rate limits (GCRA, one Lua script). */
/* Register the limit metrics (storage.c, at start). */
void storage_limit_init(struct storage *);
/* Answer a LIMIT_CHECK with LIMIT_REPLY (now or once Redis answered). */
void storage_limit_check(struct storage *, const struct msg *,
                         const struct limit_check *);
/* Redis is (back) up: load the script (storage_ctx_redis_up calls
 * this). */
void storage_limit_redis_up(struct storage *);

/* storage_keys.c: API keys (pat_...). */
/* Answer a KEY_CHECK with KEY_REPLY. */
void storage_keys_check(struct storage *, const struct msg *,
                        const struct key_check *);
/* Run an ADMIN_REQUEST key.* op (key.add, key.list, key.revoke). */
void storage_keys_admin(struct storage *, const struct msg *,
                        const struct admin_request *);

/* storage_commit.c */
/* Queue a CHAT_PERSIST for the next batch (or refuse it at once). */
void storage_commit_persist(struct storage *, const struct msg *,
                            const struct chat_persist *);
/* Answer an undecodable CHAT_PERSIST with 500 if it names an edge. */
void storage_commit_bad(struct storage *, const struct msg *);
/* Start the next batch if the writer is idle (every loop turn). */
void storage_commit_kick(struct storage *);
/* Whether rows wait, or a batch or its Redis update is in flight. */
int storage_commit_busy(const struct storage *);
/* Refuse every waiting row with 503 (stop, writer lost). */
void storage_commit_refuse_all(struct storage *);
/* The writer went down: enter L2 (spool) if there is a spool, else
 * refuse every waiting row with 503. */
void storage_commit_writer_down(struct storage *);
/* Open the spool at [storage] spool_dir (storage.c, at start); a
 * non-empty spool enters L2 at once.  -1 if it cannot be opened (the
 * service then runs without L2). */
int storage_commit_spool_open(struct storage *);
/* A v3 chat still in the spool (L2): its chat object (list 0) or its
 * messages as a JSON array (list 1) into out.  1 found, 0 not in the
 * spool (or of another conversation), -1 on failure. */
int storage_commit_spooled(struct storage *, const char *chat_id,
                           const char *conversation_id, int list,
                           struct buf *out);
/* Refresh the spool gauges. */
void storage_commit_gauges(struct storage *);

/* storage_bots.c */
/* Answer an ADMIN_REQUEST (status 0: done) to mailbox to ("": nobody),
 * count it, and finish a stop that waited for it. */
void storage_admin_reply(struct storage *, const char *to,
                         const struct msg_head *, uint64_t status,
                         const char *text, size_t n);
/* Find the bot of req (cache, else PostgreSQL); calls
 * storage_ctx_have_bot() now or later. */
void storage_bots_get(struct storage *, struct storage_ctx_req *);
/* Run an ADMIN_REQUEST and answer ADMIN_REPLY. */
void storage_bots_admin(struct storage *, const struct msg *,
                        const struct admin_request *);
/* Answer an undecodable ADMIN_REQUEST. */
void storage_bots_admin_bad(struct storage *, const struct msg *);
/* Forget the cached copy of a bot. */
void storage_bots_invalidate(struct storage *, const char *id);
/* Entries in the bot cache. */
size_t storage_bots_count(const struct storage *);
void storage_bot_ref(struct storage_bot *);
void storage_bot_unref(struct storage_bot *);

/* storage_plugins.c: a bot's plugins (the plugins table). */
/* Run an ADMIN_REQUEST plugin.* op (plugin.add, plugin.list,
 * plugin.rm) and answer ADMIN_REPLY; add and rm forget the bot's cached
 * copy, which carries its plugins. */
void storage_plugins_admin(struct storage *, const struct msg *,
                           const struct admin_request *);

/* storage_schema.c */
/* The on_setup hook of both connections: apply missing migrations under
 * an advisory lock, then storage_pg_setup_done(). arg: struct storage. */
void storage_schema_setup(struct storage_pg *, void *arg);
/* The newest schema version this build knows. */
int storage_schema_latest(void);

/* storage_health.c: HEALTH to the dispatcher, the tier it publishes
 * (docs/tiers.md). */
/* Start the periodic HEALTH report (after the metrics). */
void storage_health_init(struct storage *);
/* Send HEALTH now if PostgreSQL's writer or Redis changed state. */
void storage_health_check(struct storage *);
/* A batch committed in ns nanoseconds (for the commit p99). */
void storage_health_commit(struct storage *, uint64_t ns);
/* TIER_STATE from the dispatcher. */
void storage_health_tier(struct storage *, const struct tier_state *);
/* 1 while the tier is L1 or above: skip optional work (counted). */
int storage_health_defer(const struct storage *);

#endif
