# SPDX-License-Identifier: ISC
"""70: upstream rate limits (issue 4 items 1-3, 6; docs/ratelimits.md).

troupe-upstream-sim allows R requests/s (429 + Retry-After above it).
Policy fixed: the children shrink on the signals (cut 30 %, floor 2) and
grow back (double after 5 s of quiet) within 10 s once the limit is
lifted.  Policy aimd: one bot's 429s cut and pause that bot only, the
other bot's chats keep their latency.  Always: every client answer is 200,
or 429/503 with Retry-After (never a timeout, never a 502 for a throttle);
no request reaches the simulator inside an announced Retry-After window
(the simulator counts them, "early", with a 200 ms grace for requests
already on their way); a full queue or a pause past the deadline is
answered 503 + Retry-After at once; troupectl status shows it all.
"""
import json
import threading
import time

import harness as h

BOT_A = "7392a8b4-aaaa-4f2c-b9d2-aaaaaaaaaaaa"
BOT_B = "7392a8b4-bbbb-4f2c-b9d2-bbbbbbbbbbbb"
RATE = 10              # requests/s the simulator allows
TIMEOUT_MS = 10000     # [edge] chat_timeout_ms


def sim(t, method, path, body=None):
    port = t.sim_port
    return h.http_request(port, method, path, body, None, 5)


def sim_stats(t):
    return sim(t, "GET", "/sim/stats").json


def status(t):
    r = t.ctl("status", "--json")
    return json.loads(r.stdout)


def check_answer(r, what):
    """200, or 429/503 with a Retry-After header: nothing else."""
    if r.status == 200:
        return
    h.check(r.status in (429, 503), "%s: %r (want 200, 429 or 503)" %
            (what, r))
    ra = r.headers.get("retry-after")
    h.check(ra is not None and ra.isdigit() and int(ra) >= 1,
            "%s: %d without a usable Retry-After: %r" % (what, r.status, r))


class Load:
    """n threads sending chats of bot with query until stopped."""

    def __init__(self, t, n, bot=h.DEMO_BOT, query="hello"):
        self.t, self.bot, self.query = t, bot, query
        self.stop = threading.Event()
        self.results = []           # (t_end, status, seconds)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True)
                        for _ in range(n)]

    def run(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            r = self.t.chat(self.query, bot_id=self.bot,
                            timeout=TIMEOUT_MS / 1000 + 5)
            dt = time.monotonic() - t0
            check_answer(r, "chat of %s" % self.bot)
            h.check(dt < TIMEOUT_MS / 1000 - 0.2 or r.status == 200,
                    "a refusal took %.1fs (a timeout in disguise)" % dt)
            with self.lock:
                self.results.append((time.monotonic(), r.status, dt))
            if r.status != 200:
                time.sleep(0.05)

    def start(self):
        for th in self.threads:
            th.start()
        return self

    def finish(self):
        self.stop.set()
        for th in self.threads:
            th.join(TIMEOUT_MS / 1000 + 10)

    def count(self, status):
        with self.lock:
            return sum(1 for x in self.results if x[1] == status)


def timeline(t, seconds, every=0.5, until=None):
    """[(s, target, upstream children, limit)] sampled from status."""
    out, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        s = status(t)
        up = s["upstreams"][0] if s["upstreams"] else {}
        out.append((round(time.monotonic() - t0, 1), s["target"],
                    up.get("children"), up.get("limit")))
        if until is not None and until(s):
            break
        time.sleep(every)
    return out


# ------------------------------------------------------------ fixed

def fixed_cluster():
    t = h.troupe(conf={"edge": {"chat_timeout_ms": TIMEOUT_MS},
                       "dispatcher": {"policy": "fixed",
                                      "runs_per_worker": 2}},
                 workers_min=2, workers_max=8,
                 sim_args=["--latency-ms", "100", "--rate-limit",
                           str(RATE)])
    if not getattr(t, "bot", False):
        t.add_bot()
        t.bot = True
    return t


def test_fixed_shrink_then_regrow():
    t = fixed_cluster()
    h.eq(t.chat("warm up").status, 200, "a first chat")
    sim(t, "POST", "/sim/reset", {})
    load = Load(t, 16).start()
    try:
        # 16 clients against 10/s: 429s, children cut to the floor.
        tl = timeline(t, 5)
        h.note("fixed, limited: %s" % tl)
        s = status(t)
        up = s["upstreams"][0]
        h.eq(up["policy"], "fixed", "policy")
        h.check(up["children"] == 2, "children not cut to the floor: %r"
                % up)
        h.check(up["signals"] > 0 and up["last_signal"] is not None,
                "no signal recorded: %r" % up)
        log = t.log("dispatcher")
        h.check("children 8 -> 5" in log,
                "no 'children 8 -> 5' line in the dispatcher log")
        # Lift the limit: back to 8 children within 10 s.
        sim(t, "POST", "/sim/config", {"rate_limit": 0})
        t_lift = time.monotonic()
        tl = timeline(t, 11, until=lambda s: s["upstreams"][0]["children"]
                      >= 8 and s["target"] >= 4)
        took = time.monotonic() - t_lift
        h.note("fixed, lifted: %s (%.1fs)" % (tl, took))
        s = status(t)
        h.check(s["upstreams"][0]["children"] >= 8,
                "children did not grow back within 10 s: %r" % tl)
        h.check(took <= 11, "regrowth took %.1fs" % took)
    finally:
        load.finish()
    st = sim_stats(t)
    h.note("fixed: %d ok, %d 503, %d 429; sim %s" % (
        load.count(200), load.count(503), load.count(429),
        {k: st[k] for k in ("requests", "rate_limited", "early")}))
    h.check(load.count(200) > 0, "no chat succeeded")
    h.eq(st["early"], 0, "requests inside a Retry-After window")
    sim(t, "POST", "/sim/config", {"rate_limit": RATE})


def test_fixed_status_table():
    t = fixed_cluster()
    r = t.ctl("status")
    h.check("UPSTREAM" in r.stdout and t.sim_url in r.stdout and
            "LAST_SIGNAL" in r.stdout and "tier L" in r.stdout,
            "troupectl status table: %r" % r.stdout)
    s = status(t)
    for k in ("tier", "children", "target", "ceiling", "inflight",
              "queue", "upstreams", "bots", "policy"):
        h.check(k in s, "status --json lacks %s: %r" % (k, s))
    up = s["upstreams"][0]
    for k in ("upstream", "policy", "limit", "children", "inflight",
              "queue", "last_signal", "paused_ms"):
        h.check(k in up, "upstream row lacks %s: %r" % (k, up))
    r = t.ctl("status", "extra", check_rc=False)
    h.eq(r.returncode, 2, "troupectl status extra: usage")


def test_fixed_teardown():
    h.troupe().teardown()


# ------------------------------------------------------------- aimd

def aimd_cluster():
    t = h.troupe(conf={"edge": {"chat_timeout_ms": TIMEOUT_MS},
                       # tier L3 (queue above half of queue_max) would
                       # refuse at once too; this file tests the queue.
                       "dispatcher": {"policy": "aimd",
                                      "runs_per_worker": 4,
                                      "queue_max": 6,
                                      "tier_queue_high_pct": 100}},
                 workers_min=2, workers_max=4,
                 sim_args=["--latency-ms", "50"])
    if not getattr(t, "bots", False):
        t.add_bot(BOT_A, None, "--model", "model-a")
        t.add_bot(BOT_B, None, "--model", "model-b")
        t.bots = True
    return t


def bot_row(s, bot):
    for b in s["bots"]:
        if b["bot_id"] == bot:
            return b
    return None


def test_aimd_one_bot_throttled_others_not():
    t = aimd_cluster()
    h.eq(t.chat("hi", bot_id=BOT_A).status, 200, "bot A first chat")
    h.eq(t.chat("hi", bot_id=BOT_B).status, 200, "bot B first chat")
    # RUN_DONE may reach the dispatcher after the client's answer.
    h.wait_for(lambda: bot_row(status(t), BOT_A) and
               bot_row(status(t), BOT_B), 5, 0.1, "both bots in status")
    lim_b = bot_row(status(t), BOT_B)["limit"]
    sim(t, "POST", "/sim/reset", {})
    a = Load(t, 4, BOT_A, "[sim:429] [sim:retry-after=2] slow down").start()
    b = Load(t, 4, BOT_B, "fine").start()
    time.sleep(5)
    s = status(t)
    a.finish()
    b.finish()
    ra, rb = bot_row(s, BOT_A), bot_row(s, BOT_B)
    h.note("aimd: A %r; B %r" % (ra, rb))
    h.note("aimd: A %d ok %d 503; B %d ok %d 503" % (
        a.count(200), a.count(503), b.count(200), b.count(503)))
    h.check(ra["signals"] > 0 and ra["last_signal"]["kind"] == "http_429",
            "bot A has no 429 signal: %r" % ra)
    h.check(ra["limit"] < lim_b, "bot A's limit was not cut: %r" % ra)
    h.check(rb["last_signal"] is None and rb["limit"] >= lim_b,
            "bot B was touched by A's 429s: %r" % rb)
    h.eq(b.count(503) + b.count(429), 0, "bot B refusals")
    h.check(b.count(200) > 20, "bot B got %d answers" % b.count(200))
    h.eq(a.count(200), 0, "bot A successes (every answer is a 429)")
    h.check(a.count(503) > 0, "bot A got no 503")
    bl = sorted(x[2] for x in b.results)
    h.check(bl[len(bl) // 2] < 1.0, "bot B's median latency %.2fs" %
            bl[len(bl) // 2])
    st = sim_stats(t)
    h.note("sim: %r" % {k: st[k] for k in ("requests", "by_status",
                                          "early", "early_by_model")})
    h.eq(st["early"], 0, "requests inside a Retry-After window")
    # The worker retried each of A's runs once after the Retry-After:
    # each of them reached the simulator twice at most.
    h.check(st["by_status"].get("429", 0) <= 2 * a.count(503) + 8,
            "429s %d for %d refused chats" % (st["by_status"].get("429", 0),
                                              a.count(503)))


def test_aimd_pause_past_deadline_503_at_once():
    t = aimd_cluster()
    # One 429 with Retry-After 30 s: bot A is paused past any deadline.
    r = t.chat("[sim:429] [sim:retry-after=30] stop", bot_id=BOT_A)
    check_answer(r, "the throttled chat")
    h.eq(r.status, 503, "the throttled chat")
    t0 = time.monotonic()
    r = t.chat("anyone?", bot_id=BOT_A)
    dt = time.monotonic() - t0
    h.eq(r.status, 503, "a chat of the paused bot")
    h.check(dt < 1.0, "503 took %.2fs (want at once)" % dt)
    ra = int(r.headers.get("retry-after", "0"))
    h.check(20 <= ra <= 31, "Retry-After %d, want about 30" % ra)
    h.eq(t.chat("still fine", bot_id=BOT_B).status, 200, "bot B")


def test_aimd_queue_full_503_at_once():
    t = aimd_cluster()
    bot = "7392a8b4-cccc-4f2c-b9d2-cccccccccccc"
    if not getattr(t, "bot_c", False):
        t.add_bot(bot, None, "--model", "model-c")
        t.bot_c = True
    h.eq(t.chat("hi", bot_id=bot).status, 200, "bot C first chat")
    # A 3 s pause: runs of C wait in the queue (6 places) ...
    r = t.chat("[sim:429] [sim:retry-after=3] wait", bot_id=bot)
    h.eq(r.status, 503, "the throttled chat")
    got, lock = [], threading.Lock()

    def one():
        t0 = time.monotonic()
        r = t.chat("queued", bot_id=bot)
        with lock:
            got.append((r, time.monotonic() - t0))
    th = [threading.Thread(target=one) for _ in range(12)]
    for x in th:
        x.start()
    for x in th:
        x.join(TIMEOUT_MS / 1000 + 5)
    fast503 = [x for x in got if x[0].status == 503 and x[1] < 1.0]
    ok = [x for x in got if x[0].status == 200]
    h.note("queue: %d ok (after %s s), %d fast 503" % (
        len(ok), sorted(round(x[1], 1) for x in ok), len(fast503)))
    for r, _ in got:
        check_answer(r, "a queued chat")
    h.check(len(fast503) >= 4, "%d fast 503 (queue_max 6, 12 chats)" %
            len(fast503))
    h.check(len(ok) >= 4, "%d chats waited and succeeded" % len(ok))
    h.check(all(x[1] >= 1.5 for x in ok),
            "a chat ran before the 3 s pause ended: %r" % ok)
    h.eq(sim_stats(t)["early"], 0, "requests inside a Retry-After window")


if __name__ == "__main__":
    h.main(globals())
