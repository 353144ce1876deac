/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_dispatch: one switch per peer of troupe-dispatcher (relayd's
 * pfe_dispatch_*): auth (CHAT_RUN, CHAT_CANCEL), workers (WORKER_HELLO,
 * RUN_DONE), edges (CLIENT_GONE), storage (HEALTH), telemetry (SLA_SIGNAL)
 * and troupectl (ADMIN_REQUEST).  A case decodes the body and calls one
 * function named after the message; the work lives in dispatcher_run.c and
 * dispatcher_spawn.c.  Returns DISPATCH_BAD for a body that does not
 * decode and DISPATCH_UNHANDLED for a type not expected from the peer;
 * dispatcher.c counts and logs both.  Never logs, never exits.
 */
#include "dispatcher.h"

int
dispatcher_dispatch_auth(struct dispatcher *d, const struct msg *m)
{
	struct chat_request req;

	switch (m->type) {
	case MSG_CHAT_RUN:
		if (chat_request_unpack(m, &req) == -1)
			return (DISPATCH_BAD);
		dispatcher_run_chat(d, m, &req);
		break;
	case MSG_CHAT_CANCEL:
		if (chat_request_unpack(m, &req) == -1)
			return (DISPATCH_BAD);
		dispatcher_run_cancel(d, m, &req);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
dispatcher_dispatch_worker(struct dispatcher *d, const struct msg *m)
{
	struct worker_hello hello;
	struct run_done done;
	int slot;

	/* Only "worker-<k>" names a slot we may have started. */
	if ((slot = dispatcher_spawn_slot_of(m->sender,
	                                     DISPATCHER_SLOTS_MAX)) == -1)
		return (DISPATCH_BAD);
	switch (m->type) {
	case MSG_WORKER_HELLO:
		if (worker_hello_unpack(m, &hello) == -1)
			return (DISPATCH_BAD);
		dispatcher_spawn_hello(d, slot, &hello);
		break;
	case MSG_RUN_DONE:
		if (run_done_unpack(m, &done) == -1)
			return (DISPATCH_BAD);
		dispatcher_run_done(d, slot, m, &done);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
dispatcher_dispatch_edge(struct dispatcher *d, const struct msg *m)
{
	struct chat_request req;

	switch (m->type) {
	case MSG_CLIENT_GONE:
		if (chat_request_unpack(m, &req) == -1)
			return (DISPATCH_BAD);
		dispatcher_run_gone(d, m, &req);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
dispatcher_dispatch_storage(struct dispatcher *d, const struct msg *m)
{
	struct health_report h;

	switch (m->type) {
	case MSG_HEALTH:
		if (health_report_unpack(m, &h) == -1)
			return (DISPATCH_BAD);
		dispatcher_tier_health(d, &h);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
dispatcher_dispatch_telemetry(struct dispatcher *d, const struct msg *m)
{
	struct sla_signal s;

	switch (m->type) {
	case MSG_SLA_SIGNAL:
		if (sla_signal_unpack(m, &s) == -1)
			return (DISPATCH_BAD);
		dispatcher_tier_sla(d, &s);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
dispatcher_dispatch_tool(struct dispatcher *d, const struct msg *m)
{
	struct admin_request req;

	switch (m->type) {
	case MSG_ADMIN_REQUEST:
		if (admin_request_unpack(m, &req) == -1)
			return (DISPATCH_BAD);
		dispatcher_status_admin(d, m, &req);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
