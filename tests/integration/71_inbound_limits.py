# SPDX-License-Identifier: ISC
"""71: inbound rate limits per (tenant, bot, route), kept in Redis.

[limits] limits /v1/bot/chat to 3 per 60 s with a burst of 2: a tenant's
first 5 chats pass, the 6th gets 429/4020 with Retry-After (the GCRA's
emission interval, 20 s), RateLimit and RateLimit-Policy; another tenant
and another route are not affected; the state is the Redis key
troupe:rl:<tenant>|<bot>|<route> (deleting it lets the tenant in again, so
every auth and storage process sharing that Redis shares the limit).
Shadow mode admits everything and counts the would-be refusals
(troupe_auth_limit_checks_total{result="shadow_limited"}).  Redis down:
on_redis_down open admits (the chat is served, its context from
PostgreSQL), closed answers 503/5030 with Retry-After.  Settings change
by SIGHUP to troupe-auth.
"""
import os
import re
import signal
import time
import http.client

import harness as h

LIMITS = {"rate.v1.chat": 3, "window_ms.v1.chat": 60000,
          "burst.v1.chat": 2, "check_ms": 200}


def cluster():
    t = h.troupe(conf={"limits": dict(LIMITS)}, workers_min=2,
                 workers_max=3)
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def reload_limits(t, **kw):
    """Rewrite [limits] (LIMITS updated by kw) and SIGHUP troupe-auth."""
    c = dict(LIMITS)
    c.update({k.replace("__", "."): str(v) for k, v in kw.items()})
    t.conf_over["limits"] = c
    t.write_config()
    before = t.log("auth").count("reloaded limits")
    os.kill(t.pid("auth"), signal.SIGHUP)
    h.wait_for(lambda: t.log("auth").count("reloaded limits") > before,
               5, 0.05, "troupe-auth reloaded")


def chat(t, sub):
    return t.chat("hello from " + sub, token=t.token(sub=sub),
                  user_id=sub)


def rl_key(sub, route="v1.chat"):
    return "troupe:rl:%s|%s|%s" % (sub, h.DEMO_BOT, route)


def auth_metric(t, result):
    c = http.client.HTTPConnection("127.0.0.1", t.telemetry_port,
                                   timeout=5)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    for ln in text.splitlines():
        if (ln.startswith("troupe_auth_limit_checks_total{") and
                'result="%s"' % result in ln):
            return float(ln.rsplit(" ", 1)[1])
    return 0.0


def fresh(name):
    return "%s-%d-%d" % (name, os.getpid(), int(time.time() * 1000))


# ---------------------------------------------------------------- tests

def test_enforce_burst_then_429():
    t = cluster()
    a = fresh("tenant-a")
    got = [chat(t, a) for _ in range(5)]
    h.eq([r.status for r in got], [200] * 5, "limit + burst pass")
    r = chat(t, a)
    h.check_error_shape(r, 429, 4020, "the 6th chat")
    h.eq(r.json["msg"], "too many requests", "msg")
    ra = int(r.headers.get("retry-after", "0"))
    h.check(19 <= ra <= 20, "Retry-After %r, want 20 (one emission "
            "interval)" % r.headers.get("retry-after"))
    m = re.fullmatch(r'"v1\.chat";r=0;t=(\d+)',
                     r.headers.get("ratelimit", ""))
    h.check(m, "RateLimit %r" % r.headers.get("ratelimit"))
    h.check(99 <= int(m.group(1)) <= 100, "reset %s s, want 100 (5 "
            "emission intervals)" % m.group(1))
    h.eq(r.headers.get("ratelimit-policy"), '"v1.chat";q=3;w=60',
         "RateLimit-Policy")
    h.check(r.headers.get("x-tt-logid"), "X-Tt-Logid on a 429")
    # Another tenant is not affected, nor is another route.
    b = fresh("tenant-b")
    h.eq(chat(t, b).status, 200, "another tenant")
    r = t.post("/v3/chat", {"bot_id": h.DEMO_BOT, "user_id": a,
                            "stream": False,
                            "additional_messages": [
                                {"role": "user", "content": "v3",
                                 "content_type": "text"}]},
               {"Authorization": "Bearer " + t.token(sub=a)})
    h.eq(r.status, 200, "v3 route has no limit (%r)" % r)
    # The state is in Redis, with an expiry.
    pttl = int(t.redis.command("PTTL", rl_key(a))[1:])
    h.check(90000 <= pttl <= 100000, "PTTL %d, want about 100000" % pttl)
    h.eq(t.redis.command("DEL", rl_key(a)), b":1", "DEL the key")
    h.eq(chat(t, a).status, 200, "a passes again once the key is gone")


def test_shadow_counts_and_admits():
    t = cluster()
    a = fresh("tenant-s")
    reload_limits(t, mode="shadow")
    try:
        before = auth_metric(t, "shadow_limited")
        got = [chat(t, a) for _ in range(7)]
        h.eq([r.status for r in got], [200] * 7, "shadow admits all")
        h.wait_for(lambda: auth_metric(t, "shadow_limited") >= before + 2,
                   15, 0.3, "shadow_limited counted twice")
        h.check(int(t.redis.command("PTTL", rl_key(a))[1:]) > 0,
                "shadow counts in Redis")
    finally:
        reload_limits(t)
    r = chat(t, a)
    h.check_error_shape(r, 429, 4020, "enforced again")


def test_redis_down_open_then_closed():
    t = cluster()
    a = fresh("tenant-r")
    t.stop_redis()
    try:
        r = chat(t, a)
        h.eq(r.status, 200, "on_redis_down open admits (%r)" % r)
        reload_limits(t, on_redis_down="closed")
        r = chat(t, a)
        h.check_error_shape(r, 503, 5030, "on_redis_down closed")
        h.check(r.headers.get("retry-after", "").isdigit(),
                "503 with Retry-After: %r" % r.headers)
        h.check("limits: storage cannot check them" in t.log("auth"),
                "auth logged the switch")
        # An unlimited route is not affected.
        r = t.post("/v3/chat", {"bot_id": h.DEMO_BOT, "user_id": a,
                                "stream": False,
                                "additional_messages": [
                                    {"role": "user", "content": "v3",
                                     "content_type": "text"}]},
                   {"Authorization": "Bearer " + t.token(sub=a)})
        h.eq(r.status, 200, "v3 unlimited with Redis down (%r)" % r)
    finally:
        t.start_redis()
        reload_limits(t)
    # (open admits while Redis is still coming back: wait for the log)
    h.wait_for(lambda: chat(t, a).status == 200 and
               "limits: storage checks them again" in t.log("auth"),
               10, 0.3, "limits checked again once Redis is back")
    h.check(int(t.redis.command("PTTL", rl_key(a))[1:]) > 0,
            "counted in Redis again")


if __name__ == "__main__":
    h.main(globals())
