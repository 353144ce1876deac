/* SPDX-License-Identifier: ISC */
/*
 * metrics: one registry per process of counters, gauges and histograms,
 * rendered as Prometheus text.  A series is named by its family and its
 * label text (without braces, e.g. `service="edge",code="0"`); asking for
 * the same pair again returns the same series, so hot paths keep the
 * pointer.  Histogram buckets are fixed: 1 ms .. 120 s.  Single-threaded
 * (the loop thread).  Never logs.
 */
#ifndef TROUPE_METRICS_H
#define TROUPE_METRICS_H

#include <stdint.h>

#include "util.h"

struct metrics;
struct histo;

struct metrics *metrics_new(void);
void metrics_free(struct metrics *);
/* The counter family{labels}, created at 0; NULL on ENOMEM. */
uint64_t *metrics_counter(struct metrics *, const char *family,
    const char *help, const char *labels);
/* The gauge family{labels}; set through the pointer. */
double *metrics_gauge(struct metrics *, const char *family, const char *help,
    const char *labels);
/* The histogram family{labels} (seconds). */
struct histo *metrics_histo(struct metrics *, const char *family,
    const char *help, const char *labels);
void histo_observe(struct histo *, double seconds);
/* Append every series, grouped by family with # HELP and # TYPE. */
int metrics_render(const struct metrics *, struct buf *);

#endif
