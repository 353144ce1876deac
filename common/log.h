/* SPDX-License-Identifier: ISC */
/*
 * log: one logger per process.  To journald with structured fields when
 * stderr is the journal (JOURNAL_STREAM), else one line per message on
 * stderr.  Only services log; common/ and proto/ return codes instead.
 * log_warn() adds errno's text, log_warnx() does not (relayd's log.c).
 */
#ifndef TROUPE_LOG_H
#define TROUPE_LOG_H

#include <stdarg.h>

#include "util.h"

enum log_level { LOG_L_ERR = 3, LOG_L_WARN = 4, LOG_L_INFO = 6, LOG_L_DEBUG = 7 };

/* Name this process ("edge", "worker-3") and set the level. */
void log_init(const char *service, int level);
void log_setlevel(int level);
int log_getlevel(void);

void log_warn(const char *, ...) __attribute__((format(printf, 1, 2)));
void log_warnx(const char *, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *, ...) __attribute__((format(printf, 1, 2)));
/* One line about one request: request id, trace id and bot id as fields. */
void log_req(int level, struct mstr reqid, struct mstr traceparent,
    struct mstr bot_id, const char *, ...)
    __attribute__((format(printf, 5, 6)));
/* Log and exit(1): for the environment (bad config, cannot bind). */
void fatal(const char *, ...) __attribute__((format(printf, 1, 2), noreturn));
void fatalx(const char *, ...) __attribute__((format(printf, 1, 2), noreturn));

#endif
