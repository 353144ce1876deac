/* SPDX-License-Identifier: ISC */
/*
 * trace_test: traceparent checks, derived span ids (same trace, new span,
 * the parent recovered from the child), span records written and read
 * back, and that nothing is recorded while tracing is off.
 */
#include <string.h>

#include "trace.h"
#include "util.h"
#include "t.h"

#define TP "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

static void
t_valid(void)
{
	T_ASSERT(trace_valid(MSTR(TP)));
	T_ASSERT(!trace_valid(MSTR("00-0af7651916cd43dd8448eb211c80319c-"
	                           "b7ad6b7169203331-0")));
	T_ASSERT(!trace_valid(MSTR("00-00000000000000000000000000000000-"
	                           "b7ad6b7169203331-01")));
	T_ASSERT(!trace_valid(MSTR("00-0af7651916cd43dd8448eb211c80319c-"
	                           "0000000000000000-01")));
	T_ASSERT(!trace_valid(MSTR("00-0AF7651916CD43DD8448EB211C80319C-"
	                           "b7ad6b7169203331-01")));
	T_ASSERT(!trace_valid(MSTR_NULL));
}

static void
t_child(void)
{
	char a[TRACE_TP_LEN], b[TRACE_TP_LEN], c[TRACE_TP_LEN];

	T_EQ_INT(trace_child(MSTR(TP), "auth", 0, a), 0);
	T_ASSERT(trace_valid((struct mstr){a, TRACE_TP_LEN}));
	/* same version, trace id and flags; another span id */
	T_ASSERT(memcmp(a, TP, 36) == 0);
	T_ASSERT(memcmp(a + 52, TP + 52, 3) == 0);
	T_ASSERT(memcmp(a + 36, TP + 36, 16) != 0);
	/* deterministic, and the name and salt matter */
	T_EQ_INT(trace_child(MSTR(TP), "auth", 0, b), 0);
	T_ASSERT(memcmp(a, b, TRACE_TP_LEN) == 0);
	T_EQ_INT(trace_child(MSTR(TP), "auth", 1, c), 0);
	T_ASSERT(memcmp(a + 36, c + 36, 16) != 0);
	T_EQ_INT(trace_child(MSTR(TP), "dispatcher", 0, c), 0);
	T_ASSERT(memcmp(a + 36, c + 36, 16) != 0);
	T_EQ_INT(trace_child(MSTR("bad"), "auth", 0, c), -1);

	/* in place, only while on */
	memcpy(c, TP, TRACE_TP_LEN);
	trace_set_enabled(0);
	trace_enter(c, sizeof(c), "auth", 0);
	T_ASSERT(memcmp(c, TP, TRACE_TP_LEN) == 0);
	trace_set_enabled(1);
	trace_enter(c, sizeof(c), "auth", 0);
	T_ASSERT(memcmp(c, a, TRACE_TP_LEN) == 0);
	trace_set_enabled(0);
}

static void
t_records(void)
{
	char child[TRACE_TP_LEN];
	struct trace_span s = {.name = "upstream",
	                       .kind = TRACE_CLIENT,
	                       .start_ns = 1000,
	                       .end_ns = 5000,
	                       .http_status = 429,
	                       .error = 1,
	                       .route = MSTR_LIT("v1.chat"),
	                       .bot_id = MSTR_LIT("bot\t1"),
	                       .url = MSTR_LIT("http://127.0.0.1:9/x")};
	struct buf b = {0};
	struct trace_rec r;
	const char *p, *end;

	T_EQ_INT(trace_child(MSTR(TP), "upstream", 77, child), 0);
	trace_set_enabled(0);
	trace_end_derived((struct mstr){child, TRACE_TP_LEN}, 77, &s);
	T_EQ_INT(trace_take(&b), 0); /* off: nothing recorded */
	trace_set_enabled(1);
	trace_end_derived((struct mstr){child, TRACE_TP_LEN}, 77, &s);
	s.name = "edge";
	s.kind = TRACE_SERVER;
	s.flags = TRACE_F_LOCAL_ROOT;
	s.error = 0;
	s.http_status = 200;
	trace_end(MSTR(TP), MSTR_NULL, &s);
	T_EQ_INT(trace_take(&b), 2);
	T_EQ_INT(trace_take(&b), 0);
	trace_set_enabled(0);

	p = b.b;
	end = b.b + b.len;
	T_EQ_INT(trace_rec_next(&p, end, &r), 1);
	T_EQ_STR(r.trace_id, "0af7651916cd43dd8448eb211c80319c");
	T_ASSERT(memcmp(r.span_id, child + 36, 16) == 0);
	/* the parent recovered from the derived child */
	T_EQ_STR(r.parent_id, "b7ad6b7169203331");
	T_EQ_INT(r.kind, TRACE_CLIENT);
	T_EQ_INT(r.start_ns, 1000);
	T_EQ_INT(r.end_ns, 5000);
	T_EQ_INT(r.error, 1);
	T_EQ_INT(r.http_status, 429);
	T_EQ_MEM(r.name.p, r.name.n, "upstream");
	T_EQ_MEM(r.route.p, r.route.n, "v1.chat");
	T_EQ_MEM(r.bot_id.p, r.bot_id.n, "bot 1"); /* TAB cleaned */
	T_EQ_MEM(r.url.p, r.url.n, "http://127.0.0.1:9/x");
	T_EQ_INT(trace_rec_next(&p, end, &r), 1);
	T_EQ_STR(r.span_id, "b7ad6b7169203331");
	T_EQ_STR(r.parent_id, "");
	T_EQ_INT(r.flags, TRACE_F_LOCAL_ROOT);
	T_EQ_MEM(r.name.p, r.name.n, "edge");
	T_EQ_INT(trace_rec_next(&p, end, &r), 0);
	buf_free(&b);
}

static void
t_bad_records(void)
{
	static const char in[] =
	        "xyz\n"
	        "0af7651916cd43dd8448eb211c80319c\tb7ad6b7169203331\t\t9\t1\t2"
	        "\t0\t0\t0\tn\t\t\t\t\n"
	        "0af7651916cd43dd8448eb211c80319c\tb7ad6b7169203331\t\t2\t1\t2"
	        "\t0\t200\t0\tedge\tr\tb\tu\tn\n";
	const char *p = in, *end = in + sizeof(in) - 1;
	struct trace_rec r;

	T_EQ_INT(trace_rec_next(&p, end, &r), -1); /* too few fields */
	T_EQ_INT(trace_rec_next(&p, end, &r), -1); /* kind 9 */
	T_EQ_INT(trace_rec_next(&p, end, &r), 1);
	T_EQ_INT(r.http_status, 200);
	T_EQ_MEM(r.note.p, r.note.n, "n");
	T_EQ_INT(trace_rec_next(&p, end, &r), 0);
}

T_TESTS = {
        {"valid", t_valid},     {"child", t_child},
        {"records", t_records}, {"bad_records", t_bad_records},
        {NULL, NULL},
};
T_MAIN
