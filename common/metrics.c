/* SPDX-License-Identifier: ISC */
/*
 * metrics: this process's registry of counters, gauges and histograms and
 * its rendering as Prometheus text (exposition format 0.0.4).
 *
 * A series is found by (family, label text) in a chained hash table; a
 * family by its name in a second one.  Families render in the order they
 * were first asked for, and each family's series in their order of
 * creation, so the output is stable from one second to the next.  Series
 * are never freed before metrics_free(): callers keep the pointers.
 *
 * Names and label text are checked when a series is created (a bad one
 * gets NULL and EINVAL), so metrics_render() always produces text that
 * Prometheus accepts.  Callers: proto/svc.c (one registry per process) and
 * every service's hot paths.  Single-threaded.  Never logs, never exits.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"

enum mtype { MT_COUNTER, MT_GAUGE, MT_HISTO };

static const char *const mtype_name[] = {"counter", "gauge", "histogram"};

/* Upper bounds in seconds; the last bucket is +Inf. */
static const double histo_bound[] = {0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                     0.1,   0.25,  0.5,   1,    2.5,   5,
                                     10,    30,    60,    120};
static const char *const histo_le[] = {
        "0.001", "0.002", "0.005", "0.01", "0.025", "0.05",
        "0.1",   "0.25",  "0.5",   "1",    "2.5",   "5",
        "10",    "30",    "60",    "120",  "+Inf"};
#define HISTO_NB (nitems(histo_bound) + 1)

struct histo {
	uint64_t n[HISTO_NB]; /* per bucket, not cumulative */
	uint64_t count;
	double sum;
};

struct family;

struct series {
	struct series *hnext; /* hash chain */
	struct series *fnext; /* next in its family */
	struct family *fam;
	uint64_t hash;
	union {
		uint64_t c;
		double g;
		struct histo h;
	} v;
	char labels[]; /* NUL-terminated */
};

struct family {
	struct family *hnext; /* hash chain */
	struct family *next;  /* creation order */
	struct series *first, *last;
	enum mtype type;
	uint64_t hash;
	const char *help; /* points after name in the same allocation */
	char name[];
};

struct metrics {
	struct series **stab;
	size_t smask, nseries;
	struct family **ftab;
	size_t fmask, nfam;
	struct family *first, *last;
};

/* FNV-1a over the family, a separator, then the labels. */
static uint64_t
metrics_hash(const char *family, const char *labels)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	const unsigned char *p;

	for (p = (const unsigned char *)family; *p; p++)
		h = (h ^ *p) * 0x100000001b3ULL;
	h = (h ^ 0xff) * 0x100000001b3ULL;
	if (labels != NULL)
		for (p = (const unsigned char *)labels; *p; p++)
			h = (h ^ *p) * 0x100000001b3ULL;
	return (h);
}

struct metrics *
metrics_new(void)
{
	struct metrics *m;

	if ((m = calloc(1, sizeof(*m))) == NULL)
		return (NULL);
	m->smask = 63;
	m->fmask = 31;
	m->stab = calloc(m->smask + 1, sizeof(*m->stab));
	m->ftab = calloc(m->fmask + 1, sizeof(*m->ftab));
	if (m->stab == NULL || m->ftab == NULL) {
		metrics_free(m);
		return (NULL);
	}
	return (m);
}

void
metrics_free(struct metrics *m)
{
	struct family *f, *fn;
	struct series *s, *sn;

	if (m == NULL)
		return;
	for (f = m->first; f != NULL; f = fn) {
		fn = f->next;
		for (s = f->first; s != NULL; s = sn) {
			sn = s->fnext;
			free(s);
		}
		free(f);
	}
	free(m->stab);
	free(m->ftab);
	free(m);
}

/* [a-zA-Z_:][a-zA-Z0-9_:]* */
static int
metrics_name_ok(const char *s)
{
	const char *p;

	if (s == NULL || *s == '\0' || (*s >= '0' && *s <= '9'))
		return (0);
	for (p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '_' || *p == ':'))
			return (0);
	return (1);
}

/*
 * name="value"(,name="value")*: label names [a-zA-Z_][a-zA-Z0-9_]*, not
 * reserved (__*), not repeated, not "le" on a histogram; values without a
 * raw newline and with only the escapes \\ \" \n.
 */
static int
metrics_labels_ok(const char *s, int histo)
{
	const char *p = s, *names[32];
	size_t nn = 0, i, len[32];

	if (*p == '\0')
		return (1);
	for (;;) {
		const char *n = p;

		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      *p == '_'))
			return (0);
		while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		       (*p >= '0' && *p <= '9') || *p == '_')
			p++;
		if (p - n >= 2 && n[0] == '_' && n[1] == '_')
			return (0);
		if (histo && p - n == 2 && n[0] == 'l' && n[1] == 'e')
			return (0);
		if (nn == nitems(names))
			return (0);
		for (i = 0; i < nn; i++)
			if (len[i] == (size_t)(p - n) &&
			    memcmp(names[i], n, len[i]) == 0)
				return (0);
		names[nn] = n;
		len[nn++] = (size_t)(p - n);
		if (*p++ != '=' || *p++ != '"')
			return (0);
		for (; *p != '"'; p++) {
			if (*p == '\0' || *p == '\n')
				return (0);
			if (*p == '\\') {
				p++;
				if (*p != '\\' && *p != '"' && *p != 'n')
					return (0);
			}
		}
		p++;
		if (*p == '\0')
			return (1);
		if (*p++ != ',')
			return (0);
	}
}

/* Double the series table and rechain its entries. */
static int
metrics_grow_series(struct metrics *m)
{
	size_t nmask = m->smask * 2 + 1, i;
	struct series **ntab, *s, *sn;

	if ((ntab = calloc(nmask + 1, sizeof(*ntab))) == NULL)
		return (-1);
	for (i = 0; i <= m->smask; i++)
		for (s = m->stab[i]; s != NULL; s = sn) {
			sn = s->hnext;
			s->hnext = ntab[s->hash & nmask];
			ntab[s->hash & nmask] = s;
		}
	free(m->stab);
	m->stab = ntab;
	m->smask = nmask;
	return (0);
}

/* Double the family table and rechain its entries. */
static int
metrics_grow_families(struct metrics *m)
{
	size_t nmask = m->fmask * 2 + 1, i;
	struct family **ntab, *f, *fn;

	if ((ntab = calloc(nmask + 1, sizeof(*ntab))) == NULL)
		return (-1);
	for (i = 0; i <= m->fmask; i++)
		for (f = m->ftab[i]; f != NULL; f = fn) {
			fn = f->hnext;
			f->hnext = ntab[f->hash & nmask];
			ntab[f->hash & nmask] = f;
		}
	free(m->ftab);
	m->ftab = ntab;
	m->fmask = nmask;
	return (0);
}

static struct family *
metrics_family(struct metrics *m, const char *name, const char *help,
               enum mtype type)
{
	struct family *f;
	size_t nl, hl;
	uint64_t h = metrics_hash(name, NULL);

	for (f = m->ftab[h & m->fmask]; f != NULL; f = f->hnext)
		if (f->hash == h && strcmp(f->name, name) == 0)
			break;
	if (f != NULL) {
		if (f->type != type) {
			errno = EINVAL;
			return (NULL);
		}
		return (f);
	}
	if (!metrics_name_ok(name)) {
		errno = EINVAL;
		return (NULL);
	}
	/* promtool wants help text; a family without any shows its name. */
	if (help == NULL || *help == '\0')
		help = name;
	nl = strlen(name);
	hl = strlen(help);
	if ((f = calloc(1, sizeof(*f) + nl + hl + 2)) == NULL)
		return (NULL);
	memcpy(f->name, name, nl + 1);
	memcpy(f->name + nl + 1, help, hl + 1);
	f->help = f->name + nl + 1;
	f->type = type;
	f->hash = h;
	if (m->nfam + 1 > (m->fmask + 1) / 4 * 3 &&
	    metrics_grow_families(m) == -1) {
		free(f);
		return (NULL);
	}
	f->hnext = m->ftab[h & m->fmask];
	m->ftab[h & m->fmask] = f;
	m->nfam++;
	if (m->last != NULL)
		m->last->next = f;
	else
		m->first = f;
	m->last = f;
	return (f);
}

static struct series *
metrics_series(struct metrics *m, const char *family, const char *help,
               const char *labels, enum mtype type)
{
	struct family *f;
	struct series *s;
	uint64_t h;
	size_t ll;

	if (m == NULL || family == NULL) {
		errno = EINVAL;
		return (NULL);
	}
	if (labels == NULL)
		labels = "";
	h = metrics_hash(family, labels);
	for (s = m->stab[h & m->smask]; s != NULL; s = s->hnext)
		if (s->hash == h && strcmp(s->labels, labels) == 0 &&
		    strcmp(s->fam->name, family) == 0) {
			if (s->fam->type != type) {
				errno = EINVAL;
				return (NULL);
			}
			return (s);
		}
	if (!metrics_labels_ok(labels, type == MT_HISTO)) {
		errno = EINVAL;
		return (NULL);
	}
	if ((f = metrics_family(m, family, help, type)) == NULL)
		return (NULL);
	ll = strlen(labels);
	if ((s = calloc(1, sizeof(*s) + ll + 1)) == NULL)
		return (NULL);
	memcpy(s->labels, labels, ll + 1);
	s->fam = f;
	s->hash = h;
	if (m->nseries + 1 > (m->smask + 1) / 4 * 3 &&
	    metrics_grow_series(m) == -1) {
		free(s);
		return (NULL);
	}
	s->hnext = m->stab[h & m->smask];
	m->stab[h & m->smask] = s;
	m->nseries++;
	if (f->last != NULL)
		f->last->fnext = s;
	else
		f->first = s;
	f->last = s;
	return (s);
}

uint64_t *
metrics_counter(struct metrics *m, const char *family, const char *help,
                const char *labels)
{
	struct series *s;

	if ((s = metrics_series(m, family, help, labels, MT_COUNTER)) == NULL)
		return (NULL);
	return (&s->v.c);
}

double *
metrics_gauge(struct metrics *m, const char *family, const char *help,
              const char *labels)
{
	struct series *s;

	if ((s = metrics_series(m, family, help, labels, MT_GAUGE)) == NULL)
		return (NULL);
	return (&s->v.g);
}

struct histo *
metrics_histo(struct metrics *m, const char *family, const char *help,
              const char *labels)
{
	struct series *s;

	if ((s = metrics_series(m, family, help, labels, MT_HISTO)) == NULL)
		return (NULL);
	return (&s->v.h);
}

void
histo_observe(struct histo *h, double seconds)
{
	size_t i;

	if (h == NULL || isnan(seconds))
		return;
	if (seconds < 0)
		seconds = 0;
	for (i = 0; i < nitems(histo_bound); i++)
		if (seconds <= histo_bound[i])
			break;
	h->n[i]++;
	h->count++;
	h->sum += seconds;
}

/* The shortest of %.15g and %.17g that reads back as v; Go's spellings of
 * the special values. */
static int
metrics_add_double(struct buf *b, double v)
{
	char s[32];

	if (isnan(v))
		return (buf_adds(b, "NaN"));
	if (isinf(v))
		return (buf_adds(b, v > 0 ? "+Inf" : "-Inf"));
	snprintf(s, sizeof(s), "%.15g", v);
	if (strtod(s, NULL) != v)
		snprintf(s, sizeof(s), "%.17g", v);
	return (buf_adds(b, s));
}

/* HELP text escapes backslash and newline. */
static int
metrics_add_help(struct buf *b, const char *s)
{
	const char *p;

	for (p = s; *p; p++) {
		if (*p == '\\' && buf_add(b, "\\\\", 2) == -1)
			return (-1);
		else if (*p == '\n' && buf_add(b, "\\n", 2) == -1)
			return (-1);
		else if (*p != '\\' && *p != '\n' && buf_add(b, p, 1) == -1)
			return (-1);
	}
	return (0);
}

/* name[suffix]{labels} or name[suffix]{labels,le="x"}, then a space. */
static int
metrics_add_head(struct buf *b, const struct series *s, const char *suffix,
                 const char *le)
{
	const char *l = s->labels;

	if (*l == '\0' && le == NULL)
		return (buf_addf(b, "%s%s ", s->fam->name, suffix));
	if (le == NULL)
		return (buf_addf(b, "%s%s{%s} ", s->fam->name, suffix, l));
	return (buf_addf(b, "%s%s{%s%sle=\"%s\"} ", s->fam->name, suffix, l,
	                 *l ? "," : "", le));
}

static int
metrics_render_series(struct buf *b, const struct series *s)
{
	const struct histo *h = &s->v.h;
	uint64_t cum = 0;
	size_t i;

	switch (s->fam->type) {
	case MT_COUNTER:
		if (metrics_add_head(b, s, "", NULL) == -1 ||
		    buf_addf(b, "%llu\n", (unsigned long long)s->v.c) == -1)
			return (-1);
		return (0);
	case MT_GAUGE:
		if (metrics_add_head(b, s, "", NULL) == -1 ||
		    metrics_add_double(b, s->v.g) == -1 ||
		    buf_add(b, "\n", 1) == -1)
			return (-1);
		return (0);
	case MT_HISTO:
		for (i = 0; i < HISTO_NB; i++) {
			cum += h->n[i];
			if (metrics_add_head(b, s, "_bucket", histo_le[i]) ==
			            -1 ||
			    buf_addf(b, "%llu\n", (unsigned long long)cum) ==
			            -1)
				return (-1);
		}
		if (metrics_add_head(b, s, "_sum", NULL) == -1 ||
		    metrics_add_double(b, h->sum) == -1 ||
		    buf_add(b, "\n", 1) == -1 ||
		    metrics_add_head(b, s, "_count", NULL) == -1 ||
		    buf_addf(b, "%llu\n", (unsigned long long)h->count) == -1)
			return (-1);
		return (0);
	}
	return (-1);
}

int
metrics_render(const struct metrics *m, struct buf *b)
{
	const struct family *f;
	const struct series *s;

	for (f = m->first; f != NULL; f = f->next) {
		if (buf_addf(b, "# HELP %s ", f->name) == -1 ||
		    metrics_add_help(b, f->help) == -1 ||
		    buf_addf(b, "\n# TYPE %s %s\n", f->name,
		             mtype_name[f->type]) == -1)
			return (-1);
		for (s = f->first; s != NULL; s = s->fnext)
			if (metrics_render_series(b, s) == -1)
				return (-1);
	}
	return (0);
}
