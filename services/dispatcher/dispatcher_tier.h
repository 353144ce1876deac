/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_tier.h: the degradation tiers of PRODUCT.md §6 (docs/
 * tiers.md).  A pure state machine (tier_step: inputs and a clock in, the
 * tier out, no I/O) and the dispatcher's side around it (config, the
 * signals HEALTH and SLA_SIGNAL, the tick, TIER_STATE to the edge, the
 * journal line and the metrics).  Callers: dispatcher.c (init, reload,
 * tick), dispatcher_dispatch.c (through dispatcher.h's
 * dispatcher_tier_health and dispatcher_tier_sla), the admission in
 * dispatcher_run.c (dispatcher_tier_now), the unit tests.  Nothing here
 * blocks or allocates after init.
 */
#ifndef TROUPE_DISPATCHER_TIER_H
#define TROUPE_DISPATCHER_TIER_H

#include <stddef.h>
#include <stdint.h>

#define TIER_LEVELS 4        /* L0 (normal) .. L3 */
#define TIER_CAUSE_MAX 160   /* bytes of a cause, NUL included */
#define TIER_QHIST 64        /* queue depth samples kept, one a second */
#define TIER_PUBLISH_MS 2000 /* TIER_STATE to the edge at least this often */

struct dispatcher;

/* [dispatcher] tier_* keys. */
struct tier_conf {
	uint64_t enter_ms;        /* a condition must hold this long */
	uint64_t leave_ms;        /* ... and be clear this long to leave */
	uint32_t queue_low_pct;   /* L1: queue above this % of queue_max */
	uint32_t queue_high_pct;  /* L3: queue above this % of queue_max */
	uint64_t dep_latency_us;  /* L1: storage's commit p99 above this */
	uint64_t health_stale_ms; /* a HEALTH older than this is ignored */
};

/* What the machine looks at, once per step. */
struct tier_input {
	uint64_t now_ms;   /* monotonic */
	size_t qlen, qmax; /* runs waiting, queue_max (0: no queue) */
	int health;        /* 1: the HEALTH fields below are fresh */
	int pg_ok, redis_ok;
	uint64_t spool_bytes;
	uint64_t dep_latency_us;
	int sla_breach;          /* a fresh SLA_SIGNAL says breach */
	const char *sla_service; /* the worst breaching service */
	uint64_t sla_p99_us, sla_threshold_us;
};

/* The machine's memory. */
struct tier_fsm {
	int tier;          /* the highest active level */
	uint64_t since_ms; /* monotonic: tier began */
	int active[TIER_LEVELS];
	int cond[TIER_LEVELS]; /* the condition held at the last step */
	uint64_t held_ms[TIER_LEVELS];  /* monotonic: cond became true */
	uint64_t clear_ms[TIER_LEVELS]; /* monotonic: cond became false */
	char why[TIER_LEVELS][TIER_CAUSE_MAX]; /* latest cause of a level */
	char cause[TIER_CAUSE_MAX];            /* why the current tier */
	uint64_t sla_ms;          /* monotonic: breach began; 0: none */
	size_t qhist[TIER_QHIST]; /* queue depth per second */
	uint64_t qhist_sec;       /* the second of the latest sample */
	int qhist_n;              /* samples taken, capped */
};

/* Defaults of every key (the values docs/tiers.md lists). */
void tier_conf_default(struct tier_conf *);
/* A machine in L0 at now_ms. */
void tier_init(struct tier_fsm *, uint64_t now_ms);
/*
 * One step: work out each level's condition from in, apply hysteresis
 * (a level becomes active once its condition held enter_ms, and stops
 * once it was clear leave_ms), and make the highest active level the
 * tier.  Returns 1 if the tier changed (f->cause says why), else 0.
 */
int tier_step(struct tier_fsm *, const struct tier_conf *,
              const struct tier_input *);
/* "L0" .. "L3". */
const char *tier_name(int tier);
/* The queue mark of pct percent of qmax: at least 1; 0 when qmax is 0. */
size_t tier_queue_mark(size_t qmax, uint32_t pct);

/* Read [dispatcher] tier_* (first call: also set up the metrics and the
 * state); 0, or -1 with err filled and nothing changed. */
int dispatcher_tier_init(struct dispatcher *, char *err, size_t errlen);
/* Every dispatcher tick: step the machine; on a change log one line,
 * update the metrics and send TIER_STATE to the edge (and every
 * TIER_PUBLISH_MS anyway). */
void dispatcher_tier_tick(struct dispatcher *);
/* Seconds a client refused in L3 should wait (Retry-After). */
uint64_t dispatcher_tier_retry_after(const struct dispatcher *);
/* Why the current tier ("" in L0), NUL-terminated. */
const char *dispatcher_tier_cause(const struct dispatcher *);

#endif
