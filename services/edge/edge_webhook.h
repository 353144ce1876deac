/* SPDX-License-Identifier: ISC */
/*
 * edge_webhook: the pure parts of POST /api/v1/execute?plugin=<name>, the
 * plugin execution webhook of a calling platform (docs/api.md): checking
 * Coze's callback signature (hex SHA-1 of timestamp + nonce + token + raw
 * body), the timestamp window and the nonce's form, reading the JSON body
 * {"bot_id"?, "user_id", "arguments"}, and writing answers in the
 * webhook's own shape {"status": N, "message": "...", "data": ...}.
 *
 * Callers: edge_http.c (the route and its answers) and the unit test.  No
 * h2o, no logging, no clock of its own (the caller passes the time), no
 * global state.  It must never compare a signature in variable time,
 * never read past a length it was given, never write past a capacity it
 * was given, and never emit a JSON string without escaping it.
 */
#ifndef TROUPE_EDGE_WEBHOOK_H
#define TROUPE_EDGE_WEBHOOK_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define EDGE_WEBHOOK_SKEW_S 300    /* |now - X-Coze-Timestamp| at most */
#define EDGE_WEBHOOK_NONCE_MAX 64  /* bytes of X-Coze-Nonce */
#define EDGE_WEBHOOK_BOT_MAX 128   /* bytes of X-Coze-Bot-ID */
#define EDGE_WEBHOOK_PLUGIN_MAX 64 /* a plugin's name (as the worker's) */
#define EDGE_WEBHOOK_SIG_LEN 40    /* hex digits of a SHA-1 */

/* What a webhook call brings: the four X-Coze-* header values (p NULL:
 * the header is absent), the plugin query parameter (decoded, p NULL:
 * absent) and the raw body. */
struct edge_webhook_in {
	struct mstr bot_id, timestamp, nonce, signature;
	struct mstr plugin;
	const char *body; /* NUL-terminated at body[body_len] */
	size_t body_len;
};

/* A call that passed every check.  user_id and arguments are allocated
 * (edge_webhook_free); bot_id, nonce and plugin point into the input. */
struct edge_webhook {
	struct mstr bot_id, nonce, plugin;
	char *user_id;
	size_t user_id_len;
	char *arguments; /* the arguments object, compact JSON */
	size_t arguments_len;
};

/* Write the lowercase hex SHA-1 of ts + nonce + token + body into out
 * (40 digits, NUL-terminated).  0, or -1 if libcrypto fails. */
int edge_webhook_sign(struct mstr ts, struct mstr nonce, const char *token,
                      const char *body, size_t body_len, char out[41]);

/* Whether sig (n bytes) is the 40 hex digits of want (lowercase),
 * compared without regard to case and in time independent of where they
 * differ. */
int edge_webhook_sig_eq(const char *sig, size_t n, const char *want);

/* Check a call with the verify token (empty: the webhook is off) at unix
 * time now_s, in this order: token configured (403), X-Coze-Timestamp,
 * X-Coze-Nonce and X-Coze-Signature present and well formed (401), the
 * timestamp within EDGE_WEBHOOK_SKEW_S of now (401), the signature (401),
 * X-Coze-Bot-ID (400), the plugin parameter (400), the body: a JSON
 * object with user_id a non-empty string, arguments an object, bot_id
 * absent or equal to the header (400).  0 with out filled, or the HTTP
 * status to answer with a message for the caller in msg. */
int edge_webhook_check(const char *token, uint64_t now_s,
                       const struct edge_webhook_in *in,
                       struct edge_webhook *out, char *msg, size_t msglen);
void edge_webhook_free(struct edge_webhook *);

/* Bytes edge_webhook_json() needs at most for a message of msglen bytes
 * and data of datalen bytes. */
size_t edge_webhook_json_max(size_t msglen, size_t datalen);
/* Write {"status":N,"message":"...","data":<data>} to out (cap bytes, at
 * least edge_webhook_json_max()); data is raw JSON, empty gives null.
 * Returns the length written. */
size_t edge_webhook_json(char *out, size_t cap, int status, const char *msg,
                         size_t msglen, const char *data, size_t datalen);

#endif
