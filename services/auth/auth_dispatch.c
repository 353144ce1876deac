/* SPDX-License-Identifier: ISC */
/*
 * auth_dispatch: what troupe-auth does with each message, one dispatch
 * function per peer (auth.c's peer table calls them on the loop thread).
 *
 * CHAT_REQUEST from an edge: past its deadline, CHAT_REPLY 504/5040; an
 * unknown route, 400/4000.  Route v1.chat takes a JWT only; v3.chat,
 * v3.retrieve, v3.list and v3.cancel take a JWT or an API key (`pat_`).
 * A token auth_token.c refuses gets 401/4100 with its reason.  An API key
 * is looked up by its SHA-256 in auth_key.c's table: a fresh answer is
 * used at once; otherwise the request is parked and one KEY_CHECK per
 * hash goes to storage, whose KEY_REPLY (or its silence) settles every
 * request parked on it.  A key lacking the route's scope gets 403/4101.
 * Then the request is forwarded with the token emptied and sub and scopes
 * set, head unchanged (reply_to still the edge): CHAT_RUN (v1.chat,
 * v3.chat) or CHAT_CANCEL (v3.cancel) to the dispatcher, CHAT_QUERY
 * (v3.retrieve, v3.list) to storage.  Before that, a route with an
 * inbound limit ([limits], auth_limit.c) is checked: one LIMIT_CHECK to
 * storage for "<sub>|<bot_id>|<route>".  In enforce mode the request waits
 * (at most [limits] check_ms) for LIMIT_REPLY: allowed, it goes on;
 * limited, 429/4020 with Retry-After and the RateLimit and
 * RateLimit-Policy field values in CHAT_REPLY (the edge writes the
 * headers); unknown (Redis down, no answer in time, storage link full),
 * it goes on (on_redis_down open) or gets 503/5030 with retry_after 1
 * (closed).  In shadow mode the request goes on at once and the answer is
 * only counted.  A rate of 0 (the default) sends nothing to storage.  A
 * next hop whose link refuses gives 503/5030 with retry_after 1.  Every answer
 * goes to the request's reply_to.  Route webhook.execute (POST
 * /api/v1/execute) carries no token: the edge checked its signature; it goes
 * to the dispatcher as a CHAT_RUN with sub "webhook".
 *
 * DIAGNOSTICS: per-request outcomes are logged at debug level only (a
 * flood of bad tokens must not flood the journal) and counted; a reply the
 * edge link refuses is counted and logged at debug (the edge answers 504
 * by itself).  Never exits.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "log.h"
#include "proto.h"
#include "util.h"
#include "trace.h"

enum auth_route {
	ROUTE_UNKNOWN,
	ROUTE_V1_CHAT,
	ROUTE_V3_CHAT,
	ROUTE_V3_RETRIEVE,
	ROUTE_V3_LIST,
	ROUTE_V3_CANCEL,
	ROUTE_WEBHOOK, /* webhook.execute: signed, checked by the edge */
};

static enum auth_route
auth_route_of(struct mstr r)
{
	if (mstr_eq(r, "v1.chat"))
		return (ROUTE_V1_CHAT);
	if (mstr_eq(r, "v3.chat"))
		return (ROUTE_V3_CHAT);
	if (mstr_eq(r, "v3.retrieve"))
		return (ROUTE_V3_RETRIEVE);
	if (mstr_eq(r, "v3.list"))
		return (ROUTE_V3_LIST);
	if (mstr_eq(r, "v3.cancel"))
		return (ROUTE_V3_CANCEL);
	if (mstr_eq(r, "webhook.execute"))
		return (ROUTE_WEBHOOK);
	return (ROUTE_UNKNOWN);
}

/* The scope an API key needs for a route. */
static const char *
auth_route_scope(enum auth_route r)
{
	return (r == ROUTE_V3_RETRIEVE || r == ROUTE_V3_LIST ? "read"
	                                                     : "chat");
}

/* CHAT_REPLY to the edge, with the RateLimit and RateLimit-Policy field
 * values (NULL: none). */
static void
auth_reply_rl(struct auth *a, const struct msg_head *in, const char *to,
              uint64_t status, int64_t code, const char *text,
              uint64_t retry_after, const char *rl, const char *policy)
{
	struct chat_reply r = {0};
	struct msg_head h = *in;

	r.status = status;
	r.code = code;
	r.msg = MSTR(text);
	r.data = MSTR_NULL;
	r.retry_after = retry_after;
	r.ratelimit = rl != NULL ? MSTR(rl) : MSTR_NULL;
	r.ratelimit_policy = policy != NULL ? MSTR(policy) : MSTR_NULL;
	h.reply_to = MSTR_NULL;
	if (trace_enabled) { /* auth answered itself: its span ends here */
		struct trace_span ts = {.name = "auth",
		                        .kind = TRACE_INTERNAL,
		                        .start_ns = trace_in_ns,
		                        .http_status = (int)status,
		                        .error = status >= 500,
		                        .note = r.msg};
		char ctp[TRACE_TP_LEN];

		if (trace_child(in->traceparent, "auth", 0, ctp) == 0)
			trace_end((struct mstr){ctp, TRACE_TP_LEN},
			          in->traceparent, &ts);
	}
	if (msg_send_chat_reply(a->svc.ipc, to, &h, &r) == -1) {
		(*a->st.reply_lost)++;
		log_req(LOG_L_DEBUG, h.reqid, h.traceparent, MSTR_NULL,
		        "%s: link to %s refused the %llu reply", __func__, to,
		        (unsigned long long)status);
	}
}

static void
auth_reply(struct auth *a, const struct msg_head *in, const char *to,
           uint64_t status, int64_t code, const char *text,
           uint64_t retry_after)
{
	auth_reply_rl(a, in, to, status, code, text, retry_after, NULL, NULL);
}

/*
 * The request is authenticated as sub with scopes, its scope and limit
 * checked: send it on.  in is the request's head; to its edge.
 */
static void
auth_send_on(struct auth *a, const struct msg_head *in, const char *to,
             const struct chat_request *req, struct mstr sub,
             struct mstr scopes)
{
	enum auth_route route = auth_route_of(req->route);
	struct chat_request fwd;
	struct msg_head h = *in;
	const char *peer;
	uint64_t *ctr;
	int rc;
	char ctp[TRACE_TP_LEN];

	if (trace_enabled && trace_child(in->traceparent, "auth", 0, ctp) == 0)
		h.traceparent = (struct mstr){ctp, TRACE_TP_LEN};
	fwd = *req;
	fwd.token = MSTR_NULL;
	fwd.sub = sub;
	fwd.scopes = scopes;
	/* The next hop answers the edge, not us. */
	h.reply_to = MSTR(to);
	switch (route) {
	case ROUTE_V3_CANCEL:
		peer = "dispatcher";
		ctr = a->st.fwd_cancel;
		rc = msg_send_chat_cancel(a->svc.ipc, peer, &h, &fwd);
		break;
	case ROUTE_V3_RETRIEVE:
	case ROUTE_V3_LIST:
		peer = "storage";
		ctr = a->st.fwd_query;
		rc = msg_send_chat_query(a->svc.ipc, peer, &h, &fwd);
		break;
	default:
		peer = "dispatcher";
		ctr = a->st.fwd_run;
		rc = msg_send_chat_run(a->svc.ipc, peer, &h, &fwd);
		break;
	}
	if (rc == -1) {
		(*a->st.unavailable)++;
		log_req(LOG_L_DEBUG, in->reqid, in->traceparent, req->bot_id,
		        "%s link full: 503", peer);
		auth_reply(a, in, to, 503, 5030, "service unavailable", 1);
		return;
	}
	(*ctr)++;
	if (trace_enabled) {
		struct trace_span ts = {.name = "auth",
		                        .kind = TRACE_INTERNAL,
		                        .start_ns = trace_in_ns,
		                        .route = req->route,
		                        .bot_id = req->bot_id};
		trace_end(h.traceparent, in->traceparent, &ts);
	}
	log_req(LOG_L_DEBUG, in->reqid, in->traceparent, req->bot_id,
	        "sub %.*s: %.*s sent to %s", (int)sub.n, sub.p,
	        (int)req->route.n, req->route.p, peer);
}

/* Arm the limit timer for the oldest check, or stop it. */
static void
auth_lim_arm(struct auth *a)
{
	uint64_t due = auth_limits_next(&a->lims), now;

	if (due == 0) {
		loop_timer_stop(a->lim_timer);
		return;
	}
	now = loop_now(a->svc.loop);
	loop_timer_set(a->lim_timer, due > now ? (int64_t)(due - now) : 0);
}

/* Storage could not tell (Redis down, silent, link full): log the first
 * of a run, then admit or refuse per on_redis_down.  body: the request
 * (NULL for a shadow check, already sent on). */
static void
auth_lim_unknown(struct auth *a, const struct msg_head *in, const char *to,
                 const struct chat_request *req, struct mstr sub,
                 struct mstr scopes, int shadow)
{
	int open = a->lims.lt_conf.fail_open || shadow;

	if (!a->lim_failing) {
		a->lim_failing = 1;
		log_warnx("limits: storage cannot check them (Redis down or "
		          "slow?): %s until it can",
		          shadow ? "shadow mode, counting nothing"
		          : open ? "admitting every request (on_redis_down "
		                   "open)"
		                 : "refusing limited routes with 503 "
		                   "(on_redis_down closed)");
	}
	if (shadow)
		return;
	if (open) {
		(*a->st.lim_open)++;
		auth_send_on(a, in, to, req, sub, scopes);
		return;
	}
	(*a->st.lim_closed)++;
	auth_reply(a, in, to, 503, 5030, "rate limiter unavailable", 1);
}

/* A parked check storage did not answer (unknown, or past check_ms):
 * decode the parked request and apply on_redis_down; frees l. */
static void
auth_lim_untold(struct auth *a, struct auth_lim *l)
{
	struct chat_request req = {0};

	if (!l->l_shadow &&
	    chat_request_decode(l->l_body, l->l_body_len, &req) == -1)
		auth_reply(a, &l->l_head, l->l_to, 500, 5000, "internal error",
		           0);
	else
		auth_lim_unknown(a, &l->l_head, l->l_to, &req, l->l_sub,
		                 l->l_scopes, l->l_shadow);
	free(l);
}

/* A request whose route has a limit: enforce parks it until storage's
 * LIMIT_REPLY; shadow sends it on at once and only counts the answer. */
static void
auth_limit(struct auth *a, const struct msg_head *in, const char *to,
           const struct chat_request *req, struct mstr sub, struct mstr scopes,
           int route, const char *body, size_t body_len)
{
	int shadow = a->lims.lt_conf.mode == AUTH_LIMIT_SHADOW;
	const struct auth_limit_rate *lr;
	char key[AUTH_LIMIT_KEY_MAX + 1];
	struct limit_check lc = {0};
	struct auth_lim *l;
	struct msg_head h;
	int kn;

	lr = auth_limit_rate(&a->lims.lt_conf, route);
	if (shadow)
		auth_send_on(a, in, to, req, sub, scopes);
	if ((kn = auth_limit_key(key, sub, req->bot_id,
	                         auth_limit_routes[route])) == -1 ||
	    (l = auth_limits_park(&a->lims, in, to, route, shadow,
	                          (struct mstr){key, (uint32_t)kn}, sub,
	                          scopes, body, body_len,
	                          loop_now(a->svc.loop))) == NULL) {
		(*a->st.lim_park_full)++;
		log_req(LOG_L_DEBUG, in->reqid, in->traceparent, req->bot_id,
		        "limit check not possible (%zu waiting, key of %d "
		        "bytes): 503",
		        a->lims.lt_count, kn);
		if (!shadow)
			auth_reply(a, in, to, 503, 5030, "service unavailable",
			           1);
		return;
	}
	lc.key = l->l_key;
	lc.limit = lr->rate;
	lc.window_ms = lr->window_ms;
	lc.burst = lr->burst;
	lc.cost = 1;
	h = *in;
	h.deadline_ms = now_wall_ms() + a->lims.lt_conf.check_ms;
	h.reply_to = MSTR(a->svc.name);
	if (msg_send_limit_check(a->svc.ipc, "storage", &h, &lc) == -1) {
		(*a->st.lim_send_failed)++;
		l = auth_limits_take(&a->lims, in->reqid,
		                     (struct mstr){key, (uint32_t)kn});
		free(l);
		auth_lim_unknown(a, in, to, req, sub, scopes, shadow);
		return;
	}
	if (!loop_timer_armed(a->lim_timer))
		auth_lim_arm(a);
}

/*
 * The request is authenticated as sub with scopes: check the route's
 * scope, then its limit, then send it on.  in is the request's head; to
 * its edge; body the encoded request (kept while a limit check waits).
 */
static void
auth_forward(struct auth *a, const struct msg_head *in, const char *to,
             const struct chat_request *req, struct mstr sub,
             struct mstr scopes, const char *body, size_t body_len)
{
	enum auth_route route = auth_route_of(req->route);
	const char *need = auth_route_scope(route);
	char why[64];
	int lr;

	if (!auth_key_scope_ok(scopes, need)) {
		(*a->st.scope)++;
		snprintf(why, sizeof(why), "API key lacks the %s scope", need);
		log_req(LOG_L_DEBUG, in->reqid, in->traceparent, req->bot_id,
		        "sub %.*s: %s", (int)sub.n, sub.p, why);
		auth_reply(a, in, to, 403, 4101, why, 0);
		return;
	}
	lr = auth_limit_route(req->route);
	if (auth_limit_rate(&a->lims.lt_conf, lr) != NULL) {
		auth_limit(a, in, to, req, sub, scopes, lr, body, body_len);
		return;
	}
	auth_send_on(a, in, to, req, sub, scopes);
}

/* Answer every request in l (parked on a key check) with an error. */
static void
auth_fail_parked(struct auth *a, struct auth_park_list *l, uint64_t status,
                 int64_t code, const char *text, uint64_t retry_after)
{
	struct auth_park *p;

	while ((p = TAILQ_FIRST(l)) != NULL) {
		TAILQ_REMOVE(l, p, p_link);
		auth_reply(a, &p->p_head, p->p_to, status, code, text,
		           retry_after);
		free(p);
	}
}

/* The key check for k failed (storage refused, silent, or our send
 * failed): 503 for everything parked on it, and forget it. */
static void
auth_key_give_up(struct auth *a, struct auth_key *k)
{
	struct auth_park_list l = TAILQ_HEAD_INITIALIZER(l);

	*a->st.key_unavailable += k->k_nparked;
	auth_keys_take(&a->keys, k, &l);
	auth_keys_remove(&a->keys, k);
	auth_fail_parked(a, &l, 503, 5030, "service unavailable", 1);
}

/* A request carrying an API key: use the cached answer, or park it on
 * the (maybe new) check of its hash. */
static void
auth_key_request(struct auth *a, const struct msg *m,
                 const struct chat_request *req, const char *to)
{
	struct msg_head in = msg_head_reply(m, NULL);
	char hash[AUTH_KEY_HASH_LEN + 1];
	struct key_check kc = {0};
	struct msg_head h;
	struct auth_key *k;
	uint64_t now = loop_now(a->svc.loop);
	int fresh = 0;

	if (req->token.n > AUTH_KEY_TEXT_MAX) {
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "API key too long");
		auth_reply(a, &in, to, 401, 4100, "invalid API key", 0);
		return;
	}
	if (auth_key_hash(req->token.p, req->token.n, hash) == -1) {
		log_req(LOG_L_WARN, m->reqid, m->traceparent, req->bot_id,
		        "%s: SHA-256 failed", __func__);
		auth_reply(a, &in, to, 500, 5000, "internal error", 0);
		return;
	}
	k = auth_keys_find(&a->keys, hash);
	if (k != NULL && k->k_state != AUTH_KEY_PENDING && now < k->k_until) {
		if (k->k_state == AUTH_KEY_UNKNOWN) {
			(*a->st.key_hit_unknown)++;
			auth_reply(a, &in, to, 401, 4100, "invalid API key",
			           0);
			return;
		}
		(*a->st.key_hit)++;
		auth_forward(a, &in, to, req, MSTR(k->k_sub),
		             MSTR(k->k_scopes), m->body, m->body_len);
		return;
	}
	if (k == NULL || k->k_state != AUTH_KEY_PENDING) {
		if ((k = auth_keys_pending(&a->keys, hash, now)) == NULL) {
			(*a->st.park_full)++;
			auth_reply(a, &in, to, 503, 5030,
			           "service unavailable", 1);
			return;
		}
		fresh = 1;
		(*a->st.key_miss)++;
	} else
		(*a->st.key_joined)++;
	if (auth_keys_park(&a->keys, k, m, to) == -1) {
		(*a->st.park_full)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "%zu requests parked: 503", a->keys.kt_parked);
		auth_reply(a, &in, to, 503, 5030, "service unavailable", 1);
		if (fresh && k->k_nparked == 0)
			auth_keys_remove(&a->keys, k);
		return;
	}
	if (!fresh)
		return;
	kc.hash = MSTR(k->k_hash);
	h = in;
	h.deadline_ms = now_wall_ms() + a->keys.kt_conf.check_ms;
	h.reply_to = MSTR(a->svc.name);
	if (msg_send_key_check(a->svc.ipc, "storage", &h, &kc) == -1) {
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "storage link full: 503");
		auth_key_give_up(a, k);
		return;
	}
	log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
	        "API key %.12s...: asked storage", k->k_hash);
}

static void
auth_chat_request(struct auth *a, const struct msg *m,
                  const struct chat_request *req)
{
	struct msg_head in = msg_head_reply(m, NULL);
	char to[AUTH_NAME_MAX];
	struct auth_claims cl;
	enum auth_token_verdict v;
	enum auth_route route;
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
		auth_reply(a, &in, to, 504, 5040, "deadline exceeded", 0);
		return;
	}
	if ((route = auth_route_of(req->route)) == ROUTE_UNKNOWN) {
		(*a->st.bad_route)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "unknown route %.*s", (int)req->route.n, req->route.p);
		auth_reply(a, &in, to, 400, 4000, "unknown route", 0);
		return;
	}
	if (route == ROUTE_WEBHOOK) {
		/* No token: the edge verified the caller's signature, and
		 * only an edge may send CHAT_REQUEST (the route table). */
		auth_forward(a, &in, to, req, MSTR_LIT("webhook"),
		             MSTR_LIT("*"), m->body, m->body_len);
		return;
	}
	if (route != ROUTE_V1_CHAT &&
	    auth_key_is_key(req->token.p, req->token.n)) {
		auth_key_request(a, m, req, to);
		return;
	}

	v = auth_token_verify(a->tok, req->token.p, req->token.n,
	                      (int64_t)(now / 1000), &cl, &why);
	(*a->st.verdicts[v])++;
	if (v == AUTH_TOKEN_INTERNAL) {
		log_req(LOG_L_WARN, m->reqid, m->traceparent, req->bot_id,
		        "%s: token check failed: %s", __func__, why);
		auth_reply(a, &in, to, 500, 5000, "internal error", 0);
		return;
	}
	if (v != AUTH_TOKEN_OK) {
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, req->bot_id,
		        "token refused: %s", why);
		auth_reply(a, &in, to, 401, 4100, why, 0);
		return;
	}
	/* A JWT grants every scope. */
	auth_forward(a, &in, to, req,
	             (struct mstr){cl.sub, (uint32_t)cl.sub_len},
	             MSTR_LIT("*"), m->body, m->body_len);
}

/* Storage answered the check of a hash: settle every request parked on
 * it. */
static void
auth_key_reply(struct auth *a, const struct msg *m, const struct key_reply *r)
{
	struct auth_park_list l = TAILQ_HEAD_INITIALIZER(l);
	char hash[AUTH_KEY_HASH_LEN + 1];
	struct chat_request req;
	struct auth_key *k = NULL;
	struct auth_park *p;
	uint64_t now = loop_now(a->svc.loop), wall;

	if (r->hash.n == AUTH_KEY_HASH_LEN) {
		memcpy(hash, r->hash.p, AUTH_KEY_HASH_LEN);
		hash[AUTH_KEY_HASH_LEN] = '\0';
		k = auth_keys_find(&a->keys, hash);
	}
	if (k == NULL || k->k_state != AUTH_KEY_PENDING) {
		/* Answered already (a resend), or given up on. */
		(*a->st.key_stray)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, MSTR_NULL,
		        "KEY_REPLY %llu for no check in flight",
		        (unsigned long long)r->status);
		return;
	}
	if (r->status != 200 && r->status != 401) {
		(*a->st.key_storage_503)++;
		log_req(LOG_L_DEBUG, m->reqid, m->traceparent, MSTR_NULL,
		        "key check: storage said %llu: 503",
		        (unsigned long long)r->status);
		auth_key_give_up(a, k);
		return;
	}
	auth_keys_take(&a->keys, k, &l);
	if (r->status == 401) {
		(*a->st.key_refused)++;
		(void)auth_keys_settle(&a->keys, k, 0, MSTR_NULL, MSTR_NULL,
		                       now);
		auth_fail_parked(a, &l, 401, 4100, "invalid API key", 0);
		return;
	}
	if (r->sub.n == 0 || r->sub.n > AUTH_SUB_MAX ||
	    memchr(r->sub.p, '\0', r->sub.n) != NULL ||
	    memchr(r->scopes.p, '\0', r->scopes.n) != NULL ||
	    auth_keys_settle(&a->keys, k, 1, r->sub, r->scopes, now) == -1) {
		if (auth_keys_find(&a->keys, hash) == k)
			auth_keys_remove(&a->keys, k);
		(*a->st.key_storage_503)++;
		log_warnx("%s: unusable KEY_REPLY (sub of %u bytes) or out "
		          "of memory: 503",
		          __func__, r->sub.n);
		auth_fail_parked(a, &l, 503, 5030, "service unavailable", 1);
		return;
	}
	(*a->st.key_ok)++;
	wall = now_wall_ms();
	while ((p = TAILQ_FIRST(&l)) != NULL) {
		TAILQ_REMOVE(&l, p, p_link);
		if (p->p_head.deadline_ms != 0 &&
		    wall >= p->p_head.deadline_ms) {
			(*a->st.deadline)++;
			auth_reply(a, &p->p_head, p->p_to, 504, 5040,
			           "deadline exceeded", 0);
		} else if (chat_request_decode(p->p_body, p->p_body_len,
		                               &req) == -1) {
			/* It decoded once: our bug, but answer anyway. */
			log_req(LOG_L_ERR, p->p_head.reqid,
			        p->p_head.traceparent, MSTR_NULL,
			        "%s: parked request does not decode",
			        __func__);
			auth_reply(a, &p->p_head, p->p_to, 500, 5000,
			           "internal error", 0);
		} else
			auth_forward(a, &p->p_head, p->p_to, &req,
			             MSTR(k->k_sub), MSTR(k->k_scopes),
			             p->p_body, p->p_body_len);
		free(p);
	}
}

void
auth_dispatch_tick(struct auth *a)
{
	uint64_t now = loop_now(a->svc.loop);
	struct auth_key *k;

	while ((k = auth_keys_overdue(&a->keys, now)) != NULL) {
		(*a->st.key_timeout)++;
		log_debug("%s: no KEY_REPLY for %.12s... within %llu ms: 503 "
		          "for %zu requests",
		          __func__, k->k_hash,
		          (unsigned long long)a->keys.kt_conf.check_ms,
		          k->k_nparked);
		auth_key_give_up(a, k);
	}
	if (now - a->swept_ms >= 1000) {
		a->swept_ms = now;
		(void)auth_keys_sweep(&a->keys, now);
	}
}

/* Storage answered a limit check: send the request on, or 429. */
static void
auth_limit_reply(struct auth *a, const struct msg *m,
                 const struct limit_reply *r)
{
	char rl[AUTH_LIMIT_FIELD_MAX], pol[AUTH_LIMIT_FIELD_MAX];
	const struct auth_limit_rate *lr;
	struct chat_request req;
	struct auth_lim *l;
	const char *name;
	uint64_t ra;

	if ((l = auth_limits_take(&a->lims, m->reqid, r->key)) == NULL) {
		/* Given up on (timer), or a resend. */
		(*a->st.lim_stray)++;
		return;
	}
	auth_lim_arm(a);
	if (r->status > 1) {
		(*a->st.lim_unknown)++;
		auth_lim_untold(a, l);
		return;
	}
	if (a->lim_failing) {
		a->lim_failing = 0;
		log_info("limits: storage checks them again");
	}
	name = auth_limit_routes[l->l_route];
	if (l->l_shadow) {
		if (r->status == 1) {
			(*a->st.lim_shadow_limited)++;
			log_req(LOG_L_DEBUG, l->l_head.reqid,
			        l->l_head.traceparent, MSTR_NULL,
			        "shadow: %.*s would be limited (retry after "
			        "%llu ms)",
			        (int)l->l_key.n, l->l_key.p,
			        (unsigned long long)r->retry_after_ms);
		} else
			(*a->st.lim_shadow_allowed)++;
		free(l);
		return;
	}
	if (chat_request_decode(l->l_body, l->l_body_len, &req) == -1) {
		log_req(LOG_L_ERR, l->l_head.reqid, l->l_head.traceparent,
		        MSTR_NULL, "%s: parked request does not decode",
		        __func__);
		auth_reply(a, &l->l_head, l->l_to, 500, 5000, "internal error",
		           0);
		free(l);
		return;
	}
	if (r->status == 0) {
		(*a->st.lim_allowed)++;
		if (l->l_head.deadline_ms != 0 &&
		    now_wall_ms() >= l->l_head.deadline_ms) {
			(*a->st.deadline)++;
			auth_reply(a, &l->l_head, l->l_to, 504, 5040,
			           "deadline exceeded", 0);
		} else
			auth_send_on(a, &l->l_head, l->l_to, &req, l->l_sub,
			             l->l_scopes);
		free(l);
		return;
	}
	(*a->st.lim_limited)++;
	(*a->st.rate_limited)++;
	ra = auth_limit_retry_s(r->retry_after_ms);
	lr = &a->lims.lt_conf.route[l->l_route];
	if (auth_limit_field(rl, sizeof(rl), name, r->remaining,
	                     r->reset_ms) == -1 ||
	    auth_limit_policy(pol, sizeof(pol), name, lr) == -1)
		rl[0] = pol[0] = '\0';
	log_req(LOG_L_DEBUG, l->l_head.reqid, l->l_head.traceparent,
	        req.bot_id, "%.*s limited: 429, retry after %llu s",
	        (int)l->l_key.n, l->l_key.p, (unsigned long long)ra);
	auth_reply_rl(a, &l->l_head, l->l_to, 429, 4020, "too many requests",
	              ra, rl, pol);
	free(l);
}

void
auth_dispatch_limit_timer(struct auth *a)
{
	uint64_t now = loop_now(a->svc.loop);
	struct auth_lim *l;

	while ((l = auth_limits_overdue(&a->lims, now)) != NULL) {
		(*a->st.lim_timeout)++;
		auth_lim_untold(a, l);
	}
	auth_lim_arm(a);
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

int
auth_dispatch_storage(struct auth *a, const struct msg *m)
{
	struct key_reply r;
	struct limit_reply lr;

	switch (m->type) {
	case MSG_KEY_REPLY:
		if (key_reply_unpack(m, &r) == -1)
			return (DISPATCH_BAD);
		auth_key_reply(a, m, &r);
		break;
	case MSG_LIMIT_REPLY:
		if (limit_reply_unpack(m, &lr) == -1)
			return (DISPATCH_BAD);
		auth_limit_reply(a, m, &lr);
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
