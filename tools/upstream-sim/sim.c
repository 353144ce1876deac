/* SPDX-License-Identifier: ISC */
/*
 * troupe-upstream-sim: an OpenAI-compatible LLM upstream simulator.
 *
 * Answers POST /v1/chat/completions (plain and streaming) with a content
 * that tells what it was sent ("sim: messages=3 system=1 context=1 ..."),
 * paced by --latency-ms and --token-rate, limited by --rate-limit, and
 * bent by [sim:...] directives in the last message (statuses, garbage,
 * delays, closed connections, tool calls).  After tool calls it answers
 * with what the tools returned.  POST /plugin/<name> is a plugin (a
 * webhook Troupe's worker calls for a tool call): it echoes the arguments,
 * bent by [plugin:...] directives in the body, and checks a token or an
 * HMAC signature when started with --plugin-secret.  Used by the
 * integration tests, the benchmarks and `./troupe run`; see
 * docs/services/upstream-sim.md.
 *
 * One thread, one h2o event loop, HTTP/1.1 keep-alive.  It sits beside
 * Troupe on the same cores in the benchmark, so the hot path never logs,
 * never blocks and allocates from the request's pool.  It must never touch
 * a request after its final h2o_send() (h2o may dispose it at once) and
 * never keep a request pointer past the pool's dispose callback: clients
 * that go away while an answer is delayed are counted as aborted there.
 * It listens on what --listen says (127.0.0.1 by default), nothing else.
 *
 * DIAGNOSTICS: bad options and a failed bind print to stderr and exit 1;
 * everything per request is only counted (GET /sim/stats).
 */
#include <sys/types.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <h2o.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0"
#endif

#define SIM_MAX_BODY (16u * 1024 * 1024) /* request entity limit */
#define SIM_MAX_DELAY_MS 600000u         /* [sim:delay=] and --latency-ms */
#define SIM_MAX_TOOLS 8                  /* [sim:tool=] per answer */
#define SIM_MAX_TIMEOUTS 64              /* distinct timer durations */
#define SIM_NO_CUT SIZE_MAX
#define SIM_NSTATUS 600
#define SIM_MAX_PLUGINS 64  /* plugin names counted in /sim/stats */
#define SIM_PLUGIN_TICK 50  /* ms between checks of a delayed plugin */
#define SIM_PLUGIN_SKEW 300 /* s an HMAC timestamp may be off */
#define SIM_TRACES 64       /* requests /sim/traces remembers */
#define SIM_TRACE_MAX 1024  /* bytes of a header value kept */

/* A growable scratch string (reused across requests: no malloc per
 * request once warm).  oom sticks until reset. */
struct sb {
	char *p;
	size_t len;
	size_t cap;
	int oom;
};

enum answer_kind {
	ANS_OK,      /* a chat.completion (or its stream) */
	ANS_STATUS,  /* an error status with OpenAI error JSON */
	ANS_GARBAGE, /* 200 with a body that is not JSON */
	ANS_CLOSE,   /* close the connection without answering */
};

/* One chat request; lives in the request's pool (h2o_mem_alloc_shared),
 * so chat_dispose() runs whenever h2o drops the request. */
struct chat {
	h2o_generator_t gen;
	h2o_timeout_entry_t timer;
	h2o_req_t *req;
	enum answer_kind kind;
	int status;
	int stream;
	int done;      /* answered or closed on purpose: not an abort */
	int started;   /* response headers are out */
	int waiting;   /* an h2o_send() is in progress, proceed pending */
	int tick_due;  /* the token timer fired while waiting */
	uint32_t rate; /* tokens per second for this answer, 0 = at once */
	char *body;    /* the whole answer (stream: every event) */
	size_t len;
	size_t *ends;   /* stream: end of piece i's event in body */
	size_t npieces; /* stream: content pieces (last one carries tail) */
	size_t next;    /* stream: next piece to send */
	size_t cut;     /* stream: close after this many pieces */
	uint64_t t0;    /* stream: loop time of the first piece */
};

struct directives {
	int status;        /* [sim:status=NNN], 0 = none */
	int garbage;       /* [sim:garbage] */
	int close;         /* [sim:close] */
	int r429;          /* [sim:429] */
	unsigned delay_ms; /* [sim:delay=MS], summed */
	int retry_after;   /* [sim:retry-after=S], -1 = none */
	size_t cut;        /* [sim:cut=N], SIM_NO_CUT = none */
	int ntools;        /* [sim:tool=NAME] */
	const char *tool[SIM_MAX_TOOLS];
	size_t toollen[SIM_MAX_TOOLS];
	unsigned tool_rounds; /* [sim:tool-rounds=N], default 1 */
	int badargs;          /* [sim:badargs] */
};

/* One plugin's counters (by name, first come first served). */
struct plugin_stats {
	char name[65];
	uint64_t requests;
	uint64_t aborted;
	uint64_t unauthorized;
	uint64_t by_status[SIM_NSTATUS];
};

/* One plugin request; in the request's pool like struct chat. */
struct plug {
	h2o_timeout_entry_t timer;
	h2o_req_t *req;
	struct plugin_stats *ps;
	int status;
	int done;
	uint64_t due; /* loop time of the answer */
	const char *ctype;
	char *body;
	size_t len;
};

struct timeout_slot {
	uint64_t ms;
	h2o_timeout_t *to;
};

static struct {
	uint64_t requests;
	uint64_t by_status[SIM_NSTATUS];
	uint64_t aborted;
	uint64_t closed;
	uint64_t rate_limited;
	uint64_t early; /* chats inside an announced Retry-After window */
	int64_t in_flight;
	struct plugin_stats plugins[SIM_MAX_PLUGINS];
	int nplugins;
	int64_t plugin_in_flight;
} stats;

static const char *g_plugin_secret; /* --plugin-secret */

/*
 * The trace headers of the last SIM_TRACES chat and plugin requests
 * (GET /sim/traces), so a test can see what Troupe's worker sent on.
 * Several lines of one header are joined with ','; len -1: absent.
 */
static struct sim_trace {
	char path[80];
	char tp[SIM_TRACE_MAX], ts[SIM_TRACE_MAX];
	int tplen, tslen;
} g_traces[SIM_TRACES];
static uint64_t g_ntraces; /* recorded since the start or reset */

static struct {
	unsigned latency_ms;
	uint32_t token_rate;
	double rate_limit;
	unsigned early_grace_ms; /* arrivals this soon after the throttle
	                            that opened a window are not early */
} cfg = {.early_grace_ms = 200};

/*
 * Retry-After windows, per model (a test gives each bot its own model):
 * a 429 (or 503 with Retry-After) for model M opens [now, now + S s) or
 * extends the open one.  A chat for M arriving inside a window later than
 * early_grace_ms after it opened came early: its client did not honour
 * the Retry-After (requests already on their way when the throttle was
 * sent arrive within the grace).  Counted in /sim/stats "early".
 */
#define SIM_MAX_WINDOWS 32
static struct rl_window {
	char model[64];
	uint64_t from, until; /* loop ms */
	uint64_t early;
	int used;
} g_win[SIM_MAX_WINDOWS];

static h2o_globalconf_t g_conf;
static h2o_context_t g_ctx;
static h2o_accept_ctx_t g_accept;
static h2o_socket_t *g_listener, *g_sigsock;
static h2o_timeout_entry_t g_accept_retry;
static struct timeout_slot g_timeouts[SIM_MAX_TIMEOUTS];
static int g_ntimeouts;
static volatile int g_quit;
static struct sb g_sb, g_raw, g_in, g_res;
static uint64_t g_seq;
static uint32_t g_idbase;

/* Token bucket for --rate-limit: R tokens per second, burst R (>= 1). */
static double g_bucket;
static uint64_t g_bucket_at;

/* For answers sent in one h2o_send(): never asked to proceed or stop. */
static h2o_generator_t g_plain_gen = {NULL, NULL};

/* ---- small string builder ---- */

static int
sb_reserve(struct sb *s, size_t n)
{
	size_t cap;
	char *p;

	if (s->oom)
		return -1;
	if (s->cap - s->len > n)
		return 0;
	cap = s->cap ? s->cap : 4096;
	while (cap - s->len <= n) {
		if (cap > SIZE_MAX / 2)
			goto fail;
		cap *= 2;
	}
	if ((p = realloc(s->p, cap)) == NULL)
		goto fail;
	s->p = p;
	s->cap = cap;
	return 0;
fail:
	s->oom = 1;
	return -1;
}

static void
sb_reset(struct sb *s)
{
	s->len = 0;
	s->oom = 0;
	/* a huge request once must not pin its memory forever */
	if (s->cap > 1024 * 1024) {
		free(s->p);
		s->p = NULL;
		s->cap = 0;
	}
}

static void
sb_add(struct sb *s, const void *p, size_t n)
{
	if (sb_reserve(s, n) == -1)
		return;
	memcpy(s->p + s->len, p, n);
	s->len += n;
	s->p[s->len] = '\0';
}

static void
sb_adds(struct sb *s, const char *str)
{
	sb_add(s, str, strlen(str));
}

static void __attribute__((format(printf, 2, 3)))
sb_addf(struct sb *s, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (sb_reserve(s, 128) == -1)
		return;
	va_start(ap, fmt);
	n = vsnprintf(s->p + s->len, s->cap - s->len, fmt, ap);
	va_end(ap);
	if (n < 0) {
		s->oom = 1;
		return;
	}
	if ((size_t)n >= s->cap - s->len) {
		if (sb_reserve(s, (size_t)n + 1) == -1)
			return;
		va_start(ap, fmt);
		vsnprintf(s->p + s->len, s->cap - s->len, fmt, ap);
		va_end(ap);
	}
	s->len += (size_t)n;
}

/* Append s[0..n) escaped for the inside of a JSON string. */
static void
sb_add_esc(struct sb *s, const char *str, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	size_t i, run;
	unsigned char c;
	char *d;

	if (sb_reserve(s, n + 16) == -1)
		return;
	for (i = 0; i < n;) {
		/* copy the plain run in one go */
		for (run = i; run < n; run++) {
			c = (unsigned char)str[run];
			if (c < 0x20 || c == '"' || c == '\\')
				break;
		}
		if (run > i) {
			sb_add(s, str + i, run - i);
			i = run;
			continue;
		}
		if (sb_reserve(s, 6) == -1)
			return;
		d = s->p + s->len;
		c = (unsigned char)str[i++];
		*d++ = '\\';
		switch (c) {
		case '"':
			*d++ = '"';
			break;
		case '\\':
			*d++ = '\\';
			break;
		case '\n':
			*d++ = 'n';
			break;
		case '\r':
			*d++ = 'r';
			break;
		case '\t':
			*d++ = 't';
			break;
		default:
			*d++ = 'u';
			*d++ = '0';
			*d++ = '0';
			*d++ = hex[c >> 4];
			*d++ = hex[c & 0xf];
			break;
		}
		s->len = (size_t)(d - s->p);
		s->p[s->len] = '\0';
	}
}

/* Copy the builder into the request's pool (it must outlive the send). */
static char *
sb_to_pool(struct sb *s, h2o_mem_pool_t *pool)
{
	char *p;

	p = h2o_mem_alloc_pool(pool, s->len + 1);
	memcpy(p, s->p ? s->p : "", s->len);
	p[s->len] = '\0';
	return p;
}

/* ---- helpers ---- */

static int
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' ||
	       c == '\v';
}

/* Whitespace-separated words: the simulator's token count. */
static unsigned
count_words(const char *s, size_t n)
{
	unsigned words = 0;
	size_t i;
	int in = 0;

	for (i = 0; i < n; i++) {
		if (is_space(s[i]))
			in = 0;
		else if (!in) {
			in = 1;
			words++;
		}
	}
	return words;
}

static const char *
status_reason(int status)
{
	switch (status) {
	case 200:
		return "OK";
	case 400:
		return "Bad Request";
	case 401:
		return "Unauthorized";
	case 403:
		return "Forbidden";
	case 404:
		return "Not Found";
	case 405:
		return "Method Not Allowed";
	case 408:
		return "Request Timeout";
	case 409:
		return "Conflict";
	case 413:
		return "Payload Too Large";
	case 422:
		return "Unprocessable Entity";
	case 429:
		return "Too Many Requests";
	case 500:
		return "Internal Server Error";
	case 502:
		return "Bad Gateway";
	case 503:
		return "Service Unavailable";
	case 504:
		return "Gateway Timeout";
	}
	return status < 500 ? "Client Error" : "Server Error";
}

/* OpenAI's error "type" and "code" for a status (code NULL = null). */
static void
status_kind(int status, const char **type, const char **code)
{
	*code = NULL;
	switch (status) {
	case 401:
		*type = "invalid_request_error";
		*code = "invalid_api_key";
		break;
	case 403:
		*type = "permission_error";
		break;
	case 404:
		*type = "invalid_request_error";
		*code = "model_not_found";
		break;
	case 429:
		*type = "requests";
		*code = "rate_limit_exceeded";
		break;
	default:
		*type = status < 500 ? "invalid_request_error"
		                     : "server_error";
		break;
	}
}

static void
error_json(struct sb *s, int status, const char *msg, const char *param)
{
	const char *type, *code;

	status_kind(status, &type, &code);
	sb_adds(s, "{\"error\":{\"message\":\"");
	sb_add_esc(s, msg, strlen(msg));
	sb_adds(s, "\",\"type\":\"");
	sb_adds(s, type);
	sb_adds(s, "\",\"param\":");
	if (param != NULL) {
		sb_adds(s, "\"");
		sb_adds(s, param);
		sb_adds(s, "\"");
	} else
		sb_adds(s, "null");
	sb_adds(s, ",\"code\":");
	if (code != NULL) {
		sb_adds(s, "\"");
		sb_adds(s, code);
		sb_adds(s, "\"");
	} else
		sb_adds(s, "null");
	sb_adds(s, "}}");
}

static void
add_header(h2o_req_t *req, const char *lname, const char *oname,
           const char *value, size_t vlen)
{
	h2o_add_header_by_str(&req->pool, &req->res.headers, lname,
	                      strlen(lname), 1, oname, value, vlen);
}

static void add_headerf(h2o_req_t *req, const char *lname, const char *oname,
                        const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

static void
add_headerf(h2o_req_t *req, const char *lname, const char *oname,
            const char *fmt, ...)
{
	char tmp[128], *v;
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(tmp))
		n = sizeof(tmp) - 1;
	v = h2o_mem_alloc_pool(&req->pool, (size_t)n);
	memcpy(v, tmp, (size_t)n);
	add_header(req, lname, oname, v, (size_t)n);
}

static void
count_status(int status)
{
	if (status >= 100 && status < SIM_NSTATUS)
		stats.by_status[status]++;
}

/* Send a complete body with a status; the body is copied to the pool.
 * The request may be gone when this returns. */
static void
send_body(h2o_req_t *req, int status, const char *ctype, const char *body,
          size_t len)
{
	h2o_iovec_t buf;

	buf.base = h2o_mem_alloc_pool(&req->pool, len + 1);
	memcpy(buf.base, body, len);
	buf.len = len;
	req->res.status = status;
	req->res.reason = status_reason(status);
	req->res.content_length = len;
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               NULL, ctype, strlen(ctype));
	h2o_start_response(req, &g_plain_gen);
	h2o_send(req, &buf, 1, H2O_SEND_STATE_FINAL);
}

static void
send_sb(h2o_req_t *req, int status, const char *ctype, struct sb *s)
{
	if (s->oom) {
		static const char oom[] =
		        "{\"error\":{\"message\":\"sim: out "
		        "of memory\",\"type\":\"server_error\","
		        "\"param\":null,\"code\":null}}";
		send_body(req, 500, "application/json", oom, sizeof(oom) - 1);
		return;
	}
	send_body(req, status, ctype, s->p ? s->p : "", s->len);
}

static void
send_error(h2o_req_t *req, int status, const char *msg, const char *param)
{
	sb_reset(&g_sb);
	error_json(&g_sb, status, msg, param);
	send_sb(req, status, "application/json", &g_sb);
}

/* The socket under an HTTP/1 request, or -1. */
static int
req_fd(h2o_req_t *req)
{
	h2o_socket_t *sock;

	if (req->conn->callbacks->get_socket == NULL ||
	    (sock = req->conn->callbacks->get_socket(req->conn)) == NULL)
		return -1;
	return h2o_socket_get_fd(sock);
}

/* h2o stops reading while a request is handled, so a client that left
 * during a delay is only seen by peeking at its socket. */
static int
client_gone(h2o_req_t *req)
{
	ssize_t r;
	char c;
	int fd;

	if ((fd = req_fd(req)) == -1)
		return 0;
	r = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
	if (r == 0)
		return 1;
	if (r == -1 && errno != EAGAIN && errno != EWOULDBLOCK &&
	    errno != EINTR)
		return 1;
	return 0;
}

/* Drop the connection without an answer: shut the socket down, then end
 * the response so that h2o's write fails and it frees the connection.
 * The request may be gone when this returns. */
static void
drop_connection(h2o_req_t *req, int started)
{
	int fd;

	if ((fd = req_fd(req)) != -1)
		shutdown(fd, SHUT_RDWR);
	req->http1_is_persistent = 0;
	if (!started) {
		req->res.status = 500;
		req->res.reason = "Closed";
		req->res.content_length = 0;
		h2o_start_response(req, &g_plain_gen);
	}
	h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
}

/* A registered h2o timeout for a duration; h2o keeps one list per
 * duration, so durations are shared and capped (then the nearest). */
static h2o_timeout_t *
timeout_for(uint64_t ms)
{
	h2o_timeout_t *to;
	uint64_t d, bestd = UINT64_MAX;
	int i, best = 0;

	for (i = 0; i < g_ntimeouts; i++) {
		if (g_timeouts[i].ms == ms)
			return g_timeouts[i].to;
		d = g_timeouts[i].ms > ms ? g_timeouts[i].ms - ms
		                          : ms - g_timeouts[i].ms;
		if (d < bestd) {
			bestd = d;
			best = i;
		}
	}
	if (g_ntimeouts == SIM_MAX_TIMEOUTS ||
	    (to = calloc(1, sizeof(*to))) == NULL)
		return g_ntimeouts ? g_timeouts[best].to : NULL;
	h2o_timeout_init(g_ctx.loop, to, ms);
	g_timeouts[g_ntimeouts].ms = ms;
	g_timeouts[g_ntimeouts].to = to;
	g_ntimeouts++;
	return to;
}

static uint64_t
loop_now(void)
{
	return h2o_now(g_ctx.loop);
}

/* ---- rate limit ---- */

static struct rl_window *
win_get(const char *model, int create)
{
	struct rl_window *w, *free_w = NULL;

	for (int i = 0; i < SIM_MAX_WINDOWS; i++) {
		w = &g_win[i];
		if (w->used &&
		    strncmp(w->model, model, sizeof(w->model) - 1) == 0)
			return w;
		if (!w->used && free_w == NULL)
			free_w = w;
	}
	if (!create || free_w == NULL)
		return NULL;
	memset(free_w, 0, sizeof(*free_w));
	free_w->used = 1;
	snprintf(free_w->model, sizeof(free_w->model), "%s", model);
	return free_w;
}

/* A chat for model arrives: early if inside its window past the grace. */
static void
win_arrival(const char *model)
{
	struct rl_window *w = win_get(model, 0);
	uint64_t now = loop_now();

	if (w != NULL && now < w->until &&
	    now >= w->from + cfg.early_grace_ms) {
		w->early++;
		stats.early++;
	}
}

/* A throttle with Retry-After ra seconds was sent for model. */
static void
win_throttle(const char *model, int ra)
{
	struct rl_window *w = win_get(model, 1);
	uint64_t now = loop_now(),
	         end = now + (uint64_t)(ra < 0 ? 0 : ra) * 1000;

	if (w == NULL)
		return;
	if (now >= w->until) {
		w->from = now;
		w->until = end;
	} else if (end > w->until)
		w->until = end;
}

static void
bucket_refill(void)
{
	uint64_t now = loop_now();
	double burst = cfg.rate_limit < 1 ? 1 : cfg.rate_limit;

	if (now > g_bucket_at) {
		g_bucket +=
		        (double)(now - g_bucket_at) * cfg.rate_limit / 1000;
		if (g_bucket > burst)
			g_bucket = burst;
	}
	g_bucket_at = now;
}

static void
bucket_reset(void)
{
	g_bucket = cfg.rate_limit < 1 ? 1 : cfg.rate_limit;
	g_bucket_at = loop_now();
}

/* Take one request from the bucket; 0 if allowed, -1 if over. */
static int
bucket_take(void)
{
	if (cfg.rate_limit <= 0)
		return 0;
	bucket_refill();
	if (g_bucket < 1)
		return -1;
	g_bucket -= 1;
	return 0;
}

static void
add_429_headers(h2o_req_t *req, int retry_after)
{
	double r = cfg.rate_limit;

	add_headerf(req, "retry-after", "Retry-After", "%d", retry_after);
	if (r > 0) {
		add_headerf(req, "x-ratelimit-limit-requests",
		            "x-ratelimit-limit-requests", "%.0f",
		            r < 1 ? 1 : r);
	}
	add_header(req, "x-ratelimit-remaining-requests",
	           "x-ratelimit-remaining-requests", H2O_STRLIT("0"));
	add_header(req, "x-ratelimit-reset-requests",
	           "x-ratelimit-reset-requests", H2O_STRLIT("1s"));
	if (r > 0) {
		add_headerf(req, "ratelimit-policy", "RateLimit-Policy",
		            "%.0f;w=1", r < 1 ? 1 : r);
		add_headerf(req, "ratelimit", "RateLimit",
		            "limit=%.0f, remaining=0, reset=%d", r < 1 ? 1 : r,
		            retry_after);
	} else {
		add_headerf(req, "ratelimit", "RateLimit",
		            "limit=0, remaining=0, reset=%d", retry_after);
	}
}

/* ---- directives ---- */

static int
parse_uint(const char *p, size_t n, unsigned max, unsigned *out)
{
	unsigned v = 0;
	size_t i;

	if (n == 0 || n > 9)
		return -1;
	for (i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return -1;
		v = v * 10 + (unsigned)(p[i] - '0');
	}
	if (v > max)
		return -1;
	*out = v;
	return 0;
}

/* Read every [sim:...] in s.  Unknown or malformed ones are ignored
 * (they stay part of the query, which is echoed anyway). */
static void
parse_directives(const char *s, size_t n, struct directives *d)
{
	const char *p = s, *end = s + n, *rb, *arg;
	size_t len, alen;
	unsigned v;

	memset(d, 0, sizeof(*d));
	d->retry_after = -1;
	d->cut = SIM_NO_CUT;
	d->tool_rounds = 1;
	while (p < end &&
	       (p = memmem(p, (size_t)(end - p), "[sim:", 5)) != NULL) {
		p += 5;
		if ((rb = memchr(p, ']', (size_t)(end - p))) == NULL)
			break;
		len = (size_t)(rb - p);
		arg = memchr(p, '=', len);
		alen = arg ? (size_t)(rb - arg - 1) : 0;
		if (arg)
			arg++;
#define IS(word) (len == sizeof(word) - 1 && memcmp(p, word, len) == 0)
#define KEY(word)                                                             \
	(arg && (size_t)(arg - 1 - p) == sizeof(word) - 1 &&                  \
	 memcmp(p, word, sizeof(word) - 1) == 0)
		if (IS("garbage"))
			d->garbage = 1;
		else if (IS("close"))
			d->close = 1;
		else if (IS("429"))
			d->r429 = 1;
		else if (KEY("status")) {
			if (parse_uint(arg, alen, 599, &v) == 0 && v >= 400)
				d->status = (int)v;
		} else if (KEY("delay")) {
			if (parse_uint(arg, alen, SIM_MAX_DELAY_MS, &v) == 0)
				d->delay_ms =
				        d->delay_ms + v > SIM_MAX_DELAY_MS
				                ? SIM_MAX_DELAY_MS
				                : d->delay_ms + v;
		} else if (KEY("retry-after")) {
			if (parse_uint(arg, alen, 86400, &v) == 0)
				d->retry_after = (int)v;
		} else if (KEY("cut")) {
			if (parse_uint(arg, alen, 1000000, &v) == 0)
				d->cut = v;
		} else if (IS("badargs")) {
			d->badargs = 1;
		} else if (KEY("tool-rounds")) {
			if (parse_uint(arg, alen, 100, &v) == 0)
				d->tool_rounds = v;
		} else if (KEY("tool")) {
			if (alen > 0 && alen <= 64 &&
			    d->ntools < SIM_MAX_TOOLS) {
				d->tool[d->ntools] = arg;
				d->toollen[d->ntools] = alen;
				d->ntools++;
			}
		}
#undef IS
#undef KEY
		p = rb + 1;
	}
	if (d->delay_ms > SIM_MAX_DELAY_MS)
		d->delay_ms = SIM_MAX_DELAY_MS;
}

/* ---- reading the request ---- */

/* The text of a message's content: a string, or the text parts of an
 * array; anything else is empty.  Text parts are joined into g_raw. */
static const char *
content_text(const cJSON *msg, size_t *len, struct sb *tmp)
{
	const cJSON *c, *part, *t;

	c = cJSON_GetObjectItemCaseSensitive(msg, "content");
	if (cJSON_IsString(c)) {
		*len = strlen(c->valuestring);
		return c->valuestring;
	}
	if (cJSON_IsArray(c)) {
		sb_reset(tmp);
		cJSON_ArrayForEach(part, c)
		{
			t = cJSON_GetObjectItemCaseSensitive(part, "text");
			if (cJSON_IsString(t))
				sb_adds(tmp, t->valuestring);
		}
		*len = tmp->len;
		return tmp->p ? tmp->p : "";
	}
	*len = 0;
	return "";
}

/* ---- building answers ---- */

static void
chunk_prefix(struct sb *s, const char *id, long long created,
             const char *model)
{
	sb_adds(s, "data: {\"id\":\"");
	sb_adds(s, id);
	sb_addf(s,
	        "\",\"object\":\"chat.completion.chunk\",\"created\":%lld,"
	        "\"model\":\"",
	        created);
	sb_add_esc(s, model, strlen(model));
	sb_adds(s, "\",\"system_fingerprint\":\"fp_sim\",\"choices\":[{"
	           "\"index\":0,\"delta\":");
}

static void
usage_json(struct sb *s, unsigned prompt, unsigned completion)
{
	sb_addf(s,
	        "\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,"
	        "\"total_tokens\":%u}",
	        prompt, completion, prompt + completion);
}

/* The arguments of a tool call: {"query":"<query>"} as a JSON text
 * (with [sim:badargs], a text that is not JSON). */
static int g_badargs;

static void
tool_args(struct sb *s, const char *q, size_t qlen)
{
	sb_adds(s, g_badargs ? "{\"query\": \"" : "{\"query\":\"");
	sb_add_esc(s, q, qlen);
	sb_adds(s, g_badargs ? "\", broken" : "\"}");
}

/* Non-streaming chat.completion into g_sb. */
static void
build_completion(const char *id, long long created, const char *model,
                 const char *content, size_t clen, const struct directives *d,
                 const char *q, size_t qlen, unsigned prompt_tokens)
{
	unsigned completion_tokens;
	struct sb args = {0};
	int i;

	sb_adds(&g_sb, "{\"id\":\"");
	sb_adds(&g_sb, id);
	sb_addf(&g_sb,
	        "\",\"object\":\"chat.completion\",\"created\":%lld,"
	        "\"model\":\"",
	        created);
	sb_add_esc(&g_sb, model, strlen(model));
	sb_adds(&g_sb, "\",\"system_fingerprint\":\"fp_sim\",\"choices\":[{"
	               "\"index\":0,\"message\":{\"role\":\"assistant\",");
	if (d->ntools == 0) {
		sb_adds(&g_sb, "\"content\":\"");
		sb_add_esc(&g_sb, content, clen);
		sb_adds(&g_sb, "\"},\"logprobs\":null,\"finish_reason\":"
		               "\"stop\"}],");
		completion_tokens = count_words(content, clen);
	} else {
		tool_args(&args, q, qlen);
		sb_adds(&g_sb, "\"content\":null,\"tool_calls\":[");
		for (i = 0; i < d->ntools; i++) {
			sb_addf(&g_sb,
			        "%s{\"id\":\"call_%s_%d\",\"type\":"
			        "\"function\","
			        "\"function\":{\"name\":\"",
			        i ? "," : "", id + 9, i);
			sb_add_esc(&g_sb, d->tool[i], d->toollen[i]);
			sb_adds(&g_sb, "\",\"arguments\":\"");
			sb_add_esc(&g_sb, args.p ? args.p : "", args.len);
			sb_adds(&g_sb, "\"}}");
		}
		sb_adds(&g_sb, "]},\"logprobs\":null,\"finish_reason\":"
		               "\"tool_calls\"}],");
		completion_tokens =
		        (unsigned)d->ntools *
		        count_words(args.p ? args.p : "", args.len);
		if (args.oom)
			g_sb.oom = 1;
		free(args.p);
	}
	usage_json(&g_sb, prompt_tokens, completion_tokens);
	sb_adds(&g_sb, "}");
}

/* Streaming events into g_sb; piece ends into the pool.  Pieces: one per
 * word of the content (with the whitespace before it), or two per tool
 * call.  The tail (finish chunk and [DONE]) follows the last piece. */
static void
build_stream(struct chat *ch, const char *id, long long created,
             const char *model, const char *content, size_t clen,
             const struct directives *d, const char *q, size_t qlen,
             unsigned prompt_tokens)
{
	size_t n, start, end;
	unsigned completion_tokens;
	struct sb args = {0};
	int t;

	if (d->ntools == 0) {
		/* a piece per word, with the whitespace before it; the
		 * last one also takes any trailing whitespace */
		n = count_words(content, clen);
		if (n == 0)
			n = 1;
	} else
		n = 2 * (size_t)d->ntools;
	ch->ends = h2o_mem_alloc_pool(&ch->req->pool, n * sizeof(size_t));
	ch->npieces = n;

	if (d->ntools == 0) {
		for (n = 0, start = 0; n < ch->npieces; n++) {
			end = start;
			while (end < clen && is_space(content[end]))
				end++;
			while (end < clen && !is_space(content[end]))
				end++;
			if (n == ch->npieces - 1)
				end = clen;
			chunk_prefix(&g_sb, id, created, model);
			sb_adds(&g_sb, n == 0 ? "{\"role\":\"assistant\","
			                        "\"content\":\""
			                      : "{\"content\":\"");
			sb_add_esc(&g_sb, content + start, end - start);
			sb_adds(&g_sb, "\"},\"logprobs\":null,"
			               "\"finish_reason\":null}]}\n\n");
			ch->ends[n] = g_sb.len;
			start = end;
		}
		completion_tokens = count_words(content, clen);
	} else {
		tool_args(&args, q, qlen);
		for (t = 0; t < d->ntools; t++) {
			chunk_prefix(&g_sb, id, created, model);
			sb_adds(&g_sb, t == 0 ? "{\"role\":\"assistant\","
			                        "\"content\":null,"
			                      : "{");
			sb_addf(&g_sb,
			        "\"tool_calls\":[{\"index\":%d,\"id\":"
			        "\"call_%s_%d\",\"type\":\"function\","
			        "\"function\":{\"name\":\"",
			        t, id + 9, t);
			sb_add_esc(&g_sb, d->tool[t], d->toollen[t]);
			sb_adds(&g_sb, "\",\"arguments\":\"\"}}]},"
			               "\"logprobs\":null,"
			               "\"finish_reason\":null}]}\n\n");
			ch->ends[2 * t] = g_sb.len;
			chunk_prefix(&g_sb, id, created, model);
			sb_addf(&g_sb,
			        "{\"tool_calls\":[{\"index\":%d,\"function\":"
			        "{\"arguments\":\"",
			        t);
			sb_add_esc(&g_sb, args.p ? args.p : "", args.len);
			sb_adds(&g_sb, "\"}}]},\"logprobs\":null,"
			               "\"finish_reason\":null}]}\n\n");
			ch->ends[2 * t + 1] = g_sb.len;
		}
		completion_tokens =
		        (unsigned)d->ntools *
		        count_words(args.p ? args.p : "", args.len);
		if (args.oom)
			g_sb.oom = 1;
		free(args.p);
	}
	chunk_prefix(&g_sb, id, created, model);
	sb_addf(&g_sb, "{},\"logprobs\":null,\"finish_reason\":\"%s\"}],",
	        d->ntools ? "tool_calls" : "stop");
	usage_json(&g_sb, prompt_tokens, completion_tokens);
	sb_adds(&g_sb, "}\n\ndata: [DONE]\n\n");
}

/* ---- answering ---- */

static void stream_tick(struct chat *);

static void
chat_dispose(void *p)
{
	struct chat *ch = p;

	if (h2o_timeout_is_linked(&ch->timer))
		h2o_timeout_unlink(&ch->timer);
	if (!ch->done)
		stats.aborted++;
	stats.in_flight--;
}

static void
stream_proceed(h2o_generator_t *gen, h2o_req_t *req)
{
	struct chat *ch = H2O_STRUCT_FROM_MEMBER(struct chat, gen, gen);

	(void)req;
	ch->waiting = 0;
	if (ch->tick_due) {
		ch->tick_due = 0;
		stream_tick(ch);
	}
}

static void
stream_timer_cb(h2o_timeout_entry_t *entry)
{
	struct chat *ch = H2O_STRUCT_FROM_MEMBER(struct chat, timer, entry);

	if (ch->waiting)
		ch->tick_due = 1;
	else
		stream_tick(ch);
}

static void
stream_start(struct chat *ch)
{
	h2o_req_t *req = ch->req;

	req->res.status = 200;
	req->res.reason = "OK";
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               NULL, H2O_STRLIT("text/event-stream"));
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL,
	               NULL, H2O_STRLIT("no-cache"));
	ch->gen.proceed = stream_proceed;
	ch->gen.stop = NULL;
	h2o_start_response(req, &ch->gen);
	ch->started = 1;
	ch->t0 = loop_now();
	count_status(200);
}

/* Send every piece that is due (all of them at --token-rate 0). */
static void
stream_tick(struct chat *ch)
{
	h2o_timeout_t *to;
	h2o_iovec_t buf;
	size_t due, from;
	uint64_t el;

	if (!ch->started) {
		if (ch->cut == 0) {
			stats.closed++;
			ch->done = 1;
			drop_connection(ch->req, 0);
			return;
		}
		stream_start(ch);
	}
	if (ch->rate == 0)
		due = ch->npieces;
	else {
		el = loop_now() - ch->t0;
		due = 1 + (size_t)(el * ch->rate / 1000);
		if (due > ch->npieces)
			due = ch->npieces;
	}
	if (ch->cut != SIM_NO_CUT && due > ch->cut)
		due = ch->cut;
	if (ch->cut != SIM_NO_CUT && ch->next >= ch->cut) {
		stats.closed++;
		ch->done = 1;
		drop_connection(ch->req, 1);
		return;
	}
	if (due > ch->next) {
		from = ch->next ? ch->ends[ch->next - 1] : 0;
		buf.base = ch->body + from;
		if (due == ch->npieces) {
			buf.len = ch->len - from;
			ch->done = 1;
			h2o_send(ch->req, &buf, 1, H2O_SEND_STATE_FINAL);
			return; /* ch may be gone */
		}
		buf.len = ch->ends[due - 1] - from;
		ch->next = due;
		ch->waiting = 1;
		h2o_send(ch->req, &buf, 1, H2O_SEND_STATE_IN_PROGRESS);
	}
	/* next tick: one token's time, at least a millisecond; a cut
	 * closes on the tick after its last piece */
	to = timeout_for(ch->rate ? (ch->rate >= 1000 ? 1 : 1000 / ch->rate)
	                          : 1);
	if (to != NULL && !h2o_timeout_is_linked(&ch->timer)) {
		ch->timer.cb = stream_timer_cb;
		h2o_timeout_link(g_ctx.loop, to, &ch->timer);
	}
}

/* The delay is over (or there was none): answer as planned. */
static void
chat_answer(struct chat *ch)
{
	h2o_req_t *req = ch->req;
	h2o_iovec_t buf;

	switch (ch->kind) {
	case ANS_CLOSE:
		stats.closed++;
		ch->done = 1;
		drop_connection(req, 0);
		return;
	case ANS_OK:
		if (ch->stream) {
			stream_tick(ch);
			return;
		}
		break;
	case ANS_STATUS:
	case ANS_GARBAGE:
		break;
	}
	count_status(ch->status);
	ch->done = 1;
	req->res.status = ch->status;
	req->res.reason = status_reason(ch->status);
	req->res.content_length = ch->len;
	h2o_start_response(req, &g_plain_gen);
	buf = h2o_iovec_init(ch->body, ch->len);
	h2o_send(req, &buf, 1, H2O_SEND_STATE_FINAL);
}

static void
chat_delay_cb(h2o_timeout_entry_t *entry)
{
	struct chat *ch = H2O_STRUCT_FROM_MEMBER(struct chat, timer, entry);

	if (client_gone(ch->req)) {
		stats.aborted++;
		ch->done = 1;
		drop_connection(ch->req, 0);
		return;
	}
	chat_answer(ch);
}

/* Parse, plan and build the whole answer now; send it now or after the
 * delay.  Everything the answer needs is copied into the pool, so the
 * cJSON tree is freed before returning. */
/* The value of header name in req, its lines joined with ',' (at most
 * SIM_TRACE_MAX bytes kept) into out; -1 if absent. */
static int
trace_hdr(h2o_req_t *req, const char *name, size_t nlen, char *out)
{
	ssize_t i = -1;
	size_t len = 0, k;
	int any = 0;

	while ((i = h2o_find_header_by_str(&req->headers, name, nlen, i)) !=
	       -1) {
		h2o_iovec_t v = req->headers.entries[i].value;

		if (any++ && len < SIM_TRACE_MAX)
			out[len++] = ',';
		k = v.len < SIM_TRACE_MAX - len ? v.len : SIM_TRACE_MAX - len;
		memcpy(out + len, v.base, k);
		len += k;
	}
	return (any ? (int)len : -1);
}

/* Remember req's traceparent and tracestate for GET /sim/traces. */
static void
trace_record(h2o_req_t *req)
{
	struct sim_trace *t = &g_traces[g_ntraces++ % SIM_TRACES];
	size_t n = req->path.len < sizeof(t->path) - 1 ? req->path.len
	                                               : sizeof(t->path) - 1;

	memcpy(t->path, req->path.base, n);
	t->path[n] = '\0';
	t->tplen = trace_hdr(req, H2O_STRLIT("traceparent"), t->tp);
	t->tslen = trace_hdr(req, H2O_STRLIT("tracestate"), t->ts);
}

static void
trace_json_str(struct sb *s, const char *p, int n)
{
	if (n < 0) {
		sb_adds(s, "null");
		return;
	}
	sb_adds(s, "\"");
	sb_add_esc(s, p, (size_t)n);
	sb_adds(s, "\"");
}

/* GET /sim/traces: {"traces":[{"path","traceparent","tracestate"},...]},
 * oldest first; an absent header is null. */
static void
handle_traces(h2o_req_t *req)
{
	uint64_t first = g_ntraces > SIM_TRACES ? g_ntraces - SIM_TRACES : 0;

	sb_reset(&g_sb);
	sb_adds(&g_sb, "{\"traces\":[");
	for (uint64_t k = first; k < g_ntraces; k++) {
		const struct sim_trace *t = &g_traces[k % SIM_TRACES];

		sb_adds(&g_sb, k > first ? ",{\"path\":\"" : "{\"path\":\"");
		sb_add_esc(&g_sb, t->path, strlen(t->path));
		sb_adds(&g_sb, "\",\"traceparent\":");
		trace_json_str(&g_sb, t->tp, t->tplen);
		sb_adds(&g_sb, ",\"tracestate\":");
		trace_json_str(&g_sb, t->ts, t->tslen);
		sb_adds(&g_sb, "}");
	}
	sb_adds(&g_sb, "]}\n");
	send_sb(req, 200, "application/json", &g_sb);
}

static void
handle_chat(h2o_req_t *req)
{
	const cJSON *msgs, *m, *model, *role, *stream, *first;
	cJSON *root = NULL;
	char id[48], *copy;
	const char *last = "", *modelstr, *tmp;
	size_t lastlen = 0, len;
	unsigned prompt_tokens = 0, delay;
	struct directives d;
	struct chat *ch;
	long long created;
	int nmsg, sys, context, ntool, rounds = 0;

	stats.requests++;
	stats.in_flight++;
	trace_record(req);
	ch = h2o_mem_alloc_shared(&req->pool, sizeof(*ch), chat_dispose);
	memset(ch, 0, sizeof(*ch));
	ch->req = req;

	/* a NUL-terminated copy for cJSON (PITFALLS) */
	sb_reset(&g_in);
	sb_add(&g_in, req->entity.base ? req->entity.base : "",
	       req->entity.len);
	if (g_in.oom ||
	    (root = cJSON_ParseWithLength(g_in.p, g_in.len)) == NULL ||
	    !cJSON_IsObject(root)) {
		count_status(400);
		ch->done = 1;
		send_error(req, 400,
		           "sim: we could not parse the JSON body of your "
		           "request",
		           NULL);
		goto done;
	}
	msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
	model = cJSON_GetObjectItemCaseSensitive(root, "model");
	if (!cJSON_IsArray(msgs) || (nmsg = cJSON_GetArraySize(msgs)) < 1) {
		count_status(400);
		ch->done = 1;
		send_error(req, 400,
		           "sim: 'messages' must be a non-empty array",
		           "messages");
		goto done;
	}
	cJSON_ArrayForEach(m, msgs)
	{
		role = cJSON_GetObjectItemCaseSensitive(m, "role");
		if (!cJSON_IsObject(m) || !cJSON_IsString(role)) {
			count_status(400);
			ch->done = 1;
			send_error(req, 400,
			           "sim: each message needs a string 'role'",
			           "messages");
			goto done;
		}
	}
	if (!cJSON_IsString(model)) {
		count_status(400);
		ch->done = 1;
		send_error(req, 400, "sim: you must provide a model parameter",
		           "model");
		goto done;
	}
	modelstr = model->valuestring;
	/* --rate-limit: after the model is known (the Retry-After windows
	 * are per model), before anything else is looked at. */
	win_arrival(modelstr);
	if (bucket_take() == -1) {
		stats.rate_limited++;
		count_status(429);
		ch->done = 1;
		add_429_headers(req, 1);
		win_throttle(modelstr, 1);
		send_error(
		        req, 429,
		        "sim: rate limit reached for requests; retry after 1s",
		        NULL);
		goto done;
	}
	stream = cJSON_GetObjectItemCaseSensitive(root, "stream");
	ch->stream = cJSON_IsTrue(stream);

	/* the shape of the conversation and the last message */
	first = cJSON_GetArrayItem(msgs, 0);
	role = cJSON_GetObjectItemCaseSensitive(first, "role");
	sys = strcmp(role->valuestring, "system") == 0;
	context = sys ? (nmsg >= 2 ? nmsg - 2 : 0) : nmsg - 1;
	sb_reset(&g_raw);
	cJSON_ArrayForEach(m, msgs)
	{
		tmp = content_text(m, &len, &g_raw);
		prompt_tokens += count_words(tmp, len);
		if (m->next == NULL) {
			/* keep the last text: copy it out of g_raw */
			copy = h2o_mem_alloc_pool(&req->pool, len + 1);
			memcpy(copy, tmp, len);
			copy[len] = '\0';
			last = copy;
			lastlen = len;
		}
	}
	/* After tool calls (the last message is a tool result): the turn's
	 * directives are the last user message's, and the answer says what
	 * the tools returned. */
	role = cJSON_GetObjectItemCaseSensitive(
	        cJSON_GetArrayItem(msgs, nmsg - 1), "role");
	ntool = -1;
	if (strcmp(role->valuestring, "tool") == 0) {
		const cJSON *lastuser = NULL, *tc;
		cJSON *res = cJSON_CreateArray(), *v;
		char *printed;
		int after = 0;

		ntool = 0;
		cJSON_ArrayForEach(m, msgs)
		{
			role = cJSON_GetObjectItemCaseSensitive(m, "role");
			if (strcmp(role->valuestring, "user") == 0)
				lastuser = m;
		}
		cJSON_ArrayForEach(m, msgs)
		{
			if (m == lastuser || lastuser == NULL)
				after = 1;
			if (!after || m == lastuser)
				continue;
			role = cJSON_GetObjectItemCaseSensitive(m, "role");
			tc = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
			if (strcmp(role->valuestring, "assistant") == 0 &&
			    cJSON_GetArraySize(tc) > 0)
				rounds++;
			if (strcmp(role->valuestring, "tool") != 0)
				continue;
			ntool++;
			tmp = content_text(m, &len, &g_raw);
			copy = strndup(tmp, len);
			v = copy ? cJSON_Parse(copy) : NULL;
			if (v == NULL)
				v = cJSON_CreateString(copy ? copy : "");
			free(copy);
			if (res != NULL && v != NULL)
				cJSON_AddItemToArray(res, v);
			else
				cJSON_Delete(v);
		}
		printed = res ? cJSON_PrintUnformatted(res) : NULL;
		sb_reset(&g_res);
		sb_adds(&g_res, printed ? printed : "[]");
		cJSON_free(printed);
		cJSON_Delete(res);
		last = "";
		lastlen = 0;
		if (lastuser != NULL) {
			tmp = content_text(lastuser, &len, &g_raw);
			copy = h2o_mem_alloc_pool(&req->pool, len + 1);
			memcpy(copy, tmp, len);
			copy[len] = '\0';
			last = copy;
			lastlen = len;
		}
	}
	parse_directives(last, lastlen, &d);
	if (ntool >= 0 && rounds >= (int)d.tool_rounds)
		d.ntools = 0; /* enough rounds: answer */
	g_badargs = d.badargs;

	g_seq++;
	snprintf(id, sizeof(id), "chatcmpl-sim%08" PRIx32 "%012" PRIx64,
	         g_idbase, g_seq);
	created = (long long)time(NULL);

	/* the content that tells what was received */
	sb_reset(&g_raw);
	sb_addf(&g_raw, "sim: messages=%d system=%d context=%d model=", nmsg,
	        sys, context);
	sb_adds(&g_raw, modelstr);
	if (ntool >= 0) {
		sb_addf(&g_raw, " tools=%d tool_results=", ntool);
		sb_add(&g_raw, g_res.p ? g_res.p : "[]", g_res.len);
	}
	sb_adds(&g_raw, " query=");
	sb_add(&g_raw, last, lastlen);

	sb_reset(&g_sb);
	ch->status = 200;
	ch->cut = SIM_NO_CUT;
	ch->rate = cfg.token_rate;
	if (d.close) {
		ch->kind = ANS_CLOSE;
	} else if (d.r429 || d.status == 429) {
		ch->kind = ANS_STATUS;
		ch->status = 429;
		add_429_headers(req, d.retry_after >= 0 ? d.retry_after : 1);
		win_throttle(modelstr, d.retry_after >= 0 ? d.retry_after : 1);
		error_json(&g_sb, 429,
		           "sim: rate limit reached for requests (simulated)",
		           NULL);
	} else if (d.status) {
		ch->kind = ANS_STATUS;
		ch->status = d.status;
		if (d.retry_after >= 0)
			add_headerf(req, "retry-after", "Retry-After", "%d",
			            d.retry_after);
		if (d.retry_after >= 0 && d.status == 503)
			win_throttle(modelstr, d.retry_after);
		error_json(&g_sb, d.status, "sim: simulated error status",
		           NULL);
	} else if (d.garbage) {
		ch->kind = ANS_GARBAGE;
		sb_adds(&g_sb, ch->stream ? "data: {\"id\": this is not json"
		                            "\n\n"
		                          : "<html><body>sim: garbage, "
		                            "not JSON{\"choices\":[</body>"
		                            "</html>\n");
	} else {
		ch->kind = ANS_OK;
		if (ch->stream) {
			ch->cut = d.cut;
			build_stream(ch, id, created, modelstr,
			             g_raw.p ? g_raw.p : "", g_raw.len, &d,
			             last, lastlen, prompt_tokens);
		} else
			build_completion(id, created, modelstr,
			                 g_raw.p ? g_raw.p : "", g_raw.len, &d,
			                 last, lastlen, prompt_tokens);
	}
	if (g_sb.oom || g_raw.oom) {
		count_status(500);
		ch->done = 1;
		send_error(req, 500, "sim: out of memory", NULL);
		goto done;
	}
	if (ch->kind != ANS_CLOSE && !(ch->kind == ANS_OK && ch->stream))
		h2o_add_header(&req->pool, &req->res.headers,
		               H2O_TOKEN_CONTENT_TYPE, NULL,
		               ch->kind == ANS_GARBAGE && ch->stream
		                       ? "text/event-stream"
		                       : "application/json",
		               ch->kind == ANS_GARBAGE && ch->stream
		                       ? sizeof("text/event-stream") - 1
		                       : sizeof("application/json") - 1);
	if (ch->kind == ANS_OK && cfg.rate_limit > 0) {
		add_headerf(req, "x-ratelimit-limit-requests",
		            "x-ratelimit-limit-requests", "%.0f",
		            cfg.rate_limit < 1 ? 1 : cfg.rate_limit);
		add_headerf(req, "x-ratelimit-remaining-requests",
		            "x-ratelimit-remaining-requests", "%.0f",
		            g_bucket < 0 ? 0 : (double)(long long)g_bucket);
	}
	ch->body = sb_to_pool(&g_sb, &req->pool);
	ch->len = g_sb.len;

	delay = cfg.latency_ms + d.delay_ms;
	if (delay > SIM_MAX_DELAY_MS)
		delay = SIM_MAX_DELAY_MS;
	cJSON_Delete(root);
	root = NULL;
	if (delay == 0) {
		chat_answer(ch);
		return;
	}
	ch->timer.cb = chat_delay_cb;
	h2o_timeout_link(g_ctx.loop, timeout_for(delay), &ch->timer);
	return;
done:
	cJSON_Delete(root);
}

/* ---- plugins: POST /plugin/<name> ---- */

static struct plugin_stats *
plugin_stats_of(const char *name, size_t n)
{
	int i;

	if (n > 64)
		n = 64;
	for (i = 0; i < stats.nplugins; i++)
		if (strlen(stats.plugins[i].name) == n &&
		    memcmp(stats.plugins[i].name, name, n) == 0)
			return &stats.plugins[i];
	if (stats.nplugins == SIM_MAX_PLUGINS)
		return NULL;
	i = stats.nplugins++;
	memcpy(stats.plugins[i].name, name, n);
	stats.plugins[i].name[n] = '\0';
	return &stats.plugins[i];
}

static void
plug_count(struct plug *pl, int status)
{
	if (pl->ps != NULL && status >= 100 && status < SIM_NSTATUS)
		pl->ps->by_status[status]++;
}

static void
plug_dispose(void *p)
{
	struct plug *pl = p;

	if (h2o_timeout_is_linked(&pl->timer))
		h2o_timeout_unlink(&pl->timer);
	if (!pl->done && pl->ps != NULL)
		pl->ps->aborted++;
	stats.plugin_in_flight--;
}

static void
plug_send(struct plug *pl)
{
	h2o_req_t *req = pl->req;
	h2o_iovec_t buf;

	plug_count(pl, pl->status);
	pl->done = 1;
	req->res.status = pl->status;
	req->res.reason = status_reason(pl->status);
	req->res.content_length = pl->len;
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               NULL, pl->ctype, strlen(pl->ctype));
	h2o_start_response(req, &g_plain_gen);
	buf = h2o_iovec_init(pl->body, pl->len);
	h2o_send(req, &buf, 1, H2O_SEND_STATE_FINAL);
}

/* Every tick of a delayed plugin: a client that left is counted now,
 * not when the answer is due. */
static void
plug_tick_cb(h2o_timeout_entry_t *entry)
{
	struct plug *pl = H2O_STRUCT_FROM_MEMBER(struct plug, timer, entry);

	if (client_gone(pl->req)) {
		if (pl->ps != NULL)
			pl->ps->aborted++;
		pl->done = 1;
		drop_connection(pl->req, 0);
		return;
	}
	if (loop_now() >= pl->due) {
		plug_send(pl);
		return;
	}
	h2o_timeout_link(g_ctx.loop, timeout_for(SIM_PLUGIN_TICK), &pl->timer);
}

/* A header's value, or NULL. */
static const h2o_iovec_t *
header_of(h2o_req_t *req, const char *lname)
{
	ssize_t i = h2o_find_header_by_str(&req->headers, lname, strlen(lname),
	                                   -1);

	return i == -1 ? NULL : &req->headers.entries[i].value;
}

/* --plugin-secret: "Authorization: Bearer S", or a fresh HMAC-SHA256
 * of "<X-Troupe-Timestamp>.<body>" in X-Troupe-Signature. */
static int
plug_auth_ok(h2o_req_t *req)
{
	static const char hexd[] = "0123456789abcdef";
	const h2o_iovec_t *a, *ts, *sig;
	unsigned char mac[EVP_MAX_MD_SIZE];
	char want[7 + 64], tsbuf[24];
	unsigned int maclen = 0;
	size_t slen = strlen(g_plugin_secret);
	long long t;

	if ((a = header_of(req, "authorization")) != NULL &&
	    a->len == 7 + slen && memcmp(a->base, "Bearer ", 7) == 0 &&
	    memcmp(a->base + 7, g_plugin_secret, slen) == 0)
		return 1;
	if ((ts = header_of(req, "x-troupe-timestamp")) == NULL ||
	    (sig = header_of(req, "x-troupe-signature")) == NULL ||
	    ts->len == 0 || ts->len >= sizeof(tsbuf))
		return 0;
	memcpy(tsbuf, ts->base, ts->len);
	tsbuf[ts->len] = '\0';
	t = atoll(tsbuf);
	if (t <= 0 || llabs(t - (long long)time(NULL)) > SIM_PLUGIN_SKEW)
		return 0;
	sb_reset(&g_raw);
	sb_add(&g_raw, ts->base, ts->len);
	sb_adds(&g_raw, ".");
	sb_add(&g_raw, req->entity.base ? req->entity.base : "",
	       req->entity.len);
	if (g_raw.oom ||
	    HMAC(EVP_sha256(), g_plugin_secret, (int)slen,
	         (const unsigned char *)g_raw.p, g_raw.len, mac,
	         &maclen) == NULL ||
	    maclen != 32)
		return 0;
	memcpy(want, "sha256=", 7);
	for (unsigned i = 0; i < 32; i++) {
		want[7 + 2 * i] = hexd[mac[i] >> 4];
		want[7 + 2 * i + 1] = hexd[mac[i] & 15];
	}
	return sig->len == sizeof(want) &&
	       memcmp(sig->base, want, sizeof(want)) == 0;
}

/* [plugin:delay=MS], [plugin:status=N], [plugin:garbage], each also as
 * [plugin:NAME:...] for the plugin NAME only, anywhere in the body. */
static void
plug_directives(const char *s, size_t n, const char *name, size_t nlen,
                unsigned *delay, int *status, int *garbage)
{
	const char *p = s, *end = s + n, *rb, *arg, *colon;
	size_t len, alen;
	unsigned v;

	while (p < end &&
	       (p = memmem(p, (size_t)(end - p), "[plugin:", 8)) != NULL) {
		p += 8;
		if ((rb = memchr(p, ']', (size_t)(end - p))) == NULL)
			break;
		len = (size_t)(rb - p);
		arg = memchr(p, '=', len);
		colon = memchr(p, ':', arg ? (size_t)(arg - p) : len);
		if (colon != NULL) {
			if ((size_t)(colon - p) != nlen ||
			    memcmp(p, name, nlen) != 0) {
				p = rb + 1;
				continue; /* another plugin's */
			}
			len -= (size_t)(colon + 1 - p);
			p = colon + 1;
		}
		alen = arg ? (size_t)(rb - arg - 1) : 0;
		if (arg)
			arg++;
		if (len == 7 && memcmp(p, "garbage", 7) == 0)
			*garbage = 1;
		else if (arg && arg - 1 - p == 5 &&
		         memcmp(p, "delay", 5) == 0) {
			if (parse_uint(arg, alen, SIM_MAX_DELAY_MS, &v) == 0)
				*delay = *delay + v > SIM_MAX_DELAY_MS
				                 ? SIM_MAX_DELAY_MS
				                 : *delay + v;
		} else if (arg && arg - 1 - p == 6 &&
		           memcmp(p, "status", 6) == 0) {
			if (parse_uint(arg, alen, 599, &v) == 0 && v >= 200)
				*status = (int)v;
		}
		p = rb + 1;
	}
}

static void
handle_plugin(h2o_req_t *req, const char *name, size_t nlen)
{
	struct plug *pl;
	cJSON *args;
	unsigned delay = 0;
	int status = 200, garbage = 0;

	stats.plugin_in_flight++;
	trace_record(req);
	pl = h2o_mem_alloc_shared(&req->pool, sizeof(*pl), plug_dispose);
	memset(pl, 0, sizeof(*pl));
	pl->req = req;
	pl->ctype = "application/json";
	if ((pl->ps = plugin_stats_of(name, nlen)) != NULL)
		pl->ps->requests++;
	sb_reset(&g_sb);
	if (g_plugin_secret != NULL && !plug_auth_ok(req)) {
		if (pl->ps != NULL)
			pl->ps->unauthorized++;
		pl->status = 401;
		sb_adds(&g_sb, "{\"error\":\"sim: bad plugin auth\"}");
		goto answer;
	}
	sb_reset(&g_in);
	sb_add(&g_in, req->entity.base ? req->entity.base : "",
	       req->entity.len);
	plug_directives(g_in.p ? g_in.p : "", g_in.len, name, nlen, &delay,
	                &status, &garbage);
	if (g_in.oom || (args = cJSON_ParseWithLength(g_in.p ? g_in.p : "",
	                                              g_in.len)) == NULL) {
		pl->status = 400;
		sb_adds(&g_sb, "{\"error\":\"sim: the body is not JSON\"}");
		goto answer;
	}
	cJSON_Delete(args);
	pl->status = status;
	if (status < 200 || status > 299)
		sb_addf(&g_sb,
		        "{\"error\":\"sim: simulated plugin status %d\"}",
		        status);
	else if (garbage)
		sb_adds(&g_sb,
		        "<html>sim: plugin garbage, not JSON{\"result\"");
	else {
		sb_adds(&g_sb, "{\"result\":");
		sb_add(&g_sb, g_in.p, g_in.len);
		sb_adds(&g_sb, ",\"plugin\":\"");
		sb_add_esc(&g_sb, name, nlen);
		sb_adds(&g_sb, "\"}");
	}
answer:
	if (g_sb.oom) {
		pl->status = 500;
		sb_reset(&g_sb);
		sb_adds(&g_sb, "{\"error\":\"sim: out of memory\"}");
	}
	pl->body = sb_to_pool(&g_sb, &req->pool);
	pl->len = g_sb.len;
	if (delay == 0) {
		plug_send(pl);
		return;
	}
	pl->due = loop_now() + delay;
	pl->timer.cb = plug_tick_cb;
	h2o_timeout_link(
	        g_ctx.loop,
	        timeout_for(delay < SIM_PLUGIN_TICK ? delay : SIM_PLUGIN_TICK),
	        &pl->timer);
}

/* ---- /sim and friends ---- */

static void
handle_stats(h2o_req_t *req)
{
	int i, n = 0;

	sb_reset(&g_sb);
	sb_addf(&g_sb, "{\"requests\":%" PRIu64 ",\"by_status\":{",
	        stats.requests);
	for (i = 100; i < SIM_NSTATUS; i++) {
		if (stats.by_status[i] == 0)
			continue;
		sb_addf(&g_sb, "%s\"%d\":%" PRIu64, n++ ? "," : "", i,
		        stats.by_status[i]);
	}
	sb_addf(&g_sb,
	        "},\"aborted\":%" PRIu64 ",\"closed\":%" PRIu64
	        ",\"rate_limited\":%" PRIu64 ",\"early\":%" PRIu64
	        ",\"early_by_model\":{",
	        stats.aborted, stats.closed, stats.rate_limited, stats.early);
	for (i = 0, n = 0; i < SIM_MAX_WINDOWS; i++) {
		if (!g_win[i].used)
			continue;
		sb_adds(&g_sb, n++ ? ",\"" : "\"");
		sb_add_esc(&g_sb, g_win[i].model, strlen(g_win[i].model));
		sb_addf(&g_sb, "\":%" PRIu64, g_win[i].early);
	}
	sb_addf(&g_sb,
	        "},\"in_flight\":%" PRId64 ",\"plugin_in_flight\":%" PRId64
	        ",\"plugins\":{",
	        stats.in_flight, stats.plugin_in_flight);
	for (int k = 0; k < stats.nplugins; k++) {
		const struct plugin_stats *ps = &stats.plugins[k];

		sb_adds(&g_sb, k ? ",\"" : "\"");
		sb_add_esc(&g_sb, ps->name, strlen(ps->name));
		sb_addf(&g_sb,
		        "\":{\"requests\":%" PRIu64 ",\"aborted\":%" PRIu64
		        ",\"unauthorized\":%" PRIu64 ",\"by_status\":{",
		        ps->requests, ps->aborted, ps->unauthorized);
		for (i = 100, n = 0; i < SIM_NSTATUS; i++)
			if (ps->by_status[i] != 0)
				sb_addf(&g_sb, "%s\"%d\":%" PRIu64,
				        n++ ? "," : "", i, ps->by_status[i]);
		sb_adds(&g_sb, "}}");
	}
	sb_adds(&g_sb, "}}\n");
	send_sb(req, 200, "application/json", &g_sb);
}

static void
config_json(struct sb *s)
{
	sb_addf(s,
	        "{\"latency_ms\":%u,\"token_rate\":%" PRIu32
	        ",\"rate_limit\":%g,\"early_grace_ms\":%u}\n",
	        cfg.latency_ms, cfg.token_rate, cfg.rate_limit,
	        cfg.early_grace_ms);
}

static int
json_uint(const cJSON *o, const char *key, double max, double *out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

	if (v == NULL)
		return 0;
	if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > max ||
	    v->valuedouble != v->valuedouble)
		return -1;
	*out = v->valuedouble;
	return 1;
}

/* POST /sim/config {"latency_ms":N,"token_rate":N,"rate_limit":R}:
 * change any of them while running (the benchmark lifts a limit). */
static void
handle_config(h2o_req_t *req)
{
	double lat = cfg.latency_ms, rate = cfg.token_rate;
	double rl = cfg.rate_limit, grace = cfg.early_grace_ms;
	cJSON *root;
	int a, b, c, e;

	sb_reset(&g_in);
	sb_add(&g_in, req->entity.base ? req->entity.base : "",
	       req->entity.len);
	if (g_in.oom ||
	    (root = cJSON_ParseWithLength(g_in.p, g_in.len)) == NULL) {
		send_error(req, 400, "sim: config body is not JSON", NULL);
		return;
	}
	a = json_uint(root, "latency_ms", SIM_MAX_DELAY_MS, &lat);
	b = json_uint(root, "token_rate", 1000000, &rate);
	c = json_uint(root, "rate_limit", 1000000, &rl);
	e = json_uint(root, "early_grace_ms", 60000, &grace);
	cJSON_Delete(root);
	if (a == -1 || b == -1 || c == -1 || e == -1) {
		send_error(
		        req, 400,
		        "sim: latency_ms, token_rate and rate_limit must be "
		        "non-negative numbers",
		        NULL);
		return;
	}
	cfg.latency_ms = (unsigned)lat;
	cfg.token_rate = (uint32_t)rate;
	cfg.early_grace_ms = (unsigned)grace;
	if (rl != cfg.rate_limit) {
		cfg.rate_limit = rl;
		bucket_reset();
	}
	sb_reset(&g_sb);
	config_json(&g_sb);
	send_sb(req, 200, "application/json", &g_sb);
}

static int
on_req(h2o_handler_t *self, h2o_req_t *req)
{
	h2o_iovec_t p = req->path_normalized, m = req->method;
	int get, post;

	(void)self;
	get = h2o_memis(m.base, m.len, H2O_STRLIT("GET"));
	post = h2o_memis(m.base, m.len, H2O_STRLIT("POST"));
	if (h2o_memis(p.base, p.len, H2O_STRLIT("/v1/chat/completions")) ||
	    h2o_memis(p.base, p.len, H2O_STRLIT("/chat/completions"))) {
		if (post)
			handle_chat(req);
		else
			send_error(req, 405, "sim: use POST", NULL);
	} else if (p.len > 8 && memcmp(p.base, "/plugin/", 8) == 0 &&
	           memchr(p.base + 8, '/', p.len - 8) == NULL) {
		if (post)
			handle_plugin(req, p.base + 8, p.len - 8);
		else
			send_error(req, 405, "sim: use POST", NULL);
	} else if (h2o_memis(p.base, p.len, H2O_STRLIT("/healthz"))) {
		send_body(req, 200, "text/plain", H2O_STRLIT("ok"));
	} else if (h2o_memis(p.base, p.len, H2O_STRLIT("/sim/stats"))) {
		if (get)
			handle_stats(req);
		else
			send_error(req, 405, "sim: use GET", NULL);
	} else if (h2o_memis(p.base, p.len, H2O_STRLIT("/sim/traces"))) {
		if (get)
			handle_traces(req);
		else
			send_error(req, 405, "sim: use GET", NULL);
	} else if (h2o_memis(p.base, p.len, H2O_STRLIT("/sim/reset"))) {
		if (post) {
			int64_t inflight = stats.in_flight;
			int64_t pinflight = stats.plugin_in_flight;

			memset(&stats, 0, sizeof(stats));
			memset(g_win, 0, sizeof(g_win));
			stats.in_flight = inflight;
			stats.plugin_in_flight = pinflight;
			g_ntraces = 0;
			bucket_reset();
			send_body(req, 200, "application/json",
			          H2O_STRLIT("{\"ok\":true}\n"));
		} else
			send_error(req, 405, "sim: use POST", NULL);
	} else if (h2o_memis(p.base, p.len, H2O_STRLIT("/sim/config"))) {
		if (post)
			handle_config(req);
		else if (get) {
			sb_reset(&g_sb);
			config_json(&g_sb);
			send_sb(req, 200, "application/json", &g_sb);
		} else
			send_error(req, 405, "sim: use GET or POST", NULL);
	} else if (h2o_memis(p.base, p.len, H2O_STRLIT("/v1/models"))) {
		send_body(
		        req, 200, "application/json",
		        H2O_STRLIT(
		                "{\"object\":\"list\",\"data\":[{\"id\":"
		                "\"sim\",\"object\":\"model\",\"created\":0,"
		                "\"owned_by\":\"troupe-upstream-sim\"}]}\n"));
	} else {
		send_error(req, 404, "sim: no such endpoint", NULL);
	}
	return 0;
}

/* ---- listening, signals, main ---- */

static void
on_accept(h2o_socket_t *listener, const char *err)
{
	h2o_socket_t *sock;
	int i;

	if (err != NULL)
		return;
	for (i = 0; i < 16; i++) {
		if ((sock = h2o_evloop_socket_accept(listener)) == NULL) {
			if (errno == EMFILE || errno == ENFILE ||
			    errno == ENOBUFS || errno == ENOMEM) {
				/* level-triggered: pause, or we spin */
				h2o_socket_read_stop(listener);
				if (!h2o_timeout_is_linked(&g_accept_retry))
					h2o_timeout_link(g_ctx.loop,
					                 timeout_for(100),
					                 &g_accept_retry);
			}
			return;
		}
		h2o_accept(&g_accept, sock);
	}
}

static void
accept_retry_cb(h2o_timeout_entry_t *entry)
{
	(void)entry;
	if (g_listener != NULL)
		h2o_socket_read_start(g_listener, on_accept);
}

static void
on_signal(h2o_socket_t *sock, const char *err)
{
	struct signalfd_siginfo si;

	(void)err;
	while (read(h2o_socket_get_fd(sock), &si, sizeof(si)) ==
	       (ssize_t)sizeof(si))
		;
	g_quit = 1;
}

static void
usage(FILE *f)
{
	fprintf(f,
	        "usage: troupe-upstream-sim [options]\n"
	        "An OpenAI-compatible LLM upstream simulator for Troupe's "
	        "tests "
	        "and benchmarks.\n"
	        "\n"
	        "  --listen ADDR:PORT   where to listen (default "
	        "127.0.0.1:9090;"
	        " port 0 = any)\n"
	        "  --latency-ms N       delay before the answer / first token "
	        "(default 0)\n"
	        "  --token-rate N       tokens per second when streaming; 0 = "
	        "all "
	        "at once (default 0)\n"
	        "  --rate-limit R       requests/s allowed (token bucket, "
	        "burst R);"
	        " above it 429;\n"
	        "                       0 = none (default 0)\n"
	        "  --ready-file PATH    write ADDR:PORT there once listening "
	        "(removed on exit)\n"
	        "  --plugin-secret S    POST /plugin/<name> wants "
	        "\"Authorization: Bearer S\"\n"
	        "                       or an X-Troupe-Signature HMAC "
	        "keyed with S\n"
	        "  --help               this text\n"
	        "  --version            print the version\n"
	        "\n"
	        "Endpoints: POST /v1/chat/completions, POST /plugin/<name>, "
	        "GET /healthz,\n"
	        "GET /sim/stats, GET /sim/traces, POST /sim/reset, GET|POST "
	        "/sim/config, GET "
	        "/v1/models.\n"
	        "Directives in the last message: [sim:status=NNN] [sim:429] "
	        "[sim:garbage]\n"
	        "[sim:delay=MS] [sim:close] [sim:cut=N] [sim:retry-after=S] "
	        "[sim:tool=NAME]\n"
	        "[sim:tool-rounds=N] [sim:badargs]; in a plugin's body: "
	        "[plugin:delay=MS]\n"
	        "[plugin:status=N] [plugin:garbage] ([plugin:NAME:...] for "
	        "one plugin).\n"
	        "See docs/services/upstream-sim.md.\n");
}

static int
parse_num(const char *s, double max, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno != 0 || end == s || *end != '\0' || v < 0 || v > max ||
	    v != v)
		return -1;
	*out = v;
	return 0;
}

/* ADDR:PORT or [V6ADDR]:PORT, numeric only. */
static int
parse_listen(const char *s, struct sockaddr_storage *ss, socklen_t *sslen)
{
	struct addrinfo hints, *res = NULL;
	char host[256];
	const char *colon, *h, *port;
	size_t hl;

	if ((colon = strrchr(s, ':')) == NULL)
		return -1;
	h = s;
	hl = (size_t)(colon - s);
	if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
		h++;
		hl -= 2;
	}
	if (hl == 0 || hl >= sizeof(host))
		return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	port = colon + 1;
	memset(&hints, 0, sizeof(hints));
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
	hints.ai_socktype = SOCK_STREAM;
	if (getaddrinfo(host, port, &hints, &res) != 0 || res == NULL)
		return -1;
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	*sslen = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

static int
open_listener(const struct sockaddr_storage *ss, socklen_t sslen)
{
	int fd, on = 1;

	if ((fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1)
		return -1;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == -1 ||
	    bind(fd, (const struct sockaddr *)ss, sslen) == -1 ||
	    listen(fd, SOMAXCONN) == -1) {
		close(fd);
		return -1;
	}
	return fd;
}

static void
addr_string(int fd, char *out, size_t outsz)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char host[INET6_ADDRSTRLEN], port[16];

	if (getsockname(fd, (struct sockaddr *)&ss, &len) == -1 ||
	    getnameinfo((struct sockaddr *)&ss, len, host, sizeof(host), port,
	                sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(out, outsz, "?");
		return;
	}
	if (ss.ss_family == AF_INET6)
		snprintf(out, outsz, "[%s]:%s", host, port);
	else
		snprintf(out, outsz, "%s:%s", host, port);
}

static int
write_ready_file(const char *path, const char *addr)
{
	char tmp[PATH_MAX];
	FILE *f;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return -1;
	if ((f = fopen(tmp, "w")) == NULL)
		return -1;
	fprintf(f, "%s\n", addr);
	if (fclose(f) != 0 || rename(tmp, path) == -1) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

/* READY=1 to $NOTIFY_SOCKET when there is one (systemd, or a harness
 * that waits for it); a plain datagram, so no libsystemd. */
static void
notify_ready(void)
{
	static const char msg[] = "READY=1\nSTATUS=listening";
	struct sockaddr_un sun;
	const char *path = getenv("NOTIFY_SOCKET");
	size_t n;
	int fd;

	if (path == NULL || (path[0] != '/' && path[0] != '@') ||
	    (n = strlen(path)) >= sizeof(sun.sun_path))
		return;
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	memcpy(sun.sun_path, path, n);
	if (path[0] == '@')
		sun.sun_path[0] = '\0';
	if ((fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) == -1)
		return;
	(void)sendto(fd, msg, sizeof(msg) - 1, MSG_NOSIGNAL,
	             (struct sockaddr *)&sun,
	             (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n));
	close(fd);
}

static void
raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
	        {"listen", required_argument, NULL, 'l'},
	        {"latency-ms", required_argument, NULL, 'L'},
	        {"token-rate", required_argument, NULL, 't'},
	        {"rate-limit", required_argument, NULL, 'r'},
	        {"ready-file", required_argument, NULL, 'f'},
	        {"plugin-secret", required_argument, NULL, 'S'},
	        {"help", no_argument, NULL, 'h'},
	        {"version", no_argument, NULL, 'V'},
	        {NULL, 0, NULL, 0},
	};
	const char *listen_at = "127.0.0.1:9090", *ready = NULL;
	struct sockaddr_storage ss;
	socklen_t sslen;
	h2o_hostconf_t *host;
	h2o_pathconf_t *path;
	h2o_handler_t *handler;
	char addr[300];
	sigset_t set;
	double v;
	int ch, fd, sfd;

	while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (ch) {
		case 'l':
			listen_at = optarg;
			break;
		case 'L':
			if (parse_num(optarg, SIM_MAX_DELAY_MS, &v) == -1)
				goto badarg;
			cfg.latency_ms = (unsigned)v;
			break;
		case 't':
			if (parse_num(optarg, 1000000, &v) == -1)
				goto badarg;
			cfg.token_rate = (uint32_t)v;
			break;
		case 'r':
			if (parse_num(optarg, 1000000, &v) == -1)
				goto badarg;
			cfg.rate_limit = v;
			break;
		case 'f':
			ready = optarg;
			break;
		case 'S':
			if (optarg[0] == '\0')
				goto badarg;
			g_plugin_secret = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("troupe-upstream-sim %s\n", TROUPE_VERSION);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 1;
	}
	if (parse_listen(listen_at, &ss, &sslen) == -1) {
		fprintf(stderr,
		        "troupe-upstream-sim: bad --listen %s "
		        "(want ADDR:PORT)\n",
		        listen_at);
		return 1;
	}

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	if (sigprocmask(SIG_BLOCK, &set, NULL) == -1 ||
	    (sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC)) == -1) {
		fprintf(stderr, "troupe-upstream-sim: signalfd: %s\n",
		        strerror(errno));
		return 1;
	}
	raise_nofile();
	g_idbase = (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16);

	h2o_config_init(&g_conf);
	g_conf.server_name = h2o_iovec_init(H2O_STRLIT("troupe-upstream-sim"));
	g_conf.max_request_entity_size = SIM_MAX_BODY;
	g_conf.http1.upgrade_to_http2 = 0;
	g_conf.http1.req_timeout = 30000;
	host = h2o_config_register_host(
	        &g_conf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
	path = h2o_config_register_path(host, "/", 0);
	handler = h2o_create_handler(path, sizeof(*handler));
	handler->on_req = on_req;
	h2o_context_init(&g_ctx, h2o_evloop_create(), &g_conf);
	g_accept.ctx = &g_ctx;
	g_accept.hosts = g_conf.hosts;
	g_accept_retry.cb = accept_retry_cb;
	/* the durations every run needs; later ones are added on demand,
	 * and timeout_for() never returns NULL once one exists */
	if (timeout_for(1) == NULL || timeout_for(100) == NULL) {
		fprintf(stderr, "troupe-upstream-sim: out of memory\n");
		return 1;
	}
	bucket_reset();

	if ((fd = open_listener(&ss, sslen)) == -1) {
		fprintf(stderr, "troupe-upstream-sim: listen %s: %s\n",
		        listen_at, strerror(errno));
		return 1;
	}
	addr_string(fd, addr, sizeof(addr));
	g_listener = h2o_evloop_socket_create(g_ctx.loop, fd,
	                                      H2O_SOCKET_FLAG_DONT_READ);
	h2o_socket_read_start(g_listener, on_accept);
	g_sigsock = h2o_evloop_socket_create(g_ctx.loop, sfd,
	                                     H2O_SOCKET_FLAG_DONT_READ);
	h2o_socket_read_start(g_sigsock, on_signal);

	if (ready != NULL && write_ready_file(ready, addr) == -1) {
		fprintf(stderr, "troupe-upstream-sim: ready file %s: %s\n",
		        ready, strerror(errno));
		return 1;
	}
	printf("troupe-upstream-sim: listening on %s (latency %u ms, token "
	       "rate %" PRIu32 "/s, rate limit %g/s)\n",
	       addr, cfg.latency_ms, cfg.token_rate, cfg.rate_limit);
	fflush(stdout);
	notify_ready();

	while (!g_quit && h2o_evloop_run(g_ctx.loop, INT32_MAX) == 0)
		;

	if (ready != NULL)
		unlink(ready);
	h2o_socket_read_stop(g_listener);
	h2o_socket_close(g_listener);
	g_listener = NULL;
	h2o_socket_read_stop(g_sigsock);
	h2o_socket_close(g_sigsock);
	g_sigsock = NULL;
	/* h2o frees closed sockets on the next turn of the loop */
	(void)h2o_evloop_run(g_ctx.loop, 0);
	free(g_sb.p);
	free(g_raw.p);
	free(g_in.p);
	free(g_res.p);
	return 0;
badarg:
	fprintf(stderr, "troupe-upstream-sim: bad value for --%s: %s\n",
	        opts[ch == 'L'   ? 1
	             : ch == 't' ? 2
	             : ch == 'S' ? 5
	                         : 3]
	                .name,
	        optarg);
	return 1;
}
