# SPDX-License-Identifier: ISC
"""22: faults around a run, each answered with the right error, then healed.

Upstream refusing, slow past the deadline, answering garbage or closing;
Redis (chats go on, context from PostgreSQL) and PostgreSQL stopped and
started again; a worker SIGKILLed mid-run.  Clients get 502/503/504 with
the JSON error shape (never a false success), everything comes back by
itself, and PostgreSQL `chats` holds each 200 exactly once.
"""
import os
import signal
import threading
import time

import harness as h

TIMEOUT_MS = 4000       # [edge] chat_timeout_ms for this file


def cluster():
    # The spool is off: this file checks the clear 503 while PostgreSQL is
    # down; with the spool on (the default) chats keep answering
    # (31_pg_spool.py).
    t = h.troupe(conf={"edge": {"chat_timeout_ms": TIMEOUT_MS},
                       "storage": {"spool_max_bytes": 0}},
                 workers_min=2, workers_max=4)
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def timed_chat(t, query, **kw):
    t0 = time.monotonic()
    r = t.chat(query, **kw)
    return r, time.monotonic() - t0


def test_upstream_refused():
    t = cluster()
    bot = "0000dead-0000-4f2c-b9d2-closedport00"
    t.add_bot(bot, "http://127.0.0.1:%d" % h.free_port())
    r, dt = timed_chat(t, "anyone there?", bot_id=bot)
    h.check_error_shape(r, 502, 5020, "upstream refusing")
    h.check(dt < 3, "refused upstream took %.1fs to report" % dt)


def test_upstream_garbage_status_close():
    t = cluster()
    for q in ("[sim:garbage] hi", "[sim:status=500] hi", "[sim:close] hi"):
        r, dt = timed_chat(t, q)
        h.check_error_shape(r, 502, 5020, q)
        h.check(dt < 3, "%s took %.1fs" % (q, dt))


def test_deadline_504():
    t = cluster()
    r, dt = timed_chat(t, "[sim:delay=%d] slow" % (TIMEOUT_MS + 3000))
    h.check_error_shape(r, 504, 5040, "upstream past the deadline")
    lo, hi = TIMEOUT_MS / 1000 - 0.5, TIMEOUT_MS / 1000 + 1.5
    h.check(lo <= dt <= hi, "504 after %.1fs, want about %.1fs" %
            (dt, TIMEOUT_MS / 1000))
    # The edge and the worker are fine afterwards.
    r = t.chat("after the deadline")
    h.eq(r.status, 200, "chat after a 504 (%r)" % r)


def degraded_then_back(t, stop, start, what):
    h.eq(t.chat("before " + what).status, 200, "chat before " + what)
    stop()
    try:
        r, dt = timed_chat(t, "while " + what, history_id="h_" + what)
        h.check_error_shape(r, 503, 5030, what)
        h.check(r.headers.get("retry-after", "").isdigit(),
                "%s: 503 without Retry-After: %r" % (what, r))
        h.check(dt < TIMEOUT_MS / 1000,
                "%s: 503 only after %.1fs (deadline %.1fs)" %
                (what, dt, TIMEOUT_MS / 1000))
    finally:
        start()
    t0 = time.monotonic()
    h.wait_for(lambda: t.chat("after " + what, history_id="h_" +
                              what).status == 200,
               20, 0.3, "200 again after %s came back" % what)
    h.note("%s: back to 200 %.1fs after restart" %
           (what, time.monotonic() - t0))


def test_redis_down_then_back():
    # Redis down is no longer a 503: chats keep answering, their context
    # read from PostgreSQL (32_redis_down.py checks the details).
    t = cluster()
    h.eq(t.chat("before redis_down", history_id="h_redis").status, 200,
         "chat before redis_down")
    t.stop_redis()
    try:
        r, dt = timed_chat(t, "while redis_down", history_id="h_redis")
        h.eq(r.status, 200, "chat while Redis is down (%r)" % r)
        h.check(dt < TIMEOUT_MS / 1000, "answer after %.1fs" % dt)
    finally:
        t.start_redis()
    h.eq(t.chat("after redis_down", history_id="h_redis").status, 200,
         "chat after Redis came back")


def test_postgres_down_then_back():
    t = cluster()
    degraded_then_back(t, t.stop_pg, t.start_pg, "postgres_down")


def test_worker_killed_mid_run():
    t = cluster()
    before = t.worker_pids()
    h.check(len(before) >= 2, "want >= 2 workers, have %r" % before)
    slow = {}

    def run_slow(i):
        try:
            slow[i] = t.chat("[sim:delay=3000] slow %d" % i)
        except Exception as e:      # noqa: BLE001
            slow[i] = e
    ths = [threading.Thread(target=run_slow, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
        time.sleep(0.2)
    time.sleep(0.6)                 # both runs are at the upstream now
    victim = before[0]
    h.note("killing worker %d (workers %r)" % (victim, before))
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.3)
    # Concurrent requests while the slow ones are still in flight.
    fast = []
    for i in range(8):
        fast.append(t.chat("fast %d" % i))
    for th in ths:
        th.join(30)
    for i, r in enumerate(fast):
        h.eq(r.status, 200, "fast request %d during the crash (%r)" % (i, r))
    failed = []
    for i in range(2):
        r = slow[i]
        h.check(isinstance(r, h.Response), "slow %d: %r" % (i, r))
        if r.status != 200:
            h.check_error_shape(r, 502, 5000, "run on the killed worker")
            failed.append(i)
    h.check(failed, "no slow run failed, though its worker was killed "
            "(answers %r)" % slow)
    new = h.wait_for(lambda: [p for p in t.worker_pids()
                              if p not in before], 10, 0.1,
                     "a new worker to replace %d" % victim)
    h.check(victim not in t.worker_pids(), "killed worker still listed")
    h.note("worker %d replaced by %r" % (victim, new))
    r = t.chat("after the crash")
    h.eq(r.status, 200, "chat after the crash (%r)" % r)


def test_peer_restart_loses_no_queued_work():
    """A chat sent while auth, then storage, is down waits at its sender
    (the edge, then the worker) and is answered once the peer is back: the
    mailbox keeps unacknowledged envelopes and sends them again."""
    t = cluster()
    for name in ("auth", "storage"):
        t.kill(name, signal.SIGKILL)
        got = {}

        def send(name=name):
            got[name] = t.chat("while %s was down" % name)
        th = threading.Thread(target=send)
        th.start()
        time.sleep(1.0)             # the request is queued for the peer
        h.check(th.is_alive(), "the chat returned while %s was down: %r"
                % (name, got.get(name)))
        t.start_service(name)
        th.join(TIMEOUT_MS / 1000 + 5)
        r = got.get(name)
        h.check(isinstance(r, h.Response), "no answer after %s came back"
                % name)
        h.eq(r.status, 200, "chat queued while %s was down (%r)" % (name, r))
        # Back to full service by itself: fresh chats succeed again.
        t0 = time.monotonic()
        h.wait_for(lambda: all(t.chat("after %s restart %d" % (name, i),
                                      timeout=3).status == 200
                               for i in range(3)),
                   10, 0.2, "chats to succeed after %s restarted" % name)
        h.note("%s: full service %.1fs after its restart" %
               (name, time.monotonic() - t0))


def test_exactly_once():
    t = cluster()
    h.eq(t.chat("last").status, 200, "a last chat")
    t.check_exactly_once()


if __name__ == "__main__":
    h.main(globals())
