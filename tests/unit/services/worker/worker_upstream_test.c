/* SPDX-License-Identifier: ISC */
/*
 * Unit tests of services/worker/worker_upstream.c: the upstream URL, the
 * request JSON, the classification of answers, and the libcurl multi
 * client on a real loop against fake_upstream.h (127.0.0.1 only):
 * success, keep-alive reuse, the connection limit, errors, the body cap,
 * timeouts, refused connections, cancel, reconnection.
 */
#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "fake_upstream.h"
#include "t.h"
#include "worker_upstream.h"

/* --- the URL --- */

static void
check_url(const char *base, const char *want)
{
	struct buf b = {0};
	int rc = worker_upstream_url(&b, MSTR(base));

	if (want == NULL) {
		if (rc != -1)
			T_FAIL("url(\"%s\"): got \"%s\", want -1", base, b.b);
	} else {
		T_EQ_INT(rc, 0);
		T_EQ_STR(b.b, want);
		T_EQ_INT(b.len, strlen(want));
	}
	buf_free(&b);
}

static void
t_url(void)
{
	check_url("http://127.0.0.1:9090",
	          "http://127.0.0.1:9090/v1/chat/completions");
	check_url("http://127.0.0.1:9090/",
	          "http://127.0.0.1:9090/v1/chat/completions");
	check_url("http://127.0.0.1:9090//",
	          "http://127.0.0.1:9090/v1/chat/completions");
	check_url("http://127.0.0.1:9090/v1",
	          "http://127.0.0.1:9090/v1/chat/completions");
	check_url("http://127.0.0.1:9090/v1/",
	          "http://127.0.0.1:9090/v1/chat/completions");
	check_url("http://127.0.0.1:9090/openai/v1",
	          "http://127.0.0.1:9090/openai/v1/chat/completions");
	check_url("http://127.0.0.1:9090/v1/chat/completions",
	          "http://127.0.0.1:9090/v1/chat/completions");
	check_url("HTTPS://h.example/api",
	          "HTTPS://h.example/api/v1/chat/completions");
	check_url("", NULL);
	check_url("/", NULL);
	check_url("http://", NULL);
	check_url("ftp://127.0.0.1/", NULL);
	check_url("file:///etc/passwd", NULL);
	check_url("127.0.0.1:9090", NULL);
	check_url("http://127.0.0.1:9090/a b", NULL);
	check_url("http://127.0.0.1:9090/\r\nX: y", NULL);
}

/* --- the streaming request and the SSE parser --- */

static void
t_request_stream(void)
{
	struct buf b = {0};

	T_EQ_INT(worker_upstream_request_stream(
	                 &b, MSTR("m"), MSTR("sys"),
	                 MSTR("{\"role\":\"user\",\"content\":\"a\"},"),
	                 MSTR("[{\"role\":\"user\",\"type\":\"question\","
	                      "\"content\":\"q1\",\"content_type\":\"text\"},"
	                      "{\"role\":\"assistant\",\"content\":\"r\"},"
	                      "{\"role\":\"user\",\"content\":\"q\\\"2\"}]"),
	                 MSTR("ignored")),
	         0);
	T_EQ_MEM(b.b, b.len,
	         "{\"model\":\"m\",\"messages\":["
	         "{\"role\":\"system\",\"content\":\"sys\"},"
	         "{\"role\":\"user\",\"content\":\"a\"},"
	         "{\"role\":\"user\",\"content\":\"q1\"},"
	         "{\"role\":\"assistant\",\"content\":\"r\"},"
	         "{\"role\":\"user\",\"content\":\"q\\\"2\"}],"
	         "\"stream\":true,\"stream_options\":{\"include_usage\":true}"
	         "}");
	/* No usable messages: the query. */
	buf_reset(&b);
	T_EQ_INT(worker_upstream_request_stream(&b, MSTR("m"), MSTR_NULL,
	                                        MSTR_NULL, MSTR("[]"),
	                                        MSTR("hello")),
	         0);
	T_EQ_MEM(b.b, b.len,
	         "{\"model\":\"m\",\"messages\":["
	         "{\"role\":\"user\",\"content\":\"hello\"}],"
	         "\"stream\":true,\"stream_options\":{\"include_usage\":true}"
	         "}");
	buf_free(&b);
}

static const char sse_text[] =
        ": comment\r\n\r\n"
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\","
        "\"content\":\"Hel\"}}]}\r\n\r\n"
        "data:{\"choices\":[{\"delta\":{\"content\":\"lo \\u00e9\"}}]}\n\n"
        "event: x\rid: 1\r"
        "data: {\"choices\":[{\"delta\":{\"content\":null},"
        "\"finish_reason\":\"stop\"}]}\r\r"
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,"
        "\"completion_tokens\":2}}\n\n"
        "data: [DONE]\n\n"
        "data: {\"choices\":[{\"delta\":{\"content\":\"after\"}}]}\n\n";

static void
check_sse_parsed(struct upstream_sse *s)
{
	T_EQ_MEM(s->content.b, s->content.len, "Hello \xc3\xa9");
	T_EQ_INT(s->prompt_tokens, 4);
	T_EQ_INT(s->completion_tokens, 2);
	T_EQ_INT(s->done, 1);
	T_EQ_INT(s->finished, 1);
	T_EQ_INT(s->bad, 0);
	T_EQ_INT(s->events, 4);
}

static void
t_sse_whole(void)
{
	struct upstream_sse s = {0};

	T_EQ_INT(worker_upstream_sse_feed(&s, sse_text, sizeof(sse_text) - 1),
	         0);
	T_EQ_INT(worker_upstream_sse_end(&s), 0);
	check_sse_parsed(&s);
	worker_upstream_sse_free(&s);
}

static void
t_sse_split(void)
{
	size_t n = sizeof(sse_text) - 1;

	/* Every split point in two, and byte by byte (a CR and its LF in
	 * two feeds included). */
	for (size_t cut = 0; cut <= n; cut++) {
		struct upstream_sse s = {0};

		T_EQ_INT(worker_upstream_sse_feed(&s, sse_text, cut), 0);
		T_EQ_INT(worker_upstream_sse_feed(&s, sse_text + cut, n - cut),
		         0);
		T_EQ_INT(worker_upstream_sse_end(&s), 0);
		if (s.content.len != 8 || !s.done || s.events != 4)
			T_FAIL("split at %zu: got \"%.*s\" done %d events %u",
			       cut, (int)s.content.len, s.content.b, s.done,
			       s.events);
		worker_upstream_sse_free(&s);
	}
	{
		struct upstream_sse s = {0};

		for (size_t i = 0; i < n; i++)
			T_EQ_INT(worker_upstream_sse_feed(&s, sse_text + i, 1),
			         0);
		check_sse_parsed(&s);
		worker_upstream_sse_free(&s);
	}
}

static void
t_sse_no_final_blank(void)
{
	static const char t[] =
	        "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},"
	        "\"finish_reason\":\"stop\"}]}";
	struct upstream_sse s = {0};

	/* The stream ends without the blank line: the event still counts. */
	T_EQ_INT(worker_upstream_sse_feed(&s, t, sizeof(t) - 1), 0);
	T_EQ_INT(s.content.len, 0);
	T_EQ_INT(worker_upstream_sse_end(&s), 0);
	T_EQ_MEM(s.content.b, s.content.len, "x");
	T_EQ_INT(s.finished, 1);
	worker_upstream_sse_free(&s);
}

static void
t_sse_multiline_data(void)
{
	static const char t[] =
	        "data: {\"choices\":\n"
	        "data: [{\"delta\":{\"content\":\"ab\"}}]}\n\n";
	struct upstream_sse s = {0};

	T_EQ_INT(worker_upstream_sse_feed(&s, t, sizeof(t) - 1), 0);
	T_EQ_MEM(s.content.b, s.content.len, "ab");
	worker_upstream_sse_free(&s);
}

static void
t_sse_garbage(void)
{
	struct upstream_sse s = {0};
	static const char err[] =
	        "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";

	T_EQ_INT(worker_upstream_sse_feed(&s, "data: <html>\n\n", 14), -1);
	T_EQ_INT(s.bad, 1);
	/* Once bad, it stays so. */
	T_EQ_INT(worker_upstream_sse_feed(&s, "data: [DONE]\n\n", 14), -1);
	T_EQ_INT(s.done, 0);
	worker_upstream_sse_free(&s);

	memset(&s, 0, sizeof(s));
	T_EQ_INT(worker_upstream_sse_feed(&s, "data: [1,2]\n\n", 13), -1);
	T_EQ_INT(s.bad, 1);
	worker_upstream_sse_free(&s);

	memset(&s, 0, sizeof(s));
	T_EQ_INT(worker_upstream_sse_feed(&s, err, sizeof(err) - 1), -1);
	T_EQ_INT(s.bad, 1);
	T_EQ_STR(s.error, "overloaded");
	worker_upstream_sse_free(&s);
}

static void
t_sse_too_big(void)
{
	struct upstream_sse s = {.max = 16};
	static const char t[] =
	        "data: "
	        "{\"choices\":[{\"delta\":{\"content\":\"0123456789\"}}]}"
	        "\n\n";

	/* A line over max is refused before it is parsed. */
	T_EQ_INT(worker_upstream_sse_feed(&s, t, sizeof(t) - 1), -1);
	T_EQ_INT(s.toobig, 1);
	worker_upstream_sse_free(&s);

	/* Content over max, lines under it. */
	memset(&s, 0, sizeof(s));
	s.max = 60;
	T_EQ_INT(worker_upstream_sse_feed(&s, t, sizeof(t) - 1), 0);
	T_EQ_INT(s.content.len, 10);
	T_EQ_INT(worker_upstream_sse_feed(&s, t, sizeof(t) - 1), 0);
	T_EQ_INT(s.content.len, 20);
	/* The third piece would go over: refused, content kept. */
	s.max = 25;
	T_EQ_INT(worker_upstream_sse_feed(&s, t, sizeof(t) - 1), -1);
	T_EQ_INT(s.toobig, 1);
	T_EQ_INT(s.content.len, 20);
	worker_upstream_sse_free(&s);
}

/* --- the request JSON --- */

static void
t_request_exact(void)
{
	struct buf b = {0};

	T_EQ_INT(worker_upstream_request(
	                 &b, MSTR("gpt-x"), MSTR("be brief"),
	                 MSTR("{\"role\":\"user\",\"content\":\"a\"},"
	                      "{\"role\":\"assistant\",\"content\":\"b\"}"),
	                 MSTR("hello")),
	         0);
	T_EQ_MEM(b.b, b.len,
	         "{\"model\":\"gpt-x\",\"messages\":["
	         "{\"role\":\"system\",\"content\":\"be brief\"},"
	         "{\"role\":\"user\",\"content\":\"a\"},"
	         "{\"role\":\"assistant\",\"content\":\"b\"},"
	         "{\"role\":\"user\",\"content\":\"hello\"}],\"stream\":"
	         "false}");
	buf_free(&b);
}

static void
t_request_minimal(void)
{
	struct buf b = {0};

	/* No system prompt, no context: only the user's message. */
	T_EQ_INT(worker_upstream_request(&b, MSTR("m"), MSTR_NULL, MSTR_NULL,
	                                 MSTR("q")),
	         0);
	T_EQ_MEM(b.b, b.len,
	         "{\"model\":\"m\",\"messages\":["
	         "{\"role\":\"user\",\"content\":\"q\"}],\"stream\":false}");
	buf_free(&b);
}

static void
t_request_context_trimmed(void)
{
	struct buf b = {0};

	/* Stray blanks and commas around the context must not break the
	 * array. */
	T_EQ_INT(worker_upstream_request(
	                 &b, MSTR("m"), MSTR_NULL,
	                 MSTR(" ,{\"role\":\"user\",\"content\":\"a\"},\n"),
	                 MSTR("q")),
	         0);
	T_EQ_MEM(b.b, b.len,
	         "{\"model\":\"m\",\"messages\":["
	         "{\"role\":\"user\",\"content\":\"a\"},"
	         "{\"role\":\"user\",\"content\":\"q\"}],\"stream\":false}");
	buf_free(&b);
}

static void
t_request_escaping(void)
{
	static const char query[] = "say \"hi\"\\ \n\ttab \x01 \xc3\xa9 </x>";
	static const char sp[] = "line1\r\nline2 \"quoted\"";
	struct buf b = {0};
	cJSON *root, *msgs, *m;

	T_EQ_INT(worker_upstream_request(&b, MSTR("m\"x"), MSTR(sp), MSTR_NULL,
	                                 MSTR(query)),
	         0);
	T_EQ_INT(buf_add(&b, "", 1), 0);
	root = cJSON_Parse(b.b);
	if (root == NULL)
		T_FAIL("request is not JSON: %s", b.b);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(root, "model")->valuestring,
	         "m\"x");
	msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
	T_EQ_INT(cJSON_GetArraySize(msgs), 2);
	m = cJSON_GetArrayItem(msgs, 0);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(m, "role")->valuestring,
	         "system");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(m, "content")->valuestring,
	         sp);
	m = cJSON_GetArrayItem(msgs, 1);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(m, "content")->valuestring,
	         query);
	T_ASSERT(cJSON_IsFalse(
	        cJSON_GetObjectItemCaseSensitive(root, "stream")));
	cJSON_Delete(root);
	buf_free(&b);
}

/* --- classification --- */

static void
classify(struct upstream_answer *a, CURLcode rc, long http, const char *ra,
         int toobig, const char *body)
{
	T_EQ_INT(worker_upstream_classify(a, rc, http, ra, toobig, body,
	                                  strlen(body)),
	         0);
}

static void
t_classify_ok(void)
{
	struct upstream_answer a;

	classify(&a, CURLE_OK, 200, NULL, 0,
	         "{\"choices\":[{\"message\":{\"role\":\"assistant\","
	         "\"content\":\"4 \\\"x\\\"\\n\"}}],"
	         "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}");
	T_EQ_INT(a.status, 200);
	T_EQ_INT(a.code, 0);
	T_EQ_STR(a.msg, "");
	T_EQ_STR(a.content, "4 \"x\"\n");
	T_EQ_INT(a.content_len, 6);
	T_EQ_INT(a.prompt_tokens, 12);
	T_EQ_INT(a.completion_tokens, 3);
	T_EQ_INT(a.http_status, 200);
	free(a.content);

	/* Usage missing or odd: 0. */
	classify(&a, CURLE_OK, 201, NULL, 0,
	         "{\"choices\":[{\"message\":{\"content\":\"\"}}],"
	         "\"usage\":{\"prompt_tokens\":-4,\"completion_tokens\":\"7\"}"
	         "}");
	T_EQ_INT(a.status, 200);
	T_EQ_STR(a.content, "");
	T_EQ_INT(a.prompt_tokens, 0);
	T_EQ_INT(a.completion_tokens, 0);
	free(a.content);
}

static void
t_classify_transport(void)
{
	struct upstream_answer a;

	classify(&a, CURLE_OPERATION_TIMEDOUT, 0, NULL, 0, "");
	T_EQ_INT(a.status, 504);
	T_EQ_INT(a.code, 5040);
	T_EQ_STR(a.msg, "upstream deadline exceeded");
	T_ASSERT(a.content == NULL);

	classify(&a, CURLE_COULDNT_CONNECT, 0, NULL, 0, "");
	T_EQ_INT(a.status, 502);
	T_EQ_INT(a.code, 5020);
	T_ASSERT(strncmp(a.msg, "upstream unreachable: ", 22) == 0);
	T_ASSERT(strlen(a.msg) > 22);

	classify(&a, CURLE_RECV_ERROR, 0, NULL, 0, "");
	T_EQ_INT(a.status, 502);
	T_EQ_INT(a.code, 5020);
	T_ASSERT(strncmp(a.msg, "upstream unreachable: ", 22) == 0);

	/* Too large, whichever way curl noticed. */
	classify(&a, CURLE_WRITE_ERROR, 200, NULL, 1, "");
	T_EQ_INT(a.status, 502);
	T_EQ_STR(a.msg, "upstream answer too large");
	classify(&a, CURLE_FILESIZE_EXCEEDED, 0, NULL, 0, "");
	T_EQ_INT(a.status, 502);
	T_EQ_STR(a.msg, "upstream answer too large");
}

static void
t_classify_http(void)
{
	struct upstream_answer a;

	classify(&a, CURLE_OK, 429, "7", 0, "{}");
	T_EQ_INT(a.status, 503);
	T_EQ_INT(a.code, 5030);
	T_EQ_INT(a.retry_after, 7);
	T_EQ_STR(a.msg, "upstream rate limited");
	T_EQ_INT(a.http_status, 429);

	classify(&a, CURLE_OK, 429, NULL, 0, "");
	T_EQ_INT(a.status, 503);
	T_EQ_INT(a.retry_after, 1);

	classify(&a, CURLE_OK, 500, NULL, 0, "{\"choices\":[]}");
	T_EQ_INT(a.status, 502);
	T_EQ_INT(a.code, 5020);
	T_EQ_STR(a.msg, "upstream status 500");
	T_EQ_INT(a.retry_after, 0);

	/* a 503 is a throttle (overload), never a 502 */
	classify(&a, CURLE_OK, 503, "30", 0, "");
	T_EQ_INT(a.status, 503);
	T_EQ_INT(a.code, 5030);
	T_EQ_STR(a.msg, "upstream overloaded");
	T_EQ_INT(a.retry_after, 30);

	classify(&a, CURLE_OK, 302, NULL, 0, "");
	T_EQ_INT(a.status, 502);
	T_EQ_STR(a.msg, "upstream status 302");
}

static void
t_classify_invalid(void)
{
	static const char *bodies[] = {
	        "",
	        "<html>",
	        "{\"choices\":[]}",
	        "{\"choices\":{\"0\":{\"message\":{\"content\":\"x\"}}}}",
	        "{\"choices\":[{\"message\":{\"content\":null}}]}",
	        "{\"choices\":[{\"message\":{\"content\":5}}]}",
	        "{\"choices\":[{\"message\":{\"Content\":\"x\"}}]}",
	        "{\"choices\":[{\"text\":\"x\"}]}",
	        "{\"choices\":[{\"message\":{\"content\":\"x\"}}]} trailing",
	        "[1,2]",
	};
	struct upstream_answer a;

	for (size_t i = 0; i < nitems(bodies); i++) {
		classify(&a, CURLE_OK, 200, NULL, 0, bodies[i]);
		if (a.status != 502 ||
		    strcmp(a.msg, "upstream returned an invalid answer") != 0)
			T_FAIL("body %s: got %llu \"%s\", want 502 invalid",
			       bodies[i], (unsigned long long)a.status, a.msg);
		T_EQ_INT(a.code, 5020);
		T_ASSERT(a.content == NULL);
	}
}

static void
t_retry_after(void)
{
	char date[64];
	time_t t = time(NULL) + 120;
	struct tm tm;
	uint64_t v;

	T_EQ_INT(worker_upstream_retry_after(NULL), 1);
	T_EQ_INT(worker_upstream_retry_after(""), 1);
	T_EQ_INT(worker_upstream_retry_after("abc"), 1);
	T_EQ_INT(worker_upstream_retry_after("0"), 1);
	T_EQ_INT(worker_upstream_retry_after("7"), 7);
	T_EQ_INT(worker_upstream_retry_after(" 42 "), 42);
	T_EQ_INT(worker_upstream_retry_after("99999999999999999999"), 3600);
	gmtime_r(&t, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
	v = worker_upstream_retry_after(date);
	if (v < 115 || v > 121)
		T_FAIL("Retry-After \"%s\": got %llu, want ~120", date,
		       (unsigned long long)v);
	/* A date in the past: retry at once (1 s). */
	T_EQ_INT(worker_upstream_retry_after("Thu, 01 Jan 2015 00:00:00 GMT"),
	         1);
}

/* --- the client on a loop --- */

struct got {
	int n;
	struct upstream_answer a;
};

static void
on_done(void *arg, struct upstream_answer *a)
{
	struct got *g = arg;

	if (g->n > 0)
		free(g->a.content);
	g->n++;
	g->a = *a;
}

static struct loop *lp;
static struct fake_srv srv;
static struct upstream *up;

static void
setup(size_t max_body, long connections)
{
	struct upstream_conf c = {.connections = connections,
	                          .max_body = max_body,
	                          .connect_timeout_ms = 2000};

	if ((lp = loop_new()) == NULL)
		T_FAIL("loop_new");
	if (fake_start(&srv, lp) == -1)
		T_FAIL("fake server: %s", strerror(errno));
	if ((up = worker_upstream_new(lp, &c)) == NULL)
		T_FAIL("worker_upstream_new");
}

static void
teardown(void)
{
	worker_upstream_free(up);
	fake_stop(&srv);
	loop_free(lp);
}

static void
wait_for(const int *n, int want, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms;

	while (*n < want && now_mono_ms() < until)
		(void)loop_run_once(lp, 20);
}

/* Start one call to /<which>/v1/chat/completions on port. */
static struct upstream_call *
call(int port, const char *which, const char *tp, int64_t timeout_ms,
     struct got *g)
{
	char url[128];
	struct buf body = {0};
	struct upstream_call *c;

	snprintf(url, sizeof(url),
	         "http://127.0.0.1:%d/%s/v1/chat/completions", port, which);
	T_EQ_INT(worker_upstream_request(&body, MSTR("m"), MSTR_NULL,
	                                 MSTR_NULL, MSTR(which)),
	         0);
	c = worker_upstream_start(up, url, &body, tp ? MSTR(tp) : MSTR_NULL,
	                          MSTR_NULL, timeout_ms, on_done, g);
	T_ASSERT(c != NULL);
	T_ASSERT(body.b == NULL && body.len == 0); /* taken */
	return (c);
}

static void
t_loop_ok(void)
{
	static const char tp[] =
	        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
	struct got g = {0};

	setup(4096, 8);
	(void)call(srv.port, "ok", tp, 5000, &g);
	T_EQ_INT(worker_upstream_active(up), 1);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.n, 1);
	T_EQ_INT(g.a.status, 200);
	T_EQ_INT(g.a.http_status, 200);
	T_EQ_STR(g.a.content, "hi \"there\"");
	T_EQ_INT(g.a.prompt_tokens, 3);
	T_EQ_INT(g.a.completion_tokens, 5);
	T_ASSERT(g.a.elapsed_us > 0 && g.a.elapsed_us < 5000000);
	T_EQ_INT(worker_upstream_active(up), 0);
	/* What the server saw. */
	T_EQ_STR(srv.last_path, "/ok/v1/chat/completions");
	T_EQ_STR(srv.last_body.b,
	         "{\"model\":\"m\",\"messages\":["
	         "{\"role\":\"user\",\"content\":\"ok\"}],\"stream\":false}");
	T_ASSERT(strncmp(srv.last_head.b, "POST ", 5) == 0);
	T_ASSERT(strstr(srv.last_head.b, " HTTP/1.1\r\n") != NULL);
	T_ASSERT(strcasestr(srv.last_head.b,
	                    "\r\nContent-Type: application/json\r\n") != NULL);
	T_ASSERT(strcasestr(srv.last_head.b,
	                    "\r\ntraceparent: 00-0af7651916"
	                    "cd43dd8448eb211c80319c-b7ad6b7169"
	                    "203331-01\r\n") != NULL);
	T_ASSERT(strcasestr(srv.last_head.b, "\r\nExpect:") == NULL);
	free(g.a.content);
	teardown();
}

static void
t_loop_bad_traceparent(void)
{
	struct got g = {0};

	setup(4096, 8);
	(void)call(srv.port, "ok", "00-abc\r\nX-Evil: 1", 5000, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.a.status, 200);
	T_ASSERT(strcasestr(srv.last_head.b, "traceparent") == NULL);
	T_ASSERT(strcasestr(srv.last_head.b, "X-Evil") == NULL);
	free(g.a.content);
	teardown();
}

/* One call with traceparent tp and tracestate ts (a plugin POST if
 * post); what the server saw is in srv.last_head. */
static void
call_ts(const char *tp, const char *ts, int post)
{
	char url[128];
	struct buf body = {0};
	struct got g = {0};

	setup(4096, 8);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/%s", srv.port,
	         post ? "plug/ok" : "ok/v1/chat/completions");
	if (post)
		(void)buf_adds(&body, "{\"a\":1}");
	else
		T_EQ_INT(worker_upstream_request(&body, MSTR("m"), MSTR_NULL,
		                                 MSTR_NULL, MSTR("ok")),
		         0);
	if (post)
		T_ASSERT(worker_upstream_post(up, url, &body, MSTR(tp),
		                              MSTR(ts), NULL, 0, 5000, on_done,
		                              &g) != NULL);
	else
		T_ASSERT(worker_upstream_start(up, url, &body, MSTR(tp),
		                               MSTR(ts), 5000, on_done,
		                               &g) != NULL);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.a.status, 200);
	free(g.a.content);
}

static void
t_loop_tracestate(void)
{
	static const char tp[] =
	        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

	/* Sent with the traceparent, as given, to the LLM and a plugin. */
	for (int post = 0; post < 2; post++) {
		call_ts(tp, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", post);
		T_ASSERT(strcasestr(srv.last_head.b,
		                    "\r\ntraceparent: 00-0af7651916") != NULL);
		T_ASSERT(strcasestr(srv.last_head.b,
		                    "\r\ntracestate: rojo=00f067aa0ba902b7,"
		                    "congo=t61rcWkgMzE\r\n") != NULL);
		teardown();
	}
	/* Empty: no header.  Without a usable traceparent: none either. */
	call_ts(tp, "", 0);
	T_ASSERT(strcasestr(srv.last_head.b, "tracestate") == NULL);
	teardown();
	call_ts("", "rojo=1", 0);
	T_ASSERT(strcasestr(srv.last_head.b, "tracestate") == NULL);
	teardown();
	/* Not printable ASCII (a CR or LF above all): not sent. */
	call_ts(tp, "rojo=1\r\nX-Evil: 1", 1);
	T_ASSERT(strcasestr(srv.last_head.b, "tracestate") == NULL);
	T_ASSERT(strcasestr(srv.last_head.b, "X-Evil") == NULL);
	teardown();
}

static void
t_loop_keepalive(void)
{
	struct got g = {0};

	setup(4096, 8);
	for (int i = 0; i < 5; i++) {
		(void)call(srv.port, "ok", NULL, 5000, &g);
		wait_for(&g.n, i + 1, 5000);
		T_EQ_INT(g.n, i + 1);
		T_EQ_INT(g.a.status, 200);
	}
	T_EQ_INT(srv.requests, 5);
	T_EQ_INT(srv.accepted, 1); /* one connection, reused */
	free(g.a.content);
	teardown();
}

static void
t_loop_parallel_limit(void)
{
	struct got g[20];

	memset(g, 0, sizeof(g));
	setup(4096, 3);
	for (int i = 0; i < 20; i++)
		(void)call(srv.port, "ok", NULL, 5000, &g[i]);
	T_EQ_INT(worker_upstream_active(up), 20);
	T_EQ_INT(worker_upstream_queued(up), 17); /* ours, not curl's */
	for (int i = 0; i < 20; i++) {
		wait_for(&g[i].n, 1, 5000);
		T_EQ_INT(g[i].n, 1);
		T_EQ_INT(g[i].a.status, 200);
		free(g[i].a.content);
	}
	T_EQ_INT(srv.requests, 20);
	if (srv.accepted > 3)
		T_FAIL("connections: got %d, want at most 3", srv.accepted);
	T_EQ_INT(worker_upstream_active(up), 0);
	teardown();
}

static void
check_call(const char *which, size_t max_body, int64_t timeout_ms,
           uint64_t status, int64_t code, const char *msg)
{
	struct got g = {0};

	setup(max_body, 8);
	(void)call(srv.port, which, NULL, timeout_ms, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.n, 1);
	if (g.a.status != status || g.a.code != code ||
	    strncmp(g.a.msg, msg, strlen(msg)) != 0)
		T_FAIL("%s: got %llu/%lld \"%s\", want %llu/%lld \"%s\"",
		       which, (unsigned long long)g.a.status,
		       (long long)g.a.code, g.a.msg,
		       (unsigned long long)status, (long long)code, msg);
	T_ASSERT(g.a.content == NULL);
	T_EQ_INT(worker_upstream_active(up), 0);
	teardown();
}

static void
t_loop_errors(void)
{
	check_call("s500", 4096, 5000, 502, 5020, "upstream status 500");
	check_call("garbage", 4096, 5000, 502, 5020,
	           "upstream returned an invalid answer");
	check_call("nochoice", 4096, 5000, 502, 5020,
	           "upstream returned an invalid answer");
	check_call("big", 2048, 5000, 502, 5020, "upstream answer too large");
	check_call("bigchunk", 2048, 5000, 502, 5020,
	           "upstream answer too large");
	/* The same bodies fit under a larger cap (and are no chat). */
	check_call("bigchunk", 8192, 5000, 502, 5020,
	           "upstream returned an invalid answer");
}

static void
t_loop_429(void)
{
	struct got g = {0};

	setup(4096, 8);
	(void)call(srv.port, "r429", NULL, 5000, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.a.status, 503);
	T_EQ_INT(g.a.code, 5030);
	T_EQ_INT(g.a.retry_after, 7);
	T_EQ_INT(g.a.http_status, 429);
	teardown();
}

static void
t_loop_timeout(void)
{
	struct got g = {0};
	uint64_t t0;

	setup(4096, 8);
	t0 = now_mono_ms();
	(void)call(srv.port, "hang", NULL, 300, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.n, 1);
	T_EQ_INT(g.a.status, 504);
	T_EQ_INT(g.a.code, 5040);
	T_EQ_STR(g.a.msg, "upstream deadline exceeded");
	if (now_mono_ms() - t0 < 250 || now_mono_ms() - t0 > 2000)
		T_FAIL("timeout after %llu ms, want ~300",
		       (unsigned long long)(now_mono_ms() - t0));
	teardown();
}

static void
t_loop_refused(void)
{
	struct got g = {0};
	int port = fake_dead_port();

	T_ASSERT(port > 0);
	setup(4096, 8);
	(void)call(port, "ok", NULL, 5000, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.n, 1);
	T_EQ_INT(g.a.status, 502);
	T_EQ_INT(g.a.code, 5020);
	T_ASSERT(strncmp(g.a.msg, "upstream unreachable: ", 22) == 0);
	T_EQ_INT(g.a.http_status, 0);
	teardown();
}

static void
t_loop_cancel(void)
{
	struct got g = {0}, g2 = {0};
	struct upstream_call *c;

	setup(4096, 8);
	c = call(srv.port, "hang", NULL, 5000, &g);
	wait_for(&srv.requests, 1, 2000);
	T_EQ_INT(srv.requests, 1);
	worker_upstream_cancel(c);
	T_EQ_INT(worker_upstream_active(up), 0);
	/* The client still works, and the cancelled one never answers. */
	(void)call(srv.port, "ok", NULL, 5000, &g2);
	wait_for(&g2.n, 1, 5000);
	T_EQ_INT(g2.a.status, 200);
	T_EQ_INT(g.n, 0);
	free(g2.a.content);
	teardown();
}

static void
t_loop_reconnect(void)
{
	struct got g = {0};

	setup(4096, 8);
	(void)call(srv.port, "ok", NULL, 5000, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.a.status, 200);
	/* The upstream closes its idle keep-alive connection. */
	fake_drop_conns(&srv);
	(void)loop_run_once(lp, 20);
	(void)call(srv.port, "ok", NULL, 5000, &g);
	wait_for(&g.n, 2, 5000);
	T_EQ_INT(g.n, 2);
	T_EQ_INT(g.a.status, 200);
	T_EQ_INT(srv.accepted, 2);
	free(g.a.content);
	teardown();
}

static void
t_loop_queue_expired(void)
{
	struct got a = {0}, b = {0};
	uint64_t t0 = now_mono_ms();

	/* One connection, held by a call that hangs: the next one waits,
	 * its deadline passes meanwhile, and it is answered 504 without
	 * ever being sent. */
	setup(4096, 1);
	(void)call(srv.port, "hang", NULL, 600, &a);
	(void)call(srv.port, "ok", NULL, 100, &b);
	T_EQ_INT(worker_upstream_queued(up), 1);
	wait_for(&b.n, 1, 5000);
	T_EQ_INT(b.n, 1);
	T_EQ_INT(b.a.status, 504);
	T_EQ_INT(b.a.code, 5040);
	T_EQ_STR(b.a.msg, "upstream deadline exceeded");
	T_EQ_INT(a.n, 1);
	T_EQ_INT(a.a.status, 504);
	T_EQ_INT(srv.requests, 1);
	T_ASSERT(now_mono_ms() - t0 < 3000);
	T_EQ_INT(worker_upstream_active(up), 0);
	T_EQ_INT(worker_upstream_queued(up), 0);
	teardown();
}

static void
t_loop_queue_cancel(void)
{
	struct got a = {0}, b = {0}, c = {0};
	struct upstream_call *ca, *cb;

	setup(4096, 1);
	ca = call(srv.port, "hang", NULL, 5000, &a);
	cb = call(srv.port, "ok", NULL, 5000, &b);
	T_EQ_INT(worker_upstream_queued(up), 1);
	worker_upstream_cancel(cb);
	T_EQ_INT(worker_upstream_queued(up), 0);
	T_EQ_INT(worker_upstream_active(up), 1);
	wait_for(&srv.requests, 1, 2000);
	worker_upstream_cancel(ca);
	T_EQ_INT(worker_upstream_active(up), 0);
	(void)call(srv.port, "ok", NULL, 5000, &c);
	wait_for(&c.n, 1, 5000);
	T_EQ_INT(c.a.status, 200);
	T_EQ_INT(a.n, 0);
	T_EQ_INT(b.n, 0);
	free(c.a.content);
	teardown();
}

static void
t_loop_hosts_apart(void)
{
	struct fake_srv other;
	struct got a = {0}, b = {0};

	/* The per-host limit is per host: a busy one holds up no other. */
	setup(4096, 1);
	T_EQ_INT(fake_start(&other, lp), 0);
	(void)call(srv.port, "hang", NULL, 3000, &a);
	(void)call(other.port, "ok", NULL, 3000, &b);
	T_EQ_INT(worker_upstream_queued(up), 0);
	wait_for(&b.n, 1, 2000);
	T_EQ_INT(b.n, 1);
	T_EQ_INT(b.a.status, 200);
	T_EQ_INT(a.n, 0);
	free(b.a.content);
	fake_stop(&other);
	teardown();
}

/* --- streaming calls --- */

struct sgot {
	int deltas;
	size_t lens[16];
	struct got g;
	struct upstream_call *cancel_me; /* cancel from the first delta */
};

static void
on_delta(void *arg, const char *content, size_t len)
{
	struct sgot *s = arg;

	(void)content;
	if (s->deltas < 16)
		s->lens[s->deltas] = len;
	s->deltas++;
	if (s->cancel_me != NULL) {
		worker_upstream_cancel(s->cancel_me);
		s->cancel_me = NULL;
	}
}

static void
on_sdone(void *arg, struct upstream_answer *a)
{
	struct sgot *s = arg;

	on_done(&s->g, a);
}

static struct upstream_call *
scall(const char *which, int64_t timeout_ms, struct sgot *s)
{
	char url[128];
	struct buf body = {0};
	struct upstream_call *c;

	snprintf(url, sizeof(url),
	         "http://127.0.0.1:%d/%s/v1/chat/completions", srv.port,
	         which);
	T_EQ_INT(worker_upstream_request_stream(&body, MSTR("m"), MSTR_NULL,
	                                        MSTR_NULL, MSTR_NULL,
	                                        MSTR(which)),
	         0);
	c = worker_upstream_start_stream(up, url, &body, MSTR_NULL, MSTR_NULL,
	                                 timeout_ms, on_delta, on_sdone, s);
	T_ASSERT(c != NULL);
	return (c);
}

static void
t_stream_ok(void)
{
	struct sgot s = {0};

	setup(4096, 8);
	(void)scall("sse", 5000, &s);
	wait_for(&s.g.n, 1, 5000);
	T_EQ_INT(s.g.n, 1);
	T_EQ_INT(s.g.a.status, 200);
	T_EQ_STR(s.g.a.content, "Hello");
	T_EQ_INT(s.g.a.content_len, 5);
	T_EQ_INT(s.g.a.prompt_tokens, 4);
	T_EQ_INT(s.g.a.completion_tokens, 2);
	T_ASSERT(s.deltas >= 1);
	T_EQ_INT(s.lens[s.deltas - 1], 5); /* before done, all of it */
	T_ASSERT(strcasestr(srv.last_head.b,
	                    "\r\nAccept: text/event-stream\r\n") != NULL);
	T_ASSERT(strstr(srv.last_body.b, "\"stream\":true") != NULL);
	free(s.g.a.content);
	T_EQ_INT(worker_upstream_active(up), 0);
	teardown();
}

static void
t_stream_two_turns(void)
{
	struct sgot s = {0};
	uint64_t t0 = now_mono_ms();

	setup(4096, 8);
	(void)scall("sseslow", 5000, &s);
	wait_for(&s.deltas, 1, 2000);
	T_EQ_INT(s.deltas, 1);
	T_EQ_INT(s.lens[0], 3); /* "Hel" */
	T_EQ_INT(s.g.n, 0);
	wait_for(&s.g.n, 1, 3000);
	T_EQ_INT(s.deltas, 2);
	T_EQ_INT(s.lens[1], 5);
	T_EQ_STR(s.g.a.content, "Hello");
	T_ASSERT(now_mono_ms() - t0 >= 150);
	free(s.g.a.content);
	teardown();
}

static void
t_stream_errors(void)
{
	static const struct {
		const char *which;
		uint64_t status;
		const char *msg;
		const char *content;
	} cases[] = {
	        {"ssegarbage", 502, "upstream returned an invalid answer",
	         NULL},
	        {"sseerr", 502, "upstream error: overloaded", NULL},
	        {"sseearly", 502, "upstream stream ended early", "Hel"},
	        {"ok", 502, "upstream returned an invalid answer", NULL},
	        {"s500", 502, "upstream status 500", NULL},
	        {"r429", 503, "upstream rate limited", NULL},
	};

	setup(4096, 8);
	for (size_t i = 0; i < nitems(cases); i++) {
		struct sgot s = {0};

		(void)scall(cases[i].which, 5000, &s);
		wait_for(&s.g.n, 1, 5000);
		T_EQ_INT(s.g.n, 1);
		if (s.g.a.status != cases[i].status ||
		    strcmp(s.g.a.msg, cases[i].msg) != 0)
			T_FAIL("%s: got %llu \"%s\", want %llu \"%s\"",
			       cases[i].which,
			       (unsigned long long)s.g.a.status, s.g.a.msg,
			       (unsigned long long)cases[i].status,
			       cases[i].msg);
		if (cases[i].content != NULL)
			T_EQ_STR(s.g.a.content, cases[i].content);
		else
			T_ASSERT(s.g.a.content == NULL);
		T_EQ_INT(s.deltas, cases[i].content ? 1 : 0);
		free(s.g.a.content);
	}
	teardown();
}

static void
t_stream_cut(void)
{
	struct sgot s = {0};

	setup(4096, 8);
	(void)scall("ssecut", 5000, &s);
	wait_for(&s.g.n, 1, 5000);
	T_EQ_INT(s.g.a.status, 502);
	T_ASSERT(strncmp(s.g.a.msg, "upstream unreachable: ", 22) == 0);
	T_EQ_STR(s.g.a.content, "Hel"); /* what the client saw */
	free(s.g.a.content);
	teardown();
}

static void
t_stream_timeout(void)
{
	struct sgot s = {0};

	setup(4096, 8);
	(void)scall("ssehang", 300, &s);
	wait_for(&s.g.n, 1, 3000);
	T_EQ_INT(s.deltas, 1);
	T_EQ_INT(s.g.a.status, 504);
	T_EQ_STR(s.g.a.msg, "upstream deadline exceeded");
	T_EQ_STR(s.g.a.content, "Hel");
	free(s.g.a.content);
	teardown();
}

static void
t_stream_cancel_in_delta(void)
{
	struct sgot s = {0}, s2 = {0};

	/* The delta callback cancels its own call: no done, no crash, and
	 * the client goes on. */
	setup(4096, 8);
	s.cancel_me = scall("ssehang", 5000, &s);
	wait_for(&s.deltas, 1, 3000);
	T_EQ_INT(s.deltas, 1);
	T_EQ_INT(worker_upstream_active(up), 0);
	(void)scall("sse", 5000, &s2);
	wait_for(&s2.g.n, 1, 3000);
	T_EQ_STR(s2.g.a.content, "Hello");
	T_EQ_INT(s.g.n, 0);
	free(s2.g.a.content);
	teardown();
}

static void
t_stream_too_big(void)
{
	struct sgot s = {0};

	setup(2, 8); /* max_body 2: "Hel" is over */
	(void)scall("sse", 5000, &s);
	wait_for(&s.g.n, 1, 3000);
	T_EQ_INT(s.g.a.status, 502);
	T_EQ_STR(s.g.a.msg, "upstream answer too large");
	T_EQ_INT(s.deltas, 0);
	free(s.g.a.content);
	teardown();
}

/* --- tool calls in a stream, plugin calls --- */

static const char tool_text[] =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
        "\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_a\","
        "\"type\":\"function\",\"function\":{\"name\":\"we\","
        "\"arguments\":\"\"}}]}}]}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
        "\"index\":0,\"id\":\"call_a\",\"function\":{\"name\":\"ather\","
        "\"arguments\":\"{\\\"ci\"}}]}}]}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
        "\"index\":1,\"id\":\"call_b\",\"function\":{\"name\":\"time\","
        "\"arguments\":\"{}\"}},{\"index\":0,\"function\":{\"arguments\":"
        "\"ty\\\":\\\"Paris\\\"}\"}}]}}]}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":"
        "\"tool_calls\"}]}\n\n"
        "data: [DONE]\n\n";

static void
check_tools_parsed(const struct upstream_sse *s)
{
	T_EQ_INT(s->ntools, 2);
	T_EQ_MEM(s->tools[0].id.b, s->tools[0].id.len, "call_a");
	T_EQ_MEM(s->tools[0].name.b, s->tools[0].name.len, "weather");
	T_EQ_MEM(s->tools[0].args.b, s->tools[0].args.len,
	         "{\"city\":\"Paris\"}");
	T_EQ_MEM(s->tools[1].id.b, s->tools[1].id.len, "call_b");
	T_EQ_MEM(s->tools[1].name.b, s->tools[1].name.len, "time");
	T_EQ_MEM(s->tools[1].args.b, s->tools[1].args.len, "{}");
	T_EQ_INT(s->content.len, 0);
	T_ASSERT(s->finished && s->done);
	T_EQ_INT(s->progress, 4);
}

static const char bad_index[] =
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{"
        "\"index\":32,\"function\":{\"name\":\"x\"}}]}}]}\n\n";

static void
t_sse_tools(void)
{
	struct upstream_sse s;
	size_t n = sizeof(tool_text) - 1;

	memset(&s, 0, sizeof(s));
	T_EQ_INT(worker_upstream_sse_feed(&s, tool_text, n), 0);
	T_EQ_INT(worker_upstream_sse_end(&s), 0);
	check_tools_parsed(&s);
	worker_upstream_sse_free(&s);
	/* Byte by byte: the same calls. */
	memset(&s, 0, sizeof(s));
	for (size_t i = 0; i < n; i++)
		T_EQ_INT(worker_upstream_sse_feed(&s, tool_text + i, 1), 0);
	check_tools_parsed(&s);
	worker_upstream_sse_free(&s);
	/* An index out of range is a broken stream. */
	memset(&s, 0, sizeof(s));
	T_EQ_INT(
	        worker_upstream_sse_feed(&s, bad_index, sizeof(bad_index) - 1),
	        -1);
	T_EQ_INT(s.bad, 1);
	worker_upstream_sse_free(&s);
	/* Arguments count against the cap. */
	memset(&s, 0, sizeof(s));
	s.max = 8;
	T_EQ_INT(worker_upstream_sse_feed(&s, tool_text, n), -1);
	T_EQ_INT(s.toobig, 1);
	worker_upstream_sse_free(&s);
}

static void
t_request_tail(void)
{
	struct buf b = {0};

	T_EQ_INT(worker_upstream_request_head(&b, MSTR("m"), MSTR_NULL,
	                                      MSTR_NULL, MSTR_NULL, MSTR("q")),
	         0);
	T_EQ_INT(worker_upstream_request_tail(
	                 &b, MSTR("{\"role\":\"tool\",\"content\":\"r\"}"),
	                 MSTR("[{\"type\":\"function\"}]")),
	         0);
	(void)buf_add(&b, "", 1);
	T_EQ_STR(b.b, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
	              "\"content\":\"q\"},{\"role\":\"tool\",\"content\":"
	              "\"r\"}],\"tools\":[{\"type\":\"function\"}],\"stream\":"
	              "true,\"stream_options\":{\"include_usage\":true}}");
	buf_free(&b);
}

static void
post(const char *which, const char *const *hdrs, size_t nh, int64_t timeout_ms,
     struct got *g)
{
	char url[128];
	struct buf body = {0};

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/plug/%s", srv.port,
	         which);
	(void)buf_adds(&body, "{\"a\":1}");
	T_ASSERT(worker_upstream_post(up, url, &body, MSTR_NULL, MSTR_NULL,
	                              hdrs, nh, timeout_ms, on_done,
	                              g) != NULL);
	T_EQ_INT(body.len, 0);
}

static void
t_post(void)
{
	static const char *const hdrs[] = {"X-One: 1", "X-Two: two"};
	struct got g = {0};

	setup(4096, 8);
	post("ok", hdrs, 2, 5000, &g);
	wait_for(&g.n, 1, 5000);
	T_EQ_INT(g.a.status, 200);
	T_EQ_STR(g.a.content, "{\"echo\":{\"a\":1}}");
	T_EQ_INT(g.a.content_len, 16);
	T_EQ_STR(srv.reqs[0].body.b, "{\"a\":1}");
	T_ASSERT(strstr(srv.reqs[0].head.b, "\r\nX-One: 1\r\n") != NULL);
	T_ASSERT(strstr(srv.reqs[0].head.b, "\r\nX-Two: two\r\n") != NULL);
	T_ASSERT(strcasestr(srv.reqs[0].head.b,
	                    "\r\nContent-Type: application/json\r\n") != NULL);
	/* A call without extra headers sends none of the last call's. */
	post("ok", NULL, 0, 5000, &g);
	wait_for(&g.n, 2, 5000);
	T_EQ_INT(g.a.status, 200);
	T_ASSERT(strstr(srv.reqs[1].head.b, "X-One") == NULL);
	post("s500", NULL, 0, 5000, &g);
	wait_for(&g.n, 3, 5000);
	T_EQ_INT(g.a.status, 502);
	T_EQ_STR(g.a.msg, "answered status 500");
	T_ASSERT(g.a.content == NULL);
	post("garbage", NULL, 0, 5000, &g);
	wait_for(&g.n, 4, 5000);
	T_EQ_INT(g.a.status, 502);
	T_EQ_STR(g.a.msg, "answered invalid JSON");
	post("hang", NULL, 0, 150, &g);
	wait_for(&g.n, 5, 5000);
	T_EQ_INT(g.a.status, 504);
	T_EQ_STR(g.a.msg, "timed out");
	T_EQ_INT(worker_upstream_active(up), 0);
	teardown();
}

/* Coze business codes in error bodies: top level or under "error";
 * OpenAI's string codes are not numbers; garbage is no code. */
static void
t_coze_code(void)
{
	int64_t c = 0;

	T_EQ_INT(worker_upstream_coze_code("{\"code\":4009,\"msg\":\"x\"}", 31,
	                                   &c),
	         0);
	T_EQ_INT(c, 4009);
	T_EQ_INT(worker_upstream_coze_code("{\"error\":{\"code\":\"4013\"}}",
	                                   25, &c),
	         0);
	T_EQ_INT(c, 4013);
	T_EQ_INT(worker_upstream_coze_code(
	                 "{\"error\":{\"code\":\"rate_limit_exceeded\"}}", 40,
	                 &c),
	         -1);
	T_EQ_INT(worker_upstream_coze_code("<html>", 6, &c), -1);
	T_EQ_INT(worker_upstream_coze_code("{\"code\":1e300}", 14, &c), -1);
	T_EQ_INT(worker_upstream_coze_code(NULL, 0, &c), -1);
}

T_TESTS = {
        {"coze_code", t_coze_code},
        {"url", t_url},
        {"request_exact", t_request_exact},
        {"request_minimal", t_request_minimal},
        {"request_context_trimmed", t_request_context_trimmed},
        {"request_escaping", t_request_escaping},
        {"classify_ok", t_classify_ok},
        {"classify_transport", t_classify_transport},
        {"classify_http", t_classify_http},
        {"classify_invalid", t_classify_invalid},
        {"retry_after", t_retry_after},
        {"loop_ok", t_loop_ok},
        {"loop_bad_traceparent", t_loop_bad_traceparent},
        {"loop_tracestate", t_loop_tracestate},
        {"loop_keepalive", t_loop_keepalive},
        {"loop_parallel_limit", t_loop_parallel_limit},
        {"loop_errors", t_loop_errors},
        {"loop_429", t_loop_429},
        {"loop_timeout", t_loop_timeout},
        {"loop_refused", t_loop_refused},
        {"loop_cancel", t_loop_cancel},
        {"loop_reconnect", t_loop_reconnect},
        {"loop_queue_expired", t_loop_queue_expired},
        {"loop_queue_cancel", t_loop_queue_cancel},
        {"loop_hosts_apart", t_loop_hosts_apart},
        {"request_stream", t_request_stream},
        {"sse_whole", t_sse_whole},
        {"sse_split", t_sse_split},
        {"sse_no_final_blank", t_sse_no_final_blank},
        {"sse_multiline_data", t_sse_multiline_data},
        {"sse_garbage", t_sse_garbage},
        {"sse_too_big", t_sse_too_big},
        {"stream_ok", t_stream_ok},
        {"stream_two_turns", t_stream_two_turns},
        {"stream_errors", t_stream_errors},
        {"stream_cut", t_stream_cut},
        {"stream_timeout", t_stream_timeout},
        {"stream_cancel_in_delta", t_stream_cancel_in_delta},
        {"stream_too_big", t_stream_too_big},
        {"sse_tools", t_sse_tools},
        {"request_tail", t_request_tail},
        {"post", t_post},
        {NULL, NULL},
};
T_MAIN
