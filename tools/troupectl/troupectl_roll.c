/* SPDX-License-Identifier: ISC */
/*
 * troupectl_roll: restarts the Troupe services one by one with systemctl.
 * Each unit is Type=notify, so `systemctl restart` returns once the new
 * process said READY=1 (or failed); roll then checks the unit is active
 * before it goes on, and stops at the first failure, so at most one
 * service is ever away.  The edge's listening socket belongs to
 * troupe-edge.socket and outlives the edge; peers resend what was in
 * flight (docs/architecture.md), so a roll under load costs no request.
 * Order: telemetry, storage, auth, dispatcher (its workers with it), edge.
 * Runs systemctl (fork + exec); never opens a mailbox.
 */
#include <sys/types.h>
#include <sys/wait.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "troupectl_roll.h"

static const char *const order[] = {"telemetry", "storage", "auth",
                                    "dispatcher", "edge"};

static const char usage_roll[] =
        "usage: troupectl roll [--services LIST] [--dry-run]\n"
        "\n"
        "Restart every Troupe service under systemd, one at a time, in the\n"
        "order telemetry, storage, auth, dispatcher, edge; each restart "
        "waits\n"
        "until the new process is ready (Type=notify) and active before the\n"
        "next begins.  Stops at the first failure (exit 1).  Needs the right\n"
        "to restart units (root).\n"
        "\n"
        "  --services LIST  a comma-separated subset (still in that order)\n"
        "  --dry-run        print the systemctl commands instead\n"
        "  -t, --timeout S  seconds to wait for each restart (default 5 is\n"
        "                   raised to 90 for roll)\n";

int
roll_plan(const char *list, const char *out[ROLL_MAX], const char **bad,
          size_t *badlen)
{
	int want[sizeof(order) / sizeof(order[0])] = {0}, n = 0;
	const char *p = list;

	if (list == NULL || *list == '\0') {
		for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++)
			out[n++] = order[i];
		return (n);
	}
	while (*p != '\0') {
		size_t len = strcspn(p, ","), i;

		for (i = 0; i < sizeof(order) / sizeof(order[0]); i++)
			if (strlen(order[i]) == len &&
			    strncmp(order[i], p, len) == 0)
				break;
		if (i == sizeof(order) / sizeof(order[0]) || want[i]) {
			*bad = p;
			*badlen = len;
			return (-1);
		}
		want[i] = 1;
		p += len;
		if (*p == ',')
			p++;
	}
	for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++)
		if (want[i])
			out[n++] = order[i];
	return (n);
}

/* Run systemctl with args; its exit status, or -1 (could not run it or
 * it took longer than timeout_s: then it is killed). */
static int
systemctl(char *const args[], double timeout_s)
{
	struct timespec t0, t;
	pid_t pid;
	int st;

	fflush(stdout);
	if ((pid = fork()) == -1)
		return (-1);
	if (pid == 0) {
		execvp("systemctl", args);
		fprintf(stderr, "troupectl: systemctl: %s\n", strerror(errno));
		_exit(127);
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);

		if (r == pid)
			break;
		if (r == -1 && errno != EINTR)
			return (-1);
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((double)(t.tv_sec - t0.tv_sec) +
		            (double)(t.tv_nsec - t0.tv_nsec) / 1e9 >
		    timeout_s) {
			kill(pid, SIGKILL);
			(void)waitpid(pid, &st, 0);
			return (-1);
		}
		usleep(20000);
	}
	return (WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

int
roll_main(int help, int argc, char **argv, const char *services, int dry_run,
          double timeout_s)
{
	const char *plan[ROLL_MAX], *bad = NULL;
	size_t badlen = 0;
	int n;

	if (help) {
		fputs(usage_roll, stdout);
		return (0);
	}
	if (argc > 0) {
		fprintf(stderr, "troupectl roll: unexpected \"%s\"\n%s",
		        argv[0], usage_roll);
		return (2);
	}
	if ((n = roll_plan(services, plan, &bad, &badlen)) == -1) {
		fprintf(stderr,
		        "troupectl roll: --services: unknown or "
		        "repeated service \"%.*s\" (want telemetry, storage, "
		        "auth, "
		        "dispatcher, edge)\n",
		        (int)badlen, bad);
		return (2);
	}
	if (timeout_s < 90)
		timeout_s = 90; /* a restart waits for READY=1 and the drain */
	for (int i = 0; i < n; i++) {
		char unit[64];
		struct timespec t0, t1;
		char *restart[] = {"systemctl", "restart", unit, NULL};
		char *active[] = {"systemctl", "is-active", "--quiet", unit,
		                  NULL};
		int rc;

		snprintf(unit, sizeof(unit), "troupe-%s.service", plan[i]);
		if (dry_run) {
			printf("systemctl restart %s\nsystemctl is-active "
			       "--quiet %s\n",
			       unit, unit);
			continue;
		}
		clock_gettime(CLOCK_MONOTONIC, &t0);
		if ((rc = systemctl(restart, timeout_s)) != 0) {
			fprintf(stderr,
			        "troupectl roll: systemctl restart %s: "
			        "%s; stopping here (see journalctl -u %s)\n",
			        unit, rc == -1 ? "did not finish" : "failed",
			        unit);
			return (1);
		}
		if (systemctl(active, 10) != 0) {
			fprintf(stderr,
			        "troupectl roll: %s is not active after "
			        "its restart; stopping here (see journalctl "
			        "-u "
			        "%s)\n",
			        unit, unit);
			return (1);
		}
		clock_gettime(CLOCK_MONOTONIC, &t1);
		printf("%s: restarted, ready after %.1f s\n", unit,
		       (double)(t1.tv_sec - t0.tv_sec) +
		               (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	}
	return (0);
}
