/* SPDX-License-Identifier: ISC */
/*
 * edge_pending: the table of requests waiting for a CHAT_REPLY, keyed by
 * request id.  Entries are intrusive (embedded in the caller's
 * per-request state, which lives in the h2o request's pool), so the table
 * never allocates per request; it only grows its bucket array.
 *
 * Callers: edge_http.c (add when a chat is sent to auth, delete when it is
 * answered, times out or its client leaves) and edge_dispatch.c (find on
 * CHAT_REPLY).  Single-threaded (the loop thread).  Never logs.  It must
 * never keep a pointer to an entry after edge_pending_del().
 */
#ifndef TROUPE_EDGE_PENDING_H
#define TROUPE_EDGE_PENDING_H

#include <stddef.h>
#include <stdint.h>

#include "edge_req.h"

struct edge_pending_ent {
	struct edge_pending_ent *next; /* bucket chain */
	uint64_t hash;
	int linked;                     /* in a table now */
	char reqid[EDGE_REQID_LEN + 1]; /* NUL-terminated */
};

struct edge_pending {
	struct edge_pending_ent **tab;
	size_t mask; /* buckets - 1 (a power of 2 minus 1) */
	size_t count;
};

/* An empty table with room for about hint entries; -1 on ENOMEM. */
int edge_pending_init(struct edge_pending *, size_t hint);
void edge_pending_free(struct edge_pending *);
/* Link e (its reqid filled in).  Never fails: if the bucket array cannot
 * grow, chains get longer. */
void edge_pending_add(struct edge_pending *, struct edge_pending_ent *);
/* The entry for the request id id (n bytes), or NULL. */
struct edge_pending_ent *edge_pending_find(const struct edge_pending *,
                                           const char *id, size_t n);
/* Unlink e; harmless if it is not linked. */
void edge_pending_del(struct edge_pending *, struct edge_pending_ent *);
/* Entries linked now. */
size_t edge_pending_count(const struct edge_pending *);

#endif
