/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_scale_test: the default scaling policy of services/
 * dispatcher/dispatcher_scale.c.  Grow by one when every ready child is
 * full, but not while a child is starting or waiting to restart, nor
 * past max; shrink by one only after 30 s in which nothing was queued and
 * the runs in flight would fit in one child fewer at half its limit;
 * never below min.
 */
#include "dispatcher.h"
#include "t.h"

static struct scale_obs
obs(int target, int pending, int full, size_t queued, uint64_t inflight)
{
	struct scale_obs o = {
	        .so_target = target,
	        .so_min = 2,
	        .so_max = 5,
	        .so_pending = pending,
	        .so_full = full,
	        .so_queued = queued,
	        .so_inflight = inflight,
	        .so_per_child = 256,
	};

	return (o);
}

static int
decide(struct scale_policy *p, struct scale_obs o, uint64_t now)
{
	const char *cause = NULL;
	int t = dispatcher_scale_policy(p, &o, now, &cause);

	/* A change always says why; no change says nothing. */
	if (t != o.so_target && cause == NULL)
		T_FAIL("target %d -> %d without a cause", o.so_target, t);
	if (t == o.so_target && cause != NULL)
		T_FAIL("no change but cause \"%s\"", cause);
	return (t);
}

static void
t_grow_when_full(void)
{
	struct scale_policy p = {0};

	T_EQ_INT(decide(&p, obs(2, 0, 1, 0, 512), 1000), 3);
	/* Queued runs mean full too (the tick sees them). */
	T_EQ_INT(decide(&p, obs(3, 0, 0, 7, 768), 1000), 4);
}

static void
t_grow_one_at_a_time(void)
{
	struct scale_policy p = {0};

	/* A child is starting (or restarting after a crash): wait. */
	T_EQ_INT(decide(&p, obs(3, 1, 1, 10, 512), 1000), 3);
	T_EQ_INT(decide(&p, obs(3, 2, 1, 10, 512), 1000), 3);
}

static void
t_grow_stops_at_max(void)
{
	struct scale_policy p = {0};

	T_EQ_INT(decide(&p, obs(5, 0, 1, 100, 1280), 1000), 5);
	T_EQ_INT(decide(&p, obs(4, 0, 1, 100, 1024), 1000), 5);
}

static void
t_shrink_after_30s(void)
{
	struct scale_policy p = {0};
	uint64_t t0 = 5000;

	/* 4 children, 384 runs: fits 3 children at half load (384). */
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 384), t0), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 384), t0 + 10000), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 384), t0 + 29999), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 384), t0 + 30000), 3);
	/* The next step needs another 30 s (and 256 fits 2 at half). */
	T_EQ_INT(decide(&p, obs(3, 0, 0, 0, 256), t0 + 30001), 3);
	T_EQ_INT(decide(&p, obs(3, 0, 0, 0, 256), t0 + 59999), 3);
	T_EQ_INT(decide(&p, obs(3, 0, 0, 0, 256), t0 + 60000), 2);
}

static void
t_no_shrink_when_busy(void)
{
	struct scale_policy p = {0};

	/* 385 runs do not fit 3 children at half (384). */
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 385), 1000), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 385), 100000), 4);
	T_EQ_INT(p.sp_low_since, 0);
}

static void
t_spike_restarts_the_wait(void)
{
	struct scale_policy p = {0};

	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 10), 1000), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 10), 20000), 4);
	/* A moment of load (or a queued run) resets the quiet spell. */
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 500), 25000), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 10), 26000), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 10), 31000), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 10), 55999), 4);
	T_EQ_INT(decide(&p, obs(4, 0, 0, 0, 10), 56000), 3);
	T_EQ_INT(decide(&p, obs(3, 0, 0, 0, 10), 57000), 3);
	T_EQ_INT(decide(&p, obs(3, 0, 0, 1, 10), 70000), 4);
	T_EQ_INT(p.sp_low_since, 0);
}

static void
t_never_below_min(void)
{
	struct scale_policy p = {0};

	T_EQ_INT(decide(&p, obs(2, 0, 0, 0, 0), 1000), 2);
	T_EQ_INT(decide(&p, obs(2, 0, 0, 0, 0), 1000000), 2);
}

static void
t_idle_at_zero_does_not_grow(void)
{
	struct scale_policy p = {0};
	struct scale_obs o = obs(0, 0, 0, 0, 0);

	/* workers_min 0: no demand, no child. */
	o.so_min = 0;
	T_EQ_INT(decide(&p, o, 1000), 0);
	o.so_full = 1;
	T_EQ_INT(decide(&p, o, 2000), 1);
}

T_TESTS = {
        {"grow_when_full", t_grow_when_full},
        {"grow_one_at_a_time", t_grow_one_at_a_time},
        {"grow_stops_at_max", t_grow_stops_at_max},
        {"shrink_after_30s", t_shrink_after_30s},
        {"no_shrink_when_busy", t_no_shrink_when_busy},
        {"spike_restarts_the_wait", t_spike_restarts_the_wait},
        {"never_below_min", t_never_below_min},
        {"idle_at_zero_does_not_grow", t_idle_at_zero_does_not_grow},
        {NULL, NULL},
};
T_MAIN
