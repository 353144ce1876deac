/* SPDX-License-Identifier: ISC */
/*
 * util: clocks, the growable buffer, JSON string escaping, random bytes.
 * Callers: every process.  Never logs, never exits.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "util.h"

int
buf_reserve(struct buf *b, size_t n)
{
	size_t cap;
	char *p;

	if (b->len + n <= b->cap)
		return (0);
	cap = b->cap ? b->cap : 256;
	while (cap < b->len + n)
		cap *= 2;
	if ((p = realloc(b->b, cap)) == NULL)
		return (-1);
	b->b = p;
	b->cap = cap;
	return (0);
}

int
buf_add(struct buf *b, const void *p, size_t n)
{
	if (buf_reserve(b, n + 1) == -1)
		return (-1);
	if (n > 0)
		memcpy(b->b + b->len, p, n);
	b->len += n;
	b->b[b->len] = '\0'; /* always NUL-terminated, not counted */
	return (0);
}

int
buf_adds(struct buf *b, const char *s)
{
	return (buf_add(b, s, strlen(s)));
}

int
buf_addf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || buf_reserve(b, (size_t)n + 1) == -1)
		return (-1);
	va_start(ap, fmt);
	vsnprintf(b->b + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
	return (0);
}

int
buf_add_json_str(struct buf *b, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	char esc[6];
	size_t i, run = 0;

	if (buf_reserve(b, n + 3) == -1 || buf_add(b, "\"", 1) == -1)
		return (-1);
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		const char *r = NULL;
		size_t rl = 2;

		switch (c) {
		case '"': r = "\\\""; break;
		case '\\': r = "\\\\"; break;
		case '\n': r = "\\n"; break;
		case '\r': r = "\\r"; break;
		case '\t': r = "\\t"; break;
		case '\b': r = "\\b"; break;
		case '\f': r = "\\f"; break;
		default:
			if (c < 0x20) {
				esc[0] = '\\';
				esc[1] = 'u';
				esc[2] = '0';
				esc[3] = '0';
				esc[4] = hex[c >> 4];
				esc[5] = hex[c & 15];
				r = esc;
				rl = 6;
			}
		}
		if (r == NULL)
			continue;
		if (buf_add(b, s + run, i - run) == -1 || buf_add(b, r, rl) == -1)
			return (-1);
		run = i + 1;
	}
	if (buf_add(b, s + run, n - run) == -1)
		return (-1);
	return (buf_add(b, "\"", 1));
}

void
buf_reset(struct buf *b)
{
	b->len = 0;
	if (b->b)
		b->b[0] = '\0';
}

void
buf_free(struct buf *b)
{
	free(b->b);
	b->b = NULL;
	b->len = b->cap = 0;
}

static uint64_t
clock_ns(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
}

uint64_t
now_wall_ms(void)
{
	return (clock_ns(CLOCK_REALTIME) / 1000000u);
}

uint64_t
now_mono_ms(void)
{
	return (clock_ns(CLOCK_MONOTONIC) / 1000000u);
}

uint64_t
now_mono_ns(void)
{
	return (clock_ns(CLOCK_MONOTONIC));
}

int
random_bytes(void *p, size_t n)
{
	char *c = p;
	ssize_t r;

	while (n > 0) {
		if ((r = getrandom(c, n, 0)) == -1) {
			if (errno == EINTR)
				continue;
			return (-1);
		}
		c += r;
		n -= (size_t)r;
	}
	return (0);
}

void
hex_encode(char *out, const void *p, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *c = p;

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = hex[c[i] >> 4];
		out[2 * i + 1] = hex[c[i] & 15];
	}
}

char *
mstr_dup(struct mstr s)
{
	char *p;

	if ((p = malloc((size_t)s.n + 1)) == NULL)
		return (NULL);
	memcpy(p, s.p, s.n);
	p[s.n] = '\0';
	return (p);
}

int
mstr_eq(struct mstr s, const char *c)
{
	size_t n = strlen(c);

	return (s.n == n && memcmp(s.p, c, n) == 0);
}

int
utf8_valid(const char *p, size_t n)
{
	const unsigned char *s = (const unsigned char *)p;
	size_t i = 0;

	while (i < n) {
		unsigned char c = s[i];
		size_t len;
		unsigned lo = 0x80, hi = 0xbf; /* the second byte's range */

		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf)
			len = 2;
		else if (c >= 0xe0 && c <= 0xef) {
			len = 3;
			if (c == 0xe0)
				lo = 0xa0; /* overlong */
			else if (c == 0xed)
				hi = 0x9f; /* surrogates */
		} else if (c >= 0xf0 && c <= 0xf4) {
			len = 4;
			if (c == 0xf0)
				lo = 0x90; /* overlong */
			else if (c == 0xf4)
				hi = 0x8f; /* past U+10FFFF */
		} else
			return (0);
		if (n - i < len || s[i + 1] < lo || s[i + 1] > hi)
			return (0);
		for (size_t k = 2; k < len; k++)
			if (s[i + k] < 0x80 || s[i + k] > 0xbf)
				return (0);
		i += len;
	}
	return (1);
}
