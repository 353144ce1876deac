/* SPDX-License-Identifier: ISC */
/*
 * edge_webhook_test: the plugin webhook's signature (known SHA-1
 * vectors), its header and body checks in their order, and the answer
 * shape of services/edge/edge_webhook.c (included whole, with
 * edge_req.c for the JSON escaping).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "t.h"

#include "edge_req.c"
#include "edge_webhook.c"

#define NOW 1700000000ULL
#define TOKEN "token"
/* sha1("1700000000" "nonce1" "token" "body"), by coreutils' sha1sum */
#define SIG_BODY "aaae4f74eaf10ba6a0f73dafe8c2f4be1121e15a"

static void
t_sign_vectors(void)
{
	char out[41];

	/* FIPS 180 "abc", split across the four parts. */
	T_EQ_INT(edge_webhook_sign(MSTR_LIT("a"), MSTR_LIT("b"), "c", "", 0,
	                           out),
	         0);
	T_EQ_STR(out, "a9993e364706816aba3e25717850c26c9cd0d89d");
	T_EQ_INT(edge_webhook_sign(MSTR_LIT("1700000000"), MSTR_LIT("nonce1"),
	                           TOKEN, "body", 4, out),
	         0);
	T_EQ_STR(out, SIG_BODY);
}

static void
t_sig_eq(void)
{
	T_EQ_INT(edge_webhook_sig_eq(SIG_BODY, 40, SIG_BODY), 1);
	T_EQ_INT(
	        edge_webhook_sig_eq("AAAE4F74EAF10BA6A0F73DAFE8C2F4BE1121E15A",
	                            40, SIG_BODY),
	        1);
	T_EQ_INT(edge_webhook_sig_eq(SIG_BODY, 39, SIG_BODY), 0);
	T_EQ_INT(
	        edge_webhook_sig_eq("baae4f74eaf10ba6a0f73dafe8c2f4be1121e15a",
	                            40, SIG_BODY),
	        0);
	T_EQ_INT(
	        edge_webhook_sig_eq("aaae4f74eaf10ba6a0f73dafe8c2f4be1121e15b",
	                            40, SIG_BODY),
	        0);
}

/* A well-formed call with body b, signed with TOKEN at time ts. */
static void
call(struct edge_webhook_in *in, const char *ts, const char *b, char sig[41])
{
	memset(in, 0, sizeof(*in));
	in->bot_id = MSTR_LIT("bot-1");
	in->timestamp = MSTR(ts);
	in->nonce = MSTR_LIT("nonce1");
	in->plugin = MSTR_LIT("echo");
	in->body = b;
	in->body_len = strlen(b);
	if (edge_webhook_sign(in->timestamp, in->nonce, TOKEN, b, strlen(b),
	                      sig) == -1)
		T_FAIL("sign failed");
	in->signature = MSTR(sig);
}

static void
t_check_ok(void)
{
	static const char b[] = "{\"bot_id\":\"bot-1\",\"user_id\":\"u1\","
	                        "\"arguments\":{ \"q\" : [1, 2] }}";
	struct edge_webhook_in in;
	struct edge_webhook w;
	char sig[41], msg[160] = "";

	call(&in, "1700000000", b, sig);
	T_EQ_INT(edge_webhook_check(TOKEN, NOW, &in, &w, msg, sizeof(msg)), 0);
	T_EQ_MEM(w.bot_id.p, w.bot_id.n, "bot-1");
	T_EQ_MEM(w.nonce.p, w.nonce.n, "nonce1");
	T_EQ_MEM(w.plugin.p, w.plugin.n, "echo");
	T_EQ_STR(w.user_id, "u1");
	T_EQ_STR(w.arguments, "{\"q\":[1,2]}");
	T_EQ_INT(w.arguments_len, strlen("{\"q\":[1,2]}"));
	edge_webhook_free(&w);

	/* Upper-case hex, bot_id left out, the clock 300 s either way. */
	call(&in, "1700000300", "{\"user_id\":\"u\",\"arguments\":{}}", sig);
	for (int i = 0; sig[i]; i++)
		if (sig[i] >= 'a' && sig[i] <= 'f')
			sig[i] = (char)(sig[i] - 'a' + 'A');
	T_EQ_INT(edge_webhook_check(TOKEN, NOW, &in, &w, msg, sizeof(msg)), 0);
	edge_webhook_free(&w);
	call(&in, "1699999700", "{\"user_id\":\"u\",\"arguments\":{}}", sig);
	T_EQ_INT(edge_webhook_check(TOKEN, NOW, &in, &w, msg, sizeof(msg)), 0);
	edge_webhook_free(&w);
}

static void
t_check_bad(void)
{
	static const char ok[] = "{\"user_id\":\"u\",\"arguments\":{}}";
	static const struct {
		const char *what, *ts, *body;
		int status;
		const char *msg;
	} cases[] = {
	        {"no token", "1700000000", ok, 403, "webhook not configured"},
	        {"no timestamp", NULL, ok, 401,
	         "missing X-Coze-Timestamp header"},
	        {"no nonce", "1700000000", ok, 401,
	         "missing X-Coze-Nonce header"},
	        {"no signature", "1700000000", ok, 401,
	         "missing X-Coze-Signature header"},
	        {"ts letters", "17000x0000", ok, 401,
	         "X-Coze-Timestamp must be unix seconds"},
	        {"ts old", "1699999699", ok, 401,
	         "X-Coze-Timestamp is more than 300 s away"},
	        {"ts future", "1700000301", ok, 401,
	         "X-Coze-Timestamp is more than 300 s away"},
	        {"long nonce", "1700000000", ok, 401,
	         "X-Coze-Nonce must be 1 to 64 printable characters"},
	        {"bad sig", "1700000000", ok, 401, "invalid signature"},
	        {"no bot", "1700000000", ok, 400,
	         "X-Coze-Bot-ID must be 1 to 128 printable characters"},
	        {"bad plugin", "1700000000", ok, 400,
	         "plugin must be 1 to 64 letters, digits, _ or -"},
	        {"no plugin", "1700000000", ok, 400,
	         "plugin must be 1 to 64 letters, digits, _ or -"},
	        {"broken", "1700000000", "{\"user_id\":", 400,
	         "body must be a JSON object"},
	        {"array", "1700000000", "[]", 400,
	         "body must be a JSON object"},
	        {"bot differs", "1700000000",
	         "{\"bot_id\":\"bot-2\",\"user_id\":\"u\",\"arguments\":{}}",
	         400, "bot_id does not match X-Coze-Bot-ID"},
	        {"bot number", "1700000000",
	         "{\"bot_id\":1,\"user_id\":\"u\",\"arguments\":{}}", 400,
	         "bot_id does not match X-Coze-Bot-ID"},
	        {"no user", "1700000000", "{\"arguments\":{}}", 400,
	         "user_id must be a non-empty string"},
	        {"empty user", "1700000000",
	         "{\"user_id\":\"\",\"arguments\":{}}", 400,
	         "user_id must be a non-empty string"},
	        {"args string", "1700000000",
	         "{\"user_id\":\"u\",\"arguments\":\"{}\"}", 400,
	         "arguments must be a JSON object"},
	        {"args missing", "1700000000", "{\"user_id\":\"u\"}", 400,
	         "arguments must be a JSON object"},
	};
	struct edge_webhook_in in;
	struct edge_webhook w;
	char sig[41], msg[160];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *tok = TOKEN, *what = cases[i].what;
		int st;

		call(&in, cases[i].ts ? cases[i].ts : "1700000000",
		     cases[i].body, sig);
		if (strcmp(what, "no token") == 0)
			tok = "";
		else if (cases[i].ts == NULL)
			in.timestamp = (struct mstr){NULL, 0};
		else if (strcmp(what, "no nonce") == 0)
			in.nonce = (struct mstr){NULL, 0};
		else if (strcmp(what, "no signature") == 0)
			in.signature = (struct mstr){NULL, 0};
		else if (strcmp(what, "long nonce") == 0)
			in.nonce =
			        MSTR_LIT("01234567890123456789012345678901"
			                 "234567890123456789012345678901234");
		else if (strcmp(what, "bad sig") == 0)
			sig[5] = sig[5] == '0' ? '1' : '0';
		else if (strcmp(what, "no bot") == 0)
			in.bot_id = (struct mstr){NULL, 0};
		else if (strcmp(what, "bad plugin") == 0)
			in.plugin = MSTR_LIT("ec ho");
		else if (strcmp(what, "no plugin") == 0)
			in.plugin = (struct mstr){NULL, 0};
		msg[0] = '\0';
		st = edge_webhook_check(tok, NOW, &in, &w, msg, sizeof(msg));
		if (st != cases[i].status)
			T_FAIL("%s: got status %d (%s), want %d", what, st,
			       msg, cases[i].status);
		if (strcmp(msg, cases[i].msg) != 0)
			T_FAIL("%s: got \"%s\", want \"%s\"", what, msg,
			       cases[i].msg);
		if (w.user_id != NULL || w.arguments != NULL)
			T_FAIL("%s: allocations left on failure", what);
	}
}

static void
t_json(void)
{
	char b[256];
	size_t n;

	n = edge_webhook_json(b, sizeof(b), 200, "ok", 2, "{\"a\":1}", 7);
	T_EQ_MEM(b, n,
	         "{\"status\":200,\"message\":\"ok\",\"data\":{\"a\":1}}");
	n = edge_webhook_json(b, sizeof(b), 401, "bad \"sig\"\n", 10, NULL, 0);
	T_EQ_MEM(b, n,
	         "{\"status\":401,\"message\":\"bad \\\"sig\\\"\\n\","
	         "\"data\":null}");
	T_ASSERT(edge_webhook_json_max(10, 0) >= n);
	/* Too small: nothing written. */
	T_EQ_INT(edge_webhook_json(b, 10, 200, "ok", 2, NULL, 0), 0);
}

T_TESTS = {
        {"sign_vectors", t_sign_vectors},
        {"sig_eq", t_sig_eq},
        {"check_ok", t_check_ok},
        {"check_bad", t_check_bad},
        {"json", t_json},
        {NULL, NULL},
};
T_MAIN
