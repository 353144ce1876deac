/* SPDX-License-Identifier: ISC */
/*
 * fuzz_ratelimit: the rate-limit signals of an upstream's answer
 * (common/ratelimit.c): every header dialect, HTTP dates and Coze codes.
 * The input is "Name: value" lines; a line "status N" or "code N" sets
 * the status or a Coze code.  Properties: waits are within [0,
 * RL_MAX_WAIT_MS]; remaining is -1 or at least 0.
 */
#include <inttypes.h>

#include "fuzz.h"
#include "ratelimit.h"

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	struct rl_signal s;
	char *line, *colon;
	size_t len;
	int64_t b;

	rl_signal_init(&s);
	while (n > 0) {
		if ((line = fuzz_field(&d, &n, '\n', &len)) == NULL)
			return (0);
		if (len > 7 && memcmp(line, "status ", 7) == 0)
			rl_signal_status(&s, strtol(line + 7, NULL, 10));
		else if (len > 5 && memcmp(line, "code ", 5) == 0)
			rl_signal_coze_code(&s, strtoll(line + 5, NULL, 10));
		else if (len == 7 && memcmp(line, "timeout", 7) == 0)
			rl_signal_timeout(&s);
		else if ((colon = memchr(line, ':', len)) != NULL) {
			const char *v = colon + 1;
			size_t vn = len - (size_t)(v - line);

			rl_signal_header(&s, line, (size_t)(colon - line), v,
			                 vn, 1700000000000ULL);
			b = rl_http_date_ms(v, vn);
			fuzz_assert(b >= -1);
		}
		free(line);
	}
	rl_signal_finish(&s);
	(void)rl_signal_any(&s);
	b = rl_signal_backoff_ms(&s);
	fuzz_assert(b >= 0 && b <= (int64_t)RL_MAX_WAIT_MS);
	fuzz_assert(s.remaining >= -1);
	fuzz_assert(s.retry_after_ms >= -1 &&
	            s.retry_after_ms <= (int64_t)RL_MAX_WAIT_MS);
	return (0);
}
