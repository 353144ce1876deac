/* SPDX-License-Identifier: ISC */
/*
 * trace: derived span ids, span records and their batched, never-waiting
 * trip to troupe-telemetry (see trace.h).  Callers: every service's span
 * calls and main (trace_init); telemetry parses with trace_rec_next.
 * Must never block, log per span, or cost anything when tracing is off.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conf.h"
#include "loop.h"
#include "metrics.h"
#include "trace.h"

int trace_enabled;
uint64_t trace_in_ns;

struct trace_report { /* = struct spans_report of proto/bodies.def */
	struct mstr service;
	struct mstr spans;
};

static struct {
	struct loop *loop;
	struct ipc *ipc;
	struct loop_timer *timer;
	const char *service;
	uint16_t type;
	ipc_pack_fn pack;
	struct trace_ipc fn;
	struct buf pending;
	size_t npending;
	uint64_t dropped;
	uint64_t *c_rec, *c_sent, *c_drop;
} T;

static const char hexd[] = "0123456789abcdef";

void
trace_set_enabled(int on)
{
	trace_enabled = on != 0;
}

void
trace_conf(void)
{
	const char *ep = conf_get("trace", "endpoint", "");

	trace_enabled = ep != NULL && ep[0] != '\0';
}

static void
trace_flush(struct loop *l, void *arg)
{
	struct trace_report r;
	struct msg_head h = {MSTR_NULL, MSTR_NULL, 0, MSTR_NULL};

	(void)l;
	(void)arg;
	loop_timer_set(T.timer, TRACE_FLUSH_MS);
	if (T.npending == 0)
		return;
	/* Telemetry far behind or gone: keep what we have (bounded by
	 * TRACE_BUF_MAX) and try again on the next tick. */
	if (T.fn.backlog(T.ipc, "telemetry") >= 8)
		return;
	r.service = MSTR(T.service);
	r.spans = (struct mstr){T.pending.b, (uint32_t)T.pending.len};
	h.deadline_ms = now_wall_ms() + 10000;
	if (T.fn.send(T.ipc, "telemetry", T.type, &h, T.pack, &r) == -1) {
		T.dropped += T.npending;
		if (T.c_drop != NULL)
			*T.c_drop += T.npending;
	} else if (T.c_sent != NULL)
		*T.c_sent += T.npending;
	T.npending = 0;
	buf_reset(&T.pending);
}

int
trace_init(struct loop *l, struct ipc *ipc, struct metrics *m,
           const char *service, uint16_t type, ipc_pack_fn pack,
           const struct trace_ipc *fn)
{
	static const char fam[] = "troupe_trace_spans_total";
	static const char help[] =
	        "Trace spans recorded by this process, sent to telemetry, or "
	        "dropped (buffer full, send refused)";
	char lb[160];

	trace_conf();
	if (!trace_enabled)
		return (0);
	T.loop = l;
	T.ipc = ipc;
	T.service = service;
	T.type = type;
	T.pack = pack;
	T.fn = *fn;
	if (m != NULL) {
		snprintf(lb, sizeof(lb), "service=\"%s\",result=\"recorded\"",
		         service);
		T.c_rec = metrics_counter(m, fam, help, lb);
		snprintf(lb, sizeof(lb), "service=\"%s\",result=\"sent\"",
		         service);
		T.c_sent = metrics_counter(m, fam, help, lb);
		snprintf(lb, sizeof(lb), "service=\"%s\",result=\"dropped\"",
		         service);
		T.c_drop = metrics_counter(m, fam, help, lb);
	}
	if ((T.timer = loop_timer_new(l, trace_flush, NULL)) == NULL) {
		trace_enabled = 0;
		return (-1);
	}
	loop_timer_set(T.timer, TRACE_FLUSH_MS);
	return (0);
}

static int
hexval(char c)
{
	if (c >= '0' && c <= '9')
		return (c - '0');
	if (c >= 'a' && c <= 'f')
		return (c - 'a' + 10);
	return (-1);
}

/* n hex digits of s as a number (n <= 16); -1 in *ok if not hex. */
static uint64_t
hex_u64(const char *s, size_t n, int *ok)
{
	uint64_t v = 0;

	for (size_t i = 0; i < n; i++) {
		int d = hexval(s[i]);

		if (d < 0) {
			*ok = 0;
			return (0);
		}
		v = v << 4 | (uint64_t)d;
	}
	return (v);
}

static void
put_hex64(char *out, uint64_t v)
{
	for (int i = 15; i >= 0; i--) {
		out[i] = hexd[v & 0xf];
		v >>= 4;
	}
}

int
trace_valid(struct mstr tp)
{
	int ok = 1;

	if (tp.n != TRACE_TP_LEN || tp.p[0] != '0' || tp.p[1] != '0' ||
	    tp.p[2] != '-' || tp.p[35] != '-' || tp.p[52] != '-')
		return (0);
	if ((hex_u64(tp.p + 3, 16, &ok) | hex_u64(tp.p + 19, 16, &ok)) == 0)
		return (0);
	if (hex_u64(tp.p + 36, 16, &ok) == 0)
		return (0);
	(void)hex_u64(tp.p + 53, 2, &ok);
	return (ok);
}

static uint64_t
mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return (x ^ (x >> 31));
}

/* The mask that turns a parent's span id into its child's (an XOR, so
 * the parent is the child XOR the same mask).  Never 0. */
static uint64_t
trace_mask(const char *tid, const char *name, uint64_t salt)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	int ok = 1;

	for (const char *p = name; *p != '\0'; p++)
		h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
	h ^= hex_u64(tid, 16, &ok) ^ mix64(hex_u64(tid + 16, 16, &ok));
	h = mix64(h ^ mix64(salt));
	return (h == 0 ? 1 : h);
}

int
trace_child(struct mstr tp, const char *name, uint64_t salt, char *out)
{
	uint64_t span, child;
	int ok = 1;

	if (!trace_valid(tp))
		return (-1);
	span = hex_u64(tp.p + 36, 16, &ok);
	child = span ^ trace_mask(tp.p + 3, name, salt);
	if (child == 0)
		child = 1;
	if (out != tp.p)
		memcpy(out, tp.p, TRACE_TP_LEN);
	put_hex64(out + 36, child);
	return (0);
}

void
trace_enter(char *tp, size_t n, const char *name, uint64_t salt)
{
	if (!trace_enabled || n != TRACE_TP_LEN)
		return;
	(void)trace_child((struct mstr){tp, (uint32_t)n}, name, salt, tp);
}

uint64_t
trace_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return ((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec);
}

uint64_t
trace_wall_of_mono(uint64_t mono_ns)
{
	uint64_t wall = trace_now_ns(), mono = now_mono_ns();

	if (mono_ns > mono)
		return (wall);
	return (wall - (mono - mono_ns));
}

/* Append s with TAB, CR and LF as spaces. */
static int
add_clean(struct buf *b, struct mstr s)
{
	size_t at = b->len;

	if (s.n == 0)
		return (0);
	if (buf_add(b, s.p, s.n) == -1)
		return (-1);
	for (size_t i = at; i < b->len; i++)
		if (b->b[i] == '\t' || b->b[i] == '\n' || b->b[i] == '\r')
			b->b[i] = ' ';
	return (0);
}

int
trace_rec_format(struct buf *b, const char *trace_id, const char *span_id,
                 const char *parent_id, const struct trace_span *s)
{
	size_t at = b->len;
	uint64_t end = s->end_ns ? s->end_ns : trace_now_ns();

	if (buf_addf(b, "%.32s\t%.16s\t%.16s\t%d\t%llu\t%llu\t%d\t%d\t%u\t",
	             trace_id, span_id, parent_id ? parent_id : "", s->kind,
	             (unsigned long long)s->start_ns,
	             (unsigned long long)(end < s->start_ns ? s->start_ns
	                                                    : end),
	             s->error != 0, s->http_status, s->flags) == -1 ||
	    add_clean(b, MSTR(s->name ? s->name : "")) == -1 ||
	    buf_add(b, "\t", 1) == -1 || add_clean(b, s->route) == -1 ||
	    buf_add(b, "\t", 1) == -1 || add_clean(b, s->bot_id) == -1 ||
	    buf_add(b, "\t", 1) == -1 || add_clean(b, s->url) == -1 ||
	    buf_add(b, "\t", 1) == -1 || add_clean(b, s->note) == -1 ||
	    buf_add(b, "\n", 1) == -1) {
		b->len = at;
		return (-1);
	}
	return (0);
}

static void
trace_put(const char *tid, const char *sid, const char *pid,
          const struct trace_span *s)
{
	if (T.pending.len > TRACE_BUF_MAX ||
	    trace_rec_format(&T.pending, tid, sid, pid, s) == -1) {
		T.dropped++;
		if (T.c_drop != NULL)
			(*T.c_drop)++;
		return;
	}
	T.npending++;
	if (T.c_rec != NULL)
		(*T.c_rec)++;
}

void
trace_end(struct mstr self, struct mstr parent, const struct trace_span *s)
{
	char tid[33], sid[17], pid[17];

	if (!trace_enabled || !trace_valid(self))
		return;
	memcpy(tid, self.p + 3, 32);
	tid[32] = '\0';
	memcpy(sid, self.p + 36, 16);
	sid[16] = '\0';
	pid[0] = '\0';
	if (trace_valid(parent)) {
		memcpy(pid, parent.p + 36, 16);
		pid[16] = '\0';
	}
	trace_put(tid, sid, pid, s);
}

void
trace_end_derived(struct mstr self, uint64_t salt, const struct trace_span *s)
{
	char parent[TRACE_TP_LEN];
	uint64_t span;
	int ok = 1;

	if (!trace_enabled || !trace_valid(self))
		return;
	memcpy(parent, self.p, TRACE_TP_LEN);
	span = hex_u64(self.p + 36, 16, &ok) ^
	       trace_mask(self.p + 3, s->name ? s->name : "", salt);
	put_hex64(parent + 36, span);
	trace_end(self, (struct mstr){parent, TRACE_TP_LEN}, s);
}

size_t
trace_take(struct buf *b)
{
	size_t n = T.npending;

	if (n == 0 || buf_add(b, T.pending.b, T.pending.len) == -1)
		return (0);
	T.npending = 0;
	buf_reset(&T.pending);
	return (n);
}

uint64_t
trace_dropped(void)
{
	return (T.dropped);
}

/* The next TAB-separated field of [*p, end) (up to the line's end). */
static struct mstr
field(const char **p, const char *end, int *last)
{
	const char *s = *p, *q = s;

	while (q < end && *q != '\t' && *q != '\n')
		q++;
	*last = q >= end || *q == '\n';
	*p = q < end ? q + 1 : q;
	return ((struct mstr){s, (uint32_t)(q - s)});
}

static int
num(struct mstr f, uint64_t *v)
{
	uint64_t x = 0;

	if (f.n == 0 || f.n > 20)
		return (-1);
	for (uint32_t i = 0; i < f.n; i++) {
		if (f.p[i] < '0' || f.p[i] > '9')
			return (-1);
		x = x * 10 + (uint64_t)(f.p[i] - '0');
	}
	*v = x;
	return (0);
}

static int
hexfield(struct mstr f, size_t want, int may_empty, char *out)
{
	if (f.n == 0 && may_empty) {
		out[0] = '\0';
		return (0);
	}
	if (f.n != want)
		return (-1);
	for (uint32_t i = 0; i < f.n; i++)
		if (hexval(f.p[i]) < 0)
			return (-1);
	memcpy(out, f.p, want);
	out[want] = '\0';
	return (0);
}

int
trace_rec_next(const char **p, const char *end, struct trace_rec *r)
{
	struct mstr f[14];
	uint64_t v[6];
	int last = 0, n = 0;

	if (*p >= end)
		return (0);
	memset(r, 0, sizeof(*r));
	while (n < 14) {
		f[n++] = field(p, end, &last);
		if (last)
			break;
	}
	if (!last) { /* too many fields: skip the rest of the line */
		while (*p < end && **p != '\n')
			(*p)++;
		if (*p < end)
			(*p)++;
		return (-1);
	}
	if (n != 14 || hexfield(f[0], 32, 0, r->trace_id) == -1 ||
	    hexfield(f[1], 16, 0, r->span_id) == -1 ||
	    hexfield(f[2], 16, 1, r->parent_id) == -1)
		return (-1);
	for (int i = 0; i < 6; i++)
		if (num(f[3 + i], &v[i]) == -1)
			return (-1);
	if (v[0] > 5 || v[3] > 1 || v[4] > 999 || v[5] > 0xff)
		return (-1);
	r->kind = (int)v[0];
	r->start_ns = v[1];
	r->end_ns = v[2];
	r->error = (int)v[3];
	r->http_status = (int)v[4];
	r->flags = (unsigned)v[5];
	r->name = f[9];
	r->route = f[10];
	r->bot_id = f[11];
	r->url = f[12];
	r->note = f[13];
	return (1);
}
