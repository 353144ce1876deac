/* SPDX-License-Identifier: ISC */
/*
 * auth_key: the API keys (`pat_...`) troupe-auth has asked storage about.
 * A table by the key's hex SHA-256 holds, per key, what storage said
 * (valid with its sub and scopes, or unknown) until it expires, or that a
 * KEY_CHECK is in flight, with the requests parked until it is answered:
 * one check per hash serves every request that carries that key.
 *
 * Callers: auth_dispatch.c (lookups, parking, KEY_REPLY), auth.c (config,
 * the tick that gives up on silent checks and sweeps expired entries),
 * and the unit tests.  Pure data: no ipc, no logging, no clock (callers
 * pass monotonic ms).  It must never keep a key's text (only its hash),
 * never hold more than its configured entries and parked requests.
 */
#ifndef TROUPE_AUTH_KEY_H
#define TROUPE_AUTH_KEY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "ipc.h"
#include "util.h"

#define AUTH_KEY_PREFIX "pat_"
#define AUTH_KEY_TEXT_MAX 256   /* longer tokens are refused unchecked */
#define AUTH_KEY_HASH_LEN 64    /* hex SHA-256 */
#define AUTH_KEY_SCOPES_MAX 256 /* bytes of a key's scopes kept */
#define AUTH_KEY_TO_MAX 64      /* reply_to of a parked request, with NUL */

enum auth_key_state {
	AUTH_KEY_PENDING, /* KEY_CHECK sent, no answer yet */
	AUTH_KEY_VALID,   /* storage said 200 */
	AUTH_KEY_UNKNOWN, /* storage said 401 */
};

/* A request waiting for its key's check: a copy of its head and body. */
struct auth_park {
	TAILQ_ENTRY(auth_park) p_link;
	struct msg_head p_head; /* strings point into p_buf */
	char p_to[AUTH_KEY_TO_MAX];
	const char *p_body;
	size_t p_body_len;
	char p_buf[];
};
TAILQ_HEAD(auth_park_list, auth_park);

struct auth_key {
	struct auth_key *k_hnext;
	TAILQ_ENTRY(auth_key) k_plink; /* on the pending list */
	uint32_t k_h;
	enum auth_key_state k_state;
	uint64_t k_until; /* monotonic ms: cached until; pending: give up */
	char k_hash[AUTH_KEY_HASH_LEN + 1];
	char *k_sub, *k_scopes; /* VALID only */
	struct auth_park_list k_parked;
	size_t k_nparked;
};
TAILQ_HEAD(auth_key_list, auth_key);

/* Settings ([auth] key_*). */
struct auth_key_conf {
	uint64_t valid_ms;   /* a valid answer is used this long */
	uint64_t unknown_ms; /* an unknown answer is used this long */
	uint64_t check_ms;   /* a check unanswered this long fails */
	size_t park_max;     /* parked requests at most, all keys */
	size_t entries_max;  /* keys in the table at most */
};

struct auth_keys {
	struct auth_key **kt_bucket;
	size_t kt_mask;
	size_t kt_count;
	size_t kt_parked;
	struct auth_key_list kt_pending; /* oldest check first */
	struct auth_key_conf kt_conf;
};

/* Whether tok (n bytes) is an API key rather than a JWT. */
int auth_key_is_key(const char *tok, size_t n);
/* Write the lowercase hex SHA-256 of tok to out (65 bytes, NUL ended);
 * -1 if OpenSSL fails. */
int auth_key_hash(const char *tok, size_t n, char *out);
/* Whether scopes (comma list, spaces around names ignored) grant need:
 * it names need or "*". */
int auth_key_scope_ok(struct mstr scopes, const char *need);

/* An empty table with conf; -1 on ENOMEM. */
int auth_keys_init(struct auth_keys *, const struct auth_key_conf *);
/* Free the table, its entries and parked requests. */
void auth_keys_free(struct auth_keys *);
/* The entry for a hex hash, or NULL. */
struct auth_key *auth_keys_find(struct auth_keys *, const char *hash);
/* Start a check for hash: a new entry, or the (expired, not pending)
 * existing one reset, PENDING until now + check_ms; NULL if the table is
 * full or on ENOMEM. */
struct auth_key *auth_keys_pending(struct auth_keys *, const char *hash,
                                   uint64_t now);
/* Park a copy of m, to be answered at to, on k; -1 when park_max
 * requests are parked already or on ENOMEM. */
int auth_keys_park(struct auth_keys *, struct auth_key *, const struct msg *,
                   const char *to);
/* Move k's parked requests to out (emptying k's list). */
void auth_keys_take(struct auth_keys *, struct auth_key *,
                    struct auth_park_list *out);
/* Record storage's answer on pending k: VALID (copies sub and scopes)
 * or UNKNOWN, until now + the configured time; -1 on ENOMEM (k is then
 * removed). */
int auth_keys_settle(struct auth_keys *, struct auth_key *, int valid,
                     struct mstr sub, struct mstr scopes, uint64_t now);
/* Remove k (its parked requests must have been taken) and free it. */
void auth_keys_remove(struct auth_keys *, struct auth_key *);
/* The oldest pending entry whose check is overdue at now, or NULL. */
struct auth_key *auth_keys_overdue(struct auth_keys *, uint64_t now);
/* Remove every settled entry expired at now; the number removed. */
size_t auth_keys_sweep(struct auth_keys *, uint64_t now);

#endif
