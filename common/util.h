/* SPDX-License-Identifier: ISC */
/*
 * util: small things every process needs: clocks, a growable byte buffer,
 * JSON string escaping, random ids.  Never logs, never exits.
 */
#ifndef TROUPE_UTIL_H
#define TROUPE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define nitems(a) (sizeof(a) / sizeof((a)[0]))

/* A counted string that need not be NUL-terminated (may point into an
 * nng message: valid only while that message is). */
struct mstr {
	const char *p;
	uint32_t n;
};
#define MSTR(s) ((struct mstr){ (s), (uint32_t)strlen(s) })
#define MSTR_LIT(s) ((struct mstr){ (s), sizeof(s) - 1 })
#define MSTR_NULL ((struct mstr){ "", 0 })

/* A growable byte buffer. */
struct buf {
	char *b;
	size_t len;
	size_t cap;
};

/* Reserve room for n more bytes; -1 on ENOMEM. */
int buf_reserve(struct buf *, size_t n);
int buf_add(struct buf *, const void *, size_t);
int buf_adds(struct buf *, const char *);
int buf_addf(struct buf *, const char *, ...)
    __attribute__((format(printf, 2, 3)));
/* Append s as a JSON string, quotes included. */
int buf_add_json_str(struct buf *, const char *s, size_t n);
void buf_reset(struct buf *);
void buf_free(struct buf *);

/* Wall clock in ms since the epoch / monotonic ms / monotonic ns. */
uint64_t now_wall_ms(void);
uint64_t now_mono_ms(void);
uint64_t now_mono_ns(void);

/* Fill p with n random bytes (getrandom); -1 on failure. */
int random_bytes(void *p, size_t n);
/* Write 2n lowercase hex digits of p to out (no NUL). */
void hex_encode(char *out, const void *p, size_t n);

/* Whether p[0..n) is well-formed UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF). */
int utf8_valid(const char *p, size_t n);

/* Copy an mstr into a fresh NUL-terminated string; NULL on ENOMEM. */
char *mstr_dup(struct mstr);
int mstr_eq(struct mstr, const char *);

#endif
