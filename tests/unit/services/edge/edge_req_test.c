/* SPDX-License-Identifier: ISC */
/*
 * edge_req_test: request ids, traceparent checks, the /v1/bot/chat and
 * /v3/chat body checks, query strings, the ids of the other v3 routes and
 * the answer JSON of services/edge/edge_req.c (included whole).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "t.h"

#include "edge_req.c"

#define nitems(a) (sizeof(a) / sizeof((a)[0]))

static void
seed_ids(struct edge_ids *g, unsigned char v)
{
	unsigned char seed[32];

	memset(seed, v, sizeof(seed));
	seed[0] ^= 0x5a;
	edge_ids_init(g, seed);
}

/* 2024-01-02 03:04:05.678 UTC */
#define T0 1704164645678ULL

static void
t_reqid_format(void)
{
	struct edge_ids g;
	char id[EDGE_REQID_LEN + 1];

	seed_ids(&g, 1);
	edge_reqid_next(&g, T0, id);
	id[EDGE_REQID_LEN] = '\0';
	T_EQ_INT(strlen(id), 32);
	T_EQ_MEM(id, 14, "20240102030405");
	for (int i = 14; i < EDGE_REQID_LEN; i++)
		if (!strchr("0123456789abcdef", id[i]))
			T_FAIL("id[%d] = '%c', want lowercase hex in %s", i,
			       id[i], id);
}

static void
t_reqid_stamp_follows_clock(void)
{
	struct edge_ids g;
	char a[EDGE_REQID_LEN], b[EDGE_REQID_LEN];

	seed_ids(&g, 2);
	edge_reqid_next(&g, T0, a);
	edge_reqid_next(&g, T0 + 1000, b);
	T_EQ_MEM(a, 14, "20240102030405");
	T_EQ_MEM(b, 14, "20240102030406");
	/* Same process prefix, counter one apart. */
	T_EQ_INT(memcmp(a + 14, b + 14, 8), 0);
	T_EQ_INT(strtoull((char[11]){b[22], b[23], b[24], b[25], b[26], b[27],
	                             b[28], b[29], b[30], b[31], 0},
	                  NULL, 16) -
	                 strtoull((char[11]){a[22], a[23], a[24], a[25], a[26],
	                                     a[27], a[28], a[29], a[30], a[31],
	                                     0},
	                          NULL, 16),
	         1);
}

static int
cmp_id(const void *x, const void *y)
{
	return (memcmp(x, y, EDGE_REQID_LEN));
}

static void
t_reqid_unique(void)
{
	enum { N = 200000 };
	struct edge_ids g;
	char(*ids)[EDGE_REQID_LEN] = malloc(N * sizeof(*ids));
	int i, dups = 0;

	T_ASSERT(ids != NULL);
	seed_ids(&g, 3);
	/* All within one second: only the tail tells them apart. */
	for (i = 0; i < N; i++)
		edge_reqid_next(&g, T0, ids[i]);
	qsort(ids, N, sizeof(*ids), cmp_id);
	for (i = 1; i < N; i++)
		dups += memcmp(ids[i - 1], ids[i], EDGE_REQID_LEN) == 0;
	free(ids);
	T_EQ_INT(dups, 0);
}

static void
t_reqid_processes_differ(void)
{
	struct edge_ids g1, g2;
	char a[EDGE_REQID_LEN], b[EDGE_REQID_LEN];

	seed_ids(&g1, 4);
	seed_ids(&g2, 5);
	edge_reqid_next(&g1, T0, a);
	edge_reqid_next(&g2, T0, b);
	if (memcmp(a + 14, b + 14, 8) == 0)
		T_FAIL("two seeds gave the same prefix %.8s", a + 14);
}

static void
t_trace_valid(void)
{
	static const struct {
		const char *s;
		int want;
	} c[] = {
	        {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 1},
	        {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", 1},
	        {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff", 1},
	        /* upper case hex */
	        {"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", 0},
	        /* other versions */
	        {"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 0},
	        {"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 0},
	        /* all-zero trace id / parent id */
	        {"00-00000000000000000000000000000000-b7ad6b7169203331-01", 0},
	        {"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", 0},
	        /* lengths, separators, characters */
	        {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1", 0},
	        {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-011",
	         0},
	        {"00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 0},
	        {"00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01", 0},
	        {"00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01", 0},
	        {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0 ", 0},
	        {"", 0},
	};

	for (size_t i = 0; i < nitems(c); i++)
		if (edge_trace_valid(c[i].s, strlen(c[i].s)) != c[i].want)
			T_FAIL("edge_trace_valid(\"%s\"): got %d, want %d",
			       c[i].s, !c[i].want, c[i].want);
}

static void
t_trace_new(void)
{
	struct edge_ids g;
	char a[EDGE_TRACE_LEN], b[EDGE_TRACE_LEN];

	seed_ids(&g, 6);
	edge_trace_new(&g, a);
	edge_trace_new(&g, b);
	if (!edge_trace_valid(a, sizeof(a)))
		T_FAIL("new trace %.55s is not valid", a);
	T_EQ_MEM(a + 52, 3, "-01");
	if (memcmp(a + 3, b + 3, 32) == 0)
		T_FAIL("two new traces share the trace id %.32s", a + 3);
}

/* edge_tracestate on s: what goes on, "" for nothing. */
static const char *
ts(const char *s, size_t n)
{
	static char out[EDGE_TRACESTATE_MAX + 1];
	size_t len = edge_tracestate(s, n, out);

	if (len > EDGE_TRACESTATE_MAX)
		T_FAIL("tracestate of %zu bytes, over %d", len,
		       EDGE_TRACESTATE_MAX);
	out[len] = '\0';
	return (out);
}

static void
t_tracestate_valid(void)
{
	static const struct {
		const char *in, *want;
	} c[] = {
	        {"", ""},
	        {"congo=t61rcWkgMzE", "congo=t61rcWkgMzE"},
	        {"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
	         "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"},
	        /* OWS around members and empty members go */
	        {" rojo=1 ,\t congo=2\t", "rojo=1,congo=2"},
	        {"rojo=1,,  ,congo=2,", "rojo=1,congo=2"},
	        {" , ", ""},
	        /* key characters, multi-tenant keys (tenant may start with a
	         * digit, the system may not) */
	        {"a_b-c*d/e9=1", "a_b-c*d/e9=1"},
	        {"fw529a3039@dt=abc", "fw529a3039@dt=abc"},
	        {"0tenant@sys-1=x", "0tenant@sys-1=x"},
	        /* values: spaces inside and at the start, printable ASCII */
	        {"k= a b", "k= a b"},
	        {"k=!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~",
	         "k=!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~"},
	        /* invalid: the whole header goes */
	        {"Rojo=1", ""},
	        {"1rojo=1", ""},
	        {"rojo=1,congo", ""},
	        {"=1", ""},
	        {"rojo=", ""},
	        {"rojo=a=b", ""},
	        {"ro jo=1", ""},
	        {"rojo=1\x7f", ""},
	        {"rojo=\xc3\xa9", ""},
	        {"rojo=a\tb", ""},
	        {"t@=1", ""},
	        {"@s=1", ""},
	        {"t@1s=1", ""},
	        {"t@abcdefghijklmno=1", ""}, /* system of 15 */
	        {"t@S=1", ""},
	        {"a@b@c=1", ""},
	        {"rojo=1,congo=2,rojo=3", ""}, /* a key twice */
	        {"good=1,Bad=2", ""},
	};
	char key[300], val[300], buf[700];

	for (size_t i = 0; i < nitems(c); i++)
		if (strcmp(ts(c[i].in, strlen(c[i].in)), c[i].want) != 0)
			T_FAIL("edge_tracestate(\"%s\"): got \"%s\", want "
			       "\"%s\"",
			       c[i].in, ts(c[i].in, strlen(c[i].in)),
			       c[i].want);
	/* Lengths: a key of 256 and a value of 256 are the most. */
	memset(key, 'k', 257);
	memset(val, 'v', 257);
	snprintf(buf, sizeof(buf), "%.256s=1", key);
	T_EQ_STR(ts(buf, strlen(buf)), buf);
	snprintf(buf, sizeof(buf), "%.257s=1", key);
	T_EQ_STR(ts(buf, strlen(buf)), "");
	snprintf(buf, sizeof(buf), "k=%.256s", val);
	T_EQ_STR(ts(buf, strlen(buf)), buf);
	snprintf(buf, sizeof(buf), "k=%.257s", val);
	T_EQ_STR(ts(buf, strlen(buf)), "");
	/* A tenant of 241 characters, not 242. */
	snprintf(buf, sizeof(buf), "%.241s@s=1", key);
	T_EQ_STR(ts(buf, strlen(buf)), buf);
	snprintf(buf, sizeof(buf), "%.242s@s=1", key);
	T_EQ_STR(ts(buf, strlen(buf)), "");
	/* Bytes past n are never read. */
	T_EQ_STR(ts("rojo=1,Bad=2", 6), "rojo=1");
}

/* n members k0=v .. k<n-1>=v joined by ',' into buf. */
static size_t
ts_members(char *buf, size_t cap, int n)
{
	size_t len = 0;

	for (int i = 0; i < n; i++)
		len += (size_t)snprintf(buf + len, cap - len, "%sk%d=v",
		                        i ? "," : "", i);
	return (len);
}

static void
t_tracestate_members(void)
{
	char buf[1024], want[1024];
	size_t n;

	/* 32 members pass, 33 are invalid. */
	n = ts_members(buf, sizeof(buf), 32);
	T_EQ_STR(ts(buf, n), buf);
	n = ts_members(buf, sizeof(buf), 33);
	T_EQ_STR(ts(buf, n), "");
	/* Empty members do not count. */
	n = ts_members(buf, sizeof(buf), 32);
	memcpy(buf + n, ",, ,", 5);
	ts_members(want, sizeof(want), 32);
	T_EQ_STR(ts(buf, n + 4), want);
}

static void
t_tracestate_truncate(void)
{
	char buf[2048], want[2048], a[200], b[200], v[600];
	size_t n;

	/* 512 bytes pass whole: 4 members of 127 and 3 commas = 511, plus
	 * "x" = 512. */
	memset(v, 'v', sizeof(v));
	n = (size_t)snprintf(buf, sizeof(buf),
	                     "a=%.125s,b=%.125s,c=%.125s,d=%.126s", v, v, v,
	                     v);
	T_EQ_INT(n, 512);
	T_EQ_STR(ts(buf, n), buf);
	/* One byte more: the last member goes (none is over 128). */
	n = (size_t)snprintf(buf, sizeof(buf),
	                     "a=%.125s,b=%.125s,c=%.125s,d=%.127s", v, v, v,
	                     v);
	snprintf(want, sizeof(want), "a=%.125s,b=%.125s,c=%.125s", v, v, v);
	T_EQ_STR(ts(buf, n), want);
	/* Members over 128 characters go first, the last of them first:
	 * here long2 (then the list fits), long1 and the short ones stay. */
	snprintf(a, sizeof(a), "long1=%.150s", v);
	snprintf(b, sizeof(b), "long2=%.150s", v);
	n = (size_t)snprintf(buf, sizeof(buf),
	                     "s1=1,%s,s2=%.120s,%s,s3=%.120s,s4=3", a, v, b,
	                     v);
	snprintf(want, sizeof(want), "s1=1,%s,s2=%.120s,s3=%.120s,s4=3", a, v,
	         v);
	T_EQ_STR(ts(buf, n), want);
	/* Both long ones gone and still too long (4 members of 127, s5=1
	 * and 4 commas: 516): then from the end. */
	n = (size_t)snprintf(buf, sizeof(buf),
	                     "s1=%.124s,%s,s2=%.124s,%s,s3=%.124s,s4=%.124s,"
	                     "s5=1",
	                     v, a, v, b, v, v);
	snprintf(want, sizeof(want), "s1=%.124s,s2=%.124s,s3=%.124s,s4=%.124s",
	         v, v, v, v);
	T_EQ_STR(ts(buf, n), want);
	/* One member over 512 (a key and a value of 256, valid): it goes,
	 * the short one before it stays. */
	memcpy(buf, "a=1,", 4);
	memset(buf + 4, 'k', 256);
	buf[260] = '=';
	memset(buf + 261, 'v', 256);
	T_EQ_STR(ts(buf, 517), "a=1");
	T_EQ_STR(ts(buf + 4, 513), "");
}

/* Parse a NUL-terminated literal. */
static int
parse(const char *body, struct edge_chat *c, char *msg, size_t msglen)
{
	return (edge_chat_parse(body, strlen(body), c, msg, msglen));
}

static void
t_chat_ok(void)
{
	struct edge_chat c;
	char msg[128] = "";

	if (parse("{\"bot_id\":\"b1\",\"user_id\":\"u_1\",\"query\":\"hi "
	          "\\u00e9\",\"history_id\":\"h9\"}",
	          &c, msg, sizeof(msg)) == -1)
		T_FAIL("valid body refused: %s", msg);
	T_EQ_MEM(c.bot_id, c.bot_id_len, "b1");
	T_EQ_MEM(c.user_id, c.user_id_len, "u_1");
	T_EQ_MEM(c.query, c.query_len, "hi \xc3\xa9");
	T_EQ_MEM(c.history_id, c.history_id_len, "h9");
	edge_chat_free(&c);
	T_ASSERT(c.root == NULL);

	if (parse("{\"query\":\"q\",\"user_id\":\"u\",\"bot_id\":\"b\","
	          "\"history_id\":null,\"extra\":[1,2]}",
	          &c, msg, sizeof(msg)) == -1)
		T_FAIL("body with null history_id refused: %s", msg);
	T_EQ_INT(c.history_id_len, 0);
	edge_chat_free(&c);

	if (parse(" {\"bot_id\":\"b\",\"user_id\":\"u\",\"query\":\"q\"}\n",
	          &c, msg, sizeof(msg)) == -1)
		T_FAIL("body without history_id refused: %s", msg);
	T_EQ_INT(c.history_id_len, 0);
	T_EQ_STR(c.history_id, "");
	edge_chat_free(&c);
}

static void
t_chat_bad(void)
{
	static const struct {
		const char *body, *msg;
	} c[] = {
	        {"", "invalid JSON body"},
	        {"{", "invalid JSON body"},
	        {"{\"bot_id\":\"b\"", "invalid JSON body"},
	        {"{\"bot_id\":\"b\",", "invalid JSON body"},
	        {"{} x", "invalid JSON body"},
	        {"null", "invalid JSON body: not an object"},
	        {"[\"bot_id\"]", "invalid JSON body: not an object"},
	        {"\"s\"", "invalid JSON body: not an object"},
	        {"{}", "missing bot_id"},
	        {"{\"Bot_id\":\"b\",\"user_id\":\"u\",\"query\":\"q\"}",
	         "missing bot_id"},
	        {"{\"bot_id\":\"b\",\"query\":\"q\"}", "missing user_id"},
	        {"{\"bot_id\":\"b\",\"user_id\":\"u\"}", "missing query"},
	        {"{\"bot_id\":7,\"user_id\":\"u\",\"query\":\"q\"}",
	         "bot_id must be a string"},
	        {"{\"bot_id\":\"b\",\"user_id\":null,\"query\":\"q\"}",
	         "user_id must be a string"},
	        {"{\"bot_id\":\"b\",\"user_id\":\"u\",\"query\":{}}",
	         "query must be a string"},
	        {"{\"bot_id\":\"\",\"user_id\":\"u\",\"query\":\"q\"}",
	         "bot_id must not be empty"},
	        {"{\"bot_id\":\"b\",\"user_id\":\"u\",\"query\":\"\"}",
	         "query must not be empty"},
	        {"{\"bot_id\":\"b\",\"user_id\":\"u\",\"query\":\"q\","
	         "\"history_id\":5}",
	         "history_id must be a string"},
	};
	struct edge_chat ch;
	char msg[128];

	for (size_t i = 0; i < nitems(c); i++) {
		msg[0] = '\0';
		if (parse(c[i].body, &ch, msg, sizeof(msg)) != -1) {
			edge_chat_free(&ch);
			T_FAIL("body '%s' accepted, want \"%s\"", c[i].body,
			       c[i].msg);
		}
		if (strcmp(msg, c[i].msg) != 0)
			T_FAIL("body '%s': got \"%s\", want \"%s\"", c[i].body,
			       msg, c[i].msg);
		T_ASSERT(ch.root == NULL);
	}
}

static void
t_chat_nul_inside(void)
{
	static const char body[] =
	        "{\"bot_id\":\"b\",\"user_id\":\"u\",\"query\":\"q\"}\0junk";
	struct edge_chat c;
	char msg[128];

	/* len covers the NUL and what follows: refused, not truncated. */
	T_EQ_INT(edge_chat_parse(body, sizeof(body) - 1, &c, msg, sizeof(msg)),
	         -1);
	T_EQ_STR(msg, "invalid JSON body");
}

/* out must be valid JSON with these members. */
static void
check_error_json(const char *out, size_t n, long code, const char *msg,
                 const char *reqid)
{
	cJSON *j = cJSON_ParseWithLength(out, n), *d;

	if (j == NULL)
		T_FAIL("not JSON: %.*s", (int)n, out);
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(j, "code")->valuedouble,
	         code);
	T_EQ_STR(cJSON_GetStringValue(
	                 cJSON_GetObjectItemCaseSensitive(j, "msg")),
	         msg);
	d = cJSON_GetObjectItemCaseSensitive(j, "detail");
	T_ASSERT(cJSON_IsObject(d));
	T_EQ_STR(cJSON_GetStringValue(
	                 cJSON_GetObjectItemCaseSensitive(d, "logid")),
	         reqid);
	cJSON_Delete(j);
}

static void
t_json_error(void)
{
	static const char id[] = "20240102030405abcdef0123456789ab";
	static const char nasty[] = "a \"q\" \\ \n\t\x01\x1f\x7f end";
	char out[512];
	size_t n;

	n = edge_json_error(out, sizeof(out), 4000, "missing bot_id", 14, id,
	                    NULL);
	T_EQ_MEM(out, n,
	         "{\"code\":4000,\"msg\":\"missing bot_id\",\"detail\""
	         ":{\"logid\":\"20240102030405abcdef0123456789ab\"}}");
	T_EQ_INT(out[n], '\0');

	n = edge_json_error(out, sizeof(out), 5040, nasty, sizeof(nasty) - 1,
	                    id, NULL);
	check_error_json(out, n, 5040, nasty, id);
	if (memchr(out, '\n', n) || memchr(out, '\x01', n))
		T_FAIL("control character left unescaped: %.*s", (int)n, out);

	n = edge_json_error(out, sizeof(out), -1, "", 0, id,
	                    ",\"down\":[\"auth\"]");
	check_error_json(out, n, -1, "", id);
	T_ASSERT(strstr(out, "\"down\":[\"auth\"]}}") != NULL);

	/* Too small: nothing written, 0 returned. */
	T_EQ_INT(edge_json_error(out, edge_json_error_max(3) - 1, 1, "abc", 3,
	                         id, NULL),
	         0);
	/* The bound holds for the worst case (every byte escaped as \u). */
	{
		char worst[64], big[1024];
		memset(worst, 1, sizeof(worst));
		n = edge_json_error(big, edge_json_error_max(sizeof(worst)),
		                    INT64_MIN, worst, sizeof(worst), id, NULL);
		T_ASSERT(n > 0 && n < edge_json_error_max(sizeof(worst)));
	}
}

static void
t_json_ok(void)
{
	char out[256];
	size_t n;
	const char *d = "{\"chat_id\":\"c1\",\"answer\":\"hi\"}";

	n = edge_json_ok(out, sizeof(out), d, strlen(d));
	T_EQ_MEM(out, n,
	         "{\"code\":0,\"msg\":\"\",\"data\":{\"chat_id\":\"c1\","
	         "\"answer\":\"hi\"}}");
	n = edge_json_ok(out, sizeof(out), "", 0);
	T_EQ_MEM(out, n, "{\"code\":0,\"msg\":\"\",\"data\":{}}");
	T_EQ_INT(edge_json_ok(out, edge_json_ok_max(strlen(d)) - 1, d,
	                      strlen(d)),
	         0);
}

/* v3. */

#define V3_HEAD "{\"bot_id\":\"b1\",\"user_id\":\"u1\","

static int
v3(const char *body, struct edge_v3chat *c, char *msg, size_t msglen)
{
	return (edge_v3chat_parse(body, strlen(body), c, msg, msglen));
}

static void
t_v3chat_ok(void)
{
	struct edge_v3chat c;
	char msg[160] = "";
	const char *b = V3_HEAD
	        "\"stream\":true,\"auto_save_history\":true,"
	        "\"custom_variables\":{\"a\":\"b\"},\"meta_data\":{},"
	        "\"additional_messages\":["
	        "{\"role\":\"user\",\"content\":\"first\","
	        "\"content_type\":\"text\"},"
	        "{\"role\":\"assistant\",\"content\":\"a \\\"q\\\"\\n\","
	        "\"type\":\"answer\"},"
	        "{\"role\":\"user\",\"content\":\"今天北京天气怎么样?\","
	        "\"extra\":1}]}";

	if (v3(b, &c, msg, sizeof(msg)) == -1)
		T_FAIL("parse: %s", msg);
	T_EQ_MEM(c.bot_id, c.bot_id_len, "b1");
	T_EQ_MEM(c.user_id, c.user_id_len, "u1");
	T_EQ_INT(c.stream, 1);
	T_EQ_INT(c.nmessages, 3);
	/* query: the last user message. */
	T_EQ_MEM(c.query, c.query_len, "今天北京天气怎么样?");
	T_EQ_MEM(c.messages, c.messages_len,
	         "[{\"role\":\"user\",\"type\":\"question\",\"content\":"
	         "\"first\",\"content_type\":\"text\"},"
	         "{\"role\":\"assistant\",\"type\":\"answer\",\"content\":"
	         "\"a \\\"q\\\"\\n\",\"content_type\":\"text\"},"
	         "{\"role\":\"user\",\"type\":\"question\",\"content\":"
	         "\"今天北京天气怎么样?\",\"content_type\":\"text\"}]");
	T_EQ_INT(c.messages[c.messages_len], '\0');
	/* What we send on is JSON. */
	{
		cJSON *j = cJSON_Parse(c.messages);
		T_ASSERT(cJSON_IsArray(j) && cJSON_GetArraySize(j) == 3);
		cJSON_Delete(j);
	}
	edge_v3chat_free(&c);
	T_ASSERT(c.root == NULL && c.messages == NULL);

	/* stream absent: 0; false: 0; an assistant message defaults to
	 * type answer. */
	T_EQ_INT(v3(V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                    "\"content\":\"x\"}]}",
	            &c, msg, sizeof(msg)),
	         0);
	T_EQ_INT(c.stream, 0);
	T_EQ_MEM(c.query, c.query_len, "x");
	edge_v3chat_free(&c);
	T_EQ_INT(v3(V3_HEAD "\"stream\":false,\"additional_messages\":["
	                    "{\"role\":\"user\",\"content\":\"q\"},"
	                    "{\"role\":\"assistant\",\"content\":\"a\"}]}",
	            &c, msg, sizeof(msg)),
	         0);
	T_EQ_INT(c.stream, 0);
	/* The last USER message, even with an assistant one after it. */
	T_EQ_MEM(c.query, c.query_len, "q");
	T_ASSERT(strstr(c.messages, "{\"role\":\"assistant\",\"type\":"
	                            "\"answer\",\"content\":\"a\"") != NULL);
	edge_v3chat_free(&c);
}

static void
t_v3chat_bad(void)
{
	static const struct {
		const char *body, *msg;
	} cases[] = {
	        {"", "invalid JSON body"},
	        {"{not json", "invalid JSON body"},
	        {"{\"bot_id\":\"b\"} x", "invalid JSON body"},
	        {"[1,2]", "invalid JSON body: not an object"},
	        {"\"str\"", "invalid JSON body: not an object"},
	        {"{\"user_id\":\"u\",\"additional_messages\":[]}",
	         "missing bot_id"},
	        {"{\"bot_id\":7,\"user_id\":\"u\"}",
	         "bot_id must be a string"},
	        {"{\"bot_id\":\"\",\"user_id\":\"u\"}",
	         "bot_id must not be empty"},
	        {"{\"bot_id\":\"b\"}", "missing user_id"},
	        {"{\"bot_id\":\"b\",\"user_id\":null}",
	         "user_id must be a string"},
	        {V3_HEAD "\"stream\":\"yes\",\"additional_messages\":[]}",
	         "stream must be a boolean"},
	        {V3_HEAD "\"stream\":1}", "stream must be a boolean"},
	        {V3_HEAD "\"stream\":null}", "stream must be a boolean"},
	        {V3_HEAD "\"stream\":true}", "missing additional_messages"},
	        {V3_HEAD "\"additional_messages\":null}",
	         "missing additional_messages"},
	        {V3_HEAD "\"additional_messages\":\"hi\"}",
	         "additional_messages must be an array"},
	        {V3_HEAD "\"additional_messages\":{}}",
	         "additional_messages must be an array"},
	        {V3_HEAD "\"additional_messages\":[]}",
	         "additional_messages must hold at least one user message"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"assistant\","
	                 "\"content\":\"a\"}]}",
	         "additional_messages must hold at least one user message"},
	        {V3_HEAD "\"additional_messages\":[\"hi\"]}",
	         "additional_messages[0] must be an object"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"a\"},null]}",
	         "additional_messages[1] must be an object"},
	        {V3_HEAD "\"additional_messages\":[{\"content\":\"a\"}]}",
	         "additional_messages[0].role must be \"user\" or "
	         "\"assistant\""},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"robot\","
	                 "\"content\":\"a\"}]}",
	         "additional_messages[0].role must be \"user\" or "
	         "\"assistant\""},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"User\","
	                 "\"content\":\"a\"}]}",
	         "additional_messages[0].role must be \"user\" or "
	         "\"assistant\""},
	        {V3_HEAD "\"additional_messages\":[{\"role\":1,"
	                 "\"content\":\"a\"}]}",
	         "additional_messages[0].role must be \"user\" or "
	         "\"assistant\""},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\"}]}",
	         "missing additional_messages[0].content"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":5}]}",
	         "additional_messages[0].content must be a string"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":null}]}",
	         "additional_messages[0].content must be a string"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":[\"a\"]}]}",
	         "additional_messages[0].content must be a string"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"\"}]}",
	         "additional_messages[0].content must not be empty"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"a\",\"content_type\":\"object_string\""
	                 "}]}",
	         "additional_messages[0].content_type must be \"text\""},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"a\",\"type\":3}]}",
	         "additional_messages[0].type must be a non-empty string of "
	         "at most 32 bytes"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"a\",\"type\":"
	                 "\"123456789012345678901234567890123\"}]}",
	         "additional_messages[0].type must be a non-empty string of "
	         "at most 32 bytes"},
	        /* what storage would refuse after the run: refused first */
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"caf\xe9\"}]}",
	         "invalid JSON body: not UTF-8"},
	        {V3_HEAD "\"additional_messages\":[{\"role\":\"user\","
	                 "\"content\":\"\xed\xa0\x80\"}]}",
	         "invalid JSON body: not UTF-8"},
	};
	struct edge_v3chat c;
	char msg[160];
	size_t i;

	for (i = 0; i < nitems(cases); i++) {
		msg[0] = '\0';
		if (v3(cases[i].body, &c, msg, sizeof(msg)) != -1)
			T_FAIL("case %zu (%s): accepted", i, cases[i].body);
		if (strcmp(msg, cases[i].msg) != 0)
			T_FAIL("case %zu (%s): got \"%s\", want \"%s\"", i,
			       cases[i].body, msg, cases[i].msg);
		T_ASSERT(c.root == NULL && c.messages == NULL);
	}
	/* Too many messages. */
	{
		struct buf b = {0};

		buf_adds(&b, V3_HEAD "\"additional_messages\":[");
		for (i = 0; i <= EDGE_V3_MESSAGES_MAX; i++)
			buf_addf(&b, "%s{\"role\":\"user\",\"content\":\"m\"}",
			         i ? "," : "");
		buf_adds(&b, "]}");
		buf_add(&b, "", 1);
		T_EQ_INT(edge_v3chat_parse(b.b, b.len - 1, &c, msg,
		                           sizeof(msg)),
		         -1);
		T_EQ_STR(msg, "additional_messages: at most 100 messages");
		buf_free(&b);
	}
	/* A NUL inside the body. */
	{
		static const char b[] =
		        V3_HEAD "\"additional_messages\":[]}\0x";
		T_EQ_INT(edge_v3chat_parse(b, sizeof(b) - 1, &c, msg,
		                           sizeof(msg)),
		         -1);
		T_EQ_STR(msg, "invalid JSON body");
	}
}

static void
t_query_get(void)
{
	static const char q[] =
	        "a=1&conversation_id=123%34&x&chat_id=7+8&e=&bad=%4&bad2=%zz"
	        "&nul=%00&conversation_id=999";
	char out[16];

	T_EQ_INT(edge_query_get(q, strlen(q), "conversation_id", out,
	                        sizeof(out)),
	         1);
	T_EQ_STR(out, "1234"); /* the first one, decoded */
	T_EQ_INT(edge_query_get(q, strlen(q), "a", out, sizeof(out)), 1);
	T_EQ_STR(out, "1");
	T_EQ_INT(edge_query_get(q, strlen(q), "chat_id", out, sizeof(out)), 1);
	T_EQ_STR(out, "7 8");
	T_EQ_INT(edge_query_get(q, strlen(q), "x", out, sizeof(out)), 1);
	T_EQ_STR(out, "");
	T_EQ_INT(edge_query_get(q, strlen(q), "e", out, sizeof(out)), 1);
	T_EQ_STR(out, "");
	T_EQ_INT(edge_query_get(q, strlen(q), "chat", out, sizeof(out)), 0);
	T_EQ_INT(edge_query_get(q, strlen(q), "missing", out, sizeof(out)), 0);
	T_EQ_INT(edge_query_get(q, strlen(q), "bad", out, sizeof(out)), -1);
	T_EQ_INT(edge_query_get(q, strlen(q), "bad2", out, sizeof(out)), -1);
	T_EQ_INT(edge_query_get(q, strlen(q), "nul", out, sizeof(out)), -1);
	/* A truncated escape at the very end. */
	T_EQ_INT(edge_query_get("k=%", 3, "k", out, sizeof(out)), -1);
	T_EQ_INT(edge_query_get("k=%4", 4, "k", out, sizeof(out)), -1);
	/* Too long for out. */
	T_EQ_INT(edge_query_get("k=0123456789abcdef", 18, "k", out,
	                        sizeof(out)),
	         -1);
	T_EQ_INT(
	        edge_query_get("k=0123456789abcde", 17, "k", out, sizeof(out)),
	        1);
	/* qlen is obeyed: nothing past it is read. */
	T_EQ_INT(edge_query_get("k=12&j=3", 4, "k", out, sizeof(out)), 1);
	T_EQ_STR(out, "12");
	T_EQ_INT(edge_query_get("k=12&j=3", 4, "j", out, sizeof(out)), 0);
	T_EQ_INT(edge_query_get("", 0, "k", out, sizeof(out)), 0);
}

static void
t_v3ids(void)
{
	static const struct {
		const char *q, *body, *msg;
	} bad[] = {
	        {"", NULL, "missing conversation_id"},
	        {"conversation_id=1", NULL, "missing chat_id"},
	        {"chat_id=1", NULL, "missing conversation_id"},
	        {"conversation_id=&chat_id=1", NULL,
	         "missing conversation_id"},
	        {"conversation_id=abc&chat_id=1", NULL,
	         "conversation_id must be 1 to 32 decimal digits"},
	        {"conversation_id=1&chat_id=-5", NULL,
	         "chat_id must be 1 to 32 decimal digits"},
	        {"conversation_id=1&chat_id=1%2", NULL,
	         "chat_id must be 1 to 32 decimal digits"},
	        {"conversation_id=1&chat_id=123456789012345678901234567890123",
	         NULL, "chat_id must be 1 to 32 decimal digits"},
	        {"conversation_id=1&chat_id=1", "{x", "invalid JSON body"},
	        {"conversation_id=1&chat_id=1", "[]",
	         "invalid JSON body: not an object"},
	        {"", "{\"conversation_id\":1,\"chat_id\":\"2\"}",
	         "conversation_id must be a string"},
	        {"", "{\"conversation_id\":\"1\",\"chat_id\":\"2x\"}",
	         "chat_id must be 1 to 32 decimal digits"},
	        {"", "{\"conversation_id\":\"1\"}", "missing chat_id"},
	};
	struct edge_v3ids ids;
	char msg[160];
	size_t i;

	/* Query only (retrieve, list); the body wins over the query
	 * (cancel); one from each. */
	T_EQ_INT(edge_v3ids_parse("conversation_id=7342&chat_id=7343", 33,
	                          NULL, 0, &ids, msg, sizeof(msg)),
	         0);
	T_EQ_STR(ids.conversation_id, "7342");
	T_EQ_STR(ids.chat_id, "7343");
	{
		static const char b[] = "{\"conversation_id\":\"11\","
		                        "\"chat_id\":\"12\"}";
		T_EQ_INT(edge_v3ids_parse("conversation_id=1&chat_id=2", 27, b,
		                          strlen(b), &ids, msg, sizeof(msg)),
		         0);
		T_EQ_STR(ids.conversation_id, "11");
		T_EQ_STR(ids.chat_id, "12");
	}
	{
		static const char b[] =
		        "{\"chat_id\":\"1234567890123456789\"}";
		T_EQ_INT(edge_v3ids_parse("conversation_id=5", 17, b,
		                          strlen(b), &ids, msg, sizeof(msg)),
		         0);
		T_EQ_STR(ids.conversation_id, "5");
		T_EQ_STR(ids.chat_id, "1234567890123456789");
	}
	for (i = 0; i < nitems(bad); i++) {
		const char *b = bad[i].body;

		msg[0] = '\0';
		if (edge_v3ids_parse(bad[i].q, strlen(bad[i].q), b,
		                     b ? strlen(b) : 0, &ids, msg,
		                     sizeof(msg)) != -1)
			T_FAIL("case %zu (%s / %s): accepted", i, bad[i].q,
			       b ? b : "-");
		if (strcmp(msg, bad[i].msg) != 0)
			T_FAIL("case %zu: got \"%s\", want \"%s\"", i, msg,
			       bad[i].msg);
	}
}

T_TESTS = {
        {"reqid_format", t_reqid_format},
        {"reqid_stamp_follows_clock", t_reqid_stamp_follows_clock},
        {"reqid_unique", t_reqid_unique},
        {"reqid_processes_differ", t_reqid_processes_differ},
        {"trace_valid", t_trace_valid},
        {"trace_new", t_trace_new},
        {"tracestate_valid", t_tracestate_valid},
        {"tracestate_members", t_tracestate_members},
        {"tracestate_truncate", t_tracestate_truncate},
        {"chat_ok", t_chat_ok},
        {"chat_bad", t_chat_bad},
        {"chat_nul_inside", t_chat_nul_inside},
        {"json_error", t_json_error},
        {"json_ok", t_json_ok},
        {"v3chat_ok", t_v3chat_ok},
        {"v3chat_bad", t_v3chat_bad},
        {"query_get", t_query_get},
        {"v3ids", t_v3ids},
        {NULL, NULL},
};
T_MAIN
