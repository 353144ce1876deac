/* SPDX-License-Identifier: ISC */
/*
 * Tests of the troupe-auth program through its mailbox: this binary plays
 * the edge and the dispatcher (two real ipc mailboxes in a temporary
 * rundir), starts troupe-auth (TROUPE_AUTH_BIN) with a config of its own,
 * and checks what comes back: CHAT_RUN with the token emptied and sub set,
 * CHAT_REPLY 401/4100 with the reason, 504/5040 past the deadline, 503/5030
 * when the dispatcher's backlog is full, reload keeping or replacing the
 * secret, the credential taking precedence, and refusing to start without
 * a usable secret.  Python's harness cannot speak nng, hence C here.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "conf.h"
#include "ipc.h"
#include "proto.h"
#include "t.h"
#include "util.h"

#define SECRET "auth-service-test-secret-0123456789abcdef"
#define SECRET2 "auth-service-test-second-secret-0123456789"
#define CRED "auth-service-test-credential-0123456789abcd"

static char dir[256]; /* the temporary rundir and config */
static char cfgpath[300];
static pid_t child = -1;
static struct ipc *edge, *disp;

/* What came back, copied out of the handlers. */
#define NGOT 64
struct got {
	uint16_t type;
	char reqid[64];
	char traceparent[64];
	char reply_to[64];
	uint64_t deadline_ms;
	uint64_t status;
	int64_t code;
	char msg[128];
	char data[64];
	uint64_t retry_after;
	char token[64];
	char sub[64];
	char bot_id[64];
	char query[64];
	uint64_t received_ms;
};
static struct got replies[NGOT], runs[NGOT];
static int nreplies, nruns, nany; /* nany: either kind */

static void
cp(char *d, size_t n, struct mstr s)
{
	snprintf(d, n, "%.*s", (int)s.n, s.p);
}

static void
head(struct got *g, const struct msg *m)
{
	memset(g, 0, sizeof(*g));
	g->type = m->type;
	cp(g->reqid, sizeof(g->reqid), m->reqid);
	cp(g->traceparent, sizeof(g->traceparent), m->traceparent);
	cp(g->reply_to, sizeof(g->reply_to), m->reply_to);
	g->deadline_ms = m->deadline_ms;
}

static void
on_edge(void *arg, const struct msg *m)
{
	struct chat_reply r;
	struct got *g;

	(void)arg;
	if (nreplies == NGOT || m->type != MSG_CHAT_REPLY ||
	    chat_reply_unpack(m, &r) == -1)
		return;
	nany++;
	g = &replies[nreplies++];
	head(g, m);
	g->status = r.status;
	g->code = r.code;
	cp(g->msg, sizeof(g->msg), r.msg);
	cp(g->data, sizeof(g->data), r.data);
	g->retry_after = r.retry_after;
}

static void
on_disp(void *arg, const struct msg *m)
{
	struct chat_request q;
	struct got *g;

	(void)arg;
	if (nruns == NGOT || m->type != MSG_CHAT_RUN ||
	    chat_request_unpack(m, &q) == -1)
		return;
	nany++;
	g = &runs[nruns++];
	head(g, m);
	cp(g->token, sizeof(g->token), q.token);
	cp(g->sub, sizeof(g->sub), q.sub);
	cp(g->bot_id, sizeof(g->bot_id), q.bot_id);
	cp(g->query, sizeof(g->query), q.query);
	g->received_ms = q.received_ms;
}

/* Run both mailboxes for up to ms, or until *done >= want. */
static void
pump(int ms, const int *done, int want)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms, tick = 0;

	while (now_mono_ms() < end && (done == NULL || *done < want)) {
		struct pollfd p[2];
		int n = 0;

		p[n++] = (struct pollfd){ipc_fd(edge), POLLIN, 0};
		if (disp)
			p[n++] = (struct pollfd){ipc_fd(disp), POLLIN, 0};
		(void)poll(p, n, 10);
		ipc_process(edge);
		if (disp)
			ipc_process(disp);
		if (now_mono_ms() >= tick) {
			ipc_tick(edge);
			if (disp)
				ipc_tick(disp);
			tick = now_mono_ms() + IPC_TICK_MS;
		}
	}
}

static size_t
b64url(char *out, const void *in, size_t n)
{
	static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	                        "abcdefghijklmnopqrstuvwxyz0123456789-_";
	const unsigned char *p = in;
	size_t o = 0, i;

	for (i = 0; i + 2 < n; i += 3) {
		out[o++] = a[p[i] >> 2];
		out[o++] = a[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
		out[o++] = a[((p[i + 1] & 15) << 2) | (p[i + 2] >> 6)];
		out[o++] = a[p[i + 2] & 63];
	}
	if (n - i == 1) {
		out[o++] = a[p[i] >> 2];
		out[o++] = a[(p[i] & 3) << 4];
	} else if (n - i == 2) {
		out[o++] = a[p[i] >> 2];
		out[o++] = a[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
		out[o++] = a[(p[i + 1] & 15) << 2];
	}
	out[o] = '\0';
	return (o);
}

/* An HS256 token for sub, expiring ttl seconds from now, signed with key. */
static char *
token(const char *key, const char *sub, long ttl)
{
	static char t[1024];
	char pay[256];
	unsigned char mac[32];
	unsigned int ml = 0;
	size_t o;

	snprintf(pay, sizeof(pay),
	         "{\"sub\":\"%s\",\"aud\":\"troupe\","
	         "\"exp\":%lld}",
	         sub, (long long)time(NULL) + ttl);
	o = b64url(t, "{\"alg\":\"HS256\",\"typ\":\"JWT\"}", 27);
	t[o++] = '.';
	o += b64url(t + o, pay, strlen(pay));
	HMAC(EVP_sha256(), key, (int)strlen(key), (unsigned char *)t, o, mac,
	     &ml);
	t[o++] = '.';
	b64url(t + o, mac, ml);
	return (t);
}

/* CHAT_REQUEST from "edge" to "auth". */
static void
send_req(const char *reqid, const char *tok, uint64_t deadline_ms)
{
	struct chat_request q = {
	        .route = MSTR_LIT("v1.chat"),
	        .token = MSTR(tok),
	        .sub = MSTR_LIT("forged"),
	        .bot_id = MSTR_LIT("bot-1"),
	        .user_id = MSTR_LIT("user-1"),
	        .query = MSTR_LIT("hello"),
	        .history_id = MSTR_NULL,
	        .received_ms = 1234,
	};
	struct msg_head h = {
	        .reqid = MSTR(reqid),
	        .traceparent = MSTR_LIT("00-0af7651916cd43dd8448eb211c80319c-"
	                                "b7ad6b7169203331-01"),
	        .deadline_ms = deadline_ms,
	        .reply_to = MSTR_LIT("edge"),
	};

	T_EQ_INT(msg_send_chat_request(edge, "auth", &h, &q), 0);
}

static const struct got *
find(const struct got *v, int n, const char *reqid)
{
	for (int i = 0; i < n; i++)
		if (strcmp(v[i].reqid, reqid) == 0)
			return (&v[i]);
	return (NULL);
}

static void
write_conf(const char *secret, const char *extra)
{
	FILE *f;

	T_ASSERT((f = fopen(cfgpath, "w")) != NULL);
	fprintf(f, "[ipc]\nrundir = %s\nmax_backlog = 16\n\n[auth]\n", dir);
	if (secret)
		fprintf(f, "jwt_secret = %s\n", secret);
	fprintf(f, "audience = troupe\n%s", extra ? extra : "");
	fclose(f);
}

/* Start troupe-auth with cfgpath; its stderr goes to dir/auth.log. */
static pid_t
start(const char *credentials_dir)
{
	char log[300];
	pid_t pid;

	snprintf(log, sizeof(log), "%s/auth.log", dir);
	if ((pid = fork()) == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fd, 2);
		unsetenv("NOTIFY_SOCKET");
		unsetenv("TROUPE_AUTH_JWT_SECRET");
		if (credentials_dir)
			setenv("CREDENTIALS_DIRECTORY", credentials_dir, 1);
		else
			unsetenv("CREDENTIALS_DIRECTORY");
		execl(TROUPE_AUTH_BIN, "troupe-auth", "-c", cfgpath, "-d",
		      (char *)NULL);
		_exit(127);
	}
	T_ASSERT(pid > 0);
	return (pid);
}

static void
stop(pid_t pid)
{
	int st;

	kill(pid, SIGTERM);
	waitpid(pid, &st, 0);
}

/* Whether the auth log holds s. */
static int
log_has(const char *s)
{
	char path[300], buf[65536];
	size_t n;
	FILE *f;

	snprintf(path, sizeof(path), "%s/auth.log", dir);
	if ((f = fopen(path, "r")) == NULL)
		return (0);
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	return (strstr(buf, s) != NULL);
}

static void
t_flow(void)
{
	const struct got *g;
	char id[32];
	int i;

	/* No dispatcher yet: 16 runs wait in the backlog, the rest 503. */
	for (i = 0; i < 20; i++) {
		snprintf(id, sizeof(id), "busy-%d", i);
		send_req(id, token(SECRET, "alice", 600), 0);
	}
	pump(5000, &nreplies, 4);
	T_EQ_INT(nreplies, 4);
	for (i = 0; i < 4; i++) {
		T_EQ_INT(replies[i].status, 503);
		T_EQ_INT(replies[i].code, 5030);
		T_EQ_INT(replies[i].retry_after, 1);
		T_EQ_STR(replies[i].data, "");
	}
	/* The dispatcher comes up and gets the 16 queued runs. */
	{
		char err[256];

		disp = ipc_open("dispatcher", on_disp, NULL, err, sizeof(err));
		if (disp == NULL)
			T_FAIL("ipc_open dispatcher: %s", err);
	}
	pump(5000, &nruns, 16);
	T_EQ_INT(nruns, 16);
	/* A good token: CHAT_RUN, token emptied, sub from the token.  Until
	 * the dispatcher's acknowledgements reach auth its backlog is still
	 * full: retry on 503, as a client would. */
	for (i = 0; i < 50; i++) {
		nreplies = nruns = nany = 0;
		send_req("good", token(SECRET, "alice", 600),
		         now_wall_ms() + 30000);
		pump(3000, &nany, 1);
		if (nruns == 1 || nreplies == 0 || replies[0].status != 503)
			break;
		pump(100, NULL, 0);
	}
	T_EQ_INT(nreplies, 0);
	T_EQ_INT(nruns, 1);
	g = &runs[0];
	T_EQ_STR(g->reqid, "good");
	T_EQ_STR(g->token, "");
	T_EQ_STR(g->sub, "alice");
	T_EQ_STR(g->reply_to, "edge");
	T_EQ_STR(g->bot_id, "bot-1");
	T_EQ_STR(g->query, "hello");
	T_EQ_INT(g->received_ms, 1234);
	T_EQ_STR(g->traceparent,
	         "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
	T_ASSERT(g->deadline_ms > now_wall_ms());

	/* Refusals go to reply_to with the exact reason. */
	send_req("expired", token(SECRET, "alice", -3600), 0);
	send_req("missing", "", 0);
	send_req("badsig", token(SECRET2, "alice", 600), 0);
	send_req("late", token(SECRET, "alice", 600), now_wall_ms() - 1);
	send_req("none", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.", 0);
	pump(3000, &nreplies, 5);
	T_EQ_INT(nreplies, 5);
	T_EQ_INT(nruns, 1);
	T_ASSERT((g = find(replies, nreplies, "expired")) != NULL);
	T_EQ_INT(g->status, 401);
	T_EQ_INT(g->code, 4100);
	T_EQ_STR(g->msg, "token expired");
	T_EQ_STR(g->data, "");
	T_EQ_INT(g->retry_after, 0);
	T_EQ_STR(g->traceparent,
	         "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
	T_ASSERT((g = find(replies, nreplies, "missing")) != NULL);
	T_EQ_INT(g->code, 4100);
	T_EQ_STR(g->msg, "missing token");
	T_ASSERT((g = find(replies, nreplies, "badsig")) != NULL);
	T_EQ_STR(g->msg, "bad signature");
	T_ASSERT((g = find(replies, nreplies, "none")) != NULL);
	T_EQ_STR(g->msg, "algorithm not allowed");
	T_ASSERT((g = find(replies, nreplies, "late")) != NULL);
	T_EQ_INT(g->status, 504);
	T_EQ_INT(g->code, 5040);
	T_EQ_STR(g->msg, "deadline exceeded");

	/* A message the edge may not send, and an undecodable body, are
	 * dropped and logged once; the service goes on. */
	{
		struct run_done rd = {200, MSTR_NULL, 0, 0};
		struct ipc_ack ack = {1, 2};
		struct msg_head h = {MSTR_LIT("x"), MSTR_NULL, 0,
		                     MSTR_LIT("edge")};

		T_EQ_INT(msg_send_run_done(edge, "auth", &h, &rd), 0);
		T_EQ_INT(msg_send_run_done(edge, "auth", &h, &rd), 0);
		T_EQ_INT(ipc_send(edge, "auth", MSG_CHAT_REQUEST, &h,
		                  ipc_ack_pack, &ack),
		         0);
		T_EQ_INT(
		        ipc_send(edge, "auth", 0x7777, &h, ipc_ack_pack, &ack),
		        0);
	}
	nreplies = nruns = 0;
	send_req("after", token(SECRET, "bob", 600), 0);
	pump(3000, &nruns, 1);
	T_EQ_INT(nruns, 1);
	T_EQ_INT(nreplies, 0);
	T_EQ_STR(runs[0].sub, "bob");
	T_ASSERT(log_has("RUN_DONE (0x0204) from edge not handled here"));
	T_ASSERT(log_has("undecodable CHAT_REQUEST from edge"));
	T_ASSERT(log_has("unknown message (0x7777)"));

	/* Reload: a short secret is refused and the old one kept... */
	write_conf("short", NULL);
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	T_ASSERT(log_has("keeping the previous token settings: JWT secret "
	                 "shorter than 32 bytes"));
	nreplies = nruns = 0;
	send_req("kept", token(SECRET, "carol", 600), 0);
	pump(3000, &nruns, 1);
	T_EQ_INT(nruns, 1);
	/* ...a good one replaces it. */
	write_conf(SECRET2, NULL);
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	nreplies = nruns = 0;
	send_req("old", token(SECRET, "carol", 600), 0);
	send_req("new", token(SECRET2, "dave", 600), 0);
	pump(3000, &nreplies, 1);
	pump(3000, &nruns, 1);
	T_EQ_INT(nreplies, 1);
	T_EQ_STR(replies[0].reqid, "old");
	T_EQ_STR(replies[0].msg, "bad signature");
	T_EQ_INT(nruns, 1);
	T_EQ_STR(runs[0].sub, "dave");
}

static void
t_credential(void)
{
	char cdir[300], p[320];
	FILE *f;
	pid_t pid;

	/* The credential wins over [auth] jwt_secret. */
	stop(child);
	child = -1;
	snprintf(cdir, sizeof(cdir), "%s/creds", dir);
	T_ASSERT(mkdir(cdir, 0700) == 0 || errno == EEXIST);
	snprintf(p, sizeof(p), "%s/jwt-secret", cdir);
	T_ASSERT((f = fopen(p, "w")) != NULL);
	fprintf(f, "%s\n", CRED);
	fclose(f);
	write_conf(SECRET, NULL);
	pid = start(cdir);
	nreplies = nruns = 0;
	send_req("cfg", token(SECRET, "erin", 600), 0);
	send_req("cred", token(CRED, "frank", 600), 0);
	pump(5000, &nreplies, 1);
	pump(3000, &nruns, 1);
	T_EQ_INT(nreplies, 1);
	T_EQ_STR(replies[0].reqid, "cfg");
	T_EQ_STR(replies[0].msg, "bad signature");
	T_EQ_INT(nruns, 1);
	T_EQ_STR(runs[0].sub, "frank");
	stop(pid);
}

/* Exit status of troupe-auth started on the current config. */
static int
start_status(void)
{
	pid_t pid = start(NULL);
	int st;

	T_EQ_INT(waitpid(pid, &st, 0), pid);
	T_ASSERT(WIFEXITED(st));
	return (WEXITSTATUS(st));
}

static void
t_refuse_start(void)
{
	write_conf(NULL, NULL);
	T_EQ_INT(start_status(), 1);
	T_ASSERT(log_has("cannot check tokens: no JWT secret (credential "
	                 "jwt-secret or [auth] jwt_secret)"));
	write_conf("0123456789012345678901234567890", NULL);
	T_EQ_INT(start_status(), 1);
	T_ASSERT(log_has("cannot check tokens: JWT secret shorter than 32 "
	                 "bytes"));
	write_conf(SECRET, "algorithm = none\n");
	T_EQ_INT(start_status(), 1);
	T_ASSERT(log_has("cannot check tokens: algorithm must be HS256, "
	                 "HS384 or HS512"));
	write_conf(SECRET, "leeway_s = soon\n");
	T_EQ_INT(start_status(), 1);
	T_ASSERT(log_has("cannot check tokens: "));
}

static void
cleanup(void)
{
	char cmd[300];

	if (child > 0)
		stop(child);
	/* TROUPE_TEST_KEEP=1 keeps the directory (and auth.log). */
	if (getenv("TROUPE_TEST_KEEP") == NULL && dir[0] != '\0' &&
	    strncmp(dir, "/tmp/troupe-auth-test-", 22) == 0) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		(void)system(cmd);
	}
}

static void
setup(void)
{
	char err[256], mine[300];
	FILE *f;

	snprintf(dir, sizeof(dir), "/tmp/troupe-auth-test-XXXXXX");
	T_ASSERT(mkdtemp(dir) != NULL);
	atexit(cleanup);
	snprintf(cfgpath, sizeof(cfgpath), "%s/troupe.conf", dir);
	write_conf(SECRET, NULL);
	/* Start the child before this process touches nng (PITFALLS). */
	child = start(NULL);
	/* Ours: the same rundir, but room for all we send. */
	snprintf(mine, sizeof(mine), "%s/test.conf", dir);
	T_ASSERT((f = fopen(mine, "w")) != NULL);
	fprintf(f, "[ipc]\nrundir = %s\n", dir);
	fclose(f);
	if (conf_load(mine, 0, err, sizeof(err)) == -1)
		T_FAIL("conf_load: %s", err);
	if ((edge = ipc_open("edge", on_edge, NULL, err, sizeof(err))) == NULL)
		T_FAIL("ipc_open edge: %s", err);
}

static void
t_all(void)
{
	setup();
	t_flow();
	t_credential();
	t_refuse_start();
}

T_TESTS = {
        {"service", t_all},
        {NULL, NULL},
};
T_MAIN
