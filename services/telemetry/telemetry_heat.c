/* SPDX-License-Identifier: ISC */
/*
 * telemetry_heat: the scheduler histograms of every Troupe service, one
 * log2 histogram of microseconds per second and per kind (run-queue
 * latency, off-CPU time), for the last `cap` seconds, plus cumulative
 * totals for /metrics.  telemetry_ebpf.c feeds it once a second from the
 * BPF maps; telemetry_http.c serves it as JSON (/api/heatmap) and
 * telemetry.c as Prometheus histograms.
 *
 * The ring is indexed by unix second % cap, and every position remembers
 * which second it holds, so a query for "since" never mixes a stale lap
 * with the current one.  Pure: no I/O, no clock, no logging; one thread.
 */
#include <stdlib.h>
#include <string.h>

#include "telemetry.h"

#define HEAT_PER_SEC (HEAT_NKINDS * HEAT_SLOTS)

int
heat_init(struct heat *h, size_t seconds)
{
	size_t i;

	memset(h, 0, sizeof(*h));
	if (seconds == 0 || seconds > 86400)
		return (-1);
	if ((h->secs = calloc(seconds, sizeof(*h->secs))) == NULL)
		return (-1);
	for (i = 0; i < seconds; i++)
		h->secs[i] = -1;
	h->cap = seconds;
	h->last = -1;
	return (0);
}

void
heat_free(struct heat *h)
{
	size_t i;

	for (i = 0; i < HEAT_SERVICES; i++)
		if (h->svc[i] != NULL) {
			free(h->svc[i]->counts);
			free(h->svc[i]);
		}
	free(h->secs);
	memset(h, 0, sizeof(*h));
}

int
heat_find(const struct heat *h, const char *name, size_t len)
{
	int i;

	for (i = 1; i < HEAT_SERVICES; i++)
		if (h->svc[i] != NULL && strlen(h->svc[i]->name) == len &&
		    memcmp(h->svc[i]->name, name, len) == 0)
			return (i);
	return (-1);
}

int
heat_id(struct heat *h, const char *name)
{
	struct heat_service *s;
	size_t len = strlen(name);
	int i;

	if ((i = heat_find(h, name, len)) != -1)
		return (i);
	if (len == 0 || len > TELEMETRY_NAME_MAX || h->cap == 0)
		return (-1);
	for (i = 1; i < HEAT_SERVICES && h->svc[i] != NULL; i++)
		;
	if (i == HEAT_SERVICES)
		return (-1);
	if ((s = calloc(1, sizeof(*s))) == NULL)
		return (-1);
	if ((s->counts = calloc(h->cap * HEAT_PER_SEC, sizeof(uint32_t))) ==
	    NULL) {
		free(s);
		return (-1);
	}
	memcpy(s->name, name, len + 1);
	h->svc[i] = s;
	return (i);
}

static void
heat_clear(struct heat *h, size_t pos, int64_t sec)
{
	size_t i;

	h->secs[pos] = sec;
	for (i = 1; i < HEAT_SERVICES; i++)
		if (h->svc[i] != NULL)
			memset(&h->svc[i]->counts[pos * HEAT_PER_SEC], 0,
			       HEAT_PER_SEC * sizeof(uint32_t));
}

void
heat_advance(struct heat *h, int64_t sec)
{
	int64_t s;

	if (h->cap == 0 || sec < 0 || sec <= h->last)
		return;
	s = h->last < 0 || sec - h->last > (int64_t)h->cap
	            ? sec - (int64_t)h->cap + 1
	            : h->last + 1;
	if (s < 0)
		s = 0;
	for (; s <= sec; s++)
		heat_clear(h, (size_t)(s % (int64_t)h->cap), s);
	h->last = sec;
}

int
heat_add(struct heat *h, int id, int64_t sec, enum heat_kind k,
         const uint64_t counts[HEAT_SLOTS], uint64_t sum_ns)
{
	struct heat_service *s;
	uint32_t *c;
	size_t pos, i;
	uint64_t n = 0;

	if (id <= 0 || id >= HEAT_SERVICES || (s = h->svc[id]) == NULL ||
	    (unsigned)k >= HEAT_NKINDS)
		return (-1);
	for (i = 0; i < HEAT_SLOTS; i++) {
		s->total[k][i] += counts[i];
		n += counts[i];
	}
	s->count[k] += n;
	s->sum_ns[k] += sum_ns;
	heat_advance(h, sec);
	if (sec < 0 || sec > h->last || h->last - sec >= (int64_t)h->cap)
		return (-1);
	pos = (size_t)(sec % (int64_t)h->cap);
	if (h->secs[pos] != sec)
		return (-1);
	c = &s->counts[pos * HEAT_PER_SEC + (size_t)k * HEAT_SLOTS];
	for (i = 0; i < HEAT_SLOTS; i++)
		c[i] = counts[i] > UINT32_MAX - c[i]
		               ? UINT32_MAX
		               : c[i] + (uint32_t)counts[i];
	return (0);
}

int
heat_json_list(const struct heat *h, int enabled, const char *reason,
               struct buf *out)
{
	int i, first = 1;

	if (buf_addf(out, "{\"enabled\":%s,\"reason\":",
	             enabled ? "true" : "false") == -1 ||
	    buf_add_json_str(out, reason ? reason : "",
	                     reason ? strlen(reason) : 0) == -1 ||
	    buf_addf(out, ",\"now\":%lld,\"window_s\":%zu,\"services\":[",
	             (long long)h->last, h->cap) == -1)
		return (-1);
	for (i = 1; i < HEAT_SERVICES; i++) {
		if (h->svc[i] == NULL)
			continue;
		if ((!first && buf_adds(out, ",") == -1) ||
		    buf_add_json_str(out, h->svc[i]->name,
		                     strlen(h->svc[i]->name)) == -1)
			return (-1);
		first = 0;
	}
	return (buf_adds(out, "]}"));
}

static int
heat_json_counts(struct buf *out, const uint32_t *c)
{
	int i;

	if (buf_adds(out, "[") == -1)
		return (-1);
	for (i = 0; i < HEAT_SLOTS; i++)
		if (buf_addf(out, i ? ",%u" : "%u", c[i]) == -1)
			return (-1);
	return (buf_adds(out, "]"));
}

int
heat_json_service(const struct heat *h, int id, int64_t since, struct buf *out)
{
	const struct heat_service *s;
	int64_t t, from;
	size_t pos;
	int i, first = 1;

	if (id <= 0 || id >= HEAT_SERVICES || (s = h->svc[id]) == NULL)
		return (-1);
	if (buf_adds(out, "{\"service\":") == -1 ||
	    buf_add_json_str(out, s->name, strlen(s->name)) == -1 ||
	    buf_addf(out,
	             ",\"unit\":\"us\",\"since\":%lld,\"now\":%lld,"
	             "\"buckets\":[",
	             (long long)since, (long long)h->last) == -1)
		return (-1);
	for (i = 0; i < HEAT_SLOTS; i++) {
		unsigned long long lo = i == 0 ? 0 : 1ULL << i;

		if (i == HEAT_SLOTS - 1) {
			if (buf_addf(out, ",{\"lo_us\":%llu,\"hi_us\":null}",
			             lo) == -1)
				return (-1);
		} else if (buf_addf(out, "%s{\"lo_us\":%llu,\"hi_us\":%llu}",
		                    i ? "," : "", lo, 1ULL << (i + 1)) == -1)
			return (-1);
	}
	if (buf_adds(out, "],\"seconds\":[") == -1)
		return (-1);
	from = h->last - (int64_t)h->cap + 1;
	if (from < since)
		from = since;
	for (t = from; h->last >= 0 && t <= h->last; t++) {
		pos = (size_t)(t % (int64_t)h->cap);
		if (t < 0 || h->secs[pos] != t)
			continue;
		if (buf_addf(out, "%s{\"t\":%lld,\"runq\":", first ? "" : ",",
		             (long long)t) == -1 ||
		    heat_json_counts(out, &s->counts[pos * HEAT_PER_SEC]) ==
		            -1 ||
		    buf_adds(out, ",\"offcpu\":") == -1 ||
		    heat_json_counts(
		            out,
		            &s->counts[pos * HEAT_PER_SEC + HEAT_SLOTS]) ==
		            -1 ||
		    buf_adds(out, "}") == -1)
			return (-1);
		first = 0;
	}
	return (buf_adds(out, "]}"));
}

static int
heat_prom_family(const struct heat *h, enum heat_kind k, const char *name,
                 const char *help, struct buf *out)
{
	const struct heat_service *s;
	uint64_t cum;
	int i, j;

	if (buf_addf(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help,
	             name) == -1)
		return (-1);
	for (i = 1; i < HEAT_SERVICES; i++) {
		if ((s = h->svc[i]) == NULL)
			continue;
		cum = 0;
		for (j = 0; j < HEAT_SLOTS - 1; j++) {
			cum += s->total[k][j];
			/* slot j holds values below 2^(j+1) us */
			if (buf_addf(out,
			             "%s_bucket{service=\"%s\",le=\"%.6g\"} "
			             "%llu\n",
			             name, s->name,
			             (double)(1ULL << (j + 1)) / 1e6,
			             (unsigned long long)cum) == -1)
				return (-1);
		}
		if (buf_addf(out,
		             "%s_bucket{service=\"%s\",le=\"+Inf\"} %llu\n"
		             "%s_sum{service=\"%s\"} %.9f\n"
		             "%s_count{service=\"%s\"} %llu\n",
		             name, s->name, (unsigned long long)s->count[k],
		             name, s->name, (double)s->sum_ns[k] / 1e9, name,
		             s->name, (unsigned long long)s->count[k]) == -1)
			return (-1);
	}
	return (0);
}

int
heat_prom(const struct heat *h, int enabled, struct buf *out)
{
	if (buf_addf(out,
	             "# HELP troupe_ebpf_enabled Whether telemetry's eBPF "
	             "scheduler probes are loaded (1) or not (0).\n"
	             "# TYPE troupe_ebpf_enabled gauge\n"
	             "troupe_ebpf_enabled %d\n",
	             enabled ? 1 : 0) == -1)
		return (-1);
	if (!enabled)
		return (0);
	if (heat_prom_family(h, HEAT_RUNQ, "troupe_runq_latency_seconds",
	                     "Run-queue latency (wake-up to running) of the "
	                     "service's threads, from eBPF.",
	                     out) == -1 ||
	    heat_prom_family(h, HEAT_OFFCPU, "troupe_offcpu_seconds",
	                     "Off-CPU time (switched out to switched in) of "
	                     "the service's threads, from eBPF.",
	                     out) == -1)
		return (-1);
	return (0);
}
