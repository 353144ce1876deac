/* SPDX-License-Identifier: ISC */
/*
 * fake_upstream.h: a tiny HTTP/1.1 server on a common/loop.h loop, on
 * 127.0.0.1 and a kernel-chosen port, for the worker's unit tests.  The
 * first path segment picks the answer ("/ok/v1/chat/completions"):
 *
 *   ok       200, a chat completion ("hi \"there\"", usage 3 + 5)
 *   r429     429 with Retry-After: 7
 *   s500     500
 *   s503     503 with Retry-After: 3, x-ratelimit-remaining-requests: 0
 *   coze4009 200 {"code":4009} (Coze's throttle in a 200)
 *   garbage  200, not JSON
 *   nochoice 200, JSON without choices
 *   big      200, a 5000-byte body with Content-Length
 *   bigchunk 200, a 5000-byte body, chunked (no length known up front)
 *   hang     never answers
 *   sse      200 text/event-stream: "Hel" + "lo", a comment, CRLF and
 *            LF line ends, finish, usage 4 + 2, [DONE]
 *   sseslow  "Hel" now, the rest 200 ms later
 *   ssehang  "Hel" now, then nothing
 *   ssegarbage  a data: event that is not JSON, no [DONE]
 *   sseerr   a data: event with an error object
 *   sseearly "Hel", then the body ends without finish or [DONE]
 *   ssecut   "Hel", then the connection closes mid-body
 *   tool     a stream: while the request holds fewer than tool_rounds
 *            assistant tool_calls messages, tool_sse (tool calls);
 *            then "Done <n>" with n the role tool messages it was sent
 *   plug/ok      200 {"echo":<the request body>}
 *   plug/s500    500 {}
 *   plug/garbage 200, not JSON
 *   plug/hang    never answers
 *   plug/slow    200 {"slow":true}, 300 ms later
 *
 * Connections are kept alive; accepted and requests count them, closed
 * counts the ones the client closed, and the last request (head and
 * body) is kept, the plug/ ones each in reqs.  Included by the tests (all
 * static).
 */
#ifndef FAKE_UPSTREAM_H
#define FAKE_UPSTREAM_H

#include <sys/socket.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loop.h"
#include "util.h"

#define FAKE_CONNS 64
#define FAKE_REQS 32

struct fake_req {
	char path[128];
	struct buf head;
	struct buf body;
};

struct fake_conn {
	int fd;
	struct buf in;
};

struct fake_srv {
	struct loop *loop;
	int lfd;
	int port;
	int accepted;
	int requests;
	struct buf last_body;
	struct buf last_head; /* request line and headers */
	char last_path[128];
	struct fake_conn conns[FAKE_CONNS];
	struct loop_timer *later; /* sseslow's rest */
	int later_fd;
	int closed;
	const char *tool_sse; /* tool: the tool call round's events */
	int tool_rounds;
	struct fake_req reqs[FAKE_REQS]; /* plug/ requests */
	int nreqs;
	struct loop_timer *slow; /* plug/slow's answers */
	int slow_fds[8];
	int nslow;
};

#define FAKE_SSE_HEL                                                          \
	": keep-alive\r\n\r\n"                                                \
	"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":"               \
	"\"assistant\",\"content\":\"Hel\"}}]}\r\n\r\n"
#define FAKE_SSE_REST                                                         \
	"data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}"   \
	"\n\n"                                                                \
	"event: ignored\nid: 7\n"                                             \
	"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":"    \
	"\"stop\"}]}\n\n"                                                     \
	"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,"               \
	"\"completion_tokens\":2,\"total_tokens\":6}}\n\n"                    \
	"data: [DONE]\n\n"

/* One chunk of a chunked text/event-stream answer (head: first one). */
static void
fake_sse_chunk(int fd, int head, const char *text, int last)
{
	char buf[8192];
	int n = 0;

	if (head)
		n = snprintf(buf, sizeof(buf),
		             "HTTP/1.1 200 OK\r\nContent-Type: "
		             "text/event-stream\r\nTransfer-Encoding: "
		             "chunked\r\n\r\n");
	if (*text)
		n += snprintf(buf + n, sizeof(buf) - (size_t)n,
		              "%zx\r\n%s\r\n", strlen(text), text);
	if (last)
		n += snprintf(buf + n, sizeof(buf) - (size_t)n, "0\r\n\r\n");
	(void)!write(fd, buf, (size_t)n);
}

static void
fake_later_cb(struct loop *l, void *arg)
{
	struct fake_srv *s = arg;

	(void)l;
	if (s->later_fd != -1)
		fake_sse_chunk(s->later_fd, 0, FAKE_SSE_REST, 1);
	s->later_fd = -1;
}

static void
fake_slow_cb(struct loop *l, void *arg)
{
	struct fake_srv *s = arg;
	static const char b[] = "{\"slow\":true}";
	char head[160];
	int n;

	(void)l;
	n = snprintf(head, sizeof(head),
	             "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
	             "Content-Length: %zu\r\n\r\n%s",
	             sizeof(b) - 1, b);
	for (int i = 0; i < s->nslow; i++)
		if (s->slow_fds[i] != -1)
			(void)!write(s->slow_fds[i], head, (size_t)n);
	s->nslow = 0;
}

/* Occurrences of needle in hay. */
static int
fake_count(const char *hay, const char *needle)
{
	int n = 0;

	for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
		n++;
	return (n);
}

static void
fake_close(struct fake_srv *s, struct fake_conn *c)
{
	if (s->later_fd == c->fd)
		s->later_fd = -1;
	for (int i = 0; i < s->nslow; i++)
		if (s->slow_fds[i] == c->fd)
			s->slow_fds[i] = -1;
	loop_fd_del(s->loop, c->fd);
	close(c->fd);
	c->fd = -1;
	buf_free(&c->in);
}

static void
fake_send(int fd, const char *status, const char *extra, const char *body,
          int chunked)
{
	char head[512];
	size_t blen = strlen(body);
	int n;

	if (chunked)
		n = snprintf(
		        head, sizeof(head),
		        "HTTP/1.1 %s\r\nContent-Type: application/json\r\n%s"
		        "Transfer-Encoding: chunked\r\n\r\n%zx\r\n",
		        status, extra, blen);
	else
		n = snprintf(
		        head, sizeof(head),
		        "HTTP/1.1 %s\r\nContent-Type: application/json\r\n%s"
		        "Content-Length: %zu\r\n\r\n",
		        status, extra, blen);
	/* Small answers on loopback: a blocking-enough write is fine. */
	(void)!write(fd, head, (size_t)n);
	(void)!write(fd, body, blen);
	if (chunked)
		(void)!write(fd, "\r\n0\r\n\r\n", 7);
}

static void
fake_answer(struct fake_srv *s, struct fake_conn *c, const char *path)
{
	static char big[5001];
	const char *seg = path + 1;

	if (big[0] == '\0') {
		memset(big, 'x', sizeof(big) - 1);
		big[sizeof(big) - 1] = '\0';
	}
	if (strncmp(seg, "ok/", 3) == 0)
		fake_send(
		        c->fd, "200 OK", "",
		        "{\"id\":\"x\",\"choices\":[{\"index\":0,\"message\":"
		        "{\"role\":\"assistant\",\"content\":\"hi "
		        "\\\"there\\\"\"},"
		        "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_"
		        "tokens\":"
		        "3,\"completion_tokens\":5,\"total_tokens\":8}}",
		        0);
	else if (strncmp(seg, "r429/", 5) == 0)
		fake_send(c->fd, "429 Too Many Requests", "Retry-After: 7\r\n",
		          "{\"error\":{\"message\":\"slow down\"}}", 0);
	else if (strncmp(seg, "coze4009/", 9) == 0)
		fake_send(c->fd, "200 OK", "",
		          "{\"code\":4009,\"msg\":\"too many requests\"}", 0);
	else if (strncmp(seg, "s503/", 5) == 0)
		fake_send(c->fd, "503 Service Unavailable",
		          "Retry-After: 3\r\nx-ratelimit-remaining-requests: 0"
		          "\r\n",
		          "{}", 0);
	else if (strncmp(seg, "s500/", 5) == 0)
		fake_send(c->fd, "500 Internal Server Error", "", "{}", 0);
	else if (strncmp(seg, "garbage/", 8) == 0)
		fake_send(c->fd, "200 OK", "", "<html>nope", 0);
	else if (strncmp(seg, "nochoice/", 9) == 0)
		fake_send(c->fd, "200 OK", "", "{\"choices\":[]}", 0);
	else if (strncmp(seg, "big/", 4) == 0)
		fake_send(c->fd, "200 OK", "", big, 0);
	else if (strncmp(seg, "bigchunk/", 9) == 0)
		fake_send(c->fd, "200 OK", "", big, 1);
	else if (strncmp(seg, "hang/", 5) == 0)
		; /* never */
	else if (strncmp(seg, "sse/", 4) == 0)
		fake_sse_chunk(c->fd, 1, FAKE_SSE_HEL FAKE_SSE_REST, 1);
	else if (strncmp(seg, "sseslow/", 8) == 0) {
		fake_sse_chunk(c->fd, 1, FAKE_SSE_HEL, 0);
		s->later_fd = c->fd;
		loop_timer_set(s->later, 200);
	} else if (strncmp(seg, "ssehang/", 8) == 0)
		fake_sse_chunk(c->fd, 1, FAKE_SSE_HEL, 0);
	else if (strncmp(seg, "ssegarbage/", 11) == 0)
		fake_sse_chunk(c->fd, 1, "data: <html>nope\n\n", 1);
	else if (strncmp(seg, "sseerr/", 7) == 0)
		fake_sse_chunk(c->fd, 1,
		               "data: {\"error\":{\"message\":\"overloaded\","
		               "\"type\":\"server_error\"}}\n\n",
		               1);
	else if (strncmp(seg, "sseearly/", 9) == 0)
		fake_sse_chunk(c->fd, 1, FAKE_SSE_HEL, 1);
	else if (strncmp(seg, "ssecut/", 7) == 0) {
		fake_sse_chunk(c->fd, 1, FAKE_SSE_HEL, 0);
		shutdown(c->fd, SHUT_RDWR);
	} else if (strncmp(seg, "tool/", 5) == 0) {
		const char *b = s->last_body.b;
		int rounds = fake_count(b, "\"tool_calls\":[");
		char done[512];

		if (rounds < s->tool_rounds && s->tool_sse != NULL)
			fake_sse_chunk(c->fd, 1, s->tool_sse, 1);
		else {
			snprintf(done, sizeof(done),
			         "data: {\"choices\":[{\"index\":0,\"delta\":"
			         "{\"content\":\"Done %d\"}}]}\n\n"
			         "data: {\"choices\":[{\"index\":0,\"delta\":"
			         "{},\"finish_reason\":\"stop\"}]}\n\n"
			         "data: {\"choices\":[],\"usage\":{\"prompt_"
			         "tokens\":10,\"completion_tokens\":1}}\n\n"
			         "data: [DONE]\n\n",
			         fake_count(b, "\"role\":\"tool\""));
			fake_sse_chunk(c->fd, 1, done, 1);
		}
	} else if (strncmp(seg, "plug/", 5) == 0) {
		struct buf e = {0};

		if (s->nreqs < FAKE_REQS) {
			struct fake_req *q = &s->reqs[s->nreqs++];

			snprintf(q->path, sizeof(q->path), "%s", path);
			(void)buf_add(&q->head, s->last_head.b,
			              s->last_head.len + 1);
			(void)buf_add(&q->body, s->last_body.b,
			              s->last_body.len + 1);
		}
		if (strcmp(seg, "plug/ok") == 0) {
			(void)buf_adds(&e, "{\"echo\":");
			(void)buf_add(&e, s->last_body.b, s->last_body.len);
			(void)buf_adds(&e, "}");
			(void)buf_add(&e, "", 1);
			fake_send(c->fd, "200 OK", "", e.b, 0);
			buf_free(&e);
		} else if (strcmp(seg, "plug/s500") == 0)
			fake_send(c->fd, "500 Internal Server Error", "", "{}",
			          0);
		else if (strcmp(seg, "plug/garbage") == 0)
			fake_send(c->fd, "200 OK", "", "<html>nope", 0);
		else if (strcmp(seg, "plug/slow") == 0) {
			if (s->nslow < 8)
				s->slow_fds[s->nslow++] = c->fd;
			loop_timer_set(s->slow, 300);
		} else if (strcmp(seg, "plug/hang") != 0)
			fake_send(c->fd, "404 Not Found", "", "{}", 0);
	} else
		fake_send(c->fd, "404 Not Found", "", "{}", 0);
}

/* A whole request in c->in?  Then answer it and drop it from the
 * buffer. */
static void
fake_parse(struct fake_srv *s, struct fake_conn *c)
{
	char *end, *cl, path[128];
	size_t hlen, blen = 0;

	for (;;) {
		if (c->in.len == 0 || buf_reserve(&c->in, 1) == -1)
			return;
		c->in.b[c->in.len] = '\0';
		if ((end = strstr(c->in.b, "\r\n\r\n")) == NULL)
			return;
		hlen = (size_t)(end - c->in.b) + 4;
		if ((cl = strcasestr(c->in.b, "\r\nContent-Length:")) !=
		            NULL &&
		    cl < end)
			blen = strtoul(cl + 17, NULL, 10);
		if (c->in.len < hlen + blen)
			return;
		if (sscanf(c->in.b, "%*s %127s", path) != 1)
			path[0] = '\0';
		snprintf(s->last_path, sizeof(s->last_path), "%s", path);
		buf_reset(&s->last_head);
		(void)buf_add(&s->last_head, c->in.b, hlen);
		(void)buf_add(&s->last_head, "", 1);
		s->last_head.len--;
		buf_reset(&s->last_body);
		(void)buf_add(&s->last_body, c->in.b + hlen, blen);
		(void)buf_add(&s->last_body, "", 1);
		s->last_body.len--;
		s->requests++;
		fake_answer(s, c, path);
		memmove(c->in.b, c->in.b + hlen + blen,
		        c->in.len - hlen - blen);
		c->in.len -= hlen + blen;
	}
}

static void
fake_conn_cb(struct loop *l, int fd, uint32_t ev, void *arg)
{
	struct fake_srv *s = arg;
	struct fake_conn *c = NULL;
	char tmp[4096];
	ssize_t n;

	(void)l;
	(void)ev;
	for (int i = 0; i < FAKE_CONNS; i++)
		if (s->conns[i].fd == fd)
			c = &s->conns[i];
	if (c == NULL)
		return;
	for (;;) {
		n = read(fd, tmp, sizeof(tmp));
		if (n > 0) {
			(void)buf_add(&c->in, tmp, (size_t)n);
			continue;
		}
		if (n == -1 && errno == EAGAIN)
			break;
		s->closed++;
		fake_close(s, c);
		return;
	}
	fake_parse(s, c);
}

static void
fake_accept_cb(struct loop *l, int fd, uint32_t ev, void *arg)
{
	struct fake_srv *s = arg;
	int cfd;

	(void)ev;
	while ((cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) !=
	       -1) {
		int i;

		for (i = 0; i < FAKE_CONNS && s->conns[i].fd != -1; i++)
			;
		if (i == FAKE_CONNS) {
			close(cfd);
			continue;
		}
		s->accepted++;
		s->conns[i].fd = cfd;
		memset(&s->conns[i].in, 0, sizeof(s->conns[i].in));
		(void)loop_fd_add(l, cfd, EPOLLIN, fake_conn_cb, s);
	}
}

/* A port nobody listens on (bound, then closed). */
static inline int
fake_dead_port(void)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd == -1 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1 ||
	    getsockname(fd, (struct sockaddr *)&sa, &sl) == -1)
		return (-1);
	port = ntohs(sa.sin_port);
	close(fd);
	return (port);
}

static int
fake_start(struct fake_srv *s, struct loop *l)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	socklen_t sl = sizeof(sa);

	memset(s, 0, sizeof(*s));
	s->loop = l;
	s->later_fd = -1;
	if ((s->later = loop_timer_new(l, fake_later_cb, s)) == NULL ||
	    (s->slow = loop_timer_new(l, fake_slow_cb, s)) == NULL)
		return (-1);
	for (int i = 0; i < FAKE_CONNS; i++)
		s->conns[i].fd = -1;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if ((s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0)) == -1 ||
	    bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)) == -1 ||
	    listen(s->lfd, 64) == -1 ||
	    getsockname(s->lfd, (struct sockaddr *)&sa, &sl) == -1 ||
	    loop_fd_add(l, s->lfd, EPOLLIN, fake_accept_cb, s) == -1)
		return (-1);
	s->port = ntohs(sa.sin_port);
	return (0);
}

static void
fake_stop(struct fake_srv *s)
{
	for (int i = 0; i < FAKE_CONNS; i++)
		if (s->conns[i].fd != -1)
			fake_close(s, &s->conns[i]);
	loop_fd_del(s->loop, s->lfd);
	close(s->lfd);
	loop_timer_free(s->later);
	loop_timer_free(s->slow);
	buf_free(&s->last_body);
	buf_free(&s->last_head);
	for (int i = 0; i < s->nreqs; i++) {
		buf_free(&s->reqs[i].head);
		buf_free(&s->reqs[i].body);
	}
}

/* Close every connection the server holds (the client must reconnect). */
static inline void
fake_drop_conns(struct fake_srv *s)
{
	for (int i = 0; i < FAKE_CONNS; i++)
		if (s->conns[i].fd != -1)
			fake_close(s, &s->conns[i]);
}

#endif
