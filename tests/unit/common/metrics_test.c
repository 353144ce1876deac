/* SPDX-License-Identifier: ISC */
/*
 * metrics_test: common/metrics.c renders exactly the Prometheus text we
 * expect for counters, gauges and histograms, groups families, hands out
 * the same series for the same (family, labels), refuses names and labels
 * that would make the output invalid, and its output passes the format
 * checker (and promtool when it is installed).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>

#include "metrics.h"
#include "promcheck.h"
#include "t.h"
#include "util.h"

static void
render(struct metrics *m, struct buf *b)
{
	buf_reset(b);
	T_EQ_INT(metrics_render(m, b), 0);
	if (b->b == NULL)
		T_EQ_INT(buf_adds(b, ""), 0);
}

static void
check_valid(const char *text)
{
	char err[256];

	if (prom_check(text, err, sizeof(err)) != 0)
		T_FAIL("invalid exposition text: %s\n%s", err, text);
	T_ASSERT(prom_check_promtool(text) != 1);
}

static void
t_counter(void)
{
	struct metrics *m = metrics_new();
	struct buf b = {0};
	uint64_t *c;

	T_ASSERT(m != NULL);
	c = metrics_counter(m, "troupe_x_total", "Things done.",
	                    "service=\"edge\",code=\"0\"");
	T_ASSERT(c != NULL);
	T_EQ_INT(*c, 0);
	*c += 3;
	T_ASSERT(metrics_counter(m, "troupe_y_total", "Other.", "") != NULL);
	render(m, &b);
	T_EQ_STR(b.b, "# HELP troupe_x_total Things done.\n"
	              "# TYPE troupe_x_total counter\n"
	              "troupe_x_total{service=\"edge\",code=\"0\"} 3\n"
	              "# HELP troupe_y_total Other.\n"
	              "# TYPE troupe_y_total counter\n"
	              "troupe_y_total 0\n");
	check_valid(b.b);
	buf_free(&b);
	metrics_free(m);
}

static void
t_gauge(void)
{
	struct metrics *m = metrics_new();
	struct buf b = {0};
	double *g, *g2, *g3, *g4;

	g = metrics_gauge(m, "troupe_q", "Queue depth.", "peer=\"auth\"");
	g2 = metrics_gauge(m, "troupe_q", NULL, "peer=\"storage\"");
	g3 = metrics_gauge(m, "troupe_r", "A \\ back\nslash", NULL);
	g4 = metrics_gauge(m, "troupe_special", "", "");
	T_ASSERT(g && g2 && g3 && g4);
	*g = 0.5;
	*g2 = 12;
	*g3 = 0.1;
	*g4 = INFINITY;
	render(m, &b);
	T_EQ_STR(b.b, "# HELP troupe_q Queue depth.\n"
	              "# TYPE troupe_q gauge\n"
	              "troupe_q{peer=\"auth\"} 0.5\n"
	              "troupe_q{peer=\"storage\"} 12\n"
	              "# HELP troupe_r A \\\\ back\\nslash\n"
	              "# TYPE troupe_r gauge\n"
	              "troupe_r 0.1\n"
	              "# HELP troupe_special troupe_special\n"
	              "# TYPE troupe_special gauge\n"
	              "troupe_special +Inf\n");
	check_valid(b.b);
	*g4 = NAN;
	*g3 = -1e-300;
	render(m, &b);
	T_ASSERT(strstr(b.b, "troupe_special NaN\n") != NULL);
	T_ASSERT(strstr(b.b, "troupe_r -1e-300\n") != NULL);
	*g3 = 1.0 / 3;
	render(m, &b);
	T_ASSERT(strstr(b.b, "troupe_r 0.33333333333333331\n") != NULL);
	check_valid(b.b);
	buf_free(&b);
	metrics_free(m);
}

static void
t_histogram(void)
{
	struct metrics *m = metrics_new();
	struct buf b = {0};
	struct histo *h, *h2;

	h = metrics_histo(m, "troupe_lat_seconds", "Latency.",
	                  "route=\"chat\"");
	h2 = metrics_histo(m, "troupe_lat_seconds", "Latency.", "");
	T_ASSERT(h != NULL && h2 != NULL && h != h2);
	histo_observe(h, 0.0005); /* le 0.001 */
	histo_observe(h, 0.001);  /* le 0.001: bounds are inclusive */
	histo_observe(h, 0.003);  /* le 0.005 */
	histo_observe(h, 0.75);   /* le 1 */
	histo_observe(h, 200);    /* +Inf only */
	histo_observe(h, NAN);    /* ignored */
	render(m, &b);
	T_EQ_STR(b.b,
	         "# HELP troupe_lat_seconds Latency.\n"
	         "# TYPE troupe_lat_seconds histogram\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.001\"} 2\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.002\"} 2\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.005\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.01\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.025\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.05\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.1\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.25\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"0.5\"} 3\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"1\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"2.5\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"5\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"10\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"30\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"60\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"120\"} 4\n"
	         "troupe_lat_seconds_bucket{route=\"chat\",le=\"+Inf\"} 5\n"
	         "troupe_lat_seconds_sum{route=\"chat\"} 200.7545\n"
	         "troupe_lat_seconds_count{route=\"chat\"} 5\n"
	         "troupe_lat_seconds_bucket{le=\"0.001\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.002\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.005\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.01\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.025\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.05\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.1\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.25\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"0.5\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"1\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"2.5\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"5\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"10\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"30\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"60\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"120\"} 0\n"
	         "troupe_lat_seconds_bucket{le=\"+Inf\"} 0\n"
	         "troupe_lat_seconds_sum 0\n"
	         "troupe_lat_seconds_count 0\n");
	check_valid(b.b);
	buf_free(&b);
	metrics_free(m);
}

/* Families render grouped, in order of first use, whatever the order of
 * series creation. */
static void
t_grouping(void)
{
	struct metrics *m = metrics_new();
	struct buf b = {0};
	uint64_t *a1, *a2;
	double *g;

	a1 = metrics_counter(m, "a_total", "A.", "k=\"1\"");
	g = metrics_gauge(m, "b", "B.", "k=\"1\"");
	a2 = metrics_counter(m, "a_total", "A.", "k=\"2\"");
	T_ASSERT(a1 && a2 && g && a1 != a2);
	*a2 = 7;
	*g = -2.25;
	render(m, &b);
	T_EQ_STR(b.b, "# HELP a_total A.\n"
	              "# TYPE a_total counter\n"
	              "a_total{k=\"1\"} 0\n"
	              "a_total{k=\"2\"} 7\n"
	              "# HELP b B.\n"
	              "# TYPE b gauge\n"
	              "b{k=\"1\"} -2.25\n");
	check_valid(b.b);
	buf_free(&b);
	metrics_free(m);
}

static void
t_same_pointer(void)
{
	struct metrics *m = metrics_new();
	uint64_t *c;
	double *g;
	struct histo *h;

	c = metrics_counter(m, "c_total", "C.", "x=\"1\"");
	T_ASSERT(c != NULL);
	T_ASSERT(metrics_counter(m, "c_total", "other help", "x=\"1\"") == c);
	T_ASSERT(metrics_counter(m, "c_total", "C.", "x=\"2\"") != c);
	T_ASSERT(metrics_counter(m, "c_total", "C.", NULL) ==
	         metrics_counter(m, "c_total", "C.", ""));
	g = metrics_gauge(m, "g", "G.", "");
	T_ASSERT(g != NULL && metrics_gauge(m, "g", "G.", "") == g);
	h = metrics_histo(m, "h_seconds", "H.", "a=\"b\"");
	T_ASSERT(h != NULL &&
	         metrics_histo(m, "h_seconds", "H.", "a=\"b\"") == h);
	/* A family keeps its type. */
	errno = 0;
	T_ASSERT(metrics_gauge(m, "c_total", "C.", "x=\"1\"") == NULL);
	T_EQ_INT(errno, EINVAL);
	T_ASSERT(metrics_gauge(m, "c_total", "C.", "x=\"9\"") == NULL);
	T_ASSERT(metrics_counter(m, "h_seconds", "H.", "") == NULL);
	metrics_free(m);
}

/* Names and label texts that would break the exposition are refused. */
static void
t_refused(void)
{
	struct metrics *m = metrics_new();
	static const char *const badlabels[] = {
	        "x",          "x=1",
	        "x=\"1",      "x=\"1\",",
	        ",x=\"1\"",   "1x=\"1\"",
	        "x=\"a\nb\"", "x=\"a\\tb\"",
	        "__x=\"1\"",  "x=\"1\",x=\"2\"",
	        "x=\"1\"}",   "x =\"1\""};
	static const char *const badnames[] = {"", "1abc", "a-b", "a b",
	                                       "a{b"};
	size_t i;

	for (i = 0; i < nitems(badlabels); i++)
		if (metrics_counter(m, "ok_total", "", badlabels[i]) != NULL)
			T_FAIL("labels '%s' accepted", badlabels[i]);
	for (i = 0; i < nitems(badnames); i++)
		if (metrics_counter(m, badnames[i], "", "") != NULL)
			T_FAIL("name '%s' accepted", badnames[i]);
	T_ASSERT(metrics_histo(m, "h", "", "le=\"1\"") == NULL);
	T_ASSERT(metrics_counter(m, "c:ok_total", "", "le=\"1\"") != NULL);
	T_ASSERT(metrics_counter(m, "ok_total", "",
	                         "a=\"q\\\"uo\\\\te\\n\",b=\"\"") != NULL);
	metrics_free(m);
}

/* Enough series and families to grow both tables: every pointer stays
 * findable and the output stays valid. */
static void
t_many(void)
{
	struct metrics *m = metrics_new();
	struct buf b = {0};
	uint64_t *p[2000];
	char fam[32], lab[32];
	size_t i, lines = 0;
	const char *s;

	for (i = 0; i < nitems(p); i++) {
		snprintf(fam, sizeof(fam), "f%zu_total", i % 100);
		snprintf(lab, sizeof(lab), "i=\"%zu\"", i);
		p[i] = metrics_counter(m, fam, "F.", lab);
		T_ASSERT(p[i] != NULL);
		*p[i] = i;
	}
	for (i = 0; i < nitems(p); i++) {
		snprintf(fam, sizeof(fam), "f%zu_total", i % 100);
		snprintf(lab, sizeof(lab), "i=\"%zu\"", i);
		T_ASSERT(metrics_counter(m, fam, "F.", lab) == p[i]);
	}
	render(m, &b);
	for (s = b.b; *s; s++)
		lines += *s == '\n';
	T_EQ_INT(lines, 2000 + 100 * 2);
	T_ASSERT(strstr(b.b, "f7_total{i=\"1907\"} 1907\n") != NULL);
	check_valid(b.b);
	buf_free(&b);
	metrics_free(m);
}

/* The checker itself catches what it claims to. */
static void
t_checker(void)
{
	static const char *const bad[] = {
	        "a 1",
	        "a 1\na 2\n",
	        "# TYPE a counter\n# TYPE a counter\na 1\n",
	        "a 1\nb 1\na{x=\"1\"} 2\n",
	        "a{x=\"1\",x=\"2\"} 1\n",
	        "a{x=\"\\t\"} 1\n",
	        "a one\n",
	        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
	        "h_bucket{le=\"+Inf\"} 1\nh_sum 0\nh_count 1\n",
	        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n",
	        "# TYPE h histogram\nh_bucket 2\n",
	        "# TYPE a summer\n",
	};
	char err[256];
	size_t i;

	for (i = 0; i < nitems(bad); i++)
		if (prom_check(bad[i], err, sizeof(err)) == 0)
			T_FAIL("checker accepted: %s", bad[i]);
	T_EQ_INT(prom_check("# HELP a x\n# TYPE a counter\na{b=\"\\\"\"} 1 "
	                    "123\n\n# random comment\nb NaN\n",
	                    err, sizeof(err)),
	         0);
}

T_TESTS = {
        {"counter", t_counter},
        {"gauge", t_gauge},
        {"histogram", t_histogram},
        {"grouping", t_grouping},
        {"same_pointer", t_same_pointer},
        {"refused", t_refused},
        {"many", t_many},
        {"checker", t_checker},
        {NULL, NULL},
};
T_MAIN
