/* SPDX-License-Identifier: ISC */
/*
 * auth_key_test: the API key table of services/auth/auth_key.c, without a
 * process: which tokens are keys, the SHA-256 (an outside vector), the
 * scope list (names, "*", spaces, no prefix matches), one pending entry
 * per hash, the park bound, settling valid or unknown with expiry, the
 * table bound (a full table makes room only from expired entries), and
 * overdue checks in the order they were sent.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth_key.h"
#include "t.h"

static const struct auth_key_conf conf = {
        .valid_ms = 1000,
        .unknown_ms = 200,
        .check_ms = 500,
        .park_max = 3,
        .entries_max = 4,
};

static void
t_is_key_and_hash(void)
{
	char h[AUTH_KEY_HASH_LEN + 1];

	T_ASSERT(auth_key_is_key("pat_x", 5));
	T_ASSERT(auth_key_is_key("pat_", 4));
	T_ASSERT(!auth_key_is_key("pat", 3));
	T_ASSERT(!auth_key_is_key("eyJhbGciOi", 10));
	T_ASSERT(!auth_key_is_key("PAT_x", 5));
	/* FIPS 180-2 appendix B.1. */
	T_EQ_INT(auth_key_hash("abc", 3, h), 0);
	T_EQ_STR(h, "ba7816bf8f01cfea414140de5dae2223"
	            "b00361a396177a9cb410ff61f20015ad");
}

static int
ok(const char *scopes, const char *need)
{
	return (auth_key_scope_ok(MSTR(scopes), need));
}

static void
t_scopes(void)
{
	T_ASSERT(ok("chat", "chat"));
	T_ASSERT(!ok("chat", "read"));
	T_ASSERT(ok("chat,read", "read"));
	T_ASSERT(ok(" chat , read ", "read"));
	T_ASSERT(ok("*", "read"));
	T_ASSERT(ok("read,*", "chat"));
	T_ASSERT(!ok("", "chat"));
	T_ASSERT(!ok(",,", "chat"));
	T_ASSERT(!ok("chatty", "chat"));
	T_ASSERT(!ok("cha", "chat"));
	T_ASSERT(!ok("**", "chat"));
	T_ASSERT(!ok("Chat", "chat"));
}

/* A message to park: only the head and body are copied. */
static struct msg
msg(const char *reqid)
{
	struct msg m;

	memset(&m, 0, sizeof(m));
	m.reqid = MSTR(reqid);
	m.traceparent = MSTR_LIT("00-t-s-01");
	m.deadline_ms = 77;
	m.body = "\x91\xa1x";
	m.body_len = 3;
	return (m);
}

static const char *
hx(char c)
{
	static char h[AUTH_KEY_HASH_LEN + 1];

	memset(h, c, AUTH_KEY_HASH_LEN);
	h[AUTH_KEY_HASH_LEN] = '\0';
	return (h);
}

static void
t_pending_park_settle(void)
{
	struct auth_park_list l = TAILQ_HEAD_INITIALIZER(l);
	struct auth_keys kt;
	struct auth_key *k;
	struct auth_park *p;
	struct msg m;
	int n = 0;

	T_EQ_INT(auth_keys_init(&kt, &conf), 0);
	T_ASSERT(auth_keys_find(&kt, hx('a')) == NULL);
	T_ASSERT(auth_keys_pending(&kt, "short", 0) == NULL);
	T_ASSERT((k = auth_keys_pending(&kt, hx('a'), 1000)) != NULL);
	T_EQ_INT(k->k_state, AUTH_KEY_PENDING);
	T_EQ_INT(k->k_until, 1500);
	/* One check per hash. */
	T_ASSERT(auth_keys_pending(&kt, hx('a'), 1000) == NULL);
	T_ASSERT(auth_keys_find(&kt, hx('a')) == k);

	/* Park copies; at most park_max (3). */
	m = msg("r1");
	T_EQ_INT(auth_keys_park(&kt, k, &m, "edge"), 0);
	m = msg("r2");
	T_EQ_INT(auth_keys_park(&kt, k, &m, "edge-2"), 0);
	m = msg("r3");
	T_EQ_INT(auth_keys_park(&kt, k, &m, "edge"), 0);
	m = msg("r4");
	T_EQ_INT(auth_keys_park(&kt, k, &m, "edge"), -1);
	T_EQ_INT(kt.kt_parked, 3);
	T_EQ_INT(k->k_nparked, 3);

	/* Not overdue before check_ms. */
	T_ASSERT(auth_keys_overdue(&kt, 1499) == NULL);
	T_ASSERT(auth_keys_overdue(&kt, 1500) == k);

	auth_keys_take(&kt, k, &l);
	T_EQ_INT(kt.kt_parked, 0);
	TAILQ_FOREACH(p, &l, p_link)
	{
		char want[16];

		snprintf(want, sizeof(want), "r%d", ++n);
		T_EQ_MEM(p->p_head.reqid.p, p->p_head.reqid.n, want);
		T_EQ_MEM(p->p_head.traceparent.p, p->p_head.traceparent.n,
		         "00-t-s-01");
		T_EQ_INT(p->p_head.deadline_ms, 77);
		T_EQ_INT(p->p_body_len, 3);
		T_ASSERT(memcmp(p->p_body, "\x91\xa1x", 3) == 0);
	}
	T_EQ_INT(n, 3);
	T_EQ_STR(TAILQ_NEXT(TAILQ_FIRST(&l), p_link)->p_to, "edge-2");
	while ((p = TAILQ_FIRST(&l)) != NULL) {
		TAILQ_REMOVE(&l, p, p_link);
		free(p);
	}

	/* Valid until now + valid_ms, no longer overdue. */
	T_EQ_INT(auth_keys_settle(&kt, k, 1, MSTR_LIT("alice"),
	                          MSTR_LIT("chat,read"), 1200),
	         0);
	T_EQ_INT(k->k_state, AUTH_KEY_VALID);
	T_EQ_INT(k->k_until, 2200);
	T_EQ_STR(k->k_sub, "alice");
	T_EQ_STR(k->k_scopes, "chat,read");
	T_ASSERT(auth_keys_overdue(&kt, 9999) == NULL);
	T_EQ_INT(auth_keys_sweep(&kt, 2199), 0);
	/* Expired: a new check reuses the entry. */
	T_ASSERT(auth_keys_pending(&kt, hx('a'), 2300) == k);
	T_ASSERT(k->k_sub == NULL);
	T_EQ_INT(auth_keys_settle(&kt, k, 0, MSTR_NULL, MSTR_NULL, 2400), 0);
	T_EQ_INT(k->k_state, AUTH_KEY_UNKNOWN);
	T_EQ_INT(k->k_until, 2600);
	T_EQ_INT(auth_keys_sweep(&kt, 2600), 1);
	T_ASSERT(auth_keys_find(&kt, hx('a')) == NULL);
	T_EQ_INT(kt.kt_count, 0);
	auth_keys_free(&kt);
}

static void
t_bounds_and_order(void)
{
	struct auth_keys kt;
	struct auth_key *k[4];
	struct msg m = msg("x");

	T_EQ_INT(auth_keys_init(&kt, &conf), 0);
	for (int i = 0; i < 4; i++)
		T_ASSERT((k[i] = auth_keys_pending(&kt, hx((char)('a' + i)),
		                                   (uint64_t)(100 * i))) !=
		         NULL);
	/* Full (entries_max 4), nothing expired: refused. */
	T_ASSERT(auth_keys_pending(&kt, hx('z'), 400) == NULL);
	/* Overdue in the order sent. */
	T_ASSERT(auth_keys_overdue(&kt, 499) == NULL);
	T_ASSERT(auth_keys_overdue(&kt, 500) == k[0]);
	T_EQ_INT(auth_keys_park(&kt, k[0], &m, "edge"), 0);
	auth_keys_remove(&kt, k[0]); /* parked requests go with it */
	T_EQ_INT(kt.kt_parked, 0);
	T_ASSERT(auth_keys_overdue(&kt, 600) == k[1]);
	/* A settled, expired entry makes room. */
	T_EQ_INT(auth_keys_settle(&kt, k[1], 0, MSTR_NULL, MSTR_NULL, 600), 0);
	T_ASSERT(auth_keys_pending(&kt, hx('y'), 700) != NULL); /* 3 -> 4 */
	T_ASSERT(auth_keys_pending(&kt, hx('z'), 700) == NULL);
	T_ASSERT(auth_keys_pending(&kt, hx('z'), 800) != NULL); /* swept */
	T_ASSERT(auth_keys_find(&kt, hx('b')) == NULL);
	T_EQ_INT(kt.kt_count, 4);
	auth_keys_free(&kt);
}

T_TESTS = {
        {"is_key_and_hash", t_is_key_and_hash},
        {"scopes", t_scopes},
        {"pending_park_settle", t_pending_park_settle},
        {"bounds_and_order", t_bounds_and_order},
        {NULL, NULL},
};
T_MAIN
