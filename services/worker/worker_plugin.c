/* SPDX-License-Identifier: ISC */
/*
 * worker_plugin: a bot's plugins, from storage's JSON to the model's
 * tools and the headers of a plugin call (docs/services/worker.md, "Tool
 * calls").  The JSON comes from storage (troupectl plugin add), so it is
 * checked again here: a plugin the worker cannot call safely is left out
 * rather than called without its auth.  Pure: no I/O, no logs.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "worker_plugin.h"

#define PLUGIN_URL_MAX 2048
#define PLUGIN_HEADER_MAX 128
#define PLUGIN_SECRET_MAX 4096

static int
name_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > PLUGIN_NAME_MAX)
		return (0);
	for (size_t i = 0; i < n; i++) {
		char c = s[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '_' || c == '-'))
			return (0);
	}
	return (1);
}

static int
url_ok(const char *s)
{
	size_t n = strlen(s), skip;

	if (strncasecmp(s, "http://", 7) == 0)
		skip = 7;
	else if (strncasecmp(s, "https://", 8) == 0)
		skip = 8;
	else
		return (0);
	if (n == skip || n > PLUGIN_URL_MAX)
		return (0);
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] <= ' ' || s[i] == 0x7f)
			return (0);
	return (1);
}

/* An HTTP field name (RFC 9110 token). */
static int
header_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > PLUGIN_HEADER_MAX)
		return (0);
	for (size_t i = 0; i < n; i++)
		if (strchr("!#$%&'*+-.^_`|~", s[i]) == NULL &&
		    !((s[i] >= 'a' && s[i] <= 'z') ||
		      (s[i] >= 'A' && s[i] <= 'Z') ||
		      (s[i] >= '0' && s[i] <= '9')))
			return (0);
	return (1);
}

/* A secret goes into a header line (token) or a MAC key (hmac): no
 * control characters either way. */
static int
secret_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > PLUGIN_SECRET_MAX)
		return (0);
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < ' ' || s[i] == 0x7f)
			return (0);
	return (1);
}

static const char *
str_of(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

	return (cJSON_IsString(v) ? v->valuestring : NULL);
}

static void
plugin_clear(struct plugin *pl)
{
	free(pl->name);
	free(pl->url);
	free(pl->header);
	free(pl->secret);
	memset(pl, 0, sizeof(*pl));
}

void
worker_plugin_free(struct plugins *p)
{
	for (size_t i = 0; i < p->n; i++)
		plugin_clear(&p->v[i]);
	free(p->v);
	buf_free(&p->tools);
	memset(p, 0, sizeof(*p));
}

const struct plugin *
worker_plugin_find(const struct plugins *p, const char *name, size_t n)
{
	for (size_t i = 0; i < p->n; i++)
		if (strlen(p->v[i].name) == n &&
		    memcmp(p->v[i].name, name, n) == 0)
			return (&p->v[i]);
	return (NULL);
}

static char *
dup_or_null(const char *s)
{
	return (s ? strdup(s) : NULL);
}

/* One entry: 1 taken, 0 left out, -1 ENOMEM. */
static int
plugin_one(struct plugins *p, const cJSON *e, int64_t def_timeout)
{
	const char *name = str_of(e, "name"), *url = str_of(e, "url");
	const char *auth = str_of(e, "auth"), *header = str_of(e, "header");
	const char *secret = str_of(e, "secret"), *desc;
	const cJSON *params, *to;
	struct plugin pl = {0};
	char *ptext = NULL;
	cJSON *parsed = NULL;
	int rc = -1;

	if (!cJSON_IsObject(e) || name == NULL || !name_ok(name) ||
	    url == NULL || !url_ok(url) ||
	    worker_plugin_find(p, name, strlen(name)) != NULL)
		return (0);
	if (auth == NULL || auth[0] == '\0' || strcmp(auth, "none") == 0)
		pl.auth = PLUGIN_AUTH_NONE;
	else if (strcmp(auth, "token") == 0)
		pl.auth = PLUGIN_AUTH_TOKEN;
	else if (strcmp(auth, "hmac") == 0)
		pl.auth = PLUGIN_AUTH_HMAC;
	else
		return (0);
	if (header == NULL || header[0] == '\0')
		header = "Authorization";
	if (pl.auth != PLUGIN_AUTH_NONE &&
	    (secret == NULL || !secret_ok(secret) || !header_ok(header)))
		return (0);
	to = cJSON_GetObjectItemCaseSensitive(e, "timeout_ms");
	pl.timeout_ms = def_timeout;
	if (cJSON_IsNumber(to) && to->valuedouble >= 1)
		pl.timeout_ms = to->valuedouble > 86400000.0
		                        ? 86400000
		                        : (int64_t)to->valuedouble;

	/* parameters: an object, or a string holding one; else none. */
	params = cJSON_GetObjectItemCaseSensitive(e, "parameters");
	if (cJSON_IsString(params)) {
		parsed = cJSON_Parse(params->valuestring);
		params = parsed;
	}
	if (cJSON_IsObject(params)) {
		if ((ptext = cJSON_PrintUnformatted(params)) == NULL)
			goto done;
	} else if ((ptext = strdup("{\"type\":\"object\","
	                           "\"properties\":{}}")) == NULL)
		goto done;
	desc = str_of(e, "description");
	if ((p->tools.len == 0 ? buf_adds(&p->tools, "[")
	                       : buf_adds(&p->tools, ",")) == -1 ||
	    buf_adds(&p->tools, "{\"type\":\"function\",\"function\":"
	                        "{\"name\":") == -1 ||
	    buf_add_json_str(&p->tools, name, strlen(name)) == -1 ||
	    (desc != NULL && desc[0] != '\0' &&
	     (buf_adds(&p->tools, ",\"description\":") == -1 ||
	      buf_add_json_str(&p->tools, desc, strlen(desc)) == -1)) ||
	    buf_adds(&p->tools, ",\"parameters\":") == -1 ||
	    buf_adds(&p->tools, ptext) == -1 ||
	    buf_adds(&p->tools, "}}") == -1)
		goto done;
	if ((pl.name = strdup(name)) == NULL ||
	    (pl.url = strdup(url)) == NULL ||
	    (pl.header = strdup(header)) == NULL ||
	    (secret != NULL && (pl.secret = dup_or_null(secret)) == NULL))
		goto done;
	p->v[p->n++] = pl;
	memset(&pl, 0, sizeof(pl));
	rc = 1;
done:
	plugin_clear(&pl);
	cJSON_Delete(parsed);
	cJSON_free(ptext);
	return (rc);
}

int
worker_plugin_parse(struct plugins *p, struct mstr json,
                    int64_t default_timeout_ms, size_t *skipped)
{
	const cJSON *e;
	cJSON *root;
	char *text;
	size_t n;
	int rc;

	*skipped = 0;
	if (json.n == 0)
		return (0);
	if ((text = mstr_dup(json)) == NULL)
		return (-1);
	root = cJSON_Parse(text);
	free(text);
	if (!cJSON_IsArray(root)) {
		/* Not usable at all (null is none): the run goes on without
		 * plugins. */
		*skipped = cJSON_IsNull(root) ? 0 : 1;
		cJSON_Delete(root);
		return (0);
	}
	if ((n = (size_t)cJSON_GetArraySize(root)) > PLUGIN_MAX)
		n = PLUGIN_MAX;
	if (n == 0) {
		cJSON_Delete(root);
		return (0);
	}
	if ((p->v = calloc(n, sizeof(*p->v))) == NULL) {
		cJSON_Delete(root);
		return (-1);
	}
	cJSON_ArrayForEach(e, root)
	{
		if (p->n == n) {
			(*skipped)++;
			continue;
		}
		if ((rc = plugin_one(p, e, default_timeout_ms)) == -1) {
			cJSON_Delete(root);
			worker_plugin_free(p);
			return (-1);
		}
		if (rc == 0)
			(*skipped)++;
	}
	cJSON_Delete(root);
	if (p->tools.len > 0 && buf_adds(&p->tools, "]") == -1) {
		worker_plugin_free(p);
		return (-1);
	}
	return (0);
}

int
worker_plugin_args_ok(const char *args, size_t n)
{
	cJSON *j;
	char *text;
	int ok;

	while (n > 0 && (*args == ' ' || *args == '\t' || *args == '\n' ||
	                 *args == '\r')) {
		args++;
		n--;
	}
	if (n == 0)
		return (1);
	if ((text = malloc(n + 1)) == NULL)
		return (0);
	memcpy(text, args, n);
	text[n] = '\0';
	j = cJSON_ParseWithOpts(text, NULL, 1);
	ok = cJSON_IsObject(j);
	cJSON_Delete(j);
	free(text);
	return (ok);
}

int
worker_plugin_sign(const char *secret, uint64_t ts, const char *body, size_t n,
                   char out[65])
{
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	struct buf msg = {0};
	int rc = -1;

	if (buf_addf(&msg, "%" PRIu64 ".", ts) == -1 ||
	    (n > 0 && buf_add(&msg, body, n) == -1))
		goto done;
	if (HMAC(EVP_sha256(), secret, (int)strlen(secret),
	         (const unsigned char *)msg.b, msg.len, mac,
	         &maclen) == NULL ||
	    maclen != 32)
		goto done;
	hex_encode(out, mac, 32);
	out[64] = '\0';
	rc = 0;
done:
	buf_free(&msg);
	return (rc);
}

int
worker_plugin_headers(const struct plugin *pl, const char *body, size_t n,
                      uint64_t now_s, struct buf *out, const char *lines[2])
{
	char sig[65];
	size_t second;

	buf_reset(out);
	switch (pl->auth) {
	case PLUGIN_AUTH_NONE:
		return (0);
	case PLUGIN_AUTH_TOKEN:
		if (buf_addf(out, "%s: Bearer %s", pl->header, pl->secret) ==
		            -1 ||
		    buf_add(out, "", 1) == -1)
			return (-1);
		lines[0] = out->b;
		return (1);
	case PLUGIN_AUTH_HMAC:
		if (worker_plugin_sign(pl->secret, now_s, body, n, sig) ==
		            -1 ||
		    buf_addf(out, "X-Troupe-Timestamp: %" PRIu64, now_s) ==
		            -1 ||
		    buf_add(out, "", 1) == -1)
			return (-1);
		second = out->len;
		if (buf_addf(out, "X-Troupe-Signature: sha256=%s", sig) ==
		            -1 ||
		    buf_add(out, "", 1) == -1)
			return (-1);
		lines[0] = out->b;
		lines[1] = out->b + second;
		return (2);
	}
	return (-1);
}
