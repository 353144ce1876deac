# SPDX-License-Identifier: ISC
"""storage v3: troupe-storage alone against a private Redis and PostgreSQL
(tests/integration/harness.py), driven through its mailbox by
storage_drive, which plays the worker, auth, the dispatcher and troupectl.

Checked: schema v2 (v1 rows stay valid), the conversation lock of a v3
CTX_GET (busy 409/4016, a duplicate run of the same chat, released after
the chat is stored, only by its holder), the chat hash, CHAT_PERSIST
route v3.chat (chat, messages and conversation rows, exactly once, the
answer by reply_kind, the context only for completed chats), CHAT_QUERY
(retrieve, list, cancel: running, stored, unknown), API keys (KEY_CHECK
and the key.* admin ops), the webhook's nonce (SET NX EX 600, a replay
409/4017), Redis down (contexts from PostgreSQL, v3 locks and chats in
memory and written back, nonces refused) and PostgreSQL down (503/5030).
"""
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "..", "integration"))
import harness as h  # noqa: E402

BOT = "v3-bot"
_n = [0]


def cluster():
    t = h.troupe(conf={"storage": {"pg_timeout_ms": 1500,
                                   "redis_timeout_ms": 700,
                                   "bot_cache_ms": 300,
                                   "spool_max_bytes": 0}},  # no L2
                 services=["storage"])
    if not getattr(t, "v3_bot", False):
        r = h.wait_for(lambda: (lambda r: r["status"] == 0 and r)(
            admin(t, "bot.add", {"id": BOT, "upstream": t.sim_url,
                                 "context_turns": 2, "ttfe_ms": 1234,
                                 "total_ms": 5678})),
            15, 0.2, "bot.add to succeed")
        h.eq(json.loads(r["text"])["id"], BOT, "bot.add answer")
        t.v3_bot = True
    return t


def drive(t, cmds, kind="worker", final_ms=8000):
    """Send cmds from a fresh mailbox of that kind; answers by reqid."""
    return h.storage_drive(t, cmds, kind, final_ms)


def one(t, cmd, kind="worker"):
    r = drive(t, [cmd], kind)
    h.check("r0" in r, "no answer to %r" % cmd)
    return r["r0"]


def admin(t, op, args=None):
    c = {"cmd": "admin", "op": op}
    if args is not None:
        c["args"] = args
    return one(t, c, "troupectl")


def ident():
    """A fresh 19-digit id."""
    _n[0] += 1
    return "%019d" % (int(time.time() * 1000) * 1000000 + os.getpid() % 1000
                      * 1000 + _n[0] % 1000)


def ctx3(conv, chat, **kw):
    return dict({"cmd": "ctx", "bot_id": BOT, "conversation_id": conv,
                 "chat_id": chat, "user_id": "u1", "lock_ms": 60000}, **kw)


def msgs(chat, q="hi", a="hello"):
    return [{"id": chat[:-1] + "1", "role": "user", "type": "question",
             "content": q, "content_type": "text", "created_at": 1700000000},
            {"id": chat[:-1] + "2", "role": "assistant", "type": "answer",
             "content": a, "content_type": "text", "created_at": 1700000001}]


def persist3(chat, conv, status="completed", kind=0, q="hi", a="hello",
             **kw):
    c = {"cmd": "persist", "route": "v3.chat", "chat_id": chat,
         "conversation_id": conv, "bot_id": BOT, "user_id": "u1",
         "query": q, "answer": a, "prompt_tokens": 3,
         "completion_tokens": 4, "context_turns": 2, "status": status,
         "reply_kind": kind, "messages": msgs(chat, q, a),
         "created_at": 1700000000,
         "reply": json.dumps({"chat": chat}) if kind == 0 else
         "event:done\ndata:\"[DONE]\"\n\n"}
    if kind == 2:
        c["noreply"] = True
    c.update(kw)
    return c


def query(route, chat, conv):
    return {"cmd": "query", "route": route, "chat_id": chat,
            "conversation_id": conv}


def redis(t, *args):
    """One command on the harness's Redis; the decoded reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(t.redis.sock)
    req = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        req += b"$%d\r\n%s\r\n" % (len(a), a)
    s.sendall(req)
    f = s.makefile("rb")

    def read():
        ln = f.readline()[:-2]
        k, v = ln[:1], ln[1:]
        if k in (b"+", b"-"):
            return v.decode()
        if k == b":":
            return int(v)
        if k == b"$":
            if int(v) < 0:
                return None
            d = f.read(int(v) + 2)[:-2]
            return d.decode()
        if k == b"*":
            return [read() for _ in range(int(v))]
        raise h.Failure("redis reply %r" % ln)
    try:
        return read()
    finally:
        f.close()
        s.close()


def hash_of(t, chat):
    v = redis(t, "HGETALL", "troupe:chat:" + chat)
    return dict(zip(v[0::2], v[1::2]))


def ok(r, what):
    h.eq((r["status"], r["code"]), (200, 0), "%s (%r)" % (what, r))
    return r


def err(r, status, code, what):
    h.eq((r["status"], r["code"]), (status, code), "%s (%r)" % (what, r))
    return r


# ------------------------------------------------------------------ tests

def test_schema_v2_keeps_v1_rows():
    t = cluster()
    # v3 (plugins) came after; storage_plugins_test.py checks it.
    h.eq(t.psql("SELECT max(version) FROM schema_migrations"), [["3"]],
         "schema version")
    c = ident()
    r = one(t, {"cmd": "persist", "chat_id": "v1-" + c,
                "conversation_id": "c" + c, "bot_id": BOT, "user_id": "u",
                "query": "q", "answer": "a", "reply": "{}"})
    ok(r, "v1 persist")
    h.eq(t.psql("SELECT status, route, last_error IS NULL,"
                " completed_at IS NULL FROM chats WHERE chat_id = 'v1-%s'"
                % c), [["completed", "v1.chat", "t", "t"]], "v1 row")
    for tab in ("conversations", "messages", "api_keys"):
        h.eq(len(t.psql("SELECT 1 FROM information_schema.tables"
                        " WHERE table_name = '%s'" % tab)), 1, tab)


def test_lock_busy_duplicate_release():
    t = cluster()
    conv, a, b = ident(), ident(), ident()
    now = int(time.time())
    r = ok(one(t, ctx3(conv, a)), "first chat takes the lock")
    h.check(abs(r["created_at"] - now) <= 2, "created_at %r" % r)
    h.eq((r["plugins"], r["first_event_ms"], r["total_ms"]),
         ("[]", 1234, 5678), "v3 fields of CTX_REPLY")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), a, "lock value")
    ttl = redis(t, "PTTL", "troupe:lock:conv:" + conv)
    h.check(50000 < ttl <= 60000, "lock PTTL %r" % ttl)
    hs = hash_of(t, a)
    h.eq((hs["status"], hs["conversation_id"], hs["bot_id"], hs["user_id"],
          int(hs["created_at"])), ("in_progress", conv, BOT, "u1",
                                   r["created_at"]), "chat hash")
    r2 = err(one(t, ctx3(conv, b)), 409, 4016, "second chat is busy")
    h.eq(r2["msg"], "conversation busy: chat %s is running" % a, "busy msg")
    r3 = ok(one(t, ctx3(conv, a)), "a duplicate run of the same chat")
    h.eq(r3["created_at"], r["created_at"], "duplicate keeps created_at")
    # A chat that does not hold the lock does not release it.
    x = ident()
    ok(one(t, persist3(x, conv)), "persist of a chat without the lock")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), a, "lock still a's")
    r4 = ok(one(t, persist3(a, conv)), "persist of the holder")
    h.eq(json.loads(r4["data"]), {"chat": a}, "reply_kind 0 data")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), None, "lock released")
    h.eq(hash_of(t, a)["status"], "completed", "hash final status")
    ok(one(t, ctx3(conv, b)), "the next chat gets the lock")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), b, "lock is b's")


def test_ctx_failure_releases_lock():
    t = cluster()
    conv, a = ident(), ident()
    r = err(one(t, ctx3(conv, a, bot_id="no-such-bot")), 404, 4006,
            "unknown bot")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), None,
         "no lock for an unknown bot")
    err(one(t, ctx3("abc", a)), 400, 4000, "non-digit conversation id")
    err(one(t, ctx3("", a)), 400, 4000, "v3 without a conversation")
    del r


def test_persist_v3_rows_exactly_once():
    t = cluster()
    conv, a = ident(), ident()
    ok(one(t, ctx3(conv, a)), "lock")
    cmds = [persist3(a, conv, kind=1), persist3(a, conv, kind=1)]
    r = drive(t, cmds)
    for k in ("r0", "r1"):
        h.eq((r[k]["type"], r[k]["sse"], r[k]["last"]),
             ("CHAT_EVENT", "event:done\ndata:\"[DONE]\"\n\n", 1),
             "reply_kind 1 gives CHAT_EVENT (%r)" % r[k])
    rows = t.psql("SELECT status, route, conversation_id, prompt_tokens,"
                  " completion_tokens, extract(epoch FROM created_at)::bigint,"
                  " completed_at IS NOT NULL FROM chats"
                  " WHERE chat_id = '%s'" % a)
    h.eq(rows, [["completed", "v3.chat", conv, "3", "4", "1700000000",
                 "t"]], "chat row")
    h.eq(t.psql("SELECT id, seq, role, type, content, content_type,"
                " created_at FROM messages WHERE chat_id = '%s'"
                " ORDER BY seq" % a),
         [[a[:-1] + "1", "0", "user", "question", "hi", "text",
           "1700000000"],
          [a[:-1] + "2", "1", "assistant", "answer", "hello", "text",
           "1700000001"]], "message rows")
    h.eq(t.psql("SELECT bot_id, user_id, created_at FROM conversations"
                " WHERE id = '%s'" % conv), [[BOT, "u1", "1700000000"]],
         "conversation row")
    # Resent later: still one of each.
    h.eq(one(t, persist3(a, conv, kind=1))["type"], "CHAT_EVENT", "resend")
    h.eq(t.psql("SELECT count(*) FROM chats WHERE chat_id = '%s'" % a) +
         t.psql("SELECT count(*) FROM messages WHERE chat_id = '%s'" % a) +
         t.psql("SELECT count(*) FROM conversations WHERE id = '%s'" % conv),
         [["1"], ["2"], ["1"]], "exactly once")


def test_persist_v3_kinds_and_context():
    t = cluster()
    conv = ident()
    # Build the context (a miss creates the list), then store chats.
    one(t, {"cmd": "ctx", "bot_id": BOT, "conversation_id": conv})
    a, b, c = ident(), ident(), ident()
    r = drive(t, [persist3(a, conv, q="q1", a="a1"),
                  persist3(b, conv, "failed", q="q2", a="",
                           last_error={"code": 5020, "msg": "upstream"}),
                  persist3(c, conv, kind=2, q="q3", a="a3"),
                  {"cmd": "sleep", "ms": 500}])
    h.eq(sorted(r), ["r0", "r1"], "reply_kind 2 answers nobody")
    ok(r["r0"], "completed")
    ok(r["r1"], "failed chat stored")
    h.eq(t.psql("SELECT chat_id, status, last_error FROM chats WHERE"
                " conversation_id = '%s' ORDER BY seq" % conv),
         [[a, "completed", ""], [b, "failed",
                                 '{"code":5020,"msg":"upstream"}'],
          [c, "completed", ""]], "rows")
    ctx = json.loads("[" + one(t, {"cmd": "ctx", "bot_id": BOT,
                                   "conversation_id": conv})["context"] +
                     "]")
    h.eq([m["content"] for m in ctx], ["q1", "a1", "q3", "a3"],
         "context holds completed chats only")
    bad = one(t, persist3(ident(), conv, status="running"))
    err(bad, 400, 4000, "bad status")
    bad = one(t, persist3(ident(), conv, messages=[{"id": "x"}]))
    err(bad, 400, 4000, "bad message")


def test_query_retrieve_list_cancel():
    t = cluster()
    conv, a, b, run = ident(), ident(), ident(), ident()
    ok(one(t, persist3(a, conv)), "store a")
    ok(one(t, persist3(b, conv, "failed", a="",
                       last_error={"code": 5040, "msg": "deadline"})),
       "store b")
    r = drive(t, [query("v3.retrieve", a, conv),
                  query("v3.retrieve", b, conv),
                  query("v3.list", a, conv),
                  query("v3.retrieve", ident(), conv),
                  query("v3.retrieve", ident(), ident()),
                  query("v3.cancel", a, conv),
                  query("v3.cancel", ident(), conv),
                  query("v3.list", "x", conv),
                  query("v3.nope", a, conv),
                  query("v3.cancel", ident(), ident())], "auth")
    ca = json.loads(ok(r["r0"], "retrieve a")["data"])
    h.eq((ca["id"], ca["conversation_id"], ca["bot_id"], ca["status"],
          ca["created_at"], ca["usage"]["input_count"],
          ca["usage"]["output_count"]),
         (a, conv, BOT, "completed", 1700000000, 3, 4), "chat a")
    h.check(ca.get("completed_at", 0) >= int(time.time()) - 60,
            "completed_at %r" % ca)
    cb = json.loads(ok(r["r1"], "retrieve b")["data"])
    h.eq((cb["status"], cb["last_error"]), ("failed",
                                            {"code": 5040,
                                             "msg": "deadline"}),
         "chat b")
    h.check("failed_at" in cb and "completed_at" not in cb, "b times")
    lst = json.loads(ok(r["r2"], "list a")["data"])
    h.eq([(m["id"], m["role"], m["type"], m["content"], m["chat_id"],
           m["conversation_id"], m["bot_id"], m["created_at"])
          for m in lst],
         [(a[:-1] + "1", "user", "question", "hi", a, conv, BOT,
           1700000000),
          (a[:-1] + "2", "assistant", "answer", "hello", a, conv, BOT,
           1700000001)], "messages of a")
    h.eq(err(r["r3"], 404, 4201, "unknown chat")["msg"], "chat not found",
         "4201 msg")
    h.eq(err(r["r4"], 404, 4200, "unknown conv")["msg"],
         "conversation not found", "4200 msg")
    h.eq(err(r["r5"], 409, 4202, "cancel finished")["msg"],
         "chat already finished: completed", "4202 msg")
    err(r["r6"], 404, 4201, "cancel unknown")
    err(r["r7"], 400, 4000, "bad chat id")
    err(r["r8"], 400, 4000, "unknown route")
    err(r["r9"], 404, 4201, "cancel in an unknown conversation")

    # A chat in progress: retrieve from Redis, list empty, cancel frees
    # the conversation.
    ok(one(t, ctx3(conv, run)), "run takes the lock")
    r = drive(t, [query("v3.retrieve", run, conv),
                  query("v3.list", run, conv)], "auth")
    cr = json.loads(ok(r["r0"], "retrieve running")["data"])
    h.eq((cr["id"], cr["status"], cr["bot_id"]), (run, "in_progress", BOT),
         "running chat")
    h.eq(ok(r["r1"], "list running")["data"], "[]", "no messages yet")
    cc = json.loads(ok(one(t, query("v3.cancel", run, conv), "dispatcher"),
                       "cancel running")["data"])
    h.eq(cc["status"], "canceled", "canceled chat")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), None, "lock freed")
    err(one(t, query("v3.cancel", run, conv), "dispatcher"), 409, 4202,
        "cancel twice")
    h.eq(json.loads(ok(one(t, query("v3.retrieve", run, conv), "auth"),
                       "retrieve canceled")["data"])["status"], "canceled",
         "retrieve after cancel")


def test_query_waits_for_a_pending_persist():
    """A client told "canceled" (or done) by the worker asks at once; the
    persist of that chat is still being committed: the answer must be
    the stored chat, not the older state in Redis."""
    t = cluster()
    conv, a = ident(), ident()
    ok(one(t, ctx3(conv, a)), "lock")
    res = {}
    # Hold the commit back: the batch's INSERT into messages waits.
    locker = threading.Thread(target=lambda: t.psql(
        "BEGIN; LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;"
        " SELECT pg_sleep(1); COMMIT"))
    locker.start()
    time.sleep(0.3)
    w = threading.Thread(target=lambda: res.update(
        p=one(t, persist3(a, conv, "canceled"))))
    w.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    r = one(t, query("v3.retrieve", a, conv), "auth")
    waited = time.monotonic() - t0
    locker.join()
    w.join()
    ok(res["p"], "persist")
    h.eq(json.loads(ok(r, "retrieve")["data"])["status"], "canceled",
         "retrieve answered from the stored chat")
    h.check(waited > 0.2, "retrieve waited for the commit (%.2fs)" % waited)


def test_lost_run_reads_failed():
    t = cluster()
    conv, run = ident(), ident()
    ok(one(t, ctx3(conv, run, lock_ms=300)), "short lock")
    h.eq(json.loads(ok(one(t, query("v3.retrieve", run, conv), "auth"),
                       "retrieve while locked")["data"])["status"],
         "in_progress", "running while the lock holds")
    time.sleep(0.6)
    c = json.loads(ok(one(t, query("v3.retrieve", run, conv), "auth"),
                      "retrieve after the lock expired")["data"])
    h.eq((c["status"], c["last_error"]["code"]), ("failed", 5000),
         "a run whose lock expired without a row is failed (%r)" % c)
    h.check(c.get("failed_at", 0) > 0, "failed_at %r" % c)
    h.eq(err(one(t, query("v3.cancel", run, conv), "dispatcher"), 409, 4202,
             "cancel a lost run")["msg"], "chat already finished: failed",
         "msg")


def test_keys():
    t = cluster()
    kid = "k%d" % (time.time() * 1000)
    hsh = ("%064x" % (int(time.time() * 1e6)))[-64:]
    r = admin(t, "key.add", {"id": kid, "name": "ci", "sub": "alice",
                             "scopes": "read", "hash": hsh})
    h.eq(r["status"], 0, "key.add (%r)" % r)
    j = json.loads(r["text"])
    h.eq((j["id"], j["name"], j["sub"], j["scopes"]),
         (kid, "ci", "alice", "read"), "key.add answer")
    h.eq(admin(t, "key.add", {"id": kid, "hash": hsh})["status"], 409,
         "duplicate key")
    for bad in ({"id": kid + "x", "hash": "zz"},
                {"id": kid + "y", "hash": hsh[::-1], "scopes": "write"},
                {"id": "a b", "hash": hsh},
                {"id": kid + "z", "hash": hsh, "extra": "1"}):
        h.eq(admin(t, "key.add", bad)["status"], 400, "refused %r" % bad)
    lst = json.loads(admin(t, "key.list")["text"])
    mine = [k for k in lst if k["id"] == kid]
    h.eq(len(mine), 1, "key.list has it")
    h.check("hash" not in mine[0] and mine[0]["revoked_at"] is None,
            "key.list entry %r" % mine[0])
    h.check(hsh not in admin(t, "key.list")["text"], "hash never listed")
    r = drive(t, [{"cmd": "keycheck", "hash": hsh},
                  {"cmd": "keycheck", "hash": "0" * 64},
                  {"cmd": "keycheck", "hash": "nothex"}], "auth")
    h.eq((r["r0"]["status"], r["r0"]["sub"], r["r0"]["scopes"],
          r["r0"]["hash"]), (200, "alice", "read", hsh), "valid key")
    h.eq(r["r1"]["status"], 401, "unknown key")
    h.eq(r["r2"]["status"], 401, "not a hash")
    h.eq(admin(t, "key.revoke", {"id": kid})["status"], 0, "revoke")
    h.eq(one(t, {"cmd": "keycheck", "hash": hsh}, "auth")["status"], 401,
         "revoked key")
    h.eq(admin(t, "key.revoke", {"id": "nope"})["status"], 404,
         "revoke unknown")
    mine = [k for k in json.loads(admin(t, "key.list")["text"])
            if k["id"] == kid]
    h.check(isinstance(mine[0]["revoked_at"], int), "revoked_at %r" % mine)


def test_webhook_nonce():
    t = cluster()
    nonce = "n-" + ident()
    key = "troupe:nonce:%s:%s" % (BOT, nonce)
    wh = {"cmd": "ctx", "bot_id": BOT, "conversation_id": "",
          "nonce": nonce}
    r = ok(one(t, dict(wh)), "a new nonce")
    h.eq(r["upstream"], t.sim_url, "the bot comes with it")
    h.eq(r["context"], "", "no context read")
    h.eq(redis(t, "GET", key), "1", "nonce kept")
    ttl = redis(t, "TTL", key)
    h.check(590 <= ttl <= 600, "nonce TTL %r, want 600" % ttl)
    r = err(one(t, dict(wh)), 409, 4017, "the same nonce again")
    h.eq(r["msg"], "nonce already used", "msg")
    # Another bot's nonce space; an unknown bot records nothing.
    r = err(one(t, dict(wh, bot_id="no-such-bot")), 404, 4006, "unknown bot")
    h.eq(redis(t, "EXISTS", "troupe:nonce:no-such-bot:" + nonce), 0,
         "no nonce for an unknown bot")
    err(one(t, dict(wh, nonce="x" * 65)), 400, 4000, "nonce too long")
    t.stop_redis()
    try:
        # Fail closed: a nonce must never be accepted twice.
        r = err(one(t, dict(wh, nonce="n-" + ident())), 503, 5030,
                "Redis down")
        h.eq(r["msg"], "replay check unavailable", "msg")
    finally:
        t.start_redis()
    # Back: storage reconnects by itself (the next test needs it).
    h.wait_for(lambda: one(t, dict(wh, nonce="n-" + ident()))["status"] ==
               200, 15, 0.2, "nonces again once Redis is back")


def test_redis_down():
    """Redis down: contexts from PostgreSQL, v3 locks and chats in
    storage's memory, written to Redis when it is back; the finish of a
    chat that started before the outage is replayed."""
    t = cluster()
    conv, a, run = ident(), ident(), ident()
    ok(one(t, persist3(a, conv)), "store a")
    ok(one(t, ctx3(conv, run)), "running chat")
    conv2, c1, c2 = ident(), ident(), ident()
    t.stop_redis()
    try:
        r = ok(one(t, {"cmd": "ctx", "bot_id": BOT,
                       "conversation_id": conv}), "v1 ctx, Redis down")
        h.eq(json.loads("[" + r["context"] + "]"),
             [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}],
             "context from PostgreSQL")
        r = ok(one(t, ctx3(conv2, c1)), "v3 ctx, lock in memory")
        created = r["created_at"]
        h.check(abs(created - time.time()) < 5, "created_at %r" % created)
        r = err(one(t, ctx3(conv2, c2)), 409, 4016, "busy (memory)")
        h.check(c1 in r["msg"], "holder named: %r" % r["msg"])
        h.eq(ok(one(t, ctx3(conv2, c1)), "duplicate run")["created_at"],
             created, "a duplicate run keeps created_at")
        r = drive(t, [query("v3.retrieve", run, conv),
                      query("v3.retrieve", a, conv),
                      query("v3.retrieve", c1, conv2)], "auth")
        # run started before the outage: memory cannot tell.
        h.eq((err(r["r0"], 503, 5030, "retrieve running")["retry_after"]),
             1, "retry_after")
        ok(r["r1"], "a stored chat needs only PostgreSQL")
        h.eq(json.loads(ok(r["r2"], "retrieve from memory")["data"])
             ["status"], "in_progress", "memory chat status")
        ok(one(t, persist3(run, conv)), "persist with Redis down")
        ok(one(t, persist3(c1, conv2)), "persist of the memory chat")
        ok(one(t, ctx3(conv2, c2)), "lock free after the persist")
    finally:
        t.start_redis()
    # Back: memory is written to Redis before anything else.
    h.wait_for(lambda: redis(t, "GET", "troupe:lock:conv:" + conv2) == c2,
               15, 0.2, "the memory lock in Redis")
    hc = hash_of(t, c2)
    h.eq((hc.get("status"), hc.get("conversation_id"), hc.get("bot_id")),
         ("in_progress", conv2, BOT), "c2's hash from memory")
    h.eq(hash_of(t, c1).get("status"), "completed", "c1's hash")
    pttl = redis(t, "PTTL", "troupe:lock:conv:" + conv2)
    h.check(50000 <= pttl <= 60000, "lock PTTL %r, want < 60000" % pttl)
    err(one(t, ctx3(conv2, ident())), 409, 4016, "busy (Redis again)")


def redis_raw(path, *args):
    """One command on a Redis unix socket at path; the first line."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(path)
    req = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        req += b"$%d\r\n%s\r\n" % (len(a), a)
    s.sendall(req)
    try:
        return s.recv(4096).split(b"\r\n")[0]
    finally:
        s.close()


def test_redis_unreachable_replays_finish():
    """Redis unreachable but not restarted (its data kept): the finish
    of a chat that started before the outage reaches it afterwards."""
    t = cluster()
    conv, run = ident(), ident()
    ok(one(t, ctx3(conv, run)), "running chat")
    h.eq(redis(t, "GET", "troupe:lock:conv:" + conv), run, "lock in Redis")
    away = t.redis.sock + ".away"
    os.rename(t.redis.sock, away)
    try:
        h.eq(redis_raw(away, "CLIENT", "KILL", "TYPE", "normal")[:1],
             b":", "storage's connection dropped")
        h.wait_for(lambda: one(t, query("v3.retrieve", run, conv),
                               "auth")["status"] == 503, 10, 0.2,
                   "storage without Redis")
        ok(one(t, persist3(run, conv)), "persist with Redis unreachable")
    finally:
        os.rename(away, t.redis.sock)
    h.wait_for(lambda: redis(t, "GET", "troupe:lock:conv:" + conv) is None,
               15, 0.2, "run's lock released once Redis is back")
    h.eq(hash_of(t, run).get("status"), "completed", "run's hash")


def test_pg_down():
    t = cluster()
    t.stop_pg()
    try:
        r = drive(t, [{"cmd": "keycheck", "hash": "a" * 64},
                      query("v3.retrieve", ident(), ident())], "auth")
        h.eq(r["r0"]["status"], 503, "keycheck (%r)" % r["r0"])
        h.eq(err(r["r1"], 503, 5030, "retrieve")["retry_after"], 1,
             "retry_after")
        h.eq(admin(t, "key.list")["status"], 503, "key.list")
        r = one(t, persist3(ident(), ident(), kind=1))
        h.eq((r["type"], r["status"], r["code"]), ("CHAT_REPLY", 503, 5030),
             "v3 persist with PostgreSQL down")
    finally:
        t.start_pg()


if __name__ == "__main__":
    h.main(globals())
