/* SPDX-License-Identifier: ISC */
/*
 * conf: a small INI reader (libinih 55 splits long lines silently, see
 * PITFALLS.md) and the TROUPE_<SECTION>_<KEY> environment overrides.
 * Values may be quoted with "..." to keep leading or trailing blanks; a
 * comment line starts with ';' or '#'.  Never logs, never exits.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"

#define CONF_MAX_LINE 4096

struct conf_ent {
	char *section, *key, *value;
};

static struct conf_ent *ents;
static size_t nents;
static char env_buf[256];
static char rundir_buf[512];

static char *
trim(char *s)
{
	char *e;

	while (isspace((unsigned char)*s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return (s);
}

void
conf_free(void)
{
	for (size_t i = 0; i < nents; i++) {
		free(ents[i].section);
		free(ents[i].key);
		free(ents[i].value);
	}
	free(ents);
	ents = NULL;
	nents = 0;
}

static int
conf_set(const char *sec, const char *key, const char *val)
{
	struct conf_ent *e;

	for (size_t i = 0; i < nents; i++) {
		if (strcmp(ents[i].section, sec) == 0 &&
		    strcmp(ents[i].key, key) == 0) {
			char *v = strdup(val);
			if (v == NULL)
				return (-1);
			free(ents[i].value);
			ents[i].value = v; /* the last one wins */
			return (0);
		}
	}
	if ((e = realloc(ents, (nents + 1) * sizeof(*e))) == NULL)
		return (-1);
	ents = e;
	e = &ents[nents];
	e->section = strdup(sec);
	e->key = strdup(key);
	e->value = strdup(val);
	if (!e->section || !e->key || !e->value) {
		free(e->section);
		free(e->key);
		free(e->value);
		return (-1);
	}
	nents++;
	return (0);
}

int
conf_load(const char *path, int may_miss, char *err, size_t errlen)
{
	char line[CONF_MAX_LINE + 2], sec[128] = "", *s, *eq, *k, *v;
	struct conf_ent *old = ents;
	size_t nold = nents;
	FILE *f;
	int lineno = 0, rc = -1;

	/* Parse into a fresh table; the old one stays if this one fails. */
	ents = NULL;
	nents = 0;
	if (path == NULL)
		goto done_nofile;
	if ((f = fopen(path, "re")) == NULL) {
		if (errno == ENOENT && may_miss)
			goto done_nofile;
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		ents = old;
		nents = nold;
		return (-1);
	}
	while (fgets(line, sizeof(line), f) != NULL) {
		lineno++;
		if (strchr(line, '\n') == NULL && !feof(f)) {
			snprintf(err, errlen, "%s:%d: line longer than %d bytes",
			    path, lineno, CONF_MAX_LINE);
			goto done;
		}
		s = trim(line);
		if (*s == '\0' || *s == ';' || *s == '#')
			continue;
		if (*s == '[') {
			char *e = strchr(s, ']');
			if (e == NULL || e[1] != '\0' || e - s - 1 <= 0 ||
			    (size_t)(e - s - 1) >= sizeof(sec)) {
				snprintf(err, errlen, "%s:%d: bad section header",
				    path, lineno);
				goto done;
			}
			*e = '\0';
			snprintf(sec, sizeof(sec), "%s", trim(s + 1));
			continue;
		}
		if ((eq = strchr(s, '=')) == NULL) {
			snprintf(err, errlen, "%s:%d: expected key = value",
			    path, lineno);
			goto done;
		}
		if (sec[0] == '\0') {
			snprintf(err, errlen, "%s:%d: key outside a section",
			    path, lineno);
			goto done;
		}
		*eq = '\0';
		k = trim(s);
		v = trim(eq + 1);
		if (*k == '\0') {
			snprintf(err, errlen, "%s:%d: empty key", path, lineno);
			goto done;
		}
		if (v[0] == '"') {
			size_t n = strlen(v);
			if (n < 2 || v[n - 1] != '"') {
				snprintf(err, errlen, "%s:%d: unterminated quote",
				    path, lineno);
				goto done;
			}
			v[n - 1] = '\0';
			v++;
		}
		if (conf_set(sec, k, v) == -1) {
			snprintf(err, errlen, "out of memory");
			goto done;
		}
	}
	if (ferror(f)) {
		snprintf(err, errlen, "%s: read error", path);
		goto done;
	}
	rc = 0;
done:
	fclose(f);
	if (rc == -1) {
		conf_free();
		ents = old;
		nents = nold;
		return (-1);
	}
done_nofile:
	{
		struct conf_ent *nw = ents;
		size_t nn = nents;

		ents = old;
		nents = nold;
		conf_free();
		ents = nw;
		nents = nn;
	}
	return (0);
}

const char *
conf_get(const char *section, const char *key, const char *def)
{
	size_t n = 0;
	const char *v;

	n = (size_t)snprintf(env_buf, sizeof(env_buf), "TROUPE_%s_%s",
	    section, key);
	if (n < sizeof(env_buf)) {
		for (char *p = env_buf; *p; p++)
			*p = (char)(*p == '-' || *p == '.' ? '_' :
			    toupper((unsigned char)*p));
		if ((v = getenv(env_buf)) != NULL)
			return (v);
	}
	for (size_t i = 0; i < nents; i++)
		if (strcmp(ents[i].section, section) == 0 &&
		    strcmp(ents[i].key, key) == 0)
			return (ents[i].value);
	return (def);
}

int
conf_get_int(const char *section, const char *key, int64_t def, int64_t min,
    int64_t max, int64_t *out, char *err, size_t errlen)
{
	const char *v = conf_get(section, key, NULL);
	char *end;
	long long n;

	if (v == NULL || *v == '\0') {
		*out = def;
		return (0);
	}
	errno = 0;
	n = strtoll(v, &end, 10);
	if (errno != 0 || end == v || *end != '\0' || n < min || n > max) {
		snprintf(err, errlen,
		    "[%s] %s = \"%s\": want an integer in [%lld, %lld]",
		    section, key, v, (long long)min, (long long)max);
		return (-1);
	}
	*out = n;
	return (0);
}

char *
conf_credential(const char *name)
{
	const char *dir = getenv("CREDENTIALS_DIRECTORY");
	char path[1024], *buf = NULL;
	size_t n = 0, cap = 0, r;
	FILE *f;

	if (dir == NULL)
		return (NULL);
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	if ((f = fopen(path, "re")) == NULL)
		return (NULL);
	for (;;) {
		if (n + 1024 > cap) {
			char *p = realloc(buf, cap + 4096);
			if (p == NULL) {
				free(buf);
				fclose(f);
				return (NULL);
			}
			buf = p;
			cap += 4096;
		}
		if ((r = fread(buf + n, 1, 1023, f)) == 0)
			break;
		n += r;
	}
	fclose(f);
	if (buf == NULL)
		return (NULL);
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		n--;
	buf[n] = '\0';
	return (buf);
}

const char *
conf_rundir(void)
{
	const char *v = conf_get("ipc", "rundir", NULL), *e;

	if (v != NULL && *v != '\0')
		return (v);
	if ((e = getenv("RUNTIME_DIRECTORY")) != NULL && *e != '\0') {
		/* systemd may list several, separated by ':' */
		snprintf(rundir_buf, sizeof(rundir_buf), "%.*s",
		    (int)strcspn(e, ":"), e);
		return (rundir_buf);
	}
	return ("/run/troupe");
}
