/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_admit: how many runs each upstream, and each bot on it, may
 * have in flight, decided from the rate-limit signals the workers report
 * in RUN_DONE (PRODUCT.md §5, docs/ratelimits.md).
 *
 * The dispatcher does not know a run's upstream when CHAT_RUN arrives (the
 * bot's settings come from storage, in the worker): it learns the mapping
 * bot -> upstream from each RUN_DONE (bot_id, upstream) and uses it for
 * the bot's next runs.  A run of a bot not seen yet is admitted at once.
 * Keys: one per upstream (up to ADMIT_UPSTREAMS) and one per bot (up to
 * ADMIT_BOTS); past those bounds runs are admitted without a limit (and
 * the first time it happens, logged).
 *
 * Policy fixed (dispatcher_limit.c) keeps its state per upstream: every
 * bot of a throttled upstream waits.  Policy aimd keeps it per bot: one
 * bot's 429s cut and pause that bot only.  Each upstream has its own FIFO
 * queue of runs waiting for its limits (runs of unknown bots use the
 * runtab's queue); the queues and their bounds are dispatcher_run.c's.
 *
 * Every change of a limit is one log line (increases of one key at most
 * once a second: the line then says old -> new over that second) and the
 * gauges troupe_dispatcher_limit/_inflight/_queue{upstream} and counter
 * troupe_dispatcher_signals_total{upstream,kind} follow.
 *
 * Callers: dispatcher.c (init, reload, tick), dispatcher_run.c (every
 * admission, assign, end, RUN_DONE), dispatcher_status.c (JSON), the
 * scale code (the ceiling).  With d->d_adm NULL (unit tests that build a
 * dispatcher by hand) everything is admitted.  Never blocks, never exits.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "dispatcher_limit.h"
#include "ratelimit.h"

#define SECTION "dispatcher"
#define ADMIT_UPSTREAMS 32
#define ADMIT_BOTS 1024 /* a power of two; 3/4 of it are used */
#define ADMIT_URL_MAX 256
#define ADMIT_BOT_MAX 80
#define ADMIT_LOG_MS 1000 /* increases of a key: one line a second */

enum {
	K_429,
	K_503,
	K_RETRY_AFTER,
	K_XRL,
	K_IETF,
	K_OPENAI,
	K_COZE,
	K_TIMEOUT,
	K_EXHAUSTED,
	K_N
};

static const char *const kind_names[K_N] = {
        "http_429", "http_503", "retry_after", "x_ratelimit",    "ietf",
        "openai",   "coze",     "timeout",     "quota_exhausted"};

/* A limit key: an upstream, or a bot on it. */
struct akey {
	struct limit_state st;
	uint64_t inflight;
	uint64_t logged;        /* the limit value the last line said */
	int logged_children;    /* the children it said */
	uint64_t log_ms;        /* monotonic, of that line */
	const char *pend_cause; /* an increase not logged yet */
	const char *sig;        /* the last signal's kind, NULL: none */
	uint64_t sig_ms;        /* monotonic, when it came */
	uint64_t sig_backoff;   /* its backoff, ms */
	uint64_t signals;       /* signals counted on it */
	size_t queued;          /* its runs waiting in a queue */
	double rate;            /* runs ended per second (EWMA, per s) */
	uint64_t rate_n;        /* runs ended in this second */
	uint64_t rate_ms;       /* monotonic start of this second */
};

struct aup {
	int used;
	char url[ADMIT_URL_MAX];
	struct akey k; /* fixed: the limit; aimd: in flight, signals */
	struct run_list q;
	size_t qn;
	double *g_limit, *g_inflight, *g_queue;
	uint64_t *c_sig[K_N];
};

struct abot {
	int used;
	int up; /* -1: none yet */
	uint32_t hash;
	char id[ADMIT_BOT_MAX];
	struct akey k; /* aimd: the limit */
};

struct admit {
	struct limit_conf conf;
	struct aup up[ADMIT_UPSTREAMS];
	int nup;
	struct abot bot[ADMIT_BOTS];
	size_t nbots;
	int full_logged;
	struct loop_timer *wake;
	uint64_t wake_at; /* monotonic, 0: not armed */
};

static uint32_t
admit_hash(const char *p, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++) {
		h ^= (uint8_t)p[i];
		h *= 16777619u;
	}
	return (h);
}

static const char *
policy_name(const struct admit *a)
{
	return (a->conf.policy == LIMIT_FIXED ? "fixed" : "aimd");
}

/* The key whose limit rules runs of upstream u / bot b. */
static struct akey *
admit_key(struct admit *a, int u, int b)
{
	if (a->conf.policy == LIMIT_AIMD)
		return (b >= 0 ? &a->bot[b].k : NULL);
	return (u >= 0 ? &a->up[u].k : NULL);
}

static void
admit_wake_cb(struct loop *l, void *arg)
{
	struct dispatcher *d = arg;

	(void)l;
	if (d->d_adm != NULL)
		d->d_adm->wake_at = 0;
	dispatcher_run_drain(d);
}

void
dispatcher_admit_wake(struct dispatcher *d, uint64_t ms)
{
	struct admit *a = d->d_adm;
	uint64_t at;

	if (a == NULL || a->wake == NULL)
		return;
	at = loop_now(d->d_loop) + ms + 1;
	if (a->wake_at != 0 && a->wake_at <= at)
		return;
	a->wake_at = at;
	loop_timer_set(a->wake, (int64_t)ms + 1);
}

/* Label value: the URL without quotes, backslashes or control bytes. */
static void
label_of(char *out, size_t n, const char *url)
{
	size_t i;

	for (i = 0; i + 1 < n && url[i] != '\0'; i++)
		out[i] = url[i] == '"' || url[i] == '\\' ||
		                         (unsigned char)url[i] < 0x20
		                 ? '_'
		                 : url[i];
	out[i] = '\0';
}

static void
up_metrics(struct dispatcher *d, struct aup *u)
{
	struct metrics *m = d->d_svc ? d->d_svc->metrics : NULL;
	char url[ADMIT_URL_MAX], lb[ADMIT_URL_MAX + 160];

	label_of(url, sizeof(url), u->url);
	(void)snprintf(lb, sizeof(lb), "service=\"%s\",upstream=\"%s\"",
	               d->d_svc ? d->d_svc->name : "dispatcher", url);
	if (m == NULL)
		return;
	u->g_limit = metrics_gauge(
	        m, "troupe_dispatcher_limit",
	        "Runs an upstream may have in flight (its rate-limit "
	        "policy's limit; aimd: the sum of its bots')",
	        lb);
	u->g_inflight = metrics_gauge(m, "troupe_dispatcher_inflight",
	                              "Runs of an upstream in flight", lb);
	u->g_queue = metrics_gauge(m, "troupe_dispatcher_queue",
	                           "Runs waiting for an upstream's limit", lb);
	for (int k = 0; k < K_N; k++) {
		char kl[sizeof(lb) + 32];

		(void)snprintf(kl, sizeof(kl), "%s,kind=\"%s\"", lb,
		               kind_names[k]);
		u->c_sig[k] = metrics_counter(
		        m, "troupe_dispatcher_signals_total",
		        "Rate-limit signals of an upstream's answers, by kind",
		        kl);
	}
}

static int
up_find(struct admit *a, struct mstr url, int create, struct dispatcher *d)
{
	struct aup *u;

	if (url.n == 0 || url.n >= ADMIT_URL_MAX)
		return (-1);
	for (int i = 0; i < a->nup; i++)
		if (strlen(a->up[i].url) == url.n &&
		    memcmp(a->up[i].url, url.p, url.n) == 0)
			return (i);
	if (!create)
		return (-1);
	if (a->nup == ADMIT_UPSTREAMS) {
		if (!a->full_logged++)
			log_warnx("%s: more than %d upstreams: the others "
			          "run without a limit",
			          __func__, ADMIT_UPSTREAMS);
		return (-1);
	}
	u = &a->up[a->nup];
	memset(u, 0, sizeof(*u));
	u->used = 1;
	memcpy(u->url, url.p, url.n);
	u->url[url.n] = '\0';
	TAILQ_INIT(&u->q);
	limit_init(&u->k.st, &a->conf, loop_now(d->d_loop));
	u->k.logged = limit_value(&u->k.st);
	u->k.logged_children = u->k.st.children;
	up_metrics(d, u);
	log_info("limit: upstream %s seen, policy %s: limit %llu, "
	         "children %d",
	         u->url, policy_name(a), (unsigned long long)u->k.logged,
	         u->k.st.children);
	return (a->nup++);
}

static int
bot_find(struct admit *a, struct mstr id, int create, uint64_t now)
{
	uint32_t h, i;
	struct abot *b;

	if (id.n == 0 || id.n >= ADMIT_BOT_MAX)
		return (-1);
	h = admit_hash(id.p, id.n);
	for (i = h & (ADMIT_BOTS - 1);; i = (i + 1) & (ADMIT_BOTS - 1)) {
		b = &a->bot[i];
		if (!b->used)
			break;
		if (b->hash == h && strlen(b->id) == id.n &&
		    memcmp(b->id, id.p, id.n) == 0)
			return ((int)i);
	}
	if (!create)
		return (-1);
	if (a->nbots >= ADMIT_BOTS / 4 * 3) {
		if (!a->full_logged++)
			log_warnx("limit: more than %d bots: the others run "
			          "without a bot limit",
			          ADMIT_BOTS / 4 * 3);
		return (-1);
	}
	memset(b, 0, sizeof(*b));
	b->used = 1;
	b->up = -1;
	b->hash = h;
	memcpy(b->id, id.p, id.n);
	b->id[id.n] = '\0';
	limit_init(&b->k.st, &a->conf, now);
	b->k.logged = limit_value(&b->k.st);
	b->k.logged_children = b->k.st.children;
	a->nbots++;
	return ((int)i);
}

/* Read the keys into a fresh conf; -1 with err on a bad value. */
static int
admit_conf(struct dispatcher *d, struct limit_conf *c, char *err,
           size_t errlen)
{
	int64_t quiet, dec, lat, lfloor, lmin, retries, slack;
	const char *p = conf_get(SECTION, "policy", "aimd");
	enum limit_policy pol;

	if (strcmp(p, "fixed") == 0)
		pol = LIMIT_FIXED;
	else if (strcmp(p, "aimd") == 0)
		pol = LIMIT_AIMD;
	else {
		(void)snprintf(err, errlen,
		               "[dispatcher] policy \"%.40s\": want fixed or "
		               "aimd",
		               p);
		return (-1);
	}
	if (conf_get_int(SECTION, "limit_quiet_ms", 5000, 100, 3600000, &quiet,
	                 err, errlen) == -1 ||
	    conf_get_int(SECTION, "aimd_decrease_pct", 70, 10, 95, &dec, err,
	                 errlen) == -1 ||
	    conf_get_int(SECTION, "aimd_latency_pct", 200, 110, 10000, &lat,
	                 err, errlen) == -1 ||
	    conf_get_int(SECTION, "aimd_latency_floor_ms", 50, 0, 600000,
	                 &lfloor, err, errlen) == -1 ||
	    conf_get_int(SECTION, "aimd_limit_min", 1, 1, 1000000, &lmin, err,
	                 errlen) == -1 ||
	    conf_get_int(SECTION, "throttle_retries", 1, 0, 10, &retries, err,
	                 errlen) == -1 ||
	    conf_get_int(SECTION, "queue_slack_ms", 500, 0, 600000, &slack,
	                 err, errlen) == -1)
		return (-1);
	limit_conf_default(c, pol, (int)d->d_per_child);
	c->children_min = d->d_min > 0 ? d->d_min : 1;
	c->children_max =
	        d->d_max > c->children_min ? d->d_max : c->children_min;
	c->children_start = c->children_max; /* open until a signal */
	c->quiet_ms = (uint64_t)quiet;
	c->decrease = (double)dec / 100;
	c->latency_factor = (double)lat / 100;
	c->latency_floor_ms = (uint64_t)lfloor;
	c->limit_min = (double)lmin;
	c->limit_max = (double)c->children_max * c->runs_per_child;
	d->d_throttle_retries = (int)retries;
	d->d_queue_slack_ms = (uint64_t)slack;
	return (0);
}

int
dispatcher_admit_init(struct dispatcher *d, char *err, size_t errlen)
{
	struct admit *a = d->d_adm;
	struct limit_conf c;
	uint64_t now;

	if (admit_conf(d, &c, err, errlen) == -1)
		return (-1);
	if (a == NULL) {
		if ((a = calloc(1, sizeof(*a))) == NULL) {
			(void)snprintf(err, errlen,
			               "rate-limit tables: out "
			               "of memory");
			return (-1);
		}
		a->wake = loop_timer_new(d->d_loop, admit_wake_cb, d);
		a->conf = c;
		d->d_adm = a;
		log_info("limit: policy %s, workers %d..%d, %d runs each, "
		         "%d requeue(s) of a throttled run",
		         policy_name(a), c.children_min, c.children_max,
		         c.runs_per_child, d->d_throttle_retries);
		return (0);
	}
	now = loop_now(d->d_loop);
	if (c.policy != a->conf.policy) {
		log_info("limit: policy %s -> %s (config reload): every "
		         "limit starts open again",
		         policy_name(a),
		         c.policy == LIMIT_FIXED ? "fixed" : "aimd");
		a->conf = c;
		for (int i = 0; i < a->nup; i++)
			limit_init(&a->up[i].k.st, &c, now);
		for (size_t i = 0; i < ADMIT_BOTS; i++)
			if (a->bot[i].used)
				limit_init(&a->bot[i].k.st, &c, now);
	}
	a->conf = c;
	return (0);
}

void
dispatcher_admit_free(struct dispatcher *d)
{
	if (d->d_adm == NULL)
		return;
	if (d->d_adm->wake != NULL)
		loop_timer_free(d->d_adm->wake);
	free(d->d_adm);
	d->d_adm = NULL;
}

void
dispatcher_admit_classify(struct dispatcher *d, struct run *r,
                          struct mstr bot_id)
{
	struct admit *a = d->d_adm;

	r->r_up = r->r_bot = -1;
	if (a == NULL)
		return;
	r->r_bot = bot_find(a, bot_id, 0, 0);
	if (r->r_bot >= 0)
		r->r_up = a->bot[r->r_bot].up;
}

struct run_list *
dispatcher_admit_queue(struct dispatcher *d, const struct run *r, size_t **qn)
{
	struct admit *a = d->d_adm;

	*qn = NULL;
	if (a == NULL || r->r_up < 0)
		return (&d->d_runs.rt_queue);
	*qn = &a->up[r->r_up].qn;
	return (&a->up[r->r_up].q);
}

struct run_list *
dispatcher_admit_queue_at(struct dispatcher *d, int i, size_t **qn)
{
	struct admit *a = d->d_adm;

	*qn = NULL;
	if (i == 0)
		return (&d->d_runs.rt_queue);
	if (a == NULL || i > a->nup)
		return (NULL);
	*qn = &a->up[i - 1].qn;
	return (&a->up[i - 1].q);
}

size_t *
dispatcher_admit_keyq(struct dispatcher *d, const struct run *r)
{
	struct akey *k;

	if (d->d_adm == NULL ||
	    (k = admit_key(d->d_adm, r->r_up, r->r_bot)) == NULL)
		return (NULL);
	return (&k->queued);
}

int
dispatcher_admit_ok(struct dispatcher *d, const struct run *r, uint64_t now)
{
	struct admit *a = d->d_adm;
	struct akey *k;

	if (a == NULL || (k = admit_key(a, r->r_up, r->r_bot)) == NULL)
		return (1);
	return (limit_admit(&k->st, k->inflight, now));
}

/* A run of k ended at now: count it in the service rate. */
static void
key_rate(struct akey *k, uint64_t now)
{
	if (k->rate_ms == 0)
		k->rate_ms = now;
	while (now - k->rate_ms >= 1000) {
		k->rate = k->rate == 0
		                  ? (double)k->rate_n
		                  : 0.5 * k->rate + 0.5 * (double)k->rate_n;
		k->rate_n = 0;
		k->rate_ms += 1000;
		if (now - k->rate_ms > 10000)
			k->rate_ms = now; /* idle: start afresh */
	}
	k->rate_n++;
}

uint64_t
dispatcher_admit_estimate(struct dispatcher *d, const struct run *r)
{
	struct akey *k;

	if (d->d_adm == NULL ||
	    (k = admit_key(d->d_adm, r->r_up, r->r_bot)) == NULL ||
	    k->rate < 1 || k->queued == 0)
		return (0);
	return ((uint64_t)((double)k->queued * 1000 / k->rate));
}

uint64_t
dispatcher_admit_wait(struct dispatcher *d, const struct run *r, uint64_t now)
{
	struct admit *a = d->d_adm;
	struct akey *k;

	if (a == NULL || (k = admit_key(a, r->r_up, r->r_bot)) == NULL)
		return (0);
	return (limit_wait_ms(&k->st, now));
}

void
dispatcher_admit_start(struct dispatcher *d, struct run *r)
{
	struct admit *a = d->d_adm;

	r->r_aup = r->r_abot = -1;
	if (a == NULL)
		return;
	if (r->r_up >= 0) {
		a->up[r->r_up].k.inflight++;
		r->r_aup = r->r_up;
	}
	if (r->r_bot >= 0) {
		a->bot[r->r_bot].k.inflight++;
		r->r_abot = r->r_bot;
	}
}

void
dispatcher_admit_end(struct dispatcher *d, struct run *r)
{
	struct admit *a = d->d_adm;

	if (a == NULL)
		return;
	if (r->r_aup >= 0 && a->up[r->r_aup].k.inflight > 0)
		a->up[r->r_aup].k.inflight--;
	if (r->r_abot >= 0 && a->bot[r->r_abot].k.inflight > 0)
		a->bot[r->r_abot].k.inflight--;
	r->r_aup = r->r_abot = -1;
}

/* The children an upstream's keys want. */
static int
up_children(const struct admit *a, int u)
{
	double sum = 0;
	int any = 0;

	if (a->conf.policy == LIMIT_FIXED)
		return (a->up[u].k.st.children);
	for (size_t i = 0; i < ADMIT_BOTS; i++)
		if (a->bot[i].used && a->bot[i].up == u) {
			sum += floor(a->bot[i].k.st.limit);
			any = 1;
		}
	if (!any)
		return (a->conf.children_max);
	return ((int)ceil(sum / a->conf.runs_per_child));
}

/* The in-flight limit of an upstream (aimd: the sum of its bots'). */
static uint64_t
up_limit(const struct admit *a, int u)
{
	uint64_t sum = 0;
	int any = 0;

	if (a->conf.policy == LIMIT_FIXED)
		return (limit_value(&a->up[u].k.st));
	for (size_t i = 0; i < ADMIT_BOTS; i++)
		if (a->bot[i].used && a->bot[i].up == u) {
			sum += limit_value(&a->bot[i].k.st);
			any = 1;
		}
	return (any ? sum : (uint64_t)a->conf.limit_max);
}

int
dispatcher_admit_ceiling(const struct dispatcher *d)
{
	const struct admit *a = d->d_adm;
	int want = 0;

	if (a == NULL || a->nup == 0)
		return (d->d_max);
	if (a->conf.policy == LIMIT_FIXED) {
		for (int i = 0; i < a->nup; i++)
			if (a->up[i].k.st.children > want)
				want = a->up[i].k.st.children;
	} else {
		double sum = 0;
		int any = 0;

		for (size_t i = 0; i < ADMIT_BOTS; i++)
			if (a->bot[i].used && a->bot[i].up >= 0) {
				sum += floor(a->bot[i].k.st.limit);
				any = 1;
			}
		want = any ? (int)ceil(sum / a->conf.runs_per_child)
		           : d->d_max;
	}
	if (want < a->conf.children_min)
		want = a->conf.children_min;
	if (want > d->d_max)
		want = d->d_max;
	return (want);
}

static void
up_gauges(struct admit *a, int u)
{
	struct aup *p = &a->up[u];

	if (p->g_limit)
		*p->g_limit = (double)up_limit(a, u);
	if (p->g_inflight)
		*p->g_inflight = (double)p->k.inflight;
	if (p->g_queue)
		*p->g_queue = (double)p->qn;
}

/* One line about a change of key k (of upstream u, bot b or NULL). */
static void
key_log(struct admit *a, int u, const char *bot, struct akey *k,
        const char *cause, uint64_t now)
{
	uint64_t v = limit_value(&k->st);

	log_info("limit: upstream %s%s%s, policy %s: limit %llu -> %llu, "
	         "children %d -> %d (%s; last signal %s, paused %llu ms, "
	         "%llu in flight)",
	         u >= 0 ? a->up[u].url : "?", bot ? ", bot " : "",
	         bot ? bot : "", policy_name(a), (unsigned long long)k->logged,
	         (unsigned long long)v, k->logged_children, k->st.children,
	         cause, k->sig ? k->sig : "none",
	         (unsigned long long)limit_wait_ms(&k->st, now),
	         (unsigned long long)k->inflight);
	k->logged = v;
	k->logged_children = k->st.children;
	k->log_ms = now;
	k->pend_cause = NULL;
}

/* After a policy step that said "changed": log now (a decrease, a pause)
 * or within a second (an increase). */
static void
key_changed(struct admit *a, int u, const char *bot, struct akey *k,
            const char *cause, uint64_t now)
{
	uint64_t v = limit_value(&k->st);

	if (v > k->logged && k->st.children >= k->logged_children &&
	    now - k->log_ms < ADMIT_LOG_MS) {
		k->pend_cause = cause;
		return;
	}
	key_log(a, u, bot, k, cause, now);
}

/* Move the children toward what the limits allow. */
static void
admit_rescale(struct dispatcher *d, const char *cause)
{
	int ceil_ = dispatcher_admit_ceiling(d);

	if (d->d_target > ceil_)
		(void)dispatcher_scale_set(d, ceil_, cause);
}

void
dispatcher_admit_done(struct dispatcher *d, struct run *r,
                      const struct run_done *dn)
{
	struct admit *a = d->d_adm;
	uint64_t now;
	struct limit_obs o = {0};
	struct akey *k;
	const char *cause = NULL, *sig = NULL;
	int u, b, exhausted, changed;

	if (a == NULL)
		return;
	now = loop_now(d->d_loop);
	/* No bot: not a chat's upstream (a webhook's plugin call). */
	if (dn->bot_id.n == 0 || (u = up_find(a, dn->upstream, 1, d)) == -1)
		return;
	b = bot_find(a, dn->bot_id, 1, now);
	if (b >= 0)
		a->bot[b].up = u;
	/* The run's next try (a requeue) waits for these keys. */
	r->r_up = u;
	r->r_bot = b;
	if (dn->upstream_status == 0 && dn->rl_seen == 0 &&
	    dn->backoff_ms == 0)
		return; /* the upstream was not called */
	exhausted = !dn->throttled && dn->rl_remaining == 0;
	/* An exhausted quota on an answer that succeeded: fixed takes it
	 * as a signal (the source design: X-RateLimit-Remaining: 0); aimd
	 * as "at the limit": no increase, a pause until its reset if one
	 * is given, no cut. */
	o.throttled =
	        dn->throttled || (exhausted && a->conf.policy == LIMIT_FIXED);
	o.timeout = (dn->rl_seen & RL_SEEN_TIMEOUT) != 0;
	/* fixed: a timeout is a signal like the others (the source
	 * design's list); aimd cuts on it gently (from its limit). */
	if (o.timeout && a->conf.policy == LIMIT_FIXED)
		o.throttled = 1;
	o.backoff_ms = (int64_t)dn->backoff_ms;
	if (dn->upstream_status >= 200 && dn->upstream_status < 300)
		o.latency_us = dn->upstream_us;
	if (dn->throttled) {
		sig = dn->upstream_status == 429     ? kind_names[K_429]
		      : dn->upstream_status == 503   ? kind_names[K_503]
		      : (dn->rl_seen & RL_SEEN_COZE) ? kind_names[K_COZE]
		                                     : "throttled";
	} else if (exhausted)
		sig = kind_names[K_EXHAUSTED];
	else if (o.timeout)
		sig = kind_names[K_TIMEOUT];
	if (sig != NULL) {
		uint64_t *c[K_N] = {0};
		struct aup *p = &a->up[u];

		if (dn->upstream_status == 429)
			c[K_429] = p->c_sig[K_429];
		if (dn->upstream_status == 503 && dn->throttled)
			c[K_503] = p->c_sig[K_503];
		if (dn->rl_seen & RL_SEEN_RETRY_AFTER)
			c[K_RETRY_AFTER] = p->c_sig[K_RETRY_AFTER];
		if (dn->rl_seen & RL_SEEN_XRATELIMIT)
			c[K_XRL] = p->c_sig[K_XRL];
		if (dn->rl_seen & RL_SEEN_IETF)
			c[K_IETF] = p->c_sig[K_IETF];
		if (dn->rl_seen & RL_SEEN_OPENAI)
			c[K_OPENAI] = p->c_sig[K_OPENAI];
		if (dn->rl_seen & RL_SEEN_COZE)
			c[K_COZE] = p->c_sig[K_COZE];
		if (o.timeout)
			c[K_TIMEOUT] = p->c_sig[K_TIMEOUT];
		if (exhausted)
			c[K_EXHAUSTED] = p->c_sig[K_EXHAUSTED];
		for (int i = 0; i < K_N; i++)
			if (c[i] != NULL)
				++*c[i];
	}
	/* Both keys remember the signal (for status); the policy's key
	 * acts on it. */
	for (int i = 0; i < 2; i++) {
		struct akey *x =
		        i == 0 ? &a->up[u].k : (b >= 0 ? &a->bot[b].k : NULL);

		if (x == NULL || (sig == NULL && dn->backoff_ms == 0))
			continue;
		x->sig = sig ? sig : "worker_pause";
		x->sig_ms = now;
		x->sig_backoff = dn->backoff_ms;
		if (sig != NULL)
			x->signals++;
	}
	if ((k = admit_key(a, u, b)) == NULL)
		return;
	if (dn->status != 0)
		key_rate(k, now);
	o.inflight = k->inflight;
	if (exhausted && a->conf.policy == LIMIT_AIMD)
		changed = 0;
	else
		changed = limit_on_result(&k->st, &a->conf, &o, now, &cause);
	/* A pause asked for without a throttle (a worker that holds back
	 * after a 429 of its own, an exhausted quota's reset). */
	if (dn->backoff_ms > 0 && now + dn->backoff_ms > k->st.pause_until) {
		k->st.pause_until = now + dn->backoff_ms;
		if (!changed) {
			changed = 1;
			cause = "paused until the upstream's reset";
		}
	}
	if (changed && cause != NULL) {
		key_changed(a, u,
		            a->conf.policy == LIMIT_AIMD ? a->bot[b].id : NULL,
		            k, cause, now);
		admit_rescale(d, cause);
	}
	up_gauges(a, u);
}

void
dispatcher_admit_tick(struct dispatcher *d)
{
	struct admit *a = d->d_adm;
	const char *cause;
	uint64_t now;

	if (a == NULL)
		return;
	now = loop_now(d->d_loop);
	for (int u = 0; u < a->nup; u++) {
		struct akey *k = &a->up[u].k;

		cause = NULL;
		if (limit_on_tick(&k->st, &a->conf, now, &cause) && cause)
			key_log(a, u, NULL, k, cause, now);
		else if (k->pend_cause != NULL &&
		         now - k->log_ms >= ADMIT_LOG_MS)
			key_log(a, u, NULL, k, k->pend_cause, now);
		up_gauges(a, u);
	}
	if (a->conf.policy == LIMIT_AIMD)
		for (size_t i = 0; i < ADMIT_BOTS; i++) {
			struct abot *b = &a->bot[i];

			if (b->used && b->k.pend_cause != NULL &&
			    now - b->k.log_ms >= ADMIT_LOG_MS)
				key_log(a, b->up, b->id, &b->k,
				        b->k.pend_cause, now);
		}
}

static int
key_json(struct buf *o, const struct akey *k, uint64_t now, uint64_t wall)
{
	uint64_t wait = limit_wait_ms(&k->st, now);

	if (buf_addf(o, "\"inflight\":%llu,\"signals\":%llu,",
	             (unsigned long long)k->inflight,
	             (unsigned long long)k->signals) == -1)
		return (-1);
	if (k->sig != NULL) {
		if (buf_addf(
		            o,
		            "\"last_signal\":{\"kind\":\"%s\",\"age_ms\":%llu,"
		            "\"backoff_ms\":%llu},",
		            k->sig, (unsigned long long)(now - k->sig_ms),
		            (unsigned long long)k->sig_backoff) == -1)
			return (-1);
	} else if (buf_adds(o, "\"last_signal\":null,") == -1)
		return (-1);
	return (buf_addf(o, "\"paused_ms\":%llu,\"paused_until\":%llu",
	                 (unsigned long long)wait,
	                 (unsigned long long)(wait ? wall + wait : 0)));
}

int
dispatcher_admit_json(struct dispatcher *d, struct buf *o)
{
	struct admit *a = d->d_adm;
	uint64_t now = loop_now(d->d_loop), wall = now_wall_ms();
	size_t known = 0;
	int first = 1;

	if (buf_adds(o, "\"upstreams\":[") == -1)
		return (-1);
	for (int u = 0; a != NULL && u < a->nup; u++) {
		struct aup *p = &a->up[u];

		known += p->qn;
		if (buf_addf(o, "%s{\"upstream\":", u ? "," : "") == -1 ||
		    buf_add_json_str(o, p->url, strlen(p->url)) == -1 ||
		    buf_addf(o,
		             ",\"policy\":\"%s\",\"limit\":%llu,"
		             "\"children\":%d,\"queue\":%zu,",
		             policy_name(a),
		             (unsigned long long)up_limit(a, u),
		             up_children(a, u), p->qn) == -1 ||
		    key_json(o, &p->k, now, wall) == -1 ||
		    buf_adds(o, "}") == -1)
			return (-1);
	}
	if (buf_adds(o, "],\"bots\":[") == -1)
		return (-1);
	for (size_t i = 0; a != NULL && i < ADMIT_BOTS; i++) {
		struct abot *b = &a->bot[i];

		if (!b->used)
			continue;
		if (buf_addf(o, "%s{\"bot_id\":", first ? "" : ",") == -1 ||
		    buf_add_json_str(o, b->id, strlen(b->id)) == -1 ||
		    buf_adds(o, ",\"upstream\":") == -1 ||
		    (b->up >= 0 ? buf_add_json_str(o, a->up[b->up].url,
		                                   strlen(a->up[b->up].url))
		                : buf_adds(o, "null")) == -1 ||
		    buf_addf(o, ",\"limit\":%llu,",
		             (unsigned long long)(a->conf.policy == LIMIT_AIMD
		                                          ? limit_value(
		                                                    &b->k.st)
		                                          : 0)) == -1 ||
		    key_json(o, &b->k, now, wall) == -1 ||
		    buf_adds(o, "}") == -1)
			return (-1);
		first = 0;
	}
	return (buf_addf(o, "],\"policy\":\"%s\",\"unknown_queue\":%zu",
	                 a ? policy_name(a) : "none",
	                 d->d_runs.rt_qlen >= known ? d->d_runs.rt_qlen - known
	                                            : 0) == -1
	                ? -1
	                : 0);
}
