/* SPDX-License-Identifier: ISC */
/*
 * Tests of services/storage/storage_text.c: the [storage] redis address,
 * PostgreSQL array literals of the group commit, message JSON and the
 * comma-joined context (with the "known" marker skipped), context keys,
 * UTF-8 and bot id checks, bot.add/bot.rm arguments, plugin.* arguments
 * and the plugin's JSON Schema checks, SQLSTATE classes.
 */
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "storage_text.h"
#include "t.h"

static void
t_redis_addr_tcp(void)
{
	struct storage_redis_addr a;
	char err[128];

	T_EQ_INT(storage_text_redis_addr("127.0.0.1:6379", &a, err,
	                                 sizeof(err)),
	         0);
	T_EQ_INT(a.is_unix, 0);
	T_EQ_STR(a.host, "127.0.0.1");
	T_EQ_INT(a.port, 6379);
	T_EQ_INT(storage_text_redis_addr("redis://10.1.2.3:7000", &a, err,
	                                 sizeof(err)),
	         0);
	T_EQ_STR(a.host, "10.1.2.3");
	T_EQ_INT(a.port, 7000);
	T_EQ_INT(storage_text_redis_addr("[::1]:6380", &a, err, sizeof(err)),
	         0);
	T_EQ_STR(a.host, "::1");
	T_EQ_INT(a.port, 6380);
	T_EQ_INT(storage_text_redis_addr("localhost:6379", &a, err,
	                                 sizeof(err)),
	         0);
	T_EQ_STR(a.host, "127.0.0.1");
}

static void
t_redis_addr_unix(void)
{
	struct storage_redis_addr a;
	char err[128];

	T_EQ_INT(storage_text_redis_addr("unix:/run/redis/redis.sock", &a, err,
	                                 sizeof(err)),
	         0);
	T_EQ_INT(a.is_unix, 1);
	T_EQ_STR(a.path, "/run/redis/redis.sock");
	T_EQ_INT(storage_text_redis_addr("/tmp/r.sock", &a, err, sizeof(err)),
	         0);
	T_EQ_INT(a.is_unix, 1);
	T_EQ_STR(a.path, "/tmp/r.sock");
}

static void
t_redis_addr_bad(void)
{
	static const char *bad[] = {"",
	                            "127.0.0.1",
	                            "127.0.0.1:",
	                            "127.0.0.1:0",
	                            "127.0.0.1:65536",
	                            "127.0.0.1:12x",
	                            "redis.example:6379",
	                            "unix:",
	                            "unix:relative.sock",
	                            ":6379",
	                            "[::1:6379",
	                            NULL};
	struct storage_redis_addr a;
	char err[128];
	int i;

	for (i = 0; bad[i] != NULL; i++) {
		err[0] = '\0';
		if (storage_text_redis_addr(bad[i], &a, err, sizeof(err)) !=
		    -1)
			T_FAIL("\"%s\": got 0, want -1", bad[i]);
		if (err[0] == '\0')
			T_FAIL("\"%s\": no error text", bad[i]);
	}
}

static void
t_pg_array(void)
{
	struct buf b = {0};

	T_EQ_INT(storage_text_pg_array_begin(&b), 0);
	T_EQ_INT(storage_text_pg_array_end(&b), 0);
	T_EQ_STR(b.b, "{}");

	T_EQ_INT(storage_text_pg_array_begin(&b), 0);
	storage_text_pg_array_str(&b, "plain", 5);
	storage_text_pg_array_str(&b, "", 0);
	storage_text_pg_array_str(&b, "q\"uote", 6);
	storage_text_pg_array_str(&b, "back\\slash", 10);
	storage_text_pg_array_str(&b, "a,b {c} NULL", 12);
	storage_text_pg_array_str(&b, "\xe4\xbd\xa0\xe5\xa5\xbd\n", 7);
	T_EQ_INT(storage_text_pg_array_end(&b), 0);
	T_EQ_STR(b.b, "{\"plain\",\"\",\"q\\\"uote\",\"back\\\\slash\","
	              "\"a,b {c} NULL\",\"\xe4\xbd\xa0\xe5\xa5\xbd\n\"}");
	T_EQ_INT(b.len, strlen(b.b));

	/* begin empties what was there. */
	T_EQ_INT(storage_text_pg_array_begin(&b), 0);
	storage_text_pg_array_int(&b, 0);
	storage_text_pg_array_int(&b, 2147483647);
	storage_text_pg_array_int(&b, 12);
	storage_text_pg_array_end(&b);
	T_EQ_STR(b.b, "{0,2147483647,12}");
	buf_free(&b);
}

static void
t_msg_json(void)
{
	struct buf b = {0};
	cJSON *j;

	T_EQ_INT(storage_text_msg_json(&b, "user", "hi \"there\"\n\\", 12), 0);
	T_EQ_MEM(
	        b.b, b.len,
	        "{\"role\":\"user\",\"content\":\"hi \\\"there\\\"\\n\\\\\"}");
	/* And it parses back to the same content. */
	buf_add(&b, "", 1);
	j = cJSON_Parse(b.b);
	T_ASSERT(j != NULL);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(j, "content")->valuestring,
	         "hi \"there\"\n\\");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(j, "role")->valuestring,
	         "user");
	cJSON_Delete(j);
	buf_free(&b);
}

static void
t_ctx_join(void)
{
	struct mstr v[] = {MSTR_LIT(""), MSTR_LIT("{\"a\":1}"),
	                   MSTR_LIT("{\"b\":2}"), MSTR_LIT(""),
	                   MSTR_LIT("{\"c\":3}")};
	struct buf b = {0};

	T_EQ_INT(storage_text_ctx_join(&b, v, 5), 0);
	T_EQ_MEM(b.b, b.len, "{\"a\":1},{\"b\":2},{\"c\":3}");
	buf_reset(&b);
	/* Only the marker: a known, empty context. */
	T_EQ_INT(storage_text_ctx_join(&b, v, 1), 0);
	T_EQ_INT(b.len, 0);
	T_EQ_INT(storage_text_ctx_join(&b, v + 1, 1), 0);
	T_EQ_MEM(b.b, b.len, "{\"a\":1}");
	buf_free(&b);
}

static void
t_ctx_key(void)
{
	struct buf b = {0};

	T_EQ_INT(storage_text_ctx_key(&b, MSTR_LIT("bot-1"),
	                              MSTR_LIT("conv:7")),
	         0);
	T_EQ_MEM(b.b, b.len, "troupe:ctx:bot-1:conv:7");
	buf_free(&b);
}

static void
t_utf8(void)
{
	T_EQ_INT(storage_text_utf8_ok("", 0), 1);
	T_EQ_INT(storage_text_utf8_ok("plain ascii", 11), 1);
	T_EQ_INT(storage_text_utf8_ok("\xc3\xa9t\xc3\xa9", 5), 1);
	T_EQ_INT(storage_text_utf8_ok("\xf0\x9f\x98\x80", 4), 1); /* emoji */
	T_EQ_INT(storage_text_utf8_ok("a\0b", 3), 0);             /* NUL */
	T_EQ_INT(storage_text_utf8_ok("\xc3", 1), 0);             /* short */
	T_EQ_INT(storage_text_utf8_ok("\xc0\xaf", 2), 0);     /* overlong */
	T_EQ_INT(storage_text_utf8_ok("\xe0\x80\xaf", 3), 0); /* overlong */
	T_EQ_INT(storage_text_utf8_ok("\xed\xa0\x80", 3), 0); /* surrogate */
	T_EQ_INT(storage_text_utf8_ok("\xf4\x90\x80\x80", 4), 0); /* >10FFFF */
	T_EQ_INT(storage_text_utf8_ok("\xff", 1), 0);
	T_EQ_INT(storage_text_utf8_ok("\xe4\xbd\x41", 3), 0); /* bad cont. */
}

static void
t_bot_id(void)
{
	char long_id[130];

	T_EQ_INT(storage_text_bot_id_ok("7392a8b4-xxxx-4f2c", 18), 1);
	T_EQ_INT(storage_text_bot_id_ok("", 0), 0);
	T_EQ_INT(storage_text_bot_id_ok("a:b", 3), 0);
	T_EQ_INT(storage_text_bot_id_ok("a b", 3), 0);
	T_EQ_INT(storage_text_bot_id_ok("a\nb", 3), 0);
	T_EQ_INT(storage_text_bot_id_ok("\xc3\xa9", 2), 0);
	memset(long_id, 'x', sizeof(long_id));
	T_EQ_INT(storage_text_bot_id_ok(long_id, 128), 1);
	T_EQ_INT(storage_text_bot_id_ok(long_id, 129), 0);
}

static void
t_bot_args_nul(void)
{
	struct storage_bot_args a;
	char err[256];
	const char j[] = "{\"id\":\"b\"}\0{\"x\":1}";

	/* A NUL inside the args (the copy is terminated after it). */
	T_EQ_INT(storage_text_bot_args(j, sizeof(j) - 1, 0, &a, err,
	                               sizeof(err)),
	         -1);
	storage_text_bot_args_free(&a);
}

static int
args(const char *json, int full, struct storage_bot_args *a, char *err,
     size_t errlen)
{
	return (storage_text_bot_args(json, strlen(json), full, a, err,
	                              errlen));
}

static void
t_bot_args_ok(void)
{
	struct storage_bot_args a;
	char err[256];

	T_EQ_INT(args("{\"id\":\"b1\",\"upstream\":\"http://127.0.0.1:9\"}", 1,
	              &a, err, sizeof(err)),
	         0);
	T_EQ_STR(a.id, "b1");
	T_EQ_STR(a.upstream, "http://127.0.0.1:9");
	T_ASSERT(a.model == NULL && a.system_prompt == NULL);
	T_EQ_INT(a.context_turns, -1);
	T_EQ_INT(a.ttfe_ms, -1);
	storage_text_bot_args_free(&a);

	T_EQ_INT(
	        args("{\"id\":\"b2\",\"upstream\":\"https://x\",\"model\":"
	             "\"m\",\"system_prompt\":\"be nice\",\"context_turns\":0,"
	             "\"ttfe_ms\":1000,\"total_ms\":5000}",
	             1, &a, err, sizeof(err)),
	        0);
	T_EQ_STR(a.model, "m");
	T_EQ_STR(a.system_prompt, "be nice");
	T_EQ_INT(a.context_turns, 0);
	T_EQ_INT(a.ttfe_ms, 1000);
	T_EQ_INT(a.total_ms, 5000);
	storage_text_bot_args_free(&a);

	T_EQ_INT(args("{\"id\":\"b3\"}", 0, &a, err, sizeof(err)), 0);
	T_EQ_STR(a.id, "b3");
	storage_text_bot_args_free(&a);
}

static void
t_bot_args_bad(void)
{
	static const struct {
		const char *json;
		int full;
		const char *want; /* a substring of the error */
	} bad[] = {
	        {"", 1, "JSON object"},
	        {"[1]", 1, "JSON object"},
	        {"{\"id\":\"b\"", 1, "JSON object"},
	        {"{\"upstream\":\"http://x\"}", 1, "id is required"},
	        {"{\"id\":\"\",\"upstream\":\"http://x\"}", 1, "id"},
	        {"{\"id\":\"a:b\",\"upstream\":\"http://x\"}", 1, "id"},
	        {"{\"id\":7,\"upstream\":\"http://x\"}", 1, "string"},
	        {"{\"id\":\"b\"}", 1, "upstream is required"},
	        {"{\"id\":\"b\",\"upstream\":\"ftp://x\"}", 1, "http"},
	        {"{\"id\":\"b\",\"upstream\":\"http://\"}", 1, "http"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\","
	         "\"context_turns\":101}",
	         1, "0..100"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\","
	         "\"context_turns\":-1}",
	         1, "0..100"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\","
	         "\"context_turns\":1.5}",
	         1, "integer"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\","
	         "\"context_turns\":\"3\"}",
	         1, "integer"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\",\"model\":\"\"}", 1,
	         "model"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\",\"modle\":\"m\"}", 1,
	         "unknown field"},
	        {"{\"id\":\"b\",\"id\":\"c\",\"upstream\":\"http://x\"}", 1,
	         "twice"},
	        {"{\"id\":\"b\",\"upstream\":\"http://x\"}", 0,
	         "unknown field"},
	};
	struct storage_bot_args a;
	char err[256];
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		if (args(bad[i].json, bad[i].full, &a, err, sizeof(err)) != -1)
			T_FAIL("%s: got 0, want -1", bad[i].json);
		if (strstr(err, bad[i].want) == NULL)
			T_FAIL("%s: error \"%s\", want it to mention \"%s\"",
			       bad[i].json, err, bad[i].want);
		storage_text_bot_args_free(&a);
	}
}

static int
pargs(const char *json, enum storage_plugin_op op,
      struct storage_plugin_args *a, char *err, size_t errlen)
{
	return (storage_text_plugin_args(json, strlen(json), op, a, err,
	                                 errlen));
}

static void
t_plugin_name(void)
{
	T_EQ_INT(storage_text_plugin_name_ok("get_weather-2", 13), 1);
	T_EQ_INT(storage_text_plugin_name_ok("", 0), 0);
	T_EQ_INT(storage_text_plugin_name_ok("a.b", 3), 0);
	T_EQ_INT(storage_text_plugin_name_ok("a b", 3), 0);
	T_EQ_INT(storage_text_plugin_name_ok("\xc3\xa9t\xc3\xa9", 6), 0);
	T_EQ_INT(storage_text_plugin_name_ok("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	                                     "xxxxxxxxxxxxxxxxxxxxxx"
	                                     "xxxxxxxxxx",
	                                     64),
	         1);
	T_EQ_INT(storage_text_plugin_name_ok("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	                                     "xxxxxxxxxxxxxxxxxxxxxx"
	                                     "xxxxxxxxxxx",
	                                     65),
	         0);
}

static void
t_plugin_schema(void)
{
	char err[256];

	T_EQ_INT(storage_text_plugin_schema("{}", err, sizeof(err)), 0);
	T_EQ_INT(storage_text_plugin_schema(
	                 "{\"type\":\"object\",\"properties\":{\"q\":{"
	                 "\"type\":\"string\"}},\"required\":[\"q\"]}",
	                 err, sizeof(err)),
	         0);
	T_EQ_INT(storage_text_plugin_schema("{\n  \"a\": 1,\n  \"b\": }", err,
	                                    sizeof(err)),
	         -1);
	T_EQ_STR(err, "parameters: not valid JSON (at line 3, column 8)");
	T_EQ_INT(storage_text_plugin_schema("", err, sizeof(err)), -1);
	T_ASSERT(strstr(err, "not valid JSON") != NULL);
	T_EQ_INT(storage_text_plugin_schema("\"object\"", err, sizeof(err)),
	         -1);
	T_ASSERT(strstr(err, "must be a JSON object") != NULL);
	T_EQ_INT(storage_text_plugin_schema("{\"type\":\"array\"}", err,
	                                    sizeof(err)),
	         -1);
	T_ASSERT(strstr(err, "\"type\" must be \"object\"") != NULL);
	T_EQ_INT(storage_text_plugin_schema("{\"required\":[1]}", err,
	                                    sizeof(err)),
	         -1);
	T_ASSERT(strstr(err, "\"required\"") != NULL);
}

static void
t_plugin_args_ok(void)
{
	struct storage_plugin_args a;
	char err[256];

	T_EQ_INT(pargs("{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h/"
	               "p\"}",
	               STORAGE_PLUGIN_ADD, &a, err, sizeof(err)),
	         0);
	T_EQ_STR(a.bot_id, "b");
	T_EQ_STR(a.name, "w");
	T_EQ_STR(a.url, "http://h/p");
	T_EQ_STR(a.description, "");
	T_EQ_STR(a.parameters, STORAGE_PLUGIN_PARAMS_DEFAULT);
	T_EQ_STR(a.auth, "none");
	T_EQ_STR(a.header, "Authorization");
	T_ASSERT(a.secret == NULL);
	T_EQ_INT(a.timeout_ms, 5000);
	storage_text_plugin_args_free(&a);

	T_EQ_INT(
	        pargs("{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"https://h\","
	              "\"description\":\"d\",\"parameters\":\"{\\\"type\\\":"
	              "\\\"object\\\"}\",\"auth\":\"token\",\"header\":\"X-Key"
	              "\",\"secret\":\"s s\",\"timeout_ms\":600000}",
	              STORAGE_PLUGIN_ADD, &a, err, sizeof(err)),
	        0);
	T_EQ_STR(a.parameters, "{\"type\":\"object\"}");
	T_EQ_STR(a.auth, "token");
	T_EQ_STR(a.header, "X-Key");
	T_EQ_STR(a.secret, "s s");
	T_EQ_INT(a.timeout_ms, 600000);
	storage_text_plugin_args_free(&a);

	/* The schema as an object. */
	T_EQ_INT(
	        pargs("{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"https://h\","
	              "\"parameters\":{\"properties\":{}},\"auth\":\"hmac\","
	              "\"secret\":\"k\"}",
	              STORAGE_PLUGIN_ADD, &a, err, sizeof(err)),
	        0);
	T_EQ_STR(a.parameters, "{\"properties\":{}}");
	T_EQ_STR(a.auth, "hmac");
	storage_text_plugin_args_free(&a);

	T_EQ_INT(pargs("{\"bot_id\":\"b\"}", STORAGE_PLUGIN_LIST, &a, err,
	               sizeof(err)),
	         0);
	T_EQ_STR(a.bot_id, "b");
	storage_text_plugin_args_free(&a);
	T_EQ_INT(pargs("{\"bot_id\":\"b\",\"name\":\"w\"}", STORAGE_PLUGIN_RM,
	               &a, err, sizeof(err)),
	         0);
	T_EQ_STR(a.name, "w");
	storage_text_plugin_args_free(&a);
}

static void
t_plugin_args_bad(void)
{
	static const struct {
		const char *json;
		enum storage_plugin_op op;
		const char *want; /* a substring of the error */
	} bad[] = {
	        {"[]", STORAGE_PLUGIN_ADD, "JSON object"},
	        {"{\"name\":\"w\",\"url\":\"http://h\"}", STORAGE_PLUGIN_ADD,
	         "bot_id is required"},
	        {"{\"bot_id\":\"b\",\"url\":\"http://h\"}", STORAGE_PLUGIN_ADD,
	         "name is required"},
	        {"{\"bot_id\":\"b\",\"name\":\"a/b\",\"url\":\"http://h\"}",
	         STORAGE_PLUGIN_ADD, "name must be"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\"}", STORAGE_PLUGIN_ADD,
	         "url is required"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"file:///x\"}",
	         STORAGE_PLUGIN_ADD, "http"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"parameters\":\"{\"}",
	         STORAGE_PLUGIN_ADD, "not valid JSON"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"parameters\":[]}",
	         STORAGE_PLUGIN_ADD, "JSON Schema object"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"auth\":\"token\"}",
	         STORAGE_PLUGIN_ADD, "needs a secret"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"auth\":\"none\",\"secret\":\"s\"}",
	         STORAGE_PLUGIN_ADD, "only for auth token or hmac"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"auth\":\"token\",\"secret\":\"s\\r\"}",
	         STORAGE_PLUGIN_ADD, "printable ASCII"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"header\":\"X-K\"}",
	         STORAGE_PLUGIN_ADD, "only for auth token"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"auth\":\"token\",\"secret\":\"s\",\"header\":\"X:K\"}",
	         STORAGE_PLUGIN_ADD, "header name"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"timeout_ms\":0}",
	         STORAGE_PLUGIN_ADD, "1..600000"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"timeout_ms\":1,\"timeout_ms\":2}",
	         STORAGE_PLUGIN_ADD, "twice"},
	        {"{\"bot_id\":\"b\",\"name\":\"w\",\"url\":\"http://h\","
	         "\"nope\":1}",
	         STORAGE_PLUGIN_ADD, "unknown field \"nope\""},
	        {"{\"bot_id\":\"b\",\"url\":\"http://h\"}",
	         STORAGE_PLUGIN_LIST, "unknown field \"url\""},
	        {"{\"bot_id\":\"b\",\"name\":\"w\"}", STORAGE_PLUGIN_LIST,
	         "unknown field \"name\""},
	        {"{\"bot_id\":\"b\"}", STORAGE_PLUGIN_RM, "name is required"},
	        {"{\"bot_id\":\"a b\",\"name\":\"w\"}", STORAGE_PLUGIN_RM,
	         "bot_id must be"},
	};
	struct storage_plugin_args a;
	char err[256];
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		if (pargs(bad[i].json, bad[i].op, &a, err, sizeof(err)) != -1)
			T_FAIL("%s: got 0, want -1", bad[i].json);
		if (strstr(err, bad[i].want) == NULL)
			T_FAIL("%s: error \"%s\", want it to mention \"%s\"",
			       bad[i].json, err, bad[i].want);
		storage_text_plugin_args_free(&a);
	}
}

static void
t_sqlstate(void)
{
	T_EQ_INT(storage_text_sqlstate_transient(NULL), 1);
	T_EQ_INT(storage_text_sqlstate_transient("08006"), 1);
	T_EQ_INT(storage_text_sqlstate_transient("40001"), 1);
	T_EQ_INT(storage_text_sqlstate_transient("57P01"), 1);
	T_EQ_INT(storage_text_sqlstate_transient("53100"), 1);
	T_EQ_INT(storage_text_sqlstate_transient("22021"), 0); /* encoding */
	T_EQ_INT(storage_text_sqlstate_transient("22003"), 0); /* range */
	T_EQ_INT(storage_text_sqlstate_transient("23502"), 0); /* not null */
	T_EQ_INT(storage_text_sqlstate_transient("42P01"), 0); /* no table */
}

static void
t_oneline(void)
{
	char a[] = "connection to server failed: No such file\n\tIs the "
	           "server running?\n";
	char b[] = "  keep  inner\tspace  ";
	char c[] = "\n\n";
	char d[] = "ERROR:  duplicate key\nDETAIL:  Key (id)=(x).\n";

	T_EQ_STR(storage_text_oneline(a), "connection to server failed: No "
	                                  "such file Is the server running?");
	T_EQ_STR(storage_text_oneline(b), "  keep  inner\tspace");
	T_EQ_STR(storage_text_oneline(c), "");
	T_EQ_STR(storage_text_oneline(d), "ERROR:  duplicate key DETAIL:  "
	                                  "Key (id)=(x).");
}

T_TESTS = {
        {"redis_addr_tcp", t_redis_addr_tcp},
        {"redis_addr_unix", t_redis_addr_unix},
        {"redis_addr_bad", t_redis_addr_bad},
        {"pg_array", t_pg_array},
        {"msg_json", t_msg_json},
        {"ctx_join", t_ctx_join},
        {"ctx_key", t_ctx_key},
        {"utf8", t_utf8},
        {"bot_id", t_bot_id},
        {"bot_args_ok", t_bot_args_ok},
        {"bot_args_bad", t_bot_args_bad},
        {"bot_args_nul", t_bot_args_nul},
        {"plugin_name", t_plugin_name},
        {"plugin_schema", t_plugin_schema},
        {"plugin_args_ok", t_plugin_args_ok},
        {"plugin_args_bad", t_plugin_args_bad},
        {"sqlstate", t_sqlstate},
        {"oneline", t_oneline},
        {NULL, NULL},
};

T_MAIN
