/* SPDX-License-Identifier: ISC */
/*
 * storage_drive: talks to a running troupe-storage through a real mailbox,
 * for the integration tests (Python's harness cannot speak nng) and for
 * trying storage by hand.  Not a test itself.
 *
 *   storage_drive -c troupe.conf -n worker-90 [-t ms] < commands
 *
 * Reads one JSON command per line on stdin, sends it to "storage" with
 * reply_to = its own mailbox, and prints every answer as one JSON line:
 *
 *   {"cmd":"ctx","bot_id":"b","conversation_id":"c"}
 *   {"cmd":"persist","chat_id":"x","conversation_id":"c","bot_id":"b",
 *    "user_id":"u","query":"q","answer":"a","prompt_tokens":1,
 *    "completion_tokens":2,"context_turns":10,"reply":"{}"}
 *   {"cmd":"admin","op":"bot.add","args":{"id":"b","upstream":"http://x"}}
 *   v3: ctx takes "chat_id", "user_id", "lock_ms" (and "nonce", the
 *   webhook's); persist takes "route",
 *   "status", "reply_kind", "messages" and "last_error" (a string, or
 *   JSON that is sent as its text), "created_at";
 *   {"cmd":"query","route":"v3.retrieve","chat_id":"1",
 *    "conversation_id":"2"}   CHAT_QUERY (mailbox auth-* or dispatcher*)
 *   {"cmd":"keycheck","hash":"<64 hex>"}   KEY_CHECK (mailbox auth-*)
 *   {"cmd":"limit","key":"t|b|r","limit":5,"window_ms":1000,"burst":0,
 *    "cost":1}   LIMIT_CHECK (mailbox auth-*)
 * "noreply":true on a command: no answer is expected (reply_kind 2).
 *   {"cmd":"bad","type":769}      an undecodable body of that type
 *   {"cmd":"wait","timeout_ms":5000}   until every answer is in
 *   {"cmd":"sleep","ms":100}
 * Any command may carry "reqid" and "deadline_ms" (absolute; a negative
 * value is relative to now); persist takes "query_hex" for raw bytes.  At
 * the end of input it waits for what is outstanding (-t ms, default
 * 10000) and exits 0, or 3 if answers are missing.
 * The mailbox name decides what storage accepts: worker-* for ctx and
 * persist, troupectl-* for admin.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "conf.h"
#include "ipc.h"
#include "proto.h"
#include "util.h"

static const char *self = "worker-90";
static long outstanding;
static struct buf out;

static void
out_str(const char *k, struct mstr v)
{
	buf_addf(&out, ",\"%s\":", k);
	buf_add_json_str(&out, v.p, v.n);
}

static void
on_msg(void *arg, const struct msg *m)
{
	const char *name = msg_name(m->type);
	struct ctx_reply cr;
	struct chat_reply ch;
	struct admin_reply ar;
	struct chat_event ev;
	struct key_reply kr;
	struct limit_reply lr;

	(void)arg;
	buf_reset(&out);
	buf_addf(&out, "{\"type\":\"%s\"", name ? name : "?");
	out_str("reqid", m->reqid);
	out_str("traceparent", m->traceparent);
	buf_addf(&out, ",\"deadline_ms\":%llu",
	         (unsigned long long)m->deadline_ms);
	switch (m->type) {
	case MSG_CTX_REPLY:
		if (ctx_reply_unpack(m, &cr) == -1)
			goto bad;
		buf_addf(&out, ",\"status\":%llu,\"code\":%lld",
		         (unsigned long long)cr.status, (long long)cr.code);
		out_str("msg", cr.msg);
		out_str("upstream", cr.upstream);
		out_str("model", cr.model);
		out_str("system_prompt", cr.system_prompt);
		buf_addf(&out, ",\"context_turns\":%llu",
		         (unsigned long long)cr.context_turns);
		out_str("context", cr.context);
		out_str("plugins", cr.plugins);
		buf_addf(&out,
		         ",\"created_at\":%llu,\"first_event_ms\":%llu,"
		         "\"total_ms\":%llu",
		         (unsigned long long)cr.created_at,
		         (unsigned long long)cr.first_event_ms,
		         (unsigned long long)cr.total_ms);
		break;
	case MSG_CHAT_EVENT:
		if (chat_event_unpack(m, &ev) == -1)
			goto bad;
		out_str("sse", ev.sse);
		buf_addf(&out, ",\"last\":%llu", (unsigned long long)ev.last);
		break;
	case MSG_LIMIT_REPLY:
		if (limit_reply_unpack(m, &lr) == -1)
			goto bad;
		out_str("key", lr.key);
		buf_addf(&out,
		         ",\"status\":%llu,\"remaining\":%llu,"
		         "\"retry_after_ms\":%llu,\"reset_ms\":%llu",
		         (unsigned long long)lr.status,
		         (unsigned long long)lr.remaining,
		         (unsigned long long)lr.retry_after_ms,
		         (unsigned long long)lr.reset_ms);
		break;
	case MSG_KEY_REPLY:
		if (key_reply_unpack(m, &kr) == -1)
			goto bad;
		out_str("hash", kr.hash);
		buf_addf(&out, ",\"status\":%llu",
		         (unsigned long long)kr.status);
		out_str("sub", kr.sub);
		out_str("scopes", kr.scopes);
		break;
	case MSG_CHAT_REPLY:
		if (chat_reply_unpack(m, &ch) == -1)
			goto bad;
		buf_addf(&out, ",\"status\":%llu,\"code\":%lld",
		         (unsigned long long)ch.status, (long long)ch.code);
		out_str("msg", ch.msg);
		out_str("data", ch.data);
		buf_addf(&out, ",\"retry_after\":%llu",
		         (unsigned long long)ch.retry_after);
		break;
	case MSG_ADMIN_REPLY:
		if (admin_reply_unpack(m, &ar) == -1)
			goto bad;
		buf_addf(&out, ",\"status\":%llu",
		         (unsigned long long)ar.status);
		out_str("text", ar.text);
		break;
	default:
		break;
	}
	buf_adds(&out, "}\n");
	outstanding--;
	fwrite(out.b, 1, out.len, stdout);
	fflush(stdout);
	return;
bad:
	printf("{\"type\":\"%s\",\"error\":\"undecodable\"}\n",
	       name ? name : "?");
	fflush(stdout);
	outstanding--;
}

static void
pump(struct ipc *ipc, int ms)
{
	struct pollfd p = {ipc_fd(ipc), POLLIN, 0};
	uint64_t end = now_mono_ms() + (uint64_t)ms;

	do {
		(void)poll(&p, 1, ms > 0 ? IPC_TICK_MS : 0);
		ipc_process(ipc);
		ipc_tick(ipc);
	} while (now_mono_ms() < end);
}

static int
wait_all(struct ipc *ipc, int ms)
{
	uint64_t end = now_mono_ms() + (uint64_t)ms;

	while (outstanding > 0 && now_mono_ms() < end)
		pump(ipc, IPC_TICK_MS);
	/* A few more ticks so the acks leave. */
	pump(ipc, 3 * IPC_TICK_MS);
	return (outstanding > 0 ? -1 : 0);
}

static struct mstr
jstr(const cJSON *o, const char *k)
{
	const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);

	if (cJSON_IsString(it) && it->valuestring != NULL)
		return (MSTR(it->valuestring));
	return (MSTR_NULL);
}

/* A string as it is, anything else as its JSON text (in *tmp). */
static struct mstr
jtext(const cJSON *o, const char *k, char **tmp)
{
	const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);

	if (it == NULL)
		return (MSTR_NULL);
	if (cJSON_IsString(it))
		return (MSTR(it->valuestring));
	free(*tmp);
	if ((*tmp = cJSON_PrintUnformatted(it)) == NULL)
		return (MSTR_NULL);
	return (MSTR(*tmp));
}

static double
jnum(const cJSON *o, const char *k, double def)
{
	const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);

	return (cJSON_IsNumber(it) ? it->valuedouble : def);
}

static int
pack_nil(msgpack_packer *pk, const void *b)
{
	(void)b;
	return (msgpack_pack_nil(pk));
}

int
main(int argc, char **argv)
{
	const char *cfg = getenv("TROUPE_CONFIG");
	char line[1 << 20], err[256], reqid[64], *args = NULL;
	struct ipc *ipc;
	unsigned long n = 0;
	int ch, final_ms = 10000;
	char *raw = NULL, *t1 = NULL, *t2 = NULL;

	while ((ch = getopt(argc, argv, "c:n:t:")) != -1) {
		switch (ch) {
		case 'c':
			cfg = optarg;
			break;
		case 'n':
			self = optarg;
			break;
		case 't':
			final_ms = atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: storage_drive [-c conf] "
			                "[-n mailbox] [-t ms] < commands\n");
			return (2);
		}
	}
	if (conf_load(cfg, cfg == NULL, err, sizeof(err)) == -1) {
		fprintf(stderr, "config: %s\n", err);
		return (2);
	}
	if ((ipc = ipc_open(self, on_msg, NULL, err, sizeof(err))) == NULL) {
		fprintf(stderr, "ipc_open %s: %s\n", self, err);
		return (2);
	}
	while (fgets(line, sizeof(line), stdin) != NULL) {
		cJSON *o = cJSON_Parse(line);
		struct msg_head h;
		const char *cmd;
		double dl;
		int rc = 0;

		if (o == NULL) {
			if (line[0] != '\n' && line[0] != '#')
				fprintf(stderr, "bad command: %s", line);
			continue;
		}
		cmd = jstr(o, "cmd").p;
		snprintf(reqid, sizeof(reqid), "drive-%lu", ++n);
		h.reqid = jstr(o, "reqid").n ? jstr(o, "reqid") : MSTR(reqid);
		h.traceparent = jstr(o, "traceparent");
		dl = jnum(o, "deadline_ms", 0);
		h.deadline_ms =
		        dl < 0 ? now_wall_ms() + (uint64_t)-dl : (uint64_t)dl;
		h.reply_to = MSTR(self);
		if (strcmp(cmd, "ctx") == 0) {
			struct ctx_get b = {0};
			b.bot_id = jstr(o, "bot_id");
			b.conversation_id = jstr(o, "conversation_id");
			b.chat_id = jstr(o, "chat_id");
			b.user_id = jstr(o, "user_id");
			b.lock_ms = (uint64_t)jnum(o, "lock_ms", 0);
			b.nonce = jstr(o, "nonce");
			rc = msg_send_ctx_get(ipc, "storage", &h, &b);
		} else if (strcmp(cmd, "persist") == 0) {
			struct chat_persist b = {0};
			b.chat_id = jstr(o, "chat_id");
			b.conversation_id = jstr(o, "conversation_id");
			b.bot_id = jstr(o, "bot_id");
			b.user_id = jstr(o, "user_id");
			b.query = jstr(o, "query");
			if (jstr(o, "query_hex").n > 0) {
				struct mstr hx = jstr(o, "query_hex");
				uint32_t i;
				free(raw);
				if ((raw = malloc(hx.n / 2 + 1)) == NULL)
					return (2);
				for (i = 0; i + 1 < hx.n; i += 2) {
					unsigned v;
					sscanf(hx.p + i, "%2x", &v);
					raw[i / 2] = (char)v;
				}
				b.query = (struct mstr){raw, hx.n / 2};
			}
			b.answer = jstr(o, "answer");
			b.prompt_tokens =
			        (uint64_t)jnum(o, "prompt_tokens", 1);
			b.completion_tokens =
			        (uint64_t)jnum(o, "completion_tokens", 1);
			b.context_turns =
			        (uint64_t)jnum(o, "context_turns", 10);
			b.reply = jstr(o, "reply");
			b.route = jstr(o, "route");
			b.status = jstr(o, "status");
			b.reply_kind = (uint64_t)jnum(o, "reply_kind", 0);
			b.messages = jtext(o, "messages", &t1);
			b.last_error = jtext(o, "last_error", &t2);
			b.created_at = (uint64_t)jnum(o, "created_at", 0);
			rc = msg_send_chat_persist(ipc, "storage", &h, &b);
		} else if (strcmp(cmd, "query") == 0) {
			struct chat_request b = {0};
			b.route = jstr(o, "route");
			b.chat_id = jstr(o, "chat_id");
			b.history_id = jstr(o, "conversation_id");
			b.bot_id = jstr(o, "bot_id");
			rc = msg_send_chat_query(ipc, "storage", &h, &b);
		} else if (strcmp(cmd, "keycheck") == 0) {
			struct key_check b = {0};
			b.hash = jstr(o, "hash");
			rc = msg_send_key_check(ipc, "storage", &h, &b);
		} else if (strcmp(cmd, "limit") == 0) {
			struct limit_check b = {0};
			b.key = jstr(o, "key");
			b.limit = (uint64_t)jnum(o, "limit", 1);
			b.window_ms = (uint64_t)jnum(o, "window_ms", 1000);
			b.burst = (uint64_t)jnum(o, "burst", 0);
			b.cost = (uint64_t)jnum(o, "cost", 1);
			rc = msg_send_limit_check(ipc, "storage", &h, &b);
		} else if (strcmp(cmd, "admin") == 0) {
			struct admin_request b;
			const cJSON *a =
			        cJSON_GetObjectItemCaseSensitive(o, "args");
			free(args);
			args = a ? cJSON_PrintUnformatted(a) : strdup("");
			b.op = jstr(o, "op");
			b.args = MSTR(args ? args : "");
			rc = msg_send_admin_request(ipc, "storage", &h, &b);
		} else if (strcmp(cmd, "bad") == 0) {
			rc = ipc_send(ipc, "storage",
			              (uint16_t)jnum(o, "type", MSG_CTX_GET),
			              &h, pack_nil, NULL);
		} else if (strcmp(cmd, "wait") == 0) {
			if (wait_all(ipc, (int)jnum(o, "timeout_ms", 10000)) ==
			    -1)
				printf("{\"type\":\"TIMEOUT\",\"missing\":%ld}"
				       "\n",
				       outstanding);
			fflush(stdout);
			cJSON_Delete(o);
			continue;
		} else if (strcmp(cmd, "sleep") == 0) {
			pump(ipc, (int)jnum(o, "ms", 100));
			cJSON_Delete(o);
			continue;
		} else {
			fprintf(stderr, "unknown cmd: %s\n", cmd ? cmd : "?");
			cJSON_Delete(o);
			continue;
		}
		if (rc == -1)
			printf("{\"type\":\"SEND_REFUSED\"}\n");
		else if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(
		                 o, "noreply")))
			outstanding++;
		cJSON_Delete(o);
		/* Let the batch go out without waiting for replies. */
		pump(ipc, 0);
	}
	int rc = wait_all(ipc, final_ms);
	if (rc == -1)
		printf("{\"type\":\"TIMEOUT\",\"missing\":%ld}\n",
		       outstanding);
	fflush(stdout);
	free(args);
	free(raw);
	free(t1);
	free(t2);
	buf_free(&out);
	ipc_close(ipc);
	return (rc == -1 ? 3 : 0);
}
