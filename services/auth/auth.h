/* SPDX-License-Identifier: ISC */
/*
 * auth: what the files of troupe-auth share: the process state (one per
 * process, owned by auth.c) and the dispatch functions, one per peer, that
 * auth.c's peer table calls.  Nothing outside services/auth includes it.
 */
#ifndef TROUPE_AUTH_H
#define TROUPE_AUTH_H

#include <stdint.h>

#include "auth_key.h"
#include "auth_limit.h"
#include "auth_token.h"
#include "proto.h"
#include "svc.h"

/* Longest mailbox name a reply_to may hold (with its NUL). */
#define AUTH_NAME_MAX 64

/* What a dispatch function did with an envelope. */
enum auth_dispatch {
	DISPATCH_OK,        /* handled (answered or forwarded) */
	DISPATCH_BAD,       /* a known message whose body does not decode */
	DISPATCH_UNHANDLED, /* a message this peer may not send us */
};

/* Counters, created at start (never NULL afterwards). */
struct auth_stats {
	uint64_t *verdicts[AUTH_TOKEN_NVERDICTS];
	uint64_t *fwd_run;         /* CHAT_RUN queued for the dispatcher */
	uint64_t *fwd_cancel;      /* CHAT_CANCEL queued for it */
	uint64_t *fwd_query;       /* CHAT_QUERY queued for storage */
	uint64_t *deadline;        /* refused: deadline already past */
	uint64_t *unavailable;     /* refused: next hop backlog full */
	uint64_t *key_unavailable; /* refused: key check failed (503) */
	uint64_t *park_full;       /* refused: too many parked (503) */
	uint64_t *scope;           /* refused: scope missing (403) */
	uint64_t *bad_route;       /* refused: unknown route (400) */
	uint64_t *key_hit, *key_hit_unknown, *key_miss, *key_joined;
	uint64_t *key_ok, *key_refused, *key_storage_503, *key_timeout;
	uint64_t *key_stray;         /* KEY_REPLY for no check in flight */
	uint64_t *reply_lost;        /* a CHAT_REPLY the edge link refused */
	uint64_t *dropped_bad;       /* undecodable bodies */
	uint64_t *dropped_unhandled; /* unknown or misrouted messages */
	uint64_t *dropped_no_reply;  /* no usable reply_to */
	/* Inbound limits (troupe_auth_limit_checks_total by result). */
	uint64_t *lim_allowed, *lim_limited, *lim_shadow_allowed,
	        *lim_shadow_limited, *lim_unknown, *lim_timeout, *lim_stray,
	        *lim_park_full, *lim_send_failed;
	uint64_t *lim_open, *lim_closed; /* unknown: admitted / 503 */
	uint64_t *rate_limited;          /* refused 429 */
};

struct auth {
	struct svc svc;
	struct auth_token_conf *tok; /* replaced whole on reload */
	struct metrics *metrics;     /* ours; rendered by on_metrics */
	struct auth_stats st;
	struct auth_keys keys;         /* API keys storage told us about */
	struct auth_limits lims;       /* requests waiting for LIMIT_REPLY */
	struct loop_timer *lim_timer;  /* the oldest of them is due */
	int lim_failing;               /* storage cannot tell (logged) */
	struct loop_timer *tick;       /* overdue checks, expired entries */
	uint64_t swept_ms;             /* last sweep, monotonic */
	uint8_t warned_bad[65536 / 8]; /* per type: logged once */
	uint8_t warned_unhandled[65536 / 8];
	int warned_no_reply;
};

/* Handle one envelope from an edge; an auth_dispatch value. */
int auth_dispatch_edge(struct auth *, const struct msg *);
/* Handle one envelope from storage (KEY_REPLY, LIMIT_REPLY); an
 * auth_dispatch value. */
int auth_dispatch_storage(struct auth *, const struct msg *);
/* The oldest limit check is due: settle the overdue ones per [limits]
 * on_redis_down and re-arm the timer. */
void auth_dispatch_limit_timer(struct auth *);
/* Periodic: answer 503 for key checks storage left unanswered, drop
 * expired cache entries. */
void auth_dispatch_tick(struct auth *);

#endif
