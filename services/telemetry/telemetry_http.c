/* SPDX-License-Identifier: ISC */
/*
 * telemetry_http: GET /metrics on libh2o-evloop 2.2.5.
 *
 * h2o's evloop is the outer loop; ours (svc->loop: the mailbox, timers,
 * signals) is watched through a dup() of its fd, and one turn of it runs
 * whenever that fd is readable.  One thread.  A page is built whole for
 * each scrape (telemetry_page) and sent in one piece with its length;
 * scrapes are rare (every 15 s or so per Prometheus) and a page is a few
 * hundred KiB at most.
 *
 * Routes: GET|HEAD /metrics (the page), /heatmap (a self-contained HTML
 * page, heatmap.html embedded at build time), /api/heatmap (the list of
 * services) and /api/heatmap?service=NAME&since=UNIX_S (their per-second
 * histograms as JSON, telemetry_heat.c), / (a line pointing there); other
 * paths 404, other methods 405, a bad query 400.
 *
 * PITFALLS.md (h2o): upgrade_to_http2 is off; SIGPIPE is ignored (svc);
 * bodies are capped at 16 KiB (we take none); EMFILE pauses accepting for
 * 100 ms; foreign fds are dup()ed before h2o owns them.
 *
 * DIAGNOSTICS: setup failures return -1 with a reason (telemetry.c makes
 * them fatal); accept pauses are logged at most every 10 s; nothing is
 * logged per request.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <h2o.h>

#include "svc.h"
#include "telemetry.h"

#define THTTP_ACCEPT_PAUSE_MS 100
#define THTTP_ACCEPT_BATCH 16

struct telemetry_http {
	struct telemetry *t;
	h2o_globalconf_t gconf;
	h2o_context_t ctx;
	h2o_accept_ctx_t accept_ctx;
	h2o_evloop_t *loop;
	h2o_socket_t *listener, *loopsock;
	h2o_timeout_t pause_to;
	h2o_timeout_entry_t pause_ent;
	uint64_t last_pause_log;
	uint64_t *c_pauses;
	char where[128];
};

struct thandler {
	h2o_handler_t super;
	struct telemetry_http *h;
};

static uint64_t sink;

static void http_count(struct telemetry *, int);

/* heatmap.html, from the generated telemetry_heatmap_html.c. */
extern const unsigned char telemetry_heatmap_html[];
extern const size_t telemetry_heatmap_html_len;

static void
send_body(h2o_req_t *req, int status, const char *reason, const char *type,
          const void *body, size_t len)
{
	req->res.status = status;
	req->res.reason = reason;
	req->res.content_length = len;
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               NULL, type, strlen(type));
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL,
	               NULL, H2O_STRLIT("no-store"));
	/* h2o_send_inline copies the body into the request's pool. */
	h2o_send_inline(req, len ? body : "", len);
}

static int
hexval(int c)
{
	if (c >= '0' && c <= '9')
		return (c - '0');
	if (c >= 'a' && c <= 'f')
		return (c - 'a' + 10);
	if (c >= 'A' && c <= 'F')
		return (c - 'A' + 10);
	return (-1);
}

/* The value of key in query q (len bytes), percent-decoded into out;
 * 1 found, 0 absent, -1 malformed or too long. */
static int
query_get(const char *q, size_t len, const char *key, char *out, size_t outlen)
{
	size_t klen = strlen(key), i = 0, n;

	while (i < len) {
		size_t end = i;

		while (end < len && q[end] != '&')
			end++;
		if (end - i > klen && memcmp(q + i, key, klen) == 0 &&
		    q[i + klen] == '=') {
			for (i += klen + 1, n = 0; i < end; i++) {
				int c = (unsigned char)q[i], hi, lo;

				if (c == '%') {
					if (i + 2 >= end ||
					    (hi = hexval(q[i + 1])) == -1 ||
					    (lo = hexval(q[i + 2])) == -1)
						return (-1);
					c = hi * 16 + lo;
					i += 2;
				} else if (c == '+')
					c = ' ';
				if (n + 1 >= outlen)
					return (-1);
				out[n++] = (char)c;
			}
			out[n] = '\0';
			return (1);
		}
		i = end + 1;
	}
	return (0);
}

/* GET /api/heatmap[?service=NAME[&since=UNIX_S]]. */
static void
on_api_heatmap(struct telemetry *t, h2o_req_t *req)
{
	static const char json[] = "application/json";
	const char *q = "";
	char svc[TELEMETRY_NAME_MAX + 2], since_s[32], *end;
	struct buf b = {0};
	long long since = 0;
	size_t qlen = 0;
	int has, id, rc;

	if (req->query_at != SIZE_MAX) {
		q = req->path.base + req->query_at + 1;
		qlen = req->path.len - req->query_at - 1;
	}
	if ((has = query_get(q, qlen, "service", svc, sizeof(svc))) == -1 ||
	    (rc = query_get(q, qlen, "since", since_s, sizeof(since_s))) ==
	            -1) {
		http_count(t, 400);
		send_body(req, 400, "Bad Request", json,
		          H2O_STRLIT("{\"error\":\"bad query\"}"));
		return;
	}
	if (rc == 1) {
		errno = 0;
		since = strtoll(since_s, &end, 10);
		if (errno != 0 || end == since_s || *end != '\0' ||
		    since < 0) {
			http_count(t, 400);
			send_body(req, 400, "Bad Request", json,
			          H2O_STRLIT("{\"error\":\"bad since\"}"));
			return;
		}
	}
	if (has == 1) {
		if ((id = heat_find(&t->heat, svc, strlen(svc))) == -1) {
			http_count(t, 404);
			send_body(
			        req, 404, "Not Found", json,
			        H2O_STRLIT("{\"error\":\"unknown service\"}"));
			return;
		}
		rc = heat_json_service(&t->heat, id, (int64_t)since, &b);
	} else
		rc = heat_json_list(&t->heat, t->ebpf != NULL, t->ebpf_reason,
		                    &b);
	if (rc == -1 || buf_adds(&b, "\n") == -1) {
		buf_free(&b);
		http_count(t, 500);
		h2o_send_error_500(req, "Internal Server Error",
		                   "out of memory\n", 0);
		return;
	}
	http_count(t, 200);
	send_body(req, 200, "OK", json, b.b, b.len);
	buf_free(&b);
}

static void
http_count(struct telemetry *t, int status)
{
	int i = status == 200 ? 0 : status == 404 ? 1 : status == 405 ? 2 : 3;

	++*t->http_requests[i];
}

static int
on_req(h2o_handler_t *self, h2o_req_t *req)
{
	struct telemetry *t = ((struct thandler *)self)->h->t;
	h2o_iovec_t p = req->path_normalized;
	struct buf b = {0};
	int metrics, heatmap, api;

	metrics = h2o_memis(p.base, p.len, H2O_STRLIT("/metrics"));
	heatmap = h2o_memis(p.base, p.len, H2O_STRLIT("/heatmap"));
	api = h2o_memis(p.base, p.len, H2O_STRLIT("/api/heatmap"));
	if (!metrics && !heatmap && !api &&
	    !h2o_memis(p.base, p.len, H2O_STRLIT("/"))) {
		http_count(t, 404);
		h2o_send_error_404(req, "Not Found",
		                   "not found: the pages are /metrics, "
		                   "/heatmap and /api/heatmap\n",
		                   0);
		return (0);
	}
	if (!h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")) &&
	    !h2o_memis(req->method.base, req->method.len,
	               H2O_STRLIT("HEAD"))) {
		http_count(t, 405);
		h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_ALLOW,
		               NULL, H2O_STRLIT("GET, HEAD"));
		h2o_send_error_405(req, "Method Not Allowed",
		                   "method not allowed\n",
		                   H2O_SEND_ERROR_KEEP_HEADERS);
		return (0);
	}
	if (heatmap) {
		http_count(t, 200);
		send_body(req, 200, "OK", "text/html; charset=utf-8",
		          telemetry_heatmap_html, telemetry_heatmap_html_len);
		return (0);
	}
	if (api) {
		on_api_heatmap(t, req);
		return (0);
	}
	if (!metrics) {
		static const char idx[] = "troupe-telemetry: GET /metrics, "
		                          "/heatmap, /api/heatmap\n";

		http_count(t, 200);
		req->res.status = 200;
		req->res.reason = "OK";
		req->res.content_length = sizeof(idx) - 1;
		h2o_add_header(&req->pool, &req->res.headers,
		               H2O_TOKEN_CONTENT_TYPE, NULL,
		               H2O_STRLIT("text/plain; charset=utf-8"));
		h2o_send_inline(req, idx, sizeof(idx) - 1);
		return (0);
	}
	if (telemetry_page(t, &b) == -1) {
		buf_free(&b);
		http_count(t, 500);
		h2o_send_error_500(req, "Internal Server Error",
		                   "out of memory\n", 0);
		return (0);
	}
	http_count(t, 200);
	req->res.status = 200;
	req->res.reason = "OK";
	req->res.content_length = b.len;
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE,
	               NULL,
	               H2O_STRLIT("text/plain; version=0.0.4; charset=utf-8"));
	h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL,
	               NULL, H2O_STRLIT("no-store"));
	/* h2o_send_inline copies the body into the request's pool. */
	h2o_send_inline(req, b.b != NULL ? b.b : "", b.len);
	buf_free(&b);
	return (0);
}

static void on_accept(h2o_socket_t *, const char *);

static void
accept_resume(h2o_timeout_entry_t *ent)
{
	struct telemetry_http *h =
	        (struct telemetry_http *)((char *)ent -
	                                  offsetof(struct telemetry_http,
	                                           pause_ent));

	if (!h->t->svc->stopping)
		h2o_socket_read_start(h->listener, on_accept);
}

static void
accept_pause(struct telemetry_http *h, int err)
{
	uint64_t now = h2o_now(h->loop);

	++*h->c_pauses;
	if (now - h->last_pause_log >= 10000) {
		h->last_pause_log = now;
		log_warnx("%s: accept: %s; pausing %d ms", __func__,
		          strerror(err), THTTP_ACCEPT_PAUSE_MS);
	}
	h2o_socket_read_stop(h->listener);
	if (!h2o_timeout_is_linked(&h->pause_ent))
		h2o_timeout_link(h->loop, &h->pause_to, &h->pause_ent);
}

static void
on_accept(h2o_socket_t *listener, const char *err)
{
	struct telemetry_http *h = listener->data;
	h2o_socket_t *sock;
	int i;

	if (err != NULL)
		return;
	for (i = 0; i < THTTP_ACCEPT_BATCH; i++) {
		if ((sock = h2o_evloop_socket_accept(listener)) == NULL) {
			if (errno == EMFILE || errno == ENFILE ||
			    errno == ENOBUFS || errno == ENOMEM)
				accept_pause(h, errno);
			return;
		}
		h2o_accept(&h->accept_ctx, sock);
	}
}

static void
on_loop_readable(h2o_socket_t *sock, const char *err)
{
	struct telemetry_http *h = sock->data;

	(void)err;
	if (loop_run_once(h->t->svc->loop, 0) == -1)
		fatal("%s: epoll_wait", __func__);
}

/* host:port or [v6]:port, numeric, bound and listening; -1 and err. */
static int
listen_open(struct telemetry_http *h, const char *addr, char *err,
            size_t errlen)
{
	struct addrinfo hints, *res = NULL;
	char host[128], *port;
	int fd = -1, one = 1, rv;

	if (strlen(addr) >= sizeof(host)) {
		snprintf(err, errlen, "[telemetry] listen: too long");
		return (-1);
	}
	strcpy(host, addr);
	if ((port = strrchr(host, ':')) == NULL || port == host ||
	    port[1] == '\0') {
		snprintf(err, errlen,
		         "[telemetry] listen: want host:port, got \"%s\"",
		         addr);
		return (-1);
	}
	*port++ = '\0';
	if (host[0] == '[') {
		size_t n = strlen(host);

		if (n < 3 || host[n - 1] != ']') {
			snprintf(err, errlen,
			         "[telemetry] listen: bad address \"%s\"",
			         addr);
			return (-1);
		}
		host[n - 1] = '\0';
		memmove(host, host + 1, n - 1);
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
	if ((rv = getaddrinfo(host, port, &hints, &res)) != 0) {
		snprintf(err, errlen, "[telemetry] listen \"%s\": %s", addr,
		         gai_strerror(rv));
		return (-1);
	}
	if ((fd = socket(res->ai_family,
	                 SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) ==
	            -1 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ==
	            -1 ||
	    bind(fd, res->ai_addr, res->ai_addrlen) == -1 ||
	    listen(fd, 128) == -1) {
		snprintf(err, errlen, "listen on %s: %s", addr,
		         strerror(errno));
		if (fd != -1)
			close(fd);
		freeaddrinfo(res);
		return (-1);
	}
	freeaddrinfo(res);
	snprintf(h->where, sizeof(h->where), "%s", addr);
	return (fd);
}

int
telemetry_http_init(struct telemetry *t, const char *addr, char *err,
                    size_t errlen)
{
	struct telemetry_http *h;
	h2o_hostconf_t *host;
	h2o_pathconf_t *path;
	struct thandler *th;
	char lb[96];
	int lfd, fd;

	if ((h = calloc(1, sizeof(*h))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return (-1);
	}
	h->t = t;
	t->http = h;
	snprintf(lb, sizeof(lb), "service=\"%s\"", t->svc->name);
	h->c_pauses = metrics_counter(t->svc->metrics,
	                              "troupe_telemetry_accept_pauses_total",
	                              "Times accepting paused for lack of "
	                              "file descriptors or memory",
	                              lb);
	if (h->c_pauses == NULL)
		h->c_pauses = &sink;

	h2o_config_init(&h->gconf);
	h->gconf.server_name = h2o_iovec_init(H2O_STRLIT(""));
	h->gconf.max_request_entity_size = 16 << 10;
	h->gconf.http1.upgrade_to_http2 = 0;
	host = h2o_config_register_host(
	        &h->gconf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
	path = h2o_config_register_path(host, "/", 0);
	th = (struct thandler *)h2o_create_handler(path, sizeof(*th));
	th->super.on_req = on_req;
	th->h = h;

	h->loop = h2o_evloop_create();
	h2o_context_init(&h->ctx, h->loop, &h->gconf);
	h->accept_ctx.ctx = &h->ctx;
	h->accept_ctx.hosts = h->gconf.hosts;
	h2o_timeout_init(h->loop, &h->pause_to, THTTP_ACCEPT_PAUSE_MS);
	h->pause_ent.cb = accept_resume;

	/* Our loop inside h2o's: a dup, since h2o closes what it owns. */
	if ((lfd = fcntl(loop_fd(t->svc->loop), F_DUPFD_CLOEXEC, 0)) == -1) {
		snprintf(err, errlen, "dup: %s", strerror(errno));
		return (-1);
	}
	h->loopsock = h2o_evloop_socket_create(h->loop, lfd,
	                                       H2O_SOCKET_FLAG_DONT_READ);
	h->loopsock->data = h;
	h2o_socket_read_start(h->loopsock, on_loop_readable);

	if ((fd = listen_open(h, addr, err, errlen)) == -1)
		return (-1);
	h->listener = h2o_evloop_socket_create(h->loop, fd,
	                                       H2O_SOCKET_FLAG_DONT_READ);
	h->listener->data = h;
	h2o_socket_read_start(h->listener, on_accept);
	return (0);
}

const char *
telemetry_http_where(const struct telemetry *t)
{
	return (t->http != NULL ? t->http->where : "");
}

void
telemetry_http_run(struct telemetry *t)
{
	struct telemetry_http *h = t->http;

	while (!t->svc->stopped)
		if (h2o_evloop_run(h->loop, INT32_MAX) != 0 && errno != EINTR)
			fatal("%s: h2o_evloop_run", __func__);
}

void
telemetry_http_stop(struct telemetry *t)
{
	struct telemetry_http *h = t->http;

	if (h == NULL || h->listener == NULL)
		return;
	if (h2o_timeout_is_linked(&h->pause_ent))
		h2o_timeout_unlink(&h->pause_ent);
	h2o_socket_read_stop(h->listener);
	/*
	 * XXX nothing else is torn down: h2o 2.2.5 asserts when a context
	 * is disposed while a connection (an idle keep-alive scraper) is
	 * still on its timeout lists, and the process exits right after.
	 * t->http keeps it all reachable, so LeakSanitizer stays quiet.
	 */
}
