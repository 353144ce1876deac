/* SPDX-License-Identifier: ISC */
/*
 * telemetry_otlp: the trace side of telemetry (docs/tracing.md).  Takes
 * the SPANS every process sends, decides per trace whether to keep it when
 * the edge's server span arrives (tail sampling: errors and slow requests
 * always, the client's sampled flag always, the rest at the route's rate),
 * and exports what is kept as OTLP/HTTP JSON (POST <endpoint>/v1/traces) in
 * batches, with libcurl multi driven by a loop timer: never blocks.
 * Callers: telemetry.c (init, stop), telemetry_dispatch.c (SPANS).
 * Logs only state changes of the collector (reachable or not).
 */
#ifndef TROUPE_TELEMETRY_OTLP_H
#define TROUPE_TELEMETRY_OTLP_H

#include <stddef.h>
#include <stdint.h>

#include "trace.h"
#include "util.h"

struct loop;
struct metrics;

#define OTLP_BATCH_MAX 512     /* spans per POST */
#define OTLP_BATCH_MS 1000     /* a partial batch leaves after this */
#define OTLP_QUEUE_MAX 8192    /* kept spans waiting for export */
#define OTLP_PENDING_MAX 50000 /* spans of undecided traces */
#define OTLP_UNDECIDED_MS 10000
#define OTLP_DECIDED_MS 30000 /* late spans follow the decision this long */

/* One span held by telemetry: its sender and its record (strings point
 * into line, a copy of the record's text). */
struct otlp_span {
	struct otlp_span *next;
	char service[64]; /* the sender's mailbox name */
	struct trace_rec r;
	char line[];
};

/* Sampling settings ([trace] sample_rate, sample.<route>, slow_ms). */
struct otlp_sampling {
	double rate;      /* 0..1 */
	uint64_t slow_ns; /* a root span this long is kept */
};

/* Read [trace]; start exporting if endpoint is set.  0, or -1 with err
 * (a bad value). */
int telemetry_otlp_init(struct loop *, struct metrics *, const char *self,
                        char *err, size_t errlen);
/* The spans of one SPANS message from service. */
void telemetry_otlp_spans(struct mstr service, struct mstr spans);
/* Forget everything (exit). */
void telemetry_otlp_stop(void);

/* Whether the trace whose local root (the edge's server span) is root
 * is kept: error, slow, client-sampled, else with probability rate (draw
 * in [0, 1) decides).  Pure. */
int otlp_keep(const struct trace_rec *root, const struct otlp_sampling *,
              double rate, double draw);
/* Append the OTLP/HTTP JSON (ExportTraceServiceRequest) of the n spans
 * of the list to b: one resourceSpans per sender, hex ids, times as
 * strings.  0 or -1 (ENOMEM). */
int otlp_json(struct buf *b, const struct otlp_span *list, size_t n);
/* A span from a record line (n bytes, no newline) and its sender; NULL if
 * it does not parse or on ENOMEM.  Free with free(). */
struct otlp_span *otlp_span_new(struct mstr service, const char *line,
                                size_t n);

#endif
