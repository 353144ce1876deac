/* SPDX-License-Identifier: ISC */
/*
 * Unit tests of services/worker/worker_run.c, which this file includes
 * (h2o's t/00unit style): chat and conversation ids, the reply JSON, and
 * the run state machine driven by hand-made envelopes.  ipc_send() is
 * replaced by a recorder (common's ipc.o is then never linked), so every
 * envelope the worker sends is decoded and checked; the upstream is
 * fake_upstream.h on a real loop, on 127.0.0.1.
 */
#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "fake_upstream.h"
#include "mpk.h"
#include "t.h"
#include "worker_run.c"

/* --- what worker.c would provide --- */

static int stop_checks;
static uint64_t last_status_counted;

void
worker_count_status(struct worker *w, uint64_t status)
{
	(void)w;
	last_status_counted = status;
}

void
worker_stop_check(struct worker *w)
{
	(void)w;
	stop_checks++;
}

int
worker_warn_ok(struct worker *w)
{
	(void)w;
	return (0);
}

void
worker_note_edge(struct worker *w, const char *edge)
{
	(void)w;
	(void)edge;
}

/* --- the ipc recorder --- */

struct sent {
	char peer[64];
	uint16_t type;
	char reqid[64];
	char reply_to[64];
	char tp[80];
	uint64_t deadline_ms;
	struct buf body;
};

static struct sent sent[512];
static int nsent;
static const char *refuse_peer; /* ipc_send to it returns -1 */

static void
cstr(char *out, size_t n, struct mstr s)
{
	snprintf(out, n, "%.*s", (int)s.n, s.p);
}

int
ipc_send(struct ipc *ipc, const char *peer, uint16_t type,
         const struct msg_head *h, ipc_pack_fn fn, const void *body)
{
	msgpack_packer pk;
	struct sent *s;

	(void)ipc;
	if (refuse_peer != NULL && strcmp(peer, refuse_peer) == 0)
		return (-1);
	if (nsent == (int)nitems(sent))
		return (-1);
	s = &sent[nsent++];
	snprintf(s->peer, sizeof(s->peer), "%s", peer);
	s->type = type;
	cstr(s->reqid, sizeof(s->reqid), h->reqid);
	cstr(s->reply_to, sizeof(s->reply_to), h->reply_to);
	cstr(s->tp, sizeof(s->tp), h->traceparent);
	s->deadline_ms = h->deadline_ms;
	memset(&s->body, 0, sizeof(s->body));
	mpk_packer_init(&pk, &s->body);
	return (fn(&pk, body) == 0 ? 0 : -1);
}

/* --- the harness --- */

#define TP "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

static struct worker w;
static struct fake_srv srv;
static struct buf inbody;

static void
setup(void)
{
	struct upstream_conf c = {.connections = 8,
	                          .max_body = 65536,
	                          .connect_timeout_ms = 2000};

	for (int i = 0; i < nsent; i++)
		buf_free(&sent[i].body);
	nsent = 0;
	refuse_peer = NULL;
	stop_checks = 0;
	memset(&w, 0, sizeof(w));
	w.svc.name = "worker-3";
	w.svc.ipc = NULL; /* the recorder ignores it */
	w.slot = 3;
	w.run_timeout_ms = 30000;
	if ((w.svc.loop = loop_new()) == NULL)
		T_FAIL("loop_new");
	if (fake_start(&srv, w.svc.loop) == -1)
		T_FAIL("fake server");
	if ((w.up = worker_upstream_new(w.svc.loop, &c)) == NULL)
		T_FAIL("upstream");
	T_EQ_INT(worker_run_init(&w), 0);
}

static void
teardown(void)
{
	worker_run_free_all(&w);
	worker_upstream_free(w.up);
	fake_stop(&srv);
	loop_free(w.svc.loop);
	buf_free(&inbody);
}

static struct msg
envelope(uint16_t type, const char *sender, const char *reqid,
         const char *reply_to, uint64_t deadline_ms, ipc_pack_fn fn,
         const void *body)
{
	struct msg m = {0};
	msgpack_packer pk;

	buf_reset(&inbody);
	mpk_packer_init(&pk, &inbody);
	if (fn(&pk, body) != 0)
		T_FAIL("pack");
	m.version = 1;
	m.type = type;
	m.sender = MSTR(sender);
	m.reqid = MSTR(reqid);
	m.traceparent = MSTR(TP);
	m.deadline_ms = deadline_ms;
	m.reply_to = MSTR(reply_to);
	m.body = inbody.b;
	m.body_len = inbody.len;
	return (m);
}

/* worker_dispatch.c is not linked here: decode as it does. */
static int
worker_dispatch_dispatcher_stub(const struct msg *m)
{
	struct chat_request q;

	if (chat_request_unpack(m, &q) == -1)
		return (-1);
	worker_run_assign(&w, m, &q);
	return (0);
}

static void
assign(const char *reqid, const char *history_id, uint64_t deadline_ms)
{
	struct chat_request q = {.route = MSTR("v1.chat"),
	                         .token = MSTR_NULL,
	                         .sub = MSTR("u1"),
	                         .bot_id = MSTR("bot7"),
	                         .user_id = MSTR("u1"),
	                         .query = MSTR("what is \"2+2\"?"),
	                         .history_id = MSTR(history_id),
	                         .received_ms = now_wall_ms()};
	struct msg m = envelope(MSG_RUN_ASSIGN, "dispatcher", reqid, "edge",
	                        deadline_ms, chat_request_pack, &q);

	T_EQ_INT(worker_dispatch_dispatcher_stub(&m), 0);
}

static void
ctx_reply(const char *reqid, uint64_t status, const char *upstream)
{
	struct ctx_reply c = {
	        .status = status,
	        .code = status == 200 ? 0 : 4006,
	        .msg = MSTR(status == 200 ? "" : "bot not found"),
	        .upstream = MSTR(upstream),
	        .model = MSTR("sim-1"),
	        .system_prompt = MSTR("be brief"),
	        .context_turns = 5,
	        .context = MSTR("{\"role\":\"user\",\"content\":\"1+1\"},"
	                        "{\"role\":\"assistant\",\"content\":\"2\"}")};
	struct msg m = envelope(MSG_CTX_REPLY, "storage", reqid, "", 0,
	                        ctx_reply_pack, &c);
	struct ctx_reply d;

	T_EQ_INT(ctx_reply_unpack(&m, &d), 0);
	worker_run_ctx(&w, &m, &d);
}

static char *
upstream_url(const char *which)
{
	static char url[128];

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/%s", srv.port, which);
	return (url);
}

static void
wait_sent(int want, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms;

	while (nsent < want && now_mono_ms() < until)
		(void)loop_run_once(w.svc.loop, 20);
}

static const struct sent *
expect(int i, const char *peer, uint16_t type)
{
	if (i >= nsent)
		T_FAIL("envelope %d: got none (%d sent), want %s to %s", i,
		       nsent, msg_name(type), peer);
	if (strcmp(sent[i].peer, peer) != 0 || sent[i].type != type)
		T_FAIL("envelope %d: got %s to %s, want %s to %s", i,
		       msg_name(sent[i].type), sent[i].peer, msg_name(type),
		       peer);
	return (&sent[i]);
}

static void
expect_reply(int i, uint64_t status, int64_t code, const char *msg,
             uint64_t retry_after)
{
	const struct sent *s = expect(i, "edge", MSG_CHAT_REPLY);
	struct chat_reply r;

	T_EQ_INT(chat_reply_decode(s->body.b, s->body.len, &r), 0);
	T_EQ_INT(r.status, status);
	T_EQ_INT(r.code, code);
	T_EQ_MEM(r.msg.p, r.msg.n, msg);
	T_EQ_INT(r.data.n, 0);
	T_EQ_INT(r.retry_after, retry_after);
	T_EQ_STR(s->reply_to, "");
	T_EQ_STR(s->tp, TP);
}

static void
expect_done(int i, const char *reqid, uint64_t status, long upstream_status)
{
	const struct sent *s = expect(i, "dispatcher", MSG_RUN_DONE);
	struct run_done d;

	T_EQ_INT(run_done_decode(s->body.b, s->body.len, &d), 0);
	T_EQ_STR(s->reqid, reqid);
	T_EQ_INT(d.status, status);
	T_EQ_INT(d.upstream_status, upstream_status);
	T_EQ_INT(last_status_counted, status);
}

/* --- ids and JSON --- */

static void
t_chat_id(void)
{
	struct chat_idgen g = {0};
	char a[WORKER_CHAT_ID_LEN + 1], b[WORKER_CHAT_ID_LEN + 1];
	uint64_t ms = 1732000000123ULL;

	worker_run_chat_id(&g, ms, 3, a);
	T_EQ_STR(a, "1732000000123003000");
	worker_run_chat_id(&g, ms, 3, b);
	T_EQ_STR(b, "1732000000123003001");
	worker_run_chat_id(&g, ms + 1, 3, b);
	T_EQ_STR(b, "1732000000124003000");
	/* The clock steps back: the ids still grow. */
	worker_run_chat_id(&g, ms - 5000, 3, b);
	T_EQ_STR(b, "1732000000124003001");
	/* A thousand in one millisecond borrow the next one. */
	for (int i = 0; i < 998; i++)
		worker_run_chat_id(&g, ms + 1, 3, b);
	T_EQ_STR(b, "1732000000124003999");
	worker_run_chat_id(&g, ms + 1, 3, b);
	T_EQ_STR(b, "1732000000125003000");
	/* Slots apart give ids apart; the slot is taken modulo 1000. */
	g = (struct chat_idgen){0};
	worker_run_chat_id(&g, ms, 1042, a);
	T_EQ_STR(a, "1732000000123042000");
	T_EQ_INT(strlen(a), WORKER_CHAT_ID_LEN);
}

static void
t_chat_id_of_request(void)
{
	char a[WORKER_CHAT_ID_LEN + 1], b[WORKER_CHAT_ID_LEN + 1];

	worker_run_chat_id_of(MSTR("20261122041115aa00bb11cc22dd33ee"), a);
	worker_run_chat_id_of(MSTR("20261122041115aa00bb11cc22dd33ee"), b);
	T_EQ_INT(strlen(a), 19);
	T_EQ_STR(b, a); /* a run executed twice: one row */
	T_ASSERT(a[0] >= '1' && strspn(a, "0123456789") == 19);
	worker_run_chat_id_of(MSTR("20261122041115aa00bb11cc22dd33ef"), b);
	T_ASSERT(strcmp(a, b) != 0);
}

static void
t_chat_id_unique(void)
{
	struct chat_idgen g = {0};
	char prev[WORKER_CHAT_ID_LEN + 1] = "", cur[WORKER_CHAT_ID_LEN + 1];

	for (int i = 0; i < 5000; i++) {
		worker_run_chat_id(&g, now_wall_ms(), 7, cur);
		T_EQ_INT(strlen(cur), 19);
		if (strcmp(cur, prev) <= 0)
			T_FAIL("id %d: got %s after %s, want larger", i, cur,
			       prev);
		memcpy(prev, cur, sizeof(cur));
	}
}

static int
cmp_str(const void *a, const void *b)
{
	return (strcmp(a, b));
}

static void
t_conv_id(void)
{
	/* More than one refill of the random pool (256 ids a refill). */
	static char ids[700][WORKER_CONV_ID_LEN + 1];

	for (size_t i = 0; i < nitems(ids); i++) {
		T_EQ_INT(worker_run_conv_id(ids[i]), 0);
		T_EQ_INT(strlen(ids[i]), 37);
		T_ASSERT(strncmp(ids[i], "conv_", 5) == 0);
		T_EQ_INT(strspn(ids[i] + 5, "0123456789abcdef"), 32);
	}
	qsort(ids, nitems(ids), sizeof(ids[0]), cmp_str);
	for (size_t i = 1; i < nitems(ids); i++)
		if (strcmp(ids[i - 1], ids[i]) == 0)
			T_FAIL("conversation id %s given twice", ids[i]);
}

static void
t_reply_json(void)
{
	struct buf b = {0};
	cJSON *root, *usage;

	T_EQ_INT(worker_run_reply_json(&b, "1732000000123003000",
	                               MSTR("conv_1"), MSTR("bot7"),
	                               "a \"b\"\n", 6, 3, 5),
	         0);
	T_EQ_MEM(
	        b.b, b.len,
	        "{\"chat_id\":\"1732000000123003000\",\"conversation_id\":"
	        "\"conv_1\",\"bot_id\":\"bot7\",\"answer\":\"a \\\"b\\\"\\n\","
	        "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,"
	        "\"total_tokens\":8}}");
	T_EQ_INT(buf_add(&b, "", 1), 0);
	root = cJSON_Parse(b.b);
	T_ASSERT(root != NULL);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(root, "answer")->valuestring,
	         "a \"b\"\n");
	usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
	T_EQ_INT(cJSON_GetObjectItemCaseSensitive(usage, "total_tokens")
	                 ->valueint,
	         8);
	cJSON_Delete(root);
	buf_free(&b);
}

/* --- runs --- */

static void
t_run_ok(void)
{
	const struct sent *s;
	struct ctx_get cg;
	struct chat_persist p;
	struct run_done d;
	uint64_t deadline = now_wall_ms() + 10000;
	cJSON *root;
	char *reply;

	setup();
	assign("req-1", "h1", deadline);
	T_EQ_INT(w.nruns, 1);
	s = expect(0, "storage", MSG_CTX_GET);
	T_EQ_STR(s->reqid, "req-1");
	T_EQ_STR(s->reply_to, "worker-3");
	T_EQ_STR(s->tp, TP);
	T_EQ_INT(s->deadline_ms, deadline);
	T_EQ_INT(ctx_get_decode(s->body.b, s->body.len, &cg), 0);
	T_EQ_MEM(cg.bot_id.p, cg.bot_id.n, "bot7");
	T_EQ_MEM(cg.conversation_id.p, cg.conversation_id.n, "h1");

	ctx_reply("req-1", 200, upstream_url("ok"));
	wait_sent(3, 5000);
	/* The upstream got the system prompt, the context, the query. */
	T_EQ_STR(srv.last_path, "/ok/v1/chat/completions");
	T_EQ_STR(srv.last_body.b,
	         "{\"model\":\"sim-1\",\"messages\":["
	         "{\"role\":\"system\",\"content\":\"be brief\"},"
	         "{\"role\":\"user\",\"content\":\"1+1\"},"
	         "{\"role\":\"assistant\",\"content\":\"2\"},"
	         "{\"role\":\"user\",\"content\":\"what is \\\"2+2\\\"?\"}],"
	         "\"stream\":false}");
	T_ASSERT(strstr(srv.last_head.b, "traceparent: " TP "\r\n") != NULL);

	s = expect(1, "storage", MSG_CHAT_PERSIST);
	T_EQ_STR(s->reqid, "req-1");
	T_EQ_STR(s->reply_to, "edge"); /* storage answers the edge */
	T_EQ_INT(s->deadline_ms, deadline);
	T_EQ_INT(chat_persist_decode(s->body.b, s->body.len, &p), 0);
	T_EQ_INT(p.chat_id.n, 19);
	T_EQ_MEM(p.conversation_id.p, p.conversation_id.n, "h1");
	T_EQ_MEM(p.bot_id.p, p.bot_id.n, "bot7");
	T_EQ_MEM(p.user_id.p, p.user_id.n, "u1");
	T_EQ_MEM(p.query.p, p.query.n, "what is \"2+2\"?");
	T_EQ_MEM(p.answer.p, p.answer.n, "hi \"there\"");
	T_EQ_INT(p.prompt_tokens, 3);
	T_EQ_INT(p.completion_tokens, 5);
	T_EQ_INT(p.context_turns, 5);
	reply = mstr_dup(p.reply);
	root = cJSON_Parse(reply);
	T_ASSERT(root != NULL);
	T_ASSERT(strncmp(cJSON_GetObjectItemCaseSensitive(root, "chat_id")
	                         ->valuestring,
	                 p.chat_id.p, 19) == 0);
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(root, "conversation_id")
	                 ->valuestring,
	         "h1");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(root, "bot_id")->valuestring,
	         "bot7");
	T_EQ_STR(cJSON_GetObjectItemCaseSensitive(root, "answer")->valuestring,
	         "hi \"there\"");
	cJSON_Delete(root);
	free(reply);

	expect_done(2, "req-1", 200, 200);
	T_EQ_INT(run_done_decode(sent[2].body.b, sent[2].body.len, &d), 0);
	T_EQ_MEM(d.upstream.p, d.upstream.n,
	         upstream_url("ok/v1/chat/completions"));
	T_ASSERT(d.upstream_us > 0);
	T_EQ_INT(nsent, 3);
	T_EQ_INT(w.nruns, 0);
	T_EQ_INT(stop_checks, 1);
	teardown();
}

static void
t_run_new_conversation(void)
{
	struct ctx_get cg;
	struct chat_persist p;
	char conv[64];

	setup();
	assign("req-2", "", now_wall_ms() + 10000);
	T_EQ_INT(ctx_get_decode(sent[0].body.b, sent[0].body.len, &cg), 0);
	cstr(conv, sizeof(conv), cg.conversation_id);
	T_EQ_INT(strlen(conv), 37);
	T_ASSERT(strncmp(conv, "conv_", 5) == 0);
	ctx_reply("req-2", 200, upstream_url("ok"));
	wait_sent(3, 5000);
	T_EQ_INT(chat_persist_decode(sent[1].body.b, sent[1].body.len, &p), 0);
	T_EQ_MEM(p.conversation_id.p, p.conversation_id.n, conv);
	T_ASSERT(memmem(p.reply.p, p.reply.n, conv, strlen(conv)) != NULL);
	teardown();
}

static void
t_run_duplicates(void)
{
	setup();
	assign("req-3", "h", now_wall_ms() + 10000);
	assign("req-3", "h", now_wall_ms() + 10000);
	T_EQ_INT(nsent, 1); /* one CTX_GET */
	T_EQ_INT(w.nruns, 1);
	/* A CTX_REPLY for no run: ignored. */
	ctx_reply("req-unknown", 200, upstream_url("ok"));
	T_EQ_INT(nsent, 1);
	ctx_reply("req-3", 200, upstream_url("ok"));
	/* A second CTX_REPLY for a run already calling: ignored. */
	ctx_reply("req-3", 404, "");
	T_EQ_INT(nsent, 1);
	wait_sent(3, 5000);
	expect(1, "storage", MSG_CHAT_PERSIST);
	expect_done(2, "req-3", 200, 200);
	/* The run is over: a late one is ignored too. */
	ctx_reply("req-3", 200, upstream_url("ok"));
	(void)loop_run_once(w.svc.loop, 50);
	T_EQ_INT(nsent, 3);
	teardown();
}

static void
t_run_many(void)
{
	char id[32];

	/* More runs than the table's first size: it grows, all finish. */
	setup();
	for (int i = 0; i < 150; i++) {
		snprintf(id, sizeof(id), "many-%d", i);
		assign(id, "h", now_wall_ms() + 10000);
	}
	T_EQ_INT(w.nruns, 150);
	T_ASSERT(w.nbuckets >= 150);
	for (int i = 0; i < 150; i++) {
		snprintf(id, sizeof(id), "many-%d", i);
		T_ASSERT(run_find(&w, MSTR(id)) != NULL);
	}
	for (int i = 0; i < 150; i++) {
		snprintf(id, sizeof(id), "many-%d", i);
		ctx_reply(id, 404, "");
	}
	T_EQ_INT(w.nruns, 0);
	T_EQ_INT(nsent, 150 * 3);
	teardown();
}

static void
t_run_ctx_error(void)
{
	setup();
	assign("req-4", "h", now_wall_ms() + 10000);
	ctx_reply("req-4", 404, "");
	expect_reply(1, 404, 4006, "bot not found", 0);
	T_EQ_STR(sent[1].reqid, "req-4");
	expect_done(2, "req-4", 404, 0);
	T_EQ_INT(w.nruns, 0);
	teardown();
}

static void
t_run_ctx_undecodable(void)
{
	struct msg m;
	struct ctx_get dummy = {.bot_id = MSTR("x"),
	                        .conversation_id = MSTR("y")};

	setup();
	assign("req-5", "h", now_wall_ms() + 10000);
	m = envelope(MSG_CTX_REPLY, "storage", "req-5", "", 0, ctx_get_pack,
	             &dummy);
	worker_run_ctx(&w, &m, NULL);
	expect_reply(1, 500, 5000, "internal error", 0);
	expect_done(2, "req-5", 500, 0);
	teardown();
}

/* A v1 run the upstream throttles is handed back to the dispatcher:
 * nobody is answered, RUN_DONE has status 0, the signal (429, its
 * Retry-After: 7 as a 7 s backoff) and the bot; the next run of the same
 * bot to the same upstream is handed back before calling it. */
static void
t_run_upstream_429(void)
{
	const struct sent *s;
	struct run_done d;

	setup();
	assign("req-6", "h", now_wall_ms() + 10000);
	ctx_reply("req-6", 200, upstream_url("r429"));
	wait_sent(2, 5000);
	s = expect(1, "dispatcher", MSG_RUN_DONE);
	T_EQ_INT(run_done_decode(s->body.b, s->body.len, &d), 0);
	T_EQ_STR(s->reqid, "req-6");
	T_EQ_INT(d.status, 0);
	T_EQ_INT(d.upstream_status, 429);
	T_EQ_INT(d.throttled, 1);
	T_ASSERT(d.rl_seen & RL_SEEN_STATUS);
	T_ASSERT(d.rl_seen & RL_SEEN_RETRY_AFTER);
	T_EQ_INT(d.backoff_ms, 7000);
	T_EQ_MEM(d.bot_id.p, d.bot_id.n, "bot7");
	/* held back: the second run is handed back without a call */
	assign("req-6b", "h", now_wall_ms() + 10000);
	ctx_reply("req-6b", 200, upstream_url("r429"));
	wait_sent(4, 5000);
	s = expect(3, "dispatcher", MSG_RUN_DONE);
	T_EQ_INT(run_done_decode(s->body.b, s->body.len, &d), 0);
	T_EQ_STR(s->reqid, "req-6b");
	T_EQ_INT(d.status, 0);
	T_EQ_INT(d.upstream_status, 0);
	T_EQ_INT(d.throttled, 0);
	T_ASSERT(d.backoff_ms > 5000 && d.backoff_ms <= 7000);
	teardown();
}

/* A 503 with Retry-After and Coze's 4009 in a 200 are throttles too. */
static void
t_run_upstream_503_coze(void)
{
	const struct sent *s;
	struct run_done d;

	setup();
	assign("req-7a", "h", now_wall_ms() + 10000);
	ctx_reply("req-7a", 200, upstream_url("s503"));
	wait_sent(2, 5000);
	s = expect(1, "dispatcher", MSG_RUN_DONE);
	T_EQ_INT(run_done_decode(s->body.b, s->body.len, &d), 0);
	T_EQ_INT(d.status, 0);
	T_EQ_INT(d.upstream_status, 503);
	T_EQ_INT(d.throttled, 1);
	T_EQ_INT(d.backoff_ms, 3000);
	T_EQ_INT(d.rl_remaining, 0);
	T_ASSERT(d.rl_seen & RL_SEEN_OPENAI);
	assign("req-7b", "h", now_wall_ms() + 10000);
	ctx_reply("req-7b", 200, upstream_url("coze4009"));
	wait_sent(4, 5000);
	s = expect(3, "dispatcher", MSG_RUN_DONE);
	T_EQ_INT(run_done_decode(s->body.b, s->body.len, &d), 0);
	T_EQ_INT(d.status, 0);
	T_EQ_INT(d.upstream_status, 200);
	T_EQ_INT(d.throttled, 1);
	T_ASSERT(d.rl_seen & RL_SEEN_COZE);
	T_EQ_INT(d.backoff_ms, 1000); /* no Retry-After: 1 s */
	teardown();
}

/* The strongest signal of a run wins; waits take the longest. */
static void
t_signal_merge(void)
{
	struct rl_signal acc, a, b;

	rl_signal_init(&acc);
	rl_signal_init(&a);
	rl_signal_header(&a, "x-ratelimit-remaining-requests", 30, "5", 1, 0);
	rl_signal_finish(&a);
	worker_run_signal_merge(&acc, &a);
	T_EQ_INT(acc.remaining, 5);
	T_EQ_INT(acc.throttled, 0);
	rl_signal_init(&b);
	rl_signal_status(&b, 429);
	rl_signal_header(&b, "Retry-After", 11, "3", 1, 0);
	rl_signal_finish(&b);
	worker_run_signal_merge(&acc, &b);
	T_EQ_INT(acc.throttled, 1);
	T_EQ_INT(acc.retry_after_ms, 3000);
	T_ASSERT(acc.seen & RL_SEEN_OPENAI);
	T_ASSERT(acc.seen & RL_SEEN_STATUS);
	/* a weaker one later changes nothing but the dialects */
	worker_run_signal_merge(&acc, &a);
	T_EQ_INT(acc.throttled, 1);
	T_EQ_INT(rl_signal_backoff_ms(&acc), 3000);
	/* two throttles: the longer wait */
	rl_signal_init(&b);
	rl_signal_status(&b, 503);
	rl_signal_header(&b, "Retry-After", 11, "9", 1, 0);
	rl_signal_finish(&b);
	worker_run_signal_merge(&acc, &b);
	T_EQ_INT(acc.retry_after_ms, 9000);
}

/* Pauses are per upstream and bot; the table forgets the earliest. */
static void
t_pause_table(void)
{
	struct worker pw;
	char url[64];

	memset(&pw, 0, sizeof(pw));
	worker_run_pause_set(&pw, "http://u1", MSTR_LIT("a"), 5000);
	T_EQ_INT(worker_run_pause_left(&pw, "http://u1", MSTR_LIT("a"), 1000),
	         4000);
	T_EQ_INT(worker_run_pause_left(&pw, "http://u1", MSTR_LIT("b"), 1000),
	         0);
	T_EQ_INT(worker_run_pause_left(&pw, "http://u2", MSTR_LIT("a"), 1000),
	         0);
	T_EQ_INT(worker_run_pause_left(&pw, "http://u1", MSTR_LIT("a"), 5000),
	         0);
	worker_run_pause_set(&pw, "http://u1", MSTR_LIT("a"), 3000);
	T_EQ_INT(worker_run_pause_left(&pw, "http://u1", MSTR_LIT("a"), 1000),
	         4000); /* never shortened */
	for (int i = 0; i < WORKER_PAUSES; i++) {
		snprintf(url, sizeof(url), "http://x%d", i);
		worker_run_pause_set(&pw, url, MSTR_LIT("a"),
		                     10000 + (uint64_t)i);
	}
	T_EQ_INT(worker_run_pause_left(&pw, "http://x63", MSTR_LIT("a"), 0),
	         10063);
}

static void
t_run_upstream_invalid(void)
{
	setup();
	assign("req-7", "h", now_wall_ms() + 10000);
	ctx_reply("req-7", 200, upstream_url("garbage"));
	wait_sent(3, 5000);
	expect_reply(1, 502, 5020, "upstream returned an invalid answer", 0);
	expect_done(2, "req-7", 502, 200);
	teardown();
}

static void
t_run_upstream_deadline(void)
{
	uint64_t t0 = now_mono_ms();

	setup();
	assign("req-8", "h", now_wall_ms() + 300);
	ctx_reply("req-8", 200, upstream_url("hang"));
	wait_sent(3, 5000);
	expect_reply(1, 504, 5040, "upstream deadline exceeded", 0);
	expect_done(2, "req-8", 504, 0);
	if (now_mono_ms() - t0 > 1500)
		T_FAIL("504 after %llu ms, want ~300",
		       (unsigned long long)(now_mono_ms() - t0));
	teardown();
}

static void
t_run_bad_url(void)
{
	setup();
	assign("req-9", "h", now_wall_ms() + 10000);
	ctx_reply("req-9", 200, "ftp://127.0.0.1/");
	expect_reply(1, 502, 5020, "bot upstream not usable", 0);
	expect_done(2, "req-9", 502, 0);
	teardown();
}

static void
t_run_storage_silent(void)
{
	uint64_t t0 = now_mono_ms();

	/* Storage never answers CTX_GET: the run ends at its deadline. */
	setup();
	assign("req-10", "h", now_wall_ms() + 200);
	wait_sent(3, 3000);
	expect_reply(1, 504, 5040, "deadline exceeded", 0);
	expect_done(2, "req-10", 504, 0);
	T_ASSERT(now_mono_ms() - t0 >= 150);
	T_EQ_INT(w.nruns, 0);
	teardown();
}

static void
t_run_refusals(void)
{
	setup();
	w.stopping = 1;
	assign("req-11", "h", now_wall_ms() + 10000);
	expect_reply(0, 503, 5030, "worker stopping", 1);
	expect_done(1, "req-11", 503, 0);
	T_EQ_INT(w.nruns, 0);
	w.stopping = 0;

	assign("req-12", "h", now_wall_ms() - 1);
	expect_reply(2, 504, 5040, "deadline exceeded", 0);
	expect_done(3, "req-12", 504, 0);

	/* Storage's backlog is full: 503 at once. */
	refuse_peer = "storage";
	assign("req-13", "h", now_wall_ms() + 10000);
	expect_reply(4, 503, 5030, "storage unavailable", 1);
	expect_done(5, "req-13", 503, 0);
	T_EQ_INT(w.nruns, 0);
	T_EQ_INT(nsent, 6);

	/* Torn down at the end of a stop, while svc_exit still delivers
	 * envelopes: refused, and nothing breaks. */
	refuse_peer = NULL;
	worker_run_free_all(&w);
	w.stopping = 1;
	assign("req-16", "h", now_wall_ms() + 10000);
	expect_reply(6, 503, 5030, "worker stopping", 1);
	ctx_reply("req-16", 200, upstream_url("ok"));
	T_EQ_INT(nsent, 8);
	teardown();
}

static void
t_run_persist_refused(void)
{
	setup();
	assign("req-14", "h", now_wall_ms() + 10000);
	ctx_reply("req-14", 200, upstream_url("ok"));
	refuse_peer = "storage";
	wait_sent(3, 5000);
	expect_reply(1, 503, 5030, "storage unavailable", 1);
	expect_done(2, "req-14", 503, 200);
	teardown();
}

static void
t_run_no_deadline(void)
{
	/* No deadline in the envelope: run_timeout_ms applies. */
	setup();
	w.run_timeout_ms = 150;
	assign("req-15", "h", 0);
	T_EQ_INT(w.nruns, 1);
	wait_sent(3, 3000);
	expect_reply(1, 504, 5040, "deadline exceeded", 0);
	teardown();
}

static void
t_run_queued_deadline(void)
{
	uint64_t t0 = now_mono_ms();

	/* One connection per host, held by a slow run: the next run waits
	 * for it and is answered at its own deadline, not when the slow one
	 * ends. */
	setup();
	w.upconf.connections = 1;
	worker_upstream_conf(w.up, &w.upconf);
	assign("slow", "h", now_wall_ms() + 1500);
	assign("quick", "h", now_wall_ms() + 300);
	ctx_reply("slow", 200, upstream_url("hang"));
	ctx_reply("quick", 200, upstream_url("ok"));
	T_EQ_INT(worker_upstream_queued(w.up), 1);
	wait_sent(4, 3000);
	expect_reply(2, 504, 5040, "upstream deadline exceeded", 0);
	T_EQ_STR(sent[2].reqid, "quick");
	expect_done(3, "quick", 504, 0);
	if (now_mono_ms() - t0 > 1000)
		T_FAIL("quick answered after %llu ms, want ~300",
		       (unsigned long long)(now_mono_ms() - t0));
	T_EQ_INT(worker_upstream_queued(w.up), 0);
	T_EQ_INT(srv.requests, 1);
	wait_sent(6, 3000);
	expect_reply(4, 504, 5040, "upstream deadline exceeded", 0);
	T_EQ_STR(sent[4].reqid, "slow");
	teardown();
}

/* --- v3.chat --- */

#define CHAT_ID "7300000000000000001"
#define MSGS1                                                                 \
	"[{\"role\":\"user\",\"type\":\"question\",\"content\":\"hi\","       \
	"\"content_type\":\"text\"}]"

static void
assign_v3(const char *reqid, const char *conv, int stream,
          const char *messages, uint64_t deadline_ms)
{
	struct chat_request q = {.route = MSTR("v3.chat"),
	                         .token = MSTR_NULL,
	                         .sub = MSTR("u1"),
	                         .bot_id = MSTR("bot7"),
	                         .user_id = MSTR("u1"),
	                         .query = MSTR("hi"),
	                         .history_id = MSTR(conv),
	                         .received_ms = now_wall_ms(),
	                         .chat_id = MSTR(CHAT_ID),
	                         .stream = (uint64_t)stream,
	                         .messages = MSTR(messages),
	                         .scopes = MSTR_NULL};
	struct msg m = envelope(MSG_RUN_ASSIGN, "dispatcher", reqid, "edge",
	                        deadline_ms, chat_request_pack, &q);

	T_EQ_INT(worker_dispatch_dispatcher_stub(&m), 0);
}

static void
ctx_reply_v3(const char *reqid, uint64_t status, const char *upstream,
             uint64_t first_event_ms, uint64_t total_ms)
{
	struct ctx_reply c = {
	        .status = status,
	        .code = status == 200 ? 0 : 4016,
	        .msg = MSTR(status == 200 ? "" : "conversation busy"),
	        .upstream = MSTR(upstream),
	        .model = MSTR("sim-1"),
	        .system_prompt = MSTR_NULL,
	        .context_turns = 5,
	        .context = MSTR_NULL,
	        .plugins = MSTR_NULL,
	        .created_at = 1763790000,
	        .first_event_ms = first_event_ms,
	        .total_ms = total_ms};
	struct msg m = envelope(MSG_CTX_REPLY, "storage", reqid, "", 0,
	                        ctx_reply_pack, &c);
	struct ctx_reply d;

	T_EQ_INT(ctx_reply_unpack(&m, &d), 0);
	worker_run_ctx(&w, &m, &d);
}

static void
cancel(const char *reqid, const char *reply_to, const char *conv)
{
	struct chat_request q = {.route = MSTR("v3.cancel"),
	                         .token = MSTR_NULL,
	                         .sub = MSTR("u1"),
	                         .bot_id = MSTR_NULL,
	                         .user_id = MSTR_NULL,
	                         .query = MSTR_NULL,
	                         .history_id = MSTR(conv),
	                         .received_ms = now_wall_ms(),
	                         .chat_id = MSTR(CHAT_ID),
	                         .stream = 0,
	                         .messages = MSTR_NULL,
	                         .scopes = MSTR_NULL};
	struct msg m = envelope(MSG_RUN_CANCEL, "dispatcher", reqid, reply_to,
	                        now_wall_ms() + 5000, chat_request_pack, &q);
	struct chat_request d;

	T_EQ_INT(chat_request_unpack(&m, &d), 0);
	worker_run_cancel(&w, &m, &d);
}

/* The SSE text of CHAT_EVENT i (NUL-terminated copy, static). */
static const char *
event_text(int i, int want_last)
{
	static char text[16384];
	const struct sent *s = expect(i, "edge", MSG_CHAT_EVENT);
	struct chat_event e;

	T_EQ_INT(chat_event_decode(s->body.b, s->body.len, &e), 0);
	T_EQ_INT(e.last, want_last);
	T_EQ_STR(s->reply_to, "");
	cstr(text, sizeof(text), e.sse);
	return (text);
}

/* The event names of an SSE text, space-separated. */
static const char *
event_names(const char *sse)
{
	static char names[1024];
	const char *p = sse;
	size_t n = 0;

	names[0] = '\0';
	while ((p = strstr(p, "event:")) != NULL) {
		size_t k = strcspn(p + 6, "\n");

		n += (size_t)snprintf(names + n, sizeof(names) - n, "%s%.*s",
		                      n ? " " : "", (int)k, p + 6);
		p += 6 + k;
	}
	return (names);
}

/* The "data" JSON of the event-th event named name in sse. */
static cJSON *
event_json(const char *sse, const char *name, int nth)
{
	char want[96];
	const char *p = sse;
	char *line;
	cJSON *j;

	snprintf(want, sizeof(want), "event:%s\ndata:", name);
	for (int i = 0; i <= nth; i++) {
		if ((p = strstr(p, want)) == NULL)
			T_FAIL("no event %s #%d in %s", name, nth, sse);
		p += strlen(want);
	}
	line = strndup(p, strcspn(p, "\n"));
	j = cJSON_Parse(line);
	free(line);
	T_ASSERT(j != NULL);
	return (j);
}

static const char *
jstr(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return (cJSON_IsString(v) ? v->valuestring : "(none)");
}

static double
jnum(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return (cJSON_IsNumber(v) ? v->valuedouble : -1);
}

/* Append the content of every message.delta of sse to out. */
static void
deltas_of(const char *sse, struct buf *out)
{
	for (int i = 0; strstr(sse, "event:conversation.message.delta"); i++) {
		const char *p = sse;
		int k = 0;
		cJSON *j;

		for (; (p = strstr(p, "event:conversation.message.delta"));
		     p++)
			k++;
		if (i >= k)
			return;
		j = event_json(sse, "conversation.message.delta", i);
		T_EQ_STR(jstr(j, "role"), "assistant");
		T_EQ_STR(jstr(j, "type"), "answer");
		T_EQ_STR(jstr(j, "chat_id"), CHAT_ID);
		(void)buf_adds(out, jstr(j, "content"));
		cJSON_Delete(j);
	}
}

static int
find_sent(uint16_t type, const char *peer, int from)
{
	for (int i = from; i < nsent; i++)
		if (sent[i].type == type && strcmp(sent[i].peer, peer) == 0)
			return (i);
	return (-1);
}

static void
wait_type(uint16_t type, const char *peer, int ms)
{
	uint64_t until = now_mono_ms() + (uint64_t)ms;

	while (find_sent(type, peer, 0) == -1 && now_mono_ms() < until)
		(void)loop_run_once(w.svc.loop, 20);
	if (find_sent(type, peer, 0) == -1)
		T_FAIL("no %s to %s within %d ms", msg_name(type), peer, ms);
}

static void
t_v3_stream_ok(void)
{
	char aid[COZE_ID_LEN + 1], qid[COZE_ID_LEN + 1], conv[64];
	uint64_t deadline = now_wall_ms() + 10000;
	const struct sent *s;
	struct chat_persist p;
	struct ctx_get cg;
	struct run_done d;
	struct buf all = {0};
	const char *ev;
	cJSON *j, *e;
	char *text;
	int i, ip;

	setup();
	assign_v3("r3-1", "", 1, MSGS1, deadline);
	s = expect(0, "storage", MSG_CTX_GET);
	T_EQ_INT(ctx_get_decode(s->body.b, s->body.len, &cg), 0);
	T_EQ_MEM(cg.chat_id.p, cg.chat_id.n, CHAT_ID);
	T_EQ_MEM(cg.user_id.p, cg.user_id.n, "u1");
	/* A new conversation: a Coze-style id. */
	cstr(conv, sizeof(conv), cg.conversation_id);
	T_EQ_INT(strlen(conv), 19);
	T_ASSERT(coze_id_ok(MSTR(conv)));
	/* The lock: time to the deadline and 5 s. */
	T_ASSERT(cg.lock_ms > 14000 && cg.lock_ms <= 15000);

	ctx_reply_v3("r3-1", 200, upstream_url("sseslow"), 0, 0);
	ev = event_text(1, 0);
	T_EQ_STR(event_names(ev),
	         "conversation.chat.created conversation.chat.in_progress");
	j = event_json(ev, "conversation.chat.created", 0);
	T_EQ_STR(jstr(j, "id"), CHAT_ID);
	T_EQ_STR(jstr(j, "conversation_id"), conv);
	T_EQ_STR(jstr(j, "bot_id"), "bot7");
	T_EQ_STR(jstr(j, "status"), "created");
	T_EQ_INT(jnum(j, "created_at"), 1763790000);
	cJSON_Delete(j);
	j = event_json(ev, "conversation.chat.in_progress", 0);
	T_EQ_STR(jstr(j, "status"), "in_progress");
	cJSON_Delete(j);

	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	/* "Hel" in its own turn, the rest later. */
	T_EQ_STR(event_names(event_text(2, 0)), "conversation.message.delta");
	for (i = 2; sent[i].type == MSG_CHAT_EVENT; i++)
		deltas_of(event_text(i, 0), &all);
	T_ASSERT(i >= 3);
	ip = i;
	s = expect(ip, "storage", MSG_CHAT_PERSIST);
	T_EQ_STR(s->reply_to, "edge");
	T_EQ_STR(s->reqid, "r3-1");
	T_EQ_INT(chat_persist_decode(s->body.b, s->body.len, &p), 0);
	T_EQ_MEM(p.route.p, p.route.n, "v3.chat");
	T_EQ_MEM(p.status.p, p.status.n, "completed");
	T_EQ_MEM(p.chat_id.p, p.chat_id.n, CHAT_ID);
	T_EQ_MEM(p.conversation_id.p, p.conversation_id.n, conv);
	T_EQ_MEM(p.answer.p, p.answer.n, "Hello");
	T_EQ_INT(p.reply_kind, 1);
	T_EQ_INT(p.created_at, 1763790000);
	T_EQ_INT(p.prompt_tokens, 4);
	T_EQ_INT(p.completion_tokens, 2);
	T_EQ_INT(p.last_error.n, 0);
	/* The last events: what the deltas lacked, the whole answer, the
	 * chat completed, done. */
	text = mstr_dup(p.reply);
	T_ASSERT(strstr(event_names(text), "conversation.message.completed "
	                                   "conversation.chat.completed "
	                                   "done") != NULL);
	T_ASSERT(strstr(text, "event:done\ndata:\"[DONE]\"\n\n") != NULL);
	deltas_of(text, &all);
	T_EQ_MEM(all.b, all.len, "Hello");
	coze_msg_id_of(MSTR(CHAT_ID), 1, aid);
	coze_msg_id_of(MSTR(CHAT_ID), 0, qid);
	j = event_json(text, "conversation.message.completed", 0);
	T_EQ_STR(jstr(j, "content"), "Hello");
	T_EQ_STR(jstr(j, "id"), aid);
	T_EQ_STR(jstr(j, "type"), "answer");
	cJSON_Delete(j);
	j = event_json(text, "conversation.chat.completed", 0);
	T_EQ_STR(jstr(j, "status"), "completed");
	T_ASSERT(jnum(j, "completed_at") >= 1763790000);
	e = cJSON_GetObjectItemCaseSensitive(j, "usage");
	T_EQ_INT(jnum(e, "token_count"), 6);
	T_EQ_INT(jnum(e, "input_count"), 4);
	T_EQ_INT(jnum(e, "output_count"), 2);
	cJSON_Delete(j);
	free(text);
	/* The rows to store: the question and the answer. */
	text = mstr_dup(p.messages);
	j = cJSON_Parse(text);
	T_ASSERT(cJSON_IsArray(j));
	T_EQ_INT(cJSON_GetArraySize(j), 2);
	e = cJSON_GetArrayItem(j, 0);
	T_EQ_STR(jstr(e, "id"), qid);
	T_EQ_STR(jstr(e, "role"), "user");
	T_EQ_STR(jstr(e, "type"), "question");
	T_EQ_STR(jstr(e, "content"), "hi");
	T_EQ_STR(jstr(e, "content_type"), "text");
	T_EQ_INT(jnum(e, "created_at"), 1763790000);
	e = cJSON_GetArrayItem(j, 1);
	T_EQ_STR(jstr(e, "id"), aid);
	T_EQ_STR(jstr(e, "role"), "assistant");
	T_EQ_STR(jstr(e, "type"), "answer");
	T_EQ_STR(jstr(e, "content"), "Hello");
	cJSON_Delete(j);
	free(text);
	/* The upstream was asked for a stream. */
	T_ASSERT(strstr(srv.last_body.b, "\"stream\":true,\"stream_options\":"
	                                 "{\"include_usage\":true}") != NULL);
	T_ASSERT(strstr(srv.last_body.b,
	                "{\"role\":\"user\",\"content\":\"hi\"}") != NULL);
	T_EQ_INT(run_done_decode(sent[ip + 1].body.b, sent[ip + 1].body.len,
	                         &d),
	         0);
	expect_done(ip + 1, "r3-1", 200, 200);
	T_EQ_INT(nsent, ip + 2);
	T_EQ_INT(w.nruns, 0);
	buf_free(&all);
	teardown();
}

static void
t_v3_nonstream(void)
{
	const struct sent *s;
	struct chat_reply rep;
	struct chat_persist p;
	char *text;
	cJSON *j;
	int ip;

	setup();
	assign_v3("r3-2", "7000000000000000042", 0, MSGS1,
	          now_wall_ms() + 10000);
	ctx_reply_v3("r3-2", 200, upstream_url("sse"), 0, 0);
	s = expect(1, "edge", MSG_CHAT_REPLY);
	T_EQ_INT(chat_reply_decode(s->body.b, s->body.len, &rep), 0);
	T_EQ_INT(rep.status, 200);
	T_EQ_INT(rep.code, 0);
	text = mstr_dup(rep.data);
	j = cJSON_Parse(text);
	T_EQ_STR(jstr(j, "id"), CHAT_ID);
	T_EQ_STR(jstr(j, "conversation_id"), "7000000000000000042");
	T_EQ_STR(jstr(j, "status"), "in_progress");
	cJSON_Delete(j);
	free(text);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	/* No events for a non-streaming chat. */
	T_EQ_INT(find_sent(MSG_CHAT_EVENT, "edge", 0), -1);
	ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);
	T_ASSERT(ip == 2);
	T_EQ_INT(chat_persist_decode(sent[ip].body.b, sent[ip].body.len, &p),
	         0);
	T_EQ_INT(p.reply_kind, 2);
	T_EQ_INT(p.reply.n, 0);
	T_EQ_MEM(p.status.p, p.status.n, "completed");
	T_EQ_MEM(p.answer.p, p.answer.n, "Hello");
	T_EQ_MEM(p.conversation_id.p, p.conversation_id.n,
	         "7000000000000000042");
	expect_done(3, "r3-2", 200, 200);
	teardown();
}

static void
t_v3_busy(void)
{
	setup();
	assign_v3("r3-3", "7000000000000000042", 1, MSGS1,
	          now_wall_ms() + 10000);
	ctx_reply_v3("r3-3", 409, "", 0, 0);
	expect_reply(1, 409, 4016, "conversation busy", 0);
	expect_done(2, "r3-3", 409, 0);
	T_EQ_INT(nsent, 3);
	T_EQ_INT(srv.requests, 0);
	teardown();
}

/* The persist of a run that did not complete; its final SSE in *sse. */
static void
check_failed(int ip, const char *status, int64_t code, const char *msg,
             const char *answer, char **sse)
{
	struct chat_persist p;
	char want[256], *t;
	cJSON *j;

	T_EQ_INT(chat_persist_decode(sent[ip].body.b, sent[ip].body.len, &p),
	         0);
	T_EQ_MEM(p.status.p, p.status.n, status);
	T_EQ_MEM(p.answer.p, p.answer.n, answer);
	if (code != 0) {
		j = cJSON_CreateString(msg);
		t = cJSON_PrintUnformatted(j);
		snprintf(want, sizeof(want), "{\"code\":%lld,\"msg\":%s}",
		         (long long)code, t);
		free(t);
		cJSON_Delete(j);
		T_EQ_MEM(p.last_error.p, p.last_error.n, want);
	} else
		T_EQ_INT(p.last_error.n, 0);
	/* The answer is stored when some of it came. */
	t = mstr_dup(p.messages);
	j = cJSON_Parse(t);
	T_EQ_INT(cJSON_GetArraySize(j), answer[0] ? 2 : 1);
	cJSON_Delete(j);
	free(t);
	*sse = mstr_dup(p.reply);
	T_ASSERT(strstr(*sse, "conversation.message.completed") == NULL);
	T_ASSERT(strstr(*sse, "event:done\ndata:\"[DONE]\"\n\n") != NULL);
}

static void
t_v3_upstream_failed(void)
{
	char *sse;
	cJSON *j, *e;
	int ip;

	setup();
	assign_v3("r3-4", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_v3("r3-4", 200, upstream_url("ssegarbage"), 0, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);
	T_EQ_INT(ip, 2);
	check_failed(ip, "failed", 5020, "upstream returned an invalid answer",
	             "", &sse);
	T_EQ_STR(event_names(sse), "conversation.chat.failed done");
	j = event_json(sse, "conversation.chat.failed", 0);
	T_EQ_STR(jstr(j, "status"), "failed");
	T_ASSERT(jnum(j, "failed_at") > 0);
	e = cJSON_GetObjectItemCaseSensitive(j, "last_error");
	T_EQ_INT(jnum(e, "code"), 5020);
	T_EQ_STR(jstr(e, "msg"), "upstream returned an invalid answer");
	cJSON_Delete(j);
	free(sse);
	expect_done(ip + 1, "r3-4", 502, 200);
	teardown();
}

static void
t_v3_first_event_deadline(void)
{
	uint64_t t0 = now_mono_ms();
	char *sse;
	int ip;

	setup();
	assign_v3("r3-5", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_v3("r3-5", 200, upstream_url("hang"), 150, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 3000);
	if (now_mono_ms() - t0 < 100 || now_mono_ms() - t0 > 1500)
		T_FAIL("failed after %llu ms, want ~150",
		       (unsigned long long)(now_mono_ms() - t0));
	ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);
	check_failed(ip, "failed", 5040,
	             "upstream first event deadline exceeded", "", &sse);
	free(sse);
	expect_done(ip + 1, "r3-5", 504, 0);
	T_EQ_INT(worker_upstream_active(w.up), 0); /* the call aborted */
	teardown();
}

static void
t_v3_first_event_config(void)
{
	uint64_t t0 = now_mono_ms();
	char *sse;

	/* The bot says 0: the worker's first_event_ms applies. */
	setup();
	w.first_event_ms = 120;
	assign_v3("r3-6", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_v3("r3-6", 200, upstream_url("hang"), 0, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 3000);
	T_ASSERT(now_mono_ms() - t0 < 1500);
	check_failed(find_sent(MSG_CHAT_PERSIST, "storage", 0), "failed", 5040,
	             "upstream first event deadline exceeded", "", &sse);
	free(sse);
	teardown();

	/* Content came in time: the first-event deadline no longer counts;
	 * the total one (the bot's 400 ms) ends the hanging stream. */
	setup();
	w.first_event_ms = 120;
	t0 = now_mono_ms();
	assign_v3("r3-7", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_v3("r3-7", 200, upstream_url("ssehang"), 0, 400);
	wait_type(MSG_RUN_DONE, "dispatcher", 3000);
	if (now_mono_ms() - t0 < 350)
		T_FAIL("ended after %llu ms, want ~400",
		       (unsigned long long)(now_mono_ms() - t0));
	check_failed(find_sent(MSG_CHAT_PERSIST, "storage", 0), "failed", 5040,
	             "upstream deadline exceeded", "Hel", &sse);
	/* "Hel" went out as a delta already: no tail. */
	T_EQ_STR(event_names(sse), "conversation.chat.failed done");
	free(sse);
	teardown();
}

static void
t_v3_cancel(void)
{
	const struct sent *s;
	struct chat_reply rep;
	char *text;
	cJSON *j;
	int ip, n;

	setup();
	assign_v3("r3-8", "7000000000000000042", 1, MSGS1,
	          now_wall_ms() + 10000);
	ctx_reply_v3("r3-8", 200, upstream_url("ssehang"), 0, 0);
	wait_type(MSG_CHAT_EVENT, "edge", 1000);
	while (nsent < 3)
		(void)loop_run_once(w.svc.loop, 20); /* the "Hel" delta */
	T_EQ_STR(event_names(event_text(2, 0)), "conversation.message.delta");
	/* Another conversation's chat of that id: not ours. */
	cancel("cancel-0", "edge-c", "7000000000000000043");
	expect(3, "edge-c", MSG_CHAT_REPLY);
	T_EQ_INT(chat_reply_decode(sent[3].body.b, sent[3].body.len, &rep), 0);
	T_EQ_INT(rep.status, 404);
	T_EQ_INT(rep.code, 4201);
	T_EQ_INT(w.nruns, 1);

	cancel("cancel-1", "edge-c", "7000000000000000042");
	s = expect(4, "edge-c", MSG_CHAT_REPLY);
	T_EQ_STR(s->reqid, "cancel-1"); /* the canceler's own request */
	T_EQ_STR(s->reply_to, "");
	T_EQ_INT(chat_reply_decode(s->body.b, s->body.len, &rep), 0);
	T_EQ_INT(rep.status, 200);
	text = mstr_dup(rep.data);
	j = cJSON_Parse(text);
	T_EQ_STR(jstr(j, "id"), CHAT_ID);
	T_EQ_STR(jstr(j, "status"), "canceled");
	T_EQ_INT(jnum(j, "created_at"), 1763790000);
	cJSON_Delete(j);
	free(text);
	ip = 5;
	expect(ip, "storage", MSG_CHAT_PERSIST);
	T_EQ_STR(sent[ip].reqid, "r3-8"); /* the run's */
	T_EQ_STR(sent[ip].reply_to, "edge");
	check_failed(ip, "canceled", 0, "", "Hel", &text);
	T_EQ_STR(event_names(text), "conversation.chat.canceled done");
	free(text);
	expect_done(ip + 1, "r3-8", 499, 0);
	T_EQ_INT(w.nruns, 0);
	T_EQ_INT(worker_upstream_active(w.up), 0);

	/* Again, now that it ended: 409. */
	n = nsent;
	cancel("cancel-2", "edge-c", "");
	T_EQ_INT(nsent, n + 1);
	s = expect(n, "edge-c", MSG_CHAT_REPLY);
	T_EQ_INT(chat_reply_decode(s->body.b, s->body.len, &rep), 0);
	T_EQ_INT(rep.status, 409);
	T_EQ_INT(rep.code, 4202);
	T_EQ_MEM(rep.msg.p, rep.msg.n, "chat already finished");
	/* A client gone for a run that ended: nobody to answer. */
	cancel("r3-8", "", "");
	T_EQ_INT(nsent, n + 1);
	teardown();
}

static void
t_v3_cancel_before_ctx(void)
{
	char *sse;
	int ip;

	/* The client leaves while storage takes the lock: the chat ends
	 * canceled when storage answers, the upstream is never called. */
	setup();
	assign_v3("r3-9", "", 1, MSGS1, now_wall_ms() + 10000);
	cancel("r3-9", "", "");
	T_EQ_INT(nsent, 1);
	T_EQ_INT(w.nruns, 1);
	ctx_reply_v3("r3-9", 200, upstream_url("sse"), 0, 0);
	ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);
	T_EQ_INT(ip, 1);
	check_failed(ip, "canceled", 0, "", "", &sse);
	T_EQ_STR(event_names(sse), "conversation.chat.canceled done");
	free(sse);
	expect_done(2, "r3-9", 499, 0);
	(void)loop_run_once(w.svc.loop, 50);
	T_EQ_INT(srv.requests, 0);
	teardown();
}

static void
t_v3_messages(void)
{
	static const char msgs[] =
	        "[{\"role\":\"user\",\"type\":\"question\",\"content\":\"a\","
	        "\"content_type\":\"text\"},"
	        "{\"role\":\"assistant\",\"type\":\"answer\",\"content\":"
	        "\"b\","
	        "\"content_type\":\"text\"},"
	        "{\"role\":\"user\",\"type\":\"question\",\"content\":\"c\","
	        "\"content_type\":\"text\"}]";
	char aid[COZE_ID_LEN + 1];
	struct chat_persist p;
	char *text;
	cJSON *j, *e;
	int ip;

	setup();
	assign_v3("r3-10", "", 1, msgs, now_wall_ms() + 10000);
	ctx_reply_v3("r3-10", 200, upstream_url("sse"), 0, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	T_ASSERT(strstr(srv.last_body.b,
	                "[{\"role\":\"user\",\"content\":\"a\"},"
	                "{\"role\":\"assistant\",\"content\":\"b\"},"
	                "{\"role\":\"user\",\"content\":\"c\"}]") != NULL);
	ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);
	T_EQ_INT(chat_persist_decode(sent[ip].body.b, sent[ip].body.len, &p),
	         0);
	text = mstr_dup(p.messages);
	j = cJSON_Parse(text);
	T_EQ_INT(cJSON_GetArraySize(j), 4);
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 1), "type"), "answer");
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 2), "content"), "c");
	e = cJSON_GetArrayItem(j, 3);
	coze_msg_id_of(MSTR(CHAT_ID), 3, aid);
	T_EQ_STR(jstr(e, "id"), aid); /* the answer follows the request's */
	T_EQ_STR(jstr(e, "content"), "Hello");
	cJSON_Delete(j);
	free(text);
	teardown();
}

/* --- v3.chat with plugins (tool calls) --- */

static void
ctx_reply_tools(const char *reqid, const char *plugins, uint64_t total_ms)
{
	struct ctx_reply c = {.status = 200,
	                      .code = 0,
	                      .msg = MSTR(""),
	                      .upstream = MSTR(upstream_url("tool")),
	                      .model = MSTR("sim-1"),
	                      .system_prompt = MSTR_NULL,
	                      .context_turns = 5,
	                      .context = MSTR_NULL,
	                      .plugins = MSTR(plugins),
	                      .created_at = 1763790000,
	                      .first_event_ms = 0,
	                      .total_ms = total_ms};
	struct msg m = envelope(MSG_CTX_REPLY, "storage", reqid, "", 0,
	                        ctx_reply_pack, &c);
	struct ctx_reply d;

	T_EQ_INT(ctx_reply_unpack(&m, &d), 0);
	worker_run_ctx(&w, &m, &d);
}

/* The events of a tool round asking for n calls (name, arguments): one
 * chunk each, then finish, usage 7 + 3, [DONE]. */
static const char *
tool_sse(int n, const char *const *names, const char *const *args)
{
	static char text[8192];
	size_t len = 0;

	for (int i = 0; i < n; i++) {
		cJSON *a = cJSON_CreateString(args[i]);
		char *as = cJSON_PrintUnformatted(a);

		len += (size_t)snprintf(
		        text + len, sizeof(text) - len,
		        "data: {\"choices\":[{\"index\":0,\"delta\":{"
		        "\"tool_calls\":[{\"index\":%d,\"id\":\"call_%d\","
		        "\"type\":\"function\",\"function\":{\"name\":\"%s\","
		        "\"arguments\":%s}}]}}]}\n\n",
		        i, i, names[i], as);
		free(as);
		cJSON_Delete(a);
	}
	(void)snprintf(text + len, sizeof(text) - len,
	               "data: {\"choices\":[{\"index\":0,\"delta\":{},"
	               "\"finish_reason\":\"tool_calls\"}]}\n\n"
	               "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,"
	               "\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
	return (text);
}

/* Every event the client got: the CHAT_EVENTs and the persist's reply. */
static char *
all_events(void)
{
	struct buf b = {0};
	struct chat_persist p;
	struct chat_event e;
	int ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);

	for (int i = 0; i < nsent; i++)
		if (sent[i].type == MSG_CHAT_EVENT &&
		    chat_event_decode(sent[i].body.b, sent[i].body.len, &e) ==
		            0)
			(void)buf_add(&b, e.sse.p, e.sse.n);
	T_ASSERT(ip >= 0);
	T_EQ_INT(chat_persist_decode(sent[ip].body.b, sent[ip].body.len, &p),
	         0);
	(void)buf_add(&b, p.reply.p, p.reply.n);
	(void)buf_add(&b, "", 1);
	return (b.b);
}

/* The persisted chat: its decoded body and its messages (parsed). */
static cJSON *
persisted(struct chat_persist *p)
{
	int ip = find_sent(MSG_CHAT_PERSIST, "storage", 0);
	char *text;
	cJSON *j;

	T_ASSERT(ip >= 0);
	T_EQ_INT(chat_persist_decode(sent[ip].body.b, sent[ip].body.len, p),
	         0);
	text = mstr_dup(p->messages);
	j = cJSON_Parse(text);
	free(text);
	T_ASSERT(cJSON_IsArray(j));
	return (j);
}

static const struct fake_req *
plug_req(const char *body)
{
	for (int i = 0; i < srv.nreqs; i++)
		if (strcmp(srv.reqs[i].body.b, body) == 0)
			return (&srv.reqs[i]);
	T_FAIL("no plugin request with body %s", body);
	return (NULL);
}

/* The value of header name in a request head ("" if none). */
static const char *
head_value(const char *head, const char *name)
{
	static char v[256];
	char want[96];
	const char *p;

	snprintf(want, sizeof(want), "\r\n%s: ", name);
	v[0] = '\0';
	if ((p = strcasestr(head, want)) != NULL)
		snprintf(v, sizeof(v), "%.*s",
		         (int)strcspn(p + strlen(want), "\r"),
		         p + strlen(want));
	return (v);
}

static void
t_v3_tools_ok(void)
{
	/* Three calls, each split over chunks and interleaved. */
	static const char sse[] =
	        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":"
	        "\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,"
	        "\"id\":\"call_a\",\"type\":\"function\",\"function\":{"
	        "\"name\":\"ec\",\"arguments\":\"\"}}]}}]}\n\n"
	        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
	        "\"index\":0,\"function\":{\"name\":\"ho\",\"arguments\":"
	        "\"{\\\"a\\\"\"}}]}}]}\n\n"
	        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
	        "\"index\":1,\"id\":\"call_b\",\"function\":{\"name\":\"tok\","
	        "\"arguments\":\"{}\"}},{\"index\":2,\"id\":\"call_c\","
	        "\"function\":{\"name\":\"mac\",\"arguments\":\"{\\\"b\\\":\"}"
	        "}"
	        "]}}]}\n\n"
	        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
	        "\"index\":0,\"function\":{\"arguments\":\":1}\"}},{\"index\":"
	        "2,"
	        "\"function\":{\"arguments\":\"\\\"x\\\"}\"}}]}}]}\n\n"
	        "data: {\"choices\":[{\"index\":0,\"delta\":{},"
	        "\"finish_reason\":\"tool_calls\"}]}\n\n"
	        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,"
	        "\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
	char plugins[1024], id[COZE_ID_LEN + 1], *ev, want[256], sig[65];
	static const char *const types[] = {"question",      "function_call",
	                                    "function_call", "function_call",
	                                    "tool_response", "tool_response",
	                                    "tool_response", "answer"};
	const struct fake_req *q;
	struct chat_persist p;
	cJSON *j, *e;

	setup();
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"echo\",\"url\":\"%s\",\"description\":"
	         "\"echoes\",\"parameters\":{\"type\":\"object\"},"
	         "\"auth\":\"none\"},"
	         "{\"name\":\"tok\",\"url\":\"%s\",\"auth\":\"token\","
	         "\"header\":\"X-Key\",\"secret\":\"s3\"},"
	         "{\"name\":\"mac\",\"url\":\"%s\",\"auth\":\"hmac\","
	         "\"secret\":\"k3y\",\"timeout_ms\":2000}]",
	         upstream_url("plug/ok"), upstream_url("plug/ok"),
	         upstream_url("plug/ok"));
	srv.tool_sse = sse;
	srv.tool_rounds = 1;
	assign_v3("r4-1", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-1", plugins, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	expect_done(nsent - 1, "r4-1", 200, 200);

	/* The plugins: each called once with its arguments and auth. */
	T_EQ_INT(srv.nreqs, 3);
	q = plug_req("{\"a\":1}");
	T_EQ_STR(head_value(q->head.b, "X-Key"), "");
	T_EQ_STR(head_value(q->head.b, "Authorization"), "");
	T_EQ_STR(head_value(q->head.b, "Content-Type"), "application/json");
	T_EQ_STR(head_value(q->head.b, "traceparent"), TP);
	q = plug_req("{}");
	T_EQ_STR(head_value(q->head.b, "X-Key"), "Bearer s3");
	T_EQ_STR(head_value(q->head.b, "X-Troupe-Signature"), "");
	q = plug_req("{\"b\":\"x\"}");
	T_EQ_STR(head_value(q->head.b, "X-Key"), "");
	{
		const char *ts = head_value(q->head.b, "X-Troupe-Timestamp");
		uint64_t t = strtoull(ts, NULL, 10);
		unsigned char mac[32];
		unsigned int ml = 0;
		char msg[64];
		int n = snprintf(msg, sizeof(msg), "%s.{\"b\":\"x\"}", ts);

		T_ASSERT(t + 5 >= now_wall_ms() / 1000 &&
		         t <= now_wall_ms() / 1000);
		/* Independent of worker_plugin_sign: OpenSSL here. */
		HMAC(EVP_sha256(), "k3y", 3, (unsigned char *)msg, (size_t)n,
		     mac, &ml);
		hex_encode(sig, mac, 32);
		sig[64] = '\0';
		snprintf(want, sizeof(want), "sha256=%s", sig);
		T_EQ_STR(head_value(q->head.b, "X-Troupe-Signature"), want);
	}
	/* The model's first request offered the tools; the second carried
	 * its calls and their results. */
	T_ASSERT(strstr(srv.last_body.b,
	                "\"tools\":[{\"type\":\"function\",\"function\":{"
	                "\"name\":\"echo\",\"description\":\"echoes\","
	                "\"parameters\":{\"type\":\"object\"}}}") != NULL);
	T_ASSERT(strstr(srv.last_body.b,
	                "{\"role\":\"assistant\",\"content\":null,"
	                "\"tool_calls\":[{\"id\":\"call_a\",\"type\":"
	                "\"function\",\"function\":{\"name\":\"echo\","
	                "\"arguments\":\"{\\\"a\\\":1}\"}},") != NULL);
	T_ASSERT(strstr(srv.last_body.b,
	                "{\"role\":\"tool\",\"tool_call_id\":\"call_a\","
	                "\"content\":\"{\\\"echo\\\":{\\\"a\\\":1}}\"}") !=
	         NULL);
	T_ASSERT(strstr(srv.last_body.b, "\"tool_call_id\":\"call_c\"") !=
	         NULL);

	/* What the client saw, in order. */
	ev = all_events();
	T_EQ_STR(event_names(ev),
	         "conversation.chat.created conversation.chat.in_progress "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.delta conversation.message.completed "
	         "conversation.chat.completed done");
	j = event_json(ev, "conversation.message.completed", 0);
	T_EQ_STR(jstr(j, "type"), "function_call");
	T_EQ_STR(jstr(j, "role"), "assistant");
	T_EQ_STR(jstr(j, "content"),
	         "{\"id\":\"call_a\",\"type\":\"function\",\"function\":{"
	         "\"name\":\"echo\",\"arguments\":\"{\\\"a\\\":1}\"}}");
	coze_msg_id_of(MSTR(CHAT_ID), 1, id);
	T_EQ_STR(jstr(j, "id"), id);
	cJSON_Delete(j);
	j = event_json(ev, "conversation.message.completed", 4);
	T_EQ_STR(jstr(j, "type"), "tool_response");
	T_EQ_STR(jstr(j, "content"), "{\"echo\":{}}");
	cJSON_Delete(j);
	j = event_json(ev, "conversation.message.completed", 6);
	T_EQ_STR(jstr(j, "type"), "answer");
	T_EQ_STR(jstr(j, "content"), "Done 3");
	coze_msg_id_of(MSTR(CHAT_ID), 7, id);
	T_EQ_STR(jstr(j, "id"), id);
	cJSON_Delete(j);
	j = event_json(ev, "conversation.chat.completed", 0);
	e = cJSON_GetObjectItemCaseSensitive(j, "usage");
	T_EQ_INT(jnum(e, "input_count"), 17); /* both rounds */
	T_EQ_INT(jnum(e, "output_count"), 4);
	cJSON_Delete(j);
	free(ev);

	/* Stored: the same messages, ids in order. */
	j = persisted(&p);
	T_EQ_MEM(p.status.p, p.status.n, "completed");
	T_EQ_MEM(p.answer.p, p.answer.n, "Done 3");
	T_EQ_INT(p.prompt_tokens, 17);
	T_EQ_INT(cJSON_GetArraySize(j), 8);
	for (int i = 0; i < 8; i++) {
		e = cJSON_GetArrayItem(j, i);
		coze_msg_id_of(MSTR(CHAT_ID), (unsigned)i, id);
		T_EQ_STR(jstr(e, "id"), id);
		T_EQ_STR(jstr(e, "type"), types[i]);
	}
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 5), "content"), "{\"echo\":{}}");
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 6), "content"),
	         "{\"echo\":{\"b\":\"x\"}}");
	cJSON_Delete(j);
	T_EQ_INT(w.nruns, 0);
	teardown();
}

/* The results (tool_response contents) stored for the chat. */
static void
check_results(const char *const *want, int n, const char *answer)
{
	struct chat_persist p;
	cJSON *j = persisted(&p);
	int k = 0;

	T_EQ_MEM(p.status.p, p.status.n, "completed");
	T_EQ_MEM(p.answer.p, p.answer.n, answer);
	for (int i = 0; i < cJSON_GetArraySize(j); i++) {
		cJSON *e = cJSON_GetArrayItem(j, i);

		if (strcmp(jstr(e, "type"), "tool_response") != 0)
			continue;
		T_ASSERT(k < n);
		if (strncmp(jstr(e, "content"), want[k], strlen(want[k])) != 0)
			T_FAIL("result %d: got %s, want %s...", k,
			       jstr(e, "content"), want[k]);
		k++;
	}
	T_EQ_INT(k, n);
	cJSON_Delete(j);
}

static void
t_v3_tools_failures(void)
{
	static const char *const names[] = {
	        "p500", "pgarb", "phang", "pdead", "nosuch", "echo", "echo"};
	static const char *const args[] = {"{}", "{}",      "{}", "{}",
	                                   "{}", "{\"a\":", "[1]"};
	static const char *const want[] = {
	        "{\"error\":\"plugin p500 answered status 500\"}",
	        "{\"error\":\"plugin pgarb answered invalid JSON\"}",
	        "{\"error\":\"plugin phang timed out\"}",
	        "{\"error\":\"plugin pdead unreachable: ",
	        "{\"error\":\"unknown tool: nosuch\"}",
	        "{\"error\":\"invalid arguments for echo: not a JSON "
	        "object\"}",
	        "{\"error\":\"invalid arguments for echo: not a JSON "
	        "object\"}",
	};
	char plugins[1024], dead[64];
	uint64_t t0;

	setup();
	snprintf(dead, sizeof(dead), "http://127.0.0.1:%d/x",
	         fake_dead_port());
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"p500\",\"url\":\"%s\"},",
	         upstream_url("plug/s500"));
	snprintf(plugins + strlen(plugins), sizeof(plugins) - strlen(plugins),
	         "{\"name\":\"pgarb\",\"url\":\"%s\"},",
	         upstream_url("plug/garbage"));
	snprintf(plugins + strlen(plugins), sizeof(plugins) - strlen(plugins),
	         "{\"name\":\"phang\",\"url\":\"%s\",\"timeout_ms\":200},",
	         upstream_url("plug/hang"));
	snprintf(plugins + strlen(plugins), sizeof(plugins) - strlen(plugins),
	         "{\"name\":\"pdead\",\"url\":\"%s\"},"
	         "{\"name\":\"echo\",\"url\":\"%s\"}]",
	         dead, upstream_url("plug/ok"));
	srv.tool_sse = tool_sse(7, names, args);
	srv.tool_rounds = 1;
	t0 = now_mono_ms();
	assign_v3("r4-2", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-2", plugins, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	/* The hanging plugin's own 200 ms, not the run's 10 s. */
	if (now_mono_ms() - t0 < 180 || now_mono_ms() - t0 > 2000)
		T_FAIL("took %llu ms, want ~200",
		       (unsigned long long)(now_mono_ms() - t0));
	expect_done(nsent - 1, "r4-2", 200, 200);
	/* The model still answered, with all 7 results. */
	check_results(want, 7, "Done 7");
	/* Broken arguments and an unknown tool call nothing. */
	for (int i = 0; i < srv.nreqs; i++)
		T_ASSERT(strcmp(srv.reqs[i].path, "/plug/ok") != 0);
	T_EQ_INT(srv.nreqs, 3); /* s500, garbage, hang */
	T_EQ_INT(worker_upstream_active(w.up), 0);
	teardown();
}

static void
t_v3_tools_parallel(void)
{
	static const char *const names[] = {"slow", "slow", "slow"};
	static const char *const args[] = {"{\"i\":0}", "{\"i\":1}",
	                                   "{\"i\":2}"};
	static const char *const want[] = {
	        "{\"slow\":true}", "{\"slow\":true}", "{\"slow\":true}"};
	char plugins[256];
	uint64_t t0;

	setup();
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"slow\",\"url\":\"%s\"}]",
	         upstream_url("plug/slow"));
	srv.tool_sse = tool_sse(3, names, args);
	srv.tool_rounds = 1;
	t0 = now_mono_ms();
	assign_v3("r4-3", "", 0, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-3", plugins, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	/* Three 300 ms plugins at once: about 300 ms, not 900. */
	if (now_mono_ms() - t0 < 280 || now_mono_ms() - t0 > 750)
		T_FAIL("took %llu ms, want ~300",
		       (unsigned long long)(now_mono_ms() - t0));
	T_EQ_INT(srv.nreqs, 3);
	check_results(want, 3, "Done 3");
	/* stream=0: no events at all. */
	T_EQ_INT(find_sent(MSG_CHAT_EVENT, "edge", 0), -1);
	teardown();
}

static void
t_v3_tools_rounds(void)
{
	static const char *const names[] = {"echo"};
	static const char *const args[] = {"{}"};
	struct chat_persist p;
	char plugins[256];
	cJSON *j;

	setup();
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"echo\",\"url\":\"%s\"}]",
	         upstream_url("plug/ok"));
	srv.tool_sse = tool_sse(1, names, args);
	srv.tool_rounds = 1000; /* it always asks again */
	assign_v3("r4-4", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-4", plugins, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	expect_done(nsent - 1, "r4-4", 502, 200);
	T_EQ_INT(srv.nreqs, 5);                /* five rounds ran */
	T_EQ_INT(srv.requests - srv.nreqs, 6); /* the sixth ask failed */
	j = persisted(&p);
	T_EQ_MEM(p.status.p, p.status.n, "failed");
	T_EQ_MEM(p.last_error.p, p.last_error.n,
	         "{\"code\":5020,\"msg\":\"too many tool rounds\"}");
	T_EQ_INT(cJSON_GetArraySize(j), 11); /* question, 5 x (call, result) */
	T_EQ_INT(p.prompt_tokens, 42);
	cJSON_Delete(j);
	teardown();

	/* [worker] max_tool_rounds. */
	setup();
	w.max_tool_rounds = 1;
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"echo\",\"url\":\"%s\"}]",
	         upstream_url("plug/ok"));
	srv.tool_sse = tool_sse(1, names, args);
	srv.tool_rounds = 1000;
	assign_v3("r4-5", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-5", plugins, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	expect_done(nsent - 1, "r4-5", 502, 200);
	T_EQ_INT(srv.nreqs, 1);
	T_EQ_INT(srv.requests, 3);
	teardown();
}

static void
t_v3_tools_cancel(void)
{
	static const char *const names[] = {"hang", "echo"};
	static const char *const args[] = {"{}", "{}"};
	struct chat_persist p;
	char plugins[512], *ev;
	cJSON *j;
	uint64_t until;

	setup();
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"hang\",\"url\":\"%s\"},"
	         "{\"name\":\"echo\",\"url\":\"%s\"}]",
	         upstream_url("plug/hang"), upstream_url("plug/ok"));
	srv.tool_sse = tool_sse(2, names, args);
	srv.tool_rounds = 1;
	assign_v3("r4-6", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-6", plugins, 0);
	until = now_mono_ms() + 3000;
	while (srv.nreqs < 2 && now_mono_ms() < until)
		(void)loop_run_once(w.svc.loop, 20);
	T_EQ_INT(srv.nreqs, 2);
	for (int i = 0; i < 5; i++)
		(void)loop_run_once(w.svc.loop, 20); /* echo answers */
	T_EQ_INT(srv.closed, 0);
	T_EQ_INT(find_sent(MSG_RUN_DONE, "dispatcher", 0), -1);
	cancel("c4-6", "edge-c", "");
	wait_type(MSG_RUN_DONE, "dispatcher", 1000);
	expect_done(nsent - 1, "r4-6", 499, 200);
	T_EQ_INT(worker_upstream_active(w.up), 0);
	/* The plugin saw its connection close. */
	until = now_mono_ms() + 1000;
	while (srv.closed == 0 && now_mono_ms() < until)
		(void)loop_run_once(w.svc.loop, 20);
	T_ASSERT(srv.closed >= 1);
	j = persisted(&p);
	T_EQ_MEM(p.status.p, p.status.n, "canceled");
	/* What was streamed: the question and the two calls; no result
	 * (the round had not ended). */
	T_EQ_INT(cJSON_GetArraySize(j), 3);
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 2), "type"), "function_call");
	cJSON_Delete(j);
	ev = all_events();
	T_EQ_STR(event_names(ev),
	         "conversation.chat.created conversation.chat.in_progress "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.chat.canceled done");
	free(ev);
	teardown();
}

static void
t_v3_tools_text_first(void)
{
	/* The model says something, then asks: its text is an answer of
	 * its own (streamed, completed, stored) before the call. */
	static const char sse[] =
	        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":"
	        "\"Let me look.\"}}]}\n\n"
	        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
	        "\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"echo\","
	        "\"arguments\":\"{}\"}}]}}]}\n\n"
	        "data: {\"choices\":[{\"index\":0,\"delta\":{},"
	        "\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n";
	static const char *const types[] = {"question", "answer",
	                                    "function_call", "tool_response",
	                                    "answer"};
	struct chat_persist p;
	char plugins[256], *ev;
	cJSON *j;

	setup();
	snprintf(plugins, sizeof(plugins),
	         "[{\"name\":\"echo\",\"url\":\"%s\"}]",
	         upstream_url("plug/ok"));
	srv.tool_sse = sse;
	srv.tool_rounds = 1;
	assign_v3("r4-7", "", 1, MSGS1, now_wall_ms() + 10000);
	ctx_reply_tools("r4-7", plugins, 0);
	wait_type(MSG_RUN_DONE, "dispatcher", 5000);
	j = persisted(&p);
	T_EQ_INT(cJSON_GetArraySize(j), 5);
	for (int i = 0; i < 5; i++)
		T_EQ_STR(jstr(cJSON_GetArrayItem(j, i), "type"), types[i]);
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 1), "content"), "Let me look.");
	T_EQ_STR(jstr(cJSON_GetArrayItem(j, 4), "content"), "Done 1");
	cJSON_Delete(j);
	ev = all_events();
	T_EQ_STR(event_names(ev),
	         "conversation.chat.created conversation.chat.in_progress "
	         "conversation.message.delta conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.completed "
	         "conversation.message.delta conversation.message.completed "
	         "conversation.chat.completed done");
	/* The assistant message the model gets back keeps its text. */
	T_ASSERT(strstr(srv.last_body.b,
	                "{\"role\":\"assistant\",\"content\":\"Let me "
	                "look.\",\"tool_calls\":[") != NULL);
	free(ev);
	teardown();
}

T_TESTS = {
        {"chat_id", t_chat_id},
        {"chat_id_unique", t_chat_id_unique},
        {"chat_id_of_request", t_chat_id_of_request},
        {"conv_id", t_conv_id},
        {"reply_json", t_reply_json},
        {"run_ok", t_run_ok},
        {"run_new_conversation", t_run_new_conversation},
        {"run_duplicates", t_run_duplicates},
        {"run_many", t_run_many},
        {"run_ctx_error", t_run_ctx_error},
        {"run_ctx_undecodable", t_run_ctx_undecodable},
        {"run_upstream_429", t_run_upstream_429},
        {"run_upstream_503_coze", t_run_upstream_503_coze},
        {"signal_merge", t_signal_merge},
        {"pause_table", t_pause_table},
        {"run_upstream_invalid", t_run_upstream_invalid},
        {"run_upstream_deadline", t_run_upstream_deadline},
        {"run_bad_url", t_run_bad_url},
        {"run_storage_silent", t_run_storage_silent},
        {"run_refusals", t_run_refusals},
        {"run_persist_refused", t_run_persist_refused},
        {"run_no_deadline", t_run_no_deadline},
        {"run_queued_deadline", t_run_queued_deadline},
        {"v3_stream_ok", t_v3_stream_ok},
        {"v3_nonstream", t_v3_nonstream},
        {"v3_busy", t_v3_busy},
        {"v3_upstream_failed", t_v3_upstream_failed},
        {"v3_first_event_deadline", t_v3_first_event_deadline},
        {"v3_first_event_config", t_v3_first_event_config},
        {"v3_cancel", t_v3_cancel},
        {"v3_cancel_before_ctx", t_v3_cancel_before_ctx},
        {"v3_messages", t_v3_messages},
        {"v3_tools_ok", t_v3_tools_ok},
        {"v3_tools_failures", t_v3_tools_failures},
        {"v3_tools_parallel", t_v3_tools_parallel},
        {"v3_tools_rounds", t_v3_tools_rounds},
        {"v3_tools_cancel", t_v3_tools_cancel},
        {"v3_tools_text_first", t_v3_tools_text_first},
        {NULL, NULL},
};
T_MAIN
