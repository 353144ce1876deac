/* SPDX-License-Identifier: ISC */
/*
 * auth_token: HMAC-signed JWT verification (RFC 7515 compact form, RFC
 * 7519 claims, RFC 7518 HS256/384/512), written on OpenSSL's EVP_MAC and
 * cJSON instead of libjwt 1.10, which accepts "alg":"none" and empty keys,
 * compares MACs with strcmp and checks no claim (PITFALLS.md).
 *
 * Order of the checks, cheapest and least trusting first:
 *   1. size (empty: missing; over AUTH_TOKEN_MAX: too large), before any
 *      other work;
 *   2. shape: exactly two dots, only the base64url alphabet, no padding;
 *   3. header: strict base64url, one JSON object without duplicate or NUL
 *      names, "alg" exactly the configured name, "typ" JWT or at+jwt,
 *      no "crit" (we understand no extension);
 *   4. signature: exactly the MAC length, compared with CRYPTO_memcmp;
 *   5. payload (only now parsed, being authentic): a JSON object, then
 *      sub, exp, nbf, iat, iss, aud.
 *
 * Called by auth_dispatch.c and the unit test.  Never logs, never reads the
 * clock, never keeps a pointer into the token.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cjson/cJSON.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "auth_token.h"

/* Members a header may have; real ones have two to four. */
#define HEADER_MEMBERS_MAX 32
/* Decoded bytes of any part of a token that passed the size check. */
#define PART_MAX (AUTH_TOKEN_MAX / 4 * 3 + 3)
#define NALGS (sizeof(algs) / sizeof(algs[0]))

struct auth_token_conf {
	char alg[8];    /* canonical: "HS256" */
	char digest[8]; /* OpenSSL digest name: "SHA256" */
	size_t mac_len;
	EVP_MAC *mac;
	EVP_MAC_CTX *ctx; /* keyed once; re-initialised per token */
	int64_t leeway;
	char *audience; /* NULL: no check */
	char *issuer;   /* NULL: no check */
};

static const struct {
	const char *alg;
	const char *digest;
	size_t mac_len;
} algs[] = {
        {"HS256", "SHA256", 32},
        {"HS384", "SHA384", 48},
        {"HS512", "SHA512", 64},
};

static const char *const labels[AUTH_TOKEN_NVERDICTS] = {
        [AUTH_TOKEN_OK] = "ok",
        [AUTH_TOKEN_MISSING] = "missing",
        [AUTH_TOKEN_TOO_LARGE] = "too_large",
        [AUTH_TOKEN_MALFORMED] = "malformed",
        [AUTH_TOKEN_ALG] = "algorithm",
        [AUTH_TOKEN_BAD_SIGNATURE] = "bad_signature",
        [AUTH_TOKEN_EXPIRED] = "expired",
        [AUTH_TOKEN_NOT_YET_VALID] = "not_yet_valid",
        [AUTH_TOKEN_CLAIMS] = "invalid_claims",
        [AUTH_TOKEN_INTERNAL] = "internal",
};

/* The base64url alphabet (RFC 4648 §5); -1 for anything else. */
static int
b64url_val(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return (c - 'A');
	if (c >= 'a' && c <= 'z')
		return (c - 'a' + 26);
	if (c >= '0' && c <= '9')
		return (c - '0' + 52);
	if (c == '-')
		return (62);
	if (c == '_')
		return (63);
	return (-1);
}

/*
 * Decode unpadded base64url strictly: a length of 1 mod 4 and non-zero
 * leftover bits are refused, so each byte string has exactly one text
 * (no two spellings of one signature).  Returns the length, or -1.
 */
static long
b64url_decode(const char *s, size_t n, unsigned char *out, size_t cap)
{
	uint32_t acc = 0;
	size_t o = 0;
	int bits = 0, v;

	if (n % 4 == 1 || n / 4 * 3 + 2 > cap)
		return (-1);
	for (size_t i = 0; i < n; i++) {
		if ((v = b64url_val((unsigned char)s[i])) == -1)
			return (-1);
		acc = (acc << 6) | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[o++] = (unsigned char)(acc >> bits);
			acc &= (1u << bits) - 1;
		}
	}
	if (acc != 0)
		return (-1);
	return ((long)o);
}

/* Whether JSON text s holds a \u0000 escape (cJSON would cut the string
 * there, so "HS256\u0000x" would read as "HS256"). */
static int
has_nul_escape(const char *s)
{
	for (; *s != '\0'; s++) {
		if (*s != '\\')
			continue;
		if (s[1] == 'u' && strncmp(s + 2, "0000", 4) == 0)
			return (1);
		if (s[1] == '\0')
			return (0);
		s++;
	}
	return (0);
}

static int
name_cmp(const void *a, const void *b)
{
	return (strcmp(*(const char *const *)a, *(const char *const *)b));
}

/* Whether the object's members have distinct names (cJSON keeps them all
 * and finds the first; another parser would find the last).  -1 on
 * ENOMEM or more than max members. */
static int
names_unique(const cJSON *o, size_t max)
{
	const cJSON *c;
	const char **v;
	size_t n = 0, i;
	int ok = 1;

	for (c = o->child; c != NULL; c = c->next)
		n++;
	if (n > max)
		return (-1);
	if (n < 2)
		return (1);
	if ((v = calloc(n, sizeof(*v))) == NULL)
		return (-1);
	for (i = 0, c = o->child; c != NULL; c = c->next) {
		if (c->string == NULL) {
			ok = 0;
			goto done;
		}
		v[i++] = c->string;
	}
	qsort(v, n, sizeof(*v), name_cmp);
	for (i = 1; i < n; i++)
		if (strcmp(v[i - 1], v[i]) == 0)
			ok = 0;
done:
	free(v);
	return (ok);
}

/*
 * Decode one base64url part and parse it as a JSON object: no NUL byte,
 * no \u0000, nothing after the value, no duplicate member names.  NULL
 * if any of that fails (*nomem set on ENOMEM).
 */
static cJSON *
part_object(const char *s, size_t n, size_t max_members, int *nomem)
{
	unsigned char buf[PART_MAX + 1];
	const char *end;
	cJSON *j;
	long len;
	int u;

	*nomem = 0;
	if ((len = b64url_decode(s, n, buf, sizeof(buf) - 1)) <= 0)
		return (NULL);
	buf[len] = '\0';
	if (memchr(buf, '\0', (size_t)len) != NULL ||
	    has_nul_escape((const char *)buf))
		return (NULL);
	if ((j = cJSON_ParseWithOpts((const char *)buf, &end, 1)) == NULL)
		return (NULL);
	if (!cJSON_IsObject(j))
		goto fail;
	if ((u = names_unique(j, max_members)) != 1) {
		if (u == -1 && max_members == SIZE_MAX)
			*nomem = 1;
		goto fail;
	}
	return (j);
fail:
	cJSON_Delete(j);
	return (NULL);
}

/* Valid UTF-8 (no overlongs, no surrogates) without control characters. */
static int
text_ok(const unsigned char *s, size_t n)
{
	size_t i = 0, k;
	uint32_t cp;

	while (i < n) {
		unsigned char c = s[i];

		if (c < 0x80) {
			if (c < 0x20 || c == 0x7f)
				return (0);
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf) {
			k = 1;
			cp = c & 0x1f;
		} else if (c >= 0xe0 && c <= 0xef) {
			k = 2;
			cp = c & 0x0f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			k = 3;
			cp = c & 0x07;
		} else
			return (0);
		if (k >= n - i)
			return (0);
		for (size_t j = 1; j <= k; j++) {
			if ((s[i + j] & 0xc0) != 0x80)
				return (0);
			cp = (cp << 6) | (s[i + j] & 0x3f);
		}
		if ((k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
		    cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff) ||
		    (cp >= 0x80 && cp < 0xa0))
			return (0);
		i += k + 1;
	}
	return (1);
}

/* Header checks after the object is parsed. */
static enum auth_token_verdict
check_header(const struct auth_token_conf *c, const cJSON *h, const char **why)
{
	const cJSON *alg, *typ;

	alg = cJSON_GetObjectItemCaseSensitive(h, "alg");
	if (!cJSON_IsString(alg) || alg->valuestring == NULL) {
		*why = "malformed token";
		return (AUTH_TOKEN_MALFORMED);
	}
	/* Exact and case-sensitive (RFC 7515 §4.1.1); "none" never equals
	 * a configured HS name. */
	if (strcmp(alg->valuestring, c->alg) != 0) {
		*why = "algorithm not allowed";
		return (AUTH_TOKEN_ALG);
	}
	typ = cJSON_GetObjectItemCaseSensitive(h, "typ");
	if (typ != NULL && (!cJSON_IsString(typ) || typ->valuestring == NULL ||
	                    (strcasecmp(typ->valuestring, "JWT") != 0 &&
	                     strcasecmp(typ->valuestring, "at+jwt") != 0))) {
		*why = "malformed token";
		return (AUTH_TOKEN_MALFORMED);
	}
	/* RFC 7515 §4.1.11: an extension we do not know must be refused,
	 * and we know none (b64:false among them). */
	if (cJSON_GetObjectItemCaseSensitive(h, "crit") != NULL) {
		*why = "malformed token";
		return (AUTH_TOKEN_MALFORMED);
	}
	return (AUTH_TOKEN_OK);
}

/* A numeric date claim: 0 absent, 1 present (*v set), -1 wrong type. */
static int
date_claim(const cJSON *p, const char *name, double *v)
{
	const cJSON *j = cJSON_GetObjectItemCaseSensitive(p, name);

	if (j == NULL)
		return (0);
	if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble))
		return (-1);
	*v = j->valuedouble;
	return (1);
}

static enum auth_token_verdict
check_claims(const struct auth_token_conf *c, const cJSON *p, int64_t now,
             struct auth_claims *out, const char **why)
{
	const cJSON *sub, *iss, *aud, *e;
	double exp, nbf, iat, lo, hi;
	size_t n;
	int r, found;

	sub = cJSON_GetObjectItemCaseSensitive(p, "sub");
	if (sub == NULL) {
		*why = "invalid claims: sub missing";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (!cJSON_IsString(sub) || sub->valuestring == NULL) {
		*why = "invalid claims: sub not a string";
		return (AUTH_TOKEN_CLAIMS);
	}
	if ((n = strlen(sub->valuestring)) == 0) {
		*why = "invalid claims: sub empty";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (n > AUTH_SUB_MAX) {
		*why = "invalid claims: sub too long";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (!text_ok((const unsigned char *)sub->valuestring, n)) {
		*why = "invalid claims: sub not printable UTF-8";
		return (AUTH_TOKEN_CLAIMS);
	}

	/* now + leeway as a double: exact for any realistic clock. */
	hi = (double)now + (double)c->leeway;
	lo = (double)now - (double)c->leeway;
	if ((r = date_claim(p, "exp", &exp)) == 0) {
		*why = "invalid claims: exp missing";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (r == -1) {
		*why = "invalid claims: exp not a number";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (exp <= 0) {
		*why = "invalid claims: exp not positive";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (!(lo < exp)) { /* now >= exp + leeway */
		*why = "token expired";
		return (AUTH_TOKEN_EXPIRED);
	}
	if ((r = date_claim(p, "nbf", &nbf)) == -1) {
		*why = "invalid claims: nbf not a number";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (r == 1 && nbf > hi) {
		*why = "token not yet valid";
		return (AUTH_TOKEN_NOT_YET_VALID);
	}
	if ((r = date_claim(p, "iat", &iat)) == -1) {
		*why = "invalid claims: iat not a number";
		return (AUTH_TOKEN_CLAIMS);
	}
	if (r == 1 && iat > hi) {
		*why = "invalid claims: iat in the future";
		return (AUTH_TOKEN_CLAIMS);
	}

	if (c->issuer != NULL) {
		iss = cJSON_GetObjectItemCaseSensitive(p, "iss");
		if (iss == NULL) {
			*why = "invalid claims: iss missing";
			return (AUTH_TOKEN_CLAIMS);
		}
		if (!cJSON_IsString(iss) || iss->valuestring == NULL ||
		    strcmp(iss->valuestring, c->issuer) != 0) {
			*why = "invalid claims: iss mismatch";
			return (AUTH_TOKEN_CLAIMS);
		}
	}
	if (c->audience != NULL) {
		aud = cJSON_GetObjectItemCaseSensitive(p, "aud");
		if (aud == NULL) {
			*why = "invalid claims: aud missing";
			return (AUTH_TOKEN_CLAIMS);
		}
		found = 0;
		if (cJSON_IsString(aud) && aud->valuestring != NULL)
			found = strcmp(aud->valuestring, c->audience) == 0;
		else if (cJSON_IsArray(aud)) {
			cJSON_ArrayForEach(e, aud)
			{
				if (!cJSON_IsString(e) ||
				    e->valuestring == NULL) {
					*why = "invalid claims: aud not a "
					       "string or array of strings";
					return (AUTH_TOKEN_CLAIMS);
				}
				if (strcmp(e->valuestring, c->audience) == 0)
					found = 1;
			}
		} else {
			*why = "invalid claims: aud not a string or array "
			       "of strings";
			return (AUTH_TOKEN_CLAIMS);
		}
		if (!found) {
			*why = "invalid claims: aud mismatch";
			return (AUTH_TOKEN_CLAIMS);
		}
	}

	memcpy(out->sub, sub->valuestring, n);
	out->sub[n] = '\0';
	out->sub_len = n;
	out->exp = exp;
	*why = "";
	return (AUTH_TOKEN_OK);
}

struct auth_token_conf *
auth_token_conf_new(const struct auth_token_params *p, const char **why)
{
	struct auth_token_conf *c = NULL;
	OSSL_PARAM params[2];
	const char *name = p->algorithm ? p->algorithm : "HS256";
	size_t i, min;

	for (i = 0; i < NALGS; i++)
		if (strcasecmp(name, algs[i].alg) == 0)
			break;
	if (i == NALGS) {
		*why = "algorithm must be HS256, HS384 or HS512";
		return (NULL);
	}
	if (p->secret == NULL || p->secret_len == 0) {
		*why = "no JWT secret (credential jwt-secret or [auth] "
		       "jwt_secret)";
		return (NULL);
	}
	/* RFC 7518 §3.2: a key at least as long as the hash output. */
	min = algs[i].mac_len < AUTH_TOKEN_SECRET_MIN ? AUTH_TOKEN_SECRET_MIN
	                                              : algs[i].mac_len;
	if (p->secret_len < min) {
		*why = min == 32 ? "JWT secret shorter than 32 bytes"
		       : min == 48
		               ? "JWT secret shorter than 48 bytes (HS384)"
		               : "JWT secret shorter than 64 bytes (HS512)";
		return (NULL);
	}
	if (p->leeway_s < 0) {
		*why = "leeway must not be negative";
		return (NULL);
	}
	if ((c = calloc(1, sizeof(*c))) == NULL)
		goto nomem;
	snprintf(c->alg, sizeof(c->alg), "%s", algs[i].alg);
	snprintf(c->digest, sizeof(c->digest), "%s", algs[i].digest);
	c->mac_len = algs[i].mac_len;
	c->leeway = p->leeway_s;
	if (p->audience != NULL && p->audience[0] != '\0' &&
	    (c->audience = strdup(p->audience)) == NULL)
		goto nomem;
	if (p->issuer != NULL && p->issuer[0] != '\0' &&
	    (c->issuer = strdup(p->issuer)) == NULL)
		goto nomem;
	if ((c->mac = EVP_MAC_fetch(NULL, "HMAC", NULL)) == NULL ||
	    (c->ctx = EVP_MAC_CTX_new(c->mac)) == NULL)
		goto ssl;
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
	                                             c->digest, 0);
	params[1] = OSSL_PARAM_construct_end();
	if (!EVP_MAC_init(c->ctx, p->secret, p->secret_len, params))
		goto ssl;
	return (c);
nomem:
	*why = "out of memory";
	auth_token_conf_free(c);
	return (NULL);
ssl:
	*why = "OpenSSL has no HMAC for this digest";
	auth_token_conf_free(c);
	return (NULL);
}

void
auth_token_conf_free(struct auth_token_conf *c)
{
	if (c == NULL)
		return;
	EVP_MAC_CTX_free(c->ctx); /* clears the keyed state */
	EVP_MAC_free(c->mac);
	free(c->audience);
	free(c->issuer);
	free(c);
}

const char *
auth_token_conf_alg(const struct auth_token_conf *c)
{
	return (c->alg);
}

const char *
auth_token_verdict_label(enum auth_token_verdict v)
{
	if ((unsigned)v >= AUTH_TOKEN_NVERDICTS)
		return ("unknown");
	return (labels[v]);
}

enum auth_token_verdict
auth_token_verify(struct auth_token_conf *c, const char *tok, size_t len,
                  int64_t now, struct auth_claims *out, const char **why)
{
	unsigned char sig[EVP_MAX_MD_SIZE + 3], mac[EVP_MAX_MD_SIZE];
	enum auth_token_verdict v;
	const char *d1 = NULL, *d2 = NULL;
	cJSON *h = NULL, *p = NULL;
	size_t i, n, maclen;
	long siglen;
	int nomem;

	if (len == 0) {
		*why = "missing token";
		return (AUTH_TOKEN_MISSING);
	}
	if (len > AUTH_TOKEN_MAX) {
		*why = "token too large";
		return (AUTH_TOKEN_TOO_LARGE);
	}

	/* Shape: header.payload.signature, base64url only. */
	for (i = 0; i < len; i++) {
		if (tok[i] == '.') {
			if (d1 == NULL)
				d1 = tok + i;
			else if (d2 == NULL)
				d2 = tok + i;
			else
				goto malformed;
		} else if (b64url_val((unsigned char)tok[i]) == -1)
			goto malformed;
	}
	if (d2 == NULL)
		goto malformed;

	if ((h = part_object(tok, (size_t)(d1 - tok), HEADER_MEMBERS_MAX,
	                     &nomem)) == NULL)
		goto malformed;
	if ((v = check_header(c, h, why)) != AUTH_TOKEN_OK)
		goto done;

	/* A signature text of another length cannot hold our MAC. */
	n = (size_t)(tok + len - d2 - 1);
	if (n != (c->mac_len * 4 + 2) / 3)
		goto badsig;
	siglen = b64url_decode(d2 + 1, n, sig, sizeof(sig));
	if (siglen < 0)
		goto malformed;
	if ((size_t)siglen != c->mac_len)
		goto badsig;
	maclen = 0;
	if (!EVP_MAC_init(c->ctx, NULL, 0, NULL) ||
	    !EVP_MAC_update(c->ctx, (const unsigned char *)tok,
	                    (size_t)(d2 - tok)) ||
	    !EVP_MAC_final(c->ctx, mac, &maclen, sizeof(mac)) ||
	    maclen != c->mac_len) {
		*why = "internal error";
		v = AUTH_TOKEN_INTERNAL;
		goto done;
	}
	if (CRYPTO_memcmp(mac, sig, maclen) != 0)
		goto badsig;

	if ((p = part_object(d1 + 1, (size_t)(d2 - d1 - 1), SIZE_MAX,
	                     &nomem)) == NULL) {
		if (nomem) {
			*why = "internal error";
			v = AUTH_TOKEN_INTERNAL;
			goto done;
		}
		goto malformed;
	}
	v = check_claims(c, p, now, out, why);
	goto done;

badsig:
	*why = "bad signature";
	v = AUTH_TOKEN_BAD_SIGNATURE;
	goto done;
malformed:
	*why = "malformed token";
	v = AUTH_TOKEN_MALFORMED;
done:
	OPENSSL_cleanse(mac, sizeof(mac));
	cJSON_Delete(h);
	cJSON_Delete(p);
	return (v);
}
