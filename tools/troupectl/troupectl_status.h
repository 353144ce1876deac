/* SPDX-License-Identifier: ISC */
/*
 * troupectl_status: `troupectl status [--json]`, the rate-limit and
 * scaling state troupe-dispatcher keeps (docs/ratelimits.md): per
 * upstream its limit, children, runs in flight, queue, last signal and
 * the tier; per bot the same where policy aimd keeps one.
 */
#ifndef TROUPE_TROUPECTL_STATUS_H
#define TROUPE_TROUPECTL_STATUS_H

#include <stdint.h>

/* Ask mailbox peer op(args) and wait up to timeout seconds (troupectl.c):
 * an exit status; on success *status and *text (malloc'd, the caller
 * frees it) hold the answer. */
int troupectl_ask(const char *peer, const char *op, const char *args,
                  double timeout, uint64_t *status, char **text);
/* `troupectl status`: argv holds the operands after "status"; config is
 * the file to read [ipc] from (missing_ok: it may not exist).  An exit
 * status of troupectl. */
int status_main(int help, int argc, char **argv, int json, double timeout,
                const char *config, int missing_ok);

#endif
