/* SPDX-License-Identifier: ISC */
/*
 * storage_schema: the PostgreSQL schema as an ordered list of versioned
 * migrations, and the setup step that applies the missing ones whenever a
 * connection comes up (at start and after every reconnect).
 *
 * Callers: storage_pg.c runs storage_schema_setup() as the on_setup hook
 * of both connections.  Two storages (or the two connections of one)
 * never race: everything runs under a session advisory lock, and each
 * migration runs in its own transaction together with its row in
 * schema_migrations, so a crash leaves either all of it or none.  A
 * failure drops the connection, which also releases the lock, and the
 * connection is retried with back-off.
 *
 * Migrations are only ever appended, never edited: a database at version
 * N gets N+1.. on its next connection.  A database newer than this build
 * is used as it is (migrations only add), with a warning.
 *
 * DIAGNOSTICS: a failed migration warns with the server's message.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

/* "troupe" in ASCII: the advisory lock key of schema changes. */
#define SCHEMA_LOCK "127978506137701"

struct migration {
	int version;
	const char *what;
	const char *sql;
};

static const struct migration migrations[] = {
        {1, "bots and chats",
         "CREATE TABLE bots ("
         " id text PRIMARY KEY,"
         " upstream text NOT NULL,"
         " model text NOT NULL,"
         " system_prompt text NOT NULL,"
         " context_turns int NOT NULL,"
         " ttfe_ms int NOT NULL DEFAULT 30000,"
         " total_ms int NOT NULL DEFAULT 120000,"
         " created_at timestamptz DEFAULT now(),"
         " updated_at timestamptz DEFAULT now());"
         "CREATE TABLE chats ("
         " chat_id text PRIMARY KEY,"
         " conversation_id text NOT NULL,"
         " bot_id text NOT NULL,"
         " user_id text NOT NULL,"
         " query text NOT NULL,"
         " answer text NOT NULL,"
         " prompt_tokens int NOT NULL,"
         " completion_tokens int NOT NULL,"
         " created_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
         " seq bigserial);"
         "CREATE INDEX chats_conversation_idx"
         " ON chats (bot_id, conversation_id, seq);"},
        {2, "v3 chats, conversations, messages, api keys",
         /* Defaults keep every v1 row valid: a stored v1 chat is a
          * completed one. */
         "ALTER TABLE chats"
         " ADD COLUMN status text NOT NULL DEFAULT 'completed',"
         " ADD COLUMN route text NOT NULL DEFAULT 'v1.chat',"
         " ADD COLUMN completed_at timestamptz,"
         " ADD COLUMN last_error text;"
         "CREATE TABLE conversations ("
         " id text PRIMARY KEY,"
         " bot_id text NOT NULL,"
         " user_id text NOT NULL,"
         " created_at bigint NOT NULL);"
         "CREATE TABLE messages ("
         " id text PRIMARY KEY,"
         " chat_id text NOT NULL,"
         " conversation_id text NOT NULL,"
         " bot_id text NOT NULL,"
         " seq int NOT NULL,"
         " role text NOT NULL,"
         " type text NOT NULL,"
         " content text NOT NULL,"
         " content_type text NOT NULL,"
         " created_at bigint NOT NULL);"
         "CREATE INDEX messages_chat_idx ON messages (chat_id, seq);"
         "CREATE TABLE api_keys ("
         " id text PRIMARY KEY,"
         " hash text NOT NULL UNIQUE,"
         " name text NOT NULL,"
         " sub text NOT NULL,"
         " scopes text NOT NULL,"
         " created_at timestamptz NOT NULL DEFAULT now(),"
         " revoked_at timestamptz)"},
        {3, "plugins",
         /* A bot's plugins go with it.  auth_secret is NULL exactly
          * for auth none. */
         "CREATE TABLE plugins ("
         " bot_id text NOT NULL REFERENCES bots (id) ON DELETE CASCADE,"
         " name text NOT NULL,"
         " url text NOT NULL,"
         " description text NOT NULL DEFAULT '',"
         " parameters jsonb NOT NULL"
         "  DEFAULT '{\"type\":\"object\",\"properties\":{}}'"
         "  CHECK (jsonb_typeof(parameters) = 'object'),"
         " auth_kind text NOT NULL DEFAULT 'none'"
         "  CHECK (auth_kind IN ('none', 'token', 'hmac')),"
         " auth_header text NOT NULL DEFAULT 'Authorization',"
         " auth_secret text,"
         " timeout_ms int NOT NULL DEFAULT 5000"
         "  CHECK (timeout_ms BETWEEN 1 AND 600000),"
         " created_at timestamptz NOT NULL DEFAULT now(),"
         " updated_at timestamptz NOT NULL DEFAULT now(),"
         " PRIMARY KEY (bot_id, name),"
         " CHECK ((auth_kind = 'none') = (auth_secret IS NULL)))"},
};

/* Step 1: take the lock, make sure the ledger exists, read it. */
static const char schema_begin[] =
        "SELECT pg_advisory_lock(" SCHEMA_LOCK ");"
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version int PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now());"
        "SELECT coalesce(max(version), 0) FROM schema_migrations";

static const char schema_unlock[] =
        "SELECT pg_advisory_unlock(" SCHEMA_LOCK ")";

struct schema_run {
	struct storage *st;
	struct storage_pg *pg;
	int from, to;
	char *sql; /* step 2, kept alive while queued */
};

int
storage_schema_latest(void)
{
	return (migrations[nitems(migrations) - 1].version);
}

static void
schema_done(struct schema_run *run, int ok, int version)
{
	struct storage *st = run->st;

	if (ok) {
		st->schema_version = version;
		storage_gauge(st->m.schema_version, version);
	}
	storage_pg_setup_done(run->pg, ok);
	free(run->sql);
	free(run);
}

static int
schema_failed(struct schema_run *run, const PGresult *res, const char *step)
{
	if (res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK)
		return (0);
	if (res != NULL)
		log_warnx("postgres %s: schema %s: %s",
		          storage_pg_name(run->pg), step,
		          storage_pg_error(res));
	return (1);
}

static void
schema_applied(void *arg, const PGresult *res)
{
	struct schema_run *run = arg;

	if (schema_failed(run, res, "migration")) {
		schema_done(run, 0, 0);
		return;
	}
	if (run->to > run->from)
		log_info("postgres %s: schema migrated from v%d to v%d",
		         storage_pg_name(run->pg), run->from, run->to);
	schema_done(run, 1, run->to);
}

static void
schema_read(void *arg, const PGresult *res)
{
	struct schema_run *run = arg;
	struct buf b = {0};
	size_t i;
	int latest = storage_schema_latest();

	if (schema_failed(run, res, "ledger")) {
		schema_done(run, 0, 0);
		return;
	}
	run->from = atoi(PQgetvalue(res, 0, 0));
	run->to = run->from > latest ? run->from : latest;
	if (run->from > latest)
		log_warnx("postgres %s: schema v%d is newer than this build "
		          "(v%d); using it as it is",
		          storage_pg_name(run->pg), run->from, latest);
	for (i = 0; i < nitems(migrations); i++) {
		if (migrations[i].version <= run->from)
			continue;
		log_info("postgres %s: applying migration v%d (%s)",
		         storage_pg_name(run->pg), migrations[i].version,
		         migrations[i].what);
		if (buf_addf(
		            &b,
		            "BEGIN;%s;INSERT INTO schema_migrations "
		            "(version, applied_at) VALUES (%d, now());COMMIT;",
		            migrations[i].sql, migrations[i].version) == -1)
			goto oom;
	}
	if (buf_adds(&b, schema_unlock) == -1 || buf_add(&b, "", 1) == -1)
		goto oom;
	run->sql = b.b;
	if (storage_pg_setup_query(run->pg, run->sql, schema_applied, run) ==
	    -1) {
		schema_done(run, 0, 0);
		return;
	}
	return;
oom:
	buf_free(&b);
	log_warnx("%s: out of memory", __func__);
	schema_done(run, 0, 0);
}

void
storage_schema_setup(struct storage_pg *pg, void *arg)
{
	struct schema_run *run;

	if ((run = calloc(1, sizeof(*run))) == NULL) {
		storage_pg_setup_done(pg, 0);
		return;
	}
	run->st = arg;
	run->pg = pg;
	if (storage_pg_setup_query(pg, schema_begin, schema_read, run) == -1)
		schema_done(run, 0, 0);
}
