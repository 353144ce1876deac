/* SPDX-License-Identifier: ISC */
/*
 * worker_run: one chat from RUN_ASSIGN to RUN_DONE.
 *
 *   RUN_ASSIGN (dispatcher; reply_to = the edge waiting for the answer)
 *     -> CTX_GET to storage (reply_to = this worker)
 *   CTX_REPLY  -> POST <upstream>/v1/chat/completions (worker_upstream.c)
 *   answer     -> CHAT_PERSIST to storage (reply_to = the edge: storage
 *                 answers it after COMMIT), or CHAT_REPLY with the error
 *   always     -> RUN_DONE to the dispatcher, the run is freed.
 *
 * Runs are found by request id in a chained hash table; a RUN_ASSIGN for a
 * request id already running is a resend and is ignored, a CTX_REPLY for
 * none is late or a resend and is counted.  Each run holds one allocation
 * with its strings, a deadline timer (storage might never answer, a call
 * might wait for a connection; past the deadline the edge has given up
 * anyway) and, while the upstream is called, one upstream call.  Nothing here
 * blocks; per-run failures are logged at debug level (the metrics count them),
 * systemic ones (a full backlog) warn at most once a second.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

struct run {
	struct run *hnext; /* hash chain */
	struct worker *w;
	struct loop_timer *timer;   /* the deadline */
	struct upstream_call *call; /* while the upstream is called */
	char *url;                  /* the upstream called, after CTX_REPLY */
	struct msg_head head; /* reqid, trace, deadline; reply_to: edge */
	uint64_t context_turns;
	uint64_t upstream_us;
	long upstream_status;
	uint32_t hash;
	struct mstr bot_id, user_id, query, conv_id;
	char strs[]; /* the strings above, NUL-terminated */
};

static uint32_t
run_hash(struct mstr s)
{
	uint32_t h = 2166136261u;

	for (uint32_t i = 0; i < s.n; i++) {
		h ^= (unsigned char)s.p[i];
		h *= 16777619u;
	}
	return (h);
}

static struct run *
run_find(struct worker *w, struct mstr reqid)
{
	uint32_t h = run_hash(reqid);
	struct run *r;

	if (w->nbuckets == 0)
		return (NULL); /* torn down: stopping */
	for (r = w->buckets[h & (w->nbuckets - 1)]; r != NULL; r = r->hnext)
		if (r->hash == h && r->head.reqid.n == reqid.n &&
		    memcmp(r->head.reqid.p, reqid.p, reqid.n) == 0)
			return (r);
	return (NULL);
}

static void
run_table_grow(struct worker *w)
{
	size_t n = w->nbuckets * 2;
	struct run **b, *r, *next;

	if ((b = calloc(n, sizeof(*b))) == NULL)
		return; /* longer chains, still correct */
	for (size_t i = 0; i < w->nbuckets; i++)
		for (r = w->buckets[i]; r != NULL; r = next) {
			next = r->hnext;
			r->hnext = b[r->hash & (n - 1)];
			b[r->hash & (n - 1)] = r;
		}
	free(w->buckets);
	w->buckets = b;
	w->nbuckets = n;
}

static void
run_insert(struct worker *w, struct run *r)
{
	struct run **b;

	if (w->nruns >= w->nbuckets)
		run_table_grow(w);
	b = &w->buckets[r->hash & (w->nbuckets - 1)];
	r->hnext = *b;
	*b = r;
	w->nruns++;
}

static void
run_remove(struct worker *w, struct run *r)
{
	struct run **p = &w->buckets[r->hash & (w->nbuckets - 1)];

	for (; *p != NULL; p = &(*p)->hnext)
		if (*p == r) {
			*p = r->hnext;
			w->nruns--;
			return;
		}
}

static void
run_free(struct run *r)
{
	if (r->call != NULL)
		worker_upstream_cancel(r->call);
	if (r->timer != NULL)
		loop_timer_free(r->timer);
	free(r->url);
	free(r);
}

int
worker_run_init(struct worker *w)
{
	w->nbuckets = 64;
	if ((w->buckets = calloc(w->nbuckets, sizeof(*w->buckets))) == NULL)
		return (-1);
	return (0);
}

void
worker_run_free_all(struct worker *w)
{
	struct run *r, *next;

	for (size_t i = 0; i < w->nbuckets; i++)
		for (r = w->buckets[i]; r != NULL; r = next) {
			next = r->hnext;
			run_free(r);
		}
	free(w->buckets);
	w->buckets = NULL;
	w->nbuckets = w->nruns = 0;
}

/* Copy an mailbox name out of a message; -1 if empty or too long. */
static int
peer_name(struct mstr s, char out[WORKER_PEER_MAX])
{
	if (s.n == 0 || s.n >= WORKER_PEER_MAX ||
	    memchr(s.p, '\0', s.n) != NULL)
		return (-1);
	memcpy(out, s.p, s.n);
	out[s.n] = '\0';
	return (0);
}

static void
warn_refused(struct worker *w, const char *peer, struct mstr reqid)
{
	if (w->m_send_refused != NULL)
		(*w->m_send_refused)++;
	if (worker_warn_ok(w))
		log_warnx("send to %s refused (backlog full), request %.*s",
		          peer, (int)reqid.n, reqid.p);
}

/* CHAT_REPLY with an error to the edge named edge. */
static void
send_error(struct worker *w, const char *edge, const struct msg_head *h,
           uint64_t status, int64_t code, struct mstr msg,
           uint64_t retry_after)
{
	struct msg_head rh = *h;
	struct chat_reply b = {.status = status,
	                       .code = code,
	                       .msg = msg,
	                       .data = MSTR_NULL,
	                       .retry_after = retry_after};

	rh.reply_to = MSTR_NULL;
	log_req(LOG_L_DEBUG, h->reqid, h->traceparent, MSTR_NULL,
	        "answer %" PRIu64 " code %" PRId64 ": %.*s", status, code,
	        (int)msg.n, msg.p);
	if (msg_send_chat_reply(w->svc.ipc, edge, &rh, &b) == -1)
		warn_refused(w, edge, h->reqid);
}

/* RUN_DONE to the dispatcher: the slot of this run is free again. */
static void
send_done(struct worker *w, struct mstr reqid, struct mstr traceparent,
          uint64_t status, const char *url, long upstream_status,
          uint64_t upstream_us)
{
	struct msg_head h = {.reqid = reqid,
	                     .traceparent = traceparent,
	                     .deadline_ms = 0,
	                     .reply_to = MSTR_NULL};
	struct run_done b = {
	        .status = status,
	        .upstream = url ? MSTR(url) : MSTR_NULL,
	        .upstream_status =
	                upstream_status > 0 ? (uint64_t)upstream_status : 0,
	        .upstream_us = upstream_us};

	worker_count_status(w, status);
	if (msg_send_run_done(w->svc.ipc, "dispatcher", &h, &b) == -1)
		warn_refused(w, "dispatcher", reqid);
}

/* The end of every run that started. */
static void
run_end(struct run *r, uint64_t status)
{
	struct worker *w = r->w;

	send_done(w, r->head.reqid, r->head.traceparent, status, r->url,
	          r->upstream_status, r->upstream_us);
	run_remove(w, r);
	run_free(r);
	worker_stop_check(w);
}

static void
run_fail(struct run *r, uint64_t status, int64_t code, struct mstr msg,
         uint64_t retry_after)
{
	/* reply_to of the head is the edge, NUL-terminated in strs. */
	send_error(r->w, r->head.reply_to.p, &r->head, status, code, msg,
	           retry_after);
	run_end(r, status);
}

/* Answer a RUN_ASSIGN that never became a run. */
static void
reject(struct worker *w, const struct msg *m, uint64_t status, int64_t code,
       const char *msg, uint64_t retry_after)
{
	struct msg_head h = msg_head_reply(m, NULL);
	char edge[WORKER_PEER_MAX];

	if (peer_name(m->reply_to, edge) == 0)
		send_error(w, edge, &h, status, code, MSTR(msg), retry_after);
	send_done(w, m->reqid, m->traceparent, status, NULL, 0, 0);
}

void
worker_run_reject(struct worker *w, const struct msg *m)
{
	reject(w, m, 500, 5000, "internal error", 0);
}

/* The deadline passed: storage has not answered, or the upstream call
 * is still waiting for a connection (or curl's own timeout, set to the
 * same instant, has not fired yet). */
static void
run_expired(struct loop *l, void *arg)
{
	struct run *r = arg;

	(void)l;
	if (r->call != NULL)
		run_fail(r, 504, 5040, MSTR_LIT("upstream deadline exceeded"),
		         0);
	else
		run_fail(r, 504, 5040, MSTR_LIT("deadline exceeded"), 0);
}

static char *
put_str(char *p, struct mstr *dst, struct mstr src)
{
	memcpy(p, src.p, src.n);
	p[src.n] = '\0';
	dst->p = p;
	dst->n = src.n;
	return (p + src.n + 1);
}

static struct run *
run_new(struct worker *w, const struct msg *m, const struct chat_request *q,
        uint64_t deadline_ms, const char *conv)
{
	struct mstr conv_id = conv ? MSTR(conv) : q->history_id;
	size_t len = m->reqid.n + m->traceparent.n + m->reply_to.n +
	             q->bot_id.n + q->user_id.n + q->query.n + conv_id.n + 7;
	struct run *r;
	char *p;

	if ((r = calloc(1, sizeof(*r) + len)) == NULL)
		return (NULL);
	r->w = w;
	p = r->strs;
	p = put_str(p, &r->head.reqid, m->reqid);
	p = put_str(p, &r->head.traceparent, m->traceparent);
	p = put_str(p, &r->head.reply_to, m->reply_to);
	p = put_str(p, &r->bot_id, q->bot_id);
	p = put_str(p, &r->user_id, q->user_id);
	p = put_str(p, &r->query, q->query);
	(void)put_str(p, &r->conv_id, conv_id);
	r->head.deadline_ms = deadline_ms;
	r->hash = run_hash(r->head.reqid);
	if ((r->timer = loop_timer_new(w->svc.loop, run_expired, r)) == NULL) {
		free(r);
		return (NULL);
	}
	return (r);
}

void
worker_run_assign(struct worker *w, const struct msg *m,
                  const struct chat_request *q)
{
	char conv[WORKER_CONV_ID_LEN + 1], edge[WORKER_PEER_MAX];
	struct ctx_get cg = {0};
	struct msg_head h;
	uint64_t now = now_wall_ms(), deadline;
	struct run *r;

	if (m->reqid.n == 0 || peer_name(m->reply_to, edge) == -1) {
		if (w->m_bad_msg != NULL)
			(*w->m_bad_msg)++;
		log_warnx("%s: RUN_ASSIGN without request id or reply_to",
		          __func__);
		reject(w, m, 500, 5000, "internal error", 0);
		return;
	}
	if (run_find(w, m->reqid) != NULL) {
		if (w->m_dup_assign != NULL)
			(*w->m_dup_assign)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, q->bot_id,
		        "duplicate RUN_ASSIGN ignored");
		return;
	}
	if (w->stopping) {
		reject(w, m, 503, 5030, "worker stopping", 1);
		return;
	}
	deadline = m->deadline_ms != 0 ? m->deadline_ms
	                               : now + (uint64_t)w->run_timeout_ms;
	if (deadline <= now) {
		reject(w, m, 504, 5040, "deadline exceeded", 0);
		return;
	}
	if (q->history_id.n == 0 && worker_run_conv_id(conv) == -1) {
		log_warn("%s: no random conversation id", __func__);
		reject(w, m, 500, 5000, "internal error", 0);
		return;
	}
	if ((r = run_new(w, m, q, deadline,
	                 q->history_id.n == 0 ? conv : NULL)) == NULL) {
		log_warn("%s: run", __func__);
		reject(w, m, 500, 5000, "internal error", 0);
		return;
	}
	run_insert(w, r);
	worker_note_edge(w, edge);
	/* The deadline is wall clock; the timer counts from now. */
	loop_timer_set(r->timer, (int64_t)(deadline - now));

	h = r->head;
	h.reply_to = MSTR(w->svc.name);
	cg.bot_id = r->bot_id;
	cg.conversation_id = r->conv_id;
	if (msg_send_ctx_get(w->svc.ipc, "storage", &h, &cg) == -1) {
		warn_refused(w, "storage", r->head.reqid);
		run_fail(r, 503, 5030, MSTR_LIT("storage unavailable"), 1);
	}
}

static void run_upstream_done(void *, struct upstream_answer *);

void
worker_run_ctx(struct worker *w, const struct msg *m,
               const struct ctx_reply *c)
{
	struct buf url = {0}, body = {0};
	uint64_t now;
	struct run *r;

	if ((r = run_find(w, m->reqid)) == NULL || r->url != NULL) {
		/* Late (the run ended) or sent twice. */
		if (w->m_unknown_ctx != NULL)
			(*w->m_unknown_ctx)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, MSTR_NULL,
		        "CTX_REPLY for no waiting run ignored");
		return;
	}
	if (c == NULL) {
		run_fail(r, 500, 5000, MSTR_LIT("internal error"), 0);
		return;
	}
	if (c->status != 200) {
		run_fail(r, c->status, c->code, c->msg,
		         c->status == 503 || c->status == 429 ? 1 : 0);
		return;
	}
	r->context_turns = c->context_turns;
	if (worker_upstream_url(&url, c->upstream) == -1) {
		buf_free(&url);
		if (worker_warn_ok(w))
			log_req(LOG_L_WARN, r->head.reqid, r->head.traceparent,
			        r->bot_id,
			        "bot upstream \"%.*s\" is not an http(s) URL",
			        (int)(c->upstream.n > 200 ? 200
			                                  : c->upstream.n),
			        c->upstream.p);
		run_fail(r, 502, 5020, MSTR_LIT("bot upstream not usable"), 0);
		return;
	}
	r->url = url.b;
	now = now_wall_ms();
	if (r->head.deadline_ms <= now) {
		run_fail(r, 504, 5040, MSTR_LIT("deadline exceeded"), 0);
		return;
	}
	if (worker_upstream_request(&body, c->model, c->system_prompt,
	                            c->context, r->query) == -1 ||
	    (r->call = worker_upstream_start(
	             w->up, r->url, &body, r->head.traceparent,
	             (int64_t)(r->head.deadline_ms - now), run_upstream_done,
	             r)) == NULL) {
		buf_free(&body);
		log_warnx("%s: cannot start the upstream call", __func__);
		run_fail(r, 500, 5000, MSTR_LIT("internal error"), 0);
		return;
	}
}

static void
run_upstream_done(void *arg, struct upstream_answer *a)
{
	struct run *r = arg;
	struct worker *w = r->w;
	char chat_id[WORKER_CHAT_ID_LEN + 1];
	struct chat_persist p = {0};
	struct buf data = {0};

	r->call = NULL;
	r->upstream_status = a->http_status;
	r->upstream_us = a->elapsed_us;
	if (w->m_upstream != NULL)
		histo_observe(w->m_upstream, (double)a->elapsed_us / 1e6);
	if (a->status != 200) {
		log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent,
		        r->bot_id, "upstream %s: %s", r->url, a->msg);
		run_fail(r, a->status, a->code, MSTR(a->msg), a->retry_after);
		return;
	}
	/* The id follows from the request id, so a run executed twice (a
	 * RUN_ASSIGN or CHAT_REQUEST sent again after a process died before
	 * acknowledging it) stores one row: storage keeps the first. */
	if (r->head.reqid.n > 0)
		worker_run_chat_id_of(r->head.reqid, chat_id);
	else
		worker_run_chat_id(&w->idgen, now_wall_ms(), w->slot, chat_id);
	if (worker_run_reply_json(&data, chat_id, r->conv_id, r->bot_id,
	                          a->content, a->content_len, a->prompt_tokens,
	                          a->completion_tokens) == -1) {
		free(a->content);
		buf_free(&data);
		run_fail(r, 500, 5000, MSTR_LIT("internal error"), 0);
		return;
	}
	p.chat_id = MSTR(chat_id);
	p.conversation_id = r->conv_id;
	p.bot_id = r->bot_id;
	p.user_id = r->user_id;
	p.query = r->query;
	p.answer = (struct mstr){a->content, (uint32_t)a->content_len};
	p.prompt_tokens = a->prompt_tokens;
	p.completion_tokens = a->completion_tokens;
	p.context_turns = r->context_turns;
	p.reply = (struct mstr){data.b, (uint32_t)data.len};
	/* reply_to = the edge: storage answers it after COMMIT. */
	if (msg_send_chat_persist(w->svc.ipc, "storage", &r->head, &p) == -1) {
		free(a->content);
		buf_free(&data);
		warn_refused(w, "storage", r->head.reqid);
		run_fail(r, 503, 5030, MSTR_LIT("storage unavailable"), 1);
		return;
	}
	free(a->content);
	buf_free(&data);
	run_end(r, 200);
}

void
worker_run_chat_id(struct chat_idgen *g, uint64_t now_ms, unsigned slot,
                   char out[WORKER_CHAT_ID_LEN + 1])
{
	if (now_ms < g->last_ms)
		now_ms = g->last_ms; /* the clock stepped back */
	if (now_ms == g->last_ms) {
		if (++g->seq >= 1000) {
			/* A thousand ids in one ms: borrow the next. */
			now_ms++;
			g->seq = 0;
		}
	} else
		g->seq = 0;
	g->last_ms = now_ms;
	(void)snprintf(out, WORKER_CHAT_ID_LEN + 1, "%013" PRIu64 "%03u%03u",
	               now_ms % UINT64_C(10000000000000), slot % 1000, g->seq);
}

void
worker_run_chat_id_of(struct mstr reqid, char out[WORKER_CHAT_ID_LEN + 1])
{
	uint64_t h = 0xcbf29ce484222325u;

	for (uint32_t i = 0; i < reqid.n; i++)
		h = (h ^ (unsigned char)reqid.p[i]) * 0x100000001b3u;
	/* splitmix64's finaliser spreads FNV's weak low bits */
	h ^= h >> 30;
	h *= 0xbf58476d1ce4e5b9u;
	h ^= h >> 27;
	h *= 0x94d049bb133111ebu;
	h ^= h >> 31;
	(void)snprintf(out, WORKER_CHAT_ID_LEN + 1, "%" PRIu64,
	               UINT64_C(1000000000000000000) +
	                   h % UINT64_C(9000000000000000000));
}

int
worker_run_conv_id(char out[WORKER_CONV_ID_LEN + 1])
{
	/* getrandom(2) once per 256 ids, not once per run. */
	static unsigned char pool[4096];
	static size_t left;
	const unsigned char *rnd;

	if (left < 16) {
		if (random_bytes(pool, sizeof(pool)) == -1)
			return (-1);
		left = sizeof(pool);
	}
	rnd = pool + sizeof(pool) - left;
	left -= 16;
	memcpy(out, "conv_", 5);
	hex_encode(out + 5, rnd, 16);
	out[WORKER_CONV_ID_LEN] = '\0';
	return (0);
}

int
worker_run_reply_json(struct buf *b, const char *chat_id,
                      struct mstr conversation_id, struct mstr bot_id,
                      const char *answer, size_t answer_len,
                      uint64_t prompt_tokens, uint64_t completion_tokens)
{
	if (buf_reserve(b, 160 + conversation_id.n + bot_id.n + answer_len +
	                           answer_len / 8) == -1)
		return (-1);
	if (buf_adds(b, "{\"chat_id\":") == -1 ||
	    buf_add_json_str(b, chat_id, strlen(chat_id)) == -1 ||
	    buf_adds(b, ",\"conversation_id\":") == -1 ||
	    buf_add_json_str(b, conversation_id.p, conversation_id.n) == -1 ||
	    buf_adds(b, ",\"bot_id\":") == -1 ||
	    buf_add_json_str(b, bot_id.p, bot_id.n) == -1 ||
	    buf_adds(b, ",\"answer\":") == -1 ||
	    buf_add_json_str(b, answer, answer_len) == -1)
		return (-1);
	return (buf_addf(b,
	                 ",\"usage\":{\"prompt_tokens\":%" PRIu64
	                 ",\"completion_tokens\":%" PRIu64
	                 ",\"total_tokens\":%" PRIu64 "}}",
	                 prompt_tokens, completion_tokens,
	                 prompt_tokens + completion_tokens));
}
