/* SPDX-License-Identifier: ISC */
/*
 * troupectl: the operator's command line.  Bots and their plugins are
 * added, listed and removed, and API keys (`pat_...`) created, listed and
 * revoked, through troupe-storage, the only process that may open Redis
 * and PostgreSQL:
 * troupectl opens its own short-lived mailbox (troupectl-<pid>), sends one
 * ADMIN_REQUEST{op, args JSON} to "storage" with reply_to set to that mailbox,
 * waits for the ADMIN_REPLY{status, text} carrying its request id, prints it
 * and leaves.
 *
 * An API key is made here from getrandom(2) and shown once; storage only
 * ever gets its SHA-256.  troupectl must never send or keep the key's
 * text anywhere else.
 *
 * It must never open a database connection, and never wait forever:
 * --timeout (5 s) bounds the wait, and the deadline travels with the
 * request so storage can drop it once nobody waits.
 *
 * Run as root, it becomes the owner of the runtime directory (user
 * troupe under systemd) before it opens its mailbox: the services accept
 * pipes only from their own user or root, and so does troupectl's own
 * mailbox, so a root-owned mailbox could never take storage's answer.  A
 * plugin's secret goes to storage only, and is never printed.
 *
 * Exit status: 0 done; 1 storage answered with an error (its text on
 * stderr) or the mailbox could not be opened; 2 bad command line; 3 no
 * answer in time.
 */
#include <sys/stat.h>
#include <sys/types.h>

#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>

#include "conf.h"
#include "ipc.h"
#include "loop.h"
#include "proto.h"
#include "troupectl_heatmap.h"
#include "troupectl_roll.h"
#include "troupectl_status.h"
#include "util.h"

#define CTL_DEFAULT_CONFIG "/etc/troupe/troupe.conf"
#define CTL_EXIT_OK 0
#define CTL_EXIT_FAIL 1
#define CTL_EXIT_USAGE 2
#define CTL_EXIT_TIMEOUT 3
#define CTL_KEY_PREFIX "pat_"
#define CTL_KEY_CHARS 48   /* base62 after the prefix: ~285 bits */
#define CTL_KEY_ID_BYTES 8 /* 16 hex */
#define CTL_KEY_NAME_MAX 128
#define CTL_KEY_SUB_MAX 256
#define CTL_FILE_MAX (1 << 20) /* --schema @file, --secret-file */
#define CTL_SECRET_MAX 1024    /* as storage allows */
#define CTL_PLUGIN_TIMEOUT_MAX 600000
#define CTL_DESC_SHOWN 48 /* bytes of a description in the table */

/* The one request in flight and what came back. */
struct ctl {
	struct loop *loop;
	struct ipc *ipc;
	struct loop_timer *tick, *deadline;
	char reqid[40];
	int done, timed_out;
	uint64_t status;
	char *text;
	size_t textlen;
	uint64_t stray; /* envelopes that were not our answer */
};

static const char usage_main[] =
        "usage: troupectl [-c config] [--timeout S] <command> ...\n"
        "\n"
        "Commands:\n"
        "  bot add <id> --upstream URL [--model M] [--system-prompt S]\n"
        "              [--context-turns N] [--ttfe-ms N] [--total-ms N]\n"
        "  bot list [--json]\n"
        "  bot rm <id>\n"
        "  key add [--name N] [--sub S] [--scopes chat,read]\n"
        "  key list [--json]\n"
        "  key revoke <id>\n"
        "  plugin add <bot> <name> --url U [--description D]\n"
        "             [--schema JSON|@file] [--auth none|token|hmac]\n"
        "             [--header H] [--secret S|--secret-file F]\n"
        "             [--timeout-ms N]\n"
        "  plugin list <bot> [--json]\n"
        "  plugin rm <bot> <name>\n"
        "  roll [--services LIST] [--dry-run]\n"
        "              restart every service under systemd, one at a time\n"
        "  status [--json]\n"
        "              per upstream: limit, children, in flight, queue,\n"
        "              last signal, tier (asks troupe-dispatcher)\n"
        "  heatmap [--service S] [--since SEC] [--url URL] [--offcpu]\n"
        "          [--no-color]\n"
        "              eBPF run-queue latency heatmaps in the terminal\n"
        "              (asks troupe-telemetry's GET /api/heatmap)\n"
        "\n"
        "Options:\n"
        "  -c, --config PATH  config file (default " CTL_DEFAULT_CONFIG ",\n"
        "                     or $TROUPE_CONFIG); troupectl reads only [ipc]\n"
        "  -t, --timeout S    seconds to wait for troupe-storage (default 5)\n"
        "  -h, --help         help (also after a command: troupectl bot add "
        "-h)\n"
        "  -V, --version      print the version\n"
        "\n"
        "Exit status: 0 done, 1 refused or failed, 2 bad usage, 3 no answer\n"
        "from troupe-storage in time.\n";

static const char usage_bot[] =
        "usage: troupectl bot add <id> --upstream URL [options]\n"
        "       troupectl bot list [--json]\n"
        "       troupectl bot rm <id>\n"
        "\n"
        "Bots live in PostgreSQL, managed by troupe-storage.\n";

static const char usage_bot_add[] =
        "usage: troupectl bot add <id> --upstream URL [--model M]\n"
        "           [--system-prompt S] [--context-turns N] [--ttfe-ms N]\n"
        "           [--total-ms N]\n"
        "\n"
        "Add the bot <id>, or update it if it exists (options left out keep\n"
        "their stored value; a new bot gets storage's defaults).\n"
        "\n"
        "  --upstream URL       base URL of its OpenAI-compatible API\n"
        "                       (POST <URL>/v1/chat/completions)\n"
        "  --model M            model name sent upstream\n"
        "  --system-prompt S    system prompt\n"
        "  --context-turns N    past turns sent with each query (0: none)\n"
        "  --ttfe-ms N          time allowed to the first upstream byte\n"
        "  --total-ms N         time allowed to the whole upstream call\n"
        "\n"
        "Prints the stored bot as JSON.\n";

static const char usage_bot_list[] =
        "usage: troupectl bot list [--json]\n"
        "\n"
        "List the bots as a table (id, upstream, model, context turns), or\n"
        "with --json as storage's JSON array.\n";

static const char usage_bot_rm[] =
        "usage: troupectl bot rm <id>\n"
        "\n"
        "Remove the bot <id>.  Its stored conversations stay.\n";

static const char usage_key[] =
        "usage: troupectl key add [--name N] [--sub S] [--scopes chat,read]\n"
        "       troupectl key list [--json]\n"
        "       troupectl key revoke <id>\n"
        "\n"
        "API keys (Authorization: Bearer pat_...) for the v3 chat API.\n"
        "troupe-storage keeps their SHA-256 only.\n";

static const char usage_key_add[] =
        "usage: troupectl key add [--name N] [--sub S] [--scopes chat,read]\n"
        "\n"
        "Make a new API key (pat_ and 48 random letters and digits), store\n"
        "its SHA-256 and print it with its id.  The key is shown this once\n"
        "and cannot be shown again.\n"
        "\n"
        "  --name N      a label for people (default: none)\n"
        "  --sub S       the subject requests with this key run as\n"
        "                (default: the key's id)\n"
        "  --scopes L    comma list of chat (POST /v3/chat, cancel), read\n"
        "                (retrieve, message list) and * (all); default\n"
        "                chat,read\n";

static const char usage_key_list[] =
        "usage: troupectl key list [--json]\n"
        "\n"
        "List the API keys (id, name, sub, scopes, created, revoked), or\n"
        "with --json as storage's JSON array.  Keys themselves are never\n"
        "shown: they are not stored.\n";

static const char usage_key_revoke[] =
        "usage: troupectl key revoke <id>\n"
        "\n"
        "Revoke the API key <id>.  troupe-auth may still accept it for up\n"
        "to [auth] key_cache_ms (10 s by default).\n";

static const char usage_plugin[] =
        "usage: troupectl plugin add <bot> <name> --url U [options]\n"
        "       troupectl plugin list <bot> [--json]\n"
        "       troupectl plugin rm <bot> <name>\n"
        "\n"
        "A bot's plugins are HTTP webhooks the model may call as tools\n"
        "(OpenAI function calling) during a v3 chat.\n";

static const char usage_plugin_add[] =
        "usage: troupectl plugin add <bot> <name> --url U [--description D]\n"
        "           [--schema JSON|@file] [--auth none|token|hmac]\n"
        "           [--header H] [--secret S|--secret-file F]\n"
        "           [--timeout-ms N]\n"
        "\n"
        "Add the plugin <name> (1-64 letters, digits, _ or -: the function\n"
        "name the model sees) to the bot <bot>, or replace it entirely if\n"
        "it exists (options left out take their defaults again).\n"
        "\n"
        "  --url U            where the worker POSTs the call's arguments\n"
        "                     (http:// or https://)\n"
        "  --description D    what the plugin does, for the model\n"
        "  --schema JSON      JSON Schema of the arguments, an object such\n"
        "                     as {\"type\":\"object\",\"properties\":{...}};\n"
        "                     @file reads it from a file (@- from stdin);\n"
        "                     default: no arguments\n"
        "  --auth KIND        none (default); token: sends\n"
        "                     \"<header>: Bearer <secret>\"; hmac: signs\n"
        "                     each call with HMAC-SHA256 of the secret\n"
        "  --header H         the token's header (default Authorization)\n"
        "  --secret S         the token or HMAC key (visible in ps: prefer\n"
        "  --secret-file F    the first line of F, or of stdin for -)\n"
        "  --timeout-ms N     time allowed to one call, 1..600000\n"
        "                     (default 5000)\n"
        "\n"
        "Prints the stored plugin as JSON; the secret shows as \"set\".\n";

static const char usage_plugin_list[] =
        "usage: troupectl plugin list <bot> [--json]\n"
        "\n"
        "List the bot's plugins (name, auth, timeout, url, description),\n"
        "or with --json as storage's JSON array.  Secrets are never\n"
        "shown.\n";

static const char usage_plugin_rm[] =
        "usage: troupectl plugin rm <bot> <name>\n"
        "\n"
        "Remove the plugin <name> from the bot <bot>.  Removing a bot\n"
        "removes its plugins too.\n";

enum {
	OPT_UPSTREAM = 256,
	OPT_MODEL,
	OPT_PROMPT,
	OPT_TURNS,
	OPT_TTFE,
	OPT_TOTAL,
	OPT_JSON,
	OPT_NAME,
	OPT_SUB,
	OPT_SCOPES,
	OPT_URL,
	OPT_DESC,
	OPT_SCHEMA,
	OPT_AUTH,
	OPT_HEADER,
	OPT_SECRET,
	OPT_SECRET_FILE,
	OPT_TIMEOUT_MS,
	OPT_SERVICES,
	OPT_DRY_RUN,
};

/* Options of plugin add. */
struct plugin_opts {
	const char *url, *description, *schema, *auth, *header, *secret,
	        *secret_file;
	long long timeout_ms; /* -1: not given */
	int seen;
};

static const char plugin_opts_owner[] =
        "--url, --description, --schema, --auth, --header, --secret, "
        "--secret-file and --timeout-ms belong to plugin add";

/* Options of key add. */
struct key_opts {
	const char *name, *sub, *scopes;
	int seen;
};

/* Options of bot add, each kept as given. */
struct bot_opts {
	const char *upstream, *model, *prompt;
	long long turns, ttfe, total; /* -1: not given */
	int json;
	int seen_add, seen_list; /* an option of that command was given */
};

static void
on_ipc(struct loop *l, int fd, uint32_t ev, void *arg)
{
	struct ctl *c = arg;

	(void)l;
	(void)fd;
	(void)ev;
	ipc_process(c->ipc);
}

static void
on_tick(struct loop *l, void *arg)
{
	struct ctl *c = arg;

	(void)l;
	ipc_tick(c->ipc);
	loop_timer_set(c->tick, IPC_TICK_MS);
}

static void
on_deadline(struct loop *l, void *arg)
{
	struct ctl *c = arg;

	c->timed_out = 1;
	loop_break(l);
}

static void
on_msg(void *arg, const struct msg *m)
{
	struct ctl *c = arg;
	struct admin_reply r;

	if (c->done || m->type != MSG_ADMIN_REPLY ||
	    !mstr_eq(m->reqid, c->reqid) || admin_reply_unpack(m, &r) == -1) {
		c->stray++;
		return;
	}
	if ((c->text = malloc(r.text.n + 1)) == NULL) {
		c->status = 500;
		c->text = NULL;
	} else {
		memcpy(c->text, r.text.p, r.text.n);
		c->text[r.text.n] = '\0';
		c->textlen = r.text.n;
		c->status = r.status;
	}
	c->done = 1;
	loop_break(c->loop);
}

/* Remove our mailbox's files: nobody will use troupectl-<pid> again. */
static void
ctl_unlink(const char *name)
{
	char url[600], path[620];

	if (ipc_url(name, url, sizeof(url)) == -1 ||
	    strncmp(url, "ipc://", 6) != 0)
		return;
	(void)unlink(url + 6);
	snprintf(path, sizeof(path), "%s.lock", url + 6);
	(void)unlink(path);
}

/*
 * Run as root, become the owner of the directory that will hold our
 * mailbox (ipc://<rundir>/troupectl-<pid>.ipc) when that is another
 * user: under systemd the services run as troupe and accept pipes only
 * from troupe or root, and troupectl's mailbox (common/ipc.c) likewise
 * takes pipes only from its own user or root, so storage could never
 * deliver its answer to a mailbox root owns, even one it may open.  As
 * the directory's owner, both sides see their own user.  Returns 0 (done,
 * or nothing to do) or -1 (the change failed: said on stderr).
 */
static int
ctl_become_owner(const char *name)
{
	char url[600], *dir, *slash;
	struct stat sb;
	gid_t gid;

	if (geteuid() != 0)
		return (0);
	if (ipc_url(name, url, sizeof(url)) == -1 ||
	    strncmp(url, "ipc://", 6) != 0)
		return (0); /* tcp://: the peers' user is not checked */
	dir = url + 6;
	if ((slash = strrchr(dir, '/')) == NULL)
		return (0);
	if (slash == dir)
		slash[1] = '\0';
	else
		*slash = '\0';
	if (stat(dir, &sb) == -1 || sb.st_uid == 0)
		return (0); /* ipc_open() says what is wrong, if anything */
	gid = sb.st_gid;
	if (setgroups(1, &gid) == -1 || setgid(gid) == -1 ||
	    setuid(sb.st_uid) == -1) {
		fprintf(stderr,
		        "troupectl: cannot become uid %lu, the owner of %s: "
		        "%s\n",
		        (unsigned long)sb.st_uid, dir, strerror(errno));
		return (-1);
	}
	/* Not a way back to root. */
	if (setuid(0) != -1) {
		fprintf(stderr, "troupectl: could not drop root\n");
		return (-1);
	}
	return (0);
}

/* The mailbox ctl_call asks: storage, or the dispatcher (status). */
static const char *ctl_peer = "storage";

/*
 * Send op(args) to storage and wait for the answer.  Returns an exit
 * status; on success c->status and c->text hold the answer.
 */
static int
ctl_call(struct ctl *c, const char *op, const char *args, double timeout)
{
	struct admin_request req;
	struct msg_head h;
	unsigned char rnd[24];
	char name[64], err[256], trace[56], tid[33], sid[17];
	uint64_t until;
	int rc = CTL_EXIT_FAIL;

	snprintf(name, sizeof(name), "troupectl-%ld", (long)getpid());
	if (random_bytes(rnd, sizeof(rnd)) == -1) {
		fprintf(stderr, "troupectl: getrandom: %s\n", strerror(errno));
		return (CTL_EXIT_FAIL);
	}
	memcpy(c->reqid, "troupectl-", 10);
	hex_encode(c->reqid + 10, rnd, 8);
	c->reqid[26] = '\0';
	hex_encode(tid, rnd + 8, 16);
	tid[32] = '\0';
	hex_encode(sid, rnd, 8);
	sid[16] = '\0';
	snprintf(trace, sizeof(trace), "00-%s-%s-01", tid, sid);

	if (ctl_become_owner(name) == -1)
		return (CTL_EXIT_FAIL);
	if ((c->loop = loop_new()) == NULL) {
		fprintf(stderr, "troupectl: epoll: %s\n", strerror(errno));
		return (CTL_EXIT_FAIL);
	}
	if ((c->ipc = ipc_open(name, on_msg, c, err, sizeof(err))) == NULL) {
		fprintf(stderr, "troupectl: cannot open mailbox %s: %s\n",
		        name, err);
		goto out;
	}
	c->tick = loop_timer_new(c->loop, on_tick, c);
	c->deadline = loop_timer_new(c->loop, on_deadline, c);
	if (c->tick == NULL || c->deadline == NULL ||
	    loop_fd_add(c->loop, ipc_fd(c->ipc), EPOLLIN, on_ipc, c) == -1) {
		fprintf(stderr, "troupectl: event loop: %s\n",
		        strerror(errno));
		goto out;
	}
	h.reqid = MSTR(c->reqid);
	h.traceparent = MSTR(trace);
	h.deadline_ms = now_wall_ms() + (uint64_t)(timeout * 1000);
	h.reply_to = MSTR(name);
	req.op = MSTR(op);
	req.args = MSTR(args);
	if (msg_send_admin_request(c->ipc, ctl_peer, &h, &req) == -1) {
		fprintf(stderr, "troupectl: cannot queue the request for "
		                "troupe-storage\n");
		goto out;
	}
	ipc_tick(c->ipc);
	loop_timer_set(c->tick, IPC_TICK_MS);
	loop_timer_set(c->deadline, (int64_t)(timeout * 1000));
	while (!c->done && !c->timed_out)
		if (loop_run(c->loop) == -1) {
			fprintf(stderr, "troupectl: epoll_wait: %s\n",
			        strerror(errno));
			goto out;
		}
	if (!c->done) {
		fprintf(stderr,
		        "troupectl: troupe-%s did not answer within %g "
		        "s: "
		        "is it running?\n",
		        ctl_peer, timeout);
		rc = CTL_EXIT_TIMEOUT;
		goto out;
	}
	/* Let our acknowledgement leave, or storage would send the answer
	 * again to a mailbox that is gone. */
	until = now_mono_ms() + 3 * IPC_TICK_MS;
	while (now_mono_ms() < until) {
		loop_run_once(c->loop, IPC_TICK_MS);
		ipc_tick(c->ipc);
	}
	rc = CTL_EXIT_OK;
out:
	if (c->tick != NULL)
		loop_timer_free(c->tick);
	if (c->deadline != NULL)
		loop_timer_free(c->deadline);
	if (c->ipc != NULL) {
		loop_fd_del(c->loop, ipc_fd(c->ipc));
		ipc_close(c->ipc);
		ctl_unlink(name);
	}
	loop_free(c->loop);
	return (rc);
}

int
troupectl_ask(const char *peer, const char *op, const char *args,
              double timeout, uint64_t *status, char **text)
{
	struct ctl c = {0};
	int rc;

	ctl_peer = peer;
	rc = ctl_call(&c, op, args, timeout);
	ctl_peer = "storage";
	*status = c.status;
	*text = c.text;
	return (rc);
}

/* A JSON string field of o, or "" (a table shows what it can). */
static const char *
json_str(const cJSON *o, const char *k)
{
	const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);

	return (cJSON_IsString(it) && it->valuestring ? it->valuestring : "");
}

/* Print storage's bot.list answer as a table; -1 if it is not one. */
static int
print_bot_table(const char *text, FILE *f)
{
	static const char *const head[] = {"ID", "UPSTREAM", "MODEL",
	                                   "CONTEXT TURNS"};
	cJSON *root, *it;
	size_t w[3], i;
	char turns[32];

	if ((root = cJSON_Parse(text)) == NULL || !cJSON_IsArray(root)) {
		cJSON_Delete(root);
		return (-1);
	}
	for (i = 0; i < nitems(w); i++)
		w[i] = strlen(head[i]);
	cJSON_ArrayForEach(it, root)
	{
		if (!cJSON_IsObject(it)) {
			cJSON_Delete(root);
			return (-1);
		}
		if (strlen(json_str(it, "id")) > w[0])
			w[0] = strlen(json_str(it, "id"));
		if (strlen(json_str(it, "upstream")) > w[1])
			w[1] = strlen(json_str(it, "upstream"));
		if (strlen(json_str(it, "model")) > w[2])
			w[2] = strlen(json_str(it, "model"));
	}
	fprintf(f, "%-*s  %-*s  %-*s  %s\n", (int)w[0], head[0], (int)w[1],
	        head[1], (int)w[2], head[2], head[3]);
	cJSON_ArrayForEach(it, root)
	{
		const cJSON *t =
		        cJSON_GetObjectItemCaseSensitive(it, "context_turns");

		if (cJSON_IsNumber(t))
			snprintf(turns, sizeof(turns), "%.0f", t->valuedouble);
		else
			snprintf(turns, sizeof(turns), "-");
		fprintf(f, "%-*s  %-*s  %-*s  %s\n", (int)w[0],
		        json_str(it, "id"), (int)w[1],
		        json_str(it, "upstream"), (int)w[2],
		        json_str(it, "model"), turns);
	}
	cJSON_Delete(root);
	return (0);
}

/* A usage error: what is wrong, the synopsis (usage up to its first
 * blank line) and where the rest is. */
static int
usage_error(const char *usage, const char *fmt, const char *arg)
{
	const char *blank = strstr(usage, "\n\n");
	int n = blank ? (int)(blank - usage) + 1 : (int)strlen(usage);

	fprintf(stderr, "troupectl: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n%.*s(--help for more)\n", n, usage);
	return (CTL_EXIT_USAGE);
}

/* A non-negative integer option in [0, max]; -1 if not one. */
static long long
parse_count(const char *s, long long max)
{
	char *end;
	long long v;

	if (s[0] < '0' || s[0] > '9')
		return (-1);
	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || *end != '\0' || v > max)
		return (-1);
	return (v);
}

/* The JSON args of bot.add; NULL on ENOMEM. */
static char *
bot_add_args(const char *id, const struct bot_opts *o)
{
	cJSON *a;
	char *s = NULL;

	if ((a = cJSON_CreateObject()) == NULL)
		return (NULL);
	if (cJSON_AddStringToObject(a, "id", id) == NULL ||
	    cJSON_AddStringToObject(a, "upstream", o->upstream) == NULL ||
	    (o->model &&
	     cJSON_AddStringToObject(a, "model", o->model) == NULL) ||
	    (o->prompt &&
	     cJSON_AddStringToObject(a, "system_prompt", o->prompt) == NULL) ||
	    (o->turns >= 0 &&
	     cJSON_AddNumberToObject(a, "context_turns", (double)o->turns) ==
	             NULL) ||
	    (o->ttfe >= 0 &&
	     cJSON_AddNumberToObject(a, "ttfe_ms", (double)o->ttfe) == NULL) ||
	    (o->total >= 0 &&
	     cJSON_AddNumberToObject(a, "total_ms", (double)o->total) == NULL))
		goto out;
	s = cJSON_PrintUnformatted(a);
out:
	cJSON_Delete(a);
	return (s);
}

static char *
bot_id_args(const char *id)
{
	cJSON *a;
	char *s = NULL;

	if ((a = cJSON_CreateObject()) == NULL)
		return (NULL);
	if (cJSON_AddStringToObject(a, "id", id) != NULL)
		s = cJSON_PrintUnformatted(a);
	cJSON_Delete(a);
	return (s);
}

/* Whether scopes is a comma list of chat, read and *, without
 * spaces or empty names. */
static int
key_scopes_ok(const char *scopes)
{
	const char *p = scopes, *e;
	size_t n;

	if (*p == '\0')
		return (0);
	for (;;) {
		e = strchr(p, ',');
		n = e ? (size_t)(e - p) : strlen(p);
		if (!((n == 4 && strncmp(p, "chat", 4) == 0) ||
		      (n == 4 && strncmp(p, "read", 4) == 0) ||
		      (n == 1 && *p == '*')))
			return (0);
		if (e == NULL)
			return (1);
		p = e + 1;
	}
}

/* Fill key (room for the prefix, CTL_KEY_CHARS and a NUL) with a fresh
 * API key: base62 from getrandom, unbiased (bytes >= 248 are drawn
 * again); -1 if getrandom fails. */
static int
key_make(char *key)
{
	static const char a[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	                        "abcdefghijklmnopqrstuvwxyz";
	unsigned char rnd[64];
	size_t o = sizeof(CTL_KEY_PREFIX) - 1;

	memcpy(key, CTL_KEY_PREFIX, o);
	while (o < sizeof(CTL_KEY_PREFIX) - 1 + CTL_KEY_CHARS) {
		if (random_bytes(rnd, sizeof(rnd)) == -1)
			return (-1);
		for (size_t i = 0;
		     i < sizeof(rnd) &&
		     o < sizeof(CTL_KEY_PREFIX) - 1 + CTL_KEY_CHARS;
		     i++)
			if (rnd[i] < 248)
				key[o++] = a[rnd[i] % 62];
	}
	key[o] = '\0';
	explicit_bzero(rnd, sizeof(rnd));
	return (0);
}

/* out (65 bytes) = lowercase hex SHA-256 of s; -1 if OpenSSL fails. */
static int
key_sha256(const char *s, char *out)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int n = 0;

	if (EVP_Digest(s, strlen(s), md, &n, EVP_sha256(), NULL) != 1 ||
	    n != 32)
		return (-1);
	hex_encode(out, md, n);
	out[64] = '\0';
	return (0);
}

/* The JSON args of key.add; NULL on ENOMEM. */
static char *
key_add_args(const char *id, const char *name, const char *sub,
             const char *scopes, const char *hash)
{
	cJSON *a;
	char *s = NULL;

	if ((a = cJSON_CreateObject()) == NULL)
		return (NULL);
	if (cJSON_AddStringToObject(a, "id", id) != NULL &&
	    cJSON_AddStringToObject(a, "name", name) != NULL &&
	    cJSON_AddStringToObject(a, "sub", sub) != NULL &&
	    cJSON_AddStringToObject(a, "scopes", scopes) != NULL &&
	    cJSON_AddStringToObject(a, "hash", hash) != NULL)
		s = cJSON_PrintUnformatted(a);
	cJSON_Delete(a);
	return (s);
}

/* A time field of a key for the table: unix seconds (a number, or a
 * string of digits) as UTC, another string as it is, else "-". */
static void
key_time(const cJSON *o, const char *k, char *out, size_t n)
{
	const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
	struct tm tm;
	time_t t;

	if (cJSON_IsNumber(it) && it->valuedouble > 0)
		t = (time_t)it->valuedouble;
	else if (cJSON_IsString(it) && it->valuestring != NULL &&
	         it->valuestring[0] != '\0') {
		if (strspn(it->valuestring, "0123456789") !=
		    strlen(it->valuestring)) {
			snprintf(out, n, "%s", it->valuestring);
			return;
		}
		t = (time_t)strtoll(it->valuestring, NULL, 10);
	} else {
		snprintf(out, n, "-");
		return;
	}
	if (t > 100000000000LL)
		t /= 1000; /* milliseconds */
	if (gmtime_r(&t, &tm) == NULL ||
	    strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
		snprintf(out, n, "-");
}

/* Print storage's key.list answer as a table; -1 if it is not one. */
static int
print_key_table(const char *text, FILE *f)
{
	static const char *const head[] = {"ID",     "NAME",    "SUB",
	                                   "SCOPES", "CREATED", "REVOKED"};
	static const char *const field[] = {"id", "name", "sub", "scopes"};
	cJSON *root, *it;
	size_t w[6], i;
	char cr[64], rv[64];

	if ((root = cJSON_Parse(text)) == NULL || !cJSON_IsArray(root)) {
		cJSON_Delete(root);
		return (-1);
	}
	for (i = 0; i < nitems(w); i++)
		w[i] = strlen(head[i]);
	cJSON_ArrayForEach(it, root)
	{
		if (!cJSON_IsObject(it)) {
			cJSON_Delete(root);
			return (-1);
		}
		for (i = 0; i < nitems(field); i++)
			if (strlen(json_str(it, field[i])) > w[i])
				w[i] = strlen(json_str(it, field[i]));
		key_time(it, "created_at", cr, sizeof(cr));
		if (strlen(cr) > w[4])
			w[4] = strlen(cr);
	}
	fprintf(f, "%-*s  %-*s  %-*s  %-*s  %-*s  %s\n", (int)w[0], head[0],
	        (int)w[1], head[1], (int)w[2], head[2], (int)w[3], head[3],
	        (int)w[4], head[4], head[5]);
	cJSON_ArrayForEach(it, root)
	{
		key_time(it, "created_at", cr, sizeof(cr));
		key_time(it, "revoked_at", rv, sizeof(rv));
		fprintf(f, "%-*s  %-*s  %-*s  %-*s  %-*s  %s\n", (int)w[0],
		        json_str(it, "id"), (int)w[1], json_str(it, "name"),
		        (int)w[2], json_str(it, "sub"), (int)w[3],
		        json_str(it, "scopes"), (int)w[4], cr, rv);
	}
	cJSON_Delete(root);
	return (0);
}

/*
 * troupectl key ...: sub is add, list or revoke; id the operand of
 * revoke.  Checks the command line, makes the key (add), asks storage and
 * prints.  An exit status.
 */
static int
key_main(const char *cfg, int explicit_cfg, double timeout, int help,
         const char *sub, int nops, char **ops, const struct key_opts *k,
         int json)
{
	const char *op, *usage;
	char key[sizeof(CTL_KEY_PREFIX) + CTL_KEY_CHARS];
	char hash[65], id[2 * CTL_KEY_ID_BYTES + 1], defsub[32];
	unsigned char rnd[CTL_KEY_ID_BYTES];
	const char *ksub = "", *scopes;
	char err[512], *args = NULL;
	struct ctl c;
	int rc;

	memset(&c, 0, sizeof(c));
	memset(key, 0, sizeof(key));
	if (sub == NULL) {
		if (help) {
			fputs(usage_key, stdout);
			return (CTL_EXIT_OK);
		}
		return (usage_error(usage_key, "%s",
		                    "key: want add, list or revoke"));
	}
	if (strcmp(sub, "add") == 0) {
		op = "key.add";
		usage = usage_key_add;
	} else if (strcmp(sub, "list") == 0 || strcmp(sub, "ls") == 0) {
		op = "key.list";
		usage = usage_key_list;
	} else if (strcmp(sub, "revoke") == 0) {
		op = "key.revoke";
		usage = usage_key_revoke;
	} else
		return (usage_error(usage_key, "key: unknown command \"%s\"",
		                    sub));
	if (help) {
		fputs(usage, stdout);
		return (CTL_EXIT_OK);
	}
	if (k->seen && strcmp(op, "key.add") != 0)
		return (usage_error(usage, "%s",
		                    "--name, --sub and --scopes belong to key "
		                    "add"));
	if (json && strcmp(op, "key.list") != 0)
		return (usage_error(usage, "%s",
		                    "--json belongs to key list (and bot "
		                    "list)"));
	if (strcmp(op, "key.revoke") == 0) {
		if (nops < 3 || ops[2][0] == '\0')
			return (usage_error(usage, "%s", "which key? (<id>)"));
		if (nops > 3)
			return (usage_error(usage, "unexpected \"%s\"",
			                    ops[3]));
	} else if (nops > 2)
		return (usage_error(usage, "unexpected \"%s\"", ops[2]));
	scopes = k->scopes != NULL ? k->scopes : "chat,read";
	if (!key_scopes_ok(scopes))
		return (usage_error(usage,
		                    "--scopes: want a comma list of chat, "
		                    "read and *, got \"%s\"",
		                    scopes));
	if (k->name != NULL && strlen(k->name) > CTL_KEY_NAME_MAX)
		return (usage_error(usage, "%s", "--name: at most 128 bytes"));
	if (k->sub != NULL &&
	    (k->sub[0] == '\0' || strlen(k->sub) > CTL_KEY_SUB_MAX))
		return (usage_error(usage, "%s", "--sub: 1 to 256 bytes"));

	if (conf_load(cfg ? cfg : CTL_DEFAULT_CONFIG, !explicit_cfg, err,
	              sizeof(err)) == -1) {
		fprintf(stderr, "troupectl: config: %s\n", err);
		return (CTL_EXIT_FAIL);
	}
	if (strcmp(op, "key.add") == 0) {
		if (random_bytes(rnd, sizeof(rnd)) == -1 ||
		    key_make(key) == -1) {
			fprintf(stderr, "troupectl: getrandom: %s\n",
			        strerror(errno));
			rc = CTL_EXIT_FAIL;
			goto out;
		}
		hex_encode(id, rnd, sizeof(rnd));
		id[sizeof(id) - 1] = '\0';
		if (key_sha256(key, hash) == -1) {
			fprintf(stderr, "troupectl: SHA-256 failed\n");
			rc = CTL_EXIT_FAIL;
			goto out;
		}
		/* As storage would: the key stands for itself. */
		snprintf(defsub, sizeof(defsub), "%s", id);
		ksub = k->sub != NULL ? k->sub : defsub;
		args = key_add_args(id, k->name != NULL ? k->name : "", ksub,
		                    scopes, hash);
	} else if (strcmp(op, "key.revoke") == 0)
		args = bot_id_args(ops[2]);
	else
		args = strdup("{}");
	if (args == NULL) {
		fprintf(stderr, "troupectl: out of memory\n");
		rc = CTL_EXIT_FAIL;
		goto out;
	}
	rc = ctl_call(&c, op, args, timeout);
	if (rc != CTL_EXIT_OK)
		goto out;
	if (c.status != 0) {
		fprintf(stderr, "troupectl: %s: %s (status %" PRIu64 ")\n", op,
		        c.text != NULL && c.textlen > 0 ? c.text : "failed",
		        c.status);
		rc = CTL_EXIT_FAIL;
	} else if (strcmp(op, "key.add") == 0) {
		printf("id:     %s\n"
		       "key:    %s\n"
		       "name:   %s\n"
		       "sub:    %s\n"
		       "scopes: %s\n",
		       id, key, k->name != NULL ? k->name : "", ksub, scopes);
		fprintf(stderr,
		        "troupectl: store this key now: it is shown once and "
		        "cannot be shown again (only its SHA-256 is kept)\n");
	} else if (strcmp(op, "key.list") == 0 && !json) {
		if (print_key_table(c.text, stdout) == -1) {
			fprintf(stderr,
			        "troupectl: key.list: unexpected answer: %s\n",
			        c.text);
			rc = CTL_EXIT_FAIL;
		}
	} else
		printf("%s\n", c.text);
out:
	explicit_bzero(key, sizeof(key));
	free(args);
	free(c.text);
	conf_free();
	if (fflush(stdout) == EOF && rc == CTL_EXIT_OK)
		rc = CTL_EXIT_FAIL;
	return (rc);
}

/*
 * Read path ("-": stdin) into a NUL-terminated buffer of at most
 * CTL_FILE_MAX bytes.  NULL with the reason in err.
 */
static char *
read_text(const char *path, size_t *lenp, char *err, size_t errlen)
{
	FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "re");
	char *b;
	size_t n;

	if (f == NULL) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return (NULL);
	}
	if ((b = malloc(CTL_FILE_MAX + 1)) == NULL) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	n = fread(b, 1, CTL_FILE_MAX + 1, f);
	if (ferror(f)) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		goto fail;
	}
	if (n > CTL_FILE_MAX) {
		snprintf(err, errlen, "%s: larger than %d bytes", path,
		         CTL_FILE_MAX);
		goto fail;
	}
	if (memchr(b, '\0', n) != NULL) {
		snprintf(err, errlen, "%s: holds a NUL byte", path);
		goto fail;
	}
	b[n] = '\0';
	*lenp = n;
	goto out;
fail:
	free(b);
	b = NULL;
out:
	if (f != stdin)
		fclose(f);
	return (b);
}

/*
 * Check a --schema text as storage will, so a typo is named here with
 * its place: valid JSON, and an object.  0, or -1 with the reason in err
 * (storage checks the rest: "type", "properties", "required", size).
 */
static int
schema_check(const char *text, char *err, size_t errlen)
{
	const char *end = NULL, *p;
	size_t line = 1, col = 1, i;
	char near[24];
	cJSON *root;
	int rc = 0;

	if ((root = cJSON_ParseWithOpts(text, &end, 1)) == NULL) {
		if (end == NULL || end < text || end > text + strlen(text))
			end = text + strlen(text);
		for (p = text; p < end; p++) {
			if (*p == '\n') {
				line++;
				col = 1;
			} else
				col++;
		}
		for (i = 0; i + 1 < sizeof(near) && end[i] != '\0' &&
		            end[i] != '\n' && end[i] != '\r';
		     i++)
			near[i] =
			        end[i] >= 0x20 && end[i] < 0x7f ? end[i] : '?';
		near[i] = '\0';
		if (i == 0)
			snprintf(
			        err, errlen,
			        "not valid JSON: it ends too early (line %zu, "
			        "column %zu)",
			        line, col);
		else
			snprintf(
			        err, errlen,
			        "not valid JSON at line %zu, column %zu, near "
			        "\"%s\"",
			        line, col, near);
		return (-1);
	}
	if (!cJSON_IsObject(root)) {
		snprintf(err, errlen,
		         "want a JSON object (a JSON Schema such as "
		         "{\"type\":\"object\",\"properties\":{...}}), got %s",
		         cJSON_IsArray(root)    ? "an array"
		         : cJSON_IsString(root) ? "a string"
		         : cJSON_IsNumber(root) ? "a number"
		                                : "a literal");
		rc = -1;
	}
	cJSON_Delete(root);
	return (rc);
}

/* The JSON args of plugin.add; NULL on ENOMEM. */
static char *
plugin_add_args(const char *bot, const char *name, const struct plugin_opts *o,
                const char *schema, const char *secret)
{
	cJSON *a;
	char *s = NULL;

	if ((a = cJSON_CreateObject()) == NULL)
		return (NULL);
	if (cJSON_AddStringToObject(a, "bot_id", bot) == NULL ||
	    cJSON_AddStringToObject(a, "name", name) == NULL ||
	    cJSON_AddStringToObject(a, "url", o->url) == NULL ||
	    (o->description &&
	     cJSON_AddStringToObject(a, "description", o->description) ==
	             NULL) ||
	    (schema &&
	     cJSON_AddStringToObject(a, "parameters", schema) == NULL) ||
	    (o->auth && cJSON_AddStringToObject(a, "auth", o->auth) == NULL) ||
	    (o->header &&
	     cJSON_AddStringToObject(a, "header", o->header) == NULL) ||
	    (secret && cJSON_AddStringToObject(a, "secret", secret) == NULL) ||
	    (o->timeout_ms >= 0 &&
	     cJSON_AddNumberToObject(a, "timeout_ms", (double)o->timeout_ms) ==
	             NULL))
		goto out;
	s = cJSON_PrintUnformatted(a);
out:
	cJSON_Delete(a);
	return (s);
}

/* The JSON args of plugin.list ({bot_id}) or plugin.rm ({bot_id,
 * name}: name not NULL); NULL on ENOMEM. */
static char *
plugin_ids_args(const char *bot, const char *name)
{
	cJSON *a;
	char *s = NULL;

	if ((a = cJSON_CreateObject()) == NULL)
		return (NULL);
	if (cJSON_AddStringToObject(a, "bot_id", bot) != NULL &&
	    (name == NULL || cJSON_AddStringToObject(a, "name", name) != NULL))
		s = cJSON_PrintUnformatted(a);
	cJSON_Delete(a);
	return (s);
}

/* A description for one table cell: control characters become spaces,
 * and it is cut (on a UTF-8 boundary) after CTL_DESC_SHOWN bytes. */
static void
plugin_desc(const char *d, char *out, size_t n)
{
	size_t i, k = 0;

	for (i = 0; d[i] != '\0' && k + 4 < n; i++) {
		if (i >= CTL_DESC_SHOWN &&
		    ((unsigned char)d[i] & 0xc0) != 0x80) {
			memcpy(out + k, "...", 3);
			k += 3;
			break;
		}
		out[k++] = (unsigned char)d[i] < 0x20 || d[i] == 0x7f ? ' '
		                                                      : d[i];
	}
	out[k] = '\0';
	if (k == 0)
		snprintf(out, n, "-");
}

/* Print storage's plugin.list answer as a table; -1 if it is not one. */
static int
print_plugin_table(const char *text, FILE *f)
{
	static const char *const head[] = {"NAME", "AUTH", "TIMEOUT_MS", "URL",
	                                   "DESCRIPTION"};
	cJSON *root, *it;
	size_t w[4], i;
	char auth[160], tmo[32], desc[CTL_DESC_SHOWN + 8];

	if ((root = cJSON_Parse(text)) == NULL || !cJSON_IsArray(root)) {
		cJSON_Delete(root);
		return (-1);
	}
	for (i = 0; i < nitems(w); i++)
		w[i] = strlen(head[i]);
	cJSON_ArrayForEach(it, root)
	{
		if (!cJSON_IsObject(it)) {
			cJSON_Delete(root);
			return (-1);
		}
	}
	/* Two passes over the same cells: widths, then lines. */
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1)
			fprintf(f, "%-*s  %-*s  %-*s  %-*s  %s\n", (int)w[0],
			        head[0], (int)w[1], head[1], (int)w[2],
			        head[2], (int)w[3], head[3], head[4]);
		cJSON_ArrayForEach(it, root)
		{
			const char *kind = json_str(it, "auth"),
			           *hdr = json_str(it, "header");
			const cJSON *t = cJSON_GetObjectItemCaseSensitive(
			        it, "timeout_ms");
			const char *cell[4];

			if (strcmp(kind, "token") == 0 && hdr[0] != '\0' &&
			    strcmp(hdr, "Authorization") != 0)
				snprintf(auth, sizeof(auth), "token:%.128s",
				         hdr);
			else
				snprintf(auth, sizeof(auth), "%s",
				         kind[0] ? kind : "-");
			if (cJSON_IsNumber(t))
				snprintf(tmo, sizeof(tmo), "%.0f",
				         t->valuedouble);
			else
				snprintf(tmo, sizeof(tmo), "-");
			cell[0] = json_str(it, "name");
			cell[1] = auth;
			cell[2] = tmo;
			cell[3] = json_str(it, "url");
			if (pass == 0) {
				for (i = 0; i < nitems(w); i++)
					if (strlen(cell[i]) > w[i])
						w[i] = strlen(cell[i]);
				continue;
			}
			plugin_desc(json_str(it, "description"), desc,
			            sizeof(desc));
			fprintf(f, "%-*s  %-*s  %-*s  %-*s  %s\n", (int)w[0],
			        cell[0], (int)w[1], cell[1], (int)w[2],
			        cell[2], (int)w[3], cell[3], desc);
		}
	}
	cJSON_Delete(root);
	return (0);
}

/*
 * troupectl plugin ...: sub is add, list or rm; ops[2] the bot, ops[3]
 * the plugin's name.  Checks the command line (the schema and the
 * secret's file included), asks storage and prints.  An exit status.
 */
static int
plugin_main(const char *cfg, int explicit_cfg, double timeout, int help,
            const char *sub, int nops, char **ops, const struct plugin_opts *o,
            int json)
{
	const char *op, *usage, *schema = NULL, *secret = NULL;
	char err[512], *args = NULL, *schema_buf = NULL, *secret_buf = NULL;
	size_t n = 0, secret_n = 0;
	struct ctl c;
	int rc, want;

	memset(&c, 0, sizeof(c));
	if (sub == NULL) {
		if (help) {
			fputs(usage_plugin, stdout);
			return (CTL_EXIT_OK);
		}
		return (usage_error(usage_plugin, "%s",
		                    "plugin: want add, list or rm"));
	}
	if (strcmp(sub, "add") == 0) {
		op = "plugin.add";
		usage = usage_plugin_add;
		want = 4;
	} else if (strcmp(sub, "list") == 0 || strcmp(sub, "ls") == 0) {
		op = "plugin.list";
		usage = usage_plugin_list;
		want = 3;
	} else if (strcmp(sub, "rm") == 0 || strcmp(sub, "remove") == 0) {
		op = "plugin.rm";
		usage = usage_plugin_rm;
		want = 4;
	} else
		return (usage_error(usage_plugin,
		                    "plugin: unknown command \"%s\"", sub));
	if (help) {
		fputs(usage, stdout);
		return (CTL_EXIT_OK);
	}
	if (o->seen && strcmp(op, "plugin.add") != 0)
		return (usage_error(usage, "%s", plugin_opts_owner));
	if (json && strcmp(op, "plugin.list") != 0)
		return (usage_error(usage, "%s",
		                    "--json belongs to plugin list (and bot "
		                    "list, key list)"));
	if (nops < 3 || ops[2][0] == '\0')
		return (usage_error(usage, "%s", "which bot? (<bot>)"));
	if (want == 4 && (nops < 4 || ops[3][0] == '\0'))
		return (usage_error(usage, "%s", "which plugin? (<name>)"));
	if (nops > want)
		return (usage_error(usage, "unexpected \"%s\"", ops[want]));
	if (strcmp(op, "plugin.add") == 0) {
		if (o->url == NULL || o->url[0] == '\0')
			return (usage_error(usage, "%s",
			                    "plugin add needs --url URL"));
		if (o->auth != NULL && strcmp(o->auth, "none") != 0 &&
		    strcmp(o->auth, "token") != 0 &&
		    strcmp(o->auth, "hmac") != 0)
			return (usage_error(
			        usage,
			        "--auth: want none, token or hmac, "
			        "got \"%s\"",
			        o->auth));
		if (o->secret != NULL && o->secret_file != NULL)
			return (usage_error(usage, "%s",
			                    "give --secret or --secret-file, "
			                    "not both"));
		if (o->schema != NULL) {
			schema = o->schema;
			if (schema[0] == '@') {
				if ((schema_buf =
				             read_text(schema + 1, &n, err,
				                       sizeof(err))) == NULL) {
					rc = usage_error(usage, "--schema: %s",
					                 err);
					goto out;
				}
				schema = schema_buf;
			}
			if (schema_check(schema, err, sizeof(err)) == -1) {
				rc = usage_error(usage, "--schema: %s", err);
				goto out;
			}
		}
		secret = o->secret;
		if (o->secret_file != NULL) {
			if ((secret_buf = read_text(o->secret_file, &secret_n,
			                            err, sizeof(err))) ==
			    NULL) {
				rc = usage_error(usage, "--secret-file: %s",
				                 err);
				goto out;
			}
			/* Its first line. */
			secret_buf[strcspn(secret_buf, "\r\n")] = '\0';
			secret = secret_buf;
		}
		if (secret != NULL &&
		    (secret[0] == '\0' || strlen(secret) > CTL_SECRET_MAX)) {
			rc = usage_error(usage, "%s",
			                 "the secret must be 1 to 1024 bytes");
			goto out;
		}
	}

	if (conf_load(cfg ? cfg : CTL_DEFAULT_CONFIG, !explicit_cfg, err,
	              sizeof(err)) == -1) {
		fprintf(stderr, "troupectl: config: %s\n", err);
		rc = CTL_EXIT_FAIL;
		goto out;
	}
	if (strcmp(op, "plugin.add") == 0)
		args = plugin_add_args(ops[2], ops[3], o, schema, secret);
	else
		args = plugin_ids_args(ops[2], want == 4 ? ops[3] : NULL);
	if (args == NULL) {
		fprintf(stderr, "troupectl: out of memory\n");
		rc = CTL_EXIT_FAIL;
		goto out;
	}
	rc = ctl_call(&c, op, args, timeout);
	if (rc != CTL_EXIT_OK)
		goto out;
	if (c.status != 0) {
		fprintf(stderr, "troupectl: %s: %s (status %" PRIu64 ")\n", op,
		        c.text != NULL && c.textlen > 0 ? c.text : "failed",
		        c.status);
		rc = CTL_EXIT_FAIL;
	} else if (strcmp(op, "plugin.list") == 0 && !json) {
		if (print_plugin_table(c.text, stdout) == -1) {
			fprintf(stderr,
			        "troupectl: plugin.list: unexpected answer: "
			        "%s\n",
			        c.text);
			rc = CTL_EXIT_FAIL;
		}
	} else
		printf("%s\n", c.text);
out:
	if (args != NULL) {
		explicit_bzero(args, strlen(args)); /* it holds the secret */
		free(args);
	}
	if (secret_buf != NULL) {
		explicit_bzero(secret_buf, secret_n);
		free(secret_buf);
	}
	free(schema_buf);
	free(c.text);
	conf_free();
	if (fflush(stdout) == EOF && rc == CTL_EXIT_OK)
		rc = CTL_EXIT_FAIL;
	return (rc);
}

/* `troupectl [-c F] [-t S] heatmap ...`: heatmap_main's exit status, or
 * -1 if the command is another one. */
static int
heatmap_cmd(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0 ||
		    strcmp(a, "-t") == 0 || strcmp(a, "--timeout") == 0) {
			i++;
			continue;
		}
		if (a[0] == '-')
			continue;
		if (strcmp(a, "heatmap") != 0)
			return (-1);
		return (heatmap_main(argc - i - 1, argv + i + 1));
	}
	return (-1);
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
	        {"config", required_argument, NULL, 'c'},
	        {"timeout", required_argument, NULL, 't'},
	        {"help", no_argument, NULL, 'h'},
	        {"version", no_argument, NULL, 'V'},
	        {"upstream", required_argument, NULL, OPT_UPSTREAM},
	        {"model", required_argument, NULL, OPT_MODEL},
	        {"system-prompt", required_argument, NULL, OPT_PROMPT},
	        {"context-turns", required_argument, NULL, OPT_TURNS},
	        {"ttfe-ms", required_argument, NULL, OPT_TTFE},
	        {"total-ms", required_argument, NULL, OPT_TOTAL},
	        {"json", no_argument, NULL, OPT_JSON},
	        {"name", required_argument, NULL, OPT_NAME},
	        {"sub", required_argument, NULL, OPT_SUB},
	        {"scopes", required_argument, NULL, OPT_SCOPES},
	        {"url", required_argument, NULL, OPT_URL},
	        {"description", required_argument, NULL, OPT_DESC},
	        {"schema", required_argument, NULL, OPT_SCHEMA},
	        {"auth", required_argument, NULL, OPT_AUTH},
	        {"header", required_argument, NULL, OPT_HEADER},
	        {"secret", required_argument, NULL, OPT_SECRET},
	        {"secret-file", required_argument, NULL, OPT_SECRET_FILE},
	        {"timeout-ms", required_argument, NULL, OPT_TIMEOUT_MS},
	        {"services", required_argument, NULL, OPT_SERVICES},
	        {"dry-run", no_argument, NULL, OPT_DRY_RUN},
	        {NULL, 0, NULL, 0},
	};
	struct bot_opts o = {NULL, NULL, NULL, -1, -1, -1, 0, 0, 0};
	struct key_opts ko = {NULL, NULL, NULL, 0};
	struct plugin_opts po = {NULL, NULL, NULL, NULL, NULL,
	                         NULL, NULL, -1,   0};
	struct ctl c;
	const char *cfg = getenv("TROUPE_CONFIG"), *op = NULL, *usage;
	const char *cmd, *sub, *roll_services = NULL;
	char err[512], *args = NULL, *end;
	int roll_dry = 0, roll_seen = 0;
	double timeout = 5;
	int ch, help = 0, explicit_cfg = cfg != NULL, rc, nops;

	memset(&c, 0, sizeof(c));
	signal(SIGPIPE, SIG_IGN);
	if ((rc = heatmap_cmd(argc, argv)) != -1) /* HTTP, options its own */
		return (rc);
	opterr = 0;
	while ((ch = getopt_long(argc, argv, ":c:t:hV", opts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			cfg = optarg;
			explicit_cfg = 1;
			break;
		case 't':
			errno = 0;
			timeout = strtod(optarg, &end);
			if (errno != 0 || end == optarg || *end != '\0' ||
			    !(timeout > 0 && timeout <= 3600))
				return (usage_error(usage_main,
				                    "--timeout: want seconds "
				                    "in (0, 3600], "
				                    "got \"%s\"",
				                    optarg));
			break;
		case 'h':
			help = 1;
			break;
		case 'V':
			printf("troupectl %s\n", TROUPE_VERSION);
			return (CTL_EXIT_OK);
		case OPT_UPSTREAM:
			o.upstream = optarg;
			o.seen_add = 1;
			break;
		case OPT_MODEL:
			o.model = optarg;
			o.seen_add = 1;
			break;
		case OPT_PROMPT:
			o.prompt = optarg;
			o.seen_add = 1;
			break;
		case OPT_TURNS:
		case OPT_TTFE:
		case OPT_TOTAL: {
			long long v = parse_count(
			        optarg, ch == OPT_TURNS ? 1000000 : 3600000);

			if (v < 0 || (ch != OPT_TURNS && v == 0))
				return (usage_error(usage_bot_add,
				                    "bad number \"%s\"",
				                    optarg));
			if (ch == OPT_TURNS)
				o.turns = v;
			else if (ch == OPT_TTFE)
				o.ttfe = v;
			else
				o.total = v;
			o.seen_add = 1;
			break;
		}
		case OPT_JSON:
			o.json = 1;
			o.seen_list = 1;
			break;
		case OPT_NAME:
			ko.name = optarg;
			ko.seen = 1;
			break;
		case OPT_SUB:
			ko.sub = optarg;
			ko.seen = 1;
			break;
		case OPT_SCOPES:
			ko.scopes = optarg;
			ko.seen = 1;
			break;
		case OPT_URL:
			po.url = optarg;
			po.seen = 1;
			break;
		case OPT_DESC:
			po.description = optarg;
			po.seen = 1;
			break;
		case OPT_SCHEMA:
			po.schema = optarg;
			po.seen = 1;
			break;
		case OPT_AUTH:
			po.auth = optarg;
			po.seen = 1;
			break;
		case OPT_HEADER:
			po.header = optarg;
			po.seen = 1;
			break;
		case OPT_SECRET:
			po.secret = optarg;
			po.seen = 1;
			break;
		case OPT_SECRET_FILE:
			po.secret_file = optarg;
			po.seen = 1;
			break;
		case OPT_TIMEOUT_MS:
			po.timeout_ms =
			        parse_count(optarg, CTL_PLUGIN_TIMEOUT_MAX);
			if (po.timeout_ms < 1)
				return (usage_error(usage_plugin_add,
				                    "--timeout-ms: want 1 to "
				                    "600000, got \"%s\"",
				                    optarg));
			po.seen = 1;
			break;
		case OPT_SERVICES:
			roll_services = optarg;
			roll_seen = 1;
			break;
		case OPT_DRY_RUN:
			roll_dry = 1;
			roll_seen = 1;
			break;
		case ':':
			return (usage_error(usage_main,
			                    "option %s needs a value",
			                    argv[optind - 1]));
		default:
			return (usage_error(usage_main, "unknown option %s",
			                    argv[optind - 1]));
		}
	}
	nops = argc - optind;
	cmd = nops > 0 ? argv[optind] : NULL;
	sub = nops > 1 ? argv[optind + 1] : NULL;

	/* Which command, and its help. */
	if (cmd == NULL) {
		if (help) {
			fputs(usage_main, stdout);
			return (CTL_EXIT_OK);
		}
		return (usage_error(usage_main, "%s", "no command given"));
	}
	if (strcmp(cmd, "help") == 0) {
		fputs(usage_main, stdout);
		return (CTL_EXIT_OK);
	}
	if (strcmp(cmd, "roll") == 0) {
		if (o.seen_add || o.seen_list || ko.seen || po.seen)
			return (usage_error(usage_main, "%s",
			                    "roll takes only --services, "
			                    "--dry-run and --timeout"));
		return (roll_main(help, nops - 1, argv + optind + 1,
		                  roll_services, roll_dry, timeout));
	}
	if (strcmp(cmd, "status") == 0)
		return (status_main(help, nops - 1, argv + optind + 1, o.json,
		                    timeout, cfg ? cfg : CTL_DEFAULT_CONFIG,
		                    !explicit_cfg));
	if (roll_seen)
		return (usage_error(
		        usage_main, "%s",
		        "--services and --dry-run belong to roll"));
	if (strcmp(cmd, "plugin") == 0) {
		if (o.seen_add)
			return (usage_error(
			        usage_plugin, "%s",
			        "--upstream, --model, "
			        "--system-prompt, --context-turns, "
			        "--ttfe-ms and --total-ms belong to "
			        "bot add"));
		if (ko.seen)
			return (usage_error(
			        usage_plugin, "%s",
			        "--name, --sub and --scopes belong "
			        "to key add"));
		return (plugin_main(cfg, explicit_cfg, timeout, help, sub,
		                    nops, argv + optind, &po, o.json));
	}
	if (strcmp(cmd, "key") == 0 && po.seen)
		return (usage_error(usage_key, "%s", plugin_opts_owner));
	if (strcmp(cmd, "key") == 0) {
		if (o.seen_add)
			return (usage_error(
			        usage_key, "%s",
			        "--upstream, --model, "
			        "--system-prompt, --context-turns, "
			        "--ttfe-ms and --total-ms belong to "
			        "bot add"));
		return (key_main(cfg, explicit_cfg, timeout, help, sub, nops,
		                 argv + optind, &ko, o.json));
	}
	if (strcmp(cmd, "bot") != 0)
		return (usage_error(usage_main, "unknown command \"%s\"",
		                    cmd));
	if (sub == NULL) {
		if (help) {
			fputs(usage_bot, stdout);
			return (CTL_EXIT_OK);
		}
		return (usage_error(usage_bot, "%s",
		                    "bot: want add, list or rm"));
	}
	if (strcmp(sub, "add") == 0) {
		op = "bot.add";
		usage = usage_bot_add;
	} else if (strcmp(sub, "list") == 0 || strcmp(sub, "ls") == 0) {
		op = "bot.list";
		usage = usage_bot_list;
	} else if (strcmp(sub, "rm") == 0 || strcmp(sub, "remove") == 0) {
		op = "bot.rm";
		usage = usage_bot_rm;
	} else
		return (usage_error(usage_bot, "bot: unknown command \"%s\"",
		                    sub));
	if (help) {
		fputs(usage, stdout);
		return (CTL_EXIT_OK);
	}
	if (ko.seen)
		return (usage_error(usage, "%s",
		                    "--name, --sub and --scopes belong to key "
		                    "add"));
	if (po.seen)
		return (usage_error(usage, "%s", plugin_opts_owner));
	if (o.seen_add && strcmp(op, "bot.add") != 0)
		return (usage_error(
		        usage, "%s",
		        "--upstream, --model, --system-prompt, "
		        "--context-turns, "
		        "--ttfe-ms and --total-ms belong to bot add"));
	if (o.seen_list && strcmp(op, "bot.list") != 0)
		return (usage_error(usage, "%s",
		                    "--json belongs to bot list"));
	if (strcmp(op, "bot.list") == 0) {
		if (nops > 2)
			return (usage_error(usage, "unexpected \"%s\"",
			                    argv[optind + 2]));
	} else {
		if (nops < 3 || argv[optind + 2][0] == '\0')
			return (usage_error(usage, "%s", "which bot? (<id>)"));
		if (nops > 3)
			return (usage_error(usage, "unexpected \"%s\"",
			                    argv[optind + 3]));
		if (strcmp(op, "bot.add") == 0 &&
		    (o.upstream == NULL || o.upstream[0] == '\0'))
			return (usage_error(usage, "%s",
			                    "bot add needs --upstream URL"));
	}

	/* The config only tells where mailboxes are ([ipc]). */
	if (conf_load(cfg ? cfg : CTL_DEFAULT_CONFIG, !explicit_cfg, err,
	              sizeof(err)) == -1) {
		fprintf(stderr, "troupectl: config: %s\n", err);
		return (CTL_EXIT_FAIL);
	}
	if (strcmp(op, "bot.add") == 0)
		args = bot_add_args(argv[optind + 2], &o);
	else if (strcmp(op, "bot.rm") == 0)
		args = bot_id_args(argv[optind + 2]);
	else
		args = strdup("{}");
	if (args == NULL) {
		fprintf(stderr, "troupectl: out of memory\n");
		return (CTL_EXIT_FAIL);
	}
	rc = ctl_call(&c, op, args, timeout);
	free(args);
	if (rc != CTL_EXIT_OK)
		goto out;
	if (c.status != 0) {
		fprintf(stderr, "troupectl: %s: %s (status %" PRIu64 ")\n", op,
		        c.text != NULL && c.textlen > 0 ? c.text : "failed",
		        c.status);
		rc = CTL_EXIT_FAIL;
	} else if (strcmp(op, "bot.list") == 0 && !o.json) {
		if (print_bot_table(c.text, stdout) == -1) {
			fprintf(stderr,
			        "troupectl: bot.list: unexpected answer: %s\n",
			        c.text);
			rc = CTL_EXIT_FAIL;
		}
	} else
		printf("%s\n", c.text);
out:
	free(c.text);
	conf_free();
	if (fflush(stdout) == EOF && rc == CTL_EXIT_OK)
		rc = CTL_EXIT_FAIL;
	return (rc);
}
