/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_limit: how much an upstream (or one bot on it) may be sent,
 * decided from the rate-limit signals its answers carry (PRODUCT.md §5).
 * Pure: no clock (callers pass now, in ms), no I/O, no allocation.
 *
 * Policy LIMIT_FIXED reproduces the source design exactly: on a throttle
 * signal the child count is cut by 30 % (never below children_min, 2), the
 * upstream is paused until its Retry-After has passed, and after quiet_ms
 * (5 s) without a signal the count doubles (never above children_max, 50);
 * the in-flight limit is children x runs_per_child.
 *
 * Policy LIMIT_AIMD adapts an in-flight limit per key: a throttle signal
 * multiplies it (or the runs in flight, if fewer) by decrease (0.7), at
 * most once per cut_gap_ms or round trip (a burst of 429s answering one
 * round is one signal), and pauses the key for the backoff; each
 * run answered without a signal adds 1/limit (one more run per round trip);
 * a round trip over latency_factor x the smallest one recently seen and
 * at least latency_floor_ms longer than it (the queue building up in the
 * upstream; the floor keeps a fast upstream's jitter, and the gateway's
 * own queueing under load, from reading as one) multiplies it by 0.9, at
 * most once a round trip and once per cut_gap_ms.  The child count
 * follows the sum of the limits.
 */
#ifndef TROUPE_DISPATCHER_LIMIT_H
#define TROUPE_DISPATCHER_LIMIT_H

#include <stdint.h>

enum limit_policy { LIMIT_FIXED, LIMIT_AIMD };

struct limit_conf {
	enum limit_policy policy;
	int children_min;          /* 2 */
	int children_max;          /* 50 */
	int runs_per_child;        /* the dispatcher's runs_per_worker */
	uint64_t quiet_ms;         /* fixed: double after this long, 5000 */
	double cut;                /* fixed: 0.3 */
	double decrease;           /* aimd: 0.7 */
	double latency_factor;     /* aimd: 2.0 */
	double limit_min;          /* aimd: 1 */
	double limit_max;          /* aimd: children_max x runs_per_child */
	int children_start;        /* a fresh key's children (fixed) or
	                              limit / runs_per_child (aimd); default
	                              children_min, the dispatcher uses max */
	uint64_t cut_gap_ms;       /* aimd: at most one throttle cut per this
	                              long or per smallest round trip, 100 */
	uint64_t latency_floor_ms; /* aimd: a slower round trip must also
	                              be this much over the smallest, 50 */
};

/* What one finished run said about its upstream. */
struct limit_obs {
	int throttled;       /* 429, 503, a Coze throttle code */
	int timeout;         /* the upstream call timed out */
	int64_t backoff_ms;  /* Retry-After or an exhausted quota's reset */
	uint64_t latency_us; /* the upstream call, 0: unknown */
	uint64_t inflight;   /* aimd: runs of the key in flight when it
	                        ended, 0: unknown (the cut then starts
	                        from the limit) */
};

struct limit_state {
	double limit;         /* in-flight runs allowed */
	int children;         /* fixed: the child count it wants */
	uint64_t pause_until; /* send nothing before (ms), 0: none */
	uint64_t last_signal; /* ms of the last throttle signal, 0: none */
	uint64_t last_change; /* ms of the last change of limit */
	uint64_t min_rtt_us;  /* aimd: smallest round trip (decays) */
	uint64_t min_rtt_at;  /* when it was seen */
	uint64_t last_latency_cut;
	uint64_t last_cut; /* aimd: ms of the last throttle cut */
	uint64_t signals;  /* throttle signals seen */
};

/* Defaults as documented above (runs_per_child given). */
void limit_conf_default(struct limit_conf *, enum limit_policy,
                        int runs_per_child);
/* A fresh key: fixed starts at children_min children; aimd at the
 * limit children_min children would carry. */
void limit_init(struct limit_state *, const struct limit_conf *, uint64_t now);
/* A run of this key finished with obs.  1 if the limit (or the child
 * count) changed, with *cause a static sentence for the log; else 0. */
int limit_on_result(struct limit_state *, const struct limit_conf *,
                    const struct limit_obs *, uint64_t now,
                    const char **cause);
/* Called every second or so: fixed doubles after quiet_ms without a
 * signal.  1 and *cause if something changed. */
int limit_on_tick(struct limit_state *, const struct limit_conf *,
                  uint64_t now, const char **cause);
/* Whether one more run may start now with inflight already running. */
int limit_admit(const struct limit_state *, uint64_t inflight, uint64_t now);
/* The in-flight limit as a whole number (at least 1 unless paused). */
uint64_t limit_value(const struct limit_state *);
/* ms until the key may send again (0: now). */
uint64_t limit_wait_ms(const struct limit_state *, uint64_t now);
/* The child count a set of keys wants: fixed, the largest children of
 * any key; aimd, enough children to carry the sum of the limits; both
 * within [children_min, children_max]. */
int limit_children(const struct limit_conf *, const struct limit_state *,
                   int n);

#endif
