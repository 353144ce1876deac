/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_admit_test: the admission of dispatcher_admit.c on a hand
 * built dispatcher (no children, no mailboxes; config through the
 * TROUPE_DISPATCHER_* environment).  A run of an unknown bot is admitted;
 * RUN_DONE teaches the bot's upstream; a 429 with Retry-After pauses the
 * bot (aimd) or the whole upstream (fixed) for that long and cuts the
 * limit; another bot stays untouched under aimd; queued runs of a key are
 * counted so a new run never passes them; the rate estimate and the JSON
 * of troupectl status follow.
 */
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "ratelimit.h"
#include "t.h"

#define UP "http://127.0.0.1:9/v1/chat/completions"

static struct dispatcher d;
static struct svc s;

static void
setup(const char *policy)
{
	char err[256];

	setenv("TROUPE_DISPATCHER_POLICY", policy, 1);
	memset(&d, 0, sizeof(d));
	memset(&s, 0, sizeof(s));
	s.name = "dispatcher";
	T_ASSERT((s.loop = loop_new()) != NULL);
	d.d_svc = &s;
	d.d_loop = s.loop;
	d.d_min = 2;
	d.d_max = 10;
	d.d_per_child = 4;
	d.d_queue_max = 100;
	T_EQ_INT(dispatcher_run_init(&d.d_runs), 0);
	if (dispatcher_admit_init(&d, err, sizeof(err)) == -1)
		T_FAIL("admit_init: %s", err);
}

static void
teardown(void)
{
	dispatcher_admit_free(&d);
	dispatcher_run_free(&d.d_runs);
	loop_free(s.loop);
}

static struct run *
run_of(const char *bot)
{
	struct run *r =
	        dispatcher_run_new(MSTR_LIT("req"), MSTR_NULL,
	                           MSTR_LIT("edge"), MSTR_NULL, 0, NULL, 0);

	T_ASSERT(r != NULL);
	dispatcher_admit_classify(&d, r, MSTR(bot));
	return (r);
}

static void
done(const char *bot, uint64_t http, int throttled, uint64_t backoff)
{
	struct run *r = run_of(bot);
	struct run_done dn = {
	        .status = throttled ? 0 : 200,
	        .upstream = MSTR_LIT(UP),
	        .upstream_status = http,
	        .upstream_us = 100000,
	        .bot_id = MSTR(bot),
	        .rl_seen =
	                throttled ? RL_SEEN_STATUS | RL_SEEN_RETRY_AFTER : 0,
	        .throttled = (uint64_t)throttled,
	        .backoff_ms = backoff,
	        .rl_remaining = -1,
	        .rl_limit = -1,
	        .rl_reset_ms = -1,
	};

	dispatcher_admit_done(&d, r, &dn);
	free(r);
}

static void
t_aimd_per_bot(void)
{
	struct run *a, *b, *u, *x[5];
	uint64_t now;
	struct buf j = {0};

	setup("aimd");
	now = loop_now(d.d_loop);
	u = run_of("a");
	T_EQ_INT(u->r_up, -1); /* not seen yet: admitted */
	T_ASSERT(dispatcher_admit_ok(&d, u, now));
	T_EQ_INT(dispatcher_admit_ceiling(&d), 10); /* no upstream yet */
	free(u);
	done("a", 200, 0, 0);
	done("b", 200, 0, 0);
	a = run_of("a");
	b = run_of("b");
	T_ASSERT(a->r_up >= 0 && a->r_bot >= 0);
	T_EQ_INT(a->r_up, b->r_up);
	T_ASSERT(dispatcher_admit_ok(&d, a, now));
	/* 5 of a's runs in flight, then a 429 with Retry-After: 2 s */
	for (int i = 0; i < 5; i++) {
		x[i] = run_of("a");
		dispatcher_admit_start(&d, x[i]);
	}
	done("a", 429, 1, 2000);
	T_ASSERT(!dispatcher_admit_ok(&d, a, now));
	T_ASSERT(dispatcher_admit_wait(&d, a, now) > 1900);
	T_ASSERT(dispatcher_admit_ok(&d, b, now)); /* b untouched */
	T_EQ_INT(dispatcher_admit_wait(&d, b, now), 0);
	/* after the pause: the limit is 5 x 0.7 = 3, 5 still in flight */
	T_ASSERT(!dispatcher_admit_ok(&d, a, now + 2001));
	for (int i = 0; i < 3; i++)
		dispatcher_admit_end(&d, x[i]);
	T_ASSERT(dispatcher_admit_ok(&d, a, now + 2001));
	dispatcher_admit_end(&d, x[3]); /* twice: counted once */
	dispatcher_admit_end(&d, x[3]);
	for (int i = 0; i < 5; i++)
		free(x[i]);
	/* the key's queued runs are counted */
	T_ASSERT(dispatcher_admit_keyq(&d, a) != NULL);
	T_ASSERT(dispatcher_admit_keyq(&d, a) != dispatcher_admit_keyq(&d, b));
	/* the JSON has both bots, a with its signal */
	T_EQ_INT(dispatcher_admit_json(&d, &j), 0);
	T_ASSERT(buf_add(&j, "", 1) == 0);
	T_ASSERT(strstr(j.b, "\"kind\":\"http_429\"") != NULL);
	T_ASSERT(strstr(j.b, "\"policy\":\"aimd\"") != NULL);
	T_ASSERT(strstr(j.b, UP) != NULL);
	buf_free(&j);
	free(a);
	free(b);
	teardown();
}

static void
t_fixed_per_upstream(void)
{
	struct run *a, *b;
	uint64_t now;

	setup("fixed");
	now = loop_now(d.d_loop);
	done("a", 200, 0, 0);
	done("b", 200, 0, 0);
	T_EQ_INT(dispatcher_admit_ceiling(&d), 10); /* starts open */
	done("a", 429, 1, 1000);
	a = run_of("a");
	b = run_of("b");
	/* the whole upstream waits, and 30 % fewer children */
	T_ASSERT(!dispatcher_admit_ok(&d, a, now));
	T_ASSERT(!dispatcher_admit_ok(&d, b, now));
	T_ASSERT(dispatcher_admit_wait(&d, b, now) > 900);
	T_EQ_INT(dispatcher_admit_ceiling(&d), 7);
	T_ASSERT(dispatcher_admit_ok(&d, b, now + 1001));
	/* an exhausted quota on a success is a signal in fixed */
	{
		struct run_done dn = {.status = 200,
		                      .upstream = MSTR_LIT(UP),
		                      .upstream_status = 200,
		                      .bot_id = MSTR_LIT("a"),
		                      .rl_seen = RL_SEEN_OPENAI,
		                      .rl_remaining = 0,
		                      .rl_limit = 20,
		                      .rl_reset_ms = -1};

		dispatcher_admit_done(&d, a, &dn);
		T_EQ_INT(dispatcher_admit_ceiling(&d), 4);
		/* so is a timeout: 4 -> 2, the floor */
		dn.status = 504;
		dn.upstream_status = 0;
		dn.rl_seen = RL_SEEN_TIMEOUT;
		dn.rl_remaining = -1;
		dispatcher_admit_done(&d, a, &dn);
		T_EQ_INT(dispatcher_admit_ceiling(&d), 2);
	}
	free(a);
	free(b);
	teardown();
}

/* A v1 run handed back (status 0) for a worker's own pause: the key is
 * paused for that long without a cut. */
static void
t_worker_pause(void)
{
	struct run *a;
	uint64_t now;

	setup("aimd");
	now = loop_now(d.d_loop);
	done("a", 200, 0, 0);
	a = run_of("a");
	{
		struct run_done dn = {.status = 0,
		                      .upstream = MSTR_LIT(UP),
		                      .bot_id = MSTR_LIT("a"),
		                      .backoff_ms = 1500,
		                      .rl_remaining = -1,
		                      .rl_limit = -1,
		                      .rl_reset_ms = -1};

		dispatcher_admit_done(&d, a, &dn);
	}
	T_ASSERT(!dispatcher_admit_ok(&d, a, now));
	T_ASSERT(dispatcher_admit_wait(&d, a, now) > 1400);
	T_EQ_INT(dispatcher_admit_ceiling(&d), 10); /* no cut */
	free(a);
	teardown();
}

T_TESTS = {
        {"aimd_per_bot", t_aimd_per_bot},
        {"fixed_per_upstream", t_fixed_per_upstream},
        {"worker_pause", t_worker_pause},
        {NULL, NULL},
};
T_MAIN
