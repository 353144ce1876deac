/* SPDX-License-Identifier: ISC */
/*
 * edge: what the files of troupe-edge share.  edge.c holds main(), the
 * config and the peer table; edge_http.c runs h2o (listener, routes,
 * limits, answers); edge_dispatch.c handles the messages peers send us.
 * Not a library: nothing outside services/edge includes this.
 */
#ifndef TROUPE_EDGE_H
#define TROUPE_EDGE_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"
#include "svc.h"

/* Defaults of the per-address limits (docs/services/edge.md says why). */
#define EDGE_MAX_CONNS_PER_ADDR 16384
#define EDGE_CONN_RATE_PER_ADDR 0
#define EDGE_CONN_BURST_PER_ADDR 200

/* [edge] settings (docs/services/edge.md). */
struct edge_conf {
	char listen[128];  /* host:port, used without a systemd socket */
	uint64_t max_body; /* bytes of request body */
	uint64_t max_head; /* bytes of request line + headers */
	uint64_t idle_timeout_ms; /* keep-alive idle, and whole-request cap */
	uint64_t head_timeout_ms; /* a started request must be in by then */
	uint64_t chat_timeout_ms; /* deadline of a chat, from its arrival */
	uint64_t drain_ms;        /* on stop: wait this long for answers */
	/* Per client address (IPv4, IPv6 /64); 0: no limit. */
	uint64_t max_conns_per_addr;  /* open connections */
	uint64_t conn_rate_per_addr;  /* new connections per second */
	uint64_t conn_burst_per_addr; /* ... of which at once */
	/* [webhook] verify_token (or the credential webhook-verify-token):
	 * the plugin webhook's signing token; empty: the webhook is off. */
	char verify_token[512];
};

/* What a dispatch function did with a message. */
enum { DISPATCH_OK, DISPATCH_BAD, DISPATCH_UNHANDLED };

/* Read [edge] into c; 0, or -1 with the reason in err. */
int edge_conf_load(struct edge_conf *c, char *err, size_t errlen);
/* Write the names of the peers whose link is down to names (at most max);
 * returns how many. */
size_t edge_peers_down(struct svc *, const char **names, size_t max);

/* Set h2o up: listen on listen_fd (>= 0: from systemd) or on c->listen.
 * 0, or -1 with the reason in err. */
int edge_http_init(struct svc *, const struct edge_conf *c, int listen_fd,
                   char *err, size_t errlen);
/* The address we listen on, for logs and STATUS=. */
const char *edge_http_where(void);
/* Apply reloaded settings (listen needs a restart). */
void edge_http_reconf(const struct edge_conf *c);
/* Run h2o's loop (with ours inside) until the service stops; returns the
 * exit code. */
int edge_http_run(struct svc *);
/* Stop accepting, let pending chats finish (drain_ms at most), then
 * svc_stop_done(). */
void edge_http_stop(struct svc *);
/* Answer the client waiting for request id reqid with r.  0, or -1 if no
 * request waits for it (answered, timed out, or its client left). */
int edge_http_reply(struct mstr reqid, const struct chat_reply *r);
/* Stream ev's events to the client waiting for request id reqid (the
 * first starts its 200 text/event-stream answer; ev->last ends it).  0,
 * or -1 if no request waits for it. */
int edge_http_event(struct mstr reqid, const struct chat_event *ev);

/* Set up dispatch counters (in svc->metrics). */
void edge_dispatch_init(struct svc *);
/* CHAT_REPLY and CHAT_EVENT from any peer (auth, dispatcher, workers,
 * storage). */
int edge_dispatch_any(struct svc *, const struct msg *);

#endif
