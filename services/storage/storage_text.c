/* SPDX-License-Identifier: ISC */
/*
 * storage_text: pure text helpers of troupe-storage (see storage_text.h).
 * Callers: storage_commit.c (array literals), storage_ctx.c (message JSON,
 * keys, joining), storage_redis.c (addresses), storage_bots.c (bot.add
 * arguments), storage_plugins.c (plugin.* arguments and the plugin's
 * JSON Schema).  It must never do I/O or keep state: the unit tests in
 * tests/unit/services/storage/ run it alone.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "storage_text.h"

int
storage_text_redis_addr(const char *spec, struct storage_redis_addr *a,
                        char *err, size_t errlen)
{
	const char *s = spec, *colon, *hs, *he;
	struct in6_addr a6;
	struct in_addr a4;
	char host[64], *end;
	long port;
	size_t hl;

	memset(a, 0, sizeof(*a));
	if (strncmp(s, "redis://", 8) == 0)
		s += 8;
	if (strncmp(s, "unix:", 5) == 0 || s[0] == '/') {
		if (s[0] != '/')
			s += 5;
		if (s[0] != '/') {
			snprintf(err, errlen,
			         "%s: unix socket path must be "
			         "absolute",
			         spec);
			return (-1);
		}
		if (strlen(s) >= sizeof(a->path)) {
			snprintf(err, errlen, "%s: unix socket path too long",
			         spec);
			return (-1);
		}
		a->is_unix = 1;
		strcpy(a->path, s);
		return (0);
	}
	if (s[0] == '[') {
		hs = s + 1;
		if ((he = strchr(hs, ']')) == NULL || he[1] != ':') {
			snprintf(err, errlen, "%s: want [ipv6]:port", spec);
			return (-1);
		}
		colon = he + 1;
	} else {
		hs = s;
		if ((colon = strrchr(s, ':')) == NULL) {
			snprintf(err, errlen,
			         "%s: want host:port or unix:/path", spec);
			return (-1);
		}
		he = colon;
	}
	hl = (size_t)(he - hs);
	if (hl == 0 || hl >= sizeof(host)) {
		snprintf(err, errlen, "%s: bad host", spec);
		return (-1);
	}
	memcpy(host, hs, hl);
	host[hl] = '\0';
	port = strtol(colon + 1, &end, 10);
	if (colon[1] == '\0' || *end != '\0' || port < 1 || port > 65535) {
		snprintf(err, errlen, "%s: bad port", spec);
		return (-1);
	}
	/* hiredis resolves names with a blocking getaddrinfo(): numeric
	 * addresses only (PITFALLS.md), "localhost" being spelt out. */
	if (strcmp(host, "localhost") == 0)
		strcpy(host, "127.0.0.1");
	if (inet_pton(AF_INET, host, &a4) != 1 &&
	    inet_pton(AF_INET6, host, &a6) != 1) {
		snprintf(err, errlen,
		         "%s: host must be a numeric IP address "
		         "(names would block the loop)",
		         spec);
		return (-1);
	}
	strcpy(a->host, host);
	a->port = (int)port;
	return (0);
}

int
storage_text_pg_array_begin(struct buf *b)
{
	buf_reset(b);
	return (buf_add(b, "{", 1));
}

static int
pg_array_sep(struct buf *b)
{
	if (b->len > 1)
		return (buf_add(b, ",", 1));
	return (0);
}

int
storage_text_pg_array_str(struct buf *b, const char *p, size_t n)
{
	size_t i, run = 0;

	if (pg_array_sep(b) == -1 || buf_reserve(b, n + 2) == -1 ||
	    buf_add(b, "\"", 1) == -1)
		return (-1);
	/* Inside double quotes only '"' and '\' need a backslash. */
	for (i = 0; i < n; i++) {
		if (p[i] != '"' && p[i] != '\\')
			continue;
		if (buf_add(b, p + run, i - run) == -1 ||
		    buf_add(b, "\\", 1) == -1)
			return (-1);
		run = i;
	}
	if (buf_add(b, p + run, n - run) == -1)
		return (-1);
	return (buf_add(b, "\"", 1));
}

int
storage_text_pg_array_int(struct buf *b, uint64_t v)
{
	if (pg_array_sep(b) == -1)
		return (-1);
	return (buf_addf(b, "%llu", (unsigned long long)v));
}

int
storage_text_pg_array_end(struct buf *b)
{
	if (buf_add(b, "}", 1) == -1 || buf_add(b, "", 1) == -1)
		return (-1);
	b->len--;
	return (0);
}

int
storage_text_msg_json(struct buf *b, const char *role, const char *p, size_t n)
{
	if (buf_adds(b, "{\"role\":") == -1 ||
	    buf_add_json_str(b, role, strlen(role)) == -1 ||
	    buf_adds(b, ",\"content\":") == -1 ||
	    buf_add_json_str(b, p, n) == -1)
		return (-1);
	return (buf_add(b, "}", 1));
}

int
storage_text_ctx_join(struct buf *b, const struct mstr *v, size_t n)
{
	size_t i;
	int first = 1;

	for (i = 0; i < n; i++) {
		if (v[i].n == 0)
			continue;
		if (!first && buf_add(b, ",", 1) == -1)
			return (-1);
		if (buf_add(b, v[i].p, v[i].n) == -1)
			return (-1);
		first = 0;
	}
	return (0);
}

int
storage_text_ctx_key(struct buf *b, struct mstr bot_id,
                     struct mstr conversation_id)
{
	if (buf_adds(b, STORAGE_CTX_PREFIX) == -1 ||
	    buf_add(b, bot_id.p, bot_id.n) == -1 || buf_add(b, ":", 1) == -1 ||
	    buf_add(b, conversation_id.p, conversation_id.n) == -1)
		return (-1);
	return (0);
}

int
storage_text_utf8_ok(const char *p, size_t n)
{
	const unsigned char *s = (const unsigned char *)p;
	size_t i = 0, k, len;
	uint32_t cp, min;

	while (i < n) {
		unsigned char c = s[i];

		if (c == 0)
			return (0);
		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf) {
			len = 2;
			cp = c & 0x1f;
			min = 0x80;
		} else if (c >= 0xe0 && c <= 0xef) {
			len = 3;
			cp = c & 0x0f;
			min = 0x800;
		} else if (c >= 0xf0 && c <= 0xf4) {
			len = 4;
			cp = c & 0x07;
			min = 0x10000;
		} else
			return (0);
		if (n - i < len)
			return (0);
		for (k = 1; k < len; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return (0);
			cp = (cp << 6) | (s[i + k] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return (0);
		i += len;
	}
	return (1);
}

int
storage_text_bot_id_ok(const char *p, size_t n)
{
	size_t i;

	if (n == 0 || n > STORAGE_BOT_ID_MAX)
		return (0);
	for (i = 0; i < n; i++)
		if (p[i] < 0x21 || p[i] > 0x7e || p[i] == ':')
			return (0);
	return (1);
}

static int
args_str(const cJSON *it, const char *name, size_t max, char **out, char *err,
         size_t errlen)
{
	size_t n;

	if (!cJSON_IsString(it) || it->valuestring == NULL) {
		snprintf(err, errlen, "%s must be a string", name);
		return (-1);
	}
	n = strlen(it->valuestring);
	if (n > max) {
		snprintf(err, errlen, "%s longer than %zu bytes", name, max);
		return (-1);
	}
	if (!storage_text_utf8_ok(it->valuestring, n)) {
		snprintf(err, errlen, "%s is not valid UTF-8", name);
		return (-1);
	}
	if ((*out = strdup(it->valuestring)) == NULL) {
		snprintf(err, errlen, "out of memory");
		return (-1);
	}
	return (0);
}

static int
args_int(const cJSON *it, const char *name, int64_t min, int64_t max,
         int64_t *out, char *err, size_t errlen)
{
	double d;

	if (!cJSON_IsNumber(it)) {
		snprintf(err, errlen, "%s must be an integer", name);
		return (-1);
	}
	d = it->valuedouble;
	if (d != (double)(int64_t)d || d < (double)min || d > (double)max) {
		snprintf(err, errlen, "%s must be an integer in %lld..%lld",
		         name, (long long)min, (long long)max);
		return (-1);
	}
	*out = (int64_t)d;
	return (0);
}

int
storage_text_bot_args(const char *json, size_t n, int full,
                      struct storage_bot_args *a, char *err, size_t errlen)
{
	cJSON *root, *it;
	const char *end = NULL;
	int rc = -1;

	memset(a, 0, sizeof(*a));
	a->context_turns = a->ttfe_ms = a->total_ms = -1;
	if (errlen > 0)
		err[0] = '\0';
	/* The caller's copy is NUL-terminated at n (cJSON over-reads an
	 * unterminated buffer: PITFALLS.md); a NUL inside is refused. */
	root = strlen(json) == n ? cJSON_ParseWithOpts(json, &end, 1) : NULL;
	if (root == NULL || !cJSON_IsObject(root)) {
		snprintf(err, errlen, "args must be a JSON object");
		goto done;
	}
	cJSON_ArrayForEach(it, root)
	{
		const char *k = it->string ? it->string : "";

		if (strcmp(k, "id") == 0) {
			if (a->id != NULL ||
			    args_str(it, k, STORAGE_BOT_ID_MAX, &a->id, err,
			             errlen) == -1)
				goto dup;
		} else if (!full) {
			snprintf(err, errlen, "unknown field \"%.64s\"", k);
			goto done;
		} else if (strcmp(k, "upstream") == 0) {
			if (a->upstream != NULL ||
			    args_str(it, k, STORAGE_UPSTREAM_MAX, &a->upstream,
			             err, errlen) == -1)
				goto dup;
		} else if (strcmp(k, "model") == 0) {
			if (a->model != NULL ||
			    args_str(it, k, STORAGE_MODEL_MAX, &a->model, err,
			             errlen) == -1)
				goto dup;
		} else if (strcmp(k, "system_prompt") == 0) {
			if (a->system_prompt != NULL ||
			    args_str(it, k, STORAGE_PROMPT_MAX,
			             &a->system_prompt, err, errlen) == -1)
				goto dup;
		} else if (strcmp(k, "context_turns") == 0) {
			if (a->context_turns != -1 ||
			    args_int(it, k, 0, STORAGE_TURNS_MAX,
			             &a->context_turns, err, errlen) == -1)
				goto dup;
		} else if (strcmp(k, "ttfe_ms") == 0) {
			if (a->ttfe_ms != -1 ||
			    args_int(it, k, 1, 3600000, &a->ttfe_ms, err,
			             errlen) == -1)
				goto dup;
		} else if (strcmp(k, "total_ms") == 0) {
			if (a->total_ms != -1 ||
			    args_int(it, k, 1, 3600000, &a->total_ms, err,
			             errlen) == -1)
				goto dup;
		} else {
			snprintf(err, errlen, "unknown field \"%.64s\"", k);
			goto done;
		}
		continue;
	dup:
		/* args_* filled err unless the field came twice. */
		if (err[0] == '\0')
			snprintf(err, errlen, "field \"%.64s\" given twice",
			         k);
		goto done;
	}
	if (a->id == NULL || a->id[0] == '\0') {
		snprintf(err, errlen, "id is required");
		goto done;
	}
	if (!storage_text_bot_id_ok(a->id, strlen(a->id))) {
		snprintf(err, errlen,
		         "id must be 1..%d printable ASCII "
		         "characters without ':' or spaces",
		         STORAGE_BOT_ID_MAX);
		goto done;
	}
	if (full) {
		if (a->upstream == NULL) {
			snprintf(err, errlen, "upstream is required");
			goto done;
		}
		if ((strncmp(a->upstream, "http://", 7) != 0 ||
		     a->upstream[7] == '\0') &&
		    (strncmp(a->upstream, "https://", 8) != 0 ||
		     a->upstream[8] == '\0')) {
			snprintf(err, errlen,
			         "upstream must be an http:// "
			         "or https:// URL");
			goto done;
		}
		if (a->model != NULL && a->model[0] == '\0') {
			snprintf(err, errlen, "model must not be empty");
			goto done;
		}
	}
	rc = 0;
done:
	cJSON_Delete(root);
	return (rc);
}

void
storage_text_bot_args_free(struct storage_bot_args *a)
{
	free(a->id);
	free(a->upstream);
	free(a->model);
	free(a->system_prompt);
	memset(a, 0, sizeof(*a));
}

/* Plugins. */

int
storage_text_plugin_name_ok(const char *p, size_t n)
{
	size_t i;

	if (n == 0 || n > STORAGE_PLUGIN_NAME_MAX)
		return (0);
	for (i = 0; i < n; i++)
		if (!((p[i] >= '0' && p[i] <= '9') ||
		      (p[i] >= 'a' && p[i] <= 'z') ||
		      (p[i] >= 'A' && p[i] <= 'Z') || p[i] == '_' ||
		      p[i] == '-'))
			return (0);
	return (1);
}

/* Line and column (from 1) of byte off of s. */
static void
text_line_col(const char *s, size_t off, size_t *line, size_t *col)
{
	size_t i;

	*line = *col = 1;
	for (i = 0; i < off && s[i] != '\0'; i++) {
		if (s[i] == '\n') {
			(*line)++;
			*col = 1;
		} else
			(*col)++;
	}
}

int
storage_text_plugin_schema(const char *s, char *err, size_t errlen)
{
	const cJSON *it;
	const char *end = NULL;
	cJSON *root;
	size_t n = strlen(s), line, col;
	int rc = -1;

	if (n > STORAGE_PLUGIN_PARAMS_MAX) {
		snprintf(err, errlen,
		         "parameters: the schema is %zu bytes, more than %d",
		         n, STORAGE_PLUGIN_PARAMS_MAX);
		return (-1);
	}
	if ((root = cJSON_ParseWithOpts(s, &end, 1)) == NULL) {
		if (end == NULL || end < s || end > s + n)
			end = s + n;
		text_line_col(s, (size_t)(end - s), &line, &col);
		snprintf(
		        err, errlen,
		        "parameters: not valid JSON (at line %zu, column %zu)",
		        line, col);
		return (-1);
	}
	if (!cJSON_IsObject(root)) {
		snprintf(err, errlen,
		         "parameters: the schema must be a JSON object, such "
		         "as {\"type\":\"object\",\"properties\":{...}}");
		goto out;
	}
	it = cJSON_GetObjectItemCaseSensitive(root, "type");
	if (it != NULL &&
	    (!cJSON_IsString(it) || strcmp(it->valuestring, "object") != 0)) {
		snprintf(err, errlen,
		         "parameters: \"type\" must be \"object\" (function "
		         "arguments are an object)");
		goto out;
	}
	it = cJSON_GetObjectItemCaseSensitive(root, "properties");
	if (it != NULL && !cJSON_IsObject(it)) {
		snprintf(err, errlen,
		         "parameters: \"properties\" must be an object");
		goto out;
	}
	it = cJSON_GetObjectItemCaseSensitive(root, "required");
	if (it != NULL) {
		const cJSON *e;

		if (!cJSON_IsArray(it)) {
			snprintf(err, errlen,
			         "parameters: \"required\" must be an array "
			         "of property names");
			goto out;
		}
		cJSON_ArrayForEach(e, it)
		{
			if (!cJSON_IsString(e)) {
				snprintf(err, errlen,
				         "parameters: \"required\" must be "
				         "an array of property names");
				goto out;
			}
		}
	}
	rc = 0;
out:
	cJSON_Delete(root);
	return (rc);
}

/* Whether s (NUL-terminated) holds only bytes in [lo, 0x7e]. */
static int
text_ascii(const char *s, unsigned char lo)
{
	for (; *s != '\0'; s++)
		if ((unsigned char)*s < lo || (unsigned char)*s > 0x7e)
			return (0);
	return (1);
}

/* An RFC 9110 token (a header name). */
static int
text_token(const char *s)
{
	if (*s == '\0')
		return (0);
	for (; *s != '\0'; s++)
		if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') ||
		      (*s >= 'A' && *s <= 'Z') ||
		      strchr("!#$%&'*+-.^_`|~", *s) != NULL))
			return (0);
	return (1);
}

int
storage_text_plugin_args(const char *json, size_t n, enum storage_plugin_op op,
                         struct storage_plugin_args *a, char *err,
                         size_t errlen)
{
	cJSON *root, *it;
	const char *end = NULL;
	int rc = -1;

	memset(a, 0, sizeof(*a));
	a->timeout_ms = -1;
	if (errlen > 0)
		err[0] = '\0';
	root = strlen(json) == n ? cJSON_ParseWithOpts(json, &end, 1) : NULL;
	if (root == NULL || !cJSON_IsObject(root)) {
		snprintf(err, errlen, "args must be a JSON object");
		goto done;
	}
	cJSON_ArrayForEach(it, root)
	{
		const char *k = it->string ? it->string : "";
		char **dst = NULL;
		size_t max = 0;

		if (strcmp(k, "bot_id") == 0) {
			dst = &a->bot_id;
			max = STORAGE_BOT_ID_MAX;
		} else if (strcmp(k, "name") == 0 &&
		           op != STORAGE_PLUGIN_LIST) {
			dst = &a->name;
			max = STORAGE_PLUGIN_NAME_MAX;
		} else if (op != STORAGE_PLUGIN_ADD) {
			snprintf(err, errlen, "unknown field \"%.64s\"", k);
			goto done;
		} else if (strcmp(k, "url") == 0) {
			dst = &a->url;
			max = STORAGE_PLUGIN_URL_MAX;
		} else if (strcmp(k, "description") == 0) {
			dst = &a->description;
			max = STORAGE_PLUGIN_DESC_MAX;
		} else if (strcmp(k, "auth") == 0) {
			dst = &a->auth;
			max = 16;
		} else if (strcmp(k, "header") == 0) {
			dst = &a->header;
			max = STORAGE_PLUGIN_HEADER_MAX;
		} else if (strcmp(k, "secret") == 0) {
			dst = &a->secret;
			max = STORAGE_PLUGIN_SECRET_MAX;
		} else if (strcmp(k, "parameters") == 0) {
			if (a->parameters != NULL)
				goto dup;
			/* JSON text (as troupectl sends it), or the
			 * object itself. */
			if (cJSON_IsString(it)) {
				if (args_str(it, k, STORAGE_PLUGIN_PARAMS_MAX,
				             &a->parameters, err,
				             errlen) == -1)
					goto done;
			} else if (cJSON_IsObject(it)) {
				char *t = cJSON_PrintUnformatted(it);

				if (t != NULL)
					a->parameters = strdup(t);
				cJSON_free(t);
				if (a->parameters == NULL) {
					snprintf(err, errlen, "out of memory");
					goto done;
				}
			} else {
				snprintf(err, errlen,
				         "parameters must be a JSON Schema "
				         "object (or a string holding one)");
				goto done;
			}
			continue;
		} else if (strcmp(k, "timeout_ms") == 0) {
			if (a->timeout_ms != -1)
				goto dup;
			if (args_int(it, k, 1, STORAGE_PLUGIN_TIMEOUT_MAX,
			             &a->timeout_ms, err, errlen) == -1)
				goto done;
			continue;
		} else {
			snprintf(err, errlen, "unknown field \"%.64s\"", k);
			goto done;
		}
		if (*dst != NULL)
			goto dup;
		if (args_str(it, k, max, dst, err, errlen) == -1)
			goto done;
		continue;
	dup:
		snprintf(err, errlen, "field \"%.64s\" given twice", k);
		goto done;
	}
	if (a->bot_id == NULL || a->bot_id[0] == '\0') {
		snprintf(err, errlen, "bot_id is required");
		goto done;
	}
	if (!storage_text_bot_id_ok(a->bot_id, strlen(a->bot_id))) {
		snprintf(err, errlen,
		         "bot_id must be 1..%d printable ASCII characters "
		         "without ':' or spaces",
		         STORAGE_BOT_ID_MAX);
		goto done;
	}
	if (op == STORAGE_PLUGIN_LIST) {
		rc = 0;
		goto done;
	}
	if (a->name == NULL) {
		snprintf(err, errlen, "name is required");
		goto done;
	}
	if (!storage_text_plugin_name_ok(a->name, strlen(a->name))) {
		snprintf(err, errlen,
		         "name must be 1..%d letters, digits, _ or - (an "
		         "OpenAI function name), got \"%.64s\"",
		         STORAGE_PLUGIN_NAME_MAX, a->name);
		goto done;
	}
	if (op == STORAGE_PLUGIN_RM) {
		rc = 0;
		goto done;
	}
	if (a->url == NULL) {
		snprintf(err, errlen, "url is required");
		goto done;
	}
	if (((strncmp(a->url, "http://", 7) != 0 || a->url[7] == '\0') &&
	     (strncmp(a->url, "https://", 8) != 0 || a->url[8] == '\0')) ||
	    !text_ascii(a->url, 0x21)) {
		snprintf(err, errlen,
		         "url must be an http:// or https:// URL without "
		         "spaces");
		goto done;
	}
	if (a->description == NULL && (a->description = strdup("")) == NULL)
		goto oom;
	if (a->parameters == NULL &&
	    (a->parameters = strdup(STORAGE_PLUGIN_PARAMS_DEFAULT)) == NULL)
		goto oom;
	if (storage_text_plugin_schema(a->parameters, err, errlen) == -1)
		goto done;
	if (a->auth == NULL && (a->auth = strdup("none")) == NULL)
		goto oom;
	if (strcmp(a->auth, "none") != 0 && strcmp(a->auth, "token") != 0 &&
	    strcmp(a->auth, "hmac") != 0) {
		snprintf(err, errlen,
		         "auth must be none, token or hmac, got \"%.16s\"",
		         a->auth);
		goto done;
	}
	if (strcmp(a->auth, "none") == 0) {
		if (a->secret != NULL) {
			snprintf(err, errlen,
			         "secret is only for auth token or hmac");
			goto done;
		}
	} else if (a->secret == NULL || a->secret[0] == '\0') {
		snprintf(err, errlen, "auth %s needs a secret", a->auth);
		goto done;
	} else if (!text_ascii(a->secret, 0x20)) {
		snprintf(err, errlen,
		         "secret must be printable ASCII (no control "
		         "characters)");
		goto done;
	}
	if (a->header != NULL) {
		if (strcmp(a->auth, "token") != 0) {
			snprintf(err, errlen,
			         "header is only for auth token (hmac uses "
			         "X-Troupe-Timestamp and X-Troupe-Signature)");
			goto done;
		}
		if (!text_token(a->header)) {
			snprintf(err, errlen,
			         "header must be an HTTP header name");
			goto done;
		}
	} else if ((a->header = strdup(STORAGE_PLUGIN_HEADER_DEFAULT)) == NULL)
		goto oom;
	if (a->timeout_ms == -1)
		a->timeout_ms = STORAGE_PLUGIN_TIMEOUT_DEFAULT;
	rc = 0;
	goto done;
oom:
	snprintf(err, errlen, "out of memory");
done:
	cJSON_Delete(root);
	return (rc);
}

void
storage_text_plugin_args_free(struct storage_plugin_args *a)
{
	free(a->bot_id);
	free(a->name);
	free(a->url);
	free(a->description);
	free(a->parameters);
	free(a->auth);
	free(a->header);
	free(a->secret);
	memset(a, 0, sizeof(*a));
}

int
storage_text_sqlstate_transient(const char *s)
{
	if (s == NULL || strlen(s) != 5)
		return (1); /* no SQLSTATE: a client-side failure */
	/* 08 connection, 40 rollback (serialization, deadlock), 53
	 * resources, 55 object in use (lock timeout), 57 operator
	 * intervention (shutdown, statement timeout), 58 system, XX
	 * internal. */
	return (strncmp(s, "08", 2) == 0 || strncmp(s, "40", 2) == 0 ||
	        strncmp(s, "53", 2) == 0 || strncmp(s, "55", 2) == 0 ||
	        strncmp(s, "57", 2) == 0 || strncmp(s, "58", 2) == 0 ||
	        strncmp(s, "XX", 2) == 0);
}

char *
storage_text_oneline(char *s)
{
	char *r = s, *w = s;
	size_t n, k;

	while (*r != '\0') {
		n = strspn(r, " \t\r\n");
		if (n == 0) {
			*w++ = *r++;
			continue;
		}
		for (k = 0; k < n && r[k] != '\n' && r[k] != '\r'; k++)
			;
		if (k == n) {
			/* No line break: keep the run as it is. */
			memmove(w, r, n);
			w += n;
		} else if (w != s && r[n] != '\0')
			*w++ = ' ';
		r += n;
	}
	/* Trailing blanks, e.g. before a final newline, go too. */
	while (w != s && (w[-1] == ' ' || w[-1] == '\t'))
		w--;
	*w = '\0';
	return (s);
}
