/* SPDX-License-Identifier: ISC */
/*
 * telemetry_sla.h: the SLA signal (docs/tiers.md).  Per service, the p99
 * of the eBPF run-queue latency over [telemetry] sla_window_ms, against
 * sla_runq_p99_us, sent to the dispatcher as SLA_SIGNAL once per window.
 * The p99 and the window sums are pure (unit-tested); telemetry.c calls
 * init, reconf and tick.
 */
#ifndef TROUPE_TELEMETRY_SLA_H
#define TROUPE_TELEMETRY_SLA_H

#include <stddef.h>
#include <stdint.h>

#include "telemetry.h"

/* Fewer run-queue events than this in a window: no breach (a p99 of a
 * handful of wake-ups is one unlucky wake-up). */
#define SLA_MIN_EVENTS 20

/* The p99 in microseconds of a log2 histogram (HEAT_SLOTS slots: 0 is
 * [0, 2) us, k >= 1 is [2^k, 2^(k+1)) us), linear within its slot; the
 * last slot gives its lower bound.  *n gets the number of events.  0
 * when empty. */
uint64_t sla_p99_us(const uint64_t counts[HEAT_SLOTS], uint64_t *n);
/* Sum service id's run-queue counts of the seconds in (from, to] still in
 * the ring into out; the number of seconds found. */
int sla_window(const struct heat *, int id, int64_t from, int64_t to,
               uint64_t out[HEAT_SLOTS]);

/* Read [telemetry] sla_window_ms and sla_runq_p99_us; 0, or -1 with err
 * filled (nothing changed). */
int telemetry_sla_conf(char *err, size_t errlen);
/* Register the metrics (after telemetry_sla_conf). */
void telemetry_sla_init(struct telemetry *);
/* Once a second, after telemetry_ebpf_tick(): once per window, one
 * SLA_SIGNAL per service to the dispatcher (only while the probes run;
 * one log line when they do not). */
void telemetry_sla_tick(struct telemetry *);

#endif
