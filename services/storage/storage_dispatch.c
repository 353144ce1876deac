/* SPDX-License-Identifier: ISC */
/*
 * storage_dispatch: one switch per peer kind (STYLE.md §3).  Each case
 * decodes the body and calls the one function named after the message;
 * the work lives in storage_ctx.c, storage_commit.c and storage_bots.c.
 * Callers: storage.c's peer table, on the loop thread.  An undecodable
 * body is answered with an error where the message says where to, and
 * reported as DISPATCH_BAD; a type this peer may not send here is
 * DISPATCH_UNHANDLED (storage.c counts and logs both).  Never blocks.
 */
#include "storage.h"

int
storage_dispatch_worker(struct storage *st, const struct msg *m)
{
	struct ctx_get cg;
	struct chat_persist cp;

	switch (m->type) {
	case MSG_CTX_GET:
		if (ctx_get_unpack(m, &cg) == -1) {
			storage_ctx_bad(st, m);
			return (DISPATCH_BAD);
		}
		storage_ctx_get(st, m, &cg);
		break;
	case MSG_CHAT_PERSIST:
		if (chat_persist_unpack(m, &cp) == -1) {
			storage_commit_bad(st, m);
			return (DISPATCH_BAD);
		}
		storage_commit_persist(st, m, &cp);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
storage_dispatch_tool(struct storage *st, const struct msg *m)
{
	struct admin_request ar;

	switch (m->type) {
	case MSG_ADMIN_REQUEST:
		if (admin_request_unpack(m, &ar) == -1) {
			storage_bots_admin_bad(st, m);
			return (DISPATCH_BAD);
		}
		storage_bots_admin(st, m, &ar);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
