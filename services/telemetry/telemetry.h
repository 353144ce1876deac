/* SPDX-License-Identifier: ISC */
/*
 * telemetry.h: what the files of troupe-telemetry share.  telemetry.c
 * (main, config), telemetry_dispatch.c (METRICS in), telemetry_store.c
 * (the latest report of every service, staleness, the page), and
 * telemetry_merge.c (many Prometheus texts into one), telemetry_http.c
 * (GET /metrics on h2o's loop).  Nothing here is used outside the service.
 */
#ifndef TROUPE_TELEMETRY_H
#define TROUPE_TELEMETRY_H

#include <stddef.h>
#include <stdint.h>

#include "metrics.h"
#include "util.h"

struct svc;
struct msg;

/* Limits on what a report may hold. */
#define TELEMETRY_NAME_MAX 63    /* a service (mailbox) name */
#define TELEMETRY_PEERS_MAX 1024 /* services remembered at once */

/* One text to merge and the service it came from. */
struct tm_source {
	const char *service; /* added as service="..." where missing */
	const char *text;
	size_t len;
};

/*
 * Append to out one exposition of all the sources: every family once, its
 * # HELP and # TYPE first (the first source that declares them wins), then
 * its samples from every source in source order, each given
 * service="<source>" if it has no service label.  Histogram and summary
 * samples (_bucket, _sum, _count) go with their family.  Malformed lines,
 * samples whose family has another type elsewhere and repeated samples
 * are dropped and counted in *dropped.  0, or -1 on ENOMEM.
 */
int telemetry_merge(const struct tm_source *, size_t nsrc, struct buf *out,
                    uint64_t *dropped);

/* A reporting service. */
struct telemetry_peer {
	char name[TELEMETRY_NAME_MAX + 1];
	char *text; /* its latest report; NULL once stale */
	size_t len;
	uint64_t last_ms; /* monotonic ms of the latest report */
	uint64_t reports; /* reports taken since first seen */
};

/* The latest report of every service, sorted by name. */
struct telemetry_store {
	struct telemetry_peer *peers;
	size_t npeers, cap;
	uint64_t stale_ms;  /* no report for this long: down, text dropped */
	uint64_t forget_ms; /* no report for this long: forgotten */
	size_t max_text;    /* longest report taken */
	uint64_t refused;   /* reports refused (bad name, size, full) */
	uint64_t dropped;   /* lines dropped by the latest merge */
	uint64_t scrapes;   /* pages rendered */
};

void telemetry_store_init(struct telemetry_store *, uint64_t stale_ms,
                          uint64_t forget_ms, size_t max_text);
void telemetry_store_free(struct telemetry_store *);
/* Keep text as service's latest report; -1 if refused (counted). */
int telemetry_store_report(struct telemetry_store *, struct mstr service,
                           struct mstr text, uint64_t now_ms);
/* Drop the texts of stale services and forget the long-gone ones. */
void telemetry_store_sweep(struct telemetry_store *, uint64_t now_ms);
/* Append the whole page: own (this process's text, from self), then
 * telemetry's series about the services (up, reports, report age), then
 * every fresh report, merged (telemetry_merge).  0, or -1 on ENOMEM. */
int telemetry_store_render(struct telemetry_store *, const char *own,
                           size_t ownlen, const char *self, uint64_t now_ms,
                           struct buf *out);

/* The service: its svc, its store, its HTTP side. */
struct telemetry {
	struct svc *svc;
	struct telemetry_store store;
	struct telemetry_http *http;
	uint64_t *drop_unknown; /* counters in svc->metrics */
	uint64_t *drop_bad;
	uint64_t *drop_route;
	uint64_t *http_requests[4]; /* 200, 404, 405, other */
};

/* What a dispatch function made of an envelope. */
enum { DISPATCH_OK, DISPATCH_BAD, DISPATCH_UNHANDLED };

/* Every kind of process may send METRICS: one dispatch for them all. */
int telemetry_dispatch_any(struct telemetry *, const struct msg *);
/* The page for GET /metrics, appended to out.  0 or -1. */
int telemetry_page(struct telemetry *, struct buf *out);

/* Listen on addr ("127.0.0.1:9464", "[::1]:9464"); -1 and err. */
int telemetry_http_init(struct telemetry *, const char *addr, char *err,
                        size_t errlen);
/* "127.0.0.1:9464": where it listens, for logs and STATUS=. */
const char *telemetry_http_where(const struct telemetry *);
/* Run h2o's loop with svc's inside until the service stops. */
void telemetry_http_run(struct telemetry *);
/* Stop accepting (the process is about to exit). */
void telemetry_http_stop(struct telemetry *);

#endif
