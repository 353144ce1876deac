/* SPDX-License-Identifier: ISC */
/*
 * log: the process logger.  When stderr is connected to the journal
 * (JOURNAL_STREAM names it) lines go to journald through sd_journal_send()
 * with structured fields (SERVICE, REQUEST_ID, TRACE_ID, BOT_ID) and
 * nothing is written to stderr, so no line is logged twice.  Otherwise one
 * line per message on stderr: "service[pid]: level: text".
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#include "log.h"

static char log_service[64] = "troupe";
static int log_level = LOG_L_INFO;
static int log_journal;

static int
stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (js == NULL || sscanf(js, "%llu:%llu", &dev, &ino) != 2)
		return (0);
	if (fstat(STDERR_FILENO, &st) == -1)
		return (0);
	return ((unsigned long long)st.st_dev == dev &&
	    (unsigned long long)st.st_ino == ino);
}

void
log_init(const char *service, int level)
{
	snprintf(log_service, sizeof(log_service), "%s", service);
	log_level = level;
	log_journal = stderr_is_journal();
}

void
log_setlevel(int level)
{
	log_level = level;
}

int
log_getlevel(void)
{
	return (log_level);
}

static const char *
level_name(int level)
{
	switch (level) {
	case LOG_L_ERR: return ("error");
	case LOG_L_WARN: return ("warning");
	case LOG_L_INFO: return ("info");
	default: return ("debug");
	}
}

/* The trace id is the second part of a traceparent. */
static struct mstr
trace_id(struct mstr tp)
{
	if (tp.n >= 35 && tp.p[2] == '-')
		return ((struct mstr){ tp.p + 3, 32 });
	return (MSTR_NULL);
}

static void
vlog(int level, struct mstr reqid, struct mstr tp, struct mstr bot,
    const char *fmt, va_list ap)
{
	char msg[2048];
	struct mstr tid;
	int saved = errno;

	if (level > log_level)
		return;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	tid = trace_id(tp);
	if (log_journal) {
		/* Every argument of sd_journal_send() is a format: each
		 * field always takes its two arguments, empty or not. */
		sd_journal_send("MESSAGE=%s", msg, "PRIORITY=%d", level,
		    "SERVICE=%s", log_service, "SYSLOG_IDENTIFIER=troupe-%s",
		    log_service, "REQUEST_ID=%.*s", (int)reqid.n,
		    reqid.n ? reqid.p : "", "TRACE_ID=%.*s", (int)tid.n,
		    tid.n ? tid.p : "", "BOT_ID=%.*s", (int)bot.n,
		    bot.n ? bot.p : "", NULL);
	} else if (reqid.n) {
		fprintf(stderr, "%s[%d]: %s: %s (request %.*s%s%.*s)\n",
		    log_service, (int)getpid(), level_name(level), msg,
		    (int)reqid.n, reqid.p, bot.n ? ", bot " : "", (int)bot.n,
		    bot.p);
	} else
		fprintf(stderr, "%s[%d]: %s: %s\n", log_service,
		    (int)getpid(), level_name(level), msg);
	errno = saved;
}

static void
vlogerr(int level, const char *fmt, va_list ap)
{
	char f[1024];
	int e = errno;

	snprintf(f, sizeof(f), "%s: %s", fmt, strerror(e));
	vlog(level, MSTR_NULL, MSTR_NULL, MSTR_NULL, f, ap);
}

void
log_warn(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlogerr(LOG_L_WARN, fmt, ap);
	va_end(ap);
}

void
log_warnx(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_L_WARN, MSTR_NULL, MSTR_NULL, MSTR_NULL, fmt, ap);
	va_end(ap);
}

void
log_info(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_L_INFO, MSTR_NULL, MSTR_NULL, MSTR_NULL, fmt, ap);
	va_end(ap);
}

void
log_debug(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_L_DEBUG, MSTR_NULL, MSTR_NULL, MSTR_NULL, fmt, ap);
	va_end(ap);
}

void
log_req(int level, struct mstr reqid, struct mstr tp, struct mstr bot,
    const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(level, reqid, tp, bot, fmt, ap);
	va_end(ap);
}

void
fatal(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlogerr(LOG_L_ERR, fmt, ap);
	va_end(ap);
	exit(1);
}

void
fatalx(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_L_ERR, MSTR_NULL, MSTR_NULL, MSTR_NULL, fmt, ap);
	va_end(ap);
	exit(1);
}
