/* SPDX-License-Identifier: ISC */
/*
 * auth_key: the API key table of troupe-auth (see auth_key.h): hashing
 * (OpenSSL SHA-256), the scope check, and the table of what storage said
 * about each hash, with the requests parked on a check in flight.
 *
 * Callers: auth_dispatch.c and auth.c, on the loop thread only; the unit
 * tests.  Never logs, never exits, never keeps a key's text.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "auth_key.h"

#define KEY_BUCKETS_MIN 256

int
auth_key_is_key(const char *tok, size_t n)
{
	return (n >= sizeof(AUTH_KEY_PREFIX) - 1 &&
	        memcmp(tok, AUTH_KEY_PREFIX, sizeof(AUTH_KEY_PREFIX) - 1) ==
	                0);
}

int
auth_key_hash(const char *tok, size_t n, char *out)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;

	if (EVP_Digest(tok, n, md, &mdlen, EVP_sha256(), NULL) != 1 ||
	    mdlen != AUTH_KEY_HASH_LEN / 2)
		return (-1);
	hex_encode(out, md, mdlen);
	out[AUTH_KEY_HASH_LEN] = '\0';
	return (0);
}

int
auth_key_scope_ok(struct mstr scopes, const char *need)
{
	size_t nl = strlen(need);
	uint32_t i = 0, b, e;

	while (i < scopes.n) {
		b = i;
		while (i < scopes.n && scopes.p[i] != ',')
			i++;
		e = i++;
		while (b < e && (scopes.p[b] == ' ' || scopes.p[b] == '\t'))
			b++;
		while (e > b &&
		       (scopes.p[e - 1] == ' ' || scopes.p[e - 1] == '\t'))
			e--;
		if (e - b == 1 && scopes.p[b] == '*')
			return (1);
		if (e - b == nl && memcmp(scopes.p + b, need, nl) == 0)
			return (1);
	}
	return (0);
}

/* FNV-1a over the hex text. */
static uint32_t
key_hash_of(const char *s)
{
	uint32_t h = 2166136261u;

	for (; *s != '\0'; s++) {
		h ^= (uint8_t)*s;
		h *= 16777619u;
	}
	return (h);
}

int
auth_keys_init(struct auth_keys *kt, const struct auth_key_conf *c)
{
	memset(kt, 0, sizeof(*kt));
	TAILQ_INIT(&kt->kt_pending);
	kt->kt_conf = *c;
	if ((kt->kt_bucket =
	             calloc(KEY_BUCKETS_MIN, sizeof(*kt->kt_bucket))) == NULL)
		return (-1);
	kt->kt_mask = KEY_BUCKETS_MIN - 1;
	return (0);
}

static void
key_free_parked(struct auth_park_list *l)
{
	struct auth_park *p;

	while ((p = TAILQ_FIRST(l)) != NULL) {
		TAILQ_REMOVE(l, p, p_link);
		free(p);
	}
}

static void
key_free(struct auth_key *k)
{
	key_free_parked(&k->k_parked);
	free(k->k_sub);
	free(k->k_scopes);
	free(k);
}

void
auth_keys_free(struct auth_keys *kt)
{
	struct auth_key *k, *next;

	if (kt->kt_bucket == NULL)
		return;
	for (size_t i = 0; i <= kt->kt_mask; i++)
		for (k = kt->kt_bucket[i]; k != NULL; k = next) {
			next = k->k_hnext;
			key_free(k);
		}
	free(kt->kt_bucket);
	memset(kt, 0, sizeof(*kt));
	TAILQ_INIT(&kt->kt_pending);
}

struct auth_key *
auth_keys_find(struct auth_keys *kt, const char *hash)
{
	uint32_t h = key_hash_of(hash);
	struct auth_key *k;

	for (k = kt->kt_bucket[h & kt->kt_mask]; k != NULL; k = k->k_hnext)
		if (k->k_h == h && strcmp(k->k_hash, hash) == 0)
			return (k);
	return (NULL);
}

/* Double the buckets; keep the old size if memory is short. */
static void
key_grow(struct auth_keys *kt)
{
	size_t n = (kt->kt_mask + 1) * 2;
	struct auth_key **b, *k, *next;

	if ((b = calloc(n, sizeof(*b))) == NULL)
		return;
	for (size_t i = 0; i <= kt->kt_mask; i++)
		for (k = kt->kt_bucket[i]; k != NULL; k = next) {
			next = k->k_hnext;
			k->k_hnext = b[k->k_h & (n - 1)];
			b[k->k_h & (n - 1)] = k;
		}
	free(kt->kt_bucket);
	kt->kt_bucket = b;
	kt->kt_mask = n - 1;
}

struct auth_key *
auth_keys_pending(struct auth_keys *kt, const char *hash, uint64_t now)
{
	struct auth_key *k;
	struct auth_key **b;

	if (strlen(hash) != AUTH_KEY_HASH_LEN)
		return (NULL);
	if ((k = auth_keys_find(kt, hash)) != NULL) {
		if (k->k_state == AUTH_KEY_PENDING)
			return (NULL);
		free(k->k_sub);
		free(k->k_scopes);
		k->k_sub = k->k_scopes = NULL;
	} else {
		if (kt->kt_count >= kt->kt_conf.entries_max &&
		    auth_keys_sweep(kt, now) == 0)
			return (NULL);
		if ((k = calloc(1, sizeof(*k))) == NULL)
			return (NULL);
		memcpy(k->k_hash, hash, AUTH_KEY_HASH_LEN + 1);
		k->k_h = key_hash_of(hash);
		TAILQ_INIT(&k->k_parked);
		if (kt->kt_count >= kt->kt_mask + 1)
			key_grow(kt);
		b = &kt->kt_bucket[k->k_h & kt->kt_mask];
		k->k_hnext = *b;
		*b = k;
		kt->kt_count++;
	}
	k->k_state = AUTH_KEY_PENDING;
	k->k_until = now + kt->kt_conf.check_ms;
	TAILQ_INSERT_TAIL(&kt->kt_pending, k, k_plink);
	return (k);
}

int
auth_keys_park(struct auth_keys *kt, struct auth_key *k, const struct msg *m,
               const char *to)
{
	struct auth_park *p;
	size_t tl = strlen(to);
	char *q;

	if (kt->kt_parked >= kt->kt_conf.park_max || tl >= sizeof(p->p_to))
		return (-1);
	p = malloc(sizeof(*p) + m->reqid.n + m->traceparent.n + m->body_len);
	if (p == NULL)
		return (-1);
	memcpy(p->p_to, to, tl + 1);
	q = p->p_buf;
	memcpy(q, m->reqid.p, m->reqid.n);
	p->p_head.reqid = (struct mstr){q, m->reqid.n};
	q += m->reqid.n;
	memcpy(q, m->traceparent.p, m->traceparent.n);
	p->p_head.traceparent = (struct mstr){q, m->traceparent.n};
	q += m->traceparent.n;
	if (m->body_len > 0)
		memcpy(q, m->body, m->body_len);
	p->p_body = q;
	p->p_body_len = m->body_len;
	p->p_head.deadline_ms = m->deadline_ms;
	p->p_head.reply_to = MSTR(p->p_to);
	TAILQ_INSERT_TAIL(&k->k_parked, p, p_link);
	k->k_nparked++;
	kt->kt_parked++;
	return (0);
}

void
auth_keys_take(struct auth_keys *kt, struct auth_key *k,
               struct auth_park_list *out)
{
	struct auth_park *p;

	while ((p = TAILQ_FIRST(&k->k_parked)) != NULL) {
		TAILQ_REMOVE(&k->k_parked, p, p_link);
		TAILQ_INSERT_TAIL(out, p, p_link);
	}
	kt->kt_parked -= k->k_nparked;
	k->k_nparked = 0;
}

int
auth_keys_settle(struct auth_keys *kt, struct auth_key *k, int valid,
                 struct mstr sub, struct mstr scopes, uint64_t now)
{
	if (k->k_state == AUTH_KEY_PENDING)
		TAILQ_REMOVE(&kt->kt_pending, k, k_plink);
	free(k->k_sub);
	free(k->k_scopes);
	k->k_sub = k->k_scopes = NULL;
	if (!valid) {
		k->k_state = AUTH_KEY_UNKNOWN;
		k->k_until = now + kt->kt_conf.unknown_ms;
		return (0);
	}
	k->k_state = AUTH_KEY_VALID;
	k->k_until = now + kt->kt_conf.valid_ms;
	if (scopes.n > AUTH_KEY_SCOPES_MAX)
		scopes.n = AUTH_KEY_SCOPES_MAX;
	if ((k->k_sub = mstr_dup(sub)) == NULL ||
	    (k->k_scopes = mstr_dup(scopes)) == NULL) {
		k->k_state = AUTH_KEY_UNKNOWN; /* not on the pending list */
		auth_keys_remove(kt, k);
		return (-1);
	}
	return (0);
}

void
auth_keys_remove(struct auth_keys *kt, struct auth_key *k)
{
	struct auth_key **pp;

	if (k->k_state == AUTH_KEY_PENDING)
		TAILQ_REMOVE(&kt->kt_pending, k, k_plink);
	kt->kt_parked -= k->k_nparked;
	k->k_nparked = 0;
	for (pp = &kt->kt_bucket[k->k_h & kt->kt_mask]; *pp != NULL;
	     pp = &(*pp)->k_hnext)
		if (*pp == k) {
			*pp = k->k_hnext;
			kt->kt_count--;
			break;
		}
	key_free(k);
}

struct auth_key *
auth_keys_overdue(struct auth_keys *kt, uint64_t now)
{
	struct auth_key *k = TAILQ_FIRST(&kt->kt_pending);

	return (k != NULL && now >= k->k_until ? k : NULL);
}

size_t
auth_keys_sweep(struct auth_keys *kt, uint64_t now)
{
	struct auth_key *k, *next;
	size_t n = 0;

	for (size_t i = 0; i <= kt->kt_mask; i++)
		for (k = kt->kt_bucket[i]; k != NULL; k = next) {
			next = k->k_hnext;
			if (k->k_state != AUTH_KEY_PENDING &&
			    now >= k->k_until) {
				auth_keys_remove(kt, k);
				n++;
			}
		}
	return (n);
}
