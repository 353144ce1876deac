/* SPDX-License-Identifier: ISC */
/*
 * edge_webhook: the checks and the answer shape of the plugin execution
 * webhook, POST /api/v1/execute?plugin=<name> (docs/api.md, "Plugin
 * webhook").  edge_http.c takes the headers and the body from h2o, calls
 * edge_webhook_check() and, when it passes, sends CHAT_REQUEST route
 * "webhook.execute" to auth; every answer of that route, its own errors
 * and those of auth, the dispatcher and the worker, is written by
 * edge_webhook_json() in the shape {"status","message","data"}.
 *
 * The signature is Coze's callback scheme: hex SHA-1 over the timestamp,
 * the nonce, the verify token and the raw body, concatenated.  The
 * timestamp must be within 300 s of our clock and the nonce is refused
 * when seen before (storage keeps it in Redis for 600 s, so a replay
 * outside the window fails the timestamp, inside it the nonce).
 *
 * Pure: no I/O, no logs, no clock.  Must never compare a signature in
 * variable time.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "edge_req.h"
#include "edge_webhook.h"

int
edge_webhook_sign(struct mstr ts, struct mstr nonce, const char *token,
                  const char *body, size_t body_len, char out[41])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	EVP_MD_CTX *ctx;
	int ok;

	if ((ctx = EVP_MD_CTX_new()) == NULL)
		return (-1);
	ok = EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) == 1 &&
	     EVP_DigestUpdate(ctx, ts.p, ts.n) == 1 &&
	     EVP_DigestUpdate(ctx, nonce.p, nonce.n) == 1 &&
	     EVP_DigestUpdate(ctx, token, strlen(token)) == 1 &&
	     (body_len == 0 || EVP_DigestUpdate(ctx, body, body_len) == 1) &&
	     EVP_DigestFinal_ex(ctx, md, &mdlen) == 1 && mdlen == 20;
	EVP_MD_CTX_free(ctx);
	if (!ok)
		return (-1);
	hex_encode(out, md, 20);
	out[EDGE_WEBHOOK_SIG_LEN] = '\0';
	return (0);
}

int
edge_webhook_sig_eq(const char *sig, size_t n, const char *want)
{
	char low[EDGE_WEBHOOK_SIG_LEN];
	size_t i;

	if (n != EDGE_WEBHOOK_SIG_LEN)
		return (0);
	for (i = 0; i < n; i++) {
		char c = sig[i];

		low[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
	}
	return (CRYPTO_memcmp(low, want, EDGE_WEBHOOK_SIG_LEN) == 0);
}

/* A unix time of 1 to 12 decimal digits; -1 if not. */
static int64_t
ts_parse(struct mstr s)
{
	int64_t v = 0;

	if (s.n == 0 || s.n > 12)
		return (-1);
	for (uint32_t i = 0; i < s.n; i++) {
		if (s.p[i] < '0' || s.p[i] > '9')
			return (-1);
		v = v * 10 + (s.p[i] - '0');
	}
	return (v);
}

/* 1 to max bytes, each printable ASCII (space to tilde). */
static int
printable(struct mstr s, size_t max)
{
	if (s.n == 0 || s.n > max)
		return (0);
	for (uint32_t i = 0; i < s.n; i++)
		if ((unsigned char)s.p[i] < 0x20 ||
		    (unsigned char)s.p[i] > 0x7e)
			return (0);
	return (1);
}

/* A plugin name as plugins are registered: letters, digits, _ and -. */
static int
plugin_ok(struct mstr s)
{
	if (s.n == 0 || s.n > EDGE_WEBHOOK_PLUGIN_MAX)
		return (0);
	for (uint32_t i = 0; i < s.n; i++) {
		char c = s.p[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '_' || c == '-'))
			return (0);
	}
	return (1);
}

static int
fail(char *msg, size_t msglen, int status, const char *text)
{
	snprintf(msg, msglen, "%s", text);
	return (status);
}

/* The body: 0 with out's user_id and arguments set, or 400. */
static int
body_parse(const struct edge_webhook_in *in, struct edge_webhook *out,
           char *msg, size_t msglen)
{
	const cJSON *u, *a, *b;
	cJSON *root;
	char *args;
	int rc = 400;

	root = cJSON_ParseWithOpts(in->body, NULL, 1);
	if (root == NULL || !cJSON_IsObject(root)) {
		fail(msg, msglen, 400, "body must be a JSON object");
		goto done;
	}
	b = cJSON_GetObjectItemCaseSensitive(root, "bot_id");
	if (b != NULL && !cJSON_IsNull(b) &&
	    (!cJSON_IsString(b) || strlen(b->valuestring) != in->bot_id.n ||
	     memcmp(b->valuestring, in->bot_id.p, in->bot_id.n) != 0)) {
		fail(msg, msglen, 400, "bot_id does not match X-Coze-Bot-ID");
		goto done;
	}
	u = cJSON_GetObjectItemCaseSensitive(root, "user_id");
	if (!cJSON_IsString(u) || u->valuestring[0] == '\0') {
		fail(msg, msglen, 400, "user_id must be a non-empty string");
		goto done;
	}
	a = cJSON_GetObjectItemCaseSensitive(root, "arguments");
	if (!cJSON_IsObject(a)) {
		fail(msg, msglen, 400, "arguments must be a JSON object");
		goto done;
	}
	if ((args = cJSON_PrintUnformatted(a)) == NULL)
		goto nomem;
	out->arguments_len = strlen(args);
	/* Ours to free with free(), whatever cJSON's allocator is. */
	if ((out->arguments = strdup(args)) == NULL) {
		cJSON_free(args);
		goto nomem;
	}
	cJSON_free(args);
	out->user_id_len = strlen(u->valuestring);
	if ((out->user_id = strdup(u->valuestring)) == NULL)
		goto nomem;
	rc = 0;
	goto done;
nomem:
	rc = fail(msg, msglen, 500, "internal error");
done:
	cJSON_Delete(root);
	if (rc != 0)
		edge_webhook_free(out);
	return (rc);
}

int
edge_webhook_check(const char *token, uint64_t now_s,
                   const struct edge_webhook_in *in, struct edge_webhook *out,
                   char *msg, size_t msglen)
{
	char want[EDGE_WEBHOOK_SIG_LEN + 1];
	int64_t ts, skew;

	memset(out, 0, sizeof(*out));
	if (token == NULL || token[0] == '\0')
		return (fail(msg, msglen, 403, "webhook not configured"));
	if (in->timestamp.p == NULL)
		return (fail(msg, msglen, 401,
		             "missing X-Coze-Timestamp header"));
	if (in->nonce.p == NULL)
		return (fail(msg, msglen, 401, "missing X-Coze-Nonce header"));
	if (in->signature.p == NULL)
		return (fail(msg, msglen, 401,
		             "missing X-Coze-Signature header"));
	if ((ts = ts_parse(in->timestamp)) == -1)
		return (fail(msg, msglen, 401,
		             "X-Coze-Timestamp must be unix seconds"));
	if (!printable(in->nonce, EDGE_WEBHOOK_NONCE_MAX))
		return (fail(msg, msglen, 401,
		             "X-Coze-Nonce must be 1 to 64 printable "
		             "characters"));
	skew = ts - (int64_t)now_s;
	if (skew > EDGE_WEBHOOK_SKEW_S || skew < -EDGE_WEBHOOK_SKEW_S)
		return (fail(msg, msglen, 401,
		             "X-Coze-Timestamp is more than 300 s away"));
	if (edge_webhook_sign(in->timestamp, in->nonce, token, in->body,
	                      in->body_len, want) == -1)
		return (fail(msg, msglen, 500, "internal error"));
	if (!edge_webhook_sig_eq(in->signature.p, in->signature.n, want))
		return (fail(msg, msglen, 401, "invalid signature"));
	if (in->bot_id.p == NULL ||
	    !printable(in->bot_id, EDGE_WEBHOOK_BOT_MAX))
		return (fail(msg, msglen, 400,
		             "X-Coze-Bot-ID must be 1 to 128 printable "
		             "characters"));
	if (in->plugin.p == NULL || !plugin_ok(in->plugin))
		return (fail(msg, msglen, 400,
		             "plugin must be 1 to 64 letters, digits, _ or "
		             "-"));
	out->bot_id = in->bot_id;
	out->nonce = in->nonce;
	out->plugin = in->plugin;
	return (body_parse(in, out, msg, msglen));
}

void
edge_webhook_free(struct edge_webhook *w)
{
	free(w->user_id);
	free(w->arguments);
	w->user_id = w->arguments = NULL;
	w->user_id_len = w->arguments_len = 0;
}

#define WH_A "{\"status\":"
#define WH_B ",\"message\":\""
#define WH_C "\",\"data\":"

size_t
edge_webhook_json_max(size_t msglen, size_t datalen)
{
	return (sizeof(WH_A) + 12 + sizeof(WH_B) + 6 * msglen + sizeof(WH_C) +
	        (datalen ? datalen : 4) + 2);
}

size_t
edge_webhook_json(char *out, size_t cap, int status, const char *msg,
                  size_t msglen, const char *data, size_t datalen)
{
	size_t n;

	if (cap < edge_webhook_json_max(msglen, datalen)) {
		if (cap > 0)
			out[0] = '\0';
		return (0);
	}
	n = (size_t)snprintf(out, cap, WH_A "%d" WH_B, status);
	n += edge_json_escape(out + n, msg, msglen);
	memcpy(out + n, WH_C, sizeof(WH_C) - 1);
	n += sizeof(WH_C) - 1;
	if (datalen == 0) {
		memcpy(out + n, "null", 4);
		n += 4;
	} else {
		memcpy(out + n, data, datalen);
		n += datalen;
	}
	out[n++] = '}';
	out[n] = '\0';
	return (n);
}
