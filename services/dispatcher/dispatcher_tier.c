/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_tier: the degradation tier of PRODUCT.md §6, from measured
 * signals, with hysteresis (docs/tiers.md).
 *
 *   L1  optional work deferred: an SLA breach (SLA_SIGNAL from telemetry:
 *       a service's eBPF run-queue p99 above its threshold), the run queue
 *       above its low mark, or storage's commit p99 (HEALTH) high.
 *   L2  serve from cache, spool writes: HEALTH says PostgreSQL or Redis
 *       is down, or storage still replays its spool.
 *   L3  shed early: the run queue above its high mark, or an SLA breach
 *       that held tier_enter_ms while the queue kept growing.  The run
 *       admission queues nothing (dispatcher_tier_now() == 3) and the edge
 *       sheds new chats with 503 + Retry-After.
 *
 * Each level is entered once its condition held tier_enter_ms and left
 * once it was clear tier_leave_ms; the highest active level is the tier.
 * tier_step() is that machine, pure (inputs and a clock in, no I/O), so
 * the unit tests drive it through time.  The rest is the dispatcher's
 * side: the latest HEALTH and SLA_SIGNAL, the tick that steps the
 * machine, one journal line per change with its cause, the metrics, and
 * TIER_STATE to the edge and storage on every change and every
 * TIER_PUBLISH_MS.
 *
 * It never refuses or delays a run itself (the admission in
 * dispatcher_run.c asks dispatcher_tier_now()), never blocks, and never
 * logs more than one line per change.
 */
#include <stdio.h>
#include <string.h>

#include "dispatcher.h"
#include "dispatcher_tier.h"

#define SECTION "dispatcher"
#define TIER_SLA_MAX 16 /* services whose SLA signal is kept */

static const char *const names[TIER_LEVELS] = {"L0", "L1", "L2", "L3"};

const char *
tier_name(int tier)
{
	if (tier < 0 || tier >= TIER_LEVELS)
		return ("L?");
	return (names[tier]);
}

void
tier_conf_default(struct tier_conf *c)
{
	c->enter_ms = 2000;
	c->leave_ms = 10000;
	c->queue_low_pct = 10;
	c->queue_high_pct = 50;
	c->dep_latency_us = 1000000;
	c->health_stale_ms = 10000;
}

void
tier_init(struct tier_fsm *f, uint64_t now_ms)
{
	int k;

	memset(f, 0, sizeof(*f));
	f->since_ms = now_ms;
	for (k = 0; k < TIER_LEVELS; k++)
		f->clear_ms[k] = now_ms;
	f->qhist_sec = now_ms / 1000;
}

size_t
tier_queue_mark(size_t qmax, uint32_t pct)
{
	size_t m;

	if (qmax == 0)
		return (0);
	m = (size_t)((uint64_t)qmax * pct / 100);
	return (m < 1 ? 1 : m);
}

/* Note this second's queue depth (seconds skipped take it too). */
static void
tier_qsample(struct tier_fsm *f, uint64_t now_ms, size_t qlen)
{
	uint64_t sec = now_ms / 1000, s;

	if (f->qhist_n == 0) {
		f->qhist_sec = sec;
		f->qhist[sec % TIER_QHIST] = qlen;
		f->qhist_n = 1;
		return;
	}
	if (sec < f->qhist_sec)
		return;
	for (s = f->qhist_sec + 1; s <= sec && s <= f->qhist_sec + TIER_QHIST;
	     s++) {
		f->qhist[s % TIER_QHIST] = qlen;
		if (f->qhist_n < TIER_QHIST)
			f->qhist_n++;
	}
	f->qhist[sec % TIER_QHIST] = qlen; /* the latest of this second */
	f->qhist_sec = sec;
}

/* The queue depth back_s seconds ago (the oldest kept if further), or
 * -1 without any older sample. */
static long long
tier_qago(const struct tier_fsm *f, uint64_t back_s)
{
	if (f->qhist_n <= 1)
		return (-1);
	if (back_s >= (uint64_t)f->qhist_n)
		back_s = (uint64_t)f->qhist_n - 1;
	if (back_s == 0)
		back_s = 1;
	return ((long long)f->qhist[(f->qhist_sec - back_s) % TIER_QHIST]);
}

/* Each level's condition now, with its cause in f->why. */
static void
tier_conditions(struct tier_fsm *f, const struct tier_conf *c,
                const struct tier_input *in, int cond[TIER_LEVELS])
{
	size_t low = tier_queue_mark(in->qmax, c->queue_low_pct);
	size_t high = tier_queue_mark(in->qmax, c->queue_high_pct);
	uint64_t back_s = c->enter_ms / 1000 ? c->enter_ms / 1000 : 1;
	long long ago;
	const char *svc = in->sla_service ? in->sla_service : "?";

	memset(cond, 0, sizeof(int) * TIER_LEVELS);
	if (in->sla_breach) {
		if (f->sla_ms == 0)
			f->sla_ms = in->now_ms ? in->now_ms : 1;
	} else
		f->sla_ms = 0;

	/* L3 first: the strongest cause of all. */
	ago = tier_qago(f, back_s);
	if (high > 0 && in->qlen > high) {
		cond[3] = 1;
		snprintf(f->why[3], TIER_CAUSE_MAX,
		         "run queue %zu of %zu above the high mark %zu",
		         in->qlen, in->qmax, high);
	} else if (in->sla_breach && f->sla_ms != 0 &&
	           in->now_ms - f->sla_ms >= c->enter_ms && in->qlen > 0 &&
	           ago >= 0 && (long long)in->qlen > ago) {
		cond[3] = 1;
		snprintf(
		        f->why[3], TIER_CAUSE_MAX,
		        "SLA breach (%s run-queue p99 %llu us > %llu us) with "
		        "the run queue growing (%lld -> %zu)",
		        svc, (unsigned long long)in->sla_p99_us,
		        (unsigned long long)in->sla_threshold_us, ago,
		        in->qlen);
	}

	if (in->health && (!in->pg_ok || !in->redis_ok)) {
		cond[2] = 1;
		snprintf(f->why[2], TIER_CAUSE_MAX, "%s%s%s down",
		         !in->pg_ok ? "postgres" : "",
		         !in->pg_ok && !in->redis_ok ? " and " : "",
		         !in->redis_ok ? "redis" : "");
	} else if (in->health && in->spool_bytes > 0) {
		cond[2] = 1;
		snprintf(f->why[2], TIER_CAUSE_MAX,
		         "storage replays its spool (%llu bytes left)",
		         (unsigned long long)in->spool_bytes);
	}

	if (in->sla_breach) {
		cond[1] = 1;
		snprintf(f->why[1], TIER_CAUSE_MAX,
		         "SLA breach: %s run-queue p99 %llu us > %llu us", svc,
		         (unsigned long long)in->sla_p99_us,
		         (unsigned long long)in->sla_threshold_us);
	} else if (low > 0 && in->qlen > low) {
		cond[1] = 1;
		snprintf(f->why[1], TIER_CAUSE_MAX,
		         "run queue %zu of %zu above the low mark %zu",
		         in->qlen, in->qmax, low);
	} else if (in->health && c->dep_latency_us > 0 &&
	           in->dep_latency_us > c->dep_latency_us) {
		cond[1] = 1;
		snprintf(f->why[1], TIER_CAUSE_MAX,
		         "storage commit p99 %llu ms above %llu ms",
		         (unsigned long long)(in->dep_latency_us / 1000),
		         (unsigned long long)(c->dep_latency_us / 1000));
	}
}

int
tier_step(struct tier_fsm *f, const struct tier_conf *c,
          const struct tier_input *in)
{
	int cond[TIER_LEVELS], k, tier = 0, old = f->tier;
	uint64_t now = in->now_ms;

	tier_conditions(f, c, in, cond);
	tier_qsample(f, now, in->qlen);
	for (k = 1; k < TIER_LEVELS; k++) {
		if (cond[k] && !f->cond[k])
			f->held_ms[k] = now;
		if (!cond[k] && f->cond[k])
			f->clear_ms[k] = now;
		f->cond[k] = cond[k];
		if (!f->active[k] && cond[k] &&
		    now - f->held_ms[k] >= c->enter_ms)
			f->active[k] = 1;
		else if (f->active[k] && !cond[k] &&
		         now - f->clear_ms[k] >= c->leave_ms)
			f->active[k] = 0;
		if (f->active[k])
			tier = k;
	}
	if (tier != old) {
		f->tier = tier;
		f->since_ms = now;
	}
	/* The cause of the tier: its latest one while it holds. */
	if (tier == 0)
		f->cause[0] = '\0';
	else if (tier != old || cond[tier])
		snprintf(f->cause, sizeof(f->cause), "%s", f->why[tier]);
	return (tier != old);
}

/* The dispatcher's side. */

struct tier_sla {
	char name[64];
	uint64_t p99_us, threshold_us, window_ms;
	uint64_t at_ms; /* monotonic: received */
	int breach;
};

static struct {
	int init;
	struct tier_conf conf;
	struct tier_fsm fsm;
	/* The latest HEALTH. */
	int have_health;
	uint64_t health_ms;
	int pg_ok, redis_ok;
	uint64_t spool_bytes, latency_us, errors;
	/* The latest SLA_SIGNAL per service. */
	struct tier_sla sla[TIER_SLA_MAX];
	int nsla;
	uint64_t last_pub_ms;
	uint64_t since_wall_ms;
	/* metrics */
	double *g_tier, *g_cond[TIER_LEVELS], *g_since;
	uint64_t *c_enter[TIER_LEVELS], *c_health, *c_sla;
	uint64_t sink;
} T;

int
dispatcher_tier_now(const struct dispatcher *d)
{
	return (d->d_tier);
}

uint64_t
dispatcher_tier_retry_after(const struct dispatcher *d)
{
	uint64_t s = (T.conf.leave_ms + 999) / 1000;

	(void)d;
	return (s < 1 ? 1 : s);
}

const char *
dispatcher_tier_cause(const struct dispatcher *d)
{
	(void)d;
	return (T.fsm.cause);
}

static uint64_t *
tier_counter(struct dispatcher *d, const char *fam, const char *help,
             const char *tier)
{
	char lb[128];
	uint64_t *c;

	if (tier != NULL)
		snprintf(lb, sizeof(lb), "service=\"%s\",tier=\"%s\"",
		         d->d_svc->name, tier);
	else
		snprintf(lb, sizeof(lb), "service=\"%s\"", d->d_svc->name);
	c = metrics_counter(d->d_svc->metrics, fam, help, lb);
	return (c != NULL ? c : &T.sink);
}

static double *
tier_gauge(struct dispatcher *d, const char *fam, const char *help,
           const char *tier)
{
	char lb[128];

	if (tier != NULL)
		snprintf(lb, sizeof(lb), "service=\"%s\",tier=\"%s\"",
		         d->d_svc->name, tier);
	else
		snprintf(lb, sizeof(lb), "service=\"%s\"", d->d_svc->name);
	return (metrics_gauge(d->d_svc->metrics, fam, help, lb));
}

static void
tier_set(double *g, double v)
{
	if (g != NULL)
		*g = v;
}

static void
tier_metrics(struct dispatcher *d)
{
	static const char ent[] = "troupe_dispatcher_tier_entered_total";
	static const char ent_h[] = "Times the degradation tier became this";
	static const char cnd[] = "troupe_dispatcher_tier_condition";
	static const char cnd_h[] =
	        "1 while the condition of the tier holds (before hysteresis)";
	int k;

	T.g_tier =
	        tier_gauge(d, "troupe_dispatcher_tier",
	                   "Degradation tier: 0 normal, 1-3 for L1-L3", NULL);
	T.g_since = tier_gauge(d, "troupe_dispatcher_tier_since_seconds",
	                       "Unix time the current tier began", NULL);
	for (k = 0; k < TIER_LEVELS; k++) {
		T.c_enter[k] = tier_counter(d, ent, ent_h, names[k]);
		if (k > 0)
			T.g_cond[k] = tier_gauge(d, cnd, cnd_h, names[k]);
	}
	T.c_health = tier_counter(d, "troupe_dispatcher_health_reports_total",
	                          "HEALTH reports taken from storage", NULL);
	T.c_sla =
	        tier_counter(d, "troupe_dispatcher_sla_signals_total",
	                     "SLA_SIGNAL reports taken from telemetry", NULL);
}

int
dispatcher_tier_init(struct dispatcher *d, char *err, size_t errlen)
{
	struct tier_conf c;
	int64_t enter, leave, low, high, dep, stale;

	tier_conf_default(&c);
	if (conf_get_int(SECTION, "tier_enter_ms", (int64_t)c.enter_ms, 0,
	                 3600000, &enter, err, errlen) == -1 ||
	    conf_get_int(SECTION, "tier_leave_ms", (int64_t)c.leave_ms, 0,
	                 3600000, &leave, err, errlen) == -1 ||
	    conf_get_int(SECTION, "tier_queue_low_pct", c.queue_low_pct, 1,
	                 100, &low, err, errlen) == -1 ||
	    conf_get_int(SECTION, "tier_queue_high_pct", c.queue_high_pct, 1,
	                 100, &high, err, errlen) == -1 ||
	    conf_get_int(SECTION, "tier_dep_latency_ms",
	                 (int64_t)(c.dep_latency_us / 1000), 0, 3600000, &dep,
	                 err, errlen) == -1 ||
	    conf_get_int(SECTION, "tier_health_stale_ms",
	                 (int64_t)c.health_stale_ms, 1000, 3600000, &stale,
	                 err, errlen) == -1)
		return (-1);
	if (high < low) {
		snprintf(err, errlen,
		         "[dispatcher] tier_queue_high_pct %lld is below "
		         "tier_queue_low_pct %lld",
		         (long long)high, (long long)low);
		return (-1);
	}
	c.enter_ms = (uint64_t)enter;
	c.leave_ms = (uint64_t)leave;
	c.queue_low_pct = (uint32_t)low;
	c.queue_high_pct = (uint32_t)high;
	c.dep_latency_us = (uint64_t)dep * 1000;
	c.health_stale_ms = (uint64_t)stale;
	T.conf = c;
	if (!T.init) {
		T.init = 1;
		tier_init(&T.fsm, now_mono_ms());
		T.since_wall_ms = now_wall_ms();
		tier_metrics(d);
		tier_set(T.g_tier, 0);
		tier_set(T.g_since, (double)(T.since_wall_ms / 1000));
		d->d_tier = 0;
	}
	return (0);
}

void
dispatcher_tier_health(struct dispatcher *d, const struct health_report *h)
{
	int changed = !T.have_health || T.pg_ok != (h->pg_ok != 0) ||
	              T.redis_ok != (h->redis_ok != 0);

	(void)d;
	T.have_health = 1;
	T.health_ms = now_mono_ms();
	T.pg_ok = h->pg_ok != 0;
	T.redis_ok = h->redis_ok != 0;
	T.spool_bytes = h->spool_bytes;
	T.latency_us = h->latency_us;
	T.errors = h->errors;
	if (T.c_health != NULL)
		++*T.c_health;
	if (changed)
		log_debug("%s: %.*s: postgres %s, redis %s, spool %llu bytes",
		          __func__, (int)h->service.n, h->service.p,
		          T.pg_ok ? "up" : "down", T.redis_ok ? "up" : "down",
		          (unsigned long long)h->spool_bytes);
}

void
dispatcher_tier_sla(struct dispatcher *d, const struct sla_signal *s)
{
	struct tier_sla *e = NULL;
	int i;

	(void)d;
	if (s->service.n == 0 || s->service.n >= sizeof(e->name))
		return;
	for (i = 0; i < T.nsla; i++)
		if (mstr_eq(s->service, T.sla[i].name))
			e = &T.sla[i];
	if (e == NULL) {
		if (T.nsla == TIER_SLA_MAX)
			return;
		e = &T.sla[T.nsla++];
		memcpy(e->name, s->service.p, s->service.n);
		e->name[s->service.n] = '\0';
	}
	e->p99_us = s->p99_us;
	e->threshold_us = s->threshold_us;
	e->window_ms = s->window_ms;
	e->breach = s->breach != 0;
	e->at_ms = now_mono_ms();
	if (T.c_sla != NULL)
		++*T.c_sla;
}

/* The machine's inputs now. */
static void
tier_inputs(struct dispatcher *d, uint64_t now, struct tier_input *in)
{
	const struct tier_sla *e, *worst = NULL;
	uint64_t fresh;
	int i;

	memset(in, 0, sizeof(*in));
	in->now_ms = now;
	in->qlen = d->d_runs.rt_qlen;
	in->qmax = d->d_queue_max;
	in->health =
	        T.have_health && now - T.health_ms <= T.conf.health_stale_ms;
	in->pg_ok = T.pg_ok;
	in->redis_ok = T.redis_ok;
	in->spool_bytes = T.spool_bytes;
	in->dep_latency_us = T.latency_us;
	for (i = 0; i < T.nsla; i++) {
		e = &T.sla[i];
		/* A signal counts for two windows (and a second of slack):
		 * telemetry sends one per window. */
		fresh = 2 * e->window_ms + 1000;
		if (!e->breach || now - e->at_ms > fresh ||
		    e->threshold_us == 0)
			continue;
		if (worst == NULL || e->p99_us * worst->threshold_us >
		                             worst->p99_us * e->threshold_us)
			worst = e;
	}
	if (worst != NULL) {
		in->sla_breach = 1;
		in->sla_service = worst->name;
		in->sla_p99_us = worst->p99_us;
		in->sla_threshold_us = worst->threshold_us;
	}
}

static void
tier_publish(struct dispatcher *d, uint64_t now)
{
	struct msg_head h = {MSTR_NULL, MSTR_NULL, 0, MSTR_NULL};
	struct tier_state ts = {
	        .tier = (uint64_t)T.fsm.tier,
	        .cause = MSTR(T.fsm.cause),
	        .retry_after = dispatcher_tier_retry_after(d),
	        .since_ms = T.since_wall_ms,
	};

	T.last_pub_ms = now;
	/* Refused (a backlog is full, or the peer is away): the next
	 * publish repeats it.  The edge sheds and shows it in /readyz;
	 * storage defers optional work. */
	(void)msg_send_tier_state(d->d_svc->ipc, "edge", &h, &ts);
	(void)msg_send_tier_state(d->d_svc->ipc, "storage", &h, &ts);
}

void
dispatcher_tier_tick(struct dispatcher *d)
{
	struct tier_input in;
	uint64_t now = now_mono_ms();
	int old = T.fsm.tier, k;
	char was[TIER_CAUSE_MAX];

	if (!T.init)
		return;
	snprintf(was, sizeof(was), "%s", T.fsm.cause);
	tier_inputs(d, now, &in);
	for (k = 1; k < TIER_LEVELS; k++)
		tier_set(T.g_cond[k], 0);
	if (tier_step(&T.fsm, &T.conf, &in)) {
		d->d_tier = T.fsm.tier;
		T.since_wall_ms = now_wall_ms();
		if (T.fsm.tier > old)
			log_info("tier: %s -> %s: %s", tier_name(old),
			         tier_name(T.fsm.tier), T.fsm.cause);
		else
			log_info("tier: %s -> %s: %s cleared for %llu ms "
			         "(%s)%s%s",
			         tier_name(old), tier_name(T.fsm.tier),
			         tier_name(old),
			         (unsigned long long)T.conf.leave_ms, was,
			         T.fsm.tier ? "; still: " : "", T.fsm.cause);
		tier_set(T.g_tier, T.fsm.tier);
		tier_set(T.g_since, (double)(T.since_wall_ms / 1000));
		if (T.c_enter[T.fsm.tier] != NULL)
			++*T.c_enter[T.fsm.tier];
		tier_publish(d, now);
	} else if (now - T.last_pub_ms >= TIER_PUBLISH_MS)
		tier_publish(d, now);
	for (k = 1; k < TIER_LEVELS; k++)
		tier_set(T.g_cond[k], T.fsm.cond[k]);
}
