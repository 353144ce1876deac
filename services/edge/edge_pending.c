/* SPDX-License-Identifier: ISC */
/*
 * edge_pending: a chained hash table of intrusive entries keyed by request
 * id (see edge_pending.h).  Buckets double when the table is fuller than
 * one entry per bucket.  Callers: edge_http.c, edge_dispatch.c and the unit
 * test.  Never logs.
 */
#include <stdlib.h>
#include <string.h>

#include "edge_pending.h"

/* FNV-1a, 64 bits. */
static uint64_t
pending_hash(const char *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)s[i]) * 0x100000001b3ULL;
	return (h);
}

int
edge_pending_init(struct edge_pending *t, size_t hint)
{
	size_t n = 64;

	while (n < hint)
		n *= 2;
	memset(t, 0, sizeof(*t));
	if ((t->tab = calloc(n, sizeof(*t->tab))) == NULL)
		return (-1);
	t->mask = n - 1;
	return (0);
}

void
edge_pending_free(struct edge_pending *t)
{
	free(t->tab);
	memset(t, 0, sizeof(*t));
}

static void
pending_grow(struct edge_pending *t)
{
	size_t n = (t->mask + 1) * 2, i;
	struct edge_pending_ent **nt, *e, *next;

	if ((nt = calloc(n, sizeof(*nt))) == NULL)
		return; /* longer chains, still correct */
	for (i = 0; i <= t->mask; i++)
		for (e = t->tab[i]; e != NULL; e = next) {
			next = e->next;
			e->next = nt[e->hash & (n - 1)];
			nt[e->hash & (n - 1)] = e;
		}
	free(t->tab);
	t->tab = nt;
	t->mask = n - 1;
}

void
edge_pending_add(struct edge_pending *t, struct edge_pending_ent *e)
{
	struct edge_pending_ent **b;

	if (t->count > t->mask)
		pending_grow(t);
	e->hash = pending_hash(e->reqid, strlen(e->reqid));
	b = &t->tab[e->hash & t->mask];
	e->next = *b;
	*b = e;
	e->linked = 1;
	t->count++;
}

struct edge_pending_ent *
edge_pending_find(const struct edge_pending *t, const char *id, size_t n)
{
	uint64_t h = pending_hash(id, n);
	struct edge_pending_ent *e;

	for (e = t->tab[h & t->mask]; e != NULL; e = e->next)
		if (e->hash == h && strlen(e->reqid) == n &&
		    memcmp(e->reqid, id, n) == 0)
			return (e);
	return (NULL);
}

void
edge_pending_del(struct edge_pending *t, struct edge_pending_ent *e)
{
	struct edge_pending_ent **p;

	if (!e->linked)
		return;
	for (p = &t->tab[e->hash & t->mask]; *p != NULL; p = &(*p)->next)
		if (*p == e) {
			*p = e->next;
			break;
		}
	e->next = NULL;
	e->linked = 0;
	t->count--;
}

size_t
edge_pending_count(const struct edge_pending *t)
{
	return (t->count);
}
