/* SPDX-License-Identifier: ISC */
/*
 * t.h: the unit-test harness.  A test binary holds a named table of cases
 * (nng's NUTS_TESTS, Postfix's PTEST_CASE); each case reports "got X, want
 * Y" through the macros below and fails on the first broken expectation.
 *
 *	static void t_roundtrip(void) { T_EQ_INT(f(2), 4); }
 *	T_TESTS = { { "roundtrip", t_roundtrip }, { NULL, NULL } };
 *	T_MAIN
 */
#ifndef TROUPE_T_H
#define TROUPE_T_H

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct t_case {
	const char *name;
	void (*fn)(void);
};

extern jmp_buf t_jmp;
extern int t_failed;

#define T_FAIL(...)                                                        \
	do {                                                               \
		fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__);          \
		fprintf(stderr, __VA_ARGS__);                              \
		fputc('\n', stderr);                                       \
		longjmp(t_jmp, 1);                                         \
	} while (0)
#define T_ASSERT(c)                                                        \
	do {                                                               \
		if (!(c))                                                  \
			T_FAIL("assertion failed: %s", #c);                \
	} while (0)
#define T_EQ_INT(got, want)                                                \
	do {                                                               \
		long long g_ = (long long)(got), w_ = (long long)(want);   \
		if (g_ != w_)                                              \
			T_FAIL("%s: got %lld, want %lld", #got, g_, w_);   \
	} while (0)
#define T_EQ_STR(got, want)                                                \
	do {                                                               \
		const char *g_ = (got), *w_ = (want);                      \
		if (g_ == NULL || strcmp(g_, w_) != 0)                     \
			T_FAIL("%s: got \"%s\", want \"%s\"", #got,        \
			    g_ ? g_ : "(null)", w_);                       \
	} while (0)
#define T_EQ_MEM(gp, gn, want)                                             \
	do {                                                               \
		const char *w_ = (want);                                   \
		size_t gn_ = (gn);                                         \
		if (gn_ != strlen(w_) || memcmp((gp), w_, gn_) != 0)       \
			T_FAIL("%s: got \"%.*s\", want \"%s\"", #gp,       \
			    (int)gn_, (const char *)(gp), w_);             \
	} while (0)

#define T_TESTS static const struct t_case t_cases[]
#define T_MAIN                                                             \
	jmp_buf t_jmp;                                                     \
	int t_failed;                                                      \
	int main(int argc, char **argv)                                    \
	{                                                                  \
		volatile int n = 0, bad = 0;                               \
		for (const struct t_case *volatile c = t_cases; c->name;   \
		     c++) {                                                \
			if (argc > 1 && strcmp(argv[1], c->name) != 0)     \
				continue;                                  \
			n++;                                               \
			if (setjmp(t_jmp) == 0) {                          \
				c->fn();                                   \
				printf("ok   %s\n", c->name);              \
			} else {                                           \
				printf("FAIL %s\n", c->name);              \
				bad++;                                     \
			}                                                  \
		}                                                          \
		printf("%d passed, %d failed\n", n - bad, bad);            \
		return (bad || n == 0 ? 1 : 0);                            \
	}

#endif
