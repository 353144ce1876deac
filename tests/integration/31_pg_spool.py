# SPDX-License-Identifier: ISC
"""31: degraded tier L2: PostgreSQL down under load, chats spooled to disk.

Under a steady chat load (v1 and v3 streams, a few requests/s from
threads), PostgreSQL is stopped for TROUPE_TEST_PG_DOWN_S seconds (default
60, the figure of issue 4) and started again: every chat must answer
200 the whole time, the spool ($root/storage-spool, [storage] spool_dir
defaults to the parent of [ipc] rundir) must drain once PostgreSQL is
back, and every chat answered 200 must be in PostgreSQL exactly once.
Then troupe-storage is SIGKILLed while spooling (a torn record added to
the file's end as if it died mid-write) and restarted: it replays what it
had acknowledged, nothing is lost, nothing doubled.
"""
import http.client
import json
import os
import re
import threading
import time

import harness as h

DOWN_S = float(os.environ.get("TROUPE_TEST_PG_DOWN_S", "60"))
PAUSE_S = 0.25          # between requests of one load thread
V3_OK = []              # chat ids of every v3 stream that completed
CONV = {}               # v3 chat id -> conversation id


def cluster():
    t = h.troupe(conf={"storage": {"pg_timeout_ms": 1500},
                       "edge": {"chat_timeout_ms": 15000}},
                 workers_min=2, workers_max=4)
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def spool_path(t):
    return os.path.join(t.root, "storage-spool")


def spool_size(t):
    try:
        return os.path.getsize(spool_path(t))
    except OSError:
        return -1


def v3_chat(t, query):
    """A /v3/chat stream read to its end: (status, chat_id or None)."""
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=20)
    body = {"bot_id": h.DEMO_BOT, "user_id": "u_spool", "stream": True,
            "additional_messages": [{"role": "user", "content": query,
                                     "content_type": "text"}]}
    try:
        c.request("POST", "/v3/chat", json.dumps(body).encode(),
                  {"Content-Type": "application/json",
                   "Authorization": "Bearer " + t.token()})
        r = c.getresponse()
        raw = r.read().decode("utf-8", "replace")
    finally:
        c.close()
    if r.status != 200:
        return r.status, None
    ev, chat = None, None
    for line in raw.splitlines():
        k, _, v = line.partition(":")
        if k == "event":
            ev = v.strip()
        elif k == "data" and ev == "conversation.chat.completed":
            d = json.loads(v)
            chat = d["id"]
            CONV[chat] = d["conversation_id"]
        elif k == "data" and ev == "conversation.chat.failed":
            return 599, None     # a failed chat is no success
    return (200 if chat else 598), chat


class Load:
    """Threads sending v1 chats and v3 streams until stopped."""

    def __init__(self, t, v1=2, v3=1):
        self.t = t
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.errors = []        # (time, kind, status)
        self.v1_ok, self.v3_ok = [], []
        self.ths = [threading.Thread(target=self.run_v1, args=(i,))
                    for i in range(v1)]
        self.ths += [threading.Thread(target=self.run_v3, args=(i,))
                     for i in range(v3)]

    def start(self):
        for th in self.ths:
            th.start()
        return self

    def finish(self):
        self.stop.set()
        for th in self.ths:
            th.join(60)

    def note(self, kind, status, chat):
        with self.lock:
            self.sent += 1
            if status == 200:
                (self.v1_ok if kind == "v1" else self.v3_ok).append(chat)
            else:
                self.errors.append((time.monotonic(), kind, status))

    def run_v1(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                r = self.t.chat("load v1 %d-%d" % (i, n))
                st = r.status
                chat = r.data.get("chat_id") if st == 200 else None
            except Exception:           # noqa: BLE001
                st, chat = 0, None
            self.note("v1", st, chat)
            time.sleep(PAUSE_S)

    def run_v3(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                st, chat = v3_chat(self.t, "load v3 %d-%d" % (i, n))
            except Exception:           # noqa: BLE001
                st, chat = 0, None
            if st == 200:
                V3_OK.append(chat)
            self.note("v3", st, chat)
            time.sleep(PAUSE_S)


def check_stored(t):
    """Each 200 exactly once in PostgreSQL (v1: t.check_exactly_once's
    rules on the v1 rows, t.ok_chats holding every v1 200 of this
    Troupe; v3: the chat rows by id)."""
    v1_ok, v3_ok = t.ok_chats, V3_OK
    rows = t.psql("SELECT chat_id, count(*) FROM chats GROUP BY chat_id "
                  "HAVING count(*) > 1")
    h.eq(rows, [], "chat_ids stored twice")
    v1 = {r[0] for r in t.psql("SELECT chat_id FROM chats "
                               "WHERE route = 'v1.chat'")}
    missing = set(c for c in v1_ok if c) - v1
    h.check(not missing, "acknowledged v1 chats missing: %s (of %d)"
            % (sorted(missing)[:5], len(v1_ok)))
    h.eq(len(set(v1_ok)), len(v1_ok), "distinct v1 chat_ids among 200s")
    h.check(len(v1) - len(v1_ok) <= t.failed_chats,
            "v1 rows %d vs 200s %d (5xx %d)" % (len(v1), len(v1_ok),
                                                t.failed_chats))
    v3 = {r[0] for r in t.psql("SELECT chat_id FROM chats "
                               "WHERE route = 'v3.chat'")}
    missing = set(v3_ok) - v3
    h.check(not missing, "acknowledged v3 chats missing: %s (of %d)"
            % (sorted(missing)[:5], len(v3_ok)))
    if v3_ok:
        ids = ",".join("'%s'" % c for c in v3_ok)
        n = t.psql("SELECT count(*), count(DISTINCT chat_id) FROM chats "
                   "WHERE chat_id IN (%s)" % ids)
        h.eq((int(n[0][0]), int(n[0][1])), (len(v3_ok), len(v3_ok)),
             "v3 rows of the 200s (rows, distinct)")
    return len(v1), len(v3)


def check_spooled_reads(t, chat):
    """While spooling, retrieve and message/list of a spooled v3 chat are
    served from its spool record."""
    q = "conversation_id=%s&chat_id=%s" % (CONV[chat], chat)
    hd = {"Authorization": "Bearer " + t.token()}
    r = h.http_request(t.edge_port, "POST", "/v3/chat/retrieve?" + q,
                       None, hd)
    h.eq((r.status, r.code), (200, 0), "retrieve while spooling (%r)" % r)
    h.eq((r.data["id"], r.data["status"]), (chat, "completed"),
         "retrieved chat")
    h.check(r.data.get("completed_at", 0) >= r.data["created_at"] > 0,
            "times %r" % r.data)
    r = t.get("/v3/chat/message/list?" + q, hd)
    h.eq((r.status, r.code), (200, 0), "message/list while spooling (%r)"
         % r)
    h.eq([m["role"] for m in r.data], ["user", "assistant"],
         "spooled messages (%r)" % r.data)
    h.eq(r.data[0]["content"], "v3 spooled before the kill",
         "the question, from the spool")


def wait_drained(t, timeout=60):
    h.wait_for(lambda: spool_size(t) == 8 and
               "L2: leaving" in t.log("storage"),
               timeout, 0.2, "spool replayed and emptied")


def test_pg_down_under_load():
    t = cluster()
    h.eq(t.chat("warm up").status, 200, "chat before the outage")
    load = Load(t).start()
    try:
        time.sleep(3)
        t0 = time.monotonic()
        t.stop_pg()
        h.wait_for(lambda: spool_size(t) > 8, 15, 0.1,
                   "chats spooled while PostgreSQL is down")
        h.check("L2: entering degraded tier L2" in t.log("storage"),
                "journal line entering L2")
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - t0)))
        down = time.monotonic() - t0
        spooled = spool_size(t)
        sent_down = load.sent
        t.start_pg()
        wait_drained(t)
        time.sleep(2)
    finally:
        load.finish()
    h.note("PostgreSQL down %.1fs; spool reached %d bytes; load: sent %d,"
           " 200 v1 %d + v3 %d, errors %d (%r)" % (
               down, spooled, load.sent, len(load.v1_ok), len(load.v3_ok),
               len(load.errors), load.errors[:5]))
    h.check(sent_down > 0, "load ran")
    h.eq(load.errors, [], "errors under load (time, kind, status)")
    n1, n3 = check_stored(t)
    h.note("rows: v1 %d, v3 %d" % (n1, n3))
    h.check("L2: leaving degraded tier L2" in t.log("storage"),
            "journal line leaving L2")


def test_storage_killed_while_spooling():
    """SIGKILL while spooling (and a torn record at the end), restart
    with PostgreSQL still down: the spool is kept, replayed once it is
    back.  (A restarted storage knows no bot until PostgreSQL answers:
    its bot cache is in memory, so chats get 503 until then.)"""
    t = cluster()
    h.eq(t.chat("before").status, 200, "chat before")
    t.stop_pg()
    try:
        for i in range(10):
            r = t.chat("spooled before the kill %d" % i)
            h.eq(r.status, 200, "v1 chat %d with PostgreSQL down (%r)"
                 % (i, r))
        st, chat = v3_chat(t, "v3 spooled before the kill")
        h.eq(st, 200, "v3 chat with PostgreSQL down")
        V3_OK.append(chat)
        check_spooled_reads(t, chat)
        size = spool_size(t)
        h.check(size > 8, "spool holds the chats (%d bytes)" % size)
        t.kill("storage")
        # As if it died mid-append: a record header promising more.
        with open(spool_path(t), "ab") as f:
            f.write(b"\x40\x00\x00\x00\xde\xad\xbe\xefhalf a rec")
        t.start_service("storage")
        h.wait_for(lambda: "cut a torn tail of 18 bytes" in
                   t.log("storage"), 10, 0.1, "torn tail cut at start")
        h.check(re.search(r"holds 11 chats from a previous run",
                          t.log("storage")),
                "replay at start announced (11 chats)")
        h.eq(spool_size(t), size, "spool after the restart (torn tail "
             "cut, records kept)")
        # Hops are at least once: CHAT_PERSISTs the killed process had
        # not acknowledged to the workers come again and are spooled
        # again (the replay stores each once).
        time.sleep(1)
        h.check(spool_size(t) >= size, "spool kept while PostgreSQL is "
                "down (%d bytes, had %d)" % (spool_size(t), size))
    finally:
        t.start_pg()
    wait_drained(t)
    n1, n3 = check_stored(t)
    h.note("after the kill: rows v1 %d, v3 %d" % (n1, n3))
    h.wait_for(lambda: t.chat("after the replay").status == 200,
               15, 0.3, "chat after the replay")
    check_stored(t)


if __name__ == "__main__":
    h.main(globals())
