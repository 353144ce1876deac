/* SPDX-License-Identifier: ISC */
/*
 * edge_tier_test: the edge's view of the degradation tier (services/edge/
 * edge_tier.c, included whole).  No TIER_STATE means L0; a state not
 * refreshed for EDGE_TIER_STALE_MS is forgotten; /readyz says ready with
 * the tier in L0-L2 and 503 degraded with the cause and Retry-After in L3;
 * in L3 a new chat is shed once l3_inflight chats are open, or, with
 * l3_inflight 0, once as many are open as when L3 began; never outside
 * L3.
 */
#include "../../../../services/edge/edge_tier.c"

#include "t.h"

static struct tier_state
ts(uint64_t tier, const char *cause, uint64_t ra)
{
	struct tier_state s = {
	        .tier = tier,
	        .cause = MSTR(cause),
	        .retry_after = ra,
	        .since_ms = 1700000000000ULL,
	};

	return (s);
}

static const char *
readyz(uint64_t now, int *status, uint64_t *ra)
{
	static struct buf b;

	buf_reset(&b);
	*status = edge_tier_readyz(&b, now, ra);
	T_ASSERT(buf_add(&b, "", 1) == 0);
	return (b.b);
}

static void
t_l0_default_and_stale(void)
{
	struct tier_state s = ts(2, "postgres down", 10);
	uint64_t ra = 0;
	int st;

	memset(&ET, 0, sizeof(ET));
	T_EQ_INT(edge_tier_now(5000), 0);
	T_EQ_STR(readyz(5000, &st, &ra),
	         "{\"status\":\"ready\",\"tier\":\"L0\"}");
	T_EQ_INT(st, 200);
	edge_tier_set(&s, 6000);
	T_EQ_INT(edge_tier_now(6000), 2);
	T_EQ_STR(readyz(6000, &st, &ra),
	         "{\"status\":\"ready\",\"tier\":\"L2\",\"cause\":\"postgres "
	         "down\",\"since_ms\":1700000000000}");
	T_EQ_INT(st, 200);
	T_EQ_INT(edge_tier_now(6000 + EDGE_TIER_STALE_MS), 2);
	T_EQ_INT(edge_tier_now(6001 + EDGE_TIER_STALE_MS), 0);
}

static void
t_l3_readyz(void)
{
	struct tier_state s = ts(3, "run queue 11 of 20 above \"high\"", 7);
	uint64_t ra = 0;
	int st;

	memset(&ET, 0, sizeof(ET));
	edge_tier_set(&s, 1000);
	T_EQ_STR(readyz(1000, &st, &ra),
	         "{\"status\":\"degraded\",\"tier\":\"L3\",\"cause\":\"run "
	         "queue 11 of 20 above \\\"high\\\"\",\"since_ms\":"
	         "1700000000000}");
	T_EQ_INT(st, 503);
	T_EQ_INT(ra, 7);
}

static void
t_shed_fixed_limit(void)
{
	struct tier_state l3 = ts(3, "x", 4), l2 = ts(2, "y", 4);
	uint64_t ra = 0;

	memset(&ET, 0, sizeof(ET));
	edge_tier_limit(5);
	/* Not L3: never. */
	edge_tier_set(&l2, 1000);
	T_EQ_INT(edge_tier_shed(1000, 1000, &ra), 0);
	edge_tier_set(&l3, 2000);
	T_EQ_INT(edge_tier_shed(4, 2000, &ra), 0);
	T_EQ_INT(edge_tier_shed(5, 2000, &ra), 1);
	T_EQ_INT(ra, 4);
	/* L3 forgotten (stale): admitted again. */
	T_EQ_INT(edge_tier_shed(50, 2001 + EDGE_TIER_STALE_MS, &ra), 0);
}

static void
t_shed_auto_limit(void)
{
	struct tier_state l3 = ts(3, "x", 2), l0 = ts(0, "", 2);
	uint64_t ra = 0;

	memset(&ET, 0, sizeof(ET));
	edge_tier_limit(0);
	edge_tier_set(&l3, 1000);
	/* 12 open at the first look in L3: that is the limit. */
	T_EQ_INT(edge_tier_shed(12, 1000, &ra), 1);
	T_EQ_INT(edge_tier_shed(11, 1100, &ra), 0);
	T_EQ_INT(edge_tier_shed(13, 1200, &ra), 1);
	/* A refresh of L3 keeps it; leaving L3 forgets it. */
	edge_tier_set(&l3, 2000);
	T_EQ_INT(edge_tier_shed(11, 2000, &ra), 0);
	edge_tier_set(&l0, 3000);
	T_EQ_INT(edge_tier_shed(100, 3000, &ra), 0);
	edge_tier_set(&l3, 4000);
	T_EQ_INT(edge_tier_shed(3, 4000, &ra), 1);
	T_EQ_INT(edge_tier_shed(2, 4000, &ra), 0);
}

T_TESTS = {
        {"l0_default_and_stale", t_l0_default_and_stale},
        {"l3_readyz", t_l3_readyz},
        {"shed_fixed_limit", t_shed_fixed_limit},
        {"shed_auto_limit", t_shed_auto_limit},
        {NULL, NULL},
};
T_MAIN
