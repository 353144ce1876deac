/* SPDX-License-Identifier: ISC */
/*
 * proto_test: walks bodies.def.  Every body is filled with distinct values,
 * packed, decoded and compared field by field; every truncation of the
 * packed form must be refused; a body with a field appended by a newer
 * build must still decode; one from an older build, without the OPT
 * fields, must decode with them zero.  A new message is tested here
 * before anyone writes a test for it.
 */
#include <stdio.h>

#include "mpk.h"
#include "proto.h"
#include "t.h"

static char strpool[64][32];

static void
fill_STR(struct mstr *v, int k)
{
	snprintf(strpool[k % 64], sizeof(strpool[0]), "v%d-é", k);
	*v = MSTR(strpool[k % 64]);
}
static void
fill_U64(uint64_t *v, int k)
{
	*v = (uint64_t)k * 1000003u + 0xfffffffffull;
}
static void
fill_I64(int64_t *v, int k)
{
	*v = -(int64_t)k * 1000003 - 7;
}
static int
same_STR(struct mstr a, struct mstr b)
{
	return (a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0));
}
static int
same_U64(uint64_t a, uint64_t b)
{
	return (a == b);
}
static int
same_I64(int64_t a, int64_t b)
{
	return (a == b);
}

/* Pack a body as a build from before its OPT fields would. */
#define PK_STR(pk, v) mpk_pack_mstr(pk, v)
#define PK_U64(pk, v) msgpack_pack_uint64(pk, v)
#define PK_I64(pk, v) msgpack_pack_int64(pk, v)
#undef BODY_BEGIN
#undef FIELD
#undef OPT
#undef BODY_END
#define BODY_BEGIN(b)                                                      \
	static int oldpack_fields_##b(msgpack_packer *pk,                  \
	    const struct b *body)                                          \
	{
#define FIELD(b, t, n)                                                     \
	if (PK_##t(pk, body->n) != 0)                                      \
		return (-1);
#define OPT(b, t, n)
#define BODY_END(b)                                                        \
	return (0);                                                        \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef OPT
#undef BODY_END
#define BODY_BEGIN(b)                                                      \
	static int oldpack_##b(msgpack_packer *pk, const struct b *body,     \
	    int *nopt)                                                     \
	{                                                                  \
		int nreq = 0;                                              \
		*nopt = 0;
#define FIELD(b, t, n) nreq++;
#define OPT(b, t, n) (*nopt)++;
#define BODY_END(b)                                                        \
	if (msgpack_pack_array(pk, (size_t)nreq) != 0)                     \
		return (-1);                                               \
	return (oldpack_fields_##b(pk, body));                             \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef OPT
#undef BODY_END

#define BODY_BEGIN(b)                                                      \
	static const char *diff_##b(const struct b *x, const struct b *y)  \
	{
#define FIELD(b, t, n)                                                     \
	if (!same_##t(x->n, y->n))                                         \
		return (#n);
#define BODY_END(b)                                                        \
	return (NULL);                                                     \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

/* What a decoder makes of an older build's body: OPT fields zero. */
#define BODY_BEGIN(b)                                                      \
	static void old_zero_##b(struct b *v)                              \
	{                                                                  \
		(void)v;
#define FIELD(b, t, n)
#define OPT(b, t, n) memset(&v->n, 0, sizeof(v->n));
#define BODY_END(b) }
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef OPT
#undef BODY_END

#define CHECK(b)                                                           \
	do {                                                               \
		const char *d_ = diff_##b(&in, &out);                      \
		if (d_ != NULL)                                            \
			T_FAIL("%s.%s: differs after a round trip", #b, d_); \
	} while (0);

#define BODY_BEGIN(B)                                                      \
	static void t_##B(void)                                            \
	{                                                                  \
		struct B in, out;                                          \
		struct buf pb = { 0 };                                     \
		msgpack_packer pk;                                         \
		int k = 0;                                                 \
		memset(&in, 0, sizeof(in));
#define FIELD(B, t, n) fill_##t(&in.n, k++);
#define BODY_END(B)                                                        \
	mpk_packer_init(&pk, &pb);                                         \
	T_EQ_INT(B##_pack(&pk, &in), 0);                                   \
	T_EQ_INT(B##_decode(pb.b, pb.len, &out), 0);                       \
	CHECK(B)                                                           \
	for (size_t cut = 0; cut < pb.len; cut++)                          \
		if (B##_decode(pb.b, cut, &out) != -1)                     \
			T_FAIL("%s cut at %zu of %zu bytes: decoded, want " \
			    "refusal", #B, cut, pb.len);                   \
	{ /* a newer build appends a field: still decodes */               \
		struct buf nb = { 0 };                                     \
		msgpack_packer np;                                         \
		mpk_packer_init(&np, &nb);                                 \
		msgpack_pack_array(&np, (size_t)k + 1);                    \
		/* skip our array header: fixarray, or array 16 */         \
		buf_add(&nb, pb.b + (k < 16 ? 1 : 3),                      \
		    pb.len - (k < 16 ? 1 : 3));                            \
		mpk_pack_cstr(&np, "future");                              \
		T_EQ_INT(B##_decode(nb.b, nb.len, &out), 0);               \
		CHECK(B)                                                   \
		buf_free(&nb);                                             \
	}                                                                  \
	{ /* an older build, without the OPT fields: zero */               \
		struct buf ob = { 0 };                                     \
		msgpack_packer op;                                         \
		int nopt;                                                  \
		mpk_packer_init(&op, &ob);                                 \
		T_EQ_INT(oldpack_##B(&op, &in, &nopt), 0);                 \
		T_EQ_INT(B##_decode(ob.b, ob.len, &out), 0);               \
		if (nopt > 0) {                                            \
			struct B z = in;                                   \
			old_zero_##B(&z);                                  \
			if (diff_##B(&z, &out) != NULL)                    \
				T_FAIL("%s from an older build: %s",       \
				    #B, diff_##B(&z, &out));               \
		}                                                          \
		buf_free(&ob);                                             \
	}                                                                  \
	{ /* trailing garbage after the body is refused */                 \
		buf_add(&pb, "\xc0", 1);                                   \
		T_EQ_INT(B##_decode(pb.b, pb.len, &out), -1);              \
	}                                                                  \
	buf_free(&pb);                                                     \
	}
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END

static void
t_names_routes(void)
{
#define MSG(name, id, fn, body, from, to)                                  \
	T_EQ_STR(msg_name(MSG_##name), #name);                             \
	T_ASSERT(msg_route_ok(MSG_##name, PROC_##from == PROC_ANY ?        \
	    PROC_EDGE : PROC_##from, PROC_##to == PROC_ANY ? PROC_EDGE :   \
	    PROC_##to));
#include "messages.def"
#undef MSG
	T_ASSERT(msg_name(0x7fff) == NULL);
	T_ASSERT(!msg_route_ok(MSG_RUN_ASSIGN, PROC_EDGE, PROC_WORKER));
	T_EQ_INT(proc_of(MSTR("worker-12")), PROC_WORKER);
	T_EQ_INT(proc_of(MSTR("troupectl-77")), PROC_TOOL);
}

T_TESTS = {
#define BODY_BEGIN(b) { #b, t_##b },
#define FIELD(b, t, n)
#define BODY_END(b)
#include "bodies.def"
#undef BODY_BEGIN
#undef FIELD
#undef BODY_END
	{ "names_routes", t_names_routes },
	{ NULL, NULL },
};
T_MAIN
