/* SPDX-License-Identifier: ISC */
/*
 * telemetry_sla_test: the SLA signal's arithmetic (services/telemetry/
 * telemetry_sla.c).  The p99 of a log2 run-queue histogram, linear within
 * its slot (slot 0 is [0, 2) us, slot k is [2^k, 2^(k+1)) us, the last
 * slot its lower bound), and the sum of a service's per-second counts
 * over a window of the heat ring (seconds outside the window or already
 * overwritten are not counted).  Also the page's troupe_degradation_tier:
 * the highest of the dispatcher's tier and storage's L2.
 */
#include <stdlib.h>
#include <string.h>

#include "t.h"
#include "telemetry.h"
#include "telemetry_sla.h"

static void
t_p99_empty(void)
{
	uint64_t c[HEAT_SLOTS] = {0}, n = 7;

	T_EQ_INT(sla_p99_us(c, &n), 0);
	T_EQ_INT(n, 0);
}

static void
t_p99_one_slot(void)
{
	uint64_t c[HEAT_SLOTS] = {0}, n;

	/* 100 events in [1024, 2048) us: rank 99 of 100 within the slot. */
	c[10] = 100;
	T_EQ_INT(sla_p99_us(c, &n), 1024 + 1024 * 99 / 100);
	T_EQ_INT(n, 100);
	/* Slot 0 is [0, 2): rank 10 of 10 is its top. */
	memset(c, 0, sizeof(c));
	c[0] = 10;
	T_EQ_INT(sla_p99_us(c, &n), 2);
}

static void
t_p99_tail(void)
{
	uint64_t c[HEAT_SLOTS] = {0}, n;

	/* 990 fast (8..16 us) and 10 slow (32..64 ms): rank 990 is the last
	 * fast one, so the p99 is the top of the fast slot. */
	c[3] = 990;
	c[15] = 10;
	T_EQ_INT(sla_p99_us(c, &n), 16);
	T_EQ_INT(n, 1000);
	/* One more slow one: rank 991 falls in the slow slot. */
	c[15] = 11;
	T_EQ_INT(sla_p99_us(c, &n), 32768 + 32768 * 1 / 11);
	/* The last slot is open: its lower bound. */
	memset(c, 0, sizeof(c));
	c[HEAT_SLOTS - 1] = 5;
	T_EQ_INT(sla_p99_us(c, &n), 1ULL << (HEAT_SLOTS - 1));
}

static void
put(struct heat *h, int id, int64_t sec, int slot, uint64_t n)
{
	uint64_t c[HEAT_SLOTS] = {0};

	c[slot] = n;
	T_EQ_INT(heat_add(h, id, sec, HEAT_RUNQ, c, 0), 0);
	/* Off-CPU counts never count. */
	c[slot] = 1000;
	T_EQ_INT(heat_add(h, id, sec, HEAT_OFFCPU, c, 0), 0);
}

static void
t_window(void)
{
	struct heat h;
	uint64_t out[HEAT_SLOTS];
	int a, b;

	T_EQ_INT(heat_init(&h, 10), 0);
	a = heat_id(&h, "edge");
	b = heat_id(&h, "auth");
	put(&h, a, 100, 3, 5);
	put(&h, a, 101, 3, 7);
	put(&h, a, 103, 12, 2);
	put(&h, b, 103, 1, 9);
	/* (100, 103]: 101 and 103 (102 is empty, 100 is outside). */
	T_EQ_INT(sla_window(&h, a, 100, 103, out), 3);
	T_EQ_INT(out[3], 7);
	T_EQ_INT(out[12], 2);
	T_EQ_INT(out[1], 0);
	/* The ring's first second (100) made the 9 before it valid and
	 * empty: (98, 103] finds 5 seconds. */
	T_EQ_INT(sla_window(&h, b, 98, 103, out), 5);
	T_EQ_INT(out[1], 9);
	T_EQ_INT(out[3], 0);
	/* The ring (10 s) moved on to 102..111: 100 and 101 are gone. */
	heat_advance(&h, 111);
	T_EQ_INT(sla_window(&h, a, 95, 111, out), 10);
	T_EQ_INT(out[3], 0);
	T_EQ_INT(out[12], 2);
	/* Unknown ids sum nothing. */
	T_EQ_INT(sla_window(&h, 42, 95, 111, out), 0);
	T_EQ_INT(out[12], 0);
	heat_free(&h);
}

/* troupe_degradation_tier on a page of these two reports. */
static int
page_tier(const char *storage, const char *dispatcher)
{
	struct telemetry_store st;
	struct buf b = {0};
	const char *p;
	int tier = -1;

	telemetry_store_init(&st, 30000, 600000, 1 << 20);
	T_EQ_INT(telemetry_store_report(&st, MSTR("storage"), MSTR(storage),
	                                1000),
	         0);
	T_EQ_INT(telemetry_store_report(&st, MSTR("dispatcher"),
	                                MSTR(dispatcher), 1000),
	         0);
	T_EQ_INT(telemetry_store_render(&st, "", 0, "telemetry", 1500, &b), 0);
	T_EQ_INT(buf_add(&b, "", 1), 0);
	p = strstr(b.b, "\ntroupe_degradation_tier{service=\"telemetry\"} ");
	if (p != NULL)
		tier = atoi(strchr(p, '}') + 2);
	buf_free(&b);
	telemetry_store_free(&st);
	return (tier);
}

static void
t_degradation_tier(void)
{
	static const char l2[] = "troupe_storage_degraded{service=\"storage\","
	                         "tier=\"L2\"} 1\n";
	static const char no_l2[] = "troupe_storage_degraded{service="
	                            "\"storage\",tier=\"L2\"} 0\n";

	T_EQ_INT(page_tier(no_l2, "troupe_dispatcher_tier{service="
	                          "\"dispatcher\"} 0\n"),
	         0);
	T_EQ_INT(page_tier(l2, "troupe_dispatcher_tier{service="
	                       "\"dispatcher\"} 1\n"),
	         2);
	T_EQ_INT(page_tier(no_l2, "troupe_dispatcher_tier{service="
	                          "\"dispatcher\"} 3\n"),
	         3);
	T_EQ_INT(page_tier(l2, "troupe_dispatcher_tier{service="
	                       "\"dispatcher\"} 3\n"),
	         3);
	/* Nonsense values are not a tier. */
	T_EQ_INT(page_tier(no_l2, "troupe_dispatcher_tier{service="
	                          "\"dispatcher\"} 7\n"),
	         0);
}

T_TESTS = {
        {"p99_empty", t_p99_empty},
        {"p99_one_slot", t_p99_one_slot},
        {"p99_tail", t_p99_tail},
        {"window", t_window},
        {"degradation_tier", t_degradation_tier},
        {NULL, NULL},
};
T_MAIN
