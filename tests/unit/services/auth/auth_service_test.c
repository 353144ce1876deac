/* SPDX-License-Identifier: ISC */
/*
 * Tests of the troupe-auth program through its mailbox: this binary plays
 * the edge and the dispatcher (two real ipc mailboxes in a temporary
 * rundir), starts troupe-auth (TROUPE_AUTH_BIN) with a config of its own,
 * and checks what comes back: CHAT_RUN with the token emptied and sub set,
 * CHAT_REPLY 401/4100 with the reason, 504/5040 past the deadline, 503/5030
 * when the dispatcher's backlog is full, reload keeping or replacing the
 * secret, the credential taking precedence, and refusing to start without
 * a usable secret.  Then the v3 routes and API keys, with this binary
 * playing storage too: one KEY_CHECK per key hash for all the requests
 * parked on it, the cache (valid, unknown, expiry), scopes (403/4101),
 * storage refusing or silent (503/5030), the park bound, and where each
 * route goes (CHAT_RUN, CHAT_CANCEL, CHAT_QUERY).  Then the inbound
 * limits ([limits]): LIMIT_CHECK, parking, 429 with the RateLimit fields,
 * on_redis_down open and closed, shadow mode.  Python's harness
 * cannot speak nng, hence C here.
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
static struct ipc *edge, *disp, *stor;

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
	char route[32];
	char scopes[64];
	char chat_id[32];
	char hash[80]; /* KEY_CHECK */
	uint64_t received_ms;
	char key[128]; /* LIMIT_CHECK */
	uint64_t limit, window_ms, burst, cost;
	char rl[96], rlp[96]; /* CHAT_REPLY's RateLimit fields */
};
static struct got replies[NGOT], runs[NGOT], checks[NGOT], queries[NGOT];
static struct got lchecks[NGOT];
static int nreplies, nruns, nany; /* nany: either kind */
static int nchecks, nqueries;     /* what storage got */
static int nlchecks;

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
	cp(g->rl, sizeof(g->rl), r.ratelimit);
	cp(g->rlp, sizeof(g->rlp), r.ratelimit_policy);
}

static void
on_disp(void *arg, const struct msg *m)
{
	struct chat_request q;
	struct got *g;

	(void)arg;
	if (nruns == NGOT ||
	    (m->type != MSG_CHAT_RUN && m->type != MSG_CHAT_CANCEL) ||
	    chat_request_unpack(m, &q) == -1)
		return;
	nany++;
	g = &runs[nruns++];
	head(g, m);
	cp(g->token, sizeof(g->token), q.token);
	cp(g->sub, sizeof(g->sub), q.sub);
	cp(g->bot_id, sizeof(g->bot_id), q.bot_id);
	cp(g->query, sizeof(g->query), q.query);
	cp(g->route, sizeof(g->route), q.route);
	cp(g->scopes, sizeof(g->scopes), q.scopes);
	cp(g->chat_id, sizeof(g->chat_id), q.chat_id);
	g->received_ms = q.received_ms;
}

/* Storage: KEY_CHECK and CHAT_QUERY, recorded. */
static void
on_stor(void *arg, const struct msg *m)
{
	struct chat_request q;
	struct key_check kc;
	struct limit_check lc;
	struct got *g;

	(void)arg;
	if (m->type == MSG_LIMIT_CHECK && nlchecks < NGOT &&
	    limit_check_unpack(m, &lc) == 0) {
		g = &lchecks[nlchecks++];
		head(g, m);
		cp(g->key, sizeof(g->key), lc.key);
		g->limit = lc.limit;
		g->window_ms = lc.window_ms;
		g->burst = lc.burst;
		g->cost = lc.cost;
	} else if (m->type == MSG_KEY_CHECK && nchecks < NGOT &&
	           key_check_unpack(m, &kc) == 0) {
		g = &checks[nchecks++];
		head(g, m);
		cp(g->hash, sizeof(g->hash), kc.hash);
	} else if (m->type == MSG_CHAT_QUERY && nqueries < NGOT &&
	           chat_request_unpack(m, &q) == 0) {
		nany++;
		g = &queries[nqueries++];
		head(g, m);
		cp(g->token, sizeof(g->token), q.token);
		cp(g->sub, sizeof(g->sub), q.sub);
		cp(g->route, sizeof(g->route), q.route);
		cp(g->scopes, sizeof(g->scopes), q.scopes);
		cp(g->chat_id, sizeof(g->chat_id), q.chat_id);
	}
}

/* Run both mailboxes for up to ms, or until *done >= want. */
static void
pump(int ms, const int *done, int want)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms, tick = 0;

	while (now_mono_ms() < end && (done == NULL || *done < want)) {
		struct pollfd p[3];
		int n = 0;

		p[n++] = (struct pollfd){ipc_fd(edge), POLLIN, 0};
		if (disp)
			p[n++] = (struct pollfd){ipc_fd(disp), POLLIN, 0};
		if (stor)
			p[n++] = (struct pollfd){ipc_fd(stor), POLLIN, 0};
		(void)poll(p, n, 10);
		ipc_process(edge);
		if (disp)
			ipc_process(disp);
		if (stor)
			ipc_process(stor);
		if (now_mono_ms() >= tick) {
			ipc_tick(edge);
			if (disp)
				ipc_tick(disp);
			if (stor)
				ipc_tick(stor);
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

/* CHAT_REQUEST for route from "edge" to "auth". */
static void
send_route(const char *reqid, const char *route, const char *tok,
           uint64_t deadline_ms)
{
	struct chat_request q = {
	        .route = MSTR(route),
	        .token = MSTR(tok),
	        .sub = MSTR_LIT("forged"),
	        .bot_id = MSTR_LIT("bot-1"),
	        .user_id = MSTR_LIT("user-1"),
	        .query = MSTR_LIT("hello"),
	        .history_id = MSTR_LIT("7300000000000000001"),
	        .received_ms = 1234,
	        .chat_id = MSTR_LIT("7300000000000000002"),
	        .stream = 1,
	        .messages = MSTR_LIT("[]"),
	        .scopes = MSTR_LIT("*"),
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
		struct run_done rd = {.status = 200, .upstream = MSTR_NULL};
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

	/* The plugin webhook carries no token (the edge checked its
	 * signature): a CHAT_RUN with sub "webhook", whatever it says. */
	nreplies = nruns = 0;
	send_route("wh", "webhook.execute", "", 0);
	send_route("wh-tok", "webhook.execute", "garbage", 0);
	pump(3000, &nruns, 2);
	T_EQ_INT(nruns, 2);
	T_EQ_INT(nreplies, 0);
	T_ASSERT((g = find(runs, nruns, "wh")) != NULL);
	T_EQ_STR(g->sub, "webhook");
	T_EQ_STR(g->token, "");
	T_EQ_STR(g->reply_to, "edge");

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

/* KEY_REPLY from "storage" to "auth" for the hash of key. */
static void
send_key_reply(const char *hash, uint64_t status, const char *sub,
               const char *scopes)
{
	struct key_reply r = {
	        .hash = MSTR(hash),
	        .status = status,
	        .sub = MSTR(sub),
	        .scopes = MSTR(scopes),
	};
	struct msg_head h = {MSTR_LIT("check"), MSTR_NULL, 0, MSTR_NULL};

	T_EQ_INT(msg_send_key_reply(stor, "auth", &h, &r), 0);
}

static const char *
sha256_hex(const char *s)
{
	static char out[65];
	unsigned char md[32];
	unsigned int n = 0;

	T_ASSERT(EVP_Digest(s, strlen(s), md, &n, EVP_sha256(), NULL) == 1);
	T_EQ_INT(n, 32);
	for (unsigned i = 0; i < n; i++)
		snprintf(out + 2 * i, 3, "%02x", md[i]);
	return (out);
}

#define K1 "pat_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL"
#define K2 "pat_K2xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
#define K3 "pat_K3xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
#define K4 "pat_K4xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
#define TP "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

static void
reset_counts(void)
{
	nreplies = nruns = nany = nchecks = nqueries = nlchecks = 0;
}

static void
t_keys(void)
{
	const struct got *g;
	char err[256], id[32];
	uint64_t t0;
	int i;

	write_conf(SECRET2, "key_cache_ms = 1000\n"
	                    "key_unknown_cache_ms = 600\n"
	                    "key_check_ms = 700\n"
	                    "key_park_max = 4\n");
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	if ((stor = ipc_open("storage", on_stor, NULL, err, sizeof(err))) ==
	    NULL)
		T_FAIL("ipc_open storage: %s", err);

	/* Three requests with one unknown key: one KEY_CHECK, all parked. */
	reset_counts();
	send_route("k1-a", "v3.chat", K1, now_wall_ms() + 30000);
	send_route("k1-b", "v3.chat", K1, now_wall_ms() + 30000);
	send_route("k1-c", "v3.chat", K1, now_wall_ms() + 30000);
	pump(3000, &nchecks, 1);
	pump(300, NULL, 0);
	T_EQ_INT(nchecks, 1);
	T_EQ_INT(nruns, 0);
	T_EQ_INT(nreplies, 0);
	T_EQ_STR(checks[0].hash, sha256_hex(K1));
	T_EQ_STR(checks[0].reply_to, "auth");
	T_EQ_STR(checks[0].reqid, "k1-a");
	T_ASSERT(checks[0].deadline_ms > now_wall_ms());
	/* Storage says valid: all three go on as the key's sub. */
	send_key_reply(sha256_hex(K1), 200, "key-owner", "chat");
	pump(3000, &nruns, 3);
	T_EQ_INT(nruns, 3);
	T_EQ_INT(nreplies, 0);
	for (i = 0; i < 3; i++) {
		g = &runs[i];
		T_EQ_INT(g->type, MSG_CHAT_RUN);
		T_EQ_STR(g->route, "v3.chat");
		T_EQ_STR(g->token, "");
		T_EQ_STR(g->sub, "key-owner");
		T_EQ_STR(g->scopes, "chat");
		T_EQ_STR(g->reply_to, "edge");
		T_EQ_STR(g->traceparent, TP);
		T_EQ_STR(g->chat_id, "7300000000000000002");
		T_ASSERT(g->deadline_ms > now_wall_ms());
	}
	T_ASSERT(find(runs, nruns, "k1-a") && find(runs, nruns, "k1-b") &&
	         find(runs, nruns, "k1-c"));

	/* Cached: no new check.  Cancel goes to the dispatcher as
	 * CHAT_CANCEL; retrieve needs the read scope this key lacks. */
	reset_counts();
	send_route("k1-d", "v3.chat", K1, 0);
	send_route("k1-e", "v3.cancel", K1, 0);
	send_route("k1-r", "v3.retrieve", K1, 0);
	pump(3000, &nany, 3);
	T_EQ_INT(nchecks, 0);
	T_EQ_INT(nruns, 2);
	T_ASSERT((g = find(runs, nruns, "k1-d")) != NULL);
	T_EQ_INT(g->type, MSG_CHAT_RUN);
	T_ASSERT((g = find(runs, nruns, "k1-e")) != NULL);
	T_EQ_INT(g->type, MSG_CHAT_CANCEL);
	T_EQ_STR(g->route, "v3.cancel");
	T_EQ_STR(g->sub, "key-owner");
	T_EQ_INT(nreplies, 1);
	T_EQ_STR(replies[0].reqid, "k1-r");
	T_EQ_INT(replies[0].status, 403);
	T_EQ_INT(replies[0].code, 4101);
	T_EQ_STR(replies[0].msg, "API key lacks the read scope");
	T_EQ_INT(nqueries, 0);

	/* After key_cache_ms the key is checked again; now revoked: 401,
	 * and the unknown answer is used without asking for a while. */
	pump(1100, NULL, 0);
	reset_counts();
	send_route("k1-f", "v3.chat", K1, 0);
	pump(3000, &nchecks, 1);
	T_EQ_INT(nchecks, 1);
	T_EQ_INT(nruns, 0);
	send_key_reply(sha256_hex(K1), 401, "", "");
	pump(3000, &nreplies, 1);
	T_EQ_INT(nreplies, 1);
	T_EQ_STR(replies[0].reqid, "k1-f");
	T_EQ_INT(replies[0].status, 401);
	T_EQ_INT(replies[0].code, 4100);
	T_EQ_STR(replies[0].msg, "invalid API key");
	send_route("k1-g", "v3.list", K1, 0);
	pump(3000, &nreplies, 2);
	T_EQ_INT(nreplies, 2);
	T_EQ_STR(replies[1].reqid, "k1-g");
	T_EQ_INT(replies[1].status, 401);
	T_EQ_INT(nchecks, 1);
	/* A duplicate KEY_REPLY is ignored. */
	send_key_reply(sha256_hex(K1), 200, "late", "*");
	pump(200, NULL, 0);
	T_EQ_INT(nruns, 0);
	/* Past key_unknown_cache_ms: asked again. */
	pump(700, NULL, 0);
	send_route("k1-h", "v3.chat", K1, 0);
	pump(3000, &nchecks, 2);
	T_EQ_INT(nchecks, 2);
	send_key_reply(sha256_hex(K1), 200, "back", "*");
	pump(3000, &nruns, 1);
	T_EQ_INT(nruns, 1);
	T_EQ_STR(runs[0].sub, "back");
	T_EQ_STR(runs[0].scopes, "*");

	/* Storage refusing (PG down): 503, nothing cached. */
	reset_counts();
	send_route("k2-a", "v3.chat", K2, 0);
	pump(3000, &nchecks, 1);
	T_EQ_INT(nchecks, 1);
	send_key_reply(sha256_hex(K2), 503, "", "");
	pump(3000, &nreplies, 1);
	T_EQ_INT(nreplies, 1);
	T_EQ_INT(replies[0].status, 503);
	T_EQ_INT(replies[0].code, 5030);
	T_EQ_INT(replies[0].retry_after, 1);
	send_route("k2-b", "v3.chat", K2, 0);
	pump(3000, &nchecks, 2);
	T_EQ_INT(nchecks, 2);
	send_key_reply(sha256_hex(K2), 200, "k2", "chat,read");
	pump(3000, &nruns, 1);
	T_EQ_INT(nruns, 1);
	T_EQ_STR(runs[0].reqid, "k2-b");

	/* Storage silent: 503 after key_check_ms (700), not before. */
	reset_counts();
	t0 = now_mono_ms();
	send_route("k3-a", "v3.retrieve", K3, 0);
	send_route("k3-b", "v3.retrieve", K3, 0);
	pump(3000, &nreplies, 2);
	T_EQ_INT(nreplies, 2);
	T_ASSERT(now_mono_ms() - t0 >= 600);
	T_EQ_INT(nchecks, 1);
	for (i = 0; i < 2; i++) {
		T_EQ_INT(replies[i].status, 503);
		T_EQ_INT(replies[i].code, 5030);
		T_EQ_INT(replies[i].retry_after, 1);
	}
	/* Its late answer settles nothing. */
	send_key_reply(sha256_hex(K3), 200, "late", "*");
	pump(300, NULL, 0);
	T_EQ_INT(nqueries, 0);
	T_EQ_INT(nruns, 0);

	/* At most key_park_max (4) requests wait: the rest get 503. */
	reset_counts();
	for (i = 0; i < 6; i++) {
		snprintf(id, sizeof(id), "k4-%d", i);
		send_route(id, "v3.list", K4, 0);
	}
	pump(3000, &nreplies, 2);
	pump(3000, &nchecks, 1); /* another link: may come later */
	T_EQ_INT(nreplies, 2);
	T_EQ_INT(replies[0].status, 503);
	T_EQ_INT(replies[1].status, 503);
	T_EQ_INT(nchecks, 1);
	send_key_reply(sha256_hex(K4), 200, "k4", "read");
	pump(3000, &nqueries, 4);
	T_EQ_INT(nqueries, 4);
	for (i = 0; i < 4; i++) {
		T_EQ_STR(queries[i].route, "v3.list");
		T_EQ_STR(queries[i].sub, "k4");
		T_EQ_STR(queries[i].scopes, "read");
		T_EQ_STR(queries[i].token, "");
		T_EQ_STR(queries[i].reply_to, "edge");
	}

	/* A JWT has every scope: retrieve goes to storage.  v1.chat takes
	 * no API key.  An unknown route is refused. */
	reset_counts();
	send_route("jwt-r", "v3.retrieve", token(SECRET2, "gina", 600), 0);
	send_route("v1-key", "v1.chat", K1, 0);
	send_route("what", "v9.chat", token(SECRET2, "gina", 600), 0);
	pump(3000, &nany, 3);
	T_EQ_INT(nqueries, 1);
	T_EQ_STR(queries[0].reqid, "jwt-r");
	T_EQ_STR(queries[0].sub, "gina");
	T_EQ_STR(queries[0].scopes, "*");
	T_EQ_STR(queries[0].chat_id, "7300000000000000002");
	T_EQ_INT(nreplies, 2);
	T_ASSERT((g = find(replies, nreplies, "v1-key")) != NULL);
	T_EQ_INT(g->status, 401);
	T_EQ_STR(g->msg, "malformed token");
	T_ASSERT((g = find(replies, nreplies, "what")) != NULL);
	T_EQ_INT(g->status, 400);
	T_EQ_INT(g->code, 4000);
	T_EQ_INT(nchecks, 0);
}

static void
t_credential(void)
{
	char cdir[300], p[320];
	FILE *f;
	pid_t pid;

	/* A stop is clean (status 0, no crash freeing the key table). */
	{
		int st;

		kill(child, SIGTERM);
		T_EQ_INT(waitpid(child, &st, 0), child);
		child = -1;
		T_ASSERT(WIFEXITED(st));
		T_EQ_INT(WEXITSTATUS(st), 0);
	}
	/* The credential wins over [auth] jwt_secret. */
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

/* LIMIT_REPLY from "storage" to "auth" for the check of reqid. */
static void
send_limit_reply(const char *reqid, const char *key, uint64_t status,
                 uint64_t remaining, uint64_t retry_ms, uint64_t reset_ms)
{
	struct limit_reply r = {
	        .key = MSTR(key),
	        .status = status,
	        .remaining = remaining,
	        .retry_after_ms = retry_ms,
	        .reset_ms = reset_ms,
	};
	struct msg_head h = {
	        .reqid = MSTR(reqid),
	        .traceparent = MSTR_LIT(TP),
	};

	T_EQ_INT(msg_send_limit_reply(stor, "auth", &h, &r), 0);
}

/* The inbound limits: one LIMIT_CHECK per request of a limited route,
 * parked until LIMIT_REPLY: allowed goes on, limited is 429/4020 with the
 * RateLimit fields, unknown and silence follow on_redis_down; shadow
 * forwards at once; an unlimited route asks nothing. */
static void
t_limits(void)
{
	const struct got *g;
	const char *key = "tenant-a|bot-1|v1.chat";
	char tok[1024];
	uint64_t t0;

	write_conf(SECRET2, "\n[limits]\n"
	                    "rate.v1.chat = 2\n"
	                    "window_ms.v1.chat = 60000\n"
	                    "burst.v1.chat = 1\n"
	                    "check_ms = 300\n"
	                    "on_redis_down = closed\n");
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	T_ASSERT(log_has("reloaded limits: enforce, v1.chat=2/60000ms+1; "
	                 "on Redis down closed"));
	snprintf(tok, sizeof(tok), "%s", token(SECRET2, "tenant-a", 600));

	/* Allowed: parked until the answer, then sent on. */
	reset_counts();
	send_req("l-1", tok, now_wall_ms() + 30000);
	pump(3000, &nlchecks, 1);
	pump(100, NULL, 0);
	T_EQ_INT(nlchecks, 1);
	T_EQ_INT(nruns, 0);
	g = &lchecks[0];
	T_EQ_STR(g->key, key);
	T_EQ_INT(g->limit, 2);
	T_EQ_INT(g->window_ms, 60000);
	T_EQ_INT(g->burst, 1);
	T_EQ_INT(g->cost, 1);
	T_EQ_STR(g->reqid, "l-1");
	T_EQ_STR(g->reply_to, "auth");
	T_ASSERT(g->deadline_ms > now_wall_ms() &&
	         g->deadline_ms <= now_wall_ms() + 300);
	send_limit_reply("l-1", key, 0, 2, 0, 20000);
	pump(3000, &nruns, 1);
	T_EQ_INT(nruns, 1);
	T_EQ_STR(runs[0].reqid, "l-1");
	T_EQ_STR(runs[0].sub, "tenant-a");
	T_EQ_INT(nreplies, 0);

	/* Limited: 429 with Retry-After (rounded up) and the fields. */
	send_req("l-2", tok, now_wall_ms() + 30000);
	pump(3000, &nlchecks, 2);
	send_limit_reply("l-2", key, 1, 0, 29001, 45000);
	pump(3000, &nreplies, 1);
	T_EQ_INT(nreplies, 1);
	g = &replies[0];
	T_EQ_STR(g->reqid, "l-2");
	T_EQ_INT(g->status, 429);
	T_EQ_INT(g->code, 4020);
	T_EQ_STR(g->msg, "too many requests");
	T_EQ_INT(g->retry_after, 30);
	T_EQ_STR(g->rl, "\"v1.chat\";r=0;t=45");
	T_EQ_STR(g->rlp, "\"v1.chat\";q=2;w=60");
	T_EQ_INT(nruns, 1);

	/* Storage silent past check_ms, then "unknown": closed, 503. */
	t0 = now_mono_ms();
	send_req("l-3", tok, now_wall_ms() + 30000);
	pump(3000, &nreplies, 2);
	T_EQ_INT(nreplies, 2);
	T_ASSERT(now_mono_ms() - t0 >= 250);
	T_EQ_STR(replies[1].reqid, "l-3");
	T_EQ_INT(replies[1].status, 503);
	T_EQ_INT(replies[1].code, 5030);
	T_EQ_INT(replies[1].retry_after, 1);
	T_EQ_STR(replies[1].rl, "");
	send_req("l-4", tok, now_wall_ms() + 30000);
	pump(3000, &nlchecks, 4);
	send_limit_reply("l-4", key, 2, 0, 0, 0);
	pump(3000, &nreplies, 3);
	T_EQ_INT(replies[2].status, 503);
	T_ASSERT(log_has("limits: storage cannot check them"));
	/* A late answer for l-3 is a stray, nothing more. */
	send_limit_reply("l-3", key, 0, 1, 0, 0);
	pump(200, NULL, 0);
	T_EQ_INT(nreplies, 3);
	T_EQ_INT(nruns, 1);

	/* Open: silence and unknown admit. */
	write_conf(SECRET2, "\n[limits]\n"
	                    "rate = 2\n"
	                    "window_ms = 60000\n"
	                    "check_ms = 200\n"
	                    "on_redis_down = open\n");
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	reset_counts();
	send_req("l-5", tok, now_wall_ms() + 30000);
	pump(3000, &nruns, 1);
	T_EQ_INT(nruns, 1);
	T_EQ_INT(nlchecks, 1);
	T_EQ_INT(nreplies, 0);

	/* Shadow: sent on at once; the answer is only counted. */
	write_conf(SECRET2, "\n[limits]\n"
	                    "mode = shadow\n"
	                    "rate = 2\n"
	                    "rate.v3.retrieve = 0\n");
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	reset_counts();
	send_req("l-6", tok, now_wall_ms() + 30000);
	pump(3000, &nlchecks, 1);
	pump(100, NULL, 0);
	T_EQ_INT(nruns, 1);
	T_EQ_INT(nlchecks, 1);
	send_limit_reply("l-6", key, 1, 0, 1000, 1000);
	pump(300, NULL, 0);
	T_EQ_INT(nreplies, 0);
	T_EQ_INT(nruns, 1);
	/* A route with rate 0 costs no round trip. */
	send_route("l-7", "v3.retrieve", tok, now_wall_ms() + 30000);
	pump(3000, &nqueries, 1);
	T_EQ_INT(nqueries, 1);
	T_EQ_INT(nlchecks, 1);

	/* A bad mode is refused on reload; the previous one stays. */
	write_conf(SECRET2, "\n[limits]\nmode = sometimes\n");
	kill(child, SIGHUP);
	pump(500, NULL, 0);
	T_ASSERT(log_has("[limits] mode: \"sometimes\": want off, shadow "
	                 "or enforce"));
	write_conf(SECRET2, NULL);
	kill(child, SIGHUP);
	pump(500, NULL, 0);
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
	t_keys();
	t_limits();
	t_credential();
	t_refuse_start();
}

T_TESTS = {
        {"service", t_all},
        {NULL, NULL},
};
T_MAIN
