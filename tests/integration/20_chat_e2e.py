# SPDX-License-Identifier: ISC
"""20: POST /v1/bot/chat end to end through every service.

The request of the issue answered 200 by the simulator's text, with
X-Tt-Logid and traceparent; context carried by history_id; unknown bot
404/4006; keep-alive, pipelining and concurrency; and at the end every 200
stored in PostgreSQL `chats` exactly once.
"""
import re
import threading
import uuid

import harness as h

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
SIM = re.compile(r"^sim: messages=(\d+) system=([01]) context=(\d+) "
                 r"model=(\S*) query=(.*)$", re.S)


def cluster():
    t = h.troupe()
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def sim_answer(r):
    """The simulator's fields from a 200's data.answer."""
    a = r.data.get("answer") if isinstance(r.data, dict) else None
    h.check(isinstance(a, str), "no data.answer in %r" % r)
    m = SIM.match(a)
    h.check(m, "data.answer is not the simulator's text: %r" % a)
    return {"messages": int(m.group(1)), "system": int(m.group(2)),
            "context": int(m.group(3)), "model": m.group(4),
            "query": m.group(5)}


def check_ok(r, query):
    h.eq(r.status, 200, "status (%r)" % r)
    j = r.json
    h.check(isinstance(j, dict), "body is not JSON: %r" % r)
    h.eq(j.get("code"), 0, "code")
    h.eq(j.get("msg"), "", "msg")
    d = j.get("data")
    h.check(isinstance(d, dict), "no data object: %r" % r)
    for k in ("chat_id", "conversation_id", "bot_id", "answer"):
        h.check(isinstance(d.get(k), str), "data.%s missing: %r" % (k, r))
    h.check(d["chat_id"], "empty chat_id: %r" % r)
    h.eq(d["bot_id"], h.DEMO_BOT, "data.bot_id")
    h.check(isinstance(d.get("usage"), dict), "data.usage missing: %r" % r)
    h.eq(sim_answer(r)["query"], query, "query the simulator saw")
    lid = r.headers.get("x-tt-logid")
    h.check(lid, "no X-Tt-Logid: %r" % r)
    tp = r.headers.get("traceparent", "")
    h.check(TRACEPARENT.match(tp), "bad traceparent %r" % tp)


def test_issue_request():
    t = cluster()
    q = "今天北京天气怎么样?"      # the issue's request, exactly
    r = t.chat(q, history_id="h_abcdef123")
    check_ok(r, q)
    h.eq(r.data["conversation_id"], "h_abcdef123", "conversation_id")
    r2 = t.chat(q)                  # history_id is optional
    check_ok(r2, q)
    h.check(r.headers["x-tt-logid"] != r2.headers["x-tt-logid"],
            "two requests share X-Tt-Logid %r" % r.headers["x-tt-logid"])
    h.check(r.data["chat_id"] != r2.data["chat_id"],
            "two chats share chat_id %r" % r.data["chat_id"])


def test_traceparent_from_client():
    t = cluster()
    tid = uuid.uuid4().hex
    tp = "00-%s-%s-01" % (tid, uuid.uuid4().hex[:16])
    r = t.chat("trace me", headers={"traceparent": tp})
    check_ok(r, "trace me")
    m = TRACEPARENT.match(r.headers["traceparent"])
    h.eq(m.group(1), tid, "trace id kept from the client's traceparent")


def test_tracestate_without_tracing():
    """With [trace] off (here) the client's trace context still reaches
    the upstream: its traceparent's trace id and its tracestate."""
    t = cluster()
    tid = uuid.uuid4().hex
    ts = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    r = t.chat("trace state", headers={
        "traceparent": "00-%s-%s-01" % (tid, uuid.uuid4().hex[:16]),
        "tracestate": ts})
    check_ok(r, "trace state")
    seen = [x for x in h.http_request(t.sim_port, "GET",
                                      "/sim/traces").json["traces"]
            if tid in (x["traceparent"] or "")]
    h.eq([x["tracestate"] for x in seen], [ts],
         "the tracestate the upstream got")


def test_context_by_history_id():
    t = cluster()
    hid = "h_" + uuid.uuid4().hex[:12]
    r1 = t.chat("first turn", history_id=hid)
    check_ok(r1, "first turn")
    r2 = t.chat("second turn", history_id=hid)
    check_ok(r2, "second turn")
    r3 = t.chat("third turn", history_id=hid)
    check_ok(r3, "third turn")
    c1, c2, c3 = (sim_answer(r)["context"] for r in (r1, r2, r3))
    h.eq(c1, 0, "context of a new conversation")
    h.check(c2 > c1, "second turn: context=%d, want > %d" % (c2, c1))
    h.check(c3 > c2, "third turn: context=%d, want > %d" % (c3, c2))
    for r in (r1, r2, r3):
        h.eq(r.data["conversation_id"], hid, "conversation_id")
    # Another conversation does not see this one's context.
    r4 = t.chat("elsewhere", history_id="h_" + uuid.uuid4().hex[:12])
    check_ok(r4, "elsewhere")
    h.eq(sim_answer(r4)["context"], 0, "context of another conversation")


def test_unknown_bot():
    t = cluster()
    r = t.chat("hello", bot_id="0000dead-beef-4f2c-b9d2-000000000000")
    h.check_error_shape(r, 404, 4006, "unknown bot")


def test_keepalive_and_pipelining():
    t = cluster()
    body = ('{"bot_id":"%s","user_id":"u_123456","query":"pipe %%d"}'
            % h.DEMO_BOT)
    tok = t.token()
    reqs = b""
    for i in range(3):
        b = (body % i).encode()
        reqs += (b"POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
                 b"Authorization: Bearer " + tok.encode() + b"\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(b)) + b
    reqs += b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    rs, closed, raw = t.raw(reqs, timeout=10, expect=4)
    h.eq(len(rs), 4, "pipelined responses (raw %r)" % raw[:300])
    for i in range(3):
        check_ok(rs[i], "pipe %d" % i)
        t.ok_chats.append(rs[i].data["chat_id"])
    h.eq(rs[3].status, 200, "healthz after pipelined chats")
    h.check(not closed, "server closed a keep-alive connection")


def test_concurrent_chats():
    t = cluster()
    n = 24
    out = [None] * n

    def one(i):
        try:
            out[i] = t.chat("concurrent %d" % i,
                            history_id="hc_%d" % (i % 4))
        except Exception as e:      # noqa: BLE001
            out[i] = e
    ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    for i, r in enumerate(out):
        h.check(isinstance(r, h.Response), "request %d: %r" % (i, r))
        check_ok(r, "concurrent %d" % i)
    ids = {r.data["chat_id"] for r in out}
    h.eq(len(ids), n, "distinct chat_ids")


def test_exactly_once():
    t = cluster()
    for i in range(5):
        check_ok(t.chat("once %d" % i, history_id="h_once"), "once %d" % i)
    t.check_exactly_once()


if __name__ == "__main__":
    h.main(globals())
