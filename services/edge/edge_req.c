/* SPDX-License-Identifier: ISC */
/*
 * edge_req: request ids, traceparents, tracestates, the chat body checks
 * (v1 and v3), query strings and answer JSON (see edge_req.h).  Callers:
 * edge_http.c and the unit test.  Pure: it never logs, never reads a
 * clock and never allocates except while parsing a chat body (cJSON, and
 * the normalised messages of a v3 chat).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "coze.h"
#include "edge_req.h"
#include "util.h"

static const char hexd[] = "0123456789abcdef";

static uint64_t
rotl(uint64_t x, int k)
{
	return ((x << k) | (x >> (64 - k)));
}

/* xoshiro256** (Blackman and Vigna): fast, and plenty for ids. */
static uint64_t
ids_rand(struct edge_ids *g)
{
	uint64_t *s = g->s;
	uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return (r);
}

void
edge_ids_init(struct edge_ids *g, const unsigned char seed[32])
{
	memset(g, 0, sizeof(*g));
	memcpy(g->s, seed, sizeof(g->s));
	if ((g->s[0] | g->s[1] | g->s[2] | g->s[3]) == 0)
		g->s[0] = 0x9e3779b97f4a7c15ULL; /* the all-zero state is stuck
		                                  */
	g->prefix = (uint32_t)(ids_rand(g) >> 32);
	g->counter = ids_rand(g);
	g->stamp_sec = UINT64_MAX;
}

static void
put_hex(char *out, uint64_t v, int ndigits)
{
	for (int i = ndigits - 1; i >= 0; i--) {
		out[i] = hexd[v & 15];
		v >>= 4;
	}
}

static void
put_dec(char *out, unsigned v, int ndigits)
{
	for (int i = ndigits - 1; i >= 0; i--) {
		out[i] = (char)('0' + v % 10);
		v /= 10;
	}
}

void
edge_reqid_next(struct edge_ids *g, uint64_t wall_ms, char *out)
{
	uint64_t sec = wall_ms / 1000;

	if (sec != g->stamp_sec) {
		time_t t = (time_t)sec;
		struct tm tm;

		if (gmtime_r(&t, &tm) == NULL)
			memset(&tm, 0, sizeof(tm));
		put_dec(g->stamp, (unsigned)(tm.tm_year + 1900) % 10000, 4);
		put_dec(g->stamp + 4, (unsigned)tm.tm_mon + 1, 2);
		put_dec(g->stamp + 6, (unsigned)tm.tm_mday, 2);
		put_dec(g->stamp + 8, (unsigned)tm.tm_hour, 2);
		put_dec(g->stamp + 10, (unsigned)tm.tm_min, 2);
		put_dec(g->stamp + 12, (unsigned)tm.tm_sec, 2);
		g->stamp_sec = sec;
	}
	memcpy(out, g->stamp, 14);
	put_hex(out + 14, g->prefix, 8);
	put_hex(out + 22, g->counter++, 10);
}

void
edge_trace_new(struct edge_ids *g, char *out)
{
	uint64_t hi = ids_rand(g), lo = ids_rand(g), span = ids_rand(g);

	if ((hi | lo) == 0)
		lo = 1;
	if (span == 0)
		span = 1;
	memcpy(out, "00-", 3);
	put_hex(out + 3, hi, 16);
	put_hex(out + 19, lo, 16);
	out[35] = '-';
	put_hex(out + 36, span, 16);
	memcpy(out + 52, "-01", 3);
}

/* n lowercase hex digits, not all zero (if nonzero is set). */
static int
hex_ok(const char *s, size_t n, int nonzero)
{
	int any = 0;

	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
			return (0);
		any |= c != '0';
	}
	return (!nonzero || any);
}

int
edge_trace_valid(const char *s, size_t n)
{
	if (n != EDGE_TRACE_LEN || s[0] != '0' || s[1] != '0' || s[2] != '-' ||
	    s[35] != '-' || s[52] != '-')
		return (0);
	return (hex_ok(s + 3, 32, 1) && hex_ok(s + 36, 16, 1) &&
	        hex_ok(s + 53, 2, 0));
}

/*
 * tracestate (W3C Trace Context level 1, section 3.3): list-members
 * key=value separated by commas and optional whitespace (OWS, SP or HTAB).
 *	key   = lcalpha 0*255(lcalpha / DIGIT / "_" / "-" / "*" / "/")
 *	      / tenant "@" system
 *	tenant = (lcalpha / DIGIT) 0*240(same), system = lcalpha 0*13(same)
 *	value = 0*255(chr) nblk-chr, chr %x20-7E but "," and "=", nblk-chr
 *	        the same without %x20
 */
#define TS_MEMBER_LONG 128 /* members this long go first when cutting */

static int
ts_lcalpha(char c)
{
	return (c >= 'a' && c <= 'z');
}

static int
ts_keychar(char c)
{
	return (ts_lcalpha(c) || (c >= '0' && c <= '9') || c == '_' ||
	        c == '-' || c == '*' || c == '/');
}

/* n key characters, the first a lowercase letter (or a digit if digit). */
static int
ts_keypart(const char *k, size_t n, size_t max, int digit)
{
	if (n == 0 || n > max ||
	    !(ts_lcalpha(k[0]) || (digit && k[0] >= '0' && k[0] <= '9')))
		return (0);
	for (size_t i = 1; i < n; i++)
		if (!ts_keychar(k[i]))
			return (0);
	return (1);
}

static int
ts_key_ok(const char *k, size_t n)
{
	const char *at = memchr(k, '@', n);
	size_t t;

	if (at == NULL)
		return (ts_keypart(k, n, 256, 0));
	t = (size_t)(at - k);
	return (ts_keypart(k, t, 241, 1) &&
	        ts_keypart(at + 1, n - t - 1, 14, 0));
}

static int
ts_value_ok(const char *v, size_t n)
{
	if (n == 0 || n > 256 || v[n - 1] == ' ')
		return (0);
	for (size_t i = 0; i < n; i++)
		if (v[i] < 0x20 || v[i] > 0x7e || v[i] == ',' || v[i] == '=')
			return (0);
	return (1);
}

size_t
edge_tracestate(const char *s, size_t n, char *out)
{
	struct {
		const char *p;
		size_t n, klen;
	} m[EDGE_TRACESTATE_MEMBERS];
	const char *p = s, *end = s + n, *e, *eq;
	size_t k = 0, total = 0, len = 0;

	while (p <= end) {
		if ((e = memchr(p, ',', (size_t)(end - p))) == NULL)
			e = end;
		while (p < e && (*p == ' ' || *p == '\t'))
			p++;
		while (e > p && (e[-1] == ' ' || e[-1] == '\t'))
			e--;
		if (p < e) { /* empty members are allowed, and dropped */
			if (k == EDGE_TRACESTATE_MEMBERS ||
			    (eq = memchr(p, '=', (size_t)(e - p))) == NULL ||
			    !ts_key_ok(p, (size_t)(eq - p)) ||
			    !ts_value_ok(eq + 1, (size_t)(e - eq - 1)))
				return (0);
			m[k].p = p;
			m[k].n = (size_t)(e - p);
			m[k].klen = (size_t)(eq - p);
			for (size_t i = 0; i < k; i++)
				if (m[i].klen == m[k].klen &&
				    memcmp(m[i].p, p, m[k].klen) == 0)
					return (0);
			total += m[k].n + (k > 0);
			k++;
		}
		if ((p = memchr(p, ',', (size_t)(end - p))) == NULL)
			break;
		p++;
	}
	/* Too long: drop the last member over TS_MEMBER_LONG characters,
	 * then the last one, until it fits. */
	while (total > EDGE_TRACESTATE_MAX) {
		size_t i = k;

		while (i > 0 && m[i - 1].n <= TS_MEMBER_LONG)
			i--;
		i = i > 0 ? i - 1 : k - 1;
		total -= m[i].n + (k > 1);
		memmove(&m[i], &m[i + 1], (k - i - 1) * sizeof(m[0]));
		k--;
	}
	for (size_t i = 0; i < k; i++) {
		if (i > 0)
			out[len++] = ',';
		memcpy(out + len, m[i].p, m[i].n);
		len += m[i].n;
	}
	return (len);
}

/* A required non-empty string member; -1 with msg naming it. */
static int
chat_str(const cJSON *o, const char *name, int required, const char **p,
         size_t *n, char *msg, size_t msglen)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

	*p = "";
	*n = 0;
	if (v == NULL || (!required && cJSON_IsNull(v)))
		goto absent;
	if (!cJSON_IsString(v) || v->valuestring == NULL) {
		snprintf(msg, msglen, "%s must be a string", name);
		return (-1);
	}
	*p = v->valuestring;
	*n = strlen(v->valuestring);
	if (*n == 0 && required) {
		snprintf(msg, msglen, "%s must not be empty", name);
		return (-1);
	}
	return (0);
absent:
	if (required) {
		snprintf(msg, msglen, "missing %s", name);
		return (-1);
	}
	return (0);
}

int
edge_chat_parse(const char *text, size_t len, struct edge_chat *c, char *msg,
                size_t msglen)
{
	const char *end = NULL;
	cJSON *root;

	memset(c, 0, sizeof(*c));
	/* A NUL inside the body would end cJSON's view of it early. */
	if (len == 0 || memchr(text, '\0', len) != NULL ||
	    (root = cJSON_ParseWithOpts(text, &end, 1)) == NULL) {
		snprintf(msg, msglen, "invalid JSON body");
		return (-1);
	}
	c->root = root;
	if (!cJSON_IsObject(root)) {
		snprintf(msg, msglen, "invalid JSON body: not an object");
		goto fail;
	}
	if (chat_str(root, "bot_id", 1, &c->bot_id, &c->bot_id_len, msg,
	             msglen) == -1 ||
	    chat_str(root, "user_id", 1, &c->user_id, &c->user_id_len, msg,
	             msglen) == -1 ||
	    chat_str(root, "query", 1, &c->query, &c->query_len, msg,
	             msglen) == -1 ||
	    chat_str(root, "history_id", 0, &c->history_id, &c->history_id_len,
	             msg, msglen) == -1)
		goto fail;
	return (0);
fail:
	edge_chat_free(c);
	return (-1);
}

void
edge_chat_free(struct edge_chat *c)
{
	if (c->root != NULL)
		cJSON_Delete(c->root);
	c->root = NULL;
}

/* Parse text (NUL-terminated at text[len]) into a JSON object. */
static cJSON *
json_object(const char *text, size_t len, char *msg, size_t msglen)
{
	const char *end = NULL;
	cJSON *root;

	/* A NUL inside the body would end cJSON's view of it early. */
	if (len == 0 || memchr(text, '\0', len) != NULL ||
	    (root = cJSON_ParseWithOpts(text, &end, 1)) == NULL) {
		snprintf(msg, msglen, "invalid JSON body");
		return (NULL);
	}
	/* JSON text is UTF-8 (RFC 8259); storage keeps only UTF-8, so a
	 * chat it would refuse after the run is refused here, before. */
	if (!utf8_valid(text, len)) {
		snprintf(msg, msglen, "invalid JSON body: not UTF-8");
		cJSON_Delete(root);
		return (NULL);
	}
	if (!cJSON_IsObject(root)) {
		snprintf(msg, msglen, "invalid JSON body: not an object");
		cJSON_Delete(root);
		return (NULL);
	}
	return (root);
}

/* One additional message: check it and append its normalised form. */
static int
v3_message(const cJSON *m, size_t i, struct buf *out, int *is_user,
           const char **content, size_t *content_len, char *msg, size_t msglen)
{
	const cJSON *role, *content_v, *ctype, *type;
	const char *type_s;

	if (!cJSON_IsObject(m)) {
		snprintf(msg, msglen,
		         "additional_messages[%zu] must be an object", i);
		return (-1);
	}
	role = cJSON_GetObjectItemCaseSensitive(m, "role");
	if (!cJSON_IsString(role) || role->valuestring == NULL ||
	    (strcmp(role->valuestring, "user") != 0 &&
	     strcmp(role->valuestring, "assistant") != 0)) {
		snprintf(msg, msglen,
		         "additional_messages[%zu].role must be \"user\" or "
		         "\"assistant\"",
		         i);
		return (-1);
	}
	*is_user = role->valuestring[0] == 'u';
	content_v = cJSON_GetObjectItemCaseSensitive(m, "content");
	if (content_v == NULL) {
		snprintf(msg, msglen,
		         "missing additional_messages[%zu].content", i);
		return (-1);
	}
	if (!cJSON_IsString(content_v) || content_v->valuestring == NULL) {
		snprintf(msg, msglen,
		         "additional_messages[%zu].content must be a string",
		         i);
		return (-1);
	}
	if (content_v->valuestring[0] == '\0') {
		snprintf(msg, msglen,
		         "additional_messages[%zu].content must not be empty",
		         i);
		return (-1);
	}
	ctype = cJSON_GetObjectItemCaseSensitive(m, "content_type");
	if (ctype != NULL &&
	    (!cJSON_IsString(ctype) || ctype->valuestring == NULL ||
	     strcmp(ctype->valuestring, "text") != 0)) {
		snprintf(msg, msglen,
		         "additional_messages[%zu].content_type must be "
		         "\"text\"",
		         i);
		return (-1);
	}
	type = cJSON_GetObjectItemCaseSensitive(m, "type");
	type_s = *is_user ? "question" : "answer";
	if (type != NULL) {
		if (!cJSON_IsString(type) || type->valuestring == NULL ||
		    type->valuestring[0] == '\0' ||
		    strlen(type->valuestring) > EDGE_V3_TYPE_MAX) {
			snprintf(msg, msglen,
			         "additional_messages[%zu].type must be a "
			         "non-empty string of at most %d bytes",
			         i, EDGE_V3_TYPE_MAX);
			return (-1);
		}
		type_s = type->valuestring;
	}
	*content = content_v->valuestring;
	*content_len = strlen(content_v->valuestring);
	if (buf_adds(out, i ? ",{\"role\":" : "{\"role\":") == -1 ||
	    buf_add_json_str(out, role->valuestring,
	                     strlen(role->valuestring)) == -1 ||
	    buf_adds(out, ",\"type\":") == -1 ||
	    buf_add_json_str(out, type_s, strlen(type_s)) == -1 ||
	    buf_adds(out, ",\"content\":") == -1 ||
	    buf_add_json_str(out, *content, *content_len) == -1 ||
	    buf_adds(out, ",\"content_type\":\"text\"}") == -1) {
		snprintf(msg, msglen, "out of memory");
		return (-1);
	}
	return (0);
}

int
edge_v3chat_parse(const char *text, size_t len, struct edge_v3chat *c,
                  char *msg, size_t msglen)
{
	const cJSON *stream, *am, *m;
	struct buf out = {0};
	const char *content;
	size_t i = 0, content_len;
	int is_user, users = 0;
	cJSON *root;

	memset(c, 0, sizeof(*c));
	if ((root = json_object(text, len, msg, msglen)) == NULL)
		return (-1);
	c->root = root;
	if (chat_str(root, "bot_id", 1, &c->bot_id, &c->bot_id_len, msg,
	             msglen) == -1 ||
	    chat_str(root, "user_id", 1, &c->user_id, &c->user_id_len, msg,
	             msglen) == -1)
		goto fail;
	stream = cJSON_GetObjectItemCaseSensitive(root, "stream");
	if (stream != NULL && !cJSON_IsBool(stream)) {
		snprintf(msg, msglen, "stream must be a boolean");
		goto fail;
	}
	c->stream = stream != NULL && cJSON_IsTrue(stream);
	am = cJSON_GetObjectItemCaseSensitive(root, "additional_messages");
	if (am == NULL || cJSON_IsNull(am)) {
		snprintf(msg, msglen, "missing additional_messages");
		goto fail;
	}
	if (!cJSON_IsArray(am)) {
		snprintf(msg, msglen, "additional_messages must be an array");
		goto fail;
	}
	if (buf_adds(&out, "[") == -1) {
		snprintf(msg, msglen, "out of memory");
		goto fail;
	}
	if (cJSON_GetArraySize(am) > EDGE_V3_MESSAGES_MAX) {
		snprintf(msg, msglen,
		         "additional_messages: at most %d messages",
		         EDGE_V3_MESSAGES_MAX);
		goto fail;
	}
	cJSON_ArrayForEach(m, am)
	{
		if (v3_message(m, i, &out, &is_user, &content, &content_len,
		               msg, msglen) == -1)
			goto fail;
		if (is_user) {
			users++;
			c->query = content;
			c->query_len = content_len;
		}
		i++;
	}
	if (users == 0) {
		snprintf(msg, msglen,
		         "additional_messages must hold at least one user "
		         "message");
		goto fail;
	}
	if (buf_add(&out, "]", 2) == -1) { /* "]" and a NUL */
		snprintf(msg, msglen, "out of memory");
		goto fail;
	}
	c->messages = out.b;
	c->messages_len = out.len - 1;
	c->nmessages = i;
	return (0);
fail:
	buf_free(&out);
	edge_v3chat_free(c);
	return (-1);
}

void
edge_v3chat_free(struct edge_v3chat *c)
{
	if (c->root != NULL)
		cJSON_Delete(c->root);
	free(c->messages);
	memset(c, 0, sizeof(*c));
}

static int
hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return (ch - '0');
	if (ch >= 'a' && ch <= 'f')
		return (ch - 'a' + 10);
	if (ch >= 'A' && ch <= 'F')
		return (ch - 'A' + 10);
	return (-1);
}

int
edge_query_get(const char *q, size_t qlen, const char *name, char *out,
               size_t cap)
{
	size_t nl = strlen(name), i = 0, o;

	while (i < qlen) {
		size_t end = i;

		while (end < qlen && q[end] != '&')
			end++;
		if (end - i >= nl && memcmp(q + i, name, nl) == 0 &&
		    (end - i == nl || q[i + nl] == '=')) {
			for (i += nl + (end - i > nl), o = 0; i < end; i++) {
				int ch = (unsigned char)q[i];

				if (ch == '%') {
					int hi, lo;

					if (i + 2 >= end)
						return (-1);
					if ((hi = hexval(q[i + 1])) == -1 ||
					    (lo = hexval(q[i + 2])) == -1)
						return (-1);
					ch = hi * 16 + lo;
					i += 2;
				} else if (ch == '+')
					ch = ' ';
				if (ch == 0 || o + 1 >= cap)
					return (-1);
				out[o++] = (char)ch;
			}
			out[o] = '\0';
			return (1);
		}
		i = end + 1;
	}
	return (0);
}

/* One id: from the body object (if it has it), else from the query. */
static int
v3_id(const char *q, size_t qlen, const cJSON *root, const char *name,
      char *out, char *msg, size_t msglen)
{
	const cJSON *v =
	        root ? cJSON_GetObjectItemCaseSensitive(root, name) : NULL;
	int r;

	if (v != NULL && !cJSON_IsNull(v)) {
		if (!cJSON_IsString(v) || v->valuestring == NULL) {
			snprintf(msg, msglen, "%s must be a string", name);
			return (-1);
		}
		if (strlen(v->valuestring) > EDGE_ID_MAX)
			goto bad;
		strcpy(out, v->valuestring);
	} else if ((r = edge_query_get(q, qlen, name, out, EDGE_ID_MAX + 1)) ==
	           0) {
		snprintf(msg, msglen, "missing %s", name);
		return (-1);
	} else if (r == -1)
		goto bad;
	if (out[0] == '\0') {
		snprintf(msg, msglen, "missing %s", name);
		return (-1);
	}
	if (!coze_id_ok((struct mstr){out, (uint32_t)strlen(out)}))
		goto bad;
	return (0);
bad:
	snprintf(msg, msglen, "%s must be 1 to %d decimal digits", name,
	         EDGE_ID_MAX);
	return (-1);
}

int
edge_v3ids_parse(const char *q, size_t qlen, const char *body, size_t blen,
                 struct edge_v3ids *ids, char *msg, size_t msglen)
{
	cJSON *root = NULL;
	int rv = -1;

	memset(ids, 0, sizeof(*ids));
	if (body != NULL && blen > 0 &&
	    (root = json_object(body, blen, msg, msglen)) == NULL)
		return (-1);
	if (v3_id(q, qlen, root, "conversation_id", ids->conversation_id, msg,
	          msglen) == 0 &&
	    v3_id(q, qlen, root, "chat_id", ids->chat_id, msg, msglen) == 0)
		rv = 0;
	if (root != NULL)
		cJSON_Delete(root);
	return (rv);
}

size_t
edge_json_escape(char *out, const char *s, size_t n)
{
	char *o = out;

	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		switch (ch) {
		case '"':
		case '\\':
			*o++ = '\\';
			*o++ = (char)ch;
			break;
		case '\n':
			*o++ = '\\';
			*o++ = 'n';
			break;
		case '\r':
			*o++ = '\\';
			*o++ = 'r';
			break;
		case '\t':
			*o++ = '\\';
			*o++ = 't';
			break;
		default:
			if (ch < 0x20 || ch == 0x7f) {
				memcpy(o, "\\u00", 4);
				o[4] = hexd[ch >> 4];
				o[5] = hexd[ch & 15];
				o += 6;
			} else
				*o++ = (char)ch;
		}
	}
	return ((size_t)(o - out));
}

#define ERR_A "{\"code\":"
#define ERR_B ",\"msg\":\""
#define ERR_C "\",\"detail\":{\"logid\":\""
#define ERR_D "\"}}"

size_t
edge_json_error_max(size_t msglen)
{
	return (sizeof(ERR_A ERR_B ERR_C ERR_D) + 21 + 6 * msglen +
	        EDGE_REQID_LEN + 1);
}

size_t
edge_json_error(char *out, size_t cap, int64_t code, const char *msg,
                size_t msglen, const char *reqid, const char *extra)
{
	size_t n, xn = extra ? strlen(extra) : 0;
	int k;

	if (cap < edge_json_error_max(msglen) + xn)
		return (0);
	k = snprintf(out, cap, ERR_A "%lld" ERR_B, (long long)code);
	n = (size_t)k;
	n += edge_json_escape(out + n, msg, msglen);
	memcpy(out + n, ERR_C, sizeof(ERR_C) - 1);
	n += sizeof(ERR_C) - 1;
	memcpy(out + n, reqid, EDGE_REQID_LEN);
	n += EDGE_REQID_LEN;
	out[n++] = '"';
	if (xn) {
		memcpy(out + n, extra, xn);
		n += xn;
	}
	out[n++] = '}';
	out[n++] = '}';
	out[n] = '\0';
	return (n);
}

#define OK_A "{\"code\":0,\"msg\":\"\",\"data\":"

size_t
edge_json_ok_max(size_t datalen)
{
	return (sizeof(OK_A) + datalen + 4);
}

size_t
edge_json_ok(char *out, size_t cap, const char *data, size_t datalen)
{
	size_t n = sizeof(OK_A) - 1;

	if (cap < edge_json_ok_max(datalen))
		return (0);
	memcpy(out, OK_A, n);
	if (datalen == 0) {
		memcpy(out + n, "{}", 2);
		n += 2;
	} else {
		memcpy(out + n, data, datalen);
		n += datalen;
	}
	out[n++] = '}';
	out[n] = '\0';
	return (n);
}
