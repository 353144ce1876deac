/* SPDX-License-Identifier: ISC */
/*
 * fuzz_sse: what an upstream sends the worker (services/worker/
 * worker_upstream.c): a streamed chat completion (server-sent events with
 * content deltas, tool-call pieces, usage, errors), fed in pieces whose
 * sizes the first bytes choose, and a whole JSON answer classified as a
 * status given by the input.  Properties: a stream's joined content stays
 * within its cap, tool calls within UPSTREAM_TOOLS_MAX, and the answer of
 * a classified call is a status the client may be given.
 */
#include "fuzz.h"
#include "worker_upstream.h"

static void
stream(const uint8_t *d, size_t n, const uint8_t *cuts, size_t ncuts)
{
	struct upstream_sse s;
	size_t off = 0, i = 0;

	memset(&s, 0, sizeof(s));
	s.max = 4096;
	while (off < n) {
		size_t k = ncuts ? 1 + (size_t)cuts[i++ % ncuts] % 64 : n;

		if (k > n - off)
			k = n - off;
		if (worker_upstream_sse_feed(&s, (const char *)d + off, k) ==
		    -1)
			break;
		off += k;
	}
	if (off == n)
		(void)worker_upstream_sse_end(&s);
	fuzz_assert(s.content.len <= s.max);
	fuzz_assert(s.ntools <= UPSTREAM_TOOLS_MAX);
	worker_upstream_sse_free(&s);
}

static void
whole(const uint8_t *d, size_t n, long http)
{
	struct upstream_answer a;
	char *body, *ra;
	size_t ran;

	ra = fuzz_field(&d, &n, '\n', &ran);
	body = fuzz_strdup(d, n);
	if (ra && body) {
		memset(&a, 0, sizeof(a));
		if (worker_upstream_classify(&a, CURLE_OK, http, ra, 0, body,
		                             n) == 0) {
			fuzz_assert(a.status == 200 || a.status == 429 ||
			            (a.status >= 500 && a.status <= 504));
			fuzz_assert(a.status != 200 || a.content != NULL);
			free(a.content);
			worker_upstream_tools_free(a.tools, a.ntools);
		}
		fuzz_assert(worker_upstream_retry_after(ra) >= 1 &&
		            worker_upstream_retry_after(ra) <= 3600);
	}
	free(ra);
	free(body);
}

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	static const long statuses[] = {200, 200, 400, 429, 500, 503};
	size_t ncuts;

	if (n < 2)
		return (0);
	if (d[0] & 1) {
		whole(d + 1, n - 1, statuses[(d[0] >> 1) % nitems(statuses)]);
		return (0);
	}
	/* d[1] cut sizes follow, then the stream */
	ncuts = d[1] % 16;
	if (ncuts > n - 2)
		ncuts = n - 2;
	stream(d + 2 + ncuts, n - 2 - ncuts, d + 2, ncuts);
	return (0);
}
