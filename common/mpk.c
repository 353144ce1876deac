/* SPDX-License-Identifier: ISC */
/*
 * mpk: strict msgpack reading without allocation; msgpack-c packing into a
 * struct buf.  Callers: proto/ codecs and common/ipc.c.  Never logs.
 */
#include <string.h>

#include "mpk.h"

void
mpk_cur_init(struct mpk_cur *c, const void *p, size_t n)
{
	c->p = p;
	c->end = c->p + n;
}

static int
need(const struct mpk_cur *c, size_t n)
{
	return (mpk_left(c) >= n ? 0 : -1);
}

static uint64_t
be(const uint8_t *p, int n)
{
	uint64_t v = 0;

	for (int i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return (v);
}

int
mpk_read_array(struct mpk_cur *c, uint32_t *n)
{
	uint8_t t;

	if (need(c, 1) == -1)
		return (-1);
	t = *c->p;
	if ((t & 0xf0) == 0x90) {
		*n = t & 0x0f;
		c->p++;
	} else if (t == 0xdc) {
		if (need(c, 3) == -1)
			return (-1);
		*n = (uint32_t)be(c->p + 1, 2);
		c->p += 3;
	} else if (t == 0xdd) {
		if (need(c, 5) == -1)
			return (-1);
		*n = (uint32_t)be(c->p + 1, 4);
		c->p += 5;
	} else
		return (-1);
	/* Every element takes at least one byte: refuse impossible counts. */
	if (*n > mpk_left(c))
		return (-1);
	return (0);
}

int
mpk_read_str(struct mpk_cur *c, struct mstr *s)
{
	uint8_t t;
	size_t hl, n;

	if (need(c, 1) == -1)
		return (-1);
	t = *c->p;
	if ((t & 0xe0) == 0xa0) {
		hl = 1;
		n = t & 0x1f;
	} else if (t == 0xd9 || t == 0xc4) {
		hl = 2;
	} else if (t == 0xda || t == 0xc5) {
		hl = 3;
	} else if (t == 0xdb || t == 0xc6) {
		hl = 5;
	} else
		return (-1);
	if (need(c, hl) == -1)
		return (-1);
	if (hl > 1)
		n = (size_t)be(c->p + 1, (int)hl - 1);
	if (need(c, hl + n) == -1 || n > UINT32_MAX)
		return (-1);
	s->p = (const char *)c->p + hl;
	s->n = (uint32_t)n;
	c->p += hl + n;
	return (0);
}

int
mpk_read_u64(struct mpk_cur *c, uint64_t *v)
{
	uint8_t t;
	int n;

	if (need(c, 1) == -1)
		return (-1);
	t = *c->p;
	if (t <= 0x7f) {
		*v = t;
		c->p++;
		return (0);
	}
	switch (t) {
	case 0xcc: n = 1; break;
	case 0xcd: n = 2; break;
	case 0xce: n = 4; break;
	case 0xcf: n = 8; break;
	default:
		return (-1);
	}
	if (need(c, 1 + (size_t)n) == -1)
		return (-1);
	*v = be(c->p + 1, n);
	c->p += 1 + n;
	return (0);
}

int
mpk_read_i64(struct mpk_cur *c, int64_t *v)
{
	uint8_t t;
	uint64_t u;
	int n;

	if (need(c, 1) == -1)
		return (-1);
	t = *c->p;
	if (t >= 0xe0) {
		*v = (int8_t)t;
		c->p++;
		return (0);
	}
	switch (t) {
	case 0xd0: n = 1; break;
	case 0xd1: n = 2; break;
	case 0xd2: n = 4; break;
	case 0xd3: n = 8; break;
	default:
		/* msgpack-c packs non-negative signed values as unsigned. */
		if (mpk_read_u64(c, &u) == -1 || u > INT64_MAX)
			return (-1);
		*v = (int64_t)u;
		return (0);
	}
	if (need(c, 1 + (size_t)n) == -1)
		return (-1);
	u = be(c->p + 1, n);
	switch (n) {
	case 1: *v = (int8_t)u; break;
	case 2: *v = (int16_t)u; break;
	case 4: *v = (int32_t)u; break;
	default: *v = (int64_t)u; break;
	}
	c->p += 1 + n;
	return (0);
}

static int
skip(struct mpk_cur *c, int depth)
{
	uint8_t t;
	uint64_t n = 0, u;
	int64_t i;
	struct mstr s;
	size_t len;

	if (depth > 16 || need(c, 1) == -1)
		return (-1);
	t = *c->p;
	if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
		c->p++;
		return (0);
	}
	if ((t & 0xe0) == 0xa0 || (t >= 0xc4 && t <= 0xc6) ||
	    (t >= 0xd9 && t <= 0xdb))
		return (mpk_read_str(c, &s));
	if (t >= 0xcc && t <= 0xcf)
		return (mpk_read_u64(c, &u));
	if (t >= 0xd0 && t <= 0xd3)
		return (mpk_read_i64(c, &i));
	if (t == 0xca || t == 0xcb) {
		len = t == 0xca ? 5 : 9;
		if (need(c, len) == -1)
			return (-1);
		c->p += len;
		return (0);
	}
	if ((t & 0xf0) == 0x90 || t == 0xdc || t == 0xdd) {
		uint32_t an;
		if (mpk_read_array(c, &an) == -1)
			return (-1);
		n = an;
	} else if ((t & 0xf0) == 0x80 || t == 0xde || t == 0xdf) {
		if ((t & 0xf0) == 0x80) {
			n = t & 0x0f;
			c->p++;
		} else {
			len = t == 0xde ? 2 : 4;
			if (need(c, 1 + len) == -1)
				return (-1);
			n = be(c->p + 1, (int)len);
			c->p += 1 + len;
		}
		if (n > mpk_left(c) / 2)
			return (-1);
		n *= 2;
	} else
		return (-1); /* ext types are never sent */
	while (n-- > 0)
		if (skip(c, depth + 1) == -1)
			return (-1);
	return (0);
}

int
mpk_skip(struct mpk_cur *c)
{
	return (skip(c, 0));
}

static int
buf_write(void *data, const char *p, size_t n)
{
	return (buf_add(data, p, n));
}

void
mpk_packer_init(msgpack_packer *pk, struct buf *b)
{
	msgpack_packer_init(pk, b, buf_write);
}

int
mpk_pack_mstr(msgpack_packer *pk, struct mstr s)
{
	if (msgpack_pack_str(pk, s.n) != 0)
		return (-1);
	if (s.n == 0) /* a zeroed struct mstr has p == NULL */
		return (0);
	return (msgpack_pack_str_body(pk, s.p, s.n) != 0 ? -1 : 0);
}

int
mpk_pack_cstr(msgpack_packer *pk, const char *s)
{
	return (mpk_pack_mstr(pk, (struct mstr){ s, (uint32_t)strlen(s) }));
}
