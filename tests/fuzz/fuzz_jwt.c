/* SPDX-License-Identifier: ISC */
/*
 * fuzz_jwt: the bearer tokens troupe-auth reads (services/auth): a JWT
 * checked by auth_token_verify() (HS256 and a fixed key), and API keys
 * (auth_key_is_key, auth_key_hash, scope lists).  The first byte picks:
 * 0, the token as given (the fuzzer cannot sign: accepting it would be a
 * forgery); 1, "<header JSON>\n<claims JSON>" that the harness encodes and
 * signs with the key, so the claims checks behind the signature are
 * reached; 2, "<b64 header>.<b64 claims>" signed by the harness (the
 * base64url decoder).  Properties: nothing unsigned is accepted; an
 * accepted token has a sub of 1 to AUTH_SUB_MAX bytes and an exp; a
 * key's hash is 64 hex digits.
 */
#include <openssl/hmac.h>

#include "auth_key.h"
#include "auth_token.h"
#include "fuzz.h"

static struct auth_token_conf *conf;
static const char key[] = "fuzz-secret-fuzz-secret-fuzz-secret!";

/* Append base64url (no padding) of n bytes of d to out at *k. */
static void
b64url(char *out, size_t *k, const uint8_t *d, size_t n)
{
	static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop"
	                        "qrstuvwxyz0123456789-_";
	size_t i;

	for (i = 0; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 |
		             d[i + 2];
		out[(*k)++] = a[v >> 18 & 63];
		out[(*k)++] = a[v >> 12 & 63];
		out[(*k)++] = a[v >> 6 & 63];
		out[(*k)++] = a[v & 63];
	}
	if (n - i == 1) {
		uint32_t v = (uint32_t)d[i] << 16;
		out[(*k)++] = a[v >> 18 & 63];
		out[(*k)++] = a[v >> 12 & 63];
	} else if (n - i == 2) {
		uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8;
		out[(*k)++] = a[v >> 18 & 63];
		out[(*k)++] = a[v >> 12 & 63];
		out[(*k)++] = a[v >> 6 & 63];
	}
}

/* Verify "<signing input>.<our signature>"; check what is accepted. */
static void
signed_token(const char *in, size_t n)
{
	unsigned char mac[32];
	unsigned int maclen = sizeof(mac);
	struct auth_claims cl;
	const char *why;
	size_t k = n;
	char *t;

	if ((t = malloc(n + 1 + 44 + 1)) == NULL)
		return;
	memcpy(t, in, n);
	if (HMAC(EVP_sha256(), key, sizeof(key) - 1, (const uint8_t *)in, n,
	         mac, &maclen) == NULL) {
		free(t);
		return;
	}
	t[k++] = '.';
	b64url(t, &k, mac, maclen);
	t[k] = '\0';
	if (auth_token_verify(conf, t, k, 1700000000, &cl, &why) ==
	    AUTH_TOKEN_OK) {
		fuzz_assert(cl.sub_len >= 1 && cl.sub_len <= AUTH_SUB_MAX);
		fuzz_assert(strlen(cl.sub) == cl.sub_len);
		fuzz_assert(cl.exp >= 1700000000 - 30);
	}
	free(t);
}

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	struct auth_token_params p = {.algorithm = "HS256",
	                              .secret = key,
	                              .secret_len = sizeof(key) - 1,
	                              .leeway_s = 30};
	struct auth_claims cl;
	const char *why;
	char hash[65], *s, *h, *c, *in;
	size_t hn, cn, k;
	int sel;

	if (conf == NULL && (conf = auth_token_conf_new(&p, &why)) == NULL)
		abort();
	if (n < 1)
		return (0);
	sel = d[0] % 3;
	d++;
	n--;
	if (sel == 1) {
		h = fuzz_field(&d, &n, '\n', &hn);
		c = fuzz_strdup(d, n);
		cn = n;
		k = 0;
		if (h && c && (in = malloc(2 * (hn + cn) + 8)) != NULL) {
			b64url(in, &k, (const uint8_t *)h, hn);
			in[k++] = '.';
			b64url(in, &k, (const uint8_t *)c, cn);
			signed_token(in, k);
			free(in);
		}
		free(h);
		free(c);
		return (0);
	}
	if (sel == 2) {
		if (n <= AUTH_TOKEN_MAX)
			signed_token((const char *)d, n);
		return (0);
	}
	if ((s = fuzz_strdup(d, n)) == NULL)
		return (0);
	why = NULL;
	/* Without the key nothing is valid: OK would be a forgery. */
	fuzz_assert(auth_token_verify(conf, s, n, 1700000000, &cl, &why) !=
	            AUTH_TOKEN_OK);
	fuzz_assert(why != NULL);
	if (auth_key_is_key(s, n)) {
		fuzz_assert(auth_key_hash(s, n, hash) == 0);
		fuzz_assert(strlen(hash) == 64);
	}
	(void)auth_key_scope_ok((struct mstr){s, (uint32_t)n}, "chat");
	free(s);
	return (0);
}
