/* SPDX-License-Identifier: ISC */
/*
 * telemetry_merge_test: the texts of several processes become one valid
 * page (each family once, samples grouped, service labels added, bad and
 * repeated lines dropped and counted), and the store keeps the latest
 * report per service, marks the silent ones down and forgets the gone.
 */
#include <stdio.h>

#include "metrics.h"
#include "promcheck.h"
#include "t.h"
#include "telemetry.h"
#include "util.h"

static void
check_valid(const char *text)
{
	char err[256];

	if (prom_check(text, err, sizeof(err)) != 0)
		T_FAIL("invalid exposition text: %s\n%s", err, text);
	T_ASSERT(prom_check_promtool(text) != 1);
}

static void
merge(const struct tm_source *src, size_t n, struct buf *out,
      uint64_t *dropped)
{
	buf_reset(out);
	T_EQ_INT(telemetry_merge(src, n, out, dropped), 0);
	if (out->b == NULL)
		T_EQ_INT(buf_adds(out, ""), 0);
}

/* Two processes rendering the same families from common/metrics.c. */
static void
t_two_registries(void)
{
	struct metrics *a = metrics_new(), *w = metrics_new();
	struct buf ta = {0}, tw = {0}, out = {0};
	struct tm_source src[2];
	uint64_t dropped = 99;
	const char *p;

	*metrics_counter(a, "req_total", "Requests.", "code=\"0\"") = 5;
	*metrics_gauge(a, "depth", "Depth.", "") = 2;
	*metrics_counter(w, "req_total", "Requests.", "code=\"0\"") = 7;
	histo_observe(metrics_histo(w, "lat_seconds", "Latency.", ""), 0.2);
	*metrics_gauge(w, "depth", "Depth.", "service=\"own\"") = 3;
	T_EQ_INT(metrics_render(a, &ta), 0);
	T_EQ_INT(metrics_render(w, &tw), 0);
	src[0] = (struct tm_source){"auth", ta.b, ta.len};
	src[1] = (struct tm_source){"worker-1", tw.b, tw.len};
	merge(src, 2, &out, &dropped);
	T_EQ_INT(dropped, 0);
	/* Families in order of first appearance, samples grouped. */
	p = "# HELP req_total Requests.\n"
	    "# TYPE req_total counter\n"
	    "req_total{service=\"auth\",code=\"0\"} 5\n"
	    "req_total{service=\"worker-1\",code=\"0\"} 7\n"
	    "# HELP depth Depth.\n"
	    "# TYPE depth gauge\n"
	    "depth{service=\"auth\"} 2\n"
	    "depth{service=\"own\"} 3\n"
	    "# HELP lat_seconds Latency.\n"
	    "# TYPE lat_seconds histogram\n"
	    "lat_seconds_bucket{service=\"worker-1\",le=\"0.001\"} 0\n";
	if (strncmp(out.b, p, strlen(p)) != 0)
		T_FAIL("got:\n%s\nwant it to start with:\n%s", out.b, p);
	T_ASSERT(strstr(out.b, "lat_seconds_bucket{service=\"worker-1\","
	                       "le=\"0.25\"} 1\n") != NULL);
	T_ASSERT(strstr(out.b,
	                "lat_seconds_sum{service=\"worker-1\"} 0.2\n"
	                "lat_seconds_count{service=\"worker-1\"} 1\n") !=
	         NULL);
	check_valid(out.b);
	buf_free(&ta);
	buf_free(&tw);
	buf_free(&out);
	metrics_free(a);
	metrics_free(w);
}

/* Lines that would spoil the page are dropped, one count each. */
static void
t_bad_lines(void)
{
	static const char a[] =
	        "# HELP ok_total Fine.\n"
	        "# TYPE ok_total counter\n"
	        "ok_total 1\n"
	        "ok_total 2\n"              /* repeated sample */
	        "9bad 1\n"                  /* bad name */
	        "x{a=\"1\" 1\n"             /* unterminated labels */
	        "x{a=\"\\t\"} 1\n"          /* bad escape */
	        "x{a=\"1\",a=\"2\"} 1\n"    /* repeated label */
	        "x one\n"                   /* bad value */
	        "x 1 12x\n"                 /* bad timestamp */
	        "x inf\n"                   /* Go spells it +Inf */
	        "x  1\n"                    /* two spaces */
	        "# TYPE y sometype\n"       /* bad type */
	        "# HELP z bad \\t escape\n" /* bad help: help dropped */
	        "z 1\n"
	        "# TYPE h histogram\n"
	        "h_bucket 1\n" /* bucket without le */
	        "h 1\n"        /* a histogram has no plain h */
	        "# random comment\n"
	        "\n"
	        "cut 1"; /* no final newline */
	static const char b[] =
	        "# TYPE ok_total gauge\n" /* clashes with a's counter */
	        "ok_total 5\n"
	        "h_sum 1\n"                       /* h's part without TYPE */
	        "ok_total{service=\"auth\"} 1\n"; /* repeats a's line */
	struct tm_source src[2] = {
	        {"auth", a, sizeof(a) - 1},
	        {"edge", b, sizeof(b) - 1},
	};
	struct buf out = {0};
	uint64_t dropped = 0;

	merge(src, 2, &out, &dropped);
	T_EQ_STR(out.b, "# HELP ok_total Fine.\n"
	                "# TYPE ok_total counter\n"
	                "ok_total{service=\"auth\"} 1\n"
	                "z{service=\"auth\"} 1\n"
	                "# TYPE h histogram\n");
	T_EQ_INT(dropped, 17);
	check_valid(out.b);
	buf_free(&out);
}

/* Labels as given: a service label is kept, timestamps pass, an empty
 * label set and a trailing comma are tidied, NaN and +Inf pass. */
static void
t_labels(void)
{
	static const char a[] =
	        "# TYPE g gauge\n"
	        "g{service=\"x\",k=\"a\\\"b\"} NaN 1700000000000\n"
	        "g{} +Inf\n"
	        "g{k=\"c\",} -1.5e-3\n"
	        "u 3\n";
	struct tm_source src = {"edge", a, sizeof(a) - 1};
	struct buf out = {0};
	uint64_t dropped = 1;

	merge(&src, 1, &out, &dropped);
	T_EQ_STR(out.b, "# TYPE g gauge\n"
	                "g{service=\"x\",k=\"a\\\"b\"} NaN 1700000000000\n"
	                "g{service=\"edge\"} +Inf\n"
	                "g{service=\"edge\",k=\"c\"} -1.5e-3\n"
	                "u{service=\"edge\"} 3\n");
	T_EQ_INT(dropped, 0);
	check_valid(out.b);
	buf_free(&out);
}

/* Many families and samples: the hash tables grow and nothing is lost. */
static void
t_many(void)
{
	struct buf in = {0}, out = {0};
	struct tm_source src[3];
	uint64_t dropped = 1;
	size_t i, lines = 0;
	const char *s;

	for (i = 0; i < 3000; i++)
		T_EQ_INT(buf_addf(&in,
		                  "# TYPE f%zu gauge\nf%zu{i=\"%zu\"} %zu\n",
		                  i % 400, i % 400, i, i),
		         0);
	src[0] = (struct tm_source){"a", in.b, in.len};
	src[1] = (struct tm_source){"b", in.b, in.len};
	src[2] = (struct tm_source){"a", in.b, in.len}; /* all repeats */
	merge(src, 3, &out, &dropped);
	T_EQ_INT(dropped, 3000);
	for (s = out.b; *s; s++)
		lines += *s == '\n';
	T_EQ_INT(lines, 400 + 6000);
	T_ASSERT(strstr(out.b, "f7{service=\"b\",i=\"2807\"} 2807\n") != NULL);
	check_valid(out.b);
	buf_free(&in);
	buf_free(&out);
}

static void
t_store(void)
{
	struct telemetry_store st;
	struct buf out = {0};
	static const char own[] = "# TYPE own_total counter\nown_total 4\n";
	char big[200];

	telemetry_store_init(&st, 30000, 600000, 100);
	T_EQ_INT(telemetry_store_report(&st, MSTR("worker-2"),
	                                MSTR("# TYPE q gauge\nq 1\n"), 1000),
	         0);
	T_EQ_INT(telemetry_store_report(&st, MSTR("edge"),
	                                MSTR("# TYPE q gauge\nq 7\n"), 1000),
	         0);
	/* The latest report replaces the previous one. */
	T_EQ_INT(telemetry_store_report(&st, MSTR("worker-2"),
	                                MSTR("# TYPE q gauge\nq 2\n"), 2000),
	         0);
	T_EQ_INT(st.npeers, 2);
	T_EQ_STR(st.peers[0].name, "edge"); /* sorted */
	T_EQ_INT(st.peers[1].reports, 2);
	/* Refused: bad names, too long. */
	T_EQ_INT(telemetry_store_report(&st, MSTR("a\"b"), MSTR(""), 2000),
	         -1);
	T_EQ_INT(telemetry_store_report(&st, MSTR(""), MSTR(""), 2000), -1);
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	T_EQ_INT(telemetry_store_report(&st, MSTR("auth"), MSTR(big), 2000),
	         -1);
	T_EQ_INT(st.refused, 3);

	T_EQ_INT(telemetry_store_render(&st, own, sizeof(own) - 1, "telemetry",
	                                3000, &out),
	         0);
	check_valid(out.b);
	T_ASSERT(strncmp(out.b,
	                 "# TYPE own_total counter\n"
	                 "own_total{service=\"telemetry\"} 4\n",
	                 50) == 0);
	T_ASSERT(strstr(out.b,
	                "troupe_service_up{service=\"telemetry\"} 1\n"
	                "troupe_service_up{service=\"edge\"} 1\n"
	                "troupe_service_up{service=\"worker-2\"} 1\n") !=
	         NULL);
	T_ASSERT(strstr(out.b, "q{service=\"edge\"} 7\n"
	                       "q{service=\"worker-2\"} 2\n") != NULL);
	T_ASSERT(strstr(out.b, "troupe_telemetry_reports_total{service="
	                       "\"worker-2\"} 2\n") != NULL);
	T_ASSERT(strstr(out.b, "troupe_service_report_age_seconds{service="
	                       "\"edge\"} 2.000\n") != NULL);
	T_ASSERT(strstr(out.b, "troupe_telemetry_reports_refused_total{"
	                       "service=\"telemetry\"} 3\n") != NULL);

	/* edge falls silent: down at 30 s, its samples gone. */
	telemetry_store_sweep(&st, 31000);
	T_ASSERT(st.peers[0].text == NULL);
	T_ASSERT(st.peers[1].text != NULL);
	buf_reset(&out);
	T_EQ_INT(
	        telemetry_store_render(&st, NULL, 0, "telemetry", 31000, &out),
	        0);
	check_valid(out.b);
	T_ASSERT(strstr(out.b, "troupe_service_up{service=\"edge\"} 0\n") !=
	         NULL);
	T_ASSERT(strstr(out.b, "q{service=\"edge\"}") == NULL);
	T_ASSERT(strstr(out.b, "q{service=\"worker-2\"} 2\n") != NULL);
	/* ... and forgotten at 10 min. */
	telemetry_store_sweep(&st, 601000);
	T_EQ_INT(st.npeers, 1);
	T_EQ_STR(st.peers[0].name, "worker-2");
	telemetry_store_sweep(&st, 602000);
	T_EQ_INT(st.npeers, 0);
	buf_free(&out);
	telemetry_store_free(&st);
}

T_TESTS = {
        {"two_registries", t_two_registries},
        {"bad_lines", t_bad_lines},
        {"labels", t_labels},
        {"many", t_many},
        {"store", t_store},
        {NULL, NULL},
};
T_MAIN
