/* SPDX-License-Identifier: ISC */
/*
 * edge_tier: the edge's view of the degradation tier the dispatcher
 * publishes (TIER_STATE; docs/tiers.md).  It answers three questions:
 * which tier now (a state not refreshed for EDGE_TIER_STALE_MS is
 * forgotten: L0), shed this new chat (L3 and more than [edge]
 * l3_inflight chats open), and what /readyz says.  Callers:
 * edge_dispatch.c (TIER_STATE), edge_http.c (the chat routes and
 * /readyz), the unit test (which includes edge_tier.c whole).  No I/O;
 * never logs per request.
 */
#ifndef TROUPE_EDGE_TIER_H
#define TROUPE_EDGE_TIER_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"
#include "svc.h"

#define EDGE_TIER_STALE_MS 10000 /* 5 missed TIER_STATEs: back to L0 */

/* Register the metrics and read [edge] l3_inflight. */
void edge_tier_init(struct svc *);
/* Set l3_inflight (0: the chats open when L3 began). */
void edge_tier_limit(uint64_t l3_inflight);
/* TIER_STATE from the dispatcher, at monotonic now_ms. */
void edge_tier_set(const struct tier_state *, uint64_t now_ms);
/* The tier now: 0..3. */
int edge_tier_now(uint64_t now_ms);
/* Whether to refuse a new chat now with open chats already open; if so,
 * *retry_after is the Retry-After in seconds, and it is counted. */
int edge_tier_shed(size_t open, uint64_t now_ms, uint64_t *retry_after);
/* The /readyz body when every peer is up: appends JSON to out and
 * returns the status (200, or 503 in L3 with *retry_after set); -1 on
 * ENOMEM. */
int edge_tier_readyz(struct buf *out, uint64_t now_ms, uint64_t *retry_after);

#endif
