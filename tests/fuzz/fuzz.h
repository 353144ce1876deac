/* SPDX-License-Identifier: ISC */
/*
 * fuzz: what every harness in tests/fuzz shares.  A harness defines
 * LLVMFuzzerTestOneInput() and nothing else; built with -DTROUPE_FUZZ=ON
 * (clang) it links libFuzzer, otherwise it links replay.c, which feeds it
 * every file named on its command line (the committed seeds and crash
 * regressions), so the normal and sanitizer builds run them under ctest.
 *
 * Harnesses never print and never exit on bad input: a decoder that
 * refuses input is the expected outcome.  A property a harness checks
 * (a round trip, a bound) aborts through fuzz_assert(), which libFuzzer
 * reports as a crash with the input saved.
 */
#ifndef TROUPE_FUZZ_H
#define TROUPE_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

#define fuzz_assert(c)                                                        \
	do {                                                                  \
		if (!(c)) {                                                   \
			fprintf(stderr, "%s:%d: property failed: %s\n",       \
			        __FILE__, __LINE__, #c);                      \
			abort();                                              \
		}                                                             \
	} while (0)

/* A copy of n bytes with a NUL after them, in a block of exactly n + 1
 * bytes (so AddressSanitizer sees a read past the end); NULL on ENOMEM. */
static inline char *
fuzz_strdup(const uint8_t *d, size_t n)
{
	char *s;

	if ((s = malloc(n + 1)) == NULL)
		return (NULL);
	if (n > 0)
		memcpy(s, d, n);
	s[n] = '\0';
	return (s);
}

/* Split off the bytes up to the next sep (or the end) from *d and *n:
 * returns them as a fresh fuzz_strdup() copy and advances past sep. */
static inline char *
fuzz_field(const uint8_t **d, size_t *n, int sep, size_t *len)
{
	const uint8_t *e = memchr(*d, sep, *n);
	size_t k = e ? (size_t)(e - *d) : *n;
	char *s = fuzz_strdup(*d, k);

	*len = k;
	*d += e ? k + 1 : k;
	*n -= e ? k + 1 : k;
	return (s);
}

#endif
