# SPDX-License-Identifier: ISC
"""21: bad input is refused with the JSON error shape, never a crash.

Malformed HTTP (400 and close), an oversized head, an oversized body (413),
invalid JSON, wrong types, missing fields (400/4000), unknown paths (404),
and every kind of bad JWT (401/4100).  Every error carries
{"code","msg","detail":{"logid"}} and X-Tt-Logid; afterwards the edge still
serves.
"""
import json
import time

import harness as h

GOOD = {"bot_id": h.DEMO_BOT, "user_id": "u_123456", "query": "hi"}


def cluster():
    t = h.troupe()
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def raw_one(t, data, what, **kw):
    rs, closed, raw = t.raw(data, **kw)
    h.check(rs, "%s: no HTTP response (closed=%s, raw %r)" %
            (what, closed, raw[:200]))
    return rs[0], closed


def test_malformed_request_line():
    t = cluster()
    for what, data in (
            ("garbage line", b"GARBAGE\r\n\r\n"),
            ("bad version", b"GET /healthz HTTP/9\r\n\r\n"),
            ("header without colon",
             b"GET /healthz HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n"),
            ("binary", b"\x00\x01\x02\x03\xff\r\n\r\n")):
        r, closed = raw_one(t, data, what)
        h.check_error_shape(r, 400, what=what)
        h.check(closed, "%s: connection not closed after 400" % what)


def test_oversized_head():
    t = cluster()
    data = (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " +
            b"a" * (17 * 1024) + b"\r\n\r\n")
    r, closed = raw_one(t, data, "17 KiB head")
    h.check_error_shape(r, (400, 413, 431), what="17 KiB head")
    h.check(closed, "connection not closed after an oversized head")


def test_oversized_body_declared():
    t = cluster()
    head = ("POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
            "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (t.token(), 1024 * 1024 + 1))
    r, closed = raw_one(t, head.encode(), "declared 1 MiB + 1 body")
    h.check_error_shape(r, 413, what="declared 1 MiB + 1 body")
    h.check(closed, "connection not closed after 413")


def test_oversized_body_sent():
    t = cluster()
    body = json.dumps(dict(GOOD, query="x" * (1024 * 1024))).encode()
    head = ("POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
            "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (t.token(), len(body)))
    chunks = [head.encode()] + [body[i:i + 65536]
                                for i in range(0, len(body), 65536)]
    r, closed = raw_one(t, chunks, "1 MiB body")
    h.check_error_shape(r, 413, what="1 MiB body")


def test_invalid_json():
    t = cluster()
    for what, body in (("truncated", '{"bot_id": "x", '),
                       ("not json", "hello"),
                       ("empty", ""),
                       ("array", "[]"),
                       ("string", '"x"'),
                       ("trailing garbage", json.dumps(GOOD) + "}")):
        r = t.post("/v1/bot/chat", body,
                   {"Authorization": "Bearer " + t.token()})
        h.check_error_shape(r, 400, 4000, what)


def test_wrong_types():
    t = cluster()
    for k, v in (("bot_id", 123), ("user_id", ["u"]), ("query", None),
                 ("query", {"a": 1}), ("history_id", 5),
                 ("bot_id", True)):
        r = t.chat(body=dict(GOOD, **{k: v}))
        h.check_error_shape(r, 400, 4000, "%s=%r" % (k, v))


def test_missing_fields():
    t = cluster()
    for k in ("bot_id", "user_id", "query"):
        b = dict(GOOD)
        del b[k]
        r = t.chat(body=b)
        h.check_error_shape(r, 400, 4000, "without %s" % k)
    r = t.chat(body=dict(GOOD, query=""))
    h.check_error_shape(r, 400, 4000, "empty query")


def test_unknown_path_and_method():
    t = cluster()
    r = t.get("/no/such/path")
    h.check_error_shape(r, 404, what="unknown path")
    r = t.get("/v1/bot/chat")
    h.check_error_shape(r, (404, 405), what="GET /v1/bot/chat")


def test_bad_tokens():
    t = cluster()
    now = int(time.time())
    s = t.secret
    cases = [
        ("no Authorization", None),
        ("not Bearer", "Basic dTpw"),
        ("empty bearer", "Bearer "),
        ("bad signature", "Bearer " + h.jwt(s, key="not-the-secret-" * 3)),
        ("alg none", "Bearer " + h.jwt(s, alg="none")),
        ("alg none signed", "Bearer " + h.jwt(s, alg="none",
                                              sign_alg="HS256")),
        ("HS512", "Bearer " + h.jwt(s, alg="HS512")),
        ("HS256 header, HS512 signature",
         "Bearer " + h.jwt(s, sign_alg="HS512")),
        ("RS256", "Bearer " + h.jwt(s, alg="RS256", sign_alg="HS256")),
        ("expired", "Bearer " + h.jwt(s, now=now - 7200, ttl=3600)),
        ("not yet valid", "Bearer " + h.jwt(s, claims={"nbf": now + 3600})),
        ("no exp", "Bearer " + h.jwt(s, claims={"exp": None})),
        ("no sub", "Bearer " + h.jwt(s, claims={"sub": None})),
        ("exp not a number", "Bearer " + h.jwt(s, claims={"exp": "soon"})),
        ("garbage base64", "Bearer !!!.@@@.###"),
        ("two parts", "Bearer " + ".".join(h.jwt(s).split(".")[:2])),
        ("four parts", "Bearer " + h.jwt(s) + ".x"),
        ("over 8 KiB", "Bearer " + h.jwt(s, claims={"pad": "p" * 9000})),
    ]
    for what, auth in cases:
        hdr = {} if auth is None else {"Authorization": auth}
        r = t.post("/v1/bot/chat", GOOD, hdr)
        h.check_error_shape(r, 401, 4100, what)


def test_still_serving():
    t = cluster()
    r = t.chat("still there?")
    h.eq(r.status, 200, "a good chat after the bad ones (%r)" % r)
    h.eq(t.get("/healthz").status, 200, "/healthz")
    t.check_exactly_once()


if __name__ == "__main__":
    h.main(globals())
