/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_spawn_test: the pure parts of services/dispatcher/
 * dispatcher_spawn.c: the restart back-off (100 ms doubling to 10 s, back
 * to 100 ms after a 30 s life), the slot of a mailbox name, the worker's
 * command line and the environment children get (no NOTIFY_SOCKET, no
 * WATCHDOG_*, no LISTEN_*), and the default worker path.
 */
#include <limits.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"
#include "t.h"

static void
t_backoff_doubles(void)
{
	static const uint64_t want[] = {100,  200,  400,   800,   1600,
	                                3200, 6400, 10000, 10000, 10000};
	uint64_t prev = 0;

	for (size_t i = 0; i < nitems(want); i++) {
		prev = dispatcher_spawn_backoff(prev, 50);
		T_EQ_INT(prev, want[i]);
	}
}

static void
t_backoff_reset_after_long_life(void)
{
	/* 29.999 s is not long enough; 30 s is. */
	T_EQ_INT(dispatcher_spawn_backoff(3200, 29999), 6400);
	T_EQ_INT(dispatcher_spawn_backoff(3200, 30000), 100);
	T_EQ_INT(dispatcher_spawn_backoff(10000, 3600000), 100);
	/* A fork failure counts as a zero-length life. */
	T_EQ_INT(dispatcher_spawn_backoff(100, 0), 200);
	T_EQ_INT(dispatcher_spawn_backoff(0, 0), 100);
}

static void
t_slot_of(void)
{
	static const struct {
		const char *name;
		int max, want;
	} c[] = {
	        {"worker-0", 50, 0},       {"worker-7", 50, 7},
	        {"worker-49", 50, 49},     {"worker-50", 50, -1},
	        {"worker-255", 256, 255},  {"worker-256", 256, -1},
	        {"worker-1000", 2000, -1}, {"worker-01", 50, -1},
	        {"worker-00", 50, -1},     {"worker-", 50, -1},
	        {"worker", 50, -1},        {"worker-x", 50, -1},
	        {"worker-1a", 50, -1},     {"worker--1", 50, -1},
	        {"workers-1", 50, -1},     {"Worker-1", 50, -1},
	        {"auth", 50, -1},          {"", 50, -1},
	};

	for (size_t i = 0; i < nitems(c); i++) {
		int got = dispatcher_spawn_slot_of(MSTR(c[i].name), c[i].max);
		if (got != c[i].want)
			T_FAIL("slot_of(\"%s\", %d): got %d, want %d",
			       c[i].name, c[i].max, got, c[i].want);
	}
}

static void
t_slot_of_unterminated(void)
{
	/* Names point into nng messages: only n bytes count. */
	const char buf[] = "worker-12345";

	T_EQ_INT(dispatcher_spawn_slot_of((struct mstr){buf, 9}, 50), 12);
	T_EQ_INT(dispatcher_spawn_slot_of((struct mstr){buf, 8}, 50), 1);
}

static void
t_argv(void)
{
	char path[] = "/usr/bin/troupe-worker", cfg[] = "/etc/t.conf",
	     name[] = "worker-3", empty[] = "";
	char *argv[8];

	memset(argv, 0xa5, sizeof(argv));
	T_EQ_INT(dispatcher_spawn_argv(argv, path, cfg, name, 0), 5);
	T_EQ_STR(argv[0], "/usr/bin/troupe-worker");
	T_EQ_STR(argv[1], "-c");
	T_EQ_STR(argv[2], "/etc/t.conf");
	T_EQ_STR(argv[3], "-n");
	T_EQ_STR(argv[4], "worker-3");
	T_ASSERT(argv[5] == NULL);

	T_EQ_INT(dispatcher_spawn_argv(argv, path, cfg, name, 1), 6);
	T_EQ_STR(argv[5], "-d");
	T_ASSERT(argv[6] == NULL);

	/* No config file: no -c (the worker falls back as we did). */
	T_EQ_INT(dispatcher_spawn_argv(argv, path, empty, name, 1), 4);
	T_EQ_STR(argv[1], "-n");
	T_EQ_STR(argv[2], "worker-3");
	T_EQ_STR(argv[3], "-d");
	T_ASSERT(argv[4] == NULL);
	T_EQ_INT(dispatcher_spawn_argv(argv, path, NULL, name, 0), 3);
	T_ASSERT(argv[3] == NULL);
}

static void
t_env_filter(void)
{
	char *env[] = {"PATH=/bin",
	               "NOTIFY_SOCKET=/run/systemd/notify",
	               "TROUPE_IPC_RUNDIR=/tmp/x",
	               "WATCHDOG_USEC=30000000",
	               "WATCHDOG_PID=1",
	               "LISTEN_PID=1",
	               "LISTEN_FDS=1",
	               "LISTEN_FDNAMES=edge",
	               "NOTIFY_SOCKETS=keep",
	               "XNOTIFY_SOCKET=keep",
	               "HOME=/root",
	               NULL};
	static const char *const want[] = {
	        "PATH=/bin", "TROUPE_IPC_RUNDIR=/tmp/x", "NOTIFY_SOCKETS=keep",
	        "XNOTIFY_SOCKET=keep", "HOME=/root"};
	char **out;
	size_t n = 0;

	T_ASSERT((out = dispatcher_spawn_env(env)) != NULL);
	while (out[n] != NULL)
		n++;
	T_EQ_INT(n, nitems(want));
	for (size_t i = 0; i < n; i++)
		T_EQ_STR(out[i], want[i]);
	free(out);

	T_ASSERT((out = dispatcher_spawn_env(NULL)) != NULL);
	T_ASSERT(out[0] == NULL);
	free(out);
}

static void
t_default_path(void)
{
	char got[PATH_MAX], exe[PATH_MAX], want[PATH_MAX + 32];
	ssize_t n;

	T_EQ_INT(dispatcher_spawn_default_path(got, sizeof(got)), 0);
	T_ASSERT((n = readlink("/proc/self/exe", exe, sizeof(exe) - 1)) > 0);
	exe[n] = '\0';
	*strrchr(exe, '/') = '\0';
	snprintf(want, sizeof(want), "%s/troupe-worker", exe);
	T_EQ_STR(got, want);
	/* Too small a buffer is an error, not a truncated path. */
	T_EQ_INT(dispatcher_spawn_default_path(got, 8), -1);
}

T_TESTS = {
        {"backoff_doubles", t_backoff_doubles},
        {"backoff_reset_after_long_life", t_backoff_reset_after_long_life},
        {"slot_of", t_slot_of},
        {"slot_of_unterminated", t_slot_of_unterminated},
        {"argv", t_argv},
        {"env_filter", t_env_filter},
        {"default_path", t_default_path},
        {NULL, NULL},
};
T_MAIN
