# SPDX-License-Identifier: ISC
"""32: Redis stopped (or hung) under a whole Troupe: chats keep answering.

v1 and v3 chats (streaming and not) answer 200 while Redis is down; their
context comes from PostgreSQL, as the simulator's echo shows ("context=N"
counts the messages it was sent); the v3 conversation lock still holds
(409/4016) from storage's memory; after Redis returns everything is
normal, the lock taken in memory is in Redis, and PostgreSQL holds each
chat exactly once.  Inbound limits are off here (71_inbound_limits.py).
"""
import http.client
import json
import re
import signal
import time
import uuid

import harness as h

SIM = re.compile(r"sim: messages=(\d+) system=([01]) context=(\d+) ")


def cluster():
    t = h.troupe(conf={"edge": {"chat_timeout_ms": 15000},
                       "storage": {"redis_timeout_ms": 700}},
                 workers_min=2, workers_max=4)
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def context_of(answer):
    m = SIM.search(answer)
    h.check(m, "no simulator echo in %r" % answer)
    return int(m.group(3))


def v1(t, query, hist):
    r = t.chat(query, history_id=hist)
    h.eq(r.status, 200, "v1 chat %r (%r)" % (query, r))
    return context_of(r.data["answer"])


def auth(t):
    return {"Authorization": "Bearer " + t.token()}


def body(query, stream):
    return {"bot_id": h.DEMO_BOT, "user_id": "u_32", "stream": stream,
            "additional_messages": [{"role": "user", "content": query,
                                     "content_type": "text"}]}


def stream(t, query, conv=None):
    """A whole /v3/chat stream: (status, [(event, data)])."""
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=20)
    path = "/v3/chat" + ("?conversation_id=%s" % conv if conv else "")
    hd = {"Content-Type": "application/json"}
    hd.update(auth(t))
    c.request("POST", path, json.dumps(body(query, True)).encode(), hd)
    r = c.getresponse()
    if r.status != 200:
        out = r.status, json.loads(r.read() or b"{}")
        c.close()
        return out
    ev, events = None, []
    for ln in r.read().decode().split("\n"):
        if ln.startswith("event:"):
            ev = ln[6:]
        elif ln.startswith("data:"):
            d = ln[5:]
            events.append((ev, d if d.startswith('"') else json.loads(d)))
    c.close()
    return r.status, events


def completed(events):
    msg = [d for e, d in events if e == "conversation.message.completed"]
    h.check(msg, "no message.completed in %r" % [e for e, _ in events])
    return msg[0]


def retrieve(t, conv, chat):
    return t.get("/v3/chat/retrieve?conversation_id=%s&chat_id=%s" %
                 (conv, chat), auth(t))


def wait_completed(t, conv, chat):
    def ok():
        r = retrieve(t, conv, chat)
        return r.status == 200 and r.data["status"] == "completed"
    h.wait_for(ok, 15, 0.1, "chat %s completed" % chat)


def rows(t, conv):
    return int(t.psql("SELECT count(*) FROM chats WHERE conversation_id"
                      " = '%s'" % conv)[0][0])


def redis_back(t, before):
    t.start_redis()
    # storage reconnects with back-off (at most 2 s).
    h.wait_for(lambda: t.log("storage").count("connected again") > before,
               10, 0.1, "storage connected to Redis again")


def stop_redis(t):
    """Stop Redis; the count of reconnections so far."""
    n = t.log("storage").count("connected again")
    t.stop_redis()
    return n


# ---------------------------------------------------------------- tests

def test_v1_context_from_postgres():
    t = cluster()
    hist = "h32_" + uuid.uuid4().hex[:8]
    h.eq(v1(t, "one", hist), 0, "first turn: no context")
    h.eq(v1(t, "two", hist), 2, "second turn: one turn of context")
    n = stop_redis(t)
    try:
        h.eq(v1(t, "three", hist), 4, "Redis down: context from "
             "PostgreSQL")
        h.eq(v1(t, "four", hist), 6, "the turn stored during the outage "
             "is in the next context")
        r = t.chat("no history")
        h.eq(r.status, 200, "a chat without history (%r)" % r)
    finally:
        redis_back(t, n)
    h.eq(v1(t, "five", hist), 8, "after Redis came back")
    h.eq(v1(t, "six", hist), 10, "and the cache is right")
    h.eq(rows(t, hist), 6, "rows of the conversation")
    h.check("contexts from PostgreSQL" in t.log("storage"),
            "storage logged the switch")


def test_v1_redis_hung():
    t = cluster()
    hist = "h32h_" + uuid.uuid4().hex[:8]
    h.eq(v1(t, "one", hist), 0, "first turn")
    t.redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        h.eq(v1(t, "two", hist), 2, "Redis hung: context from PostgreSQL")
        h.check(time.monotonic() - t0 < 5, "answer after %.1fs" %
                (time.monotonic() - t0))
    finally:
        t.redis.proc.send_signal(signal.SIGCONT)
    h.wait_for(lambda: t.chat("x", history_id=hist).status == 200, 10,
               0.2, "chats after Redis resumed")
    h.eq(v1(t, "four", hist), 6, "context after the hang")
    h.eq(rows(t, hist), 4, "rows of the conversation")


def test_v3_with_redis_down():
    t = cluster()
    st, ev = stream(t, "first")
    h.eq(st, 200, "stream before the outage")
    conv = ev[0][1]["conversation_id"]
    n = stop_redis(t)
    try:
        # Streaming: context from PostgreSQL (the first turn).
        st, ev = stream(t, "second", conv)
        h.eq(st, 200, "stream while Redis is down (%r)" % (ev,))
        h.check("context=2" in completed(ev)["content"],
                "second turn sees the first: %r" % completed(ev)["content"])
        h.eq([e for e, _ in ev][-2:], ["conversation.chat.completed",
                                        "done"], "stream ends")
        # Not streaming: answered at once, then polled.
        r = t.post("/v3/chat?conversation_id=" + conv,
                   body("[sim:delay=1500] third", False), auth(t))
        h.eq(r.status, 200, "create while Redis is down (%r)" % r)
        chat = r.data["id"]
        h.eq(r.data["status"], "in_progress", "created in progress")
        # The conversation's lock lives in storage's memory now.
        r2 = t.post("/v3/chat?conversation_id=" + conv,
                    body("collides", False), auth(t))
        h.check_error_shape(r2, 409, 4016, "busy, lock in memory")
        r3 = retrieve(t, conv, chat)
        h.eq((r3.status, r3.data["status"]), (200, "in_progress"),
             "retrieve from memory (%r)" % r3)
        wait_completed(t, conv, chat)
        st, ev = stream(t, "fourth", conv)
        h.eq(st, 200, "stream after the memory lock was released")
        h.check("context=6" in completed(ev)["content"],
                "fourth turn sees three: %r" % completed(ev)["content"])
        # A new conversation, its lock taken in memory, still running
        # when Redis comes back.
        r = t.post("/v3/chat", body("[sim:delay=4000] across", False),
                   auth(t))
        h.eq(r.status, 200, "create across the switch back (%r)" % r)
        conv2, chat2 = r.data["conversation_id"], r.data["id"]
    finally:
        redis_back(t, n)
    # The switch back wrote the running chat's lock into Redis.
    h.wait_for(lambda: t.redis.command("GET", "troupe:lock:conv:" + conv2)
               != b"$-1", 5, 0.1, "the memory lock in Redis")
    r = t.post("/v3/chat?conversation_id=" + conv2, body("x", False),
               auth(t))
    h.check_error_shape(r, 409, 4016, "busy, lock now in Redis")
    wait_completed(t, conv2, chat2)
    st, ev = stream(t, "fifth", conv)
    h.eq(st, 200, "stream after Redis came back")
    h.check("context=8" in completed(ev)["content"],
            "fifth turn sees four: %r" % completed(ev)["content"])
    h.eq(rows(t, conv), 5, "rows of the conversation")
    h.eq(rows(t, conv2), 1, "rows of the second conversation")


def test_zz_exactly_once():
    t = cluster()
    n, nd = t.psql("SELECT count(*), count(DISTINCT chat_id) FROM chats")[0]
    h.eq(n, nd, "no chat stored twice")
    stored = {r[0] for r in t.psql("SELECT chat_id FROM chats WHERE "
                                   "route = 'v1.chat'")}
    ok = [c for c in t.ok_chats if c]
    h.eq(len(ok), len(t.ok_chats), "every v1 200 has a chat_id")
    h.eq(sorted(set(ok) - stored), [], "v1 200s missing from PostgreSQL")
    h.eq(len(stored), len(ok), "v1 rows vs v1 200 answers")


if __name__ == "__main__":
    h.main(globals())
