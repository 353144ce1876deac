/* SPDX-License-Identifier: ISC */
/*
 * ipc_bench: the cost of one envelope hop through common/ipc.c between two
 * real processes, one at a time and with a window of envelopes in flight.
 * The parent re-executes itself as the echo peer, so both sides are fresh
 * processes.  Prints envelope round trips per second, CPU µs per hop (both
 * processes, from getrusage and /proc), and envelopes per nng message.
 *
 *	troupe-ipc-bench [seconds per window]  (default 3)
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conf.h"
#include "ipc.h"
#include "loop.h"
#include "mpk.h"

static struct ipc *ipc;
static uint64_t got;

static int
body_pack(msgpack_packer *pk, const void *v)
{
	/* ~200 bytes like a chat request */
	static const char pad[160] = { 'x' };

	return (msgpack_pack_array(pk, 2) ||
	    msgpack_pack_uint64(pk, *(const uint64_t *)v) ||
	    mpk_pack_mstr(pk, (struct mstr){ pad, sizeof(pad) }) ? -1 : 0);
}

static void
echo_handler(void *arg, const struct msg *m)
{
	struct msg_head h = { m->reqid, m->traceparent, m->deadline_ms,
		MSTR_LIT("bench-echo") };
	uint64_t v = m->seq;

	(void)arg;
	(void)ipc_send(ipc, "bench-main", 0x7001, &h, body_pack, &v);
}

static void
main_handler(void *arg, const struct msg *m)
{
	(void)arg;
	(void)m;
	got++;
}

static void
on_fd(struct loop *l, int fd, uint32_t ev, void *arg)
{
	(void)l;
	(void)fd;
	(void)ev;
	(void)arg;
	ipc_process(ipc);
}

static double
cpu_us(int who)
{
	struct rusage ru;

	getrusage(who, &ru);
	return (ru.ru_utime.tv_sec * 1e6 + ru.ru_utime.tv_usec +
	    ru.ru_stime.tv_sec * 1e6 + ru.ru_stime.tv_usec);
}

/* CPU time of a running child, from /proc (getrusage only counts the
 * children that have exited); -1 if unreadable. */
static double
child_cpu_us(pid_t pid)
{
	char p[64];
	unsigned long ut, st;
	FILE *f;

	snprintf(p, sizeof(p), "/proc/%d/stat", (int)pid);
	if ((f = fopen(p, "r")) == NULL)
		return (-1);
	if (fscanf(f, "%*d %*s %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u "
	    "%lu %lu", &ut, &st) != 2) {
		fclose(f);
		return (-1);
	}
	fclose(f);
	return ((double)(ut + st) * 1e6 / (double)sysconf(_SC_CLK_TCK));
}

int
main(int argc, char **argv)
{
	static const int windows[] = { 1, 16, 64, 256 };
	struct loop *l = loop_new();
	char err[256], dir[] = "/tmp/troupe-ipc-bench-XXXXXX";
	struct msg_head h = { MSTR_LIT("bench"), MSTR_NULL, 0,
		MSTR_LIT("bench-main") };
	int secs = argc > 1 ? atoi(argv[1]) : 3;
	pid_t pid;

	if (argc > 2 && strcmp(argv[2], "echo") == 0) {
		if ((ipc = ipc_open("bench-echo", echo_handler, NULL, err,
		    sizeof(err))) == NULL)
			return (1);
		loop_fd_add(l, ipc_fd(ipc), EPOLLIN, on_fd, NULL);
		for (;;) {
			loop_run_once(l, IPC_TICK_MS);
			ipc_tick(ipc);
			if (getppid() == 1)
				return (0);
		}
	}
	if (mkdtemp(dir) == NULL)
		return (1);
	setenv("TROUPE_IPC_RUNDIR", dir, 1);
	if ((pid = fork()) == 0) {
		char s[16];
		snprintf(s, sizeof(s), "%d", secs);
		execl("/proc/self/exe", argv[0], s, "echo", (char *)NULL);
		_exit(127);
	}
	if ((ipc = ipc_open("bench-main", main_handler, NULL, err,
	    sizeof(err))) == NULL) {
		fprintf(stderr, "ipc_open: %s\n", err);
		return (1);
	}
	loop_fd_add(l, ipc_fd(ipc), EPOLLIN, on_fd, NULL);
	printf("%-8s %12s %14s %14s\n", "window", "round trips/s",
	    "CPU us/hop", "env/nng msg");
	for (size_t w = 0; w < sizeof(windows) / sizeof(windows[0]); w++) {
		uint64_t sent = 0, t0, t1, last = 0;
		double c0s, c0c, c1s, c1c;
		struct ipc_stats s0, s1;

		got = 0;
		/* warm up: one round trip */
		ipc_send(ipc, "bench-echo", 0x7001, &h, body_pack, &sent);
		sent++;
		while (got < 1) {
			loop_run_once(l, IPC_TICK_MS);
			ipc_tick(ipc);
		}
		got = sent = 0;
		ipc_stats(ipc, &s0);
		c0s = cpu_us(RUSAGE_SELF);
		if ((c0c = child_cpu_us(pid)) < 0)
			return (1);
		t0 = now_mono_ms();
		while ((t1 = now_mono_ms()) - t0 < (uint64_t)secs * 1000) {
			while (sent - got < (uint64_t)windows[w]) {
				ipc_send(ipc, "bench-echo", 0x7001, &h,
				    body_pack, &sent);
				sent++;
			}
			loop_run_once(l, 1);
			if (t1 - last >= IPC_TICK_MS) {
				ipc_tick(ipc);
				last = t1;
			}
		}
		c1s = cpu_us(RUSAGE_SELF);
		if ((c1c = child_cpu_us(pid)) < 0)
			return (1);
		ipc_stats(ipc, &s1);
		printf("%-8d %12.0f %14.1f %14.1f\n", windows[w],
		    got * 1000.0 / (double)(t1 - t0),
		    ((c1s - c0s) + (c1c - c0c)) / (2.0 * (double)got),
		    (double)(s1.env_in - s0.env_in) /
		    (double)((s1.nngmsg_in - s0.nngmsg_in) ?
		    (s1.nngmsg_in - s0.nngmsg_in) : 1));
		/* drain */
		uint64_t until = now_mono_ms() + 500;
		while (now_mono_ms() < until) {
			loop_run_once(l, 5);
			ipc_tick(ipc);
		}
	}
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	ipc_close(ipc);
	return (0);
}
