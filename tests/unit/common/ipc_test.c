/* SPDX-License-Identifier: ISC */
/*
 * ipc_test: two real mailboxes on ipc:// sockets in a temporary run
 * directory, driven by one real loop.  Checks ordering, batching, acks
 * freeing the backlog, that a receiver's restart loses nothing queued, and
 * that a dialer stuck in a handshake nobody answers is replaced, and that a
 * connection on which nothing is ever acknowledged is replaced too.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>

#include "conf.h"
#include "ipc.h"
#include "loop.h"
#include "mpk.h"
#include "t.h"

struct rx {
	uint64_t n;	  /* envelopes handled */
	uint64_t last;	  /* last value seen */
	int in_order;
	uint64_t seen[20001];
};

static int
u64_pack(msgpack_packer *pk, const void *v)
{
	return (msgpack_pack_array(pk, 1) ||
	    msgpack_pack_uint64(pk, *(const uint64_t *)v) ? -1 : 0);
}

static void
rx_handler(void *arg, const struct msg *m)
{
	struct rx *rx = arg;
	struct mpk_cur c;
	uint32_t n;
	uint64_t v;

	mpk_cur_init(&c, m->body, m->body_len);
	if (mpk_read_array(&c, &n) == -1 || mpk_read_u64(&c, &v) == -1)
		return;
	if (v != rx->last + 1)
		rx->in_order = 0;
	rx->last = v;
	if (v < nitems(rx->seen))
		rx->seen[v]++;
	rx->n++;
}

static void
null_handler(void *arg, const struct msg *m)
{
	(void)arg;
	(void)m;
}

static char rundir[] = "/tmp/troupe-ipc-test-XXXXXX";

static void
setup(void)
{
	static int done;

	if (done)
		return;
	T_ASSERT(mkdtemp(rundir) != NULL);
	setenv("TROUPE_IPC_RUNDIR", rundir, 1);
	done = 1;
}

/* Pump both mailboxes until cond or ms pass. */
static void
pump(struct ipc *a, struct ipc *b, uint64_t ms, const uint64_t *n,
    uint64_t want)
{
	uint64_t until = now_mono_ms() + ms, last = 0;

	while (now_mono_ms() < until && (n == NULL || *n < want)) {
		if (a)
			ipc_process(a);
		if (b)
			ipc_process(b);
		if (now_mono_ms() - last >= IPC_TICK_MS) {
			if (a)
				ipc_tick(a);
			if (b)
				ipc_tick(b);
			last = now_mono_ms();
		}
		usleep(200);
	}
}

static void
t_order_and_batching(void)
{
	static struct rx rx = { .in_order = 1 };
	struct msg_head h = { MSTR_LIT("r1"), MSTR_NULL, 0, MSTR_LIT("a") };
	struct ipc_stats st;
	struct ipc *a, *b;
	char err[256];

	setup();
	a = ipc_open("ta", null_handler, NULL, err, sizeof(err));
	T_ASSERT(a != NULL);
	b = ipc_open("tb", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(b != NULL);
	for (uint64_t i = 1; i <= 20000; i++)
		T_EQ_INT(ipc_send(a, "tb", 0x7777, &h, u64_pack, &i), 0);
	pump(a, b, 10000, &rx.n, 20000);
	T_EQ_INT(rx.n, 20000);
	T_ASSERT(rx.in_order);
	ipc_stats(b, &st);
	/* 20000 envelopes sent in a burst must share nng messages. */
	if (st.nngmsg_in * 4 > st.env_in)
		T_FAIL("got %llu nng messages for %llu envelopes, want batches",
		    (unsigned long long)st.nngmsg_in,
		    (unsigned long long)st.env_in);
	/* Acks arrive on the next ticks and empty the backlog. */
	pump(a, b, 300, NULL, 0);
	T_EQ_INT(ipc_backlog(a, "tb"), 0);
	ipc_close(a);
	ipc_close(b);
}

static void
t_receiver_restart(void)
{
	static struct rx rx = { .in_order = 1 };
	static struct rx rx2 = { .in_order = 1 };
	struct msg_head h = { MSTR_LIT("r2"), MSTR_NULL, 0, MSTR_LIT("a") };
	struct ipc *a, *b;
	char err[256];
	uint64_t i;

	setup();
	a = ipc_open("tc", null_handler, NULL, err, sizeof(err));
	T_ASSERT(a != NULL);
	b = ipc_open("td", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(b != NULL);
	for (i = 1; i <= 100; i++)
		T_EQ_INT(ipc_send(a, "td", 0x7777, &h, u64_pack, &i), 0);
	pump(a, b, 5000, &rx.n, 100);
	T_EQ_INT(rx.n, 100);
	/* The receiver goes away; what is sent meanwhile waits. */
	ipc_close(b);
	for (; i <= 300; i++)
		T_EQ_INT(ipc_send(a, "td", 0x7777, &h, u64_pack, &i), 0);
	pump(a, NULL, 300, NULL, 0);
	T_ASSERT(ipc_backlog(a, "td") >= 200);
	b = ipc_open("td", rx_handler, &rx2, err, sizeof(err));
	T_ASSERT(b != NULL);
	pump(a, b, 8000, NULL, 0);
	for (uint64_t v = 101; v <= 300; v++)
		if (rx2.seen[v] != 1)
			T_FAIL("value %llu delivered %llu times after restart, "
			    "want 1", (unsigned long long)v,
			    (unsigned long long)rx2.seen[v]);
	T_EQ_INT(ipc_backlog(a, "td"), 0);
	ipc_close(a);
	ipc_close(b);
}

static void
t_second_instance_refused(void)
{
	struct ipc *a, *b;
	char err[256];

	setup();
	a = ipc_open("te", null_handler, NULL, err, sizeof(err));
	T_ASSERT(a != NULL);
	b = ipc_open("te", null_handler, NULL, err, sizeof(err));
	T_ASSERT(b == NULL);
	T_ASSERT(strstr(err, "another process") != NULL);
	ipc_close(a);
}

static void
t_forgotten_link_starts_anew(void)
{
	static struct rx rx = { .in_order = 1 };
	struct msg_head h = { MSTR_LIT("r3"), MSTR_NULL, 0, MSTR_LIT("a") };
	struct ipc *a, *b;
	char err[256];
	uint64_t i;

	setup();
	a = ipc_open("tf", null_handler, NULL, err, sizeof(err));
	b = ipc_open("tg", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(a != NULL && b != NULL);
	for (i = 1; i <= 5; i++)
		T_EQ_INT(ipc_send(a, "tg", 0x7777, &h, u64_pack, &i), 0);
	pump(a, b, 5000, &rx.n, 5);
	T_EQ_INT(rx.n, 5);
	/* A re-created link numbers from 1 again: the receiver must not
	 * take its envelopes for duplicates of the old link's. */
	ipc_forget(a, "tg");
	for (; i <= 8; i++)
		T_EQ_INT(ipc_send(a, "tg", 0x7777, &h, u64_pack, &i), 0);
	pump(a, b, 5000, &rx.n, 8);
	T_EQ_INT(rx.n, 8);
	pump(a, b, 300, NULL, 0);
	T_EQ_INT(ipc_backlog(a, "tg"), 0);
	ipc_close(a);
	ipc_close(b);
}

static int
big_pack(msgpack_packer *pk, const void *v)
{
	static char blob[1 << 20];

	return (msgpack_pack_array(pk, 2) ||
	    msgpack_pack_uint64(pk, *(const uint64_t *)v) ||
	    mpk_pack_mstr(pk, (struct mstr){ blob, sizeof(blob) }) ? -1 : 0);
}

static void
flush_hook(void *arg)
{
	(void)arg; /* flushed by the tick */
}

static void
t_big_backlog_is_split(void)
{
	static struct rx rx = { .in_order = 1 };
	struct msg_head h = { MSTR_LIT("r4"), MSTR_NULL, 0, MSTR_LIT("a") };
	struct ipc *a, *b;
	char err[256];

	setup();
	a = ipc_open("th", null_handler, NULL, err, sizeof(err));
	b = ipc_open("ti", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(a != NULL && b != NULL);
	/* 70 MiB queued in one turn would be one nng message over the
	 * receiver's 64 MiB limit if it were not cut into batches. */
	ipc_set_flush_hook(a, flush_hook, NULL);
	for (uint64_t i = 1; i <= 70; i++)
		T_EQ_INT(ipc_send(a, "ti", 0x7777, &h, big_pack, &i), 0);
	pump(a, b, 15000, &rx.n, 70);
	T_EQ_INT(rx.n, 70);
	T_ASSERT(rx.in_order);
	ipc_close(a);
	ipc_close(b);
}

/* Run ipc_peer_dial (as user, or as ourselves if NULL) against url. */
static int
stranger(const char *user, const char *url)
{
	char cmd[1024];

	/* The build tree may be out of the other user's reach (a checkout
	 * under /root): run a copy from the run directory. */
	if (user)
		snprintf(cmd, sizeof(cmd),
		    "install -m 0755 %s %s/ipc_peer_dial && "
		    "runuser -u %s -- %s/ipc_peer_dial %s", IPC_PEER_DIAL,
		    rundir, user, rundir, url);
	else
		snprintf(cmd, sizeof(cmd), "%s %s", IPC_PEER_DIAL, url);
	return (system(cmd));
}

static void
t_other_users_refused(void)
{
	static struct rx rx = { .in_order = 1 };
	struct ipc_stats st;
	struct ipc *b;
	char err[256], url[512], path[512];

	setup();
	if (geteuid() != 0 || access("/sbin/runuser", X_OK) != 0) {
		printf("  skipped: needs root and runuser to act as another "
		    "user (CI runs as root)\n");
		return;
	}
	b = ipc_open("tj", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(b != NULL);
	T_EQ_INT(ipc_url("tj", url, sizeof(url)), 0);
	/* Open the path up so that only ipc's own check stands between a
	 * stranger and the mailbox. */
	snprintf(path, sizeof(path), "%s", url + strlen("ipc://"));
	T_EQ_INT(chmod(rundir, 0755), 0);
	T_EQ_INT(chmod(path, 0777), 0);
	/* Control: our own user gets through. */
	T_EQ_INT(stranger(NULL, url), 0);
	pump(NULL, b, 2000, &rx.n, 1);
	T_EQ_INT(rx.n, 1);
	/* Another user is refused. */
	T_EQ_INT(stranger("nobody", url), 0);
	pump(NULL, b, 700, NULL, 0);
	T_EQ_INT(rx.n, 1);
	ipc_stats(b, &st);
	T_ASSERT(st.refused_peers >= 1);
	chmod(rundir, 0700);
	ipc_close(b);
}

/* A peer's path first holds a listener that never accepts (a wedged or
 * stopped process): our dialer's handshake hangs there, and nng would wait
 * 10 s before it tried again.  Once a live mailbox takes the path, the
 * envelopes must arrive within a few seconds: the link replaces a dialer
 * that has had no pipe for IPC_REDIAL_MS. */
static void
t_stuck_handshake_redials(void)
{
	static struct rx rx = { .in_order = 1 };
	struct msg_head h = { MSTR_LIT("r5"), MSTR_NULL, 0, MSTR_LIT("a") };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct ipc_stats st;
	struct ipc *a, *b;
	char url[512], err[256];
	uint64_t i, t0;
	int fd;

	setup();
	T_EQ_INT(ipc_url("tl", url, sizeof(url)), 0);
	T_ASSERT(strncmp(url, "ipc://", 6) == 0);
	T_ASSERT(strlen(url + 6) < sizeof(sa.sun_path));
	memcpy(sa.sun_path, url + 6, strlen(url + 6) + 1);
	T_ASSERT((fd = socket(AF_UNIX, SOCK_STREAM, 0)) != -1);
	T_EQ_INT(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	T_EQ_INT(listen(fd, 16), 0);
	a = ipc_open("tk", null_handler, NULL, err, sizeof(err));
	T_ASSERT(a != NULL);
	for (i = 1; i <= 5; i++)
		T_EQ_INT(ipc_send(a, "tl", 0x7777, &h, u64_pack, &i), 0);
	pump(a, NULL, 300, NULL, 0);	/* connected, handshake pending */
	T_ASSERT(!ipc_connected(a, "tl"));
	/* The wedged listener keeps its socket; a live mailbox takes the
	 * path. */
	T_EQ_INT(unlink(sa.sun_path), 0);
	b = ipc_open("tl", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(b != NULL);
	t0 = now_mono_ms();
	pump(a, b, 6000, &rx.n, 5);
	T_EQ_INT(rx.n, 5);
	ipc_stats(a, &st);
	T_ASSERT(st.redials >= 1);
	printf("    delivered %llu ms after the mailbox came up, %llu "
	    "redials\n", (unsigned long long)(now_mono_ms() - t0),
	    (unsigned long long)st.redials);
	close(fd);
	ipc_close(a);
	ipc_close(b);
}

/* A peer's path first holds an nng socket that takes our pipe and never
 * acknowledges (a listener whose accept loop died after the handshake,
 * nng #1518, looks so from our side): the pipe stays up, so only the
 * missing acks tell.  Once a live mailbox takes the path, the envelopes
 * must arrive: the link replaces a connection with nothing acknowledged
 * for IPC_STALL_MS. */
static void
t_silent_pipe_redials(void)
{
	static struct rx rx = { .in_order = 1 };
	struct msg_head h = { MSTR_LIT("r6"), MSTR_NULL, 0, MSTR_LIT("a") };
	struct ipc_stats st;
	struct ipc *a, *b;
	char url[512], err[256];
	nng_socket sink;
	uint64_t i, t0;

	setup();
	T_EQ_INT(ipc_url("tn", url, sizeof(url)), 0);
	T_EQ_INT(nng_pull0_open(&sink), 0);
	T_EQ_INT(nng_listen(sink, url, NULL, 0), 0);
	a = ipc_open("tm", null_handler, NULL, err, sizeof(err));
	T_ASSERT(a != NULL);
	for (i = 1; i <= 5; i++)
		T_EQ_INT(ipc_send(a, "tn", 0x7777, &h, u64_pack, &i), 0);
	pump(a, NULL, 500, NULL, 0);
	T_ASSERT(ipc_connected(a, "tn"));
	T_EQ_INT(ipc_backlog(a, "tn"), 5);
	/* The silent socket keeps its pipe; a live mailbox takes the
	 * path. */
	T_EQ_INT(unlink(url + strlen("ipc://")), 0);
	b = ipc_open("tn", rx_handler, &rx, err, sizeof(err));
	T_ASSERT(b != NULL);
	t0 = now_mono_ms();
	pump(a, b, 8000, &rx.n, 5);
	T_EQ_INT(rx.n, 5);
	/* Each once; a batch left pending on the old pipe may arrive
	 * before the resent ones, so not necessarily in order. */
	for (uint64_t v = 1; v <= 5; v++)
		if (rx.seen[v] != 1)
			T_FAIL("value %llu delivered %llu times, want 1",
			    (unsigned long long)v,
			    (unsigned long long)rx.seen[v]);
	pump(a, b, 300, NULL, 0);
	T_EQ_INT(ipc_backlog(a, "tn"), 0);
	ipc_stats(a, &st);
	T_ASSERT(st.stalls >= 1);
	printf("    delivered %llu ms after the mailbox came up, %llu "
	    "stalls\n", (unsigned long long)(now_mono_ms() - t0),
	    (unsigned long long)st.stalls);
	ipc_close(a);
	ipc_close(b);
	nng_close(sink);
}

T_TESTS = {
	{ "silent_pipe_redials", t_silent_pipe_redials },
	{ "other_users_refused", t_other_users_refused },
	{ "forgotten_link_starts_anew", t_forgotten_link_starts_anew },
	{ "big_backlog_is_split", t_big_backlog_is_split },
	{ "order_and_batching", t_order_and_batching },
	{ "receiver_restart", t_receiver_restart },
	{ "second_instance_refused", t_second_instance_refused },
	{ "stuck_handshake_redials", t_stuck_handshake_redials },
	{ NULL, NULL },
};
T_MAIN
