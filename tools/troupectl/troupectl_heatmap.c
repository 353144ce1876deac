/* SPDX-License-Identifier: ISC */
/*
 * troupectl_heatmap: `troupectl heatmap` (see troupectl_heatmap.h).  Asks
 * telemetry's GET /api/heatmap for the services, then each service's
 * seconds, over a plain HTTP/1.0 connection (a numeric host, or a name
 * getaddrinfo resolves; no TLS), and draws them.  Callers: troupectl.c.
 * Prints to stdout, errors to stderr; never touches a mailbox.
 */
#include <sys/socket.h>
#include <sys/time.h>

#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "troupectl_heatmap.h"

#define HM_DEFAULT_URL "http://127.0.0.1:9464"
#define HM_MAX_BODY (64 * 1024 * 1024)
#define HM_TIMEOUT_S 10

static const char usage_heatmap[] =
        "usage: troupectl heatmap [--service S] [--since SEC] [--url URL]\n"
        "                         [--offcpu] [--no-color]\n"
        "\n"
        "Draws the eBPF run-queue latency of every Troupe service (or only\n"
        "S) over the last SEC seconds (default 60) from telemetry's\n"
        "GET /api/heatmap: a block per service, a row per latency bucket\n"
        "(highest first), a column per second, a shade per count\n"
        "(\" .:-=+*#%@\", relative to the block's largest).\n"
        "\n"
        "  --url URL     telemetry (default " HM_DEFAULT_URL ")\n"
        "  --offcpu      off-CPU time instead of run-queue latency\n"
        "  --no-color    shades only (default: colour too when stdout is a\n"
        "                terminal and $NO_COLOR is unset)\n";

static const char shades[] = " .:-=+*#%@";

char
heatmap_shade(uint64_t count, uint64_t max)
{
	size_t n = sizeof(shades) - 2; /* highest index */
	size_t i, lc, lm;

	if (count == 0 || max == 0)
		return (' ');
	if (count >= max)
		return (shades[n]);
	/* 1 .. n-1 on a log2 scale, so rare events stay visible. */
	lc = (size_t)(64 - __builtin_clzll(count));
	lm = (size_t)(64 - __builtin_clzll(max));
	i = 1 + (n - 2) * (lc - 1) / (lm > 1 ? lm - 1 : 1);
	if (i >= n)
		i = n - 1;
	return (shades[i]);
}

/* "2us", "1ms", "67s": a bucket's lower bound. */
static void
label(char *out, size_t n, double lo_us)
{
	if (lo_us < 1000)
		snprintf(out, n, "%.0fus", lo_us);
	else if (lo_us < 1000000)
		snprintf(out, n, "%.0fms", lo_us / 1000);
	else
		snprintf(out, n, "%.0fs", lo_us / 1000000);
}

int
heatmap_render(struct buf *out, const char *text, const char *kind, int color)
{
	cJSON *doc = cJSON_Parse(text);
	const cJSON *name, *secs, *bk, *s;
	uint64_t max = 0, total = 0;
	uint64_t(*cnt)[HEATMAP_SLOTS] = NULL;
	int nsec, rc = -1;

	if (doc == NULL)
		return (-1);
	name = cJSON_GetObjectItemCaseSensitive(doc, "service");
	secs = cJSON_GetObjectItemCaseSensitive(doc, "seconds");
	bk = cJSON_GetObjectItemCaseSensitive(doc, "buckets");
	if (!cJSON_IsString(name) || !cJSON_IsArray(secs) ||
	    !cJSON_IsArray(bk) || cJSON_GetArraySize(bk) != HEATMAP_SLOTS)
		goto out;
	nsec = cJSON_GetArraySize(secs);
	if ((cnt = calloc(nsec > 0 ? (size_t)nsec : 1, sizeof(*cnt))) == NULL)
		goto out;
	for (int i = 0; i < nsec; i++) {
		const cJSON *a;

		s = cJSON_GetArrayItem(secs, i);
		a = cJSON_GetObjectItemCaseSensitive(s, kind);
		if (!cJSON_IsArray(a) ||
		    cJSON_GetArraySize(a) != HEATMAP_SLOTS)
			goto out;
		for (int k = 0; k < HEATMAP_SLOTS; k++) {
			const cJSON *v = cJSON_GetArrayItem(a, k);

			if (!cJSON_IsNumber(v) || v->valuedouble < 0)
				goto out;
			cnt[i][k] = (uint64_t)v->valuedouble;
			total += cnt[i][k];
			if (cnt[i][k] > max)
				max = cnt[i][k];
		}
	}
	if (buf_addf(out, "== %s (%s, %d s, %llu events, max %llu/s) ==\n",
	             name->valuestring,
	             strcmp(kind, "runq") == 0 ? "run-queue latency"
	                                       : "off-CPU time",
	             nsec, (unsigned long long)total,
	             (unsigned long long)max) == -1)
		goto out;
	for (int k = HEATMAP_SLOTS - 1; k >= 0; k--) {
		const cJSON *lo = cJSON_GetObjectItemCaseSensitive(
		        cJSON_GetArrayItem(bk, k), "lo_us");
		char lb[16];

		label(lb, sizeof(lb),
		      cJSON_IsNumber(lo) ? lo->valuedouble : 0);
		if (buf_addf(out, "%7s |", lb) == -1)
			goto out;
		for (int i = 0; i < nsec; i++) {
			char c = heatmap_shade(cnt[i][k], max);

			if (color && cnt[i][k] > 0) {
				/* 232..255: the grey ramp, light = many */
				int g = 236 +
				        (int)(strchr(shades, c) - shades) * 2;
				if (buf_addf(out, "\033[48;5;%dm%c\033[0m", g,
				             c) == -1)
					goto out;
			} else if (buf_add(out, &c, 1) == -1)
				goto out;
		}
		if (buf_adds(out, "|\n") == -1)
			goto out;
	}
	if (nsec > 0) {
		const cJSON *t0 = cJSON_GetObjectItemCaseSensitive(
		        cJSON_GetArrayItem(secs, 0), "t");
		time_t t = cJSON_IsNumber(t0) ? (time_t)t0->valuedouble : 0;
		struct tm tm;
		char ts[16];

		gmtime_r(&t, &tm);
		strftime(ts, sizeof(ts), "%H:%M:%S", &tm);
		if (buf_addf(out, "%7s  ^%s UTC, one column per second\n", "",
		             ts) == -1)
			goto out;
	}
	rc = 0;
out:
	free(cnt);
	cJSON_Delete(doc);
	return (rc);
}

/* GET path from url ("http://host:port"); the body in out.  The HTTP
 * status, or -1 with a message printed. */
static int
http_get(const char *url, const char *path, struct buf *out)
{
	char host[256], port[16] = "80", req[1024], rb[8192];
	const char *p, *e, *body;
	struct addrinfo hints = {0}, *ai = NULL, *a;
	struct timeval tv = {HM_TIMEOUT_S, 0};
	struct buf raw = {0};
	int fd = -1, status = -1, rc;
	ssize_t n;

	if (strncmp(url, "http://", 7) != 0) {
		fprintf(stderr,
		        "troupectl: heatmap: --url %s: want "
		        "http://host:port\n",
		        url);
		return (-1);
	}
	p = url + 7;
	e = p + strcspn(p, "/");
	if (*p == '[') { /* [v6]:port */
		const char *q = memchr(p, ']', (size_t)(e - p));

		if (q == NULL || (size_t)(q - p - 1) >= sizeof(host))
			goto bad;
		snprintf(host, sizeof(host), "%.*s", (int)(q - p - 1), p + 1);
		if (q + 1 < e && q[1] == ':')
			snprintf(port, sizeof(port), "%.*s", (int)(e - q - 2),
			         q + 2);
	} else {
		const char *c = memchr(p, ':', (size_t)(e - p));

		if ((size_t)((c ? c : e) - p) >= sizeof(host) || c == p)
			goto bad;
		snprintf(host, sizeof(host), "%.*s", (int)((c ? c : e) - p),
		         p);
		if (c != NULL)
			snprintf(port, sizeof(port), "%.*s", (int)(e - c - 1),
			         c + 1);
	}
	hints.ai_socktype = SOCK_STREAM;
	if ((rc = getaddrinfo(host, port, &hints, &ai)) != 0) {
		fprintf(stderr, "troupectl: heatmap: %s: %s\n", url,
		        gai_strerror(rc));
		return (-1);
	}
	for (a = ai; a != NULL; a = a->ai_next) {
		if ((fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC,
		                 a->ai_protocol)) == -1)
			continue;
		(void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
			break;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	if (fd == -1) {
		fprintf(stderr,
		        "troupectl: heatmap: cannot connect to %s: %s\n", url,
		        strerror(errno));
		return (-1);
	}
	n = snprintf(req, sizeof(req),
	             "GET %s HTTP/1.0\r\nHost: %s:%s\r\n"
	             "Accept: application/json\r\n\r\n",
	             path, host, port);
	if (n < 0 || (size_t)n >= sizeof(req) ||
	    write(fd, req, (size_t)n) != n) {
		fprintf(stderr, "troupectl: heatmap: %s: write failed\n", url);
		goto out;
	}
	while ((n = read(fd, rb, sizeof(rb))) > 0)
		if (raw.len + (size_t)n > HM_MAX_BODY ||
		    buf_add(&raw, rb, (size_t)n) == -1) {
			fprintf(stderr,
			        "troupectl: heatmap: answer too big\n");
			goto out;
		}
	if (n < 0 || buf_add(&raw, "", 1) == -1 ||
	    sscanf(raw.b, "HTTP/1.%*d %d", &status) != 1 ||
	    (body = strstr(raw.b, "\r\n\r\n")) == NULL) {
		fprintf(stderr, "troupectl: heatmap: %s%s: no HTTP answer\n",
		        url, path);
		status = -1;
		goto out;
	}
	body += 4;
	if (buf_add(out, body, strlen(body) + 1) == -1)
		status = -1;
out:
	close(fd);
	buf_free(&raw);
	return (status);
bad:
	fprintf(stderr, "troupectl: heatmap: bad --url %s\n", url);
	return (-1);
}

/* The "error" member of a JSON answer, or the text itself. */
static const char *
err_of(const char *body, char *out, size_t n)
{
	cJSON *d = cJSON_Parse(body);
	const cJSON *e = cJSON_GetObjectItemCaseSensitive(d, "error");

	snprintf(out, n, "%s", cJSON_IsString(e) ? e->valuestring : body);
	cJSON_Delete(d);
	return (out);
}

int
heatmap_main(int argc, char **argv)
{
	static const struct option opts[] = {
	        {"service", required_argument, NULL, 's'},
	        {"since", required_argument, NULL, 'S'},
	        {"url", required_argument, NULL, 'u'},
	        {"offcpu", no_argument, NULL, 'o'},
	        {"no-color", no_argument, NULL, 'n'},
	        {"help", no_argument, NULL, 'h'},
	        {NULL, 0, NULL, 0},
	};
	const char *service = NULL, *url = HM_DEFAULT_URL, *kind = "runq";
	const char *nc = getenv("NO_COLOR");
	int color = isatty(STDOUT_FILENO) && (nc == NULL || *nc == '\0');
	long since = 60;
	struct buf list = {0}, one = {0}, out = {0};
	cJSON *doc = NULL;
	const cJSON *en, *svcs, *v;
	char path[512], eb[256], *end;
	int ch, st, rc = 1, shown = 0;

	optind = 1;
	opterr = 0;
	while ((ch = getopt_long(argc + 1, argv - 1, ":", opts, NULL)) != -1) {
		switch (ch) {
		case 's':
			service = optarg;
			break;
		case 'S':
			since = strtol(optarg, &end, 10);
			if (end == optarg || *end != '\0' || since < 1 ||
			    since > 86400) {
				fprintf(stderr, "troupectl: heatmap: --since: "
				                "want 1 to 86400 seconds\n");
				return (2);
			}
			break;
		case 'u':
			url = optarg;
			break;
		case 'o':
			kind = "offcpu";
			break;
		case 'n':
			color = 0;
			break;
		case 'h':
			fputs(usage_heatmap, stdout);
			return (0);
		default:
			fprintf(stderr,
			        "troupectl: heatmap: bad option %s\n\n%s",
			        argv[optind - 2], usage_heatmap);
			return (2);
		}
	}
	if (optind - 1 < argc) {
		fprintf(stderr, "troupectl: heatmap: unexpected \"%s\"\n\n%s",
		        argv[optind - 1], usage_heatmap);
		return (2);
	}
	if ((st = http_get(url, "/api/heatmap", &list)) == -1)
		return (3);
	if (st != 200 || (doc = cJSON_Parse(list.b)) == NULL) {
		fprintf(stderr, "troupectl: heatmap: /api/heatmap: HTTP %d\n",
		        st);
		goto out;
	}
	en = cJSON_GetObjectItemCaseSensitive(doc, "enabled");
	svcs = cJSON_GetObjectItemCaseSensitive(doc, "services");
	if (!cJSON_IsTrue(en)) {
		v = cJSON_GetObjectItemCaseSensitive(doc, "reason");
		printf("eBPF probes off: %s\n",
		       cJSON_IsString(v) ? v->valuestring : "(no reason)");
		rc = 0;
		goto out;
	}
	cJSON_ArrayForEach(v, svcs)
	{
		if (!cJSON_IsString(v) ||
		    (service != NULL && strcmp(service, v->valuestring) != 0))
			continue;
		snprintf(path, sizeof(path),
		         "/api/heatmap?service=%s&since=%lld", v->valuestring,
		         (long long)time(NULL) - since + 1);
		buf_reset(&one);
		if ((st = http_get(url, path, &one)) != 200) {
			if (st != -1)
				fprintf(stderr, "troupectl: heatmap: %s: %s\n",
				        path,
				        err_of(one.b ? one.b : "", eb,
				               sizeof(eb)));
			goto out;
		}
		if (heatmap_render(&out, one.b, kind, color) == -1) {
			fprintf(stderr,
			        "troupectl: heatmap: %s: not a "
			        "heatmap\n",
			        path);
			goto out;
		}
		shown++;
	}
	if (service != NULL && shown == 0) {
		fprintf(stderr, "troupectl: heatmap: no service \"%s\"\n",
		        service);
		goto out;
	}
	fwrite(out.b ? out.b : "", 1, out.len, stdout);
	rc = 0;
out:
	cJSON_Delete(doc);
	buf_free(&list);
	buf_free(&one);
	buf_free(&out);
	return (rc);
}
