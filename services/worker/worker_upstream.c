/* SPDX-License-Identifier: ISC */
/*
 * worker_upstream: calls a bot's OpenAI-compatible upstream
 * (POST <base>/v1/chat/completions, "stream": false) with libcurl's multi
 * interface on the worker's own loop, and turns whatever happened into the
 * answer the client gets (PRODUCT.md §2 codes).
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

#define UP_URL_MAX 2048
#define UP_RETRY_AFTER_MAX 3600
#define UP_HOST_BUCKETS 64

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
	/* Our own list node for the per-call traceparent header: it points
	 * at the shared headers, so a call allocates no header list. */
	struct curl_slist tp_node;
	char tp_hdr[80];
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
	struct upstream_conf conf;
	struct call_list active;
	struct call_list deferred;
	size_t ncalls; /* queued + active + deferred */
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

int
worker_upstream_request(struct buf *out, struct mstr model,
                        struct mstr system_prompt, struct mstr context,
                        struct mstr query)
{
	context = trim_context(context);
	if (buf_reserve(out, 96 + model.n + system_prompt.n + context.n +
	                             query.n + query.n / 8) == -1)
		return (-1);
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
	if (buf_adds(out, "{\"role\":\"user\",\"content\":") == -1 ||
	    buf_add_json_str(out, query.p, query.n) == -1 ||
	    buf_adds(out, "}],\"stream\":false}") == -1)
		return (-1);
	return (0);
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

int
worker_upstream_classify(struct upstream_answer *a, CURLcode rc, long http,
                         const char *retry_after, int toobig, const char *body,
                         size_t len)
{
	int prc;

	(void)len;
	a->status = 200;
	a->code = 0;
	a->retry_after = 0;
	a->msg[0] = '\0';
	a->content = NULL;
	a->content_len = 0;
	a->prompt_tokens = a->completion_tokens = 0;
	a->http_status = http;

	if (toobig || rc == CURLE_FILESIZE_EXCEEDED) {
		answer_error(a, 502, 5020, "upstream answer too large");
		return (0);
	}
	if (rc == CURLE_OPERATION_TIMEDOUT) {
		answer_error(a, 504, 5040, "upstream deadline exceeded");
		return (0);
	}
	if (rc != CURLE_OK) {
		answer_error(a, 502, 5020, "upstream unreachable: %s",
		             curl_easy_strerror(rc));
		return (0);
	}
	if (http == 429) {
		answer_error(a, 503, 5030, "upstream rate limited");
		a->retry_after = worker_upstream_retry_after(retry_after);
		return (0);
	}
	if (http < 200 || http > 299) {
		answer_error(a, 502, 5020, "upstream status %ld", http);
		return (0);
	}
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
 * The curl multi handle on the loop.
 */

static void up_check_done(struct upstream *);

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
	    curl_easy_setopt(e, CURLOPT_POST, 1L) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, up_write) != CURLE_OK) {
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
	buf_free(&c->req);
	buf_free(&c->resp);
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
	if (c->tp_node.data != NULL)
		headers = &c->tp_node;
	if (curl_easy_setopt(e, CURLOPT_URL, url) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
	                     (curl_off_t)c->req.len) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_POSTFIELDS, c->req.b) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms) != CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, connect_ms) !=
	            CURLE_OK ||
	    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE,
	                     (curl_off_t)up->conf.max_body) != CURLE_OK ||
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
		if (c->defer_status == 504)
			answer_error(&a, 504, 5040,
			             "upstream deadline exceeded");
		else
			answer_error(&a, 500, 5000, "internal error");
		a.elapsed_us = (now_mono_ns() - c->start_ns) / 1000;
		cb = c->cb;
		cbarg = c->arg;
		call_free(c);
		cb(cbarg, &a);
	}
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
	if (http == 429 && curl_easy_header(c->easy, "Retry-After", 0,
	                                    CURLH_HEADER, -1, &h) == CURLHE_OK)
		retry_after = h->value;
	if (buf_reserve(&c->resp, 1) == 0) {
		c->resp.b[c->resp.len] = '\0';
		(void)worker_upstream_classify(&a, rc, http, retry_after,
		                               c->toobig, c->resp.b,
		                               c->resp.len);
	} else
		(void)worker_upstream_classify(&a, rc, http, retry_after,
		                               c->toobig, "", 0);
	a.elapsed_us = (now_mono_ns() - c->start_ns) / 1000;

	call_deactivate(up, c);
	up->ncalls--;
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

struct upstream_call *
worker_upstream_start(struct upstream *up, const char *url, struct buf *body,
                      struct mstr traceparent, int64_t timeout_ms,
                      upstream_done_cb cb, void *arg)
{
	size_t ulen = strlen(url);
	struct upstream_call *c;
	struct up_host *hs;

	if ((c = calloc(1, sizeof(*c) + ulen + 1)) == NULL)
		return (NULL);
	if ((hs = host_get(up, url)) == NULL) {
		free(c);
		return (NULL);
	}
	memcpy(c->url, url, ulen + 1);
	c->up = up;
	c->host = hs;
	c->cb = cb;
	c->arg = arg;
	c->start_ns = now_mono_ns();
	c->deadline_ms =
	        now_mono_ms() + (uint64_t)(timeout_ms < 1 ? 1 : timeout_ms);
	if (traceparent_ok(traceparent)) {
		(void)snprintf(c->tp_hdr, sizeof(c->tp_hdr),
		               "traceparent: %.*s", (int)traceparent.n,
		               traceparent.p);
		c->tp_node.data = c->tp_hdr;
		c->tp_node.next = up->headers;
	}
	c->req = *body;
	if (hs->active < (size_t)up->conf.connections &&
	    TAILQ_EMPTY(&hs->queue)) {
		if (call_activate(up, c) == -1) {
			c->req = (struct buf){0}; /* the caller's again */
			host_release(up, hs);
			free(c);
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
	up->ncalls--;
	call_free(c);
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

	if ((up = calloc(1, sizeof(*up))) == NULL)
		return (NULL);
	up->loop = l;
	TAILQ_INIT(&up->active);
	TAILQ_INIT(&up->deferred);
	for (size_t i = 0; i < nitems(headers); i++) {
		if ((h = curl_slist_append(up->headers, headers[i])) == NULL)
			goto fail;
		up->headers = h;
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
	free(up);
}
