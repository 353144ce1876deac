/* SPDX-License-Identifier: ISC */
/*
 * troupectl_heatmap: `troupectl heatmap`, the eBPF run-queue latency (or
 * off-CPU time) heatmaps of GET /api/heatmap drawn in a terminal: one
 * block per service, a row per latency bucket, a column per second, a
 * shade per count (docs/services/telemetry.md).  Reads telemetry over
 * HTTP; needs no mailbox.
 */
#ifndef TROUPE_TROUPECTL_HEATMAP_H
#define TROUPE_TROUPECTL_HEATMAP_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define HEATMAP_SLOTS 27

/* The shade of count against the block's largest count max: one of
 * " .:-=+*#%@" (blank for 0, '@' for max). */
char heatmap_shade(uint64_t count, uint64_t max);
/* Draw one service's block from its /api/heatmap?service= JSON (text) into
 * out: a header line "== NAME (kind, N s, T events) ==", then a row per
 * bucket, highest first: "<bucket label> |<one cell per second>|", and a
 * time axis.  color: ANSI 256-colour backgrounds as well.  kind: "runq"
 * or "offcpu".  0, or -1 if text is not such a document. */
int heatmap_render(struct buf *out, const char *text, const char *kind,
                   int color);
/* `troupectl heatmap [--service S] [--since SEC] [--url U] [--offcpu]
 * [--no-color]`: argv holds the operands after "heatmap".  An exit status
 * of troupectl. */
int heatmap_main(int argc, char **argv);

#endif
