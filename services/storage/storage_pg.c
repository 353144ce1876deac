/* SPDX-License-Identifier: ISC */
/*
 * storage_pg: one PostgreSQL connection driven by the loop with libpq's
 * non-blocking API (PQconnectStart/PQconnectPoll, PQsetnonblocking,
 * PQsendQueryParams, PQflush, PQconsumeInput/PQisBusy/PQgetResult), and a
 * FIFO of statements sent one at a time.  Not pipeline mode: one
 * statement in flight means one implicit transaction per statement and no
 * aborted-pipeline bookkeeping (PITFALLS.md, libpq 15).
 *
 * Callers: storage.c makes two (the group-commit writer and the reader);
 * storage_schema.c runs migrations through the setup hook.
 *
 * A statement or connection attempt that outlives the timeout fails its
 * caller (callback with NULL) and resets the connection; a cancel request
 * goes out on a short-lived helper thread because PQcancel blocks in 15.
 * A lost connection fails everything queued and is retried with back-off
 * (100 ms doubling to 5 s).  It must never block the loop: the conninfo
 * should name a numeric host, hostaddr or a socket directory, since
 * PQconnectStart resolves names with a blocking getaddrinfo().  It must
 * never run a callback from inside storage_pg_query().
 *
 * DIAGNOSTICS: connection failures warn (once per outage, then every
 * 30 s), statement errors are for the caller to log.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

#define PG_BACKOFF_MIN_MS 100
#define PG_BACKOFF_MAX_MS 5000
#define PG_LOG_EVERY_MS 30000
#define PG_MAX_CANCELS 4

enum pg_state { PG_DOWN, PG_CONNECTING, PG_SETUP, PG_READY };

struct pg_query {
	TAILQ_ENTRY(pg_query) entry;
	const char *sql;
	int nparams;
	int multi; /* simple protocol, several statements */
	int setup; /* part of the setup: goes before the others */
	storage_pg_cb cb;
	void *arg;
	char *values[]; /* nparams pointers, then the copied strings */
};
TAILQ_HEAD(pg_queries, pg_query);

struct storage_pg {
	struct loop *loop;
	char *name;
	char *conninfo;
	int64_t timeout_ms;
	size_t max_queue;
	struct storage_pg_hooks hooks;

	PGconn *conn;
	int fd; /* registered with the loop, or -1 */
	uint32_t events;
	enum pg_state state;
	int flushing;
	struct pg_queries queue;
	size_t nqueued;
	struct pg_query *cur;
	PGresult *res; /* what cur returned so far */

	struct loop_timer *retry, *deadline, *failer;
	int64_t backoff_ms;
	int outage;        /* failing since the last success */
	int ever_up;       /* has been ready once */
	uint64_t last_log; /* when the outage was last logged */
	char failmsg[256]; /* for failer */
};

static void pg_connect(struct storage_pg *);
static void pg_kick(struct storage_pg *);
static void pg_on_fd(struct loop *, int, uint32_t, void *);

static atomic_int pg_ncancels;

static void *
pg_cancel_main(void *arg)
{
	PGcancel *c = arg;
	char err[256];

	(void)PQcancel(c, err, sizeof(err));
	PQfreeCancel(c);
	atomic_fetch_sub(&pg_ncancels, 1);
	return (NULL);
}

/* Ask the server to stop the running statement, off the loop thread. */
static void
pg_cancel(PGconn *conn)
{
	pthread_attr_t attr;
	pthread_t t;
	PGcancel *c;

	if (atomic_fetch_add(&pg_ncancels, 1) >= PG_MAX_CANCELS)
		goto out;
	if ((c = PQgetCancel(conn)) == NULL)
		goto out;
	if (pthread_attr_init(&attr) != 0) {
		PQfreeCancel(c);
		goto out;
	}
	(void)pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, pg_cancel_main, c) != 0) {
		PQfreeCancel(c);
		pthread_attr_destroy(&attr);
		goto out;
	}
	pthread_attr_destroy(&attr);
	return;
out:
	atomic_fetch_sub(&pg_ncancels, 1);
}

static void
pg_notice(void *arg, const char *message)
{
	struct storage_pg *pg = arg;
	size_t n = strlen(message);

	while (n > 0 && message[n - 1] == '\n')
		n--;
	log_debug("postgres %s: %.*s", pg->name, (int)n, message);
}

/* Whether to log an outage event now (first, then every 30 s). */
static int
pg_log_now(struct storage_pg *pg)
{
	uint64_t now = loop_now(pg->loop);

	if (!pg->outage || now - pg->last_log >= PG_LOG_EVERY_MS) {
		pg->last_log = now;
		return (1);
	}
	return (0);
}

static void
pg_fail_queries(struct pg_query *cur, struct pg_queries *list)
{
	struct pg_query *q;

	if (cur != NULL) {
		cur->cb(cur->arg, NULL);
		free(cur);
	}
	while ((q = TAILQ_FIRST(list)) != NULL) {
		TAILQ_REMOVE(list, q, entry);
		q->cb(q->arg, NULL);
		free(q);
	}
}

/* Close the connection, fail what it carried, retry later. */
static void
pg_drop(struct storage_pg *pg, int cancel, const char *fmt, ...)
{
	struct pg_queries list = TAILQ_HEAD_INITIALIZER(list);
	struct pg_query *cur = pg->cur, *q;
	int was_up = pg->state == PG_READY;
	char why[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	storage_text_oneline(why);
	if (pg_log_now(pg) || was_up)
		log_warnx("postgres %s: %s; retrying in %lld ms", pg->name,
		          why, (long long)pg->backoff_ms);
	else
		log_debug("postgres %s: %s", pg->name, why);
	pg->outage = 1;

	if (pg->fd != -1)
		loop_fd_del(pg->loop, pg->fd);
	pg->fd = -1;
	pg->events = 0;
	if (pg->conn != NULL) {
		if (cancel && cur != NULL)
			pg_cancel(pg->conn);
		PQfinish(pg->conn);
	}
	pg->conn = NULL;
	pg->state = PG_DOWN;
	pg->flushing = 0;
	PQclear(pg->res);
	pg->res = NULL;
	loop_timer_stop(pg->deadline);
	loop_timer_stop(pg->failer);
	pg->cur = NULL;
	while ((q = TAILQ_FIRST(&pg->queue)) != NULL) {
		TAILQ_REMOVE(&pg->queue, q, entry);
		TAILQ_INSERT_TAIL(&list, q, entry);
	}
	pg->nqueued = 0;

	loop_timer_set(pg->retry, pg->backoff_ms);
	pg->backoff_ms *= 2;
	if (pg->backoff_ms > PG_BACKOFF_MAX_MS)
		pg->backoff_ms = PG_BACKOFF_MAX_MS;

	if (was_up && pg->hooks.on_state)
		pg->hooks.on_state(pg, 0, pg->hooks.arg);
	pg_fail_queries(cur, &list);
}

/* Drop on the next loop turn: for paths reached from a caller's code. */
static void
pg_fail_later(struct storage_pg *pg, const char *why)
{
	if (loop_timer_armed(pg->failer))
		return;
	snprintf(pg->failmsg, sizeof(pg->failmsg), "%s", why);
	loop_timer_set(pg->failer, 0);
}

static void
pg_failer_cb(struct loop *l, void *arg)
{
	struct storage_pg *pg = arg;

	(void)l;
	if (pg->state != PG_DOWN)
		pg_drop(pg, 0, "%s", pg->failmsg);
}

static void
pg_retry_cb(struct loop *l, void *arg)
{
	(void)l;
	pg_connect(arg);
}

static void
pg_deadline_cb(struct loop *l, void *arg)
{
	struct storage_pg *pg = arg;

	(void)l;
	if (pg->state == PG_CONNECTING)
		pg_drop(pg, 0, "connect: no answer within %lld ms",
		        (long long)pg->timeout_ms);
	else if (pg->cur != NULL)
		pg_drop(pg, 1,
		        "statement still running after %lld ms: "
		        "connection reset",
		        (long long)pg->timeout_ms);
}

/* (Re-)register fd: during connection setup libpq may replace the socket,
 * and the new one may reuse the old number, so always delete and add. */
static int
pg_watch(struct storage_pg *pg, int fd, uint32_t events)
{
	if (pg->fd != -1)
		loop_fd_del(pg->loop, pg->fd);
	pg->fd = -1;
	pg->events = 0;
	if (fd < 0)
		return (-1);
	if (loop_fd_add(pg->loop, fd, events, pg_on_fd, pg) == -1)
		return (-1);
	pg->fd = fd;
	pg->events = events;
	return (0);
}

static int
pg_events(struct storage_pg *pg, uint32_t events)
{
	if (events == pg->events)
		return (0);
	if (loop_fd_mod(pg->loop, pg->fd, events) == -1)
		return (-1);
	pg->events = events;
	return (0);
}

static void
pg_connect(struct storage_pg *pg)
{
	if (pg->state != PG_DOWN)
		return;
	if ((pg->conn = PQconnectStart(pg->conninfo)) == NULL) {
		pg_drop(pg, 0, "connect: out of memory");
		return;
	}
	if (PQstatus(pg->conn) == CONNECTION_BAD) {
		pg_drop(pg, 0, "connect: %s", PQerrorMessage(pg->conn));
		return;
	}
	(void)PQsetNoticeProcessor(pg->conn, pg_notice, pg);
	pg->state = PG_CONNECTING;
	loop_timer_set(pg->deadline, pg->timeout_ms);
	/* The docs: begin as if PQconnectPoll had said "writing". */
	if (pg_watch(pg, PQsocket(pg->conn), EPOLLOUT) == -1)
		pg_drop(pg, 0, "connect: cannot watch socket: %s",
		        strerror(errno));
}

static void
pg_connect_poll(struct storage_pg *pg)
{
	uint32_t ev;

	switch (PQconnectPoll(pg->conn)) {
	case PGRES_POLLING_READING:
		ev = EPOLLIN;
		break;
	case PGRES_POLLING_WRITING:
		ev = EPOLLOUT;
		break;
	case PGRES_POLLING_OK:
		goto connected;
	default:
		pg_drop(pg, 0, "connect: %s", PQerrorMessage(pg->conn));
		return;
	}
	/* PQsocket() can change at any step (PITFALLS.md). */
	if (pg_watch(pg, PQsocket(pg->conn), ev) == -1)
		pg_drop(pg, 0, "connect: cannot watch socket: %s",
		        strerror(errno));
	return;

connected:
	if (PQsetnonblocking(pg->conn, 1) == -1) {
		pg_drop(pg, 0, "PQsetnonblocking: %s",
		        PQerrorMessage(pg->conn));
		return;
	}
	if (pg_watch(pg, PQsocket(pg->conn), EPOLLIN) == -1) {
		pg_drop(pg, 0, "cannot watch socket: %s", strerror(errno));
		return;
	}
	loop_timer_stop(pg->deadline);
	pg->state = PG_SETUP;
	log_debug("postgres %s: connected (server %d)", pg->name,
	          PQserverVersion(pg->conn));
	if (pg->hooks.on_setup)
		pg->hooks.on_setup(pg, pg->hooks.arg);
	else
		storage_pg_setup_done(pg, 1);
}

/* Push out what libpq buffered; watch for writability while it cannot. */
static int
pg_flush(struct storage_pg *pg)
{
	int r;

	if ((r = PQflush(pg->conn)) == -1) {
		pg_drop(pg, 0, "send: %s", PQerrorMessage(pg->conn));
		return (-1);
	}
	pg->flushing = r == 1;
	if (pg_events(pg, EPOLLIN | (pg->flushing ? EPOLLOUT : 0)) == -1) {
		pg_drop(pg, 0, "cannot watch socket: %s", strerror(errno));
		return (-1);
	}
	return (0);
}

static int
pg_res_failed(const PGresult *r)
{
	ExecStatusType s = PQresultStatus(r);

	return (s == PGRES_FATAL_ERROR || s == PGRES_BAD_RESPONSE ||
	        s == PGRES_NONFATAL_ERROR);
}

static void
pg_finish_cur(struct storage_pg *pg)
{
	struct pg_query *q = pg->cur;
	PGresult *r = pg->res;

	pg->cur = NULL;
	pg->res = NULL;
	loop_timer_stop(pg->deadline);
	if (r == NULL)
		log_warnx("postgres %s: statement returned no result",
		          pg->name);
	q->cb(q->arg, r);
	PQclear(r);
	free(q);
}

/* Collect results while libpq can give them without blocking. */
static void
pg_collect(struct storage_pg *pg)
{
	PGresult *r;

	while (pg->conn != NULL && pg->cur != NULL && !PQisBusy(pg->conn)) {
		if ((r = PQgetResult(pg->conn)) == NULL) {
			pg_finish_cur(pg);
			continue;
		}
		if (pg->res == NULL)
			pg->res = r;
		else if (pg_res_failed(pg->res))
			PQclear(r); /* keep the first failure */
		else {
			PQclear(pg->res);
			pg->res = r;
		}
	}
	if (pg->conn == NULL)
		return;
	if (PQstatus(pg->conn) == CONNECTION_BAD) {
		pg_drop(pg, 0, "connection lost: %s",
		        PQerrorMessage(pg->conn));
		return;
	}
	if (pg->cur == NULL)
		pg_kick(pg);
}

static void
pg_on_fd(struct loop *l, int fd, uint32_t events, void *arg)
{
	struct storage_pg *pg = arg;

	(void)l;
	(void)fd;
	if (pg->conn == NULL)
		return;
	if (pg->state == PG_CONNECTING) {
		pg_connect_poll(pg);
		return;
	}
	if ((events & EPOLLOUT) && pg->flushing && pg_flush(pg) == -1)
		return;
	if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
		if (!PQconsumeInput(pg->conn)) {
			pg_drop(pg, 0, "connection lost: %s",
			        PQerrorMessage(pg->conn));
			return;
		}
		/* The docs: while a flush waits, reading may unblock it. */
		if (pg->flushing && pg_flush(pg) == -1)
			return;
		pg_collect(pg);
	}
}

/* Send the next statement if none is in flight. */
static void
pg_kick(struct storage_pg *pg)
{
	struct pg_query *q;
	int ok;

	if (pg->conn == NULL || pg->cur != NULL ||
	    (pg->state != PG_SETUP && pg->state != PG_READY) ||
	    loop_timer_armed(pg->failer))
		return;
	if ((q = TAILQ_FIRST(&pg->queue)) == NULL ||
	    (pg->state == PG_SETUP && !q->setup))
		return;
	TAILQ_REMOVE(&pg->queue, q, entry);
	pg->nqueued--;
	pg->cur = q;
	if (q->multi)
		ok = PQsendQuery(pg->conn, q->sql);
	else
		ok = PQsendQueryParams(pg->conn, q->sql, q->nparams, NULL,
		                       (const char *const *)q->values, NULL,
		                       NULL, 0);
	if (!ok) {
		/* We may be inside a caller's storage_pg_query(). */
		pg_fail_later(pg, PQerrorMessage(pg->conn));
		return;
	}
	loop_timer_set(pg->deadline, pg->timeout_ms);
	switch (PQflush(pg->conn)) {
	case 0:
		pg->flushing = 0;
		break;
	case 1:
		pg->flushing = 1;
		break;
	default:
		pg_fail_later(pg, PQerrorMessage(pg->conn));
		return;
	}
	if (pg_events(pg, EPOLLIN | (pg->flushing ? EPOLLOUT : 0)) == -1)
		pg_fail_later(pg, "cannot watch socket");
}

static int
pg_enqueue(struct storage_pg *pg, const char *sql, int nparams,
           const char *const *values, int setup, storage_pg_cb cb, void *arg)
{
	struct pg_query *q;
	size_t sz = sizeof(*q) + (size_t)nparams * sizeof(char *), off;
	int i;

	if (pg->nqueued >= pg->max_queue)
		return (-1);
	for (i = 0; i < nparams; i++)
		if (values[i] != NULL)
			sz += strlen(values[i]) + 1;
	if ((q = malloc(sz)) == NULL)
		return (-1);
	q->sql = sql;
	q->nparams = nparams;
	q->multi = setup;
	q->setup = setup;
	q->cb = cb;
	q->arg = arg;
	off = sizeof(*q) + (size_t)nparams * sizeof(char *);
	for (i = 0; i < nparams; i++) {
		if (values[i] == NULL) {
			q->values[i] = NULL;
			continue;
		}
		q->values[i] = (char *)q + off;
		strcpy(q->values[i], values[i]);
		off += strlen(values[i]) + 1;
	}
	/* Setup statements run one at a time, each queued when the one
	 * before it is done: ahead of what waits for the end of setup. */
	if (setup)
		TAILQ_INSERT_HEAD(&pg->queue, q, entry);
	else
		TAILQ_INSERT_TAIL(&pg->queue, q, entry);
	pg->nqueued++;
	pg_kick(pg);
	return (0);
}

int
storage_pg_query(struct storage_pg *pg, const char *sql, int nparams,
                 const char *const *values, storage_pg_cb cb, void *arg)
{
	if (!storage_pg_accepting(pg))
		return (-1);
	return (pg_enqueue(pg, sql, nparams, values, 0, cb, arg));
}

int
storage_pg_setup_query(struct storage_pg *pg, const char *sql,
                       storage_pg_cb cb, void *arg)
{
	if ((pg->state != PG_SETUP && pg->state != PG_READY) ||
	    loop_timer_armed(pg->failer))
		return (-1);
	return (pg_enqueue(pg, sql, 0, NULL, 1, cb, arg));
}

void
storage_pg_setup_done(struct storage_pg *pg, int ok)
{
	if (pg->state != PG_SETUP)
		return;
	if (!ok) {
		pg_fail_later(pg, "setup failed");
		return;
	}
	pg->state = PG_READY;
	pg->ever_up = 1;
	pg->backoff_ms = PG_BACKOFF_MIN_MS;
	if (pg->outage)
		log_info("postgres %s: connected again", pg->name);
	else
		log_info("postgres %s: connected", pg->name);
	pg->outage = 0;
	if (pg->hooks.on_state)
		pg->hooks.on_state(pg, 1, pg->hooks.arg);
	pg_kick(pg);
}

int
storage_pg_up(const struct storage_pg *pg)
{
	return (pg->state == PG_READY && !loop_timer_armed(pg->failer));
}

int
storage_pg_accepting(const struct storage_pg *pg)
{
	if (loop_timer_armed(pg->failer))
		return (0);
	/* Until the first success after start, wait for the attempt in
	 * progress rather than refuse what comes in the first moments (it
	 * is bounded by the timeout); later outages fail fast.  That
	 * includes the first attempt not yet begun (it starts from a timer,
	 * and the envelopes our peers kept for us during a restart can come
	 * in the loop turn before it). */
	return (pg->state == PG_READY ||
	        (!pg->ever_up &&
	         (pg->state == PG_CONNECTING || pg->state == PG_SETUP ||
	          (pg->state == PG_DOWN && !pg->outage))));
}

int
storage_pg_idle(const struct storage_pg *pg)
{
	return (storage_pg_up(pg) && pg->cur == NULL && pg->nqueued == 0);
}

size_t
storage_pg_queued(const struct storage_pg *pg)
{
	return (pg->nqueued + (pg->cur != NULL));
}

void
storage_pg_set_timeout(struct storage_pg *pg, int64_t ms)
{
	pg->timeout_ms = ms;
}

const char *
storage_pg_error(const PGresult *res)
{
	static char b[1024];

	if (res == NULL)
		return ("no result");
	snprintf(b, sizeof(b), "%s", PQresultErrorMessage(res));
	return (storage_text_oneline(b));
}

const char *
storage_pg_name(const struct storage_pg *pg)
{
	return (pg->name);
}

struct storage_pg *
storage_pg_new(struct loop *l, const char *name, const char *conninfo,
               int64_t timeout_ms, size_t max_queue,
               const struct storage_pg_hooks *hooks)
{
	struct storage_pg *pg;

	if ((pg = calloc(1, sizeof(*pg))) == NULL)
		return (NULL);
	pg->loop = l;
	pg->fd = -1;
	pg->timeout_ms = timeout_ms;
	pg->max_queue = max_queue;
	pg->backoff_ms = PG_BACKOFF_MIN_MS;
	if (hooks != NULL)
		pg->hooks = *hooks;
	TAILQ_INIT(&pg->queue);
	if ((pg->name = strdup(name)) == NULL ||
	    (pg->conninfo = strdup(conninfo)) == NULL ||
	    (pg->retry = loop_timer_new(l, pg_retry_cb, pg)) == NULL ||
	    (pg->deadline = loop_timer_new(l, pg_deadline_cb, pg)) == NULL ||
	    (pg->failer = loop_timer_new(l, pg_failer_cb, pg)) == NULL) {
		storage_pg_free(pg);
		return (NULL);
	}
	loop_timer_set(pg->retry, 0);
	return (pg);
}

void
storage_pg_free(struct storage_pg *pg)
{
	struct pg_queries list = TAILQ_HEAD_INITIALIZER(list);
	struct pg_query *cur, *q;

	if (pg == NULL)
		return;
	if (pg->fd != -1)
		loop_fd_del(pg->loop, pg->fd);
	pg->fd = -1;
	if (pg->conn != NULL)
		PQfinish(pg->conn);
	pg->conn = NULL;
	pg->state = PG_DOWN;
	PQclear(pg->res);
	pg->res = NULL;
	cur = pg->cur;
	pg->cur = NULL;
	while ((q = TAILQ_FIRST(&pg->queue)) != NULL) {
		TAILQ_REMOVE(&pg->queue, q, entry);
		TAILQ_INSERT_TAIL(&list, q, entry);
	}
	pg->nqueued = 0;
	/* Callbacks may still look at pg (it refuses everything now). */
	pg->hooks.on_state = NULL;
	pg_fail_queries(cur, &list);
	loop_timer_free(pg->retry);
	loop_timer_free(pg->deadline);
	loop_timer_free(pg->failer);
	free(pg->name);
	free(pg->conninfo);
	free(pg);
}
