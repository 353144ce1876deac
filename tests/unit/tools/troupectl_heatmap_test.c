/* SPDX-License-Identifier: ISC */
/*
 * troupectl_heatmap_test: the terminal rendering of an /api/heatmap
 * document (rows per bucket, highest first, a cell per second, shades
 * relative to the largest count) and the refusal of other documents.
 */
#include <stdio.h>
#include <string.h>

#include "troupectl_heatmap.h"
#include "util.h"
#include "t.h"

static void
t_shade(void)
{
	T_EQ_INT(heatmap_shade(0, 10), ' ');
	T_EQ_INT(heatmap_shade(10, 10), '@');
	T_EQ_INT(heatmap_shade(1, 1000), '.');
	T_ASSERT(heatmap_shade(500, 1000) != '@');
	T_ASSERT(strchr(" .:-=+*#%", heatmap_shade(500, 1000)) != NULL);
	/* more never shades lighter */
	for (uint64_t c = 1; c < 1000; c++)
		T_ASSERT(strchr(" .:-=+*#%@", heatmap_shade(c, 1000)) <=
		         strchr(" .:-=+*#%@", heatmap_shade(c + 1, 1000)));
}

/* A document of 3 seconds: second 0 has 4 events in bucket 3, second 2
 * has 1 in bucket 0; offcpu all zero. */
static void
doc(struct buf *b)
{
	buf_adds(b, "{\"service\":\"edge\",\"unit\":\"us\",\"since\":100,"
	            "\"now\":102,\"buckets\":[");
	for (int k = 0; k < 27; k++)
		buf_addf(b, "%s{\"lo_us\":%d,\"hi_us\":%d}", k ? "," : "",
		         k ? 1 << k : 0, 2 << k);
	buf_adds(b, "],\"seconds\":[");
	for (int i = 0; i < 3; i++) {
		buf_addf(b, "%s{\"t\":%d,\"runq\":[", i ? "," : "", 100 + i);
		for (int k = 0; k < 27; k++)
			buf_addf(b, "%s%d", k ? "," : "",
			         (i == 0 && k == 3) ? 4 : (i == 2 && k == 0));
		buf_adds(b, "],\"offcpu\":[");
		for (int k = 0; k < 27; k++)
			buf_addf(b, "%s0", k ? "," : "");
		buf_adds(b, "]}");
	}
	buf_adds(b, "]}");
	buf_add(b, "", 1);
}

static void
t_render(void)
{
	struct buf in = {0}, out = {0};
	char *lines[40], *p;
	int n = 0;

	doc(&in);
	T_EQ_INT(heatmap_render(&out, in.b, "runq", 0), 0);
	T_EQ_INT(buf_add(&out, "", 1), 0);
	for (p = strtok(out.b, "\n"); p && n < 40; p = strtok(NULL, "\n"))
		lines[n++] = p;
	T_EQ_INT(n, 1 + 27 + 1);
	T_ASSERT(strncmp(lines[0], "== edge (run-queue latency, 3 s, 5 events",
	                 41) == 0);
	/* rows are highest bucket first: bucket 3 (8us) is line 1+23 */
	T_EQ_STR(lines[1 + 26 - 3], "    8us |@  |");
	T_EQ_STR(lines[1 + 26 - 0], "    0us |  .|");
	T_EQ_STR(lines[1], "    67s |   |");
	buf_reset(&out);
	T_EQ_INT(heatmap_render(&out, in.b, "offcpu", 0), 0);
	T_EQ_INT(buf_add(&out, "", 1), 0);
	T_ASSERT(strstr(out.b, "off-CPU time, 3 s, 0 events") != NULL);
	T_ASSERT(strchr(out.b, '@') == NULL);
	buf_reset(&out);
	T_EQ_INT(heatmap_render(&out, in.b, "runq", 1), 0);
	T_ASSERT(strstr(out.b, "\033[48;5;") != NULL);
	T_EQ_INT(heatmap_render(&out, "{\"service\":\"x\"}", "runq", 0), -1);
	T_EQ_INT(heatmap_render(&out, "nope", "runq", 0), -1);
	buf_free(&in);
	buf_free(&out);
}

T_TESTS = {
        {"shade", t_shade},
        {"render", t_render},
        {NULL, NULL},
};
T_MAIN
