/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_run: the runs troupe-dispatcher has taken from auth and not
 * yet seen finish.  A run is either assigned to a worker child (on that
 * child's list) or waiting in one bounded FIFO queue for room; every run
 * is also in a hash table by request id, so RUN_DONE and duplicates find
 * it at once, and a v3 chat in a second one by its chat id, so a cancel
 * (POST /v3/chat/cancel) finds the child that runs it.  The queue keeps a copy
 * of the body bytes, re-decoded when the run is assigned; an assigned run
 * keeps only what an error answer needs (request id, traceparent, deadline,
 * the edge's mailbox).
 *
 * Callers: dispatcher_dispatch.c (CHAT_RUN, CHAT_CANCEL, CLIENT_GONE,
 * RUN_DONE), dispatcher_spawn.c
 * (a child died), the tick in dispatcher.c (deadlines).  Every run ends
 * in exactly one of: RUN_DONE from its child, an error CHAT_REPLY sent
 * from here (503 queue full or stopping, 504 deadline, 502 child died),
 * CLIENT_GONE while queued (nobody to answer), or a stale sweep long
 * after its deadline (the edge has answered 504).
 *
 * DIAGNOSTICS: a refused send to a child (ipc backlog full) blocks that
 * child for DISPATCHER_BLOCK_MS and is logged; overload answers are
 * counted and logged at doubling counts only.  Never exits.
 */
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "dispatcher_tier.h"
#include "trace.h"

#define RUN_BUCKETS_MIN 1024

/* FNV-1a: request ids are short and already random. */
static uint32_t
run_hash(struct mstr s)
{
	uint32_t h = 2166136261u;

	for (uint32_t i = 0; i < s.n; i++) {
		h ^= (uint8_t)s.p[i];
		h *= 16777619u;
	}
	return (h);
}

static int
run_mstr_eq(struct mstr a, struct mstr b)
{
	return (a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0));
}

/* Whether a counter just reached a power of two: log those only. */
static int
run_log_now(uint64_t *counter)
{
	uint64_t n = counter ? *counter : 1;

	return (n != 0 && (n & (n - 1)) == 0);
}

static void
run_count(uint64_t *counter)
{
	if (counter)
		(*counter)++;
}

int
dispatcher_run_init(struct runtab *rt)
{
	memset(rt, 0, sizeof(*rt));
	TAILQ_INIT(&rt->rt_queue);
	if ((rt->rt_bucket =
	             calloc(RUN_BUCKETS_MIN, sizeof(*rt->rt_bucket))) == NULL)
		return (-1);
	if ((rt->rt_cbucket = calloc(RUN_BUCKETS_MIN,
	                             sizeof(*rt->rt_cbucket))) == NULL) {
		free(rt->rt_bucket);
		rt->rt_bucket = NULL;
		return (-1);
	}
	rt->rt_mask = RUN_BUCKETS_MIN - 1;
	rt->rt_cmask = RUN_BUCKETS_MIN - 1;
	return (0);
}

void
dispatcher_run_free(struct runtab *rt)
{
	struct run *r, *next;

	if (rt->rt_bucket == NULL)
		return;
	for (size_t i = 0; i <= rt->rt_mask; i++) {
		for (r = rt->rt_bucket[i]; r != NULL; r = next) {
			next = r->r_hnext;
			free(r);
		}
	}
	free(rt->rt_bucket);
	free(rt->rt_cbucket);
	memset(rt, 0, sizeof(*rt));
	TAILQ_INIT(&rt->rt_queue);
}

struct run *
dispatcher_run_new(struct mstr reqid, struct mstr trace, struct mstr edge,
                   struct mstr chat_id, uint64_t deadline_ms, const void *body,
                   size_t body_len)
{
	struct run *r;
	char *p;
	size_t n;

	if (body_len > UINT32_MAX)
		return (NULL);
	n = sizeof(*r) + reqid.n + trace.n + chat_id.n + edge.n + 1 + body_len;
	if ((r = malloc(n)) == NULL)
		return (NULL);
	memset(r, 0, sizeof(*r));
	r->r_slot = -1;
	r->r_up = r->r_bot = r->r_aup = r->r_abot = -1;
	r->r_deadline_ms = deadline_ms;
	r->r_hash = run_hash(reqid);
	p = r->r_buf;
	memcpy(p, reqid.p, reqid.n);
	r->r_reqid = (struct mstr){p, reqid.n};
	p += reqid.n;
	memcpy(p, trace.p, trace.n);
	r->r_trace = (struct mstr){p, trace.n};
	p += trace.n;
	memcpy(p, chat_id.p, chat_id.n);
	r->r_chat_id = (struct mstr){p, chat_id.n};
	r->r_chash = run_hash(chat_id);
	p += chat_id.n;
	memcpy(p, edge.p, edge.n);
	p[edge.n] = '\0';
	r->r_edge = p;
	p += edge.n + 1;
	if (body_len > 0)
		memcpy(p, body, body_len);
	r->r_body = (struct mstr){p, (uint32_t)body_len};
	return (r);
}

/* Double the buckets when runs outnumber them; silently keep the old
 * size if memory is short (chains get longer, nothing breaks). */
static void
run_grow(struct runtab *rt)
{
	size_t n = (rt->rt_mask + 1) * 2;
	struct run **b, *r, *next;

	if ((b = calloc(n, sizeof(*b))) == NULL)
		return;
	for (size_t i = 0; i <= rt->rt_mask; i++) {
		for (r = rt->rt_bucket[i]; r != NULL; r = next) {
			next = r->r_hnext;
			r->r_hnext = b[r->r_hash & (n - 1)];
			b[r->r_hash & (n - 1)] = r;
		}
	}
	free(rt->rt_bucket);
	rt->rt_bucket = b;
	rt->rt_mask = n - 1;
}

/* The same for the chat index. */
static void
run_cgrow(struct runtab *rt)
{
	size_t n = (rt->rt_cmask + 1) * 2;
	struct run **b, *r, *next;

	if ((b = calloc(n, sizeof(*b))) == NULL)
		return;
	for (size_t i = 0; i <= rt->rt_cmask; i++) {
		for (r = rt->rt_cbucket[i]; r != NULL; r = next) {
			next = r->r_cnext;
			r->r_cnext = b[r->r_chash & (n - 1)];
			b[r->r_chash & (n - 1)] = r;
		}
	}
	free(rt->rt_cbucket);
	rt->rt_cbucket = b;
	rt->rt_cmask = n - 1;
}

int
dispatcher_run_insert(struct runtab *rt, struct run *r)
{
	struct run **b;

	if (rt->rt_bucket == NULL)
		return (-1);
	if (rt->rt_count >= rt->rt_mask + 1)
		run_grow(rt);
	b = &rt->rt_bucket[r->r_hash & rt->rt_mask];
	r->r_hnext = *b;
	*b = r;
	rt->rt_count++;
	if (r->r_chat_id.n > 0) {
		if (rt->rt_ccount >= rt->rt_cmask + 1)
			run_cgrow(rt);
		/* At the tail: the oldest run of a chat is found first. */
		for (b = &rt->rt_cbucket[r->r_chash & rt->rt_cmask];
		     *b != NULL; b = &(*b)->r_cnext)
			;
		r->r_cnext = NULL;
		*b = r;
		rt->rt_ccount++;
	}
	return (0);
}

struct run *
dispatcher_run_find_chat(const struct runtab *rt, struct mstr chat_id)
{
	uint32_t h = run_hash(chat_id);
	struct run *r;

	if (chat_id.n == 0)
		return (NULL);
	for (r = rt->rt_cbucket[h & rt->rt_cmask]; r != NULL; r = r->r_cnext)
		if (r->r_chash == h && run_mstr_eq(r->r_chat_id, chat_id))
			return (r);
	return (NULL);
}

struct run *
dispatcher_run_find(const struct runtab *rt, struct mstr reqid,
                    struct mstr edge)
{
	uint32_t h = run_hash(reqid);
	struct run *r;

	for (r = rt->rt_bucket[h & rt->rt_mask]; r != NULL; r = r->r_hnext)
		if (r->r_hash == h && run_mstr_eq(r->r_reqid, reqid) &&
		    strlen(r->r_edge) == edge.n &&
		    memcmp(r->r_edge, edge.p, edge.n) == 0)
			return (r);
	return (NULL);
}

struct run *
dispatcher_run_find_slot(const struct runtab *rt, struct mstr reqid, int slot)
{
	uint32_t h = run_hash(reqid);
	struct run *r;

	for (r = rt->rt_bucket[h & rt->rt_mask]; r != NULL; r = r->r_hnext)
		if (r->r_hash == h && r->r_slot == slot &&
		    run_mstr_eq(r->r_reqid, reqid))
			return (r);
	return (NULL);
}

void
dispatcher_run_remove(struct runtab *rt, struct run *r)
{
	struct run **pp;

	for (pp = &rt->rt_bucket[r->r_hash & rt->rt_mask]; *pp != NULL;
	     pp = &(*pp)->r_hnext) {
		if (*pp == r) {
			*pp = r->r_hnext;
			r->r_hnext = NULL;
			rt->rt_count--;
			break;
		}
	}
	if (r->r_chat_id.n == 0)
		return;
	for (pp = &rt->rt_cbucket[r->r_chash & rt->rt_cmask]; *pp != NULL;
	     pp = &(*pp)->r_cnext) {
		if (*pp == r) {
			*pp = r->r_cnext;
			r->r_cnext = NULL;
			rt->rt_ccount--;
			return;
		}
	}
}

void
dispatcher_run_enqueue(struct runtab *rt, struct run *r)
{
	dispatcher_run_enqueue_on(rt, r, &rt->rt_queue, NULL, 0);
}

void
dispatcher_run_enqueue_on(struct runtab *rt, struct run *r, struct run_list *q,
                          size_t *qn, int head)
{
	r->r_slot = -1;
	if (head)
		TAILQ_INSERT_HEAD(q, r, r_link);
	else
		TAILQ_INSERT_TAIL(q, r, r_link);
	r->r_q = q;
	r->r_qn = qn;
	if (qn != NULL)
		(*qn)++;
	rt->rt_qlen++;
}

struct run *
dispatcher_run_dequeue(struct runtab *rt)
{
	struct run *r;

	if ((r = TAILQ_FIRST(&rt->rt_queue)) != NULL)
		dispatcher_run_unqueue(rt, r);
	return (r);
}

void
dispatcher_run_unqueue(struct runtab *rt, struct run *r)
{
	TAILQ_REMOVE(r->r_q != NULL ? r->r_q : &rt->rt_queue, r, r_link);
	if (r->r_qn != NULL)
		(*r->r_qn)--;
	if (r->r_qk != NULL && *r->r_qk > 0)
		(*r->r_qk)--;
	r->r_q = NULL;
	r->r_qn = NULL;
	r->r_qk = NULL;
	rt->rt_qlen--;
}

int
dispatcher_run_pick(const struct child *c, int n, uint32_t limit, uint64_t now)
{
	int best = -1;

	for (int i = 0; i < n; i++) {
		if (c[i].c_state != CHILD_READY || c[i].c_inflight >= limit ||
		    c[i].c_blocked_until > now)
			continue;
		if (best == -1 || c[i].c_inflight < c[best].c_inflight)
			best = i;
	}
	return (best);
}

void
dispatcher_run_reply(struct dispatcher *d, const char *edge,
                     const struct msg_head *h, uint64_t status, int64_t code,
                     const char *msg, uint64_t retry_after)
{
	struct chat_reply b = {
	        .status = status,
	        .code = code,
	        .msg = MSTR(msg),
	        .data = MSTR_NULL,
	        .retry_after = retry_after,
	};

	if (msg_send_chat_reply(d->d_svc->ipc, edge, h, &b) == -1)
		log_req(LOG_L_WARN, h->reqid, h->traceparent, MSTR_NULL,
		        "%s: cannot send %llu/%lld to %s (backlog full)",
		        __func__, (unsigned long long)status, (long long)code,
		        edge);
}

/* The head of an error answer about r. */
static struct msg_head
run_head(const struct run *r)
{
	struct msg_head h = {
	        .reqid = r->r_reqid,
	        .traceparent = r->r_trace,
	        .deadline_ms = r->r_deadline_ms,
	        .reply_to = MSTR_NULL,
	};

	return (h);
}

static void
run_fail(struct dispatcher *d, struct run *r, uint64_t status, int64_t code,
         const char *msg, uint64_t retry_after)
{
	struct msg_head h = run_head(r);

	dispatcher_run_reply(d, r->r_edge, &h, status, code, msg, retry_after);
}

/* Hand r to the least busy child.  0, or -1 if no child takes it (r is
 * then on no list). */
static int
run_assign(struct dispatcher *d, struct run *r, const struct chat_request *req)
{
	struct msg_head h = {
	        .reqid = r->r_reqid,
	        .traceparent = r->r_trace,
	        .deadline_ms = r->r_deadline_ms,
	        .reply_to = MSTR(r->r_edge),
	};
	uint64_t now = loop_now(d->d_loop);
	struct child *c;
	int k;
	char ctp[TRACE_TP_LEN];

	/* salt: an attempt handed back and assigned again is another span */
	if (trace_enabled &&
	    trace_child(r->r_trace, "dispatcher", now, ctp) == 0)
		h.traceparent = (struct mstr){ctp, TRACE_TP_LEN};
	for (;;) {
		k = dispatcher_run_pick(d->d_child, d->d_max, d->d_per_child,
		                        now);
		if (k == -1)
			return (-1);
		c = &d->d_child[k];
		if (msg_send_run_assign(d->d_svc->ipc, c->c_name, &h, req) ==
		    -1) {
			log_warnx(
			        "%s: %s refused a run (backlog %zu): no runs "
			        "to it for %d ms",
			        __func__, c->c_name,
			        ipc_backlog(d->d_svc->ipc, c->c_name),
			        DISPATCHER_BLOCK_MS);
			c->c_blocked_until = now + DISPATCHER_BLOCK_MS;
			continue;
		}
		if (trace_enabled) { /* queued since r_since_ms, or not */
			struct trace_span ts = {
			        .name = "dispatcher",
			        .kind = TRACE_INTERNAL,
			        .start_ns = r->r_since_ms
			                            ? trace_wall_of_mono(
			                                      r->r_since_ms *
			                                      1000000ULL)
			                            : trace_in_ns,
			        .note = MSTR(c->c_name)};
			trace_end(h.traceparent, r->r_trace, &ts);
		}
		r->r_slot = k;
		r->r_since_ms = now;
		TAILQ_INSERT_TAIL(&c->c_runs, r, r_link);
		c->c_inflight++;
		d->d_inflight++;
		dispatcher_admit_start(d, r);
		run_count(d->m_assigned);
		return (0);
	}
}

/* Take an assigned run off its child (it stays in the table). */
static void
run_detach(struct dispatcher *d, struct run *r)
{
	struct child *c = &d->d_child[r->r_slot];

	TAILQ_REMOVE(&c->c_runs, r, r_link);
	c->c_inflight--;
	d->d_inflight--;
	dispatcher_admit_end(d, r);
	r->r_slot = -1;
}

/* Forget an assigned run. */
static void
run_finish(struct dispatcher *d, struct run *r)
{
	run_detach(d, r);
	dispatcher_run_remove(&d->d_runs, r);
	free(r);
}

/* Seconds of a Retry-After for a wait of ms: at least 1. */
static uint64_t
run_retry_after(uint64_t ms)
{
	uint64_t s = (ms + 999) / 1000;

	return (s < 1 ? 1 : s);
}

/* Whether r, able to start in wait ms, would still have queue_slack_ms
 * left before its deadline. */
static int
run_in_time(const struct dispatcher *d, const struct run *r, uint64_t wait,
            uint64_t wall)
{
	return (r->r_deadline_ms == 0 ||
	        wall + wait + d->d_queue_slack_ms < r->r_deadline_ms);
}

/* Forget a queued run, answering its edge. */
static void
run_drop_queued(struct dispatcher *d, struct run *r, uint64_t status,
                int64_t code, const char *msg, uint64_t retry_after)
{
	dispatcher_run_unqueue(&d->d_runs, r);
	dispatcher_run_remove(&d->d_runs, r);
	run_fail(d, r, status, code, msg, retry_after);
	free(r);
}

/* A run that cannot start in time (a pause past its deadline, tier L3,
 * a full queue): 503 with Retry-After now, never a timeout later. */
static void
run_refuse(struct dispatcher *d, struct run *r, uint64_t wait, const char *why)
{
	run_count(d->m_rej_limit);
	if (run_log_now(d->m_rej_limit))
		log_req(LOG_L_INFO, r->r_reqid, r->r_trace, MSTR_NULL,
		        "%s: %s: answering 503, retry after %llu s (%llu so "
		        "far)",
		        __func__, why,
		        (unsigned long long)run_retry_after(wait),
		        (unsigned long long)(d->m_rej_limit ? *d->m_rej_limit
		                                            : 0));
	run_fail(d, r, 503, 5030, "upstream rate limited, retry later",
	         run_retry_after(wait));
}

/* Queue r (in its upstream's queue) or refuse it: 1 queued, 0 refused
 * (r is then freed). */
static int
run_park(struct dispatcher *d, struct run *r, int head)
{
	uint64_t now = loop_now(d->d_loop), wall = now_wall_ms();
	uint64_t wait = dispatcher_admit_wait(d, r, now);
	struct run_list *q;
	size_t *qn;

	if (dispatcher_tier_now(d) == 3) {
		run_refuse(d, r, dispatcher_tier_retry_after(d) * 1000,
		           "tier L3: nothing queues");
		goto drop;
	}
	/* The pause, then the runs queued ahead at the recent rate. */
	if (!run_in_time(d, r, wait + dispatcher_admit_estimate(d, r), wall)) {
		run_refuse(d, r, wait + dispatcher_admit_estimate(d, r),
		           "cannot start before its deadline");
		goto drop;
	}
	if (d->d_runs.rt_qlen >= d->d_queue_max) {
		run_count(d->m_rej_overload);
		if (run_log_now(d->m_rej_overload))
			log_warnx(
			        "%s: queue full (%zu runs, %d workers): "
			        "answering 503 (%llu so far)",
			        __func__, d->d_runs.rt_qlen, d->d_ready,
			        (unsigned long long)(d->m_rej_overload
			                                     ? *d->m_rej_overload
			                                     : 0));
		run_fail(d, r, 503, 5030, "overloaded", run_retry_after(wait));
		goto drop;
	}
	q = dispatcher_admit_queue(d, r, &qn);
	r->r_since_ms = now;
	dispatcher_run_enqueue_on(&d->d_runs, r, q, qn, head);
	if ((r->r_qk = dispatcher_admit_keyq(d, r)) != NULL)
		(*r->r_qk)++;
	if (wait > 0)
		dispatcher_admit_wake(d, wait);
	return (1);
drop:
	dispatcher_run_remove(&d->d_runs, r);
	free(r);
	return (0);
}

void
dispatcher_run_chat(struct dispatcher *d, const struct msg *m,
                    const struct chat_request *req)
{
	struct msg_head rh = msg_head_reply(m, NULL);
	struct mstr chat_id = MSTR_NULL;
	struct run *r = NULL;
	char edge[64];

	if (m->reply_to.n == 0 || m->reply_to.n >= sizeof(edge)) {
		run_count(d->m_drop_bad);
		log_req(LOG_L_WARN, m->reqid, m->traceparent, req->bot_id,
		        "%s: CHAT_RUN without a usable reply_to: dropped",
		        __func__);
		return;
	}
	memcpy(edge, m->reply_to.p, m->reply_to.n);
	edge[m->reply_to.n] = '\0';

	if (d->d_stopping) {
		run_count(d->m_rej_stopping);
		dispatcher_run_reply(d, edge, &rh, 503,
		                     DISPATCHER_CODE_STOPPING, "shutting down",
		                     1);
		return;
	}
	if (m->deadline_ms != 0 && m->deadline_ms <= now_wall_ms()) {
		run_count(d->m_rej_deadline);
		dispatcher_run_reply(d, edge, &rh, 504, 5040,
		                     "deadline exceeded", 0);
		return;
	}
	/* The same request from the same edge again: a resend after a
	 * sender restart.  The first copy answers. */
	if (dispatcher_run_find(&d->d_runs, m->reqid, m->reply_to) != NULL) {
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "%s: duplicate CHAT_RUN dropped", __func__);
		return;
	}

	/* A v3 chat can be canceled by its chat id. */
	if (mstr_eq(req->route, "v3.chat"))
		chat_id = req->chat_id;

	/* The body stays with the run: it is sent again when the worker
	 * hands a throttled run back (RUN_DONE status 0). */
	r = dispatcher_run_new(m->reqid, m->traceparent, m->reply_to, chat_id,
	                       m->deadline_ms, m->body, m->body_len);
	if (r == NULL || dispatcher_run_insert(&d->d_runs, r) == -1) {
		free(r);
		goto nomem;
	}
	dispatcher_admit_classify(d, r, req->bot_id);
	{
		size_t *qn, *qk = dispatcher_admit_keyq(d, r);
		struct run_list *q = dispatcher_admit_queue(d, r, &qn);
		int ok = dispatcher_admit_ok(d, r, loop_now(d->d_loop));
		/* Runs wait in order: a new one overtakes no queued run of
		 * its limit key (or of its queue, for an unknown bot); runs
		 * of other keys wait for their own limits. */
		int first = qk != NULL ? *qk == 0 : TAILQ_EMPTY(q);

		if (ok && first && run_assign(d, r, req) == 0) {
			dispatcher_scale_refresh(d, 0);
			return;
		}
		if (ok && first)
			dispatcher_scale_full(d);
		if (run_park(d, r, 0) && ok && !first)
			dispatcher_run_drain(d);
	}
	dispatcher_scale_refresh(d, 0);
	return;
nomem:
	log_warn("%s: run table", __func__);
	run_count(d->m_rej_overload);
	dispatcher_run_reply(d, edge, &rh, 503, 5030, "overloaded", 1);
}

void
dispatcher_run_cancel(struct dispatcher *d, const struct msg *m,
                      const struct chat_request *req)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct chat_request q = *req;
	char edge[64];
	struct run *r;

	if (m->reply_to.n == 0 || m->reply_to.n >= sizeof(edge) ||
	    memchr(m->reply_to.p, '\0', m->reply_to.n) != NULL) {
		run_count(d->m_drop_bad);
		log_req(LOG_L_WARN, m->reqid, m->traceparent, req->bot_id,
		        "%s: CHAT_CANCEL without a usable reply_to: dropped",
		        __func__);
		return;
	}
	memcpy(edge, m->reply_to.p, m->reply_to.n);
	edge[m->reply_to.n] = '\0';
	/* The worker or storage answers the canceler's edge. */
	h.reply_to = m->reply_to;
	q.route = MSTR_LIT("v3.cancel");
	r = dispatcher_run_find_chat(&d->d_runs, req->chat_id);
	if (r != NULL && r->r_slot >= 0) {
		struct child *c = &d->d_child[r->r_slot];

		if (msg_send_run_cancel(d->d_svc->ipc, c->c_name, &h, &q) ==
		    0) {
			run_count(d->m_cancel_worker);
			log_req(LOG_L_DEBUG, m->reqid, m->traceparent,
			        req->bot_id, "cancel of chat %.*s sent to %s",
			        (int)req->chat_id.n, req->chat_id.p,
			        c->c_name);
			return;
		}
	} else if (msg_send_chat_query(d->d_svc->ipc, "storage", &h, &q) ==
	           0) {
		/* Not running (finished, unknown, or still queued): storage
		 * knows how it ended. */
		run_count(d->m_cancel_storage);
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "cancel of chat %.*s: no worker runs it, asked "
		        "storage",
		        (int)req->chat_id.n, req->chat_id.p);
		return;
	}
	run_count(d->m_cancel_refused);
	h.reply_to = MSTR_NULL;
	dispatcher_run_reply(d, edge, &h, 503, 5030, "service unavailable", 1);
}

void
dispatcher_run_gone(struct dispatcher *d, const struct msg *m,
                    const struct chat_request *req)
{
	struct msg_head h;
	struct run *r;

	if ((r = dispatcher_run_find(&d->d_runs, m->reqid, m->sender)) ==
	    NULL) {
		/* Ended already, or never got here. */
		run_count(d->m_gone_unknown);
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "%s: client gone, no such run", __func__);
		return;
	}
	if (r->r_slot < 0) {
		/* Nobody waits for it any more: it never starts. */
		run_count(d->m_gone_dropped);
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "%s: client gone, queued run dropped", __func__);
		dispatcher_run_unqueue(&d->d_runs, r);
		dispatcher_run_remove(&d->d_runs, r);
		free(r);
		dispatcher_scale_refresh(d, 0);
		return;
	}
	if (r->r_gone)
		return; /* RUN_CANCEL sent already */
	h = run_head(r);
	h.reply_to = MSTR_NULL; /* the worker answers nobody */
	if (msg_send_run_cancel(d->d_svc->ipc, d->d_child[r->r_slot].c_name,
	                        &h, req) == -1) {
		/* The run ends at its deadline anyway. */
		log_req(LOG_L_WARN, m->reqid, m->traceparent, req->bot_id,
		        "%s: %s refused the RUN_CANCEL (backlog full)",
		        __func__, d->d_child[r->r_slot].c_name);
		return;
	}
	r->r_gone = 1;
	run_count(d->m_gone_cancel);
	log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
	        "client gone: RUN_CANCEL to %s", d->d_child[r->r_slot].c_name);
}

void
dispatcher_run_done(struct dispatcher *d, int slot, const struct msg *m,
                    const struct run_done *done)
{
	struct run *r;

	if ((r = dispatcher_run_find_slot(&d->d_runs, m->reqid, slot)) ==
	    NULL) {
		/* Already answered (stale sweep) or a late duplicate. */
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, MSTR_NULL,
		        "%s: RUN_DONE from worker-%d for no known run",
		        __func__, slot);
		return;
	}
	log_req(LOG_L_DEBUG, m->reqid, m->traceparent, done->bot_id,
	        "run done on worker-%d: status %llu, upstream %llu in %llu us"
	        "%s",
	        slot, (unsigned long long)done->status,
	        (unsigned long long)done->upstream_status,
	        (unsigned long long)done->upstream_us,
	        done->throttled ? ", throttled" : "");
	dispatcher_admit_done(d, r, done);
	run_count(d->m_done);
	if (done->status != 0) {
		run_finish(d, r);
		dispatcher_run_drain(d);
		return;
	}
	/* Status 0: the worker answered nobody and hands the run back (the
	 * upstream throttled it, or the worker holds that upstream back).
	 * It waits again, first in its upstream's queue, or is refused with
	 * 503 and Retry-After if it cannot run again in time. */
	run_detach(d, r);
	if (r->r_gone) {
		dispatcher_run_remove(&d->d_runs, r);
		free(r);
	} else if (r->r_body.n == 0 || r->r_tries >= d->d_throttle_retries) {
		uint64_t wait =
		        dispatcher_admit_wait(d, r, loop_now(d->d_loop));

		if (wait == 0)
			wait = done->backoff_ms;
		run_refuse(d, r, wait, "throttled again");
		dispatcher_run_remove(&d->d_runs, r);
		free(r);
	} else if (d->d_stopping) {
		/* No child will take it again: answer now, not at the
		 * client's deadline. */
		run_count(d->m_rej_stopping);
		run_fail(d, r, 503, DISPATCHER_CODE_STOPPING, "shutting down",
		         1);
		dispatcher_run_remove(&d->d_runs, r);
		free(r);
	} else {
		r->r_tries++;
		if (run_park(d, r, 1))
			run_count(d->m_requeued);
	}
	dispatcher_run_drain(d);
}

/* Assign what may start from queue q.  0, or -1 when no child has room
 * (the other queues need not be tried). */
static int
run_drain_queue(struct dispatcher *d, struct run_list *q, uint64_t now,
                uint64_t wall)
{
	struct chat_request req = {0};
	struct run *r, *next;
	int scanned = 0;

	for (r = TAILQ_FIRST(q); r != NULL && scanned < DISPATCHER_SCAN_MAX;
	     r = next) {
		uint64_t wait;

		next = TAILQ_NEXT(r, r_link);
		scanned++;
		if (r->r_deadline_ms != 0 && r->r_deadline_ms <= wall) {
			run_count(d->m_rej_deadline);
			run_drop_queued(d, r, 504, 5040, "deadline exceeded",
			                0);
			continue;
		}
		if (!dispatcher_admit_ok(d, r, now)) {
			wait = dispatcher_admit_wait(d, r, now);
			if (!run_in_time(d, r, wait, wall)) {
				dispatcher_run_unqueue(&d->d_runs, r);
				run_refuse(d, r, wait,
				           "cannot start before its deadline");
				dispatcher_run_remove(&d->d_runs, r);
				free(r);
			} else if (wait > 0)
				dispatcher_admit_wake(d, wait);
			continue; /* another bot's run may go */
		}
		if (!run_in_time(d, r, 0, wall)) {
			dispatcher_run_unqueue(&d->d_runs, r);
			run_refuse(d, r, 1000, "waited until its deadline");
			dispatcher_run_remove(&d->d_runs, r);
			free(r);
			continue;
		}
		if (dispatcher_run_pick(d->d_child, d->d_max, d->d_per_child,
		                        now) == -1)
			return (-1);
		dispatcher_run_unqueue(&d->d_runs, r);
		/* The bytes decoded once already (CHAT_RUN); a failure here
		 * is our bug, but the client still deserves an answer. */
		if (chat_request_decode(r->r_body.p, r->r_body.n, &req) ==
		    -1) {
			log_req(LOG_L_ERR, r->r_reqid, r->r_trace, MSTR_NULL,
			        "%s: queued run does not decode", __func__);
			dispatcher_run_remove(&d->d_runs, r);
			run_fail(d, r, 500, 5000, "internal error", 0);
			free(r);
			continue;
		}
		if (run_assign(d, r, &req) == -1) {
			size_t *qn;
			struct run_list *rq =
			        dispatcher_admit_queue(d, r, &qn);

			dispatcher_run_enqueue_on(&d->d_runs, r, rq, qn, 1);
			if ((r->r_qk = dispatcher_admit_keyq(d, r)) != NULL)
				(*r->r_qk)++;
			return (-1);
		}
	}
	return (0);
}

void
dispatcher_run_drain(struct dispatcher *d)
{
	struct runtab *rt = &d->d_runs;
	uint64_t wall = now_wall_ms(), now = loop_now(d->d_loop);
	struct run_list *q;
	size_t *qn;
	int full = 0;

	for (int i = 0; rt->rt_qlen > 0 &&
	                (q = dispatcher_admit_queue_at(d, i, &qn)) != NULL;
	     i++)
		if (!TAILQ_EMPTY(q) &&
		    run_drain_queue(d, q, now, wall) == -1) {
			full = 1;
			break;
		}
	if (full)
		dispatcher_scale_full(d);
	dispatcher_scale_refresh(d, 0);
}

void
dispatcher_run_child_gone(struct dispatcher *d, struct child *c)
{
	uint32_t n = c->c_inflight;
	struct run *r;

	while ((r = TAILQ_FIRST(&c->c_runs)) != NULL) {
		log_req(LOG_L_DEBUG, r->r_reqid, r->r_trace, MSTR_NULL,
		        "%s: %s exited under this run: 502", __func__,
		        c->c_name);
		run_count(d->m_rej_exited);
		run_fail(d, r, 502, 5000, "worker exited mid-run", 0);
		run_finish(d, r);
	}
	if (n > 0)
		log_warnx("%s: %s exited with %u runs in flight: answered 502",
		          __func__, c->c_name, n);
}

void
dispatcher_run_flush_queue(struct dispatcher *d)
{
	struct run_list *q;
	struct run *r;
	size_t *qn;

	for (int i = 0; (q = dispatcher_admit_queue_at(d, i, &qn)) != NULL;
	     i++)
		while ((r = TAILQ_FIRST(q)) != NULL) {
			run_count(d->m_rej_stopping);
			run_drop_queued(d, r, 503, DISPATCHER_CODE_STOPPING,
			                "shutting down", 1);
		}
	dispatcher_scale_refresh(d, 0);
}

void
dispatcher_run_expire(struct dispatcher *d)
{
	uint64_t wall = now_wall_ms();
	struct run *r, *next;
	struct run_list *q;
	size_t *qn;
	int changed = 0;

	/* Queued runs are refused (503, Retry-After) while they still have
	 * queue_slack_ms: a client never waits for a timeout in a queue. */
	for (int i = 0; (q = dispatcher_admit_queue_at(d, i, &qn)) != NULL;
	     i++)
		for (r = TAILQ_FIRST(q); r != NULL; r = next) {
			next = TAILQ_NEXT(r, r_link);
			if (run_in_time(d, r, 0, wall))
				continue;
			dispatcher_run_unqueue(&d->d_runs, r);
			run_refuse(d, r, 1000, "waited until its deadline");
			dispatcher_run_remove(&d->d_runs, r);
			free(r);
			changed = 1;
		}
	/* A RUN_DONE can only go missing through a bug in a worker, but
	 * a run that never ends would hold a place in its child for good. */
	for (int k = 0; k < DISPATCHER_SLOTS_MAX; k++) {
		struct child *c = &d->d_child[k];

		for (r = TAILQ_FIRST(&c->c_runs); r != NULL; r = next) {
			next = TAILQ_NEXT(r, r_link);
			if (r->r_deadline_ms == 0 ||
			    r->r_deadline_ms + DISPATCHER_STALE_MS > wall)
				continue;
			run_count(d->m_drop_stale);
			log_req(LOG_L_WARN, r->r_reqid, r->r_trace, MSTR_NULL,
			        "%s: %s sent no RUN_DONE %d s after the "
			        "deadline: "
			        "forgotten",
			        __func__, c->c_name,
			        DISPATCHER_STALE_MS / 1000);
			run_finish(d, r);
			changed = 1;
		}
	}
	if (changed)
		dispatcher_run_drain(d);
}
