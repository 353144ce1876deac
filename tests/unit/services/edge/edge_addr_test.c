/* SPDX-License-Identifier: ISC */
/*
 * edge_addr_test: the per-address connection limits of
 * services/edge/edge_addr.c (included whole): address keys (IPv4, IPv6
 * /64, v4-mapped, exempt families), the open-connection cap, the token
 * bucket with a made-up clock, the once-a-minute warning, entries freed
 * when idle and full, and the table's cap.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include "t.h"

#include "edge_addr.c"

static const unsigned char seed[16] = "0123456789abcdef";

static struct edge_addr_key
v4(const char *s)
{
	struct sockaddr_in sin;
	struct edge_addr_key k;

	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	if (inet_pton(AF_INET, s, &sin.sin_addr) != 1)
		T_FAIL("bad test address %s", s);
	if (edge_addr_key_of((struct sockaddr *)&sin, sizeof(sin), &k) != 0)
		T_FAIL("no key for %s", s);
	return (k);
}

static struct edge_addr_key
v6(const char *s)
{
	struct sockaddr_in6 sin6;
	struct edge_addr_key k;

	memset(&sin6, 0, sizeof(sin6));
	sin6.sin6_family = AF_INET6;
	if (inet_pton(AF_INET6, s, &sin6.sin6_addr) != 1)
		T_FAIL("bad test address %s", s);
	if (edge_addr_key_of((struct sockaddr *)&sin6, sizeof(sin6), &k) != 0)
		T_FAIL("no key for %s", s);
	return (k);
}

static int
same(struct edge_addr_key a, struct edge_addr_key b)
{
	return (a.v6 == b.v6 && memcmp(a.b, b.b, sizeof(a.b)) == 0);
}

static void
t_keys(void)
{
	struct sockaddr_un sun;
	struct edge_addr_key k;
	char s[EDGE_ADDR_STRLEN];

	k = v4("192.0.2.7");
	edge_addr_fmt(&k, s);
	T_EQ_STR(s, "192.0.2.7");
	T_ASSERT(!same(v4("192.0.2.7"), v4("192.0.2.8")));
	/* IPv6: one key per /64 */
	T_ASSERT(same(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff::9")));
	T_ASSERT(!same(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1")));
	k = v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
	edge_addr_fmt(&k, s);
	T_EQ_STR(s, "2001:db8:1:2::/64");
	/* v4-mapped IPv6 (a dual-stack listener) is the IPv4 address */
	T_ASSERT(same(v6("::ffff:192.0.2.7"), v4("192.0.2.7")));
	/* unix sockets and short addresses are exempt */
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	T_EQ_INT(edge_addr_key_of((struct sockaddr *)&sun, sizeof(sun), &k),
	         -1);
	T_EQ_INT(edge_addr_key_of((struct sockaddr *)&sun, 2, &k), -1);
}

static void
t_max_conns(void)
{
	struct edge_addr t;
	struct edge_addr_key a = v4("10.0.0.1"), b = v4("10.0.0.2");
	struct edge_addr_ent *e[3], *x;
	int warn, i;

	T_EQ_INT(edge_addr_init(&t, seed), 0);
	edge_addr_limits(&t, 3, 0, 0);
	T_ASSERT(edge_addr_on(&t));
	for (i = 0; i < 3; i++) {
		T_EQ_INT(edge_addr_admit(&t, &a, 1000, &e[i], &warn),
		         EDGE_ADDR_OK);
		T_ASSERT(e[i] != NULL);
	}
	T_EQ_INT(edge_addr_count(&t), 1);
	T_EQ_INT(e[0]->conns, 3);
	/* the fourth is refused; the first refusal is to be logged, the
	 * next ones within a minute not */
	T_EQ_INT(edge_addr_admit(&t, &a, 1000, &x, &warn),
	         EDGE_ADDR_OVER_CONNS);
	T_ASSERT(x == NULL);
	T_EQ_INT(warn, 1);
	T_EQ_INT(edge_addr_admit(&t, &a, 30000, &x, &warn),
	         EDGE_ADDR_OVER_CONNS);
	T_EQ_INT(warn, 0);
	T_EQ_INT(edge_addr_admit(&t, &a, 1000 + EDGE_ADDR_WARN_MS, &x, &warn),
	         EDGE_ADDR_OVER_CONNS);
	T_EQ_INT(warn, 1);
	/* another address has its own count */
	T_EQ_INT(edge_addr_admit(&t, &b, 1000, &x, &warn), EDGE_ADDR_OK);
	T_EQ_INT(edge_addr_count(&t), 2);
	edge_addr_release(&t, x, 1000);
	T_EQ_INT(edge_addr_count(&t), 1); /* idle, no rate: freed at once */
	/* one closes: one more is let in */
	edge_addr_release(&t, e[2], 70000);
	T_EQ_INT(edge_addr_admit(&t, &a, 70000, &e[2], &warn), EDGE_ADDR_OK);
	for (i = 0; i < 3; i++)
		edge_addr_release(&t, e[i], 70000);
	/* a refusal was logged at 61000: kept a minute for the warning */
	T_EQ_INT(edge_addr_count(&t), 1);
	T_EQ_INT(edge_addr_gc(&t, 100000, EDGE_ADDR_MAX), 0);
	T_EQ_INT(edge_addr_gc(&t, 61000 + EDGE_ADDR_WARN_MS, EDGE_ADDR_MAX),
	         1);
	T_EQ_INT(edge_addr_count(&t), 0);
	edge_addr_free(&t);
}

static void
t_rate(void)
{
	struct edge_addr t;
	struct edge_addr_key a = v6("2001:db8::1"), b = v6("2001:db8:0:1::1");
	struct edge_addr_ent *e, *x;
	int warn, i, ok;

	T_EQ_INT(edge_addr_init(&t, seed), 0);
	edge_addr_limits(&t, 0, 10, 5); /* 10/s, 5 at once */
	for (i = 0, ok = 0; i < 8; i++)
		if (edge_addr_admit(&t, &a, 5000, &e, &warn) == EDGE_ADDR_OK) {
			ok++;
			edge_addr_release(&t, e, 5000);
		} else {
			T_ASSERT(e == NULL);
		}
	T_EQ_INT(ok, 5);
	/* empty: refused with one warning */
	T_EQ_INT(edge_addr_admit(&t, &a, 5000, &x, &warn),
	         EDGE_ADDR_OVER_RATE);
	T_EQ_INT(warn, 0); /* the first refusal (i == 5) warned */
	/* 99 ms later: not yet a whole connection; 100 ms: one */
	T_EQ_INT(edge_addr_admit(&t, &a, 5099, &x, &warn),
	         EDGE_ADDR_OVER_RATE);
	T_EQ_INT(edge_addr_admit(&t, &a, 5100, &e, &warn), EDGE_ADDR_OK);
	edge_addr_release(&t, e, 5100);
	T_EQ_INT(edge_addr_admit(&t, &a, 5100, &x, &warn),
	         EDGE_ADDR_OVER_RATE);
	/* another /64 has its own bucket */
	T_EQ_INT(edge_addr_admit(&t, &b, 5100, &e, &warn), EDGE_ADDR_OK);
	edge_addr_release(&t, e, 5100);
	/* b idle but its bucket not full: kept until it is */
	T_EQ_INT(edge_addr_count(&t), 2);
	/* an hour later: the bucket holds no more than the burst */
	for (i = 0, ok = 0; i < 8; i++)
		if (edge_addr_admit(&t, &b, 3605100, &e, &warn) ==
		    EDGE_ADDR_OK)
			ok++;
	T_EQ_INT(ok, 5);
	edge_addr_free(&t);
}

static void
t_gc_and_cap(void)
{
	struct edge_addr t;
	struct edge_addr_key k;
	struct edge_addr_ent *e;
	int warn;
	size_t i, freed;

	T_EQ_INT(edge_addr_init(&t, seed), 0);
	edge_addr_limits(&t, 100, 1, 2);
	for (i = 0; i < EDGE_ADDR_MAX; i++) {
		memset(&k, 0, sizeof(k));
		k.b[0] = 10;
		k.b[1] = (uint8_t)(i >> 16);
		k.b[2] = (uint8_t)(i >> 8);
		k.b[3] = (uint8_t)i;
		T_EQ_INT(edge_addr_admit(&t, &k, 0, &e, &warn), EDGE_ADDR_OK);
		edge_addr_release(&t, e, 0); /* idle, bucket not full */
	}
	T_EQ_INT(edge_addr_count(&t), EDGE_ADDR_MAX);
	/* full: a new address is admitted untracked, nothing allocated */
	k = v4("192.0.2.1");
	T_EQ_INT(edge_addr_admit(&t, &k, 0, &e, &warn), EDGE_ADDR_UNTRACKED);
	T_ASSERT(e == NULL);
	T_EQ_INT(edge_addr_count(&t), EDGE_ADDR_MAX);
	/* a known address is still limited */
	k.b[0] = 10;
	k.b[1] = k.b[2] = k.b[3] = 0;
	T_EQ_INT(edge_addr_admit(&t, &k, 0, &e, &warn), EDGE_ADDR_OK);
	T_EQ_INT(edge_addr_admit(&t, &k, 0, &e, &warn), EDGE_ADDR_OVER_RATE);
	/* before their buckets are full nothing goes */
	T_EQ_INT(edge_addr_gc(&t, 500, EDGE_ADDR_MAX), 0);
	/* once full (1/s, 2 at once: 2 s), the gc frees them bucket by
	 * bucket, a budget at a time; the one with a connection stays */
	freed = edge_addr_gc(&t, 2000, 16);
	T_ASSERT(freed > 0 && freed < EDGE_ADDR_MAX - 1);
	freed += edge_addr_gc(&t, 2000, EDGE_ADDR_MAX);
	T_EQ_INT(freed, EDGE_ADDR_MAX - 1);
	T_EQ_INT(edge_addr_count(&t), 1);
	/* and a new address is tracked again */
	k = v4("192.0.2.1");
	T_EQ_INT(edge_addr_admit(&t, &k, 2000, &e, &warn), EDGE_ADDR_OK);
	T_EQ_INT(edge_addr_count(&t), 2);
	edge_addr_free(&t);
}

static void
t_limits_change(void)
{
	struct edge_addr t;
	struct edge_addr_key a = v4("10.1.1.1");
	struct edge_addr_ent *e;
	int warn;

	T_EQ_INT(edge_addr_init(&t, seed), 0);
	edge_addr_limits(&t, 0, 0, 0);
	T_ASSERT(!edge_addr_on(&t));
	/* a rate without a burst gets a burst of 1 */
	edge_addr_limits(&t, 0, 1, 0);
	T_EQ_INT(t.burst, 1);
	T_EQ_INT(edge_addr_admit(&t, &a, 0, &e, &warn), EDGE_ADDR_OK);
	T_EQ_INT(edge_addr_admit(&t, &a, 0, &e, &warn), EDGE_ADDR_OVER_RATE);
	/* a smaller burst after a reload caps what an entry holds */
	edge_addr_limits(&t, 0, 1000, 1000);
	(void)edge_addr_admit(&t, &a, 10000, &e, &warn);
	edge_addr_limits(&t, 0, 1000, 2);
	T_EQ_INT(edge_addr_admit(&t, &a, 10000, &e, &warn), EDGE_ADDR_OK);
	T_EQ_INT(edge_addr_admit(&t, &a, 10000, &e, &warn), EDGE_ADDR_OK);
	T_EQ_INT(edge_addr_admit(&t, &a, 10000, &e, &warn),
	         EDGE_ADDR_OVER_RATE);
	edge_addr_free(&t);
}

T_TESTS = {
        {"keys", t_keys},
        {"max_conns", t_max_conns},
        {"rate", t_rate},
        {"gc_and_cap", t_gc_and_cap},
        {"limits_change", t_limits_change},
        {NULL, NULL},
};
T_MAIN
