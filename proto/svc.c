/* SPDX-License-Identifier: ISC */
/*
 * svc: the common skeleton of every Troupe service (see svc.h).  Callers:
 * each service's main().  It may log and exit: it is where a process meets
 * its environment (bad command line or config: fatal, exit 1).
 */
#include <sys/resource.h>

#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "proto.h"
#include "svc.h"

#define SVC_DEFAULT_CONFIG "/etc/troupe/troupe.conf"
#define SVC_METRICS_MS 1000

static char svc_namebuf[64];

static void
usage(const struct svc_def *d, FILE *f)
{
	fprintf(f,
	    "usage: troupe-%s [-c config] [-n name] [-d] [-h] [-V]\n"
	    "%s\n\n"
	    "  -c, --config PATH  config file (default %s, or $TROUPE_CONFIG)\n"
	    "  -n, --name NAME    mailbox name (default %s)\n"
	    "  -d, --debug        log debug messages\n"
	    "  -h, --help         this text\n"
	    "  -V, --version      print the version\n"
	    "\nEvery config key [section] key can be overridden by the\n"
	    "environment variable TROUPE_<SECTION>_<KEY>.\n",
	    d->kind, d->summary, SVC_DEFAULT_CONFIG, d->kind);
	if (d->help_extra)
		fprintf(f, "\n%s", d->help_extra);
}

static void
on_ipc(struct loop *l, int fd, uint32_t ev, void *arg)
{
	struct svc *s = arg;

	(void)l;
	(void)fd;
	(void)ev;
	ipc_process(s->ipc);
}

struct svc_timers {
	struct loop_timer *tick, *metrics, *watchdog, *flush;
	uint64_t watchdog_ms;
};
static struct svc_timers svc_t;

static void
tick_cb(struct loop *l, void *arg)
{
	struct svc *s = arg;

	(void)l;
	ipc_tick(s->ipc);
	loop_timer_set(svc_t.tick, IPC_TICK_MS);
}

/* The first envelope of a loop turn arms a 0 ms timer: timers run after
 * the turn's fd events, so everything queued in the turn leaves together.
 * In the edge the turn is h2o's: the timerfd wakes it for the next one. */
static void
flush_cb(struct loop *l, void *arg)
{
	struct svc *s = arg;

	(void)l;
	ipc_flush(s->ipc);
}

static void
flush_hook(void *arg)
{
	struct svc *s = arg;

	if (s->def->host_flushes)
		return;
	if (!loop_timer_armed(svc_t.flush))
		loop_timer_set(svc_t.flush, 0);
}

static void
watchdog_cb(struct loop *l, void *arg)
{
	(void)l;
	(void)arg;
	sd_notify(0, "WATCHDOG=1");
	loop_timer_set(svc_t.watchdog, (int64_t)svc_t.watchdog_ms);
}

/* A counter set from a cumulative value kept elsewhere (ipc's stats). */
static void
svc_set_counter(struct svc *s, const char *family, const char *help,
    const char *labels, uint64_t v)
{
	uint64_t *c;

	if ((c = metrics_counter(s->metrics, family, help, labels)) != NULL)
		*c = v;
}

static void
svc_set_gauge(struct svc *s, const char *family, const char *help,
    const char *labels, double v)
{
	double *g;

	if ((g = metrics_gauge(s->metrics, family, help, labels)) != NULL)
		*g = v;
}

static void
render_ipc(struct svc *s)
{
	static const char env[] = "troupe_ipc_envelopes_total";
	static const char env_h[] =
	    "Envelopes received (in) or sent (out) by this process";
	static const char nng[] = "troupe_ipc_nng_messages_total";
	static const char nng_h[] =
	    "nng messages (batches of envelopes) received by this process";
	struct ipc_stats st;
	char lb[128];

	ipc_stats(s->ipc, &st);
	snprintf(lb, sizeof(lb), "service=\"%s\",direction=\"in\"", s->name);
	svc_set_counter(s, env, env_h, lb, st.env_in);
	svc_set_counter(s, nng, nng_h, lb, st.nngmsg_in);
	snprintf(lb, sizeof(lb), "service=\"%s\",direction=\"out\"", s->name);
	svc_set_counter(s, env, env_h, lb, st.env_out);
	snprintf(lb, sizeof(lb), "service=\"%s\"", s->name);
	svc_set_counter(s, "troupe_ipc_duplicates_dropped_total",
	    "Duplicate envelopes dropped", lb, st.dup_in);
	svc_set_counter(s, "troupe_ipc_bad_messages_total",
	    "Undecodable messages dropped", lb, st.bad_in);
	svc_set_counter(s, "troupe_ipc_resent_envelopes_total",
	    "Envelopes sent again after a silence or reconnection", lb,
	    st.resent);
	svc_set_counter(s, "troupe_ipc_send_refused_total",
	    "Sends refused because a peer's backlog was full", lb,
	    st.send_refused);
	svc_set_counter(s, "troupe_ipc_refused_peers_total",
	    "Mailbox connections closed: the peer was another user", lb,
	    st.refused_peers);
	svc_set_counter(s, "troupe_ipc_listener_restarts_total",
	    "Mailbox listeners re-created after they stopped accepting", lb,
	    st.listener_restarts);
	svc_set_counter(s, "troupe_ipc_redials_total",
	    "Dialers re-created for peers without a connection", lb,
	    st.redials);
	svc_set_counter(s, "troupe_ipc_stalls_total",
	    "Connections to a peer replaced: nothing acknowledged for 3 s", lb,
	    st.stalls);
	svc_set_gauge(s, "troupe_ipc_backlog",
	    "Envelopes sent and not yet acknowledged, all peers together", lb,
	    (double)ipc_total_backlog(s->ipc));
	if (st.listener_restarts > s->seen_listener_restarts)
		log_warnx("ipc: mailbox %s stopped accepting connections "
		    "(nng #1518); listener re-created (%llu so far)",
		    s->name, (unsigned long long)st.listener_restarts);
	if (st.redials > s->seen_redials)
		log_debug("ipc: %llu dialers re-created for unreachable peers",
		    (unsigned long long)(st.redials - s->seen_redials));
	if (st.stalls > s->seen_stalls)
		log_warnx("ipc: %llu peer connections acknowledged nothing for "
		    "3 s and were replaced (%llu so far)",
		    (unsigned long long)(st.stalls - s->seen_stalls),
		    (unsigned long long)st.stalls);
	s->seen_stalls = st.stalls;
	s->seen_listener_restarts = st.listener_restarts;
	s->seen_redials = st.redials;
}

/* This process's CPU time (user + system of all its threads, from
 * getrusage: microseconds, where /proc/self/stat counts 10 ms ticks) and
 * resident memory (/proc/self/statm), named as Prometheus's client
 * libraries name them; telemetry labels them with the sender. */
static int
render_process(struct buf *b)
{
	unsigned long long size = 0, rss = 0;
	long pg = sysconf(_SC_PAGESIZE);
	struct rusage ru;
	FILE *f;

	if (getrusage(RUSAGE_SELF, &ru) == -1 || pg <= 0)
		return (0);
	if (buf_addf(b,
	    "# HELP process_cpu_seconds_total Total user and system CPU "
	    "time spent in seconds.\n"
	    "# TYPE process_cpu_seconds_total counter\n"
	    "process_cpu_seconds_total %.6f\n",
	    (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
	    ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) /
	    1e6) == -1)
		return (-1);
	if ((f = fopen("/proc/self/statm", "r")) == NULL)
		return (0);
	if (fscanf(f, "%llu %llu", &size, &rss) != 2) {
		fclose(f);
		return (0);
	}
	fclose(f);
	return (buf_addf(b,
	    "# HELP process_resident_memory_bytes Resident memory size in "
	    "bytes.\n"
	    "# TYPE process_resident_memory_bytes gauge\n"
	    "process_resident_memory_bytes %llu\n",
	    rss * (unsigned long long)pg));
}

static void
metrics_cb(struct loop *l, void *arg)
{
	static const char un[] = "troupe_telemetry_reports_unsent_total";
	static const char un_h[] =
	    "Metrics reports this process did not send to telemetry: "
	    "backlog (4 reports unacknowledged) or refused (ipc refused it)";
	struct svc *s = arg;
	struct buf b = { 0 };
	struct msg_head h = { MSTR_NULL, MSTR_NULL, 0, MSTR_NULL };
	struct metrics_report mr;
	char lb[128];
	uint64_t *c_backlog, *c_refused;
	int self = strcmp(s->def->kind, "telemetry") == 0;

	(void)l;
	loop_timer_set(svc_t.metrics, SVC_METRICS_MS);
	render_ipc(s);
	c_backlog = c_refused = NULL;
	if (!self) {
		snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"backlog\"",
		    s->name);
		c_backlog = metrics_counter(s->metrics, un, un_h, lb);
		snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"refused\"",
		    s->name);
		c_refused = metrics_counter(s->metrics, un, un_h, lb);
	}
	if (metrics_render(s->metrics, &b) == -1)
		goto done;
	if (s->def->on_metrics)
		s->def->on_metrics(s, &b, s->def->arg);
	/* Telemetry renders its own (and its own process series).  Others
	 * send theirs unless telemetry is not taking them: they are
	 * cumulative, so a lost one costs nothing, and a backlog of stale
	 * ones would.  Never wait: a report not sent is counted, and the
	 * count leaves with the next one. */
	if (self)
		goto done;
	if (ipc_backlog(s->ipc, "telemetry") >= 4) {
		if (c_backlog != NULL)
			++*c_backlog;
		goto done;
	}
	if (render_process(&b) == -1)
		goto done;
	mr.service = MSTR(s->name);
	mr.text = (struct mstr){ b.b ? b.b : "", (uint32_t)b.len };
	h.deadline_ms = now_wall_ms() + 10000;
	if (msg_send_metrics(s->ipc, "telemetry", &h, &mr) == -1 &&
	    c_refused != NULL)
		++*c_refused;
done:
	buf_free(&b);
}

static void
sig_stop(struct loop *l, int signo, void *arg)
{
	struct svc *s = arg;

	(void)l;
	if (s->stopping) {
		log_info("signal %d again: stopping now", signo);
		svc_stop_done(s);
		return;
	}
	s->stopping = 1;
	log_info("signal %d: stopping", signo);
	sd_notify(0, "STOPPING=1");
	if (s->def->on_stop)
		s->def->on_stop(s, s->def->arg);
	else
		svc_stop_done(s);
}

static void
sig_reload(struct loop *l, int signo, void *arg)
{
	struct svc *s = arg;
	char err[512];

	(void)l;
	(void)signo;
	sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
	    (unsigned long long)(now_mono_ns() / 1000));
	if (conf_load(s->config_path, 1, err, sizeof(err)) == -1)
		log_warnx("reload: %s (keeping the old config)", err);
	else if (s->def->on_reload && s->def->on_reload(s, s->def->arg) == -1)
		log_warnx("reload: refused by the service (old values kept)");
	else
		log_info("reload: config re-read from %s", s->config_path);
	sd_notify(0, "READY=1");
}

void
svc_init(struct svc *s, const struct svc_def *d, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "name", required_argument, NULL, 'n' },
		{ "debug", no_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *cfg = getenv("TROUPE_CONFIG"), *lvl;
	char err[512];
	int ch, debug = 0, explicit_cfg = cfg != NULL;
	uint64_t usec;

	memset(s, 0, sizeof(*s));
	s->def = d;
	s->name = d->kind;
	signal(SIGPIPE, SIG_IGN);
	/* Block the signals the loop takes through its signalfd before any
	 * thread exists (nng starts its threads in ipc_open), or one of
	 * those threads would take them: SIGHUP would kill the process and
	 * a SIGCHLD would be lost.  Children reset their mask before exec. */
	{
		sigset_t ss;

		sigemptyset(&ss);
		sigaddset(&ss, SIGTERM);
		sigaddset(&ss, SIGINT);
		sigaddset(&ss, SIGHUP);
		sigaddset(&ss, SIGCHLD);
		sigaddset(&ss, SIGUSR1);
		sigaddset(&ss, SIGUSR2);
		pthread_sigmask(SIG_BLOCK, &ss, NULL);
	}
	while ((ch = getopt_long(argc, argv, "c:n:dhV", opts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			cfg = optarg;
			explicit_cfg = 1;
			break;
		case 'n':
			snprintf(svc_namebuf, sizeof(svc_namebuf), "%s",
			    optarg);
			s->name = svc_namebuf;
			break;
		case 'd':
			debug = 1;
			break;
		case 'h':
			usage(d, stdout);
			exit(0);
		case 'V':
			printf("troupe-%s %s\n", d->kind, TROUPE_VERSION);
			exit(0);
		default:
			usage(d, stderr);
			exit(2);
		}
	}
	s->argc = argc - optind;
	s->argv = argv + optind;
	s->config_path = cfg ? cfg : SVC_DEFAULT_CONFIG;
	log_init(s->name, debug ? LOG_L_DEBUG : LOG_L_INFO);
	if (conf_load(s->config_path, !explicit_cfg, err, sizeof(err)) == -1)
		fatalx("config: %s", err);
	lvl = conf_get("log", "level", "info");
	if (debug)
		;
	else if (strcmp(lvl, "debug") == 0)
		log_setlevel(LOG_L_DEBUG);
	else if (strcmp(lvl, "warn") == 0 || strcmp(lvl, "warning") == 0)
		log_setlevel(LOG_L_WARN);
	else if (strcmp(lvl, "err") == 0 || strcmp(lvl, "error") == 0)
		log_setlevel(LOG_L_ERR);
	else if (strcmp(lvl, "info") != 0)
		fatalx("config: [log] level = \"%s\": want err, warn, info "
		    "or debug", lvl);
	if ((s->metrics = metrics_new()) == NULL)
		fatalx("out of memory");
	if ((s->loop = loop_new()) == NULL)
		fatal("loop");
	if ((s->ipc = ipc_open(s->name, d->on_msg, d->arg, err,
	    sizeof(err))) == NULL)
		fatalx("mailbox %s: %s", s->name, err);
	if (loop_fd_add(s->loop, ipc_fd(s->ipc), EPOLLIN, on_ipc, s) == -1)
		fatal("loop_fd_add");
	if (loop_signal(s->loop, SIGTERM, sig_stop, s) == -1 ||
	    loop_signal(s->loop, SIGINT, sig_stop, s) == -1 ||
	    loop_signal(s->loop, SIGHUP, sig_reload, s) == -1)
		fatal("signalfd");
	svc_t.tick = loop_timer_new(s->loop, tick_cb, s);
	if ((svc_t.flush = loop_timer_new(s->loop, flush_cb, s)) == NULL)
		fatalx("out of memory");
	ipc_set_flush_hook(s->ipc, flush_hook, s);
	svc_t.metrics = loop_timer_new(s->loop, metrics_cb, s);
	if (svc_t.tick == NULL || svc_t.metrics == NULL)
		fatalx("out of memory");
	loop_timer_set(svc_t.tick, IPC_TICK_MS);
	loop_timer_set(svc_t.metrics, SVC_METRICS_MS);
	if (sd_watchdog_enabled(0, &usec) > 0) {
		svc_t.watchdog_ms = usec / 2000;
		if (svc_t.watchdog_ms == 0)
			svc_t.watchdog_ms = 1;
		if ((svc_t.watchdog = loop_timer_new(s->loop, watchdog_cb,
		    s)) == NULL)
			fatalx("out of memory");
		loop_timer_set(svc_t.watchdog, 0);
	}
}

void
svc_ready(struct svc *s, const char *status)
{
	sd_notifyf(0, "READY=1\nSTATUS=%s\nMAINPID=%d", status, (int)getpid());
	log_info("ready: %s (mailbox %s)", status, s->name);
}

void
svc_status(struct svc *s, const char *fmt, ...)
{
	char b[512];
	va_list ap;

	(void)s;
	va_start(ap, fmt);
	vsnprintf(b, sizeof(b), fmt, ap);
	va_end(ap);
	sd_notifyf(0, "STATUS=%s", b);
}

void
svc_note_drop(uint64_t *counter, const struct msg *m, const char *why)
{
	uint64_t n = ++*counter;

	if (n == 1 || n % 1000 == 0)
		log_warnx("dropped %s: %s: type 0x%04x from %.*s (%llu so far)",
		    msg_name(m->type) ? msg_name(m->type) : "message", why,
		    m->type, (int)m->sender.n, m->sender.p,
		    (unsigned long long)n);
}

void
svc_stop_done(struct svc *s)
{
	s->stopped = 1;
	loop_break(s->loop);
}

int
svc_exit(struct svc *s)
{
	/* Let the last answers leave: nng has no linger, so keep sending
	 * and taking acks until every peer acknowledged what we sent (or
	 * 2 s passed: a peer that is gone will not). */
	uint64_t t0 = now_mono_ms();

	ipc_flush(s->ipc);
	do {
		loop_run_once(s->loop, IPC_TICK_MS);
		ipc_tick(s->ipc);
	} while (now_mono_ms() - t0 < 2000 &&
	    (ipc_total_backlog(s->ipc) > 0 || now_mono_ms() - t0 < 50));
	ipc_close(s->ipc);
	loop_free(s->loop);
	metrics_free(s->metrics);
	log_info("stopped");
	return (0);
}

int
svc_run(struct svc *s)
{
	while (!s->stopped)
		if (loop_run(s->loop) == -1)
			fatal("epoll_wait");
	return (svc_exit(s));
}
