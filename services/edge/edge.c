/* SPDX-License-Identifier: ISC */
/*
 * troupe-edge: the HTTP/1.1 front door.  main() takes a listening socket
 * from systemd if one was passed (before anything else touches the
 * environment), hands the rest of the setup to svc (config, log, loop,
 * mailbox), reads [edge], sets h2o up (edge_http.c) and runs h2o's loop
 * with ours nested inside.
 *
 * The peer table names every kind of process that may send us messages
 * and the function that handles them, and the mailboxes whose links
 * /readyz reports.  A message from a kind not in the table, or one the
 * route table forbids, is counted and dropped, never fatal (a rolling
 * upgrade may bring builds we do not know).
 *
 * DIAGNOSTICS: a bad [edge] value or a listen failure is fatal (exit 1,
 * systemd restarts us); everything per request is counted, not logged.
 */
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <systemd/sd-daemon.h>

#include "edge.h"
#include "trace.h"

static struct svc edge_svc;

static const struct peer {
	const char *mailbox; /* a link /readyz reports, or NULL */
	enum proc kind;
	int (*dispatch)(struct svc *, const struct msg *);
} peers[] = {
        {"auth", PROC_AUTH, edge_dispatch_any},
        {"dispatcher", PROC_DISPATCHER, edge_dispatch_any},
        {"storage", PROC_STORAGE, edge_dispatch_any},
        {NULL, PROC_WORKER, edge_dispatch_any},
};

static uint64_t *m_dropped_unknown, *m_dropped_bad, *m_dropped_route;
static uint64_t m_sink;

size_t
edge_peers_down(struct svc *svc, const char **names, size_t max)
{
	size_t i, n = 0;

	for (i = 0; i < nitems(peers) && n < max; i++)
		if (peers[i].mailbox != NULL &&
		    !ipc_connected(svc->ipc, peers[i].mailbox))
			names[n++] = peers[i].mailbox;
	return (n);
}

static void
edge_on_msg(void *arg, const struct msg *m)
{
	struct svc *svc = arg;
	enum proc kind = proc_of(m->sender);
	const struct peer *p = NULL;
	size_t i;

	for (i = 0; i < nitems(peers); i++)
		if (peers[i].kind == kind) {
			p = &peers[i];
			break;
		}
	if (p == NULL || msg_name(m->type) == NULL) {
		svc_note_drop(m_dropped_unknown, m, "unknown sender or type");
		return;
	}
	if (!msg_route_ok(m->type, kind, PROC_EDGE)) {
		svc_note_drop(m_dropped_route, m, "route not allowed");
		return;
	}
	switch (p->dispatch(svc, m)) {
	case DISPATCH_OK:
		break;
	case DISPATCH_BAD:
		svc_note_drop(m_dropped_bad, m, "undecodable body");
		break;
	default:
		svc_note_drop(m_dropped_unknown, m, "unhandled type");
		break;
	}
}

int
edge_conf_load(struct edge_conf *c, char *err, size_t errlen)
{
	static const struct {
		const char *key;
		int64_t def, min, max;
		size_t off;
	} keys[] = {
	        {"max_body", 1 << 20, 1, 1 << 30,
	         offsetof(struct edge_conf, max_body)},
	        /* h2o 2.2.5 refuses a head past H2O_MAX_REQLEN (417792). */
	        {"max_head", 16 << 10, 1024, 8192 + 4096 * 100,
	         offsetof(struct edge_conf, max_head)},
	        {"idle_timeout_ms", 60000, 100, 3600000,
	         offsetof(struct edge_conf, idle_timeout_ms)},
	        {"head_timeout_ms", 10000, 100, 3600000,
	         offsetof(struct edge_conf, head_timeout_ms)},
	        {"chat_timeout_ms", 30000, 10, 600000,
	         offsetof(struct edge_conf, chat_timeout_ms)},
	        {"drain_ms", 5000, 0, 600000,
	         offsetof(struct edge_conf, drain_ms)},
	        {"max_conns_per_addr", EDGE_MAX_CONNS_PER_ADDR, 0, 10000000,
	         offsetof(struct edge_conf, max_conns_per_addr)},
	        {"conn_rate_per_addr", EDGE_CONN_RATE_PER_ADDR, 0, 10000000,
	         offsetof(struct edge_conf, conn_rate_per_addr)},
	        {"conn_burst_per_addr", EDGE_CONN_BURST_PER_ADDR, 1, 10000000,
	         offsetof(struct edge_conf, conn_burst_per_addr)},
	};
	const char *l;
	char *cred;
	int64_t v;
	size_t i;

	memset(c, 0, sizeof(*c));
	l = conf_get("edge", "listen", "127.0.0.1:8080");
	if (strlen(l) >= sizeof(c->listen)) {
		snprintf(err, errlen, "[edge] listen: too long");
		return (-1);
	}
	strcpy(c->listen, l);
	/* The webhook's token: a systemd credential wins over the file
	 * (and its env override, TROUPE_WEBHOOK_VERIFY_TOKEN). */
	if ((cred = conf_credential("webhook-verify-token")) != NULL)
		l = cred;
	else
		l = conf_get("webhook", "verify_token", "");
	if (strlen(l) >= sizeof(c->verify_token)) {
		snprintf(err, errlen, "[webhook] verify_token: over %zu bytes",
		         sizeof(c->verify_token) - 1);
		free(cred);
		return (-1);
	}
	strcpy(c->verify_token, l);
	free(cred);
	for (i = 0; i < nitems(keys); i++) {
		if (conf_get_int("edge", keys[i].key, keys[i].def, keys[i].min,
		                 keys[i].max, &v, err, errlen) == -1)
			return (-1);
		*(uint64_t *)((char *)c + keys[i].off) = (uint64_t)v;
	}
	return (0);
}

static int
edge_on_reload(struct svc *svc, void *arg)
{
	struct edge_conf c;
	char err[256];

	(void)svc;
	(void)arg;
	if (edge_conf_load(&c, err, sizeof(err)) == -1) {
		log_warnx("%s: %s", __func__, err);
		return (-1);
	}
	edge_http_reconf(&c);
	return (0);
}

static void
edge_on_stop(struct svc *svc, void *arg)
{
	(void)arg;
	edge_http_stop(svc);
}

static const struct svc_def edge_def = {
        .kind = "edge",
        .summary = "troupe-edge: the HTTP/1.1 API (POST /v1/bot/chat, "
                   "/v3/chat and friends, /api/v1/execute, /healthz, "
                   "/readyz)",
        .help_extra =
                "[edge] keys:\n"
                "  listen           host:port (127.0.0.1:8080); a socket "
                "passed\n"
                "                   by systemd takes precedence\n"
                "  max_body         request body bytes (1048576)\n"
                "  max_head         request line + header bytes (16384)\n"
                "  idle_timeout_ms  keep-alive idle time (60000)\n"
                "  head_timeout_ms  time to receive a started request "
                "(10000)\n"
                "  chat_timeout_ms  deadline of a chat (30000)\n"
                "  drain_ms         on stop, wait for answers this long "
                "(5000)\n"
                "  l3_inflight      in tier L3, shed new chats when this "
                "many are open\n"
                "                   (0: as many as were open when L3 "
                "began)\n"
                "  max_conns_per_addr\n"
                "                   open connections per client address "
                "(IPv4, IPv6\n"
                "                   /64); past it a new one gets 503 and "
                "is closed\n"
                "                   (16384; 0: no limit)\n"
                "  conn_rate_per_addr\n"
                "                   new connections per second per "
                "address (0: no limit)\n"
                "  conn_burst_per_addr\n"
                "                   ... of which at once (200)\n"
                "[webhook] keys:\n"
                "  verify_token     signing token of POST /api/v1/execute "
                "(empty:\n"
                "                   off); the credential "
                "webhook-verify-token wins\n",
        .on_msg = edge_on_msg,
        .on_reload = edge_on_reload,
        .on_stop = edge_on_stop,
        .on_metrics = NULL,
        .arg = &edge_svc,
        .host_flushes = 1,
};

int
main(int argc, char **argv)
{
	struct svc *svc = &edge_svc;
	struct edge_conf c;
	char err[256], lb[128];
	int n, fd = -1;
	size_t i;

	/* Before anything else: LISTEN_PID must still be ours. */
	n = sd_listen_fds(0);
	svc_init(svc, &edge_def, argc, argv);
	(void)TRACE_INIT(svc);
	if (n < 0)
		fatalx("sd_listen_fds: %s", strerror(-n));
	if (n > 0) {
		fd = SD_LISTEN_FDS_START;
		if (sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1) <= 0)
			fatalx("the socket systemd passed is not a listening "
			       "stream socket");
		if (n > 1)
			log_warnx("systemd passed %d sockets; using the first",
			          n);
	}
	if (edge_conf_load(&c, err, sizeof(err)) == -1)
		fatalx("config: %s", err);

	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"unknown\"",
	         svc->name);
	m_dropped_unknown = metrics_counter(
	        svc->metrics, "troupe_edge_dropped_messages_total",
	        "Messages the edge dropped, by reason", lb);
	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"bad\"", svc->name);
	m_dropped_bad = metrics_counter(
	        svc->metrics, "troupe_edge_dropped_messages_total",
	        "Messages the edge dropped, by reason", lb);
	snprintf(lb, sizeof(lb), "service=\"%s\",reason=\"route\"", svc->name);
	m_dropped_route = metrics_counter(
	        svc->metrics, "troupe_edge_dropped_messages_total",
	        "Messages the edge dropped, by reason", lb);
	if (m_dropped_unknown == NULL)
		m_dropped_unknown = &m_sink;
	if (m_dropped_bad == NULL)
		m_dropped_bad = &m_sink;
	if (m_dropped_route == NULL)
		m_dropped_route = &m_sink;
	edge_dispatch_init(svc);

	if (edge_http_init(svc, &c, fd, err, sizeof(err)) == -1)
		fatalx("%s", err);
	/* The edge only dials peers it sends to: dial every peer /readyz
	 * reports now (ipc_connected() creates the link). */
	for (i = 0; i < nitems(peers); i++)
		if (peers[i].mailbox != NULL)
			(void)ipc_connected(svc->ipc, peers[i].mailbox);
	svc_ready(svc, edge_http_where());
	return (edge_http_run(svc));
}
