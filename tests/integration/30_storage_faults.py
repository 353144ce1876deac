# SPDX-License-Identifier: ISC
"""30: troupe-storage alone, driven through its mailbox, against a real
Redis and PostgreSQL that are stopped, hung and broken on purpose.

Only storage runs (plus the harness's Redis, PostgreSQL and simulator);
storage_drive (tests/unit/services/storage/storage_drive.c) plays the
workers and troupectl, since Python cannot speak nng.  Checked: contexts
(order, trimming, rebuild from PostgreSQL, no duplicate on a resend),
group commit (many rows share one transaction), the admin ops, bad
messages, and every fault giving a clear 503 (never a false 200) or, for
Redis, the context from PostgreSQL, and healing by itself: both
dependencies down at start, Redis stopped or hung,
PostgreSQL stopped, a statement stuck behind a lock past pg_timeout_ms, a
row the database refuses inside a batch.
"""
import json
import os
import signal
import subprocess
import time
import uuid

import harness as h

PG_TIMEOUT_MS = 1500
REDIS_TIMEOUT_MS = 700
BOT = "storage-test-bot"


def cluster():
    t = h.troupe(conf={"storage": {"pg_timeout_ms": PG_TIMEOUT_MS,
                                   "redis_timeout_ms": REDIS_TIMEOUT_MS,
                                   "bot_cache_ms": 300,
                                   # the no-spool path: 503 while
                                   # PostgreSQL is down (L2: 31_pg_spool)
                                   "spool_max_bytes": 0}},
                 services=["storage"])
    if not getattr(t, "bot_added", False):
        # READY comes before PostgreSQL is connected (by design): the
        # first statements wait for the first attempt, so this works at
        # once unless the database is slow to come up.
        r = h.wait_for(lambda: (lambda r: r["status"] == 0 and r)(
            admin(t, "bot.add", {"id": BOT, "upstream": t.sim_url,
                                 "context_turns": 2, "model": "m-test",
                                 "system_prompt": "be brief"})),
            15, 0.2, "bot.add to succeed")
        h.eq(json.loads(r["text"])["id"], BOT, "bot.add answer")
        t.bot_added = True
    return t


def drive(t, cmds, kind="worker", final_ms=10000):
    """Send cmds through a fresh mailbox; the answers by reqid."""
    return h.storage_drive(t, cmds, "worker" if kind == "worker"
                           else "troupectl", final_ms)


def one(t, cmd, kind="worker", final_ms=10000):
    r = drive(t, [cmd], kind, final_ms)
    h.check("r0" in r, "no answer to %r" % cmd)
    return r["r0"]


def admin(t, op, args=None):
    c = {"cmd": "admin", "op": op}
    if args is not None:
        c["args"] = args
    return one(t, c, "troupectl")


def ctx(conv, bot=BOT, **kw):
    return dict({"cmd": "ctx", "bot_id": bot, "conversation_id": conv}, **kw)


def persist(chat_id, conv, q="q", a="a", bot=BOT, turns=2, **kw):
    return dict({"cmd": "persist", "chat_id": chat_id,
                 "conversation_id": conv, "bot_id": bot, "user_id": "u1",
                 "query": q, "answer": a, "prompt_tokens": 3,
                 "completion_tokens": 4, "context_turns": turns,
                 "reply": json.dumps({"chat_id": chat_id})}, **kw)


def context_of(r):
    h.eq(r["status"], 200, "CTX_REPLY status (%r)" % r)
    return json.loads("[" + r["context"] + "]")


def turns(msgs):
    """[(user content, assistant content), ...] of a context."""
    h.eq(len(msgs) % 2, 0, "messages in pairs (%r)" % msgs)
    out = []
    for u, a in zip(msgs[0::2], msgs[1::2]):
        h.eq((u["role"], a["role"]), ("user", "assistant"), "roles")
        out.append((u["content"], a["content"]))
    return out


def ok_reply(r, chat_id):
    h.eq((r["type"], r["status"], r["code"]), ("CHAT_REPLY", 200, 0),
         "CHAT_REPLY for %s (%r)" % (chat_id, r))
    h.eq(json.loads(r["data"]), {"chat_id": chat_id}, "data passed on")


def unavailable(r, what, retry=True):
    h.eq((r["status"], r["code"]), (503, 5030), "%s (%r)" % (what, r))
    if retry and r["type"] == "CHAT_REPLY":
        h.eq(r["retry_after"], 1, "%s: retry_after (%r)" % (what, r))


def conv():
    return "c-" + uuid.uuid4().hex[:10]


# ---------------------------------------------------------------- tests

def test_ctx_reply_carries_the_bot():
    t = cluster()
    r = one(t, ctx(""))
    h.eq((r["status"], r["code"], r["context"]), (200, 0, ""), "no conv")
    h.eq((r["upstream"], r["model"], r["system_prompt"],
          r["context_turns"]), (t.sim_url, "m-test", "be brief", 2),
         "bot settings")
    r = one(t, ctx(conv(), bot="no-such-bot"))
    h.eq((r["status"], r["code"], r["msg"]), (404, 4006, "bot not found"),
         "unknown bot (%r)" % r)
    r = one(t, ctx(conv()))
    h.eq(context_of(r), [], "new conversation")


def test_context_order_trim_and_resend():
    t = cluster()
    c = conv()
    for i in range(4):
        r = one(t, persist("%s-%d" % (c, i), c, "q%d \"quoted\"\n" % i,
                           "a%d" % i))
        ok_reply(r, "%s-%d" % (c, i))
    # context_turns 2: the last two turns, oldest first.
    h.eq(turns(context_of(one(t, ctx(c)))),
         [("q2 \"quoted\"\n", "a2"), ("q3 \"quoted\"\n", "a3")],
         "context after 4 turns")
    # A resent CHAT_PERSIST (worker restart): 200 again, nothing doubled.
    ok_reply(one(t, persist(c + "-3", c, "q3 \"quoted\"\n", "a3")), c + "-3")
    h.eq(turns(context_of(one(t, ctx(c))))[-1],
         ("q3 \"quoted\"\n", "a3"), "last turn after a resend")
    h.eq(len(context_of(one(t, ctx(c)))), 4, "messages after a resend")
    rows = t.psql("SELECT count(*) FROM chats WHERE conversation_id = '%s'"
                  % c)
    h.eq(rows[0][0], "4", "rows stored")
    # The same chat_id twice in one batch is also stored and added once.
    c2 = conv()
    r = drive(t, [persist(c2 + "-x", c2, "qx", "ax"),
                  persist(c2 + "-x", c2, "qx", "ax")])
    for k in ("r0", "r1"):
        ok_reply(r[k], c2 + "-x")
    h.eq(turns(context_of(one(t, ctx(c2)))), [("qx", "ax")],
         "context after a duplicate inside a batch")


def test_rebuild_from_postgres():
    t = cluster()
    c = conv()
    for i in range(3):
        ok_reply(one(t, persist("%s-%d" % (c, i), c, "q%d" % i, "a%d" % i)),
                 "%s-%d" % (c, i))
    before = context_of(one(t, ctx(c)))
    t.redis.command("FLUSHALL")
    h.eq(context_of(one(t, ctx(c))), before, "context rebuilt from PG")
    # Written back: the key exists again, with the known-marker at most.
    n = int(t.redis.command("LLEN", "troupe:ctx:%s:%s" % (BOT, c))[1:])
    h.check(n in (4, 5), "LLEN after rebuild: %d" % n)


def test_group_commit():
    t = cluster()
    c = conv()
    n = 400
    r = drive(t, [persist("%s-%d" % (c, i), "%s-%d" % (c, i % 20))
                  for i in range(n)])
    for i in range(n):
        ok_reply(r["r%d" % i], "%s-%d" % (c, i))
    rows = t.psql("SELECT count(*), count(DISTINCT xmin::text) FROM chats "
                  "WHERE chat_id LIKE '%s-%%'" % c)
    stored, txns = int(rows[0][0]), int(rows[0][1])
    h.eq(stored, n, "rows stored")
    h.note("%d rows in %d transactions" % (stored, txns))
    h.check(txns <= n // 4, "%d rows took %d transactions: no group commit"
            % (n, txns))


def test_bad_messages():
    t = cluster()
    r = drive(t, [{"cmd": "bad", "type": 0x0301},
                  {"cmd": "bad", "type": 0x0303},
                  persist("bad-utf8", conv(), query_hex="71ff"),
                  persist("late", conv(), deadline_ms=1000),
                  persist("", conv())])
    h.eq((r["r0"]["type"], r["r0"]["status"], r["r0"]["code"]),
         ("CTX_REPLY", 400, 4000), "undecodable CTX_GET")
    h.eq((r["r1"]["type"], r["r1"]["status"], r["r1"]["code"]),
         ("CHAT_REPLY", 500, 5000), "undecodable CHAT_PERSIST")
    h.eq((r["r2"]["status"], r["r2"]["code"]), (400, 4000), "bad UTF-8")
    h.eq((r["r3"]["status"], r["r3"]["code"]), (504, 5040), "expired")
    h.eq((r["r4"]["status"], r["r4"]["code"]), (400, 4000), "no chat_id")
    rows = t.psql("SELECT count(*) FROM chats WHERE chat_id IN "
                  "('bad-utf8', 'late')")
    h.eq(rows[0][0], "0", "refused rows stored")
    # Admin from a worker mailbox is not for storage: no answer at all.
    r = drive(t, [{"cmd": "admin", "op": "bot.list"}], "worker",
              final_ms=1000)
    h.eq(r, {}, "bot.list from a worker")


def test_admin_ops():
    t = cluster()
    bid = "adm-" + uuid.uuid4().hex[:8]
    r = admin(t, "bot.add", {"id": bid, "upstream": "http://127.0.0.1:9"})
    h.eq(r["status"], 0, "add (%r)" % r)
    b = json.loads(r["text"])
    h.eq((b["model"], b["system_prompt"], b["context_turns"], b["created"]),
         ("sim-1", "You are a helpful assistant.", 10, True), "defaults")
    # Upsert: given fields change, the others stay.
    r = admin(t, "bot.add", {"id": bid, "upstream": "https://x.example",
                             "context_turns": 3})
    b = json.loads(r["text"])
    h.eq((b["upstream"], b["model"], b["context_turns"], b["created"]),
         ("https://x.example", "sim-1", 3, False), "update")
    # The cache forgot the old copy at once.
    r = one(t, ctx("", bot=bid))
    h.eq((r["upstream"], r["context_turns"]), ("https://x.example", 3),
         "CTX_REPLY after the update")
    ids = [x["id"] for x in json.loads(admin(t, "bot.list")["text"])]
    h.check(bid in ids and BOT in ids, "bot.list: %r" % ids)
    for args, what in (({"id": "a:b", "upstream": "http://x"}, "colon"),
                       ({"id": bid, "upstream": "ftp://x"}, "scheme"),
                       ({"id": bid, "upstream": "http://x",
                         "context_turns": 101}, "turns"),
                       ({"upstream": "http://x"}, "no id")):
        r = admin(t, "bot.add", args)
        h.eq(r["status"], 400, "bot.add %s (%r)" % (what, r))
    h.eq(admin(t, "bot.nope")["status"], 400, "unknown op")
    h.eq(admin(t, "bot.rm", {"id": bid})["status"], 0, "rm")
    h.eq(admin(t, "bot.rm", {"id": bid})["status"], 404, "rm again")
    r = one(t, ctx("", bot=bid))
    h.eq((r["status"], r["code"]), (404, 4006), "CTX_GET after rm")


def test_redis_down_then_back():
    t = cluster()
    c = conv()
    ok_reply(one(t, persist(c + "-0", c, "before", "b")), c + "-0")
    t.stop_redis()
    try:
        r = drive(t, [ctx(c), ctx("")])
        # Redis down: the context comes from PostgreSQL (it used to be
        # 503 "context store unavailable").
        h.eq(turns(context_of(r["r0"])), [("before", "b")],
             "ctx with Redis down, from PostgreSQL")
        h.eq(r["r1"]["status"], 200, "ctx without a conversation")
        # Stored in PostgreSQL: a 200 even though Redis is down.  (A
        # separate batch: a read from PostgreSQL and a commit sent
        # together may finish in either order.)
        ok_reply(one(t, persist(c + "-1", c, "during", "d")), c + "-1")
        h.eq(turns(context_of(one(t, ctx(c)))),
             [("before", "b"), ("during", "d")],
             "the turn stored during the outage is in the context")
    finally:
        t.start_redis()
    got = h.wait_for(lambda: (lambda r: r["status"] == 200 and r)(
        one(t, ctx(c))), 10, 0.2, "ctx 200 after Redis came back")
    h.eq(turns(context_of(got)), [("before", "b"), ("during", "d")],
         "context after the outage")


def test_redis_hung():
    t = cluster()
    c = conv()
    ok_reply(one(t, persist(c + "-0", c, "one", "1")), c + "-0")
    h.eq(len(context_of(one(t, ctx(c)))), 2, "context before the hang")
    t.redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = one(t, ctx(c))
        dt = time.monotonic() - t0
        # The LRANGE times out; PostgreSQL answers (it used to be 503).
        h.eq(turns(context_of(r)), [("one", "1")],
             "ctx with Redis hung, from PostgreSQL")
        h.check(dt < REDIS_TIMEOUT_MS / 1000 + 1.5,
                "answer after %.1fs (timeout %.1fs)" %
                (dt, REDIS_TIMEOUT_MS / 1000))
        ok_reply(one(t, persist(c + "-1", c, "two", "2")), c + "-1")
    finally:
        t.redis.proc.send_signal(signal.SIGCONT)
    # The append during the hang may or may not have reached Redis; the
    # key was invalidated, so the context is right either way.
    got = h.wait_for(lambda: (lambda r: r["status"] == 200 and r)(
        one(t, ctx(c))), 10, 0.2, "ctx 200 after Redis resumed")
    h.eq(turns(context_of(got)), [("one", "1"), ("two", "2")],
         "context after the hang")


def test_postgres_down_then_back():
    t = cluster()
    c = conv()
    ok_reply(one(t, persist(c + "-0", c, "kept", "k")), c + "-0")
    h.eq(len(context_of(one(t, ctx(c)))), 2, "context cached")
    t.stop_pg()
    try:
        time.sleep(0.4)        # past bot_cache_ms: the bot copy is stale
        r = drive(t, [persist(c + "-1", c), ctx(c), ctx(conv()),
                      ctx(conv(), bot="never-seen")])
        unavailable(r["r0"], "persist with PG down")
        # Bot (stale copy) and context (Redis) need no PostgreSQL.
        h.eq(turns(context_of(r["r1"])), [("kept", "k")], "cached ctx")
        unavailable(r["r2"], "ctx miss with PG down")
        unavailable(r["r3"], "unknown bot with PG down")
        h.eq(admin(t, "bot.list")["status"], 503, "admin with PG down")
    finally:
        t.start_pg()
    h.wait_for(lambda: one(t, persist(c + "-2", c))["status"] == 200, 15,
               0.3, "persist 200 after PostgreSQL came back")
    rows = t.psql("SELECT chat_id FROM chats WHERE conversation_id = '%s' "
                  "ORDER BY seq" % c)
    h.eq([x[0] for x in rows], [c + "-0", c + "-2"], "rows stored")


def test_statement_stuck_past_timeout():
    t = cluster()
    c = conv()
    lock = subprocess.Popen(
        [os.path.join(t.pg.bindir, "psql"), "-X", "-q", "-h",
         t.pg.sockdir, "-p", str(t.pg.port), "-U", "troupe", "-d",
         "troupe", "-c",
         "BEGIN; LOCK TABLE chats; SELECT pg_sleep(%.1f); COMMIT;" %
         (PG_TIMEOUT_MS / 1000 + 1.5)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=h.clean_env())
    try:
        h.wait_for(lambda: t.psql("SELECT count(*) FROM pg_locks WHERE "
                                  "mode = 'AccessExclusiveLock' AND "
                                  "granted AND relation = "
                                  "'chats'::regclass")[0][0] == "1",
                   10, 0.05, "the lock on chats")
        t0 = time.monotonic()
        r = one(t, persist(c + "-0", c))
        dt = time.monotonic() - t0
        unavailable(r, "persist stuck behind a lock")
        h.check(PG_TIMEOUT_MS / 1000 - 0.2 <= dt <= PG_TIMEOUT_MS / 1000
                + 1.5, "503 after %.1fs, timeout %.1fs" %
                (dt, PG_TIMEOUT_MS / 1000))
    finally:
        lock.wait(30)
    h.wait_for(lambda: one(t, persist(c + "-1", c))["status"] == 200, 15,
               0.3, "persist 200 once the lock is gone")
    # The stuck statement was cancelled, so -0 is not stored behind our
    # back (it was answered 503).
    rows = t.psql("SELECT chat_id FROM chats WHERE conversation_id = '%s'"
                  % c)
    h.eq([x[0] for x in rows], [c + "-1"], "rows stored")


def test_refused_row_does_not_fail_its_batch():
    t = cluster()
    c = conv()
    t.psql("ALTER TABLE chats ADD CONSTRAINT test_poison "
           "CHECK (query <> 'poison')")
    try:
        r = drive(t, [persist("%s-%d" % (c, i), c,
                              "poison" if i == 2 else "q%d" % i)
                      for i in range(5)])
    finally:
        t.psql("ALTER TABLE chats DROP CONSTRAINT test_poison")
    for i in range(5):
        if i == 2:
            h.eq((r["r2"]["status"], r["r2"]["code"]), (500, 5000),
                 "the refused row (%r)" % r["r2"])
        else:
            ok_reply(r["r%d" % i], "%s-%d" % (c, i))
    rows = t.psql("SELECT chat_id FROM chats WHERE conversation_id = '%s' "
                  "ORDER BY seq" % c)
    h.eq([x[0] for x in rows], ["%s-%d" % (c, i) for i in (0, 1, 3, 4)],
         "stored rows, in order")


def test_starts_with_both_down_and_heals():
    t = cluster()
    t.kill("storage", signal.SIGTERM)
    t.stop_redis()
    t.stop_pg()
    try:
        p, status = h.spawn_notify(
            [h.binary("storage"), "-c", t.conf_path],
            t.log_path("storage"), timeout=10,
            notify_path=os.path.join(t.root, "notify-storage2.sock"))
        t.procs["storage"] = p
        t.killed.discard("storage")
        h.check("down" in status, "STATUS at READY: %r" % status)
        r = drive(t, [ctx(conv()), persist("down-1", conv())])
        unavailable(r["r0"], "ctx with both down")
        unavailable(r["r1"], "persist with both down")
    finally:
        t.start_redis()
        t.start_pg()
    c = conv()
    h.wait_for(lambda: one(t, persist(c + "-0", c, "x", "y"))["status"] ==
               200, 20, 0.3, "persist 200 after both came back")
    h.eq(turns(context_of(one(t, ctx(c)))), [("x", "y")],
         "context after healing")


def test_zz_sigterm_exit_0():
    t = cluster()
    rc = t.kill("storage", signal.SIGTERM)
    h.eq(rc, 0, "exit status after SIGTERM")
    h.check("stopped" in t.log("storage"), "no 'stopped' in the log")


if __name__ == "__main__":
    h.main(globals())
