/* SPDX-License-Identifier: ISC */
/*
 * storage_dispatch: one switch per peer kind (STYLE.md §3).  Each case
 * decodes the body and calls the one function named after the message;
 * the work lives in storage_ctx.c, storage_commit.c, storage_bots.c,
 * storage_chat.c, storage_keys.c and storage_plugins.c.  Peers: workers
 * (CTX_GET, CHAT_PERSIST), troupectl (ADMIN_REQUEST; key.* ops go to
 * storage_keys.c, plugin.* ops to storage_plugins.c), auth (CHAT_QUERY,
 * KEY_CHECK, LIMIT_CHECK: storage_limit.c), the dispatcher (CHAT_QUERY).
 * Callers: storage.c's peer table, on the loop thread.  An undecodable
 * body is answered with an error where the message says where to, and
 * reported as DISPATCH_BAD; a type this peer may not send here is
 * DISPATCH_UNHANDLED (storage.c counts and logs both).  Never blocks.
 */
#include <string.h>

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
		if (ar.op.n > 4 && memcmp(ar.op.p, "key.", 4) == 0)
			storage_keys_admin(st, m, &ar);
		else if (ar.op.n > 7 && memcmp(ar.op.p, "plugin.", 7) == 0)
			storage_plugins_admin(st, m, &ar);
		else
			storage_bots_admin(st, m, &ar);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

/* CHAT_QUERY comes from auth (retrieve, list) and the dispatcher (the
 * cancel of a chat no worker runs). */
static int
dispatch_query(struct storage *st, const struct msg *m)
{
	struct chat_request cr;

	if (chat_request_unpack(m, &cr) == -1) {
		storage_chat_query_bad(st, m);
		return (DISPATCH_BAD);
	}
	storage_chat_query(st, m, &cr);
	return (DISPATCH_OK);
}

int
storage_dispatch_auth(struct storage *st, const struct msg *m)
{
	struct key_check kc;
	struct limit_check lc;

	switch (m->type) {
	case MSG_CHAT_QUERY:
		return (dispatch_query(st, m));
	case MSG_KEY_CHECK:
		if (key_check_unpack(m, &kc) == -1)
			return (DISPATCH_BAD);
		storage_keys_check(st, m, &kc);
		break;
	case MSG_LIMIT_CHECK:
		if (limit_check_unpack(m, &lc) == -1)
			return (DISPATCH_BAD);
		storage_limit_check(st, m, &lc);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}

int
storage_dispatch_dispatcher(struct storage *st, const struct msg *m)
{
	struct tier_state ts;

	switch (m->type) {
	case MSG_CHAT_QUERY:
		return (dispatch_query(st, m));
	case MSG_TIER_STATE:
		if (tier_state_unpack(m, &ts) == -1)
			return (DISPATCH_BAD);
		storage_health_tier(st, &ts);
		return (DISPATCH_OK);
	default:
		return (DISPATCH_UNHANDLED);
	}
}
