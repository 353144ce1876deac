/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_limit_test: the rate-limit policies on a made-up clock.
 * fixed: the source design's numbers exactly (cut 30 %, floor 2, pause
 * until Retry-After, double after 5 s of quiet, ceiling 50); aimd: a
 * throttle cuts, answers grow by one per round trip, latency over twice
 * the minimum backs off, one key's throttles leave another key alone.
 */
#include "dispatcher_limit.h"
#include "t.h"
#include "util.h"

static void
t_fixed_cut_pause_double(void)
{
	struct limit_conf c;
	struct limit_state s;
	struct limit_obs thr = {.throttled = 1, .backoff_ms = 3000};
	const char *cause = NULL;
	uint64_t now = 1000;

	limit_conf_default(&c, LIMIT_FIXED, 10);
	limit_init(&s, &c, now);
	T_EQ_INT(s.children, 2);
	/* grow from 2 by doubling after each 5 s of quiet: 4 8 16 32 50 */
	for (int want = 4; want <= 50; want = want * 2 > 50 ? 50 : want * 2) {
		T_EQ_INT(limit_on_tick(&s, &c, now + 4999, &cause), 0);
		now += 5000;
		T_EQ_INT(limit_on_tick(&s, &c, now, &cause), 1);
		T_EQ_INT(s.children, want);
		if (want == 50)
			break;
	}
	T_EQ_INT(limit_on_tick(&s, &c, now + 60000, &cause), 0); /* ceiling */
	T_EQ_INT(limit_value(&s), 500);
	/* a 429 with Retry-After: 3 s: 50 -> 35, paused 3 s */
	T_EQ_INT(limit_on_result(&s, &c, &thr, now, &cause), 1);
	T_ASSERT(cause != NULL);
	T_EQ_INT(s.children, 35);
	T_ASSERT(!limit_admit(&s, 0, now + 2999));
	T_EQ_INT(limit_wait_ms(&s, now + 1000), 2000);
	T_ASSERT(limit_admit(&s, 0, now + 3000));
	T_ASSERT(!limit_admit(&s, 350, now + 3000));
	/* more 429s: 35 24 16 11 7 4 2 2 (floor) */
	{
		static const int seq[] = {24, 16, 11, 7, 4, 2, 2};

		for (size_t i = 0; i < nitems(seq); i++) {
			(void)limit_on_result(&s, &c, &thr, now, &cause);
			T_EQ_INT(s.children, seq[i]);
		}
	}
	/* no doubling until 5 s after the last signal */
	T_EQ_INT(limit_on_tick(&s, &c, now + 4999, &cause), 0);
	T_EQ_INT(limit_on_tick(&s, &c, now + 5000, &cause), 1);
	T_EQ_INT(s.children, 4);
	/* answers without a signal change nothing in fixed */
	{
		struct limit_obs ok = {.latency_us = 1000};

		T_EQ_INT(limit_on_result(&s, &c, &ok, now + 5001, &cause), 0);
		T_EQ_INT(s.children, 4);
	}
}

static void
t_aimd(void)
{
	struct limit_conf c;
	struct limit_state a, b;
	struct limit_obs ok = {.latency_us = 10000};
	struct limit_obs thr = {.throttled = 1, .backoff_ms = 1000};
	struct limit_obs slow = {.latency_us = 100000};
	struct limit_obs fast = {.latency_us = 100};
	struct limit_obs queued = {.latency_us = 20000};
	struct limit_state f;
	const char *cause = NULL;
	uint64_t now = 1000, before;

	limit_conf_default(&c, LIMIT_AIMD, 10);
	limit_init(&a, &c, now);
	limit_init(&b, &c, now);
	T_EQ_INT(limit_value(&a), 20);
	/* additive increase: one per round trip (21 answers) -> 21 */
	for (int i = 0; i < 20; i++)
		(void)limit_on_result(&a, &c, &ok, ++now, &cause);
	T_EQ_INT(limit_value(&a), 20);
	T_EQ_INT(limit_on_result(&a, &c, &ok, ++now, &cause), 1);
	T_EQ_INT(limit_value(&a), 21);
	/* multiplicative decrease and a pause on a's throttle only */
	T_EQ_INT(limit_on_result(&a, &c, &thr, now, &cause), 1);
	T_EQ_INT(limit_value(&a), 14);
	T_ASSERT(!limit_admit(&a, 0, now + 999));
	T_ASSERT(limit_admit(&a, 13, now + 1000));
	T_ASSERT(!limit_admit(&a, 14, now + 1000));
	T_EQ_INT(limit_value(&b), 20);
	T_ASSERT(limit_admit(&b, 0, now));
	/* latency gradient: over 2 x the minimum -> x 0.9, once per RTT */
	before = limit_value(&b);
	(void)limit_on_result(&b, &c, &ok, now, &cause);
	T_EQ_INT(limit_on_result(&b, &c, &slow, now + 1, &cause), 1);
	T_EQ_INT(limit_value(&b), (uint64_t)(before * 0.9));
	before = limit_value(&b);
	(void)limit_on_result(&b, &c, &slow, now + 2, &cause);
	T_ASSERT(limit_value(&b) >= before); /* not again within the RTT */
	/* a fast upstream whose answers take 200 x its best under load (the
	 * gateway's own queueing) but under latency_floor_ms more: no cut */
	limit_init(&f, &c, now);
	before = limit_value(&f);
	(void)limit_on_result(&f, &c, &fast, now, &cause);
	for (int i = 0; i < 1000; i++)
		(void)limit_on_result(&f, &c, &queued, now + 1 + i, &cause);
	T_ASSERT(limit_value(&f) >= before);
	/* a second throttle within the round trip: paused, not cut */
	before = limit_value(&a);
	T_EQ_INT(limit_on_result(&a, &c, &thr, now + 50, &cause), 1);
	T_EQ_INT(limit_value(&a), before);
	T_ASSERT(!limit_admit(&a, 0, now + 1049));
	/* never below limit_min */
	for (int i = 0; i < 50; i++) {
		now += 200;
		(void)limit_on_result(&a, &c, &thr, now, &cause);
	}
	T_EQ_INT(limit_value(&a), 1);
	/* children follow the sum of the limits */
	{
		struct limit_state v[2] = {a, b};

		T_EQ_INT(limit_children(&c, v, 2),
		         (int)((limit_value(&a) + limit_value(&b) + 9) / 10));
	}
}

/* The dispatcher's setting: fresh keys start open (fixed: children_max;
 * aimd: limit_max), and an aimd cut starts from the runs in flight. */
static void
t_start_open_and_inflight_cut(void)
{
	struct limit_conf c;
	struct limit_state s;
	struct limit_obs thr = {
	        .throttled = 1, .backoff_ms = 1000, .inflight = 20};
	const char *cause = NULL;

	limit_conf_default(&c, LIMIT_FIXED, 4);
	c.children_start = c.children_max;
	limit_init(&s, &c, 1000);
	T_EQ_INT(s.children, 50);
	T_EQ_INT(limit_value(&s), 200);
	limit_conf_default(&c, LIMIT_AIMD, 4);
	c.children_start = c.children_max;
	limit_init(&s, &c, 1000);
	T_EQ_INT(limit_value(&s), 200);
	/* 20 in flight when the 429 came: 20 x 0.7 = 14, not 140 */
	T_EQ_INT(limit_on_result(&s, &c, &thr, 2000, &cause), 1);
	T_EQ_INT(limit_value(&s), 14);
	T_EQ_INT(limit_wait_ms(&s, 2000), 1000);
}

T_TESTS = {
        {"start_open_and_inflight_cut", t_start_open_and_inflight_cut},
        {"fixed_cut_pause_double", t_fixed_cut_pause_double},
        {"aimd", t_aimd},
        {NULL, NULL},
};
T_MAIN
