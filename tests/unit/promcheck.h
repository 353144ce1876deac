/* SPDX-License-Identifier: ISC */
/*
 * promcheck.h: a checker of Prometheus text exposition format (0.0.4) for
 * unit tests, stricter than Prometheus's own parser: every line ends in a
 * newline; "# HELP" and "# TYPE" at most once per family and before its
 * samples; a family's lines are contiguous; names and label sets follow
 * the grammar (escapes \\ \" \n only, no repeated label name); values are
 * floats (NaN, +Inf, -Inf allowed) with an optional integer timestamp; a
 * histogram's _bucket lines carry le, are cumulative, end with le="+Inf"
 * equal to _count; no sample (name and labels) appears twice.
 *
 * Used by tests/unit/common/metrics_test.c and the telemetry merge test;
 * promtool is not installed on the build machines (prometheus package).
 * prom_check_promtool() runs it when it is there.
 */
#ifndef TROUPE_PROMCHECK_H
#define TROUPE_PROMCHECK_H

#include <math.h>
#include <stdarg.h>
#include <sys/wait.h>

#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define PC_MAXFAM 1024
#define PC_MAXSER 512

struct pc_state {
	char fam[PC_MAXFAM][128]; /* families seen, in order */
	char help[PC_MAXFAM], type[PC_MAXFAM], sampled[PC_MAXFAM];
	int nfam, cur; /* cur: index of the open family, -1 */
	char ftype[PC_MAXFAM][16];
	/* samples seen (name{sorted labels}) and histogram series state */
	char *seen[PC_MAXSER * 32];
	int nseen;
	struct {
		char key[512];
		double lastle, lastv, inf, count;
		int has_inf, has_count;
	} h[PC_MAXSER];
	int nh;
};

static int
pc_err(char *err, size_t errlen, int line, const char *fmt, ...)
{
	va_list ap;
	int n;

	n = snprintf(err, errlen, "line %d: ", line);
	va_start(ap, fmt);
	vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
	va_end(ap);
	return (-1);
}

static int
pc_name(const char *p, size_t n, int metric)
{
	size_t i;

	if (n == 0 || (p[0] >= '0' && p[0] <= '9'))
		return (0);
	for (i = 0; i < n; i++)
		if (!((p[i] >= 'a' && p[i] <= 'z') ||
		      (p[i] >= 'A' && p[i] <= 'Z') ||
		      (p[i] >= '0' && p[i] <= '9') || p[i] == '_' ||
		      (metric && p[i] == ':')))
			return (0);
	return (1);
}

static int
pc_family(struct pc_state *st, const char *name, size_t n)
{
	int i;

	for (i = 0; i < st->nfam; i++)
		if (strlen(st->fam[i]) == n &&
		    memcmp(st->fam[i], name, n) == 0)
			return (i);
	return (-1);
}

static int
pc_newfam(struct pc_state *st, const char *name, size_t n)
{
	int i = st->nfam++;

	if (i >= PC_MAXFAM || n >= sizeof(st->fam[0]))
		return (-1);
	memcpy(st->fam[i], name, n);
	st->fam[i][n] = '\0';
	st->help[i] = st->type[i] = st->sampled[i] = 0;
	strcpy(st->ftype[i], "untyped");
	return (i);
}

static int
pc_cmpstr(const void *a, const void *b)
{
	return (strcmp(*(char *const *)a, *(char *const *)b));
}

static double
pc_le(const char *v)
{
	if (strcmp(v, "+Inf") == 0)
		return (INFINITY);
	return (strtod(v, NULL));
}

/* 0 if text is valid; else -1 and a message naming the line. */
static int
prom_check(const char *text, char *err, size_t errlen)
{
	struct pc_state *st;
	const char *p = text, *nl;
	int line = 0, rc = -1, i;

	if ((st = calloc(1, sizeof(*st))) == NULL)
		return (pc_err(err, errlen, 0, "ENOMEM"));
	st->cur = -1;
	for (; *p; p = nl + 1) {
		char lbuf[4096], *lines, *lv[32], key[1024], le[64];
		const char *q, *name, *suffix = "";
		size_t nlen, ln;
		int nl_labels = 0, f, hasle = 0;

		line++;
		if ((nl = strchr(p, '\n')) == NULL) {
			pc_err(err, errlen, line, "no final newline");
			goto out;
		}
		ln = (size_t)(nl - p);
		if (ln >= sizeof(lbuf)) {
			pc_err(err, errlen, line,
			       "line too long for the check");
			goto out;
		}
		memcpy(lbuf, p, ln);
		lbuf[ln] = '\0';
		if (ln == 0)
			continue;
		if (lbuf[0] == '#') {
			char kw[8], *nm, *rest;

			if (strncmp(lbuf, "# HELP ", 7) != 0 &&
			    strncmp(lbuf, "# TYPE ", 7) != 0)
				continue; /* a plain comment */
			memcpy(kw, lbuf + 2, 4);
			kw[4] = '\0';
			nm = lbuf + 7;
			rest = strchr(nm, ' ');
			nlen = rest ? (size_t)(rest - nm) : strlen(nm);
			if (!pc_name(nm, nlen, 1)) {
				pc_err(err, errlen, line, "bad name in %s",
				       kw);
				goto out;
			}
			if ((f = pc_family(st, nm, nlen)) == -1) {
				if ((f = pc_newfam(st, nm, nlen)) == -1) {
					pc_err(err, errlen, line, "too many");
					goto out;
				}
			} else if (f != st->cur) {
				pc_err(err, errlen, line,
				       "%s for family %s seen before", kw,
				       st->fam[f]);
				goto out;
			}
			st->cur = f;
			if (strcmp(kw, "HELP") == 0) {
				if (st->help[f]++) {
					pc_err(err, errlen, line,
					       "second HELP");
					goto out;
				}
				for (q = rest ? rest + 1 : ""; *q; q++)
					if (*q == '\\' && q[1] != '\\' &&
					    q[1] != 'n') {
						pc_err(err, errlen, line,
						       "bad escape in HELP");
						goto out;
					} else if (*q == '\\')
						q++;
				continue;
			}
			if (st->type[f]++ || st->sampled[f]) {
				pc_err(err, errlen, line,
				       "second TYPE or TYPE after samples");
				goto out;
			}
			if (rest == NULL ||
			    (strcmp(rest + 1, "counter") != 0 &&
			     strcmp(rest + 1, "gauge") != 0 &&
			     strcmp(rest + 1, "histogram") != 0 &&
			     strcmp(rest + 1, "summary") != 0 &&
			     strcmp(rest + 1, "untyped") != 0)) {
				pc_err(err, errlen, line, "bad TYPE");
				goto out;
			}
			snprintf(st->ftype[f], sizeof(st->ftype[f]), "%s",
			         rest + 1);
			continue;
		}
		/* A sample: name, labels, value, timestamp. */
		name = lbuf;
		for (q = lbuf; *q && *q != '{' && *q != ' '; q++)
			;
		nlen = (size_t)(q - name);
		if (!pc_name(name, nlen, 1)) {
			pc_err(err, errlen, line, "bad metric name");
			goto out;
		}
		lines = (char *)(uintptr_t)q;
		if (*q == '{') {
			char *w = lines + 1;

			for (;;) {
				char *ln0 = w, *v;

				if (*w == '}')
					break;
				while ((*w >= 'a' && *w <= 'z') ||
				       (*w >= 'A' && *w <= 'Z') ||
				       (*w >= '0' && *w <= '9') || *w == '_')
					w++;
				if (!pc_name(ln0, (size_t)(w - ln0), 0) ||
				    w[0] != '=' || w[1] != '"') {
					pc_err(err, errlen, line, "bad label");
					goto out;
				}
				v = w + 2;
				for (w = v; *w != '"'; w++) {
					if (*w == '\0') {
						pc_err(err, errlen, line,
						       "unterminated label "
						       "value");
						goto out;
					}
					if (*w == '\\') {
						w++;
						if (*w != '\\' && *w != '"' &&
						    *w != 'n') {
							pc_err(err, errlen,
							       line,
							       "bad escape");
							goto out;
						}
					}
				}
				w++;
				if (nl_labels ==
				    (int)(sizeof(lv) / sizeof(lv[0]))) {
					pc_err(err, errlen, line, "too many");
					goto out;
				}
				lv[nl_labels++] = ln0;
				if (*w == ',') {
					*w++ = '\0';
					continue;
				}
				if (*w != '}') {
					pc_err(err, errlen, line,
					       "expected , or }");
					goto out;
				}
				*w = '\0';
				break;
			}
			q = w + 1;
		}
		if (*q != ' ') {
			pc_err(err, errlen, line, "no space before value");
			goto out;
		}
		q++;
		{
			char *end;
			const char *vs = q;

			if (strncmp(q, "NaN", 3) == 0)
				end = (char *)(uintptr_t)q + 3;
			else if (strncmp(q, "+Inf", 4) == 0 ||
			         strncmp(q, "-Inf", 4) == 0)
				end = (char *)(uintptr_t)q + 4;
			else {
				strtod(q, &end);
				if (end == q ||
				    strncasecmp(q, "inf", 3) == 0 ||
				    strncasecmp(q, "nan", 3) == 0) {
					pc_err(err, errlen, line, "bad value");
					goto out;
				}
			}
			if (*end == ' ') {
				char *e2;

				strtoll(end + 1, &e2, 10);
				if (e2 == end + 1 || *e2 != '\0') {
					pc_err(err, errlen, line,
					       "bad timestamp");
					goto out;
				}
			} else if (*end != '\0') {
				pc_err(err, errlen, line, "junk after value");
				goto out;
			}
			(void)vs;
		}
		/* Labels: no repeats; le apart; a canonical key. */
		qsort(lv, (size_t)nl_labels, sizeof(lv[0]), pc_cmpstr);
		for (i = 1; i < nl_labels; i++) {
			size_t a = strcspn(lv[i - 1], "="),
			       b = strcspn(lv[i], "=");
			if (a == b && memcmp(lv[i - 1], lv[i], a) == 0) {
				pc_err(err, errlen, line, "repeated label");
				goto out;
			}
		}
		/* Which family? */
		f = -1;
		if (st->cur != -1) {
			const char *cf = st->fam[st->cur];
			size_t cl = strlen(cf);
			const char *t = st->ftype[st->cur];

			if (nlen == cl && memcmp(name, cf, cl) == 0 &&
			    strcmp(t, "histogram") != 0)
				f = st->cur;
			else if ((strcmp(t, "histogram") == 0 ||
			          strcmp(t, "summary") == 0) &&
			         nlen > cl && memcmp(name, cf, cl) == 0) {
				const char *sfx = name + cl;
				size_t sl = nlen - cl;

				if ((sl == 4 && memcmp(sfx, "_sum", 4) == 0) ||
				    (sl == 6 &&
				     memcmp(sfx, "_count", 6) == 0) ||
				    (sl == 7 &&
				     memcmp(sfx, "_bucket", 7) == 0 &&
				     strcmp(t, "histogram") == 0)) {
					f = st->cur;
					suffix = sl == 4   ? "_sum"
					         : sl == 6 ? "_count"
					                   : "_bucket";
				}
			}
		}
		if (f == -1) {
			if (pc_family(st, name, nlen) != -1) {
				pc_err(err, errlen, line,
				       "sample of family %.*s out of its "
				       "group",
				       (int)nlen, name);
				goto out;
			}
			if ((f = pc_newfam(st, name, nlen)) == -1) {
				pc_err(err, errlen, line, "too many");
				goto out;
			}
			st->cur = f;
		}
		st->sampled[f] = 1;
		/* The sample's identity: name and sorted labels. */
		snprintf(key, sizeof(key), "%.*s", (int)nlen, name);
		le[0] = '\0';
		for (i = 0; i < nl_labels; i++) {
			size_t kl = strlen(key);

			snprintf(key + kl, sizeof(key) - kl, "%s%s",
			         i ? "," : "{", lv[i]);
		}
		if (nl_labels)
			strncat(key, "}", sizeof(key) - strlen(key) - 1);
		for (i = 0; i < st->nseen; i++)
			if (strcmp(st->seen[i], key) == 0) {
				pc_err(err, errlen, line, "repeated sample %s",
				       key);
				goto out;
			}
		if (st->nseen < (int)(sizeof(st->seen) / sizeof(st->seen[0])))
			st->seen[st->nseen++] = strdup(key);
		if (strcmp(st->ftype[f], "histogram") == 0) {
			char hkey[512];
			double v = strncmp(q, "+Inf", 4) == 0
			                   ? INFINITY
			                   : strtod(q, NULL);
			int h;

			snprintf(hkey, sizeof(hkey), "%s|", st->fam[f]);
			for (i = 0; i < nl_labels; i++) {
				if (strncmp(lv[i], "le=\"", 4) == 0) {
					snprintf(le, sizeof(le), "%.*s",
					         (int)strcspn(lv[i] + 4, "\""),
					         lv[i] + 4);
					hasle = 1;
					continue;
				}
				strncat(hkey, lv[i],
				        sizeof(hkey) - strlen(hkey) - 2);
				strcat(hkey, ",");
			}
			if (strcmp(suffix, "_bucket") == 0 && !hasle) {
				pc_err(err, errlen, line, "bucket without le");
				goto out;
			}
			for (h = 0; h < st->nh; h++)
				if (strcmp(st->h[h].key, hkey) == 0)
					break;
			if (h == st->nh) {
				if (st->nh == PC_MAXSER) {
					pc_err(err, errlen, line, "too many");
					goto out;
				}
				st->nh++;
				snprintf(st->h[h].key, sizeof(st->h[h].key),
				         "%s", hkey);
				st->h[h].lastle = -INFINITY;
				st->h[h].lastv = 0;
			}
			if (strcmp(suffix, "_bucket") == 0) {
				if (pc_le(le) <= st->h[h].lastle ||
				    v < st->h[h].lastv) {
					pc_err(err, errlen, line,
					       "buckets not "
					       "ascending/cumulative");
					goto out;
				}
				st->h[h].lastle = pc_le(le);
				st->h[h].lastv = v;
				if (isinf(pc_le(le))) {
					st->h[h].inf = v;
					st->h[h].has_inf = 1;
				}
			} else if (strcmp(suffix, "_count") == 0) {
				st->h[h].count = v;
				st->h[h].has_count = 1;
			}
		}
	}
	for (i = 0; i < st->nh; i++)
		if (!st->h[i].has_inf || !st->h[i].has_count ||
		    st->h[i].inf != st->h[i].count) {
			pc_err(err, errlen, line,
			       "histogram series {%s} lacks +Inf or _count, "
			       "or they differ",
			       st->h[i].key);
			goto out;
		}
	rc = 0;
out:
	for (i = 0; i < st->nseen; i++)
		free(st->seen[i]);
	free(st);
	return (rc);
}

/* Run `promtool check metrics` on text: 0 valid, 1 invalid, -1 when
 * promtool is not installed (the caller skips). */
static int
prom_check_promtool(const char *text)
{
	FILE *f;

	if (access("/usr/bin/promtool", X_OK) != 0)
		return (-1);
	if ((f = popen("/usr/bin/promtool check metrics >&2", "w")) == NULL)
		return (-1);
	fputs(text, f);
	{
		/* 3: lint warnings only (e.g. no HELP in a fixture) */
		int rc = pclose(f);

		return (rc != -1 && WIFEXITED(rc) &&
		    (WEXITSTATUS(rc) == 0 || WEXITSTATUS(rc) == 3) ? 0 : 1);
	}
}

#endif
