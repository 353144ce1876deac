/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_limit: the fixed and AIMD rate-limit policies (see the
 * header).  Pure functions over struct limit_state; troupe-dispatcher
 * keeps one state per upstream (fixed) or per upstream and bot (aimd),
 * and its unit test drives them with a made-up clock.
 */
#include <math.h>

#include "dispatcher_limit.h"

#define MIN_RTT_WINDOW_MS 30000 /* forget a smallest round trip this old */

void
limit_conf_default(struct limit_conf *c, enum limit_policy p, int per)
{
	c->policy = p;
	c->children_min = 2;
	c->children_max = 50;
	c->runs_per_child = per > 0 ? per : 1;
	c->quiet_ms = 5000;
	c->cut = 0.3;
	c->decrease = 0.7;
	c->latency_factor = 2.0;
	c->limit_min = 1;
	c->limit_max = (double)c->children_max * c->runs_per_child;
	c->children_start = c->children_min;
	c->cut_gap_ms = 100;
	c->latency_floor_ms = 50;
}

void
limit_init(struct limit_state *s, const struct limit_conf *c, uint64_t now)
{
	int n = c->children_start;

	if (n < c->children_min)
		n = c->children_min;
	if (n > c->children_max)
		n = c->children_max;
	*s = (struct limit_state){0};
	s->children = n;
	s->limit = (double)n * c->runs_per_child;
	if (c->policy == LIMIT_AIMD && s->limit > c->limit_max)
		s->limit = c->limit_max;
	s->last_change = now;
}

static void
set_children(struct limit_state *s, const struct limit_conf *c, int n,
             uint64_t now)
{
	if (n < c->children_min)
		n = c->children_min;
	if (n > c->children_max)
		n = c->children_max;
	s->children = n;
	s->limit = (double)n * c->runs_per_child;
	s->last_change = now;
}

static void
pause_for(struct limit_state *s, int64_t ms, uint64_t now)
{
	if (ms > 0 && now + (uint64_t)ms > s->pause_until)
		s->pause_until = now + (uint64_t)ms;
}

static int
on_fixed(struct limit_state *s, const struct limit_conf *c,
         const struct limit_obs *o, uint64_t now, const char **cause)
{
	int old = s->children, n;

	if (!o->throttled)
		return (0);
	s->signals++;
	s->last_signal = now;
	pause_for(s, o->backoff_ms, now);
	/* cut 30 %: 10 -> 7, 3 -> 2; never below the floor */
	n = (int)floor(old * (1.0 - c->cut));
	set_children(s, c, n, now);
	*cause = "the upstream throttled: 30 % fewer children";
	return (s->children != old || o->backoff_ms > 0);
}

static int
on_aimd(struct limit_state *s, const struct limit_conf *c,
        const struct limit_obs *o, uint64_t now, const char **cause)
{
	double old = s->limit;
	uint64_t rtt = o->latency_us;

	if (o->throttled) {
		uint64_t gap = s->min_rtt_us / 1000;
		double base = s->limit;

		if (gap < c->cut_gap_ms)
			gap = c->cut_gap_ms;
		s->signals++;
		s->last_signal = now;
		pause_for(s, o->backoff_ms, now);
		/* the answers of one round trip are one signal */
		if (s->last_cut != 0 && now - s->last_cut < gap) {
			*cause = "the upstream throttled again within a "
			         "round trip: paused, no second cut";
			return (o->backoff_ms > 0);
		}
		if (o->inflight > 0 && (double)o->inflight < base)
			base = (double)o->inflight;
		s->last_cut = now;
		s->limit = fmax(c->limit_min, base * c->decrease);
		s->last_change = now;
		*cause = "the upstream throttled: limit x 0.7";
		return (1);
	}
	if (o->timeout) {
		s->limit = fmax(c->limit_min, s->limit * c->decrease);
		s->last_change = now;
		*cause = "an upstream call timed out: limit x 0.7";
		return (1);
	}
	if (rtt > 0) {
		if (s->min_rtt_us == 0 || rtt < s->min_rtt_us ||
		    now - s->min_rtt_at > MIN_RTT_WINDOW_MS) {
			s->min_rtt_us = rtt;
			s->min_rtt_at = now;
		}
		/* the upstream queues: back off gently, once a round trip */
		if ((double)rtt > c->latency_factor * (double)s->min_rtt_us &&
		    rtt - s->min_rtt_us >= c->latency_floor_ms * 1000 &&
		    now - s->last_latency_cut >= rtt / 1000 + 1 &&
		    now - s->last_latency_cut >= c->cut_gap_ms) {
			s->last_latency_cut = now;
			s->limit = fmax(c->limit_min, s->limit * 0.9);
			s->last_change = now;
			*cause = "upstream latency over 2 x its minimum: "
			         "limit x 0.9";
			return (1);
		}
	}
	s->limit = fmin(c->limit_max, s->limit + 1.0 / fmax(1.0, s->limit));
	if (floor(s->limit) != floor(old)) {
		s->last_change = now;
		*cause = "answers without a signal: limit + 1";
		return (1);
	}
	return (0);
}

int
limit_on_result(struct limit_state *s, const struct limit_conf *c,
                const struct limit_obs *o, uint64_t now, const char **cause)
{
	return (c->policy == LIMIT_FIXED ? on_fixed(s, c, o, now, cause)
	                                 : on_aimd(s, c, o, now, cause));
}

int
limit_on_tick(struct limit_state *s, const struct limit_conf *c, uint64_t now,
              const char **cause)
{
	int old = s->children;

	if (c->policy != LIMIT_FIXED || s->children >= c->children_max)
		return (0);
	if (now < s->pause_until || now - s->last_change < c->quiet_ms ||
	    (s->last_signal != 0 && now - s->last_signal < c->quiet_ms))
		return (0);
	set_children(s, c, old * 2, now);
	*cause = "5 s without a rate-limit signal: twice the children";
	return (s->children != old);
}

uint64_t
limit_value(const struct limit_state *s)
{
	double v = floor(s->limit);

	return (v < 1 ? 1 : (uint64_t)v);
}

int
limit_admit(const struct limit_state *s, uint64_t inflight, uint64_t now)
{
	return (now >= s->pause_until && inflight < limit_value(s));
}

uint64_t
limit_wait_ms(const struct limit_state *s, uint64_t now)
{
	return (now >= s->pause_until ? 0 : s->pause_until - now);
}

int
limit_children(const struct limit_conf *c, const struct limit_state *v, int n)
{
	double sum = 0;
	int want = c->children_min;

	for (int i = 0; i < n; i++) {
		if (c->policy == LIMIT_FIXED) {
			if (v[i].children > want)
				want = v[i].children;
		} else
			sum += floor(v[i].limit);
	}
	if (c->policy == LIMIT_AIMD)
		want = (int)ceil(sum / c->runs_per_child);
	if (want < c->children_min)
		want = c->children_min;
	if (want > c->children_max)
		want = c->children_max;
	return (want);
}
