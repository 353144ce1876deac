/* SPDX-License-Identifier: ISC */
/*
 * worker_upstream: calls a bot's OpenAI-compatible upstream
 * (POST <base>/v1/chat/completions, "stream": false for v1, "stream": true
 * for v3) and its plugins (a plain JSON POST per tool call) with libcurl's
 * multi interface on the worker's own loop, and turns whatever happened
 * into the answer the client gets (PRODUCT.md §2 codes).  A stream is
 * read as server-sent events while it arrives; the content it added in
 * one loop turn goes to the caller after socket_action returns (never
 * from inside curl), before any completion.  Its delta.tool_calls pieces
 * are joined by index for the caller.
 *
 * The loop drives curl the way curl's ephiperfifo example does, with the
 * rules of PITFALLS.md: CURLMOPT_SOCKETFUNCTION maps onto loop_fd_*,
 * CURLMOPT_TIMERFUNCTION only arms a loop timer (socket_action is never
 * called from inside a curl callback), transfers start from that timer,
 * and every socket_action is followed by a sweep of curl_multi_info_read.
 * Our callbacks never return -1 (that would abort every transfer).  HTTP/1.1
 * is forced (HTTP/2 streams could end truncated yet "OK" in 7.88), each call
 * has a total timeout from its run's deadline, and connections are reused
 * (CURLMOPT_MAX_HOST_CONNECTIONS, CURLMOPT_MAXCONNECTS).
 *
 * Calls beyond `connections` per upstream host wait in our own per-host
 * FIFO, not in curl: curl's pending list costs an easy handle with its
 * receive buffer per waiting call, and 7.88 walks that list on every
 * curl_multi_remove_handle (quadratic under a burst).  A waiting call holds
 * only its URL and body; its deadline keeps running, and one that expired
 * while waiting is answered 504 without being sent.  Easy handles are
 * pooled.  Completions that do not come from curl (expired, or failed to
 * start) are delivered from a zero-delay timer, so a done callback never
 * runs inside another call's bookkeeping.  Never logs: the caller reports.
 */
#include <sys/queue.h>

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "worker_upstream.h"
#include "trace.h"

#define UP_URL_MAX 2048
#define UP_RETRY_AFTER_MAX 3600
#define UP_HOST_BUCKETS 64
#define UP_TRACESTATE_MAX 512 /* the edge cuts it to this */

enum call_state { CALL_QUEUED, CALL_ACTIVE, CALL_DEFERRED };

struct upstream_call {
	TAILQ_ENTRY(upstream_call) entry; /* host queue, active or deferred */
	struct upstream *up;
	struct up_host *host; /* while queued or active */
	enum call_state state;
	CURL *easy;      /* while active */
	struct buf req;  /* request body: POSTFIELDS does not copy */
	struct buf resp; /* answer body, capped */
	int toobig;
	uint64_t deadline_ms; /* monotonic */
	uint64_t start_ns;
	uint64_t defer_status; /* when deferred: 504 or 500 */
	upstream_done_cb cb;
	void *arg;
	/* Streams: the parser, content not yet given to delta_cb. */
	int stream;
	int post;    /* a plugin call: plain answer, checked as JSON */
	int pending; /* on up->pending */
	long http;   /* the answer's status, once known (streams) */
	size_t delivered;
	unsigned pdelivered; /* sse.progress given to delta_cb */
	upstream_delta_cb delta_cb;
	TAILQ_ENTRY(upstream_call) pentry;
	struct upstream_sse sse;
	/* Our own list node for the per-call traceparent header: it points
	 * at the shared headers, so a call allocates no header list. */
	struct curl_slist tp_node;
	char tp_hdr[80];
	/* The same for tracestate, when the run has one (ts_hdr is ours). */
	struct curl_slist ts_node;
	char *ts_hdr;
	/* Plugin calls: their own header lines, nodes in front of the
	 * shared ones (xhdr holds the strings). */
	struct curl_slist *xnodes;
	size_t nx;
	char *xhdr;
	char url[];
};

TAILQ_HEAD(call_list, upstream_call);

/* One upstream host ("http://127.0.0.1:9090"): its calls in curl and the
 * ones waiting for a connection.  Freed when it has neither. */
struct up_host {
	struct up_host *hnext;
	uint32_t hash;
	size_t active;
	size_t nqueued;
	struct call_list queue;
	char key[];
};

struct upstream {
	struct loop *loop;
	CURLM *multi;
	struct loop_timer *timer;       /* curl's */
	struct loop_timer *defer_timer; /* deferred completions */
	struct curl_slist *headers;     /* shared by every call */
	struct curl_slist *sheaders;    /* the same, for streams */
	struct upstream_conf conf;
	struct call_list active;
	struct call_list deferred;
	struct call_list pending; /* streams with new content */
	size_t ncalls;            /* queued + active + deferred */
	size_t nqueued;
	struct up_host *hosts[UP_HOST_BUCKETS];
	CURL **pool; /* idle easy handles */
	size_t npool;
	size_t cappool;
};

static int
has_prefix_ci(const char *p, size_t n, const char *pre)
{
	size_t k = strlen(pre);

	return (n >= k && strncasecmp(p, pre, k) == 0);
}

static int
has_suffix(const char *p, size_t n, const char *suf)
{
	size_t k = strlen(suf);

	return (n >= k && memcmp(p + n - k, suf, k) == 0);
}

int
worker_upstream_url(struct buf *out, struct mstr base)
{
	size_t n = base.n, skip;

	while (n > 0 && base.p[n - 1] == '/')
		n--;
	if (n == 0 || n > UP_URL_MAX)
		return (-1);
	if (has_prefix_ci(base.p, n, "http://"))
		skip = 7;
	else if (has_prefix_ci(base.p, n, "https://"))
		skip = 8;
	else
		return (-1);
	if (n == skip)
		return (-1);
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)base.p[i] <= ' ' || base.p[i] == 0x7f)
			return (-1);
	if (buf_add(out, base.p, n) == -1)
		return (-1);
	if (has_suffix(base.p, n, "/chat/completions"))
		;
	else if (has_suffix(base.p, n, "/v1")) {
		if (buf_adds(out, "/chat/completions") == -1)
			return (-1);
	} else if (buf_adds(out, "/v1/chat/completions") == -1)
		return (-1);
	if (buf_add(out, "", 1) == -1)
		return (-1);
	out->len--;
	return (0);
}

/* Leading and trailing blanks and commas of the context, which is pasted
 * into a JSON array as it is. */
static struct mstr
trim_context(struct mstr s)
{
	while (s.n > 0 && (isspace((unsigned char)s.p[0]) || s.p[0] == ',')) {
		s.p++;
		s.n--;
	}
	while (s.n > 0 &&
	       (isspace((unsigned char)s.p[s.n - 1]) || s.p[s.n - 1] == ','))
		s.n--;
	return (s);
}

/* The head of a request: model, system prompt, context (each followed by
 * a comma, ready for the last messages). */
static int
request_head(struct buf *out, struct mstr model, struct mstr system_prompt,
             struct mstr context)
{
	context = trim_context(context);
	if (buf_adds(out, "{\"model\":") == -1 ||
	    buf_add_json_str(out, model.p, model.n) == -1 ||
	    buf_adds(out, ",\"messages\":[") == -1)
		return (-1);
	if (system_prompt.n > 0 &&
	    (buf_adds(out, "{\"role\":\"system\",\"content\":") == -1 ||
	     buf_add_json_str(out, system_prompt.p, system_prompt.n) == -1 ||
	     buf_adds(out, "},") == -1))
		return (-1);
	if (context.n > 0 && (buf_add(out, context.p, context.n) == -1 ||
	                      buf_adds(out, ",") == -1))
		return (-1);
	return (0);
}

static int
request_msg(struct buf *out, const char *role, size_t rlen, const char *c,
            size_t clen)
{
	if (buf_adds(out, "{\"role\":") == -1 ||
	    buf_add_json_str(out, role, rlen) == -1 ||
	    buf_adds(out, ",\"content\":") == -1 ||
	    buf_add_json_str(out, c, clen) == -1 || buf_adds(out, "}") == -1)
		return (-1);
	return (0);
}

int
worker_upstream_request(struct buf *out, struct mstr model,
                        struct mstr system_prompt, struct mstr context,
                        struct mstr query)
{
	if (buf_reserve(out, 96 + model.n + system_prompt.n + context.n +
	                             query.n + query.n / 8) == -1)
		return (-1);
	if (request_head(out, model, system_prompt, context) == -1 ||
	    request_msg(out, "user", 4, query.p, query.n) == -1 ||
	    buf_adds(out, "],\"stream\":false}") == -1)
		return (-1);
	return (0);
}

/* The {role, content} of each message in the JSON array messages; the
 * count written, -1 on ENOMEM. */
static int
request_msgs(struct buf *out, struct mstr messages)
{
	const cJSON *m, *role, *content;
	cJSON *root;
	char *text;
	int n = 0;

	if (messages.n == 0 || (text = mstr_dup(messages)) == NULL)
		return (0);
	root = cJSON_Parse(text);
	free(text);
	if (!cJSON_IsArray(root)) {
		cJSON_Delete(root);
		return (0);
	}
	cJSON_ArrayForEach(m, root)
	{
		role = cJSON_GetObjectItemCaseSensitive(m, "role");
		content = cJSON_GetObjectItemCaseSensitive(m, "content");
		if (!cJSON_IsString(role) || !cJSON_IsString(content))
			continue;
		if ((n > 0 && buf_adds(out, ",") == -1) ||
		    request_msg(out, role->valuestring,
		                strlen(role->valuestring),
		                content->valuestring,
		                strlen(content->valuestring)) == -1) {
			cJSON_Delete(root);
			return (-1);
		}
		n++;
	}
	cJSON_Delete(root);
	return (n);
}

int
worker_upstream_request_head(struct buf *out, struct mstr model,
                             struct mstr system_prompt, struct mstr context,
                             struct mstr messages, struct mstr query)
{
	int n;

	if (buf_reserve(out, 160 + model.n + system_prompt.n + context.n +
	                             messages.n + query.n) == -1)
		return (-1);
	if (request_head(out, model, system_prompt, context) == -1 ||
	    (n = request_msgs(out, messages)) == -1)
		return (-1);
	if (n == 0 && request_msg(out, "user", 4, query.p, query.n) == -1)
		return (-1);
	return (0);
}

int
worker_upstream_request_tail(struct buf *out, struct mstr extra,
                             struct mstr tools)
{
	if (extra.n > 0 &&
	    (buf_adds(out, ",") == -1 || buf_add(out, extra.p, extra.n) == -1))
		return (-1);
	if (buf_adds(out, "]") == -1)
		return (-1);
	if (tools.n > 0 && (buf_adds(out, ",\"tools\":") == -1 ||
	                    buf_add(out, tools.p, tools.n) == -1))
		return (-1);
	return (buf_adds(out, ",\"stream\":true,"
	                      "\"stream_options\":{\"include_usage\":true}}"));
}

int
worker_upstream_request_stream(struct buf *out, struct mstr model,
                               struct mstr system_prompt, struct mstr context,
                               struct mstr messages, struct mstr query)
{
	if (worker_upstream_request_head(out, model, system_prompt, context,
	                                 messages, query) == -1)
		return (-1);
	return (worker_upstream_request_tail(out, MSTR_NULL, MSTR_NULL));
}

uint64_t
worker_upstream_retry_after(const char *v)
{
	unsigned long long s = 0;
	time_t t;
	int64_t d;

	if (v == NULL)
		return (1);
	while (*v == ' ' || *v == '\t')
		v++;
	if (isdigit((unsigned char)*v)) {
		for (; isdigit((unsigned char)*v); v++) {
			if (s > UP_RETRY_AFTER_MAX)
				break;
			s = s * 10 + (unsigned long long)(*v - '0');
		}
		d = (int64_t)s;
	} else {
		if ((t = curl_getdate(v, NULL)) == -1)
			return (1);
		d = (int64_t)t - (int64_t)time(NULL);
	}
	if (d < 1)
		return (1);
	if (d > UP_RETRY_AFTER_MAX)
		return (UP_RETRY_AFTER_MAX);
	return ((uint64_t)d);
}

static void answer_error(struct upstream_answer *a, uint64_t status,
                         int64_t code, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

static void
answer_error(struct upstream_answer *a, uint64_t status, int64_t code,
             const char *fmt, ...)
{
	va_list ap;

	a->status = status;
	a->code = code;
	va_start(ap, fmt);
	(void)vsnprintf(a->msg, sizeof(a->msg), fmt, ap);
	va_end(ap);
}

static uint64_t
json_count(const cJSON *obj, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

	if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) ||
	    v->valuedouble > 9007199254740992.0)
		return (0);
	return ((uint64_t)v->valuedouble);
}

/* 0: content and usage read; -1: not a chat completion; -2: ENOMEM. */
static int
parse_completion(struct upstream_answer *a, const char *body)
{
	cJSON *root;
	const cJSON *choices, *choice, *message, *content, *usage;
	int rc = -1;

	if ((root = cJSON_ParseWithOpts(body, NULL, 1)) == NULL)
		return (-1);
	choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
	if (!cJSON_IsArray(choices))
		goto done;
	choice = cJSON_GetArrayItem(choices, 0);
	message = cJSON_GetObjectItemCaseSensitive(choice, "message");
	content = cJSON_GetObjectItemCaseSensitive(message, "content");
	if (!cJSON_IsString(content) || content->valuestring == NULL)
		goto done;
	a->content_len = strlen(content->valuestring);
	if ((a->content = malloc(a->content_len + 1)) == NULL) {
		rc = -2;
		goto done;
	}
	memcpy(a->content, content->valuestring, a->content_len + 1);
	usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
	a->prompt_tokens = json_count(usage, "prompt_tokens");
	a->completion_tokens = json_count(usage, "completion_tokens");
	rc = 0;
done:
	cJSON_Delete(root);
	return (rc);
}

static void
answer_reset_err(struct upstream_answer *a, long http)
{
	memset(a, 0, sizeof(*a));
	a->status = 200;
	a->http_status = http;
}

/* The errors that do not depend on the body: 1 if a decided a, else 0. */
static int
classify_transport(struct upstream_answer *a, CURLcode rc, long http,
                   const char *retry_after, int toobig)
{
	a->status = 200;
	a->code = 0;
	a->retry_after = 0;
	a->msg[0] = '\0';
	a->content = NULL;
	a->content_len = 0;
	a->prompt_tokens = a->completion_tokens = 0;
	a->http_status = http;
	a->tools = NULL;
	a->ntools = 0;

	if (toobig || rc == CURLE_FILESIZE_EXCEEDED) {
		answer_error(a, 502, 5020, "upstream answer too large");
		return (1);
	}
	if (rc == CURLE_OPERATION_TIMEDOUT) {
		answer_error(a, 504, 5040, "upstream deadline exceeded");
		return (1);
	}
	if (rc != CURLE_OK) {
		answer_error(a, 502, 5020, "upstream unreachable: %s",
		             curl_easy_strerror(rc));
		return (1);
	}
	if (http == 429 || http == 503) {
		/* A throttle is never a 502: 503 with Retry-After. */
		answer_error(a, 503, 5030, "upstream %s",
		             http == 429 ? "rate limited" : "overloaded");
		a->retry_after = worker_upstream_retry_after(retry_after);
		return (1);
	}
	if (http < 200 || http > 299) {
		answer_error(a, 502, 5020, "upstream status %ld", http);
		return (1);
	}
	return (0);
}

int
worker_upstream_classify(struct upstream_answer *a, CURLcode rc, long http,
                         const char *retry_after, int toobig, const char *body,
                         size_t len)
{
	int prc;

	(void)len;
	if (classify_transport(a, rc, http, retry_after, toobig))
		return (0);
	if ((prc = parse_completion(a, body ? body : "")) == -2) {
		answer_error(a, 500, 5000, "out of memory");
		return (-1);
	}
	if (prc == -1) {
		answer_error(a, 502, 5020,
		             "upstream returned an invalid answer");
		return (0);
	}
	return (0);
}

/*
 * Server-sent events (the WHATWG rules OpenAI streams follow): lines end
 * in LF, CRLF or CR; "data:" lines of one event are joined with LF; a
 * blank line ends the event; ":" starts a comment; other fields are
 * ignored.  Each event's data is "[DONE]" or one chat.completion.chunk.
 */

#define SSE_MAX_DEFAULT (4u << 20)

static size_t
sse_max(const struct upstream_sse *s)
{
	return (s->max ? s->max : SSE_MAX_DEFAULT);
}

static int
sse_fail(int *flag)
{
	*flag = 1;
	return (-1);
}

/* Append the string v (if it is one) to b, within the stream's cap. */
static int
sse_tool_add(struct upstream_sse *s, struct buf *b, const cJSON *v)
{
	size_t n;

	if (!cJSON_IsString(v) || (n = strlen(v->valuestring)) == 0)
		return (0);
	if (b->len + n > sse_max(s))
		return (sse_fail(&s->toobig));
	if (buf_add(b, v->valuestring, n) == -1)
		return (sse_fail(&s->nomem));
	return (0);
}

/* delta.tool_calls: each item's id, function.name and
 * function.arguments pieces are joined by its index (its place in the
 * array when it has none). */
static int
sse_tools(struct upstream_sse *s, const cJSON *calls)
{
	const cJSON *tc, *idx, *fn;
	struct upstream_tool *t;
	size_t i = 0, k;

	if (!cJSON_IsArray(calls))
		return (0);
	cJSON_ArrayForEach(tc, calls)
	{
		idx = cJSON_GetObjectItemCaseSensitive(tc, "index");
		k = i++;
		if (cJSON_IsNumber(idx)) {
			if (!(idx->valuedouble >= 0) ||
			    idx->valuedouble >= UPSTREAM_TOOLS_MAX)
				return (sse_fail(&s->bad));
			k = (size_t)idx->valuedouble;
		}
		if (k >= UPSTREAM_TOOLS_MAX || !cJSON_IsObject(tc))
			return (sse_fail(&s->bad));
		if (s->tools == NULL &&
		    (s->tools = calloc(UPSTREAM_TOOLS_MAX,
		                       sizeof(*s->tools))) == NULL)
			return (sse_fail(&s->nomem));
		if (k >= s->ntools)
			s->ntools = k + 1;
		t = &s->tools[k];
		fn = cJSON_GetObjectItemCaseSensitive(tc, "function");
		/* OpenAI sends the id once; a server that repeats it must
		 * not make it grow. */
		if (t->id.len == 0 &&
		    sse_tool_add(s, &t->id,
		                 cJSON_GetObjectItemCaseSensitive(tc, "id")) ==
		            -1)
			return (-1);
		if (sse_tool_add(s, &t->name,
		                 cJSON_GetObjectItemCaseSensitive(
		                         fn, "name")) == -1 ||
		    sse_tool_add(s, &t->args,
		                 cJSON_GetObjectItemCaseSensitive(
		                         fn, "arguments")) == -1)
			return (-1);
		s->progress++;
	}
	return (0);
}

/* One event's data (NUL-terminated in s->data). */
static int
sse_event(struct upstream_sse *s)
{
	const cJSON *choices, *choice, *delta, *content, *fin, *usage, *err;
	const char *d = s->data.b;
	cJSON *root;
	size_t n;

	while (*d == ' ' || *d == '\t' || *d == '\n')
		d++;
	if (strncmp(d, "[DONE]", 6) == 0) {
		s->done = 1;
		return (0);
	}
	if (s->done)
		return (0); /* nothing counts after [DONE] */
	if ((root = cJSON_Parse(d)) == NULL || !cJSON_IsObject(root)) {
		cJSON_Delete(root);
		return (sse_fail(&s->bad));
	}
	s->events++;
	if ((err = cJSON_GetObjectItemCaseSensitive(root, "error")) != NULL &&
	    !cJSON_IsNull(err)) {
		const cJSON *m = cJSON_IsString(err)
		                         ? err
		                         : cJSON_GetObjectItemCaseSensitive(
		                                   err, "message");

		if (cJSON_IsString(m))
			(void)snprintf(s->error, sizeof(s->error), "%s",
			               m->valuestring);
		else
			(void)snprintf(s->error, sizeof(s->error), "error");
		cJSON_Delete(root);
		return (sse_fail(&s->bad));
	}
	choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
	choice =
	        cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
	delta = cJSON_GetObjectItemCaseSensitive(choice, "delta");
	content = cJSON_GetObjectItemCaseSensitive(delta, "content");
	if (cJSON_IsString(content) &&
	    (n = strlen(content->valuestring)) > 0) {
		if (s->content.len + n > sse_max(s)) {
			cJSON_Delete(root);
			return (sse_fail(&s->toobig));
		}
		if (buf_add(&s->content, content->valuestring, n) == -1) {
			cJSON_Delete(root);
			return (sse_fail(&s->nomem));
		}
	}
	if (cJSON_IsString(content) && content->valuestring[0] != '\0')
		s->progress++;
	if (sse_tools(s, cJSON_GetObjectItemCaseSensitive(
	                         delta, "tool_calls")) == -1) {
		cJSON_Delete(root);
		return (-1);
	}
	fin = cJSON_GetObjectItemCaseSensitive(choice, "finish_reason");
	if (cJSON_IsString(fin))
		s->finished = 1;
	usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
	if (cJSON_IsObject(usage)) {
		s->prompt_tokens = json_count(usage, "prompt_tokens");
		s->completion_tokens = json_count(usage, "completion_tokens");
	}
	cJSON_Delete(root);
	return (0);
}

/* One whole line (s->line, without its end). */
static int
sse_line(struct upstream_sse *s)
{
	const char *l = s->line.b, *v;
	size_t n = s->line.len, fl, vl;
	int rc = 0;

	if (n == 0) {
		if (!s->has_data)
			return (0);
		if (buf_add(&s->data, "", 1) == -1)
			return (sse_fail(&s->nomem));
		rc = sse_event(s);
		buf_reset(&s->data);
		s->has_data = 0;
		return (rc);
	}
	if (l[0] == ':')
		return (0); /* a comment (keep-alive) */
	if ((v = memchr(l, ':', n)) != NULL) {
		fl = (size_t)(v - l);
		v++;
		if (v < l + n && *v == ' ')
			v++;
		vl = n - (size_t)(v - l);
	} else {
		fl = n;
		v = l + n;
		vl = 0;
	}
	if (fl != 4 || memcmp(l, "data", 4) != 0)
		return (0); /* event:, id:, retry:, or unknown */
	if (s->data.len + vl + 1 > sse_max(s))
		return (sse_fail(&s->toobig));
	if ((s->has_data && buf_add(&s->data, "\n", 1) == -1) ||
	    buf_add(&s->data, v, vl) == -1)
		return (sse_fail(&s->nomem));
	s->has_data = 1;
	return (0);
}

int
worker_upstream_sse_feed(struct upstream_sse *s, const char *p, size_t n)
{
	size_t i = 0, j;

	if (s->bad || s->toobig || s->nomem)
		return (-1);
	while (i < n) {
		if (s->cr) {
			s->cr = 0;
			if (p[i] == '\n') {
				i++;
				continue;
			}
		}
		for (j = i; j < n && p[j] != '\r' && p[j] != '\n'; j++)
			;
		if (j > i) {
			if (s->line.len + (j - i) > sse_max(s))
				return (sse_fail(&s->toobig));
			if (buf_add(&s->line, p + i, j - i) == -1)
				return (sse_fail(&s->nomem));
		}
		if (j == n)
			break;
		s->cr = p[j] == '\r';
		i = j + 1;
		if (sse_line(s) == -1)
			return (-1);
		buf_reset(&s->line);
	}
	return (0);
}

int
worker_upstream_sse_end(struct upstream_sse *s)
{
	if (s->bad || s->toobig || s->nomem)
		return (-1);
	if (s->line.len > 0) {
		if (sse_line(s) == -1)
			return (-1);
		buf_reset(&s->line);
	}
	buf_reset(&s->line); /* a blank line ends the last event */
	return (sse_line(s));
}

void
worker_upstream_tools_free(struct upstream_tool *t, size_t n)
{
	if (t == NULL)
		return;
	for (size_t i = 0; i < n; i++) {
		buf_free(&t[i].id);
		buf_free(&t[i].name);
		buf_free(&t[i].args);
	}
	free(t);
}

void
worker_upstream_sse_free(struct upstream_sse *s)
{
	buf_free(&s->line);
	buf_free(&s->data);
	buf_free(&s->content);
	worker_upstream_tools_free(s->tools, UPSTREAM_TOOLS_MAX);
	s->tools = NULL;
	s->ntools = 0;
}

/* Classify a finished stream; a->content takes s->content (so it is set
 * on failure too). */
static void
classify_stream(struct upstream_answer *a, CURLcode rc, long http,
                const char *retry_after, struct upstream_sse *s)
{
	int http_ok = http >= 200 && http <= 299;

	/* Our own abort from the write callback: the parser says why. */
	if (rc == CURLE_WRITE_ERROR && http_ok &&
	    (s->bad || s->nomem || s->toobig))
		rc = CURLE_OK;
	if (classify_transport(a, rc, http, retry_after, http_ok && s->toobig))
		;
	else if (s->nomem)
		answer_error(a, 500, 5000, "out of memory");
	else if (!s->bad && worker_upstream_sse_end(s) == -1 && s->toobig)
		answer_error(a, 502, 5020, "upstream answer too large");
	else if (s->bad && s->error[0] != '\0')
		answer_error(a, 502, 5020, "upstream error: %s", s->error);
	else if (s->bad || s->nomem || (s->events == 0 && !s->done))
		answer_error(a, 502, 5020,
		             "upstream returned an invalid answer");
	else if (!s->done && !s->finished)
		answer_error(a, 502, 5020, "upstream stream ended early");
	if (!http_ok)
		return;
	a->prompt_tokens = s->prompt_tokens;
	a->completion_tokens = s->completion_tokens;
	if (s->content.len > 0 && buf_add(&s->content, "", 1) == 0) {
		a->content = s->content.b;
		a->content_len = s->content.len - 1;
		memset(&s->content, 0, sizeof(s->content));
	}
	if (a->status == 200 && s->ntools > 0) {
		a->tools = s->tools;
		a->ntools = s->ntools;
		s->tools = NULL;
		s->ntools = 0;
	}
}

/* Classify a finished plugin call; a->content takes the body on
 * success. */
static void
classify_post(struct upstream_answer *a, CURLcode rc, long http, int toobig,
              struct buf *body)
{
	cJSON *j;

	answer_reset_err(a, http);
	if (toobig || rc == CURLE_FILESIZE_EXCEEDED)
		answer_error(a, 502, 5020, "answer too large");
	else if (rc == CURLE_OPERATION_TIMEDOUT)
		answer_error(a, 504, 5040, "timed out");
	else if (rc != CURLE_OK)
		answer_error(a, 502, 5020, "unreachable: %s",
		             curl_easy_strerror(rc));
	else if (http < 200 || http > 299)
		answer_error(a, 502, 5020, "answered status %ld", http);
	else if (buf_add(body, "", 1) == -1)
		answer_error(a, 500, 5000, "internal error");
	else if ((j = cJSON_ParseWithOpts(body->b, NULL, 1)) == NULL)
		answer_error(a, 502, 5020, "answered invalid JSON");
	else {
		cJSON_Delete(j);
		a->content = body->b;
		a->content_len = body->len - 1;
		memset(body, 0, sizeof(*body));
	}
}

/*
 * The curl multi handle on the loop.
 */

static void up_check_done(struct upstream *);
static void up_flush(struct upstream *);

static void
up_fd_cb(struct loop *l, int fd, uint32_t events, void *arg)
{
	struct upstream *up = arg;
	int mask = 0, running;

	(void)l;
	if (events & (EPOLLIN | EPOLLHUP))
		mask |= CURL_CSELECT_IN;
	if (events & EPOLLOUT)
		mask |= CURL_CSELECT_OUT;
	if (events & EPOLLERR)
		mask |= CURL_CSELECT_ERR;
	(void)curl_multi_socket_action(up->multi, fd, mask, &running);
	up_flush(up);
	up_check_done(up);
}

static uint32_t
poll_events(int what)
{
	uint32_t ev = 0;

	if (what & CURL_POLL_IN)
		ev |= EPOLLIN;
	if (what & CURL_POLL_OUT)
		ev |= EPOLLOUT;
	return (ev);
}

/* CURLMOPT_SOCKETFUNCTION.  socketp (set with curl_multi_assign) says
 * whether we watch this socket already: it is curl's own per-socket
 * state, so a reused fd number cannot mislead us. */
static int
up_socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct upstream *up = userp;
	uint32_t ev = poll_events(what);

	(void)e;
	if (what == CURL_POLL_REMOVE) {
		loop_fd_del(up->loop, s);
		return (0);
	}
	if (socketp != NULL && loop_fd_mod(up->loop, s, ev) == 0)
		return (0);
	/* New socket (or the watcher got lost): a watcher left over from
	 * a closed socket with the same number goes first. */
	loop_fd_del(up->loop, s);
	if (loop_fd_add(up->loop, s, ev, up_fd_cb, up) == -1)
		return (0); /* the call times out; -1 would abort them all */
	(void)curl_multi_assign(up->multi, s, up);
	return (0);
}

/* CURLMOPT_TIMERFUNCTION: only arm the loop's timer. */
static int
up_timer_cb(CURLM *m, long timeout_ms, void *userp)
{
	struct upstream *up = userp;

	(void)m;
	if (timeout_ms < 0)
		loop_timer_stop(up->timer);
	else
		loop_timer_set(up->timer, timeout_ms);
	return (0);
}

static void
up_timeout(struct loop *l, void *arg)
{
	struct upstream *up = arg;
	int running;

	(void)l;
	(void)curl_multi_socket_action(up->multi, CURL_SOCKET_TIMEOUT, 0,
	                               &running);
	up_flush(up);
	up_check_done(up);
}

static size_t
up_write(char *p, size_t size, size_t n, void *arg)
{
	struct upstream_call *c = arg;
	size_t len = size * n;

	if (len > c->up->conf.max_body ||
	    c->resp.len > c->up->conf.max_body - len) {
		c->toobig = 1;
		return (0);
	}
	if (buf_add(&c->resp, p, len) == -1)
		return (0);
	return (len);
}

/* A stream's bytes: an answer other than 2xx is kept as a body (it is an
 * error); a 2xx one goes through the SSE parser.  Returning 0 aborts the
 * transfer (CURLE_WRITE_ERROR) once the stream cannot go on. */
static size_t
up_write_stream(char *p, size_t size, size_t n, void *arg)
{
	struct upstream_call *c = arg;
	size_t len = size * n;

	if (c->http == 0)
		(void)curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE,
		                        &c->http);
	if (c->http < 200 || c->http > 299)
		return (up_write(p, size, n, arg));
	if (worker_upstream_sse_feed(&c->sse, p, len) == -1)
		return (0);
	if ((c->sse.content.len > c->delivered ||
	     c->sse.progress != c->pdelivered) &&
	    !c->pending) {
		c->pending = 1;
		TAILQ_INSERT_TAIL(&c->up->pending, c, pentry);
	}
	return (len);
}

/* Give each stream with new content what arrived, outside curl.  A
 * callback may cancel any call: take one at a time. */
static void
up_flush(struct upstream *up)
{
	struct upstream_call *c;
	size_t len;

	while ((c = TAILQ_FIRST(&up->pending)) != NULL) {
		TAILQ_REMOVE(&up->pending, c, pentry);
		c->pending = 0;
		len = c->sse.content.len;
		c->delivered = len;
		c->pdelivered = c->sse.progress;
		c->delta_cb(c->arg, c->sse.content.b, len);
	}
}

/*
 * Easy handles: a pool of idle ones, set up once with what never changes.
 */

static CURL *
easy_get(struct upstream *up)
{
	CURL *e;

	if (up->npool > 0)
		return (up->pool[--up->npool]);
	if ((e = curl_easy_init()) == NULL)
		return (NULL);
	if (curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_HTTP_VERSION,
	                     (long)CURL_HTTP_VERSION_1_1) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") !=
	            CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_PROXY, "") != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_USERAGENT,
	                     "troupe-worker/" TROUPE_VERSION) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_POST, 1L) != CURLE_OK) {
		curl_easy_cleanup(e);
		return (NULL);
	}
	return (e);
}

static void
easy_put(struct upstream *up, CURL *e)
{
	CURL **p;
	size_t n;

	if (up->npool == up->cappool) {
		n = (size_t)up->conf.connections;
		if (up->cappool >= n ||
		    (p = realloc(up->pool, n * sizeof(*p))) == NULL) {
			curl_easy_cleanup(e);
			return;
		}
		up->pool = p;
		up->cappool = n;
	}
	up->pool[up->npool++] = e;
}

/*
 * Hosts.
 */

/* The scheme and authority of url: "http://h:9090" of
 * "http://h:9090/v1/...". */
static size_t
host_key_len(const char *url)
{
	const char *p = strstr(url, "://");

	if (p == NULL)
		return (strlen(url));
	p += 3;
	return ((size_t)(p - url) + strcspn(p, "/?#"));
}

static uint32_t
host_hash(const char *s, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++) {
		h ^= (unsigned char)tolower((unsigned char)s[i]);
		h *= 16777619u;
	}
	return (h);
}

static struct up_host *
host_get(struct upstream *up, const char *url)
{
	size_t n = host_key_len(url);
	uint32_t h = host_hash(url, n);
	struct up_host **b = &up->hosts[h % UP_HOST_BUCKETS], *hs;

	for (hs = *b; hs != NULL; hs = hs->hnext)
		if (hs->hash == h && strlen(hs->key) == n &&
		    strncasecmp(hs->key, url, n) == 0)
			return (hs);
	if ((hs = calloc(1, sizeof(*hs) + n + 1)) == NULL)
		return (NULL);
	memcpy(hs->key, url, n);
	hs->hash = h;
	TAILQ_INIT(&hs->queue);
	hs->hnext = *b;
	*b = hs;
	return (hs);
}

static void
host_release(struct upstream *up, struct up_host *hs)
{
	struct up_host **p = &up->hosts[hs->hash % UP_HOST_BUCKETS];

	if (hs->active > 0 || hs->nqueued > 0)
		return;
	for (; *p != NULL; p = &(*p)->hnext)
		if (*p == hs) {
			*p = hs->hnext;
			free(hs);
			return;
		}
}

/*
 * Calls.
 */

static void
call_free(struct upstream_call *c)
{
	worker_upstream_sse_free(&c->sse);
	buf_free(&c->req);
	buf_free(&c->resp);
	free(c->xnodes);
	free(c->xhdr);
	free(c->ts_hdr);
	free(c);
}

/* Answer c later, from the defer timer, with status (504 or 500). */
static void
call_defer(struct upstream *up, struct upstream_call *c, uint64_t status)
{
	c->state = CALL_DEFERRED;
	c->host = NULL;
	c->defer_status = status;
	TAILQ_INSERT_TAIL(&up->deferred, c, entry);
	loop_timer_set(up->defer_timer, 0);
}

/* Hand c to curl; -1 (nothing changed) if that cannot be done. */
static int
call_activate(struct upstream *up, struct upstream_call *c)
{
	struct curl_slist *headers = up->headers;
	const char *url = c->url; /* curl's type check wants a pointer */
	uint64_t now = now_mono_ms();
	long timeout_ms, connect_ms;
	CURL *e;

	if ((e = easy_get(up)) == NULL)
		return (-1);
	timeout_ms = c->deadline_ms > now ? (long)(c->deadline_ms - now) : 1;
	connect_ms = up->conf.connect_timeout_ms;
	if (connect_ms > timeout_ms)
		connect_ms = timeout_ms;
	if (c->stream)
		headers = up->sheaders;
	if (c->ts_node.data != NULL) {
		c->ts_node.next = headers;
		headers = &c->ts_node;
	}
	if (c->tp_node.data != NULL) {
		c->tp_node.next = headers;
		headers = &c->tp_node;
	}
	for (size_t i = c->nx; i > 0; i--) {
		c->xnodes[i - 1].next = headers;
		headers = &c->xnodes[i - 1];
	}
	if (curl_easy_setopt(e, CURLOPT_URL, url) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
	                     (curl_off_t)c->req.len) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_POSTFIELDS, c->req.b) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, connect_ms) !=
	            CURLE_OK ||
	    curl_easy_setopt(
	            e, CURLOPT_MAXFILESIZE_LARGE,
	            (curl_off_t)(c->stream ? 0 : up->conf.max_body)) !=
	            CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION,
	                     c->stream ? up_write_stream : up_write) !=
	            CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_WRITEDATA, c) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_PRIVATE, c) != CURLE_OK)
		goto fail;
	c->easy = e;
	c->toobig = 0;
	/* Starts from the timer curl arms now, never from here. */
	if (curl_multi_add_handle(up->multi, e) != CURLM_OK)
		goto fail;
	c->state = CALL_ACTIVE;
	c->host->active++;
	TAILQ_INSERT_TAIL(&up->active, c, entry);
	return (0);
fail:
	c->easy = NULL;
	curl_easy_cleanup(e); /* its options may be half set */
	return (-1);
}

/* Start what waits on hs while it has room.  Calls no callback. */
static void
host_next(struct upstream *up, struct up_host *hs)
{
	struct upstream_call *c;

	while (hs->active < (size_t)up->conf.connections &&
	       (c = TAILQ_FIRST(&hs->queue)) != NULL) {
		TAILQ_REMOVE(&hs->queue, c, entry);
		hs->nqueued--;
		up->nqueued--;
		if (c->deadline_ms <= now_mono_ms())
			call_defer(up, c, 504); /* expired while waiting */
		else if (call_activate(up, c) == -1)
			call_defer(up, c, 500);
	}
}

/* Take c off curl and its host; its easy handle goes back to the pool. */
static void
call_deactivate(struct upstream *up, struct upstream_call *c)
{
	struct up_host *hs = c->host;

	(void)curl_multi_remove_handle(up->multi, c->easy);
	easy_put(up, c->easy);
	c->easy = NULL;
	TAILQ_REMOVE(&up->active, c, entry);
	hs->active--;
	c->host = NULL;
	host_next(up, hs);
	host_release(up, hs);
}

static void
answer_reset(struct upstream_answer *a)
{
	memset(a, 0, sizeof(*a));
	a->status = 200;
}

/* The client span of call c (its id is in c's traceparent header). */
static void
call_span(const struct upstream_call *c, const struct upstream_answer *a,
          long http)
{
	struct trace_span s;

	if (!trace_enabled || c->tp_hdr[0] == '\0')
		return;
	s = (struct trace_span){.name = c->post ? "plugin" : "upstream",
	                        .kind = TRACE_CLIENT,
	                        .start_ns = trace_wall_of_mono(c->start_ns),
	                        .http_status = (int)http,
	                        .error = a->status != 200,
	                        .url = MSTR(c->url)};
	trace_end_derived(MSTR(c->tp_hdr + 13), c->start_ns, &s);
}

static void
up_deferred(struct loop *l, void *arg)
{
	struct upstream *up = arg;
	struct upstream_call *c;
	struct upstream_answer a;
	upstream_done_cb cb;
	void *cbarg;

	(void)l;
	/* Callbacks may start or cancel calls: take one at a time. */
	while ((c = TAILQ_FIRST(&up->deferred)) != NULL) {
		TAILQ_REMOVE(&up->deferred, c, entry);
		up->ncalls--;
		answer_reset(&a);
		rl_signal_init(&a.sig); /* never reached the upstream */
		if (c->defer_status == 504)
			answer_error(&a, 504, 5040, "%s",
			             c->post ? "timed out"
			                     : "upstream deadline exceeded");
		else
			answer_error(&a, 500, 5000, "internal error");
		a.elapsed_us = (now_mono_ns() - c->start_ns) / 1000;
		cb = c->cb;
		cbarg = c->arg;
		call_span(c, &a, 0);
		call_free(c);
		cb(cbarg, &a);
	}
}

int
worker_upstream_coze_code(const char *body, size_t len, int64_t *code)
{
	const cJSON *v, *e;
	cJSON *root;
	int rc = -1;

	if (body == NULL || len == 0 || len > 65536 ||
	    (root = cJSON_ParseWithLength(body, len)) == NULL)
		return (-1);
	v = cJSON_GetObjectItemCaseSensitive(root, "code");
	if (!cJSON_IsNumber(v) &&
	    (e = cJSON_GetObjectItemCaseSensitive(root, "error")) != NULL)
		v = cJSON_GetObjectItemCaseSensitive(e, "code");
	if (cJSON_IsNumber(v) && v->valuedouble >= -1e15 &&
	    v->valuedouble <= 1e15) {
		*code = (int64_t)v->valuedouble;
		rc = 0;
	} else if (cJSON_IsString(v) && v->valuestring != NULL &&
	           v->valuestring[0] != '\0' &&
	           strspn(v->valuestring, "0123456789") ==
	                   strlen(v->valuestring) &&
	           strlen(v->valuestring) < 10) {
		*code = strtoll(v->valuestring, NULL, 10);
		rc = 0;
	}
	cJSON_Delete(root);
	return (rc);
}

/* Read every rate-limit signal of a finished call into a->sig. */
static void
up_signal(struct upstream_answer *a, struct upstream_call *c, CURLcode rc,
          long http)
{
	struct curl_header *h, *prev = NULL;
	uint64_t now = now_wall_ms();
	int64_t code;

	rl_signal_init(&a->sig);
	if (c->post)
		return; /* a plugin, not the bot's upstream */
	if (rc == CURLE_OPERATION_TIMEDOUT)
		rl_signal_timeout(&a->sig);
	if (http > 0)
		rl_signal_status(&a->sig, http);
	while ((h = curl_easy_nextheader(c->easy, CURLH_HEADER, -1, prev)) !=
	       NULL) {
		if (h->name != NULL && h->value != NULL)
			rl_signal_header(&a->sig, h->name, strlen(h->name),
			                 h->value, strlen(h->value), now);
		prev = h;
	}
	/* Coze answers its codes with HTTP 200 too: read the body of an
	 * error status, or of a 2xx that was not a chat completion. */
	if ((http >= 400 || a->status == 502) && !c->stream &&
	    c->resp.len > 0 &&
	    worker_upstream_coze_code(c->resp.b, c->resp.len, &code) == 0)
		rl_signal_coze_code(&a->sig, code);
	rl_signal_finish(&a->sig);
}

static void
up_finish(struct upstream *up, struct upstream_call *c, CURLcode rc)
{
	struct upstream_answer a;
	struct curl_header *h;
	const char *retry_after = NULL;
	upstream_done_cb cb = c->cb;
	void *arg = c->arg;
	long http = 0;

	(void)curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &http);
	if ((http == 429 || http == 503) &&
	    curl_easy_header(c->easy, "Retry-After", 0, CURLH_HEADER, -1,
	                     &h) == CURLHE_OK)
		retry_after = h->value;
	if (c->stream) {
		if (c->http == 0)
			c->http = http;
		classify_stream(&a, rc, http, retry_after, &c->sse);
	} else if (c->post)
		classify_post(&a, rc, http, c->toobig, &c->resp);
	else if (buf_reserve(&c->resp, 1) == 0) {
		c->resp.b[c->resp.len] = '\0';
		(void)worker_upstream_classify(&a, rc, http, retry_after,
		                               c->toobig, c->resp.b,
		                               c->resp.len);
	} else
		(void)worker_upstream_classify(&a, rc, http, retry_after,
		                               c->toobig, "", 0);
	a.elapsed_us = (now_mono_ns() - c->start_ns) / 1000;
	up_signal(&a, c, rc, http);
	/* A Coze throttle code in an error body is a throttle too. */
	if (a.sig.throttled && a.status == 502 && !c->post) {
		answer_error(&a, 503, 5030, "upstream rate limited");
		a.retry_after = worker_upstream_retry_after(retry_after);
	}
	if (a.sig.throttled && a.sig.retry_after_ms > 0)
		a.retry_after = (uint64_t)(a.sig.retry_after_ms + 999) / 1000;

	if (c->pending) {
		TAILQ_REMOVE(&up->pending, c, pentry);
		c->pending = 0;
	}
	call_deactivate(up, c);
	up->ncalls--;
	call_span(c, &a, http);
	call_free(c);
	cb(arg, &a);
}

static void
up_check_done(struct upstream *up)
{
	struct upstream_call *c;
	CURLMsg *cm;
	CURLcode rc;
	char *priv;
	int left;

	while ((cm = curl_multi_info_read(up->multi, &left)) != NULL) {
		if (cm->msg != CURLMSG_DONE)
			continue;
		rc = cm->data.result;
		priv = NULL;
		(void)curl_easy_getinfo(cm->easy_handle, CURLINFO_PRIVATE,
		                        &priv);
		if ((c = (struct upstream_call *)(void *)priv) == NULL)
			continue;
		up_finish(up, c, rc);
	}
}

/* A traceparent is 55 characters of [0-9a-f-]; anything else (a CR or LF
 * above all) is not sent. */
static int
traceparent_ok(struct mstr tp)
{
	if (tp.n < 16 || tp.n > 64)
		return (0);
	for (uint32_t i = 0; i < tp.n; i++)
		if (!isxdigit((unsigned char)tp.p[i]) && tp.p[i] != '-')
			return (0);
	return (1);
}

/* A tracestate the edge checked: 1 to UP_TRACESTATE_MAX characters of
 * printable ASCII (no CR or LF can reach the header). */
static int
tracestate_ok(struct mstr ts)
{
	if (ts.n == 0 || ts.n > UP_TRACESTATE_MAX)
		return (0);
	for (uint32_t i = 0; i < ts.n; i++)
		if (ts.p[i] < 0x20 || ts.p[i] > 0x7e)
			return (0);
	return (1);
}

/* Extra header lines of a plugin call (taken by the call on success). */
struct call_hdrs {
	struct curl_slist *nodes;
	size_t n;
	char *text;
};

static struct upstream_call *
call_start(struct upstream *up, const char *url, struct buf *body,
           struct mstr traceparent, struct mstr tracestate, int64_t timeout_ms,
           upstream_delta_cb delta_cb, upstream_done_cb cb, void *arg,
           const struct call_hdrs *post)
{
	size_t ulen = strlen(url);
	struct upstream_call *c;
	struct up_host *hs;

	if ((c = calloc(1, sizeof(*c) + ulen + 1)) == NULL)
		return (NULL);
	/* tracestate only goes with the traceparent it belongs to. */
	if (traceparent_ok(traceparent) && tracestate_ok(tracestate)) {
		if ((c->ts_hdr = malloc(12 + tracestate.n + 1)) == NULL) {
			free(c);
			return (NULL);
		}
		memcpy(c->ts_hdr, "tracestate: ", 12);
		memcpy(c->ts_hdr + 12, tracestate.p, tracestate.n);
		c->ts_hdr[12 + tracestate.n] = '\0';
		c->ts_node.data = c->ts_hdr;
	}
	if ((hs = host_get(up, url)) == NULL) {
		free(c->ts_hdr);
		free(c);
		return (NULL);
	}
	memcpy(c->url, url, ulen + 1);
	c->up = up;
	c->host = hs;
	c->cb = cb;
	c->arg = arg;
	c->delta_cb = delta_cb;
	c->stream = delta_cb != NULL;
	if (post != NULL) {
		c->post = 1;
		c->xnodes = post->nodes;
		c->nx = post->n;
		c->xhdr = post->text;
	}
	c->sse.max = up->conf.max_body;
	c->start_ns = now_mono_ns();
	c->deadline_ms =
	        now_mono_ms() + (uint64_t)(timeout_ms < 1 ? 1 : timeout_ms);
	if (traceparent_ok(traceparent)) {
		(void)snprintf(c->tp_hdr, sizeof(c->tp_hdr),
		               "traceparent: %.*s", (int)traceparent.n,
		               traceparent.p);
		trace_enter(c->tp_hdr + 13, traceparent.n,
		            c->post ? "plugin" : "upstream", c->start_ns);
		c->tp_node.data = c->tp_hdr;
		c->tp_node.next = up->headers;
	}
	c->req = *body;
	if (hs->active < (size_t)up->conf.connections &&
	    TAILQ_EMPTY(&hs->queue)) {
		if (call_activate(up, c) == -1) {
			c->req = (struct buf){0}; /* the caller's again */
			host_release(up, hs);
			free(c->ts_hdr);
			free(c); /* the headers are the caller's again */
			return (NULL);
		}
	} else {
		c->state = CALL_QUEUED;
		TAILQ_INSERT_TAIL(&hs->queue, c, entry);
		hs->nqueued++;
		up->nqueued++;
	}
	memset(body, 0, sizeof(*body));
	up->ncalls++;
	return (c);
}

struct upstream_call *
worker_upstream_start(struct upstream *up, const char *url, struct buf *body,
                      struct mstr traceparent, struct mstr tracestate,
                      int64_t timeout_ms, upstream_done_cb cb, void *arg)
{
	return (call_start(up, url, body, traceparent, tracestate, timeout_ms,
	                   NULL, cb, arg, NULL));
}

struct upstream_call *
worker_upstream_start_stream(struct upstream *up, const char *url,
                             struct buf *body, struct mstr traceparent,
                             struct mstr tracestate, int64_t timeout_ms,
                             upstream_delta_cb delta_cb, upstream_done_cb cb,
                             void *arg)
{
	if (delta_cb == NULL)
		return (NULL);
	return (call_start(up, url, body, traceparent, tracestate, timeout_ms,
	                   delta_cb, cb, arg, NULL));
}

void
worker_upstream_cancel(struct upstream_call *c)
{
	struct upstream *up = c->up;
	struct up_host *hs = c->host;

	switch (c->state) {
	case CALL_ACTIVE:
		call_deactivate(up, c);
		break;
	case CALL_QUEUED:
		TAILQ_REMOVE(&hs->queue, c, entry);
		hs->nqueued--;
		up->nqueued--;
		host_release(up, hs);
		break;
	case CALL_DEFERRED:
		TAILQ_REMOVE(&up->deferred, c, entry);
		break;
	}
	if (c->pending)
		TAILQ_REMOVE(&up->pending, c, pentry);
	up->ncalls--;
	call_free(c);
}

struct upstream_call *
worker_upstream_post(struct upstream *up, const char *url, struct buf *body,
                     struct mstr traceparent, struct mstr tracestate,
                     const char *const *headers, size_t nheaders,
                     int64_t timeout_ms, upstream_done_cb cb, void *arg)
{
	struct curl_slist *nodes = NULL;
	struct upstream_call *c;
	struct call_hdrs h;
	size_t len = 0, off = 0;
	char *hdr = NULL;

	for (size_t i = 0; i < nheaders; i++)
		len += strlen(headers[i]) + 1;
	if (nheaders > 0 &&
	    ((nodes = calloc(nheaders, sizeof(*nodes))) == NULL ||
	     (hdr = malloc(len)) == NULL)) {
		free(nodes);
		return (NULL);
	}
	for (size_t i = 0; i < nheaders; i++) {
		size_t n = strlen(headers[i]) + 1;

		memcpy(hdr + off, headers[i], n);
		nodes[i].data = hdr + off;
		off += n;
	}
	h.nodes = nodes;
	h.n = nheaders;
	h.text = hdr;
	c = call_start(up, url, body, traceparent, tracestate, timeout_ms,
	               NULL, cb, arg, &h);
	if (c == NULL) {
		free(nodes);
		free(hdr);
	}
	return (c);
}

const char *
worker_upstream_content(const struct upstream_call *c, size_t *len)
{
	*len = c->stream ? c->sse.content.len : 0;
	return (*len > 0 ? c->sse.content.b : NULL);
}

size_t
worker_upstream_active(const struct upstream *up)
{
	return (up->ncalls);
}

size_t
worker_upstream_queued(const struct upstream *up)
{
	return (up->nqueued);
}

void
worker_upstream_conf(struct upstream *up, const struct upstream_conf *conf)
{
	up->conf = *conf;
	if (up->conf.connections < 1)
		up->conf.connections = 1;
	(void)curl_multi_setopt(up->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
	                        up->conf.connections);
	(void)curl_multi_setopt(up->multi, CURLMOPT_MAXCONNECTS,
	                        up->conf.connections);
	while (up->npool > (size_t)up->conf.connections)
		curl_easy_cleanup(up->pool[--up->npool]);
	/* More room per host: start what waits. */
	for (size_t i = 0; i < UP_HOST_BUCKETS; i++)
		for (struct up_host *hs = up->hosts[i]; hs != NULL;
		     hs = hs->hnext)
			host_next(up, hs);
}

struct upstream *
worker_upstream_new(struct loop *l, const struct upstream_conf *conf)
{
	struct upstream *up;
	struct curl_slist *h;
	static const char *const headers[] = {
	        "Content-Type: application/json",
	        "Accept: application/json",
	        "Expect:",
	};
	static const char *const sheaders[] = {
	        "Content-Type: application/json",
	        "Accept: text/event-stream",
	        "Expect:",
	};

	if ((up = calloc(1, sizeof(*up))) == NULL)
		return (NULL);
	up->loop = l;
	TAILQ_INIT(&up->active);
	TAILQ_INIT(&up->deferred);
	TAILQ_INIT(&up->pending);
	for (size_t i = 0; i < nitems(headers); i++) {
		if ((h = curl_slist_append(up->headers, headers[i])) == NULL)
			goto fail;
		up->headers = h;
		if ((h = curl_slist_append(up->sheaders, sheaders[i])) == NULL)
			goto fail;
		up->sheaders = h;
	}
	if ((up->timer = loop_timer_new(l, up_timeout, up)) == NULL ||
	    (up->defer_timer = loop_timer_new(l, up_deferred, up)) == NULL)
		goto fail;
	if ((up->multi = curl_multi_init()) == NULL)
		goto fail;
	if (curl_multi_setopt(up->multi, CURLMOPT_SOCKETFUNCTION,
	                      up_socket_cb) != CURLM_OK ||
	    curl_multi_setopt(up->multi, CURLMOPT_SOCKETDATA, up) !=
	            CURLM_OK ||
	    curl_multi_setopt(up->multi, CURLMOPT_TIMERFUNCTION,
	                      up_timer_cb) != CURLM_OK ||
	    curl_multi_setopt(up->multi, CURLMOPT_TIMERDATA, up) != CURLM_OK)
		goto fail;
	worker_upstream_conf(up, conf);
	return (up);
fail:
	worker_upstream_free(up);
	return (NULL);
}

void
worker_upstream_free(struct upstream *up)
{
	struct upstream_call *c;
	struct up_host *hs;

	if (up == NULL)
		return;
	while ((c = TAILQ_FIRST(&up->active)) != NULL) {
		TAILQ_REMOVE(&up->active, c, entry);
		(void)curl_multi_remove_handle(up->multi, c->easy);
		curl_easy_cleanup(c->easy);
		call_free(c);
	}
	while ((c = TAILQ_FIRST(&up->deferred)) != NULL) {
		TAILQ_REMOVE(&up->deferred, c, entry);
		call_free(c);
	}
	for (size_t i = 0; i < UP_HOST_BUCKETS; i++)
		while ((hs = up->hosts[i]) != NULL) {
			up->hosts[i] = hs->hnext;
			while ((c = TAILQ_FIRST(&hs->queue)) != NULL) {
				TAILQ_REMOVE(&hs->queue, c, entry);
				call_free(c);
			}
			free(hs);
		}
	while (up->npool > 0)
		curl_easy_cleanup(up->pool[--up->npool]);
	free(up->pool);
	if (up->multi != NULL)
		(void)curl_multi_cleanup(up->multi);
	if (up->timer != NULL)
		loop_timer_free(up->timer);
	if (up->defer_timer != NULL)
		loop_timer_free(up->defer_timer);
	curl_slist_free_all(up->headers);
	curl_slist_free_all(up->sheaders);
	free(up);
}
