/* SPDX-License-Identifier: ISC */
/*
 * worker_plugin: a bot's plugins as the worker uses them in a v3 run.
 * Reads CTX_REPLY's plugins JSON, renders them as the model's "tools",
 * checks a tool call's arguments, and writes a plugin call's auth headers
 * (a bearer token, or an HMAC-SHA256 signature over timestamp and body).
 *
 * Pure functions, called by worker_run.c and the unit tests: never logs,
 * never does I/O, and never puts a secret anywhere but a header line.
 */
#ifndef TROUPE_WORKER_PLUGIN_H
#define TROUPE_WORKER_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define PLUGIN_MAX 128     /* plugins offered to the model per bot */
#define PLUGIN_NAME_MAX 64 /* OpenAI's limit on a function's name */

enum plugin_auth { PLUGIN_AUTH_NONE, PLUGIN_AUTH_TOKEN, PLUGIN_AUTH_HMAC };

struct plugin {
	char *name;
	char *url;
	char *header; /* token: the header's name */
	char *secret;
	enum plugin_auth auth;
	int64_t timeout_ms;
};

struct plugins {
	struct plugin *v;
	size_t n;
	struct buf tools; /* the request's "tools" array; empty: none */
};

/* Read ctx_reply.plugins (a JSON array of {name, url, description,
 * parameters, auth, header, secret, timeout_ms}; empty: no plugins) into
 * p (zeroed before).  Entries that cannot be used (no valid name or
 * http(s) url, an unknown auth, a token or hmac without a secret, a bad
 * header name, a name seen before) are left out and counted in *skipped;
 * a timeout_ms missing or below 1 becomes default_timeout_ms.  -1 only on
 * ENOMEM (p is then freed). */
int worker_plugin_parse(struct plugins *p, struct mstr json,
                        int64_t default_timeout_ms, size_t *skipped);
void worker_plugin_free(struct plugins *);
/* The plugin named name (n bytes), or NULL. */
const struct plugin *worker_plugin_find(const struct plugins *,
                                        const char *name, size_t n);

/* Whether a tool call's arguments are a JSON object (blank counts as
 * {}). */
int worker_plugin_args_ok(const char *args, size_t n);

/* Write the hex HMAC-SHA256 of "<ts>.<body>" keyed with secret into out
 * (64 digits, NUL-terminated); -1 on failure. */
int worker_plugin_sign(const char *secret, uint64_t ts, const char *body,
                       size_t n, char out[65]);

/* The auth header lines of a call to pl with this body at unix time
 * now_s: "<header>: Bearer <secret>" for a token, "X-Troupe-Timestamp"
 * and "X-Troupe-Signature: sha256=<hex>" for hmac, none for none.  The
 * lines are stored in out; lines[] points into it.  Their count (0..2),
 * -1 on failure. */
int worker_plugin_headers(const struct plugin *pl, const char *body, size_t n,
                          uint64_t now_s, struct buf *out,
                          const char *lines[2]);

#endif
