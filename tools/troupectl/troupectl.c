/* SPDX-License-Identifier: ISC */
/*
 * troupectl: the operator's command line.  Bots are added, listed and
 * removed through troupe-storage, the only process that may open Redis
 * and PostgreSQL: troupectl opens its own short-lived mailbox
 * (troupectl-<pid>), sends one ADMIN_REQUEST{op, args JSON} to "storage"
 * with reply_to set to that mailbox, waits for the ADMIN_REPLY{status,
 * text} carrying its request id, prints it and leaves.
 *
 * It must never open a database connection, and never wait forever:
 * --timeout (5 s) bounds the wait, and the deadline travels with the
 * request so storage can drop it once nobody waits.
 *
 * Exit status: 0 done; 1 storage answered with an error (its text on
 * stderr) or the mailbox could not be opened; 2 bad command line; 3 no
 * answer in time.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "conf.h"
#include "ipc.h"
#include "loop.h"
#include "proto.h"
#include "util.h"

#define CTL_DEFAULT_CONFIG "/etc/troupe/troupe.conf"
#define CTL_EXIT_OK 0
#define CTL_EXIT_FAIL 1
#define CTL_EXIT_USAGE 2
#define CTL_EXIT_TIMEOUT 3

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

enum {
	OPT_UPSTREAM = 256,
	OPT_MODEL,
	OPT_PROMPT,
	OPT_TURNS,
	OPT_TTFE,
	OPT_TOTAL,
	OPT_JSON,
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
	if (msg_send_admin_request(c->ipc, "storage", &h, &req) == -1) {
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
		        "troupectl: troupe-storage did not answer within %g "
		        "s: "
		        "is it running?\n",
		        timeout);
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
	        {NULL, 0, NULL, 0},
	};
	struct bot_opts o = {NULL, NULL, NULL, -1, -1, -1, 0, 0, 0};
	struct ctl c;
	const char *cfg = getenv("TROUPE_CONFIG"), *op = NULL, *usage;
	const char *cmd, *sub;
	char err[512], *args = NULL, *end;
	double timeout = 5;
	int ch, help = 0, explicit_cfg = cfg != NULL, rc, nops;

	memset(&c, 0, sizeof(c));
	signal(SIGPIPE, SIG_IGN);
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
