/* SPDX-License-Identifier: ISC */
/*
 * trace: W3C trace context and span records for every process.
 *
 * A hop never stores its span id: it derives it from the traceparent it
 * received, its span name and a salt (span = parent XOR mix(trace id,
 * name, salt)), so the id can be computed again when the span ends and
 * the parent recovered from the child (trace_end_derived).  Each hop puts
 * its own span id in the traceparent of the envelopes (and HTTP requests)
 * it sends on, so parents chain edge -> auth -> dispatcher -> worker ->
 * {storage, upstream, plugins}.
 *
 * Finished spans are kept as text records (one line each, format below)
 * in a per-process buffer and sent to "telemetry" as one SPANS message
 * every TRACE_FLUSH_MS, never waiting: a send the peer's backlog refuses
 * is dropped and counted.  Telemetry samples (tail) and exports.
 *
 * Config [trace] endpoint: empty (the default) turns tracing off; then
 * trace_enabled is 0 and every call returns at once: callers test
 * trace_enabled before doing any work.
 *
 * Record format (one span per line, fields separated by TAB; strings have
 * TAB, CR and LF replaced by spaces):
 *   trace_id(32 hex) span_id(16 hex) parent_id(16 hex or empty) kind
 *   start_unix_ns end_unix_ns error(0|1) http_status flags name route
 *   bot_id url note
 * flags: TRACE_F_SAMPLED (the client asked for the trace: keep it),
 * TRACE_F_LOCAL_ROOT (the edge's server span: the sampling decision).
 *
 * Callers: every service (span calls), telemetry (trace_rec_next).  Runs on
 * the loop thread only.  Never logs, never blocks.
 */
#ifndef TROUPE_TRACE_H
#define TROUPE_TRACE_H

#include <stdint.h>

#include "ipc.h"
#include "util.h"

struct loop;
struct metrics;

#define TRACE_TP_LEN 55 /* 00-<32 hex>-<16 hex>-<2 hex> */
#define TRACE_FLUSH_MS 200
#define TRACE_BUF_MAX (512 * 1024) /* bytes of records kept unsent */

enum trace_kind {
	TRACE_INTERNAL = 1,
	TRACE_SERVER = 2,
	TRACE_CLIENT = 3,
};

#define TRACE_F_SAMPLED 0x1
#define TRACE_F_LOCAL_ROOT 0x2

/* 1 when [trace] endpoint is set (tracing on), else 0. */
extern int trace_enabled;

/* Unix ns when the envelope being handled arrived (trace_mark() at the
 * top of a service's handler): the start of a hop's span. */
extern uint64_t trace_in_ns;
#define trace_mark()                                                          \
	do {                                                                  \
		if (trace_enabled)                                            \
			trace_in_ns = trace_now_ns();                         \
	} while (0)

/* What a span says besides its ids. */
struct trace_span {
	const char *name;          /* "edge", "auth", "upstream", ... */
	int kind;                  /* enum trace_kind */
	uint64_t start_ns, end_ns; /* unix ns; end 0: now */
	int error;                 /* the hop failed */
	int http_status;           /* 0: none */
	unsigned flags;            /* TRACE_F_* */
	struct mstr route, bot_id, url, note;
};

/* A parsed record (strings point into the text it was read from). */
struct trace_rec {
	char trace_id[33], span_id[17], parent_id[17];
	int kind, error, http_status;
	unsigned flags;
	uint64_t start_ns, end_ns;
	struct mstr name, route, bot_id, url, note;
};

/* ipc's functions, passed in so that trace.o needs no ipc.o (tests that
 * capture ipc_send link trace.o). */
struct trace_ipc {
	int (*send)(struct ipc *, const char *, uint16_t,
	            const struct msg_head *, ipc_pack_fn, const void *);
	size_t (*backlog)(struct ipc *, const char *);
};

/* Read [trace] endpoint and set trace_enabled; if on, send this process's
 * spans to "telemetry" as messages of type with pack (MSG_SPANS and
 * spans_report_pack: the body is two strings, service and spans) from a
 * timer on l, and count in m.  0, or -1 (out of memory: tracing off). */
int trace_init(struct loop *, struct ipc *, struct metrics *,
               const char *service, uint16_t type, ipc_pack_fn,
               const struct trace_ipc *);
/* trace_init for a service's struct svc s (proto.h included by the
 * caller): one line after svc_init(). */
#define TRACE_INIT(s)                                                         \
	trace_init((s)->loop, (s)->ipc, (s)->metrics, (s)->name, MSG_SPANS,   \
	           spans_report_pack,                                         \
	           &(const struct trace_ipc){ipc_send, ipc_backlog})
/* The same for a process without proto: tracing from the config only
 * (tests); records stay in the buffer until trace_take(). */
void trace_conf(void);
/* Force tracing on or off (tests). */
void trace_set_enabled(int);

/* Whether tp is a valid version-00 traceparent (55 chars, lowercase hex,
 * ids not all zeros). */
int trace_valid(struct mstr tp);
/* Write to out (TRACE_TP_LEN chars, no NUL) the traceparent of the span
 * name/salt whose parent is tp: same trace id and flags, derived span id.
 * -1 (out untouched) if tp is not valid. */
int trace_child(struct mstr tp, const char *name, uint64_t salt, char *out);
/* Overwrite the valid traceparent tp (TRACE_TP_LEN writable chars) with its
 * child's, as trace_child; nothing if tracing is off or tp is invalid. */
void trace_enter(char *tp, size_t n, const char *name, uint64_t salt);

/* Record a finished span whose own traceparent is self and whose parent's
 * is parent (MSTR_NULL: none, a root).  Nothing if tracing is off or self
 * is not valid. */
void trace_end(struct mstr self, struct mstr parent,
               const struct trace_span *);
/* Record a finished span whose own traceparent self was made by
 * trace_child(parent, s->name, salt): the parent's id is recovered. */
void trace_end_derived(struct mstr self, uint64_t salt,
                       const struct trace_span *);
/* Unix ns now, and the unix ns of a monotonic instant (now_mono_ns()). */
uint64_t trace_now_ns(void);
uint64_t trace_wall_of_mono(uint64_t mono_ns);

/* Move the records not yet sent into b (appended); returns how many. */
size_t trace_take(struct buf *b);
/* Records dropped because the buffer was full or a send was refused. */
uint64_t trace_dropped(void);

/* Append one record of s to b (the wire format above). */
int trace_rec_format(struct buf *b, const char *trace_id, const char *span_id,
                     const char *parent_id, const struct trace_span *s);
/* Parse the record at *p (before end) into r and move *p past its line:
 * 1, 0 at the end, -1 for a bad line (skipped). */
int trace_rec_next(const char **p, const char *end, struct trace_rec *r);

#endif
