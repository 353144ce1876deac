/* SPDX-License-Identifier: ISC */
/*
 * edge_req_test: request ids, traceparent checks, the /v1/bot/chat body
 * check and the answer JSON of services/edge/edge_req.c (included whole).
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

T_TESTS = {
        {"reqid_format", t_reqid_format},
        {"reqid_stamp_follows_clock", t_reqid_stamp_follows_clock},
        {"reqid_unique", t_reqid_unique},
        {"reqid_processes_differ", t_reqid_processes_differ},
        {"trace_valid", t_trace_valid},
        {"trace_new", t_trace_new},
        {"chat_ok", t_chat_ok},
        {"chat_bad", t_chat_bad},
        {"chat_nul_inside", t_chat_nul_inside},
        {"json_error", t_json_error},
        {"json_ok", t_json_ok},
        {NULL, NULL},
};
T_MAIN
