/* SPDX-License-Identifier: ISC */
/*
 * ipc: a process's mailbox and its links to peers, over nng PUSH/PULL.
 *
 * Every process listens on one PULL socket (its mailbox, by default
 * ipc://<rundir>/<name>.ipc) and keeps one PUSH socket per peer it sends
 * to, dialed without blocking and redialed forever.  Envelopes queued for
 * a peer while a send is in flight leave together in the next nng message,
 * so the per-message cost of nng is shared out as load rises.
 *
 * Delivery is at least once per hop: every envelope carries a per-link
 * sequence number, the receiver acknowledges cumulatively (in batches, on
 * its tick), and the sender keeps what is unacknowledged and sends it again
 * after a silence or a reconnection.  The receiver drops duplicates within
 * a window, so handlers see each envelope once per sender incarnation;
 * across a sender's restart, handlers must be idempotent by request id.
 *
 * Wire form of one nng message:
 *   [ "trp", version, sender name, sender incarnation, base seq ]
 *   then envelopes, each [version, type, seq, reqid, traceparent,
 *   deadline_ms, reply_to, body], concatenated.  base seq tells the
 *   receiver that everything below it is settled.
 *
 * Threads: nng's callbacks only move messages between queues; handlers run
 * on the caller's loop thread inside ipc_process().  Never logs; counts
 * what it drops (ipc_stats).
 */
#ifndef TROUPE_IPC_H
#define TROUPE_IPC_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "util.h"

#define IPC_VERSION 1

struct ipc;

/* One received envelope.  Strings and body point into the nng message:
 * valid only during the handler call. */
struct msg {
	uint16_t version;
	uint16_t type;
	uint64_t seq;
	struct mstr sender;      /* mailbox name of the sender */
	struct mstr reqid;       /* request id (the client's X-Tt-Logid) */
	struct mstr traceparent; /* W3C traceparent, may be empty */
	uint64_t deadline_ms;    /* absolute, wall clock ms; 0: none */
	struct mstr reply_to;    /* mailbox name for the answer */
	const char *body;        /* msgpack body, body_len bytes */
	size_t body_len;
};

/* The head of an envelope to send (sender and seq are filled in). */
struct msg_head {
	struct mstr reqid;
	struct mstr traceparent;
	uint64_t deadline_ms;
	struct mstr reply_to;
};

/* Called for every envelope, on the loop thread. */
typedef void (*ipc_handler)(void *arg, const struct msg *);
/* Packs a body; 0 or -1. */
typedef int (*ipc_pack_fn)(msgpack_packer *, const void *body);

/* The head of one nng message: a batch of envelopes from one sender. */
struct ipc_batch_head {
	struct mstr sender; /* the sender's mailbox name */
	uint64_t incarnation;
	uint64_t base;
};

struct mpk_cur;
/* Read a batch's head from c (the start of an nng message); 0, or -1 if
 * it is not one of ours.  Pure: for ipc itself, its tests and fuzzing. */
int ipc_parse_head(struct mpk_cur *c, struct ipc_batch_head *);
/* Read the next envelope of a batch from c into m (strings and body
 * point into c's bytes; m->sender is left empty); 0, or -1 if it does
 * not decode (the rest of the batch cannot be read then). */
int ipc_parse_envelope(struct mpk_cur *c, struct msg *m);

struct ipc_stats {
	uint64_t env_in, env_out;       /* envelopes received / queued */
	uint64_t nngmsg_in, nngmsg_out; /* nng messages (batches) */
	uint64_t dup_in;                /* duplicates dropped */
	uint64_t bad_in;                /* undecodable messages dropped */
	uint64_t resent;                /* envelopes sent again */
	uint64_t send_refused;          /* ipc_send -1: peer backlog full */
	uint64_t listener_restarts;     /* our listener had died: re-created */
	uint64_t redials;       /* a peer's dialer replaced (no pipe) */
	uint64_t stalls; /* ... (a pipe, no ack for IPC_STALL_MS) */
	uint64_t refused_peers; /* pipes from another user, closed */
};

/* Open the mailbox "name" (URL from ipc_url()).  NULL and an error text. */
struct ipc *ipc_open(const char *name, ipc_handler, void *arg, char *err,
                     size_t errlen);
void ipc_close(struct ipc *);
const char *ipc_name(const struct ipc *);

/* The URL of a mailbox: [ipc] <name>_url if set (tcp:// across hosts),
 * else ipc://<rundir>/<name>.ipc. */
int ipc_url(const char *name, char *out, size_t outlen);

/* An fd readable while received messages wait: watch it for EPOLLIN. */
int ipc_fd(const struct ipc *);
/* Run the handler on every waiting envelope.  Returns how many. */
int ipc_process(struct ipc *);
/* Acks, resends, listener check: call every IPC_TICK_MS or so. */
#define IPC_TICK_MS 20
void ipc_tick(struct ipc *);

/* Queue one envelope for peer (a mailbox name).  -1 if the peer's backlog
 * is full (the peer is gone or far behind): answer the client 503. */
int ipc_send(struct ipc *, const char *peer, uint16_t type,
             const struct msg_head *, ipc_pack_fn, const void *body);
/* Send what ipc_send() queued: call at the end of every loop turn (svc
 * does, through the flush hook).  ipc_tick() flushes too.  Without a
 * flush hook, ipc_send() sends at once. */
void ipc_flush(struct ipc *);
/* fn(arg) is called when the first envelope of a turn is queued, so the
 * host loop can schedule ipc_flush() at the end of the turn. */
void ipc_set_flush_hook(struct ipc *, void (*fn)(void *), void *arg);
/* Envelopes of this type do not cause a flush: they leave with the next
 * envelope sent to the same peer, or on the next tick (at most
 * IPC_TICK_MS later).  For bookkeeping nobody waits on (RUN_DONE).  At
 * most 8 types; -1 past that. */
int ipc_set_lazy(struct ipc *, uint16_t type);
/* Drop a peer's link and everything queued for it (a retired worker). */
void ipc_forget(struct ipc *, const char *peer);
/* Envelopes queued or unacknowledged for peer (0 if unknown). */
size_t ipc_backlog(struct ipc *, const char *peer);
/* Envelopes queued or unacknowledged for all peers together. */
size_t ipc_total_backlog(struct ipc *);
/* Whether a pipe to peer is up now. */
int ipc_connected(struct ipc *, const char *peer);
void ipc_stats(const struct ipc *, struct ipc_stats *);

#endif
