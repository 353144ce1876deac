/* SPDX-License-Identifier: ISC */
/*
 * ipc: mailboxes over nng PUSH/PULL with batching and at-least-once hops.
 * See ipc.h for the model and the wire form, docs/architecture.md for the
 * why.  Callers: every process, through proto/ (typed sends) and svc.
 *
 * Threads.  nng's aio callbacks run on nng's threads and only move nng
 * messages: a received message is queued for the loop (and the eventfd
 * written); a finished send starts the next batch.  Packing, decoding and
 * handlers run on the loop thread.  A peer's mutex guards its outgoing
 * buffer and its unacknowledged batches; it is never held across an nng
 * call that might complete synchronously.
 *
 * nng 1.5.2 pitfalls handled here (PITFALLS.md): dials are non-blocking
 * with a bounded reconnect back-off; RECVMAXSZ is set before listening; a
 * lock file keeps a second instance from probing our path; the listener is
 * checked every 2 s by a full handshake and re-created if it died.  A
 * dialer can die for good too: a handshake that fails with EPIPE ends in
 * NNG_ECLOSED, on which dialer_connect_cb() stops retrying.  So a peer
 * without a pipe for IPC_REDIAL_MS gets a new dialer, and again every
 * IPC_REDIAL_MS while it stays down.
 * Never logs; counts what it drops.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>
#include <nng/protocol/pipeline0/push.h>

#include "conf.h"
#include "ipc.h"
#include "mpk.h"

#define IPC_TYPE_ACK 1
#define IPC_RECVMAX (64u << 20)          /* bytes per nng message */
#define IPC_BATCH_MAX (1u << 20)         /* seal a batch at this size */
#define IPC_ENV_MAX (IPC_RECVMAX - 4096) /* largest envelope */
#define IPC_RESEND_MS 1000               /* no ack progress: send again, */
#define IPC_RESEND_MAX_MS 8000           /* backing off to this */
#define IPC_PROCESS_MAX 256              /* nng messages handled per call */
#define IPC_INQ_MAX 4096                 /* stop receiving past this many */
#define IPC_PROBE_EVERY_MS 2000          /* listener health check */
#define IPC_PROBE_WAIT_MS 1000
#define IPC_REDIAL_MS 2000    /* no pipe this long: a new dialer */
#define IPC_STALL_MS 3000     /* a pipe but no ack this long: the same */
#define IPC_RECONN_MAX_MS 250 /* nng's reconnect back-off ceiling */
#define IPC_PEER_GC_MS 60000  /* forget a peer unreachable this long */
#define IPC_WINDOW 8192       /* dedup window, in envelopes */
#define IPC_HASH 128

struct batch {
	struct batch *next;
	uint64_t last_seq;
	size_t count; /* reliable envelopes */
	struct buf b;
};

struct peer {
	struct peer *hnext;
	struct peer *dnext; /* on the dirty list (loop thread) */
	int dirty;
	char name[64];
	struct ipc *ipc;
	uint64_t inc; /* this link's incarnation (immutable) */
	nng_socket sock;
	nng_dialer dialer;
	nng_aio *aio;
	pthread_mutex_t mu;
	/* under mu */
	struct buf out;   /* packed, not yet a batch */
	size_t out_count; /* reliable envelopes in out */
	struct batch *head, *tail, *cursor;
	size_t backlog; /* reliable envelopes queued or unacked */
	int inflight;
	int closing; /* being freed: start no more sends */
	uint64_t next_seq;
	uint64_t acked;
	/* loop thread */
	uint64_t progress_ms; /* last ack, resend, or first unacked */
	uint64_t ack_ms;      /* last ack progress, or first unacked */
	uint64_t resend_ms;   /* current resend interval */
	uint64_t down_since;  /* no pipe since (0: up) */
	uint64_t redial_at;   /* make a new dialer then, if still down */
	atomic_int pipes;
	atomic_int rewind;
};

struct sender {
	struct sender *hnext;
	char name[64];
	uint64_t incarnation;
	uint64_t lo;                   /* every seq <= lo arrived */
	uint64_t win[IPC_WINDOW / 64]; /* bit i: lo + 1 + i arrived */
	size_t ahead;                  /* bits set in win */
	int need_ack;
	uint64_t last_seen_ms;
};

struct inq {
	nng_msg **v;
	size_t n, cap;
};

struct ipc {
	char name[64];
	char url[512];
	uint64_t incarnation;
	ipc_handler handler;
	void *arg;
	nng_socket pull;
	nng_listener listener;
	nng_aio *raio;
	int efd;
	int lockfd;
	pthread_mutex_t qmu;
	struct inq q, work;
	size_t wi;  /* next message of work to handle */
	int paused; /* under qmu: receiving stopped (q full) */
	struct peer *peers[IPC_HASH];
	struct sender *senders[IPC_HASH];
	int64_t max_backlog;
	struct peer *dirty; /* peers with envelopes to flush */
	uint16_t lazy[8];   /* types that wait for the next flush */
	int nlazy;
	void (*flush_hook)(void *);
	void *flush_arg;
	struct ipc_stats st;
	atomic_uint_fast64_t nngmsg_in;
	atomic_uint_fast64_t refused_peers;
	/* listener probe */
	nng_socket probe;
	atomic_int probing;
	atomic_int probe_ok;
	uint64_t probe_at;
};

static unsigned
hash(const char *s, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)s[i]) * 16777619u;
	return (h % IPC_HASH);
}

int
ipc_url(const char *name, char *out, size_t outlen)
{
	char key[96];
	const char *v;
	int n;

	snprintf(key, sizeof(key), "%s_url", name);
	if ((v = conf_get("ipc", key, NULL)) != NULL && *v != '\0')
		n = snprintf(out, outlen, "%s", v);
	else
		n = snprintf(out, outlen, "ipc://%s/%s.ipc", conf_rundir(),
		             name);
	return (n < 0 || (size_t)n >= outlen ? -1 : 0);
}

/* Receiving. */

static void
recv_cb(void *arg)
{
	struct ipc *ipc = arg;
	nng_msg *m;
	int wake = 0, rearm;

	if (nng_aio_result(ipc->raio) != 0) {
		if (nng_aio_result(ipc->raio) == NNG_ECLOSED)
			return;
		nng_recv_aio(ipc->pull, ipc->raio);
		return;
	}
	m = nng_aio_get_msg(ipc->raio);
	pthread_mutex_lock(&ipc->qmu);
	if (ipc->q.n == ipc->q.cap) {
		size_t n = ipc->q.cap ? ipc->q.cap * 2 : 64;
		nng_msg **v = realloc(ipc->q.v, n * sizeof(*v));
		if (v == NULL) {
			pthread_mutex_unlock(&ipc->qmu);
			nng_msg_free(m); /* resent after IPC_RESEND_MS */
			nng_recv_aio(ipc->pull, ipc->raio);
			return;
		}
		ipc->q.v = v;
		ipc->q.cap = n;
	}
	wake = ipc->q.n == 0;
	ipc->q.v[ipc->q.n++] = m;
	/* The loop is far behind: stop taking messages, so that senders
	 * back up (and refuse with 503) instead of our memory growing. */
	if (ipc->q.n >= IPC_INQ_MAX)
		ipc->paused = 1;
	rearm = !ipc->paused;
	pthread_mutex_unlock(&ipc->qmu);
	atomic_fetch_add(&ipc->nngmsg_in, 1);
	if (wake) {
		uint64_t one = 1;
		(void)!write(ipc->efd, &one, sizeof(one));
	}
	if (rearm)
		nng_recv_aio(ipc->pull, ipc->raio);
}

static void mailbox_pipe_cb(nng_pipe, nng_pipe_ev, void *);

/* Only processes of our own user (or root) may write to our mailbox: file
 * permissions alone do not hold for abstract or tcp:// mailboxes. */
static void
mailbox_check_peer(nng_pipe p, nng_pipe_ev ev, void *arg)
{
	struct ipc *ipc = arg;
	uint64_t uid;

	if (ev != NNG_PIPE_EV_ADD_PRE)
		return;
	if (nng_pipe_get_uint64(p, NNG_OPT_IPC_PEER_UID, &uid) != 0)
		return; /* not ipc:// (tcp:// is for trusted networks) */
	if (uid != 0 && uid != (uint64_t)getuid()) {
		atomic_fetch_add(&ipc->refused_peers, 1);
		nng_pipe_close(p);
	}
}

static int
listen_mailbox(struct ipc *ipc)
{
	int rv;

	if ((rv = nng_listener_create(&ipc->listener, ipc->pull, ipc->url)))
		return (rv);
	nng_listener_set_size(ipc->listener, NNG_OPT_RECVMAXSZ, IPC_RECVMAX);
	if (strncmp(ipc->url, "ipc://", 6) == 0)
		unlink(ipc->url + 6); /* we hold the lock: it is stale */
	return (nng_listener_start(ipc->listener, 0));
}

static int
lock_mailbox(struct ipc *ipc, char *err, size_t errlen)
{
	char path[600];

	ipc->lockfd = -1;
	if (strncmp(ipc->url, "ipc://", 6) != 0)
		return (0);
	snprintf(path, sizeof(path), "%s.lock", ipc->url + 6);
	if ((ipc->lockfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) ==
	    -1) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return (-1);
	}
	if (flock(ipc->lockfd, LOCK_EX | LOCK_NB) == -1) {
		snprintf(err, errlen,
		         "%s: another process already owns mailbox %s", path,
		         ipc->name);
		close(ipc->lockfd);
		ipc->lockfd = -1;
		return (-1);
	}
	return (0);
}

struct ipc *
ipc_open(const char *name, ipc_handler h, void *arg, char *err, size_t errlen)
{
	struct ipc *ipc;
	int rv;
	int64_t mb = 100000;
	char e2[256];

	if ((ipc = calloc(1, sizeof(*ipc))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return (NULL);
	}
	snprintf(ipc->name, sizeof(ipc->name), "%s", name);
	ipc->handler = h;
	ipc->arg = arg;
	ipc->efd = -1;
	pthread_mutex_init(&ipc->qmu, NULL);
	if (conf_get_int("ipc", "max_backlog", 100000, 16, 100000000, &mb, e2,
	                 sizeof(e2)) == -1) {
		snprintf(err, errlen, "%s", e2);
		goto fail;
	}
	ipc->max_backlog = mb;
	if (random_bytes(&ipc->incarnation, sizeof(ipc->incarnation)) == -1) {
		snprintf(err, errlen, "getrandom: %s", strerror(errno));
		goto fail;
	}
	if (ipc_url(name, ipc->url, sizeof(ipc->url)) == -1) {
		snprintf(err, errlen, "mailbox URL too long");
		goto fail;
	}
	if ((ipc->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) == -1) {
		snprintf(err, errlen, "eventfd: %s", strerror(errno));
		goto fail;
	}
	if (lock_mailbox(ipc, err, errlen) == -1)
		goto fail;
	if ((rv = nng_pull0_open(&ipc->pull)) != 0 ||
	    (rv = nng_socket_set_size(ipc->pull, NNG_OPT_RECVMAXSZ,
	                              IPC_RECVMAX)) != 0 ||
	    (rv = nng_aio_alloc(&ipc->raio, recv_cb, ipc)) != 0) {
		snprintf(err, errlen, "nng: %s", nng_strerror(rv));
		goto fail;
	}
	nng_pipe_notify(ipc->pull, NNG_PIPE_EV_ADD_POST, mailbox_pipe_cb, ipc);
	nng_pipe_notify(ipc->pull, NNG_PIPE_EV_ADD_PRE, mailbox_check_peer,
	                ipc);
	if ((rv = listen_mailbox(ipc)) != 0) {
		snprintf(err, errlen, "listen %s: %s", ipc->url,
		         nng_strerror(rv));
		goto fail;
	}
	nng_recv_aio(ipc->pull, ipc->raio);
	ipc->probe_at = now_mono_ms() + IPC_PROBE_EVERY_MS;
	return (ipc);
fail:
	if (ipc->raio)
		nng_aio_free(ipc->raio);
	if (ipc->efd != -1)
		close(ipc->efd);
	if (ipc->lockfd > 0)
		close(ipc->lockfd);
	free(ipc);
	return (NULL);
}

const char *
ipc_name(const struct ipc *ipc)
{
	return (ipc->name);
}

int
ipc_fd(const struct ipc *ipc)
{
	return (ipc->efd);
}

/* Sending. */

static void send_cb(void *);

static void
pipe_cb(nng_pipe p, nng_pipe_ev ev, void *arg)
{
	struct peer *pe = arg;

	(void)p;
	/* The socket lock is held here: only touch atomics. */
	if (ev == NNG_PIPE_EV_ADD_POST) {
		atomic_fetch_add(&pe->pipes, 1);
		atomic_store(&pe->rewind, 1);
	} else if (ev == NNG_PIPE_EV_REM_POST)
		atomic_fetch_sub(&pe->pipes, 1);
}

static struct peer *
peer_find(struct ipc *ipc, const char *name, size_t n)
{
	struct peer *p;

	for (p = ipc->peers[hash(name, n)]; p; p = p->hnext)
		if (strlen(p->name) == n && memcmp(p->name, name, n) == 0)
			return (p);
	return (NULL);
}

/* Start a dialer for p; non-blocking, so it keeps retrying in the
 * background (only NNG_ECLOSED stops it: see peer_redial). */
static int
peer_dial(struct peer *p)
{
	char url[512];
	nng_dialer d;

	if (ipc_url(p->name, url, sizeof(url)) == -1 ||
	    nng_dialer_create(&d, p->sock, url) != 0)
		return (-1);
	nng_dialer_set_size(d, NNG_OPT_RECVMAXSZ, IPC_RECVMAX);
	nng_dialer_set_ms(d, NNG_OPT_RECONNMINT, 10);
	nng_dialer_set_ms(d, NNG_OPT_RECONNMAXT, IPC_RECONN_MAX_MS);
	if (nng_dialer_start(d, NNG_FLAG_NONBLOCK) != 0) {
		nng_dialer_close(d);
		return (-1);
	}
	p->dialer = d;
	return (0);
}

/* The peer has had no pipe for IPC_REDIAL_MS: its dialer may have died
 * for good (see the top of the file), or be stuck for nng's 10 s
 * handshake timeout on a listener that never answers.  Replace it; the
 * socket, and the envelopes waiting on it, stay. */
static void
peer_redial(struct ipc *ipc, struct peer *p)
{
	nng_dialer old = p->dialer;

	if (peer_dial(p) == 0) {
		nng_dialer_close(old);
		ipc->st.redials++;
	}
}

static struct peer *
peer_get(struct ipc *ipc, const char *name, size_t n)
{
	struct peer *p;
	unsigned h;

	if ((p = peer_find(ipc, name, n)) != NULL)
		return (p);
	if (n == 0 || n >= sizeof(p->name))
		return (NULL);
	if ((p = calloc(1, sizeof(*p))) == NULL)
		return (NULL);
	memcpy(p->name, name, n);
	p->ipc = ipc;
	p->next_seq = 1;
	/* A link re-created after ipc_forget() or a long outage starts its
	 * sequence again: it must look like a new sender to the receiver,
	 * or its first envelopes would be taken for duplicates. */
	if (random_bytes(&p->inc, sizeof(p->inc)) == -1)
		p->inc = ipc->incarnation ^ (uint64_t)(uintptr_t)p;
	pthread_mutex_init(&p->mu, NULL);
	if (nng_push0_open(&p->sock) != 0) {
		free(p);
		return (NULL);
	}
	nng_pipe_notify(p->sock, NNG_PIPE_EV_ADD_POST, pipe_cb, p);
	nng_pipe_notify(p->sock, NNG_PIPE_EV_REM_POST, pipe_cb, p);
	if (nng_aio_alloc(&p->aio, send_cb, p) != 0 || peer_dial(p) == -1) {
		if (p->aio)
			nng_aio_free(p->aio);
		nng_close(p->sock);
		free(p);
		return (NULL);
	}
	/* No timeout on sends: one racing a pipe's arrival is nng #1523.
	 * nng_close() in peer_free() aborts a pending send. */
	nng_aio_set_timeout(p->aio, NNG_DURATION_INFINITE);
	p->down_since = 0; /* the tick notes when it is first seen down */
	h = hash(name, n);
	p->hnext = ipc->peers[h];
	ipc->peers[h] = p;
	return (p);
}

static int
pack_header(struct buf *b, const struct peer *p, uint64_t base)
{
	msgpack_packer pk;

	mpk_packer_init(&pk, b);
	return (msgpack_pack_array(&pk, 5) || mpk_pack_cstr(&pk, "trp") ||
	                        msgpack_pack_uint16(&pk, IPC_VERSION) ||
	                        mpk_pack_cstr(&pk, p->ipc->name) ||
	                        msgpack_pack_uint64(&pk, p->inc) ||
	                        msgpack_pack_uint64(&pk, base)
	                ? -1
	                : 0);
}

static void
batch_append(struct peer *p, struct batch *bt)
{
	bt->next = NULL;
	if (p->tail)
		p->tail->next = bt;
	else
		p->head = bt;
	p->tail = bt;
}

/* With p->mu held: the next nng message to send, or NULL.  Moves out into
 * a new batch when there is no resend pending. */
static nng_msg *
next_msg(struct peer *p, uint64_t *nsent)
{
	struct batch *bt = NULL;
	struct buf hdr = {0};
	nng_msg *m;
	int fresh = 0;

	if (p->inflight || p->closing)
		return (NULL);
	if (p->cursor != NULL) {
		bt = p->cursor;
		p->cursor = bt->next;
	} else if (p->out.len > 0) {
		if ((bt = calloc(1, sizeof(*bt))) == NULL)
			return (NULL);
		bt->b = p->out;
		bt->count = p->out_count;
		bt->last_seq = p->next_seq - 1;
		memset(&p->out, 0, sizeof(p->out));
		p->out_count = 0;
		fresh = 1;
	} else
		return (NULL);
	if (pack_header(&hdr, p, p->acked + 1) == -1 ||
	    nng_msg_alloc(&m, 0) != 0) {
		buf_free(&hdr);
		if (fresh && bt->count > 0)
			batch_append(p, bt); /* sent again on a rewind */
		else if (fresh) {
			buf_free(&bt->b);
			free(bt);
		}
		return (NULL);
	}
	nng_msg_append(m, hdr.b, hdr.len);
	nng_msg_append(m, bt->b.b, bt->b.len);
	buf_free(&hdr);
	*nsent = bt->count;
	if (fresh && bt->count > 0)
		batch_append(p, bt);
	else if (fresh) { /* only acks: nothing to keep */
		buf_free(&bt->b);
		free(bt);
	}
	p->inflight = 1;
	return (m);
}

static void
kick(struct peer *p)
{
	nng_msg *m;
	uint64_t n = 0;

	pthread_mutex_lock(&p->mu);
	m = next_msg(p, &n);
	pthread_mutex_unlock(&p->mu);
	if (m != NULL) {
		nng_aio_set_msg(p->aio, m);
		nng_send_aio(p->sock, p->aio);
	}
}

static void
send_cb(void *arg)
{
	struct peer *p = arg;
	int rv = nng_aio_result(p->aio);

	if (rv != 0) { /* kept in the batch list: resent on a rewind */
		nng_msg_free(nng_aio_get_msg(p->aio));
		nng_aio_set_msg(p->aio, NULL);
	}
	pthread_mutex_lock(&p->mu);
	p->inflight = 0;
	pthread_mutex_unlock(&p->mu);
	if (rv != NNG_ECLOSED)
		kick(p);
}

static int
pack_envelope(msgpack_packer *pk, uint16_t type, uint64_t seq,
              const struct msg_head *h, ipc_pack_fn fn, const void *body)
{
	if (msgpack_pack_array(pk, 8) ||
	    msgpack_pack_uint16(pk, IPC_VERSION) ||
	    msgpack_pack_uint16(pk, type) || msgpack_pack_uint64(pk, seq) ||
	    mpk_pack_mstr(pk, h->reqid) || mpk_pack_mstr(pk, h->traceparent) ||
	    msgpack_pack_uint64(pk, h->deadline_ms) ||
	    mpk_pack_mstr(pk, h->reply_to))
		return (-1);
	return (fn(pk, body));
}

/* With p->mu held: turn out into a batch waiting to be sent, so that no
 * nng message grows past IPC_BATCH_MAX while a send is in flight (or the
 * peer is away): a message over the receiver's RECVMAXSZ would close the
 * pipe on every attempt and jam the link. */
static void
seal_out(struct peer *p)
{
	struct batch *bt;

	if (p->out_count == 0 || (bt = calloc(1, sizeof(*bt))) == NULL)
		return;
	bt->b = p->out;
	bt->count = p->out_count;
	bt->last_seq = p->next_seq - 1;
	memset(&p->out, 0, sizeof(p->out));
	p->out_count = 0;
	batch_append(p, bt);
	if (p->cursor == NULL)
		p->cursor = bt;
}

static int
send_to(struct ipc *ipc, struct peer *p, uint16_t type,
        const struct msg_head *h, ipc_pack_fn fn, const void *body)
{
	msgpack_packer pk;
	size_t mark;
	int reliable = type != IPC_TYPE_ACK;

	pthread_mutex_lock(&p->mu);
	if (reliable && p->backlog >= (size_t)ipc->max_backlog) {
		pthread_mutex_unlock(&p->mu);
		ipc->st.send_refused++;
		return (-1);
	}
	if (p->out.len >= IPC_BATCH_MAX)
		seal_out(p);
	mark = p->out.len;
	mpk_packer_init(&pk, &p->out);
	if (pack_envelope(&pk, type, reliable ? p->next_seq : 0, h, fn,
	                  body) == -1 ||
	    p->out.len - mark > IPC_ENV_MAX) {
		p->out.len = mark;
		pthread_mutex_unlock(&p->mu);
		ipc->st.send_refused++;
		return (-1);
	}
	if (reliable) {
		if (p->backlog == 0)
			p->progress_ms = p->ack_ms = now_mono_ms();
		p->next_seq++;
		p->out_count++;
		p->backlog++;
	}
	pthread_mutex_unlock(&p->mu);
	ipc->st.env_out++;
	/* Sent at the end of this loop turn (ipc_flush), so that every
	 * envelope produced for this peer in one turn shares one nng
	 * message. */
	if (ipc->flush_hook == NULL) { /* no loop to flush for us */
		kick(p);
		return (0);
	}
	for (int i = 0; i < ipc->nlazy; i++)
		if (ipc->lazy[i] == type)
			return (0); /* leaves with the peer's next flush */
	if (!p->dirty) {
		p->dirty = 1;
		p->dnext = ipc->dirty;
		if (ipc->dirty == NULL && ipc->flush_hook)
			ipc->flush_hook(ipc->flush_arg);
		ipc->dirty = p;
	}
	return (0);
}

void
ipc_flush(struct ipc *ipc)
{
	struct peer *p;

	while ((p = ipc->dirty) != NULL) {
		ipc->dirty = p->dnext;
		p->dirty = 0;
		p->dnext = NULL;
		kick(p);
	}
}

int
ipc_set_lazy(struct ipc *ipc, uint16_t type)
{
	if (ipc->nlazy == (int)nitems(ipc->lazy))
		return (-1);
	ipc->lazy[ipc->nlazy++] = type;
	return (0);
}

void
ipc_set_flush_hook(struct ipc *ipc, void (*fn)(void *), void *arg)
{
	ipc->flush_hook = fn;
	ipc->flush_arg = arg;
}

int
ipc_send(struct ipc *ipc, const char *peer, uint16_t type,
         const struct msg_head *h, ipc_pack_fn fn, const void *body)
{
	struct peer *p;

	if ((p = peer_get(ipc, peer, strlen(peer))) == NULL)
		return (-1);
	return (send_to(ipc, p, type, h, fn, body));
}

struct ack {
	uint64_t incarnation, seq;
};

static int
ack_pack(msgpack_packer *pk, const void *v)
{
	const struct ack *a = v;

	return (msgpack_pack_array(pk, 2) ||
	                        msgpack_pack_uint64(pk, a->incarnation) ||
	                        msgpack_pack_uint64(pk, a->seq)
	                ? -1
	                : 0);
}

/* The peer acknowledged everything up to seq: free those batches. */
static void
peer_acked(struct ipc *ipc, struct peer *p, uint64_t seq)
{
	struct batch *bt;

	pthread_mutex_lock(&p->mu);
	if (seq > p->acked && seq < p->next_seq) {
		p->acked = seq;
		p->progress_ms = p->ack_ms = now_mono_ms();
		p->resend_ms = IPC_RESEND_MS;
	}
	while ((bt = p->head) != NULL && bt->last_seq <= p->acked) {
		p->head = bt->next;
		if (p->tail == bt)
			p->tail = NULL;
		if (p->cursor == bt)
			p->cursor = bt->next;
		p->backlog -= bt->count;
		buf_free(&bt->b);
		free(bt);
	}
	pthread_mutex_unlock(&p->mu);
	(void)ipc;
}

static void
peer_free(struct peer *p)
{
	struct batch *bt;
	struct peer **dp;

	for (dp = &p->ipc->dirty; *dp; dp = &(*dp)->dnext)
		if (*dp == p) {
			*dp = p->dnext;
			break;
		}
	pthread_mutex_lock(&p->mu);
	p->closing = 1;
	pthread_mutex_unlock(&p->mu);
	nng_close(p->sock);
	nng_aio_stop(p->aio);
	/* A send started on the stopped aio never calls back: its message
	 * is still attached. */
	if (nng_aio_get_msg(p->aio) != NULL)
		nng_msg_free(nng_aio_get_msg(p->aio));
	nng_aio_free(p->aio);
	while ((bt = p->head) != NULL) {
		p->head = bt->next;
		buf_free(&bt->b);
		free(bt);
	}
	buf_free(&p->out);
	pthread_mutex_destroy(&p->mu);
	free(p);
}

void
ipc_forget(struct ipc *ipc, const char *name)
{
	unsigned h = hash(name, strlen(name));
	struct peer **pp, *p;

	for (pp = &ipc->peers[h]; (p = *pp) != NULL; pp = &p->hnext) {
		if (strcmp(p->name, name) == 0) {
			*pp = p->hnext;
			peer_free(p);
			return;
		}
	}
}

size_t
ipc_total_backlog(struct ipc *ipc)
{
	size_t n = 0;

	for (size_t i = 0; i < IPC_HASH; i++)
		for (struct peer *p = ipc->peers[i]; p; p = p->hnext) {
			pthread_mutex_lock(&p->mu);
			n += p->backlog;
			pthread_mutex_unlock(&p->mu);
		}
	return (n);
}

size_t
ipc_backlog(struct ipc *ipc, const char *name)
{
	struct peer *p = peer_find(ipc, name, strlen(name));
	size_t n;

	if (p == NULL)
		return (0);
	pthread_mutex_lock(&p->mu);
	n = p->backlog;
	pthread_mutex_unlock(&p->mu);
	return (n);
}

int
ipc_connected(struct ipc *ipc, const char *name)
{
	struct peer *p = peer_get(ipc, name, strlen(name));

	return (p != NULL && atomic_load(&p->pipes) > 0);
}

void
ipc_stats(const struct ipc *ipc, struct ipc_stats *st)
{
	*st = ipc->st;
	st->nngmsg_in =
	        atomic_load(&((struct ipc *)(uintptr_t)ipc)->nngmsg_in);
	st->refused_peers =
	        atomic_load(&((struct ipc *)(uintptr_t)ipc)->refused_peers);
}

/* Receiving, on the loop thread. */

static struct sender *
sender_get(struct ipc *ipc, struct mstr name, uint64_t inc, uint64_t base)
{
	unsigned h = hash(name.p, name.n);
	struct sender *s;

	for (s = ipc->senders[h]; s; s = s->hnext)
		if (strlen(s->name) == name.n &&
		    memcmp(s->name, name.p, name.n) == 0)
			break;
	if (s == NULL) {
		if (name.n == 0 || name.n >= sizeof(s->name) ||
		    (s = calloc(1, sizeof(*s))) == NULL)
			return (NULL);
		memcpy(s->name, name.p, name.n);
		s->hnext = ipc->senders[h];
		ipc->senders[h] = s;
		s->incarnation = inc + 1; /* force the reset below */
	}
	if (s->incarnation != inc) {
		s->incarnation = inc;
		s->lo = 0;
		memset(s->win, 0, sizeof(s->win));
		s->ahead = 0;
	}
	/* Everything below base is settled at the sender. */
	while (base > 0 && s->lo < base - 1) {
		if (s->ahead == 0) {
			s->lo = base - 1;
			break;
		}
		/* shift the window by one */
		if (s->win[0] & 1)
			s->ahead--;
		for (size_t i = 0; i < nitems(s->win); i++)
			s->win[i] =
			        (s->win[i] >> 1) |
			        (i + 1 < nitems(s->win) ? s->win[i + 1] << 63
			                                : 0);
		s->lo++;
	}
	return (s);
}

/* 1 if seq is new (and record it), 0 if a duplicate or out of window. */
static int
sender_accept(struct sender *s, uint64_t seq)
{
	uint64_t off;

	if (seq <= s->lo)
		return (0);
	if (seq == s->lo + 1 && s->ahead == 0) {
		s->lo++;
		return (1);
	}
	off = seq - s->lo - 1;
	if (off >= IPC_WINDOW)
		return (0); /* too far ahead: it will be sent again */
	if (s->win[off / 64] & (1ull << (off % 64)))
		return (0);
	s->win[off / 64] |= 1ull << (off % 64);
	s->ahead++;
	while (s->win[0] & 1) {
		s->ahead--;
		for (size_t i = 0; i < nitems(s->win); i++)
			s->win[i] =
			        (s->win[i] >> 1) |
			        (i + 1 < nitems(s->win) ? s->win[i + 1] << 63
			                                : 0);
		s->lo++;
	}
	return (1);
}

int
ipc_parse_head(struct mpk_cur *c, struct ipc_batch_head *bh)
{
	struct mstr magic;
	uint64_t ver;
	uint32_t n;

	if (mpk_read_array(c, &n) == -1 || n < 5 ||
	    mpk_read_str(c, &magic) == -1 || !mstr_eq(magic, "trp") ||
	    mpk_read_u64(c, &ver) == -1 || ver != IPC_VERSION ||
	    mpk_read_str(c, &bh->sender) == -1 ||
	    mpk_read_u64(c, &bh->incarnation) == -1 ||
	    mpk_read_u64(c, &bh->base) == -1)
		return (-1);
	for (uint32_t i = 5; i < n; i++)
		if (mpk_skip(c) == -1)
			return (-1);
	return (0);
}

int
ipc_parse_envelope(struct mpk_cur *c, struct msg *m)
{
	uint64_t v, t;
	uint32_t n;
	const char *b0;

	memset(m, 0, sizeof(*m));
	if (mpk_read_array(c, &n) == -1 || n < 8 ||
	    mpk_read_u64(c, &v) == -1 || mpk_read_u64(c, &t) == -1 ||
	    t > UINT16_MAX || mpk_read_u64(c, &m->seq) == -1 ||
	    mpk_read_str(c, &m->reqid) == -1 ||
	    mpk_read_str(c, &m->traceparent) == -1 ||
	    mpk_read_u64(c, &m->deadline_ms) == -1 ||
	    mpk_read_str(c, &m->reply_to) == -1)
		return (-1);
	b0 = (const char *)c->p;
	if (mpk_skip(c) == -1)
		return (-1);
	for (uint32_t i = 8; i < n; i++)
		if (mpk_skip(c) == -1)
			return (-1);
	m->version = (uint16_t)v;
	m->type = (uint16_t)t;
	m->body = b0;
	m->body_len = (size_t)((const char *)c->p - b0);
	return (0);
}

static void
handle_nngmsg(struct ipc *ipc, nng_msg *nm)
{
	struct ipc_batch_head bh;
	struct mpk_cur c;
	struct sender *s;
	struct msg m;

	mpk_cur_init(&c, nng_msg_body(nm), nng_msg_len(nm));
	if (ipc_parse_head(&c, &bh) == -1) {
		ipc->st.bad_in++;
		return;
	}
	if ((s = sender_get(ipc, bh.sender, bh.incarnation, bh.base)) ==
	    NULL) {
		ipc->st.bad_in++;
		return;
	}
	s->last_seen_ms = now_mono_ms();
	while (mpk_left(&c) > 0) {
		if (ipc_parse_envelope(&c, &m) == -1) {
			ipc->st.bad_in++;
			return; /* cannot resynchronise: drop the rest */
		}
		m.sender = (struct mstr){s->name, (uint32_t)strlen(s->name)};
		if (m.type == IPC_TYPE_ACK) {
			struct mpk_cur ac;
			uint32_t an;
			uint64_t ainc, aseq;
			struct peer *p;

			mpk_cur_init(&ac, m.body, m.body_len);
			if (mpk_read_array(&ac, &an) == -1 || an < 2 ||
			    mpk_read_u64(&ac, &ainc) == -1 ||
			    mpk_read_u64(&ac, &aseq) == -1) {
				ipc->st.bad_in++;
				continue;
			}
			if ((p = peer_find(ipc, s->name, strlen(s->name))) &&
			    ainc == p->inc)
				peer_acked(ipc, p, aseq);
			continue;
		}
		s->need_ack = 1;
		if (!sender_accept(s, m.seq)) {
			ipc->st.dup_in++;
			continue;
		}
		ipc->st.env_in++;
		ipc->handler(ipc->arg, &m);
	}
}

int
ipc_process(struct ipc *ipc)
{
	uint64_t junk, one = 1;
	struct inq t;
	int n = 0, more, resume = 0;

	(void)!read(ipc->efd, &junk, sizeof(junk));
	if (ipc->wi == ipc->work.n) {
		pthread_mutex_lock(&ipc->qmu);
		t = ipc->q;
		ipc->work.n = 0;
		ipc->q = ipc->work;
		if (ipc->paused) {
			ipc->paused = 0;
			resume = 1;
		}
		pthread_mutex_unlock(&ipc->qmu);
		ipc->work = t;
		ipc->wi = 0;
		if (resume)
			nng_recv_aio(ipc->pull, ipc->raio);
	}
	/* A bounded share per call, so that timers (acks) still run while a
	 * flood is being worked off. */
	while (ipc->wi < ipc->work.n && n < IPC_PROCESS_MAX) {
		nng_msg *m = ipc->work.v[ipc->wi++];

		handle_nngmsg(ipc, m);
		nng_msg_free(m);
		n++;
	}
	pthread_mutex_lock(&ipc->qmu);
	more = ipc->wi < ipc->work.n || ipc->q.n > 0;
	pthread_mutex_unlock(&ipc->qmu);
	if (more)
		(void)!write(ipc->efd, &one, sizeof(one));
	return (n);
}

/* A pipe was accepted by our mailbox: if it comes from this very process
 * it is the listener probe (ipc:// tells the peer's pid; over tcp:// any
 * accepted pipe shows the accept loop is alive). */
static void
mailbox_pipe_cb(nng_pipe p, nng_pipe_ev ev, void *arg)
{
	struct ipc *ipc = arg;
	int pid;

	/* The socket lock is held here: only touch atomics and the pipe. */
	if (ev != NNG_PIPE_EV_ADD_POST || !ipc->probing)
		return;
	if (nng_pipe_get_int(p, NNG_OPT_IPC_PEER_PID, &pid) != 0 ||
	    pid == (int)getpid())
		atomic_store(&ipc->probe_ok, 1);
}

/* Every IPC_PROBE_EVERY_MS, dial our own mailbox and wait until the
 * *listening* side has accepted that pipe; if it does not within
 * IPC_PROBE_WAIT_MS, nng's accept loop has died (nng #1518): its
 * transport may still finish handshakes, so the dialing side's view
 * proves nothing.  Make a new listener.  The probe is closed only after
 * both sides finished the handshake, so it cannot itself trigger the
 * bug. */
static void
probe_listener(struct ipc *ipc, uint64_t now)
{
	if (!ipc->probing) {
		if (now < ipc->probe_at)
			return;
		if (nng_push0_open(&ipc->probe) != 0)
			return;
		atomic_store(&ipc->probe_ok, 0);
		ipc->probing = 1;
		if (nng_dial(ipc->probe, ipc->url, NULL, NNG_FLAG_NONBLOCK)) {
			nng_close(ipc->probe);
			ipc->probing = 0;
			ipc->probe_at = now + IPC_PROBE_EVERY_MS;
			return;
		}
		ipc->probe_at = now + IPC_PROBE_WAIT_MS;
		return;
	}
	if (!atomic_load(&ipc->probe_ok) && now < ipc->probe_at)
		return;
	ipc->probing = 0;
	nng_close(ipc->probe);
	if (!atomic_load(&ipc->probe_ok)) {
		nng_listener_close(ipc->listener);
		if (listen_mailbox(ipc) == 0)
			ipc->st.listener_restarts++;
	}
	ipc->probe_at = now + IPC_PROBE_EVERY_MS;
}

/* A connected peer that has acknowledged nothing for IPC_STALL_MS while
 * envelopes wait: its pipe may lead nowhere (a listener whose accept loop
 * died after the handshake, nng #1518) and resends into it do not help.
 * A new dialer closes that pipe; at most every IPC_STALL_MS. */
static int
peer_stalled(struct peer *p, uint64_t now)
{
	int stalled;

	pthread_mutex_lock(&p->mu);
	stalled = p->head != NULL && now > p->ack_ms &&
	          now - p->ack_ms >= IPC_STALL_MS && now >= p->redial_at;
	pthread_mutex_unlock(&p->mu);
	return (stalled);
}

void
ipc_tick(struct ipc *ipc)
{
	uint64_t now = now_mono_ms();
	struct msg_head h = {MSTR_NULL, MSTR_NULL, 0, MSTR_NULL};

	/* Acknowledge what arrived since the last tick; forget senders
	 * silent for long (troupectl-<pid> mailboxes come and go). */
	for (size_t i = 0; i < IPC_HASH; i++) {
		struct sender **sp = &ipc->senders[i], *s;

		while ((s = *sp) != NULL) {
			struct ack a = {s->incarnation, s->lo};
			struct peer *p;

			if (!s->need_ack && now > s->last_seen_ms &&
			    now - s->last_seen_ms > IPC_PEER_GC_MS) {
				*sp = s->hnext;
				free(s);
				continue;
			}
			sp = &s->hnext;
			if (!s->need_ack)
				continue;
			s->need_ack = 0;
			if ((p = peer_get(ipc, s->name, strlen(s->name))))
				(void)send_to(ipc, p, IPC_TYPE_ACK, &h,
				              ack_pack, &a);
		}
	}
	/* Resend after a reconnection or a silence; forget the long gone. */
	for (size_t i = 0; i < IPC_HASH; i++) {
		struct peer **pp = &ipc->peers[i], *p;

		while ((p = *pp) != NULL) {
			int up = atomic_load(&p->pipes) > 0, again = 0;

			if (up)
				p->down_since = 0;
			else if (p->down_since == 0) {
				p->down_since = now;
				p->redial_at = now + IPC_REDIAL_MS;
			} else if (now >= p->redial_at) {
				peer_redial(ipc, p);
				p->redial_at = now + IPC_REDIAL_MS;
			}
			pthread_mutex_lock(&p->mu);
			if (p->resend_ms == 0)
				p->resend_ms = IPC_RESEND_MS;
			if (p->head != NULL &&
			    atomic_exchange(&p->rewind, 0)) {
				again = 1; /* a new pipe: send it all again */
				p->ack_ms = now; /* and give it time to ack */
			} else if (p->head != NULL &&
			           now - p->progress_ms >= p->resend_ms) {
				again = 1; /* silence: again, backing off */
				p->resend_ms =
				        p->resend_ms * 2 > IPC_RESEND_MAX_MS
				                ? IPC_RESEND_MAX_MS
				                : p->resend_ms * 2;
			}
			if (again) {
				for (struct batch *b = p->head; b; b = b->next)
					ipc->st.resent += b->count;
				p->cursor = p->head;
				p->progress_ms = now;
			}
			if (p->out.len > 0)
				again = 1; /* lazy envelopes wait for the tick
				            */
			pthread_mutex_unlock(&p->mu);
			if (again)
				kick(p);
			if (up && peer_stalled(p, now)) {
				peer_redial(ipc, p);
				ipc->st.stalls++;
				p->redial_at = now + IPC_STALL_MS;
			}
			if (!up && p->down_since && now > p->down_since &&
			    now - p->down_since >= IPC_PEER_GC_MS) {
				*pp = p->hnext;
				peer_free(p);
				continue;
			}
			pp = &p->hnext;
		}
	}
	probe_listener(ipc, now);
	ipc_flush(ipc);
}

void
ipc_close(struct ipc *ipc)
{
	if (ipc == NULL)
		return;
	if (ipc->probing)
		nng_close(ipc->probe);
	nng_close(ipc->pull);
	nng_aio_stop(ipc->raio);
	nng_aio_free(ipc->raio);
	for (size_t i = 0; i < IPC_HASH; i++) {
		struct peer *p, *n;
		struct sender *s, *sn;

		for (p = ipc->peers[i]; p; p = n) {
			n = p->hnext;
			peer_free(p);
		}
		for (s = ipc->senders[i]; s; s = sn) {
			sn = s->hnext;
			free(s);
		}
	}
	for (size_t i = 0; i < ipc->q.n; i++)
		nng_msg_free(ipc->q.v[i]);
	for (size_t i = ipc->wi; i < ipc->work.n; i++)
		nng_msg_free(ipc->work.v[i]);
	free(ipc->q.v);
	free(ipc->work.v);
	close(ipc->efd);
	if (ipc->lockfd >= 0)
		close(ipc->lockfd);
	free(ipc);
}
