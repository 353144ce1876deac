/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_tier_test: the degradation tier machine of services/
 * dispatcher/dispatcher_tier.c (tier_step), driven through time with
 * made-up inputs.  A level is entered only after its condition held
 * enter_ms and left only after it was clear leave_ms (a blip does
 * neither); the highest active level wins; L1 from an SLA breach, the
 * queue's low mark or storage latency; L2 from HEALTH (PostgreSQL or
 * Redis down, spool replaying), never from a stale HEALTH; L3 from the
 * queue's high mark or an SLA breach that persists while the queue
 * grows; every tier says why.
 */
#include <string.h>

#include "dispatcher_tier.h"
#include "t.h"

static struct tier_conf
conf(void)
{
	struct tier_conf c;

	tier_conf_default(&c);
	c.enter_ms = 2000;
	c.leave_ms = 10000;
	c.queue_low_pct = 10;
	c.queue_high_pct = 50;
	c.dep_latency_us = 1000000;
	return (c);
}

static struct tier_input
healthy(uint64_t now)
{
	struct tier_input in;

	memset(&in, 0, sizeof(in));
	in.now_ms = now;
	in.qmax = 100;
	in.health = 1;
	in.pg_ok = 1;
	in.redis_ok = 1;
	return (in);
}

/* Step every 250 ms (the dispatcher's tick) from *now to until with the
 * same inputs; returns how many steps changed the tier. */
static int
run(struct tier_fsm *f, const struct tier_conf *c, struct tier_input in,
    uint64_t *now, uint64_t until)
{
	int changes = 0;

	for (; *now <= until; *now += 250) {
		in.now_ms = *now;
		changes += tier_step(f, c, &in);
	}
	return (changes);
}

static void
t_marks(void)
{
	T_EQ_INT(tier_queue_mark(100, 10), 10);
	T_EQ_INT(tier_queue_mark(20, 50), 10);
	T_EQ_INT(tier_queue_mark(3, 10), 1); /* never 0 with a queue */
	T_EQ_INT(tier_queue_mark(0, 50), 0); /* no queue, no mark */
	T_EQ_STR(tier_name(0), "L0");
	T_EQ_STR(tier_name(3), "L3");
	T_EQ_STR(tier_name(7), "L?");
}

static void
t_steady_l0(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	uint64_t now = 1000;

	tier_init(&f, now);
	T_EQ_INT(run(&f, &c, healthy(now), &now, 60000), 0);
	T_EQ_INT(f.tier, 0);
	T_EQ_STR(f.cause, "");
}

static void
t_l2_enter_after_hold(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000;

	tier_init(&f, now);
	in = healthy(now);
	in.pg_ok = 0;
	/* Held 1750 ms: not yet. */
	T_EQ_INT(run(&f, &c, in, &now, 2750), 0);
	T_EQ_INT(f.tier, 0);
	T_EQ_INT(f.cond[2], 1);
	/* 2000 ms: entered, once. */
	T_EQ_INT(run(&f, &c, in, &now, 3000), 1);
	T_EQ_INT(f.tier, 2);
	T_EQ_INT(f.since_ms, 3000);
	T_EQ_STR(f.cause, "postgres down");
	T_EQ_INT(run(&f, &c, in, &now, 20000), 0);
	T_EQ_INT(f.tier, 2);
}

static void
t_l2_blip_ignored(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000;

	tier_init(&f, now);
	in = healthy(now);
	in.redis_ok = 0;
	/* Down 1.5 s, up 0.25 s, down 1.5 s: never 2 s in a row. */
	T_EQ_INT(run(&f, &c, in, &now, 2500), 0);
	T_EQ_INT(run(&f, &c, healthy(now), &now, now), 0);
	T_EQ_INT(run(&f, &c, in, &now, now + 1500), 0);
	T_EQ_INT(f.tier, 0);
}

static void
t_l2_leave_after_clear(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000, back;

	tier_init(&f, now);
	in = healthy(now);
	in.pg_ok = 0;
	in.redis_ok = 0;
	T_EQ_INT(run(&f, &c, in, &now, 5000), 1);
	T_EQ_STR(f.cause, "postgres and redis down");
	/* Back at 5250: still L2 at 15000 (clear 9750 ms), L0 at 15250. */
	back = now;
	T_EQ_INT(run(&f, &c, healthy(now), &now, back + 9750), 0);
	T_EQ_INT(f.tier, 2);
	/* A relapse restarts the clear time. */
	T_EQ_INT(run(&f, &c, in, &now, now), 0);
	back = now; /* the first clear step */
	T_EQ_INT(run(&f, &c, healthy(now), &now, back + 9750), 0);
	T_EQ_INT(f.tier, 2);
	T_EQ_INT(run(&f, &c, healthy(now), &now, back + 10000), 1);
	T_EQ_INT(f.tier, 0);
	T_EQ_STR(f.cause, "");
}

static void
t_l2_spool_and_stale_health(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000;

	tier_init(&f, now);
	in = healthy(now);
	in.spool_bytes = 4096; /* PostgreSQL back, spool replaying */
	T_EQ_INT(run(&f, &c, in, &now, 4000), 1);
	T_EQ_INT(f.tier, 2);
	T_EQ_STR(f.cause, "storage replays its spool (4096 bytes left)");

	/* A stale HEALTH (storage gone) says nothing either way. */
	tier_init(&f, now);
	in = healthy(now);
	in.pg_ok = 0;
	in.health = 0;
	T_EQ_INT(run(&f, &c, in, &now, now + 30000), 0);
	T_EQ_INT(f.tier, 0);
	T_EQ_INT(f.cond[2], 0);
}

static void
t_l1_causes(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000;

	/* The queue above its low mark (10 of 100). */
	tier_init(&f, now);
	in = healthy(now);
	in.qlen = 11;
	T_EQ_INT(run(&f, &c, in, &now, 3000), 1);
	T_EQ_INT(f.tier, 1);
	T_EQ_STR(f.cause, "run queue 11 of 100 above the low mark 10");
	/* At the mark is not above it. */
	tier_init(&f, now);
	in.qlen = 10;
	T_EQ_INT(run(&f, &c, in, &now, now + 30000), 0);

	/* An SLA breach. */
	tier_init(&f, now);
	in = healthy(now);
	in.sla_breach = 1;
	in.sla_service = "auth";
	in.sla_p99_us = 30000;
	in.sla_threshold_us = 20000;
	T_EQ_INT(run(&f, &c, in, &now, now + 2000), 1);
	T_EQ_INT(f.tier, 1);
	T_EQ_STR(f.cause,
	         "SLA breach: auth run-queue p99 30000 us > 20000 us");
	/* A breach with a steady queue is not L3. */
	in.qlen = 5;
	T_EQ_INT(run(&f, &c, in, &now, now + 20000), 0);
	T_EQ_INT(f.tier, 1);

	/* Storage's commits slow. */
	tier_init(&f, now);
	in = healthy(now);
	in.dep_latency_us = 1500000;
	T_EQ_INT(run(&f, &c, in, &now, now + 2000), 1);
	T_EQ_STR(f.cause, "storage commit p99 1500 ms above 1000 ms");
}

static void
t_l3_queue_high(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000;

	tier_init(&f, now);
	in = healthy(now);
	in.qlen = 51;
	/* L1 and L3 hold together: after 2 s the tier is L3 at once, not
	 * L1 first. */
	T_EQ_INT(run(&f, &c, in, &now, 2750), 0);
	T_EQ_INT(run(&f, &c, in, &now, 3000), 1);
	T_EQ_INT(f.tier, 3);
	T_EQ_STR(f.cause, "run queue 51 of 100 above the high mark 50");
	/* The queue drains to 20 (still above the low mark): L3 leaves
	 * after 10 s to L1, which has held all along. */
	in.qlen = 20;
	T_EQ_INT(run(&f, &c, in, &now, now + 9500), 0);
	T_EQ_INT(f.tier, 3);
	T_EQ_INT(run(&f, &c, in, &now, now + 500), 1);
	T_EQ_INT(f.tier, 1);
	T_EQ_STR(f.cause, "run queue 20 of 100 above the low mark 10");
	/* Empty: L1 leaves 10 s later. */
	in.qlen = 0;
	T_EQ_INT(run(&f, &c, in, &now, now + 11000), 1);
	T_EQ_INT(f.tier, 0);
}

static void
t_l3_sla_queue_growing(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000, t;

	tier_init(&f, now);
	in = healthy(now);
	in.sla_breach = 1;
	in.sla_service = "worker";
	in.sla_p99_us = 50000;
	in.sla_threshold_us = 20000;
	/* The queue grows by one a second, staying below both marks' L3
	 * part (high mark 50). */
	for (t = now; t <= 12000; t += 250) {
		in.now_ms = t;
		in.qlen = (size_t)(t / 1000);
		(void)tier_step(&f, &c, &in);
	}
	T_EQ_INT(f.tier, 3);
	T_ASSERT(strstr(f.cause, "with the run queue growing") != NULL);
	T_ASSERT(strstr(f.cause, "worker") != NULL);
	/* The breach ends: L3 (and L1) leave 10 s after. */
	now = t;
	in = healthy(now);
	T_EQ_INT(run(&f, &c, in, &now, now + 9750), 0);
	T_EQ_INT(f.tier, 3);
	T_EQ_INT(run(&f, &c, in, &now, now + 250), 1);
	T_EQ_INT(f.tier, 0);
}

static void
t_highest_wins(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;
	uint64_t now = 1000;

	tier_init(&f, now);
	in = healthy(now);
	in.qlen = 20; /* L1 */
	T_EQ_INT(run(&f, &c, in, &now, 3000), 1);
	T_EQ_INT(f.tier, 1);
	in.pg_ok = 0; /* and L2 */
	T_EQ_INT(run(&f, &c, in, &now, now + 2000), 1);
	T_EQ_INT(f.tier, 2);
	T_EQ_STR(f.cause, "postgres down");
	in.pg_ok = 1; /* L2 clears; L1 still holds */
	T_EQ_INT(run(&f, &c, in, &now, now + 10000), 1);
	T_EQ_INT(f.tier, 1);
}

static void
t_zero_delays(void)
{
	struct tier_conf c = conf();
	struct tier_fsm f;
	struct tier_input in;

	c.enter_ms = 0;
	c.leave_ms = 0;
	tier_init(&f, 0);
	in = healthy(5);
	in.pg_ok = 0;
	T_EQ_INT(tier_step(&f, &c, &in), 1);
	T_EQ_INT(f.tier, 2);
	in = healthy(6);
	T_EQ_INT(tier_step(&f, &c, &in), 1);
	T_EQ_INT(f.tier, 0);
}

T_TESTS = {
        {"marks", t_marks},
        {"steady_l0", t_steady_l0},
        {"l2_enter_after_hold", t_l2_enter_after_hold},
        {"l2_blip_ignored", t_l2_blip_ignored},
        {"l2_leave_after_clear", t_l2_leave_after_clear},
        {"l2_spool_and_stale_health", t_l2_spool_and_stale_health},
        {"l1_causes", t_l1_causes},
        {"l3_queue_high", t_l3_queue_high},
        {"l3_sla_queue_growing", t_l3_sla_queue_growing},
        {"highest_wins", t_highest_wins},
        {"zero_delays", t_zero_delays},
        {NULL, NULL},
};
T_MAIN
