/* SPDX-License-Identifier: ISC */
/*
 * telemetry_otlp_test: the OTLP/HTTP JSON telemetry exports (parsed back
 * with cJSON: one resourceSpans per sender, service.name, hex ids,
 * parentSpanId only when there is a parent, times as strings, kind,
 * status, attributes) and the sampling decision.
 */
#include <string.h>

#include <cjson/cJSON.h>

#include "telemetry_otlp.h"
#include "trace.h"
#include "util.h"
#include "t.h"

#define TID "0af7651916cd43dd8448eb211c80319c"

static struct otlp_span *
mk(const char *svc, const char *sid, const char *pid,
   const struct trace_span *s)
{
	struct buf b = {0};
	struct otlp_span *o;

	T_EQ_INT(trace_rec_format(&b, TID, sid, pid, s), 0);
	T_ASSERT(b.len > 0 && b.b[b.len - 1] == '\n');
	o = otlp_span_new(MSTR(svc), b.b, b.len - 1);
	buf_free(&b);
	T_ASSERT(o != NULL);
	return (o);
}

static const cJSON *
get(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	if (v == NULL)
		T_FAIL("no member \"%s\"", k);
	return (v);
}

static const char *
attr(const cJSON *attrs, const char *key, const char *type)
{
	const cJSON *a;

	cJSON_ArrayForEach(a, attrs)
	{
		const cJSON *k = get(a, "key");
		if (strcmp(k->valuestring, key) == 0)
			return (get(get(a, "value"), type)->valuestring);
	}
	return (NULL);
}

static void
t_json(void)
{
	struct trace_span e = {.name = "edge",
	                       .kind = TRACE_SERVER,
	                       .start_ns = 1795327200000000001ULL,
	                       .end_ns = 1795327200005000000ULL,
	                       .http_status = 200,
	                       .flags = TRACE_F_LOCAL_ROOT,
	                       .route = MSTR_LIT("/v1/bot/chat")};
	struct trace_span a = {.name = "auth",
	                       .kind = TRACE_INTERNAL,
	                       .start_ns = 1795327200000100000ULL,
	                       .end_ns = 1795327200000200000ULL};
	struct trace_span u = {.name = "upstream",
	                       .kind = TRACE_CLIENT,
	                       .start_ns = 1795327200001000000ULL,
	                       .end_ns = 1795327200004000000ULL,
	                       .error = 1,
	                       .http_status = 503,
	                       .url = MSTR_LIT("http://127.0.0.1:9/\"x\"")};
	struct otlp_span *s1 = mk("edge", "00f067aa0ba902b7", "", &e);
	struct otlp_span *s2 =
	        mk("worker-2", "1111111111111111", "2222222222222222", &u);
	struct otlp_span *s3 =
	        mk("auth", "3333333333333333", "00f067aa0ba902b7", &a);
	struct otlp_span *s4 =
	        mk("worker-2", "4444444444444444", "2222222222222222", &u);
	struct buf b = {0};
	cJSON *root;
	const cJSON *rs, *r, *sp, *span;
	int nres = 0;

	s1->next = s2;
	s2->next = s3;
	s3->next = s4;
	T_EQ_INT(otlp_json(&b, s1, 4), 0);
	T_EQ_INT(buf_add(&b, "", 1), 0);
	root = cJSON_Parse(b.b);
	if (root == NULL)
		T_FAIL("not JSON: %s", b.b);
	rs = get(root, "resourceSpans");
	T_ASSERT(cJSON_IsArray(rs));
	T_EQ_INT(cJSON_GetArraySize(rs), 3); /* edge, worker-2, auth */
	cJSON_ArrayForEach(r, rs)
	{
		const cJSON *attrs = get(get(r, "resource"), "attributes");
		const char *name = attr(attrs, "service.name", "stringValue");
		const cJSON *ss = get(r, "scopeSpans");

		T_EQ_INT(cJSON_GetArraySize(ss), 1);
		sp = get(cJSON_GetArrayItem(ss, 0), "spans");
		nres++;
		if (strcmp(name, "troupe-edge") == 0) {
			T_EQ_INT(cJSON_GetArraySize(sp), 1);
			span = cJSON_GetArrayItem(sp, 0);
			T_EQ_STR(get(span, "traceId")->valuestring, TID);
			T_EQ_STR(get(span, "spanId")->valuestring,
			         "00f067aa0ba902b7");
			/* a root: no parentSpanId at all */
			T_ASSERT(cJSON_GetObjectItemCaseSensitive(
			                 span, "parentSpanId") == NULL);
			T_EQ_STR(get(span, "name")->valuestring, "edge");
			T_EQ_INT(get(span, "kind")->valueint, 2);
			T_EQ_STR(get(span, "startTimeUnixNano")->valuestring,
			         "1795327200000000001");
			T_EQ_STR(get(span, "endTimeUnixNano")->valuestring,
			         "1795327200005000000");
			T_EQ_STR(attr(get(span, "attributes"), "http.route",
			              "stringValue"),
			         "/v1/bot/chat");
			T_EQ_STR(attr(get(span, "attributes"),
			              "http.response.status_code", "intValue"),
			         "200");
			T_EQ_INT(get(get(span, "status"), "code")->valueint,
			         0);
		} else if (strcmp(name, "troupe-worker") == 0) {
			T_EQ_STR(attr(attrs, "service.instance.id",
			              "stringValue"),
			         "worker-2");
			T_EQ_INT(cJSON_GetArraySize(sp), 2);
			span = cJSON_GetArrayItem(sp, 1);
			T_EQ_STR(get(span, "spanId")->valuestring,
			         "4444444444444444");
			T_EQ_STR(get(span, "parentSpanId")->valuestring,
			         "2222222222222222");
			T_EQ_INT(get(span, "kind")->valueint, 3);
			T_EQ_STR(attr(get(span, "attributes"), "url.full",
			              "stringValue"),
			         "http://127.0.0.1:9/\"x\"");
			T_EQ_INT(get(get(span, "status"), "code")->valueint,
			         2);
		} else {
			T_EQ_STR(name, "troupe-auth");
			span = cJSON_GetArrayItem(sp, 0);
			T_EQ_STR(get(span, "parentSpanId")->valuestring,
			         "00f067aa0ba902b7");
			T_EQ_INT(get(span, "kind")->valueint, 1);
			/* no attributes: an empty array */
			T_EQ_INT(cJSON_GetArraySize(get(span, "attributes")),
			         0);
		}
		T_EQ_STR(get(get(cJSON_GetArrayItem(ss, 0), "scope"), "name")
		                 ->valuestring,
		         "troupe");
	}
	T_EQ_INT(nres, 3);
	cJSON_Delete(root);
	buf_free(&b);
	/* only the first n of the list */
	T_EQ_INT(otlp_json(&b, s1, 1), 0);
	T_EQ_INT(buf_add(&b, "", 1), 0);
	T_ASSERT(strstr(b.b, "auth") == NULL);
	T_ASSERT(strstr(b.b, "troupe-edge") != NULL);
	buf_free(&b);
	free(s1);
	free(s2);
	free(s3);
	free(s4);
}

static void
t_keep(void)
{
	struct otlp_sampling smp = {.rate = 0.0, .slow_ns = 2000000000ULL};
	struct trace_rec r = {.start_ns = 1000, .end_ns = 1000 + 5000000};

	T_EQ_INT(otlp_keep(&r, &smp, 0.0, 0.5), 0);
	T_EQ_INT(otlp_keep(&r, &smp, 0.6, 0.5), 1); /* the route's rate */
	T_EQ_INT(otlp_keep(&r, &smp, 0.4, 0.5), 0);
	r.http_status = 502;
	T_EQ_INT(otlp_keep(&r, &smp, 0.0, 0.99), 1); /* errors always */
	r.http_status = 200;
	r.error = 1;
	T_EQ_INT(otlp_keep(&r, &smp, 0.0, 0.99), 1);
	r.error = 0;
	r.end_ns = r.start_ns + 2000000000ULL;
	T_EQ_INT(otlp_keep(&r, &smp, 0.0, 0.99), 1); /* slow always */
	r.end_ns = r.start_ns + 1;
	r.flags = TRACE_F_SAMPLED;
	T_EQ_INT(otlp_keep(&r, &smp, 0.0, 0.99), 1); /* client asked */
}

T_TESTS = {
        {"json", t_json},
        {"keep", t_keep},
        {NULL, NULL},
};
T_MAIN
