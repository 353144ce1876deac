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
 * A v3.chat run (Coze's /v3/chat) takes the conversation's lock with its
 * CTX_GET; from storage's 200 on it tells the client (CHAT_EVENT created
 * and in_progress, or CHAT_REPLY with the chat), streams the upstream's
 * answer as message.delta events, and always ends with a CHAT_PERSIST of
 * its final status (completed, failed, canceled) that carries the last
 * events for storage to send after COMMIT.  RUN_CANCEL aborts it.  With
 * the bot's plugins offered as tools, the model may ask for tool calls:
 * each round's calls run at once as plugin POSTs on the same curl multi
 * handle, their results go back to the model, at most max_tool_rounds
 * times; every function_call and tool_response is streamed and stored.
 *
 * A webhook.execute run (POST /api/v1/execute) sends CTX_GET with the
 * caller's nonce (storage refuses a replay with 409), calls the one
 * plugin named in query with the arguments in messages, and answers the
 * edge with a raw CHAT_REPLY: the whole {"status","message","data"} body.
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
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "coze.h"
#include "worker.h"
#include "worker_plugin.h"
#include "trace.h"

#define WORKER_LOCK_SLACK_MS 5000 /* a v3 lock outlives the deadline */
#define WORKER_TOOL_ROUNDS 5      /* max_tool_rounds when unset */
#define WORKER_PLUGIN_MS 5000     /* plugin_timeout_ms when unset */

struct run;

/* One tool call of a round: the model's call, then its plugin call (if
 * one is made) and its result (a JSON text). */
struct tool_call {
	struct run *r;
	struct upstream_call *call; /* while the plugin is called */
	char *id, *name, *args;     /* as the model sent them */
	char *result;
	size_t result_len;
	int done;
};

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
	struct rl_signal sig; /* the strongest of the run's answers */
	uint32_t hash;
	struct mstr bot_id, user_id, query, conv_id;
	/* v3.chat */
	int v3;
	int stream;      /* answer as SSE (CHAT_EVENT) */
	int announced;   /* CTX_REPLY 200 came: the chat exists */
	int canceled;    /* RUN_CANCEL came before CTX_REPLY */
	int got_content; /* the upstream's first content came */
	uint64_t
	        start_ns; /* monotonic: CHAT_RUN taken (time to first token) */
	struct loop_timer *first_timer; /* time to the first content */
	uint64_t end_ms;     /* wall: the upstream's answer by then */
	uint64_t created_at; /* unix s */
	uint64_t answer_at;  /* unix s, the answer's first content */
	size_t sent;         /* answer bytes sent as message.delta */
	unsigned nmsgs;      /* request messages */
	unsigned nidx;       /* the next message's index (the answer's) */
	/* Tool calls (v3 with plugins). */
	struct plugins plugins;
	struct buf reqhead; /* the upstream request up to its messages */
	struct buf extra;   /* the rounds' assistant and tool messages */
	struct buf done;    /* message objects after the request's */
	struct buf pending; /* events the edge refused, sent with the next */
	struct tool_call *tcs; /* the round's calls, while they run */
	size_t ntcs, tcs_left;
	unsigned rounds; /* tool rounds run */
	uint64_t ptok, ctok;
	struct mstr chat_id, messages;
	struct mstr tracestate; /* the client's, sent on with traceparent */
	/* webhook.execute: query names the plugin, messages holds the
	 * arguments; the answer is a raw CHAT_REPLY. */
	int wh;
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
tools_free(struct run *r)
{
	for (size_t i = 0; i < r->ntcs; i++) {
		struct tool_call *tc = &r->tcs[i];

		if (tc->call != NULL)
			worker_upstream_cancel(tc->call);
		free(tc->id);
		free(tc->name);
		free(tc->args);
		free(tc->result);
	}
	free(r->tcs);
	r->tcs = NULL;
	r->ntcs = r->tcs_left = 0;
}

static void
run_free(struct run *r)
{
	if (r->call != NULL)
		worker_upstream_cancel(r->call);
	tools_free(r);
	worker_plugin_free(&r->plugins);
	buf_free(&r->reqhead);
	buf_free(&r->extra);
	buf_free(&r->done);
	buf_free(&r->pending);
	if (r->timer != NULL)
		loop_timer_free(r->timer);
	if (r->first_timer != NULL)
		loop_timer_free(r->first_timer);
	free(r->url);
	free(r);
}

/* Per-run series of this worker's registry, created by worker_run_init()
 * so they are on the page before the first run (NULL-safe). */
static struct histo *m_ttft;
static uint64_t *m_rate_429, *m_rate_503;

static void
run_metrics_init(struct worker *w)
{
	static const char rl[] = "troupe_upstream_rate_limit_signals_total";
	static const char rl_h[] = "Upstream answers that asked us to slow "
	                           "down, by kind (HTTP 429 or 503)";
	char lb[WORKER_PEER_MAX + 48];

	(void)snprintf(lb, sizeof(lb), "service=\"%s\"", w->svc.name);
	m_ttft = metrics_histo(
	        w->metrics, "troupe_time_to_first_token_seconds",
	        "Time from a run's start (CHAT_RUN taken) to the upstream's "
	        "first content or tool call (v3 chats)",
	        lb);
	(void)snprintf(lb, sizeof(lb), "service=\"%s\",kind=\"upstream_429\"",
	               w->svc.name);
	m_rate_429 = metrics_counter(w->metrics, rl, rl_h, lb);
	(void)snprintf(lb, sizeof(lb), "service=\"%s\",kind=\"upstream_503\"",
	               w->svc.name);
	m_rate_503 = metrics_counter(w->metrics, rl, rl_h, lb);
}

/* An upstream's 429 or 503 counts as a rate-limit signal. */
static void
run_count_rate_limit(long http_status)
{
	if (http_status == 429 && m_rate_429 != NULL)
		++*m_rate_429;
	else if (http_status == 503 && m_rate_503 != NULL)
		++*m_rate_503;
}

int
worker_run_init(struct worker *w)
{
	run_metrics_init(w);
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

/* RUN_DONE to the dispatcher: the slot of this run is free again.
 * Status 0: nobody was answered, the dispatcher runs it again later or
 * answers 503 itself (a throttled v1 run).  sig: the run's signals (NULL:
 * none); backoff_ms: a pause asked for besides them. */
static void
send_done(struct worker *w, struct mstr reqid, struct mstr traceparent,
          uint64_t status, const char *url, long upstream_status,
          uint64_t upstream_us, struct mstr bot_id,
          const struct rl_signal *sig, uint64_t backoff_ms)
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
	        .upstream_us = upstream_us,
	        .bot_id = bot_id,
	        .rl_remaining = -1,
	        .rl_limit = -1,
	        .rl_reset_ms = -1};

	if (sig != NULL && sig->seen != 0) {
		int64_t bo = rl_signal_backoff_ms(sig);

		b.rl_seen = sig->seen;
		b.throttled = sig->throttled != 0;
		if (bo <= 0 && sig->throttled)
			bo = WORKER_PAUSE_DEFAULT_MS;
		b.backoff_ms = bo > 0 ? (uint64_t)bo : 0;
		b.rl_remaining = sig->remaining;
		b.rl_limit = sig->limit;
		b.rl_reset_ms = sig->reset_ms;
	}
	if (backoff_ms > b.backoff_ms)
		b.backoff_ms = backoff_ms;
	if (status != 0)
		worker_count_status(w, status);
	if (msg_send_run_done(w->svc.ipc, "dispatcher", &h, &b) == -1)
		warn_refused(w, "dispatcher", reqid);
}

/* The worker's span of run r (its id is in r's traceparent). */
static void
run_span(const struct run *r, uint64_t status, const char *note)
{
	struct trace_span ts;

	if (!trace_enabled)
		return;
	ts = (struct trace_span){.name = "worker",
	                         .kind = TRACE_INTERNAL,
	                         .start_ns = trace_wall_of_mono(r->start_ns),
	                         .http_status = (int)status,
	                         .error = status >= 500,
	                         .bot_id = r->bot_id,
	                         .url = r->url ? MSTR(r->url) : MSTR_NULL,
	                         .note = note ? MSTR(note) : MSTR_NULL};
	trace_end_derived(r->head.traceparent, 0, &ts);
}

/* The end of every run that started. */
static void
run_end(struct run *r, uint64_t status)
{
	struct worker *w = r->w;

	run_span(r, status, NULL);
	/* A webhook's url is a plugin's, not the bot's upstream: no bot,
	 * so the dispatcher learns no mapping from it. */
	send_done(w, r->head.reqid, r->head.traceparent, status, r->url,
	          r->upstream_status, r->upstream_us,
	          r->wh ? MSTR_NULL : r->bot_id, &r->sig, 0);
	run_remove(w, r);
	run_free(r);
	worker_stop_check(w);
}

/* A v1 run the upstream throttled (or that this worker holds back):
 * answer nobody, hand it back to the dispatcher (RUN_DONE status 0),
 * which runs it again after the pause or answers 503 + Retry-After. */
static void
run_handback(struct run *r, uint64_t backoff_ms)
{
	struct worker *w = r->w;

	log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent, r->bot_id,
	        "upstream %s throttled: run handed back (pause %" PRIu64
	        " ms)",
	        r->url ? r->url : "?", backoff_ms);
	run_span(r, r->upstream_status > 0 ? (uint64_t)r->upstream_status : 0,
	         "throttled: handed back to the dispatcher");
	send_done(w, r->head.reqid, r->head.traceparent, 0, r->url,
	          r->upstream_status, r->upstream_us, r->bot_id, &r->sig,
	          backoff_ms);
	run_remove(w, r);
	run_free(r);
	worker_stop_check(w);
}

static int
sig_rank(const struct rl_signal *s)
{
	if (s->throttled)
		return (3);
	if (s->remaining == 0)
		return (2);
	if (s->remaining > 0 || (s->seen & RL_SEEN_TIMEOUT))
		return (1);
	return (0);
}

void
worker_run_signal_merge(struct rl_signal *acc, const struct rl_signal *s)
{
	unsigned seen = acc->seen | s->seen;
	int ra = sig_rank(acc), rs = sig_rank(s);

	if (acc->seen == 0 || rs > ra) {
		*acc = *s;
	} else if (rs == ra) {
		if (s->retry_after_ms > acc->retry_after_ms)
			acc->retry_after_ms = s->retry_after_ms;
		if (s->remaining >= 0 &&
		    (acc->remaining < 0 || s->remaining < acc->remaining)) {
			acc->remaining = s->remaining;
			acc->limit = s->limit;
			acc->window_ms = s->window_ms;
		}
		if (s->reset_ms > acc->reset_ms)
			acc->reset_ms = s->reset_ms;
		for (int i = 0; i < RL_Q_MAX; i++)
			if (s->q[i].remaining == 0 &&
			    s->q[i].reset_ms > acc->q[i].reset_ms)
				acc->q[i] = s->q[i];
	}
	acc->seen = seen;
}

static int
pause_key(char out[WORKER_PAUSE_KEY], const char *url, struct mstr bot)
{
	int n = snprintf(out, WORKER_PAUSE_KEY, "%s %.*s", url, (int)bot.n,
	                 bot.p);

	return (n < 0 || n >= WORKER_PAUSE_KEY ? -1 : 0);
}

void
worker_run_pause_set(struct worker *w, const char *url, struct mstr bot,
                     uint64_t until)
{
	char key[WORKER_PAUSE_KEY];
	struct worker_pause *p, *victim = &w->pauses[0];

	if (url == NULL || pause_key(key, url, bot) == -1)
		return;
	for (size_t i = 0; i < WORKER_PAUSES; i++) {
		p = &w->pauses[i];
		if (strcmp(p->key, key) == 0) {
			if (until > p->until)
				p->until = until;
			return;
		}
		if (p->until < victim->until)
			victim = p;
	}
	victim->until = until;
	memcpy(victim->key, key, sizeof(key));
}

uint64_t
worker_run_pause_left(const struct worker *w, const char *url, struct mstr bot,
                      uint64_t now)
{
	char key[WORKER_PAUSE_KEY];

	if (url == NULL || pause_key(key, url, bot) == -1)
		return (0);
	for (size_t i = 0; i < WORKER_PAUSES; i++)
		if (w->pauses[i].until > now &&
		    strcmp(w->pauses[i].key, key) == 0)
			return (w->pauses[i].until - now);
	return (0);
}

/* Note an upstream answer's signals on r, and hold the upstream back
 * for r's bot after a throttle. */
static void
run_note_signal(struct run *r, const struct upstream_answer *a)
{
	int64_t bo;

	if (a->sig.seen == 0)
		return;
	worker_run_signal_merge(&r->sig, &a->sig);
	if (!a->sig.throttled && a->sig.remaining != 0)
		return;
	bo = rl_signal_backoff_ms(&a->sig);
	if (bo <= 0 && a->sig.throttled)
		bo = WORKER_PAUSE_DEFAULT_MS;
	if (bo > 0)
		worker_run_pause_set(r->w, r->url, r->bot_id,
		                     now_mono_ms() + (uint64_t)bo);
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
	send_done(w, m->reqid, m->traceparent, status, NULL, 0, 0, MSTR_NULL,
	          NULL, 0);
}

void
worker_run_reject(struct worker *w, const struct msg *m)
{
	reject(w, m, 500, 5000, "internal error", 0);
}

static unsigned v3_messages(struct run *, struct buf *, uint64_t now_s);
static void v3_ctx(struct run *, const struct ctx_reply *);
static void v3_end(struct run *, const char *status, uint64_t http,
                   int64_t code, struct mstr msg, const char *content,
                   size_t len, uint64_t ptok, uint64_t ctok);
static void v3_fail(struct run *, uint64_t http, int64_t code,
                    struct mstr msg);
static void v3_tools(struct run *, struct upstream_answer *);

/* The deadline passed: storage has not answered, or the upstream call
 * is still waiting for a connection (or curl's own timeout, set to the
 * same instant, has not fired yet). */
static void
run_expired(struct loop *l, void *arg)
{
	struct run *r = arg;

	(void)l;
	if (r->announced && r->tcs != NULL)
		v3_fail(r, 504, 5040, MSTR_LIT("deadline exceeded"));
	else if (r->announced)
		v3_fail(r, 504, 5040, MSTR_LIT("upstream deadline exceeded"));
	else if (r->call != NULL)
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
        uint64_t deadline_ms, const char *conv, struct mstr chat_id,
        struct mstr messages)
{
	struct mstr conv_id = conv ? MSTR(conv) : q->history_id;
	size_t len = m->reqid.n + m->traceparent.n + m->reply_to.n +
	             q->bot_id.n + q->user_id.n + q->query.n + conv_id.n +
	             chat_id.n + messages.n + q->tracestate.n + 10;
	struct run *r;
	char *p;

	if ((r = calloc(1, sizeof(*r) + len)) == NULL)
		return (NULL);
	r->w = w;
	r->start_ns = now_mono_ns();
	p = r->strs;
	p = put_str(p, &r->head.reqid, m->reqid);
	p = put_str(p, &r->head.traceparent, m->traceparent);
	trace_enter(p - m->traceparent.n - 1, m->traceparent.n, "worker", 0);
	p = put_str(p, &r->head.reply_to, m->reply_to);
	p = put_str(p, &r->bot_id, q->bot_id);
	p = put_str(p, &r->user_id, q->user_id);
	p = put_str(p, &r->query, q->query);
	p = put_str(p, &r->conv_id, conv_id);
	p = put_str(p, &r->chat_id, chat_id);
	p = put_str(p, &r->messages, messages);
	(void)put_str(p, &r->tracestate, q->tracestate);
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
	char chat_id[COZE_ID_LEN + 1];
	struct mstr cid = MSTR_NULL, msgs = MSTR_NULL;
	struct ctx_get cg = {0};
	struct msg_head h;
	uint64_t now = now_wall_ms(), deadline;
	int v3 = mstr_eq(q->route, "v3.chat");
	int wh = mstr_eq(q->route, "webhook.execute");
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
	if (!wh && q->history_id.n == 0 &&
	    (v3 ? coze_conv_id_new(conv) : worker_run_conv_id(conv)) == -1) {
		log_warn("%s: no random conversation id", __func__);
		reject(w, m, 500, 5000, "internal error", 0);
		return;
	}
	if (v3) {
		/* The edge names the chat; the same rule if it did not. */
		if (coze_id_ok(q->chat_id))
			cid = q->chat_id;
		else {
			coze_chat_id_of(m->reqid, chat_id);
			cid = MSTR(chat_id);
		}
		msgs = q->messages;
	}
	if (wh)
		msgs = q->messages;
	if ((r = run_new(w, m, q, deadline,
	                 q->history_id.n == 0 && !wh ? conv : NULL, cid,
	                 msgs)) == NULL) {
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
	if (wh) {
		/* The bot and its plugins; storage refuses a nonce it has
		 * seen (409).  No conversation, no lock. */
		r->wh = 1;
		cg.conversation_id = MSTR_NULL;
		cg.nonce = q->nonce;
	}
	if (v3) {
		r->v3 = 1;
		r->stream = q->stream != 0;
		r->nmsgs = r->nidx = v3_messages(r, NULL, 0);
		cg.chat_id = r->chat_id;
		cg.user_id = r->user_id;
		/* The lock outlives the run a little: a run that dies holds
		 * it no longer than that. */
		cg.lock_ms = deadline - now + WORKER_LOCK_SLACK_MS;
	}
	if (msg_send_ctx_get(w->svc.ipc, "storage", &h, &cg) == -1) {
		warn_refused(w, "storage", r->head.reqid);
		run_fail(r, 503, 5030, MSTR_LIT("storage unavailable"), 1);
	}
}

static void run_upstream_done(void *, struct upstream_answer *);

/*
 * webhook.execute (POST /api/v1/execute): storage answered with the bot
 * and its plugins (having refused a replayed nonce); call the plugin the
 * caller named with its arguments, as a tool call in a run is made, and
 * answer the edge with the whole response body (raw):
 * {"status":N,"message":"...","data":<the plugin's JSON or null>}.
 */

/* CHAT_REPLY raw to the edge with that body, then RUN_DONE. */
static void
wh_reply(struct run *r, uint64_t status, int64_t code, const char *msg,
         const char *data, size_t datalen, uint64_t retry_after)
{
	struct worker *w = r->w;
	struct msg_head h = r->head;
	struct chat_reply rep = {0};
	struct buf b = {0};

	if (buf_addf(&b, "{\"status\":%" PRIu64 ",\"message\":", status) ==
	            -1 ||
	    buf_add_json_str(&b, msg, strlen(msg)) == -1 ||
	    buf_adds(&b, ",\"data\":") == -1 ||
	    (datalen > 0 ? buf_add(&b, data, datalen)
	                 : buf_adds(&b, "null")) == -1 ||
	    buf_adds(&b, "}") == -1) {
		buf_free(&b);
		log_warnx("%s: out of memory", __func__);
		run_fail(r, 500, 5000, MSTR_LIT("internal error"), 0);
		return;
	}
	rep.status = status;
	rep.code = code;
	rep.msg = MSTR(msg);
	rep.data = (struct mstr){b.b, (uint32_t)b.len};
	rep.retry_after = retry_after;
	rep.raw = 1;
	h.reply_to = MSTR_NULL;
	log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent, r->bot_id,
	        "webhook %s: %" PRIu64 " %s", r->query.p, status, msg);
	if (msg_send_chat_reply(w->svc.ipc, r->head.reply_to.p, &h, &rep) ==
	    -1)
		warn_refused(w, r->head.reply_to.p, r->head.reqid);
	buf_free(&b);
	run_end(r, status);
}

static void
wh_done(void *arg, struct upstream_answer *a)
{
	struct run *r = arg;
	struct worker *w = r->w;
	uint64_t status;
	char msg[256];

	r->call = NULL;
	r->upstream_status = a->http_status;
	r->upstream_us = a->elapsed_us;
	if (a->status == 200) {
		if (w->m_tool_ok != NULL)
			(*w->m_tool_ok)++;
		wh_reply(r, 200, 0, "ok", a->content, a->content_len, 0);
	} else {
		if (w->m_tool_err != NULL)
			(*w->m_tool_err)++;
		(void)snprintf(msg, sizeof(msg), "plugin %s %s", r->query.p,
		               a->msg);
		/* 504 timed out, 500 ours, else 502 (the plugin failed). */
		status =
		        a->status == 504 || a->status == 500 ? a->status : 502;
		wh_reply(r, status, a->code ? a->code : 5020, msg, NULL, 0, 0);
	}
	free(a->content);
}

static void
wh_ctx(struct run *r, const struct ctx_reply *c)
{
	struct worker *w = r->w;
	const struct plugin *pl;
	const char *lines[2];
	struct buf body = {0}, hdrs = {0};
	uint64_t now = now_wall_ms();
	int64_t left, timeout;
	size_t skipped = 0;
	char msg[200];
	int nh;

	if (c->status != 200) {
		(void)snprintf(msg, sizeof(msg), "%.*s", (int)c->msg.n,
		               c->msg.p);
		wh_reply(r, c->status, c->code, msg, NULL, 0,
		         c->status == 503 || c->status == 429 ? 1 : 0);
		return;
	}
	if (worker_plugin_parse(&r->plugins, c->plugins,
	                        w->plugin_timeout_ms ? w->plugin_timeout_ms
	                                             : WORKER_PLUGIN_MS,
	                        &skipped) == -1) {
		log_warnx("%s: out of memory", __func__);
		wh_reply(r, 500, 5000, "internal error", NULL, 0, 0);
		return;
	}
	pl = worker_plugin_find(&r->plugins, r->query.p, r->query.n);
	if (pl == NULL) {
		wh_reply(r, 404, 4004, "plugin not found", NULL, 0, 0);
		return;
	}
	if (!worker_plugin_args_ok(r->messages.p, r->messages.n)) {
		wh_reply(r, 400, 4000, "arguments must be a JSON object", NULL,
		         0, 0);
		return;
	}
	if (r->head.deadline_ms <= now) {
		wh_reply(r, 504, 5040, "deadline exceeded", NULL, 0, 0);
		return;
	}
	left = (int64_t)(r->head.deadline_ms - now);
	timeout = pl->timeout_ms < left ? pl->timeout_ms : left;
	if (strspn(r->messages.p, " \t\r\n") == r->messages.n)
		(void)buf_adds(&body, "{}");
	else
		(void)buf_add(&body, r->messages.p, r->messages.n);
	if ((r->url = strdup(pl->url)) == NULL || body.len == 0 ||
	    (nh = worker_plugin_headers(pl, body.b, body.len, now / 1000,
	                                &hdrs, lines)) == -1 ||
	    (r->call = worker_upstream_post(
	             w->up, pl->url, &body, r->head.traceparent, r->tracestate,
	             lines, (size_t)nh, timeout, wh_done, r)) == NULL) {
		buf_free(&body);
		buf_free(&hdrs);
		log_warnx("%s: cannot start the plugin call", __func__);
		wh_reply(r, 500, 5000, "internal error", NULL, 0, 0);
		return;
	}
	buf_free(&hdrs);
}

void
worker_run_ctx(struct worker *w, const struct msg *m,
               const struct ctx_reply *c)
{
	struct buf url = {0}, body = {0};
	uint64_t now;
	struct run *r;

	if ((r = run_find(w, m->reqid)) == NULL || r->url != NULL ||
	    r->announced) {
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
	if (r->wh) {
		wh_ctx(r, c);
		return;
	}
	if (c->status != 200) {
		run_fail(r, c->status, c->code, c->msg,
		         c->status == 503 || c->status == 429 ? 1 : 0);
		return;
	}
	if (r->v3) {
		v3_ctx(r, c);
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
	{
		uint64_t left = worker_run_pause_left(w, r->url, r->bot_id,
		                                      now_mono_ms());

		/* This worker saw a throttle for the bot's upstream that
		 * has not passed: the dispatcher holds the run instead. */
		if (left > 0) {
			run_handback(r, left);
			return;
		}
	}
	if (worker_upstream_request(&body, c->model, c->system_prompt,
	                            c->context, r->query) == -1 ||
	    (r->call = worker_upstream_start(
	             w->up, r->url, &body, r->head.traceparent, r->tracestate,
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
	run_count_rate_limit(a->http_status);
	run_note_signal(r, a);
	if (a->status != 200 && a->sig.throttled) {
		free(a->content);
		run_handback(r, 0);
		return;
	}
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

/*
 * v3.chat (Coze's /v3/chat): after storage's CTX_REPLY 200 the chat
 * exists (storage holds the conversation's lock for it), so every end
 * from there on is a CHAT_PERSIST with the chat's final status (storage
 * releases the lock after COMMIT and, for a stream, sends the last
 * events).  Before it, an error is a plain CHAT_REPLY as for v1.
 */

static void
v3_chat(const struct run *r, struct coze_chat *c, const char *status)
{
	memset(c, 0, sizeof(*c));
	c->id = r->chat_id;
	c->conversation_id = r->conv_id;
	c->bot_id = r->bot_id;
	c->status = status;
	c->created_at = r->created_at;
	c->error_msg = MSTR_NULL;
}

/* The answer message (number nidx of the chat); id is its storage. */
static void
v3_answer(const struct run *r, struct coze_msg *m, char id[COZE_ID_LEN + 1],
          const char *content, size_t len, uint64_t updated_at)
{
	memset(m, 0, sizeof(*m));
	coze_msg_id_of(r->chat_id, r->nidx, id);
	m->id = MSTR(id);
	m->conversation_id = r->conv_id;
	m->bot_id = r->bot_id;
	m->chat_id = r->chat_id;
	m->role = MSTR_LIT("assistant");
	m->type = MSTR_LIT("answer");
	m->content = (struct mstr){len ? content : "", (uint32_t)len};
	m->content_type = MSTR_LIT("text");
	m->created_at = r->answer_at;
	m->updated_at = updated_at;
}

static struct mstr
json_mstr(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

	if (!cJSON_IsString(v) || v->valuestring[0] == '\0')
		return (MSTR_NULL);
	return (MSTR(v->valuestring));
}

/* The request's messages (each with a string role and content) as
 * message objects (ids 0..n-1, created_at now_s), comma-separated,
 * appended to b unless b is NULL; their count n, UINT_MAX on ENOMEM.
 * None usable: one user message, the query. */
static unsigned
v3_messages(struct run *r, struct buf *b, uint64_t now_s)
{
	char id[COZE_ID_LEN + 1], *text = NULL;
	const cJSON *e;
	cJSON *root = NULL;
	struct coze_msg m = {0};
	unsigned n = 0;

	if (r->messages.n > 0 && (text = mstr_dup(r->messages)) != NULL)
		root = cJSON_Parse(text);
	free(text);
	m.conversation_id = r->conv_id;
	m.bot_id = r->bot_id;
	m.chat_id = r->chat_id;
	m.created_at = m.updated_at = now_s;
	if (!cJSON_IsArray(root)) {
		cJSON_Delete(root);
		root = NULL;
	}
	cJSON_ArrayForEach(e, root)
	{
		m.role = json_mstr(e, "role");
		m.content = json_mstr(e, "content");
		if (m.role.n == 0 ||
		    !cJSON_IsString(
		            cJSON_GetObjectItemCaseSensitive(e, "content")))
			continue;
		m.type = json_mstr(e, "type");
		if (m.type.n == 0)
			m.type = mstr_eq(m.role, "assistant")
			                 ? MSTR_LIT("answer")
			                 : MSTR_LIT("question");
		m.content_type = json_mstr(e, "content_type");
		if (m.content_type.n == 0)
			m.content_type = MSTR_LIT("text");
		coze_msg_id_of(r->chat_id, n, id);
		m.id = MSTR(id);
		if (b != NULL && ((n > 0 && buf_adds(b, ",") == -1) ||
		                  coze_msg_json(b, &m) == -1)) {
			cJSON_Delete(root);
			return (UINT_MAX);
		}
		n++;
	}
	cJSON_Delete(root);
	if (n > 0)
		return (n);
	m.role = MSTR_LIT("user");
	m.type = MSTR_LIT("question");
	m.content = r->query;
	m.content_type = MSTR_LIT("text");
	coze_msg_id_of(r->chat_id, 0, id);
	m.id = MSTR(id);
	if (b != NULL && coze_msg_json(b, &m) == -1)
		return (UINT_MAX);
	return (1);
}

/* CHAT_EVENT to the edge; -1 if refused. */
static int
v3_event(struct run *r, const struct buf *sse, int last)
{
	struct worker *w = r->w;
	struct msg_head h = r->head;
	struct chat_event e = {.sse = {sse->b, (uint32_t)sse->len},
	                       .last = last ? 1 : 0};

	h.reply_to = MSTR_NULL;
	if (msg_send_chat_event(w->svc.ipc, r->head.reply_to.p, &h, &e) ==
	    -1) {
		warn_refused(w, r->head.reply_to.p, r->head.reqid);
		return (-1);
	}
	return (0);
}

/* Send events to a streaming client after those the edge refused
 * before; refused ones wait in pending for the next send (or the final
 * events), so the client sees every event, in order. */
static void
v3_emit(struct run *r, const struct buf *sse)
{
	if (!r->stream || sse->len == 0)
		return;
	if (r->pending.len > 0) {
		if (buf_add(&r->pending, sse->b, sse->len) == -1)
			return;
		if (v3_event(r, &r->pending, 0) == 0)
			buf_reset(&r->pending);
		return;
	}
	if (v3_event(r, sse, 0) == -1)
		(void)buf_add(&r->pending, sse->b, sse->len);
}

/* CHAT_REPLY 200 with the chat object to peer; -1 if refused. */
static int
v3_reply_chat(struct run *r, const char *peer, const struct msg_head *head,
              const struct coze_chat *c)
{
	struct worker *w = r->w;
	struct msg_head h = *head;
	struct buf b = {0};
	struct chat_reply rep = {
	        .status = 200, .code = 0, .msg = MSTR_NULL, .retry_after = 0};
	int rc = -1;

	h.reply_to = MSTR_NULL;
	if (coze_chat_json(&b, c) == -1)
		goto done;
	rep.data = (struct mstr){b.b, (uint32_t)b.len};
	if (msg_send_chat_reply(w->svc.ipc, peer, &h, &rep) == -1) {
		warn_refused(w, peer, h.reqid);
		goto done;
	}
	rc = 0;
done:
	buf_free(&b);
	return (rc);
}

/* Tell the client the chat exists: the first events of a stream, or the
 * answer of a non-streaming create (it polls retrieve from there). */
static int
v3_announce(struct run *r)
{
	struct coze_chat c;
	struct buf b = {0};
	int rc = -1;

	if (!r->stream) {
		v3_chat(r, &c, "in_progress");
		return (v3_reply_chat(r, r->head.reply_to.p, &r->head, &c));
	}
	v3_chat(r, &c, "created");
	if (coze_sse_chat(&b, "conversation.chat.created", &c) == -1)
		goto done;
	c.status = "in_progress";
	if (coze_sse_chat(&b, "conversation.chat.in_progress", &c) == -1)
		goto done;
	rc = v3_event(r, &b, 0);
done:
	buf_free(&b);
	return (rc);
}

/* New content from the upstream: what the client has not seen yet, as
 * one message.delta (a refused one is sent with the next). */
static void
v3_delta(void *arg, const char *content, size_t len)
{
	struct run *r = arg;
	char id[COZE_ID_LEN + 1];
	struct coze_msg m;
	struct buf b = {0};

	if (!r->got_content) {
		r->got_content = 1; /* content or a tool call */
		histo_observe(m_ttft,
		              (double)(now_mono_ns() - r->start_ns) / 1e9);
		if (r->first_timer != NULL)
			loop_timer_stop(r->first_timer);
	}
	if (len > 0 && r->answer_at == 0)
		r->answer_at = now_wall_ms() / 1000;
	if (!r->stream || len <= r->sent)
		return;
	v3_answer(r, &m, id, content + r->sent, len - r->sent, r->answer_at);
	if (coze_sse_msg(&b, "conversation.message.delta", &m) == 0) {
		v3_emit(r, &b);
		r->sent = len;
	}
	buf_free(&b);
}

static void
v3_first_expired(struct loop *l, void *arg)
{
	struct run *r = arg;

	(void)l;
	if (!r->got_content)
		v3_fail(r, 504, 5040,
		        MSTR_LIT("upstream first event deadline exceeded"));
}

static void
v3_upstream_done(void *arg, struct upstream_answer *a)
{
	struct run *r = arg;
	struct worker *w = r->w;

	r->call = NULL;
	r->upstream_status = a->http_status;
	r->upstream_us = a->elapsed_us;
	r->ptok += a->prompt_tokens;
	r->ctok += a->completion_tokens;
	if (w->m_upstream != NULL)
		histo_observe(w->m_upstream, (double)a->elapsed_us / 1e6);
	run_count_rate_limit(a->http_status);
	run_note_signal(r, a);
	if (a->status == 200 && a->ntools > 0)
		v3_tools(r, a);
	else if (a->status == 200)
		v3_end(r, "completed", 200, 0, MSTR_NULL, a->content,
		       a->content_len, r->ptok, r->ctok);
	else {
		log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent,
		        r->bot_id, "upstream %s: %s", r->url, a->msg);
		v3_end(r, "failed", a->status, a->code, MSTR(a->msg),
		       a->content, a->content_len, r->ptok, r->ctok);
	}
	worker_upstream_tools_free(a->tools, a->ntools);
	free(a->content);
}

/* Fail a chat that exists, with what the upstream gave so far. */
static void
v3_fail(struct run *r, uint64_t http, int64_t code, struct mstr msg)
{
	const char *content = NULL;
	size_t len = 0;

	if (r->call != NULL)
		content = worker_upstream_content(r->call, &len);
	v3_end(r, "failed", http, code, msg, content, len, r->ptok, r->ctok);
}

static struct mstr
buf_mstr(const struct buf *b)
{
	return ((struct mstr){b->len ? b->b : "", (uint32_t)b->len});
}

/* Call the model (again): the request, the tool rounds so far, the
 * plugins as tools.  The answer streams to v3_delta and ends in
 * v3_upstream_done. */
static void
v3_round(struct run *r)
{
	struct worker *w = r->w;
	struct buf body = {0};
	uint64_t now = now_wall_ms();

	r->sent = 0;
	r->answer_at = 0;
	if (r->end_ms <= now) {
		v3_fail(r, 504, 5040, MSTR_LIT("upstream deadline exceeded"));
		return;
	}
	/* A v3 chat exists already (its events may have gone out): it is
	 * not handed back, it fails with 5030 while its upstream is held
	 * back after a throttle. */
	if (worker_run_pause_left(w, r->url, r->bot_id, now_mono_ms()) > 0) {
		v3_fail(r, 503, 5030, MSTR_LIT("upstream rate limited"));
		return;
	}
	if (buf_add(&body, r->reqhead.b, r->reqhead.len) == -1 ||
	    worker_upstream_request_tail(&body, buf_mstr(&r->extra),
	                                 buf_mstr(&r->plugins.tools)) == -1 ||
	    (r->call = worker_upstream_start_stream(
	             w->up, r->url, &body, r->head.traceparent, r->tracestate,
	             (int64_t)(r->end_ms - now), v3_delta, v3_upstream_done,
	             r)) == NULL) {
		buf_free(&body);
		log_warnx("%s: cannot start the upstream call", __func__);
		v3_fail(r, 500, 5000, MSTR_LIT("internal error"));
	}
}

/* A message of the chat after the request's (function_call,
 * tool_response, or the text of a tool round): the next index, stored
 * with the chat (r->done) and, for a stream, message.completed in sse. */
static int
v3_message(struct run *r, struct buf *sse, const char *type,
           const char *content, size_t len, uint64_t now_s)
{
	char id[COZE_ID_LEN + 1];
	struct coze_msg m = {0};

	coze_msg_id_of(r->chat_id, r->nidx++, id);
	m.id = MSTR(id);
	m.conversation_id = r->conv_id;
	m.bot_id = r->bot_id;
	m.chat_id = r->chat_id;
	m.role = MSTR_LIT("assistant");
	m.type = MSTR(type);
	m.content = (struct mstr){len ? content : "", (uint32_t)len};
	m.content_type = MSTR_LIT("text");
	m.created_at = m.updated_at = now_s;
	if ((r->done.len > 0 && buf_adds(&r->done, ",") == -1) ||
	    coze_msg_json(&r->done, &m) == -1)
		return (-1);
	if (r->stream &&
	    coze_sse_msg(sse, "conversation.message.completed", &m) == -1)
		return (-1);
	return (0);
}

static void v3_tools_done(struct run *);

/* A call's result: the plugin's JSON, or {"error": "..."}. */
static void v3_tool_error(struct tool_call *, const char *fmt, ...)
        __attribute__((format(printf, 2, 3)));

static void
v3_tool_error(struct tool_call *tc, const char *fmt, ...)
{
	struct buf b = {0};
	char msg[320];
	va_list ap;

	va_start(ap, fmt);
	(void)vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (tc->r->w->m_tool_err != NULL)
		(*tc->r->w->m_tool_err)++;
	free(tc->result);
	tc->result = NULL;
	tc->result_len = 0;
	if (buf_adds(&b, "{\"error\":") == 0 &&
	    buf_add_json_str(&b, msg, strlen(msg)) == 0 &&
	    buf_adds(&b, "}") == 0) {
		tc->result = b.b;
		tc->result_len = b.len;
	} else
		buf_free(&b);
	tc->done = 1;
}

static void
v3_tool_done(void *arg, struct upstream_answer *a)
{
	struct tool_call *tc = arg;
	struct run *r = tc->r;

	tc->call = NULL;
	if (a->status == 200) {
		tc->result = a->content;
		tc->result_len = a->content_len;
		a->content = NULL;
		tc->done = 1;
		if (r->w->m_tool_ok != NULL)
			(*r->w->m_tool_ok)++;
	} else
		v3_tool_error(tc, "plugin %s %s", tc->name, a->msg);
	free(a->content);
	log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent, r->bot_id,
	        "plugin %s: %s (%" PRIu64 " us)", tc->name,
	        a->status == 200 ? "ok" : a->msg, a->elapsed_us);
	if (--r->tcs_left == 0)
		v3_tools_done(r);
}

/* Start one call: its plugin is POSTed the arguments, under the
 * plugin's timeout and the run's time left; a call that cannot be made
 * gets its error result at once. */
static void
v3_tool_start(struct run *r, struct tool_call *tc)
{
	struct worker *w = r->w;
	const struct plugin *pl;
	const char *lines[2];
	struct buf body = {0}, hdrs = {0};
	uint64_t now = now_wall_ms();
	int64_t left, timeout;
	int nh;

	pl = worker_plugin_find(&r->plugins, tc->name, strlen(tc->name));
	if (pl == NULL) {
		v3_tool_error(tc, "unknown tool: %s", tc->name);
		return;
	}
	if (!worker_plugin_args_ok(tc->args, strlen(tc->args))) {
		v3_tool_error(tc,
		              "invalid arguments for %s: not a JSON object",
		              tc->name);
		return;
	}
	if (strspn(tc->args, " \t\r\n") == strlen(tc->args))
		(void)buf_adds(&body, "{}");
	else
		(void)buf_adds(&body, tc->args);
	left = r->end_ms > now ? (int64_t)(r->end_ms - now) : 1;
	timeout = pl->timeout_ms < left ? pl->timeout_ms : left;
	if (body.len == 0 ||
	    (nh = worker_plugin_headers(pl, body.b, body.len, now / 1000,
	                                &hdrs, lines)) == -1 ||
	    (tc->call = worker_upstream_post(
	             w->up, pl->url, &body, r->head.traceparent, r->tracestate,
	             lines, (size_t)nh, timeout, v3_tool_done, tc)) == NULL) {
		v3_tool_error(tc, "plugin %s internal error", tc->name);
		buf_free(&body);
	}
	buf_free(&hdrs);
}

/* The model asked for tools: tell the client (function_call messages),
 * run every call at once, and when all have a result call the model
 * again with them (v3_tools_done). */
static void
v3_tools(struct run *r, struct upstream_answer *a)
{
	struct worker *w = r->w;
	unsigned max =
	        w->max_tool_rounds ? w->max_tool_rounds : WORKER_TOOL_ROUNDS;
	uint64_t now_s = now_wall_ms() / 1000;
	struct buf sse = {0}, calls = {0}, call = {0};
	char id[COZE_ID_LEN + 1], cid[48];
	struct coze_msg m;

	if (r->rounds >= max) {
		v3_end(r, "failed", 502, 5020,
		       MSTR_LIT("too many tool rounds"), a->content,
		       a->content_len, r->ptok, r->ctok);
		return;
	}
	r->rounds++;
	if ((r->tcs = calloc(a->ntools, sizeof(*r->tcs))) == NULL)
		goto nomem;
	r->ntcs = a->ntools;
	/* What the model said before asking: an answer of its own, ended
	 * here (its deltas went out already). */
	if (a->content_len > 0) {
		if (r->stream && a->content_len > r->sent) {
			v3_answer(r, &m, id, a->content + r->sent,
			          a->content_len - r->sent, r->answer_at);
			if (coze_sse_msg(&sse, "conversation.message.delta",
			                 &m) == -1)
				goto nomem;
		}
		if (v3_message(r, &sse, "answer", a->content, a->content_len,
		               now_s) == -1)
			goto nomem;
	}
	for (size_t i = 0; i < a->ntools; i++) {
		struct upstream_tool *t = &a->tools[i];
		struct tool_call *tc = &r->tcs[i];

		tc->r = r;
		if (t->id.len > 0)
			tc->id = mstr_dup(buf_mstr(&t->id));
		else {
			(void)snprintf(cid, sizeof(cid), "call_%u_%zu",
			               r->rounds, i);
			tc->id = strdup(cid);
		}
		tc->name = mstr_dup(buf_mstr(&t->name));
		tc->args = mstr_dup(buf_mstr(&t->args));
		if (tc->id == NULL || tc->name == NULL || tc->args == NULL)
			goto nomem;
		buf_reset(&call);
		if (buf_adds(&call, "{\"id\":") == -1 ||
		    buf_add_json_str(&call, tc->id, strlen(tc->id)) == -1 ||
		    buf_adds(&call, ",\"type\":\"function\",\"function\":"
		                    "{\"name\":") == -1 ||
		    buf_add_json_str(&call, tc->name, strlen(tc->name)) ==
		            -1 ||
		    buf_adds(&call, ",\"arguments\":") == -1 ||
		    buf_add_json_str(&call, tc->args, strlen(tc->args)) ==
		            -1 ||
		    buf_adds(&call, "}}") == -1)
			goto nomem;
		if ((i > 0 && buf_adds(&calls, ",") == -1) ||
		    buf_add(&calls, call.b, call.len) == -1 ||
		    v3_message(r, &sse, "function_call", call.b, call.len,
		               now_s) == -1)
			goto nomem;
	}
	/* The model sees its own calls again next round. */
	if ((r->extra.len > 0 && buf_adds(&r->extra, ",") == -1) ||
	    buf_adds(&r->extra, "{\"role\":\"assistant\",\"content\":") ==
	            -1 ||
	    (a->content_len > 0
	             ? buf_add_json_str(&r->extra, a->content, a->content_len)
	             : buf_adds(&r->extra, "null")) == -1 ||
	    buf_adds(&r->extra, ",\"tool_calls\":[") == -1 ||
	    buf_add(&r->extra, calls.b, calls.len) == -1 ||
	    buf_adds(&r->extra, "]}") == -1)
		goto nomem;
	v3_emit(r, &sse);
	r->sent = 0;
	buf_free(&sse);
	buf_free(&calls);
	buf_free(&call);
	r->tcs_left = r->ntcs;
	for (size_t i = 0; i < r->ntcs; i++)
		if (r->tcs[i].call == NULL) {
			v3_tool_start(r, &r->tcs[i]);
			if (r->tcs[i].done)
				r->tcs_left--;
		}
	if (r->tcs_left == 0)
		v3_tools_done(r);
	return;
nomem:
	buf_free(&sse);
	buf_free(&calls);
	buf_free(&call);
	log_warnx("%s: out of memory", __func__);
	v3_fail(r, 500, 5000, MSTR_LIT("internal error"));
}

/* Every call of the round has its result: tell the client
 * (tool_response messages, in the calls' order) and call the model. */
static void
v3_tools_done(struct run *r)
{
	uint64_t now_s = now_wall_ms() / 1000;
	struct buf sse = {0};
	static const char nomem_result[] = "{\"error\":\"out of memory\"}";

	for (size_t i = 0; i < r->ntcs; i++) {
		struct tool_call *tc = &r->tcs[i];
		const char *res = tc->result ? tc->result : nomem_result;
		size_t rlen =
		        tc->result ? tc->result_len : sizeof(nomem_result) - 1;

		if (v3_message(r, &sse, "tool_response", res, rlen, now_s) ==
		            -1 ||
		    buf_adds(&r->extra,
		             ",{\"role\":\"tool\",\"tool_call_id\":") == -1 ||
		    buf_add_json_str(&r->extra, tc->id, strlen(tc->id)) ==
		            -1 ||
		    buf_adds(&r->extra, ",\"content\":") == -1 ||
		    buf_add_json_str(&r->extra, res, rlen) == -1 ||
		    buf_adds(&r->extra, "}") == -1) {
			buf_free(&sse);
			log_warnx("%s: out of memory", __func__);
			tools_free(r);
			v3_fail(r, 500, 5000, MSTR_LIT("internal error"));
			return;
		}
	}
	v3_emit(r, &sse);
	buf_free(&sse);
	tools_free(r);
	v3_round(r);
}

static void
v3_ctx(struct run *r, const struct ctx_reply *c)
{
	struct worker *w = r->w;
	struct buf url = {0};
	uint64_t now = now_wall_ms(), total, first;
	size_t skipped = 0;

	r->announced = 1;
	r->created_at = c->created_at ? c->created_at : now / 1000;
	r->context_turns = c->context_turns;
	if (r->canceled) {
		v3_end(r, "canceled", 499, 0, MSTR_NULL, NULL, 0, 0, 0);
		return;
	}
	if (v3_announce(r) == -1) {
		v3_end(r, "failed", 503, 5030, MSTR_LIT("edge unavailable"),
		       NULL, 0, 0, 0);
		return;
	}
	if (worker_upstream_url(&url, c->upstream) == -1) {
		buf_free(&url);
		if (worker_warn_ok(w))
			log_req(LOG_L_WARN, r->head.reqid, r->head.traceparent,
			        r->bot_id,
			        "bot upstream \"%.*s\" is not an http(s) URL",
			        (int)(c->upstream.n > 200 ? 200
			                                  : c->upstream.n),
			        c->upstream.p);
		v3_fail(r, 502, 5020, MSTR_LIT("bot upstream not usable"));
		return;
	}
	r->url = url.b;
	total = c->total_ms ? c->total_ms : (uint64_t)w->total_ms;
	r->end_ms = r->head.deadline_ms;
	if (total > 0 && now + total < r->end_ms)
		r->end_ms = now + total;
	if (r->end_ms <= now) {
		v3_fail(r, 504, 5040, MSTR_LIT("deadline exceeded"));
		return;
	}
	loop_timer_set(r->timer, (int64_t)(r->end_ms - now));
	first = c->first_event_ms ? c->first_event_ms
	                          : (uint64_t)w->first_event_ms;
	if (first > 0 && now + first < r->end_ms) {
		if (r->first_timer == NULL &&
		    (r->first_timer = loop_timer_new(
		             w->svc.loop, v3_first_expired, r)) == NULL) {
			v3_fail(r, 500, 5000, MSTR_LIT("internal error"));
			return;
		}
		loop_timer_set(r->first_timer, (int64_t)first);
	}
	if (worker_plugin_parse(&r->plugins, c->plugins,
	                        w->plugin_timeout_ms ? w->plugin_timeout_ms
	                                             : WORKER_PLUGIN_MS,
	                        &skipped) == -1 ||
	    worker_upstream_request_head(&r->reqhead, c->model,
	                                 c->system_prompt, c->context,
	                                 r->messages, r->query) == -1) {
		log_warnx("%s: out of memory", __func__);
		v3_fail(r, 500, 5000, MSTR_LIT("internal error"));
		return;
	}
	if (skipped > 0 && worker_warn_ok(w))
		log_req(LOG_L_WARN, r->head.reqid, r->head.traceparent,
		        r->bot_id,
		        "%zu plugin(s) of the bot not usable, left "
		        "out",
		        skipped);
	v3_round(r);
}

/* The final events of a stream: the unsent end of the answer, the whole
 * answer if it completed, the chat, done. */
static int
v3_final_sse(struct run *r, struct buf *b, const struct coze_chat *c,
             const char *content, size_t len, uint64_t now_s)
{
	char id[COZE_ID_LEN + 1], event[64];
	struct coze_msg m;

	if (r->pending.len > 0 &&
	    buf_add(b, r->pending.b, r->pending.len) == -1)
		return (-1);
	if (len > r->sent) {
		v3_answer(r, &m, id, content + r->sent, len - r->sent,
		          r->answer_at);
		if (coze_sse_msg(b, "conversation.message.delta", &m) == -1)
			return (-1);
	}
	if (strcmp(c->status, "completed") == 0) {
		v3_answer(r, &m, id, content, len, now_s);
		if (coze_sse_msg(b, "conversation.message.completed", &m) ==
		    -1)
			return (-1);
	}
	(void)snprintf(event, sizeof(event), "conversation.chat.%s",
	               c->status);
	if (coze_sse_chat(b, event, c) == -1 || coze_sse_done(b) == -1)
		return (-1);
	return (0);
}

/* The chat ended (status completed, failed or canceled): store it, and
 * through storage give a stream its last events; RUN_DONE. */
static void
v3_end(struct run *r, const char *status, uint64_t http, int64_t code,
       struct mstr msg, const char *content, size_t len, uint64_t ptok,
       uint64_t ctok)
{
	struct worker *w = r->w;
	uint64_t now_s = now_wall_ms() / 1000;
	struct buf msgs = {0}, reply = {0}, err = {0};
	struct chat_persist p = {0};
	struct coze_chat c;
	char id[COZE_ID_LEN + 1];
	struct coze_msg m;
	int completed = strcmp(status, "completed") == 0;

	if (r->answer_at == 0)
		r->answer_at = now_s;
	v3_chat(r, &c, status);
	if (completed)
		c.completed_at = now_s;
	else if (strcmp(status, "failed") == 0)
		c.failed_at = now_s;
	c.error_code = code;
	c.error_msg = msg;
	c.input_tokens = ptok;
	c.output_tokens = ctok;

	/* The rows to store: the request's messages, and the answer if
	 * there is one (a failed or canceled chat keeps what came). */
	if (buf_adds(&msgs, "[") == -1 ||
	    v3_messages(r, &msgs, r->created_at) == UINT_MAX)
		goto nomem;
	if (r->done.len > 0 && (buf_adds(&msgs, ",") == -1 ||
	                        buf_add(&msgs, r->done.b, r->done.len) == -1))
		goto nomem;
	if (completed || len > 0) {
		v3_answer(r, &m, id, content, len, now_s);
		if (buf_adds(&msgs, ",") == -1 ||
		    coze_msg_json(&msgs, &m) == -1)
			goto nomem;
	}
	if (buf_adds(&msgs, "]") == -1)
		goto nomem;
	if (code != 0 &&
	    (buf_addf(&err, "{\"code\":%" PRId64 ",\"msg\":", code) == -1 ||
	     buf_add_json_str(&err, msg.p, msg.n) == -1 ||
	     buf_adds(&err, "}") == -1))
		goto nomem;
	if (r->stream &&
	    v3_final_sse(r, &reply, &c, content, len, now_s) == -1)
		goto nomem;

	p.chat_id = r->chat_id;
	p.conversation_id = r->conv_id;
	p.bot_id = r->bot_id;
	p.user_id = r->user_id;
	p.query = r->query;
	p.answer = (struct mstr){len ? content : "", (uint32_t)len};
	p.prompt_tokens = ptok;
	p.completion_tokens = ctok;
	p.context_turns = r->context_turns;
	p.reply = (struct mstr){reply.len ? reply.b : "", (uint32_t)reply.len};
	p.reply_kind = r->stream ? 1 : 2;
	p.status = MSTR(status);
	p.messages = (struct mstr){msgs.b, (uint32_t)msgs.len};
	p.last_error = (struct mstr){err.len ? err.b : "", (uint32_t)err.len};
	p.created_at = r->created_at;
	p.route = MSTR_LIT("v3.chat");
	/* reply_to = the edge: storage sends it the last events. */
	if (msg_send_chat_persist(w->svc.ipc, "storage", &r->head, &p) == -1) {
		warn_refused(w, "storage", r->head.reqid);
		http = 503;
		if (r->stream) {
			/* Not stored: the stream ends failed, from here
			 * (no answer events: sent covers any length). */
			r->sent = SIZE_MAX;
			v3_chat(r, &c, "failed");
			c.failed_at = now_s;
			c.error_code = 5030;
			c.error_msg = MSTR_LIT("storage unavailable");
			buf_reset(&reply);
			if (v3_final_sse(r, &reply, &c, NULL, 0, now_s) == 0)
				(void)v3_event(r, &reply, 1);
		}
	}
	buf_free(&msgs);
	buf_free(&reply);
	buf_free(&err);
	run_end(r, http);
	return;
nomem:
	buf_free(&msgs);
	buf_free(&reply);
	buf_free(&err);
	log_warnx("%s: out of memory", __func__);
	/* The lock expires by itself; the client hears from the edge. */
	run_end(r, 500);
}

/* A v3 run by chat id (a cancel names the chat, not the run). */
static struct run *
run_find_chat(struct worker *w, struct mstr chat_id)
{
	struct run *r;

	if (chat_id.n == 0)
		return (NULL);
	for (size_t i = 0; i < w->nbuckets; i++)
		for (r = w->buckets[i]; r != NULL; r = r->hnext)
			if (r->v3 && r->chat_id.n == chat_id.n &&
			    memcmp(r->chat_id.p, chat_id.p, chat_id.n) == 0)
				return (r);
	return (NULL);
}

void
worker_run_cancel(struct worker *w, const struct msg *m,
                  const struct chat_request *q)
{
	struct msg_head h = msg_head_reply(m, NULL);
	char peer[WORKER_PEER_MAX];
	int has_peer = peer_name(m->reply_to, peer) == 0;
	const char *content = NULL;
	struct coze_chat c;
	size_t len = 0;
	struct run *r;

	if ((r = run_find(w, m->reqid)) == NULL || !r->v3)
		r = run_find_chat(w, q->chat_id);
	if (r == NULL) {
		if (w->m_cancel_late != NULL)
			(*w->m_cancel_late)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, MSTR_NULL,
		        "RUN_CANCEL for chat %.*s: not running here",
		        (int)q->chat_id.n, q->chat_id.p);
		if (has_peer)
			send_error(w, peer, &h, 409, 4202,
			           MSTR_LIT("chat already finished"), 0);
		return;
	}
	if (q->history_id.n > 0 &&
	    (q->history_id.n != r->conv_id.n ||
	     memcmp(q->history_id.p, r->conv_id.p, r->conv_id.n) != 0)) {
		if (has_peer)
			send_error(w, peer, &h, 404, 4201,
			           MSTR_LIT("chat not found"), 0);
		return;
	}
	if (w->m_canceled != NULL && !r->canceled)
		(*w->m_canceled)++;
	log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent, r->bot_id,
	        "chat %.*s canceled%s", (int)r->chat_id.n, r->chat_id.p,
	        has_peer ? "" : " (client gone)");
	if (has_peer) {
		v3_chat(r, &c, "canceled");
		if (c.created_at == 0)
			c.created_at = now_wall_ms() / 1000;
		(void)v3_reply_chat(r, peer, &h, &c);
	}
	if (!r->announced) {
		/* Storage may be taking the lock for it: end when it says. */
		r->canceled = 1;
		return;
	}
	if (r->call != NULL)
		content = worker_upstream_content(r->call, &len);
	v3_end(r, "canceled", 499, 0, MSTR_NULL, content, len, r->ptok,
	       r->ctok);
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
