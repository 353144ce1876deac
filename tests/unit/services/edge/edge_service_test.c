/* SPDX-License-Identifier: ISC */
/*
 * Tests of the troupe-edge program between an HTTP client and its peers:
 * this binary plays auth, dispatcher and storage (real ipc mailboxes in a
 * temporary rundir), starts troupe-edge (TROUPE_EDGE_BIN) on a free
 * loopback port, speaks HTTP/1.1 to it over plain sockets and checks both
 * sides: the CHAT_REQUEST auth receives (fields, request id, trace,
 * deadline, reply_to), the HTTP answer built from a CHAT_REPLY (success,
 * errors, Retry-After, a nonsense status), replies for requests nobody
 * waits for (duplicates, after the deadline, client gone), pipelined
 * chats, /readyz as peers come and go, and undecodable messages;
 * the v3 routes (fields sent on, bad input, streams from CHAT_EVENT, a
 * failure or the deadline during a stream, CLIENT_GONE to the dispatcher
 * when a client leaves, a client too slow to read).  Python's harness cannot
 * speak nng, hence C here.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conf.h"
#include "coze.h"
#include "ipc.h"
#include "proto.h"
#include "t.h"
#include "util.h"

#define TRACE "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#define CHAT_TIMEOUT_MS 1500

static char dir[256];
static char cfgpath[300];
static pid_t child = -1;
static int port;
static struct ipc *auth, *disp, *stor;

/* The CHAT_REQUESTs auth received, copied out of the handler. */
#define NGOT 16
struct got {
	char reqid[64], traceparent[80], reply_to[64], sender[64];
	uint64_t deadline_ms, received_ms;
	char route[32], token[64], sub[32], bot_id[64], user_id[64];
	char query[128], history_id[64];
	char chat_id[40], messages[1024];
	uint64_t stream;
};
static struct got got[NGOT];
static int ngot;

static void
cp(char *d, size_t n, struct mstr s)
{
	snprintf(d, n, "%.*s", (int)s.n, s.p);
}

static void
on_auth(void *arg, const struct msg *m)
{
	struct chat_request q;
	struct got *g;

	(void)arg;
	if (ngot == NGOT || m->type != MSG_CHAT_REQUEST ||
	    chat_request_unpack(m, &q) == -1)
		return;
	g = &got[ngot++];
	cp(g->reqid, sizeof(g->reqid), m->reqid);
	cp(g->traceparent, sizeof(g->traceparent), m->traceparent);
	cp(g->reply_to, sizeof(g->reply_to), m->reply_to);
	cp(g->sender, sizeof(g->sender), m->sender);
	g->deadline_ms = m->deadline_ms;
	cp(g->route, sizeof(g->route), q.route);
	cp(g->token, sizeof(g->token), q.token);
	cp(g->sub, sizeof(g->sub), q.sub);
	cp(g->bot_id, sizeof(g->bot_id), q.bot_id);
	cp(g->user_id, sizeof(g->user_id), q.user_id);
	cp(g->query, sizeof(g->query), q.query);
	cp(g->history_id, sizeof(g->history_id), q.history_id);
	g->received_ms = q.received_ms;
	cp(g->chat_id, sizeof(g->chat_id), q.chat_id);
	cp(g->messages, sizeof(g->messages), q.messages);
	g->stream = q.stream;
}

/* The CLIENT_GONEs the dispatcher received. */
static struct got gone[NGOT];
static int ngone;

static void
on_disp(void *arg, const struct msg *m)
{
	struct chat_request q;
	struct got *g;

	(void)arg;
	if (ngone == NGOT || m->type != MSG_CLIENT_GONE ||
	    chat_request_unpack(m, &q) == -1)
		return;
	g = &gone[ngone++];
	memset(g, 0, sizeof(*g));
	cp(g->reqid, sizeof(g->reqid), m->reqid);
	cp(g->traceparent, sizeof(g->traceparent), m->traceparent);
	cp(g->sender, sizeof(g->sender), m->sender);
	cp(g->route, sizeof(g->route), q.route);
	cp(g->chat_id, sizeof(g->chat_id), q.chat_id);
	cp(g->history_id, sizeof(g->history_id), q.history_id);
}

static void
on_other(void *arg, const struct msg *m)
{
	(void)arg;
	(void)m;
}

static struct ipc **const boxes[] = {&auth, &disp, &stor};

/* Run our mailboxes for up to ms, or until *done >= want. */
static void
pump(int ms, const int *done, int want)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms;
	static uint64_t tick;

	for (;;) {
		struct pollfd p[3];
		int n = 0;
		size_t i;

		for (i = 0; i < 3; i++)
			if (*boxes[i])
				p[n++] = (struct pollfd){ipc_fd(*boxes[i]),
				                         POLLIN, 0};
		(void)poll(p, (nfds_t)n, 5);
		for (i = 0; i < 3; i++)
			if (*boxes[i])
				ipc_process(*boxes[i]);
		if (now_mono_ms() >= tick) {
			for (i = 0; i < 3; i++)
				if (*boxes[i])
					ipc_tick(*boxes[i]);
			tick = now_mono_ms() + IPC_TICK_MS;
		}
		if ((done != NULL && *done >= want) || now_mono_ms() >= end)
			break;
	}
}

/* HTTP. */

struct resp {
	int status;
	char logid[64], trace[80], retry[16], conn[32], ctype[64];
	char body[2048];
	int closed; /* the server closed the connection after it */
};

static int
http_connect(void)
{
	struct sockaddr_in a = {0};
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	T_ASSERT(fd != -1);
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == -1) {
		close(fd);
		return (-1);
	}
	return (fd);
}

static void
http_send(int fd, const char *s)
{
	T_EQ_INT(write(fd, s, strlen(s)), (long long)strlen(s));
}

static void
hdr(const char *head, const char *name, char *out, size_t n)
{
	const char *p = head;
	size_t nl = strlen(name);

	out[0] = '\0';
	while ((p = strstr(p, "\r\n")) != NULL) {
		p += 2;
		if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
			const char *v = p + nl + 1, *e;
			while (*v == ' ')
				v++;
			e = strstr(v, "\r\n");
			snprintf(out, n, "%.*s",
			         (int)(e ? e - v : (long)strlen(v)), v);
			return;
		}
	}
}

/* Read one response from fd (pumping our mailboxes meanwhile), leaving
 * what follows it in the static carry-over buffer for the next call. */
static char carry[8192];
static size_t ncarry;

static int
http_read(int fd, struct resp *r, int ms)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms;
	char *hend;
	size_t clen;

	memset(r, 0, sizeof(*r));
	for (;;) {
		struct pollfd p = {fd, POLLIN, 0};
		ssize_t n;

		carry[ncarry] = '\0';
		if ((hend = strstr(carry, "\r\n\r\n")) != NULL) {
			char cl[32];

			*hend = '\0';
			hdr(carry, "Content-Length", cl, sizeof(cl));
			clen = (size_t)atol(cl);
			*hend = '\r';
			if (ncarry >= (size_t)(hend + 4 - carry) + clen)
				break;
		}
		if (now_mono_ms() >= end)
			return (-1);
		if (poll(&p, 1, 5) == 1) {
			n = read(fd, carry + ncarry,
			         sizeof(carry) - 1 - ncarry);
			if (n <= 0)
				return (-1);
			ncarry += (size_t)n;
		}
		pump(1, NULL, 0);
	}
	*hend = '\0';
	if (sscanf(carry, "HTTP/1.1 %d", &r->status) != 1)
		return (-1);
	hdr(carry, "X-Tt-Logid", r->logid, sizeof(r->logid));
	hdr(carry, "traceparent", r->trace, sizeof(r->trace));
	hdr(carry, "Retry-After", r->retry, sizeof(r->retry));
	hdr(carry, "Connection", r->conn, sizeof(r->conn));
	hdr(carry, "Content-Type", r->ctype, sizeof(r->ctype));
	snprintf(r->body, sizeof(r->body), "%.*s", (int)clen, hend + 4);
	clen += (size_t)(hend + 4 - carry);
	memmove(carry, carry + clen, ncarry - clen);
	ncarry -= clen;
	return (0);
}

static void
http_close(int fd)
{
	close(fd);
	ncarry = 0;
}

static char *
chat_req(const char *token, const char *body, const char *trace)
{
	static char b[4096];

	snprintf(b, sizeof(b),
	         "POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
	         "Authorization: Bearer %s\r\n%s%s%s"
	         "Content-Type: application/json\r\nContent-Length: "
	         "%zu\r\n\r\n%s",
	         token, trace ? "traceparent: " : "", trace ? trace : "",
	         trace ? "\r\n" : "", strlen(body), body);
	return (b);
}

static const char body1[] =
        "{\"bot_id\":\"bot-1\",\"user_id\":\"u_1\",\"query\":\"hello\","
        "\"history_id\":\"conv-9\"}";

/* Answer reqid from mailbox box, as peer processes do. */
static void
reply(struct ipc *box, const char *reqid, uint64_t status, int64_t code,
      const char *msg, const char *data, uint64_t retry)
{
	struct chat_reply r = {.status = status,
	                       .code = code,
	                       .msg = MSTR(msg),
	                       .data = MSTR(data),
	                       .retry_after = retry};
	struct msg_head h = {MSTR(reqid), MSTR_LIT(TRACE), 0, MSTR_LIT("")};

	T_EQ_INT(msg_send_chat_reply(box, "edge", &h, &r), 0);
}

/* Program. */

static void
write_conf(const char *extra)
{
	FILE *f;

	T_ASSERT((f = fopen(cfgpath, "w")) != NULL);
	fprintf(f,
	        "[ipc]\nrundir = %s\n\n[edge]\nlisten = 127.0.0.1:%d\n"
	        "chat_timeout_ms = %d\n%s",
	        dir, port, CHAT_TIMEOUT_MS, extra ? extra : "");
	fclose(f);
}

static int
free_port(void)
{
	struct sockaddr_in a = {0};
	socklen_t l = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), p;

	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	T_ASSERT(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	T_ASSERT(getsockname(fd, (struct sockaddr *)&a, &l) == 0);
	p = ntohs(a.sin_port);
	close(fd);
	return (p);
}

static pid_t
start(void)
{
	char log[300];
	pid_t pid;
	int fd;

	snprintf(log, sizeof(log), "%s/edge.log", dir);
	if ((pid = fork()) == 0) {
		fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fd, 2);
		unsetenv("NOTIFY_SOCKET");
		unsetenv("LISTEN_FDS");
		unsetenv("LISTEN_PID");
		execl(TROUPE_EDGE_BIN, "troupe-edge", "-c", cfgpath,
		      (char *)NULL);
		_exit(127);
	}
	T_ASSERT(pid > 0);
	/* Up when it accepts. */
	for (int i = 0; i < 500; i++) {
		if ((fd = http_connect()) != -1) {
			close(fd);
			return (pid);
		}
		usleep(10000);
	}
	T_FAIL("troupe-edge did not listen on port %d", port);
}

static int
log_has(const char *s)
{
	char path[300], buf[65536];
	size_t n;
	FILE *f;

	snprintf(path, sizeof(path), "%s/edge.log", dir);
	if ((f = fopen(path, "r")) == NULL)
		return (0);
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	return (strstr(buf, s) != NULL);
}

/* GET path on a fresh connection. */
static void
get(const char *path, struct resp *r)
{
	char req[256];
	int fd = http_connect();

	T_ASSERT(fd != -1);
	snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path);
	http_send(fd, req);
	if (http_read(fd, r, 3000) == -1)
		T_FAIL("no answer to GET %s", path);
	http_close(fd);
}

static void
expect_error(const struct resp *r, int status, long code, const char *msg)
{
	char want[512];

	if (r->status != status)
		T_FAIL("status: got %d, want %d (%s)", r->status, status,
		       r->body);
	snprintf(want, sizeof(want),
	         "{\"code\":%ld,\"msg\":\"%s\",\"detail\":{\"logid\":\"%s\"}}",
	         code, msg, r->logid);
	T_EQ_STR(r->body, want);
	T_EQ_INT(strlen(r->logid), 32);
	T_EQ_STR(r->ctype, "application/json");
}

/* Cases. */

static void
t_readyz(void)
{
	struct resp r;
	char err[256];
	int i;

	/* No peer yet. */
	get("/readyz", &r);
	T_EQ_INT(r.status, 503);
	T_ASSERT(strstr(r.body, "\"down\":[\"auth\",\"dispatcher\","
	                        "\"storage\"]") != NULL);
	T_EQ_STR(r.retry, "1");
	/* All three come up: ready (the edge redials within a second). */
	if ((auth = ipc_open("auth", on_auth, NULL, err, sizeof(err))) ==
	            NULL ||
	    (disp = ipc_open("dispatcher", on_disp, NULL, err, sizeof(err))) ==
	            NULL ||
	    (stor = ipc_open("storage", on_other, NULL, err, sizeof(err))) ==
	            NULL)
		T_FAIL("ipc_open: %s", err);
	for (i = 0; i < 60; i++) {
		pump(50, NULL, 0);
		get("/readyz", &r);
		if (r.status == 200)
			break;
	}
	T_EQ_INT(r.status, 200);
	/* Our links to the edge, up before the cases that answer through
	 * them (a first send waits for the dial). */
	for (i = 0; i < 100; i++) {
		if (ipc_connected(auth, "edge") &&
		    ipc_connected(disp, "edge") && ipc_connected(stor, "edge"))
			break;
		pump(50, NULL, 0);
	}
	T_ASSERT(ipc_connected(auth, "edge") && ipc_connected(disp, "edge") &&
	         ipc_connected(stor, "edge"));
	T_EQ_STR(r.body, "{\"status\":\"ready\",\"tier\":\"L0\"}");
}

static void
t_chat_ok(void)
{
	struct resp r;
	const struct got *g;
	uint64_t t0 = now_wall_ms();
	char want[512];
	int fd = http_connect();

	ngot = 0;
	http_send(fd, chat_req("tok-1", body1, TRACE));
	pump(3000, &ngot, 1);
	T_EQ_INT(ngot, 1);
	g = &got[0];
	T_EQ_INT(strlen(g->reqid), 32);
	T_EQ_STR(g->traceparent, TRACE);
	T_EQ_STR(g->reply_to, "edge");
	T_EQ_STR(g->sender, "edge");
	T_EQ_STR(g->route, "v1.chat");
	T_EQ_STR(g->token, "tok-1");
	T_EQ_STR(g->sub, "");
	T_EQ_STR(g->bot_id, "bot-1");
	T_EQ_STR(g->user_id, "u_1");
	T_EQ_STR(g->query, "hello");
	T_EQ_STR(g->history_id, "conv-9");
	if (g->received_ms < t0 - 5 || g->received_ms > now_wall_ms())
		T_FAIL("received_ms %llu not between %llu and now",
		       (unsigned long long)g->received_ms,
		       (unsigned long long)t0);
	T_EQ_INT(g->deadline_ms - g->received_ms, CHAT_TIMEOUT_MS);

	/* The answer may come from any process: here storage. */
	reply(stor, g->reqid, 200, 0, "",
	      "{\"chat_id\":\"c1\",\"answer\":\"hi \\\"there\\\"\"}", 0);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	T_EQ_INT(r.status, 200);
	T_EQ_STR(r.logid, g->reqid);
	T_EQ_STR(r.trace, TRACE);
	T_EQ_STR(r.ctype, "application/json");
	T_EQ_STR(r.conn, "keep-alive");
	snprintf(want, sizeof(want),
	         "{\"code\":0,\"msg\":\"\",\"data\":"
	         "{\"chat_id\":\"c1\",\"answer\":\"hi \\\"there\\\"\"}}");
	T_EQ_STR(r.body, want);

	/* The same request id again (a resend after a restart): dropped;
	 * the connection goes on serving. */
	reply(auth, got[0].reqid, 200, 0, "", "{}", 0);
	pump(100, NULL, 0);
	http_send(fd, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	T_EQ_INT(r.status, 200);
	T_EQ_STR(r.body, "{\"status\":\"ok\"}");
	http_close(fd);
}

static void
t_chat_errors(void)
{
	struct resp r;
	int fd = http_connect();
	char want[256];

	/* A refusal from auth, as is. */
	ngot = 0;
	http_send(fd, chat_req("bad", body1, NULL));
	pump(3000, &ngot, 1);
	T_EQ_INT(ngot, 1);
	reply(auth, got[0].reqid, 401, 4100, "bad signature", "", 0);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	expect_error(&r, 401, 4100, "bad signature");
	T_EQ_STR(r.logid, got[0].reqid);
	T_EQ_STR(r.retry, "");
	/* No client trace: the edge started one, and sent it on. */
	T_EQ_INT(strlen(r.trace), 55);
	T_EQ_STR(r.trace, got[0].traceparent);

	/* Overloaded, with Retry-After; a message that needs escaping. */
	ngot = 0;
	http_send(fd, chat_req("t", body1, NULL));
	pump(3000, &ngot, 1);
	reply(disp, got[0].reqid, 503, 5030, "busy \"now\"\n", "", 7);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	T_EQ_INT(r.status, 503);
	T_EQ_STR(r.retry, "7");
	snprintf(want, sizeof(want),
	         "{\"code\":5030,\"msg\":\"busy "
	         "\\\"now\\\"\\n\",\"detail\":{\"logid\":\"%s\"}}",
	         r.logid);
	T_EQ_STR(r.body, want);

	/* A status no HTTP client should see: 502/5020. */
	ngot = 0;
	http_send(fd, chat_req("t", body1, NULL));
	pump(3000, &ngot, 1);
	reply(auth, got[0].reqid, 42, 0, "what", "", 0);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	expect_error(&r, 502, 5020, "what");
	http_close(fd);
}

static void
t_deadline_then_late(void)
{
	struct resp r;
	uint64_t t0 = now_mono_ms(), dt;
	int fd = http_connect();

	ngot = 0;
	http_send(fd, chat_req("t", body1, TRACE));
	pump(3000, &ngot, 1);
	T_EQ_INT(http_read(fd, &r, CHAT_TIMEOUT_MS + 2000), 0);
	dt = now_mono_ms() - t0;
	expect_error(&r, 504, 5040, "deadline exceeded");
	T_EQ_STR(r.trace, TRACE);
	if (dt < CHAT_TIMEOUT_MS - 50 || dt > CHAT_TIMEOUT_MS + 600)
		T_FAIL("504 after %llu ms, want about %d",
		       (unsigned long long)dt, CHAT_TIMEOUT_MS);
	/* The real answer comes too late: dropped. */
	reply(stor, got[0].reqid, 200, 0, "", "{\"late\":true}", 0);
	pump(200, NULL, 0);
	http_send(fd, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	T_EQ_INT(r.status, 200);
	http_close(fd);
}

static void
t_client_gone(void)
{
	struct resp r;
	int fd = http_connect();

	ngot = 0;
	http_send(fd, chat_req("t", body1, NULL));
	pump(3000, &ngot, 1);
	T_EQ_INT(ngot, 1);
	http_close(fd);
	pump(100, NULL, 0);
	/* The answer finds a closed connection: nothing breaks. */
	reply(stor, got[0].reqid, 200, 0, "", "{\"x\":1}", 0);
	pump(300, NULL, 0);
	get("/healthz", &r);
	T_EQ_INT(r.status, 200);
}

static void
t_pipelined(void)
{
	struct resp r1, r2;
	char two[8192];
	int fd = http_connect();

	/* Two chats in one write: HTTP/1.1 answers in order, and h2o 2.2.5
	 * reads the second only once the first is answered. */
	ngot = 0;
	snprintf(two, sizeof(two), "%s", chat_req("a", body1, NULL));
	strncat(two, chat_req("b", body1, NULL),
	        sizeof(two) - strlen(two) - 1);
	http_send(fd, two);
	pump(3000, &ngot, 1);
	T_EQ_INT(ngot, 1);
	T_EQ_STR(got[0].token, "a");
	pump(200, NULL, 0);
	T_EQ_INT(ngot, 1);
	reply(auth, got[0].reqid, 200, 0, "", "{\"n\":1}", 0);
	pump(3000, &ngot, 2);
	T_EQ_INT(ngot, 2);
	T_EQ_STR(got[1].token, "b");
	reply(auth, got[1].reqid, 200, 0, "", "{\"n\":2}", 0);
	T_EQ_INT(http_read(fd, &r1, 3000), 0);
	T_EQ_INT(http_read(fd, &r2, 3000), 0);
	T_EQ_STR(r1.body, "{\"code\":0,\"msg\":\"\",\"data\":{\"n\":1}}");
	T_EQ_STR(r2.body, "{\"code\":0,\"msg\":\"\",\"data\":{\"n\":2}}");
	T_EQ_STR(r1.logid, got[0].reqid);
	T_EQ_STR(r2.logid, got[1].reqid);
	http_close(fd);
}

/* v3. */

static char *
v3_req(const char *method, const char *path, const char *token,
       const char *body)
{
	static char b[8192];

	snprintf(b, sizeof(b),
	         "%s %s HTTP/1.1\r\nHost: t\r\n%s%s%s"
	         "Content-Type: application/json\r\nContent-Length: "
	         "%zu\r\n\r\n%s",
	         method, path, token ? "Authorization: Bearer " : "",
	         token ? token : "", token ? "\r\n" : "", strlen(body), body);
	return (b);
}

static const char v3body[] =
        "{\"bot_id\":\"bot-1\",\"user_id\":\"u_1\",\"stream\":true,"
        "\"additional_messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
        "{\"role\":\"assistant\",\"content\":\"yes?\"},"
        "{\"role\":\"user\",\"content\":\"weather\","
        "\"content_type\":\"text\"}]}";

static const char ev_created[] =
        "event:conversation.chat.created\ndata:{\"id\":\"1\","
        "\"conversation_id\":\"7777\",\"status\":\"created\"}\n\n";
static const char ev_delta[] =
        "event:conversation.message.delta\ndata:{\"content\":\"sun\"}\n\n";
static const char ev_end[] =
        "event:conversation.chat.completed\ndata:{\"status\":"
        "\"completed\"}\n\nevent:done\ndata:\"[DONE]\"\n\n";

static void
event(struct ipc *box, const char *reqid, const char *sse, int last)
{
	struct chat_event e = {MSTR(sse), (uint64_t)last};
	struct msg_head h = {MSTR(reqid), MSTR_LIT(TRACE), 0, MSTR_LIT("")};

	T_EQ_INT(msg_send_chat_event(box, "edge", &h, &e), 0);
}

/* Raw bytes of a stream, read until s shows up (or ms pass). */
static char raw[1 << 16];
static size_t nraw;

static int
read_until(int fd, const char *s, int ms)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms;

	for (;;) {
		struct pollfd p = {fd, POLLIN, 0};
		ssize_t n;

		raw[nraw] = '\0';
		if (strstr(raw, s) != NULL)
			return (0);
		if (now_mono_ms() >= end)
			return (-1);
		if (poll(&p, 1, 5) == 1) {
			n = read(fd, raw + nraw, sizeof(raw) - 1 - nraw);
			if (n <= 0)
				return (-1);
			nraw += (size_t)n;
		}
		pump(1, NULL, 0);
	}
}

/* Start a streaming v3 chat on a fresh connection; *fd, and got[0]. */
static void
v3_start(int *fd, const char *body)
{
	*fd = http_connect();
	T_ASSERT(*fd != -1);
	nraw = 0;
	ngot = 0;
	http_send(*fd, v3_req("POST", "/v3/chat?conversation_id=7777", "tok",
	                      body));
	pump(3000, &ngot, 1);
	T_EQ_INT(ngot, 1);
}

static void
t_v3_stream(void)
{
	const struct got *g;
	char id[COZE_ID_LEN + 1], h[256];
	int fd;

	v3_start(&fd, v3body);
	g = &got[0];
	T_EQ_STR(g->route, "v3.chat");
	T_EQ_STR(g->token, "tok");
	T_EQ_STR(g->bot_id, "bot-1");
	T_EQ_STR(g->user_id, "u_1");
	T_EQ_STR(g->query, "weather");
	T_EQ_STR(g->history_id, "7777");
	T_EQ_INT(g->stream, 1);
	coze_chat_id_of(MSTR(g->reqid), id);
	T_EQ_STR(g->chat_id, id);
	T_EQ_STR(
	        g->messages,
	        "[{\"role\":\"user\",\"type\":\"question\",\"content\":\"hi\","
	        "\"content_type\":\"text\"},{\"role\":\"assistant\",\"type\":"
	        "\"answer\",\"content\":\"yes?\",\"content_type\":\"text\"},"
	        "{\"role\":\"user\",\"type\":\"question\",\"content\":"
	        "\"weather\",\"content_type\":\"text\"}]");
	T_EQ_INT(g->deadline_ms - g->received_ms, CHAT_TIMEOUT_MS);

	/* The first event starts the answer; the others follow, in order;
	 * the last ends it (chunked), and the connection stays usable. */
	event(stor, g->reqid, ev_created, 0);
	T_EQ_INT(read_until(fd, ev_created, 3000), 0);
	T_ASSERT(strncmp(raw, "HTTP/1.1 200 OK\r\n", 17) == 0);
	hdr(raw, "Content-Type", h, sizeof(h));
	T_EQ_STR(h, "text/event-stream; charset=utf-8");
	hdr(raw, "Cache-Control", h, sizeof(h));
	T_EQ_STR(h, "no-cache");
	hdr(raw, "Transfer-Encoding", h, sizeof(h));
	T_EQ_STR(h, "chunked");
	hdr(raw, "X-Tt-Logid", h, sizeof(h));
	T_EQ_STR(h, g->reqid);
	hdr(raw, "traceparent", h, sizeof(h));
	T_EQ_INT(strlen(h), 55);
	T_EQ_STR(h, g->traceparent);
	hdr(raw, "Content-Length", h, sizeof(h));
	T_EQ_STR(h, "");
	/* Events may come from any peer; two links keep no order between
	 * them, so the next one is sent once the first was written. */
	event(disp, g->reqid, ev_delta, 0);
	T_EQ_INT(read_until(fd, ev_delta, 3000), 0);
	event(stor, g->reqid, ev_delta, 0);
	event(stor, g->reqid, ev_end, 1);
	T_EQ_INT(read_until(fd, "\r\n0\r\n\r\n", 3000), 0);
	{
		const char *a = strstr(raw, ev_created), *b, *c, *d;
		T_ASSERT(a != NULL);
		b = strstr(a + 1, ev_delta);
		T_ASSERT(b != NULL);
		c = strstr(b + 1, ev_delta);
		T_ASSERT(c != NULL);
		d = strstr(c + 1, ev_end);
		T_ASSERT(d != NULL);
		T_ASSERT(strcmp(d + strlen(ev_end), "\r\n0\r\n\r\n") == 0);
	}
	/* Nobody waits any more: a late event and a late reply are
	 * dropped; no CLIENT_GONE for a stream that ended. */
	event(stor, g->reqid, ev_delta, 0);
	reply(stor, g->reqid, 500, 5000, "late", "", 0);
	ncarry = 0;
	http_send(fd, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
	{
		struct resp r;
		T_EQ_INT(http_read(fd, &r, 3000), 0);
		T_EQ_INT(r.status, 200);
	}
	http_close(fd);
	pump(700, NULL, 0);
	T_EQ_INT(ngone, 0);
}

/* The chat failed after the stream began: the edge says so in it. */
static void
t_v3_stream_error(void)
{
	char want[512], id[COZE_ID_LEN + 1];
	int fd;

	v3_start(&fd, v3body);
	coze_chat_id_of(MSTR(got[0].reqid), id);
	event(stor, got[0].reqid, ev_created, 0);
	T_EQ_INT(read_until(fd, ev_created, 3000), 0);
	reply(disp, got[0].reqid, 502, 5020, "upstream \"x\" failed", "", 0);
	T_EQ_INT(read_until(fd, "\r\n0\r\n\r\n", 3000), 0);
	snprintf(want, sizeof(want),
	         "event:conversation.chat.failed\ndata:{\"id\":\"%s\","
	         "\"conversation_id\":\"7777\",\"bot_id\":\"bot-1\","
	         "\"created_at\":",
	         id);
	T_ASSERT(strstr(raw, want) != NULL);
	T_ASSERT(strstr(raw, "\"last_error\":{\"code\":5020,\"msg\":"
	                     "\"upstream \\\"x\\\" failed\"},\"status\":"
	                     "\"failed\"") != NULL);
	T_ASSERT(strstr(raw, "event:done\ndata:\"[DONE]\"\n\n\r\n0\r\n\r\n") !=
	         NULL);
	http_close(fd);
	pump(200, NULL, 0);
	T_EQ_INT(ngone, 0);

	/* A new conversation: the id comes from the run's first event. */
	fd = http_connect();
	nraw = 0;
	ngot = 0;
	http_send(fd, v3_req("POST", "/v3/chat", "tok", v3body));
	pump(3000, &ngot, 1);
	T_EQ_STR(got[0].history_id, "");
	event(stor, got[0].reqid,
	      "event:conversation.chat.created\ndata:{\"id\":\"1\","
	      "\"conversation_id\":\"4242\"}\n\n",
	      0);
	T_EQ_INT(read_until(fd, "4242", 3000), 0);
	/* The deadline passes while streaming: failed (5040) and done. */
	T_EQ_INT(read_until(fd, "\r\n0\r\n\r\n", CHAT_TIMEOUT_MS + 2000), 0);
	T_ASSERT(strstr(raw, "\"conversation_id\":\"4242\",\"bot_id\":"
	                     "\"bot-1\"") != NULL);
	T_ASSERT(
	        strstr(raw, "{\"code\":5040,\"msg\":\"deadline exceeded\"}") !=
	        NULL);
	T_ASSERT(strstr(raw, "event:done") != NULL);
	http_close(fd);
}

/* Errors before any event are JSON, as for v1; a 200 reply is JSON. */
static void
t_v3_json(void)
{
	struct resp r;
	int fd = http_connect();

	ngot = 0;
	http_send(fd, v3_req("POST", "/v3/chat", "tok", v3body));
	pump(3000, &ngot, 1);
	reply(stor, got[0].reqid, 409, 4016, "conversation busy", "", 0);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	expect_error(&r, 409, 4016, "conversation busy");
	/* stream false: the chat object, in JSON. */
	ngot = 0;
	http_send(fd, v3_req("POST", "/v3/chat", "tok",
	                     "{\"bot_id\":\"b\",\"user_id\":\"u\","
	                     "\"additional_messages\":[{\"role\":\"user\","
	                     "\"content\":\"q\"}]}"));
	pump(3000, &ngot, 1);
	T_EQ_INT(got[0].stream, 0);
	reply(stor, got[0].reqid, 200, 0, "", "{\"status\":\"in_progress\"}",
	      0);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	T_EQ_INT(r.status, 200);
	T_EQ_STR(r.body, "{\"code\":0,\"msg\":\"\",\"data\":{\"status\":"
	                 "\"in_progress\"}}");
	http_close(fd);
}

static void
t_v3_bad(void)
{
	static const struct {
		const char *method, *path, *token, *body;
		int status;
		long code;
		const char *msg;
	} cases[] = {
	        {"POST", "/v3/chat", NULL, v3body, 401, 4100, "missing token"},
	        {"GET", "/v3/chat", "t", "", 405, 4000, "method not allowed"},
	        {"POST", "/v3/chat", "t", "{not json", 400, 4000,
	         "invalid JSON body"},
	        {"POST", "/v3/chat", "t",
	         "{\"bot_id\":\"b\",\"user_id\":\"u\",\"stream\":\"yes\"}",
	         400, 4000, "stream must be a boolean"},
	        {"POST", "/v3/chat", "t",
	         "{\"bot_id\":\"b\",\"user_id\":\"u\",\"additional_messages\":"
	         "[{\"role\":\"robot\",\"content\":\"x\"}]}",
	         400, 4000,
	         "additional_messages[0].role must be \\\"user\\\" or "
	         "\\\"assistant\\\""},
	        {"POST", "/v3/chat?conversation_id=abc", "t", v3body, 400,
	         4000, "conversation_id must be 1 to 32 decimal digits"},
	        {"GET", "/v3/chat/retrieve?conversation_id=1", "t", "", 400,
	         4000, "missing chat_id"},
	        {"POST", "/v3/chat/retrieve?conversation_id=x&chat_id=1", "t",
	         "", 400, 4000,
	         "conversation_id must be 1 to 32 decimal digits"},
	        {"GET", "/v3/chat/message/list?chat_id=1", "t", "", 400, 4000,
	         "missing conversation_id"},
	        {"GET", "/v3/chat/message/list?chat_id=1&conversation_id=2",
	         NULL, "", 401, 4100, "missing token"},
	        {"PUT", "/v3/chat/message/list", "t", "", 405, 4000,
	         "method not allowed"},
	        {"GET", "/v3/chat/cancel?conversation_id=1&chat_id=2", "t", "",
	         405, 4000, "method not allowed"},
	        {"POST", "/v3/chat/cancel", "t", "{\"conversation_id\":\"1\"}",
	         400, 4000, "missing chat_id"},
	        {"POST", "/v3/chat/cancel", "t", "nope", 400, 4000,
	         "invalid JSON body"},
	};
	struct resp r;
	size_t i;
	int fd = http_connect();

	ngot = 0;
	for (i = 0; i < nitems(cases); i++) {
		http_send(fd, v3_req(cases[i].method, cases[i].path,
		                     cases[i].token, cases[i].body));
		if (http_read(fd, &r, 3000) == -1)
			T_FAIL("case %zu: no answer", i);
		expect_error(&r, cases[i].status, cases[i].code, cases[i].msg);
	}
	http_close(fd);
	/* Nothing reached auth. */
	pump(100, NULL, 0);
	T_EQ_INT(ngot, 0);
}

static void
t_v3_ids(void)
{
	static const struct {
		const char *method, *path, *body, *route;
	} cases[] = {
	        {"POST", "/v3/chat/retrieve?conversation_id=11&chat_id=12", "",
	         "v3.retrieve"},
	        {"GET", "/v3/chat/retrieve?chat_id=12&conversation_id=11", "",
	         "v3.retrieve"},
	        {"GET", "/v3/chat/message/list?conversation_id=11&chat_id=12",
	         "", "v3.list"},
	        {"POST", "/v3/chat/message/list?conversation_id=11&chat_id=12",
	         "", "v3.list"},
	        {"POST", "/v3/chat/cancel",
	         "{\"conversation_id\":\"11\",\"chat_id\":\"12\"}",
	         "v3.cancel"},
	        {"POST", "/v3/chat/cancel?conversation_id=11&chat_id=12", "",
	         "v3.cancel"},
	        /* A base URL with a trailing slash (coze-sdk.md 9.8). */
	        {"POST", "//v3/chat/retrieve?conversation_id=11&chat_id=12",
	         "", "v3.retrieve"},
	};
	struct resp r;
	size_t i;
	int fd = http_connect();

	for (i = 0; i < nitems(cases); i++) {
		ngot = 0;
		http_send(fd, v3_req(cases[i].method, cases[i].path, "k",
		                     cases[i].body));
		pump(3000, &ngot, 1);
		T_EQ_INT(ngot, 1);
		T_EQ_STR(got[0].route, cases[i].route);
		T_EQ_STR(got[0].history_id, "11");
		T_EQ_STR(got[0].chat_id, "12");
		T_EQ_STR(got[0].token, "k");
		T_EQ_STR(got[0].reply_to, "edge");
		reply(stor, got[0].reqid, 200, 0, "", "[{\"id\":\"1\"}]", 0);
		T_EQ_INT(http_read(fd, &r, 3000), 0);
		T_EQ_INT(r.status, 200);
		T_EQ_STR(r.body, "{\"code\":0,\"msg\":\"\",\"data\":[{\"id\":"
		                 "\"1\"}]}");
	}
	/* Not found, from storage. */
	ngot = 0;
	http_send(fd, v3_req("GET", cases[0].path, "k", ""));
	pump(3000, &ngot, 1);
	reply(stor, got[0].reqid, 404, 4201, "chat not found", "", 0);
	T_EQ_INT(http_read(fd, &r, 3000), 0);
	expect_error(&r, 404, 4201, "chat not found");
	http_close(fd);
	/* A client of a retrieve that leaves is no CLIENT_GONE. */
	fd = http_connect();
	ngot = 0;
	http_send(fd, v3_req("GET", cases[0].path, "k", ""));
	pump(3000, &ngot, 1);
	http_close(fd);
	pump(700, NULL, 0);
	reply(stor, got[0].reqid, 200, 0, "", "{}", 0);
	pump(100, NULL, 0);
	T_EQ_INT(ngone, 0);
}

/* The client of a v3 chat leaves: the dispatcher hears of it, before
 * the first event and while streaming. */
static void
t_v3_client_gone(void)
{
	char id[COZE_ID_LEN + 1];
	int fd;

	ngone = 0;
	v3_start(&fd, v3body);
	coze_chat_id_of(MSTR(got[0].reqid), id);
	http_close(fd);
	pump(2000, &ngone, 1);
	T_EQ_INT(ngone, 1);
	T_EQ_STR(gone[0].reqid, got[0].reqid);
	T_EQ_STR(gone[0].route, "v3.chat");
	T_EQ_STR(gone[0].chat_id, id);
	T_EQ_STR(gone[0].history_id, "7777");
	T_EQ_STR(gone[0].sender, "edge");
	T_EQ_STR(gone[0].traceparent, got[0].traceparent);
	/* Its late answer is dropped. */
	event(stor, got[0].reqid, ev_created, 0);

	ngone = 0;
	v3_start(&fd, v3body);
	event(stor, got[0].reqid, ev_created, 0);
	T_EQ_INT(read_until(fd, ev_created, 3000), 0);
	shutdown(fd, SHUT_RDWR);
	http_close(fd);
	pump(2000, &ngone, 1);
	T_EQ_INT(ngone, 1);
	T_EQ_STR(gone[0].reqid, got[0].reqid);
	/* Once only, even as events keep coming. */
	event(stor, got[0].reqid, ev_delta, 0);
	event(stor, got[0].reqid, ev_end, 1);
	pump(700, NULL, 0);
	T_EQ_INT(ngone, 1);
}

/* A client that does not read: past 1 MiB owed, dropped (and reported
 * gone); the edge goes on serving. */
static void
t_v3_slow_client(void)
{
	static char big[256 << 10];
	struct resp r;
	int fd, i, small = 4096;
	struct sockaddr_in a = {0};

	ngone = 0;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	T_ASSERT(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small,
	                    sizeof(small)) == 0);
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	T_ASSERT(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	ngot = 0;
	http_send(fd, v3_req("POST", "/v3/chat", "tok", v3body));
	pump(3000, &ngot, 1);
	T_EQ_INT(ngot, 1);
	memset(big, 'x', sizeof(big) - 1);
	memcpy(big, "event:conversation.message.delta\ndata:", 38);
	/* The edge's socket buffer takes up to tcp_wmem's maximum (4 MiB
	 * here) before anything waits in its queue: up to 64 MiB. */
	for (i = 0; i < 256 && ngone == 0; i++) {
		event(stor, got[0].reqid, big, 0);
		pump(20, NULL, 0);
	}
	pump(2000, &ngone, 1);
	T_EQ_INT(ngone, 1);
	T_EQ_STR(gone[0].reqid, got[0].reqid);
	close(fd);
	get("/healthz", &r);
	T_EQ_INT(r.status, 200);
}

static void
t_bad_messages(void)
{
	struct resp r;
	struct ipc_ack ack = {1, 2};
	struct run_done rd = {.status = 200, .upstream = MSTR_NULL};
	struct msg_head h = {MSTR_LIT("x"), MSTR_NULL, 0, MSTR_LIT("")};

	/* An undecodable CHAT_REPLY, a message the edge never gets, and a
	 * type nobody knows: counted, logged once each, never fatal. */
	T_EQ_INT(
	        ipc_send(auth, "edge", MSG_CHAT_REPLY, &h, ipc_ack_pack, &ack),
	        0);
	T_EQ_INT(msg_send_run_done(auth, "edge", &h, &rd), 0);
	T_EQ_INT(ipc_send(auth, "edge", 0x7777, &h, ipc_ack_pack, &ack), 0);
	pump(300, NULL, 0);
	get("/healthz", &r);
	T_EQ_INT(r.status, 200);
	T_ASSERT(log_has("undecodable body: type 0x0205 from auth"));
	T_ASSERT(log_has("route not allowed: type 0x0204 from auth"));
	T_ASSERT(log_has("unknown sender or type: type 0x7777 from auth"));
}

static void
t_stop(void)
{
	int st;
	uint64_t t0 = now_mono_ms();

	kill(child, SIGTERM);
	T_EQ_INT(waitpid(child, &st, 0), child);
	child = -1;
	T_ASSERT(WIFEXITED(st));
	T_EQ_INT(WEXITSTATUS(st), 0);
	if (now_mono_ms() - t0 > 3000)
		T_FAIL("exit took %llu ms",
		       (unsigned long long)(now_mono_ms() - t0));
	T_ASSERT(log_has("stopped"));
}

static void
cleanup(void)
{
	char cmd[300];

	if (child > 0) {
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
	}
	if (getenv("TROUPE_TEST_KEEP") == NULL &&
	    strncmp(dir, "/tmp/troupe-edge-test-", 22) == 0) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		(void)system(cmd);
	}
}

static void
setup(void)
{
	char err[256], mine[300];
	FILE *f;

	signal(SIGPIPE, SIG_IGN);
	snprintf(dir, sizeof(dir), "/tmp/troupe-edge-test-XXXXXX");
	T_ASSERT(mkdtemp(dir) != NULL);
	atexit(cleanup);
	snprintf(cfgpath, sizeof(cfgpath), "%s/troupe.conf", dir);
	port = free_port();
	write_conf(NULL);
	/* Start the child before this process touches nng (PITFALLS). */
	child = start();
	snprintf(mine, sizeof(mine), "%s/test.conf", dir);
	T_ASSERT((f = fopen(mine, "w")) != NULL);
	fprintf(f, "[ipc]\nrundir = %s\n", dir);
	fclose(f);
	if (conf_load(mine, 0, err, sizeof(err)) == -1)
		T_FAIL("conf_load: %s", err);
}

static void
t_all(void)
{
	setup();
	t_readyz();
	t_chat_ok();
	t_chat_errors();
	t_deadline_then_late();
	t_client_gone();
	t_pipelined();
	t_v3_stream();
	t_v3_stream_error();
	t_v3_json();
	t_v3_bad();
	t_v3_ids();
	t_v3_client_gone();
	t_v3_slow_client();
	t_bad_messages();
	t_stop();
}

T_TESTS = {
        {"service", t_all},
        {NULL, NULL},
};
T_MAIN
