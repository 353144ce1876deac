/* SPDX-License-Identifier: ISC */
/*
 * Tests of services/auth/auth_limit.c without a process: [limits] parsing
 * (defaults, per-route overrides, env overrides, bad values), the key and
 * the RateLimit field values, and the table of parked checks (match by
 * request id and key, oldest first, overdue, the park bound).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth_limit.h"
#include "conf.h"
#include "t.h"

static char path[64];

static void
load(const char *text)
{
	char err[256];
	FILE *f;

	snprintf(path, sizeof(path), "/tmp/auth-limit-test-XXXXXX");
	{
		int fd = mkstemp(path);
		T_ASSERT(fd != -1);
		close(fd);
	}
	T_ASSERT((f = fopen(path, "w")) != NULL);
	fputs(text, f);
	fclose(f);
	conf_free();
	if (conf_load(path, 0, err, sizeof(err)) == -1)
		T_FAIL("conf_load: %s", err);
	unlink(path);
}

static void
t_conf(void)
{
	struct auth_limit_conf c;
	char err[256];

	/* Defaults: enforce, no rate anywhere (no round trip), open. */
	load("[auth]\nx = 1\n");
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), 0);
	T_EQ_INT(c.mode, AUTH_LIMIT_ENFORCE);
	T_EQ_INT(c.fail_open, 1);
	T_EQ_INT(c.check_ms, 50);
	T_EQ_INT(c.park_max, 10000);
	for (int r = 0; r < AUTH_LIMIT_NROUTES; r++) {
		T_ASSERT(auth_limit_rate(&c, r) == NULL);
		T_EQ_INT(c.route[r].window_ms, 1000);
	}

	load("[limits]\nmode = shadow\nrate = 10\nwindow_ms = 2000\n"
	     "burst = 3\nrate.v3.chat = 5\nburst.v3.chat = 0\n"
	     "rate.v3.list = 0\non_redis_down = closed\ncheck_ms = 20\n");
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), 0);
	T_EQ_INT(c.mode, AUTH_LIMIT_SHADOW);
	T_EQ_INT(c.fail_open, 0);
	T_EQ_INT(c.check_ms, 20);
	T_EQ_INT(auth_limit_route(MSTR_LIT("v1.chat")), 0);
	T_EQ_INT(auth_limit_route(MSTR_LIT("v3.chat")), 1);
	T_EQ_INT(auth_limit_route(MSTR_LIT("v3.list")), 3);
	T_EQ_INT(auth_limit_route(MSTR_LIT("webhook.execute")), 5);
	T_EQ_INT(auth_limit_route(MSTR_LIT("v9.chat")), -1);
	T_ASSERT(auth_limit_rate(&c, -1) == NULL);
	T_EQ_INT(auth_limit_rate(&c, 0)->rate, 10);
	T_EQ_INT(auth_limit_rate(&c, 0)->window_ms, 2000);
	T_EQ_INT(auth_limit_rate(&c, 0)->burst, 3);
	T_EQ_INT(auth_limit_rate(&c, 1)->rate, 5);
	T_EQ_INT(auth_limit_rate(&c, 1)->window_ms, 2000);
	T_EQ_INT(auth_limit_rate(&c, 1)->burst, 0);
	T_ASSERT(auth_limit_rate(&c, 3) == NULL);

	/* The environment wins, dots as underscores. */
	setenv("TROUPE_LIMITS_RATE_V3_CHAT", "7", 1);
	setenv("TROUPE_LIMITS_MODE", "off", 1);
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), 0);
	T_EQ_INT(c.route[1].rate, 7);
	T_ASSERT(auth_limit_rate(&c, 1) == NULL); /* off: nothing */
	unsetenv("TROUPE_LIMITS_RATE_V3_CHAT");
	unsetenv("TROUPE_LIMITS_MODE");

	load("[limits]\nmode = maybe\n");
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), -1);
	T_EQ_STR(err, "[limits] mode: \"maybe\": want off, shadow or "
	              "enforce");
	load("[limits]\non_redis_down = later\n");
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), -1);
	T_EQ_STR(err, "[limits] on_redis_down: \"later\": want open or "
	              "closed");
	load("[limits]\nrate.v1.chat = -1\n");
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), -1);
	load("[limits]\nwindow_ms = 0\n");
	T_EQ_INT(auth_limit_conf_read(&c, err, sizeof(err)), -1);
	conf_free();
}

static void
t_fields(void)
{
	struct auth_limit_rate lr = {
	        .rate = 100, .window_ms = 1500, .burst = 5};
	char b[AUTH_LIMIT_KEY_MAX + 1], big[600];
	int n;

	n = auth_limit_key(b, MSTR_LIT("user-1"), MSTR_LIT("bot-9"),
	                   "v3.chat");
	T_EQ_INT(n, 20);
	T_EQ_STR(b, "user-1|bot-9|v3.chat");
	memset(big, 'x', sizeof(big));
	T_EQ_INT(auth_limit_key(b, (struct mstr){big, 504}, MSTR_LIT("b"),
	                        "v1.chat"),
	         -1);
	T_ASSERT(auth_limit_policy(b, sizeof(b), "v3.chat", &lr) > 0);
	T_EQ_STR(b, "\"v3.chat\";q=100;w=2");
	lr.window_ms = 60000;
	T_ASSERT(auth_limit_policy(b, sizeof(b), "v1.chat", &lr) > 0);
	T_EQ_STR(b, "\"v1.chat\";q=100;w=60");
	lr.window_ms = 10;
	T_ASSERT(auth_limit_policy(b, sizeof(b), "v1.chat", &lr) > 0);
	T_EQ_STR(b, "\"v1.chat\";q=100;w=1");
	T_ASSERT(auth_limit_field(b, sizeof(b), "v1.chat", 0, 1001) > 0);
	T_EQ_STR(b, "\"v1.chat\";r=0;t=2");
	T_ASSERT(auth_limit_field(b, sizeof(b), "v1.chat", 7, 0) > 0);
	T_EQ_STR(b, "\"v1.chat\";r=7;t=0");
	T_EQ_INT(auth_limit_field(b, 8, "v1.chat", 7, 0), -1);
	T_EQ_INT(auth_limit_retry_s(0), 1);
	T_EQ_INT(auth_limit_retry_s(1), 1);
	T_EQ_INT(auth_limit_retry_s(1000), 1);
	T_EQ_INT(auth_limit_retry_s(1001), 2);
}

static struct msg_head
hd(const char *reqid)
{
	struct msg_head h = {
	        .reqid = MSTR(reqid),
	        .traceparent = MSTR_LIT("00-aa-bb-01"),
	        .deadline_ms = 99,
	};

	return (h);
}

static void
t_table(void)
{
	struct auth_limit_conf c = {
	        .mode = AUTH_LIMIT_ENFORCE, .check_ms = 50, .park_max = 3};
	struct auth_limits lt;
	struct auth_lim *l, *a, *b;
	struct msg_head h;

	T_EQ_INT(auth_limits_init(&lt, &c), 0);
	T_EQ_INT(auth_limits_next(&lt), 0);
	h = hd("r1");
	a = auth_limits_park(&lt, &h, "edge", 0, 0, MSTR_LIT("k1"),
	                     MSTR_LIT("sub"), MSTR_LIT("*"), "BODY", 4, 1000);
	T_ASSERT(a != NULL);
	T_EQ_INT(auth_limits_next(&lt), 1050);
	h = hd("r1");
	b = auth_limits_park(&lt, &h, "edge", 1, 0, MSTR_LIT("k2"),
	                     MSTR_LIT("sub"), MSTR_LIT("chat"), "X", 1, 1010);
	T_ASSERT(b != NULL);
	h = hd("r2");
	T_ASSERT(auth_limits_park(&lt, &h, "edge", 0, 1, MSTR_LIT("k1"),
	                          MSTR_LIT("s"), MSTR_LIT("*"), "IGNORED", 7,
	                          1020) != NULL);
	/* Full at park_max. */
	h = hd("r3");
	T_ASSERT(auth_limits_park(&lt, &h, "edge", 0, 0, MSTR_LIT("k3"),
	                          MSTR_LIT("s"), MSTR_LIT("*"), "", 0,
	                          1030) == NULL);
	/* Matched by reqid and key; the copy is whole. */
	T_ASSERT(auth_limits_take(&lt, MSTR_LIT("r1"), MSTR_LIT("k3")) ==
	         NULL);
	T_ASSERT(auth_limits_take(&lt, MSTR_LIT("r9"), MSTR_LIT("k1")) ==
	         NULL);
	l = auth_limits_take(&lt, MSTR_LIT("r1"), MSTR_LIT("k2"));
	T_ASSERT(l == b);
	T_EQ_MEM(l->l_body, l->l_body_len, "X");
	T_EQ_MEM(l->l_scopes.p, l->l_scopes.n, "chat");
	T_EQ_MEM(l->l_head.reqid.p, l->l_head.reqid.n, "r1");
	T_EQ_MEM(l->l_head.traceparent.p, l->l_head.traceparent.n,
	         "00-aa-bb-01");
	T_EQ_INT(l->l_head.deadline_ms, 99);
	T_EQ_STR(l->l_to, "edge");
	T_EQ_INT(l->l_route, 1);
	free(l);
	T_ASSERT(auth_limits_take(&lt, MSTR_LIT("r1"), MSTR_LIT("k2")) ==
	         NULL);
	/* Overdue, oldest first; a shadow entry keeps no body. */
	T_ASSERT(auth_limits_overdue(&lt, 1049) == NULL);
	l = auth_limits_overdue(&lt, 1100);
	T_ASSERT(l == a);
	T_EQ_MEM(l->l_body, l->l_body_len, "BODY");
	free(l);
	l = auth_limits_overdue(&lt, 1100);
	T_ASSERT(l != NULL && l->l_shadow == 1 && l->l_body_len == 0);
	free(l);
	T_ASSERT(auth_limits_overdue(&lt, 5000) == NULL);
	T_EQ_INT(lt.lt_count, 0);
	/* Room again; free with entries in. */
	h = hd("r4");
	T_ASSERT(auth_limits_park(&lt, &h, "edge", 0, 0, MSTR_LIT("k"),
	                          MSTR_LIT("s"), MSTR_LIT("*"), "", 0,
	                          2000) != NULL);
	auth_limits_free(&lt);
}

T_TESTS = {
        {"conf", t_conf},
        {"fields", t_fields},
        {"table", t_table},
        {NULL, NULL},
};
T_MAIN
