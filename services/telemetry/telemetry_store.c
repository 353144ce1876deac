/* SPDX-License-Identifier: ISC */
/*
 * telemetry_store: the latest METRICS report of every service.
 *
 * Reports are cumulative, so only the latest one of a service matters: it
 * replaces the previous one.  A service silent for stale_ms is down (its
 * text is dropped, troupe_service_up says 0); silent for forget_ms it is
 * forgotten, so that names which never come back (a retired worker slot,
 * a crashed troupectl) do not pile up.  Peers are kept sorted by name so
 * the page is stable.  Callers: telemetry_dispatch.c (reports),
 * telemetry.c (sweeps, the page).  Never logs.
 */
#include <stdlib.h>
#include <string.h>

#include "telemetry.h"

void
telemetry_store_init(struct telemetry_store *st, uint64_t stale_ms,
                     uint64_t forget_ms, size_t max_text)
{
	memset(st, 0, sizeof(*st));
	st->stale_ms = stale_ms;
	st->forget_ms = forget_ms < stale_ms ? stale_ms : forget_ms;
	st->max_text = max_text;
}

void
telemetry_store_free(struct telemetry_store *st)
{
	size_t i;

	for (i = 0; i < st->npeers; i++)
		free(st->peers[i].text);
	free(st->peers);
	memset(st, 0, sizeof(*st));
}

/* A mailbox name: it becomes a label value, so keep it plain. */
static int
store_name_ok(struct mstr s)
{
	uint32_t i;

	if (s.n == 0 || s.n > TELEMETRY_NAME_MAX)
		return (0);
	for (i = 0; i < s.n; i++) {
		char c = s.p[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '_' || c == '-' ||
		      c == '.' || c == ':'))
			return (0);
	}
	return (1);
}

/* Binary search: the index of name, or where it would go (*found 0). */
static size_t
store_find(const struct telemetry_store *st, struct mstr name, int *found)
{
	size_t lo = 0, hi = st->npeers;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		const char *pn = st->peers[mid].name;
		size_t pl = strlen(pn);
		int c = memcmp(pn, name.p, pl < name.n ? pl : name.n);

		if (c == 0)
			c = pl < name.n ? -1 : pl > name.n ? 1 : 0;
		if (c == 0) {
			*found = 1;
			return (mid);
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = 0;
	return (lo);
}

int
telemetry_store_report(struct telemetry_store *st, struct mstr service,
                       struct mstr text, uint64_t now_ms)
{
	struct telemetry_peer *p;
	char *copy;
	size_t i;
	int found;

	if (!store_name_ok(service) || text.n > st->max_text)
		goto refuse;
	i = store_find(st, service, &found);
	if (!found) {
		if (st->npeers == TELEMETRY_PEERS_MAX)
			goto refuse;
		if (st->npeers == st->cap) {
			size_t cap = st->cap ? st->cap * 2 : 16;

			if ((p = reallocarray(st->peers, cap, sizeof(*p))) ==
			    NULL)
				goto refuse;
			st->peers = p;
			st->cap = cap;
		}
		memmove(&st->peers[i + 1], &st->peers[i],
		        (st->npeers - i) * sizeof(*p));
		st->npeers++;
		p = &st->peers[i];
		memset(p, 0, sizeof(*p));
		memcpy(p->name, service.p, service.n);
	}
	p = &st->peers[i];
	if ((copy = malloc(text.n + 1)) == NULL) {
		if (!found) {
			memmove(&st->peers[i], &st->peers[i + 1],
			        (st->npeers - i - 1) * sizeof(*p));
			st->npeers--;
		}
		goto refuse;
	}
	if (text.n > 0)
		memcpy(copy, text.p, text.n);
	copy[text.n] = '\0';
	free(p->text);
	p->text = copy;
	p->len = text.n;
	p->last_ms = now_ms;
	p->reports++;
	return (0);
refuse:
	st->refused++;
	return (-1);
}

void
telemetry_store_sweep(struct telemetry_store *st, uint64_t now_ms)
{
	size_t i = 0;

	while (i < st->npeers) {
		struct telemetry_peer *p = &st->peers[i];
		uint64_t age = now_ms > p->last_ms ? now_ms - p->last_ms : 0;

		if (age >= st->forget_ms) {
			free(p->text);
			memmove(p, p + 1, (st->npeers - i - 1) * sizeof(*p));
			st->npeers--;
			continue;
		}
		if (age >= st->stale_ms) {
			free(p->text);
			p->text = NULL;
			p->len = 0;
		}
		i++;
	}
}

static int
store_fresh(const struct telemetry_store *st, const struct telemetry_peer *p,
            uint64_t now_ms)
{
	uint64_t age = now_ms > p->last_ms ? now_ms - p->last_ms : 0;

	return (p->text != NULL && age < st->stale_ms);
}

/* The highest degradation tier a service's text reports: the largest N of
 * a `troupe_storage_degraded{...tier="LN"...} V` line with V not 0 (storage
 * exports its L2 that way), or the V of a `troupe_dispatcher_tier{...} V`
 * line (the dispatcher's tier, docs/tiers.md); 0 if none. */
static int
store_tier(const char *t, size_t len)
{
	static const char fam[] = "troupe_storage_degraded{";
	static const char dfam[] = "troupe_dispatcher_tier{";
	const char *e = t + len, *l, *nl, *tier, *close;
	int best = 0, n;
	double v;
	char *end;

	for (l = t; l < e; l = nl + 1) {
		if ((nl = memchr(l, '\n', (size_t)(e - l))) == NULL)
			break;
		if ((size_t)(nl - l) > sizeof(dfam) - 1 &&
		    memcmp(l, dfam, sizeof(dfam) - 1) == 0 &&
		    (close = memchr(l, '}', (size_t)(nl - l))) != NULL) {
			v = strtod(close + 1, &end);
			if (end > close + 1 && end <= nl && v >= 1 && v <= 3 &&
			    (int)v > best)
				best = (int)v;
			continue;
		}
		if ((size_t)(nl - l) <= sizeof(fam) - 1 ||
		    memcmp(l, fam, sizeof(fam) - 1) != 0 ||
		    (close = memchr(l, '}', (size_t)(nl - l))) == NULL)
			continue;
		for (tier = l; tier + 8 < close; tier++)
			if (memcmp(tier, "tier=\"L", 7) == 0)
				break;
		if (tier + 8 >= close || tier[7] < '0' || tier[7] > '9')
			continue;
		n = tier[7] - '0';
		v = strtod(close + 1, &end);
		if (end > close + 1 && end <= nl && v != 0 && n > best)
			best = n;
	}
	return (best);
}

/* Telemetry's own series about the services it hears from. */
static int
store_series(struct telemetry_store *st, const char *self, uint64_t now_ms,
             struct buf *b)
{
	size_t i;
	int r, t, tier = 0;

	r = buf_adds(b, "# HELP troupe_service_up Whether the service sent "
	                "its metrics "
	                "within [telemetry] stale_after_s (1) or not (0).\n"
	                "# TYPE troupe_service_up gauge\n");
	if (r == 0 && self != NULL)
		r = buf_addf(b, "troupe_service_up{service=\"%s\"} 1\n", self);
	for (i = 0; r == 0 && i < st->npeers; i++)
		r = buf_addf(b, "troupe_service_up{service=\"%s\"} %d\n",
		             st->peers[i].name,
		             store_fresh(st, &st->peers[i], now_ms));
	for (i = 0; i < st->npeers; i++)
		if (store_fresh(st, &st->peers[i], now_ms) &&
		    (t = store_tier(st->peers[i].text, st->peers[i].len)) >
		            tier)
			tier = t;
	if (r == 0 && self != NULL)
		r = buf_addf(b,
		             "# HELP troupe_degradation_tier The highest "
		             "degradation tier any service reports (0: none; "
		             "1-3: L1-L3, docs/tiers.md).\n"
		             "# TYPE troupe_degradation_tier gauge\n"
		             "troupe_degradation_tier{service=\"%s\"} %d\n",
		             self, tier);
	if (r == 0)
		r = buf_adds(
		        b, "# HELP troupe_telemetry_reports_total Metrics "
		           "reports "
		           "received from the service since telemetry first "
		           "heard "
		           "of it.\n"
		           "# TYPE troupe_telemetry_reports_total counter\n");
	for (i = 0; r == 0 && i < st->npeers; i++)
		r = buf_addf(b,
		             "troupe_telemetry_reports_total{service=\"%s\"} "
		             "%llu\n",
		             st->peers[i].name,
		             (unsigned long long)st->peers[i].reports);
	if (r == 0)
		r = buf_adds(
		        b, "# HELP troupe_service_report_age_seconds Seconds "
		           "since "
		           "the service's latest metrics report.\n"
		           "# TYPE troupe_service_report_age_seconds gauge\n");
	for (i = 0; r == 0 && i < st->npeers; i++) {
		const struct telemetry_peer *p = &st->peers[i];
		uint64_t age = now_ms > p->last_ms ? now_ms - p->last_ms : 0;

		r = buf_addf(
		        b,
		        "troupe_service_report_age_seconds{service=\"%s\"} "
		        "%llu.%03llu\n",
		        p->name, (unsigned long long)(age / 1000),
		        (unsigned long long)(age % 1000));
	}
	if (r == 0)
		r = buf_addf(
		        b,
		        "# HELP troupe_telemetry_reports_refused_total "
		        "Reports "
		        "refused: bad service name, too long, or too many "
		        "services.\n"
		        "# TYPE troupe_telemetry_reports_refused_total "
		        "counter\n"
		        "troupe_telemetry_reports_refused_total %llu\n"
		        "# HELP troupe_telemetry_dropped_lines Invalid or "
		        "conflicting lines dropped while building the "
		        "previous "
		        "page.\n"
		        "# TYPE troupe_telemetry_dropped_lines gauge\n"
		        "troupe_telemetry_dropped_lines %llu\n"
		        "# HELP troupe_telemetry_scrapes_total Pages of "
		        "/metrics served.\n"
		        "# TYPE troupe_telemetry_scrapes_total counter\n"
		        "troupe_telemetry_scrapes_total %llu\n",
		        (unsigned long long)st->refused,
		        (unsigned long long)st->dropped,
		        (unsigned long long)st->scrapes);
	return (r);
}

int
telemetry_store_render(struct telemetry_store *st, const char *own,
                       size_t ownlen, const char *self, uint64_t now_ms,
                       struct buf *out)
{
	struct tm_source *src;
	struct buf mine = {0};
	size_t i, n = 0;
	int rc = -1;

	if (self == NULL)
		self = "telemetry";
	st->scrapes++;
	if ((src = calloc(st->npeers + 2, sizeof(*src))) == NULL)
		return (-1);
	if (own != NULL && ownlen > 0)
		src[n++] = (struct tm_source){self, own, ownlen};
	if (store_series(st, self, now_ms, &mine) == -1)
		goto out;
	src[n++] = (struct tm_source){self, mine.b, mine.len};
	for (i = 0; i < st->npeers; i++)
		if (store_fresh(st, &st->peers[i], now_ms))
			src[n++] = (struct tm_source){st->peers[i].name,
			                              st->peers[i].text,
			                              st->peers[i].len};
	rc = telemetry_merge(src, n, out, &st->dropped);
out:
	buf_free(&mine);
	free(src);
	return (rc);
}
