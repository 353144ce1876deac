/* SPDX-License-Identifier: ISC */
/*
 * storage_plugins: a bot's plugins, the HTTP webhooks a worker offers the
 * model as tools (the plugins table, schema v3), managed by the ADMIN ops
 * troupectl sends: plugin.add (an upsert), plugin.list, plugin.rm.
 *
 * Callers: storage_dispatch.c hands over plugin.* ADMIN_REQUESTs.  The
 * plugins reach workers through the bot cache (storage_bots.c reads a
 * bot and its plugins in one statement, CTX_REPLY.plugins); add and rm
 * forget the bot's cached copy once their statement is over, even when
 * its fate is unknown, so the next CTX_GET reads them again.
 *
 * Statements run on the reader connection, FIFO with bot loads, context
 * rebuilds and the other admin ops.  A plugin's secret is written here
 * and read only by the bot load: no admin answer ever carries it back
 * (list and add say "secret":"set").  Never blocks.
 *
 * DIAGNOSTICS: statement errors warn; added and removed plugins are
 * logged (bot and name, never the secret).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

/* The public view of a row: everything but the secret, and whether one
 * is set.  extra: more ", key, value" pairs. */
#define PLUGIN_FIELDS                                                         \
	"'bot_id', bot_id, 'name', name, 'url', url,"                         \
	" 'description', description, 'parameters', parameters,"              \
	" 'auth', auth_kind, 'header', auth_header"
#define PLUGIN_TIMES                                                          \
	", 'timeout_ms', timeout_ms,"                                         \
	" 'created_at', extract(epoch FROM created_at)::bigint,"              \
	" 'updated_at', extract(epoch FROM updated_at)::bigint"
#define PLUGIN_PUBLIC(extra)                                                  \
	"(CASE WHEN auth_secret IS NULL THEN "                                \
	"json_build_object(" PLUGIN_FIELDS PLUGIN_TIMES extra                 \
	") ELSE json_build_object(" PLUGIN_FIELDS                             \
	", 'secret', 'set'" PLUGIN_TIMES extra ") END)"

/* $1 bot, $2 name, $3 url, $4 description, $5 parameters, $6 auth, $7
 * header, $8 secret (NULL for none), $9 timeout_ms, $10 the most plugins
 * a bot may have.  One row: whether the bot exists, and the stored
 * plugin (NULL if the bot has too many). */
static const char plugin_add_sql[] =
        "WITH b AS (SELECT id FROM bots WHERE id = $1),"
        " others AS (SELECT count(*) AS n FROM plugins"
        "  WHERE bot_id = $1 AND name <> $2),"
        " ins AS (INSERT INTO plugins (bot_id, name, url, description,"
        "  parameters, auth_kind, auth_header, auth_secret, timeout_ms)"
        "  SELECT b.id, $2, $3, $4, $5::jsonb, $6, $7, $8, $9::int"
        "  FROM b, others WHERE others.n < $10::int"
        "  ON CONFLICT (bot_id, name) DO UPDATE SET url = EXCLUDED.url,"
        "  description = EXCLUDED.description,"
        "  parameters = EXCLUDED.parameters,"
        "  auth_kind = EXCLUDED.auth_kind,"
        "  auth_header = EXCLUDED.auth_header,"
        "  auth_secret = EXCLUDED.auth_secret,"
        "  timeout_ms = EXCLUDED.timeout_ms, updated_at = now()"
        "  RETURNING " PLUGIN_PUBLIC(
                ", 'created', xmax = 0") "::text AS j)"
                                         " SELECT (SELECT count(*) FROM b), "
                                         "(SELECT j FROM ins)";

static const char plugin_list_sql[] =
        "SELECT (SELECT count(*) FROM bots WHERE id = $1),"
        " (SELECT coalesce(json_agg(" PLUGIN_PUBLIC(
                "") " ORDER BY name),"
                    " '[]'::json)::text FROM plugins WHERE bot_id = $1)";

static const char plugin_rm_sql[] =
        "WITH d AS (DELETE FROM plugins WHERE bot_id = $1 AND name = $2"
        " RETURNING name)"
        " SELECT (SELECT count(*) FROM bots WHERE id = $1),"
        " (SELECT count(*) FROM d)";

struct plugin_req {
	struct storage *st;
	enum storage_plugin_op op;
	struct msg_head head;
	char *reply_to;
	char bot_id[STORAGE_BOT_ID_MAX + 1];
	char name[STORAGE_PLUGIN_NAME_MAX + 1];
	char blob[];
};

static void
plugin_send(struct storage *st, const char *to, const struct msg_head *h,
            uint64_t status, const char *text)
{
	storage_admin_reply(st, to, h, status, text, strlen(text));
}

/* A refused statement: the data (class 22, 23) is the operator's to fix
 * (400; a bot removed meanwhile is 404), anything else is ours (500). */
static void
plugin_refused(struct plugin_req *a, const PGresult *res)
{
	struct storage *st = a->st;
	const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	char text[512];

	if (state != NULL && strcmp(state, "23503") == 0) {
		plugin_send(st, a->reply_to, &a->head, 404, "bot not found");
		return;
	}
	if (state != NULL &&
	    (strncmp(state, "22", 2) == 0 || strncmp(state, "23", 2) == 0)) {
		snprintf(text, sizeof(text), "refused by PostgreSQL: %s",
		         storage_pg_error(res));
		plugin_send(st, a->reply_to, &a->head, 400, text);
		return;
	}
	storage_count(st->m.err_pg);
	log_warnx("admin: plugin: %s", storage_pg_error(res));
	plugin_send(st, a->reply_to, &a->head, 500, storage_pg_error(res));
}

static void
plugin_done(void *arg, const PGresult *res)
{
	struct plugin_req *a = arg;
	struct storage *st = a->st;
	char text[256];
	int bot;

	st->nadmin--;
	/* The bot's cached copy carries its plugins; even a lost
	 * statement may have applied. */
	if (a->op != STORAGE_PLUGIN_LIST)
		storage_bots_invalidate(st, a->bot_id);
	if (res == NULL) {
		plugin_send(st, a->reply_to, &a->head, 503,
		            "storage unavailable: PostgreSQL did not answer");
		goto out;
	}
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		plugin_refused(a, res);
		goto out;
	}
	bot = PQntuples(res) == 1 && atoi(PQgetvalue(res, 0, 0)) > 0;
	if (!bot) {
		plugin_send(st, a->reply_to, &a->head, 404, "bot not found");
		goto out;
	}
	switch (a->op) {
	case STORAGE_PLUGIN_ADD:
		if (PQgetisnull(res, 0, 1)) {
			snprintf(text, sizeof(text),
			         "bot %s has %d plugins already: remove one "
			         "first",
			         a->bot_id, STORAGE_PLUGINS_PER_BOT);
			plugin_send(st, a->reply_to, &a->head, 409, text);
			break;
		}
		log_info("admin: plugin %s of bot %s stored", a->name,
		         a->bot_id);
		plugin_send(st, a->reply_to, &a->head, 0,
		            PQgetvalue(res, 0, 1));
		break;
	case STORAGE_PLUGIN_RM:
		if (atoi(PQgetvalue(res, 0, 1)) == 0) {
			plugin_send(st, a->reply_to, &a->head, 404,
			            "plugin not found");
			break;
		}
		log_info("admin: plugin %s of bot %s removed", a->name,
		         a->bot_id);
		plugin_send(st, a->reply_to, &a->head, 0,
		            "{\"removed\":true}");
		break;
	case STORAGE_PLUGIN_LIST:
	default:
		plugin_send(st, a->reply_to, &a->head, 0,
		            PQgetisnull(res, 0, 1) ? "[]"
		                                   : PQgetvalue(res, 0, 1));
		break;
	}
out:
	free(a);
	storage_stop_check(st);
}

void
storage_plugins_admin(struct storage *st, const struct msg *m,
                      const struct admin_request *b)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct storage_plugin_args args;
	struct plugin_req *a = NULL;
	enum storage_plugin_op op;
	const char *v[10], *sql;
	char *to, *json = NULL, err[256], timeout[24], most[24];
	int nparams;

	memset(&args, 0, sizeof(args));
	if ((to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender)) == NULL)
		return;
	if (mstr_eq(b->op, "plugin.add")) {
		op = STORAGE_PLUGIN_ADD;
		sql = plugin_add_sql;
		nparams = 10;
	} else if (mstr_eq(b->op, "plugin.list")) {
		op = STORAGE_PLUGIN_LIST;
		sql = plugin_list_sql;
		nparams = 1;
	} else if (mstr_eq(b->op, "plugin.rm")) {
		op = STORAGE_PLUGIN_RM;
		sql = plugin_rm_sql;
		nparams = 2;
	} else {
		snprintf(err, sizeof(err),
		         "unknown op \"%.*s\" (want plugin.add, plugin.list "
		         "or plugin.rm)",
		         (int)(b->op.n > 64 ? 64 : b->op.n), b->op.p);
		plugin_send(st, to, &h, 400, err);
		goto out;
	}
	if (st->svc.stopping) {
		plugin_send(st, to, &h, 503, "storage is stopping");
		goto out;
	}
	if (!storage_pg_accepting(st->reader)) {
		plugin_send(st, to, &h, 503,
		            "storage unavailable: PostgreSQL is down");
		goto out;
	}
	if ((json = mstr_dup(b->args)) == NULL) {
		plugin_send(st, to, &h, 500, "out of memory");
		goto out;
	}
	if (storage_text_plugin_args(json, b->args.n, op, &args, err,
	                             sizeof(err)) == -1) {
		plugin_send(st, to, &h, 400, err);
		goto out;
	}
	if ((a = calloc(1, sizeof(*a) + storage_head_size(m))) == NULL) {
		plugin_send(st, to, &h, 500, "out of memory");
		goto out;
	}
	a->st = st;
	a->op = op;
	(void)storage_head_copy(m, &a->head, &a->reply_to, a->blob, 1);
	snprintf(a->bot_id, sizeof(a->bot_id), "%s", args.bot_id);
	snprintf(a->name, sizeof(a->name), "%s",
	         args.name != NULL ? args.name : "");
	snprintf(timeout, sizeof(timeout), "%lld", (long long)args.timeout_ms);
	snprintf(most, sizeof(most), "%d", STORAGE_PLUGINS_PER_BOT);
	v[0] = args.bot_id;
	v[1] = args.name;
	v[2] = args.url;
	v[3] = args.description;
	v[4] = args.parameters;
	v[5] = args.auth;
	v[6] = args.header;
	v[7] = args.secret; /* NULL for auth none */
	v[8] = timeout;
	v[9] = most;
	st->nadmin++;
	if (storage_pg_query(st->reader, sql, nparams, v, plugin_done, a) ==
	    -1) {
		st->nadmin--;
		free(a);
		plugin_send(st, to, &h, 503,
		            "storage unavailable: PostgreSQL is down or "
		            "overloaded");
	}
out:
	storage_text_plugin_args_free(&args);
	free(json);
	free(to);
}
