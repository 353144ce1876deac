/* SPDX-License-Identifier: ISC */
/*
 * telemetry_heat_test: the ring of per-second scheduler histograms keeps
 * the last `cap` seconds and nothing older, zeroes the seconds nobody
 * recorded, keeps cumulative totals for /metrics, and renders valid JSON
 * (checked with cJSON) and valid Prometheus histograms (promcheck.h).
 */
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "promcheck.h"
#include "t.h"
#include "telemetry.h"
#include "util.h"

static void
counts_of(uint64_t c[HEAT_SLOTS], uint64_t slot, uint64_t n)
{
	memset(c, 0, HEAT_SLOTS * sizeof(c[0]));
	c[slot] = n;
}

static cJSON *
json_of(struct buf *b)
{
	cJSON *j;

	T_ASSERT(buf_adds(b, "") == 0);
	if ((j = cJSON_ParseWithLength(b->b, b->len)) == NULL)
		T_FAIL("invalid JSON: %.*s", (int)b->len, b->b);
	return (j);
}

static void
t_ids(void)
{
	struct heat h;
	char name[16];
	int i, id;

	T_EQ_INT(heat_init(&h, 0), -1);
	T_EQ_INT(heat_init(&h, 10), 0);
	T_EQ_INT(heat_id(&h, "edge"), 1);
	T_EQ_INT(heat_id(&h, "auth"), 2);
	T_EQ_INT(heat_id(&h, "edge"), 1);
	T_EQ_INT(heat_find(&h, "auth", 4), 2);
	T_EQ_INT(heat_find(&h, "aut", 3), -1);
	T_EQ_INT(heat_id(&h, ""), -1);
	for (i = 3; i < HEAT_SERVICES; i++) {
		snprintf(name, sizeof(name), "s%d", i);
		T_EQ_INT(heat_id(&h, name), i);
	}
	id = heat_id(&h, "one-too-many");
	T_EQ_INT(id, -1);
	heat_free(&h);
}

static void
t_ring(void)
{
	struct heat h;
	uint64_t c[HEAT_SLOTS];
	struct buf b = {0};
	cJSON *j, *secs, *s;
	int id;

	T_EQ_INT(heat_init(&h, 5), 0);
	id = heat_id(&h, "edge");
	counts_of(c, 3, 7);
	T_EQ_INT(heat_add(&h, id, 1000, HEAT_RUNQ, c, 70000), 0);
	T_EQ_INT(heat_add(&h, id, 1000, HEAT_RUNQ, c, 70000), 0);
	counts_of(c, 20, 1);
	T_EQ_INT(heat_add(&h, id, 1002, HEAT_OFFCPU, c, 1000000000), 0);
	T_EQ_INT(h.last, 1002);
	/* Out of the window (too old) or unknown service: refused, but
	 * the cumulative totals still take it. */
	counts_of(c, 0, 5);
	T_EQ_INT(heat_add(&h, id, 997, HEAT_RUNQ, c, 0), -1);
	T_EQ_INT(heat_add(&h, 9, 1002, HEAT_RUNQ, c, 0), -1);
	T_EQ_INT(h.svc[id]->total[HEAT_RUNQ][0], 5);
	T_EQ_INT(h.svc[id]->total[HEAT_RUNQ][3], 14);
	T_EQ_INT(h.svc[id]->count[HEAT_RUNQ], 19);
	T_EQ_INT(h.svc[id]->count[HEAT_OFFCPU], 1);

	T_EQ_INT(heat_json_service(&h, id, 0, &b), 0);
	j = json_of(&b);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(j, "service")->valuestring,
	         "edge");
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(j, "now")->valuedouble,
	         1002);
	T_EQ_INT(cJSON_GetArraySize(
	                 cJSON_GetObjectItemCaseSensitive(j, "buckets")),
	         HEAT_SLOTS);
	s = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "buckets"),
	                       4);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(s, "lo_us")->valuedouble,
	         16);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(s, "hi_us")->valuedouble,
	         32);
	secs = cJSON_GetObjectItemCaseSensitive(j, "seconds");
	/* 998..1002: the window; 1000 and 1002 have data, the others are
	 * zeros, and 998 and 999 were never recorded yet are in the
	 * window (a fresh ring starts with the whole window at zero). */
	T_EQ_INT(cJSON_GetArraySize(secs), 5);
	s = cJSON_GetArrayItem(secs, 2);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(s, "t")->valuedouble, 1000);
	T_EQ_INT(cJSON_GetArrayItem(
	                 cJSON_GetObjectItemCaseSensitive(s, "runq"), 3)
	                 ->valuedouble,
	         14);
	T_EQ_INT(cJSON_GetArraySize(
	                 cJSON_GetObjectItemCaseSensitive(s, "offcpu")),
	         HEAT_SLOTS);
	s = cJSON_GetArrayItem(secs, 4);
	T_EQ_INT(cJSON_GetArrayItem(
	                 cJSON_GetObjectItemCaseSensitive(s, "offcpu"), 20)
	                 ->valuedouble,
	         1);
	cJSON_Delete(j);

	/* since: only seconds >= since. */
	buf_reset(&b);
	T_EQ_INT(heat_json_service(&h, id, 1001, &b), 0);
	j = json_of(&b);
	secs = cJSON_GetObjectItemCaseSensitive(j, "seconds");
	T_EQ_INT(cJSON_GetArraySize(secs), 2);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(secs, 0),
	                                          "t")
	                 ->valuedouble,
	         1001);
	cJSON_Delete(j);

	/* A jump: 1000 leaves the window, 1004..1006 are zero. */
	heat_advance(&h, 1006);
	buf_reset(&b);
	T_EQ_INT(heat_json_service(&h, id, 0, &b), 0);
	j = json_of(&b);
	secs = cJSON_GetObjectItemCaseSensitive(j, "seconds");
	T_EQ_INT(cJSON_GetArraySize(secs), 5);
	s = cJSON_GetArrayItem(secs, 0);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(s, "t")->valuedouble, 1002);
	T_EQ_INT(cJSON_GetArrayItem(
	                 cJSON_GetObjectItemCaseSensitive(s, "offcpu"), 20)
	                 ->valuedouble,
	         1);
	s = cJSON_GetArrayItem(secs, 4);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(s, "t")->valuedouble, 1006);
	T_EQ_INT(cJSON_GetArrayItem(
	                 cJSON_GetObjectItemCaseSensitive(s, "offcpu"), 20)
	                 ->valuedouble,
	         0);
	cJSON_Delete(j);

	/* A jump longer than the window clears everything. */
	heat_advance(&h, 5000);
	buf_reset(&b);
	T_EQ_INT(heat_json_service(&h, id, 0, &b), 0);
	j = json_of(&b);
	secs = cJSON_GetObjectItemCaseSensitive(j, "seconds");
	T_EQ_INT(cJSON_GetArraySize(secs), 5);
	for (int i = 0; i < 5; i++) {
		s = cJSON_GetArrayItem(secs, i);
		T_EQ_INT(cJSON_GetObjectItemCaseSensitive(s, "t")->valuedouble,
		         4996 + i);
		T_EQ_INT(cJSON_GetArrayItem(
		                 cJSON_GetObjectItemCaseSensitive(s, "offcpu"),
		                 20)
		                 ->valuedouble,
		         0);
	}
	cJSON_Delete(j);
	T_EQ_INT(heat_json_service(&h, 0, 0, &b), -1);
	T_EQ_INT(heat_json_service(&h, 7, 0, &b), -1);
	buf_free(&b);
	heat_free(&h);
}

static void
t_list(void)
{
	struct heat h;
	struct buf b = {0};
	cJSON *j, *s;

	T_EQ_INT(heat_init(&h, 60), 0);
	heat_id(&h, "edge");
	heat_id(&h, "worker");
	heat_advance(&h, 42);
	T_EQ_INT(heat_json_list(&h, 0, "load: \"EPERM\"", &b), 0);
	j = json_of(&b);
	T_ASSERT(
	        cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(j, "enabled")));
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(j, "reason")->valuestring,
	         "load: \"EPERM\"");
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(j, "now")->valuedouble, 42);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(j, "window_s")->valuedouble,
	         60);
	s = cJSON_GetObjectItemCaseSensitive(j, "services");
	T_EQ_INT(cJSON_GetArraySize(s), 2);
	T_EQ_STR(cJSON_GetArrayItem(s, 0)->valuestring, "edge");
	T_EQ_STR(cJSON_GetArrayItem(s, 1)->valuestring, "worker");
	cJSON_Delete(j);
	buf_free(&b);
	heat_free(&h);
}

static void
t_prom(void)
{
	struct heat h;
	struct buf b = {0};
	uint64_t c[HEAT_SLOTS];
	char err[256];
	int id;

	T_EQ_INT(heat_init(&h, 60), 0);
	id = heat_id(&h, "edge");
	(void)heat_id(&h, "auth");
	counts_of(c, 0, 2);
	c[3] = 5;              /* [8, 16) us */
	c[HEAT_SLOTS - 1] = 1; /* the open-ended last bucket */
	T_EQ_INT(heat_add(&h, id, 100, HEAT_RUNQ, c, 1500000), 0);

	T_EQ_INT(heat_prom(&h, 0, &b), 0);
	T_ASSERT(buf_adds(&b, "") == 0);
	T_ASSERT(strstr(b.b, "\ntroupe_ebpf_enabled 0\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds") == NULL);

	buf_reset(&b);
	T_EQ_INT(heat_prom(&h, 1, &b), 0);
	T_ASSERT(buf_adds(&b, "") == 0);
	if (prom_check(b.b, err, sizeof(err)) != 0)
		T_FAIL("invalid exposition: %s\n%s", err, b.b);
	T_ASSERT(prom_check_promtool(b.b) != 1);
	T_ASSERT(strstr(b.b, "\ntroupe_ebpf_enabled 1\n") != NULL);
	/* slot 0 is below 2 us, slot 3 below 16 us; cumulative. */
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_bucket{service="
	                     "\"edge\",le=\"2e-06\"} 2\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_bucket{service="
	                     "\"edge\",le=\"8e-06\"} 2\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_bucket{service="
	                     "\"edge\",le=\"1.6e-05\"} 7\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_bucket{service="
	                     "\"edge\",le=\"67.1089\"} 7\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_bucket{service="
	                     "\"edge\",le=\"+Inf\"} 8\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_count{service="
	                     "\"edge\"} 8\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_runq_latency_seconds_sum{service="
	                     "\"edge\"} 0.001500000\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_offcpu_seconds_count{service="
	                     "\"edge\"} 0\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_offcpu_seconds_count{service="
	                     "\"auth\"} 0\n") != NULL);
	buf_free(&b);
	heat_free(&h);
}

T_TESTS = {
        {"ids", t_ids},   {"ring", t_ring}, {"list", t_list},
        {"prom", t_prom}, {NULL, NULL},
};
T_MAIN
