/* SPDX-License-Identifier: ISC */
/*
 * worker_upstream: the worker's HTTP client for OpenAI-compatible LLM
 * upstreams.  Pure parts (the URL, the request JSON, reading and
 * classifying an answer) and a libcurl multi handle driven by the
 * worker's common/loop.h loop: many calls at once on one thread, each
 * bounded by its run's deadline, connections kept alive and reused.
 *
 * Called by worker_run.c (and the unit tests).  Runs on the loop thread
 * only; never blocks, never logs (a failure becomes an answer the caller
 * reports), never calls a done callback from inside a libcurl callback.
 */
#ifndef TROUPE_WORKER_UPSTREAM_H
#define TROUPE_WORKER_UPSTREAM_H

#include <stddef.h>
#include <stdint.h>

#include <curl/curl.h>

#include "loop.h"
#include "util.h"

struct upstream;
struct upstream_call;

/* What a call gave, as the client should see it. */
struct upstream_answer {
	uint64_t status;      /* 200, or 502, 503, 504 */
	int64_t code;         /* Coze code: 0, 5020, 5030, 5040 */
	uint64_t retry_after; /* seconds, with 503 */
	char msg[160];        /* error text, "" on success */
	char *content;        /* the answer (malloc), on success only */
	size_t content_len;
	uint64_t prompt_tokens;
	uint64_t completion_tokens;
	long http_status;    /* the upstream's HTTP status, 0: none */
	uint64_t elapsed_us; /* time the call took */
};

/* Called once per started call with its answer; the callee owns
 * answer->content (free it) and must not cancel this call. */
typedef void (*upstream_done_cb)(void *arg, struct upstream_answer *);

struct upstream_conf {
	long connections;        /* per host, and idle connections kept */
	size_t max_body;         /* answer bodies larger than this: 502 */
	long connect_timeout_ms; /* upper bound of the connect phase */
};

/* The chat completions URL for a bot's base URL ("http://h:9090",
 * ".../v1", ".../v1/chat/completions"), NUL-terminated in out; -1 if base
 * is empty, not http(s) or too long. */
int worker_upstream_url(struct buf *out, struct mstr base);

/* Append the request JSON: model, the system prompt (left out if empty),
 * the context messages verbatim, the user's query; stream false. */
int worker_upstream_request(struct buf *out, struct mstr model,
                            struct mstr system_prompt, struct mstr context,
                            struct mstr query);

/* Classify a finished call into a (status, code, msg) and, for a 2xx
 * JSON answer, its content and usage.  body must be NUL-terminated at
 * body[len]; retry_after is the header's value or NULL; toobig says the
 * body went over the limit.  -1 only on ENOMEM. */
int worker_upstream_classify(struct upstream_answer *, CURLcode, long http,
                             const char *retry_after, int toobig,
                             const char *body, size_t len);

/* Seconds to wait from a Retry-After value (delta-seconds or HTTP date),
 * clamped to [1, 3600]; 1 when absent or unreadable. */
uint64_t worker_upstream_retry_after(const char *);

/* A client on loop l; NULL on failure (curl_global_init done before). */
struct upstream *worker_upstream_new(struct loop *l,
                                     const struct upstream_conf *);
/* Apply new limits (a reload); calls in flight keep theirs. */
void worker_upstream_conf(struct upstream *, const struct upstream_conf *);
/* Abort every call (no callbacks) and free the client. */
void worker_upstream_free(struct upstream *);

/* POST body (taken: emptied into the call) to url (copied) within
 * timeout_ms (waiting for a free connection included); cb(arg) gets the
 * answer later, from the loop.  traceparent is sent as a header when well
 * formed.  NULL on failure (nothing started, body left with the caller). */
struct upstream_call *worker_upstream_start(struct upstream *, const char *url,
                                            struct buf *body,
                                            struct mstr traceparent,
                                            int64_t timeout_ms,
                                            upstream_done_cb cb, void *arg);
/* Abort a call in flight; its callback is never called. */
void worker_upstream_cancel(struct upstream_call *);
/* Calls not answered yet (in curl or waiting for a connection). */
size_t worker_upstream_active(const struct upstream *);
/* Calls waiting for a connection to their host. */
size_t worker_upstream_queued(const struct upstream *);

#endif
