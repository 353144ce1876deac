/* SPDX-License-Identifier: ISC */
/*
 * edge_addr: the per-client-address connection limits of troupe-edge
 * ([edge] max_conns_per_addr, conn_rate_per_addr, conn_burst_per_addr).
 * A bounded hash table of client addresses (IPv4 /32, IPv6 /64), each
 * with its open connections and a token bucket of new connections.
 *
 * Callers: edge_http.c asks at every accept (edge_addr_admit), tells of
 * every close (edge_addr_release) and sweeps (edge_addr_gc); the unit test
 * drives it with a made-up clock.  Pure: no I/O, no log, no h2o;
 * single-threaded (the loop thread).  It must never allocate without
 * bound: at most EDGE_ADDR_MAX entries; when the table is full a new
 * address is admitted untracked.  An entry is freed once it has no open
 * connection, its bucket is full again and it has not been refused for a
 * minute.
 */
#ifndef TROUPE_EDGE_ADDR_H
#define TROUPE_EDGE_ADDR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define EDGE_ADDR_MAX 65536     /* addresses tracked at most */
#define EDGE_ADDR_WARN_MS 60000 /* one refusal logged per address per */
#define EDGE_ADDR_STRLEN 64     /* edge_addr_fmt()'s buffer */

/* A client address as limited: IPv4 /32 (v4 mapped into IPv6 too), or
 * the /64 of an IPv6 address. */
struct edge_addr_key {
	uint8_t b[8]; /* IPv4: b[0..3], the rest 0; IPv6: the /64 */
	uint8_t v6;
};

struct edge_addr_ent {
	struct edge_addr_ent *next; /* bucket chain */
	struct edge_addr_key key;
	uint8_t warned;     /* a refusal was logged at warned_ms */
	uint32_t conns;     /* open connections counted here */
	uint64_t tokens;    /* thousandths of a connection */
	uint64_t last_ms;   /* when tokens was brought up to date */
	uint64_t warned_ms; /* last refusal logged */
};

struct edge_addr {
	struct edge_addr_ent **tab;
	size_t mask;   /* buckets - 1 */
	size_t count;  /* entries */
	size_t cursor; /* the next bucket edge_addr_gc() looks at */
	uint64_t k0, k1;
	uint32_t max_conns; /* 0: no limit */
	uint32_t rate;      /* new connections per second; 0: no limit */
	uint32_t burst;     /* the bucket's size, in connections */
};

/* What edge_addr_admit() decided. */
enum edge_addr_verdict {
	EDGE_ADDR_OK,         /* admitted and counted (*ent set) */
	EDGE_ADDR_UNTRACKED,  /* admitted, the table being full */
	EDGE_ADDR_OVER_CONNS, /* refused: max_conns open already */
	EDGE_ADDR_OVER_RATE   /* refused: the bucket is empty */
};

/* An empty table keyed with the 16 bytes of seed; -1 on ENOMEM. */
int edge_addr_init(struct edge_addr *, const unsigned char seed[16]);
/* Free the table and every entry (connections still pointing at one must
 * not be released afterwards). */
void edge_addr_free(struct edge_addr *);
/* Set the limits (0: none; burst is raised to 1 if rate is set). */
void edge_addr_limits(struct edge_addr *, uint32_t max_conns, uint32_t rate,
                      uint32_t burst);
/* Whether any limit is set (else callers need not ask). */
int edge_addr_on(const struct edge_addr *);
/* The key of sa; -1 if it is not an IPv4 or IPv6 address (exempt). */
int edge_addr_key_of(const struct sockaddr *sa, socklen_t len,
                     struct edge_addr_key *k);
/* Write k as text ("192.0.2.1", "2001:db8:1:2::/64") to out
 * (EDGE_ADDR_STRLEN bytes). */
void edge_addr_fmt(const struct edge_addr_key *k, char *out);
/* Decide on a new connection from k at now_ms.  On EDGE_ADDR_OK *ent is
 * its entry (pass it to edge_addr_release at close), else NULL.  On a
 * refusal *warn is 1 if it is the first for that address in
 * EDGE_ADDR_WARN_MS (log it), else 0. */
enum edge_addr_verdict edge_addr_admit(struct edge_addr *,
                                       const struct edge_addr_key *k,
                                       uint64_t now_ms,
                                       struct edge_addr_ent **ent, int *warn);
/* A connection counted on ent closed; ent may be freed. */
void edge_addr_release(struct edge_addr *, struct edge_addr_ent *ent,
                       uint64_t now_ms);
/* Free idle entries whose bucket is full again, looking at up to budget
 * buckets from where the last call stopped; returns how many it freed. */
size_t edge_addr_gc(struct edge_addr *, uint64_t now_ms, size_t budget);
/* Entries in the table now. */
size_t edge_addr_count(const struct edge_addr *);

#endif
