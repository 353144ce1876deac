/* SPDX-License-Identifier: ISC */
/*
 * edge_addr: per-client-address connection limits (edge_addr.h).  A
 * chained hash table with a fixed bucket array (EDGE_ADDR_MAX / 4
 * buckets) and at most EDGE_ADDR_MAX entries, keyed with a random seed so
 * that clients cannot choose addresses that share a chain.  Token buckets
 * count in thousandths of a connection, so refilling (rate per second,
 * time in ms) is exact integer arithmetic.
 *
 * DIAGNOSTICS: none; callers count and log the verdicts.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_addr.h"

#define EDGE_ADDR_BUCKETS (EDGE_ADDR_MAX / 4)
#define MILLI 1000

int
edge_addr_init(struct edge_addr *t, const unsigned char seed[16])
{
	memset(t, 0, sizeof(*t));
	if ((t->tab = calloc(EDGE_ADDR_BUCKETS, sizeof(*t->tab))) == NULL)
		return (-1);
	t->mask = EDGE_ADDR_BUCKETS - 1;
	memcpy(&t->k0, seed, 8);
	memcpy(&t->k1, seed + 8, 8);
	return (0);
}

void
edge_addr_free(struct edge_addr *t)
{
	struct edge_addr_ent *e, *n;
	size_t i;

	if (t->tab == NULL)
		return;
	for (i = 0; i <= t->mask; i++)
		for (e = t->tab[i]; e != NULL; e = n) {
			n = e->next;
			free(e);
		}
	free(t->tab);
	memset(t, 0, sizeof(*t));
}

void
edge_addr_limits(struct edge_addr *t, uint32_t max_conns, uint32_t rate,
                 uint32_t burst)
{
	t->max_conns = max_conns;
	t->rate = rate;
	t->burst = rate != 0 && burst == 0 ? 1 : burst;
}

int
edge_addr_on(const struct edge_addr *t)
{
	return (t->max_conns != 0 || t->rate != 0);
}

int
edge_addr_key_of(const struct sockaddr *sa, socklen_t len,
                 struct edge_addr_key *k)
{
	static const uint8_t mapped[12] = {0, 0, 0, 0, 0,    0,
	                                   0, 0, 0, 0, 0xff, 0xff};
	const struct sockaddr_in *s4;
	const struct sockaddr_in6 *s6;

	memset(k, 0, sizeof(*k));
	if (sa->sa_family == AF_INET && len >= sizeof(*s4)) {
		s4 = (const struct sockaddr_in *)(const void *)sa;
		memcpy(k->b, &s4->sin_addr, 4);
		return (0);
	}
	if (sa->sa_family == AF_INET6 && len >= sizeof(*s6)) {
		s6 = (const struct sockaddr_in6 *)(const void *)sa;
		if (memcmp(s6->sin6_addr.s6_addr, mapped, 12) == 0) {
			memcpy(k->b, s6->sin6_addr.s6_addr + 12, 4);
			return (0);
		}
		memcpy(k->b, s6->sin6_addr.s6_addr, 8);
		k->v6 = 1;
		return (0);
	}
	return (-1);
}

void
edge_addr_fmt(const struct edge_addr_key *k, char *out)
{
	struct in6_addr a6;

	if (!k->v6) {
		if (inet_ntop(AF_INET, k->b, out, EDGE_ADDR_STRLEN) == NULL)
			strcpy(out, "?");
		return;
	}
	memset(&a6, 0, sizeof(a6));
	memcpy(a6.s6_addr, k->b, 8);
	if (inet_ntop(AF_INET6, &a6, out, EDGE_ADDR_STRLEN - 3) == NULL)
		strcpy(out, "?");
	else
		strcat(out, "/64");
}

static uint64_t
mix(uint64_t h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return (h);
}

static size_t
slot_of(const struct edge_addr *t, const struct edge_addr_key *k)
{
	uint64_t w;

	memcpy(&w, k->b, 8);
	return ((size_t)mix(mix(w ^ t->k0) ^ t->k1 ^ k->v6) & t->mask);
}

/* Bring e's bucket up to now. */
static void
refill(const struct edge_addr *t, struct edge_addr_ent *e, uint64_t now)
{
	uint64_t full = (uint64_t)t->burst * MILLI;

	if (now > e->last_ms) {
		uint64_t dt = now - e->last_ms;

		/* dt * rate cannot overflow before the bucket is full */
		if (t->rate == 0 || dt >= full / t->rate + 1)
			e->tokens = full;
		else
			e->tokens += dt * t->rate;
		e->last_ms = now;
	}
	if (e->tokens > full)
		e->tokens = full;
}

/* May e go: no connection, a full bucket, no recent refusal logged? */
static int
idle(const struct edge_addr *t, struct edge_addr_ent *e, uint64_t now)
{
	if (e->conns != 0)
		return (0);
	if (e->warned && now - e->warned_ms < EDGE_ADDR_WARN_MS)
		return (0);
	if (t->rate == 0)
		return (1);
	refill(t, e, now);
	return (e->tokens >= (uint64_t)t->burst * MILLI);
}

static void
unlink_free(struct edge_addr *t, struct edge_addr_ent *e)
{
	struct edge_addr_ent **pp = &t->tab[slot_of(t, &e->key)];

	for (; *pp != NULL; pp = &(*pp)->next)
		if (*pp == e) {
			*pp = e->next;
			free(e);
			t->count--;
			return;
		}
}

static void
warn_once(struct edge_addr_ent *e, uint64_t now, int *warn)
{
	if (!e->warned || now - e->warned_ms >= EDGE_ADDR_WARN_MS) {
		e->warned = 1;
		e->warned_ms = now;
		*warn = 1;
	}
}

enum edge_addr_verdict
edge_addr_admit(struct edge_addr *t, const struct edge_addr_key *k,
                uint64_t now, struct edge_addr_ent **ent, int *warn)
{
	size_t s = slot_of(t, k);
	struct edge_addr_ent *e;

	*ent = NULL;
	*warn = 0;
	for (e = t->tab[s]; e != NULL; e = e->next)
		if (e->key.v6 == k->v6 && memcmp(e->key.b, k->b, 8) == 0)
			break;
	if (e == NULL) {
		if (t->count >= EDGE_ADDR_MAX ||
		    (e = calloc(1, sizeof(*e))) == NULL)
			return (EDGE_ADDR_UNTRACKED);
		e->key = *k;
		e->tokens = (uint64_t)t->burst * MILLI;
		e->last_ms = now;
		e->next = t->tab[s];
		t->tab[s] = e;
		t->count++;
	}
	if (t->max_conns != 0 && e->conns >= t->max_conns) {
		warn_once(e, now, warn);
		return (EDGE_ADDR_OVER_CONNS);
	}
	if (t->rate != 0) {
		refill(t, e, now);
		if (e->tokens < MILLI) {
			warn_once(e, now, warn);
			return (EDGE_ADDR_OVER_RATE);
		}
		e->tokens -= MILLI;
	}
	e->conns++;
	*ent = e;
	return (EDGE_ADDR_OK);
}

void
edge_addr_release(struct edge_addr *t, struct edge_addr_ent *e, uint64_t now)
{
	if (e->conns > 0)
		e->conns--;
	if (idle(t, e, now))
		unlink_free(t, e);
}

size_t
edge_addr_gc(struct edge_addr *t, uint64_t now, size_t budget)
{
	struct edge_addr_ent **pp, *e;
	size_t freed = 0;

	if (budget > t->mask + 1)
		budget = t->mask + 1;
	while (budget-- > 0 && t->count > 0) {
		pp = &t->tab[t->cursor];
		while ((e = *pp) != NULL) {
			if (idle(t, e, now)) {
				*pp = e->next;
				free(e);
				t->count--;
				freed++;
			} else
				pp = &e->next;
		}
		t->cursor = (t->cursor + 1) & t->mask;
	}
	return (freed);
}

size_t
edge_addr_count(const struct edge_addr *t)
{
	return (t->count);
}
