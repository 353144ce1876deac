/* SPDX-License-Identifier: ISC */
/*
 * mpk: a strict, bounds-checked msgpack reader over a byte range, and a
 * msgpack-c packer that writes into a struct buf.
 *
 * msgpack-c's unpacker is not used on bytes from another process: it
 * allocates for container counts before checking them and keeps no limits
 * (see PITFALLS.md).  This reader allocates nothing; strings point into the
 * input.  Every function returns 0, or -1 when the input is short or of the
 * wrong type (the cursor is then unspecified).  Never logs.
 */
#ifndef TROUPE_MPK_H
#define TROUPE_MPK_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "util.h"

struct mpk_cur {
	const uint8_t *p;
	const uint8_t *end;
};

void mpk_cur_init(struct mpk_cur *, const void *, size_t);
int mpk_read_array(struct mpk_cur *, uint32_t *n);
int mpk_read_str(struct mpk_cur *, struct mstr *);
int mpk_read_u64(struct mpk_cur *, uint64_t *);
int mpk_read_i64(struct mpk_cur *, int64_t *);
/* Skip one value of any type, nested at most 16 deep. */
int mpk_skip(struct mpk_cur *);
static inline size_t
mpk_left(const struct mpk_cur *c)
{
	return (size_t)(c->end - c->p);
}

/* Point pk at b: everything packed is appended to b. */
void mpk_packer_init(msgpack_packer *pk, struct buf *b);
int mpk_pack_mstr(msgpack_packer *, struct mstr);
int mpk_pack_cstr(msgpack_packer *, const char *);

#endif
