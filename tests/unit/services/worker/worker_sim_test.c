/* SPDX-License-Identifier: ISC */
/*
 * The worker's upstream client against the real troupe-upstream-sim on
 * 127.0.0.1 (a kernel-chosen port): answers, streamed answers, the sim's
 * [sim:...] directives for errors, deadlines, and a short burst of concurrent
 * calls over a few kept-alive connections (its rate is printed).  Skips (exit
 * 77) with the reason when the sim binary is not there: its path comes
 * from the build (UPSTREAM_SIM) or $TROUPE_UPSTREAM_SIM.
 */
#include <sys/stat.h>
#include <sys/wait.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "t.h"
#include "worker_upstream.h"

#ifndef UPSTREAM_SIM
#define UPSTREAM_SIM ""
#endif

static struct loop *lp;
static struct upstream *up;
static pid_t sim_pid = -1;
static char base[128];
static char tmpdir[] = "/tmp/troupe-worker-sim-XXXXXX";

static void
skip(const char *why)
{
	printf("skip: %s\n", why);
	exit(77);
}

static void
sim_stop(void)
{
	char path[256];
	int st;

	if (sim_pid > 0) {
		kill(sim_pid, SIGTERM);
		(void)waitpid(sim_pid, &st, 0);
		sim_pid = -1;
	}
	snprintf(path, sizeof(path), "%s/ready", tmpdir);
	(void)unlink(path);
	(void)rmdir(tmpdir);
}

static void
sim_start(void)
{
	const char *sim = getenv("TROUPE_UPSTREAM_SIM");
	char ready[256], addr[128];
	uint64_t until;
	FILE *f;

	if (sim == NULL || *sim == '\0')
		sim = UPSTREAM_SIM;
	if (*sim == '\0')
		skip("troupe-upstream-sim is not built (no UPSTREAM_SIM, no "
		     "$TROUPE_UPSTREAM_SIM)");
	if (access(sim, X_OK) == -1)
		skip("troupe-upstream-sim not executable");
	if (mkdtemp(tmpdir) == NULL)
		T_FAIL("mkdtemp: %s", strerror(errno));
	snprintf(ready, sizeof(ready), "%s/ready", tmpdir);
	if ((sim_pid = fork()) == -1)
		T_FAIL("fork: %s", strerror(errno));
	if (sim_pid == 0) {
		execl(sim, sim, "--listen", "127.0.0.1:0", "--ready-file",
		      ready, (char *)NULL);
		_exit(127);
	}
	atexit(sim_stop);
	until = now_mono_ms() + 5000;
	addr[0] = '\0';
	while (now_mono_ms() < until) {
		if ((f = fopen(ready, "r")) != NULL) {
			if (fgets(addr, sizeof(addr), f) == NULL)
				addr[0] = '\0';
			fclose(f);
			addr[strcspn(addr, "\r\n")] = '\0';
			if (addr[0] != '\0')
				break;
		}
		usleep(20000);
	}
	if (addr[0] == '\0')
		T_FAIL("the sim wrote no ready file in 5 s");
	if (strncmp(addr, "127.0.0.1:", 10) != 0)
		T_FAIL("the sim listens on %s, want 127.0.0.1", addr);
	snprintf(base, sizeof(base), "http://%s", addr);
}

struct got {
	int n;
	struct upstream_answer a;
};

static void
on_done(void *arg, struct upstream_answer *a)
{
	struct got *g = arg;

	free(g->a.content);
	g->n++;
	g->a = *a;
}

static void
setup(long connections)
{
	struct upstream_conf c = {.connections = connections,
	                          .max_body = 1 << 20,
	                          .connect_timeout_ms = 2000};

	if (sim_pid == -1)
		sim_start();
	if ((lp = loop_new()) == NULL ||
	    (up = worker_upstream_new(lp, &c)) == NULL)
		T_FAIL("setup");
}

static void
teardown(void)
{
	worker_upstream_free(up);
	loop_free(lp);
}

static void
start(const char *query, int64_t timeout_ms, struct got *g)
{
	struct buf url = {0}, body = {0};

	T_EQ_INT(worker_upstream_url(&url, MSTR(base)), 0);
	T_EQ_INT(worker_upstream_request(
	                 &body, MSTR("sim-1"), MSTR("be brief"),
	                 MSTR("{\"role\":\"user\",\"content\":\"a\"},"
	                      "{\"role\":\"assistant\",\"content\":\"b\"}"),
	                 MSTR(query)),
	         0);
	T_ASSERT(worker_upstream_start(up, url.b, &body, MSTR_NULL, MSTR_NULL,
	                               timeout_ms, on_done, g) != NULL);
	buf_free(&url);
}

static void
wait_n(const int *n, int want, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms;

	while (*n < want && now_mono_ms() < until)
		(void)loop_run_once(lp, 20);
}

static void
one(const char *query, int64_t timeout_ms, uint64_t status, int64_t code,
    const char *msg)
{
	struct got g = {0};

	start(query, timeout_ms, &g);
	wait_n(&g.n, 1, 5000);
	T_EQ_INT(g.n, 1);
	if (g.a.status != status || g.a.code != code ||
	    strncmp(g.a.msg, msg, strlen(msg)) != 0)
		T_FAIL("\"%s\": got %llu/%lld \"%s\", want %llu/%lld \"%s\"",
		       query, (unsigned long long)g.a.status,
		       (long long)g.a.code, g.a.msg,
		       (unsigned long long)status, (long long)code, msg);
	if (status == 200 && (g.a.content == NULL || g.a.content_len == 0))
		T_FAIL("\"%s\": empty answer", query);
	free(g.a.content);
}

static void
t_sim_answers(void)
{
	setup(8);
	one("hello", 5000, 200, 0, "");
	one("[sim:429] [sim:retry-after=3]", 5000, 503, 5030,
	    "upstream rate limited");
	one("[sim:status=500]", 5000, 502, 5020, "upstream status 500");
	one("[sim:garbage]", 5000, 502, 5020,
	    "upstream returned an invalid answer");
	one("[sim:close]", 5000, 502, 5020, "upstream unreachable: ");
	one("[sim:delay=2000]", 300, 504, 5040, "upstream deadline exceeded");
	/* And the client is still fine after all that. */
	one("hello again", 5000, 200, 0, "");
	teardown();
}

static void
t_sim_retry_after(void)
{
	struct got g = {0};

	setup(8);
	start("[sim:429] [sim:retry-after=3]", 5000, &g);
	wait_n(&g.n, 1, 5000);
	T_EQ_INT(g.a.status, 503);
	T_EQ_INT(g.a.retry_after, 3);
	T_EQ_INT(g.a.http_status, 429);
	teardown();
}

static void
t_sim_burst(void)
{
	enum { TOTAL = 4000, WINDOW = 64 };
	static struct got g[WINDOW];
	int started = 0, done = 0, bad = 0;
	uint64_t t0, ms;

	setup(16);
	memset(g, 0, sizeof(g));
	t0 = now_mono_ms();
	while (done < TOTAL && now_mono_ms() - t0 < 20000) {
		for (int i = 0; i < WINDOW; i++) {
			if (g[i].n == 1) {
				if (g[i].a.status != 200)
					bad++;
				free(g[i].a.content);
				g[i].a.content = NULL;
				g[i].n = 0;
				done++;
				if (started < TOTAL) {
					start("hi", 5000, &g[i]);
					started++;
				} else
					g[i].n = -1;
			} else if (g[i].n == 0 && started < TOTAL &&
			           started < WINDOW) {
				start("hi", 5000, &g[i]);
				started++;
			}
		}
		(void)loop_run_once(lp, 10);
	}
	ms = now_mono_ms() - t0;
	T_EQ_INT(done, TOTAL);
	T_EQ_INT(bad, 0);
	printf("  %d calls, %d in flight, 16 connections: %llu ms, %.0f/s\n",
	       TOTAL, WINDOW, (unsigned long long)ms,
	       ms ? TOTAL * 1000.0 / (double)ms : 0.0);
	teardown();
}

/* --- streams --- */

struct sgot {
	int deltas;
	size_t len; /* content length at the last delta */
	struct got g;
};

static void
on_delta(void *arg, const char *content, size_t len)
{
	struct sgot *s = arg;

	(void)content;
	if (len <= s->len)
		T_FAIL("delta: content went from %zu to %zu bytes", s->len,
		       len);
	s->len = len;
	s->deltas++;
}

static void
on_sdone(void *arg, struct upstream_answer *a)
{
	struct sgot *s = arg;

	on_done(&s->g, a);
}

static void
sone(const char *query, uint64_t status, const char *msg, const char *content)
{
	struct buf url = {0}, body = {0};
	struct sgot s = {0};

	T_EQ_INT(worker_upstream_url(&url, MSTR(base)), 0);
	T_EQ_INT(worker_upstream_request_stream(&body, MSTR("sim-1"),
	                                        MSTR("be brief"), MSTR_NULL,
	                                        MSTR_NULL, MSTR(query)),
	         0);
	T_ASSERT(worker_upstream_start_stream(up, url.b, &body, MSTR_NULL,
	                                      MSTR_NULL, 5000, on_delta,
	                                      on_sdone, &s) != NULL);
	buf_free(&url);
	wait_n(&s.g.n, 1, 5000);
	T_EQ_INT(s.g.n, 1);
	if (s.g.a.status != status || strncmp(s.g.a.msg, msg, strlen(msg)))
		T_FAIL("\"%s\": got %llu \"%s\", want %llu \"%s\"", query,
		       (unsigned long long)s.g.a.status, s.g.a.msg,
		       (unsigned long long)status, msg);
	if (content == NULL)
		T_ASSERT(s.g.a.content == NULL);
	else
		T_EQ_STR(s.g.a.content ? s.g.a.content : "(null)", content);
	if (s.g.a.content != NULL)
		T_EQ_INT(s.len, s.g.a.content_len);
	free(s.g.a.content);
	s.g.a.content = NULL;
}

static void
t_sim_stream(void)
{
	setup(8);
	sone("hello", 200, "",
	     "sim: messages=2 system=1 context=0 model=sim-1 query=hello");
	sone("[sim:garbage]", 502, "upstream returned an invalid answer",
	     NULL);
	sone("[sim:cut=2] a b c", 502,
	     "upstream unreachable: ", "sim: messages=2");
	sone("[sim:status=500]", 502, "upstream status 500", NULL);
	sone("[sim:429]", 503, "upstream rate limited", NULL);
	sone("[sim:close]", 502, "upstream unreachable: ", NULL);
	sone("after", 200, "",
	     "sim: messages=2 system=1 context=0 model=sim-1 query=after");
	teardown();
}

T_TESTS = {
        {"sim_answers", t_sim_answers},
        {"sim_retry_after", t_sim_retry_after},
        {"sim_burst", t_sim_burst},
        {"sim_stream", t_sim_stream},
        {NULL, NULL},
};
T_MAIN
