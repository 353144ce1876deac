/* SPDX-License-Identifier: ISC */
/*
 * troupectl_roll: `troupectl roll`, the rolling restart of every Troupe
 * service under systemd, one at a time, each waiting until the one before
 * is ready again (docs/services/troupectl.md).
 */
#ifndef TROUPE_TROUPECTL_ROLL_H
#define TROUPE_TROUPECTL_ROLL_H

#include <stddef.h>

#define ROLL_MAX 8

/* The services in the order roll restarts them: those named in list (a
 * comma-separated subset of telemetry, storage, auth, dispatcher, edge;
 * NULL or "" for all), always in dependency order.  Writes at most
 * ROLL_MAX names to out and returns how many, or -1 with an unknown or
 * repeated name in *bad. */
int roll_plan(const char *list, const char *out[ROLL_MAX], const char **bad,
              size_t *badlen);
/* `troupectl roll [--services LIST] [--dry-run]`: argv holds the operands
 * after "roll".  An exit status of troupectl. */
int roll_main(int help, int argc, char **argv, const char *services,
              int dry_run, double timeout_s);

#endif
