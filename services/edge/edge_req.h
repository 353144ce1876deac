/* SPDX-License-Identifier: ISC */
/*
 * edge_req: the pure parts of answering one HTTP request at the edge:
 * request ids, W3C traceparent checks and generation, tracestate checks
 * and truncation, validation of the
 * /v1/bot/chat and /v3/chat bodies and of the ids of the other v3 routes
 * (query string or JSON body), and the JSON of answers and errors
 * (PRODUCT.md §2).
 *
 * Callers: edge_http.c on every request, and the unit test.  No h2o, no
 * logging, no clock of its own (the caller passes the time), no global
 * state: an edge_ids holds the generator state.  It must never read past
 * a length it was given, never write past a capacity it was given, and
 * never emit a JSON string without escaping it.
 */
#ifndef TROUPE_EDGE_REQ_H
#define TROUPE_EDGE_REQ_H

#include <stddef.h>
#include <stdint.h>

#define EDGE_REQID_LEN 32          /* yyyyMMddHHmmss + 18 hex digits */
#define EDGE_TRACE_LEN 55          /* 00-<32 hex>-<16 hex>-<2 hex> */
#define EDGE_TRACESTATE_MAX 512    /* bytes of tracestate sent on at most */
#define EDGE_TRACESTATE_MEMBERS 32 /* list-members allowed at most */

/* Generator state for request ids and trace ids (one per process). */
struct edge_ids {
	uint64_t s[4];      /* xoshiro256** state */
	uint32_t prefix;    /* per process: 8 hex digits of every id */
	uint64_t counter;   /* low 40 bits: 10 hex digits */
	uint64_t stamp_sec; /* second of the cached stamp */
	char stamp[14];     /* yyyyMMddHHmmss (UTC) of stamp_sec */
};

/* Seed the generator from 32 bytes (random in production). */
void edge_ids_init(struct edge_ids *, const unsigned char seed[32]);
/* Write the next request id (EDGE_REQID_LEN chars, no NUL) for the wall
 * clock time ms: UTC date and time, then the process prefix and a
 * counter, so ids are unique within a process and, with overwhelming
 * probability, across processes. */
void edge_reqid_next(struct edge_ids *, uint64_t wall_ms, char *out);
/* Write a fresh traceparent (EDGE_TRACE_LEN chars, no NUL), sampled. */
void edge_trace_new(struct edge_ids *, char *out);
/* Whether s (n bytes) is a valid version-00 traceparent: exactly
 * 00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>, with a
 * trace id and a parent id that are not all zeros. */
int edge_trace_valid(const char *s, size_t n);
/* Check the tracestate list s (n bytes: the client's tracestate lines
 * joined with ',') per W3C Trace Context level 1 and write what goes on
 * to out (EDGE_TRACESTATE_MAX bytes, no NUL): the members, without the
 * whitespace around them and without empty ones, joined by ','; over
 * EDGE_TRACESTATE_MAX bytes, whole members are removed from the end, those
 * longer than 128 characters first.  Returns the length written; 0 when
 * nothing goes on (s empty, or invalid: a bad key or value, a key twice,
 * more than EDGE_TRACESTATE_MEMBERS members). */
size_t edge_tracestate(const char *s, size_t n, char *out);

/* The fields of a /v1/bot/chat body; strings point into root. */
struct edge_chat {
	void *root; /* the cJSON tree; edge_chat_free() frees it */
	const char *bot_id, *user_id, *query, *history_id;
	size_t bot_id_len, user_id_len, query_len, history_id_len;
};

/* Parse and check a chat body: text must be NUL-terminated at text[len].
 * A JSON object with non-empty strings bot_id, user_id and query, and
 * history_id absent, null or a string.  0, or -1 with a message for the
 * client in msg (naming the field at fault). */
int edge_chat_parse(const char *text, size_t len, struct edge_chat *,
                    char *msg, size_t msglen);
void edge_chat_free(struct edge_chat *);

/* Limits of a /v3/chat body, below what storage keeps of a chat (1000
 * messages with the answer and up to 5 rounds of tool calls, a type of 32
 * bytes), so nothing accepted here is refused after the run. */
#define EDGE_V3_MESSAGES_MAX 100
#define EDGE_V3_TYPE_MAX 32

/* The fields of a /v3/chat body (Coze's chat API).  Strings point into
 * root, except messages, which is allocated. */
struct edge_v3chat {
	void *root; /* the cJSON tree; edge_v3chat_free() frees it */
	const char *bot_id, *user_id, *query;
	size_t bot_id_len, user_id_len, query_len;
	int stream;     /* 1: answer as server-sent events */
	char *messages; /* normalised additional_messages (JSON array) */
	size_t messages_len;
	size_t nmessages;
};

/* Parse and check a /v3/chat body: text must be NUL-terminated at
 * text[len] and UTF-8.  bot_id and user_id non-empty strings, stream
 * absent or a boolean, additional_messages a non-empty array of at most
 * EDGE_V3_MESSAGES_MAX objects {role "user" or "assistant", content a
 * non-empty string, content_type absent or "text", type absent or a
 * non-empty string of at most EDGE_V3_TYPE_MAX bytes}, at least one from
 * the user; auto_save_history, custom_variables, meta_data and unknown
 * members are ignored.  query is the content of the last user message;
 * messages is
 * [{"role":..,"type":..,"content":..,"content_type":"text"},...] (type
 * defaults to question for the user, answer for the assistant).  0, or
 * -1 with a message for the client in msg (naming the field at fault). */
int edge_v3chat_parse(const char *text, size_t len, struct edge_v3chat *,
                      char *msg, size_t msglen);
void edge_v3chat_free(struct edge_v3chat *);

/* Find parameter name in the query string q (qlen bytes, without the
 * '?'), and percent-decode its value ('+' is a space) into out (cap bytes,
 * NUL-terminated).  1 found, 0 absent, -1 malformed (bad escape, a NUL, or
 * longer than cap - 1).  The first occurrence wins. */
int edge_query_get(const char *q, size_t qlen, const char *name, char *out,
                   size_t cap);

#define EDGE_ID_MAX 32 /* digits of a conversation or chat id */

/* The ids of a v3 retrieve, message list or cancel. */
struct edge_v3ids {
	char conversation_id[EDGE_ID_MAX + 1];
	char chat_id[EDGE_ID_MAX + 1];
};

/* Take conversation_id and chat_id from the query string q (qlen bytes)
 * and, if body is not NULL, from the JSON object body (NUL-terminated at
 * body[blen]; blen 0: no body), which wins over the query.  Both are
 * required and must be ids (1 to 32 decimal digits).  0, or -1 with a
 * message for the client in msg. */
int edge_v3ids_parse(const char *q, size_t qlen, const char *body, size_t blen,
                     struct edge_v3ids *, char *msg, size_t msglen);

/* Bytes edge_json_error() needs at most for a message of msglen bytes. */
size_t edge_json_error_max(size_t msglen);
/* Write {"code":N,"msg":"...","detail":{"logid":"<reqid>"}} to out (cap
 * bytes, at least edge_json_error_max(msglen)); returns its length.
 * extra, if not NULL, is raw JSON members appended to detail (",..."). */
size_t edge_json_error(char *out, size_t cap, int64_t code, const char *msg,
                       size_t msglen, const char *reqid, const char *extra);
/* Bytes edge_json_ok() needs for data of datalen bytes. */
size_t edge_json_ok_max(size_t datalen);
/* Write {"code":0,"msg":"","data":<data>} (data verbatim; empty data
 * gives {}) to out; returns its length. */
size_t edge_json_ok(char *out, size_t cap, const char *data, size_t datalen);
/* Escape s as the inside of a JSON string (no quotes) into out, which
 * holds at least 6 * n bytes; returns the length written. */
size_t edge_json_escape(char *out, const char *s, size_t n);

#endif
