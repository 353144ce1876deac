/* SPDX-License-Identifier: ISC */
/*
 * log: the process logger.  When stderr is connected to the journal
 * (JOURNAL_STREAM names it) lines go to journald through sd_journal_send()
 * with structured fields (SERVICE, REQUEST_ID, TRACE_ID, BOT_ID) and
 * nothing is written to stderr, so no line is logged twice.  Otherwise one
 * line per message on stderr: "service[pid]: level: text", preceded by the
 * wall-clock time ("2026-11-22T12:05:54.019Z ") when TROUPE_LOG_TIME=1.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#include "log.h"

static char log_service[64] = "troupe";
static int log_level = LOG_L_INFO;
static int log_journal;
static int log_time;

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
	log_time = getenv("TROUPE_LOG_TIME") != NULL &&
	    strcmp(getenv("TROUPE_LOG_TIME"), "1") == 0;
}

/* "2026-11-22T12:05:54.019Z " into b, or "" without TROUPE_LOG_TIME. */
static void
log_stamp(char *b, size_t len)
{
	struct timeval tv;
	struct tm tm;

	b[0] = '\0';
	if (!log_time || gettimeofday(&tv, NULL) == -1 ||
	    gmtime_r(&tv.tv_sec, &tm) == NULL)
		return;
	snprintf(b, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ ",
	    tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
	    tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000));
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
		/* Only the fields that are known: an empty REQUEST_ID= on
		 * every line would match `journalctl REQUEST_ID=`. */
		char pri[16], svc[80], ident[96], rq[128], tr[48], bt[160];
		struct iovec iov[7];
		int n = 0;

		snprintf(pri, sizeof(pri), "PRIORITY=%d", level);
		snprintf(svc, sizeof(svc), "SERVICE=%s", log_service);
		snprintf(ident, sizeof(ident), "SYSLOG_IDENTIFIER=troupe-%s",
		    log_service);
		iov[n++] = (struct iovec){ pri, strlen(pri) };
		iov[n++] = (struct iovec){ svc, strlen(svc) };
		iov[n++] = (struct iovec){ ident, strlen(ident) };
		if (reqid.n) {
			snprintf(rq, sizeof(rq), "REQUEST_ID=%.*s",
			    (int)reqid.n, reqid.p);
			iov[n++] = (struct iovec){ rq, strlen(rq) };
		}
		if (tid.n) {
			snprintf(tr, sizeof(tr), "TRACE_ID=%.*s", (int)tid.n,
			    tid.p);
			iov[n++] = (struct iovec){ tr, strlen(tr) };
		}
		if (bot.n) {
			snprintf(bt, sizeof(bt), "BOT_ID=%.*s", (int)bot.n,
			    bot.p);
			iov[n++] = (struct iovec){ bt, strlen(bt) };
		}
		{
			char m[sizeof(msg) + 8];

			snprintf(m, sizeof(m), "MESSAGE=%s", msg);
			iov[n++] = (struct iovec){ m, strlen(m) };
			sd_journal_sendv(iov, n);
		}
	} else if (reqid.n) {
		char ts[64];

		log_stamp(ts, sizeof(ts));
		fprintf(stderr, "%s%s[%d]: %s: %s (request %.*s%s%.*s)\n",
		    ts, log_service, (int)getpid(), level_name(level), msg,
		    (int)reqid.n, reqid.p, bot.n ? ", bot " : "", (int)bot.n,
		    bot.p);
	} else {
		char ts[64];

		log_stamp(ts, sizeof(ts));
		fprintf(stderr, "%s%s[%d]: %s: %s\n", ts, log_service,
		    (int)getpid(), level_name(level), msg);
	}
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
