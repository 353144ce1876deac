# SPDX-License-Identifier: ISC
"""storage limits: troupe-storage's GCRA script (LIMIT_CHECK) against the
private Redis of tests/integration/harness.py, driven through its mailbox
by storage_drive playing auth.

Checked: limit + burst requests pass at once, the next is limited with the
right retry_after_ms, remaining counts down, a refusal changes nothing,
one fits again after the emission interval; the state is the key
troupe:rl:<key> with a PX expiry; keys are independent; SCRIPT FLUSH
(NOSCRIPT) is survived; invalid checks and Redis down answer "unknown"
(status 2).
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "..", "integration"))
import harness as h  # noqa: E402

_n = [0]


def cluster():
    return h.troupe(conf={"storage": {"redis_timeout_ms": 700,
                                      "spool_max_bytes": 0}},
                    services=["storage"])


def drive(t, cmds, final_ms=8000):
    """LIMIT_CHECKs from a fresh auth-* mailbox; answers in order."""
    for c in cmds:
        c.setdefault("cmd", "limit")
    out = h.storage_drive(t, cmds, "auth", final_ms)
    return [out.get("r%d" % i) for i in range(len(cmds))]


def key():
    _n[0] += 1
    return "tenant-%d-%d|bot|v1.chat" % (os.getpid(), _n[0])


def wait_redis_up(t):
    k = key()
    h.wait_for(lambda: drive(t, [{"key": k, "limit": 1000}])[0]["status"]
               == 0, 15, 0.2, "limit checks answered once Redis is up")


def test_burst_then_limited():
    t = cluster()
    wait_redis_up(t)
    k = key()
    # 3 per 3 s (T = 1 s) with a burst of 2: 5 at once, then one per s.
    cmds = [{"key": k, "limit": 3, "window_ms": 3000, "burst": 2}
            for _ in range(7)]
    r = drive(t, cmds)
    h.eq([x["status"] for x in r], [0, 0, 0, 0, 0, 1, 1], "statuses")
    h.eq([x["remaining"] for x in r[:5]], [4, 3, 2, 1, 0], "remaining")
    for x in r[5:]:
        h.check(800 <= x["retry_after_ms"] <= 1000,
                "retry_after_ms %d, want about 1000" % x["retry_after_ms"])
        h.eq(x["remaining"], 0, "remaining when limited")
        h.check(4500 <= x["reset_ms"] <= 5000,
                "reset_ms %d, want about 5000" % x["reset_ms"])
        h.eq(x["key"], k, "key echoed")
    # The key holds the TAT (us) and expires when the limit is whole.
    pttl = int(t.redis.command("PTTL", "troupe:rl:" + k)[1:])
    h.check(4000 <= pttl <= 5000, "PTTL %d, want about 5000" % pttl)
    # A refusal took nothing: one fits after T (1 s), not after 2 T.
    time.sleep(1.05)
    one = {"key": k, "limit": 3, "window_ms": 3000, "burst": 2}
    r = drive(t, [dict(one), dict(one)])
    h.eq([x["status"] for x in r], [0, 1], "one more after T")


def test_keys_independent_and_cost():
    t = cluster()
    wait_redis_up(t)
    a, b = key(), key()
    r = drive(t, [{"key": a, "limit": 1, "window_ms": 60000},
                  {"key": a, "limit": 1, "window_ms": 60000},
                  {"key": b, "limit": 1, "window_ms": 60000}])
    h.eq([x["status"] for x in r], [0, 1, 0], "a, a again, b")
    h.check(59000 <= r[1]["retry_after_ms"] <= 60000,
            "retry_after_ms %d, want about 60000" % r[1]["retry_after_ms"])
    # cost 3 of a 5/s limit (T 200 ms, tau 1 s): the first takes 600 ms
    # of the 1 s, the second would need 1.2 s: 200 ms later.
    c = key()
    r = drive(t, [{"key": c, "limit": 5, "window_ms": 1000, "cost": 3},
                  {"key": c, "limit": 5, "window_ms": 1000, "cost": 3}])
    h.eq([x["status"] for x in r], [0, 1], "cost 3 twice")
    h.check(100 <= r[1]["retry_after_ms"] <= 200,
            "retry_after_ms %d, want about 200" % r[1]["retry_after_ms"])


def test_noscript_and_invalid():
    t = cluster()
    wait_redis_up(t)
    k = key()
    h.eq(t.redis.command("SCRIPT", "FLUSH"), b"+OK", "SCRIPT FLUSH")
    r = drive(t, [{"key": k, "limit": 2}, {"key": k, "limit": 2},
                  {"key": k, "limit": 2}])
    h.eq([x["status"] for x in r], [0, 0, 1], "after SCRIPT FLUSH")
    r = drive(t, [{"key": k, "limit": 0}, {"key": k, "window_ms": 0},
                  {"key": "x" * 600}, {"key": ""}])
    h.eq([x["status"] for x in r], [2, 2, 2, 2], "invalid checks")


def test_redis_down_unknown():
    t = cluster()
    wait_redis_up(t)
    t.stop_redis()
    try:
        t0 = time.monotonic()
        r = drive(t, [{"key": key(), "limit": 5}])
        h.eq(r[0]["status"], 2, "Redis down: unknown")
        h.check(time.monotonic() - t0 < 3, "answered at once")
    finally:
        t.start_redis()
    wait_redis_up(t)


if __name__ == "__main__":
    h.main(globals())
