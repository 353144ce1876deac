# SPDX-License-Identifier: ISC
"""53: the plugin webhook, POST /api/v1/execute?plugin=<name>, end to end:
a calling platform signs (hex SHA-1 of timestamp + nonce + token + body),
Troupe checks the signature, the clock and the nonce (Redis), runs the
bot's registered plugin (served by troupe-upstream-sim, with its token or
HMAC checked) and answers {"status","message","data"}; every failure in
that shape, with X-Tt-Logid; the caller's traceparent and tracestate
reach the plugin.
"""
import hashlib
import json
import os
import signal
import time
import uuid

import harness as h

TOKEN = "webhook-verify-token-for-tests"
SECRET = "plugin-secret-for-tests"
PATH = "/api/v1/execute?plugin="


def cluster():
    t = h.troupe(conf={"webhook": {"verify_token": TOKEN}},
                 sim_args=["--plugin-secret", SECRET])
    if not getattr(t, "wh_ready", False):
        t.add_bot()
        base = t.sim_url.rstrip("/") + "/plugin/"
        t.ctl("plugin", "add", h.DEMO_BOT, "echo", "--url", base + "echo",
              "--auth", "token", "--secret", SECRET)
        t.ctl("plugin", "add", h.DEMO_BOT, "mac", "--url", base + "mac",
              "--auth", "hmac", "--secret", SECRET, "--timeout-ms", "1000")
        t.wh_ready = True
    return t


def sign(ts, nonce, body, token=TOKEN):
    return hashlib.sha1((ts + nonce + token).encode() + body).hexdigest()


def call(t, plugin, args=None, bot=h.DEMO_BOT, body=None, ts=None,
         nonce=None, sig=None, drop=(), extra=None, method="POST"):
    """One signed webhook call; body (bytes) overrides the JSON body."""
    if body is None:
        body = json.dumps({"bot_id": bot, "user_id": "u_1",
                           "arguments": args if args is not None else {}
                           }).encode()
    ts = ts if ts is not None else str(int(time.time()))
    nonce = nonce if nonce is not None else uuid.uuid4().hex
    hd = {"X-Coze-Bot-ID": bot, "X-Coze-Timestamp": ts,
          "X-Coze-Nonce": nonce,
          "X-Coze-Signature": sig if sig is not None else sign(ts, nonce,
                                                                body)}
    for k in drop:
        hd.pop(k)
    hd.update(extra or {})
    return h.http_request(t.edge_port, method, PATH + plugin, body, hd,
                          timeout=20)


def shape(r, status, what, msg_has=None):
    """r is a webhook answer: HTTP status, {"status","message","data"}
    with the same status, X-Tt-Logid."""
    h.eq(r.status, status, "%s: HTTP status (%r)" % (what, r))
    j = r.json
    h.check(isinstance(j, dict) and set(j) == {"status", "message", "data"},
            "%s: body shape: %r" % (what, r))
    h.eq(j["status"], status, "%s: status in the body" % what)
    h.check(isinstance(j["message"], str), "%s: message: %r" % (what, r))
    if msg_has is not None:
        h.check(msg_has in j["message"], "%s: message %r lacks %r" %
                (what, j["message"], msg_has))
    h.check(r.headers.get("x-tt-logid"), "%s: X-Tt-Logid: %r" % (what, r))
    if status != 200:
        h.eq(j["data"], None, "%s: data" % what)
    return j


def test_good_call():
    t = cluster()
    args = {"city": "Beijing", "days": [1, 2]}
    j = shape(call(t, "echo", args), 200, "echo")
    h.eq(j["message"], "ok", "message")
    h.eq(j["data"], {"result": args, "plugin": "echo"},
         "data = the plugin's answer (token accepted)")
    j = shape(call(t, "mac", {"x": 1}), 200, "mac (HMAC)")
    h.eq(j["data"], {"result": {"x": 1}, "plugin": "mac"}, "hmac data")
    # Upper-case hex signature, and no bot_id in the body.
    body = json.dumps({"user_id": "u", "arguments": {"a": "b"}}).encode()
    ts, nonce = str(int(time.time())), uuid.uuid4().hex
    r = call(t, "echo", body=body, ts=ts, nonce=nonce,
             sig=sign(ts, nonce, body).upper())
    h.eq(shape(r, 200, "upper-case signature")["data"]["result"],
         {"a": "b"}, "echoed")


def test_trace_context_reaches_the_plugin():
    """The caller's traceparent (its trace id) and tracestate reach the
    plugin; a tracestate without a traceparent does not."""
    t = cluster()
    tid = uuid.uuid4().hex
    ts = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    tp = "00-%s-%s-01" % (tid, uuid.uuid4().hex[:16])
    shape(call(t, "echo", {"q": 1}, extra={"traceparent": tp,
                                            "tracestate": ts}),
          200, "echo with trace context")
    r = call(t, "echo", {"q": 2}, extra={"tracestate": ts})
    shape(r, 200, "echo with a tracestate alone")
    own = r.headers["traceparent"].split("-")[1]
    seen = h.http_request(t.sim_port, "GET", "/sim/traces").json["traces"]
    got = {x["traceparent"].split("-")[1]: x["tracestate"] for x in seen
           if x["path"] == "/plugin/echo" and x["traceparent"]}
    h.eq(got.get(tid), ts, "the plugin's tracestate")
    h.check(own in got, "no plugin call in the edge's trace %s" % own)
    h.eq(got[own], None, "tracestate of a trace the edge started")


def test_auth_failures():
    t = cluster()
    r = call(t, "echo", {}, sig="0" * 40)
    shape(r, 401, "bad signature", "invalid signature")
    body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_1",
                       "arguments": {}}).encode()
    ts, nonce = str(int(time.time())), uuid.uuid4().hex
    r = call(t, "echo", body=body + b" ", ts=ts, nonce=nonce,
             sig=sign(ts, nonce, body))
    shape(r, 401, "body changed after signing", "invalid signature")
    r = call(t, "echo", {}, sig=sign(ts, nonce, body, token="other"))
    shape(r, 401, "another token", "invalid signature")
    old = str(int(time.time()) - 400)
    shape(call(t, "echo", {}, ts=old), 401, "old timestamp", "300 s")
    soon = str(int(time.time()) + 400)
    shape(call(t, "echo", {}, ts=soon), 401, "future timestamp", "300 s")
    shape(call(t, "echo", {}, ts="yesterday"), 401, "timestamp not a number",
          "X-Coze-Timestamp")
    for hd in ("X-Coze-Timestamp", "X-Coze-Nonce", "X-Coze-Signature"):
        shape(call(t, "echo", {}, drop=(hd,)), 401, "missing " + hd, hd)
    shape(call(t, "echo", {}, nonce="n" * 65), 401, "nonce too long",
          "X-Coze-Nonce")
    shape(call(t, "echo", {}, drop=("X-Coze-Bot-ID",)), 400,
          "missing X-Coze-Bot-ID", "X-Coze-Bot-ID")


def test_replayed_nonce():
    t = cluster()
    nonce = "replay-" + uuid.uuid4().hex
    shape(call(t, "echo", {"n": 1}, nonce=nonce), 200, "first use")
    shape(call(t, "echo", {"n": 2}, nonce=nonce), 409, "same nonce again",
          "nonce already used")
    key = "troupe:nonce:%s:%s" % (h.DEMO_BOT, nonce)
    h.eq(t.redis.command("EXISTS", key), b":1", "nonce kept in Redis")
    ttl = int(t.redis.command("TTL", key)[1:])
    h.check(500 < ttl <= 600, "nonce TTL %d, want about 600 s" % ttl)
    # The same nonce for another bot is another nonce (404: no such bot).
    shape(call(t, "echo", {}, bot="no-such-bot", nonce=nonce), 404,
          "same nonce, other bot", "bot not found")


def test_bad_requests():
    t = cluster()
    shape(call(t, "nope", {}), 404, "unknown plugin", "plugin not found")
    shape(call(t, "echo", {}, bot="no-such-bot"), 404, "unknown bot",
          "bot not found")
    shape(call(t, "echo", body=b'{"user_id": "u", "arguments": '), 400,
          "broken JSON", "JSON object")
    for args in ("[1]", '"x"', "1", "null"):
        body = ('{"user_id":"u","arguments":%s}' % args).encode()
        shape(call(t, "echo", body=body), 400, "arguments " + args,
              "arguments must be a JSON object")
    shape(call(t, "echo", body=b'{"arguments":{}}'), 400, "no user_id",
          "user_id")
    body = json.dumps({"bot_id": "other", "user_id": "u",
                       "arguments": {}}).encode()
    shape(call(t, "echo", body=body), 400, "bot_id differs", "bot_id")
    shape(call(t, "bad%20name", {}), 400, "plugin name", "plugin")
    r = h.http_request(t.edge_port, "POST", "/api/v1/execute", b"{}",
                       {"X-Coze-Bot-ID": h.DEMO_BOT})
    shape(r, 401, "no plugin parameter, unsigned")
    shape(call(t, "echo", {}, method="GET"), 405, "GET")
    big = b'{"user_id":"u","arguments":{"a":"' + b"x" * (1 << 20) + b'"}}'
    shape(call(t, "echo", body=big), 413, "body over 1 MiB")


def test_plugin_failures():
    t = cluster()
    r = call(t, "echo", {"q": "[plugin:status=500]"})
    shape(r, 502, "plugin 500", "500")
    r = call(t, "echo", {"q": "[plugin:garbage]"})
    shape(r, 502, "plugin garbage", "invalid JSON")
    t0 = time.monotonic()
    r = call(t, "mac", {"q": "[plugin:delay=3000]"})
    shape(r, 504, "plugin timeout (1000 ms)", "timed out")
    h.check(time.monotonic() - t0 < 2.5, "answered at the plugin's "
            "timeout, not after the plugin: %.1fs" % (time.monotonic() - t0))
    st = json.loads(h.http_request(t.sim_port, "GET", "/sim/stats").body)
    h.eq(st["plugins"]["echo"].get("unauthorized", 0), 0,
         "the plugin never refused our auth")


def test_redis_down():
    t = cluster()
    t.stop_redis()
    try:
        r = call(t, "echo", {})
        shape(r, 503, "Redis down", "unavailable")
        h.eq(r.headers.get("retry-after"), "1", "Retry-After")
    finally:
        t.start_redis()
    h.wait_for(lambda: call(t, "echo", {}).status == 200, 15, 0.2,
               "200 once Redis is back")


def test_not_configured():
    """Last: reloads the edge without a verify token."""
    t = cluster()
    t.conf_over["webhook"] = {"verify_token": ""}
    t.write_config()
    os.kill(t.pid("edge"), signal.SIGHUP)
    h.wait_for(lambda: call(t, "echo", {}).status == 403, 5, 0.1,
               "403 after the reload")
    shape(call(t, "echo", {}), 403, "not configured",
          "webhook not configured")


if __name__ == "__main__":
    h.main(globals())
