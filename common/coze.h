/* SPDX-License-Identifier: ISC */
/*
 * coze: the objects of Coze's v3 chat API as Troupe renders them, once,
 * for every process that answers a client: the worker (stream events, the
 * chat in progress), storage (retrieve, message list, cancel) and the edge
 * (a stream that fails before its run could say so).  Ids are decimal
 * strings, as Coze's; times are unix seconds.  docs/api.md shows every
 * shape.  Never logs, never allocates except in the caller's buf.
 */
#ifndef TROUPE_COZE_H
#define TROUPE_COZE_H

#include <stdint.h>

#include "util.h"

#define COZE_ID_LEN 19 /* decimal digits of a chat, message or conv id */

/* A chat (Coze "Chat" object). */
struct coze_chat {
	struct mstr id;
	struct mstr conversation_id;
	struct mstr bot_id;
	const char *status; /* created, in_progress, completed, failed,
	                       requires_action, canceled */
	uint64_t created_at;
	uint64_t completed_at; /* 0: not rendered */
	uint64_t failed_at;    /* 0: not rendered */
	int64_t error_code;    /* last_error.code, 0: none */
	struct mstr error_msg;
	uint64_t input_tokens;
	uint64_t output_tokens;
};

/* A message (Coze "Message" object). */
struct coze_msg {
	struct mstr id;
	struct mstr conversation_id;
	struct mstr bot_id;
	struct mstr chat_id;
	struct mstr role; /* user, assistant */
	struct mstr type; /* question, answer, function_call,
	                     tool_output, tool_response, follow_up,
	                     verbose */
	struct mstr content;
	struct mstr content_type; /* text */
	uint64_t created_at;
	uint64_t updated_at;
};

/* Append the JSON object of a chat / a message.  0, or -1 on ENOMEM. */
int coze_chat_json(struct buf *, const struct coze_chat *);
int coze_msg_json(struct buf *, const struct coze_msg *);

/* Append one server-sent event: "event:<event>\ndata:<data>\n\n".  data
 * must be one line (JSON as rendered here is). */
int coze_sse(struct buf *, const char *event, const char *data, size_t len);
/* Append the stream's last event: event:done, data:"[DONE]". */
int coze_sse_done(struct buf *);
/* Append "event:conversation.chat.<status>" with the chat's JSON. */
int coze_sse_chat(struct buf *, const char *event, const struct coze_chat *);
/* Append "event:<event>" with the message's JSON. */
int coze_sse_msg(struct buf *, const char *event, const struct coze_msg *);

/* The id of the chat created by request id reqid: 19 decimal digits,
 * always the same for the same request id (so a run executed twice after
 * a crash is stored once), NUL-terminated. */
void coze_chat_id_of(struct mstr reqid, char out[COZE_ID_LEN + 1]);
/* The id of message number idx of chat chat_id: 19 digits, stable. */
void coze_msg_id_of(struct mstr chat_id, unsigned idx,
                    char out[COZE_ID_LEN + 1]);
/* A new random conversation id: 19 digits.  -1 without randomness. */
int coze_conv_id_new(char out[COZE_ID_LEN + 1]);
/* Whether s looks like one of our ids: 1 to 32 decimal digits (Coze's
 * own ids, which clients may bring, are 19). */
int coze_id_ok(struct mstr s);

#endif
