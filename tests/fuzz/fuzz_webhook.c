/* SPDX-License-Identifier: ISC */
/*
 * fuzz_webhook: a plugin webhook call as the edge checks it (services/
 * edge/edge_webhook.c): the X-Coze-Bot-ID, -Timestamp, -Nonce and
 * -Signature headers, the plugin parameter and the body, one per line.
 * With the first byte odd the harness signs the call itself with the
 * verify token and sets the clock to its timestamp, so the checks behind
 * the signature (the body's JSON) are reached too.  Properties: an
 * unsigned call is never accepted; an accepted one has a user_id and an
 * arguments object.
 */
#include <inttypes.h>

#include "edge_webhook.h"
#include "fuzz.h"

static struct mstr
ms(const char *s, size_t n)
{
	return ((struct mstr){s, (uint32_t)n});
}

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	static const char token[] = "fuzz-verify-token";
	struct edge_webhook_in in;
	struct edge_webhook out;
	char *f[5], sig[41], msg[256], *body;
	size_t fl[5];
	uint64_t now = 1700000000;
	int sign, r;

	if (n < 1)
		return (0);
	sign = d[0] & 1;
	d++;
	n--;
	for (int i = 0; i < 5; i++)
		f[i] = fuzz_field(&d, &n, '\n', &fl[i]);
	body = fuzz_strdup(d, n);
	if (body == NULL || !f[0] || !f[1] || !f[2] || !f[3] || !f[4])
		goto done;
	memset(&in, 0, sizeof(in));
	in.bot_id = ms(f[0], fl[0]);
	in.timestamp = ms(f[1], fl[1]);
	in.nonce = ms(f[2], fl[2]);
	in.signature = ms(f[3], fl[3]);
	in.plugin = ms(f[4], fl[4]);
	in.body = body;
	in.body_len = n;
	if (sign) {
		now = strtoull(f[1], NULL, 10);
		if (edge_webhook_sign(in.timestamp, in.nonce, token, body, n,
		                      sig) == -1)
			goto done;
		in.signature = ms(sig, 40);
	}
	r = edge_webhook_check(token, now, &in, &out, msg, sizeof(msg));
	if (r == 0) {
		fuzz_assert(sign || fl[3] == 40);
		fuzz_assert(out.user_id != NULL && out.user_id_len > 0);
		fuzz_assert(out.arguments != NULL && out.arguments[0] == '{');
		edge_webhook_free(&out);
	} else
		fuzz_assert(r >= 400 && r < 500 && strlen(msg) > 0);
done:
	for (int i = 0; i < 5; i++)
		free(f[i]);
	free(body);
	return (0);
}
