/* SPDX-License-Identifier: ISC */
/*
 * ratelimit_test: every rate-limit dialect of PRODUCT.md §5 read from the
 * forms upstreams really send, and garbage (negative, huge, missing, not a
 * number, wrong units, absurd dates) ignored and counted, never fatal.
 */
#include <string.h>

#include "ratelimit.h"
#include "util.h"
#include "t.h"

/* 2026-11-22 06:00:00 UTC */
#define NOW 1795327200000ull

static void
hdr(struct rl_signal *s, const char *n, const char *v)
{
	rl_signal_header(s, n, strlen(n), v, strlen(v), NOW);
}

static void
t_retry_after(void)
{
	struct rl_signal s;

	rl_signal_init(&s);
	T_ASSERT(!rl_signal_any(&s));
	rl_signal_status(&s, 429);
	hdr(&s, "Retry-After", " 7 ");
	rl_signal_finish(&s);
	T_ASSERT(s.throttled);
	T_EQ_INT(s.retry_after_ms, 7000);
	T_EQ_INT(rl_signal_backoff_ms(&s), 7000);
	T_ASSERT(s.seen & RL_SEEN_STATUS && s.seen & RL_SEEN_RETRY_AFTER);

	rl_signal_init(&s);
	hdr(&s, "retry-after", "Sun, 22 Nov 2026 06:00:30 GMT");
	T_EQ_INT(s.retry_after_ms, 30000);
	rl_signal_init(&s);
	hdr(&s, "Retry-After", "Sunday, 22-Nov-26 06:01:00 GMT");
	T_EQ_INT(s.retry_after_ms, 60000);
	rl_signal_init(&s);
	hdr(&s, "Retry-After", "Sun Nov 22 06:00:02 2026");
	T_EQ_INT(s.retry_after_ms, 2000);
	rl_signal_init(&s); /* a date in the past: now */
	hdr(&s, "Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT");
	T_EQ_INT(s.retry_after_ms, 0);
	rl_signal_init(&s);
	hdr(&s, "Retry-After", "1.5");
	T_EQ_INT(s.retry_after_ms, 1500);
	rl_signal_init(&s); /* huge: clamped to an hour */
	hdr(&s, "Retry-After", "99999999999999999999");
	T_EQ_INT(s.retry_after_ms, RL_MAX_WAIT_MS);
	T_EQ_INT(rl_http_date_ms("Sun, 06 Nov 1994 08:49:37 GMT", 29),
	         784111777000LL);
}

static void
t_garbage(void)
{
	static const char *bad[] = {"-5",
	                            "",
	                            "soon",
	                            "5s",
	                            "1e3",
	                            "0x10",
	                            "Sun, 32 Nov 2026 06:00:30 GMT",
	                            "Fri, 22 Foo 2026 06:00 GMT",
	                            "12 34",
	                            ".5",
	                            "5."};
	struct rl_signal s;

	for (size_t i = 0; i < nitems(bad); i++) {
		rl_signal_init(&s);
		hdr(&s, "Retry-After", bad[i]);
		T_EQ_INT(s.retry_after_ms, -1);
		T_EQ_INT(s.garbage, 1);
		rl_signal_init(&s);
		hdr(&s, "X-RateLimit-Remaining", bad[i]);
		rl_signal_finish(&s);
		T_EQ_INT(s.remaining, -1);
		T_EQ_INT(s.garbage, 1);
	}
	rl_signal_init(&s); /* a count too big to be true */
	hdr(&s, "x-ratelimit-remaining-requests", "999999999999999999");
	rl_signal_finish(&s);
	T_EQ_INT(s.remaining, -1);
	T_EQ_INT(s.garbage, 1);
	rl_signal_init(&s); /* unrelated headers: nothing */
	hdr(&s, "Content-Type", "application/json");
	hdr(&s, "X-Request-Id", "5");
	T_ASSERT(!rl_signal_any(&s));
	T_EQ_INT(s.garbage, 0);
	rl_signal_status(&s, 500);
	T_ASSERT(!rl_signal_any(&s) && !s.throttled);
}

static void
t_xratelimit(void)
{
	struct rl_signal s;

	rl_signal_init(&s);
	hdr(&s, "X-RateLimit-Limit", "60");
	hdr(&s, "X-RateLimit-Remaining", "0");
	hdr(&s, "X-RateLimit-Reset", "12");
	rl_signal_finish(&s);
	T_EQ_INT(s.limit, 60);
	T_EQ_INT(s.remaining, 0);
	T_EQ_INT(s.reset_ms, 12000);
	T_EQ_INT(rl_signal_backoff_ms(&s), 12000);
	T_ASSERT(!s.throttled); /* a quota, not a refusal */
	rl_signal_init(&s);     /* GitHub style: an epoch second */
	hdr(&s, "x-ratelimit-remaining", "3");
	hdr(&s, "x-ratelimit-reset", "1795327245");
	rl_signal_finish(&s);
	T_EQ_INT(s.reset_ms, 45000);
	T_EQ_INT(rl_signal_backoff_ms(&s), 0); /* 3 left: no need to wait */
}

static void
t_ietf(void)
{
	struct rl_signal s;

	rl_signal_init(&s); /* draft 07 */
	hdr(&s, "RateLimit", "limit=100, remaining=0, reset=5");
	hdr(&s, "RateLimit-Policy", "100;w=60");
	rl_signal_finish(&s);
	T_EQ_INT(s.limit, 100);
	T_EQ_INT(s.remaining, 0);
	T_EQ_INT(s.reset_ms, 5000);
	T_EQ_INT(s.window_ms, 60000);
	T_EQ_INT(rl_signal_backoff_ms(&s), 5000);
	rl_signal_init(&s); /* structured fields, two policies */
	hdr(&s, "RateLimit", "\"default\";r=50;t=30, \"burst\";r=2;t=1");
	hdr(&s, "RateLimit-Policy", "\"default\";q=100;w=60");
	rl_signal_finish(&s);
	T_EQ_INT(s.remaining, 2);
	T_EQ_INT(s.reset_ms, 30000);
	T_EQ_INT(s.limit, 100);
	T_ASSERT(s.seen & RL_SEEN_IETF);
	rl_signal_init(&s); /* the separate fields of early drafts */
	hdr(&s, "RateLimit-Remaining", "4");
	hdr(&s, "RateLimit-Reset", "2");
	rl_signal_finish(&s);
	T_EQ_INT(s.remaining, 4);
	T_EQ_INT(s.reset_ms, 2000);
	rl_signal_init(&s); /* garbage parameters, the rest still read */
	hdr(&s, "RateLimit", "remaining=-1, reset=soon, limit=10");
	rl_signal_finish(&s);
	T_EQ_INT(s.remaining, -1);
	T_EQ_INT(s.limit, 10);
	T_EQ_INT(s.garbage, 2);
}

static void
t_openai(void)
{
	struct rl_signal s;

	rl_signal_init(&s);
	hdr(&s, "x-ratelimit-limit-requests", "500");
	hdr(&s, "x-ratelimit-remaining-requests", "499");
	hdr(&s, "x-ratelimit-reset-requests", "120ms");
	hdr(&s, "x-ratelimit-limit-tokens", "30000");
	hdr(&s, "x-ratelimit-remaining-tokens", "0");
	hdr(&s, "x-ratelimit-reset-tokens", "6m0s");
	rl_signal_finish(&s);
	T_EQ_INT(s.remaining, 0); /* the tokens run out first */
	T_EQ_INT(s.limit, 30000);
	T_EQ_INT(s.reset_ms, 360000);
	T_EQ_INT(rl_signal_backoff_ms(&s), 360000);
	T_EQ_INT(s.q[RL_Q_OAI_REQ].reset_ms, 120);
	rl_signal_init(&s);
	hdr(&s, "x-ratelimit-reset-requests", "2m3.5s");
	T_EQ_INT(s.q[RL_Q_OAI_REQ].reset_ms, 123500);
	hdr(&s, "x-ratelimit-reset-requests", "17");
	T_EQ_INT(s.q[RL_Q_OAI_REQ].reset_ms, 17000);
	hdr(&s, "x-ratelimit-reset-tokens", "3x");
	T_EQ_INT(s.garbage, 1);
	hdr(&s, "x-ratelimit-reset-tokens", "1.2.3s");
	T_EQ_INT(s.garbage, 2);
	hdr(&s, "x-ratelimit-reset-tokens", "99999999999h");
	T_EQ_INT(s.q[RL_Q_OAI_TOK].reset_ms, RL_MAX_WAIT_MS);
}

static void
t_coze_and_timeouts(void)
{
	struct rl_signal s;

	rl_signal_init(&s);
	rl_signal_coze_code(&s, 4000);
	T_ASSERT(!rl_signal_any(&s));
	rl_signal_coze_code(&s, 4020);
	T_ASSERT(s.throttled && (s.seen & RL_SEEN_COZE));
	rl_signal_init(&s);
	rl_signal_coze_code(&s, 4009);
	T_ASSERT(s.throttled);
	rl_signal_init(&s);
	rl_signal_coze_code(&s, 4013);
	T_ASSERT(s.throttled);
	rl_signal_init(&s);
	rl_signal_timeout(&s);
	T_ASSERT(rl_signal_any(&s) && !s.throttled);
	rl_signal_status(&s, 503);
	T_ASSERT(s.throttled);
}

T_TESTS = {
        {"retry_after", t_retry_after},
        {"garbage", t_garbage},
        {"xratelimit", t_xratelimit},
        {"ietf", t_ietf},
        {"openai", t_openai},
        {"coze_and_timeouts", t_coze_and_timeouts},
        {NULL, NULL},
};
T_MAIN
