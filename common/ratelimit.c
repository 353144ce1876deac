/* SPDX-License-Identifier: ISC */
/*
 * ratelimit: the rate-limit signals of an upstream answer (ratelimit.h).
 * Every parser here reads a counted string that need not be terminated,
 * accepts only what its grammar allows, and ignores the rest (counting it
 * in garbage): upstream headers are outside input.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "ratelimit.h"

/* Values past this are taken as garbage rather than clamped: a quota of
 * 10^15 requests is a broken header, not a big quota. */
#define RL_MAX_COUNT 1000000000000LL

void
rl_signal_init(struct rl_signal *s)
{
	memset(s, 0, sizeof(*s));
	s->retry_after_ms = -1;
	for (int i = 0; i < RL_Q_MAX; i++)
		s->q[i] = (struct rl_quota){-1, -1, -1, -1};
	s->remaining = s->limit = s->reset_ms = s->window_ms = -1;
}

static void
trim(const char **p, size_t *n)
{
	while (*n > 0 && (**p == ' ' || **p == '\t')) {
		(*p)++;
		(*n)--;
	}
	while (*n > 0 && ((*p)[*n - 1] == ' ' || (*p)[*n - 1] == '\t' ||
	                  (*p)[*n - 1] == '\r' || (*p)[*n - 1] == '\n'))
		(*n)--;
}

static int
name_is(const char *name, size_t n, const char *want)
{
	return (strlen(want) == n && strncasecmp(name, want, n) == 0);
}

/* A non-negative integer, all of p[0..n): its value, or -1. */
static int64_t
parse_count(const char *p, size_t n)
{
	int64_t v = 0;

	trim(&p, &n);
	if (n == 0 || n > 18)
		return (-1);
	for (size_t i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return (-1);
		v = v * 10 + (p[i] - '0');
	}
	return (v > RL_MAX_COUNT ? -1 : v);
}

/* Non-negative decimal seconds ("30", "1.5"): ms (clamped), or -1. */
static int64_t
parse_seconds(const char *p, size_t n)
{
	int64_t ip = 0, frac = 0, scale = 1;
	size_t i = 0;

	trim(&p, &n);
	if (n == 0)
		return (-1);
	for (; i < n && p[i] >= '0' && p[i] <= '9'; i++)
		if (ip < RL_MAX_WAIT_MS)
			ip = ip * 10 + (p[i] - '0');
	if (i == 0)
		return (-1);
	if (i < n && p[i] == '.') {
		size_t j = ++i;

		for (; i < n && p[i] >= '0' && p[i] <= '9'; i++)
			if (scale < 1000) {
				frac = frac * 10 + (p[i] - '0');
				scale *= 10;
			}
		if (i == j)
			return (-1);
	}
	if (i != n)
		return (-1);
	if (ip >= RL_MAX_WAIT_MS / 1000)
		return (RL_MAX_WAIT_MS);
	return (ip * 1000 + frac * 1000 / scale);
}

/* A Go-style duration as OpenAI sends it ("1s", "6m0s", "20ms",
 * "1h2m3.5s"): ms (clamped), or -1. */
static int64_t
parse_duration(const char *p, size_t n)
{
	double total = 0;
	size_t i = 0;

	trim(&p, &n);
	if (n == 0)
		return (-1);
	while (i < n) {
		double v = 0, scale = 1;
		size_t start = i;
		int frac = 0;

		for (; i < n && ((p[i] >= '0' && p[i] <= '9') || p[i] == '.');
		     i++) {
			if (p[i] == '.') {
				if (frac++)
					return (-1);
				continue;
			}
			if (frac)
				v += (p[i] - '0') * (scale /= 10);
			else if (v < 1e12)
				v = v * 10 + (p[i] - '0');
		}
		if (i == start || i == n)
			return (-1); /* a number needs a unit */
		if (n - i >= 2 && p[i] == 'm' && p[i + 1] == 's') {
			total += v;
			i += 2;
		} else if (n - i >= 2 && p[i] == 'u' && p[i + 1] == 's') {
			total += v / 1000;
			i += 2;
		} else if (n - i >= 2 && p[i] == 'n' && p[i + 1] == 's') {
			total += v / 1e6;
			i += 2;
		} else if (p[i] == 'h') {
			total += v * 3600e3;
			i++;
		} else if (p[i] == 'm') {
			total += v * 60e3;
			i++;
		} else if (p[i] == 's') {
			total += v * 1e3;
			i++;
		} else
			return (-1);
	}
	return (total >= RL_MAX_WAIT_MS ? RL_MAX_WAIT_MS : (int64_t)total);
}

static int
month_of(const char *m)
{
	static const char *names[] = {"Jan", "Feb", "Mar", "Apr",
	                              "May", "Jun", "Jul", "Aug",
	                              "Sep", "Oct", "Nov", "Dec"};

	for (int i = 0; i < 12; i++)
		if (strncmp(m, names[i], 3) == 0)
			return (i);
	return (-1);
}

/* Days from 1970-01-01 to y-m-d (proleptic Gregorian; m 0..11). */
static int64_t
days_from_civil(int64_t y, int m, int d)
{
	int64_t era, yoe, doy, doe;

	m += 1;
	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = y - era * 400;
	doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return (era * 146097 + doe - 719468);
}

int64_t
rl_http_date_ms(const char *p, size_t n)
{
	char b[64], mon[4] = {0};
	int d, y, hh, mm, ss, used = 0, mo;

	trim(&p, &n);
	if (n == 0 || n >= sizeof(b))
		return (-1);
	memcpy(b, p, n);
	b[n] = '\0';
	/* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
	if (sscanf(b, "%*3s, %2d %3s %4d %2d:%2d:%2d GMT%n", &d, mon, &y, &hh,
	           &mm, &ss, &used) == 6 &&
	    used == (int)n)
		goto ok;
	/* RFC 850: Sunday, 06-Nov-94 08:49:37 GMT */
	used = 0;
	if (sscanf(b, "%*[A-Za-z], %2d-%3s-%2d %2d:%2d:%2d GMT%n", &d, mon, &y,
	           &hh, &mm, &ss, &used) == 6 &&
	    used == (int)n) {
		y += y < 70 ? 2000 : 1900;
		goto ok;
	}
	/* asctime: Sun Nov  6 08:49:37 1994 */
	used = 0;
	if (sscanf(b, "%*3s %3s %d %2d:%2d:%2d %4d%n", mon, &d, &hh, &mm, &ss,
	           &y, &used) == 6 &&
	    used == (int)n)
		goto ok;
	return (-1);
ok:
	if ((mo = month_of(mon)) == -1 || d < 1 || d > 31 || hh > 23 ||
	    mm > 59 || ss > 60 || y < 1970 || y > 9999 || hh < 0 || mm < 0 ||
	    ss < 0)
		return (-1);
	return (((days_from_civil(y, mo, d) * 24 + hh) * 60 + mm) * 60000 +
	        (int64_t)ss * 1000);
}

void
rl_signal_status(struct rl_signal *s, long status)
{
	if (status == 429 || status == 503) {
		s->seen |= RL_SEEN_STATUS;
		s->throttled = 1;
	}
}

void
rl_signal_coze_code(struct rl_signal *s, int64_t code)
{
	if (code == 4009 || code == 4013 || code == 4020) {
		s->seen |= RL_SEEN_COZE;
		s->throttled = 1;
	}
}

void
rl_signal_timeout(struct rl_signal *s)
{
	s->seen |= RL_SEEN_TIMEOUT;
}

static void
set_count(struct rl_signal *s, int64_t *dst, const char *v, size_t n)
{
	int64_t x = parse_count(v, n);

	if (x < 0)
		s->garbage++;
	else
		*dst = x;
}

/* X-RateLimit-Reset: delta seconds, or epoch seconds (GitHub, others). */
static void
set_reset_seconds(struct rl_signal *s, int64_t *dst, const char *v, size_t n,
                  uint64_t now_ms)
{
	int64_t x = parse_count(v, n), ms;

	if (x < 0) {
		if ((ms = parse_seconds(v, n)) < 0)
			s->garbage++;
		else
			*dst = ms;
		return;
	}
	if (x > 1000000000) { /* an epoch time */
		ms = x * 1000 - (int64_t)now_ms;
		*dst = ms < 0 ? 0 : ms > RL_MAX_WAIT_MS ? RL_MAX_WAIT_MS : ms;
	} else
		*dst = x * 1000 > RL_MAX_WAIT_MS ? RL_MAX_WAIT_MS : x * 1000;
}

/* One parameter "k=v" or ";k=v" of the IETF fields. */
static int
param(const char *p, size_t n, const char *k, const char **v, size_t *vn)
{
	size_t kl = strlen(k);

	trim(&p, &n);
	if (n <= kl || strncasecmp(p, k, kl) != 0 || p[kl] != '=')
		return (0);
	*v = p + kl + 1;
	*vn = n - kl - 1;
	return (1);
}

/* RateLimit: "limit=100, remaining=50, reset=5" (draft 07) or
 * '"default";r=50;t=30' (draft 08 on); RateLimit-Policy: "100;w=60" or
 * '"default";q=100;w=60'.  Several items: the most constraining wins. */
static void
ietf(struct rl_signal *s, int policy, const char *v, size_t n)
{
	struct rl_quota *q = &s->q[RL_Q_IETF];
	size_t i = 0;

	while (i < n) {
		size_t j = i, k;
		const char *pv;
		size_t pn;

		while (j < n && v[j] != ',' && v[j] != ';')
			j++;
		k = j - i;
		if (param(v + i, k, "remaining", &pv, &pn) ||
		    param(v + i, k, "r", &pv, &pn)) {
			int64_t x = parse_count(pv, pn);

			if (x < 0)
				s->garbage++;
			else if (q->remaining < 0 || x < q->remaining)
				q->remaining = x;
		} else if (param(v + i, k, "limit", &pv, &pn) ||
		           param(v + i, k, "q", &pv, &pn))
			set_count(s, &q->limit, pv, pn);
		else if (param(v + i, k, "reset", &pv, &pn) ||
		         param(v + i, k, "t", &pv, &pn)) {
			int64_t x = parse_seconds(pv, pn);

			if (x < 0)
				s->garbage++;
			else if (x > q->reset_ms)
				q->reset_ms = x;
		} else if (param(v + i, k, "w", &pv, &pn)) {
			int64_t x = parse_seconds(pv, pn);

			if (x < 0)
				s->garbage++;
			else
				q->window_ms = x;
		} else if (policy && i == 0 && parse_count(v, k) >= 0)
			q->limit = parse_count(v, k); /* "100;w=60" */
		i = j + 1;
	}
}

void
rl_signal_header(struct rl_signal *s, const char *name, size_t nn,
                 const char *v, size_t vn, uint64_t now_ms)
{
	struct rl_quota *q;
	int64_t x;

	if (nn < 9 || nn > 30) /* "ratelimit" .. "x-ratelimit-remaining-..." */
		return;
	if (vn > 4096) { /* no rate-limit field is that long */
		s->garbage++;
		return;
	}
	if (name_is(name, nn, "retry-after")) {
		s->seen |= RL_SEEN_RETRY_AFTER;
		if ((x = parse_seconds(v, vn)) < 0) {
			int64_t at = rl_http_date_ms(v, vn);

			if (at < 0) {
				s->garbage++;
				return;
			}
			x = at - (int64_t)now_ms;
			x = x < 0                ? 0
			    : x > RL_MAX_WAIT_MS ? RL_MAX_WAIT_MS
			                         : x;
		}
		if (x > s->retry_after_ms)
			s->retry_after_ms = x;
		return;
	}
	q = &s->q[RL_Q_XRL];
	if (name_is(name, nn, "x-ratelimit-remaining")) {
		s->seen |= RL_SEEN_XRATELIMIT;
		set_count(s, &q->remaining, v, vn);
	} else if (name_is(name, nn, "x-ratelimit-limit")) {
		s->seen |= RL_SEEN_XRATELIMIT;
		set_count(s, &q->limit, v, vn);
	} else if (name_is(name, nn, "x-ratelimit-reset")) {
		s->seen |= RL_SEEN_XRATELIMIT;
		set_reset_seconds(s, &q->reset_ms, v, vn, now_ms);
	} else if (name_is(name, nn, "ratelimit")) {
		s->seen |= RL_SEEN_IETF;
		ietf(s, 0, v, vn);
	} else if (name_is(name, nn, "ratelimit-policy")) {
		s->seen |= RL_SEEN_IETF;
		ietf(s, 1, v, vn);
	} else if (name_is(name, nn, "ratelimit-remaining")) {
		s->seen |= RL_SEEN_IETF;
		set_count(s, &s->q[RL_Q_IETF].remaining, v, vn);
	} else if (name_is(name, nn, "ratelimit-limit")) {
		s->seen |= RL_SEEN_IETF;
		set_count(s, &s->q[RL_Q_IETF].limit, v, vn);
	} else if (name_is(name, nn, "ratelimit-reset")) {
		s->seen |= RL_SEEN_IETF;
		set_reset_seconds(s, &s->q[RL_Q_IETF].reset_ms, v, vn, now_ms);
	} else if (name_is(name, nn, "x-ratelimit-remaining-requests") ||
	           name_is(name, nn, "x-ratelimit-remaining-tokens")) {
		s->seen |= RL_SEEN_OPENAI;
		q = &s->q[nn == 30 ? RL_Q_OAI_REQ : RL_Q_OAI_TOK];
		set_count(s, &q->remaining, v, vn);
	} else if (name_is(name, nn, "x-ratelimit-limit-requests") ||
	           name_is(name, nn, "x-ratelimit-limit-tokens")) {
		s->seen |= RL_SEEN_OPENAI;
		q = &s->q[nn == 26 ? RL_Q_OAI_REQ : RL_Q_OAI_TOK];
		set_count(s, &q->limit, v, vn);
	} else if (name_is(name, nn, "x-ratelimit-reset-requests") ||
	           name_is(name, nn, "x-ratelimit-reset-tokens")) {
		s->seen |= RL_SEEN_OPENAI;
		q = &s->q[nn == 26 ? RL_Q_OAI_REQ : RL_Q_OAI_TOK];
		if ((x = parse_duration(v, vn)) < 0 &&
		    (x = parse_seconds(v, vn)) < 0)
			s->garbage++;
		else
			q->reset_ms = x;
	}
}

void
rl_signal_finish(struct rl_signal *s)
{
	const struct rl_quota *best = NULL;

	for (int i = 0; i < RL_Q_MAX; i++) {
		const struct rl_quota *q = &s->q[i];

		if (q->remaining < 0)
			continue;
		if (best == NULL || q->remaining < best->remaining ||
		    (q->remaining == best->remaining &&
		     q->reset_ms > best->reset_ms))
			best = q;
	}
	if (best != NULL) {
		s->remaining = best->remaining;
		s->limit = best->limit;
		s->reset_ms = best->reset_ms;
		s->window_ms = best->window_ms;
	} else {
		/* limits and windows without a remaining count still tell
		 * the policy something */
		for (int i = 0; i < RL_Q_MAX; i++) {
			if (s->q[i].limit >= 0 && s->limit < 0)
				s->limit = s->q[i].limit;
			if (s->q[i].window_ms >= 0 && s->window_ms < 0)
				s->window_ms = s->q[i].window_ms;
		}
	}
}

int
rl_signal_any(const struct rl_signal *s)
{
	return (s->seen != 0);
}

int64_t
rl_signal_backoff_ms(const struct rl_signal *s)
{
	int64_t w = 0;

	if (s->retry_after_ms >= 0)
		return (s->retry_after_ms);
	for (int i = 0; i < RL_Q_MAX; i++)
		if (s->q[i].remaining == 0 && s->q[i].reset_ms > w)
			w = s->q[i].reset_ms;
	return (w);
}
