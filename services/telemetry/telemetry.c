/* SPDX-License-Identifier: ISC */
/*
 * troupe-telemetry: every process's metrics on one page.  Each process
 * sends METRICS{service, text} once a second (proto/svc.c); this one keeps
 * the latest text per service (telemetry_store.c), and GET /metrics on
 * [telemetry] listen merges them with its own series into one valid
 * Prometheus exposition (telemetry_merge.c, telemetry_http.c).  It is
 * also the only process that loads the eBPF scheduler probes
 * (telemetry_ebpf.c; never fatal) and serves their heatmaps (/heatmap,
 * /api/heatmap: telemetry_heat.c).
 *
 * main() hands the setup to svc (config, log, loop, mailbox), reads
 * [telemetry], sweeps the store once a second and runs h2o's loop with
 * ours nested inside.  A message from an unknown kind of sender, of an
 * unknown type or along a forbidden route is counted and dropped, never
 * fatal (a rolling upgrade may bring builds we do not know).
 *
 * It must never answer anyone: METRICS is one-way, and a telemetry that
 * is slow or down costs the others nothing (they stop sending when their
 * backlog to it grows).
 *
 * DIAGNOSTICS: a bad [telemetry] value or a listen failure is fatal (exit
 * 1, systemd restarts us); dropped messages are logged the first time and
 * every 1000th; everything else is counted on the page.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "proto.h"
#include "svc.h"
#include "telemetry.h"
#include "telemetry_otlp.h"
#include "telemetry_sla.h"

#define TELEMETRY_SWEEP_MS 1000

struct telemetry_conf {
	char listen[128];
	int64_t stale_after_s, forget_after_s, max_report_bytes;
	int64_t heatmap_window_s;
	struct telemetry_ebpf_conf ebpf;
};

static struct svc tsvc;
static struct telemetry tel;
static struct telemetry_conf tconf;
static struct loop_timer *sweep_timer;
static uint64_t sink;

static void
telemetry_on_msg(void *arg, const struct msg *m)
{
	struct telemetry *t = arg;
	enum proc kind = proc_of(m->sender);

	if (msg_name(m->type) == NULL) {
		svc_note_drop(t->drop_unknown, m, "unknown type");
		return;
	}
	if (!msg_route_ok(m->type, kind, PROC_TELEMETRY)) {
		svc_note_drop(t->drop_route, m, "route not allowed");
		return;
	}
	switch (telemetry_dispatch_any(t, m)) {
	case DISPATCH_OK:
		break;
	case DISPATCH_BAD:
		svc_note_drop(t->drop_bad, m, "undecodable body");
		break;
	default:
		svc_note_drop(t->drop_unknown, m, "unhandled type");
		break;
	}
}

static int
telemetry_conf_load(struct telemetry_conf *c, char *err, size_t errlen)
{
	const char *l;

	memset(c, 0, sizeof(*c));
	l = conf_get("telemetry", "listen", "127.0.0.1:9464");
	if (strlen(l) >= sizeof(c->listen)) {
		snprintf(err, errlen, "[telemetry] listen: too long");
		return (-1);
	}
	strcpy(c->listen, l);
	if (conf_get_int("telemetry", "stale_after_s", 30, 2, 86400,
	                 &c->stale_after_s, err, errlen) == -1 ||
	    conf_get_int("telemetry", "forget_after_s", 600, 2, 30 * 86400,
	                 &c->forget_after_s, err, errlen) == -1 ||
	    conf_get_int("telemetry", "max_report_bytes", 1 << 20, 1024,
	                 64 << 20, &c->max_report_bytes, err, errlen) == -1)
		return (-1);
	if (conf_get_int("telemetry", "heatmap_window_s", 600, 10, 86400,
	                 &c->heatmap_window_s, err, errlen) == -1)
		return (-1);
	l = conf_get("telemetry", "ebpf", "on");
	if (strcmp(l, "on") == 0 || strcmp(l, "1") == 0 ||
	    strcmp(l, "yes") == 0 || strcmp(l, "true") == 0)
		c->ebpf.enabled = 1;
	else if (strcmp(l, "off") != 0 && strcmp(l, "0") != 0 &&
	         strcmp(l, "no") != 0 && strcmp(l, "false") != 0) {
		snprintf(err, errlen,
		         "[telemetry] ebpf: want on or off, got "
		         "\"%s\"",
		         l);
		return (-1);
	}
	l = conf_get("telemetry", "ebpf_pin_dir", "/sys/fs/bpf/troupe");
	if (strlen(l) >= sizeof(c->ebpf.pin_dir) ||
	    (l[0] != '\0' && l[0] != '/')) {
		snprintf(err, errlen,
		         "[telemetry] ebpf_pin_dir: want an "
		         "absolute path or nothing");
		return (-1);
	}
	strcpy(c->ebpf.pin_dir, l);
	l = conf_get("telemetry", "ebpf_cgroup_root", "");
	if (strlen(l) >= sizeof(c->ebpf.cgroup_root) ||
	    (l[0] != '\0' && l[0] != '/')) {
		snprintf(err, errlen,
		         "[telemetry] ebpf_cgroup_root: want an "
		         "absolute path or nothing");
		return (-1);
	}
	strcpy(c->ebpf.cgroup_root, l);
	if (c->forget_after_s < c->stale_after_s) {
		snprintf(err, errlen,
		         "[telemetry] forget_after_s (%lld) is below "
		         "stale_after_s "
		         "(%lld)",
		         (long long)c->forget_after_s,
		         (long long)c->stale_after_s);
		return (-1);
	}
	return (0);
}

static void
telemetry_conf_apply(const struct telemetry_conf *c)
{
	tel.store.stale_ms = (uint64_t)c->stale_after_s * 1000;
	tel.store.forget_ms = (uint64_t)c->forget_after_s * 1000;
	tel.store.max_text = (size_t)c->max_report_bytes;
}

static int
telemetry_on_reload(struct svc *svc, void *arg)
{
	struct telemetry_conf c;
	char err[256];

	(void)svc;
	(void)arg;
	if (telemetry_conf_load(&c, err, sizeof(err)) == -1 ||
	    telemetry_sla_conf(err, sizeof(err)) == -1) {
		log_warnx("%s: %s", __func__, err);
		return (-1);
	}
	if (strcmp(c.listen, tconf.listen) != 0)
		log_warnx("%s: [telemetry] listen changes only on restart",
		          __func__);
	if (memcmp(&c.ebpf, &tconf.ebpf, sizeof(c.ebpf)) != 0 ||
	    c.heatmap_window_s != tconf.heatmap_window_s)
		log_warnx("%s: [telemetry] ebpf* and heatmap_window_s change "
		          "only on restart",
		          __func__);
	c.ebpf = tconf.ebpf;
	c.heatmap_window_s = tconf.heatmap_window_s;
	telemetry_conf_apply(&c);
	memcpy(c.listen, tconf.listen, sizeof(c.listen));
	tconf = c;
	return (0);
}

static void
telemetry_sweep(struct loop *l, void *arg)
{
	struct telemetry *t = arg;
	size_t i, up = 0;

	(void)l;
	telemetry_store_sweep(&t->store, now_mono_ms());
	telemetry_ebpf_tick(t);
	telemetry_sla_tick(t);
	for (i = 0; i < t->store.npeers; i++)
		up += t->store.peers[i].text != NULL;
	svc_status(t->svc,
	           "serving /metrics on %s; %zu of %zu services "
	           "reporting",
	           telemetry_http_where(t), up, t->store.npeers);
	loop_timer_set(sweep_timer, TELEMETRY_SWEEP_MS);
}

/* This process's CPU time and resident memory, as Prometheus's client
 * libraries name them. */
static int
telemetry_process(struct buf *b)
{
	struct rusage ru;
	unsigned long long size = 0, rss = 0;
	FILE *f;
	double cpu;

	if (getrusage(RUSAGE_SELF, &ru) == -1)
		return (0);
	cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
	      ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) /
	              1e6;
	if (buf_addf(b,
	             "# HELP process_cpu_seconds_total Total user and system "
	             "CPU "
	             "time spent in seconds.\n"
	             "# TYPE process_cpu_seconds_total counter\n"
	             "process_cpu_seconds_total %.6f\n",
	             cpu) == -1)
		return (-1);
	if ((f = fopen("/proc/self/statm", "r")) == NULL)
		return (0);
	if (fscanf(f, "%llu %llu", &size, &rss) == 2 &&
	    buf_addf(b,
	             "# HELP process_resident_memory_bytes Resident memory "
	             "size "
	             "in bytes.\n"
	             "# TYPE process_resident_memory_bytes gauge\n"
	             "process_resident_memory_bytes %llu\n",
	             rss * (unsigned long long)sysconf(_SC_PAGESIZE)) == -1) {
		fclose(f);
		return (-1);
	}
	fclose(f);
	return (0);
}

int
telemetry_page(struct telemetry *t, struct buf *out)
{
	struct buf own = {0};
	int rc = -1;

	if (metrics_render(t->svc->metrics, &own) == -1 ||
	    telemetry_process(&own) == -1 ||
	    heat_prom(&t->heat, t->ebpf != NULL, &own) == -1)
		goto out;
	rc = telemetry_store_render(&t->store, own.b, own.len, t->svc->name,
	                            now_mono_ms(), out);
out:
	buf_free(&own);
	return (rc);
}

static uint64_t *
telemetry_counter(const char *family, const char *help, const char *fmt,
                  const char *arg)
{
	char lb[160];
	uint64_t *c;

	snprintf(lb, sizeof(lb), fmt, tsvc.name, arg);
	if ((c = metrics_counter(tsvc.metrics, family, help, lb)) == NULL)
		return (&sink);
	return (c);
}

static const struct svc_def telemetry_def = {
        .kind = "telemetry",
        .summary = "troupe-telemetry: every process's metrics on one page "
                   "(GET /metrics)",
        .help_extra =
                "[telemetry] keys:\n"
                "  listen            host:port of GET /metrics "
                "(127.0.0.1:9464)\n"
                "  stale_after_s     a service silent this long is down and "
                "its\n"
                "                    series leave the page (30)\n"
                "  forget_after_s    ... and this long, forgotten (600)\n"
                "  max_report_bytes  longest METRICS text taken (1048576)\n"
                "  ebpf              on|off: the scheduler probes (on)\n"
                "  ebpf_pin_dir      where the maps are pinned "
                "(/sys/fs/bpf/troupe)\n"
                "  ebpf_cgroup_root  cgroup dir of the troupe-*.service "
                "units (auto)\n"
                "  heatmap_window_s  seconds of heatmap kept (600)\n"
                "  sla_window_ms     SLA window of the run-queue p99 "
                "(5000)\n"
                "  sla_runq_p99_us   SLA threshold of that p99 (20000)\n",
        .on_msg = telemetry_on_msg,
        .on_reload = telemetry_on_reload,
        .on_stop = NULL,
        .on_metrics = NULL,
        .arg = &tel,
};

int
main(int argc, char **argv)
{
	static const char *const statuses[] = {"200", "404", "405", "other"};
	char err[256];
	size_t i;
	int rc;

	svc_init(&tsvc, &telemetry_def, argc, argv);
	if (tsvc.argc > 0)
		fatalx("unexpected argument \"%s\" (see --help)",
		       tsvc.argv[0]);
	if (telemetry_conf_load(&tconf, err, sizeof(err)) == -1 ||
	    telemetry_sla_conf(err, sizeof(err)) == -1)
		fatalx("config: %s", err);
	tel.svc = &tsvc;
	telemetry_store_init(&tel.store, 0, 0, 0);
	telemetry_conf_apply(&tconf);
	if (heat_init(&tel.heat, (size_t)tconf.heatmap_window_s) == -1)
		fatalx("out of memory");

	tel.drop_unknown =
	        telemetry_counter("troupe_telemetry_dropped_messages_total",
	                          "Messages telemetry dropped, by reason",
	                          "service=\"%s\",reason=\"%s\"", "unknown");
	tel.drop_bad =
	        telemetry_counter("troupe_telemetry_dropped_messages_total",
	                          "Messages telemetry dropped, by reason",
	                          "service=\"%s\",reason=\"%s\"", "bad");
	tel.drop_route =
	        telemetry_counter("troupe_telemetry_dropped_messages_total",
	                          "Messages telemetry dropped, by reason",
	                          "service=\"%s\",reason=\"%s\"", "route");
	for (i = 0; i < nitems(statuses); i++)
		tel.http_requests[i] = telemetry_counter(
		        "troupe_telemetry_http_requests_total",
		        "HTTP requests telemetry answered, by status",
		        "service=\"%s\",status=\"%s\"", statuses[i]);

	telemetry_sla_init(&tel);
	if (telemetry_otlp_init(tsvc.loop, tsvc.metrics, tsvc.name, err,
	                        sizeof(err)) == -1)
		fatalx("config: %s", err);
	if ((sweep_timer = loop_timer_new(tsvc.loop, telemetry_sweep, &tel)) ==
	    NULL)
		fatalx("out of memory");
	loop_timer_set(sweep_timer, TELEMETRY_SWEEP_MS);
	if (telemetry_http_init(&tel, tconf.listen, err, sizeof(err)) == -1)
		fatalx("%s", err);
	telemetry_ebpf_start(&tel, &tconf.ebpf);
	svc_ready(&tsvc, "serving /metrics");
	log_info("serving /metrics on %s", telemetry_http_where(&tel));
	telemetry_http_run(&tel);
	telemetry_http_stop(&tel);
	telemetry_ebpf_stop(&tel);
	telemetry_otlp_stop();
	loop_timer_free(sweep_timer);
	rc = svc_exit(&tsvc);
	telemetry_store_free(&tel.store);
	heat_free(&tel.heat);
	return (rc);
}
