/* SPDX-License-Identifier: ISC */
/*
 * ratelimit: reads the rate-limit signals of an upstream's answer, in
 * every dialect PRODUCT.md §5 names, into one struct rl_signal: the HTTP
 * status (429, 503), Retry-After (delta seconds or an HTTP date),
 * X-RateLimit-Limit/-Remaining/-Reset, the IETF RateLimit and
 * RateLimit-Policy fields (draft-ietf-httpapi-ratelimit-headers: the
 * older "limit=, remaining=, reset=" form and the structured-field
 * form '"name";r=..;t=..'), OpenAI's x-ratelimit-remaining-{requests,
 * tokens} and x-ratelimit-reset-{requests,tokens} ("1s", "6m0s", "20ms"),
 * Coze's codes 4009/4013/4020 in a JSON body, and timeouts.
 *
 * Garbage never fails: a value that does not parse (negative, huge,
 * missing, not a number) is ignored and counted in rl_signal.garbage.
 * Times are clamped to RL_MAX_WAIT_MS.  Pure: no allocation, no logging,
 * no clock (the caller passes the wall time for HTTP dates).  Callers:
 * its unit test only, so far; the worker is to read every upstream answer
 * with it and report to the dispatcher (issue 4, not wired yet).
 */
#ifndef TROUPE_RATELIMIT_H
#define TROUPE_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

#define RL_MAX_WAIT_MS (3600u * 1000u) /* a longer wait is taken as 1 h */

/* Which dialects were seen (rl_signal.seen). */
enum {
	RL_SEEN_STATUS = 1 << 0, /* 429 or 503 */
	RL_SEEN_RETRY_AFTER = 1 << 1,
	RL_SEEN_XRATELIMIT = 1 << 2, /* X-RateLimit-* */
	RL_SEEN_IETF = 1 << 3,       /* RateLimit, RateLimit-Policy */
	RL_SEEN_OPENAI = 1 << 4,     /* x-ratelimit-*-requests|tokens */
	RL_SEEN_COZE = 1 << 5,       /* code 4009, 4013, 4020 */
	RL_SEEN_TIMEOUT = 1 << 6,
};

/* The quotas an answer may describe, each with its own fields. */
enum { RL_Q_XRL, RL_Q_IETF, RL_Q_OAI_REQ, RL_Q_OAI_TOK, RL_Q_MAX };

struct rl_quota {
	int64_t remaining, limit, reset_ms, window_ms; /* -1: not given */
};

struct rl_signal {
	unsigned seen;          /* RL_SEEN_* */
	int throttled;          /* the upstream refused for rate or load */
	int64_t retry_after_ms; /* -1: not given */
	struct rl_quota q[RL_Q_MAX];
	unsigned garbage; /* values that did not parse, ignored */
	/* Filled by rl_signal_finish() from q[]: the quota with the least
	 * remaining (ties: the longest reset), -1 where unknown. */
	int64_t remaining, limit, reset_ms, window_ms;
};

/* An empty signal: nothing seen, every quantity -1. */
void rl_signal_init(struct rl_signal *);
/* Note the HTTP status of the answer. */
void rl_signal_status(struct rl_signal *, long status);
/* Note one header field (name matched case-insensitively; names that are
 * not rate-limit fields are ignored).  now_ms: wall time, for dates. */
void rl_signal_header(struct rl_signal *, const char *name, size_t namelen,
                      const char *value, size_t valuelen, uint64_t now_ms);
/* Note a Coze-style JSON body's "code" (4009, 4013, 4020 throttle). */
void rl_signal_coze_code(struct rl_signal *, int64_t code);
/* Note that the call timed out (a signal of overload, not a quota). */
void rl_signal_timeout(struct rl_signal *);
/* Summarise the quotas into remaining, limit, reset_ms, window_ms; call
 * after the last header. */
void rl_signal_finish(struct rl_signal *);
/* Whether anything rate-related was seen at all. */
int rl_signal_any(const struct rl_signal *);
/* How long to keep away from this upstream, in ms (after finish):
 * Retry-After, else the longest reset of an exhausted quota (remaining 0),
 * else 0. */
int64_t rl_signal_backoff_ms(const struct rl_signal *);
/* Parse an HTTP date (IMF-fixdate, RFC 850, asctime) to ms since the
 * epoch; -1 if it is not one. */
int64_t rl_http_date_ms(const char *s, size_t n);

#endif
