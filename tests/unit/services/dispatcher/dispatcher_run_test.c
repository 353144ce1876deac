/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_run_test: the run table of services/dispatcher/
 * dispatcher_run.c (runs own copies of what they keep, are found by
 * request id and edge or by request id and slot, survive the table's
 * growth, leave it cleanly), the index by chat id (v3 runs only, oldest
 * first, growth), the FIFO queue, and the choice of a child:
 * the ready one with the fewest runs below the limit, lowest slot on a
 * tie, never a starting, stopping or blocked one.
 */
#include <stdio.h>
#include <string.h>

#include "dispatcher.h"
#include "t.h"

static struct run *
mkrun(const char *reqid, const char *edge)
{
	struct run *r =
	        dispatcher_run_new(MSTR(reqid), MSTR_LIT("00-t-s-01"),
	                           MSTR(edge), MSTR_NULL, 1234, NULL, 0);

	T_ASSERT(r != NULL);
	return (r);
}

static void
t_new_copies(void)
{
	char reqid[] = "req-1", trace[] = "00-abc-def-01", edge[] = "edge",
	     body[] = "\x93\x01\x02\x03";
	struct run *r;

	r = dispatcher_run_new(MSTR(reqid), MSTR(trace), MSTR(edge),
	                       MSTR_LIT("7312345678901234567"), 99, body, 4);
	T_ASSERT(r != NULL);
	memset(reqid, 'x', 5);
	memset(trace, 'x', 5);
	memset(edge, 'x', 4);
	memset(body, 0, 4);
	T_EQ_MEM(r->r_reqid.p, r->r_reqid.n, "req-1");
	T_EQ_MEM(r->r_trace.p, r->r_trace.n, "00-abc-def-01");
	T_EQ_MEM(r->r_chat_id.p, r->r_chat_id.n, "7312345678901234567");
	T_EQ_STR(r->r_edge, "edge");
	T_EQ_INT(r->r_body.n, 4);
	T_ASSERT(memcmp(r->r_body.p, "\x93\x01\x02\x03", 4) == 0);
	T_EQ_INT(r->r_deadline_ms, 99);
	T_EQ_INT(r->r_slot, -1);
	free(r);

	/* An assigned run keeps no body. */
	r = dispatcher_run_new(MSTR_LIT("r"), MSTR_NULL, MSTR_LIT("edge"),
	                       MSTR_NULL, 0, NULL, 0);
	T_ASSERT(r != NULL);
	T_EQ_INT(r->r_body.n, 0);
	T_EQ_INT(r->r_trace.n, 0);
	free(r);
}

static void
t_find_by_edge_and_slot(void)
{
	struct runtab rt;
	struct run *a, *b;

	T_EQ_INT(dispatcher_run_init(&rt), 0);
	a = mkrun("same-id", "edge");
	b = mkrun("same-id", "edge-2");
	a->r_slot = 3;
	b->r_slot = 4;
	T_EQ_INT(dispatcher_run_insert(&rt, a), 0);
	T_EQ_INT(dispatcher_run_insert(&rt, b), 0);
	T_EQ_INT(rt.rt_count, 2);
	T_ASSERT(dispatcher_run_find(&rt, MSTR_LIT("same-id"),
	                             MSTR_LIT("edge")) == a);
	T_ASSERT(dispatcher_run_find(&rt, MSTR_LIT("same-id"),
	                             MSTR_LIT("edge-2")) == b);
	T_ASSERT(dispatcher_run_find(&rt, MSTR_LIT("same-id"),
	                             MSTR_LIT("edg")) == NULL);
	T_ASSERT(dispatcher_run_find(&rt, MSTR_LIT("same-i"),
	                             MSTR_LIT("edge")) == NULL);
	T_ASSERT(dispatcher_run_find_slot(&rt, MSTR_LIT("same-id"), 3) == a);
	T_ASSERT(dispatcher_run_find_slot(&rt, MSTR_LIT("same-id"), 4) == b);
	T_ASSERT(dispatcher_run_find_slot(&rt, MSTR_LIT("same-id"), 5) ==
	         NULL);
	/* A queued run (slot -1) is not anyone's RUN_DONE. */
	a->r_slot = -1;
	T_ASSERT(dispatcher_run_find_slot(&rt, MSTR_LIT("same-id"), 3) ==
	         NULL);
	dispatcher_run_remove(&rt, a);
	T_EQ_INT(rt.rt_count, 1);
	T_ASSERT(dispatcher_run_find(&rt, MSTR_LIT("same-id"),
	                             MSTR_LIT("edge")) == NULL);
	free(a);
	dispatcher_run_free(&rt);
	T_EQ_INT(rt.rt_count, 0);
}

static void
t_many_runs_grow(void)
{
	enum { N = 20000 };
	struct runtab rt;
	char id[32];
	struct run *r;

	T_EQ_INT(dispatcher_run_init(&rt), 0);
	for (int i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "req-%d", i);
		r = mkrun(id, "edge");
		r->r_slot = i % 7;
		T_EQ_INT(dispatcher_run_insert(&rt, r), 0);
	}
	T_EQ_INT(rt.rt_count, N);
	T_ASSERT(rt.rt_mask + 1 >= N); /* it grew past 1024 buckets */
	for (int i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "req-%d", i);
		r = dispatcher_run_find_slot(&rt, MSTR(id), i % 7);
		if (r == NULL)
			T_FAIL("run %s lost after growth", id);
		T_EQ_MEM(r->r_reqid.p, r->r_reqid.n, id);
		if (i % 2 == 0) {
			dispatcher_run_remove(&rt, r);
			free(r);
		}
	}
	T_EQ_INT(rt.rt_count, N / 2);
	for (int i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "req-%d", i);
		r = dispatcher_run_find(&rt, MSTR(id), MSTR_LIT("edge"));
		T_EQ_INT(r != NULL, i % 2 == 1);
	}
	dispatcher_run_free(&rt); /* frees the rest (ASan: no leak) */
}

static void
t_chat_index(void)
{
	enum { N = 3000 };
	struct runtab rt;
	struct run *a, *b, *v1, *r;
	char id[32], chat[32];

	T_EQ_INT(dispatcher_run_init(&rt), 0);
	a = dispatcher_run_new(MSTR_LIT("ra"), MSTR_NULL, MSTR_LIT("edge"),
	                       MSTR_LIT("7300000000000000001"), 0, NULL, 0);
	b = dispatcher_run_new(MSTR_LIT("rb"), MSTR_NULL, MSTR_LIT("edge"),
	                       MSTR_LIT("7300000000000000001"), 0, NULL, 0);
	v1 = mkrun("rv1", "edge");
	T_ASSERT(a != NULL && b != NULL);
	T_EQ_INT(dispatcher_run_insert(&rt, a), 0);
	T_EQ_INT(dispatcher_run_insert(&rt, b), 0);
	T_EQ_INT(dispatcher_run_insert(&rt, v1), 0);
	/* A run without a chat id is not in the index. */
	T_EQ_INT(rt.rt_count, 3);
	T_EQ_INT(rt.rt_ccount, 2);
	T_ASSERT(dispatcher_run_find_chat(&rt, MSTR_NULL) == NULL);
	/* The oldest run of a chat first; the next once it is gone. */
	T_ASSERT(dispatcher_run_find_chat(
	                 &rt, MSTR_LIT("7300000000000000001")) == a);
	T_ASSERT(dispatcher_run_find_chat(
	                 &rt, MSTR_LIT("730000000000000000")) == NULL);
	dispatcher_run_remove(&rt, a);
	free(a);
	T_ASSERT(dispatcher_run_find_chat(
	                 &rt, MSTR_LIT("7300000000000000001")) == b);
	dispatcher_run_remove(&rt, b);
	free(b);
	T_ASSERT(dispatcher_run_find_chat(
	                 &rt, MSTR_LIT("7300000000000000001")) == NULL);
	T_EQ_INT(rt.rt_ccount, 0);
	T_EQ_INT(rt.rt_count, 1);
	/* The index grows past its first size and loses nothing. */
	for (int i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "req-%d", i);
		snprintf(chat, sizeof(chat), "74%017d", i);
		r = dispatcher_run_new(MSTR(id), MSTR_NULL, MSTR_LIT("edge"),
		                       MSTR(chat), 0, NULL, 0);
		T_ASSERT(r != NULL);
		T_EQ_INT(dispatcher_run_insert(&rt, r), 0);
	}
	T_ASSERT(rt.rt_cmask + 1 >= N);
	for (int i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "req-%d", i);
		snprintf(chat, sizeof(chat), "74%017d", i);
		r = dispatcher_run_find_chat(&rt, MSTR(chat));
		if (r == NULL)
			T_FAIL("chat %s lost after growth", chat);
		T_EQ_MEM(r->r_reqid.p, r->r_reqid.n, id);
	}
	dispatcher_run_free(&rt);
}

static void
t_queue_fifo(void)
{
	struct runtab rt;
	struct run *r[4];

	T_EQ_INT(dispatcher_run_init(&rt), 0);
	T_ASSERT(dispatcher_run_dequeue(&rt) == NULL);
	for (int i = 0; i < 4; i++) {
		char id[8];
		snprintf(id, sizeof(id), "q%d", i);
		r[i] = mkrun(id, "edge");
		r[i]->r_slot = 9; /* enqueue marks it queued */
		T_EQ_INT(dispatcher_run_insert(&rt, r[i]), 0);
		dispatcher_run_enqueue(&rt, r[i]);
		T_EQ_INT(r[i]->r_slot, -1);
	}
	T_EQ_INT(rt.rt_qlen, 4);
	dispatcher_run_unqueue(&rt, r[1]);
	T_EQ_INT(rt.rt_qlen, 3);
	T_ASSERT(dispatcher_run_dequeue(&rt) == r[0]);
	T_ASSERT(dispatcher_run_dequeue(&rt) == r[2]);
	T_ASSERT(dispatcher_run_dequeue(&rt) == r[3]);
	T_ASSERT(dispatcher_run_dequeue(&rt) == NULL);
	T_EQ_INT(rt.rt_qlen, 0);
	/* Leaving the queue is not leaving the table. */
	T_EQ_INT(rt.rt_count, 4);
	dispatcher_run_free(&rt);
}

static void
set(struct child *c, enum child_state s, uint32_t inflight)
{
	c->c_state = s;
	c->c_inflight = inflight;
	c->c_blocked_until = 0;
}

static void
t_pick(void)
{
	struct child c[5];

	memset(c, 0, sizeof(c));
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), -1); /* all idle */

	set(&c[0], CHILD_READY, 3);
	set(&c[1], CHILD_READY, 1);
	set(&c[2], CHILD_STARTING, 0);
	set(&c[3], CHILD_STOPPING, 0);
	set(&c[4], CHILD_READY, 1);
	/* Fewest in flight; the lower slot on a tie. */
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), 1);
	c[1].c_inflight = 2;
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), 4);
	/* Only the first n slots count. */
	T_EQ_INT(dispatcher_run_pick(c, 4, 4, 1000), 1);
	/* A blocked child is skipped until its time is up. */
	c[4].c_blocked_until = 1500;
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), 1);
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1500), 4);
	c[4].c_blocked_until = 0;
	/* Full children are skipped; all full: none. */
	c[4].c_inflight = 4;
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), 1);
	c[1].c_inflight = 4;
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), 0);
	c[0].c_inflight = 4;
	T_EQ_INT(dispatcher_run_pick(c, 5, 4, 1000), -1);
	/* A larger limit makes room again. */
	T_EQ_INT(dispatcher_run_pick(c, 5, 5, 1000), 0);
}

T_TESTS = {
        {"new_copies", t_new_copies},
        {"find_by_edge_and_slot", t_find_by_edge_and_slot},
        {"many_runs_grow", t_many_runs_grow},
        {"chat_index", t_chat_index},
        {"queue_fifo", t_queue_fifo},
        {"pick", t_pick},
        {NULL, NULL},
};
T_MAIN
