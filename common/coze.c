/* SPDX-License-Identifier: ISC */
/*
 * coze: renders Coze's v3 chat objects and events (see coze.h and
 * docs/api.md) and makes their ids.  Callers: worker, storage, edge.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "coze.h"

static int
add_kv_str(struct buf *b, const char *key, struct mstr v)
{
	return (buf_addf(b, "\"%s\":", key) == -1 ||
	                        buf_add_json_str(b, v.n ? v.p : "", v.n) == -1
	                ? -1
	                : 0);
}

int
coze_chat_json(struct buf *b, const struct coze_chat *c)
{
	if (buf_adds(b, "{") == -1 || add_kv_str(b, "id", c->id) == -1 ||
	    buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "conversation_id", c->conversation_id) == -1 ||
	    buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "bot_id", c->bot_id) == -1 ||
	    buf_addf(b, ",\"created_at\":%" PRIu64, c->created_at) == -1)
		return (-1);
	if (c->completed_at &&
	    buf_addf(b, ",\"completed_at\":%" PRIu64, c->completed_at) == -1)
		return (-1);
	if (c->failed_at &&
	    buf_addf(b, ",\"failed_at\":%" PRIu64, c->failed_at) == -1)
		return (-1);
	if (buf_addf(b, ",\"last_error\":{\"code\":%" PRId64 ",\"msg\":",
	             c->error_code) == -1 ||
	    buf_add_json_str(b, c->error_msg.n ? c->error_msg.p : "",
	                     c->error_msg.n) == -1 ||
	    buf_addf(b,
	             "},\"status\":\"%s\",\"meta_data\":{},\"usage\":"
	             "{\"token_count\":%" PRIu64 ",\"output_count\":%" PRIu64
	             ",\"input_count\":%" PRIu64 "}}",
	             c->status, c->input_tokens + c->output_tokens,
	             c->output_tokens, c->input_tokens) == -1)
		return (-1);
	return (0);
}

int
coze_msg_json(struct buf *b, const struct coze_msg *m)
{
	if (buf_adds(b, "{") == -1 || add_kv_str(b, "id", m->id) == -1 ||
	    buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "conversation_id", m->conversation_id) == -1 ||
	    buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "bot_id", m->bot_id) == -1 ||
	    buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "chat_id", m->chat_id) == -1 ||
	    buf_adds(b, ",\"meta_data\":{},") == -1 ||
	    add_kv_str(b, "role", m->role) == -1 || buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "type", m->type) == -1 || buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "content", m->content) == -1 ||
	    buf_adds(b, ",") == -1 ||
	    add_kv_str(b, "content_type", m->content_type) == -1 ||
	    buf_addf(b,
	             ",\"created_at\":%" PRIu64 ",\"updated_at\":%" PRIu64 "}",
	             m->created_at, m->updated_at) == -1)
		return (-1);
	return (0);
}

int
coze_sse(struct buf *b, const char *event, const char *data, size_t len)
{
	if (buf_addf(b, "event:%s\ndata:", event) == -1 ||
	    buf_add(b, data, len) == -1 || buf_adds(b, "\n\n") == -1)
		return (-1);
	return (0);
}

int
coze_sse_done(struct buf *b)
{
	return (buf_adds(b, "event:done\ndata:\"[DONE]\"\n\n"));
}

int
coze_sse_chat(struct buf *b, const char *event, const struct coze_chat *c)
{
	if (buf_addf(b, "event:%s\ndata:", event) == -1 ||
	    coze_chat_json(b, c) == -1 || buf_adds(b, "\n\n") == -1)
		return (-1);
	return (0);
}

int
coze_sse_msg(struct buf *b, const char *event, const struct coze_msg *m)
{
	if (buf_addf(b, "event:%s\ndata:", event) == -1 ||
	    coze_msg_json(b, m) == -1 || buf_adds(b, "\n\n") == -1)
		return (-1);
	return (0);
}

/* FNV-1a, then splitmix64's finaliser (FNV's low bits are weak). */
static uint64_t
mix(uint64_t h, const void *p, size_t n)
{
	const unsigned char *s = p;

	for (size_t i = 0; i < n; i++)
		h = (h ^ s[i]) * 0x100000001b3u;
	h ^= h >> 30;
	h *= 0xbf58476d1ce4e5b9u;
	h ^= h >> 27;
	h *= 0x94d049bb133111ebu;
	h ^= h >> 31;
	return (h);
}

/* 19 digits, never a leading zero: 10^18 + h mod 9*10^18. */
static void
digits19(uint64_t h, char out[COZE_ID_LEN + 1])
{
	(void)snprintf(out, COZE_ID_LEN + 1, "%" PRIu64,
	               1000000000000000000u + h % 8000000000000000000u);
}

void
coze_chat_id_of(struct mstr reqid, char out[COZE_ID_LEN + 1])
{
	digits19(mix(0xcbf29ce484222325u, reqid.p, reqid.n), out);
}

void
coze_msg_id_of(struct mstr chat_id, unsigned idx, char out[COZE_ID_LEN + 1])
{
	uint64_t h = mix(0xcbf29ce484222325u, chat_id.p, chat_id.n);

	digits19(mix(h, &idx, sizeof(idx)), out);
}

int
coze_conv_id_new(char out[COZE_ID_LEN + 1])
{
	uint64_t r;

	if (random_bytes(&r, sizeof(r)) == -1)
		return (-1);
	digits19(r, out);
	return (0);
}

int
coze_id_ok(struct mstr s)
{
	if (s.n == 0 || s.n > 32)
		return (0);
	for (uint32_t i = 0; i < s.n; i++)
		if (s.p[i] < '0' || s.p[i] > '9')
			return (0);
	return (1);
}
