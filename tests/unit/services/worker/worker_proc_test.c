/* SPDX-License-Identifier: ISC */
/*
 * The real troupe-worker process, with this test playing its peers: the
 * mailboxes "dispatcher", "storage" and "edge" are opened here (real
 * ipc:// sockets in a temporary run directory) and the LLM upstream is
 * troupe-upstream-sim on 127.0.0.1.  Checks WORKER_HELLO, a burst of
 * chats end to end (CTX_GET -> CTX_REPLY -> upstream -> CHAT_PERSIST with
 * reply_to = the edge, RUN_DONE), a storage error passed to the edge, the
 * SIGTERM drain (in-flight runs finish, new ones get 503, exit 0), the
 * exit when the parent dies, and a v3 chat with plugins served by the sim
 * (its results reach the model; a cancel aborts a slow plugin, which the
 * sim counts).  Skips (77) without the sim or the worker binary.
 */
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "promcheck.h"
#include "proto.h"
#include "t.h"

#ifndef UPSTREAM_SIM
#define UPSTREAM_SIM ""
#endif
#ifndef WORKER_BIN
#define WORKER_BIN ""
#endif

static char tmpdir[] = "/tmp/troupe-worker-proc-XXXXXX";
static char conf_path[256];
static char sim_base[128];
static char sim_addr[128];
static pid_t sim_pid = -1;
static char plugins_json[1024]; /* bot "toolbot"'s plugins */

#define PLUGIN_SECRET "s3cr3t"

/* The last v3 CHAT_PERSIST. */
static struct {
	int n;
	char status[32];
	char answer[4096];
	char messages[16384];
} v3p;

static struct ipc *disp, *stor, *edge, *tele;
static char metrics_text[65536]; /* the last METRICS of a worker */
static int nmetrics;

/* What the peers saw. */
static struct {
	int hello;
	uint64_t hello_pid, hello_slot;
	int ctx_get;
	int persist;
	int persist_bad_reply_to;
	int done;
	int done_status[600];
	int replies;
	int reply_status[600];
	int reply_200_with_answer;
	int fail_storage_bot; /* CTX_REPLY 404 for bot "nobot" */
} seen;

static void
skip(const char *why)
{
	printf("skip: %s\n", why);
	exit(77);
}

static void
cleanup(void)
{
	char cmd[300];
	int st;

	if (sim_pid > 0) {
		kill(sim_pid, SIGTERM);
		(void)waitpid(sim_pid, &st, 0);
	}
	if (disp != NULL)
		ipc_close(disp);
	if (stor != NULL)
		ipc_close(stor);
	if (edge != NULL)
		ipc_close(edge);
	if (tele != NULL)
		ipc_close(tele);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	(void)!system(cmd);
}

/* --- the peers --- */

static void
on_dispatcher(void *arg, const struct msg *m)
{
	struct worker_hello h;
	struct run_done d;

	(void)arg;
	if (m->type == MSG_WORKER_HELLO && worker_hello_unpack(m, &h) == 0) {
		seen.hello++;
		seen.hello_pid = h.pid;
		seen.hello_slot = h.slot;
	} else if (m->type == MSG_RUN_DONE && run_done_unpack(m, &d) == 0) {
		if (seen.done < (int)nitems(seen.done_status))
			seen.done_status[seen.done] = (int)d.status;
		seen.done++;
	}
}

static void
on_storage(void *arg, const struct msg *m)
{
	struct ctx_get g;
	struct chat_persist p;
	struct ctx_reply c = {0};
	struct chat_reply r = {0};
	struct msg_head h;
	char peer[64];

	(void)arg;
	if (m->type == MSG_CTX_GET && ctx_get_unpack(m, &g) == 0) {
		seen.ctx_get++;
		snprintf(peer, sizeof(peer), "%.*s", (int)m->reply_to.n,
		         m->reply_to.p);
		h = msg_head_reply(m, NULL);
		if (mstr_eq(g.bot_id, "nobot")) {
			c.status = 404;
			c.code = 4006;
			c.msg = MSTR_LIT("bot not found");
		} else if (mstr_eq(g.bot_id, "toolbot")) {
			c.status = 200;
			c.upstream = MSTR(sim_base);
			c.model = MSTR_LIT("sim-1");
			c.plugins = MSTR(plugins_json);
			c.created_at = now_wall_ms() / 1000;
		} else {
			c.status = 200;
			c.upstream = MSTR(sim_base);
			c.model = MSTR_LIT("sim-1");
			c.system_prompt = MSTR_LIT("be brief");
			c.context_turns = 10;
			c.context = MSTR_NULL;
		}
		(void)msg_send_ctx_reply(stor, peer, &h, &c);
	} else if (m->type == MSG_CHAT_PERSIST &&
	           chat_persist_unpack(m, &p) == 0) {
		/* As storage does after COMMIT: answer the edge. */
		seen.persist++;
		if (mstr_eq(p.route, "v3.chat")) {
			snprintf(v3p.status, sizeof(v3p.status), "%.*s",
			         (int)p.status.n, p.status.p);
			snprintf(v3p.answer, sizeof(v3p.answer), "%.*s",
			         (int)p.answer.n, p.answer.p);
			snprintf(v3p.messages, sizeof(v3p.messages), "%.*s",
			         (int)p.messages.n, p.messages.p);
			v3p.n++;
		}
		if (!mstr_eq(m->reply_to, "edge"))
			seen.persist_bad_reply_to++;
		h = msg_head_reply(m, NULL);
		r.status = 200;
		r.data = p.reply;
		(void)msg_send_chat_reply(stor, "edge", &h, &r);
	}
}

static void
on_edge(void *arg, const struct msg *m)
{
	struct chat_reply r;

	(void)arg;
	if (m->type != MSG_CHAT_REPLY || chat_reply_unpack(m, &r) == -1)
		return;
	if (seen.replies < (int)nitems(seen.reply_status))
		seen.reply_status[seen.replies] = (int)r.status;
	seen.replies++;
	if (r.status == 200 &&
	    memmem(r.data.p, r.data.n, "\"answer\":\"", 10) != NULL &&
	    memmem(r.data.p, r.data.n, "\"chat_id\":\"", 11) != NULL)
		seen.reply_200_with_answer++;
}

static void
on_telemetry(void *arg, const struct msg *m)
{
	struct metrics_report mt;

	(void)arg;
	if (m->type != MSG_METRICS || metrics_report_unpack(m, &mt) == -1 ||
	    !mstr_eq(mt.service, "worker-5"))
		return;
	snprintf(metrics_text, sizeof(metrics_text), "%.*s", (int)mt.text.n,
	         mt.text.p);
	nmetrics++;
}

static void
pump_until(const int *n, int want, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms, last = 0;

	while ((n == NULL || *n < want) && now_mono_ms() < until) {
		ipc_process(disp);
		ipc_process(stor);
		ipc_process(edge);
		ipc_process(tele);
		if (now_mono_ms() - last >= IPC_TICK_MS) {
			ipc_tick(disp);
			ipc_tick(stor);
			ipc_tick(edge);
			ipc_tick(tele);
			last = now_mono_ms();
		}
		usleep(300);
	}
}

static void
assign(const char *reqid, const char *bot, const char *query,
       const char *worker)
{
	struct chat_request q = {.route = MSTR_LIT("v1.chat"),
	                         .token = MSTR_NULL,
	                         .sub = MSTR_LIT("u1"),
	                         .bot_id = MSTR(bot),
	                         .user_id = MSTR_LIT("u1"),
	                         .query = MSTR(query),
	                         .history_id = MSTR_NULL,
	                         .received_ms = now_wall_ms()};
	struct msg_head h = {.reqid = MSTR(reqid),
	                     .traceparent = MSTR_NULL,
	                     .deadline_ms = now_wall_ms() + 10000,
	                     .reply_to = MSTR_LIT("edge")};

	T_EQ_INT(msg_send_run_assign(disp, worker, &h, &q), 0);
}

/* --- processes --- */

static void
start_sim(void)
{
	char ready[300], addr[128] = "";
	uint64_t until;
	FILE *f;

	snprintf(ready, sizeof(ready), "%s/sim.ready", tmpdir);
	if ((sim_pid = fork()) == 0) {
		execl(UPSTREAM_SIM, UPSTREAM_SIM, "--listen", "127.0.0.1:0",
		      "--ready-file", ready, "--plugin-secret", PLUGIN_SECRET,
		      (char *)NULL);
		_exit(127);
	}
	until = now_mono_ms() + 5000;
	while (addr[0] == '\0' && now_mono_ms() < until) {
		if ((f = fopen(ready, "r")) != NULL) {
			if (fgets(addr, sizeof(addr), f) == NULL)
				addr[0] = '\0';
			fclose(f);
			addr[strcspn(addr, "\r\n")] = '\0';
		}
		if (addr[0] == '\0')
			usleep(20000);
	}
	if (addr[0] == '\0')
		T_FAIL("the sim did not start");
	snprintf(sim_base, sizeof(sim_base), "http://%s/", addr);
	snprintf(sim_addr, sizeof(sim_addr), "%s", addr);
}

static pid_t
start_worker(const char *name)
{
	pid_t pid;

	if ((pid = fork()) == 0) {
		execl(WORKER_BIN, WORKER_BIN, "-c", conf_path, "-n", name,
		      (char *)NULL);
		_exit(127);
	}
	return (pid);
}

/* Wait up to ms for pid to exit; its status, or -1. */
static int
wait_exit(pid_t pid, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms;
	int st;

	while (now_mono_ms() < until) {
		if (waitpid(pid, &st, WNOHANG) == pid)
			return (st);
		pump_until(NULL, 0, 20);
	}
	return (-1);
}

static void
setup(void)
{
	static int done;
	char err[256];
	FILE *f;

	if (done++)
		return;
	if (*UPSTREAM_SIM == '\0' || access(UPSTREAM_SIM, X_OK) == -1)
		skip("troupe-upstream-sim is not built");
	if (*WORKER_BIN == '\0' || access(WORKER_BIN, X_OK) == -1)
		skip("troupe-worker is not built");
	if (mkdtemp(tmpdir) == NULL)
		T_FAIL("mkdtemp");
	atexit(cleanup);
	setenv("TROUPE_IPC_RUNDIR", tmpdir, 1);
	snprintf(conf_path, sizeof(conf_path), "%s/troupe.conf", tmpdir);
	if ((f = fopen(conf_path, "w")) == NULL)
		T_FAIL("conf");
	fprintf(f, "[ipc]\nrundir = %s\n[worker]\nupstream_connections = 8\n",
	        tmpdir);
	fclose(f);
	T_EQ_INT(conf_load(conf_path, 0, err, sizeof(err)), 0);
	start_sim();
	disp = ipc_open("dispatcher", on_dispatcher, NULL, err, sizeof(err));
	stor = ipc_open("storage", on_storage, NULL, err, sizeof(err));
	edge = ipc_open("edge", on_edge, NULL, err, sizeof(err));
	tele = ipc_open("telemetry", on_telemetry, NULL, err, sizeof(err));
	if (disp == NULL || stor == NULL || edge == NULL || tele == NULL)
		T_FAIL("mailboxes: %s", err);
}

static void
t_worker_process(void)
{
	enum { N = 300 };
	char id[32];
	pid_t pid;
	int st, ok = 0;

	setup();
	pid = start_worker("worker-5");
	pump_until(&seen.hello, 1, 5000);
	T_EQ_INT(seen.hello, 1);
	T_EQ_INT(seen.hello_pid, pid);
	T_EQ_INT(seen.hello_slot, 5);

	/* A burst of chats, and one for a bot storage does not know. */
	for (int i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "burst-%d", i);
		assign(id, "bot1", "hello", "worker-5");
	}
	assign("unknown-bot", "nobot", "hello", "worker-5");
	pump_until(&seen.done, N + 1, 15000);
	pump_until(&seen.replies, N + 1, 2000);
	T_EQ_INT(seen.ctx_get, N + 1);
	T_EQ_INT(seen.persist, N);
	T_EQ_INT(seen.persist_bad_reply_to, 0);
	T_EQ_INT(seen.done, N + 1);
	T_EQ_INT(seen.replies, N + 1);
	for (int i = 0; i < N + 1; i++)
		ok += seen.reply_status[i] == 200;
	T_EQ_INT(ok, N);
	T_EQ_INT(seen.reply_200_with_answer, N);

	/* Its metrics (sent every second) count them, in valid text. */
	{
		char err[256];
		char want[128];
		int n0 = nmetrics;

		pump_until(&nmetrics, n0 + 2, 3000);
		T_ASSERT(nmetrics >= n0 + 2);
		if (prom_check(metrics_text, err, sizeof(err)) == -1)
			T_FAIL("metrics: %s\n%s", err, metrics_text);
		if (prom_check_promtool(metrics_text) == 1)
			T_FAIL("promtool refuses:\n%s", metrics_text);
		snprintf(want, sizeof(want),
		         "troupe_worker_runs_total{service=\"worker-5\","
		         "status=\"200\"} %d\n",
		         N);
		if (strstr(metrics_text, want) == NULL)
			T_FAIL("metrics: want %s in\n%s", want, metrics_text);
		T_ASSERT(strstr(metrics_text, "troupe_worker_runs_total{"
		                              "service=\"worker-5\",status="
		                              "\"404\"} 1\n") != NULL);
		T_ASSERT(strstr(metrics_text,
		                "troupe_worker_runs_in_flight{"
		                "service=\"worker-5\"} 0\n") != NULL);
		T_ASSERT(strstr(metrics_text,
		                "troupe_upstream_request_duration_seconds_"
		                "count{"
		                "service=\"worker-5\"} 300\n") != NULL);
	}

	/* SIGTERM with a slow run in flight: it still ends with 200, a
	 * run assigned after the signal gets 503, then exit 0. */
	memset(&seen, 0, sizeof(seen));
	assign("slow", "bot1", "[sim:delay=600]", "worker-5");
	pump_until(&seen.ctx_get, 1, 3000);
	pump_until(NULL, 0, 100);
	kill(pid, SIGTERM);
	pump_until(NULL, 0, 100);
	assign("late", "bot1", "hello", "worker-5");
	pump_until(&seen.replies, 2, 5000);
	T_EQ_INT(seen.replies, 2);
	T_EQ_INT(seen.reply_status[0], 503); /* "late", refused at once */
	T_EQ_INT(seen.reply_status[1], 200); /* "slow", finished */
	st = wait_exit(pid, 5000);
	if (st == -1) {
		kill(pid, SIGKILL);
		T_FAIL("the worker did not exit after SIGTERM");
	}
	T_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static void
t_parent_dies(void)
{
	int fds[2], st;
	pid_t mid, pid = 0;

	setup();
	/* We adopt orphans, so the worker's parent changes to us. */
	T_EQ_INT(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
	memset(&seen, 0, sizeof(seen));
	T_EQ_INT(pipe(fds), 0);
	if ((mid = fork()) == 0) {
		pid_t w = start_worker("worker-6");

		(void)!write(fds[1], &w, sizeof(w));
		/* Stay until the worker has said hello. */
		usleep(500000);
		_exit(0);
	}
	T_EQ_INT(read(fds[0], &pid, sizeof(pid)), (long)sizeof(pid));
	pump_until(&seen.hello, 1, 5000);
	T_EQ_INT(seen.hello, 1);
	T_EQ_INT(waitpid(mid, &st, 0), mid);
	st = wait_exit(pid, 5000);
	if (st == -1) {
		kill(pid, SIGKILL);
		T_FAIL("the worker outlived its parent by 5 s");
	}
	T_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

/* --- plugins against the sim --- */

/* GET /sim/stats from the sim (blocking, loopback), into out. */
static void
sim_stats(char *out, size_t n)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	char req[] = "GET /sim/stats HTTP/1.1\r\nHost: sim\r\n"
	             "Connection: close\r\n\r\n";
	size_t len = 0;
	ssize_t k;
	int fd;

	out[0] = '\0';
	sa.sin_port = htons((uint16_t)atoi(strrchr(sim_addr, ':') + 1));
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if ((fd = socket(AF_INET, SOCK_STREAM, 0)) == -1)
		T_FAIL("socket");
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1 ||
	    write(fd, req, sizeof(req) - 1) != (ssize_t)sizeof(req) - 1)
		T_FAIL("sim stats: %s", strerror(errno));
	while (len + 1 < n && (k = read(fd, out + len, n - len - 1)) > 0)
		len += (size_t)k;
	out[len] = '\0';
	close(fd);
}

/* Pump until the sim's stats hold want (or ms pass); whether they do. */
static int
sim_stats_wait(const char *want, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms;
	char st[8192];

	for (;;) {
		sim_stats(st, sizeof(st));
		if (strstr(st, want) != NULL)
			return (1);
		if (now_mono_ms() >= until)
			break;
		pump_until(NULL, 0, 50);
	}
	printf("sim stats: %s\n", st);
	return (0);
}

static void
send_v3(uint16_t type, const char *reqid, const char *chat_id,
        const char *query, const char *worker)
{
	char msgs[512];
	struct chat_request q = {.route = MSTR_LIT("v3.chat"),
	                         .token = MSTR_NULL,
	                         .sub = MSTR_LIT("u1"),
	                         .bot_id = MSTR_LIT("toolbot"),
	                         .user_id = MSTR_LIT("u1"),
	                         .query = MSTR(query),
	                         .history_id = MSTR_NULL,
	                         .received_ms = now_wall_ms(),
	                         .chat_id = MSTR(chat_id),
	                         .stream = 1,
	                         .messages = MSTR(msgs),
	                         .scopes = MSTR_NULL};
	struct msg_head h = {.reqid = MSTR(reqid),
	                     .traceparent = MSTR_NULL,
	                     .deadline_ms = now_wall_ms() + 20000,
	                     .reply_to = MSTR_LIT("edge")};

	snprintf(msgs, sizeof(msgs),
	         "[{\"role\":\"user\",\"type\":\"question\",\"content\":"
	         "\"%s\",\"content_type\":\"text\"}]",
	         query);
	if (type == MSG_RUN_CANCEL) {
		q.route = MSTR_LIT("v3.cancel");
		T_EQ_INT(msg_send_run_cancel(disp, worker, &h, &q), 0);
	} else
		T_EQ_INT(msg_send_run_assign(disp, worker, &h, &q), 0);
}

static int
count_of(const char *hay, const char *needle)
{
	int n = 0;

	for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
		n++;
	return (n);
}

static void
t_tools_sim(void)
{
	pid_t pid;
	int st;

	setup();
	memset(&seen, 0, sizeof(seen));
	snprintf(plugins_json, sizeof(plugins_json),
	         "[{\"name\":\"echo\",\"url\":\"%splugin/echo\","
	         "\"auth\":\"token\",\"secret\":\"" PLUGIN_SECRET "\"},"
	         "{\"name\":\"mac\",\"url\":\"%splugin/mac\","
	         "\"auth\":\"hmac\",\"secret\":\"" PLUGIN_SECRET "\"},"
	         "{\"name\":\"slow\",\"url\":\"%splugin/slow\","
	         "\"auth\":\"token\",\"secret\":\"" PLUGIN_SECRET "\","
	         "\"timeout_ms\":20000}]",
	         sim_base, sim_base, sim_base);
	pid = start_worker("worker-7");
	pump_until(&seen.hello, 1, 5000);
	T_EQ_INT(seen.hello, 1);

	/* Two tools, a token and an HMAC: the sim accepts both, and its
	 * answer shows both results reached the model. */
	send_v3(MSG_RUN_ASSIGN, "tools-1", "7100000000000000001",
	        "weather? [sim:tool=echo][sim:tool=mac]", "worker-7");
	pump_until(&v3p.n, 1, 10000);
	T_EQ_INT(v3p.n, 1);
	T_EQ_STR(v3p.status, "completed");
	if (strstr(v3p.answer,
	           " tools=2 tool_results=[{\"result\":{\"query\":\"weather? "
	           "[sim:tool=echo][sim:tool=mac]\"},\"plugin\":\"echo\"},"
	           "{\"result\":{\"query\":\"weather? [sim:tool=echo]"
	           "[sim:tool=mac]\"},\"plugin\":\"mac\"}] query=") == NULL)
		T_FAIL("answer: %s", v3p.answer);
	T_EQ_INT(count_of(v3p.messages, "\"type\":\"function_call\""), 2);
	T_EQ_INT(count_of(v3p.messages, "\"type\":\"tool_response\""), 2);
	T_ASSERT(sim_stats_wait("\"echo\":{\"requests\":1,\"aborted\":0,"
	                        "\"unauthorized\":0",
	                        1000));
	T_ASSERT(sim_stats_wait("\"mac\":{\"requests\":1,\"aborted\":0,"
	                        "\"unauthorized\":0",
	                        1000));

	/* A slow plugin in flight, then the cancel: the chat ends
	 * canceled and the sim sees its plugin request aborted. */
	send_v3(MSG_RUN_ASSIGN, "tools-2", "7100000000000000002",
	        "slow [sim:tool=slow] [plugin:delay=8000]", "worker-7");
	T_ASSERT(sim_stats_wait("\"plugin_in_flight\":1", 5000));
	send_v3(MSG_RUN_CANCEL, "cancel-2", "7100000000000000002", "",
	        "worker-7");
	pump_until(&v3p.n, 2, 3000);
	T_EQ_INT(v3p.n, 2);
	T_EQ_STR(v3p.status, "canceled");
	T_ASSERT(sim_stats_wait("\"slow\":{\"requests\":1,\"aborted\":1",
	                        2000));
	T_ASSERT(sim_stats_wait("\"plugin_in_flight\":0", 1000));

	kill(pid, SIGTERM);
	st = wait_exit(pid, 5000);
	if (st == -1) {
		kill(pid, SIGKILL);
		T_FAIL("the worker did not exit after SIGTERM");
	}
	T_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

T_TESTS = {
        {"worker_process", t_worker_process},
        {"parent_dies", t_parent_dies},
        {"tools_sim", t_tools_sim},
        {NULL, NULL},
};
T_MAIN
