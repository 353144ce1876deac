/* SPDX-License-Identifier: ISC */
/*
 * Unit tests of services/auth/auth_token.c, included whole (as h2o's
 * t/00unit includes its lib/ files) so the strict base64url decoder can be
 * tested directly.  Tokens are made here with OpenSSL's one-shot HMAC() and
 * an encoder of our own, not with the code under test; one vector comes
 * from RFC 7515 appendix A.1.  Every case asserts the exact reason text.
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "auth_token.c"
#include "t.h"

#define NOW 1700000000LL
#define SECRET "0123456789abcdef0123456789abcdef" /* 32 bytes */
#define SECRET64 SECRET SECRET

static char tokbuf[3 * AUTH_TOKEN_MAX];

static size_t
b64url(char *out, const void *in, size_t n)
{
	static const char a[] =
	        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	        "0123456789-_";
	const unsigned char *p = in;
	size_t o = 0, i;

	for (i = 0; i + 2 < n; i += 3) {
		out[o++] = a[p[i] >> 2];
		out[o++] = a[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
		out[o++] = a[((p[i + 1] & 15) << 2) | (p[i + 2] >> 6)];
		out[o++] = a[p[i + 2] & 63];
	}
	if (n - i == 1) {
		out[o++] = a[p[i] >> 2];
		out[o++] = a[(p[i] & 3) << 4];
	} else if (n - i == 2) {
		out[o++] = a[p[i] >> 2];
		out[o++] = a[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
		out[o++] = a[(p[i + 1] & 15) << 2];
	}
	out[o] = '\0';
	return (o);
}

/* header.payload.signature, the MAC made with md and key (md NULL: the
 * signature part is empty). */
static const char *
mk(const EVP_MD *md, const char *key, const char *header, const char *payload)
{
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	size_t o;

	o = b64url(tokbuf, header, strlen(header));
	tokbuf[o++] = '.';
	o += b64url(tokbuf + o, payload, strlen(payload));
	if (md != NULL)
		HMAC(md, key, (int)strlen(key), (unsigned char *)tokbuf, o,
		     mac, &maclen);
	tokbuf[o++] = '.';
	b64url(tokbuf + o, mac, maclen);
	return (tokbuf);
}

/* An HS256 token with the test secret and a standard header. */
static const char *
mk256(const char *payload)
{
	return (mk(EVP_sha256(), SECRET, "{\"alg\":\"HS256\",\"typ\":\"JWT\"}",
	           payload));
}

static struct auth_token_conf *
conf(const char *alg, const char *secret, const char *aud, const char *iss)
{
	struct auth_token_params p = {alg, secret, strlen(secret),
	                              30,  aud,    iss};
	struct auth_token_conf *c;
	const char *why = "unset";

	c = auth_token_conf_new(&p, &why);
	if (c == NULL)
		T_FAIL("auth_token_conf_new: %s", why);
	return (c);
}

static struct auth_token_conf *cf;
static struct auth_claims cl;

/* Verify tok against cf at NOW: the verdict, and why in *whyp. */
static enum auth_token_verdict
ver(const char *tok, const char **whyp)
{
	memset(&cl, 0, sizeof(cl));
	*whyp = NULL;
	return (auth_token_verify(cf, tok, strlen(tok), NOW, &cl, whyp));
}

#define EXPECT(tok, verdict, reason)                                          \
	do {                                                                  \
		const char *why_;                                             \
		enum auth_token_verdict v_ = ver((tok), &why_);               \
		T_EQ_STR(why_, (reason));                                     \
		T_EQ_INT(v_, (verdict));                                      \
	} while (0)
#define EXPECT_OK(tok) EXPECT(tok, AUTH_TOKEN_OK, "")
#define EXPECT_CLAIMS(tok, r)                                                 \
	EXPECT(tok, AUTH_TOKEN_CLAIMS, "invalid claims: " r)
#define EXPECT_MALFORMED(tok)                                                 \
	EXPECT(tok, AUTH_TOKEN_MALFORMED, "malformed token")
#define EXPECT_ALG(tok) EXPECT(tok, AUTH_TOKEN_ALG, "algorithm not allowed")

static void
setup(void)
{
	auth_token_conf_free(cf);
	cf = conf("HS256", SECRET, NULL, NULL);
}

static void
t_valid(void)
{
	setup();
	EXPECT_OK(mk256("{\"sub\":\"alice\",\"exp\":1700000060}"));
	T_EQ_STR(cl.sub, "alice");
	T_EQ_INT(cl.sub_len, 5);
	T_EQ_INT(cl.exp, 1700000060);
	/* The MAC context is re-initialised per token: good, bad, good. */
	EXPECT(mk(EVP_sha256(), SECRET "x", "{\"alg\":\"HS256\"}",
	          "{\"sub\":\"bob\",\"exp\":1700000060}"),
	       AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	EXPECT_OK(
	        mk(EVP_sha256(), SECRET, "{\"alg\":\"HS256\"}",
	           "{\"sub\":\"bob\",\"exp\":1700000060.5,\"iat\":1699999990,"
	           "\"nbf\":1699999990,\"x\":{\"sub\":1,\"sub\":2}}"));
	T_EQ_STR(cl.sub, "bob");
	/* typ is optional, JWT in any case, or at+jwt. */
	EXPECT_OK(mk(EVP_sha256(), SECRET,
	             "{\"typ\":\"jwt\",\"alg\":\"HS256\"}",
	             "{\"sub\":\"c\",\"exp\":1700000060}"));
	EXPECT_OK(mk(EVP_sha256(), SECRET,
	             "{\"typ\":\"at+jwt\",\"alg\":\"HS256\"}",
	             "{\"sub\":\"c\",\"exp\":1700000060}"));
	EXPECT_OK(mk(EVP_sha256(), SECRET,
	             " {\"alg\" : \"HS256\", \"kid\":\"k1\"}\n",
	             "{\"sub\":\"\\u00e9l\\u00e8ve\",\"exp\":1700000060}"));
	T_EQ_STR(cl.sub, "\xc3\xa9l\xc3\xa8ve");
}

static void
t_bad_signature(void)
{
	char *t;

	setup();
	EXPECT(mk(EVP_sha256(), "another secret of at least 32 bytes!",
	          "{\"alg\":\"HS256\"}", "{\"sub\":\"a\",\"exp\":1700000060}"),
	       AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	/* One character of the MAC changed. */
	t = strdup(mk256("{\"sub\":\"a\",\"exp\":1700000060}"));
	T_ASSERT(t != NULL);
	t[strlen(t) - 5] = t[strlen(t) - 5] == 'A' ? 'B' : 'A';
	EXPECT(t, AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	/* The payload changed under a good MAC. */
	strcpy(t, mk256("{\"sub\":\"a\",\"exp\":1700000060}"));
	{
		char *d1 = strchr(t, '.'), *d2 = strchr(d1 + 1, '.');
		char p[64];
		size_t n = b64url(p, "{\"sub\":\"b\",\"exp\":1700000060}", 28);

		T_EQ_INT(n, d2 - d1 - 1);
		memcpy(d1 + 1, p, n);
	}
	EXPECT(t, AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	free(t);
	/* A signature of the wrong length, empty, or truncated. */
	EXPECT(mk(EVP_sha512(), SECRET, "{\"alg\":\"HS256\"}",
	          "{\"sub\":\"a\",\"exp\":1700000060}"),
	       AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	EXPECT(mk(NULL, SECRET, "{\"alg\":\"HS256\"}",
	          "{\"sub\":\"a\",\"exp\":1700000060}"),
	       AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	t = strdup(mk256("{\"sub\":\"a\",\"exp\":1700000060}"));
	T_ASSERT(t != NULL);
	t[strlen(t) - 1] = '\0';
	EXPECT(t, AUTH_TOKEN_BAD_SIGNATURE, "bad signature");
	free(t);
}

static void
t_alg_none(void)
{
	setup();
	/* Without a signature part. */
	EXPECT_ALG(mk(NULL, SECRET, "{\"alg\":\"none\",\"typ\":\"JWT\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	/* With one (a valid HS256 MAC over the same bytes). */
	EXPECT_ALG(mk(EVP_sha256(), SECRET, "{\"alg\":\"none\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_ALG(mk(NULL, SECRET, "{\"alg\":\"None\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_ALG(mk(NULL, SECRET, "{\"alg\":\"\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	/* Missing or not a string. */
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, "{\"typ\":\"JWT\"}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, "{\"alg\":null}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
}

static void
t_other_alg(void)
{
	unsigned char junk[256];

	setup();
	EXPECT_ALG(mk(EVP_sha512(), SECRET, "{\"alg\":\"HS512\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_ALG(mk(EVP_sha384(), SECRET, "{\"alg\":\"HS384\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	/* Case matters (libjwt 1.10 ignores it). */
	EXPECT_ALG(mk(EVP_sha256(), SECRET, "{\"alg\":\"hs256\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	/* RS256 with an RSA-sized signature. */
	memset(junk, 0x5a, sizeof(junk));
	{
		char t[1024];
		size_t o;

		o = b64url(t, "{\"alg\":\"RS256\",\"typ\":\"JWT\"}", 27);
		t[o++] = '.';
		o += b64url(t + o, "{\"sub\":\"a\",\"exp\":1700000060}", 28);
		t[o++] = '.';
		b64url(t + o, junk, sizeof(junk));
		EXPECT_ALG(t);
	}

	/* A conf for HS512 takes HS512 and refuses HS256. */
	auth_token_conf_free(cf);
	cf = conf("HS512", SECRET64, NULL, NULL);
	T_EQ_STR(auth_token_conf_alg(cf), "HS512");
	EXPECT_OK(mk(EVP_sha512(), SECRET64, "{\"alg\":\"HS512\"}",
	             "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_ALG(mk(EVP_sha256(), SECRET64, "{\"alg\":\"HS256\"}",
	              "{\"sub\":\"a\",\"exp\":1700000060}"));
	auth_token_conf_free(cf);
	cf = conf("hs384", SECRET64, NULL, NULL);
	T_EQ_STR(auth_token_conf_alg(cf), "HS384");
	EXPECT_OK(mk(EVP_sha384(), SECRET64, "{\"alg\":\"HS384\"}",
	             "{\"sub\":\"a\",\"exp\":1700000060}"));
}

static void
t_exp(void)
{
	setup();
	EXPECT(mk256("{\"sub\":\"a\",\"exp\":1699990000}"), AUTH_TOKEN_EXPIRED,
	       "token expired");
	/* Leeway 30 s: expired from exp + 30 on. */
	EXPECT(mk256("{\"sub\":\"a\",\"exp\":1699999970}"), AUTH_TOKEN_EXPIRED,
	       "token expired");
	EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1699999971}"));
	EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1699999970.5}"));
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\"}"), "exp missing");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":\"1700000060\"}"),
	              "exp not a number");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":true}"),
	              "exp not a number");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":null}"),
	              "exp not a number");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1e999}"),
	              "exp not a number");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":0}"), "exp not positive");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":-5}"), "exp not positive");
	/* A bigger leeway. */
	{
		struct auth_token_params p = {"HS256", SECRET, 32,
		                              3600,    NULL,   NULL};
		const char *why;

		auth_token_conf_free(cf);
		cf = auth_token_conf_new(&p, &why);
		T_ASSERT(cf != NULL);
		EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1699996401}"));
		EXPECT(mk256("{\"sub\":\"a\",\"exp\":1699996400}"),
		       AUTH_TOKEN_EXPIRED, "token expired");
	}
}

static void
t_nbf_iat(void)
{
	setup();
	EXPECT(mk256("{\"sub\":\"a\",\"exp\":1700000600,\"nbf\":1700000031}"),
	       AUTH_TOKEN_NOT_YET_VALID, "token not yet valid");
	EXPECT_OK(mk256(
	        "{\"sub\":\"a\",\"exp\":1700000600,\"nbf\":1700000030}"));
	EXPECT_CLAIMS(
	        mk256("{\"sub\":\"a\",\"exp\":1700000600,\"nbf\":\"x\"}"),
	        "nbf not a number");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000600,"
	                    "\"iat\":1700000031}"),
	              "iat in the future");
	EXPECT_OK(mk256(
	        "{\"sub\":\"a\",\"exp\":1700000600,\"iat\":1700000030}"));
	EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1700000600,\"iat\":1}"));
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000600,\"iat\":[]}"),
	              "iat not a number");
}

static void
t_garbage(void)
{
	const char *good;
	char t[AUTH_TOKEN_MAX + 64];

	setup();
	EXPECT(mk256(""), AUTH_TOKEN_MALFORMED, "malformed token");
	EXPECT_MALFORMED("!!!.@@@.###");
	EXPECT_MALFORMED("eyJhbGciOiJIUzI1NiJ9 .e30.e30");
	EXPECT_MALFORMED("eyJhbGciOiJIUzI1NiJ9.e30=.e30");
	EXPECT_MALFORMED("eyJhbGciOiJIUzI1NiJ9=.e30.e30");
	EXPECT_MALFORMED("eyJhbGciOiJIUzI1NiJ9+.e30.e30");
	EXPECT_MALFORMED("..");
	EXPECT_MALFORMED(".e30.");
	/* 5 characters cannot be base64 of anything. */
	EXPECT_MALFORMED("eyJhb.e30.e30");
	/* "{}" is e30; e31 has leftover bits set: another spelling. */
	EXPECT_MALFORMED("e31.e30.e30");
	EXPECT(mk(NULL, SECRET, "{}", "{}"), AUTH_TOKEN_MALFORMED,
	       "malformed token");
	/* Two or four parts. */
	good = mk256("{\"sub\":\"a\",\"exp\":1700000060}");
	snprintf(t, sizeof(t), "%.*s", (int)(strrchr(good, '.') - good), good);
	EXPECT_MALFORMED(t);
	snprintf(t, sizeof(t), "%s.", good);
	EXPECT_MALFORMED(t);
	snprintf(t, sizeof(t), "%s.e30", good);
	EXPECT_MALFORMED(t);
	EXPECT_MALFORMED("eyJhbGciOiJIUzI1NiJ9");
	/* Missing. */
	EXPECT(" ", AUTH_TOKEN_MALFORMED, "malformed token");
	{
		const char *why;

		T_EQ_INT(auth_token_verify(cf, "", 0, NOW, &cl, &why),
		         AUTH_TOKEN_MISSING);
		T_EQ_STR(why, "missing token");
		T_EQ_INT(auth_token_verify(cf, NULL, 0, NOW, &cl, &why),
		         AUTH_TOKEN_MISSING);
	}
}

static void
t_too_large(void)
{
	static char big[AUTH_TOKEN_MAX + 2];
	char pay[AUTH_TOKEN_MAX];
	const char *why;
	size_t n;

	setup();
	memset(big, 'A', sizeof(big) - 1);
	T_EQ_INT(
	        auth_token_verify(cf, big, AUTH_TOKEN_MAX + 1, NOW, &cl, &why),
	        AUTH_TOKEN_TOO_LARGE);
	T_EQ_STR(why, "token too large");
	/* The size is checked before the shape. */
	T_EQ_INT(auth_token_verify(cf, big, 1000000, NOW, &cl, &why),
	         AUTH_TOKEN_TOO_LARGE);
	T_EQ_INT(auth_token_verify(cf, big, AUTH_TOKEN_MAX, NOW, &cl, &why),
	         AUTH_TOKEN_MALFORMED);
	/* Genuine tokens around the limit: pad until one byte more would
	 * cross it. */
	for (n = 6200; n > 5000; n--) {
		int k = snprintf(
		        pay, sizeof(pay),
		        "{\"sub\":\"a\",\"exp\":1700000060,\"pad\":\"");

		memset(pay + k, 'x', n);
		strcpy(pay + k + n, "\"}");
		if (strlen(mk256(pay)) <= AUTH_TOKEN_MAX)
			break;
		EXPECT(tokbuf, AUTH_TOKEN_TOO_LARGE, "token too large");
	}
	T_ASSERT(n < 6200 && n > 5000);
	T_ASSERT(strlen(tokbuf) > AUTH_TOKEN_MAX - 4);
	EXPECT_OK(tokbuf);
}

static void
t_aud_iss(void)
{
	auth_token_conf_free(cf);
	cf = conf("HS256", SECRET, "troupe", "https://issuer.example");
	EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":\"troupe\","
	                "\"iss\":\"https://issuer.example\"}"));
	EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1700000060,"
	                "\"aud\":[\"x\",\"troupe\"],"
	                "\"iss\":\"https://issuer.example\"}"));
	EXPECT_CLAIMS(
	        mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":\"other\","
	              "\"iss\":\"https://issuer.example\"}"),
	        "aud mismatch");
	EXPECT_CLAIMS(
	        mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":[\"x\"],"
	              "\"iss\":\"https://issuer.example\"}"),
	        "aud mismatch");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":[],"
	                    "\"iss\":\"https://issuer.example\"}"),
	              "aud mismatch");
	EXPECT_CLAIMS(
	        mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":\"Troupe\","
	              "\"iss\":\"https://issuer.example\"}"),
	        "aud mismatch");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000060,"
	                    "\"iss\":\"https://issuer.example\"}"),
	              "aud missing");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000060,"
	                    "\"aud\":[\"troupe\",1],"
	                    "\"iss\":\"https://issuer.example\"}"),
	              "aud not a string or array of strings");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":7,"
	                    "\"iss\":\"https://issuer.example\"}"),
	              "aud not a string or array of strings");
	EXPECT_CLAIMS(
	        mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":\"troupe\","
	              "\"iss\":\"https://evil.example\"}"),
	        "iss mismatch");
	EXPECT_CLAIMS(
	        mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":\"troupe\","
	              "\"iss\":5}"),
	        "iss mismatch");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\",\"exp\":1700000060,"
	                    "\"aud\":\"troupe\"}"),
	              "iss missing");
	/* Unconfigured, aud and iss are not looked at. */
	setup();
	EXPECT_OK(mk256("{\"sub\":\"a\",\"exp\":1700000060,\"aud\":7,"
	                "\"iss\":[]}"));
}

static void
t_sub(void)
{
	char pay[600];
	int n;

	setup();
	EXPECT_CLAIMS(mk256("{\"exp\":1700000060}"), "sub missing");
	EXPECT_CLAIMS(mk256("{\"sub\":\"\",\"exp\":1700000060}"), "sub empty");
	EXPECT_CLAIMS(mk256("{\"sub\":42,\"exp\":1700000060}"),
	              "sub not a string");
	EXPECT_CLAIMS(mk256("{\"sub\":null,\"exp\":1700000060}"),
	              "sub not a string");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\\nb\",\"exp\":1700000060}"),
	              "sub not printable UTF-8");
	EXPECT_CLAIMS(mk256("{\"sub\":\"a\xff\",\"exp\":1700000060}"),
	              "sub not printable UTF-8");
	EXPECT_CLAIMS(mk256("{\"sub\":\"\xc0\xaf\",\"exp\":1700000060}"),
	              "sub not printable UTF-8");
	EXPECT_CLAIMS(mk256("{\"sub\":\"\xed\xa0\x80\",\"exp\":1700000060}"),
	              "sub not printable UTF-8");
	EXPECT_CLAIMS(mk256("{\"sub\":\"\xc2\x85\",\"exp\":1700000060}"),
	              "sub not printable UTF-8");
	/* cJSON itself refuses a lone surrogate escape. */
	EXPECT_MALFORMED(mk256("{\"sub\":\"\\ud800\",\"exp\":1700000060}"));
	/* A sub cut by \u0000 is refused before any claim is read. */
	EXPECT_MALFORMED(mk256("{\"sub\":\"a\\u0000b\",\"exp\":1700000060}"));
	/* 256 bytes pass, 257 do not. */
	n = snprintf(pay, sizeof(pay), "{\"exp\":1700000060,\"sub\":\"");
	memset(pay + n, 's', 256);
	strcpy(pay + n + 256, "\"}");
	EXPECT_OK(mk256(pay));
	T_EQ_INT(cl.sub_len, 256);
	T_EQ_INT(strlen(cl.sub), 256);
	memset(pay + n, 's', 257);
	strcpy(pay + n + 257, "\"}");
	EXPECT_CLAIMS(mk256(pay), "sub too long");
}

static void
t_json(void)
{
	setup();
	/* Header not JSON, not an object, trailing text. */
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, "not json",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, "[\"HS256\"]",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, "{\"alg\":\"HS256\"} x",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, "{\"alg\":\"HS256\"}{}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	/* Payload a JSON array, a string, not JSON, with a NUL byte. */
	EXPECT_MALFORMED(mk256("[{\"sub\":\"a\",\"exp\":1700000060}]"));
	EXPECT_MALFORMED(mk256("\"a\""));
	EXPECT_MALFORMED(mk256("{\"sub\":\"a\",\"exp\":1700000060"));
	{
		unsigned char mac[32];
		unsigned int ml;
		char t[256];
		size_t o;

		o = b64url(t, "{\"alg\":\"HS256\"}", 15);
		t[o++] = '.';
		o += b64url(t + o, "{\"sub\":\"a\",\"exp\":1700000060}\0", 29);
		HMAC(EVP_sha256(), SECRET, 32, (unsigned char *)t, o, mac,
		     &ml);
		t[o++] = '.';
		b64url(t + o, mac, ml);
		EXPECT_MALFORMED(t);
	}
	/* Duplicate names: cJSON would read the first, others the last. */
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET,
	                    "{\"alg\":\"HS256\",\"alg\":\"none\"}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(
	        mk(EVP_sha256(), SECRET,
	           "{\"alg\":\"none\",\"typ\":\"JWT\",\"alg\":\"HS256\"}",
	           "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk256("{\"sub\":\"a\",\"exp\":1700000060,"
	                       "\"sub\":\"admin\"}"));
	EXPECT_MALFORMED(
	        mk256("{\"exp\":1,\"sub\":\"a\",\"exp\":1700000060}"));
	/* A NUL escape in a name or value. */
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET,
	                    "{\"alg\":\"HS256\\u0000x\"}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET,
	                    "{\"alg\":\"HS256\",\"alg\\u0000\":\"none\"}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	/* But an escaped backslash before u0000 is only text. */
	EXPECT_OK(mk256("{\"sub\":\"a\\\\u0000\",\"exp\":1700000060}"));
	T_EQ_STR(cl.sub, "a\\u0000");
	/* typ other than JWT, crit present, too many members. */
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET,
	                    "{\"alg\":\"HS256\",\"typ\":\"JOSE\"}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(mk(EVP_sha256(), SECRET,
	                    "{\"alg\":\"HS256\",\"typ\":1}",
	                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	EXPECT_MALFORMED(
	        mk(EVP_sha256(), SECRET,
	           "{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}",
	           "{\"sub\":\"a\",\"exp\":1700000060}"));
	{
		char h[1024];
		int n = snprintf(h, sizeof(h), "{\"alg\":\"HS256\"");

		for (int i = 0; i < 31; i++)
			n += snprintf(h + n, sizeof(h) - n, ",\"k%d\":0", i);
		strcpy(h + n, "}");
		EXPECT_OK(mk(EVP_sha256(), SECRET, h,
		             "{\"sub\":\"a\",\"exp\":1700000060}"));
		strcpy(h + n, ",\"k31\":0}");
		EXPECT_MALFORMED(mk(EVP_sha256(), SECRET, h,
		                    "{\"sub\":\"a\",\"exp\":1700000060}"));
	}
}

/* RFC 7515 appendix A.1: a token from elsewhere verifies (its claims then
 * lack sub), and one changed bit does not. */
static void
t_rfc7515(void)
{
	static const char key[] = "\x03\x23\x35\x4b\x2b\x0f\xa5\xbc\x83\x7e"
	                          "\x06\x65\x77\x7b\xa6\x8f"
	                          "\x5a\xb3\x28\xe6\xf0\x54\xc9\x28\xa9\x0f"
	                          "\x84\xb2\xd2\x50\x2e\xbf"
	                          "\xd3\xfb\x5a\x92\xd2\x06\x47\xef\x96\x8a"
	                          "\xb4\xc3\x77\x62\x3d\x22"
	                          "\x3d\x2e\x21\x72\x05\x2e\x4f\x08\xc0\xcd"
	                          "\x9a\xf5\x67\xd0\x80\xa3";
	static const char tok[] =
	        "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9."
	        "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9le"
	        "GFt"
	        "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ."
	        "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
	struct auth_token_params p = {"HS256", key, 64, 0, NULL, "joe"};
	struct auth_token_conf *c;
	const char *why = NULL;
	char t[sizeof(tok)];

	c = auth_token_conf_new(&p, &why);
	T_ASSERT(c != NULL);
	T_EQ_INT(auth_token_verify(c, tok, strlen(tok), 1300819000, &cl, &why),
	         AUTH_TOKEN_CLAIMS);
	T_EQ_STR(why, "invalid claims: sub missing");
	memcpy(t, tok, sizeof(t));
	t[sizeof(t) - 2] = 'Y'; /* ...EjXk -> ...EjXY */
	T_EQ_INT(auth_token_verify(c, t, strlen(t), 1300819000, &cl, &why),
	         AUTH_TOKEN_BAD_SIGNATURE);
	T_EQ_STR(why, "bad signature");
	auth_token_conf_free(c);
}

static void
t_conf(void)
{
	struct auth_token_params p = {NULL, SECRET, 32, 30, "", ""};
	struct auth_token_conf *c;
	const char *why;

	c = auth_token_conf_new(&p, &why);
	T_ASSERT(c != NULL);
	T_EQ_STR(auth_token_conf_alg(c), "HS256");
	/* "" audience and issuer mean no check. */
	T_ASSERT(c->audience == NULL && c->issuer == NULL);
	auth_token_conf_free(c);

	p.secret_len = 31;
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	T_EQ_STR(why, "JWT secret shorter than 32 bytes");
	p.secret_len = 0;
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	T_EQ_STR(why, "no JWT secret (credential jwt-secret or [auth] "
	              "jwt_secret)");
	p.secret = SECRET64;
	p.secret_len = 47;
	p.algorithm = "HS384";
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	T_EQ_STR(why, "JWT secret shorter than 48 bytes (HS384)");
	p.secret_len = 63;
	p.algorithm = "HS512";
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	T_EQ_STR(why, "JWT secret shorter than 64 bytes (HS512)");
	p.secret_len = 64;
	p.algorithm = "RS256";
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	T_EQ_STR(why, "algorithm must be HS256, HS384 or HS512");
	p.algorithm = "none";
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	p.algorithm = "HS512";
	p.leeway_s = -1;
	T_ASSERT(auth_token_conf_new(&p, &why) == NULL);
	T_EQ_STR(why, "leeway must not be negative");
	auth_token_conf_free(NULL);
}

static void
t_b64url(void)
{
	unsigned char o[16];

	T_EQ_INT(b64url_decode("", 0, o, sizeof(o)), 0);
	T_EQ_INT(b64url_decode("QQ", 2, o, sizeof(o)), 1);
	T_EQ_INT(o[0], 'A');
	T_EQ_INT(b64url_decode("QR", 2, o, sizeof(o)), -1); /* leftover bits */
	T_EQ_INT(b64url_decode("QUI", 3, o, sizeof(o)), 2);
	T_EQ_INT(b64url_decode("QUJ", 3, o, sizeof(o)), -1);
	T_EQ_INT(b64url_decode("QUJD", 4, o, sizeof(o)), 3);
	T_EQ_MEM(o, 3, "ABC");
	T_EQ_INT(b64url_decode("QUJDR", 5, o, sizeof(o)), -1);
	T_EQ_INT(b64url_decode("QQ==", 4, o, sizeof(o)), -1);
	T_EQ_INT(b64url_decode("+/8=", 4, o, sizeof(o)), -1);
	T_EQ_INT(b64url_decode("-_8", 3, o, sizeof(o)), 2);
	T_EQ_INT(o[0], 0xfb);
	T_EQ_INT(o[1], 0xff);
	T_EQ_INT(b64url_decode("QUJDQUJD", 8, o, 5), -1); /* too small */
}

static void
t_labels(void)
{
	T_EQ_STR(auth_token_verdict_label(AUTH_TOKEN_OK), "ok");
	T_EQ_STR(auth_token_verdict_label(AUTH_TOKEN_BAD_SIGNATURE),
	         "bad_signature");
	T_EQ_STR(auth_token_verdict_label(AUTH_TOKEN_CLAIMS),
	         "invalid_claims");
	T_EQ_STR(auth_token_verdict_label(AUTH_TOKEN_NVERDICTS), "unknown");
	for (int v = 0; v < AUTH_TOKEN_NVERDICTS; v++)
		T_ASSERT(auth_token_verdict_label(v) != NULL);
}

T_TESTS = {
        {"valid", t_valid},       {"bad_signature", t_bad_signature},
        {"alg_none", t_alg_none}, {"other_alg", t_other_alg},
        {"exp", t_exp},           {"nbf_iat", t_nbf_iat},
        {"garbage", t_garbage},   {"too_large", t_too_large},
        {"aud_iss", t_aud_iss},   {"sub", t_sub},
        {"json", t_json},         {"rfc7515", t_rfc7515},
        {"conf", t_conf},         {"b64url", t_b64url},
        {"labels", t_labels},     {NULL, NULL},
};
T_MAIN
