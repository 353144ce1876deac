/* SPDX-License-Identifier: ISC */
/*
 * mpk_test: the strict reader against what msgpack-c's packer writes, and
 * its refusals: short input, wrong types, impossible counts, deep nesting.
 */
#include "mpk.h"
#include "t.h"

static void
t_roundtrip(void)
{
	struct buf b = { 0 };
	msgpack_packer pk;
	struct mpk_cur c;
	struct mstr s;
	uint64_t u;
	int64_t i;
	uint32_t n;
	const int64_t ints[] = { 0, -1, -32, -33, -128, -129, -32768, -32769,
		INT32_MIN, (int64_t)INT32_MIN - 1, INT64_MIN, 127, 128, 70000,
		INT64_MAX };
	const uint64_t uints[] = { 0, 127, 128, 255, 256, 65535, 65536,
		UINT32_MAX, (uint64_t)UINT32_MAX + 1, UINT64_MAX };

	mpk_packer_init(&pk, &b);
	msgpack_pack_array(&pk, 3);
	mpk_pack_cstr(&pk, "héllo");
	msgpack_pack_array(&pk, nitems(ints));
	for (size_t k = 0; k < nitems(ints); k++)
		msgpack_pack_int64(&pk, ints[k]);
	msgpack_pack_array(&pk, nitems(uints));
	for (size_t k = 0; k < nitems(uints); k++)
		msgpack_pack_uint64(&pk, uints[k]);

	mpk_cur_init(&c, b.b, b.len);
	T_EQ_INT(mpk_read_array(&c, &n), 0);
	T_EQ_INT(n, 3);
	T_EQ_INT(mpk_read_str(&c, &s), 0);
	T_EQ_MEM(s.p, s.n, "héllo");
	T_EQ_INT(mpk_read_array(&c, &n), 0);
	for (size_t k = 0; k < nitems(ints); k++) {
		T_EQ_INT(mpk_read_i64(&c, &i), 0);
		T_EQ_INT(i, ints[k]);
	}
	T_EQ_INT(mpk_read_array(&c, &n), 0);
	for (size_t k = 0; k < nitems(uints); k++) {
		T_EQ_INT(mpk_read_u64(&c, &u), 0);
		T_ASSERT(u == uints[k]);
	}
	T_EQ_INT(mpk_left(&c), 0);
	buf_free(&b);
}

static void
t_refusals(void)
{
	struct mpk_cur c;
	struct mstr s;
	uint64_t u;
	uint32_t n;
	/* array32 claiming 4 billion elements in 5 bytes */
	const uint8_t huge[] = { 0xdd, 0xff, 0xff, 0xff, 0xff };
	/* str8 of 10 bytes with 2 present */
	const uint8_t shortstr[] = { 0xd9, 10, 'a', 'b' };
	/* 40 nested arrays */
	uint8_t deep[40];
	/* a negative number read as unsigned */
	const uint8_t neg[] = { 0xff };
	const uint8_t map32[] = { 0xdf, 0x7f, 0xff, 0xff, 0xff };

	mpk_cur_init(&c, huge, sizeof(huge));
	T_EQ_INT(mpk_read_array(&c, &n), -1);
	mpk_cur_init(&c, shortstr, sizeof(shortstr));
	T_EQ_INT(mpk_read_str(&c, &s), -1);
	memset(deep, 0x91, sizeof(deep));
	mpk_cur_init(&c, deep, sizeof(deep));
	T_EQ_INT(mpk_skip(&c), -1);
	mpk_cur_init(&c, neg, sizeof(neg));
	T_EQ_INT(mpk_read_u64(&c, &u), -1);
	mpk_cur_init(&c, map32, sizeof(map32));
	T_EQ_INT(mpk_skip(&c), -1);
	mpk_cur_init(&c, neg, 0);
	T_EQ_INT(mpk_read_u64(&c, &u), -1);
}

T_TESTS = {
	{ "roundtrip", t_roundtrip },
	{ "refusals", t_refusals },
	{ NULL, NULL },
};
T_MAIN
