/* SPDX-License-Identifier: ISC */
/*
 * storage_redis: one hiredis 0.14.1 async context on common/loop.h, with
 * what 0.14 lacks: an event adapter, connect and command timeouts, and
 * reconnection with back-off (100 ms doubling to 2 s).
 *
 * Callers: storage.c creates it; storage_ctx.c and storage_commit.c send
 * commands.  Every command's callback runs exactly once: with the reply,
 * or with NULL when the connection is lost or the command outlives the
 * timeout.
 *
 * The rules it keeps (PITFALLS.md, hiredis 0.14.1, checked against
 * async.c at v0.14.1):
 *  - hiredis may free the context inside redisAsyncHandleRead (the
 *    cleanup hook then runs): a generation counter bumped by cleanup is
 *    checked before calling redisAsyncHandleWrite on the same event;
 *  - onConnect(ERR) is followed by hiredis freeing the context, with no
 *    onDisconnect; a lost connection runs the pending callbacks with NULL
 *    and then onDisconnect.  Neither callback frees anything: they forget
 *    the pointer and arm the reconnect timer;
 *  - timeouts are ours: a watchdog timer, on the loop and never inside a
 *    hiredis callback, calls redisAsyncFree, which fails every pending
 *    command with NULL;
 *  - addresses are numeric or unix sockets (storage_text.c checks), so
 *    connecting never blocks on DNS.
 * It must never block the loop and never call redisAsyncFree from inside
 * a hiredis callback.
 *
 * DIAGNOSTICS: losing the connection warns (once per outage, saying what
 * storage does without Redis, then every 30 s); connecting again is one
 * info line; timeouts warn.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/async.h>

#include "storage.h"

#define RDS_BACKOFF_MIN_MS 100
#define RDS_BACKOFF_MAX_MS 2000
#define RDS_LOG_EVERY_MS 30000

struct rcmd {
	TAILQ_ENTRY(rcmd) entry;
	struct storage_redis *r;
	storage_redis_cb cb;
	void *arg;
	uint64_t sent_ms;
};

struct storage_redis {
	struct loop *loop;
	struct storage_redis_addr addr;
	int64_t timeout_ms;
	struct storage_redis_hooks hooks;

	redisAsyncContext *ac; /* NULL: none, or hiredis is freeing it */
	int fd;                /* registered with the loop, or -1 */
	uint32_t events;
	int up;       /* onConnect said OK and nothing was lost since */
	unsigned gen; /* bumped by the cleanup hook */
	int broken;   /* the adapter failed: the watchdog kills */
	int freeing;  /* inside storage_redis_free */
	int ever_up;  /* connected once */
	uint64_t connect_t0;
	TAILQ_HEAD(, rcmd) pending;
	size_t npending;

	struct loop_timer *retry, *watchdog;
	int64_t backoff_ms;
	int outage;
	uint64_t last_log;
};

static void rds_on_fd(struct loop *, int, uint32_t, void *);

static void
rds_desc(const struct storage_redis *r, char *b, size_t n)
{
	if (r->addr.is_unix)
		snprintf(b, n, "unix:%s", r->addr.path);
	else
		snprintf(b, n, "%s:%d", r->addr.host, r->addr.port);
}

/* The connection is gone (or never came): forget it, retry later.  Safe
 * to call twice, and from inside hiredis callbacks (it frees nothing). */
static void
rds_lost(struct storage_redis *r, const char *why)
{
	int was_up = r->up;
	uint64_t now = loop_now(r->loop);
	char d[160];

	r->ac = NULL;
	r->up = 0;
	if (r->freeing)
		return;
	if (!loop_timer_armed(r->retry)) {
		rds_desc(r, d, sizeof(d));
		if (was_up) {
			/* The switch: one line (storage_chat.c, .ctx.c). */
			log_warnx("redis %s: %s; retrying in %lld ms; until "
			          "it is back: contexts from PostgreSQL, v3 "
			          "locks in memory, webhook nonces refused",
			          d, why, (long long)r->backoff_ms);
			r->last_log = now;
		} else if (!r->outage ||
		           now - r->last_log >= RDS_LOG_EVERY_MS) {
			log_warnx("redis %s: %s; retrying in %lld ms", d, why,
			          (long long)r->backoff_ms);
			r->last_log = now;
		} else
			log_debug("redis %s: %s", d, why);
		r->outage = 1;
		loop_timer_set(r->retry, r->backoff_ms);
		r->backoff_ms *= 2;
		if (r->backoff_ms > RDS_BACKOFF_MAX_MS)
			r->backoff_ms = RDS_BACKOFF_MAX_MS;
	}
	if (was_up && r->hooks.on_state)
		r->hooks.on_state(r, 0, r->hooks.arg);
}

/* Free the context from the loop (never from a hiredis callback): every
 * pending command fails with NULL. */
static void
rds_kill(struct storage_redis *r, const char *why)
{
	redisAsyncContext *ac = r->ac;

	if (ac == NULL)
		return;
	log_warnx("redis: %s: dropping the connection", why);
	redisAsyncFree(ac);
	rds_lost(r, why);
}

/* Adapter hooks (ev.*): called by hiredis, possibly from inside its
 * handlers, so they only record and (re-)register. */
static void
ev_apply(struct storage_redis *r, uint32_t ev)
{
	if (r->ac == NULL)
		return;
	if (r->fd == -1) {
		if (loop_fd_add(r->loop, r->ac->c.fd, ev, rds_on_fd, r) ==
		    -1) {
			r->broken = 1;
			loop_timer_set(r->watchdog, 0);
			return;
		}
		r->fd = r->ac->c.fd;
	} else if (ev != r->events && loop_fd_mod(r->loop, r->fd, ev) == -1) {
		r->broken = 1;
		loop_timer_set(r->watchdog, 0);
		return;
	}
	r->events = ev;
}

static void
ev_add_read(void *p)
{
	struct storage_redis *r = p;

	ev_apply(r, r->events | EPOLLIN);
}

static void
ev_del_read(void *p)
{
	struct storage_redis *r = p;

	ev_apply(r, r->events & ~(uint32_t)EPOLLIN);
}

static void
ev_add_write(void *p)
{
	struct storage_redis *r = p;

	ev_apply(r, r->events | EPOLLOUT);
}

static void
ev_del_write(void *p)
{
	struct storage_redis *r = p;

	ev_apply(r, r->events & ~(uint32_t)EPOLLOUT);
}

/* hiredis is freeing the context (maybe inside HandleRead). */
static void
ev_cleanup(void *p)
{
	struct storage_redis *r = p;

	if (r->fd != -1)
		loop_fd_del(r->loop, r->fd);
	r->fd = -1;
	r->events = 0;
	r->ac = NULL;
	r->gen++;
}

static void
rds_on_fd(struct loop *l, int fd, uint32_t events, void *arg)
{
	struct storage_redis *r = arg;
	unsigned gen = r->gen;

	(void)l;
	(void)fd;
	if (r->ac == NULL)
		return;
	if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
		redisAsyncHandleRead(r->ac);
		/* Freed inside (PITFALLS.md: hiredis #468). */
		if (r->gen != gen || r->ac == NULL)
			return;
	}
	if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) &&
	    (r->events & EPOLLOUT))
		redisAsyncHandleWrite(r->ac);
}

static void
on_connect(const redisAsyncContext *ac, int status)
{
	struct storage_redis *r = ac->data;
	char d[160];

	if (status != REDIS_OK) {
		/* hiredis frees ac when we return. */
		rds_lost(r, ac->errstr ? ac->errstr : "connect failed");
		return;
	}
	r->up = 1;
	r->ever_up = 1;
	r->backoff_ms = RDS_BACKOFF_MIN_MS;
	rds_desc(r, d, sizeof(d));
	log_info("redis %s: connected%s", d, r->outage ? " again" : "");
	r->outage = 0;
	if (r->hooks.on_state)
		r->hooks.on_state(r, 1, r->hooks.arg);
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
	struct storage_redis *r = ac->data;

	/* The context is freed after we return; pending callbacks have
	 * already run with NULL. */
	rds_lost(r, status == REDIS_OK
	                    ? "connection closed"
	                    : (ac->errstr ? ac->errstr : "connection lost"));
}

static void
rds_connect(struct storage_redis *r)
{
	redisAsyncContext *ac;
	char why[160];

	if (r->ac != NULL)
		return;
	if (r->addr.is_unix)
		ac = redisAsyncConnectUnix(r->addr.path);
	else
		ac = redisAsyncConnect(r->addr.host, r->addr.port);
	if (ac == NULL) {
		rds_lost(r, "out of memory");
		return;
	}
	if (ac->err) {
		snprintf(why, sizeof(why), "connect: %s", ac->errstr);
		redisAsyncFree(ac); /* no hooks, no callbacks yet */
		rds_lost(r, why);
		return;
	}
	if (!r->addr.is_unix)
		(void)redisEnableKeepAlive(&ac->c);
	ac->data = r;
	ac->ev.data = r;
	ac->ev.addRead = ev_add_read;
	ac->ev.delRead = ev_del_read;
	ac->ev.addWrite = ev_add_write;
	ac->ev.delWrite = ev_del_write;
	ac->ev.cleanup = ev_cleanup;
	r->ac = ac;
	r->fd = -1;
	r->events = 0;
	r->broken = 0;
	r->connect_t0 = loop_now(r->loop);
	/* Installing the connect callback asks for writability (the
	 * hooks above must be in place first). */
	(void)redisAsyncSetConnectCallback(ac, on_connect);
	(void)redisAsyncSetDisconnectCallback(ac, on_disconnect);
	loop_timer_set(r->watchdog, r->timeout_ms);
}

static void
rds_retry_cb(struct loop *l, void *arg)
{
	(void)l;
	rds_connect(arg);
}

/* Connect and command timeouts: replies come in order, so the oldest
 * pending command is the first to check. */
static void
rds_watchdog_cb(struct loop *l, void *arg)
{
	struct storage_redis *r = arg;
	uint64_t now = loop_now(l), t0;
	struct rcmd *c;
	char why[96];

	if (r->ac == NULL)
		return;
	if (r->broken) {
		rds_kill(r, "cannot watch the socket");
		return;
	}
	if (!r->up)
		t0 = r->connect_t0;
	else if ((c = TAILQ_FIRST(&r->pending)) != NULL)
		t0 = c->sent_ms;
	else
		return;
	if (now - t0 >= (uint64_t)r->timeout_ms) {
		snprintf(why, sizeof(why), "%s: no answer within %lld ms",
		         r->up ? "command" : "connect",
		         (long long)r->timeout_ms);
		rds_kill(r, why);
		return;
	}
	loop_timer_set(r->watchdog,
	               (int64_t)(t0 + (uint64_t)r->timeout_ms - now));
}

static void
rcmd_done(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct rcmd *c = privdata;
	struct storage_redis *r = c->r;

	(void)ac;
	TAILQ_REMOVE(&r->pending, c, entry);
	r->npending--;
	if (c->cb != NULL)
		c->cb(c->arg, reply);
	free(c);
}

int
storage_redis_cmd(struct storage_redis *r, storage_redis_cb cb, void *arg,
                  int argc, const char **argv, const size_t *argvlen)
{
	struct rcmd *c;

	/* During the first attempt after start, commands wait in hiredis's
	 * buffer (the connect timeout bounds them); later outages fail
	 * fast. */
	if (r->ac == NULL || (!r->up && r->ever_up) || r->broken ||
	    (r->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)))
		return (-1);
	if ((c = malloc(sizeof(*c))) == NULL)
		return (-1);
	c->r = r;
	c->cb = cb;
	c->arg = arg;
	c->sent_ms = loop_now(r->loop);
	TAILQ_INSERT_TAIL(&r->pending, c, entry);
	r->npending++;
	if (redisAsyncCommandArgv(r->ac, rcmd_done, c, argc, argv, argvlen) !=
	    REDIS_OK) {
		/* Refused: the callback will never run. */
		TAILQ_REMOVE(&r->pending, c, entry);
		r->npending--;
		free(c);
		return (-1);
	}
	if (!loop_timer_armed(r->watchdog))
		loop_timer_set(r->watchdog, r->timeout_ms);
	return (0);
}

int
storage_redis_up(const struct storage_redis *r)
{
	return (r->ac != NULL && r->up && !r->broken);
}

size_t
storage_redis_pending(const struct storage_redis *r)
{
	return (r->npending);
}

void
storage_redis_set_timeout(struct storage_redis *r, int64_t ms)
{
	r->timeout_ms = ms;
}

struct storage_redis *
storage_redis_new(struct loop *l, const struct storage_redis_addr *addr,
                  int64_t timeout_ms, const struct storage_redis_hooks *hooks)
{
	struct storage_redis *r;

	if ((r = calloc(1, sizeof(*r))) == NULL)
		return (NULL);
	r->loop = l;
	r->addr = *addr;
	r->timeout_ms = timeout_ms;
	r->fd = -1;
	r->backoff_ms = RDS_BACKOFF_MIN_MS;
	if (hooks != NULL)
		r->hooks = *hooks;
	TAILQ_INIT(&r->pending);
	if ((r->retry = loop_timer_new(l, rds_retry_cb, r)) == NULL ||
	    (r->watchdog = loop_timer_new(l, rds_watchdog_cb, r)) == NULL) {
		loop_timer_free(r->retry);
		free(r);
		return (NULL);
	}
	loop_timer_set(r->retry, 0);
	return (r);
}

void
storage_redis_free(struct storage_redis *r)
{
	if (r == NULL)
		return;
	r->freeing = 1;
	r->hooks.on_state = NULL;
	if (r->ac != NULL)
		redisAsyncFree(r->ac); /* pending callbacks get NULL */
	loop_timer_free(r->retry);
	loop_timer_free(r->watchdog);
	free(r);
}
