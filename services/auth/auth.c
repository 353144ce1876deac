/* SPDX-License-Identifier: ISC */
/*
 * troupe-auth: checks the bearer JWT or API key of every request the edge
 * accepts and sends it on: chats and cancels to the dispatcher, retrieve
 * and message list to storage (docs/services/auth.md).
 *
 * This file holds main(), the peer table and the configuration: it reads
 * [auth] and [limits] at start and on reload, runs the tick that gives up
 * on silent key checks and the timer of limit checks, and hands every
 * envelope to the dispatch function of the peer that sent it
 * (auth_dispatch.c).  The token work is auth_token.c's, the API key table
 * auth_key.c's, the inbound limits auth_limit.c's.
 *
 * DIAGNOSTICS: a missing, short or unusable secret, or an invalid [auth]
 * key, is fatal at start; on reload it is logged and the previous settings
 * stay.  A message that no peer may send us, or whose body does not decode,
 * is logged once per type and counted, never fatal (the peer may be a
 * newer build).  It never logs per request above debug level.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "auth_token.h"
#include "conf.h"
#include "log.h"
#include "metrics.h"
#include "proto.h"
#include "svc.h"
#include "util.h"
#include "trace.h"

struct auth_peer {
	const char *name;
	enum proc proc;
	int (*dispatch)(struct auth *, const struct msg *);
};

/* Who talks to us; anyone else is unhandled. */
static const struct auth_peer peers[] = {
        {"edge", PROC_EDGE, auth_dispatch_edge},
        {"storage", PROC_STORAGE, auth_dispatch_storage},
};

/* How often overdue key checks and expired cache entries are looked
 * for. */
#define AUTH_TICK_MS 100

static struct auth auth;

static void auth_msg(void *, const struct msg *);
static int auth_reload(struct svc *, void *);
static void auth_metrics(struct svc *, struct buf *, void *);

static const struct svc_def auth_def = {
        .kind = "auth",
        .summary = "check bearer JWTs and API keys, forward "
                   "authenticated requests",
        .help_extra =
                "Config keys, section [auth] (env TROUPE_AUTH_<KEY>):\n"
                "  jwt_secret  HMAC secret, at least 32 bytes (48 for HS384, "
                "64\n"
                "              for HS512); the systemd credential jwt-secret\n"
                "              takes precedence\n"
                "  algorithm   HS256 (default), HS384 or HS512\n"
                "  leeway_s    clock skew allowed on exp, nbf, iat (default "
                "30)\n"
                "  audience    if set, the token's aud must contain it\n"
                "  issuer      if set, the token's iss must equal it\n"
                "  key_cache_ms          a valid API key is reused this "
                "long\n"
                "                        without asking storage (default "
                "10000)\n"
                "  key_unknown_cache_ms  an unknown API key is refused "
                "this\n"
                "                        long without asking (default "
                "2000)\n"
                "  key_check_ms          storage silent this long on a "
                "key: 503\n"
                "                        (default 2000)\n"
                "  key_park_max          requests waiting for key checks, "
                "at most\n"
                "                        (default 10000)\n"
                "  key_cache_max         API keys remembered, at most "
                "(default\n"
                "                        100000)\n"
                "Config keys, section [limits] (env TROUPE_LIMITS_<KEY>):\n"
                "  mode           off, shadow or enforce (default)\n"
                "  rate           requests per window per (tenant, bot, "
                "route);\n"
                "                 0 (default): no limit, no round trip\n"
                "  window_ms      the window (default 1000)\n"
                "  burst          extra requests at once (default 0)\n"
                "  rate.<route>, window_ms.<route>, burst.<route>  "
                "overrides for\n"
                "                 v1.chat, v3.chat, v3.retrieve, v3.list,\n"
                "                 v3.cancel, webhook.execute\n"
                "  on_redis_down  open (default: admit) or closed (503)\n"
                "  check_ms       wait for storage's answer (default 50)\n"
                "  park_max       requests waiting for it (default "
                "10000)\n",
        .on_msg = auth_msg,
        .on_reload = auth_reload,
        .on_metrics = auth_metrics,
        .arg = &auth,
};

/*
 * Build a verifier from the credential or [auth]; NULL with err filled if
 * the settings are unusable.  *src tells where the secret came from.
 */
static struct auth_token_conf *
auth_conf(const char **src, char *err, size_t errlen)
{
	struct auth_token_params p;
	struct auth_token_conf *c = NULL;
	const char *secret, *why;
	char *cred;
	int64_t leeway;

	cred = conf_credential("jwt-secret");
	if (cred != NULL) {
		secret = cred;
		*src = "credential jwt-secret";
	} else {
		secret = conf_get("auth", "jwt_secret", NULL);
		*src = "[auth] jwt_secret";
	}
	if (conf_get_int("auth", "leeway_s", 30, 0, 3600, &leeway, err,
	                 errlen) == -1)
		goto done;
	memset(&p, 0, sizeof(p));
	p.algorithm = conf_get("auth", "algorithm", "HS256");
	p.secret = secret;
	p.secret_len = secret != NULL ? strlen(secret) : 0;
	p.leeway_s = leeway;
	p.audience = conf_get("auth", "audience", NULL);
	p.issuer = conf_get("auth", "issuer", NULL);
	if ((c = auth_token_conf_new(&p, &why)) == NULL)
		snprintf(err, errlen, "%s", why);
done:
	if (cred != NULL) {
		explicit_bzero(cred, strlen(cred));
		free(cred);
	}
	return (c);
}

/* Read the [auth] key_* settings; -1 with err filled if one is bad. */
static int
auth_key_conf(struct auth_key_conf *kc, char *err, size_t errlen)
{
	int64_t valid, unknown, check, park, max;

	if (conf_get_int("auth", "key_cache_ms", 10000, 0, 3600000, &valid,
	                 err, errlen) == -1 ||
	    conf_get_int("auth", "key_unknown_cache_ms", 2000, 0, 3600000,
	                 &unknown, err, errlen) == -1 ||
	    conf_get_int("auth", "key_check_ms", 2000, 100, 60000, &check, err,
	                 errlen) == -1 ||
	    conf_get_int("auth", "key_park_max", 10000, 0, 10000000, &park,
	                 err, errlen) == -1 ||
	    conf_get_int("auth", "key_cache_max", 100000, 1, 10000000, &max,
	                 err, errlen) == -1)
		return (-1);
	kc->valid_ms = (uint64_t)valid;
	kc->unknown_ms = (uint64_t)unknown;
	kc->check_ms = (uint64_t)check;
	kc->park_max = (size_t)park;
	kc->entries_max = (size_t)max;
	return (0);
}

static void
auth_lim_timer(struct loop *l, void *arg)
{
	(void)l;
	auth_dispatch_limit_timer(arg);
}

static void
auth_limits_log(const char *what, const struct auth_limit_conf *c)
{
	static const char *const modes[] = {"off", "shadow", "enforce"};
	char b[512];
	size_t n = 0;

	b[0] = '\0';
	for (int r = 0; r < AUTH_LIMIT_NROUTES && n < sizeof(b); r++)
		if (c->route[r].rate > 0)
			n += (size_t)snprintf(
			        b + n, sizeof(b) - n, " %s=%llu/%llums+%llu",
			        auth_limit_routes[r],
			        (unsigned long long)c->route[r].rate,
			        (unsigned long long)c->route[r].window_ms,
			        (unsigned long long)c->route[r].burst);
	log_info("%s limits: %s,%s; on Redis down %s", what, modes[c->mode],
	         b[0] != '\0' ? b : " no route limited",
	         c->fail_open ? "open" : "closed");
}

static void
auth_tick(struct loop *l, void *arg)
{
	struct auth *a = arg;

	(void)l;
	auth_dispatch_tick(a);
	loop_timer_set(a->tick, AUTH_TICK_MS);
}

static void
auth_conf_log(const char *what, const char *src)
{
	const char *aud = conf_get("auth", "audience", NULL);
	const char *iss = conf_get("auth", "issuer", NULL);

	log_info("%s: %s from %s, leeway %s s, audience %s, issuer %s", what,
	         auth_token_conf_alg(auth.tok), src,
	         conf_get("auth", "leeway_s", "30"),
	         aud != NULL && *aud != '\0' ? aud : "(any)",
	         iss != NULL && *iss != '\0' ? iss : "(any)");
}

static int
auth_reload(struct svc *svc, void *arg)
{
	struct auth *a = arg;
	struct auth_token_conf *c;
	struct auth_key_conf kc;
	struct auth_limit_conf lc;
	const char *src;
	char err[256];

	(void)svc;
	if (auth_limit_conf_read(&lc, err, sizeof(err)) == -1) {
		log_warnx("%s: keeping the previous settings: %s", __func__,
		          err);
		return (-1);
	}
	if (auth_key_conf(&kc, err, sizeof(err)) == -1) {
		log_warnx("%s: keeping the previous settings: %s", __func__,
		          err);
		return (-1);
	}
	if ((c = auth_conf(&src, err, sizeof(err))) == NULL) {
		log_warnx("%s: keeping the previous token settings: %s",
		          __func__, err);
		return (-1);
	}
	auth_token_conf_free(a->tok);
	a->tok = c;
	a->keys.kt_conf = kc;
	a->lims.lt_conf = lc;
	auth_conf_log("reloaded", src);
	auth_limits_log("reloaded", &lc);
	return (0);
}

static void
auth_metrics(struct svc *svc, struct buf *b, void *arg)
{
	struct auth *a = arg;

	(void)svc;
	if (metrics_render(a->metrics, b) == -1)
		log_warnx("%s: out of memory", __func__);
}

static int
auth_stats_init(struct auth *a)
{
	static const char vf[] = "troupe_auth_verdicts_total";
	static const char vh[] = "Bearer tokens checked, by verdict.";
	static const char df[] = "troupe_auth_dropped_total";
	static const char dh[] = "Messages dropped unanswered, by reason.";
	static const char rf[] = "troupe_auth_refused_total";
	static const char rh[] = "Chats answered with an error other than "
	                         "401, by reason.";
	struct auth_stats *st = &a->st;
	char l[64];

	if ((a->metrics = metrics_new()) == NULL)
		return (-1);
	for (int v = 0; v < AUTH_TOKEN_NVERDICTS; v++) {
		snprintf(l, sizeof(l), "result=\"%s\"",
		         auth_token_verdict_label(v));
		if ((st->verdicts[v] =
		             metrics_counter(a->metrics, vf, vh, l)) == NULL)
			return (-1);
	}
	static const char ff[] = "troupe_auth_forwarded_total";
	static const char fh[] = "Authenticated requests sent on, by "
	                         "message.";
	static const char kf[] = "troupe_auth_key_cache_total";
	static const char kh[] = "API key lookups, by what the cache "
	                         "gave.";
	static const char cf[] = "troupe_auth_key_checks_total";
	static const char ch[] = "KEY_CHECKs to storage, by outcome.";

	st->fwd_run = metrics_counter(a->metrics, ff, fh, "msg=\"CHAT_RUN\"");
	st->fwd_cancel =
	        metrics_counter(a->metrics, ff, fh, "msg=\"CHAT_CANCEL\"");
	st->fwd_query =
	        metrics_counter(a->metrics, ff, fh, "msg=\"CHAT_QUERY\"");
	st->key_unavailable = metrics_counter(a->metrics, rf, rh,
	                                      "reason=\"key_unavailable\"");
	st->park_full =
	        metrics_counter(a->metrics, rf, rh, "reason=\"park_full\"");
	st->scope = metrics_counter(a->metrics, rf, rh, "reason=\"scope\"");
	st->bad_route =
	        metrics_counter(a->metrics, rf, rh, "reason=\"bad_route\"");
	st->key_hit = metrics_counter(a->metrics, kf, kh, "result=\"hit\"");
	st->key_hit_unknown =
	        metrics_counter(a->metrics, kf, kh, "result=\"hit_unknown\"");
	st->key_miss = metrics_counter(a->metrics, kf, kh, "result=\"miss\"");
	st->key_joined =
	        metrics_counter(a->metrics, kf, kh, "result=\"joined\"");
	st->key_ok = metrics_counter(a->metrics, cf, ch, "result=\"ok\"");
	st->key_refused =
	        metrics_counter(a->metrics, cf, ch, "result=\"unknown\"");
	st->key_storage_503 =
	        metrics_counter(a->metrics, cf, ch, "result=\"unavailable\"");
	st->key_timeout =
	        metrics_counter(a->metrics, cf, ch, "result=\"timeout\"");
	st->key_stray =
	        metrics_counter(a->metrics, cf, ch, "result=\"stray\"");
	st->deadline =
	        metrics_counter(a->metrics, rf, rh, "reason=\"deadline\"");
	st->unavailable = metrics_counter(a->metrics, rf, rh,
	                                  "reason=\"dispatcher_unavailable\"");
	st->reply_lost = metrics_counter(a->metrics, df, dh,
	                                 "reason=\"reply_refused\"");
	st->dropped_bad =
	        metrics_counter(a->metrics, df, dh, "reason=\"bad_body\"");
	st->dropped_unhandled =
	        metrics_counter(a->metrics, df, dh, "reason=\"unhandled\"");
	st->dropped_no_reply =
	        metrics_counter(a->metrics, df, dh, "reason=\"no_reply_to\"");
	static const char lf[] = "troupe_auth_limit_checks_total";
	static const char lh[] = "Inbound limit checks (LIMIT_CHECK), by "
	                         "result";
	static const char of[] = "troupe_auth_limit_unknown_total";
	static const char oh[] = "Limit checks storage could not answer "
	                         "(Redis down, timeout), by what was done "
	                         "([limits] on_redis_down)";
	st->lim_allowed =
	        metrics_counter(a->metrics, lf, lh, "result=\"allowed\"");
	st->lim_limited =
	        metrics_counter(a->metrics, lf, lh, "result=\"limited\"");
	st->lim_shadow_allowed = metrics_counter(a->metrics, lf, lh,
	                                         "result=\"shadow_allowed\"");
	st->lim_shadow_limited = metrics_counter(a->metrics, lf, lh,
	                                         "result=\"shadow_limited\"");
	st->lim_unknown =
	        metrics_counter(a->metrics, lf, lh, "result=\"unknown\"");
	st->lim_timeout =
	        metrics_counter(a->metrics, lf, lh, "result=\"timeout\"");
	st->lim_stray =
	        metrics_counter(a->metrics, lf, lh, "result=\"stray\"");
	st->lim_park_full =
	        metrics_counter(a->metrics, lf, lh, "result=\"park_full\"");
	st->lim_send_failed =
	        metrics_counter(a->metrics, lf, lh, "result=\"send_failed\"");
	st->lim_open =
	        metrics_counter(a->metrics, of, oh, "action=\"admitted\"");
	st->lim_closed =
	        metrics_counter(a->metrics, of, oh, "action=\"refused\"");
	st->rate_limited =
	        metrics_counter(a->metrics, rf, rh, "reason=\"rate_limited\"");
	if (st->lim_allowed == NULL || st->lim_limited == NULL ||
	    st->lim_shadow_allowed == NULL || st->lim_shadow_limited == NULL ||
	    st->lim_unknown == NULL || st->lim_timeout == NULL ||
	    st->lim_stray == NULL || st->lim_park_full == NULL ||
	    st->lim_send_failed == NULL || st->lim_open == NULL ||
	    st->lim_closed == NULL || st->rate_limited == NULL)
		return (-1);
	if (st->fwd_run == NULL || st->fwd_cancel == NULL ||
	    st->fwd_query == NULL || st->key_unavailable == NULL ||
	    st->park_full == NULL || st->scope == NULL ||
	    st->bad_route == NULL || st->key_hit == NULL ||
	    st->key_hit_unknown == NULL || st->key_miss == NULL ||
	    st->key_joined == NULL || st->key_ok == NULL ||
	    st->key_refused == NULL || st->key_storage_503 == NULL ||
	    st->key_timeout == NULL || st->key_stray == NULL ||
	    st->deadline == NULL || st->unavailable == NULL ||
	    st->reply_lost == NULL || st->dropped_bad == NULL ||
	    st->dropped_unhandled == NULL || st->dropped_no_reply == NULL)
		return (-1);
	return (0);
}

/* Whether this is the first time for type in the bitmap (then mark it). */
static int
auth_first(uint8_t *seen, uint16_t type)
{
	uint8_t bit = (uint8_t)(1u << (type & 7));

	if (seen[type >> 3] & bit)
		return (0);
	seen[type >> 3] |= bit;
	return (1);
}

static void
auth_msg(void *arg, const struct msg *m)
{
	struct auth *a = arg;
	const struct auth_peer *p = NULL;
	const char *name;
	enum proc from;
	int r = DISPATCH_UNHANDLED;

	trace_mark();
	from = proc_of(m->sender);
	for (size_t i = 0; i < nitems(peers); i++)
		if (peers[i].proc == from)
			p = &peers[i];
	if (p != NULL && msg_route_ok(m->type, from, PROC_AUTH))
		r = p->dispatch(a, m);
	if (r == DISPATCH_OK)
		return;

	name = msg_name(m->type);
	if (r == DISPATCH_BAD) {
		(*a->st.dropped_bad)++;
		if (auth_first(a->warned_bad, m->type))
			log_warnx("%s: undecodable %s from %.*s dropped; "
			          "further ones only counted",
			          __func__, name ? name : "message",
			          (int)m->sender.n, m->sender.p);
		return;
	}
	(*a->st.dropped_unhandled)++;
	if (auth_first(a->warned_unhandled, m->type))
		log_warnx("%s: %s (0x%04x) from %.*s not handled here, "
		          "dropped; further ones only counted",
		          __func__, name ? name : "unknown message", m->type,
		          (int)m->sender.n, m->sender.p);
}

int
main(int argc, char *argv[])
{
	struct auth_key_conf kc;
	struct auth_limit_conf lc;
	const char *src;
	char err[256];
	int rc;

	svc_init(&auth.svc, &auth_def, argc, argv);
	(void)TRACE_INIT(&auth.svc);
	if (auth_stats_init(&auth) == -1)
		fatalx("%s: out of memory", __func__);
	if ((auth.tok = auth_conf(&src, err, sizeof(err))) == NULL)
		fatalx("cannot check tokens: %s", err);
	if (auth_key_conf(&kc, err, sizeof(err)) == -1)
		fatalx("cannot check API keys: %s", err);
	if (auth_limit_conf_read(&lc, err, sizeof(err)) == -1)
		fatalx("cannot apply limits: %s", err);
	if (auth_limits_init(&auth.lims, &lc) == -1 ||
	    (auth.lim_timer = loop_timer_new(auth.svc.loop, auth_lim_timer,
	                                     &auth)) == NULL)
		fatalx("%s: out of memory", __func__);
	if (auth_keys_init(&auth.keys, &kc) == -1 ||
	    (auth.tick = loop_timer_new(auth.svc.loop, auth_tick, &auth)) ==
	            NULL)
		fatalx("%s: out of memory", __func__);
	loop_timer_set(auth.tick, AUTH_TICK_MS);
	auth_conf_log("checking", src);
	auth_limits_log("checking", &lc);
	svc_ready(&auth.svc, "checking tokens");
	rc = svc_run(&auth.svc);
	auth_token_conf_free(auth.tok);
	auth_keys_free(&auth.keys); /* the tick went with the loop */
	auth_limits_free(&auth.lims);
	metrics_free(auth.metrics);
	return (rc);
}
