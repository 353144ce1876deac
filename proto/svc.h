/* SPDX-License-Identifier: ISC */
/*
 * svc: the skeleton every service's main() hands its callbacks to, as
 * Postfix daemons end in multi_server_main().  It parses the common command
 * line, loads the config, opens the log, the loop and the mailbox, turns
 * SIGTERM/SIGINT into a clean stop and SIGHUP into a reload, talks to
 * systemd (READY=1, STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1) and sends
 * this process's metrics to troupe-telemetry every second.
 *
 * Command line common to every service:
 *   -c, --config PATH   config file (default /etc/troupe/troupe.conf;
 *                       env TROUPE_CONFIG)
 *   -n, --name NAME     mailbox name (default: the service kind)
 *   -d, --debug         debug logging
 *   -h, --help          usage;  -V, --version
 */
#ifndef TROUPE_SVC_H
#define TROUPE_SVC_H

#include "conf.h"
#include "ipc.h"
#include "log.h"
#include "loop.h"
#include "metrics.h"
#include "util.h"

struct svc;

struct svc_def {
	const char *kind;	 /* "auth" */
	const char *summary;	 /* one line for --help */
	const char *help_extra;	 /* more --help text (config keys), or NULL */
	ipc_handler on_msg;	 /* every envelope */
	/* Reload: config re-read already; 0 or -1 (old config kept).  May
	 * be NULL. */
	int (*on_reload)(struct svc *, void *);
	/* Stop requested: begin draining; call svc_stop_done() when done
	 * (or leave NULL to stop at once). */
	void (*on_stop)(struct svc *, void *);
	/* Append this process's metrics (Prometheus text) to b; may be
	 * NULL.  The svc adds its own ipc_* series. */
	void (*on_metrics)(struct svc *, struct buf *b, void *);
	void *arg;
	/* The host runs another loop (h2o) and calls ipc_flush() after each
	 * of its turns itself, sparing a timer per turn. */
	int host_flushes;
};

struct svc {
	const struct svc_def *def;
	const char *name;	/* mailbox name */
	struct loop *loop;
	struct ipc *ipc;
	const char *config_path; /* as given (workers get the same) */
	int stopping;		/* a stop was asked for */
	int stopped;		/* the stop is complete: leave the loop */
	char **argv;		/* operands after the options */
	int argc;
	struct metrics *metrics; /* this process's registry */
	uint64_t seen_listener_restarts; /* ipc stats already logged */
	uint64_t seen_redials;
	uint64_t seen_stalls;
};

/* Parse argv, load config, open log, loop, mailbox.  Exits with a message
 * on a bad command line or config (fatal). */
void svc_init(struct svc *, const struct svc_def *, int argc, char **argv);
/* Tell systemd (and the test harness) we serve: READY=1 and STATUS=. */
void svc_ready(struct svc *, const char *status);
void svc_status(struct svc *, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Run the loop until stopped; returns the exit code. */
int svc_run(struct svc *);
/* For a process that runs another loop (the edge runs h2o's): watch
 * loop_fd(svc->loop) and call loop_run_once(svc->loop, 0) when it is
 * readable; leave when svc->stopped; then return svc_exit(). */
int svc_exit(struct svc *);
/* Count a message dropped for why (unknown type, route not allowed,
 * undecodable body) in *counter, and log the first and every 1000th. */
void svc_note_drop(uint64_t *counter, const struct msg *m, const char *why);
/* Finish a stop begun by on_stop. */
void svc_stop_done(struct svc *);

#endif
