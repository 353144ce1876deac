/* SPDX-License-Identifier: ISC */
/*
 * Unit tests of services/worker/worker_plugin.c: reading storage's
 * plugins JSON (what is kept, what is left out), the model's tools
 * array, the arguments check, and the auth headers (the HMAC against an
 * independent computation and a fixed vector).
 */
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "t.h"
#include "worker_plugin.h"

static void
t_parse(void)
{
	static const char json[] =
	        "[{\"name\":\"weather\",\"url\":\"http://127.0.0.1:1/w\","
	        "\"description\":\"the weather\",\"parameters\":{\"type\":"
	        "\"object\",\"properties\":{\"city\":{\"type\":\"string\"}}},"
	        "\"auth\":\"none\",\"header\":\"\",\"secret\":\"\","
	        "\"timeout_ms\":1500},"
	        "{\"name\":\"tok\",\"url\":\"https://127.0.0.1:1/t\","
	        "\"auth\":\"token\",\"header\":\"X-Key\",\"secret\":\"s\"},"
	        "{\"name\":\"mac\",\"url\":\"http://127.0.0.1:1/m\","
	        "\"parameters\":\"{\\\"type\\\":\\\"object\\\"}\","
	        "\"auth\":\"hmac\",\"secret\":\"k\",\"timeout_ms\":0},"
	        /* left out, one reason each: */
	        "{\"name\":\"weather\",\"url\":\"http://127.0.0.1:1/dup\"},"
	        "{\"name\":\"bad name\",\"url\":\"http://127.0.0.1:1/\"},"
	        "{\"name\":\"ftp\",\"url\":\"ftp://127.0.0.1/\"},"
	        "{\"name\":\"nourl\"},"
	        "{\"name\":\"odd\",\"url\":\"http://127.0.0.1/\","
	        "\"auth\":\"basic\",\"secret\":\"s\"},"
	        "{\"name\":\"nosecret\",\"url\":\"http://127.0.0.1/\","
	        "\"auth\":\"token\"},"
	        "{\"name\":\"crlf\",\"url\":\"http://127.0.0.1/\","
	        "\"auth\":\"token\",\"secret\":\"a\\r\\nX: y\"},"
	        "{\"name\":\"badhdr\",\"url\":\"http://127.0.0.1/\","
	        "\"auth\":\"token\",\"header\":\"X Key\",\"secret\":\"s\"},"
	        "42]";
	struct plugins p = {0};
	const struct plugin *pl;
	size_t skipped = 99;
	cJSON *j, *f;

	T_EQ_INT(worker_plugin_parse(&p, MSTR(json), 5000, &skipped), 0);
	T_EQ_INT(p.n, 3);
	T_EQ_INT(skipped, 9);
	pl = worker_plugin_find(&p, "weather", 7);
	T_ASSERT(pl != NULL);
	T_EQ_STR(pl->url, "http://127.0.0.1:1/w");
	T_EQ_INT(pl->auth, PLUGIN_AUTH_NONE);
	T_EQ_INT(pl->timeout_ms, 1500);
	pl = worker_plugin_find(&p, "tok", 3);
	T_EQ_INT(pl->auth, PLUGIN_AUTH_TOKEN);
	T_EQ_STR(pl->header, "X-Key");
	T_EQ_STR(pl->secret, "s");
	T_EQ_INT(pl->timeout_ms, 5000); /* none given: the default */
	pl = worker_plugin_find(&p, "mac", 3);
	T_EQ_INT(pl->auth, PLUGIN_AUTH_HMAC);
	T_EQ_INT(pl->timeout_ms, 5000); /* 0: the default */
	T_ASSERT(worker_plugin_find(&p, "weathe", 6) == NULL);

	/* The tools: OpenAI function tools, in order. */
	T_ASSERT(p.tools.len > 0);
	(void)buf_add(&p.tools, "", 1);
	j = cJSON_Parse(p.tools.b);
	T_ASSERT(cJSON_IsArray(j));
	T_EQ_INT(cJSON_GetArraySize(j), 3);
	f = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(j, 0),
	                                     "function");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(j, 0),
	                                          "type")
	                 ->valuestring,
	         "function");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(f, "name")->valuestring,
	         "weather");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(f, "description")
	                 ->valuestring,
	         "the weather");
	T_ASSERT(cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(
	        cJSON_GetObjectItemCaseSensitive(f, "parameters"),
	        "properties")));
	/* No description: none rendered; no parameters: an empty object
	 * schema; a string holding the schema: parsed. */
	f = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(j, 1),
	                                     "function");
	T_ASSERT(cJSON_GetObjectItemCaseSensitive(f, "description") == NULL);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(
	                 cJSON_GetObjectItemCaseSensitive(f, "parameters"),
	                 "type")
	                 ->valuestring,
	         "object");
	f = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(j, 2),
	                                     "function");
	T_ASSERT(cJSON_IsObject(
	        cJSON_GetObjectItemCaseSensitive(f, "parameters")));
	/* The secret never reaches the model. */
	T_ASSERT(strstr(p.tools.b, "\"s\"") == NULL);
	T_ASSERT(strstr(p.tools.b, "secret") == NULL);
	cJSON_Delete(j);
	worker_plugin_free(&p);

	/* None, and not an array. */
	T_EQ_INT(worker_plugin_parse(&p, MSTR_NULL, 5000, &skipped), 0);
	T_EQ_INT(p.n, 0);
	T_EQ_INT(p.tools.len, 0);
	T_EQ_INT(skipped, 0);
	T_EQ_INT(worker_plugin_parse(&p, MSTR("[]"), 5000, &skipped), 0);
	T_EQ_INT(p.n, 0);
	T_EQ_INT(p.tools.len, 0);
	worker_plugin_free(&p);
	T_EQ_INT(worker_plugin_parse(&p, MSTR("{\"name\":1}"), 5000, &skipped),
	         0);
	T_EQ_INT(p.n, 0);
	T_EQ_INT(skipped, 1);
	worker_plugin_free(&p);
	T_EQ_INT(worker_plugin_parse(&p, MSTR("null"), 5000, &skipped), 0);
	T_EQ_INT(p.n, 0);
	T_EQ_INT(skipped, 0);
	worker_plugin_free(&p);
}

static void
t_args(void)
{
	T_ASSERT(worker_plugin_args_ok("{}", 2));
	T_ASSERT(worker_plugin_args_ok(" {\"a\":[1,2]} ", 13));
	T_ASSERT(worker_plugin_args_ok("", 0));
	T_ASSERT(worker_plugin_args_ok("  \n", 3));
	T_ASSERT(!worker_plugin_args_ok("{\"a\":", 5));
	T_ASSERT(!worker_plugin_args_ok("[1]", 3));
	T_ASSERT(!worker_plugin_args_ok("\"x\"", 3));
	T_ASSERT(!worker_plugin_args_ok("{} {}", 5));
	T_ASSERT(!worker_plugin_args_ok("null", 4));
}

static void
t_sign(void)
{
	char sig[65], want[65];
	unsigned char mac[32];
	unsigned int len = 0;
	static const char hexd[] = "0123456789abcdef";
	static const char msg[] = "1763790000.{\"city\":\"Paris\"}";

	T_EQ_INT(worker_plugin_sign("k3y", 1763790000, "{\"city\":\"Paris\"}",
	                            16, sig),
	         0);
	HMAC(EVP_sha256(), "k3y", 3, (const unsigned char *)msg,
	     sizeof(msg) - 1, mac, &len);
	T_EQ_INT(len, 32);
	for (int i = 0; i < 32; i++) {
		want[2 * i] = hexd[mac[i] >> 4];
		want[2 * i + 1] = hexd[mac[i] & 15];
	}
	want[64] = '\0';
	T_EQ_STR(sig, want);
	/* A fixed vector (python3: hmac.new(b"key", b"0.", sha256)). */
	T_EQ_INT(worker_plugin_sign("key", 0, "", 0, sig), 0);
	T_EQ_STR(sig, "85841b4efc3cd7776c3c8f9b7cca9e281c550e5d19889d78e9e669"
	              "c6337f000d");
}

static void
t_headers(void)
{
	struct plugin pl = {.name = "p",
	                    .url = "http://127.0.0.1/",
	                    .header = "Authorization",
	                    .secret = "s3cr3t",
	                    .auth = PLUGIN_AUTH_NONE};
	const char *lines[2] = {NULL, NULL};
	struct buf b = {0};
	char sig[65], want[128];

	T_EQ_INT(worker_plugin_headers(&pl, "{}", 2, 1, &b, lines), 0);
	pl.auth = PLUGIN_AUTH_TOKEN;
	T_EQ_INT(worker_plugin_headers(&pl, "{}", 2, 1, &b, lines), 1);
	T_EQ_STR(lines[0], "Authorization: Bearer s3cr3t");
	pl.header = "X-Api-Key";
	T_EQ_INT(worker_plugin_headers(&pl, "{}", 2, 1, &b, lines), 1);
	T_EQ_STR(lines[0], "X-Api-Key: Bearer s3cr3t");
	pl.auth = PLUGIN_AUTH_HMAC;
	T_EQ_INT(worker_plugin_headers(&pl, "{\"a\":1}", 7, 1763790000, &b,
	                               lines),
	         2);
	T_EQ_STR(lines[0], "X-Troupe-Timestamp: 1763790000");
	T_EQ_INT(worker_plugin_sign("s3cr3t", 1763790000, "{\"a\":1}", 7, sig),
	         0);
	snprintf(want, sizeof(want), "X-Troupe-Signature: sha256=%s", sig);
	T_EQ_STR(lines[1], want);
	buf_free(&b);
}

T_TESTS = {
        {"parse", t_parse},     {"args", t_args}, {"sign", t_sign},
        {"headers", t_headers}, {NULL, NULL},
};
T_MAIN
