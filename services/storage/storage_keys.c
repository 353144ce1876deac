/* SPDX-License-Identifier: ISC */
/*
 * storage_keys: API keys (pat_...).  Only the hex SHA-256 of a key is
 * stored (api_keys.hash); troupectl generates the key, prints it once
 * and hands storage its hash.  KEY_CHECK (from auth) answers KEY_REPLY:
 * 200 with the key's sub and scopes, 401 if no such key or revoked, 503
 * if PostgreSQL cannot answer now (auth then answers 503, never a guess).
 * ADMIN_REQUEST ops key.add, key.list, key.revoke manage them; no answer
 * ever carries a hash back.
 *
 * Callers: storage_dispatch.c.  Statements run on the reader connection,
 * FIFO with the bot loads and admin ops.  Never blocks.
 *
 * DIAGNOSTICS: statement errors warn; added and revoked keys are logged
 * (their id, never their hash).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "storage.h"

#define KEY_HASH_LEN 64
#define KEY_ID_MAX 64
#define KEY_TEXT_MAX 256

static const char key_check_sql[] =
        "SELECT sub, scopes, revoked_at IS NULL FROM api_keys"
        " WHERE hash = $1";

static const char key_add_sql[] =
        "INSERT INTO api_keys (id, hash, name, sub, scopes)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING "
        "RETURNING json_build_object('id', id, 'name', name, 'sub', sub,"
        " 'scopes', scopes,"
        " 'created_at', extract(epoch FROM created_at)::bigint)::text";

static const char key_list_sql[] =
        "SELECT coalesce(json_agg(json_build_object('id', id, 'name', name,"
        " 'sub', sub, 'scopes', scopes,"
        " 'created_at', extract(epoch FROM created_at)::bigint,"
        " 'revoked_at', extract(epoch FROM revoked_at)::bigint)"
        " ORDER BY created_at, id), '[]'::json)::text FROM api_keys";

static const char key_revoke_sql[] =
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
        " WHERE id = $1 RETURNING json_build_object('id', id,"
        " 'revoked', true,"
        " 'revoked_at', extract(epoch FROM revoked_at)::bigint)::text";

/* KEY_CHECK */

struct key_req {
	struct storage *st;
	struct msg_head head;
	char *reply_to;
	char hash[KEY_HASH_LEN + 1];
	char blob[];
};

static void
key_send(struct storage *st, const char *to, const struct msg_head *h,
         struct mstr hash, uint64_t status, const char *sub,
         const char *scopes)
{
	struct key_reply r;

	storage_count(status == 200   ? st->m.key_valid
	              : status == 401 ? st->m.key_invalid
	                              : st->m.key_unavailable);
	memset(&r, 0, sizeof(r));
	r.hash = hash;
	r.status = status;
	r.sub = MSTR(sub);
	r.scopes = MSTR(scopes);
	if (to[0] == '\0')
		return;
	if (msg_send_key_reply(st->svc.ipc, to, h, &r) == -1) {
		storage_count(st->m.err_send);
		log_warnx("%s: KEY_REPLY to %s refused (backlog full)",
		          __func__, to);
	}
}

static int
key_hash_ok(struct mstr h)
{
	uint32_t i;

	if (h.n != KEY_HASH_LEN)
		return (0);
	for (i = 0; i < h.n; i++)
		if (!((h.p[i] >= '0' && h.p[i] <= '9') ||
		      (h.p[i] >= 'a' && h.p[i] <= 'f')))
			return (0);
	return (1);
}

static void
key_check_done(void *arg, const PGresult *res)
{
	struct key_req *k = arg;
	struct storage *st = k->st;
	struct mstr hash = MSTR(k->hash);

	st->nadmin--;
	if (res == NULL)
		key_send(st, k->reply_to, &k->head, hash, 503, "", "");
	else if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		storage_count(st->m.err_pg);
		log_warnx("key check: %s", storage_pg_error(res));
		key_send(st, k->reply_to, &k->head, hash, 503, "", "");
	} else if (PQntuples(res) < 1 || PQgetvalue(res, 0, 2)[0] != 't')
		key_send(st, k->reply_to, &k->head, hash, 401, "", "");
	else
		key_send(st, k->reply_to, &k->head, hash, 200,
		         PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
	free(k);
	storage_stop_check(st);
}

void
storage_keys_check(struct storage *st, const struct msg *m,
                   const struct key_check *b)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct key_req *k;
	const char *values[1];
	char *to;

	if ((to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender)) == NULL)
		return;
	if (!key_hash_ok(b->hash)) {
		/* Not a hash we could have stored: no such key. */
		key_send(st, to, &h, b->hash, 401, "", "");
		goto out;
	}
	if (st->svc.stopping || !storage_pg_accepting(st->reader)) {
		key_send(st, to, &h, b->hash, 503, "", "");
		goto out;
	}
	if ((k = calloc(1, sizeof(*k) + storage_head_size(m))) == NULL) {
		key_send(st, to, &h, b->hash, 503, "", "");
		goto out;
	}
	k->st = st;
	(void)storage_head_copy(m, &k->head, &k->reply_to, k->blob, 1);
	memcpy(k->hash, b->hash.p, KEY_HASH_LEN);
	values[0] = k->hash;
	st->nadmin++;
	if (storage_pg_query(st->reader, key_check_sql, 1, values,
	                     key_check_done, k) == -1) {
		st->nadmin--;
		key_send(st, to, &h, b->hash, 503, "", "");
		free(k);
	}
out:
	free(to);
}

/* Admin ops */

enum key_op { KEY_ADD, KEY_LIST, KEY_REVOKE };

struct key_admin {
	struct storage *st;
	enum key_op op;
	struct msg_head head;
	char *reply_to;
	char id[KEY_ID_MAX + 1];
	char blob[];
};

static void
admin_send(struct storage *st, const char *to, const struct msg_head *h,
           uint64_t status, const char *text)
{
	storage_admin_reply(st, to, h, status, text, strlen(text));
}

static void
key_admin_done(void *arg, const PGresult *res)
{
	struct key_admin *a = arg;
	struct storage *st = a->st;

	st->nadmin--;
	if (res == NULL)
		admin_send(st, a->reply_to, &a->head, 503,
		           "storage unavailable: PostgreSQL did not answer");
	else if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		storage_count(st->m.err_pg);
		log_warnx("admin: %s", storage_pg_error(res));
		admin_send(st, a->reply_to, &a->head, 500,
		           storage_pg_error(res));
	} else if (PQntuples(res) < 1)
		admin_send(st, a->reply_to, &a->head,
		           a->op == KEY_ADD ? 409 : 404,
		           a->op == KEY_ADD
		                   ? "a key with this id or hash exists"
		                   : "key not found");
	else {
		if (a->op == KEY_ADD)
			log_info("admin: key %s added", a->id);
		else if (a->op == KEY_REVOKE)
			log_info("admin: key %s revoked", a->id);
		admin_send(st, a->reply_to, &a->head, 0,
		           PQgetvalue(res, 0, 0));
	}
	free(a);
	storage_stop_check(st);
}

static int
key_id_ok(const char *s)
{
	size_t i, n = strlen(s);

	if (n == 0 || n > KEY_ID_MAX)
		return (0);
	for (i = 0; i < n; i++)
		if (!((s[i] >= '0' && s[i] <= '9') ||
		      (s[i] >= 'a' && s[i] <= 'z') ||
		      (s[i] >= 'A' && s[i] <= 'Z') || s[i] == '-' ||
		      s[i] == '_'))
			return (0);
	return (1);
}

/* A comma list of chat, read and *, each at most once. */
static int
key_scopes_ok(const char *s)
{
	const char *p = s, *e;
	size_t n;
	int seen = 0, bit;

	if (*s == '\0')
		return (0);
	for (;;) {
		e = strchr(p, ',');
		n = e ? (size_t)(e - p) : strlen(p);
		if (n == 4 && memcmp(p, "chat", 4) == 0)
			bit = 1;
		else if (n == 4 && memcmp(p, "read", 4) == 0)
			bit = 2;
		else if (n == 1 && *p == '*')
			bit = 4;
		else
			return (0);
		if (seen & bit)
			return (0);
		seen |= bit;
		if (e == NULL)
			return (1);
		p = e + 1;
	}
}

/*
 * Parse key.* arguments: {id} for revoke; {id, hash, name?, sub?,
 * scopes?} for add.  Unknown fields are refused.  Strings point into
 * json.  -1 with err set.
 */
static int
key_args(cJSON *json, enum key_op op, const char **v, char *err, size_t len)
{
	static const char *const names[] = {"id", "hash", "name", "sub",
	                                    "scopes"};
	const cJSON *it;
	size_t i, nf = op == KEY_ADD ? 5 : 1;

	if (!cJSON_IsObject(json)) {
		snprintf(err, len, "arguments must be a JSON object");
		return (-1);
	}
	cJSON_ArrayForEach(it, json)
	{
		for (i = 0; i < nf; i++)
			if (it->string && strcmp(it->string, names[i]) == 0)
				break;
		if (i == nf) {
			snprintf(err, len, "unknown field \"%.64s\"",
			         it->string ? it->string : "");
			return (-1);
		}
		if (!cJSON_IsString(it) ||
		    strlen(it->valuestring) > KEY_TEXT_MAX ||
		    !storage_text_utf8_ok(it->valuestring,
		                          strlen(it->valuestring))) {
			snprintf(err, len,
			         "\"%s\" must be a string of at most %d bytes",
			         names[i], KEY_TEXT_MAX);
			return (-1);
		}
		if (v[i] != NULL) {
			snprintf(err, len, "\"%s\" given twice", names[i]);
			return (-1);
		}
		v[i] = it->valuestring;
	}
	if (v[0] == NULL || !key_id_ok(v[0])) {
		snprintf(err, len,
		         "\"id\" must be 1..%d letters, digits, - or _",
		         KEY_ID_MAX);
		return (-1);
	}
	if (op != KEY_ADD)
		return (0);
	if (v[1] == NULL || !key_hash_ok(MSTR(v[1]))) {
		snprintf(err, len,
		         "\"hash\" must be the key's SHA-256 in lower-case "
		         "hex");
		return (-1);
	}
	if (v[2] == NULL)
		v[2] = "";
	if (v[3] == NULL || v[3][0] == '\0')
		v[3] = v[0]; /* the key stands for itself */
	if (v[4] == NULL)
		v[4] = "chat,read";
	if (!key_scopes_ok(v[4])) {
		snprintf(err, len,
		         "\"scopes\" must be a comma list of chat, read, *");
		return (-1);
	}
	return (0);
}

void
storage_keys_admin(struct storage *st, const struct msg *m,
                   const struct admin_request *b)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct key_admin *a = NULL;
	cJSON *json = NULL;
	const char *v[5] = {NULL, NULL, NULL, NULL, NULL}, *sql;
	char *to, *text = NULL, err[256];
	enum key_op op;
	int nparams = 0;

	if ((to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender)) == NULL)
		return;
	if (mstr_eq(b->op, "key.add"))
		op = KEY_ADD;
	else if (mstr_eq(b->op, "key.list"))
		op = KEY_LIST;
	else if (mstr_eq(b->op, "key.revoke"))
		op = KEY_REVOKE;
	else {
		snprintf(err, sizeof(err),
		         "unknown op \"%.*s\" (want key.add, key.list or "
		         "key.revoke)",
		         (int)(b->op.n > 64 ? 64 : b->op.n), b->op.p);
		admin_send(st, to, &h, 400, err);
		goto out;
	}
	if (st->svc.stopping) {
		admin_send(st, to, &h, 503, "storage is stopping");
		goto out;
	}
	if (!storage_pg_accepting(st->reader)) {
		admin_send(st, to, &h, 503,
		           "storage unavailable: PostgreSQL is down");
		goto out;
	}
	if (op != KEY_LIST) {
		if ((text = mstr_dup(b->args)) == NULL) {
			admin_send(st, to, &h, 500, "out of memory");
			goto out;
		}
		json = cJSON_Parse(text);
		if (key_args(json, op, v, err, sizeof(err)) == -1) {
			admin_send(st, to, &h, 400, err);
			goto out;
		}
	}
	if ((a = calloc(1, sizeof(*a) + storage_head_size(m))) == NULL) {
		admin_send(st, to, &h, 500, "out of memory");
		goto out;
	}
	a->st = st;
	a->op = op;
	(void)storage_head_copy(m, &a->head, &a->reply_to, a->blob, 1);
	if (v[0] != NULL)
		snprintf(a->id, sizeof(a->id), "%s", v[0]);
	switch (op) {
	case KEY_ADD:
		sql = key_add_sql;
		nparams = 5;
		break;
	case KEY_REVOKE:
		sql = key_revoke_sql;
		nparams = 1;
		break;
	case KEY_LIST:
	default:
		sql = key_list_sql;
		break;
	}
	st->nadmin++;
	if (storage_pg_query(st->reader, sql, nparams, v, key_admin_done, a) ==
	    -1) {
		st->nadmin--;
		free(a);
		admin_send(st, to, &h, 503,
		           "storage unavailable: PostgreSQL is down or "
		           "overloaded");
	}
out:
	cJSON_Delete(json);
	free(text);
	free(to);
}
