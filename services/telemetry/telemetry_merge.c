/* SPDX-License-Identifier: ISC */
/*
 * telemetry_merge: many processes' Prometheus texts into one page.
 *
 * Every process renders its own registry (common/metrics.c) and the
 * families repeat from one process to the next
 * (troupe_ipc_envelopes_total, the request histograms of several
 * workers).  The page must still name each family once, with its samples
 * together, and no sample twice, or
 * Prometheus refuses the whole scrape.  So each text is read line by line
 * ("# HELP name text", "# TYPE name type", "name{labels} value [ts]"),
 * every sample is filed under its family (a histogram's _bucket, _sum and
 * _count under the histogram), labelled with its service where it does not
 * say, and the families are written out in order of first appearance.
 *
 * Input is another process's text: every line is checked, and what is not
 * valid exposition format is dropped and counted, never passed on.
 * Callers: telemetry_store.c at each scrape.  Never logs.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "telemetry.h"

enum mt_type {
	MT_UNSET,
	MT_UNTYPED,
	MT_COUNTER,
	MT_GAUGE,
	MT_HISTO,
	MT_SUMMARY
};

static const char *const mt_name[] = {"",      "untyped",   "counter",
                                      "gauge", "histogram", "summary"};

struct mfam {
	const char *name; /* into a source text */
	size_t nlen;
	const char *help; /* into a source text, or NULL */
	size_t hlen;
	enum mt_type type;
	struct buf body; /* its samples, rewritten */
};

/* A sample already written: its key is body[off, off + len). */
struct mkey {
	uint64_t hash;
	uint32_t fam, off, len;
};

struct merge {
	struct mfam *fams;
	size_t nfams, fcap;
	uint32_t *fidx; /* hash of family names: index + 1, 0 empty */
	size_t fmask;
	struct mkey *keys; /* hash of written samples, hash 0: empty */
	size_t kmask, nkeys;
	uint64_t dropped;
};

static uint64_t
merge_hash(const char *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	while (n-- > 0)
		h = (h ^ (unsigned char)*p++) * 0x100000001b3ULL;
	return (h ? h : 1);
}

static int
merge_is_name(const char *p, size_t n)
{
	size_t i;

	if (n == 0 || (p[0] >= '0' && p[0] <= '9'))
		return (0);
	for (i = 0; i < n; i++)
		if (!((p[i] >= 'a' && p[i] <= 'z') ||
		      (p[i] >= 'A' && p[i] <= 'Z') ||
		      (p[i] >= '0' && p[i] <= '9') || p[i] == '_' ||
		      p[i] == ':'))
			return (0);
	return (1);
}

static int
merge_rehash_fams(struct merge *mg)
{
	size_t nmask = mg->fmask ? mg->fmask * 2 + 1 : 255, i;
	uint32_t *n;

	if ((n = calloc(nmask + 1, sizeof(*n))) == NULL)
		return (-1);
	for (i = 0; i < mg->nfams; i++) {
		size_t j =
		        merge_hash(mg->fams[i].name, mg->fams[i].nlen) & nmask;

		while (n[j] != 0)
			j = (j + 1) & nmask;
		n[j] = (uint32_t)i + 1;
	}
	free(mg->fidx);
	mg->fidx = n;
	mg->fmask = nmask;
	return (0);
}

/* The family called name, created (type unset) if create; NULL if absent
 * or on ENOMEM (errno). */
static struct mfam *
merge_family(struct merge *mg, const char *name, size_t n, int create)
{
	size_t j;
	struct mfam *f;

	if (mg->fmask != 0) {
		j = merge_hash(name, n) & mg->fmask;
		for (; mg->fidx[j] != 0; j = (j + 1) & mg->fmask) {
			f = &mg->fams[mg->fidx[j] - 1];
			if (f->nlen == n && memcmp(f->name, name, n) == 0)
				return (f);
		}
	}
	errno = 0;
	if (!create)
		return (NULL);
	if (mg->nfams == mg->fcap) {
		size_t cap = mg->fcap ? mg->fcap * 2 : 64;

		if ((f = reallocarray(mg->fams, cap, sizeof(*f))) == NULL)
			return (NULL);
		mg->fams = f;
		mg->fcap = cap;
	}
	f = &mg->fams[mg->nfams++];
	memset(f, 0, sizeof(*f));
	f->name = name;
	f->nlen = n;
	if ((mg->nfams + 1) * 4 > (mg->fmask + 1) * 3) {
		if (merge_rehash_fams(mg) == -1) {
			mg->nfams--;
			return (NULL);
		}
	} else {
		j = merge_hash(name, n) & mg->fmask;
		while (mg->fidx[j] != 0)
			j = (j + 1) & mg->fmask;
		mg->fidx[j] = (uint32_t)mg->nfams;
	}
	return (f);
}

/* Whether the key (the sample's name and labels as written) is new; if
 * so it is remembered as f's body [off, off + len).  -1 on ENOMEM. */
static int
merge_key_new(struct merge *mg, struct mfam *f, size_t off, size_t len)
{
	const char *k = f->body.b + off;
	uint64_t h = merge_hash(k, len);
	size_t j;

	if ((mg->nkeys + 1) * 4 > (mg->kmask + 1) * 3) {
		size_t nmask = mg->kmask ? mg->kmask * 2 + 1 : 1023, i;
		struct mkey *n;

		if ((n = calloc(nmask + 1, sizeof(*n))) == NULL)
			return (-1);
		for (i = 0; mg->keys != NULL && i <= mg->kmask; i++) {
			if (mg->keys[i].hash == 0)
				continue;
			j = mg->keys[i].hash & nmask;
			while (n[j].hash != 0)
				j = (j + 1) & nmask;
			n[j] = mg->keys[i];
		}
		free(mg->keys);
		mg->keys = n;
		mg->kmask = nmask;
	}
	for (j = h & mg->kmask; mg->keys[j].hash != 0;
	     j = (j + 1) & mg->kmask) {
		const struct mkey *e = &mg->keys[j];

		if (e->hash == h && e->len == len &&
		    memcmp(mg->fams[e->fam].body.b + e->off, k, len) == 0)
			return (0);
	}
	mg->keys[j].hash = h;
	mg->keys[j].fam = (uint32_t)(f - mg->fams);
	mg->keys[j].off = (uint32_t)off;
	mg->keys[j].len = (uint32_t)len;
	mg->nkeys++;
	return (1);
}

/*
 * Check a label set between its braces, [p, e): name="value" pairs, comma
 * separated (a trailing comma allowed, as Prometheus does), escapes \\ \"
 * \n only, no repeated name.  Tells whether a "service" and an "le" label
 * are there.  0 or -1.
 */
static int
merge_labels(const char *p, const char *e, int *has_service, int *has_le)
{
	const char *names[32];
	size_t lens[32], nn = 0, i;

	*has_service = *has_le = 0;
	while (p < e) {
		const char *n = p;

		while (p < e &&
		       ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		        (*p >= '0' && *p <= '9') || *p == '_'))
			p++;
		if (p == n || (*n >= '0' && *n <= '9') || e - p < 2 ||
		    p[0] != '=' || p[1] != '"' || nn == nitems(names))
			return (-1);
		for (i = 0; i < nn; i++)
			if (lens[i] == (size_t)(p - n) &&
			    memcmp(names[i], n, lens[i]) == 0)
				return (-1);
		names[nn] = n;
		lens[nn++] = (size_t)(p - n);
		if (p - n == 7 && memcmp(n, "service", 7) == 0)
			*has_service = 1;
		if (p - n == 2 && memcmp(n, "le", 2) == 0)
			*has_le = 1;
		for (p += 2; p < e && *p != '"'; p++)
			if (*p == '\\') {
				if (++p == e ||
				    (*p != '\\' && *p != '"' && *p != 'n'))
					return (-1);
			}
		if (p == e)
			return (-1);
		p++;
		if (p < e && *p++ != ',')
			return (-1);
	}
	return (0);
}

/* A value (Go float syntax or NaN/+Inf/-Inf), then an optional integer
 * timestamp, then the end: [p, e).  0 or -1. */
static int
merge_value(const char *p, const char *e)
{
	char tmp[64], *end;
	const char *sp;
	size_t n;

	if ((sp = memchr(p, ' ', (size_t)(e - p))) == NULL)
		sp = e;
	n = (size_t)(sp - p);
	if (n == 0 || n >= sizeof(tmp))
		return (-1);
	memcpy(tmp, p, n);
	tmp[n] = '\0';
	if (strcmp(tmp, "NaN") != 0 && strcmp(tmp, "+Inf") != 0 &&
	    strcmp(tmp, "-Inf") != 0) {
		/* strtod also takes "inf", "nan" and hex: Prometheus
		 * does not. */
		if (strpbrk(tmp, "iInNxXpP") != NULL)
			return (-1);
		strtod(tmp, &end);
		if (*end != '\0')
			return (-1);
	}
	if (sp == e)
		return (0);
	p = sp + 1;
	if (p < e && *p == '-')
		p++;
	if (p == e)
		return (-1);
	for (; p < e; p++)
		if (*p < '0' || *p > '9')
			return (-1);
	return (0);
}

/* HELP text: only \\ and \n escapes. */
static int
merge_help_ok(const char *p, const char *e)
{
	for (; p < e; p++)
		if (*p == '\\' && (++p == e || (*p != '\\' && *p != 'n')))
			return (0);
	return (1);
}

static int
merge_add_label_value(struct buf *b, const char *s)
{
	for (; *s; s++) {
		int r;

		if (*s == '\\' || *s == '"')
			r = buf_add(b, "\\", 1) == -1 ||
			    buf_add(b, s, 1) == -1;
		else if (*s == '\n')
			r = buf_add(b, "\\n", 2) == -1;
		else
			r = buf_add(b, s, 1) == -1;
		if (r)
			return (-1);
	}
	return (0);
}

/* What one source declares as it goes: the family its latest HELP or TYPE
 * line named. */
struct msrc {
	const char *service;
	const char *cur; /* family name, or NULL */
	size_t clen;
	enum mt_type ctype;
	int cbad; /* its TYPE clashed with another source's */
};

static enum mt_type
merge_type(const char *p, size_t n)
{
	enum mt_type t;

	for (t = MT_UNTYPED; t <= MT_SUMMARY; t++)
		if (strlen(mt_name[t]) == n && memcmp(mt_name[t], p, n) == 0)
			return (t);
	return (MT_UNSET);
}

/* "# HELP name text" or "# TYPE name type"; other comments are skipped.
 * 0, or -1 on ENOMEM; a bad line is counted. */
static int
merge_comment(struct merge *mg, struct msrc *s, const char *p, const char *e)
{
	const char *name, *sp;
	struct mfam *f;
	size_t nlen;
	int help;

	if (e - p < 7 ||
	    (memcmp(p, "# HELP ", 7) != 0 && memcmp(p, "# TYPE ", 7) != 0))
		return (0);
	help = p[2] == 'H';
	name = p + 7;
	if ((sp = memchr(name, ' ', (size_t)(e - name))) == NULL)
		sp = e;
	nlen = (size_t)(sp - name);
	if (!merge_is_name(name, nlen)) {
		mg->dropped++;
		return (0);
	}
	if ((f = merge_family(mg, name, nlen, 1)) == NULL)
		return (-1);
	if (s->cur == NULL || s->clen != nlen ||
	    memcmp(s->cur, name, nlen) != 0) {
		s->cur = name;
		s->clen = nlen;
		s->ctype = MT_UNSET;
		s->cbad = 0;
	}
	p = sp < e ? sp + 1 : e;
	if (help) {
		if (!merge_help_ok(p, e))
			mg->dropped++;
		else if (f->help == NULL) {
			f->help = p;
			f->hlen = (size_t)(e - p);
		}
		return (0);
	}
	if ((s->ctype = merge_type(p, (size_t)(e - p))) == MT_UNSET) {
		mg->dropped++;
		return (0);
	}
	if (f->type == MT_UNSET && f->body.len == 0)
		f->type = s->ctype;
	else if (f->type != s->ctype &&
	         !(f->type == MT_UNSET && s->ctype == MT_UNTYPED))
		s->cbad = 1;
	return (0);
}

/* Whether name is cur followed by one of the suffixes of type t. */
static int
merge_child(const char *name, size_t n, const char *cur, size_t clen,
            enum mt_type t, int *is_bucket)
{
	const char *sfx = name + clen;
	size_t sl = n - clen;

	*is_bucket = 0;
	if (n <= clen || memcmp(name, cur, clen) != 0)
		return (0);
	if ((sl == 4 && memcmp(sfx, "_sum", 4) == 0) ||
	    (sl == 6 && memcmp(sfx, "_count", 6) == 0))
		return (1);
	if (t == MT_HISTO && sl == 7 && memcmp(sfx, "_bucket", 7) == 0) {
		*is_bucket = 1;
		return (1);
	}
	return (0);
}

/* One sample line.  0, or -1 on ENOMEM; a bad line is counted. */
static int
merge_sample(struct merge *mg, struct msrc *s, const char *p, const char *e)
{
	const char *name = p, *lb = NULL, *le = NULL, *v;
	struct mfam *f = NULL;
	size_t nlen, off;
	int has_service, has_le, bucket = 0, r;

	while (p < e && *p != '{' && *p != ' ')
		p++;
	nlen = (size_t)(p - name);
	if (!merge_is_name(name, nlen))
		goto bad;
	if (p < e && *p == '{') {
		int inq = 0;

		lb = ++p;
		for (; p < e && (inq || *p != '}'); p++) {
			if (*p == '"')
				inq = !inq;
			else if (inq && *p == '\\' && p + 1 < e)
				p++;
		}
		if (p == e)
			goto bad;
		le = p++;
	}
	if (p == e || *p != ' ')
		goto bad;
	v = p + 1;
	if (merge_value(v, e) == -1)
		goto bad;
	if (lb != NULL) {
		if (merge_labels(lb, le, &has_service, &has_le) == -1)
			goto bad;
	} else
		has_service = has_le = 0;

	/* Its family: the one this source declared last, if the name fits. */
	if (s->cur != NULL &&
	    (((s->ctype == MT_HISTO || s->ctype == MT_SUMMARY) &&
	      merge_child(name, nlen, s->cur, s->clen, s->ctype, &bucket)) ||
	     (s->ctype != MT_HISTO && nlen == s->clen &&
	      memcmp(name, s->cur, nlen) == 0))) {
		if (s->cbad)
			goto bad;
		if ((f = merge_family(mg, s->cur, s->clen, 0)) == NULL)
			return (errno ? -1 : 0);
		if (bucket && !has_le)
			goto bad;
	} else {
		static const char *const sfx[] = {"_bucket", "_sum", "_count"};
		size_t i, sl;

		/* x_sum without its TYPE line while x is a histogram
		 * elsewhere would make a second family out of part of x. */
		for (i = 0; i < nitems(sfx); i++) {
			sl = strlen(sfx[i]);
			if (nlen > sl &&
			    memcmp(name + nlen - sl, sfx[i], sl) == 0 &&
			    (f = merge_family(mg, name, nlen - sl, 0)) !=
			            NULL &&
			    (f->type == MT_HISTO || f->type == MT_SUMMARY))
				goto bad;
		}
		if ((f = merge_family(mg, name, nlen, 1)) == NULL)
			return (-1);
		if (f->type == MT_HISTO || f->type == MT_SUMMARY)
			goto bad;
	}
	if (f->type == MT_UNSET)
		f->type = MT_UNTYPED;

	/* name{service="x",labels} value */
	off = f->body.len;
	r = buf_add(&f->body, name, nlen);
	if (r == 0 && (!has_service || lb != NULL))
		r = buf_add(&f->body, "{", 1);
	if (r == 0 && !has_service) {
		r = buf_adds(&f->body, "service=\"");
		if (r == 0)
			r = merge_add_label_value(&f->body, s->service);
		if (r == 0)
			r = buf_add(&f->body, "\"", 1);
		if (r == 0 && lb != NULL && le > lb)
			r = buf_add(&f->body, ",", 1);
	}
	if (r == 0 && lb != NULL) {
		size_t ll = (size_t)(le - lb);

		/* a trailing comma is dropped */
		if (ll > 0 && lb[ll - 1] == ',')
			ll--;
		r = buf_add(&f->body, lb, ll);
	}
	if (r == 0 && (!has_service || lb != NULL))
		r = buf_add(&f->body, "}", 1);
	if (r == -1)
		return (-1);
	if ((r = merge_key_new(mg, f, off, f->body.len - off)) != 1) {
		f->body.len = off;
		if (f->body.b != NULL)
			f->body.b[off] = '\0';
		if (r == -1)
			return (-1);
		goto bad;
	}
	if (buf_add(&f->body, " ", 1) == -1 ||
	    buf_add(&f->body, v, (size_t)(e - v)) == -1 ||
	    buf_add(&f->body, "\n", 1) == -1)
		return (-1);
	return (0);
bad:
	mg->dropped++;
	return (0);
}

static void
merge_free(struct merge *mg)
{
	size_t i;

	for (i = 0; i < mg->nfams; i++)
		buf_free(&mg->fams[i].body);
	free(mg->fams);
	free(mg->fidx);
	free(mg->keys);
}

int
telemetry_merge(const struct tm_source *src, size_t nsrc, struct buf *out,
                uint64_t *dropped)
{
	struct merge mg;
	size_t i;
	int rc = -1;

	memset(&mg, 0, sizeof(mg));
	if (merge_rehash_fams(&mg) == -1)
		return (-1);
	for (i = 0; i < nsrc; i++) {
		struct msrc s = {src[i].service, NULL, 0, MT_UNSET, 0};
		const char *p = src[i].text, *end = p + src[i].len, *e;

		for (; p < end; p = e + 1) {
			if ((e = memchr(p, '\n', (size_t)(end - p))) == NULL)
				e = end;
			/* An unfinished last line may be cut: drop it. */
			if (e == end && e > p) {
				mg.dropped++;
				break;
			}
			if (e == p)
				continue;
			if ((*p == '#' ? merge_comment(&mg, &s, p, e)
			               : merge_sample(&mg, &s, p, e)) == -1)
				goto out;
		}
	}
	for (i = 0; i < mg.nfams; i++) {
		const struct mfam *f = &mg.fams[i];

		if (f->help != NULL && (buf_add(out, "# HELP ", 7) == -1 ||
		                        buf_add(out, f->name, f->nlen) == -1 ||
		                        buf_add(out, " ", 1) == -1 ||
		                        buf_add(out, f->help, f->hlen) == -1 ||
		                        buf_add(out, "\n", 1) == -1))
			goto out;
		if (f->type != MT_UNSET && f->type != MT_UNTYPED &&
		    (buf_add(out, "# TYPE ", 7) == -1 ||
		     buf_add(out, f->name, f->nlen) == -1 ||
		     buf_addf(out, " %s\n", mt_name[f->type]) == -1))
			goto out;
		if (f->body.len > 0 &&
		    buf_add(out, f->body.b, f->body.len) == -1)
			goto out;
	}
	rc = 0;
out:
	if (dropped != NULL)
		*dropped = mg.dropped;
	merge_free(&mg);
	return (rc);
}
