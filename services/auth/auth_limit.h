/* SPDX-License-Identifier: ISC */
/*
 * auth_limit: the inbound rate limits of troupe-auth, per (tenant, bot,
 * route): the [limits] settings, the RateLimit and RateLimit-Policy field
 * values (IETF draft-ietf-httpapi-ratelimit-headers, structured fields),
 * and the table of requests waiting for storage's LIMIT_REPLY, matched by
 * request id and key, oldest first so that overdue ones are found at once.
 *
 * Callers: auth.c (config, timer), auth_dispatch.c (LIMIT_CHECK,
 * LIMIT_REPLY), the unit tests.  Pure data: no ipc, no logging, no clock
 * (callers pass monotonic ms).  It must never hold more than park_max
 * requests, and a rate of 0 must never cost a round trip (the caller asks
 * auth_limit_rate() first).
 */
#ifndef TROUPE_AUTH_LIMIT_H
#define TROUPE_AUTH_LIMIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "ipc.h"
#include "util.h"

#define AUTH_LIMIT_NROUTES 6
#define AUTH_LIMIT_KEY_MAX 512 /* "<tenant>|<bot>|<route>" */
#define AUTH_LIMIT_TO_MAX 64   /* reply_to, with its NUL */
#define AUTH_LIMIT_FIELD_MAX 160

enum auth_limit_mode {
	AUTH_LIMIT_OFF,     /* no check at all */
	AUTH_LIMIT_SHADOW,  /* check after forwarding; count refusals */
	AUTH_LIMIT_ENFORCE, /* wait for the check; 429 when limited */
};

/* One route's limit: rate requests per window_ms, burst more at once;
 * rate 0: no limit. */
struct auth_limit_rate {
	uint64_t rate, window_ms, burst;
};

/* Settings ([limits]). */
struct auth_limit_conf {
	enum auth_limit_mode mode;
	struct auth_limit_rate route[AUTH_LIMIT_NROUTES];
	int fail_open;     /* on_redis_down = open */
	uint64_t check_ms; /* LIMIT_REPLY awaited this long */
	size_t park_max;   /* requests waiting, at most */
};

/* A request waiting for its LIMIT_REPLY (enforce), or the record of a
 * shadow check (already forwarded; no body). */
struct auth_lim {
	TAILQ_ENTRY(auth_lim) l_link; /* oldest first */
	struct auth_lim *l_hnext;
	uint32_t l_h;
	uint64_t l_until; /* monotonic ms: give up */
	int l_route;
	int l_shadow;
	struct msg_head l_head; /* strings point into l_buf */
	char l_to[AUTH_LIMIT_TO_MAX];
	struct mstr l_key, l_sub, l_scopes; /* into l_buf */
	const char *l_body;
	size_t l_body_len;
	char l_buf[];
};
TAILQ_HEAD(auth_lim_list, auth_lim);

struct auth_limits {
	struct auth_lim **lt_bucket;
	size_t lt_mask;
	size_t lt_count;
	struct auth_lim_list lt_all;
	struct auth_limit_conf lt_conf;
};

/* The route names, by index ("v1.chat", "v3.chat", ...). */
extern const char *const auth_limit_routes[AUTH_LIMIT_NROUTES];
/* The index of a route name, or -1. */
int auth_limit_route(struct mstr route);

/* Read [limits] (common/conf.h) into c; -1 with err filled if a key is
 * bad. */
int auth_limit_conf_read(struct auth_limit_conf *c, char *err, size_t errlen);
/* The limit of route index r in c, or NULL if it has none (mode off,
 * rate 0, unknown route). */
const struct auth_limit_rate *auth_limit_rate(const struct auth_limit_conf *c,
                                              int r);
/* Write "<tenant>|<bot>|<route>" to out (AUTH_LIMIT_KEY_MAX + 1 bytes);
 * its length, or -1 if it does not fit. */
int auth_limit_key(char *out, struct mstr tenant, struct mstr bot,
                   const char *route);
/* The RateLimit-Policy value of a route's limit: "<name>";q=N;w=S (w in
 * whole seconds, at least 1); its length, or -1 if n is too small. */
int auth_limit_policy(char *out, size_t n, const char *name,
                      const struct auth_limit_rate *);
/* The RateLimit value: "<name>";r=REMAINING;t=SECONDS (reset, rounded
 * up); its length, or -1. */
int auth_limit_field(char *out, size_t n, const char *name, uint64_t remaining,
                     uint64_t reset_ms);
/* Retry-After seconds for a wait of ms: rounded up, at least 1. */
uint64_t auth_limit_retry_s(uint64_t ms);

/* An empty table with c; -1 on ENOMEM. */
int auth_limits_init(struct auth_limits *, const struct auth_limit_conf *c);
/* Free the table and every entry. */
void auth_limits_free(struct auth_limits *);
/* Park a request (head h, answered at to, body copied unless shadow)
 * waiting for the check of key until now + check_ms; NULL when park_max
 * are parked, a string is too long, or on ENOMEM. */
struct auth_lim *auth_limits_park(struct auth_limits *,
                                  const struct msg_head *h, const char *to,
                                  int route, int shadow, struct mstr key,
                                  struct mstr sub, struct mstr scopes,
                                  const char *body, size_t body_len,
                                  uint64_t now);
/* The oldest entry for (reqid, key), taken off the table, or NULL. */
struct auth_lim *auth_limits_take(struct auth_limits *, struct mstr reqid,
                                  struct mstr key);
/* The oldest entry overdue at now, taken off the table, or NULL. */
struct auth_lim *auth_limits_overdue(struct auth_limits *, uint64_t now);
/* When the oldest entry is due (monotonic ms), or 0 if none waits. */
uint64_t auth_limits_next(const struct auth_limits *);

#endif
