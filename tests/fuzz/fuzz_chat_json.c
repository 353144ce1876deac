/* SPDX-License-Identifier: ISC */
/*
 * fuzz_chat_json: the JSON bodies and query strings of every chat route
 * the edge parses (services/edge/edge_req.c): /v1/bot/chat, /v3/chat, the
 * ids of /v3/chat/retrieve, message/list and cancel (query and body),
 * query parameters, and the W3C tracestate header.  The first byte picks
 * the parser.  Properties: what is accepted has the fields its contract
 * promises (non-empty ids, a query inside the body, ids of 1 to 32
 * digits; a tracestate of at most 512 printable bytes without spaces
 * around members, which passes the check again unchanged).
 */
#include <ctype.h>

#include "edge_req.h"
#include "fuzz.h"

static void
v1(const char *s, size_t n)
{
	struct edge_chat c;
	char msg[256];

	if (edge_chat_parse(s, n, &c, msg, sizeof(msg)) == 0) {
		fuzz_assert(c.bot_id_len > 0 && c.user_id_len > 0 &&
		            c.query_len > 0);
		edge_chat_free(&c);
	} else
		fuzz_assert(strlen(msg) > 0);
}

static void
v3(const char *s, size_t n)
{
	struct edge_v3chat c;
	char msg[256];

	if (edge_v3chat_parse(s, n, &c, msg, sizeof(msg)) == 0) {
		fuzz_assert(c.bot_id_len > 0 && c.user_id_len > 0);
		fuzz_assert(c.nmessages >= 1 &&
		            c.nmessages <= EDGE_V3_MESSAGES_MAX);
		fuzz_assert(c.messages != NULL &&
		            strlen(c.messages) == c.messages_len);
		edge_v3chat_free(&c);
	} else
		fuzz_assert(strlen(msg) > 0);
}

static void
tracestate(const char *s, size_t n)
{
	char out[EDGE_TRACESTATE_MAX], again[EDGE_TRACESTATE_MAX];
	size_t len = edge_tracestate(s, n, out);

	fuzz_assert(len <= EDGE_TRACESTATE_MAX);
	if (len == 0)
		return;
	fuzz_assert(out[0] != ' ' && out[len - 1] != ' ');
	for (size_t i = 0; i < len; i++)
		fuzz_assert(out[i] >= 0x20 && out[i] <= 0x7e);
	fuzz_assert(edge_tracestate(out, len, again) == len &&
	            memcmp(out, again, len) == 0);
}

static void
digits(const char *id)
{
	size_t n = strlen(id);

	fuzz_assert(n >= 1 && n <= EDGE_ID_MAX);
	for (size_t i = 0; i < n; i++)
		fuzz_assert(isdigit((unsigned char)id[i]));
}

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	struct edge_v3ids ids;
	char msg[256], out[64], *q, *b;
	size_t qn, bn;
	int sel;

	if (n < 1)
		return (0);
	sel = d[0] % 5;
	d++;
	n--;
	switch (sel) {
	case 0:
	case 1:
		if ((b = fuzz_strdup(d, n)) == NULL)
			return (0);
		(sel == 0 ? v1 : v3)(b, n);
		free(b);
		break;
	case 2: /* query string, newline, body */
		q = fuzz_field(&d, &n, '\n', &qn);
		b = fuzz_strdup(d, n);
		bn = n;
		if (q && b &&
		    edge_v3ids_parse(q, qn, bn ? b : NULL, bn, &ids, msg,
		                     sizeof(msg)) == 0) {
			digits(ids.conversation_id);
			digits(ids.chat_id);
		}
		free(q);
		free(b);
		break;
	case 4: /* a tracestate header value (lines joined by ',') */
		tracestate((const char *)d, n);
		break;
	default: /* a parameter name, newline, the query string */
		q = fuzz_field(&d, &n, '\n', &qn);
		b = fuzz_strdup(d, n);
		if (q && b && edge_query_get(b, n, q, out, sizeof(out)) == 1)
			fuzz_assert(strlen(out) < sizeof(out));
		free(q);
		free(b);
		break;
	}
	return (0);
}
