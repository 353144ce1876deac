/* SPDX-License-Identifier: ISC */
/*
 * edge_tier: the degradation tier as the edge sees it (docs/tiers.md).
 * The dispatcher sends TIER_STATE {tier, cause, retry_after, since_ms} on
 * every change and every 2 s; the edge keeps the latest and forgets it
 * after EDGE_TIER_STALE_MS without one (a dispatcher that is gone shows
 * in /readyz as an unreachable peer, not as a tier).
 *
 * In L3 the edge sheds early: a new chat (v1 or v3; edge_http.c asks
 * only on those routes) is answered 503 + Retry-After at once when more
 * than [edge] l3_inflight chats are already open.  l3_inflight 0 (the
 * default) means "the chats open when L3 began": the edge lets no more
 * pile up than the load that made the dispatcher go to L3, and what it
 * forwards the dispatcher starts at once or refuses.
 *
 * Callers: see edge_tier.h.  No I/O, never logs per request (one line
 * when the tier the edge sees changes).
 */
#include <stdio.h>
#include <string.h>

#include "edge_tier.h"

static struct {
	struct svc *svc;
	int tier;
	uint64_t at_ms; /* monotonic: the latest TIER_STATE, 0: none */
	uint64_t retry_after;
	uint64_t since_ms; /* wall clock the tier began */
	char cause[200];
	uint64_t limit; /* [edge] l3_inflight */
	size_t l3_open; /* chats open when L3 was first asked about */
	int l3_captured;
	double *g_tier;
	uint64_t *c_shed;
	uint64_t sink;
} ET;

static void
tier_reconf(void)
{
	int64_t v;
	char err[160];

	if (conf_get_int("edge", "l3_inflight", 0, 0, 10000000, &v, err,
	                 sizeof(err)) == -1) {
		log_warnx("%s: %s (keeping %llu)", __func__, err,
		          (unsigned long long)ET.limit);
		return;
	}
	ET.limit = (uint64_t)v;
}

void
edge_tier_init(struct svc *svc)
{
	char lb[96];

	ET.svc = svc;
	snprintf(lb, sizeof(lb), "service=\"%s\"", svc->name);
	ET.g_tier = metrics_gauge(svc->metrics, "troupe_edge_tier",
	                          "Degradation tier the edge applies (from "
	                          "the dispatcher's TIER_STATE)",
	                          lb);
	ET.c_shed = metrics_counter(
	        svc->metrics, "troupe_edge_shed_total",
	        "New chats answered 503 at once in tier L3", lb);
	if (ET.c_shed == NULL)
		ET.c_shed = &ET.sink;
	tier_reconf();
}

void
edge_tier_limit(uint64_t l3_inflight)
{
	ET.limit = l3_inflight;
}

int
edge_tier_now(uint64_t now_ms)
{
	if (ET.at_ms == 0 || now_ms - ET.at_ms > EDGE_TIER_STALE_MS)
		return (0);
	return (ET.tier);
}

void
edge_tier_set(const struct tier_state *ts, uint64_t now_ms)
{
	int was = edge_tier_now(now_ms), t = ts->tier > 3 ? 3 : (int)ts->tier;
	size_t n = ts->cause.n < sizeof(ET.cause) - 1 ? ts->cause.n
	                                              : sizeof(ET.cause) - 1;

	if (ET.svc != NULL)
		tier_reconf(); /* a reload may have changed it */
	memcpy(ET.cause, ts->cause.p, n);
	ET.cause[n] = '\0';
	ET.tier = t;
	ET.retry_after = ts->retry_after ? ts->retry_after : 1;
	ET.since_ms = ts->since_ms;
	ET.at_ms = now_ms ? now_ms : 1;
	if (t != 3)
		ET.l3_captured = 0;
	if (ET.g_tier != NULL)
		*ET.g_tier = t;
	if (t != was && ET.svc != NULL)
		log_info("tier: L%d -> L%d (from the dispatcher): %s", was, t,
		         t ? ET.cause : "normal");
}

int
edge_tier_shed(size_t open, uint64_t now_ms, uint64_t *retry_after)
{
	size_t limit;

	if (edge_tier_now(now_ms) != 3)
		return (0);
	if (!ET.l3_captured) {
		ET.l3_captured = 1;
		ET.l3_open = open;
	}
	limit = ET.limit > 0 ? (size_t)ET.limit : ET.l3_open;
	if (open < limit)
		return (0);
	*retry_after = ET.retry_after;
	if (ET.c_shed != NULL)
		++*ET.c_shed;
	return (1);
}

int
edge_tier_readyz(struct buf *out, uint64_t now_ms, uint64_t *retry_after)
{
	int t = edge_tier_now(now_ms);

	if (t == 3) {
		*retry_after = ET.retry_after;
		if (buf_adds(out, "{\"status\":\"degraded\",\"tier\":\"L3\","
		                  "\"cause\":") == -1 ||
		    buf_add_json_str(out, ET.cause, strlen(ET.cause)) == -1 ||
		    buf_addf(out, ",\"since_ms\":%llu}",
		             (unsigned long long)ET.since_ms) == -1)
			return (-1);
		return (503);
	}
	if (buf_addf(out, "{\"status\":\"ready\",\"tier\":\"L%d\"", t) == -1)
		return (-1);
	if (t > 0 &&
	    (buf_adds(out, ",\"cause\":") == -1 ||
	     buf_add_json_str(out, ET.cause, strlen(ET.cause)) == -1 ||
	     buf_addf(out, ",\"since_ms\":%llu",
	              (unsigned long long)ET.since_ms) == -1))
		return (-1);
	if (buf_adds(out, "}") == -1)
		return (-1);
	return (200);
}
