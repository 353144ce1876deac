/* SPDX-License-Identifier: ISC */
/*
 * worker_upstream: the worker's HTTP client for OpenAI-compatible LLM
 * upstreams and for the bots' plugins.  Pure parts (the URL, the
 * request JSON, reading and classifying an answer) and a libcurl multi
 * handle driven by the worker's common/loop.h loop: many calls at once on
 * one thread, each bounded by its run's deadline, connections kept alive
 * and reused.
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
#include "ratelimit.h"
#include "util.h"

struct upstream;
struct upstream_call;

#define UPSTREAM_TOOLS_MAX 32 /* tool calls in one streamed answer */

/* One tool call of a streamed answer, its pieces joined (by index). */
struct upstream_tool {
	struct buf id;
	struct buf name;
	struct buf args; /* the arguments JSON text, as the model sent it */
};

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
	/* Streams: the tool calls the model asked for (malloc, the callee
	 * frees them with worker_upstream_tools_free), on success only. */
	struct upstream_tool *tools;
	size_t ntools;
	/* The rate-limit signals of the answer (status, every header, a
	 * Coze code in an error body, a timeout), finished; nothing seen
	 * for plugin calls and calls that never reached the upstream. */
	struct rl_signal sig;
};

/* Called once per started call with its answer; the callee owns
 * answer->content (free it; may be set on failure for a stream) and must
 * not cancel this call. */
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

/* Append the start of a streaming request (v3): {"model", "messages": [
 * the system prompt (left out if empty), the context verbatim, then each
 * {role, content} of messages (a JSON array of message objects as the
 * edge normalised them; if it holds none, one user message with query),
 * without the closing bracket: worker_upstream_request_tail ends it. */
int worker_upstream_request_head(struct buf *out, struct mstr model,
                                 struct mstr system_prompt,
                                 struct mstr context, struct mstr messages,
                                 struct mstr query);
/* End a request started by worker_upstream_request_head: the messages
 * in extra (comma-joined JSON objects, may be empty), "tools" (a JSON
 * array, left out if empty), "stream": true with "stream_options":
 * {"include_usage": true}. */
int worker_upstream_request_tail(struct buf *out, struct mstr extra,
                                 struct mstr tools);

/* Append the request JSON of a streaming call (v3): model, the system
 * prompt (left out if empty), the context verbatim, then each {role,
 * content} of messages (a JSON array of message objects as the edge
 * normalised them; if it holds none, one user message with query);
 * "stream": true with "stream_options": {"include_usage": true}. */
int worker_upstream_request_stream(struct buf *out, struct mstr model,
                                   struct mstr system_prompt,
                                   struct mstr context, struct mstr messages,
                                   struct mstr query);

/* An OpenAI server-sent-event stream being read: bytes go in as they
 * arrive (any split, LF, CRLF or CR line ends, comments), the content
 * pieces of choices[0].delta.content are joined in content, usage is
 * taken from the chunk that has it.  Zero it before the first feed. */
struct upstream_sse {
	struct buf line;    /* the unfinished line */
	struct buf data;    /* the data: lines of the event so far */
	struct buf content; /* every content piece so far, joined */
	size_t max;         /* content and line cap (0: 4 MiB) */
	uint64_t prompt_tokens;
	uint64_t completion_tokens;
	unsigned events;   /* JSON chunks read */
	int cr;            /* the last byte fed was a CR */
	int has_data;      /* the event has a data: field */
	int done;          /* data: [DONE] seen */
	int finished;      /* a finish_reason seen */
	int bad;           /* a chunk that is not JSON, or an error object */
	unsigned progress; /* chunks that brought content or tool calls */
	struct upstream_tool *tools; /* delta.tool_calls joined by index */
	size_t ntools;               /* 1 + the highest index seen */
	int toobig;                  /* content or a line went over max */
	int nomem;
	char error[120]; /* the upstream's own error message, if it sent one */
};

/* Feed n bytes; 0, or -1 when the stream cannot go on (bad, toobig,
 * nomem set). */
int worker_upstream_sse_feed(struct upstream_sse *, const char *p, size_t n);
/* The stream ended: read what is left without a final blank line. */
int worker_upstream_sse_end(struct upstream_sse *);
void worker_upstream_sse_free(struct upstream_sse *);
/* Free n tool calls (an answer's tools). */
void worker_upstream_tools_free(struct upstream_tool *, size_t n);

/* Classify a finished call into a (status, code, msg) and, for a 2xx
 * JSON answer, its content and usage.  body must be NUL-terminated at
 * body[len]; retry_after is the header's value or NULL; toobig says the
 * body went over the limit.  -1 only on ENOMEM. */
int worker_upstream_classify(struct upstream_answer *, CURLcode, long http,
                             const char *retry_after, int toobig,
                             const char *body, size_t len);

/* The Coze-style business code of a JSON error body: a top-level
 * "code", or "error": {"code"} (a number or a numeric string, as OpenAI
 * sends "rate_limit_exceeded" there the code is then not a number and
 * not taken).  0 and *code set, or -1 if none. */
int worker_upstream_coze_code(const char *body, size_t len, int64_t *code);

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
 * formed, and tracestate with it when not empty (printable ASCII, at
 * most 512 bytes).  NULL on failure (nothing started, body left with the
 * caller). */
struct upstream_call *
worker_upstream_start(struct upstream *, const char *url, struct buf *body,
                      struct mstr traceparent, struct mstr tracestate,
                      int64_t timeout_ms, upstream_done_cb cb, void *arg);
/* Called (from the loop, never inside libcurl) when a streaming call got
 * new content or tool call pieces: content/len is everything so far (valid
 * until the callback returns or cancels the call).  What arrived in one loop
 * turn comes in one call.  The callee may cancel the call. */
typedef void (*upstream_delta_cb)(void *arg, const char *content, size_t len);

/* As worker_upstream_start, for a body asking "stream": true: the answer
 * is read as server-sent events, delta_cb gets the content as it grows,
 * done_cb the end.  The answer's content is everything received (also
 * when the call failed midway: what the client already saw), its usage
 * the stream's.  A 2xx stream that is not OpenAI's chunks is 502
 * "upstream returned an invalid answer"; one that ends without [DONE] or
 * a finish_reason is 502 "upstream stream ended early". */
struct upstream_call *
worker_upstream_start_stream(struct upstream *, const char *url,
                             struct buf *body, struct mstr traceparent,
                             struct mstr tracestate, int64_t timeout_ms,
                             upstream_delta_cb, upstream_done_cb, void *arg);
/* POST body (taken) to url (a plugin) with Content-Type and Accept
 * application/json, traceparent (and tracestate, as above) and the
 * nheaders extra header lines (copied; no CR or LF in them), within
 * timeout_ms.  The answer: status
 * 200 with the body as content (NUL-terminated) when the call succeeded
 * with a 2xx whose body is JSON; otherwise 502 or 504 with msg one of
 * "timed out", "answered status N", "answered invalid JSON",
 * "unreachable: <curl's text>", "answer too large", "internal error".
 * NULL on failure (nothing started, body left with the caller). */
struct upstream_call *
worker_upstream_post(struct upstream *, const char *url, struct buf *body,
                     struct mstr traceparent, struct mstr tracestate,
                     const char *const *headers, size_t nheaders,
                     int64_t timeout_ms, upstream_done_cb, void *arg);
/* The content a streaming call has received so far (NULL and 0 for
 * none, or for a call that is not a stream); valid until the next loop
 * turn or the call's end. */
const char *worker_upstream_content(const struct upstream_call *, size_t *len);
/* Abort a call in flight; its callback is never called. */
void worker_upstream_cancel(struct upstream_call *);
/* Calls not answered yet (in curl or waiting for a connection). */
size_t worker_upstream_active(const struct upstream *);
/* Calls waiting for a connection to their host. */
size_t worker_upstream_queued(const struct upstream *);

#endif
