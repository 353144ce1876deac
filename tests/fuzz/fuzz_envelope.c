/* SPDX-License-Identifier: ISC */
/*
 * fuzz_envelope: the bytes of one nng message as a mailbox receives them
 * (common/ipc.c): the batch head, then envelopes, each body decoded by
 * the decoder its type names (every message of proto/messages.def).
 * Properties: every string a decoder gives points inside the input.
 */
#include "fuzz.h"
#include "ipc.h"
#include "mpk.h"
#include "proto.h"

static const uint8_t *lo, *hi;

static void
check_STR(const struct mstr *s)
{
	volatile uint8_t sum = 0;

	if (s->n == 0)
		return;
	fuzz_assert((const uint8_t *)s->p >= lo &&
	            (const uint8_t *)s->p + s->n <= hi);
	for (uint32_t i = 0; i < s->n; i++)
		sum += (uint8_t)s->p[i];
	(void)sum;
}

static void
check_U64(const uint64_t *v)
{
	(void)v;
}

static void
check_I64(const int64_t *v)
{
	(void)v;
}

#define BODY_BEGIN(b)                                                         \
	static void check_##b(const struct b *v)                              \
	{
#define FIELD(b, t, n) check_##t(&v->n);
#define BODY_END(b) }
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

static void
decode_body(const struct msg *m)
{
	switch (m->type) {
#define MSG(name, id, fn, body, from, to)                                     \
	case MSG_##name: {                                                    \
		struct body b;                                                \
		if (body##_unpack(m, &b) == 0)                                \
			check_##body(&b);                                     \
		break;                                                        \
	}
#include "messages.def"
#undef MSG
	default:
		break;
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	struct ipc_batch_head bh;
	struct mpk_cur c;
	struct msg m;

	lo = d;
	hi = d + n;
	mpk_cur_init(&c, d, n);
	if (ipc_parse_head(&c, &bh) == -1)
		return (0);
	check_STR(&bh.sender);
	while (mpk_left(&c) > 0) {
		if (ipc_parse_envelope(&c, &m) == -1)
			break;
		check_STR(&m.reqid);
		check_STR(&m.traceparent);
		check_STR(&m.reply_to);
		fuzz_assert((const uint8_t *)m.body >= lo &&
		            (const uint8_t *)m.body + m.body_len <= hi);
		decode_body(&m);
	}
	return (0);
}
