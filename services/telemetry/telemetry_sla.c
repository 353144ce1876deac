/* SPDX-License-Identifier: ISC */
/*
 * telemetry_sla: the SLA signal of issue 5 (docs/tiers.md).  Once per
 * [telemetry] sla_window_ms (whole seconds, default 5 s), for every
 * service the eBPF probes follow, the per-second run-queue histograms of
 * the window (telemetry_heat.c's ring, filled by telemetry_ebpf_tick)
 * are summed, their p99 taken, and SLA_SIGNAL {service, p99_us,
 * threshold_us, window_ms, breach} sent to the dispatcher, which feeds
 * its degradation tiers with it (dispatcher_tier.c).  breach is 1 when
 * the p99 is above sla_runq_p99_us and the window held at least
 * SLA_MIN_EVENTS events.  The same numbers are on /metrics
 * (troupe_sla_runq_p99_seconds, troupe_sla_breach).
 *
 * Without probes (no permission, no BTF, ebpf = off) nothing is sent and
 * one line says so.  Callers: telemetry.c (conf, init, the sweep).  It
 * never blocks; a refused send is counted, and the next window repeats.
 */
#include <stdio.h>
#include <string.h>

#include "proto.h"
#include "svc.h"
#include "telemetry_sla.h"

static struct {
	uint64_t window_ms, threshold_us;
	int64_t last_sec; /* the last second of the latest window, -1 */
	int said_off;
	double *g_p99[HEAT_SERVICES], *g_breach[HEAT_SERVICES];
	double *g_threshold;
	uint64_t *c_sent, *c_refused;
	uint64_t sink;
} S = {5000, 20000, -1, 0, {NULL}, {NULL}, NULL, NULL, NULL, 0};

uint64_t
sla_p99_us(const uint64_t counts[HEAT_SLOTS], uint64_t *n)
{
	uint64_t total = 0, rank, cum = 0, lo, hi;
	int k;

	for (k = 0; k < HEAT_SLOTS; k++)
		total += counts[k];
	*n = total;
	if (total == 0)
		return (0);
	rank = (total * 99 + 99) / 100; /* ceil(0.99 n), 1-based */
	for (k = 0; k < HEAT_SLOTS; k++) {
		if (counts[k] == 0 || cum + counts[k] < rank) {
			cum += counts[k];
			continue;
		}
		lo = k == 0 ? 0 : 1ULL << k;
		if (k == HEAT_SLOTS - 1)
			return (lo);
		hi = 1ULL << (k + 1);
		return (lo + (hi - lo) * (rank - cum) / counts[k]);
	}
	return (0); /* not reached: rank <= total */
}

int
sla_window(const struct heat *h, int id, int64_t from, int64_t to,
           uint64_t out[HEAT_SLOTS])
{
	const struct heat_service *s;
	const uint32_t *c;
	int64_t t;
	size_t pos;
	int k, n = 0;

	memset(out, 0, sizeof(uint64_t) * HEAT_SLOTS);
	if (id <= 0 || id >= HEAT_SERVICES || (s = h->svc[id]) == NULL ||
	    h->cap == 0)
		return (0);
	for (t = from + 1; t <= to; t++) {
		if (t < 0)
			continue;
		pos = (size_t)(t % (int64_t)h->cap);
		if (h->secs[pos] != t)
			continue;
		c = &s->counts[pos * HEAT_NKINDS * HEAT_SLOTS +
		               (size_t)HEAT_RUNQ * HEAT_SLOTS];
		for (k = 0; k < HEAT_SLOTS; k++)
			out[k] += c[k];
		n++;
	}
	return (n);
}

int
telemetry_sla_conf(char *err, size_t errlen)
{
	int64_t w, thr;

	if (conf_get_int("telemetry", "sla_window_ms", 5000, 1000, 600000, &w,
	                 err, errlen) == -1 ||
	    conf_get_int("telemetry", "sla_runq_p99_us", 20000, 1, 60000000,
	                 &thr, err, errlen) == -1)
		return (-1);
	S.window_ms = (uint64_t)w;
	S.threshold_us = (uint64_t)thr;
	if (S.g_threshold != NULL)
		*S.g_threshold = (double)S.threshold_us / 1e6;
	return (0);
}

static uint64_t *
sla_counter(struct telemetry *t, const char *result)
{
	char lb[128];
	uint64_t *c;

	snprintf(lb, sizeof(lb), "service=\"%s\",result=\"%s\"", t->svc->name,
	         result);
	c = metrics_counter(t->svc->metrics, "troupe_sla_signals_total",
	                    "SLA_SIGNAL reports to the dispatcher", lb);
	return (c != NULL ? c : &S.sink);
}

void
telemetry_sla_init(struct telemetry *t)
{
	char lb[128];

	snprintf(lb, sizeof(lb), "service=\"%s\"", t->svc->name);
	S.g_threshold = metrics_gauge(
	        t->svc->metrics, "troupe_sla_runq_threshold_seconds",
	        "[telemetry] sla_runq_p99_us: the run-queue p99 above which "
	        "a service breaches its SLA",
	        lb);
	if (S.g_threshold != NULL)
		*S.g_threshold = (double)S.threshold_us / 1e6;
	S.c_sent = sla_counter(t, "sent");
	S.c_refused = sla_counter(t, "refused");
}

/* The gauges of service id, registered on first use. */
static void
sla_gauges(struct telemetry *t, int id, uint64_t p99, int breach)
{
	char lb[128];

	if (S.g_p99[id] == NULL) {
		snprintf(lb, sizeof(lb), "service=\"%s\"",
		         t->heat.svc[id]->name);
		S.g_p99[id] = metrics_gauge(
		        t->svc->metrics, "troupe_sla_runq_p99_seconds",
		        "Run-queue latency p99 of the service over the latest "
		        "SLA window (eBPF)",
		        lb);
		S.g_breach[id] = metrics_gauge(
		        t->svc->metrics, "troupe_sla_breach",
		        "1 if the service's run-queue p99 was above the "
		        "threshold in the latest SLA window",
		        lb);
	}
	if (S.g_p99[id] != NULL)
		*S.g_p99[id] = (double)p99 / 1e6;
	if (S.g_breach[id] != NULL)
		*S.g_breach[id] = breach;
}

void
telemetry_sla_tick(struct telemetry *t)
{
	struct msg_head h = {MSTR_NULL, MSTR_NULL, 0, MSTR_NULL};
	struct sla_signal sig;
	uint64_t counts[HEAT_SLOTS], n, p99;
	int64_t win = (int64_t)((S.window_ms + 999) / 1000), now;
	int id;

	if (t->ebpf == NULL) {
		if (!S.said_off) {
			S.said_off = 1;
			log_warnx("SLA signal off: the eBPF probes are off "
			          "(%s); the dispatcher's tiers go without it",
			          t->ebpf_reason[0] ? t->ebpf_reason
			                            : "not loaded");
		}
		return;
	}
	now = t->heat.last;
	if (now < 0)
		return;
	if (S.last_sec < 0) {
		S.last_sec = now; /* the first window starts now */
		return;
	}
	if (now - S.last_sec < win)
		return;
	for (id = 1; id < HEAT_SERVICES; id++) {
		if (t->heat.svc[id] == NULL)
			continue;
		(void)sla_window(&t->heat, id, now - win, now, counts);
		p99 = sla_p99_us(counts, &n);
		sig.service = MSTR(t->heat.svc[id]->name);
		sig.p99_us = p99;
		sig.threshold_us = S.threshold_us;
		sig.window_ms = (uint64_t)win * 1000;
		sig.breach = n >= SLA_MIN_EVENTS && p99 > S.threshold_us;
		sla_gauges(t, id, p99, (int)sig.breach);
		if (msg_send_sla_signal(t->svc->ipc, "dispatcher", &h, &sig) ==
		    -1)
			++*S.c_refused;
		else
			++*S.c_sent;
	}
	S.last_sec = now;
}
