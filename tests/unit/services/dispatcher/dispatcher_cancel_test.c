/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_cancel_test: cancels and gone clients in the run code of
 * services/dispatcher (dispatcher_run.c, dispatcher_dispatch.c), through
 * real mailboxes.  This binary holds a dispatcher (the library's state,
 * two worker slots marked ready by hand, no fork) behind the mailbox
 * "dispatcher", and plays auth, the edge, two workers and storage around
 * it in a temporary rundir.  It checks that CHAT_CANCEL reaches the
 * worker running the chat as RUN_CANCEL with the canceler's head, or
 * storage as CHAT_QUERY "v3.cancel" when no worker runs it; that
 * CLIENT_GONE sends one RUN_CANCEL with no reply_to to an assigned run's
 * worker and silently drops a queued run; and that the chat index forgets
 * a run once it is done.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "dispatcher.h"
#include "t.h"

static char dir[256];
static struct dispatcher d;
static struct svc s;
static struct ipc *auth_mb, *edge_mb, *w0, *w1, *stor;

#define NGOT 32
struct got {
	uint16_t type;
	char reqid[64];
	char reply_to[64];
	char route[32];
	char chat_id[32];
	uint64_t status;
};
static struct got at_edge[NGOT], at_w0[NGOT], at_w1[NGOT], at_stor[NGOT];
static int n_edge, n_w0, n_w1, n_stor;

static void
cp(char *dst, size_t n, struct mstr m)
{
	snprintf(dst, n, "%.*s", (int)m.n, m.p);
}

static void
record(struct got *v, int *n, const struct msg *m)
{
	struct chat_request q;
	struct chat_reply r;
	struct got *g;

	if (*n == NGOT)
		return;
	g = &v[(*n)++];
	memset(g, 0, sizeof(*g));
	g->type = m->type;
	cp(g->reqid, sizeof(g->reqid), m->reqid);
	cp(g->reply_to, sizeof(g->reply_to), m->reply_to);
	if (m->type == MSG_CHAT_REPLY) {
		if (chat_reply_unpack(m, &r) == 0)
			g->status = r.status;
	} else if (chat_request_unpack(m, &q) == 0) {
		cp(g->route, sizeof(g->route), q.route);
		cp(g->chat_id, sizeof(g->chat_id), q.chat_id);
	}
}

static void
on_edge(void *arg, const struct msg *m)
{
	(void)arg;
	record(at_edge, &n_edge, m);
}

static void
on_w0(void *arg, const struct msg *m)
{
	(void)arg;
	record(at_w0, &n_w0, m);
}

static void
on_w1(void *arg, const struct msg *m)
{
	(void)arg;
	record(at_w1, &n_w1, m);
}

static void
on_stor(void *arg, const struct msg *m)
{
	(void)arg;
	record(at_stor, &n_stor, m);
}

static void
on_auth(void *arg, const struct msg *m)
{
	(void)arg;
	(void)m;
}

/* What dispatcher.c's peer table does. */
static void
on_dispatcher(void *arg, const struct msg *m)
{
	struct dispatcher *dp = arg;
	enum proc from = proc_of(m->sender);
	int rc = DISPATCH_UNHANDLED;

	if (!msg_route_ok(m->type, from, PROC_DISPATCHER))
		T_FAIL("message 0x%04x from %.*s not routable", m->type,
		       (int)m->sender.n, m->sender.p);
	if (from == PROC_AUTH)
		rc = dispatcher_dispatch_auth(dp, m);
	else if (from == PROC_WORKER)
		rc = dispatcher_dispatch_worker(dp, m);
	else if (from == PROC_EDGE)
		rc = dispatcher_dispatch_edge(dp, m);
	if (rc != DISPATCH_OK)
		T_FAIL("dispatch of 0x%04x from %.*s: %d", m->type,
		       (int)m->sender.n, m->sender.p, rc);
}

static struct ipc *all[7];
static int nall;

/* Run every mailbox for up to ms, or until *done >= want. */
static void
pump(int ms, const int *done, int want)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms, tick = 0;

	while (now_mono_ms() < end && (done == NULL || *done < want)) {
		struct pollfd p[7];

		for (int i = 0; i < nall; i++)
			p[i] = (struct pollfd){ipc_fd(all[i]), POLLIN, 0};
		(void)poll(p, (nfds_t)nall, 5);
		for (int i = 0; i < nall; i++)
			ipc_process(all[i]);
		if (now_mono_ms() >= tick) {
			for (int i = 0; i < nall; i++)
				ipc_tick(all[i]);
			tick = now_mono_ms() + IPC_TICK_MS;
		}
	}
}

static struct ipc *
mb(const char *name, ipc_handler h, void *arg)
{
	char err[256];
	struct ipc *i;

	if ((i = ipc_open(name, h, arg, err, sizeof(err))) == NULL)
		T_FAIL("ipc_open %s: %s", name, err);
	all[nall++] = i;
	return (i);
}

static struct msg_head
head(const char *reqid, const char *reply_to)
{
	struct msg_head h = {
	        .reqid = MSTR(reqid),
	        .traceparent = MSTR_LIT("00-0af7651916cd43dd8448eb211c80319c-"
	                                "b7ad6b7169203331-01"),
	        .deadline_ms = now_wall_ms() + 60000,
	        .reply_to = MSTR(reply_to),
	};

	return (h);
}

static struct chat_request
body(const char *route, const char *chat_id)
{
	struct chat_request q = {
	        .route = MSTR(route),
	        .token = MSTR_NULL,
	        .sub = MSTR_LIT("alice"),
	        .bot_id = MSTR_LIT("bot-1"),
	        .user_id = MSTR_LIT("u"),
	        .query = MSTR_LIT("hi"),
	        .history_id = MSTR_LIT("7300000000000000009"),
	        .chat_id = MSTR(chat_id),
	        .stream = 1,
	        .messages = MSTR_LIT("[]"),
	        .scopes = MSTR_LIT("*"),
	};

	return (q);
}

static void
run(const char *reqid, const char *route, const char *chat_id)
{
	struct msg_head h = head(reqid, "edge");
	struct chat_request q = body(route, chat_id);

	T_EQ_INT(msg_send_chat_run(auth_mb, "dispatcher", &h, &q), 0);
}

static void
cancel(const char *reqid, const char *chat_id)
{
	struct msg_head h = head(reqid, "edge");
	struct chat_request q = body("v3.cancel", chat_id);

	T_EQ_INT(msg_send_chat_cancel(auth_mb, "dispatcher", &h, &q), 0);
}

static void
gone(const char *reqid, const char *chat_id)
{
	struct msg_head h = head(reqid, "");
	struct chat_request q = body("v3.chat", chat_id);

	T_EQ_INT(msg_send_client_gone(edge_mb, "dispatcher", &h, &q), 0);
}

static void
done(struct ipc *w, const char *reqid)
{
	struct msg_head h = head(reqid, "");
	struct run_done rd = {.status = 200,
	                      .upstream = MSTR_NULL,
	                      .upstream_status = 200,
	                      .upstream_us = 10};

	T_EQ_INT(msg_send_run_done(w, "dispatcher", &h, &rd), 0);
}

#define C1 "7300000000000000001"
#define C2 "7300000000000000002"
#define C3 "7300000000000000003"

static void
setup(void)
{
	char err[256], path[300];
	FILE *f;

	unsetenv("NOTIFY_SOCKET");
	snprintf(dir, sizeof(dir), "/tmp/troupe-disp-test-XXXXXX");
	T_ASSERT(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/test.conf", dir);
	T_ASSERT((f = fopen(path, "w")) != NULL);
	fprintf(f, "[ipc]\nrundir = %s\n", dir);
	fclose(f);
	if (conf_load(path, 0, err, sizeof(err)) == -1)
		T_FAIL("conf_load: %s", err);

	/* Two ready slots, one run each, room for 10 queued: no scaling
	 * (target == max) and so no fork. */
	memset(&d, 0, sizeof(d));
	s.name = "dispatcher";
	T_ASSERT((s.loop = loop_new()) != NULL);
	d.d_svc = &s;
	d.d_loop = s.loop;
	d.d_min = d.d_max = d.d_target = 2;
	d.d_per_child = 1;
	d.d_queue_max = 10;
	T_EQ_INT(dispatcher_run_init(&d.d_runs), 0);
	for (int k = 0; k < DISPATCHER_SLOTS_MAX; k++) {
		d.d_child[k].c_d = &d;
		d.d_child[k].c_slot = k;
		TAILQ_INIT(&d.d_child[k].c_runs);
		snprintf(d.d_child[k].c_name, sizeof(d.d_child[k].c_name),
		         "worker-%d", k);
	}
	d.d_child[0].c_state = d.d_child[1].c_state = CHILD_READY;
	d.d_ready = d.d_live = 2;

	s.ipc = mb("dispatcher", on_dispatcher, &d);
	auth_mb = mb("auth", on_auth, NULL);
	edge_mb = mb("edge", on_edge, NULL);
	w0 = mb("worker-0", on_w0, NULL);
	w1 = mb("worker-1", on_w1, NULL);
	stor = mb("storage", on_stor, NULL);
}

static void
cleanup(void)
{
	char cmd[300];

	if (getenv("TROUPE_TEST_KEEP") == NULL &&
	    strncmp(dir, "/tmp/troupe-disp-test-", 22) == 0) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		(void)system(cmd);
	}
}

static void
t_cancel_and_gone(void)
{
	struct run *r;

	setup();
	atexit(cleanup);

	/* r1 (chat C1) on worker-0, r2 (C2) on worker-1; r3 (C3) and the
	 * v1 run r4 wait in the queue. */
	run("r1", "v3.chat", C1);
	run("r2", "v3.chat", C2);
	run("r3", "v3.chat", C3);
	run("r4", "v1.chat", "");
	pump(3000, &n_w1, 1);
	pump(100, NULL, 0);
	T_EQ_INT(n_w0, 1);
	T_EQ_INT(n_w1, 1);
	T_EQ_INT(at_w0[0].type, MSG_RUN_ASSIGN);
	T_EQ_STR(at_w0[0].reqid, "r1");
	T_EQ_STR(at_w1[0].reqid, "r2");
	T_EQ_INT(d.d_runs.rt_qlen, 2);
	T_EQ_INT(d.d_runs.rt_ccount, 3); /* r4 has no chat id */
	r = dispatcher_run_find_chat(&d.d_runs, MSTR_LIT(C3));
	T_ASSERT(r != NULL);
	T_EQ_INT(r->r_slot, -1);

	/* Cancel of a running chat: RUN_CANCEL to its worker, with the
	 * cancel request's head (the worker answers the canceler). */
	cancel("cx1", C1);
	pump(3000, &n_w0, 2);
	T_EQ_INT(n_w0, 2);
	T_EQ_INT(at_w0[1].type, MSG_RUN_CANCEL);
	T_EQ_STR(at_w0[1].reqid, "cx1");
	T_EQ_STR(at_w0[1].reply_to, "edge");
	T_EQ_STR(at_w0[1].route, "v3.cancel");
	T_EQ_STR(at_w0[1].chat_id, C1);

	/* Cancel of a queued chat, or one nobody runs: storage. */
	cancel("cx3", C3);
	cancel("cx9", "7300000000000000099");
	pump(3000, &n_stor, 2);
	T_EQ_INT(n_stor, 2);
	T_EQ_INT(at_stor[0].type, MSG_CHAT_QUERY);
	T_EQ_STR(at_stor[0].reqid, "cx3");
	T_EQ_STR(at_stor[0].reply_to, "edge");
	T_EQ_STR(at_stor[0].route, "v3.cancel");
	T_EQ_STR(at_stor[0].chat_id, C3);
	T_EQ_STR(at_stor[1].reqid, "cx9");
	T_EQ_INT(d.d_runs.rt_qlen, 2); /* the queued run stays */

	/* The client of running r2 left: one RUN_CANCEL, answering
	 * nobody, even if the edge says so twice. */
	gone("r2", C2);
	gone("r2", C2);
	pump(3000, &n_w1, 2);
	pump(200, NULL, 0);
	T_EQ_INT(n_w1, 2);
	T_EQ_INT(at_w1[1].type, MSG_RUN_CANCEL);
	T_EQ_STR(at_w1[1].reqid, "r2");
	T_EQ_STR(at_w1[1].reply_to, "");
	T_EQ_STR(at_w1[1].chat_id, C2);

	/* The client of queued r3 left: dropped, answered to nobody, and
	 * r4 takes the next free place. */
	gone("r3", C3);
	gone("nobody", "");
	pump(300, NULL, 0);
	T_EQ_INT(d.d_runs.rt_qlen, 1);
	T_ASSERT(dispatcher_run_find_chat(&d.d_runs, MSTR_LIT(C3)) == NULL);
	T_ASSERT(dispatcher_run_find(&d.d_runs, MSTR_LIT("r3"),
	                             MSTR_LIT("edge")) == NULL);
	done(w0, "r1");
	pump(3000, &n_w0, 3);
	T_EQ_INT(n_w0, 3);
	T_EQ_INT(at_w0[2].type, MSG_RUN_ASSIGN);
	T_EQ_STR(at_w0[2].reqid, "r4");
	T_EQ_INT(d.d_runs.rt_qlen, 0);

	/* r1 is done: its chat id is forgotten, a cancel goes to storage. */
	T_ASSERT(dispatcher_run_find_chat(&d.d_runs, MSTR_LIT(C1)) == NULL);
	cancel("cx1b", C1);
	pump(3000, &n_stor, 3);
	T_EQ_INT(n_stor, 3);
	T_EQ_STR(at_stor[2].reqid, "cx1b");

	/* r2 ends after its cancel: the index is empty again. */
	done(w1, "r2");
	pump(300, NULL, 0);
	T_EQ_INT(d.d_runs.rt_ccount, 0);
	T_EQ_INT(d.d_runs.rt_count, 1); /* r4 */

	/* Nobody got an error answer. */
	T_EQ_INT(n_edge, 0);
	dispatcher_run_free(&d.d_runs);
}

T_TESTS = {
        {"cancel_and_gone", t_cancel_and_gone},
        {NULL, NULL},
};
T_MAIN
