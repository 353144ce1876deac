/* SPDX-License-Identifier: ISC */
/*
 * troupe-dispatcher: keeps troupe-worker children (forks, execs, reaps,
 * restarts them with back-off) and assigns each chat run that auth sends
 * to the child with the fewest runs in flight.  When a child dies under
 * its runs, their edges get 502 at once.  See docs/services/dispatcher.md.
 *
 * This file: main(), the [dispatcher] config, the peer table that routes
 * every envelope to one dispatch function per peer (relayd's procs[]),
 * the metrics, the periodic tick and the stop.  It hands the process to
 * the svc skeleton as Postfix daemons hand theirs to multi_server_main().
 *
 * DIAGNOSTICS: a bad config or worker_path is fatal at start and refused
 * (old values kept) on reload.  Envelopes from an unexpected peer, with a
 * body that does not decode, or of a type not handled are counted and
 * logged at doubling counts, never fatal.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"
#include "dispatcher_tier.h"
#include "trace.h"

#define SECTION "dispatcher"

struct dispatcher_peer {
	enum proc kind;
	int (*dispatch)(struct dispatcher *, const struct msg *);
};

static const struct dispatcher_peer peers[] = {
        {PROC_AUTH, dispatcher_dispatch_auth},
        {PROC_WORKER, dispatcher_dispatch_worker},
        {PROC_EDGE, dispatcher_dispatch_edge},
        {PROC_STORAGE, dispatcher_dispatch_storage},
        {PROC_TELEMETRY, dispatcher_dispatch_telemetry},
        {PROC_TOOL, dispatcher_dispatch_tool},
};

static const char help_extra[] =
        "[dispatcher] keys (env TROUPE_DISPATCHER_<KEY>):\n"
        "  workers_min      children kept at least (default 2)\n"
        "  workers_max      children at most (default 50, at most 256)\n"
        "  runs_per_worker  runs in flight per child (default 256)\n"
        "  queue_max        runs waiting for a child (default 10000)\n"
        "  worker_path      the worker program (default: troupe-worker\n"
        "                   beside this program)\n"
        "  policy           rate limits: fixed or aimd (default aimd)\n"
        "  limit_quiet_ms   fixed: doubles after this without signals\n"
        "                   (5000)\n"
        "  aimd_decrease_pct   aimd: cut to this % on a throttle (70)\n"
        "  aimd_latency_pct    aimd: x0.9 over this % of the min RTT\n"
        "                   (200)\n"
        "  aimd_latency_floor_ms aimd: ... and this many ms over it (50)\n"
        "  aimd_limit_min   aimd: lowest in-flight limit of a bot (1)\n"
        "  throttle_retries requeues of a throttled run (1)\n"
        "  queue_slack_ms   a queued run is refused (503) this long\n"
        "                   before its deadline (500)\n"
        "  tier_enter_ms    a tier's condition must hold this long (2000)\n"
        "  tier_leave_ms    ... and be clear this long to leave (10000)\n"
        "  tier_queue_low_pct  L1 when the run queue is over this % of\n"
        "                   queue_max (10)\n"
        "  tier_queue_high_pct L3 over this % (50)\n"
        "  tier_dep_latency_ms L1 when storage's commit p99 is over it\n"
        "                   (1000)\n"
        "  tier_health_stale_ms storage HEALTH older than this is\n"
        "                   ignored (10000)\n"
        "Tiers: docs/tiers.md.\n";

static struct dispatcher dispatcher;
static struct svc svc;
static struct loop_timer *tick;
static uint64_t sink; /* counters that could not be registered */

static void dispatcher_on_msg(void *, const struct msg *);
static int dispatcher_on_reload(struct svc *, void *);
static void dispatcher_on_stop(struct svc *, void *);

static const struct svc_def def = {
        .kind = "dispatcher",
        .summary = "Keeps troupe-worker children and assigns chat runs to "
                   "them.",
        .help_extra = help_extra,
        .on_msg = dispatcher_on_msg,
        .on_reload = dispatcher_on_reload,
        .on_stop = dispatcher_on_stop,
        .on_metrics = NULL,
        .arg = &dispatcher,
};

/* Log the first, second, fourth, ... of a kind of trouble. */
static int
dispatcher_count(uint64_t *c)
{
	uint64_t n = ++*c;

	return ((n & (n - 1)) == 0);
}

static void
dispatcher_on_msg(void *arg, const struct msg *m)
{
	struct dispatcher *d = arg;
	const struct dispatcher_peer *p = NULL;
	enum proc from = proc_of(m->sender);
	const char *name = msg_name(m->type), *what;
	uint64_t *ctr;

	trace_mark();
	for (size_t i = 0; i < nitems(peers); i++)
		if (peers[i].kind == from)
			p = &peers[i];
	if (p == NULL ||
	    (name != NULL && !msg_route_ok(m->type, from, PROC_DISPATCHER))) {
		ctr = d->m_drop_route;
		what = "not routed to the dispatcher";
	} else {
		switch (p->dispatch(d, m)) {
		case DISPATCH_OK:
			return;
		case DISPATCH_BAD:
			ctr = d->m_drop_bad;
			what = "undecodable";
			break;
		default:
			ctr = d->m_drop_unhandled;
			what = "not handled";
			break;
		}
	}
	if (dispatcher_count(ctr))
		log_warnx("%s: %s 0x%04x from %.*s: %s, dropped (%llu so far)",
		          __func__, name ? name : "message", m->type,
		          (int)m->sender.n, m->sender.p, what,
		          (unsigned long long)*ctr);
}

/*
 * Read [dispatcher]; apply nothing unless every key is good.  0, or -1
 * with err filled.
 */
static int
dispatcher_conf(struct dispatcher *d, char *err, size_t errlen)
{
	int64_t min, max, per, qmax;
	char path[sizeof(d->d_worker_path)];
	const char *p;

	if (conf_get_int(SECTION, "workers_min", 2, 0, DISPATCHER_SLOTS_MAX,
	                 &min, err, errlen) == -1 ||
	    conf_get_int(SECTION, "workers_max", 50, 1, DISPATCHER_SLOTS_MAX,
	                 &max, err, errlen) == -1 ||
	    conf_get_int(SECTION, "runs_per_worker", 256, 1, 1000000, &per,
	                 err, errlen) == -1 ||
	    conf_get_int(SECTION, "queue_max", 10000, 0, 10000000, &qmax, err,
	                 errlen) == -1)
		return (-1);
	if (max < min) {
		snprintf(err, errlen,
		         "[dispatcher] workers_max %lld is below workers_min "
		         "%lld",
		         (long long)max, (long long)min);
		return (-1);
	}
	p = conf_get(SECTION, "worker_path", "");
	if (*p != '\0') {
		if (strlen(p) >= sizeof(path)) {
			snprintf(err, errlen,
			         "[dispatcher] worker_path: too "
			         "long");
			return (-1);
		}
		snprintf(path, sizeof(path), "%s", p);
	} else if (dispatcher_spawn_default_path(path, sizeof(path)) == -1) {
		snprintf(err, errlen, "default worker_path: %s",
		         strerror(errno));
		return (-1);
	}
	if (access(path, X_OK) == -1) {
		snprintf(err, errlen, "[dispatcher] worker_path %.400s: %s",
		         path, strerror(errno));
		return (-1);
	}
	d->d_min = (int)min;
	d->d_max = (int)max;
	d->d_per_child = (uint32_t)per;
	d->d_queue_max = (size_t)qmax;
	memcpy(d->d_worker_path, path, sizeof(path));
	return (0);
}

static uint64_t *
dispatcher_counter(struct dispatcher *d, const char *family, const char *help,
                   const char *reason)
{
	char lb[128];
	uint64_t *c;

	if (reason != NULL)
		snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"%s\"",
		         d->d_svc->name, reason);
	else
		snprintf(lb, sizeof(lb), "service=\"%s\"", d->d_svc->name);
	if ((c = metrics_counter(d->d_svc->metrics, family, help, lb)) == NULL)
		c = &sink;
	return (c);
}

static double *
dispatcher_gauge(struct dispatcher *d, const char *family, const char *help)
{
	char lb[128];

	snprintf(lb, sizeof(lb), "service=\"%s\"", d->d_svc->name);
	return (metrics_gauge(d->d_svc->metrics, family, help, lb));
}

static void
dispatcher_metrics(struct dispatcher *d)
{
	static const char exits[] = "troupe_worker_exits_total";
	static const char exits_h[] = "Worker children that exited, by reason";
	static const char rej[] = "troupe_dispatch_rejected_total";
	static const char rej_h[] =
	        "Runs the dispatcher answered with an error itself, by reason";
	static const char drop[] = "troupe_dispatcher_dropped_messages_total";
	static const char drop_h[] = "Messages the dispatcher dropped, by "
	                             "reason";
	static const char can[] = "troupe_dispatch_cancels_total";
	static const char can_h[] =
	        "Chat cancels, by where they went: worker (RUN_CANCEL), "
	        "storage (no worker runs the chat), refused (503)";
	static const char gone[] = "troupe_dispatch_client_gone_total";
	static const char gone_h[] =
	        "Clients gone before their answer ended, by what was done";
	static const char sc[] = "troupe_worker_scale_changes_total";
	static const char sc_h[] =
	        "Changes of the worker target, by direction";

	d->m_children = dispatcher_gauge(d, "troupe_worker_children",
	                                 "Worker child processes alive");
	d->m_ready = dispatcher_gauge(
	        d, "troupe_worker_ready",
	        "Worker children that said hello and take runs");
	d->m_target = dispatcher_gauge(d, "troupe_worker_target",
	                               "Worker children wanted");
	d->m_inflight = dispatcher_gauge(
	        d, "troupe_runs_in_flight",
	        "Runs assigned to a worker child and not done");
	d->m_queue =
	        dispatcher_gauge(d, "troupe_dispatch_queue_depth",
	                         "Runs waiting for room in a worker child");
	d->m_restarts = dispatcher_counter(
	        d, "troupe_worker_restarts_total",
	        "Worker children restarted after an unrequested exit", NULL);
	d->m_exit_clean = dispatcher_counter(d, exits, exits_h, "clean");
	d->m_exit_error = dispatcher_counter(d, exits, exits_h, "error");
	d->m_exit_signal = dispatcher_counter(d, exits, exits_h, "signal");
	d->m_exit_exec = dispatcher_counter(d, exits, exits_h, "exec_failed");
	d->m_exit_hello =
	        dispatcher_counter(d, exits, exits_h, "hello_timeout");
	d->m_exit_retired = dispatcher_counter(d, exits, exits_h, "retired");
	d->m_exit_killed = dispatcher_counter(d, exits, exits_h, "killed");
	d->m_rej_overload = dispatcher_counter(d, rej, rej_h, "overloaded");
	d->m_rej_deadline = dispatcher_counter(d, rej, rej_h, "deadline");
	d->m_rej_stopping = dispatcher_counter(d, rej, rej_h, "stopping");
	d->m_rej_exited = dispatcher_counter(d, rej, rej_h, "worker_exited");
	d->m_rej_limit = dispatcher_counter(d, rej, rej_h, "rate_limited");
	d->m_requeued = dispatcher_counter(
	        d, "troupe_dispatcher_requeued_total",
	        "Throttled runs a worker handed back to wait again", NULL);
	d->m_drop_bad = dispatcher_counter(d, drop, drop_h, "bad");
	d->m_drop_unhandled = dispatcher_counter(d, drop, drop_h, "unknown");
	d->m_drop_route = dispatcher_counter(d, drop, drop_h, "route");
	d->m_drop_stale = dispatcher_counter(d, drop, drop_h, "stale_run");
	d->m_assigned =
	        dispatcher_counter(d, "troupe_runs_assigned_total",
	                           "Runs sent to a worker child", NULL);
	d->m_done =
	        dispatcher_counter(d, "troupe_runs_done_total",
	                           "Runs a worker child reported done", NULL);
	d->m_cancel_worker = dispatcher_counter(d, can, can_h, "worker");
	d->m_cancel_storage = dispatcher_counter(d, can, can_h, "storage");
	d->m_cancel_refused = dispatcher_counter(d, can, can_h, "refused");
	d->m_gone_cancel = dispatcher_counter(d, gone, gone_h, "canceled");
	d->m_gone_dropped = dispatcher_counter(d, gone, gone_h, "dropped");
	d->m_gone_unknown = dispatcher_counter(d, gone, gone_h, "unknown");
	d->m_grow = dispatcher_counter(d, sc, sc_h, "grow");
	d->m_shrink = dispatcher_counter(d, sc, sc_h, "shrink");
}

static void
dispatcher_tick(struct loop *l, void *arg)
{
	struct dispatcher *d = arg;

	(void)l;
	loop_timer_set(tick, DISPATCHER_TICK_MS);
	/* signalfd merges SIGCHLDs; waitpid() here costs one syscall and
	 * leaves no zombie waiting should a signal ever be missed. */
	dispatcher_spawn_reap(d);
	dispatcher_run_expire(d);
	dispatcher_admit_tick(d);
	if (d->d_runs.rt_qlen > 0)
		dispatcher_run_drain(d); /* a blocked child may take runs */
	dispatcher_scale_tick(d);
	dispatcher_scale_status(d, 0);
	dispatcher_tier_tick(d);
}

static int
dispatcher_on_reload(struct svc *s, void *arg)
{
	struct dispatcher *d = arg;
	char err[512];

	(void)s;
	if (dispatcher_conf(d, err, sizeof(err)) == -1 ||
	    dispatcher_admit_init(d, err, sizeof(err)) == -1 ||
	    dispatcher_tier_init(d, err, sizeof(err)) == -1) {
		log_warnx("reload: %s", err);
		return (-1);
	}
	log_info("reload: workers %d..%d, %u runs each, queue %zu, %s",
	         d->d_min, d->d_max, d->d_per_child, d->d_queue_max,
	         d->d_worker_path);
	(void)dispatcher_scale_set(d, d->d_target, "config reload");
	dispatcher_run_drain(d);
	return (0);
}

static void
dispatcher_on_stop(struct svc *s, void *arg)
{
	struct dispatcher *d = arg;

	(void)s;
	log_info("stopping: %d workers, %llu runs in flight, %zu queued",
	         d->d_live, (unsigned long long)d->d_inflight,
	         d->d_runs.rt_qlen);
	dispatcher_run_flush_queue(d);
	d->d_stopping = 1;
	dispatcher_spawn_stop(d);
}

int
main(int argc, char **argv)
{
	struct dispatcher *d = &dispatcher;
	char err[512];
	int rc;

	svc_init(&svc, &def, argc, argv);
	(void)TRACE_INIT(&svc);
	if (svc.argc > 0)
		fatalx("unexpected argument: %s", svc.argv[0]);
	d->d_svc = &svc;
	d->d_loop = svc.loop;
	if (dispatcher_conf(d, err, sizeof(err)) == -1)
		fatalx("config: %s", err);
	dispatcher_metrics(d);
	if (dispatcher_tier_init(d, err, sizeof(err)) == -1)
		fatalx("config: %s", err);
	if (dispatcher_admit_init(d, err, sizeof(err)) == -1)
		fatalx("config: %s", err);
	if (dispatcher_run_init(&d->d_runs) == -1)
		fatal("run table");
	if (dispatcher_spawn_init(d) == -1)
		fatal("worker slots");
	if ((tick = loop_timer_new(d->d_loop, dispatcher_tick, d)) == NULL)
		fatal("tick");
	loop_timer_set(tick, DISPATCHER_TICK_MS);

	log_info("workers %d..%d, %u runs each, queue %zu, %s", d->d_min,
	         d->d_max, d->d_per_child, d->d_queue_max, d->d_worker_path);
	(void)dispatcher_scale_set(d, d->d_min, "start");
	snprintf(err, sizeof(err), "%d workers", d->d_target);
	svc_ready(&svc, err);

	rc = svc_run(&svc);
	dispatcher_run_free(&d->d_runs);
	dispatcher_admit_free(d);
	free(d->d_envp);
	return (rc);
}
