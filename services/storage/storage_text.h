/* SPDX-License-Identifier: ISC */
/*
 * storage_text: the text forms troupe-storage builds and checks, kept free
 * of I/O so they can be unit-tested: PostgreSQL array literals for the
 * group commit, OpenAI message JSON and the comma-joined context, Redis
 * keys, the [storage] redis address, UTF-8 and bot id checks, the
 * arguments of bot.add/bot.rm and plugin.add/list/rm (with the plugin's
 * JSON Schema), SQLSTATE classes.  Callers: the other
 * storage_*.c files.  Never logs, never exits, never does I/O.
 */
#ifndef TROUPE_STORAGE_TEXT_H
#define TROUPE_STORAGE_TEXT_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define STORAGE_BOT_ID_MAX 128
#define STORAGE_UPSTREAM_MAX 2048
#define STORAGE_MODEL_MAX 256
#define STORAGE_PROMPT_MAX 65536
#define STORAGE_TURNS_MAX 100
#define STORAGE_CTX_PREFIX "troupe:ctx:"

/* Where Redis is: a TCP address (numeric IP and port) or a unix socket. */
struct storage_redis_addr {
	int is_unix;
	char host[64]; /* numeric IPv4 or IPv6 */
	int port;
	char path[108]; /* sun_path */
};

/* Parse "127.0.0.1:6379", "[::1]:6379", "localhost:6379", "unix:/p",
 * "/p" or any of these after "redis://"; 0, or -1 with a reason in err. */
int storage_text_redis_addr(const char *spec, struct storage_redis_addr *,
                            char *err, size_t errlen);

/* Start a PostgreSQL array literal in b ("{"), emptying b first. */
int storage_text_pg_array_begin(struct buf *b);
/* Append one quoted, escaped text element. */
int storage_text_pg_array_str(struct buf *b, const char *p, size_t n);
/* Append one integer element. */
int storage_text_pg_array_int(struct buf *b, uint64_t v);
/* Close the literal ("}") and NUL-terminate it (not counted in len). */
int storage_text_pg_array_end(struct buf *b);

/* Append {"role":<role>,"content":<p as a JSON string>} to b. */
int storage_text_msg_json(struct buf *b, const char *role, const char *p,
                          size_t n);
/* Append the non-empty elements of v to b, comma-separated: empty
 * elements are the "known empty" marker of a context list. */
int storage_text_ctx_join(struct buf *b, const struct mstr *v, size_t n);
/* Append the Redis key of a conversation's context to b. */
int storage_text_ctx_key(struct buf *b, struct mstr bot_id,
                         struct mstr conversation_id);

/* Whether p[0..n) is valid UTF-8 without NUL bytes (what PostgreSQL text
 * accepts). */
int storage_text_utf8_ok(const char *p, size_t n);
/* Whether p[0..n) is a valid bot id: 1..128 printable ASCII bytes, no
 * ':' (the separator of context keys). */
int storage_text_bot_id_ok(const char *p, size_t n);

/* The arguments of bot.add / bot.rm; absent optional ones are NULL/-1. */
struct storage_bot_args {
	char *id;
	char *upstream;
	char *model;
	char *system_prompt;
	int64_t context_turns; /* -1: absent */
	int64_t ttfe_ms;       /* -1: absent */
	int64_t total_ms;      /* -1: absent */
};

/* Parse and check the JSON args of bot.add (full is 1: upstream needed,
 * every field allowed) or bot.rm (full is 0: only id).  0, or -1 with a
 * message for the operator in err; free with storage_text_bot_args_free
 * in both cases. */
int storage_text_bot_args(const char *json, size_t n, int full,
                          struct storage_bot_args *, char *err, size_t errlen);
void storage_text_bot_args_free(struct storage_bot_args *);

/* Plugins (plugin.add / plugin.list / plugin.rm). */
#define STORAGE_PLUGIN_NAME_MAX 64 /* OpenAI function names */
#define STORAGE_PLUGIN_URL_MAX 2048
#define STORAGE_PLUGIN_DESC_MAX 4096
#define STORAGE_PLUGIN_PARAMS_MAX 32768 /* bytes of JSON text */
#define STORAGE_PLUGIN_HEADER_MAX 128
#define STORAGE_PLUGIN_SECRET_MAX 1024
#define STORAGE_PLUGIN_TIMEOUT_MAX 600000
#define STORAGE_PLUGIN_TIMEOUT_DEFAULT 5000
#define STORAGE_PLUGINS_PER_BOT 128 /* OpenAI's limit on tools */
#define STORAGE_PLUGIN_PARAMS_DEFAULT "{\"type\":\"object\",\"properties\":{}}"
#define STORAGE_PLUGIN_HEADER_DEFAULT "Authorization"

enum storage_plugin_op {
	STORAGE_PLUGIN_ADD,  /* every field */
	STORAGE_PLUGIN_LIST, /* bot_id */
	STORAGE_PLUGIN_RM,   /* bot_id, name */
};

/* The arguments of a plugin.* op, checked, with the defaults of add
 * filled in (secret stays NULL for auth none). */
struct storage_plugin_args {
	char *bot_id, *name, *url, *description;
	char *parameters; /* JSON object text */
	char *auth;       /* none, token, hmac */
	char *header, *secret;
	int64_t timeout_ms;
};

/* Whether p[0..n) is a plugin name: 1..64 of [A-Za-z0-9_-]. */
int storage_text_plugin_name_ok(const char *p, size_t n);
/* Whether the NUL-terminated s is a JSON Schema OpenAI accepts as
 * function parameters: a JSON object of at most
 * STORAGE_PLUGIN_PARAMS_MAX bytes whose "type", if any, is "object",
 * "properties", if any, an object and "required", if any, an array of
 * strings.  0, or -1 with what is wrong (and where) in err. */
int storage_text_plugin_schema(const char *s, char *err, size_t errlen);
/* Parse and check the JSON args (NUL-terminated at n) of op.  0, or -1
 * with a message for the operator in err; free with
 * storage_text_plugin_args_free in both cases. */
int storage_text_plugin_args(const char *json, size_t n,
                             enum storage_plugin_op op,
                             struct storage_plugin_args *, char *err,
                             size_t errlen);
void storage_text_plugin_args_free(struct storage_plugin_args *);

/* Turn a multi-line message (libpq's) into one line in place: every run
 * of whitespace holding a newline becomes one space, trailing space goes.
 * Returns s. */
char *storage_text_oneline(char *s);

/* Whether a SQLSTATE says the server or the connection failed (the same
 * statement may work later) rather than the data being refused. */
int storage_text_sqlstate_transient(const char *sqlstate);

#endif
