/* SPDX-License-Identifier: ISC */
/*
 * troupe-worker: a child of troupe-dispatcher (started as
 * `troupe-worker -c <config> -n worker-<slot>`) that runs many chats at
 * once on one loop: context from storage, the bot's LLM upstream over
 * HTTP (libcurl multi), the finished turn back to storage.
 *
 * This file is the process: configuration ([worker] keys, see
 * docs/services/worker.md), WORKER_HELLO to the dispatcher, metrics, and
 * the stop.  On SIGTERM the worker refuses new runs (503), lets those in
 * flight end (each is bounded by its deadline), waits up to two seconds
 * for its peers to acknowledge what it sent, and leaves.  It also leaves
 * when its parent dies (the dispatcher sets PR_SET_PDEATHSIG; a one
 * second getppid() check is the belt).  A bad config at start is fatal;
 * at reload the old one is kept.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "worker.h"
#include "trace.h"

#define WORKER_DRAIN_MS 2000 /* wait for acks of what we sent, at most */
#define WORKER_PPID_MS 1000

static struct worker worker;

static const char help_extra[] =
        "Config keys ([worker], env TROUPE_WORKER_<KEY>):\n"
        "  upstream_connections  connections per upstream host (64)\n"
        "  max_upstream_body     largest upstream answer, bytes (4194304)\n"
        "  connect_timeout_ms    upstream connect timeout, ms (2000)\n"
        "  run_timeout_ms        deadline of a run that has none, ms "
        "(30000)\n"
        "  first_event_ms        v3: first upstream content within, ms; "
        "0 none (15000)\n"
        "  total_ms              v3: whole upstream answer within, ms; "
        "0 none (300000)\n"
        "  plugin_timeout_ms     v3: a plugin call's timeout when the "
        "plugin has none, ms (5000)\n"
        "  max_tool_rounds       v3: tool rounds in one chat (5)\n";

/* Read [worker]; nothing changes unless every key is good. */
static int
worker_conf(struct worker *w, char *err, size_t errlen)
{
	int64_t conns, body, connect_ms, run_ms, first_ms, total_ms;
	int64_t plugin_ms, rounds;

	if (conf_get_int("worker", "upstream_connections", 64, 1, 100000,
	                 &conns, err, errlen) == -1 ||
	    conf_get_int("worker", "max_upstream_body", 4194304, 1024,
	                 1073741824, &body, err, errlen) == -1 ||
	    conf_get_int("worker", "connect_timeout_ms", 2000, 1, 600000,
	                 &connect_ms, err, errlen) == -1 ||
	    conf_get_int("worker", "run_timeout_ms", 30000, 100, 3600000,
	                 &run_ms, err, errlen) == -1 ||
	    conf_get_int("worker", "first_event_ms", 15000, 0, 3600000,
	                 &first_ms, err, errlen) == -1 ||
	    conf_get_int("worker", "total_ms", 300000, 0, 86400000, &total_ms,
	                 err, errlen) == -1 ||
	    conf_get_int("worker", "plugin_timeout_ms", 5000, 1, 600000,
	                 &plugin_ms, err, errlen) == -1 ||
	    conf_get_int("worker", "max_tool_rounds", 5, 1, 20, &rounds, err,
	                 errlen) == -1)
		return (-1);
	w->upconf.connections = (long)conns;
	w->upconf.max_body = (size_t)body;
	w->upconf.connect_timeout_ms = (long)connect_ms;
	w->run_timeout_ms = run_ms;
	w->first_event_ms = first_ms;
	w->total_ms = total_ms;
	w->plugin_timeout_ms = plugin_ms;
	w->max_tool_rounds = (unsigned)rounds;
	return (0);
}

static unsigned
worker_slot(const char *name)
{
	const char *p = strchr(name, '-');
	char *end;
	unsigned long v;

	if (p == NULL || p[1] < '0' || p[1] > '9')
		return (0);
	v = strtoul(p + 1, &end, 10);
	if (*end != '\0' || v > 1000000)
		return (0);
	return ((unsigned)v);
}

int
worker_warn_ok(struct worker *w)
{
	uint64_t now = now_mono_ms();

	if (w->warn_ms != 0 && now - w->warn_ms < 1000)
		return (0);
	w->warn_ms = now;
	return (1);
}

void
worker_note_edge(struct worker *w, const char *edge)
{
	for (size_t i = 0; i < w->nedges; i++)
		if (strcmp(w->edges[i], edge) == 0)
			return;
	if (w->nedges < WORKER_EDGES_MAX)
		(void)snprintf(w->edges[w->nedges++], WORKER_PEER_MAX, "%s",
		               edge);
}

void
worker_count_status(struct worker *w, uint64_t status)
{
	char labels[WORKER_PEER_MAX + 48];
	uint64_t *c;

	for (size_t i = 0; i < w->nm_status; i++)
		if (w->m_status[i].status == status) {
			(*w->m_status[i].count)++;
			return;
		}
	(void)snprintf(labels, sizeof(labels),
	               "service=\"%s\",status=\"%" PRIu64 "\"", w->svc.name,
	               status);
	if ((c = metrics_counter(
	             w->metrics, "troupe_worker_runs_total",
	             "Runs ended, by the HTTP status the client got.",
	             labels)) == NULL)
		return;
	(*c)++;
	if (w->nm_status < nitems(w->m_status)) {
		w->m_status[w->nm_status].status = status;
		w->m_status[w->nm_status++].count = c;
	}
}

/* Free what lives on the loop while the loop does: svc_run() frees it
 * before it returns.  Only when no run is left (a second SIGTERM ends the
 * loop with runs in flight: then the process just exits). */
static void
worker_teardown(struct worker *w)
{
	worker_run_free_all(w);
	worker_upstream_free(w->up); /* closes its connections */
	w->up = NULL;
	loop_timer_free(w->ppid_timer);
	w->ppid_timer = NULL;
	/* A timer may be freed from its own callback (the drain's). */
	loop_timer_free(w->drain_timer);
	w->drain_timer = NULL;
}

/* Stopping and no run left: wait for our peers' acknowledgements (ipc
 * resends what is unacknowledged; leaving at once could lose the last
 * RUN_DONE or CHAT_REPLY), then finish the stop. */
static void
worker_drain(struct loop *l, void *arg)
{
	struct worker *w = arg;
	size_t left;

	(void)l;
	left = ipc_backlog(w->svc.ipc, "dispatcher") +
	       ipc_backlog(w->svc.ipc, "storage");
	for (size_t i = 0; i < w->nedges; i++)
		left += ipc_backlog(w->svc.ipc, w->edges[i]);
	if (left > 0 && now_mono_ms() - w->drain_start_ms < WORKER_DRAIN_MS) {
		loop_timer_set(w->drain_timer, IPC_TICK_MS);
		return;
	}
	if (left > 0)
		log_warnx("stopping with %zu envelopes unacknowledged "
		          "(dispatcher %zu, storage %zu)",
		          left, ipc_backlog(w->svc.ipc, "dispatcher"),
		          ipc_backlog(w->svc.ipc, "storage"));
	else
		log_info("every run ended");
	worker_teardown(w);
	svc_stop_done(&w->svc);
}

void
worker_stop_check(struct worker *w)
{
	if (!w->stopping || w->nruns > 0 || w->drain_start_ms != 0)
		return;
	w->drain_start_ms = now_mono_ms();
	if (w->drain_start_ms == 0)
		w->drain_start_ms = 1;
	loop_timer_set(w->drain_timer, 0);
}

static void
worker_on_stop(struct svc *svc, void *arg)
{
	struct worker *w = arg;

	(void)svc;
	if (w->stopping)
		return;
	w->stopping = 1;
	log_info("stopping: %zu runs in flight", w->nruns);
	worker_stop_check(w);
}

static int
worker_on_reload(struct svc *svc, void *arg)
{
	struct worker *w = arg;
	struct worker next = {0};
	char err[256];

	(void)svc;
	if (worker_conf(&next, err, sizeof(err)) == -1) {
		log_warnx("reload: %s; old [worker] config kept", err);
		return (-1);
	}
	w->upconf = next.upconf;
	w->run_timeout_ms = next.run_timeout_ms;
	w->first_event_ms = next.first_event_ms;
	w->total_ms = next.total_ms;
	w->plugin_timeout_ms = next.plugin_timeout_ms;
	w->max_tool_rounds = next.max_tool_rounds;
	worker_upstream_conf(w->up, &w->upconf);
	return (0);
}

static void
worker_on_metrics(struct svc *svc, struct buf *b, void *arg)
{
	struct worker *w = arg;

	(void)svc;
	if (w->m_inflight != NULL)
		*w->m_inflight = (double)w->nruns;
	if (w->m_queued != NULL && w->up != NULL)
		*w->m_queued = (double)worker_upstream_queued(w->up);
	(void)metrics_render(w->metrics, b);
}

/* Leave if the parent died (we were reparented), through the same path
 * as a SIGTERM; raise() targets this thread, whose signals the loop
 * takes. */
static void
worker_ppid_check(struct loop *l, void *arg)
{
	struct worker *w = arg;

	(void)l;
	if (getppid() != w->ppid && !w->stopping) {
		log_warnx("parent %ld gone: stopping", (long)w->ppid);
		(void)raise(SIGTERM);
	}
	svc_status(&w->svc, "%zu runs in flight%s", w->nruns,
	           w->stopping ? ", stopping" : "");
	loop_timer_set(w->ppid_timer, WORKER_PPID_MS);
}

static void
worker_metrics_init(struct worker *w)
{
	char labels[WORKER_PEER_MAX + 64];

	if ((w->metrics = metrics_new()) == NULL)
		fatal("metrics");
	(void)snprintf(labels, sizeof(labels), "service=\"%s\"", w->svc.name);
	w->m_inflight =
	        metrics_gauge(w->metrics, "troupe_worker_runs_in_flight",
	                      "Runs this worker holds now.", labels);
	w->m_queued = metrics_gauge(
	        w->metrics, "troupe_worker_upstream_queued",
	        "Upstream calls waiting for a connection to their host.",
	        labels);
	w->m_upstream = metrics_histo(
	        w->metrics, "troupe_upstream_request_duration_seconds",
	        "Time of LLM upstream calls, failed ones included.", labels);
	(void)snprintf(labels, sizeof(labels),
	               "service=\"%s\",reason=\"duplicate_assign\"",
	               w->svc.name);
	w->m_dup_assign = metrics_counter(
	        w->metrics, "troupe_worker_ignored_total",
	        "Envelopes the worker ignored, by reason.", labels);
	(void)snprintf(labels, sizeof(labels),
	               "service=\"%s\",reason=\"unknown_ctx_reply\"",
	               w->svc.name);
	w->m_unknown_ctx = metrics_counter(
	        w->metrics, "troupe_worker_ignored_total",
	        "Envelopes the worker ignored, by reason.", labels);
	(void)snprintf(labels, sizeof(labels),
	               "service=\"%s\",reason=\"bad_message\"", w->svc.name);
	w->m_bad_msg = metrics_counter(
	        w->metrics, "troupe_worker_ignored_total",
	        "Envelopes the worker ignored, by reason.", labels);
	(void)snprintf(labels, sizeof(labels),
	               "service=\"%s\",reason=\"cancel_not_running\"",
	               w->svc.name);
	w->m_cancel_late = metrics_counter(
	        w->metrics, "troupe_worker_ignored_total",
	        "Envelopes the worker ignored, by reason.", labels);
	(void)snprintf(labels, sizeof(labels), "service=\"%s\"", w->svc.name);
	w->m_canceled = metrics_counter(
	        w->metrics, "troupe_worker_canceled_total",
	        "v3 chats canceled (cancel call or client gone).", labels);
	w->m_send_refused = metrics_counter(
	        w->metrics, "troupe_worker_send_refused_total",
	        "Envelopes a full peer backlog refused.", labels);
	(void)snprintf(labels, sizeof(labels), "service=\"%s\",result=\"ok\"",
	               w->svc.name);
	w->m_tool_ok = metrics_counter(
	        w->metrics, "troupe_worker_tool_calls_total",
	        "Tool calls of v3 chats, by result (error: the model got an "
	        "error result).",
	        labels);
	(void)snprintf(labels, sizeof(labels),
	               "service=\"%s\",result=\"error\"", w->svc.name);
	w->m_tool_err = metrics_counter(
	        w->metrics, "troupe_worker_tool_calls_total",
	        "Tool calls of v3 chats, by result (error: the model got an "
	        "error result).",
	        labels);
}

int
main(int argc, char **argv)
{
	static struct svc_def def = {
	        .kind = "worker",
	        .summary = "run chats: context, LLM upstream, persist",
	        .help_extra = help_extra,
	        .on_msg = worker_dispatch,
	        .on_reload = worker_on_reload,
	        .on_stop = worker_on_stop,
	        .on_metrics = worker_on_metrics,
	};
	struct worker *w = &worker;
	struct worker_hello hello;
	struct msg_head h;
	char err[256];
	int rc;

	/* Before any thread exists (nng's start in svc_init). */
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
		fprintf(stderr, "troupe-worker: curl_global_init failed\n");
		return (1);
	}
	def.arg = w;
	svc_init(&w->svc, &def, argc, argv);
	(void)TRACE_INIT(&w->svc);
	/* RUN_DONE only frees a slot in the dispatcher's books: let it ride
	 * with the next batch instead of costing an nng message per turn. */
	(void)ipc_set_lazy(w->svc.ipc, MSG_RUN_DONE);
	w->ppid = getppid();
	w->slot = worker_slot(w->svc.name);
	if (worker_conf(w, err, sizeof(err)) == -1)
		fatalx("%s", err);
	worker_metrics_init(w);
	if (worker_run_init(w) == -1)
		fatal("run table");
	if ((w->up = worker_upstream_new(w->svc.loop, &w->upconf)) == NULL)
		fatalx("cannot set up the upstream client (libcurl)");
	if ((w->drain_timer = loop_timer_new(w->svc.loop, worker_drain, w)) ==
	            NULL ||
	    (w->ppid_timer = loop_timer_new(w->svc.loop, worker_ppid_check,
	                                    w)) == NULL)
		fatal("timers");
	loop_timer_set(w->ppid_timer, WORKER_PPID_MS);

	h = (struct msg_head){.reqid = MSTR_NULL,
	                      .traceparent = MSTR_NULL,
	                      .deadline_ms = 0,
	                      .reply_to = MSTR(w->svc.name)};
	hello.pid = (uint64_t)getpid();
	hello.slot = w->slot;
	if (msg_send_worker_hello(w->svc.ipc, "dispatcher", &h, &hello) == -1)
		log_warnx("WORKER_HELLO refused (dispatcher backlog full)");
	log_info("slot %u, parent %ld, %ld upstream connections per host",
	         w->slot, (long)w->ppid, w->upconf.connections);
	svc_ready(&w->svc, "serving");

	rc = svc_run(&w->svc);

	/* The loop is gone now; the rest went in worker_teardown(). */
	if (w->up == NULL)
		curl_global_cleanup();
	metrics_free(w->metrics);
	return (rc);
}
