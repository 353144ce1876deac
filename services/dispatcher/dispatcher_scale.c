/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_scale: how many worker children troupe-dispatcher keeps.
 *
 * The mechanism is dispatcher_scale_set(target, cause): slots [0, target)
 * are wanted.  Raising the target starts the new slots; lowering it
 * retires the highest ones (SIGTERM: a retiring child takes no new runs
 * and exits once its runs are done).  Every change is logged with its
 * cause and counts.  Policies only ever call this.  The rate-limit
 * policies (dispatcher_admit.c) set a ceiling: the target never goes
 * above dispatcher_admit_ceiling(), and a lower ceiling retires children
 * at once (PRODUCT.md §5).
 *
 * The default policy (dispatcher_scale_policy, pure): start with
 * workers_min; grow by one when a run finds every ready child full and
 * no child is already starting or waiting to restart (so a burst grows
 * one child at a time, and a crash loop does not grow at all); shrink by
 * one after DISPATCHER_SHRINK_MS during which nothing was queued and the
 * runs in flight would fit in one child fewer at half its limit.
 *
 * Also the gauges and the STATUS= line, which follow the same counts.
 * Never exits.
 */
#include <stdio.h>

#include "dispatcher.h"

int
dispatcher_scale_policy(struct scale_policy *p, const struct scale_obs *o,
                        uint64_t now, const char **cause)
{
	int t = o->so_target;

	if (o->so_full || o->so_queued > 0) {
		p->sp_low_since = 0;
		if (o->so_pending == 0 && t < o->so_max) {
			*cause = "every ready worker is full";
			return (t + 1);
		}
		return (t);
	}
	if (t <= o->so_min ||
	    o->so_inflight * 2 > (uint64_t)(t - 1) * o->so_per_child) {
		p->sp_low_since = 0;
		return (t);
	}
	if (p->sp_low_since == 0) {
		p->sp_low_since = now != 0 ? now : 1;
		return (t);
	}
	if (now - p->sp_low_since < DISPATCHER_SHRINK_MS)
		return (t);
	p->sp_low_since = now;
	*cause = "load fits one worker fewer at half its limit for 30 s";
	return (t - 1);
}

int
dispatcher_scale_set(struct dispatcher *d, int target, const char *cause)
{
	int old = d->d_target, k, ceiling = dispatcher_admit_ceiling(d);

	/* The rate limits cap the count (never below workers_min). */
	if (target > ceiling)
		target = ceiling;
	if (target < d->d_min)
		target = d->d_min;
	if (target > d->d_max)
		target = d->d_max;
	if (d->d_stopping || target == old)
		return (old);
	d->d_target = target;
	d->d_policy.sp_low_since = 0;
	log_info("workers: target %d -> %d (%s; %d ready, %llu runs, %zu "
	         "queued)",
	         old, target, cause, d->d_ready,
	         (unsigned long long)d->d_inflight, d->d_runs.rt_qlen);
	if (target > old) {
		if (d->m_grow)
			(*d->m_grow)++;
		for (k = old; k < target; k++)
			dispatcher_spawn_want(d, &d->d_child[k]);
	} else {
		if (d->m_shrink)
			(*d->m_shrink)++;
		for (k = old - 1; k >= target; k--)
			dispatcher_spawn_retire(d, &d->d_child[k]);
	}
	dispatcher_scale_refresh(d, 1);
	return (target);
}

static void
scale_observe(const struct dispatcher *d, struct scale_obs *o, int full)
{
	o->so_target = d->d_target;
	o->so_min = d->d_min;
	o->so_max = dispatcher_admit_ceiling(d);
	o->so_pending = d->d_pending;
	o->so_full = full;
	o->so_queued = d->d_runs.rt_qlen;
	o->so_inflight = d->d_inflight;
	o->so_per_child = d->d_per_child;
}

static void
scale_run(struct dispatcher *d, int full)
{
	struct scale_obs o;
	const char *cause = "policy";
	int t;

	if (d->d_stopping)
		return;
	scale_observe(d, &o, full);
	t = dispatcher_scale_policy(&d->d_policy, &o, loop_now(d->d_loop),
	                            &cause);
	if (t != d->d_target)
		(void)dispatcher_scale_set(d, t, cause);
}

void
dispatcher_scale_full(struct dispatcher *d)
{
	scale_run(d, 1);
}

void
dispatcher_scale_tick(struct dispatcher *d)
{
	scale_run(d, 0);
}

/* The concurrency limits as gauges: what the ready children can hold
 * now, what all d_max could, and the queue's bound. */
static void
scale_limit_gauges(struct dispatcher *d)
{
	char lb[128];
	double *g;

	snprintf(lb, sizeof(lb), "service=\"%s\"", d->d_svc->name);
	if ((g = metrics_gauge(d->d_svc->metrics,
	                       "troupe_dispatch_concurrency_limit",
	                       "Runs the ready worker children can hold now "
	                       "(runs_per_worker x ready children)",
	                       lb)) != NULL)
		*g = (double)d->d_per_child * d->d_ready;
	if ((g = metrics_gauge(d->d_svc->metrics,
	                       "troupe_dispatch_concurrency_max",
	                       "Runs at most in flight (runs_per_worker x "
	                       "workers_max)",
	                       lb)) != NULL)
		*g = (double)d->d_per_child * d->d_max;
	if ((g = metrics_gauge(d->d_svc->metrics,
	                       "troupe_dispatch_queue_limit",
	                       "Runs that may wait for room before the "
	                       "dispatcher answers 503",
	                       lb)) != NULL)
		*g = (double)d->d_queue_max;
}

void
dispatcher_scale_refresh(struct dispatcher *d, int urgent)
{
	scale_limit_gauges(d);
	if (d->m_children)
		*d->m_children = d->d_live;
	if (d->m_ready)
		*d->m_ready = d->d_ready;
	if (d->m_target)
		*d->m_target = d->d_target;
	if (d->m_inflight)
		*d->m_inflight = (double)d->d_inflight;
	if (d->m_queue)
		*d->m_queue = (double)d->d_runs.rt_qlen;
	d->d_status_dirty = 1;
	if (urgent)
		dispatcher_scale_status(d, 1);
}

void
dispatcher_scale_status(struct dispatcher *d, int force)
{
	uint64_t now = now_mono_ms();
	char extra[64] = "";

	if (!d->d_status_dirty || (!force && now - d->d_status_ms < 1000))
		return;
	d->d_status_dirty = 0;
	d->d_status_ms = now;
	if (d->d_stopping)
		(void)snprintf(extra, sizeof(extra), "; stopping, %d left",
		               d->d_live);
	else if (d->d_live > d->d_ready)
		(void)snprintf(extra, sizeof(extra),
		               "; %d starting or leaving",
		               d->d_live - d->d_ready);
	svc_status(d->d_svc, "%d workers, %llu runs, %zu queued%s", d->d_ready,
	           (unsigned long long)d->d_inflight, d->d_runs.rt_qlen,
	           extra);
}
