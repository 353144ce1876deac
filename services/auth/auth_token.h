/* SPDX-License-Identifier: ISC */
/*
 * auth_token: verify a JWS compact token (a JWT) signed with HMAC
 * (HS256, HS384 or HS512), with OpenSSL and cJSON, and check its claims.
 *
 * Callers: auth_dispatch.c for every CHAT_REQUEST, and the unit test.
 * Pure: no logging, no clock, no global state; a verdict and one fixed
 * reason text come back for the caller to log and send.  It must never
 * accept a token whose "alg" is not exactly the configured one (so "none"
 * never passes), never compare a MAC in variable time, never parse more
 * than AUTH_TOKEN_MAX bytes, and never trust a claim of the wrong JSON
 * type.  A conf is used by one thread at a time (its MAC context is
 * reused between calls).
 */
#ifndef TROUPE_AUTH_TOKEN_H
#define TROUPE_AUTH_TOKEN_H

#include <stddef.h>
#include <stdint.h>

#define AUTH_TOKEN_MAX 8192      /* bytes of token text; more is refused */
#define AUTH_TOKEN_SECRET_MIN 32 /* bytes; more for HS384 (48), HS512 (64) */
#define AUTH_SUB_MAX 256         /* bytes of the sub claim */

/* What a verification decided.  The reason text (why) is finer: every
 * AUTH_TOKEN_CLAIMS reason starts with "invalid claims: ". */
enum auth_token_verdict {
	AUTH_TOKEN_OK = 0,
	AUTH_TOKEN_MISSING,       /* "missing token" */
	AUTH_TOKEN_TOO_LARGE,     /* "token too large" */
	AUTH_TOKEN_MALFORMED,     /* "malformed token" */
	AUTH_TOKEN_ALG,           /* "algorithm not allowed" */
	AUTH_TOKEN_BAD_SIGNATURE, /* "bad signature" */
	AUTH_TOKEN_EXPIRED,       /* "token expired" */
	AUTH_TOKEN_NOT_YET_VALID, /* "token not yet valid" */
	AUTH_TOKEN_CLAIMS,        /* "invalid claims: ..." */
	AUTH_TOKEN_INTERNAL,      /* "internal error" (ENOMEM, OpenSSL) */
	AUTH_TOKEN_NVERDICTS
};

/* The settings a conf is built from; strings are copied. */
struct auth_token_params {
	const char *algorithm; /* "HS256" (NULL: HS256), "HS384", "HS512" */
	const void *secret;    /* HMAC key bytes, used as given */
	size_t secret_len;
	int64_t leeway_s;     /* clock skew allowed on exp, nbf, iat */
	const char *audience; /* NULL or "": aud not checked */
	const char *issuer;   /* NULL or "": iss not checked */
};

struct auth_token_conf;

/* What a valid token says. */
struct auth_claims {
	char sub[AUTH_SUB_MAX + 1]; /* NUL-terminated, valid UTF-8 */
	size_t sub_len;
	double exp; /* seconds since the epoch */
};

/* A verifier for these params; NULL and a reason in why (a static text)
 * if they are invalid (unknown algorithm, short secret) or on ENOMEM. */
struct auth_token_conf *auth_token_conf_new(const struct auth_token_params *,
                                            const char **why);
/* Free a conf and wipe its key; NULL is harmless. */
void auth_token_conf_free(struct auth_token_conf *);
/* The canonical algorithm name of a conf ("HS256"). */
const char *auth_token_conf_alg(const struct auth_token_conf *);

/* Verify the len bytes of tok (the text after "Bearer ") at time now
 * (seconds since the epoch); AUTH_TOKEN_OK with out filled, or another
 * verdict; why always gets a static reason text. */
enum auth_token_verdict auth_token_verify(struct auth_token_conf *,
                                          const char *tok, size_t len,
                                          int64_t now, struct auth_claims *out,
                                          const char **why);

/* A short label for a verdict, for metrics ("ok", "bad_signature"). */
const char *auth_token_verdict_label(enum auth_token_verdict);

#endif
