/* SPDX-License-Identifier: ISC */
/*
 * worker_dispatch: the worker's envelopes, one switch per peer (relayd's
 * pfe_dispatch_*).  A case decodes the body and calls one function of
 * worker_run.c.  An envelope from a peer the worker does not talk to, of
 * a type that peer may not send, or that does not decode is counted and
 * logged (at most once a second) and dropped, never fatal: during a
 * rolling upgrade two builds meet.
 */
#include "worker.h"

static const struct peer {
	enum proc kind;
	int (*dispatch)(struct worker *, const struct msg *);
} peers[] = {
        {PROC_DISPATCHER, worker_dispatch_dispatcher},
        {PROC_STORAGE, worker_dispatch_storage},
};

int
worker_dispatch_dispatcher(struct worker *w, const struct msg *m)
{
	struct chat_request q;

	switch (m->type) {
	case MSG_RUN_ASSIGN:
		if (chat_request_unpack(m, &q) == -1) {
			worker_run_reject(w, m);
			return (DISPATCH_BAD);
		}
		worker_run_assign(w, m, &q);
		break;
	case MSG_RUN_CANCEL:
		if (chat_request_unpack(m, &q) == -1)
			return (DISPATCH_BAD);
		worker_run_cancel(w, m, &q);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
worker_dispatch_storage(struct worker *w, const struct msg *m)
{
	struct ctx_reply c;

	switch (m->type) {
	case MSG_CTX_REPLY:
		if (ctx_reply_unpack(m, &c) == -1) {
			/* Fail the run it belongs to, if any. */
			worker_run_ctx(w, m, NULL);
			return (DISPATCH_BAD);
		}
		worker_run_ctx(w, m, &c);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

void
worker_dispatch(void *arg, const struct msg *m)
{
	struct worker *w = arg;
	enum proc from = proc_of(m->sender);
	int rc = DISPATCH_UNHANDLED;
	const char *name;

	if (msg_route_ok(m->type, from, PROC_WORKER)) {
		for (size_t i = 0; i < nitems(peers); i++)
			if (peers[i].kind == from) {
				rc = peers[i].dispatch(w, m);
				break;
			}
	}
	if (rc == DISPATCH_OK)
		return;
	if (w->m_bad_msg != NULL)
		(*w->m_bad_msg)++;
	if (worker_warn_ok(w)) {
		name = msg_name(m->type);
		log_warnx("%s: %s %s (type 0x%04x) from %.*s dropped",
		          __func__,
		          rc == DISPATCH_BAD ? "undecodable" : "unexpected",
		          name ? name : "unknown", m->type, (int)m->sender.n,
		          m->sender.p);
	}
}
