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
 * events for storage to send after COMMIT.  RUN_CANCEL aborts it.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "coze.h"
#include "worker.h"

#define WORKER_LOCK_SLACK_MS 5000 /* a v3 lock outlives the deadline */

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
	/* v3.chat */
	int v3;
	int stream;      /* answer as SSE (CHAT_EVENT) */
	int announced;   /* CTX_REPLY 200 came: the chat exists */
	int canceled;    /* RUN_CANCEL came before CTX_REPLY */
	int got_content; /* the upstream's first content came */
	struct loop_timer *first_timer; /* time to the first content */
	uint64_t end_ms;     /* wall: the upstream's answer by then */
	uint64_t created_at; /* unix s */
	uint64_t answer_at;  /* unix s, the answer's first content */
	size_t sent;         /* answer bytes sent as message.delta */
	unsigned nmsgs;      /* request messages; the answer's index */
	struct mstr chat_id, messages;
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
	if (r->first_timer != NULL)
		loop_timer_free(r->first_timer);
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

static unsigned v3_messages(struct run *, struct buf *, uint64_t now_s);
static void v3_ctx(struct run *, const struct ctx_reply *);
static void v3_end(struct run *, const char *status, uint64_t http,
                   int64_t code, struct mstr msg, const char *content,
                   size_t len, uint64_t ptok, uint64_t ctok);
static void v3_fail(struct run *, uint64_t http, int64_t code,
                    struct mstr msg);

/* The deadline passed: storage has not answered, or the upstream call
 * is still waiting for a connection (or curl's own timeout, set to the
 * same instant, has not fired yet). */
static void
run_expired(struct loop *l, void *arg)
{
	struct run *r = arg;

	(void)l;
	if (r->announced)
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
	             chat_id.n + messages.n + 9;
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
	p = put_str(p, &r->conv_id, conv_id);
	p = put_str(p, &r->chat_id, chat_id);
	(void)put_str(p, &r->messages, messages);
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
	if (q->history_id.n == 0 &&
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
	if ((r = run_new(w, m, q, deadline, q->history_id.n == 0 ? conv : NULL,
	                 cid, msgs)) == NULL) {
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
	if (v3) {
		r->v3 = 1;
		r->stream = q->stream != 0;
		r->nmsgs = v3_messages(r, NULL, 0);
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

/* The answer message (number nmsgs of the chat); id is its storage. */
static void
v3_answer(const struct run *r, struct coze_msg *m, char id[COZE_ID_LEN + 1],
          const char *content, size_t len, uint64_t updated_at)
{
	memset(m, 0, sizeof(*m));
	coze_msg_id_of(r->chat_id, r->nmsgs, id);
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
		r->got_content = 1;
		r->answer_at = now_wall_ms() / 1000;
		if (r->first_timer != NULL)
			loop_timer_stop(r->first_timer);
	}
	if (!r->stream || len <= r->sent)
		return;
	v3_answer(r, &m, id, content + r->sent, len - r->sent, r->answer_at);
	if (coze_sse_msg(&b, "conversation.message.delta", &m) == 0 &&
	    v3_event(r, &b, 0) == 0)
		r->sent = len;
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
	if (w->m_upstream != NULL)
		histo_observe(w->m_upstream, (double)a->elapsed_us / 1e6);
	if (a->status == 200)
		v3_end(r, "completed", 200, 0, MSTR_NULL, a->content,
		       a->content_len, a->prompt_tokens, a->completion_tokens);
	else {
		log_req(LOG_L_DEBUG, r->head.reqid, r->head.traceparent,
		        r->bot_id, "upstream %s: %s", r->url, a->msg);
		v3_end(r, "failed", a->status, a->code, MSTR(a->msg),
		       a->content, a->content_len, a->prompt_tokens,
		       a->completion_tokens);
	}
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
	v3_end(r, "failed", http, code, msg, content, len, 0, 0);
}

static void
v3_ctx(struct run *r, const struct ctx_reply *c)
{
	struct worker *w = r->w;
	struct buf url = {0}, body = {0};
	uint64_t now = now_wall_ms(), total, first;

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
	if (worker_upstream_request_stream(&body, c->model, c->system_prompt,
	                                   c->context, r->messages,
	                                   r->query) == -1 ||
	    (r->call = worker_upstream_start_stream(
	             w->up, r->url, &body, r->head.traceparent,
	             (int64_t)(r->end_ms - now), v3_delta, v3_upstream_done,
	             r)) == NULL) {
		buf_free(&body);
		log_warnx("%s: cannot start the upstream call", __func__);
		v3_fail(r, 500, 5000, MSTR_LIT("internal error"));
	}
}

/* The final events of a stream: the unsent end of the answer, the whole
 * answer if it completed, the chat, done. */
static int
v3_final_sse(struct run *r, struct buf *b, const struct coze_chat *c,
             const char *content, size_t len, uint64_t now_s)
{
	char id[COZE_ID_LEN + 1], event[64];
	struct coze_msg m;

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
	v3_end(r, "canceled", 499, 0, MSTR_NULL, content, len, 0, 0);
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
