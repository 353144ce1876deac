/* SPDX-License-Identifier: ISC */
/*
 * conf: the INI configuration (/etc/troupe/troupe.conf by default).  Every
 * key [section] key is overridden by the environment variable
 * TROUPE_<SECTION>_<KEY> (upper case).  Lines longer than 4 KiB, keys
 * outside a section and lines without '=' are errors, reported with their
 * line number.  Never logs, never exits.
 */
#ifndef TROUPE_CONF_H
#define TROUPE_CONF_H

#include <stddef.h>
#include <stdint.h>

/* Load path (NULL or missing with may_miss: empty config).  0, or -1 and
 * an error text in err. */
int conf_load(const char *path, int may_miss, char *err, size_t errlen);
/* The value of [section] key: env first, then file, then def. */
const char *conf_get(const char *section, const char *key, const char *def);
/* Integer value; -1 with err filled if not an integer in [min, max]. */
int conf_get_int(const char *section, const char *key, int64_t def,
    int64_t min, int64_t max, int64_t *out, char *err, size_t errlen);
/* Read a systemd credential ($CREDENTIALS_DIRECTORY/name), trailing
 * newline removed; NULL if absent.  Caller frees. */
char *conf_credential(const char *name);
/* The runtime directory for mailboxes: [ipc] rundir, else
 * $RUNTIME_DIRECTORY, else /run/troupe. */
const char *conf_rundir(void);
void conf_free(void);

#endif
