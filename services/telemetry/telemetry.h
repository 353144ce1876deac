/* SPDX-License-Identifier: ISC */
/*
 * telemetry.h: what the files of troupe-telemetry share.  telemetry.c
 * (main, config), telemetry_dispatch.c (METRICS in), telemetry_store.c
 * (the latest report of every service, staleness, the page), and
 * telemetry_merge.c (many Prometheus texts into one), telemetry_http.c
 * (GET /metrics, /heatmap, /api/heatmap on h2o's loop), telemetry_heat.c
 * (the ring of per-second scheduler histograms, its JSON and Prometheus
 * text; pure) and telemetry_ebpf.c (the eBPF probes: load, pin, register
 * Troupe's processes, read every second).  Nothing here is used outside
 * the service.
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

/*
 * Scheduler histograms (telemetry_heat.c).  A bucket ("slot") is a log2
 * range of microseconds: slot 0 is [0, 2) us, slot k >= 1 is [2^k,
 * 2^(k+1)) us, the last one also takes everything longer; the same slots
 * as ebpf/troupe_sched.h and libbpf-tools' runqlat.
 */
#define HEAT_SLOTS 27
#define HEAT_SERVICES 64 /* ids 1..63; 0 is "not a Troupe thread" */

enum heat_kind { HEAT_RUNQ, HEAT_OFFCPU, HEAT_NKINDS };

/* One service: a ring of per-second counts and cumulative totals. */
struct heat_service {
	char name[TELEMETRY_NAME_MAX + 1];
	uint32_t *counts; /* [cap][HEAT_NKINDS][HEAT_SLOTS] */
	uint64_t total[HEAT_NKINDS][HEAT_SLOTS];
	uint64_t count[HEAT_NKINDS];
	uint64_t sum_ns[HEAT_NKINDS];
};

/* Every service's last cap seconds, indexed by unix second % cap. */
struct heat {
	size_t cap;    /* seconds kept */
	int64_t *secs; /* the second each ring position holds, or -1 */
	int64_t last;  /* the latest second, or -1 */
	struct heat_service *svc[HEAT_SERVICES]; /* by id */
};

/* Keep seconds seconds (1..86400); 0, or -1 on ENOMEM. */
int heat_init(struct heat *, size_t seconds);
void heat_free(struct heat *);
/* The id (1..HEAT_SERVICES-1) of name, added if new; -1 if full or on
 * ENOMEM. */
int heat_id(struct heat *, const char *name);
/* The id of name (len bytes), or -1 if unknown. */
int heat_find(const struct heat *, const char *name, size_t len);
/* Make sec the latest second (older ones within the window stay; newer
 * positions start at zero); a sec before the latest does nothing. */
void heat_advance(struct heat *, int64_t sec);
/* Add one second's counts of a kind for service id at second sec (which
 * becomes the latest if newer); -1 if id is unknown or sec is out of the
 * window (the cumulative totals take the counts anyway). */
int heat_add(struct heat *, int id, int64_t sec, enum heat_kind,
             const uint64_t counts[HEAT_SLOTS], uint64_t sum_ns);
/* {"enabled":b,"reason":"..","now":T,"window_s":N,"services":[..]} */
int heat_json_list(const struct heat *, int enabled, const char *reason,
                   struct buf *out);
/* {"service":..,"unit":"us","since":S,"now":T,"buckets":[{"lo_us":..,
 * "hi_us":..}...],"seconds":[{"t":T,"runq":[..],"offcpu":[..]}...]}
 * with every second t >= since still in the window, oldest first. */
int heat_json_service(const struct heat *, int id, int64_t since,
                      struct buf *out);
/* troupe_ebpf_enabled and the troupe_runq_latency_seconds and
 * troupe_offcpu_seconds histograms of every service, cumulative. */
int heat_prom(const struct heat *, int enabled, struct buf *out);

/* The eBPF side (telemetry_ebpf.c). */
struct telemetry_ebpf_conf {
	int enabled;           /* [telemetry] ebpf */
	char pin_dir[256];     /* [telemetry] ebpf_pin_dir; "" no pins */
	char cgroup_root[512]; /* [telemetry] ebpf_cgroup_root; "" auto */
};
struct telemetry_ebpf;

/* The service: its svc, its store, its HTTP side. */
struct telemetry {
	struct svc *svc;
	struct telemetry_store store;
	struct telemetry_http *http;
	struct heat heat;            /* scheduler histograms, per second */
	struct telemetry_ebpf *ebpf; /* NULL when the probes are off */
	char ebpf_reason[160];       /* why they are off ("" when on) */
	uint64_t *drop_unknown;      /* counters in svc->metrics */
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

/* Load the probes (never fatal: when BPF is not permitted or not built,
 * log one line, leave t->ebpf NULL and say why in t->ebpf_reason). */
void telemetry_ebpf_start(struct telemetry *,
                          const struct telemetry_ebpf_conf *);
/* Once a second: find Troupe's processes and units, read the maps into
 * t->heat. */
void telemetry_ebpf_tick(struct telemetry *);
/* Detach, unpin, free. */
void telemetry_ebpf_stop(struct telemetry *);

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
