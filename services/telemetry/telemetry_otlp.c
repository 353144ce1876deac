/* SPDX-License-Identifier: ISC */
/*
 * telemetry_otlp: tail sampling of the spans every process sends, and their
 * export as OTLP/HTTP JSON (see telemetry_otlp.h, docs/tracing.md).
 *
 * Spans of a trace wait in a table keyed by trace id until the edge's
 * server span (flag TRACE_F_LOCAL_ROOT) arrives and decides; an undecided
 * trace is dropped after OTLP_UNDECIDED_MS, a decision is remembered for
 * OTLP_DECIDED_MS so late spans of a kept trace are exported too.  Kept
 * spans queue (at most OTLP_QUEUE_MAX) and leave in POSTs of at most
 * OTLP_BATCH_MAX, one at a time; a failed POST is tried again after 1 s,
 * doubling to 30 s.  Everything runs on the loop thread; curl is driven
 * by a timer while a POST is in flight.  Never blocks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "conf.h"
#include "log.h"
#include "loop.h"
#include "metrics.h"
#include "telemetry_otlp.h"

#define OTLP_BUCKETS 65536 /* traces remembered: ~30 s of requests */
#define OTLP_POLL_MS 10
#define OTLP_TIMEOUT_MS 5000

enum { T_UNDECIDED, T_KEEP, T_DROP };

struct otrace {
	struct otrace *hnext;
	char tid[33];
	int state;
	uint64_t since_ms; /* first seen, or decided */
	struct otlp_span *spans;
	size_t n;
};

/* The edge's routes (edge_http.c ep_name) that may carry their own
 * sampling rate, `[trace] sample.<route>` with '/' as '.'. */
static const char *const otlp_routes[] = {
        "/v1/bot/chat",      "/v3/chat",
        "/v3/chat/retrieve", "/v3/chat/message/list",
        "/v3/chat/cancel",   "/api/v1/execute",
        "/healthz",          "/readyz",
};
#define OTLP_NROUTES (sizeof(otlp_routes) / sizeof(otlp_routes[0]))

static struct {
	int on;
	char url[1024];
	struct otlp_sampling smp;
	double route_rate[OTLP_NROUTES]; /* < 0: sample_rate */
	struct loop *loop;
	struct loop_timer *timer;
	struct otrace *tab[OTLP_BUCKETS];
	size_t npending;
	struct otlp_span *qhead, **qtail; /* kept, waiting */
	size_t nq;
	uint64_t qsince_ms; /* the oldest waiting span's arrival */
	/* the POST in flight */
	CURLM *multi;
	CURL *easy;
	struct curl_slist *hdrs;
	struct buf body;
	struct otlp_span *inflight;
	size_t ninflight;
	uint64_t retry_at_ms, backoff_ms;
	int failing;
	uint64_t last_sweep_ms;
	uint64_t rng;
	uint64_t *c_exported, *c_kept, *c_sampled_out, *c_posts_failed;
	uint64_t *c_drop_queue, *c_drop_pending, *c_drop_undecided;
	uint64_t *c_drop_bad;
} O;

static uint64_t otlp_sink;

int
otlp_keep(const struct trace_rec *root, const struct otlp_sampling *s,
          double rate, double draw)
{
	if (root->error || root->http_status >= 500)
		return (1);
	if (root->end_ns >= root->start_ns &&
	    root->end_ns - root->start_ns >= s->slow_ns)
		return (1);
	if (root->flags & TRACE_F_SAMPLED)
		return (1);
	return (draw < rate);
}

struct otlp_span *
otlp_span_new(struct mstr service, const char *line, size_t n)
{
	struct otlp_span *s;
	const char *p;

	if ((s = malloc(sizeof(*s) + n + 1)) == NULL)
		return (NULL);
	s->next = NULL;
	snprintf(s->service, sizeof(s->service), "%.*s",
	         (int)(service.n < 63 ? service.n : 63), service.p);
	memcpy(s->line, line, n);
	s->line[n] = '\n';
	p = s->line;
	if (trace_rec_next(&p, s->line + n + 1, &s->r) != 1) {
		free(s);
		return (NULL);
	}
	return (s);
}

/* "worker-3" -> "worker" */
static size_t
kind_len(const char *svc)
{
	const char *d = strchr(svc, '-');

	return (d != NULL ? (size_t)(d - svc) : strlen(svc));
}

static int
add_attr_str(struct buf *b, int *first, const char *key, struct mstr v)
{
	if (v.n == 0)
		return (0);
	if (buf_addf(b, "%s{\"key\":\"%s\",\"value\":{\"stringValue\":",
	             *first ? "" : ",", key) == -1 ||
	    buf_add_json_str(b, v.p, v.n) == -1 || buf_adds(b, "}}") == -1)
		return (-1);
	*first = 0;
	return (0);
}

static int
span_json(struct buf *b, const struct otlp_span *s)
{
	const struct trace_rec *r = &s->r;
	int first = 1;

	if (buf_addf(b, "{\"traceId\":\"%s\",\"spanId\":\"%s\",", r->trace_id,
	             r->span_id) == -1)
		return (-1);
	if (r->parent_id[0] != '\0' &&
	    buf_addf(b, "\"parentSpanId\":\"%s\",", r->parent_id) == -1)
		return (-1);
	if (buf_adds(b, "\"name\":") == -1 ||
	    buf_add_json_str(b, r->name.p, r->name.n) == -1 ||
	    buf_addf(b,
	             ",\"kind\":%d,\"startTimeUnixNano\":\"%llu\","
	             "\"endTimeUnixNano\":\"%llu\",\"attributes\":[",
	             r->kind, (unsigned long long)r->start_ns,
	             (unsigned long long)r->end_ns) == -1)
		return (-1);
	if (add_attr_str(b, &first, "http.route", r->route) == -1 ||
	    add_attr_str(b, &first, "troupe.bot_id", r->bot_id) == -1 ||
	    add_attr_str(b, &first, "url.full", r->url) == -1 ||
	    add_attr_str(b, &first, "troupe.note", r->note) == -1)
		return (-1);
	if (r->http_status > 0 &&
	    buf_addf(b,
	             "%s{\"key\":\"http.response.status_code\",\"value\":"
	             "{\"intValue\":\"%d\"}}",
	             first ? "" : ",", r->http_status) == -1)
		return (-1);
	if (buf_addf(b, "],\"status\":{\"code\":%d}}", r->error ? 2 : 0) == -1)
		return (-1);
	return (0);
}

int
otlp_json(struct buf *b, const struct otlp_span *list, size_t n)
{
	const struct otlp_span *s, *t;
	size_t i, j, k, nres = 0;
	const struct otlp_span **v;
	unsigned char *done;
	int rc = -1;

	if ((v = calloc(n ? n : 1, sizeof(*v))) == NULL ||
	    (done = calloc(n ? n : 1, 1)) == NULL) {
		free(v);
		return (-1);
	}
	for (i = 0, s = list; i < n && s != NULL; i++, s = s->next)
		v[i] = s;
	n = i;
	if (buf_adds(b, "{\"resourceSpans\":[") == -1)
		goto out;
	for (i = 0; i < n; i++) {
		if (done[i])
			continue;
		s = v[i];
		if (buf_addf(b,
		             "%s{\"resource\":{\"attributes\":["
		             "{\"key\":\"service.name\",\"value\":"
		             "{\"stringValue\":\"troupe-%.*s\"}},"
		             "{\"key\":\"service.instance.id\",\"value\":"
		             "{\"stringValue\":",
		             nres++ ? "," : "", (int)kind_len(s->service),
		             s->service) == -1 ||
		    buf_add_json_str(b, s->service, strlen(s->service)) ==
		            -1 ||
		    buf_addf(b,
		             "}}]},\"scopeSpans\":[{\"scope\":{\"name\":"
		             "\"troupe\",\"version\":\"%s\"},\"spans\":[",
		             TROUPE_VERSION) == -1)
			goto out;
		for (j = i, k = 0; j < n; j++) {
			t = v[j];
			if (done[j] || strcmp(t->service, s->service) != 0)
				continue;
			done[j] = 1;
			if ((k++ && buf_adds(b, ",") == -1) ||
			    span_json(b, t) == -1)
				goto out;
		}
		if (buf_adds(b, "]}]}") == -1)
			goto out;
	}
	if (buf_adds(b, "]}") == -1)
		goto out;
	rc = 0;
out:
	free(v);
	free(done);
	return (rc);
}

/* Runtime. */

static uint32_t
tid_hash(const char *tid)
{
	uint32_t h = 2166136261u;

	for (int i = 0; i < 32; i++)
		h = (h ^ (unsigned char)tid[i]) * 16777619u;
	return (h % OTLP_BUCKETS);
}

static double
draw(void)
{
	uint64_t x = O.rng += 0x9e3779b97f4a7c15ULL;

	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return ((double)(x >> 11) / 9007199254740992.0);
}

static void
queue_span(struct otlp_span *s)
{
	if (O.nq >= OTLP_QUEUE_MAX) {
		(*O.c_drop_queue)++;
		free(s);
		return;
	}
	if (O.nq == 0)
		O.qsince_ms = now_mono_ms();
	s->next = NULL;
	*O.qtail = s;
	O.qtail = &s->next;
	O.nq++;
	(*O.c_kept)++;
}

static void
free_list(struct otlp_span *s)
{
	struct otlp_span *n;

	for (; s != NULL; s = n) {
		n = s->next;
		free(s);
	}
}

/* "/v1/bot/chat" -> "sample.v1.bot.chat" */
static void
route_key(const char *route, char *key, size_t len)
{
	char *o;

	snprintf(key, len, "sample.%s", route[0] == '/' ? route + 1 : route);
	for (o = key + 7; *o != '\0'; o++)
		if (*o == '/')
			*o = '.';
}

/* A rate of 0 to 1 from v, or -1. */
static double
parse_rate(const char *v)
{
	char *e;
	double r = strtod(v, &e);

	return (e == v || *e != '\0' || !(r >= 0.0 && r <= 1.0) ? -1.0 : r);
}

static void
decide(struct otrace *t, const struct trace_rec *root)
{
	double rate = O.smp.rate;
	struct otlp_span *s, *n;

	for (size_t i = 0; i < OTLP_NROUTES; i++)
		if (O.route_rate[i] >= 0.0 &&
		    mstr_eq(root->route, otlp_routes[i])) {
			rate = O.route_rate[i];
			break;
		}
	t->state = otlp_keep(root, &O.smp, rate, draw()) ? T_KEEP : T_DROP;
	t->since_ms = now_mono_ms();
	for (s = t->spans; s != NULL; s = n) {
		n = s->next;
		if (t->state == T_KEEP)
			queue_span(s);
		else {
			(*O.c_sampled_out)++;
			free(s);
		}
	}
	O.npending -= t->n;
	t->spans = NULL;
	t->n = 0;
}

static void
take(struct otlp_span *s)
{
	uint32_t h = tid_hash(s->r.trace_id);
	struct otrace *t;

	for (t = O.tab[h]; t != NULL; t = t->hnext)
		if (memcmp(t->tid, s->r.trace_id, 32) == 0)
			break;
	if (t == NULL) {
		if ((t = calloc(1, sizeof(*t))) == NULL) {
			free(s);
			return;
		}
		memcpy(t->tid, s->r.trace_id, 33);
		t->since_ms = now_mono_ms();
		t->hnext = O.tab[h];
		O.tab[h] = t;
	}
	switch (t->state) {
	case T_KEEP:
		queue_span(s);
		return;
	case T_DROP:
		(*O.c_sampled_out)++;
		free(s);
		return;
	}
	if (O.npending >= OTLP_PENDING_MAX &&
	    !(s->r.flags & TRACE_F_LOCAL_ROOT)) {
		(*O.c_drop_pending)++;
		free(s);
		return;
	}
	s->next = t->spans;
	t->spans = s;
	t->n++;
	O.npending++;
	if (s->r.flags & TRACE_F_LOCAL_ROOT)
		decide(t, &s->r);
}

void
telemetry_otlp_spans(struct mstr service, struct mstr spans)
{
	const char *p = spans.p, *end = spans.p + spans.n, *nl;
	struct otlp_span *s;

	if (!O.on)
		return;
	while (p < end) {
		if ((nl = memchr(p, '\n', (size_t)(end - p))) == NULL)
			nl = end;
		if ((s = otlp_span_new(service, p, (size_t)(nl - p))) == NULL)
			(*O.c_drop_bad)++;
		else
			take(s);
		p = nl + 1;
	}
}

static void
sweep(uint64_t now)
{
	struct otrace **pp, *t;

	for (size_t i = 0; i < OTLP_BUCKETS; i++)
		for (pp = &O.tab[i]; (t = *pp) != NULL;) {
			uint64_t age = now - t->since_ms;

			if ((t->state == T_UNDECIDED &&
			     age < OTLP_UNDECIDED_MS) ||
			    (t->state != T_UNDECIDED &&
			     age < OTLP_DECIDED_MS)) {
				pp = &t->hnext;
				continue;
			}
			*O.c_drop_undecided += t->n;
			O.npending -= t->n;
			free_list(t->spans);
			*pp = t->hnext;
			free(t);
		}
}

static void
post_done(int ok, const char *why)
{
	if (ok) {
		*O.c_exported += O.ninflight;
		free_list(O.inflight);
		if (O.failing)
			log_info("traces: collector %s takes spans again",
			         O.url);
		O.failing = 0;
		O.backoff_ms = 0;
	} else {
		(*O.c_posts_failed)++;
		if (!O.failing)
			log_warnx("traces: POST %s: %s (spans kept, trying "
			          "again with back-off)",
			          O.url, why);
		O.failing = 1;
		O.backoff_ms = O.backoff_ms ? O.backoff_ms * 2 : 1000;
		if (O.backoff_ms > 30000)
			O.backoff_ms = 30000;
		O.retry_at_ms = now_mono_ms() + O.backoff_ms;
		/* back to the front of the queue, order kept */
		if (O.inflight != NULL) {
			struct otlp_span *last = O.inflight;

			while (last->next != NULL)
				last = last->next;
			last->next = O.qhead;
			if (O.qhead == NULL)
				O.qtail = &last->next;
			O.qhead = O.inflight;
			O.nq += O.ninflight;
			while (O.nq > OTLP_QUEUE_MAX) { /* oldest go */
				struct otlp_span *s = O.qhead;

				O.qhead = s->next;
				if (O.qhead == NULL)
					O.qtail = &O.qhead;
				free(s);
				O.nq--;
				(*O.c_drop_queue)++;
			}
		}
	}
	O.inflight = NULL;
	O.ninflight = 0;
	curl_multi_remove_handle(O.multi, O.easy);
	buf_reset(&O.body);
}

static void
post_start(void)
{
	struct otlp_span **pp = &O.qhead;
	size_t n = 0;

	while (*pp != NULL && n < OTLP_BATCH_MAX) {
		pp = &(*pp)->next;
		n++;
	}
	O.inflight = O.qhead;
	O.ninflight = n;
	O.qhead = *pp;
	*pp = NULL;
	if (O.qhead == NULL)
		O.qtail = &O.qhead;
	O.nq -= n;
	O.qsince_ms = now_mono_ms();
	buf_reset(&O.body);
	if (otlp_json(&O.body, O.inflight, n) == -1) {
		post_done(0, "out of memory");
		return;
	}
	curl_easy_setopt(O.easy, CURLOPT_POSTFIELDS, O.body.b);
	curl_easy_setopt(O.easy, CURLOPT_POSTFIELDSIZE, (long)O.body.len);
	if (curl_multi_add_handle(O.multi, O.easy) != CURLM_OK)
		post_done(0, "curl_multi_add_handle failed");
}

static void
otlp_tick(struct loop *l, void *arg)
{
	uint64_t now = now_mono_ms();
	CURLMsg *cm;
	int running = 0, left;

	(void)l;
	(void)arg;
	if (now - O.last_sweep_ms >= 1000) {
		sweep(now);
		O.last_sweep_ms = now;
	}
	if (O.inflight != NULL) {
		(void)curl_multi_perform(O.multi, &running);
		while ((cm = curl_multi_info_read(O.multi, &left)) != NULL) {
			long http = 0;
			char why[96];

			if (cm->msg != CURLMSG_DONE)
				continue;
			(void)curl_easy_getinfo(O.easy, CURLINFO_RESPONSE_CODE,
			                        &http);
			if (cm->data.result != CURLE_OK)
				snprintf(why, sizeof(why), "%s",
				         curl_easy_strerror(cm->data.result));
			else
				snprintf(why, sizeof(why), "HTTP %ld", http);
			post_done(cm->data.result == CURLE_OK && http >= 200 &&
			                  http < 300,
			          why);
			break;
		}
	}
	if (O.inflight == NULL && O.nq > 0 && now >= O.retry_at_ms &&
	    (O.nq >= OTLP_BATCH_MAX || now - O.qsince_ms >= OTLP_BATCH_MS))
		post_start();
	loop_timer_set(O.timer, O.inflight != NULL ? OTLP_POLL_MS : 100);
}

static uint64_t *
ctr(struct metrics *m, const char *self, const char *fam, const char *help,
    const char *reason)
{
	char lb[160];
	uint64_t *c;

	if (reason != NULL)
		snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"%s\"", self,
		         reason);
	else
		snprintf(lb, sizeof(lb), "service=\"%s\"", self);
	c = metrics_counter(m, fam, help, lb);
	return (c != NULL ? c : &otlp_sink);
}

int
telemetry_otlp_init(struct loop *l, struct metrics *m, const char *self,
                    char *err, size_t errlen)
{
	static const char dfam[] = "troupe_trace_spans_dropped_total";
	static const char dhelp[] =
	        "Spans telemetry did not export, by reason";
	const char *ep = conf_get("trace", "endpoint", ""), *v;
	int64_t slow;
	double rate;
	size_t n;

	v = conf_get("trace", "sample_rate", "0.1");
	if ((rate = parse_rate(v)) < 0.0) {
		snprintf(err, errlen,
		         "[trace] sample_rate = \"%s\": want 0 to 1", v);
		return (-1);
	}
	for (size_t i = 0; i < OTLP_NROUTES; i++) {
		char key[96];

		route_key(otlp_routes[i], key, sizeof(key));
		O.route_rate[i] = -1.0;
		if ((v = conf_get("trace", key, NULL)) == NULL)
			continue;
		if ((O.route_rate[i] = parse_rate(v)) < 0.0) {
			snprintf(err, errlen,
			         "[trace] %s = \"%s\": want 0 to 1", key, v);
			return (-1);
		}
	}
	if (conf_get_int("trace", "slow_ms", 2000, 1, 86400000, &slow, err,
	                 errlen) == -1)
		return (-1);
	O.smp.rate = rate;
	O.smp.slow_ns = (uint64_t)slow * 1000000ULL;
	if (ep == NULL || ep[0] == '\0')
		return (0);
	n = strlen(ep);
	while (n > 0 && ep[n - 1] == '/')
		n--;
	if (strncmp(ep, "http://", 7) != 0 &&
	    strncmp(ep, "https://", 8) != 0) {
		snprintf(err, errlen,
		         "[trace] endpoint = \"%s\": want an http:// or "
		         "https:// URL",
		         ep);
		return (-1);
	}
	snprintf(O.url, sizeof(O.url), "%.*s/v1/traces", (int)n, ep);
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0 ||
	    (O.multi = curl_multi_init()) == NULL ||
	    (O.easy = curl_easy_init()) == NULL ||
	    (O.hdrs = curl_slist_append(NULL, "Content-Type: "
	                                      "application/json")) == NULL ||
	    (O.timer = loop_timer_new(l, otlp_tick, NULL)) == NULL) {
		snprintf(err, errlen, "traces: curl or timer setup failed");
		return (-1);
	}
	curl_easy_setopt(O.easy, CURLOPT_URL, O.url);
	curl_easy_setopt(O.easy, CURLOPT_HTTPHEADER, O.hdrs);
	curl_easy_setopt(O.easy, CURLOPT_TIMEOUT_MS, (long)OTLP_TIMEOUT_MS);
	curl_easy_setopt(O.easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(O.easy, CURLOPT_PROTOCOLS_STR, "http,https");
	O.loop = l;
	O.qtail = &O.qhead;
	O.rng = now_wall_ms() ^ ((uint64_t)(uintptr_t)&O << 16);
	O.c_exported = ctr(m, self, "troupe_trace_spans_exported_total",
	                   "Spans exported to the OTLP collector", NULL);
	O.c_kept = ctr(m, self, "troupe_trace_spans_kept_total",
	               "Spans of traces the sampler kept", NULL);
	O.c_sampled_out =
	        ctr(m, self, "troupe_trace_spans_sampled_out_total",
	            "Spans of traces the sampler did not keep", NULL);
	O.c_posts_failed = ctr(m, self, "troupe_trace_export_failures_total",
	                       "OTLP POSTs that failed (retried)", NULL);
	O.c_drop_queue = ctr(m, self, dfam, dhelp, "queue_full");
	O.c_drop_pending = ctr(m, self, dfam, dhelp, "buffer_full");
	O.c_drop_undecided = ctr(m, self, dfam, dhelp, "undecided");
	O.c_drop_bad = ctr(m, self, dfam, dhelp, "bad_record");
	O.on = 1;
	loop_timer_set(O.timer, 100);
	log_info("traces: exporting to %s (sample_rate %.3g, slow_ms %lld)",
	         O.url, rate, (long long)slow);
	return (0);
}

void
telemetry_otlp_stop(void)
{
	struct otrace *t, *n;

	if (!O.on)
		return;
	for (size_t i = 0; i < OTLP_BUCKETS; i++)
		for (t = O.tab[i]; t != NULL; t = n) {
			n = t->hnext;
			free_list(t->spans);
			free(t);
		}
	if (O.inflight != NULL)
		curl_multi_remove_handle(O.multi, O.easy);
	free_list(O.inflight);
	free_list(O.qhead);
	curl_easy_cleanup(O.easy);
	curl_multi_cleanup(O.multi);
	curl_slist_free_all(O.hdrs);
	loop_timer_free(O.timer);
	buf_free(&O.body);
	memset(&O, 0, sizeof(O));
}
