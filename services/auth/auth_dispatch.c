/* SPDX-License-Identifier: ISC */
/*
 * auth_dispatch: what troupe-auth does with each message, one dispatch
 * function per peer (auth.c's peer table calls them on the loop thread).
 *
 * CHAT_REQUEST from an edge: past its deadline, CHAT_REPLY 504/5040; a
 * token auth_token.c refuses, CHAT_REPLY 401/4100 with its reason; else
 * CHAT_RUN to the dispatcher, same body with the token emptied and sub set,
 * reply_to still the edge; if the dispatcher's link refuses it, CHAT_REPLY
 * 503/5030 with retry_after 1.  Every answer goes to the request's
 * reply_to.  Stateless, so a request sent again after an edge restart is
 * simply checked again.
 *
 * DIAGNOSTICS: per-request outcomes are logged at debug level only (a
 * flood of bad tokens must not flood the journal) and counted; a reply the
 * edge link refuses is counted and logged at debug (the edge answers 504
 * by itself).  Never exits.
 */
#include <string.h>

#include "auth.h"
#include "log.h"
#include "proto.h"
#include "util.h"

static void
auth_reply(struct auth *a, const struct msg *m, const char *to,
           uint64_t status, int64_t code, const char *text,
           uint64_t retry_after)
{
	struct chat_reply r;
	struct msg_head h;

	r.status = status;
	r.code = code;
	r.msg = MSTR(text);
	r.data = MSTR_NULL;
	r.retry_after = retry_after;
	h = msg_head_reply(m, NULL);
	if (msg_send_chat_reply(a->svc.ipc, to, &h, &r) == -1) {
		(*a->st.reply_lost)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, MSTR_NULL,
		        "%s: link to %s refused the %llu reply", __func__, to,
		        (unsigned long long)status);
	}
}

static void
auth_chat_request(struct auth *a, const struct msg *m,
                  const struct chat_request *req)
{
	char to[AUTH_NAME_MAX];
	struct chat_request run = {0};
	struct auth_claims cl;
	struct msg_head h;
	enum auth_token_verdict v;
	const char *why;
	uint64_t now;

	if (m->reply_to.n == 0 || m->reply_to.n >= sizeof(to) ||
	    memchr(m->reply_to.p, '\0', m->reply_to.n) != NULL) {
		(*a->st.dropped_no_reply)++;
		if (!a->warned_no_reply) {
			a->warned_no_reply = 1;
			log_warnx("%s: dropped a CHAT_REQUEST from %.*s with "
			          "no usable reply_to; further ones only "
			          "counted",
			          __func__, (int)m->sender.n, m->sender.p);
		}
		return;
	}
	memcpy(to, m->reply_to.p, m->reply_to.n);
	to[m->reply_to.n] = '\0';

	now = now_wall_ms();
	if (m->deadline_ms != 0 && now >= m->deadline_ms) {
		(*a->st.deadline)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "deadline passed %llu ms ago",
		        (unsigned long long)(now - m->deadline_ms));
		auth_reply(a, m, to, 504, 5040, "deadline exceeded", 0);
		return;
	}

	v = auth_token_verify(a->tok, req->token.p, req->token.n,
	                      (int64_t)(now / 1000), &cl, &why);
	(*a->st.verdicts[v])++;
	if (v == AUTH_TOKEN_INTERNAL) {
		log_req(LOG_L_WARN, m->reqid, m->traceparent, req->bot_id,
		        "%s: token check failed: %s", __func__, why);
		auth_reply(a, m, to, 500, 5000, "internal error", 0);
		return;
	}
	if (v != AUTH_TOKEN_OK) {
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "token refused: %s", why);
		auth_reply(a, m, to, 401, 4100, why, 0);
		return;
	}

	run = *req;
	run.token = MSTR_NULL;
	run.sub = (struct mstr){cl.sub, (uint32_t)cl.sub_len};
	/* The dispatcher and the worker answer the edge, not us. */
	h = msg_head_reply(m, NULL);
	h.reply_to = m->reply_to;
	if (msg_send_chat_run(a->svc.ipc, "dispatcher", &h, &run) == -1) {
		(*a->st.unavailable)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "dispatcher link full: 503");
		auth_reply(a, m, to, 503, 5030, "service unavailable", 1);
		return;
	}
	(*a->st.forwarded)++;
	log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
	        "sub %s: sent to the dispatcher", cl.sub);
}

int
auth_dispatch_edge(struct auth *a, const struct msg *m)
{
	struct chat_request req;

	switch (m->type) {
	case MSG_CHAT_REQUEST:
		if (chat_request_unpack(m, &req) == -1)
			return (DISPATCH_BAD);
		auth_chat_request(a, m, &req);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
