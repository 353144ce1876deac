/* SPDX-License-Identifier: ISC */
/*
 * auth_limit: the inbound limits of troupe-auth (see auth_limit.h): the
 * [limits] settings, the RateLimit field values, and the table of requests
 * waiting for LIMIT_REPLY.
 *
 * Callers: auth.c and auth_dispatch.c, on the loop thread only; the unit
 * tests.  Never logs, never exits.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth_limit.h"
#include "conf.h"

#define LIM_BUCKETS 1024 /* fixed: the table is small and short-lived */

const char *const auth_limit_routes[AUTH_LIMIT_NROUTES] = {
        "v1.chat", "v3.chat",   "v3.retrieve",
        "v3.list", "v3.cancel", "webhook.execute",
};

int
auth_limit_route(struct mstr route)
{
	for (int i = 0; i < AUTH_LIMIT_NROUTES; i++)
		if (mstr_eq(route, auth_limit_routes[i]))
			return (i);
	return (-1);
}

int
auth_limit_conf_read(struct auth_limit_conf *c, char *err, size_t errlen)
{
	struct auth_limit_rate def;
	const char *mode, *down;
	int64_t v[3], check, park;
	char key[64];

	memset(c, 0, sizeof(*c));
	mode = conf_get("limits", "mode", "enforce");
	if (strcmp(mode, "off") == 0)
		c->mode = AUTH_LIMIT_OFF;
	else if (strcmp(mode, "shadow") == 0)
		c->mode = AUTH_LIMIT_SHADOW;
	else if (strcmp(mode, "enforce") == 0)
		c->mode = AUTH_LIMIT_ENFORCE;
	else {
		snprintf(err, errlen,
		         "[limits] mode: \"%s\": want off, shadow or enforce",
		         mode);
		return (-1);
	}
	down = conf_get("limits", "on_redis_down", "open");
	if (strcmp(down, "open") == 0)
		c->fail_open = 1;
	else if (strcmp(down, "closed") == 0)
		c->fail_open = 0;
	else {
		snprintf(err, errlen,
		         "[limits] on_redis_down: \"%s\": want open or closed",
		         down);
		return (-1);
	}
	if (conf_get_int("limits", "check_ms", 50, 1, 10000, &check, err,
	                 errlen) == -1 ||
	    conf_get_int("limits", "park_max", 10000, 0, 10000000, &park, err,
	                 errlen) == -1 ||
	    conf_get_int("limits", "rate", 0, 0, 1000000000, &v[0], err,
	                 errlen) == -1 ||
	    conf_get_int("limits", "window_ms", 1000, 1, 86400000, &v[1], err,
	                 errlen) == -1 ||
	    conf_get_int("limits", "burst", 0, 0, 1000000000, &v[2], err,
	                 errlen) == -1)
		return (-1);
	c->check_ms = (uint64_t)check;
	c->park_max = (size_t)park;
	def.rate = (uint64_t)v[0];
	def.window_ms = (uint64_t)v[1];
	def.burst = (uint64_t)v[2];
	for (int r = 0; r < AUTH_LIMIT_NROUTES; r++) {
		snprintf(key, sizeof(key), "rate.%s", auth_limit_routes[r]);
		if (conf_get_int("limits", key, (int64_t)def.rate, 0,
		                 1000000000, &v[0], err, errlen) == -1)
			return (-1);
		snprintf(key, sizeof(key), "window_ms.%s",
		         auth_limit_routes[r]);
		if (conf_get_int("limits", key, (int64_t)def.window_ms, 1,
		                 86400000, &v[1], err, errlen) == -1)
			return (-1);
		snprintf(key, sizeof(key), "burst.%s", auth_limit_routes[r]);
		if (conf_get_int("limits", key, (int64_t)def.burst, 0,
		                 1000000000, &v[2], err, errlen) == -1)
			return (-1);
		c->route[r].rate = (uint64_t)v[0];
		c->route[r].window_ms = (uint64_t)v[1];
		c->route[r].burst = (uint64_t)v[2];
	}
	return (0);
}

const struct auth_limit_rate *
auth_limit_rate(const struct auth_limit_conf *c, int r)
{
	if (c->mode == AUTH_LIMIT_OFF || r < 0 || r >= AUTH_LIMIT_NROUTES ||
	    c->route[r].rate == 0)
		return (NULL);
	return (&c->route[r]);
}

int
auth_limit_key(char *out, struct mstr tenant, struct mstr bot,
               const char *route)
{
	size_t rl = strlen(route), n = tenant.n + 1 + bot.n + 1 + rl;
	char *p = out;

	if (n > AUTH_LIMIT_KEY_MAX)
		return (-1);
	memcpy(p, tenant.p, tenant.n);
	p += tenant.n;
	*p++ = '|';
	memcpy(p, bot.p, bot.n);
	p += bot.n;
	*p++ = '|';
	memcpy(p, route, rl + 1);
	return ((int)n);
}

int
auth_limit_policy(char *out, size_t n, const char *name,
                  const struct auth_limit_rate *lr)
{
	uint64_t w = (lr->window_ms + 999) / 1000;
	int k;

	k = snprintf(out, n, "\"%s\";q=%" PRIu64 ";w=%" PRIu64, name, lr->rate,
	             w ? w : 1);
	return (k < 0 || (size_t)k >= n ? -1 : k);
}

int
auth_limit_field(char *out, size_t n, const char *name, uint64_t remaining,
                 uint64_t reset_ms)
{
	int k;

	k = snprintf(out, n, "\"%s\";r=%" PRIu64 ";t=%" PRIu64, name,
	             remaining, (reset_ms + 999) / 1000);
	return (k < 0 || (size_t)k >= n ? -1 : k);
}

uint64_t
auth_limit_retry_s(uint64_t ms)
{
	uint64_t s = (ms + 999) / 1000;

	return (s ? s : 1);
}

/* FNV-1a over the request id. */
static uint32_t
lim_hash(struct mstr s)
{
	uint32_t h = 2166136261u;

	for (uint32_t i = 0; i < s.n; i++) {
		h ^= (uint8_t)s.p[i];
		h *= 16777619u;
	}
	return (h);
}

int
auth_limits_init(struct auth_limits *lt, const struct auth_limit_conf *c)
{
	memset(lt, 0, sizeof(*lt));
	TAILQ_INIT(&lt->lt_all);
	lt->lt_conf = *c;
	if ((lt->lt_bucket = calloc(LIM_BUCKETS, sizeof(*lt->lt_bucket))) ==
	    NULL)
		return (-1);
	lt->lt_mask = LIM_BUCKETS - 1;
	return (0);
}

void
auth_limits_free(struct auth_limits *lt)
{
	struct auth_lim *l;

	if (lt->lt_bucket == NULL)
		return;
	while ((l = TAILQ_FIRST(&lt->lt_all)) != NULL) {
		TAILQ_REMOVE(&lt->lt_all, l, l_link);
		free(l);
	}
	free(lt->lt_bucket);
	memset(lt, 0, sizeof(*lt));
	TAILQ_INIT(&lt->lt_all);
}

/* Copy s to *q, point *out at the copy. */
static void
lim_put(char **q, struct mstr s, struct mstr *out)
{
	if (s.n > 0)
		memcpy(*q, s.p, s.n);
	*out = (struct mstr){*q, s.n};
	*q += s.n;
}

struct auth_lim *
auth_limits_park(struct auth_limits *lt, const struct msg_head *h,
                 const char *to, int route, int shadow, struct mstr key,
                 struct mstr sub, struct mstr scopes, const char *body,
                 size_t body_len, uint64_t now)
{
	struct auth_lim *l, **b;
	size_t tl = strlen(to), sz;
	char *q;

	if (lt->lt_count >= lt->lt_conf.park_max || tl >= AUTH_LIMIT_TO_MAX ||
	    key.n > AUTH_LIMIT_KEY_MAX)
		return (NULL);
	if (shadow)
		body_len = 0;
	sz = sizeof(*l) + h->reqid.n + h->traceparent.n + key.n + sub.n +
	     scopes.n + body_len;
	if ((l = malloc(sz)) == NULL)
		return (NULL);
	memset(l, 0, sizeof(*l));
	memcpy(l->l_to, to, tl + 1);
	q = l->l_buf;
	lim_put(&q, h->reqid, &l->l_head.reqid);
	lim_put(&q, h->traceparent, &l->l_head.traceparent);
	lim_put(&q, key, &l->l_key);
	lim_put(&q, sub, &l->l_sub);
	lim_put(&q, scopes, &l->l_scopes);
	if (body_len > 0)
		memcpy(q, body, body_len);
	l->l_body = q;
	l->l_body_len = body_len;
	l->l_head.deadline_ms = h->deadline_ms;
	l->l_head.reply_to = MSTR(l->l_to);
	l->l_route = route;
	l->l_shadow = shadow;
	l->l_until = now + lt->lt_conf.check_ms;
	l->l_h = lim_hash(h->reqid);
	b = &lt->lt_bucket[l->l_h & lt->lt_mask];
	l->l_hnext = *b;
	*b = l;
	TAILQ_INSERT_TAIL(&lt->lt_all, l, l_link);
	lt->lt_count++;
	return (l);
}

/* Take l off the table (it stays allocated). */
static void
lim_unlink(struct auth_limits *lt, struct auth_lim *l)
{
	struct auth_lim **pp;

	for (pp = &lt->lt_bucket[l->l_h & lt->lt_mask]; *pp != NULL;
	     pp = &(*pp)->l_hnext)
		if (*pp == l) {
			*pp = l->l_hnext;
			break;
		}
	TAILQ_REMOVE(&lt->lt_all, l, l_link);
	lt->lt_count--;
}

struct auth_lim *
auth_limits_take(struct auth_limits *lt, struct mstr reqid, struct mstr key)
{
	uint32_t h = lim_hash(reqid);
	struct auth_lim *l, *found = NULL;

	/* Newest first in the chain: the last match is the oldest. */
	for (l = lt->lt_bucket[h & lt->lt_mask]; l != NULL; l = l->l_hnext)
		if (l->l_h == h && l->l_head.reqid.n == reqid.n &&
		    memcmp(l->l_head.reqid.p, reqid.p, reqid.n) == 0 &&
		    l->l_key.n == key.n &&
		    memcmp(l->l_key.p, key.p, key.n) == 0)
			found = l;
	if (found != NULL)
		lim_unlink(lt, found);
	return (found);
}

struct auth_lim *
auth_limits_overdue(struct auth_limits *lt, uint64_t now)
{
	struct auth_lim *l = TAILQ_FIRST(&lt->lt_all);

	if (l == NULL || now < l->l_until)
		return (NULL);
	lim_unlink(lt, l);
	return (l);
}

uint64_t
auth_limits_next(const struct auth_limits *lt)
{
	const struct auth_lim *l = TAILQ_FIRST(&lt->lt_all);

	return (l != NULL ? l->l_until : 0);
}
