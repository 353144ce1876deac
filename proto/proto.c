/* SPDX-License-Identifier: ISC */
/*
 * proto: codecs generated from bodies.def, names and routes from
 * messages.def.  A body is a msgpack array of its fields in order; the
 * decoder refuses a wrong type or an array without every FIELD, leaves an
 * OPT field an older build did not send at zero, and skips fields appended
 * by newer builds, then requires the body to end exactly.
 */
#include <string.h>

#include "mpk.h"
#include "proto.h"

#define PK_STR(pk, v) mpk_pack_mstr(pk, v)
#define PK_U64(pk, v) msgpack_pack_uint64(pk, v)
#define PK_I64(pk, v) msgpack_pack_int64(pk, v)
#define RD_STR(c, v) mpk_read_str(c, v)
#define RD_U64(c, v) mpk_read_u64(c, v)
#define RD_I64(c, v) mpk_read_i64(c, v)

/* Field counts: all of them, and the required ones (FIELD, not OPT). */
#define BODY_BEGIN(b) enum { b##_NFIELDS = 0
#define FIELD(b, t, n) +1
#define BODY_END(b) };
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END
#define BODY_BEGIN(b) enum { b##_NREQ = 0
#define FIELD(b, t, n) +1
#define OPT(b, t, n)
#define BODY_END(b) };
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef OPT
#undef BODY_END

/* Packers. */
#define BODY_BEGIN(b)                                                      \
	int b##_pack(msgpack_packer *pk, const void *vb)                    \
	{                                                                  \
		const struct b *body = vb;                                 \
		if (msgpack_pack_array(pk, b##_NFIELDS) != 0)              \
			return (-1);
#define FIELD(b, t, n)                                                     \
	if (PK_##t(pk, body->n) != 0)                                      \
		return (-1);
#define BODY_END(b)                                                        \
	return (0);                                                        \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

/* Decoders. */
#define BODY_BEGIN(b)                                                      \
	int b##_decode(const void *p, size_t len, struct b *body)          \
	{                                                                  \
		struct mpk_cur c;                                          \
		uint32_t nf, fi = 0;                                       \
		memset(body, 0, sizeof(*body));                            \
		mpk_cur_init(&c, p, len);                                  \
		if (mpk_read_array(&c, &nf) == -1 || nf < b##_NREQ)        \
			return (-1);
#define FIELD(b, t, n)                                                     \
	if (RD_##t(&c, &body->n) == -1)                                    \
		return (-1);                                               \
	fi++;
#define OPT(b, t, n)                                                       \
	if (fi < nf) {                                                     \
		if (RD_##t(&c, &body->n) == -1)                            \
			return (-1);                                       \
		fi++;                                                      \
	}
#define BODY_END(b)                                                        \
	for (; fi < nf; fi++)                                              \
		if (mpk_skip(&c) == -1)                                    \
			return (-1);                                       \
	return (mpk_left(&c) == 0 ? 0 : -1);                               \
	}                                                                  \
	int b##_unpack(const struct msg *m, struct b *body)                \
	{                                                                  \
		return (b##_decode(m->body, m->body_len, body));           \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef OPT
#undef BODY_END

static const struct {
	uint16_t type;
	const char *name;
	enum proc from, to;
} msgs[] = {
#define MSG(name, id, fn, body, from, to)                                  \
	{ id, #name, PROC_##from, PROC_##to },
#include "messages.def"
#undef MSG
};

_Static_assert(MSG_IPC_ACK == 1, "common/ipc.c hard-codes the ack type");

const char *
msg_name(uint16_t type)
{
	for (size_t i = 0; i < nitems(msgs); i++)
		if (msgs[i].type == type)
			return (msgs[i].name);
	return (NULL);
}

int
msg_route_ok(uint16_t type, enum proc from, enum proc to)
{
	for (size_t i = 0; i < nitems(msgs); i++) {
		if (msgs[i].type != type)
			continue;
		return ((msgs[i].from == PROC_ANY || msgs[i].from == from) &&
		    (msgs[i].to == PROC_ANY || msgs[i].to == to));
	}
	return (0);
}

static int
prefix(struct mstr s, const char *p)
{
	size_t n = strlen(p);

	return (s.n >= n && memcmp(s.p, p, n) == 0);
}

enum proc
proc_of(struct mstr name)
{
	if (prefix(name, "edge"))
		return (PROC_EDGE);
	if (prefix(name, "auth"))
		return (PROC_AUTH);
	if (prefix(name, "dispatcher"))
		return (PROC_DISPATCHER);
	if (prefix(name, "worker"))
		return (PROC_WORKER);
	if (prefix(name, "storage"))
		return (PROC_STORAGE);
	if (prefix(name, "telemetry"))
		return (PROC_TELEMETRY);
	return (PROC_TOOL);
}

struct msg_head
msg_head_reply(const struct msg *m, const char *reply_to)
{
	struct msg_head h;

	h.reqid = m->reqid;
	h.traceparent = m->traceparent;
	h.deadline_ms = m->deadline_ms;
	h.reply_to = reply_to ? MSTR(reply_to) : MSTR_NULL;
	return (h);
}
