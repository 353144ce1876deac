/* SPDX-License-Identifier: ISC */
/*
 * auth: what the files of troupe-auth share: the process state (one per
 * process, owned by auth.c) and the dispatch functions, one per peer, that
 * auth.c's peer table calls.  Nothing outside services/auth includes it.
 */
#ifndef TROUPE_AUTH_H
#define TROUPE_AUTH_H

#include <stdint.h>

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
	uint64_t *forwarded;         /* CHAT_RUN queued for the dispatcher */
	uint64_t *deadline;          /* refused: deadline already past */
	uint64_t *unavailable;       /* refused: dispatcher backlog full */
	uint64_t *reply_lost;        /* a CHAT_REPLY the edge link refused */
	uint64_t *dropped_bad;       /* undecodable bodies */
	uint64_t *dropped_unhandled; /* unknown or misrouted messages */
	uint64_t *dropped_no_reply;  /* no usable reply_to */
};

struct auth {
	struct svc svc;
	struct auth_token_conf *tok; /* replaced whole on reload */
	struct metrics *metrics;     /* ours; rendered by on_metrics */
	struct auth_stats st;
	uint8_t warned_bad[65536 / 8]; /* per type: logged once */
	uint8_t warned_unhandled[65536 / 8];
	int warned_no_reply;
};

/* Handle one envelope from an edge; an auth_dispatch value. */
int auth_dispatch_edge(struct auth *, const struct msg *);

#endif
