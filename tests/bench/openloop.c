/* SPDX-License-Identifier: ISC */
/*
 * troupe-openloop: an open-loop HTTP/1.1 load generator that reports
 * latency without coordinated omission.
 *
 * Requests are scheduled at a fixed rate (request k at start + k / rate)
 * whatever the server does, spread over N keep-alive connections: a due
 * request goes to an idle connection, else it is pipelined behind the
 * least busy one (up to --pipeline), else it waits in a backlog.  Every
 * latency is measured from the request's *scheduled* send time, so a stall
 * of the server shows up in the percentiles instead of silently slowing the
 * client (what wrk, hey -q and h2load do).  Answers must be framed by
 * Content-Length (what troupe-edge and nginx send).
 *
 * Run by tests/bench/bench.py (./troupe bench); not installed.  It only
 * ever connects to the address it is given (the bench gives 127.0.0.1).
 * One thread, epoll.
 *
 * Output: human lines, then one line
 *   RESULT rate=R achieved=A sent=S ok=O errors=E timeouts=T backlog_max=B
 *          p50_ms=.. p90_ms=.. p99_ms=.. p999_ms=.. max_ms=..
 * DIAGNOSTICS: bad options exit 2; failing to connect at all exits 1.
 */
#include <sys/epoll.h>
#include <sys/socket.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define OL_MAX_CONNS 4096
#define OL_MAX_HEADERS 32
#define OL_RBUF (256 * 1024)

struct ol_conn {
	int fd;
	int connected;
	int want_out; /* EPOLLOUT is armed */
	unsigned gen; /* bumped by every reconnection */
	char *wbuf;   /* requests not yet written */
	size_t wlen, wcap, woff;
	char *rbuf; /* bytes read, not yet parsed */
	size_t rlen;
	uint64_t *sched; /* FIFO of scheduled times (ns) in flight */
	int *measured;   /* per in-flight: counts in the results */
	size_t qhead, qlen, qcap;
};

struct ol_opts {
	const char *host;
	int port;
	const char *method;
	const char *path;
	const char *headers[OL_MAX_HEADERS];
	int nheaders;
	const char *body;
	int vary;        /* "{n}" in the body becomes seq % vary */
	double rate;     /* requests per second */
	double duration; /* measured seconds */
	double warmup;   /* unmeasured seconds first */
	int conns;
	int pipeline;   /* max requests in flight per connection */
	int timeout_ms; /* per request, from its scheduled time */
};

static struct ol_opts o = {
        .host = "127.0.0.1",
        .port = 8080,
        .method = "GET",
        .path = "/",
        .vary = 0,
        .rate = 1000,
        .duration = 10,
        .warmup = 1,
        .conns = 64,
        .pipeline = 16,
        .timeout_ms = 5000,
};

static struct ol_conn *conns;
static int epfd;
static struct sockaddr_in sa;

/* Results. */
static uint64_t *lat; /* measured latencies, ns */
static size_t nlat, caplat;
static uint64_t n_sent, n_ok, n_err, n_timeout, n_connfail, backlog_max;
static uint64_t status_count[6]; /* by first digit */

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *
xrealloc(void *p, size_t n)
{
	void *q;

	if ((q = realloc(p, n)) == NULL) {
		fprintf(stderr, "troupe-openloop: out of memory\n");
		exit(1);
	}
	return q;
}

static void
record(uint64_t ns)
{
	if (nlat == caplat) {
		caplat = caplat ? caplat * 2 : 65536;
		lat = xrealloc(lat, caplat * sizeof(*lat));
	}
	lat[nlat++] = ns;
}

static void
q_push(struct ol_conn *c, uint64_t sched, int measured)
{
	size_t i;

	if (c->qlen == c->qcap) {
		size_t ncap = c->qcap ? c->qcap * 2 : 16;
		uint64_t *s = xrealloc(NULL, ncap * sizeof(*s));
		int *m = xrealloc(NULL, ncap * sizeof(*m));

		for (i = 0; i < c->qlen; i++) {
			s[i] = c->sched[(c->qhead + i) % c->qcap];
			m[i] = c->measured[(c->qhead + i) % c->qcap];
		}
		free(c->sched);
		free(c->measured);
		c->sched = s;
		c->measured = m;
		c->qcap = ncap;
		c->qhead = 0;
	}
	i = (c->qhead + c->qlen) % c->qcap;
	c->sched[i] = sched;
	c->measured[i] = measured;
	c->qlen++;
}

static void
q_pop(struct ol_conn *c, uint64_t *sched, int *measured)
{
	*sched = c->sched[c->qhead];
	*measured = c->measured[c->qhead];
	c->qhead = (c->qhead + 1) % c->qcap;
	c->qlen--;
}

static void
conn_open(struct ol_conn *c)
{
	struct epoll_event ev;
	int one = 1;

	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd == -1) {
		perror("troupe-openloop: socket");
		exit(1);
	}
	(void)setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) == -1 &&
	    errno != EINPROGRESS) {
		n_connfail++;
	}
	c->connected = 0;
	c->want_out = 1;
	c->gen++;
	c->rlen = 0;
	c->wlen = c->woff = 0;
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
	ev.data.ptr = c;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) == -1) {
		perror("troupe-openloop: epoll_ctl");
		exit(1);
	}
}

/* The connection broke: what it had in flight failed. */
static void
conn_fail(struct ol_conn *c)
{
	uint64_t s;
	int m;

	while (c->qlen > 0) {
		q_pop(c, &s, &m);
		if (m)
			n_err++;
	}
	(void)epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	n_connfail++;
	conn_open(c);
}

static void
conn_want_write(struct ol_conn *c, int on)
{
	struct epoll_event ev;

	if (c->want_out == on)
		return;
	c->want_out = on;
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0);
	ev.data.ptr = c;
	(void)epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void
conn_flush(struct ol_conn *c)
{
	unsigned gen = c->gen;
	ssize_t n;

	while (c->woff < c->wlen) {
		n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff,
		         MSG_NOSIGNAL);
		if (n == -1) {
			if (errno == EAGAIN || errno == EINTR)
				break;
			conn_fail(c);
			return;
		}
		c->woff += (size_t)n;
	}
	if (gen != c->gen)
		return;
	if (c->woff == c->wlen)
		c->woff = c->wlen = 0;
	conn_want_write(c, c->wlen > 0 || !c->connected);
}

static char *req_prefix, *req_body;
static size_t req_prefix_len;

static void
conn_add_request(struct ol_conn *c, uint64_t seq)
{
	char body[65536], num[32];
	const char *b = req_body ? req_body : "";
	size_t blen = strlen(b), need;
	const char *at;
	int n;

	if (req_body && o.vary > 0 && (at = strstr(b, "{n}")) != NULL) {
		n = snprintf(num, sizeof(num), "%" PRIu64,
		             seq % (uint64_t)o.vary);
		if ((size_t)(at - b) + (size_t)n + strlen(at + 3) <
		    sizeof(body)) {
			memcpy(body, b, (size_t)(at - b));
			memcpy(body + (at - b), num, (size_t)n);
			strcpy(body + (at - b) + n, at + 3);
			b = body;
			blen = strlen(body);
		}
	}
	need = req_prefix_len + 64 + blen;
	if (c->wlen + need > c->wcap) {
		c->wcap = (c->wlen + need) * 2;
		c->wbuf = xrealloc(c->wbuf, c->wcap);
	}
	memcpy(c->wbuf + c->wlen, req_prefix, req_prefix_len);
	c->wlen += req_prefix_len;
	n = snprintf(c->wbuf + c->wlen, 64, "Content-Length: %zu\r\n\r\n",
	             blen);
	c->wlen += (size_t)n;
	memcpy(c->wbuf + c->wlen, b, blen);
	c->wlen += blen;
}

/* Parse complete responses off c->rbuf. */
static void
conn_parse(struct ol_conn *c, uint64_t now)
{
	size_t off = 0;

	for (;;) {
		char *p = c->rbuf + off, *end, *cl;
		size_t avail = c->rlen - off, head, clen = 0;
		int status;
		uint64_t s;
		int m;

		end = memmem(p, avail, "\r\n\r\n", 4);
		if (end == NULL)
			break;
		head = (size_t)(end - p) + 4;
		if (avail < 12 || strncmp(p, "HTTP/1.", 7) != 0) {
			conn_fail(c);
			return;
		}
		status = atoi(p + 9);
		*end = '\0';
		cl = strcasestr(p, "\r\ncontent-length:");
		*end = '\r';
		if (cl == NULL || cl > end) {
			fprintf(stderr, "troupe-openloop: response without "
			                "Content-Length\n");
			conn_fail(c);
			return;
		}
		clen = strtoul(cl + 17, NULL, 10);
		if (avail < head + clen)
			break;
		off += head + clen;
		if (c->qlen == 0) {
			conn_fail(c);
			return;
		}
		q_pop(c, &s, &m);
		if (m) {
			if (status >= 100 && status < 600)
				status_count[status / 100]++;
			if (status >= 200 && status < 300) {
				n_ok++;
				record(now - s);
			} else
				n_err++;
		}
	}
	if (off > 0) {
		memmove(c->rbuf, c->rbuf + off, c->rlen - off);
		c->rlen -= off;
	}
}

static void
conn_read(struct ol_conn *c)
{
	unsigned gen = c->gen;
	ssize_t n;

	for (;;) {
		if (c->rlen == OL_RBUF) {
			conn_fail(c);
			return;
		}
		n = recv(c->fd, c->rbuf + c->rlen, OL_RBUF - c->rlen, 0);
		if (n == 0) {
			conn_fail(c);
			return;
		}
		if (n == -1) {
			if (errno == EAGAIN || errno == EINTR)
				break;
			conn_fail(c);
			return;
		}
		c->rlen += (size_t)n;
		conn_parse(c, now_ns());
		if (c->gen != gen)
			return;
	}
}

/* Fail requests whose scheduled time is older than the timeout by
 * reconnecting their connection (HTTP/1.1 cannot skip an answer). */
static void
check_timeouts(uint64_t now)
{
	uint64_t lim = (uint64_t)o.timeout_ms * 1000000u;
	int i;

	for (i = 0; i < o.conns; i++) {
		struct ol_conn *c = &conns[i];

		if (c->qlen > 0 && now - c->sched[c->qhead] > lim) {
			uint64_t before = n_err;

			conn_fail(c);
			n_timeout += n_err - before;
		}
	}
}

static struct ol_conn *
pick_conn(void)
{
	static int rr;
	struct ol_conn *best = NULL;
	int i, k;

	for (k = 0; k < o.conns; k++) {
		i = (rr + k) % o.conns;
		if (!conns[i].connected)
			continue;
		if (conns[i].qlen == 0) {
			rr = i + 1;
			return &conns[i];
		}
		if ((int)conns[i].qlen < o.pipeline &&
		    (best == NULL || conns[i].qlen < best->qlen))
			best = &conns[i];
	}
	return best;
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static double
pct(double p)
{
	size_t i;

	if (nlat == 0)
		return 0;
	i = (size_t)(p / 100.0 * (double)nlat);
	if (i >= nlat)
		i = nlat - 1;
	return (double)lat[i] / 1e6;
}

static void
usage(FILE *f)
{
	fprintf(f,
	        "usage: troupe-openloop [options]\n"
	        "  --host ADDR         (127.0.0.1)     --port N (8080)\n"
	        "  --method M (GET)    --path P (/)    --header 'K: V' "
	        "(repeat)\n"
	        "  --body TEXT         ('{n}' becomes seq %% --vary)\n"
	        "  --vary N            --rate R (req/s, 1000)\n"
	        "  --duration S (10)   --warmup S (1)  --connections N (64)\n"
	        "  --pipeline N (16)   --timeout-ms N (5000)\n");
}

int
main(int argc, char **argv)
{
	static const struct option lo[] = {
	        {"host", required_argument, NULL, 'H'},
	        {"port", required_argument, NULL, 'p'},
	        {"method", required_argument, NULL, 'm'},
	        {"path", required_argument, NULL, 'P'},
	        {"header", required_argument, NULL, 'h'},
	        {"body", required_argument, NULL, 'b'},
	        {"vary", required_argument, NULL, 'v'},
	        {"rate", required_argument, NULL, 'r'},
	        {"duration", required_argument, NULL, 'd'},
	        {"warmup", required_argument, NULL, 'w'},
	        {"connections", required_argument, NULL, 'c'},
	        {"pipeline", required_argument, NULL, 'l'},
	        {"timeout-ms", required_argument, NULL, 't'},
	        {"help", no_argument, NULL, '?'},
	        {NULL, 0, NULL, 0},
	};
	struct epoll_event evs[256];
	uint64_t start, t_measure, t_end, now, seq = 0, period_ns;
	uint64_t backlog = 0, first_measured = 0;
	size_t plen;
	int ch, i, n;

	while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (ch) {
		case 'H':
			o.host = optarg;
			break;
		case 'p':
			o.port = atoi(optarg);
			break;
		case 'm':
			o.method = optarg;
			break;
		case 'P':
			o.path = optarg;
			break;
		case 'h':
			if (o.nheaders == OL_MAX_HEADERS) {
				fprintf(stderr, "too many headers\n");
				return 2;
			}
			o.headers[o.nheaders++] = optarg;
			break;
		case 'b':
			o.body = optarg;
			break;
		case 'v':
			o.vary = atoi(optarg);
			break;
		case 'r':
			o.rate = atof(optarg);
			break;
		case 'd':
			o.duration = atof(optarg);
			break;
		case 'w':
			o.warmup = atof(optarg);
			break;
		case 'c':
			o.conns = atoi(optarg);
			break;
		case 'l':
			o.pipeline = atoi(optarg);
			break;
		case 't':
			o.timeout_ms = atoi(optarg);
			break;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc || o.rate <= 0 || o.duration <= 0 || o.warmup < 0 ||
	    o.conns < 1 || o.conns > OL_MAX_CONNS || o.pipeline < 1 ||
	    o.port < 1 || o.port > 65535 || o.timeout_ms < 1) {
		usage(stderr);
		return 2;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)o.port);
	if (inet_pton(AF_INET, o.host, &sa.sin_addr) != 1) {
		fprintf(stderr, "troupe-openloop: bad --host %s\n", o.host);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);

	/* The constant part of every request. */
	plen = strlen(o.method) + strlen(o.path) + 64;
	for (i = 0; i < o.nheaders; i++)
		plen += strlen(o.headers[i]) + 2;
	req_prefix = xrealloc(NULL, plen);
	n = snprintf(req_prefix, plen, "%s %s HTTP/1.1\r\nHost: %s\r\n",
	             o.method, o.path, o.host);
	req_prefix_len = (size_t)n;
	for (i = 0; i < o.nheaders; i++) {
		n = snprintf(req_prefix + req_prefix_len,
		             plen - req_prefix_len, "%s\r\n", o.headers[i]);
		req_prefix_len += (size_t)n;
	}
	req_body = o.body ? strdup(o.body) : NULL;

	if ((epfd = epoll_create1(EPOLL_CLOEXEC)) == -1) {
		perror("troupe-openloop: epoll_create1");
		return 1;
	}
	conns = calloc((size_t)o.conns, sizeof(*conns));
	if (conns == NULL)
		return 1;
	for (i = 0; i < o.conns; i++) {
		conns[i].rbuf = xrealloc(NULL, OL_RBUF);
		conn_open(&conns[i]);
	}

	period_ns = (uint64_t)(1e9 / o.rate);
	if (period_ns == 0)
		period_ns = 1;
	start = now_ns();
	t_measure = start + (uint64_t)(o.warmup * 1e9);
	t_end = t_measure + (uint64_t)(o.duration * 1e9);
	for (;;) {
		uint64_t next;
		struct timespec wait;
		uint64_t wait_ns;

		now = now_ns();
		/* Schedule everything that is due. */
		while (now < t_end || backlog > 0) {
			uint64_t sched;
			struct ol_conn *c;

			if (backlog == 0) {
				sched = start + seq * period_ns;
				if (sched > now || sched >= t_end)
					break;
				seq++;
				backlog++;
			}
			if ((c = pick_conn()) == NULL)
				break;
			/* The oldest waiting request goes first. */
			sched = start + (seq - backlog) * period_ns;
			conn_add_request(c, seq - backlog);
			q_push(c, sched, sched >= t_measure);
			if (sched >= t_measure && first_measured == 0)
				first_measured = seq - backlog;
			backlog--;
			n_sent++;
			conn_flush(c);
		}
		if (backlog > backlog_max)
			backlog_max = backlog;
		if (now >= t_end) {
			size_t busy = 0;

			for (i = 0; i < o.conns; i++)
				busy += conns[i].qlen;
			if (busy == 0 && backlog == 0)
				break;
			if (now > t_end + (uint64_t)o.timeout_ms * 1000000u +
			                  1000000000u)
				break;
		}
		check_timeouts(now);
		next = start + seq * period_ns;
		/* Sleep exactly until the next scheduled send: a millisecond
		 * timeout would round 200 us down to 0 and spin, and the
		 * client would eat the CPU it is measuring. */
		wait_ns = next > now ? next - now : 0;
		if (backlog > 0 || now >= t_end)
			wait_ns = 10000000u;
		wait.tv_sec = (time_t)(wait_ns / 1000000000u);
		wait.tv_nsec = (long)(wait_ns % 1000000000u);
		n = epoll_pwait2(epfd, evs,
		                 (int)(sizeof(evs) / sizeof(evs[0])), &wait,
		                 NULL);
		for (i = 0; i < n; i++) {
			struct ol_conn *c = evs[i].data.ptr;
			unsigned gen = c->gen;

			if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
				if (!c->connected && c->qlen == 0) {
					/* connect failed: retry later */
					(void)epoll_ctl(epfd, EPOLL_CTL_DEL,
					                c->fd, NULL);
					close(c->fd);
					n_connfail++;
					usleep(1000);
					conn_open(c);
					continue;
				}
				conn_fail(c);
				continue;
			}
			if (evs[i].events & EPOLLOUT) {
				c->connected = 1;
				conn_flush(c);
			}
			if (c->gen == gen &&
			    (evs[i].events & (EPOLLIN | EPOLLRDHUP)))
				conn_read(c);
		}
	}
	/* Anything never sent or still in flight (after the timeout)
	 * failed. */
	n_err += backlog;
	n_timeout += backlog;
	for (i = 0; i < o.conns; i++) {
		uint64_t s;
		int m;

		while (conns[i].qlen > 0) {
			q_pop(&conns[i], &s, &m);
			if (m) {
				n_err++;
				n_timeout++;
			}
		}
	}
	qsort(lat, nlat, sizeof(*lat), cmp_u64);
	{
		double secs = o.duration;
		double achieved = (double)(n_ok) / secs;

		printf("target %.0f req/s for %.0f s (+%.0f s warm-up), "
		       "%d connections, pipeline <= %d\n",
		       o.rate, o.duration, o.warmup, o.conns, o.pipeline);
		printf("answered 2xx %" PRIu64 " (%.0f req/s), errors %" PRIu64
		       " (timeouts %" PRIu64 ", 4xx %" PRIu64 ", 5xx %" PRIu64
		       "), reconnects %" PRIu64 ", backlog max %" PRIu64 "\n",
		       n_ok, achieved, n_err, n_timeout, status_count[4],
		       status_count[5], n_connfail, backlog_max);
		printf("latency from scheduled send: p50 %.2f ms, p90 %.2f "
		       "ms, "
		       "p99 %.2f ms, p99.9 %.2f ms, max %.2f ms\n",
		       pct(50), pct(90), pct(99), pct(99.9),
		       nlat ? (double)lat[nlat - 1] / 1e6 : 0.0);
		printf("RESULT rate=%.0f achieved=%.0f sent=%" PRIu64
		       " ok=%" PRIu64 " errors=%" PRIu64 " timeouts=%" PRIu64
		       " backlog_max=%" PRIu64 " p50_ms=%.3f p90_ms=%.3f "
		       "p99_ms=%.3f p999_ms=%.3f max_ms=%.3f\n",
		       o.rate, achieved, n_sent, n_ok, n_err, n_timeout,
		       backlog_max, pct(50), pct(90), pct(99), pct(99.9),
		       nlat ? (double)lat[nlat - 1] / 1e6 : 0.0);
	}
	(void)first_measured;
	return 0;
}
