/* SPDX-License-Identifier: ISC */
/*
 * proto: the typed face of messages.def and bodies.def.  For every body a
 * struct, a packer and a strict unpacker; for every message an enum
 * constant, a name, a route and a send helper that only takes the right
 * body.  Callers never see msgpack.  Never logs.
 */
#ifndef TROUPE_PROTO_H
#define TROUPE_PROTO_H

#include <stdint.h>

#include "ipc.h"
#include "util.h"

enum proc {
	PROC_ANY,
	PROC_EDGE,
	PROC_AUTH,
	PROC_DISPATCHER,
	PROC_WORKER,
	PROC_STORAGE,
	PROC_TELEMETRY,
	PROC_TOOL, /* troupectl */
};

/* The code of a CHAT_REPLY or CTX_REPLY refusing work because the sender
 * is stopping (a rolling restart): nothing was run, and the edge sends the
 * request again instead of answering the client (never shown to one). */
#define MSG_CODE_STOPPING 5031

enum msg_type {
#define MSG(name, id, fn, body, from, to) MSG_##name = id,
#include "messages.def"
#undef MSG
};

#define FT_STR struct mstr
#define FT_U64 uint64_t
#define FT_I64 int64_t

#define BODY_BEGIN(b) struct b {
#define FIELD(b, t, n) FT_##t n;
#define BODY_END(b) };
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

#define BODY_BEGIN(b)                                                      \
	int b##_pack(msgpack_packer *, const void *);                      \
	int b##_unpack(const struct msg *, struct b *);                    \
	int b##_decode(const void *, size_t, struct b *);
#define FIELD(b, t, n)
#define BODY_END(b)
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

/* One typed send helper per message: msg_send_<fn>(). */
#define MSG(name, id, fn, body, from, to)                                  \
	static inline int msg_send_##fn(struct ipc *ipc, const char *peer,  \
	    const struct msg_head *h, const struct body *b)                  \
	{                                                                  \
		return (ipc_send(ipc, peer, MSG_##name, h, body##_pack, b)); \
	}
#include "messages.def"
#undef MSG

/* "CHAT_REQUEST", or NULL for a type this build does not know. */
const char *msg_name(uint16_t type);
/* Whether a process of kind from may send type to a process of kind to. */
int msg_route_ok(uint16_t type, enum proc from, enum proc to);
/* The kind of process a mailbox name belongs to ("worker-3": WORKER). */
enum proc proc_of(struct mstr name);

/* The head of an answer to m: same request id, trace and deadline. */
struct msg_head msg_head_reply(const struct msg *m, const char *reply_to);

#endif
