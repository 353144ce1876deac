/* SPDX-License-Identifier: ISC */
/*
 * edge_http: HTTP/1.1 on libh2o-evloop 2.2.5.  Listener, routes, limits,
 * answers, and the pending table of chats sent to auth.
 *
 * Loops.  h2o's evloop is the outer loop; ours (svc->loop: the mailbox,
 * timers, signals) is watched through a dup() of its epoll fd, and one
 * turn of it runs whenever that fd is readable.  Everything runs on this
 * one thread.
 *
 * A chat.  The handler checks the request, parks per-request state (a
 * waiter, allocated with h2o_mem_alloc_shared() in the request's pool) in
 * the pending table and on one shared h2o timeout list (every chat has the
 * same duration), and sends CHAT_REQUEST to auth.  The request is then
 * answered exactly once, by whichever comes first: a CHAT_REPLY
 * (edge_http_reply), the deadline (504), or nothing at all if the
 * connection goes first (the pool's dispose callback unlinks the waiter).
 * Never touch a req after a FINAL h2o_send(): it may be freed inside it.
 *
 * v3.  /v3/chat and /v3/chat/{retrieve,message/list,cancel} go to auth the
 * same way (route v3.*).  A CHAT_EVENT for a waiting request turns its
 * answer into a 200 text/event-stream, written through our generator
 * (one send in flight, the rest queued, 1 MiB at most); the event with
 * last=1 ends it, and an error or the deadline after the stream began
 * ends it with conversation.chat.failed and done.  When the client of a
 * v3 chat leaves before its answer ended (the pool goes while the waiter
 * is live: a failed write, a dropped slow client, or the sweep seeing end
 * of file on a connection h2o is not reading), the dispatcher gets
 * CLIENT_GONE.
 *
 * Limits.  h2o enforces the body limit (max_request_entity_size: its 413
 * and its 400s for broken framing come out as our JSON through a filter on
 * the fallback path) and one request timeout (http1.req_timeout, set to
 * idle_timeout_ms: it runs from the end of one response to the end of the
 * next request).  The head limit and the head/body timeout are ours: the
 * handler refuses a complete head larger than max_head (431), and a sweep
 * every few hundred ms looks at connections that are partway through a
 * request: more than max_head bytes without the end of the head (431), or
 * started more than head_timeout_ms ago (408).  What h2o 2.2.5 refuses
 * itself before we see anything (more than 100 headers, a head past
 * H2O_MAX_REQLEN = 417792 bytes, a malformed request line) gets h2o's
 * plain-text 400 and a close.  See docs/services/edge.md.
 *
 * Closing after an error: the socket is dup()ed before h2o closes it, and
 * the copy is shut down for writing and drained for a moment (a lingering
 * close), so a client still sending does not get a reset that would eat
 * our answer.
 *
 * PITFALLS.md (h2o): upgrade_to_http2 is off; SIGPIPE is ignored (svc);
 * a listener passed by systemd is wrapped with DONT_READ; EMFILE pauses
 * accepting for 100 ms; foreign fds are dup()ed before h2o owns them.
 *
 * DIAGNOSTICS: setup failures return -1 with a reason (edge.c makes them
 * fatal); accept pauses are logged at most every 10 s; nothing is logged
 * per request.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <h2o.h>
#include <h2o/http1.h>

#include "coze.h"
#include "edge.h"
#include "edge_addr.h"
#include "edge_pending.h"
#include "edge_req.h"
#include "edge_tier.h"
#include "edge_webhook.h"
#include "trace.h"

/*
 * picohttpparser, bundled in and exported by libh2o-evloop 2.2.5 (which
 * installs no header for it): the very parser h2o runs on a request head,
 * so what we let through is exactly what h2o accepts.
 */
struct phr_header {
	const char *name;
	size_t name_len;
	const char *value;
	size_t value_len;
};
int phr_parse_request(const char *buf, size_t len, const char **method,
                      size_t *method_len, const char **path, size_t *path_len,
                      int *minor_version, struct phr_header *headers,
                      size_t *num_headers, size_t last_len);

#define EDGE_MAX_HEADERS 100     /* h2o 2.2.5's H2O_MAX_HEADERS */
#define EDGE_ACCEPT_BATCH 64     /* accepts per readable listener */
#define EDGE_ACCEPT_PAUSE_MS 100 /* after EMFILE and friends */
#define EDGE_LINGER_MS 2000      /* drain a socket this long before close */
#define EDGE_DRAIN_CHECK_MS 20
#define EDGE_CTR_CACHE 24 /* (status, code) pairs cached per endpoint */
#define EDGE_ADDR_GC_BUCKETS 1024 /* address buckets looked at per sweep */

#define EDGE_STREAM_QMAX (1 << 20) /* bytes a slow stream client may owe */

/* A peer that is stopping (a rolling restart) refuses a chat with this
 * code in its CHAT_REPLY: it did not run it.  The edge sends the request
 * again, first every EDGE_RESEND_FAST_MS, after EDGE_RESEND_FAST_N tries
 * every EDGE_RESEND_SLOW_MS, while less than half of chat_timeout_ms has
 * passed; after that, or past the deadline, the client gets 503/5030.
 * Never shown to a client. */
#define EDGE_CODE_STOPPING MSG_CODE_STOPPING
#define EDGE_RESEND_FAST_MS 100
#define EDGE_RESEND_FAST_N 5
#define EDGE_RESEND_SLOW_MS 500

enum edge_ep {
	EP_HEALTHZ,
	EP_READYZ,
	EP_CHAT,
	EP_OTHER,
	EP_V3CHAT,
	EP_V3RETRIEVE,
	EP_V3LIST,
	EP_V3CANCEL,
	EP_WEBHOOK, /* /api/v1/execute: answers in edge_webhook.c's shape */
	EP_N
};
static const char *const ep_name[EP_N] = {
        "/healthz",
        "/readyz",
        "/v1/bot/chat",
        "other",
        "/v3/chat",
        "/v3/chat/retrieve",
        "/v3/chat/message/list",
        "/v3/chat/cancel",
        "/api/v1/execute",
};

struct edge_waiter;

/* One accepted connection (h2o owns the socket; we watch it). */
struct edge_conn {
	h2o_linklist_t link;
	h2o_linklist_t rewrap; /* on E.rewrap: put conn_read back */
	h2o_socket_t *sock;
	uint64_t nreq;          /* requests that reached the handler */
	uint64_t partial_nreq;  /* nreq when partial_since was taken */
	uint64_t partial_since; /* h2o time a partial request was seen */
	int linger_fd;          /* dup for a lingering close, or -1 */
	struct edge_waiter *w;  /* its v3 chat waiting or streaming, or NULL */
	/* its client address in the per-address table, or NULL */
	struct edge_addr_ent *addr;
};

/* A socket being drained before it is closed. */
struct edge_linger {
	h2o_socket_t *sock;
	h2o_timeout_entry_t to;
};

/*
 * A request waiting for its CHAT_REPLY or streaming its CHAT_EVENTs;
 * lives in the request's pool (h2o_mem_alloc_shared: waiter_dispose runs
 * when the pool goes).  req is NULL once the answer is handed to h2o or
 * the request is gone.
 */
struct edge_waiter {
	struct edge_pending_ent ent;
	h2o_req_t *req;
	h2o_timeout_entry_t to;
	h2o_timeout_entry_t rto; /* waiting to be sent again */
	unsigned resends;  /* times sent again after EDGE_CODE_STOPPING */
	h2o_iovec_t trace; /* = tr */
	char tr[EDGE_TRACE_LEN];
	enum edge_ep ep;
	uint64_t received_ms, deadline_ms;
	struct edge_conn *ec; /* v3 chat: its connection (sweep watches it) */
	/* v3: the ids we know (chat_id made here for v3.chat) */
	char chat_id[EDGE_ID_MAX + 1];
	char conv_id[EDGE_ID_MAX + 1];
	char *bot_id; /* in the pool */
	size_t bot_id_len;
	unsigned v3chat : 1;    /* CLIENT_GONE if it ends early */
	unsigned sent : 1;      /* CHAT_REQUEST left */
	unsigned ended : 1;     /* its whole answer is with h2o or queued */
	unsigned streaming : 1; /* the 200 event stream started */
	unsigned inflight : 1;  /* an h2o_send() waits for proceed */
	unsigned final : 1;     /* the stream ends after q */
	unsigned dead : 1;      /* dropped; ignore what comes */
	unsigned tr_client : 1; /* tr is the client's (else ours, a root) */
	unsigned tp_theirs : 1; /* the client sent a valid traceparent (its
	                           tracestate goes on), tracing on or off */
	h2o_generator_t gen;
	struct buf out; /* bytes of the send in flight */
	struct buf q;   /* bytes waiting for it */
};

struct edge_ctr {
	int status;
	int64_t code;
	uint64_t *c;
};

static struct {
	struct svc *svc;
	struct edge_conf conf;
	h2o_globalconf_t gconf;
	h2o_context_t ctx;
	h2o_accept_ctx_t accept_ctx;
	h2o_evloop_t *loop;
	h2o_socket_t *listener, *loopsock;
	char where[160];
	int stopping;
	uint64_t stop_at; /* h2o time the drain gives up */

	h2o_timeout_t pause_to, chat_to, sweep_to, linger_to, drain_to;
	h2o_timeout_t resend_fast, resend_slow;
	struct edge_waiter *redo; /* the waiter a new attempt continues */
	h2o_timeout_entry_t pause_ent, sweep_ent, drain_ent;
	uint64_t last_pause_log;
	struct edge_addr addrs; /* per-address limits */
	uint64_t last_full_log;

	h2o_linklist_t conns, rewrap;
	h2o_socket_cb h2o_read; /* h2o's HTTP/1 read callback */
	struct edge_pending pending;
	struct edge_ids ids;

	struct edge_ctr ctr[EP_N][EDGE_CTR_CACHE];
	int nctr[EP_N];
	struct histo *dur[EP_N];
	double *g_pending, *g_conns;
	uint64_t *c_pauses, *c_head_big, *c_head_slow, *c_gone, *c_dropped;
	uint64_t *c_resends;
	uint64_t *c_ref_conns, *c_ref_rate, *c_untracked;
	double *g_addrs;
	uint64_t nconns;
} E;

static uint64_t ctr_sink;
static double gauge_sink;

static h2o_iovec_t hn_logid = {"x-tt-logid", 10};
static h2o_iovec_t hn_trace = {"traceparent", 11};
static h2o_iovec_t hn_ratelimit = {"ratelimit", 9};
static h2o_iovec_t hn_rl_policy = {"ratelimit-policy", 16};

static void conn_kill(struct edge_conn *, int, int64_t, const char *);
static void route_chat(h2o_req_t *, const char *, h2o_iovec_t);
static void route_v3chat(h2o_req_t *, const char *, h2o_iovec_t);
static void waiter_resend(h2o_timeout_entry_t *);
static void conn_on_close(void *);
static void drain_check(h2o_timeout_entry_t *);
static void on_accept(h2o_socket_t *, const char *);

/* Metrics. */

static uint64_t *
ctr_get(enum edge_ep ep, int status, int64_t code)
{
	struct edge_ctr *c = E.ctr[ep];
	char lb[192];
	uint64_t *p;
	int i;

	for (i = 0; i < E.nctr[ep]; i++)
		if (c[i].status == status && c[i].code == code)
			return (c[i].c);
	snprintf(lb, sizeof(lb),
	         "service=\"%s\",endpoint=\"%s\",status=\"%d\",code=\"%" PRId64
	         "\"",
	         E.svc->name, ep_name[ep], status, code);
	p = metrics_counter(
	        E.svc->metrics, "coze_http_requests_total",
	        "HTTP requests answered, by endpoint, status and code", lb);
	if (p == NULL)
		return (&ctr_sink);
	if (E.nctr[ep] < EDGE_CTR_CACHE) {
		c[E.nctr[ep]].status = status;
		c[E.nctr[ep]].code = code;
		c[E.nctr[ep]].c = p;
		E.nctr[ep]++;
	}
	return (p);
}

/* Count one answer and its time since the request began. */
static void
observe(h2o_req_t *req, enum edge_ep ep, int status, int64_t code)
{
	struct timeval *now = h2o_get_timestamp(&E.ctx, NULL, NULL);
	const struct timeval *b = &req->timestamps.request_begin_at;
	double d = 0;

	++*ctr_get(ep, status, code);
	if (b->tv_sec != 0)
		d = (double)(now->tv_sec - b->tv_sec) +
		    (double)(now->tv_usec - b->tv_usec) / 1e6;
	if (E.dur[ep] != NULL)
		histo_observe(E.dur[ep], d < 0 ? 0 : d);
}

static void
gauges(void)
{
	*E.g_pending = (double)edge_pending_count(&E.pending);
	*E.g_conns = (double)E.nconns;
	*E.g_addrs = (double)edge_addr_count(&E.addrs);
}

static int
metrics_setup(struct svc *svc)
{
	char lb[160], lb_svc[160];
	int i;

	for (i = 0; i < EP_N; i++) {
		snprintf(lb, sizeof(lb), "service=\"%s\",endpoint=\"%s\"",
		         svc->name, ep_name[i]);
		E.dur[i] = metrics_histo(
		        svc->metrics, "coze_http_request_duration_seconds",
		        "Time from the start of a request to its answer", lb);
	}
	snprintf(lb, sizeof(lb), "service=\"%s\"", svc->name);
	snprintf(lb_svc, sizeof(lb_svc), "service=\"%s\"", svc->name);
	E.g_pending =
	        metrics_gauge(svc->metrics, "troupe_edge_pending_requests",
	                      "Chats sent on and waiting for their reply", lb);
	E.g_conns = metrics_gauge(svc->metrics, "troupe_edge_connections",
	                          "Open client connections", lb);
	E.c_pauses = metrics_counter(
	        svc->metrics, "troupe_edge_accept_pauses_total",
	        "Times accepting paused for lack of descriptors or memory",
	        lb);
	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"too_large\"",
	         svc->name);
	E.c_head_big = metrics_counter(
	        svc->metrics, "troupe_edge_cut_requests_total",
	        "Partial requests cut by the head limit or the head timeout",
	        lb);
	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"timeout\"",
	         svc->name);
	E.c_head_slow = metrics_counter(
	        svc->metrics, "troupe_edge_cut_requests_total",
	        "Partial requests cut by the head limit or the head timeout",
	        lb);
	if (E.g_pending == NULL)
		E.g_pending = &gauge_sink;
	if (E.g_conns == NULL)
		E.g_conns = &gauge_sink;
	if (E.c_pauses == NULL)
		E.c_pauses = &ctr_sink;
	if (E.c_head_big == NULL)
		E.c_head_big = &ctr_sink;
	if (E.c_head_slow == NULL)
		E.c_head_slow = &ctr_sink;
	E.c_gone = metrics_counter(
	        svc->metrics, "troupe_edge_clients_gone_total",
	        "v3 chats whose client left before the answer ended "
	        "(CLIENT_GONE sent)",
	        lb_svc);
	E.c_dropped = metrics_counter(
	        svc->metrics, "troupe_edge_stream_drops_total",
	        "Stream clients dropped for falling more than 1 MiB behind",
	        lb_svc);
	E.c_resends = metrics_counter(
	        svc->metrics, "troupe_edge_resent_requests_total",
	        "Chats sent again after a stopping peer refused them", lb_svc);
	if (E.c_gone == NULL)
		E.c_gone = &ctr_sink;
	if (E.c_dropped == NULL)
		E.c_dropped = &ctr_sink;
	if (E.c_resends == NULL)
		E.c_resends = &ctr_sink;
	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"per_addr_conns\"",
	         svc->name);
	E.c_ref_conns = metrics_counter(
	        svc->metrics, "troupe_edge_refused_connections_total",
	        "New connections refused by a per-address limit", lb);
	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"per_addr_rate\"",
	         svc->name);
	E.c_ref_rate = metrics_counter(
	        svc->metrics, "troupe_edge_refused_connections_total",
	        "New connections refused by a per-address limit", lb);
	E.c_untracked = metrics_counter(
	        svc->metrics, "troupe_edge_untracked_connections_total",
	        "Connections admitted without per-address limits (the address "
	        "table was full)",
	        lb_svc);
	E.g_addrs = metrics_gauge(
	        svc->metrics, "troupe_edge_tracked_addresses",
	        "Client addresses in the per-address table", lb_svc);
	if (E.c_ref_conns == NULL)
		E.c_ref_conns = &ctr_sink;
	if (E.c_ref_rate == NULL)
		E.c_ref_rate = &ctr_sink;
	if (E.c_untracked == NULL)
		E.c_untracked = &ctr_sink;
	if (E.g_addrs == NULL)
		E.g_addrs = &gauge_sink;
	return (0);
}

/* Answers. */

static const char *
reason_of(int status)
{
	switch (status) {
	case 200:
		return ("OK");
	case 400:
		return ("Bad Request");
	case 401:
		return ("Unauthorized");
	case 403:
		return ("Forbidden");
	case 404:
		return ("Not Found");
	case 405:
		return ("Method Not Allowed");
	case 408:
		return ("Request Timeout");
	case 409:
		return ("Conflict");
	case 413:
		return ("Payload Too Large");
	case 417:
		return ("Expectation Failed");
	case 429:
		return ("Too Many Requests");
	case 431:
		return ("Request Header Fields Too Large");
	case 500:
		return ("Internal Server Error");
	case 502:
		return ("Bad Gateway");
	case 503:
		return ("Service Unavailable");
	case 504:
		return ("Gateway Timeout");
	default:
		return (status < 400 ? "OK" : "Error");
	}
}

static void
add_hdr(h2o_req_t *req, h2o_iovec_t *name, const char *orig, const char *v,
        size_t n)
{
	h2o_headers_t *h = &req->res.headers;

	h2o_vector_reserve(&req->pool, h, h->size + 1);
	h->entries[h->size++] =
	        (h2o_header_t){name, orig, h2o_iovec_init(v, n)};
}

/* A header whose value (from a message) is copied into the pool; none
 * if v is empty or not a plain one-line value. */
static void
add_hdr_copy(h2o_req_t *req, h2o_iovec_t *name, const char *orig,
             struct mstr v)
{
	char *c;

	if (v.n == 0 || v.n > 256 || memchr(v.p, '\r', v.n) != NULL ||
	    memchr(v.p, '\n', v.n) != NULL)
		return;
	c = h2o_mem_alloc_pool(&req->pool, v.n);
	memcpy(c, v.p, v.n);
	add_hdr(req, name, orig, c, v.n);
}

/* The request id (in the pool) and trace of a request: the client's
 * traceparent if valid, else a new one. */
static char *
req_ids(h2o_req_t *req, h2o_iovec_t *trace)
{
	char *id = h2o_mem_alloc_pool(&req->pool,
	                              EDGE_REQID_LEN + 1 + EDGE_TRACE_LEN);
	ssize_t i;

	edge_reqid_next(&E.ids, h2o_now(E.loop), id);
	id[EDGE_REQID_LEN] = '\0';
	i = h2o_find_header_by_str(&req->headers, H2O_STRLIT("traceparent"),
	                           -1);
	if (i != -1 && edge_trace_valid(req->headers.entries[i].value.base,
	                                req->headers.entries[i].value.len)) {
		*trace = req->headers.entries[i].value;
	} else {
		edge_trace_new(&E.ids, id + EDGE_REQID_LEN + 1);
		*trace = h2o_iovec_init(id + EDGE_REQID_LEN + 1,
		                        EDGE_TRACE_LEN);
	}
	return (id);
}

/* Our record of req's connection, or NULL. */
static struct edge_conn *
conn_of(h2o_req_t *req)
{
	h2o_socket_t *sock;

	if (req->conn->callbacks->get_socket == NULL ||
	    (sock = req->conn->callbacks->get_socket(req->conn)) == NULL ||
	    sock->on_close.cb != conn_on_close)
		return (NULL);
	return (sock->on_close.data);
}

/* Ask for a lingering close of req's connection after this answer. */
static void
want_close(h2o_req_t *req)
{
	struct edge_conn *ec;

	req->http1_is_persistent = 0;
	if ((ec = conn_of(req)) == NULL || ec->linger_fd != -1)
		return;
	ec->linger_fd = fcntl(h2o_socket_get_fd(ec->sock), F_DUPFD_CLOEXEC, 0);
}

/* After this answer h2o restarts reading with its own callback: put
 * ours back once the h2o loop turn ends (edge_http_run). */
static void
rewrap_later(h2o_req_t *req)
{
	struct edge_conn *ec = conn_of(req);

	if (ec != NULL && !h2o_linklist_is_linked(&ec->rewrap))
		h2o_linklist_insert(&E.rewrap, &ec->rewrap);
}

static h2o_generator_t respond_gen = {NULL, NULL};

static int
method_is(h2o_req_t *req, const char *m, size_t n)
{
	return (h2o_memis(req->method.base, req->method.len, m, n));
}

#define R_CLOSE 0x1

/* Send the whole answer.  req must not be touched afterwards. */
static void
respond(h2o_req_t *req, enum edge_ep ep, int status, int64_t code,
        const char *reqid, h2o_iovec_t trace, h2o_iovec_t body,
        int retry_after, int flags)
{
	req->res.status = status;
	req->res.reason = reason_of(status);
	req->res.content_length = body.len;
	h2o_vector_reserve(&req->pool, &req->res.headers, 5);
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               "Content-Type", H2O_STRLIT("application/json"));
	add_hdr(req, &hn_logid, "X-Tt-Logid", reqid, EDGE_REQID_LEN);
	add_hdr(req, &hn_trace, NULL, trace.base, trace.len);
	if (retry_after > 0) {
		char *v = h2o_mem_alloc_pool(&req->pool, 24);
		int n = snprintf(v, 24, "%d", retry_after);
		h2o_add_header(&req->pool, &req->res.headers,
		               H2O_TOKEN_RETRY_AFTER, "Retry-After", v,
		               (size_t)n);
	}
	if (flags & R_CLOSE)
		want_close(req);
	else
		rewrap_later(req);
	observe(req, ep, status, code);
	h2o_start_response(req, &respond_gen);
	if (method_is(req, H2O_STRLIT("HEAD")))
		h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
	else
		h2o_send(req, &body, 1, H2O_SEND_STATE_FINAL);
}

/* Send a JSON error; extra: raw members for "detail" or NULL. */
static void
respond_error(h2o_req_t *req, enum edge_ep ep, int status, int64_t code,
              const char *msg, size_t msglen, const char *reqid,
              h2o_iovec_t trace, int retry_after, int flags, const char *extra)
{
	size_t cap = edge_json_error_max(msglen) + (extra ? strlen(extra) : 0);
	char *b, *wb;
	size_t n;

	if (ep == EP_WEBHOOK) {
		/* The webhook's shape, {"status","message","data":null}. */
		cap = edge_webhook_json_max(msglen, 0);
		wb = h2o_mem_alloc_pool(&req->pool, cap);
		n = edge_webhook_json(wb, cap, status, msg, msglen, NULL, 0);
		respond(req, ep, status, code, reqid, trace,
		        h2o_iovec_init(wb, n), retry_after, flags);
		return;
	}
	b = h2o_mem_alloc_pool(&req->pool, cap);
	n = edge_json_error(b, cap, code, msg, msglen, reqid, extra);

	respond(req, ep, status, code, reqid, trace, h2o_iovec_init(b, n),
	        retry_after, flags);
}

#define ERR(req, ep, st, code, msg, id, tr, fl)                               \
	respond_error(req, ep, st, code, msg, strlen(msg), id, tr, 0, fl, NULL)

/* Routes. */

static void
method_not_allowed(h2o_req_t *req, enum edge_ep ep, const char *allow,
                   const char *id, h2o_iovec_t tr)
{
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_ALLOW, "Allow",
	               allow, strlen(allow));
	ERR(req, ep, 405, 4000, "method not allowed", id, tr, 0);
}

static void
route_healthz(h2o_req_t *req, const char *id, h2o_iovec_t tr)
{
	static const char ok[] = "{\"status\":\"ok\"}";

	if (!method_is(req, H2O_STRLIT("GET"))) {
		method_not_allowed(req, EP_HEALTHZ, "GET", id, tr);
		return;
	}
	respond(req, EP_HEALTHZ, 200, 0, id, tr,
	        h2o_iovec_init(ok, sizeof(ok) - 1), 0, 0);
}

/* /readyz with every peer up: the tier (edge_tier.c); L3 is 503. */
static void
readyz_tier(h2o_req_t *req, const char *id, h2o_iovec_t tr, const char *ok,
            size_t oklen)
{
	struct buf b = {0};
	uint64_t ra = 0;
	char *p;
	int st = edge_tier_readyz(&b, now_mono_ms(), &ra);

	if (st == -1) {
		buf_free(&b);
		respond(req, EP_READYZ, 200, 0, id, tr,
		        h2o_iovec_init(ok, oklen), 0, 0);
		return;
	}
	p = h2o_mem_alloc_pool(&req->pool, b.len);
	memcpy(p, b.b, b.len);
	respond(req, EP_READYZ, st, st == 200 ? 0 : 5030, id, tr,
	        h2o_iovec_init(p, b.len), (int)ra, 0);
	buf_free(&b);
}

/* Tier L3 and too many chats open: 503 + Retry-After at once (1). */
static int
tier_shed(h2o_req_t *req, enum edge_ep ep, const char *id, h2o_iovec_t tr)
{
	static const char msg[] = "overloaded (degraded tier L3): retry later";
	uint64_t ra;

	if (!edge_tier_shed(edge_pending_count(&E.pending), now_mono_ms(),
	                    &ra))
		return (0);
	respond_error(req, ep, 503, 5030, msg, sizeof(msg) - 1, id, tr,
	              (int)ra, 0, NULL);
	return (1);
}

static void
route_readyz(h2o_req_t *req, const char *id, h2o_iovec_t tr)
{
	static const char ok[] = "{\"status\":\"ready\",\"tier\":\"L0\"}";
	const char *down[8];
	char msg[160], extra[160];
	size_t n, i;
	int ml, xl;

	if (!method_is(req, H2O_STRLIT("GET"))) {
		method_not_allowed(req, EP_READYZ, "GET", id, tr);
		return;
	}
	if ((n = edge_peers_down(E.svc, down, nitems(down))) == 0 &&
	    !E.stopping) {
		readyz_tier(req, id, tr, ok, sizeof(ok) - 1);
		return;
	}
	/* Peer names are short mailbox names: this always fits. */
	ml = snprintf(msg, sizeof(msg), "not ready: %s",
	              E.stopping ? "stopping" : "unreachable:");
	xl = snprintf(extra, sizeof(extra), ",\"down\":[");
	for (i = 0; i < n && (size_t)ml < 100 && (size_t)xl < 100; i++) {
		if (!E.stopping)
			ml += snprintf(msg + ml, sizeof(msg) - (size_t)ml,
			               "%s %s", i ? "," : "", down[i]);
		xl += snprintf(extra + xl, sizeof(extra) - (size_t)xl,
		               "%s\"%s\"", i ? "," : "", down[i]);
	}
	snprintf(extra + xl, sizeof(extra) - (size_t)xl, "]");
	respond_error(req, EP_READYZ, 503, 5030, msg, strlen(msg), id, tr, 1,
	              0, extra);
}

/* Pending chats and streams. */

static struct mstr
ms(const char *p, size_t n)
{
	return ((struct mstr){p, (uint32_t)n});
}

/* Unlink w from the pending table and the deadline list. */
static void
waiter_unlink(struct edge_waiter *w)
{
	edge_pending_del(&E.pending, &w->ent);
	if (h2o_timeout_is_linked(&w->to))
		h2o_timeout_unlink(&w->to);
	if (h2o_timeout_is_linked(&w->rto))
		h2o_timeout_unlink(&w->rto);
	gauges();
}

static void
waiter_detach(struct edge_waiter *w)
{
	waiter_unlink(w);
	w->req = NULL;
}

/* The traceparent w's hop sends on: a child of the client's, or ours. */
static struct mstr
waiter_tp(const struct edge_waiter *w, char *buf)
{
	if (w->tr_client &&
	    trace_child(ms(w->tr, EDGE_TRACE_LEN), "edge", 0, buf) == 0)
		return (ms(buf, TRACE_TP_LEN));
	return (ms(w->tr, EDGE_TRACE_LEN));
}

/* The edge's server span of w's request, answered with status: the
 * trace's local root, which decides its sampling in telemetry. */
static void
waiter_span(const struct edge_waiter *w, int status)
{
	char buf[TRACE_TP_LEN];
	struct trace_span s = {.name = "edge",
	                       .kind = TRACE_SERVER,
	                       .start_ns = w->received_ms * 1000000ULL,
	                       .http_status = status,
	                       .error = status >= 500,
	                       .flags = TRACE_F_LOCAL_ROOT,
	                       .route = MSTR(ep_name[w->ep]),
	                       .bot_id = ms(w->bot_id, w->bot_id_len)};

	if (w->tr_client && strchr("13579bdf", w->tr[EDGE_TRACE_LEN - 1]))
		s.flags |= TRACE_F_SAMPLED;
	trace_end(waiter_tp(w, buf),
	          w->tr_client ? ms(w->tr, EDGE_TRACE_LEN) : MSTR_NULL, &s);
}

/* One debug line per answered chat, with the request's REQUEST_ID,
 * TRACE_ID and BOT_ID fields: `journalctl REQUEST_ID=<X-Tt-Logid>` finds
 * it.  Nothing at the default level (no log line per request). */
static void
waiter_log(const struct edge_waiter *w, int status, int64_t code)
{
	if (trace_enabled)
		waiter_span(w, status);
	if (log_getlevel() < LOG_L_DEBUG)
		return;
	log_req(LOG_L_DEBUG, ms(w->ent.reqid, EDGE_REQID_LEN),
	        ms(w->tr, EDGE_TRACE_LEN), ms(w->bot_id, w->bot_id_len),
	        "%s answered %d (code %lld) after %llu ms", ep_name[w->ep],
	        status, (long long)code,
	        (unsigned long long)(now_wall_ms() - w->received_ms));
}

/* Tell the dispatcher that the client of w's v3 chat left before its
 * answer ended (it cancels the run, or drops it from its queue). */
static void
client_gone(struct edge_waiter *w)
{
	struct chat_request b = {0};
	struct msg_head head;

	head.reqid = ms(w->ent.reqid, EDGE_REQID_LEN);
	head.traceparent = ms(w->tr, EDGE_TRACE_LEN);
	head.deadline_ms = w->deadline_ms;
	head.reply_to = MSTR_NULL;
	b.route = MSTR_LIT("v3.chat");
	b.token = MSTR_NULL;
	b.sub = MSTR_NULL;
	b.bot_id = MSTR_NULL;
	b.user_id = MSTR_NULL;
	b.query = MSTR_NULL;
	b.history_id = MSTR(w->conv_id);
	b.chat_id = MSTR(w->chat_id);
	b.messages = MSTR_NULL;
	b.scopes = MSTR_NULL;
	++*E.c_gone;
	/* Best effort: with the dispatcher's backlog full the run ends at
	 * its deadline anyway. */
	(void)msg_send_client_gone(E.svc->ipc, "dispatcher", &head, &b);
}

/*
 * The request's pool is going: answered (after the last byte was
 * written), or the connection closed.  A v3 chat whose answer had not
 * ended (its client left, or we dropped a slow one) is reported to the
 * dispatcher.
 */
static void
waiter_dispose(void *p)
{
	struct edge_waiter *w = p;

	if (w->v3chat && w->sent && !w->ended)
		client_gone(w);
	waiter_detach(w);
	if (w->ec != NULL && w->ec->w == w)
		w->ec->w = NULL;
	w->ec = NULL;
	buf_free(&w->out);
	buf_free(&w->q);
}

/*
 * Streams.  The first CHAT_EVENT for a waiting request starts a 200
 * text/event-stream answer (chunked); each event's text is appended.
 * h2o allows one send in flight: what arrives meanwhile waits in w->q
 * and leaves when h2o calls proceed.  w->out holds the bytes of the send
 * in flight (h2o does not copy them).  A client that lets more than
 * EDGE_STREAM_QMAX bytes pile up behind the send in flight is dropped.
 */

static void stream_flush(struct edge_waiter *);

static void
stream_proceed(h2o_generator_t *gen, h2o_req_t *req)
{
	struct edge_waiter *w =
	        H2O_STRUCT_FROM_MEMBER(struct edge_waiter, gen, gen);

	(void)req;
	w->inflight = 0;
	buf_reset(&w->out);
	stream_flush(w);
}

/* The connection went while a send was in flight: the pool's dispose
 * (waiter_dispose) follows and does the rest. */
static void
stream_stop(h2o_generator_t *gen, h2o_req_t *req)
{
	struct edge_waiter *w =
	        H2O_STRUCT_FROM_MEMBER(struct edge_waiter, gen, gen);

	(void)req;
	w->inflight = 0;
}

/* Send what waits, unless a send is in flight.  After the final send
 * (w->final), neither w nor its request may be touched: h2o may free
 * both inside h2o_send() or once the bytes are written. */
static void
stream_flush(struct edge_waiter *w)
{
	h2o_req_t *req = w->req;
	struct buf t;
	h2o_iovec_t b;

	if (req == NULL || w->inflight || (w->q.len == 0 && !w->final))
		return;
	t = w->out;
	w->out = w->q;
	w->q = t;
	buf_reset(&w->q);
	b = h2o_iovec_init(w->out.b, w->out.len);
	if (w->final) {
		w->req = NULL;
		rewrap_later(req);
		h2o_send(req, &b, b.len > 0 ? 1 : 0, H2O_SEND_STATE_FINAL);
		return;
	}
	w->inflight = 1;
	h2o_send(req, &b, 1, H2O_SEND_STATE_IN_PROGRESS);
}

/* Drop w's client (too slow, or out of memory): h2o closes the
 * connection, and waiter_dispose tells the dispatcher.  w is freed. */
static void
stream_drop(struct edge_waiter *w)
{
	struct edge_conn *ec = w->ec;

	++*E.c_dropped;
	if (ec == NULL && w->req != NULL)
		ec = conn_of(w->req);
	if (ec == NULL || E.h2o_read == NULL) {
		/* Not ours to close (never happens with HTTP/1): stop
		 * adding to it and let the connection end the stream. */
		w->final = 0;
		buf_reset(&w->q);
		w->dead = 1;
		return;
	}
	/* XXX as in conn_kill: a read error is how h2o 2.2.5 closes. */
	E.h2o_read(ec->sock, h2o_socket_error_closed);
}

/* Start w's 200 event stream. */
static void
stream_start(struct edge_waiter *w)
{
	h2o_req_t *req = w->req;

	req->res.status = 200;
	req->res.reason = "OK";
	req->res.content_length = SIZE_MAX;
	h2o_vector_reserve(&req->pool, &req->res.headers, 5);
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               "Content-Type",
	               H2O_STRLIT("text/event-stream; charset=utf-8"));
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL,
	               "Cache-Control", H2O_STRLIT("no-cache"));
	add_hdr(req, &hn_logid, "X-Tt-Logid", w->ent.reqid, EDGE_REQID_LEN);
	add_hdr(req, &hn_trace, NULL, w->tr, EDGE_TRACE_LEN);
	w->gen.proceed = stream_proceed;
	w->gen.stop = stream_stop;
	w->streaming = 1;
	observe(req, w->ep, 200, 0);
	h2o_start_response(req, &w->gen);
}

/* Append n bytes of events for w's client; last: the stream ends after
 * them.  w may be freed when this returns (after the final send, or when
 * the client is dropped). */
static void
stream_push(struct edge_waiter *w, const char *p, size_t n, int last)
{
	if (w->dead)
		return;
	if (!w->streaming)
		stream_start(w);
	/* What the client owes us beyond the send in flight. */
	if ((w->inflight && w->q.len > 0 && w->q.len + n > EDGE_STREAM_QMAX) ||
	    buf_add(&w->q, p, n) == -1) {
		stream_drop(w);
		return;
	}
	if (last)
		w->final = 1;
	stream_flush(w);
}

/* Remember the conversation id the run's first events carry (a new
 * conversation's id is made by the worker), for a failed event we may
 * have to write ourselves. */
static void
stream_sniff_conv(struct edge_waiter *w, struct mstr sse)
{
	static const char key[] = "\"conversation_id\":\"";
	const char *p = memmem(sse.p, sse.n, key, sizeof(key) - 1), *e;
	size_t n;

	if (p == NULL)
		return;
	p += sizeof(key) - 1;
	e = memchr(p, '"', (size_t)(sse.p + sse.n - p));
	if (e == NULL || (n = (size_t)(e - p)) == 0 || n > EDGE_ID_MAX ||
	    !coze_id_ok(ms(p, n)))
		return;
	memcpy(w->conv_id, p, n);
	w->conv_id[n] = '\0';
}

/* End w's stream with conversation.chat.failed (the chat as we know it,
 * last_error {code, msg}) and done.  w may be freed. */
static void
stream_fail(struct edge_waiter *w, int64_t code, const char *msg,
            size_t msglen)
{
	struct coze_chat c = {0};
	struct buf b = {0};

	c.id = MSTR(w->chat_id);
	c.conversation_id = MSTR(w->conv_id);
	c.bot_id = ms(w->bot_id, w->bot_id_len);
	c.status = "failed";
	c.created_at = w->received_ms / 1000;
	c.failed_at = now_wall_ms() / 1000;
	c.error_code = code;
	c.error_msg = ms(msg, msglen);
	w->ended = 1;
	waiter_unlink(w);
	if (coze_sse_chat(&b, "conversation.chat.failed", &c) == -1 ||
	    coze_sse_done(&b) == -1) {
		buf_free(&b);
		stream_drop(w);
		return;
	}
	stream_push(w, b.b, b.len, 1);
	buf_free(&b);
}

static void
waiter_timeout(h2o_timeout_entry_t *to)
{
	struct edge_waiter *w =
	        H2O_STRUCT_FROM_MEMBER(struct edge_waiter, to, to);
	h2o_req_t *req = w->req;

	waiter_log(w, 504, 5040);
	if (req != NULL && w->streaming) {
		stream_fail(w, 5040, H2O_STRLIT("deadline exceeded"));
	} else {
		w->ended = 1;
		waiter_detach(w);
		if (req != NULL)
			ERR(req, w->ep, 504, 5040, "deadline exceeded",
			    w->ent.reqid, w->trace, 0);
	}
	if (E.stopping)
		drain_check(NULL);
}

static struct edge_waiter *
waiter_find(struct mstr reqid)
{
	struct edge_pending_ent *e;
	struct edge_waiter *w;

	if ((e = edge_pending_find(&E.pending, reqid.p, reqid.n)) == NULL)
		return (NULL);
	w = (struct edge_waiter *)e;
	if (w->req == NULL || w->ended)
		return (NULL);
	return (w);
}

/*
 * A stopping peer refused w's chat (EDGE_CODE_STOPPING): keep w pending
 * and send the request again a little later, unless its answer began or
 * half its time is gone.  1 if it will be sent again.
 */
static int
waiter_resend_later(struct edge_waiter *w)
{
	uint64_t now = now_wall_ms();

	if (w->streaming || w->req == NULL ||
	    (w->ep != EP_CHAT && w->ep != EP_V3CHAT) ||
	    now - w->received_ms >= E.conf.chat_timeout_ms / 2 ||
	    now >= w->deadline_ms || h2o_timeout_is_linked(&w->rto))
		return (0);
	h2o_timeout_link(E.loop,
	                 w->resends < EDGE_RESEND_FAST_N ? &E.resend_fast
	                                                 : &E.resend_slow,
	                 &w->rto);
	return (1);
}

/* Send w's request again: the route handler runs once more on the same
 * h2o request, with the same request id and trace, and makes the waiter
 * that continues this one (E.redo: same received time and deadline);
 * this one ends without answering. */
static void
waiter_resend(h2o_timeout_entry_t *to)
{
	struct edge_waiter *w =
	        H2O_STRUCT_FROM_MEMBER(struct edge_waiter, rto, to);
	h2o_req_t *req = w->req;
	h2o_iovec_t tr = h2o_iovec_init(w->tr, EDGE_TRACE_LEN);

	if (req == NULL || w->ended)
		return;
	++*E.c_resends;
	log_req(LOG_L_DEBUG, ms(w->ent.reqid, EDGE_REQID_LEN),
	        ms(w->tr, EDGE_TRACE_LEN), ms(w->bot_id, w->bot_id_len),
	        "%s: sent again (%u) after a stopping peer refused it",
	        ep_name[w->ep], w->resends + 1);
	w->ended = 1;
	waiter_detach(w);
	E.redo = w;
	if (w->ep == EP_CHAT)
		route_chat(req, w->ent.reqid, tr);
	else
		route_v3chat(req, w->ent.reqid, tr);
	E.redo = NULL;
	if (E.stopping)
		drain_check(NULL);
}

/* Answer a webhook call: a raw reply's data is the whole body; a plain
 * 200's data goes into {"status":200,"message":"ok","data":...}. */
static void
webhook_reply(h2o_req_t *req, struct edge_waiter *w, int status, int64_t code,
              const struct chat_reply *r)
{
	int raw = r->raw && r->data.n > 0;
	size_t cap = raw ? r->data.n + 1 : edge_webhook_json_max(2, r->data.n);
	char *b = h2o_mem_alloc_pool(&req->pool, cap);
	size_t n;

	if (raw) {
		memcpy(b, r->data.p, r->data.n);
		n = r->data.n;
	} else
		n = edge_webhook_json(b, cap, status, "ok", 2, r->data.p,
		                      r->data.n);
	respond(req, w->ep, status, code, w->ent.reqid, w->trace,
	        h2o_iovec_init(b, n),
	        r->retry_after > 86400 ? 86400 : (int)r->retry_after, 0);
}

int
edge_http_reply(struct mstr reqid, const struct chat_reply *r)
{
	struct edge_waiter *w;
	h2o_req_t *req;
	int status = (int)r->status;
	int64_t code = r->code;

	if ((w = waiter_find(reqid)) == NULL)
		return (-1);
	req = w->req;
	if (r->status != 200 && (r->status < 400 || r->status > 599)) {
		status = 502;
		code = 5020;
	}
	if (code == 0)
		code = 5000;
	if (code == EDGE_CODE_STOPPING && waiter_resend_later(w))
		goto out;
	if (code == EDGE_CODE_STOPPING)
		code = 5030;
	waiter_log(w, status, r->status == 200 ? 0 : code);
	if (w->streaming) {
		/* The stream has begun: say it in the stream. */
		if (r->status == 200) {
			w->ended = 1;
			waiter_unlink(w);
			stream_push(w,
			            H2O_STRLIT("event:done\ndata:\"[DONE]\""
			                       "\n\n"),
			            1);
		} else
			stream_fail(w, code, r->msg.p, r->msg.n);
		goto out;
	}
	w->ended = 1;
	waiter_detach(w);
	if (w->ep == EP_WEBHOOK &&
	    (r->status == 200 || (r->raw && r->data.n > 0))) {
		webhook_reply(req, w, status, r->status == 200 ? 0 : code, r);
		goto out;
	}
	if (r->status == 200) {
		size_t cap = edge_json_ok_max(r->data.n);
		char *b = h2o_mem_alloc_pool(&req->pool, cap);
		size_t n = edge_json_ok(b, cap, r->data.p, r->data.n);

		respond(req, w->ep, 200, 0, w->ent.reqid, w->trace,
		        h2o_iovec_init(b, n), 0, 0);
	} else {
		int ra = r->retry_after > 86400 ? 86400 : (int)r->retry_after;

		/* An inbound limit's refusal (auth): its RateLimit fields. */
		add_hdr_copy(req, &hn_ratelimit, "RateLimit", r->ratelimit);
		add_hdr_copy(req, &hn_rl_policy, "RateLimit-Policy",
		             r->ratelimit_policy);
		respond_error(req, w->ep, status, code, r->msg.p, r->msg.n,
		              w->ent.reqid, w->trace, ra, 0, NULL);
	}
out:
	if (E.stopping)
		drain_check(NULL);
	return (0);
}

int
edge_http_event(struct mstr reqid, const struct chat_event *ev)
{
	struct edge_waiter *w;

	if ((w = waiter_find(reqid)) == NULL)
		return (-1);
	if (w->conv_id[0] == '\0')
		stream_sniff_conv(w, ev->sse);
	if (ev->last) {
		w->ended = 1;
		waiter_unlink(w);
		if (trace_enabled) /* the stream's end: its span's */
			waiter_span(w, 200);
	}
	stream_push(w, ev->sse.p, ev->sse.n, ev->last != 0);
	if (E.stopping)
		drain_check(NULL);
	return (0);
}

/* "Bearer <token>": the token, or an empty iovec. */
static h2o_iovec_t
bearer(h2o_req_t *req)
{
	ssize_t i =
	        h2o_find_header(&req->headers, H2O_TOKEN_AUTHORIZATION, -1);
	const char *p, *end;

	if (i == -1)
		return (h2o_iovec_init(NULL, 0));
	p = req->headers.entries[i].value.base;
	end = p + req->headers.entries[i].value.len;
	if (end - p < 7 || !h2o_lcstris(p, 6, H2O_STRLIT("bearer")) ||
	    (p[6] != ' ' && p[6] != '\t'))
		return (h2o_iovec_init(NULL, 0));
	for (p += 7; p < end && (*p == ' ' || *p == '\t'); p++)
		;
	while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	return (h2o_iovec_init(p, (size_t)(end - p)));
}

/* A waiter for req, in its pool (freed with it). */
static struct edge_waiter *
waiter_new(h2o_req_t *req, enum edge_ep ep, const char *id, h2o_iovec_t tr,
           uint64_t now)
{
	struct edge_waiter *w =
	        h2o_mem_alloc_shared(&req->pool, sizeof(*w), waiter_dispose);

	memset(w, 0, sizeof(*w));
	memcpy(w->ent.reqid, id, EDGE_REQID_LEN + 1);
	/* Our own copy: CLIENT_GONE may need it while the pool goes. */
	memcpy(w->tr, tr.base, EDGE_TRACE_LEN);
	w->tp_theirs = tr.base != id + EDGE_REQID_LEN + 1;
	w->tr_client = trace_enabled && w->tp_theirs;
	w->req = req;
	w->ep = ep;
	w->trace = h2o_iovec_init(w->tr, EDGE_TRACE_LEN);
	w->to.cb = waiter_timeout;
	w->received_ms = now;
	w->deadline_ms = now + E.conf.chat_timeout_ms;
	w->rto.cb = waiter_resend;
	if (E.redo != NULL) {
		/* Another attempt at the same request: its first clock. */
		w->received_ms = E.redo->received_ms;
		w->deadline_ms = E.redo->deadline_ms;
		w->resends = E.redo->resends + 1;
		w->tr_client = E.redo->tr_client;
		w->tp_theirs = E.redo->tp_theirs;
	}
	return (w);
}

/* The tracestate that goes on with req (in its pool): its tracestate
 * lines joined by ',', checked and cut by edge_tracestate(); empty when
 * there is none or it is invalid.  Only asked when the client's own
 * traceparent goes on (a trace the edge starts has no tracestate). */
static struct mstr
req_tracestate(h2o_req_t *req)
{
	ssize_t i = -1;
	size_t len = 0, n;
	char *all, *out;

	while ((i = h2o_find_header_by_str(&req->headers,
	                                   H2O_STRLIT("tracestate"), i)) != -1)
		len += req->headers.entries[i].value.len + 1;
	if (len == 0)
		return (MSTR_NULL);
	all = h2o_mem_alloc_pool(&req->pool, len);
	len = 0;
	while ((i = h2o_find_header_by_str(
	                &req->headers, H2O_STRLIT("tracestate"), i)) != -1) {
		h2o_iovec_t v = req->headers.entries[i].value;

		if (len > 0)
			all[len++] = ',';
		memcpy(all + len, v.base, v.len);
		len += v.len;
	}
	out = h2o_mem_alloc_pool(&req->pool, EDGE_TRACESTATE_MAX);
	n = edge_tracestate(all, len, out);
	return (ms(out, n));
}

/* Send body to auth for w, and park w until its answer; or answer 503 at
 * once if ipc refuses. */
static void
waiter_send(struct edge_waiter *w, struct chat_request *body, h2o_iovec_t tok)
{
	h2o_req_t *req = w->req;
	struct msg_head head;
	char ctp[TRACE_TP_LEN];

	head.reqid = ms(w->ent.reqid, EDGE_REQID_LEN);
	head.traceparent = waiter_tp(w, ctp);
	head.deadline_ms = w->deadline_ms;
	head.reply_to = MSTR(E.svc->name);
	body->token = ms(tok.base, tok.len);
	body->sub = MSTR_NULL;
	body->received_ms = w->received_ms;
	body->tracestate = w->tp_theirs ? req_tracestate(req) : MSTR_NULL;
	if (msg_send_chat_request(E.svc->ipc, "auth", &head, body) == -1) {
		waiter_log(w, 503, 5030);
		w->req = NULL;
		respond_error(
		        req, w->ep, 503, 5030,
		        H2O_STRLIT(
		                "service unavailable: auth is not keeping up"),
		        w->ent.reqid, w->trace, 1, 0, NULL);
		return;
	}
	w->sent = 1;
	edge_pending_add(&E.pending, &w->ent);
	h2o_timeout_link(E.loop, &E.chat_to, &w->to);
	gauges();
}

/* The request's body as a NUL-terminated copy in its pool. */
static char *
body_text(h2o_req_t *req)
{
	char *text = h2o_mem_alloc_pool(&req->pool, req->entity.len + 1);

	if (req->entity.len)
		memcpy(text, req->entity.base, req->entity.len);
	text[req->entity.len] = '\0';
	return (text);
}

static void
route_chat(h2o_req_t *req, const char *id, h2o_iovec_t tr)
{
	struct edge_chat c;
	struct edge_waiter *w;
	struct chat_request body = {0};
	h2o_iovec_t tok;
	char msg[128], *text;

	if (!method_is(req, H2O_STRLIT("POST"))) {
		method_not_allowed(req, EP_CHAT, "POST", id, tr);
		return;
	}
	if ((tok = bearer(req)).len == 0) {
		ERR(req, EP_CHAT, 401, 4100, "missing token", id, tr, 0);
		return;
	}
	if (tier_shed(req, EP_CHAT, id, tr))
		return;
	text = body_text(req);
	if (edge_chat_parse(text, req->entity.len, &c, msg, sizeof(msg)) ==
	    -1) {
		ERR(req, EP_CHAT, 400, 4000, msg, id, tr, 0);
		return;
	}
	w = waiter_new(req, EP_CHAT, id, tr, now_wall_ms());
	w->bot_id = h2o_mem_alloc_pool(&req->pool, c.bot_id_len + 1);
	memcpy(w->bot_id, c.bot_id, c.bot_id_len);
	w->bot_id[c.bot_id_len] = '\0';
	w->bot_id_len = c.bot_id_len;
	body.route = MSTR_LIT("v1.chat");
	body.bot_id = ms(c.bot_id, c.bot_id_len);
	body.user_id = ms(c.user_id, c.user_id_len);
	body.query = ms(c.query, c.query_len);
	body.history_id = ms(c.history_id, c.history_id_len);
	waiter_send(w, &body, tok);
	edge_chat_free(&c);
}

/* The query string of req (after '?'), or an empty one. */
static h2o_iovec_t
query_of(h2o_req_t *req)
{
	if (req->query_at == SIZE_MAX || req->query_at >= req->path.len)
		return (h2o_iovec_init("", 0));
	return (h2o_iovec_init(req->path.base + req->query_at + 1,
	                       req->path.len - req->query_at - 1));
}

static void
route_v3chat(h2o_req_t *req, const char *id, h2o_iovec_t tr)
{
	struct edge_v3chat c;
	struct edge_waiter *w;
	struct chat_request body = {0};
	struct edge_conn *ec;
	h2o_iovec_t tok, q = query_of(req);
	char msg[160], conv[EDGE_ID_MAX + 1] = "", *text;
	int r;

	if (!method_is(req, H2O_STRLIT("POST"))) {
		method_not_allowed(req, EP_V3CHAT, "POST", id, tr);
		return;
	}
	if ((tok = bearer(req)).len == 0) {
		ERR(req, EP_V3CHAT, 401, 4100, "missing token", id, tr, 0);
		return;
	}
	if (tier_shed(req, EP_V3CHAT, id, tr))
		return;
	r = edge_query_get(q.base, q.len, "conversation_id", conv,
	                   sizeof(conv));
	if (r == -1 || (r == 1 && !coze_id_ok(MSTR(conv)))) {
		ERR(req, EP_V3CHAT, 400, 4000,
		    "conversation_id must be 1 to 32 decimal digits", id, tr,
		    0);
		return;
	}
	text = body_text(req);
	if (edge_v3chat_parse(text, req->entity.len, &c, msg, sizeof(msg)) ==
	    -1) {
		ERR(req, EP_V3CHAT, 400, 4000, msg, id, tr, 0);
		return;
	}
	w = waiter_new(req, EP_V3CHAT, id, tr, now_wall_ms());
	w->v3chat = 1;
	coze_chat_id_of(ms(w->ent.reqid, EDGE_REQID_LEN), w->chat_id);
	strcpy(w->conv_id, conv);
	w->bot_id = h2o_mem_alloc_pool(&req->pool, c.bot_id_len + 1);
	memcpy(w->bot_id, c.bot_id, c.bot_id_len + 1);
	w->bot_id_len = c.bot_id_len;
	if ((ec = conn_of(req)) != NULL) {
		ec->w = w;
		w->ec = ec;
	}
	body.route = MSTR_LIT("v3.chat");
	body.bot_id = ms(c.bot_id, c.bot_id_len);
	body.user_id = ms(c.user_id, c.user_id_len);
	body.query = ms(c.query, c.query_len);
	body.history_id = MSTR(w->conv_id);
	body.chat_id = MSTR(w->chat_id);
	body.stream = (uint64_t)c.stream;
	body.messages = ms(c.messages, c.messages_len);
	body.scopes = MSTR_NULL;
	waiter_send(w, &body, tok);
	edge_v3chat_free(&c);
}

/* retrieve, message/list, cancel: ids in, the answer from whoever. */
static void
route_v3ids(h2o_req_t *req, enum edge_ep ep, const char *id, h2o_iovec_t tr)
{
	static const char *const routes[EP_N] = {
	        [EP_V3RETRIEVE] = "v3.retrieve",
	        [EP_V3LIST] = "v3.list",
	        [EP_V3CANCEL] = "v3.cancel",
	};
	struct edge_v3ids ids;
	struct edge_waiter *w;
	struct chat_request body = {0};
	h2o_iovec_t tok, q = query_of(req);
	char msg[160], *text = NULL;
	int post = method_is(req, H2O_STRLIT("POST"));

	if (ep == EP_V3CANCEL && !post) {
		method_not_allowed(req, ep, "POST", id, tr);
		return;
	}
	if (!post && !method_is(req, H2O_STRLIT("GET"))) {
		method_not_allowed(req, ep, "GET, POST", id, tr);
		return;
	}
	if ((tok = bearer(req)).len == 0) {
		ERR(req, ep, 401, 4100, "missing token", id, tr, 0);
		return;
	}
	/* The SDK POSTs retrieve with an empty form body: only cancel
	 * reads its body. */
	if (ep == EP_V3CANCEL)
		text = body_text(req);
	if (edge_v3ids_parse(q.base, q.len, text, text ? req->entity.len : 0,
	                     &ids, msg, sizeof(msg)) == -1) {
		ERR(req, ep, 400, 4000, msg, id, tr, 0);
		return;
	}
	w = waiter_new(req, ep, id, tr, now_wall_ms());
	memcpy(w->conv_id, ids.conversation_id, sizeof(w->conv_id));
	memcpy(w->chat_id, ids.chat_id, sizeof(w->chat_id));
	body.route = MSTR(routes[ep]);
	body.bot_id = MSTR_NULL;
	body.user_id = MSTR_NULL;
	body.query = MSTR_NULL;
	body.history_id = MSTR(w->conv_id);
	body.chat_id = MSTR(w->chat_id);
	body.messages = MSTR_NULL;
	body.scopes = MSTR_NULL;
	waiter_send(w, &body, tok);
}

/* The value of the header name (lower case), or p NULL if absent. */
static struct mstr
hdr_of(h2o_req_t *req, const char *name, size_t n)
{
	ssize_t i = h2o_find_header_by_str(&req->headers, name, n, -1);

	if (i == -1)
		return ((struct mstr){NULL, 0});
	return (ms(req->headers.entries[i].value.base,
	           req->headers.entries[i].value.len));
}

/* POST /api/v1/execute?plugin=<name>: checked by edge_webhook.c, then
 * route webhook.execute to auth (no token: the signature is checked
 * here). */
static void
route_webhook(h2o_req_t *req, const char *id, h2o_iovec_t tr)
{
	struct edge_webhook_in in = {0};
	struct edge_webhook wh;
	struct edge_waiter *w;
	struct chat_request body = {0};
	h2o_iovec_t q = query_of(req);
	char msg[160], plugin[EDGE_WEBHOOK_PLUGIN_MAX + 2];
	int64_t code;
	int st, r;

	if (!method_is(req, H2O_STRLIT("POST"))) {
		method_not_allowed(req, EP_WEBHOOK, "POST", id, tr);
		return;
	}
	in.bot_id = hdr_of(req, H2O_STRLIT("x-coze-bot-id"));
	in.timestamp = hdr_of(req, H2O_STRLIT("x-coze-timestamp"));
	in.nonce = hdr_of(req, H2O_STRLIT("x-coze-nonce"));
	in.signature = hdr_of(req, H2O_STRLIT("x-coze-signature"));
	r = edge_query_get(q.base, q.len, "plugin", plugin, sizeof(plugin));
	if (r == 1)
		in.plugin = MSTR(plugin);
	else if (r == -1)
		in.plugin = MSTR_LIT("?"); /* malformed or too long */
	in.body = body_text(req);
	in.body_len = req->entity.len;
	st = edge_webhook_check(E.conf.verify_token, now_wall_ms() / 1000, &in,
	                        &wh, msg, sizeof(msg));
	if (st != 0) {
		/* The body has no code; metrics count these. */
		code = st == 401 ? 4100 : st == 403 ? 4101 : 4000;
		ERR(req, EP_WEBHOOK, st, st == 500 ? 5000 : code, msg, id, tr,
		    0);
		return;
	}
	w = waiter_new(req, EP_WEBHOOK, id, tr, now_wall_ms());
	w->bot_id = h2o_mem_alloc_pool(&req->pool, wh.bot_id.n + 1);
	memcpy(w->bot_id, wh.bot_id.p, wh.bot_id.n);
	w->bot_id[wh.bot_id.n] = '\0';
	w->bot_id_len = wh.bot_id.n;
	body.route = MSTR_LIT("webhook.execute");
	body.bot_id = wh.bot_id;
	body.user_id = ms(wh.user_id, wh.user_id_len);
	body.query = wh.plugin;
	body.history_id = MSTR_NULL;
	body.chat_id = MSTR_NULL;
	body.messages = ms(wh.arguments, wh.arguments_len);
	body.scopes = MSTR_NULL;
	body.nonce = wh.nonce;
	waiter_send(w, &body, h2o_iovec_init("", 0));
	edge_webhook_free(&wh);
}

/* The size of a parsed head as h2o rebuilds it (request line, Host,
 * headers; Content-Length and the like are not kept, a few bytes). */
static size_t
head_size(h2o_req_t *req)
{
	size_t n = req->input.method.len + req->input.path.len + 12, i;

	if (req->input.authority.base != NULL)
		n += req->input.authority.len + 8;
	for (i = 0; i < req->headers.size; i++)
		n += req->headers.entries[i].name->len +
		     req->headers.entries[i].value.len + 4;
	return (n + 2);
}

static enum edge_ep
ep_of(h2o_iovec_t path)
{
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/healthz")))
		return (EP_HEALTHZ);
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/v1/bot/chat")))
		return (EP_CHAT);
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/readyz")))
		return (EP_READYZ);
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/api/v1/execute")))
		return (EP_WEBHOOK);
	/* The Coze SDK with a base URL ending in '/' asks for //v3/...: the
	 * v3 routes take extra leading slashes. */
	while (path.len > 1 && path.base[1] == '/') {
		path.base++;
		path.len--;
	}
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/v3/chat")))
		return (EP_V3CHAT);
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/v3/chat/retrieve")))
		return (EP_V3RETRIEVE);
	if (h2o_memis(path.base, path.len,
	              H2O_STRLIT("/v3/chat/message/list")))
		return (EP_V3LIST);
	if (h2o_memis(path.base, path.len, H2O_STRLIT("/v3/chat/cancel")))
		return (EP_V3CANCEL);
	return (EP_OTHER);
}

static int
on_req(h2o_handler_t *self, h2o_req_t *req)
{
	struct edge_conn *ec = conn_of(req);
	h2o_iovec_t tr;
	const char *id = req_ids(req, &tr);
	enum edge_ep ep = ep_of(req->path_normalized);

	(void)self;
	if (ec != NULL)
		ec->nreq++;
	if (head_size(req) > E.conf.max_head) {
		ERR(req, ep, 431, 4000, "request head too large", id, tr,
		    R_CLOSE);
		return (0);
	}
	switch (ep) {
	case EP_HEALTHZ:
		route_healthz(req, id, tr);
		break;
	case EP_CHAT:
		route_chat(req, id, tr);
		break;
	case EP_READYZ:
		route_readyz(req, id, tr);
		break;
	case EP_V3CHAT:
		route_v3chat(req, id, tr);
		break;
	case EP_V3RETRIEVE:
	case EP_V3LIST:
	case EP_V3CANCEL:
		route_v3ids(req, ep, id, tr);
		break;
	case EP_WEBHOOK:
		route_webhook(req, id, tr);
		break;
	default:
		ERR(req, EP_OTHER, 404, 4000, "no such route", id, tr, 0);
		break;
	}
	return (0);
}

/*
 * Errors h2o answers itself after parsing a head (413, 400 for broken
 * framing, 417, 404) go through the fallback path: give them our JSON and
 * headers, and a lingering close when h2o closes after them.
 */
struct err_ostream {
	h2o_ostream_t super;
	h2o_iovec_t body;
};

static void
err_ostream_send(h2o_ostream_t *self, h2o_req_t *req, h2o_iovec_t *bufs,
                 size_t n, h2o_send_state_t st)
{
	struct err_ostream *o = (struct err_ostream *)self;
	h2o_iovec_t body = o->body;

	(void)bufs;
	/* Our JSON instead of h2o's text, once. */
	o->body = h2o_iovec_init(NULL, 0);
	if (n > 0 && body.base != NULL)
		h2o_ostream_send_next(&o->super, req, &body, 1, st);
	else
		h2o_ostream_send_next(&o->super, req, NULL, 0, st);
}

static void
err_filter(h2o_filter_t *self, h2o_req_t *req, h2o_ostream_t **slot)
{
	struct err_ostream *o;
	h2o_iovec_t tr;
	const char *id, *msg;
	enum edge_ep ep;
	size_t cap;
	int st = req->res.status;
	char *b;

	(void)self;
	if (st < 400)
		goto next;
	switch (st) {
	case 413:
		msg = "request body too large";
		break;
	case 404:
		msg = "no such route";
		break;
	case 417:
		msg = "expectation failed";
		break;
	case 400:
		msg = "bad request framing";
		break;
	default:
		msg = "request refused";
		break;
	}
	id = req_ids(req, &tr);
	ep = ep_of(req->path_normalized);
	cap = edge_json_error_max(strlen(msg));
	if (ep == EP_WEBHOOK)
		cap = edge_webhook_json_max(strlen(msg), 0);
	b = h2o_mem_alloc_pool(&req->pool, cap);
	o = (struct err_ostream *)h2o_add_ostream(req, sizeof(*o), slot);
	o->super.do_send = err_ostream_send;
	o->body = h2o_iovec_init(
	        b, ep == EP_WEBHOOK
	                   ? edge_webhook_json(b, cap, st, msg, strlen(msg),
	                                       NULL, 0)
	                   : edge_json_error(b, cap, st >= 500 ? 5000 : 4000,
	                                     msg, strlen(msg), id, NULL));
	memset(&req->res.headers, 0, sizeof(req->res.headers));
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               "Content-Type", H2O_STRLIT("application/json"));
	add_hdr(req, &hn_logid, "X-Tt-Logid", id, EDGE_REQID_LEN);
	add_hdr(req, &hn_trace, NULL, tr.base, tr.len);
	req->res.content_length = o->body.len;
	if (!req->http1_is_persistent)
		want_close(req);
	else
		rewrap_later(req);
	observe(req, ep, st, st >= 500 ? 5000 : 4000);
	slot = &o->super.next;
next:
	h2o_setup_next_ostream(req, slot);
}

/* Connections. */

static void
linger_close(struct edge_linger *l)
{
	if (h2o_timeout_is_linked(&l->to))
		h2o_timeout_unlink(&l->to);
	h2o_socket_close(l->sock);
	free(l);
}

static void
linger_on_read(h2o_socket_t *sock, const char *err)
{
	struct edge_linger *l = sock->data;

	if (err != NULL) {
		linger_close(l);
		return;
	}
	h2o_buffer_consume(&sock->input, sock->input->size);
}

static void
linger_on_timeout(h2o_timeout_entry_t *to)
{
	linger_close(H2O_STRUCT_FROM_MEMBER(struct edge_linger, to, to));
}

/* Our copy of a socket h2o has closed: send FIN after what was written,
 * read and drop what the client still sends, close after a while. */
static void
linger_start(int fd)
{
	struct edge_linger *l;

	(void)shutdown(fd, SHUT_WR);
	if (E.stopping || (l = calloc(1, sizeof(*l))) == NULL) {
		close(fd);
		return;
	}
	l->sock = h2o_evloop_socket_create(E.loop, fd, 0);
	l->sock->data = l;
	l->to.cb = linger_on_timeout;
	h2o_socket_read_start(l->sock, linger_on_read);
	h2o_timeout_link(E.loop, &E.linger_to, &l->to);
}

static void
conn_on_close(void *arg)
{
	struct edge_conn *ec = arg;

	h2o_linklist_unlink(&ec->link);
	if (ec->w != NULL)
		ec->w->ec = NULL;
	if (h2o_linklist_is_linked(&ec->rewrap))
		h2o_linklist_unlink(&ec->rewrap);
	E.nconns--;
	if (ec->addr != NULL)
		edge_addr_release(&E.addrs, ec->addr, h2o_now(E.loop));
	if (ec->linger_fd != -1)
		linger_start(ec->linger_fd);
	free(ec);
	gauges();
}

/* Whether the head ends within the first n bytes of p. */
static int
head_ends(const char *p, size_t n)
{
	return (memmem(p, n, "\n\r\n", 3) != NULL ||
	        memmem(p, n, "\n\n", 2) != NULL);
}

/* Answer a connection h2o is still reading a request on, bypassing h2o
 * (it has nothing to write now), then make h2o close it. */
static void
conn_kill(struct edge_conn *ec, int status, int64_t code, const char *msg)
{
	h2o_socket_t *sock = ec->sock;
	int fd = h2o_socket_get_fd(sock);
	char id[EDGE_REQID_LEN + 1], tr[EDGE_TRACE_LEN], body[512], out[1024];
	size_t bn;
	int n;

	edge_reqid_next(&E.ids, h2o_now(E.loop), id);
	id[EDGE_REQID_LEN] = '\0';
	edge_trace_new(&E.ids, tr);
	bn = edge_json_error(body, sizeof(body), code, msg, strlen(msg), id,
	                     NULL);
	n = snprintf(out, sizeof(out),
	             "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
	             "Content-Length: %zu\r\nConnection: close\r\n"
	             "X-Tt-Logid: %s\r\ntraceparent: %.*s\r\n\r\n%s",
	             status, reason_of(status), bn, id, EDGE_TRACE_LEN, tr,
	             body);
	if (n > 0 && (size_t)n < sizeof(out))
		(void)send(fd, out, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
	++*ctr_get(EP_OTHER, status, code);
	if (ec->linger_fd == -1)
		ec->linger_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	/* XXX h2o 2.2.5 has no way to close an HTTP/1 connection from
	 * outside; a read error is how it learns of a dead peer, so hand it
	 * one: it closes the connection (and frees ec through on_close). */
	E.h2o_read(sock, h2o_socket_error_closed);
}

static int
crlf_only(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != '\r' && p[i] != '\n')
			return (0);
	return (1);
}

/*
 * Look at the head of the request being received before h2o does (the
 * input buffer always starts with it: h2o drops a request's bytes only
 * once it is answered).  Refuse, with our JSON, what h2o would refuse
 * with its plain-text 400 (malformed, more than 100 headers) and what
 * does not fit in max_head.  0: let h2o go on; -1: the connection is
 * closed (and ec freed).
 */
static int
conn_precheck(struct edge_conn *ec)
{
	static struct phr_header many[1024];
	struct phr_header hs[EDGE_MAX_HEADERS];
	h2o_buffer_t *in = ec->sock->input;
	size_t len = in->size < E.conf.max_head ? in->size : E.conf.max_head;
	size_t nh = nitems(hs), ml, pl, i;
	const char *m, *p;
	int minor, r;

	if (in->size == 0)
		return (0);
	r = phr_parse_request(in->bytes, len, &m, &ml, &p, &pl, &minor, hs,
	                      &nh, 0);
	if (r == -2 && in->size <= E.conf.max_head)
		return (0);
	if (r == -2) {
		++*E.c_head_big;
		conn_kill(ec, 431, 4000, "request head too large");
		return (-1);
	}
	if (r == -1) {
		/* Stray line ends: h2o closes without a word. */
		if (in->size <= 4 && crlf_only(in->bytes, in->size))
			return (0);
		nh = nitems(many);
		if (phr_parse_request(in->bytes, len, &m, &ml, &p, &pl, &minor,
		                      many, &nh, 0) != -1)
			conn_kill(ec, 431, 4000, "too many header fields");
		else
			conn_kill(ec, 400, 4000, "malformed request");
		return (-1);
	}
	for (i = 0; i < nh; i++)
		if (hs[i].name == NULL) { /* obs-fold (RFC 9112 5.2) */
			conn_kill(ec, 400, 4000, "malformed request");
			return (-1);
		}
	return (0);
}

/* Our read callback in front of h2o's. */
static void
conn_read(h2o_socket_t *sock, const char *err)
{
	if (err == NULL && conn_precheck(sock->on_close.data) == -1)
		return;
	E.h2o_read(sock, err);
}

/*
 * XXX h2o 2.2.5 has no hook between reading and parsing: put conn_read in
 * h2o's place while h2o reads a head.  h2o sets its callback again each
 * time it restarts reading (after an answer, after 100 Continue), so this
 * runs after every answer (the rewrap list) and in every sweep.
 */
static void
conn_wrap(struct edge_conn *ec)
{
	if (ec->sock->_cb.read == E.h2o_read && E.h2o_read != NULL)
		ec->sock->_cb.read = conn_read;
}

static void
rewrap_run(void)
{
	h2o_linklist_t *node, *next;

	for (node = E.rewrap.next; node != &E.rewrap; node = next) {
		struct edge_conn *ec =
		        H2O_STRUCT_FROM_MEMBER(struct edge_conn, rewrap, node);

		next = node->next;
		/* Still writing its answer: look again next turn. */
		if (!h2o_socket_is_reading(ec->sock))
			continue;
		h2o_linklist_unlink(&ec->rewrap);
		conn_wrap(ec);
	}
}

/* Is the connection partway through receiving a request? */
static int
conn_partial(const struct edge_conn *ec)
{
	h2o_socket_t *s = ec->sock;

	return (h2o_socket_is_reading(s) && !h2o_socket_is_writing(s) &&
	        s->input != NULL && s->input->size > 0);
}

/*
 * Has the client of a v3 chat that is still waiting or streaming gone?
 * h2o does not read a connection while its request is being answered, so
 * look at the kernel's: end of file (or a reset) there means it left.
 * (A client that half-closes after its request counts as gone too.)
 */
static int
conn_gone(const struct edge_conn *ec)
{
	char c;
	ssize_t n;

	if (ec->w == NULL || ec->w->req == NULL || ec->w->ended ||
	    E.h2o_read == NULL || h2o_socket_is_reading(ec->sock))
		return (0);
	n = recv(h2o_socket_get_fd(ec->sock), &c, 1, MSG_PEEK | MSG_DONTWAIT);
	return (n == 0 || (n == -1 && errno != EAGAIN &&
	                   errno != EWOULDBLOCK && errno != EINTR));
}

static void
sweep(h2o_timeout_entry_t *to)
{
	uint64_t now = h2o_now(E.loop);
	h2o_linklist_t *node, *next;

	(void)to;
	if (edge_addr_count(&E.addrs) > 0) {
		edge_addr_gc(&E.addrs, now, EDGE_ADDR_GC_BUCKETS);
		gauges();
	}
	for (node = E.conns.next; node != &E.conns; node = next) {
		struct edge_conn *ec =
		        H2O_STRUCT_FROM_MEMBER(struct edge_conn, link, node);
		h2o_buffer_t *in = ec->sock->input;

		next = node->next;
		if (conn_gone(ec)) {
			/* XXX as in conn_kill; waiter_dispose tells the
			 * dispatcher. */
			E.h2o_read(ec->sock, h2o_socket_error_closed);
			continue;
		}
		conn_wrap(ec);
		if (!conn_partial(ec)) {
			ec->partial_since = 0;
			continue;
		}
		if (ec->partial_since == 0 || ec->partial_nreq != ec->nreq) {
			ec->partial_since = now;
			ec->partial_nreq = ec->nreq;
		}
		if (in->size > E.conf.max_head &&
		    !head_ends(in->bytes, E.conf.max_head)) {
			++*E.c_head_big;
			conn_kill(ec, 431, 4000, "request head too large");
		} else if (now - ec->partial_since >= E.conf.head_timeout_ms) {
			++*E.c_head_slow;
			conn_kill(ec, 408, 4000,
			          "request not received in time");
		}
	}
	h2o_timeout_link(E.loop, &E.sweep_to, &E.sweep_ent);
}

static uint64_t
sweep_every(uint64_t head_ms)
{
	uint64_t t = head_ms / 10;

	return (t < 50 ? 50 : t > 500 ? 500 : t);
}

static void
accept_resume(h2o_timeout_entry_t *to)
{
	(void)to;
	if (!E.stopping)
		h2o_socket_read_start(E.listener, on_accept);
}

static void
accept_pause(int err)
{
	uint64_t now = h2o_now(E.loop);

	++*E.c_pauses;
	if (now - E.last_pause_log >= 10000) {
		E.last_pause_log = now;
		log_warnx("%s: accept: %s; pausing %d ms", __func__,
		          strerror(err), EDGE_ACCEPT_PAUSE_MS);
	}
	h2o_socket_read_stop(E.listener);
	if (!h2o_timeout_is_linked(&E.pause_ent))
		h2o_timeout_link(E.loop, &E.pause_to, &E.pause_ent);
}

/*
 * Refuse a new connection at once, without h2o: a short 503 (5030,
 * Retry-After: 1, Connection: close) if the socket takes it now, then
 * close.  Never waits.
 */
static void
addr_refuse(int fd, const char *msg)
{
	char id[EDGE_REQID_LEN + 1], tr[EDGE_TRACE_LEN], body[512], out[1024];
	size_t bn;
	ssize_t r;
	int n, i;

	/* Read (and drop) what the client sent already: close() with
	 * unread bytes would reset the answer away.  A client that has
	 * left (end of file, an error) is not answered. */
	for (i = 0; i < 4; i++) {
		if ((r = recv(fd, out, sizeof(out), MSG_DONTWAIT)) > 0)
			continue;
		if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
			close(fd);
			return;
		}
		break;
	}
	edge_reqid_next(&E.ids, h2o_now(E.loop), id);
	id[EDGE_REQID_LEN] = '\0';
	edge_trace_new(&E.ids, tr);
	bn = edge_json_error(body, sizeof(body), 5030, msg, strlen(msg), id,
	                     NULL);
	n = snprintf(out, sizeof(out),
	             "HTTP/1.1 503 Service Unavailable\r\n"
	             "Content-Type: application/json\r\n"
	             "Content-Length: %zu\r\nRetry-After: 1\r\n"
	             "Connection: close\r\nX-Tt-Logid: %s\r\n"
	             "traceparent: %.*s\r\n\r\n%s",
	             bn, id, EDGE_TRACE_LEN, tr, body);
	if (n > 0 && (size_t)n < sizeof(out))
		(void)send(fd, out, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
	(void)shutdown(fd, SHUT_WR);
	close(fd);
}

/*
 * The per-address limits for a connection from sa: 0 to go on (*ent its
 * entry or NULL), -1 if it was refused (fd closed).
 */
static int
addr_check(int fd, const struct sockaddr *sa, socklen_t sl,
           struct edge_addr_ent **ent)
{
	struct edge_addr_key k;
	char a[EDGE_ADDR_STRLEN];
	uint64_t now = h2o_now(E.loop);
	int warn;

	*ent = NULL;
	if (!edge_addr_on(&E.addrs) || edge_addr_key_of(sa, sl, &k) == -1)
		return (0);
	switch (edge_addr_admit(&E.addrs, &k, now, ent, &warn)) {
	case EDGE_ADDR_OK:
		return (0);
	case EDGE_ADDR_UNTRACKED:
		++*E.c_untracked;
		if (now - E.last_full_log >= EDGE_ADDR_WARN_MS ||
		    E.last_full_log == 0) {
			E.last_full_log = now;
			log_warnx("%s: %d client addresses tracked: new ones "
			          "are admitted without per-address limits",
			          __func__, EDGE_ADDR_MAX);
		}
		return (0);
	case EDGE_ADDR_OVER_CONNS:
		++*E.c_ref_conns;
		if (warn) {
			edge_addr_fmt(&k, a);
			log_warnx("%s: %s: refusing new connections: %" PRIu64
			          " open (max_conns_per_addr); next report "
			          "in a minute at the earliest",
			          __func__, a, E.conf.max_conns_per_addr);
		}
		addr_refuse(fd, "too many connections from this address");
		return (-1);
	case EDGE_ADDR_OVER_RATE:
	default:
		++*E.c_ref_rate;
		if (warn) {
			edge_addr_fmt(&k, a);
			log_warnx("%s: %s: refusing new connections: over "
			          "%" PRIu64 "/s, burst %" PRIu64
			          " (conn_rate_per_addr); next report in a "
			          "minute at the earliest",
			          __func__, a, E.conf.conn_rate_per_addr,
			          E.conf.conn_burst_per_addr);
		}
		addr_refuse(fd, "connecting too often from this address");
		return (-1);
	}
}

/*
 * Accept like h2o_evloop_socket_accept() (accept4, TCP_NODELAY, the
 * socket flagged as accepted) but with the peer's address, so that the
 * per-address limits can refuse a connection before h2o sees it.
 */
static void
on_accept(h2o_socket_t *listener, const char *err)
{
	struct sockaddr_storage ss;
	struct edge_addr_ent *ae;
	struct edge_conn *ec;
	h2o_socket_t *sock;
	socklen_t sl;
	int i, fd, one = 1;

	if (err != NULL)
		return;
	for (i = 0; i < EDGE_ACCEPT_BATCH; i++) {
		sl = sizeof(ss);
		if ((fd = accept4(h2o_socket_get_fd(listener),
		                  (struct sockaddr *)&ss, &sl,
		                  SOCK_NONBLOCK | SOCK_CLOEXEC)) == -1) {
			if (errno == EMFILE || errno == ENFILE ||
			    errno == ENOBUFS || errno == ENOMEM)
				accept_pause(errno);
			break;
		}
		if (addr_check(fd, (struct sockaddr *)&ss, sl, &ae) == -1)
			continue;
		if ((ec = calloc(1, sizeof(*ec))) == NULL) {
			if (ae != NULL)
				edge_addr_release(&E.addrs, ae,
				                  h2o_now(E.loop));
			close(fd);
			accept_pause(ENOMEM);
			break;
		}
		if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)
			(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
			                 sizeof(one));
		sock = h2o_evloop_socket_create(
		        E.loop, fd, H2O_SOCKET_FLAG_IS_ACCEPTED_CONNECTION);
		ec->sock = sock;
		ec->linger_fd = -1;
		ec->addr = ae;
		sock->on_close.cb = conn_on_close;
		sock->on_close.data = ec;
		h2o_linklist_insert(&E.conns, &ec->link);
		E.nconns++;
		h2o_accept(&E.accept_ctx, sock);
		if (E.h2o_read == NULL)
			E.h2o_read = sock->_cb.read;
		conn_wrap(ec);
	}
	gauges();
}

/* Our loop, nested. */

static void
on_loop_readable(h2o_socket_t *sock, const char *err)
{
	(void)sock;
	(void)err;
	if (loop_run_once(E.svc->loop, 0) == -1)
		fatal("%s: epoll_wait", __func__);
}

/* Listening. */

static int
listen_open(const char *addr, char *err, size_t errlen)
{
	struct addrinfo hints, *res = NULL;
	char host[128], *port;
	int fd = -1, one = 1, rv;

	if (strlen(addr) >= sizeof(host))
		goto bad;
	if (addr[0] == '[') {
		strcpy(host, addr + 1);
		if ((port = strchr(host, ']')) == NULL || port[1] != ':')
			goto bad;
		*port = '\0';
		port += 2;
	} else {
		strcpy(host, addr);
		if ((port = strrchr(host, ':')) == NULL)
			goto bad;
		*port++ = '\0';
	}
	if (*port == '\0')
		goto bad;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	if ((rv = getaddrinfo(host[0] ? host : NULL, port, &hints, &res)) !=
	    0) {
		snprintf(err, errlen, "[edge] listen %s: %s", addr,
		         gai_strerror(rv));
		return (-1);
	}
	if ((fd = socket(res->ai_family,
	                 SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) ==
	            -1 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ==
	            -1 ||
	    bind(fd, res->ai_addr, res->ai_addrlen) == -1 ||
	    listen(fd, SOMAXCONN) == -1) {
		snprintf(err, errlen, "[edge] listen %s: %s", addr,
		         strerror(errno));
		if (fd != -1)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	return (fd);
bad:
	snprintf(err, errlen,
	         "[edge] listen %s: want host:port or "
	         "[v6addr]:port",
	         addr);
	return (-1);
}

static void
where_of(int fd, int from_systemd)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[NI_MAXHOST] = "?", port[NI_MAXSERV] = "?";

	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
		(void)getnameinfo((struct sockaddr *)&ss, sl, host,
		                  sizeof(host), port, sizeof(port),
		                  NI_NUMERICHOST | NI_NUMERICSERV);
	snprintf(E.where, sizeof(E.where), "listening on %s%s%s:%s%s",
	         strchr(host, ':') ? "[" : "", host,
	         strchr(host, ':') ? "]" : "", port,
	         from_systemd ? " (socket from systemd)" : "");
}

const char *
edge_http_where(void)
{
	return (E.where);
}

int
edge_http_init(struct svc *svc, const struct edge_conf *c, int listen_fd,
               char *err, size_t errlen)
{
	h2o_hostconf_t *host;
	h2o_pathconf_t *path;
	h2o_handler_t *h;
	h2o_filter_t *f;
	unsigned char seed[48];
	int lfd, from_systemd = listen_fd >= 0;

	memset(&E, 0, sizeof(E));
	E.svc = svc;
	E.conf = *c;
	h2o_linklist_init_anchor(&E.conns);
	h2o_linklist_init_anchor(&E.rewrap);
	if (random_bytes(seed, sizeof(seed)) == -1) {
		snprintf(err, errlen, "getrandom: %s", strerror(errno));
		return (-1);
	}
	edge_ids_init(&E.ids, seed);
	if (edge_pending_init(&E.pending, 1024) == -1 ||
	    edge_addr_init(&E.addrs, seed + 32) == -1) {
		snprintf(err, errlen, "out of memory");
		return (-1);
	}
	edge_addr_limits(&E.addrs, (uint32_t)c->max_conns_per_addr,
	                 (uint32_t)c->conn_rate_per_addr,
	                 (uint32_t)c->conn_burst_per_addr);
	metrics_setup(svc);
	gauges();

	h2o_config_init(&E.gconf);
	E.gconf.server_name = h2o_iovec_init(H2O_STRLIT(""));
	E.gconf.max_request_entity_size = c->max_body;
	E.gconf.http1.req_timeout = c->idle_timeout_ms;
	E.gconf.http1.upgrade_to_http2 = 0;
	host = h2o_config_register_host(
	        &E.gconf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
	path = h2o_config_register_path(host, "/", 0);
	h = h2o_create_handler(path, sizeof(*h));
	h->on_req = on_req;
	f = h2o_create_filter(&host->fallback_path, sizeof(*f));
	f->on_setup_ostream = err_filter;

	E.loop = h2o_evloop_create();
	h2o_context_init(&E.ctx, E.loop, &E.gconf);
	E.accept_ctx.ctx = &E.ctx;
	E.accept_ctx.hosts = E.gconf.hosts;

	h2o_timeout_init(E.loop, &E.pause_to, EDGE_ACCEPT_PAUSE_MS);
	h2o_timeout_init(E.loop, &E.chat_to, c->chat_timeout_ms);
	h2o_timeout_init(E.loop, &E.sweep_to, sweep_every(c->head_timeout_ms));
	h2o_timeout_init(E.loop, &E.linger_to, EDGE_LINGER_MS);
	h2o_timeout_init(E.loop, &E.drain_to, EDGE_DRAIN_CHECK_MS);
	h2o_timeout_init(E.loop, &E.resend_fast, EDGE_RESEND_FAST_MS);
	h2o_timeout_init(E.loop, &E.resend_slow, EDGE_RESEND_SLOW_MS);
	E.pause_ent.cb = accept_resume;
	E.sweep_ent.cb = sweep;
	E.drain_ent.cb = drain_check;
	h2o_timeout_link(E.loop, &E.sweep_to, &E.sweep_ent);

	/* Our loop inside h2o's: a dup, since h2o closes what it owns. */
	if ((lfd = fcntl(loop_fd(svc->loop), F_DUPFD_CLOEXEC, 0)) == -1) {
		snprintf(err, errlen, "dup: %s", strerror(errno));
		return (-1);
	}
	E.loopsock = h2o_evloop_socket_create(E.loop, lfd,
	                                      H2O_SOCKET_FLAG_DONT_READ);
	h2o_socket_read_start(E.loopsock, on_loop_readable);

	if (listen_fd < 0 &&
	    (listen_fd = listen_open(c->listen, err, errlen)) == -1)
		return (-1);
	where_of(listen_fd, from_systemd);
	E.listener = h2o_evloop_socket_create(E.loop, listen_fd,
	                                      H2O_SOCKET_FLAG_DONT_READ);
	h2o_socket_read_start(E.listener, on_accept);
	return (0);
}

void
edge_http_reconf(const struct edge_conf *c)
{
	if (strcmp(c->listen, E.conf.listen) != 0)
		log_warnx("%s: [edge] listen changes only on restart",
		          __func__);
	E.conf.max_body = c->max_body;
	E.conf.max_head = c->max_head;
	E.conf.idle_timeout_ms = c->idle_timeout_ms;
	E.conf.head_timeout_ms = c->head_timeout_ms;
	E.conf.chat_timeout_ms = c->chat_timeout_ms;
	E.conf.drain_ms = c->drain_ms;
	E.conf.max_conns_per_addr = c->max_conns_per_addr;
	E.conf.conn_rate_per_addr = c->conn_rate_per_addr;
	E.conf.conn_burst_per_addr = c->conn_burst_per_addr;
	edge_addr_limits(&E.addrs, (uint32_t)c->max_conns_per_addr,
	                 (uint32_t)c->conn_rate_per_addr,
	                 (uint32_t)c->conn_burst_per_addr);
	memcpy(E.conf.verify_token, c->verify_token,
	       sizeof(E.conf.verify_token));
	E.gconf.max_request_entity_size = c->max_body;
	/* Every entry of an h2o timeout list has the same duration, so the
	 * list stays in order when the duration changes. */
	E.ctx.http1.req_timeout.timeout = c->idle_timeout_ms;
	E.chat_to.timeout = c->chat_timeout_ms;
	E.sweep_to.timeout = sweep_every(c->head_timeout_ms);
}

int
edge_http_run(struct svc *svc)
{
	while (!svc->stopped) {
		if (h2o_evloop_run(E.loop, INT32_MAX) != 0 && errno != EINTR)
			fatal("%s: h2o_evloop_run", __func__);
		/* Everything this turn queued for a peer leaves together. */
		ipc_flush(E.svc->ipc);
		if (!h2o_linklist_is_empty(&E.rewrap))
			rewrap_run();
	}
	return (svc_exit(svc));
}

/* Waiting for a request, with nothing of one received (not even in the
 * kernel's buffer: that one is answered, then closed). */
static int
conn_idle(const struct edge_conn *ec)
{
	h2o_socket_t *s = ec->sock;
	char c;

	return (h2o_socket_is_reading(s) && !h2o_socket_is_writing(s) &&
	        s->input->size == 0 &&
	        recv(h2o_socket_get_fd(s), &c, 1, MSG_PEEK | MSG_DONTWAIT) ==
	                -1 &&
	        errno == EAGAIN);
}

/* Stopping: done when no chat waits and no connection is busy. */
static void
drain_check(h2o_timeout_entry_t *to)
{
	h2o_linklist_t *node, *next;
	int busy = 0;

	(void)to;
	if (E.svc->stopped)
		return;
	for (node = E.conns.next; node != &E.conns; node = next) {
		struct edge_conn *ec =
		        H2O_STRUCT_FROM_MEMBER(struct edge_conn, link, node);

		next = node->next;
		if (!h2o_socket_is_reading(ec->sock) ||
		    h2o_socket_is_writing(ec->sock))
			busy++;
	}
	if ((busy > 0 || edge_pending_count(&E.pending) > 0) &&
	    h2o_now(E.loop) < E.stop_at) {
		if (!h2o_timeout_is_linked(&E.drain_ent))
			h2o_timeout_link(E.loop, &E.drain_to, &E.drain_ent);
		return;
	}
	if (busy > 0 || edge_pending_count(&E.pending) > 0)
		log_warnx("%s: gave up after %llu ms: %zu chats pending, %d "
		          "connections busy",
		          __func__, (unsigned long long)E.conf.drain_ms,
		          edge_pending_count(&E.pending), busy);
	if (h2o_timeout_is_linked(&E.drain_ent))
		h2o_timeout_unlink(&E.drain_ent);
	svc_stop_done(E.svc);
}

void
edge_http_stop(struct svc *svc)
{
	h2o_linklist_t *node, *next;

	(void)svc;
	E.stopping = 1;
	E.stop_at = h2o_now(E.loop) + E.conf.drain_ms;
	E.ctx.shutdown_requested = 1; /* answers say Connection: close */
	h2o_socket_read_stop(E.listener);
	if (h2o_timeout_is_linked(&E.pause_ent))
		h2o_timeout_unlink(&E.pause_ent);
	/* Idle keep-alive connections go now; busy ones after their
	 * answer (h2o closes them: shutdown_requested). */
	for (node = E.conns.next; node != &E.conns; node = next) {
		struct edge_conn *ec =
		        H2O_STRUCT_FROM_MEMBER(struct edge_conn, link, node);

		next = node->next;
		if (conn_idle(ec))
			E.h2o_read(ec->sock, h2o_socket_error_closed);
	}
	drain_check(NULL);
}
