/* SPDX-License-Identifier: ISC */
/*
 * coze_test: the Coze objects as the SDK reads them (exact JSON for a
 * known chat and message, escaping of hostile content, the SSE framing)
 * and the ids (19 digits, stable per request, distinct across requests).
 */
#include <stdio.h>
#include <string.h>

#include "coze.h"
#include "t.h"

static void
t_chat_json(void)
{
	struct buf b = {0};
	struct coze_chat c = {.id = MSTR_LIT("7400000000000000008"),
	                      .conversation_id =
	                              MSTR_LIT("7400000000000000007"),
	                      .bot_id = MSTR_LIT("bot\"1"),
	                      .status = "completed",
	                      .created_at = 1718609571,
	                      .completed_at = 1718609572,
	                      .input_tokens = 10,
	                      .output_tokens = 5};

	T_EQ_INT(coze_chat_json(&b, &c), 0);
	T_EQ_MEM(b.b, b.len,
	         "{\"id\":\"7400000000000000008\",\"conversation_id\":"
	         "\"7400000000000000007\",\"bot_id\":\"bot\\\"1\",\"created_"
	         "at\":"
	         "1718609571,\"completed_at\":1718609572,\"last_error\":{"
	         "\"code\":"
	         "0,\"msg\":\"\"},\"status\":\"completed\",\"meta_data\":{},"
	         "\"usage\":{\"token_count\":15,\"output_count\":5,"
	         "\"input_count\":10}}");
	buf_reset(&b);
	c.status = "failed";
	c.completed_at = 0;
	c.failed_at = 1718609573;
	c.error_code = 5040;
	c.error_msg = MSTR_LIT("deadline\nexceeded");
	T_EQ_INT(coze_chat_json(&b, &c), 0);
	T_ASSERT(strstr(b.b,
	                "\"failed_at\":1718609573,\"last_error\":"
	                "{\"code\":5040,\"msg\":\"deadline\\nexceeded\"}") !=
	         NULL);
	T_ASSERT(strstr(b.b, "completed_at") == NULL);
	buf_free(&b);
}

static void
t_msg_and_sse(void)
{
	struct buf b = {0};
	struct coze_msg m = {
	        .id = MSTR_LIT("1"),
	        .conversation_id = MSTR_LIT("2"),
	        .bot_id = MSTR_LIT("3"),
	        .chat_id = MSTR_LIT("4"),
	        .role = MSTR_LIT("assistant"),
	        .type = MSTR_LIT("answer"),
	        .content = MSTR_LIT("line1\nline2 \"q\" \xe4\xbb\x8a"),
	        .content_type = MSTR_LIT("text"),
	        .created_at = 5,
	        .updated_at = 6};

	T_EQ_INT(coze_sse_msg(&b, "conversation.message.delta", &m), 0);
	T_EQ_MEM(
	        b.b, b.len,
	        "event:conversation.message.delta\ndata:{\"id\":\"1\","
	        "\"conversation_id\":\"2\",\"bot_id\":\"3\",\"chat_id\":\"4\","
	        "\"meta_data\":{},\"role\":\"assistant\",\"type\":\"answer\","
	        "\"content\":\"line1\\nline2 \\\"q\\\" \xe4\xbb\x8a\","
	        "\"content_type\":\"text\",\"created_at\":5,\"updated_at\":6}"
	        "\n\n");
	buf_reset(&b);
	T_EQ_INT(coze_sse_done(&b), 0);
	T_EQ_MEM(b.b, b.len, "event:done\ndata:\"[DONE]\"\n\n");
	buf_free(&b);
}

static void
t_ids(void)
{
	char a[COZE_ID_LEN + 1], a2[COZE_ID_LEN + 1], c[COZE_ID_LEN + 1];
	char m0[COZE_ID_LEN + 1], m1[COZE_ID_LEN + 1];

	coze_chat_id_of(MSTR_LIT("req-1"), a);
	coze_chat_id_of(MSTR_LIT("req-1"), a2);
	coze_chat_id_of(MSTR_LIT("req-2"), c);
	T_EQ_INT(strlen(a), COZE_ID_LEN);
	T_EQ_STR(a, a2);
	T_ASSERT(strcmp(a, c) != 0);
	T_ASSERT(coze_id_ok(MSTR(a)));
	coze_msg_id_of(MSTR(a), 0, m0);
	coze_msg_id_of(MSTR(a), 1, m1);
	T_EQ_INT(strlen(m0), COZE_ID_LEN);
	T_ASSERT(strcmp(m0, m1) != 0 && strcmp(m0, a) != 0);
	T_EQ_INT(coze_conv_id_new(c), 0);
	T_EQ_INT(strlen(c), COZE_ID_LEN);
	T_ASSERT(coze_id_ok(MSTR(c)));
	T_ASSERT(!coze_id_ok(MSTR_LIT("")));
	T_ASSERT(!coze_id_ok(MSTR_LIT("12a")));
	T_ASSERT(!coze_id_ok(MSTR_LIT("123456789012345678901234567890123")));
}

T_TESTS = {
        {"chat_json", t_chat_json},
        {"msg_and_sse", t_msg_and_sse},
        {"ids", t_ids},
        {NULL, NULL},
};
T_MAIN
