/* SPDX-License-Identifier: ISC */
/*
 * edge_pending_test: the pending-request table of
 * services/edge/edge_pending.c (included whole): add, find, delete,
 * growth, and deletes that must be harmless.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "t.h"

#include "edge_pending.c"

static void
set_id(struct edge_pending_ent *e, unsigned i)
{
	/* Ids that share a long prefix, like real ones within a second. */
	snprintf(e->reqid, sizeof(e->reqid), "20240102030405abcdef%012x", i);
}

static void
t_add_find_del(void)
{
	enum { N = 5000 };
	struct edge_pending t;
	struct edge_pending_ent *e = calloc(N, sizeof(*e));
	size_t i;

	T_ASSERT(e != NULL);
	T_EQ_INT(edge_pending_init(&t, 16), 0);
	for (i = 0; i < N; i++) {
		set_id(&e[i], (unsigned)i);
		edge_pending_add(&t, &e[i]);
	}
	T_EQ_INT(edge_pending_count(&t), N);
	if (t.mask + 1 < N)
		T_FAIL("buckets: got %zu, want at least %d (no growth)",
		       t.mask + 1, N);
	for (i = 0; i < N; i++)
		if (edge_pending_find(&t, e[i].reqid, EDGE_REQID_LEN) != &e[i])
			T_FAIL("find %s: wrong or missing entry", e[i].reqid);
	for (i = 0; i < N; i += 2)
		edge_pending_del(&t, &e[i]);
	T_EQ_INT(edge_pending_count(&t), N / 2);
	for (i = 0; i < N; i++) {
		struct edge_pending_ent *f =
		        edge_pending_find(&t, e[i].reqid, EDGE_REQID_LEN);
		if (f != (i % 2 ? &e[i] : NULL))
			T_FAIL("after deletes, find %s: got %p, want %p",
			       e[i].reqid, (void *)f,
			       (void *)(i % 2 ? &e[i] : NULL));
	}
	edge_pending_free(&t);
	free(e);
}

static void
t_del_twice_and_unlinked(void)
{
	struct edge_pending t;
	struct edge_pending_ent a = {0}, b = {0};

	T_EQ_INT(edge_pending_init(&t, 0), 0);
	set_id(&a, 1);
	set_id(&b, 2);
	edge_pending_add(&t, &a);
	edge_pending_del(&t, &b); /* never linked */
	T_EQ_INT(edge_pending_count(&t), 1);
	edge_pending_del(&t, &a);
	edge_pending_del(&t, &a); /* again */
	T_EQ_INT(edge_pending_count(&t), 0);
	T_ASSERT(edge_pending_find(&t, a.reqid, EDGE_REQID_LEN) == NULL);
	/* Re-adding after a delete works. */
	edge_pending_add(&t, &a);
	T_ASSERT(edge_pending_find(&t, a.reqid, EDGE_REQID_LEN) == &a);
	edge_pending_free(&t);
}

static void
t_find_lengths(void)
{
	struct edge_pending t;
	struct edge_pending_ent a = {0};

	T_EQ_INT(edge_pending_init(&t, 0), 0);
	set_id(&a, 7);
	edge_pending_add(&t, &a);
	/* A prefix, a longer key, an empty key: none match. */
	T_ASSERT(edge_pending_find(&t, a.reqid, EDGE_REQID_LEN - 1) == NULL);
	T_ASSERT(edge_pending_find(&t, "", 0) == NULL);
	{
		char longer[EDGE_REQID_LEN + 2];
		memcpy(longer, a.reqid, EDGE_REQID_LEN);
		longer[EDGE_REQID_LEN] = 'x';
		T_ASSERT(edge_pending_find(&t, longer, EDGE_REQID_LEN + 1) ==
		         NULL);
	}
	edge_pending_free(&t);
}

T_TESTS = {
        {"add_find_del", t_add_find_del},
        {"del_twice_and_unlinked", t_del_twice_and_unlinked},
        {"find_lengths", t_find_lengths},
        {NULL, NULL},
};
T_MAIN
