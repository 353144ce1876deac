/* SPDX-License-Identifier: ISC */
/*
 * storage_health: storage's part in the degradation tiers (docs/
 * tiers.md).  It sends HEALTH {pg_ok, redis_ok, spool_bytes, latency_us,
 * errors} to the dispatcher on every change of PostgreSQL's writer or
 * Redis (storage_status() calls storage_health_check()) and every
 * STORAGE_HEALTH_MS anyway; latency_us is the p99 of the commits since
 * the previous report (storage_commit.c calls storage_health_commit()).
 * It also keeps the tier the dispatcher publishes (TIER_STATE): while it
 * is L1 or above, storage defers optional work, the write-back of a
 * context rebuilt from PostgreSQL into Redis (storage_ctx.c asks
 * storage_health_defer(); the next read after the tier rebuilds it).
 *
 * Callers: storage.c (init, status), storage_commit.c, storage_ctx.c,
 * storage_dispatch.c.  It never blocks, never logs per report, and a
 * refused send is only counted: the next report repeats the state.
 */
#include <stdlib.h>
#include <string.h>

#include "storage.h"

#define STORAGE_HEALTH_MS 2000      /* a report at least this often */
#define STORAGE_HEALTH_SAMPLES 256  /* commit times kept per report */
#define STORAGE_TIER_STALE_MS 10000 /* a TIER_STATE older is forgotten */

static struct {
	struct loop_timer *timer;
	int sent, pg_ok, redis_ok; /* what the latest report said */
	uint64_t lat_us[STORAGE_HEALTH_SAMPLES];
	size_t nlat; /* commits since the last report (may pass the ring) */
	uint64_t last_p99_us;
	int tier;
	uint64_t tier_ms; /* monotonic: the latest TIER_STATE */
	uint64_t *c_sent, *c_refused, *c_deferred;
	uint64_t sink;
} H;

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x < y ? -1 : x > y);
}

/* The p99 of the commits since the last report; the previous value if
 * there were none (a quiet writer is not a fast one, nor a slow one). */
static uint64_t
health_p99(void)
{
	uint64_t v[STORAGE_HEALTH_SAMPLES];
	size_t n = H.nlat < STORAGE_HEALTH_SAMPLES ? H.nlat
	                                           : STORAGE_HEALTH_SAMPLES;
	size_t k;

	if (n == 0)
		return (H.last_p99_us);
	memcpy(v, H.lat_us, n * sizeof(v[0]));
	qsort(v, n, sizeof(v[0]), cmp_u64);
	k = (n * 99 + 99) / 100; /* the nearest rank, 1-based */
	H.last_p99_us = v[k - 1];
	H.nlat = 0;
	return (H.last_p99_us);
}

static void
health_send(struct storage *st)
{
	struct msg_head h = {MSTR_NULL, MSTR_NULL, 0, MSTR_NULL};
	struct health_report r;
	double recs, bytes;

	storage_commit_gauges(st);
	recs = st->m.spool_records ? *st->m.spool_records : 0;
	bytes = st->m.spool_bytes ? *st->m.spool_bytes : 0;
	r.service = MSTR(st->svc.name);
	r.pg_ok = st->writer != NULL && storage_pg_up(st->writer);
	r.redis_ok = st->redis != NULL && storage_redis_up(st->redis);
	/* Only chats not yet replayed count (the file keeps its header). */
	r.spool_bytes = recs > 0 && bytes > 0 ? (uint64_t)bytes : 0;
	r.latency_us = health_p99();
	r.errors = (st->m.err_pg ? *st->m.err_pg : 0) +
	           (st->m.err_redis ? *st->m.err_redis : 0);
	H.sent = 1;
	H.pg_ok = (int)r.pg_ok;
	H.redis_ok = (int)r.redis_ok;
	if (msg_send_health(st->svc.ipc, "dispatcher", &h, &r) == -1)
		++*H.c_refused;
	else
		++*H.c_sent;
	loop_timer_set(H.timer, STORAGE_HEALTH_MS);
}

static void
health_timer(struct loop *l, void *arg)
{
	(void)l;
	health_send(arg);
}

void
storage_health_init(struct storage *st)
{
	char lb[128];
	struct metrics *mx = st->svc.metrics;

	snprintf(lb, sizeof(lb), "service=\"%s\",result=\"sent\"",
	         st->svc.name);
	H.c_sent = metrics_counter(mx, "troupe_storage_health_reports_total",
	                           "HEALTH reports to the dispatcher", lb);
	snprintf(lb, sizeof(lb), "service=\"%s\",result=\"refused\"",
	         st->svc.name);
	H.c_refused =
	        metrics_counter(mx, "troupe_storage_health_reports_total",
	                        "HEALTH reports to the dispatcher", lb);
	snprintf(lb, sizeof(lb), "service=\"%s\"", st->svc.name);
	H.c_deferred = metrics_counter(
	        mx, "troupe_storage_deferred_total",
	        "Optional work skipped in tier L1 or above (context "
	        "write-backs)",
	        lb);
	if (H.c_sent == NULL)
		H.c_sent = &H.sink;
	if (H.c_refused == NULL)
		H.c_refused = &H.sink;
	if (H.c_deferred == NULL)
		H.c_deferred = &H.sink;
	if ((H.timer = loop_timer_new(st->svc.loop, health_timer, st)) == NULL)
		fatalx("out of memory");
	/* The first report once the connections had a moment to come up;
	 * any change before sends at once. */
	loop_timer_set(H.timer, STORAGE_HEALTH_MS);
}

void
storage_health_check(struct storage *st)
{
	int pg = st->writer != NULL && storage_pg_up(st->writer);
	int redis = st->redis != NULL && storage_redis_up(st->redis);

	if (H.timer == NULL)
		return;
	if (!H.sent || pg != H.pg_ok || redis != H.redis_ok)
		health_send(st);
}

void
storage_health_commit(struct storage *st, uint64_t ns)
{
	(void)st;
	H.lat_us[H.nlat++ % STORAGE_HEALTH_SAMPLES] = ns / 1000;
}

void
storage_health_tier(struct storage *st, const struct tier_state *ts)
{
	(void)st;
	if (H.tier != (int)ts->tier)
		log_debug("%s: tier L%d (%.*s)", __func__, (int)ts->tier,
		          (int)ts->cause.n, ts->cause.p);
	H.tier = ts->tier > 3 ? 3 : (int)ts->tier;
	H.tier_ms = now_mono_ms();
}

int
storage_health_defer(const struct storage *st)
{
	(void)st;
	if (H.tier < 1 || now_mono_ms() - H.tier_ms > STORAGE_TIER_STALE_MS)
		return (0);
	if (H.c_deferred != NULL)
		++*H.c_deferred;
	return (1);
}
