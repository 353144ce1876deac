/* SPDX-License-Identifier: ISC */
/*
 * fuzz_body: every message body's strict decoder (proto/bodies.def).  The
 * first byte picks the body, the rest is its msgpack.  Property: what
 * decodes packs and decodes again to the same fields (the packer and the
 * decoder agree on every body, with and without the OPT fields).
 */
#include "fuzz.h"
#include "mpk.h"
#include "proto.h"

static void
same_STR(const struct mstr *a, const struct mstr *b)
{
	fuzz_assert(a->n == b->n);
	fuzz_assert(a->n == 0 || memcmp(a->p, b->p, a->n) == 0);
}

static void
same_U64(const uint64_t *a, const uint64_t *b)
{
	fuzz_assert(*a == *b);
}

static void
same_I64(const int64_t *a, const int64_t *b)
{
	fuzz_assert(*a == *b);
}

#define BODY_BEGIN(B)                                                         \
	static void roundtrip_##B(const uint8_t *d, size_t n)                 \
	{                                                                     \
		struct B v, w;                                                \
		struct buf out = {0};                                         \
		msgpack_packer pk;                                            \
		if (B##_decode(d, n, &v) == -1)                               \
			return;                                               \
		mpk_packer_init(&pk, &out);                                   \
		fuzz_assert(B##_pack(&pk, &v) == 0);                          \
		fuzz_assert(B##_decode(out.b, out.len, &w) == 0);
#define FIELD(B, t, f) same_##t(&v.f, &w.f);
#define BODY_END(b)                                                           \
	buf_free(&out);                                                       \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

static void (*const bodies[])(const uint8_t *, size_t) = {
#define BODY_BEGIN(b) roundtrip_##b,
#define FIELD(b, t, n)
#define BODY_END(b)
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END
};

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	if (n < 1)
		return (0);
	bodies[d[0] % nitems(bodies)](d + 1, n - 1);
	return (0);
}
