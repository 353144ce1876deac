/* SPDX-License-Identifier: ISC */
/*
 * storage_bots: the bot cache in front of PostgreSQL's bots table (each
 * entry holds the bot and its plugins, read in one statement), and the
 * bot administration ops troupectl sends (bot.add, bot.list, bot.rm).
 *
 * Callers: storage_ctx.c asks for the bot of every CTX_GET;
 * storage_dispatch.c hands over ADMIN_REQUESTs; storage_plugins.c
 * invalidates a bot whose plugins changed.
 *
 * Cache: a hash table of entries by bot id, each holding an immutable,
 * reference-counted snapshot (or "absent"), fresh for [storage]
 * bot_cache_ms.  A stale or unknown entry is loaded on the reader
 * connection; requests for the same bot meanwhile wait on that one load.
 * When PostgreSQL cannot answer, a stale snapshot is served (degraded
 * mode, PRODUCT.md §6 L2); without one the request gets 503.  Admin
 * changes made here invalidate the entry at once; changes made by another
 * storage are seen within bot_cache_ms.  The table is bounded by
 * [storage] bot_cache_max: idle entries are evicted first.
 *
 * Admin ops run on the reader connection and answer ADMIN_REPLY with
 * status 0 and JSON text, or an HTTP-like status and an error text.
 * It must never answer a bot from a load that started before an admin
 * change made here finished (a generation counter per entry guards it).
 *
 * DIAGNOSTICS: failed loads and admin statements warn.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

#define BOTS_TAB_MIN 1024

struct storage_bot_entry {
	struct storage_bot_entry *next; /* hash chain */
	uint64_t hash;
	struct storage_bot *bot; /* NULL: absent (when known) */
	int known;
	int loading;
	unsigned gen; /* bumped by every invalidation */
	uint64_t loaded_ms;
	struct storage_ctx_reqs waiters;
	char id[];
};

struct bot_load {
	struct storage *st;
	struct storage_bot_entry *e;
	unsigned gen;
};

/* The bot and its plugins (secrets included: CTX_REPLY needs them) in
 * one statement, so both come from one snapshot. */
static const char bot_load_sql[] =
        "SELECT upstream, model, system_prompt, context_turns, ttfe_ms,"
        " total_ms, (SELECT coalesce(json_agg(json_build_object("
        "'name', p.name, 'url', p.url, 'description', p.description,"
        " 'parameters', p.parameters, 'auth', p.auth_kind,"
        " 'header', p.auth_header, 'secret', coalesce(p.auth_secret, ''),"
        " 'timeout_ms', p.timeout_ms) ORDER BY p.name), '[]'::json)::text"
        " FROM plugins p WHERE p.bot_id = bots.id)"
        " FROM bots WHERE id = $1";

static uint64_t
bots_hash(const char *p, size_t n)
{
	uint64_t h = 14695981039346656037ULL;

	while (n-- > 0) {
		h ^= (unsigned char)*p++;
		h *= 1099511628211ULL;
	}
	return (h);
}

void
storage_bot_ref(struct storage_bot *b)
{
	b->refs++;
}

void
storage_bot_unref(struct storage_bot *b)
{
	if (b != NULL && --b->refs == 0)
		free(b);
}

/* One allocation: the struct, then the five strings. */
static struct storage_bot *
bot_new(const char *id, const char *upstream, const char *model,
        const char *prompt, uint64_t turns, uint64_t ttfe_ms,
        uint64_t total_ms, const char *plugins)
{
	size_t li = strlen(id) + 1, lu = strlen(upstream) + 1,
	       lm = strlen(model) + 1, lp = strlen(prompt) + 1,
	       lg = strlen(plugins) + 1;
	struct storage_bot *b;
	char *p;

	if ((b = malloc(sizeof(*b) + li + lu + lm + lp + lg)) == NULL)
		return (NULL);
	b->refs = 1;
	b->context_turns = turns;
	b->ttfe_ms = ttfe_ms;
	b->total_ms = total_ms;
	p = (char *)(b + 1);
	b->id = memcpy(p, id, li);
	b->upstream = memcpy(p += li, upstream, lu);
	b->model = memcpy(p += lu, model, lm);
	b->system_prompt = memcpy(p += lm, prompt, lp);
	b->plugins = memcpy(p + lp, plugins, lg);
	b->plugins_len = lg - 1;
	return (b);
}

static struct storage_bot_entry *
bots_find(struct storage *st, const char *id, size_t n, uint64_t h)
{
	struct storage_bot_entry *e;

	if (st->bot_tab == NULL)
		return (NULL);
	for (e = st->bot_tab[h & (st->bot_tabsize - 1)]; e; e = e->next)
		if (e->hash == h && strncmp(e->id, id, n) == 0 &&
		    e->id[n] == '\0')
			return (e);
	return (NULL);
}

static void
bots_remove(struct storage *st, struct storage_bot_entry *e)
{
	struct storage_bot_entry **pp;

	for (pp = &st->bot_tab[e->hash & (st->bot_tabsize - 1)]; *pp;
	     pp = &(*pp)->next) {
		if (*pp == e) {
			*pp = e->next;
			break;
		}
	}
	st->bot_count--;
	storage_bot_unref(e->bot);
	free(e);
}

/* Make room: drop idle entries (stale or absent first, then any). */
static void
bots_evict(struct storage *st)
{
	struct storage_bot_entry *e, *next;
	uint64_t now = loop_now(st->svc.loop);
	size_t i;
	int pass;

	for (pass = 0; pass < 2; pass++) {
		for (i = 0; i < st->bot_tabsize; i++) {
			for (e = st->bot_tab[i]; e; e = next) {
				next = e->next;
				if (e->loading || !TAILQ_EMPTY(&e->waiters))
					continue;
				if (pass == 0 && e->known && e->bot &&
				    now - e->loaded_ms <
				            (uint64_t)st->conf.bot_cache_ms)
					continue;
				bots_remove(st, e);
			}
		}
		if (st->bot_count < (size_t)st->conf.bot_cache_max)
			return;
	}
}

static struct storage_bot_entry *
bots_insert(struct storage *st, const char *id, size_t n, uint64_t h)
{
	struct storage_bot_entry *e;
	size_t b;

	if (st->bot_tab == NULL) {
		st->bot_tabsize = BOTS_TAB_MIN;
		if ((st->bot_tab = calloc(st->bot_tabsize,
		                          sizeof(*st->bot_tab))) == NULL)
			return (NULL);
	}
	if (st->bot_count >= (size_t)st->conf.bot_cache_max)
		bots_evict(st);
	if ((e = calloc(1, sizeof(*e) + n + 1)) == NULL)
		return (NULL);
	memcpy(e->id, id, n);
	e->hash = h;
	TAILQ_INIT(&e->waiters);
	b = h & (st->bot_tabsize - 1);
	e->next = st->bot_tab[b];
	st->bot_tab[b] = e;
	st->bot_count++;
	return (e);
}

/* Answer req from what the entry holds (fresh or stale). */
static void
bots_serve(struct storage_bot_entry *e, struct storage_ctx_req *req)
{
	if (!e->known)
		storage_ctx_have_bot(req, NULL, STORAGE_BOT_UNAVAILABLE);
	else if (e->bot == NULL)
		storage_ctx_have_bot(req, NULL, STORAGE_BOT_ABSENT);
	else
		storage_ctx_have_bot(req, e->bot, STORAGE_BOT_FOUND);
}

static void
bots_loaded(void *arg, const PGresult *res)
{
	struct bot_load *ld = arg;
	struct storage *st = ld->st;
	struct storage_bot_entry *e = ld->e;
	struct storage_ctx_reqs waiters = TAILQ_HEAD_INITIALIZER(waiters);
	struct storage_ctx_req *req;
	struct storage_bot *b = NULL;
	int ok = 0;

	e->loading = 0;
	while ((req = TAILQ_FIRST(&e->waiters)) != NULL) {
		TAILQ_REMOVE(&e->waiters, req, entry);
		TAILQ_INSERT_TAIL(&waiters, req, entry);
	}
	if (res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK) {
		ok = 1;
		if (PQntuples(res) >= 1) {
			uint64_t turns =
			        strtoull(PQgetvalue(res, 0, 3), NULL, 10);
			if (turns > 1000)
				turns = 1000;
			if ((b = bot_new(
			             e->id, PQgetvalue(res, 0, 0),
			             PQgetvalue(res, 0, 1),
			             PQgetvalue(res, 0, 2), turns,
			             strtoull(PQgetvalue(res, 0, 4), NULL, 10),
			             strtoull(PQgetvalue(res, 0, 5), NULL, 10),
			             PQgetisnull(res, 0, 6)
			                     ? "[]"
			                     : PQgetvalue(res, 0, 6))) == NULL)
				ok = 0;
		}
	} else if (res != NULL) {
		storage_count(st->m.err_pg);
		log_warnx("bot %s: load: %s", e->id, storage_pg_error(res));
	}
	if (ok && ld->gen == e->gen) {
		storage_bot_unref(e->bot);
		e->bot = b; /* the cache's reference */
		b = NULL;
		e->known = 1;
		e->loaded_ms = loop_now(st->svc.loop);
	}
	while ((req = TAILQ_FIRST(&waiters)) != NULL) {
		TAILQ_REMOVE(&waiters, req, entry);
		if (ok && b != NULL)
			/* Changed meanwhile: this answer is not cached. */
			storage_ctx_have_bot(req, b, STORAGE_BOT_FOUND);
		else if (ok && ld->gen != e->gen)
			storage_ctx_have_bot(req, NULL, STORAGE_BOT_ABSENT);
		else {
			if (!ok && e->known)
				storage_count(st->m.bot_stale);
			bots_serve(e, req);
		}
	}
	storage_bot_unref(b);
	free(ld);
}

void
storage_bots_get(struct storage *st, struct storage_ctx_req *req)
{
	struct storage_bot_entry *e;
	struct bot_load *ld;
	const char *id = req->bot_id.p;
	size_t n = req->bot_id.n;
	uint64_t h, now = loop_now(st->svc.loop);
	const char *values[1];

	/* An id bot.add would refuse cannot name a bot: no cache entry,
	 * no query. */
	if (!storage_text_bot_id_ok(id, n)) {
		storage_ctx_have_bot(req, NULL, STORAGE_BOT_ABSENT);
		return;
	}
	h = bots_hash(id, n);
	e = bots_find(st, id, n, h);
	if (e != NULL && e->known &&
	    now - e->loaded_ms < (uint64_t)st->conf.bot_cache_ms) {
		storage_count(st->m.bot_hit);
		bots_serve(e, req);
		return;
	}
	if (e == NULL && (e = bots_insert(st, id, n, h)) == NULL) {
		storage_ctx_have_bot(req, NULL, STORAGE_BOT_UNAVAILABLE);
		return;
	}
	if (e->loading) {
		TAILQ_INSERT_TAIL(&e->waiters, req, entry);
		return;
	}
	if ((ld = malloc(sizeof(*ld))) == NULL)
		goto stale;
	ld->st = st;
	ld->e = e;
	ld->gen = e->gen;
	values[0] = e->id;
	if (storage_pg_query(st->reader, bot_load_sql, 1, values, bots_loaded,
	                     ld) == -1) {
		free(ld);
		goto stale;
	}
	storage_count(st->m.bot_load);
	e->loading = 1;
	TAILQ_INSERT_TAIL(&e->waiters, req, entry);
	return;
stale:
	if (e->known)
		storage_count(st->m.bot_stale);
	bots_serve(e, req);
}

void
storage_bots_invalidate(struct storage *st, const char *id)
{
	size_t n = strlen(id);
	struct storage_bot_entry *e;

	if ((e = bots_find(st, id, n, bots_hash(id, n))) == NULL)
		return;
	e->gen++;
	e->known = 0;
	storage_bot_unref(e->bot);
	e->bot = NULL;
}

size_t
storage_bots_count(const struct storage *st)
{
	return (st->bot_count);
}

/* Admin ops. */

enum admin_op { ADMIN_ADD, ADMIN_LIST, ADMIN_RM };

struct admin_req {
	struct storage *st;
	enum admin_op op;
	struct msg_head head;
	char *reply_to;
	char *id; /* bot.add, bot.rm: to invalidate */
	char blob[];
};

static const char admin_add_sql[] =
        "INSERT INTO bots (id, upstream, model, system_prompt, context_turns,"
        " ttfe_ms, total_ms) VALUES ($1, $2,"
        " coalesce($3, 'sim-1'),"
        " coalesce($4, 'You are a helpful assistant.'),"
        " coalesce($5::int, 10), coalesce($6::int, 30000),"
        " coalesce($7::int, 120000)) "
        "ON CONFLICT (id) DO UPDATE SET upstream = EXCLUDED.upstream,"
        " model = coalesce($3, bots.model),"
        " system_prompt = coalesce($4, bots.system_prompt),"
        " context_turns = coalesce($5::int, bots.context_turns),"
        " ttfe_ms = coalesce($6::int, bots.ttfe_ms),"
        " total_ms = coalesce($7::int, bots.total_ms),"
        " updated_at = now() "
        "RETURNING json_build_object('id', id, 'upstream', upstream,"
        " 'model', model, 'system_prompt', system_prompt,"
        " 'context_turns', context_turns, 'ttfe_ms', ttfe_ms,"
        " 'total_ms', total_ms, 'created', xmax = 0)::text";

static const char admin_list_sql[] =
        "SELECT coalesce(json_agg(json_build_object('id', id,"
        " 'upstream', upstream, 'model', model,"
        " 'system_prompt', system_prompt, 'context_turns', context_turns,"
        " 'ttfe_ms', ttfe_ms, 'total_ms', total_ms,"
        " 'created_at', created_at, 'updated_at', updated_at)"
        " ORDER BY id), '[]'::json)::text FROM bots";

static const char admin_rm_sql[] =
        "DELETE FROM bots WHERE id = $1 RETURNING id";

void
storage_admin_reply(struct storage *st, const char *to,
                    const struct msg_head *h, uint64_t status,
                    const char *text, size_t n)
{
	struct admin_reply r;

	r.status = status;
	r.text = (struct mstr){text, (uint32_t)n};
	if (status == 0)
		storage_count(st->m.admin_ok);
	else
		storage_count(st->m.admin_failed);
	if (to[0] == '\0')
		return;
	if (msg_send_admin_reply(st->svc.ipc, to, h, &r) == -1) {
		storage_count(st->m.err_send);
		log_warnx("%s: ADMIN_REPLY to %s refused (backlog full)",
		          __func__, to);
	}
	storage_stop_check(st);
}

static void
admin_done(void *arg, const PGresult *res)
{
	struct admin_req *a = arg;
	struct storage *st = a->st;
	const char *text;

	st->nadmin--;
	/* Even a lost statement may have applied: forget the copy. */
	if (a->id != NULL)
		storage_bots_invalidate(st, a->id);
	if (res == NULL) {
		text = "storage unavailable: PostgreSQL did not answer";
		storage_admin_reply(st, a->reply_to, &a->head, 503, text, strlen(text));
	} else if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		storage_count(st->m.err_pg);
		text = storage_pg_error(res);
		log_warnx("admin: %s", text);
		storage_admin_reply(st, a->reply_to, &a->head, 500, text, strlen(text));
	} else if (a->op == ADMIN_RM) {
		if (PQntuples(res) == 0) {
			text = "bot not found";
			storage_admin_reply(st, a->reply_to, &a->head, 404, text,
			           strlen(text));
		} else {
			log_info("admin: bot %s removed", a->id);
			text = "{\"removed\":true}";
			storage_admin_reply(st, a->reply_to, &a->head, 0, text,
			           strlen(text));
		}
	} else {
		if (a->op == ADMIN_ADD)
			log_info("admin: bot %s stored", a->id);
		text = PQntuples(res) > 0 ? PQgetvalue(res, 0, 0) : "null";
		storage_admin_reply(st, a->reply_to, &a->head, 0, text, strlen(text));
	}
	free(a->id);
	free(a);
}

void
storage_bots_admin_bad(struct storage *st, const struct msg *m)
{
	struct msg_head h = msg_head_reply(m, NULL);
	const char *text = "undecodable ADMIN_REQUEST";
	char *to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender);

	if (to != NULL)
		storage_admin_reply(st, to, &h, 400, text, strlen(text));
	free(to);
}

void
storage_bots_admin(struct storage *st, const struct msg *m,
                   const struct admin_request *b)
{
	struct storage_bot_args args;
	struct admin_req *a = NULL;
	struct msg_head h = msg_head_reply(m, NULL);
	char *to = NULL, *json = NULL, err[256], turns[24], ttfe[24],
	     total[24];
	const char *values[7], *sql;
	int nparams = 0;
	size_t sz;

	memset(&args, 0, sizeof(args));
	err[0] = '\0';
	if ((to = mstr_dup(m->reply_to.n ? m->reply_to : m->sender)) == NULL ||
	    (json = mstr_dup(b->args)) == NULL) {
		snprintf(err, sizeof(err), "out of memory");
		goto fail500;
	}
	if (st->svc.stopping) {
		snprintf(err, sizeof(err), "storage is stopping");
		goto fail503;
	}
	if (!storage_pg_accepting(st->reader)) {
		snprintf(err, sizeof(err),
		         "storage unavailable: PostgreSQL "
		         "is down");
		goto fail503;
	}
	sz = sizeof(*a) + storage_head_size(m);
	if ((a = calloc(1, sz)) == NULL) {
		snprintf(err, sizeof(err), "out of memory");
		goto fail500;
	}
	a->st = st;
	(void)storage_head_copy(m, &a->head, &a->reply_to, a->blob, 1);
	if (mstr_eq(b->op, "bot.add")) {
		a->op = ADMIN_ADD;
		if (storage_text_bot_args(json, b->args.n, 1, &args, err,
		                          sizeof(err)) == -1)
			goto fail400;
		values[0] = args.id;
		values[1] = args.upstream;
		values[2] = args.model;
		values[3] = args.system_prompt;
		values[4] = values[5] = values[6] = NULL;
		if (args.context_turns >= 0) {
			snprintf(turns, sizeof(turns), "%lld",
			         (long long)args.context_turns);
			values[4] = turns;
		}
		if (args.ttfe_ms >= 0) {
			snprintf(ttfe, sizeof(ttfe), "%lld",
			         (long long)args.ttfe_ms);
			values[5] = ttfe;
		}
		if (args.total_ms >= 0) {
			snprintf(total, sizeof(total), "%lld",
			         (long long)args.total_ms);
			values[6] = total;
		}
		nparams = 7;
		sql = admin_add_sql;
	} else if (mstr_eq(b->op, "bot.rm")) {
		a->op = ADMIN_RM;
		if (storage_text_bot_args(json, b->args.n, 0, &args, err,
		                          sizeof(err)) == -1)
			goto fail400;
		values[0] = args.id;
		nparams = 1;
		sql = admin_rm_sql;
	} else if (mstr_eq(b->op, "bot.list")) {
		a->op = ADMIN_LIST;
		sql = admin_list_sql;
	} else {
		snprintf(err, sizeof(err),
		         "unknown op \"%.*s\" (want bot.add, bot.list, "
		         "bot.rm, plugin.add, plugin.list, plugin.rm, "
		         "key.add, key.list or key.revoke)",
		         (int)(b->op.n > 64 ? 64 : b->op.n), b->op.p);
		goto fail400;
	}
	if (args.id != NULL && (a->id = strdup(args.id)) == NULL) {
		snprintf(err, sizeof(err), "out of memory");
		goto fail500;
	}
	if (storage_pg_query(st->reader, sql, nparams, values, admin_done,
	                     a) == -1) {
		snprintf(err, sizeof(err),
		         "storage unavailable: PostgreSQL "
		         "is down or overloaded");
		goto fail503;
	}
	st->nadmin++;
	storage_text_bot_args_free(&args);
	free(json);
	free(to);
	return;

fail400:
	storage_admin_reply(st, to, &h, 400, err, strlen(err));
	goto out;
fail503:
	storage_admin_reply(st, to ? to : "", &h, 503, err, strlen(err));
	goto out;
fail500:
	log_warnx("%s: %s", __func__, err);
	storage_admin_reply(st, to ? to : "", &h, 500, err, strlen(err));
out:
	storage_text_bot_args_free(&args);
	if (a != NULL)
		free(a->id);
	free(a);
	free(json);
	free(to);
}
