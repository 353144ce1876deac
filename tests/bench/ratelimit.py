# SPDX-License-Identifier: ISC
"""Rate-limit benchmark (`./troupe bench ratelimit`): the same offered load
against an upstream that allows R requests/s, with policy fixed and with
policy aimd, in one invocation (docs/ratelimits.md).

For each policy a whole private Troupe (tests/integration/harness.py)
starts with troupe-upstream-sim at --rate-limit R (429 + Retry-After: 1
above it, token bucket with a burst of R) and --latency-ms L.  After a
warm-up, an open-loop client sends 2R chats/s (POST /v1/bot/chat, evenly
spaced, one thread per chat so a slow answer never delays the next send)
for BENCH_RL_SECONDS.  Reported per policy:

  goodput/R   successful chats per second, divided by R, counted by
              the time they ended, from 4 s into the window to its end
              (the simulator's bucket starts full: a burst, not a rate)
  p50/p99     client latency of the successful chats, and p99 of all
  refused     answers 429/503 (each with Retry-After, checked), others
  early       requests that reached the simulator inside a Retry-After
              window it had announced (must be 0)
  timeline    the dispatcher's worker target, and the upstream's children
              and limit, once a second (troupectl status --json)

Target: goodput >= 0.95 R.  Environment: TROUPE_BUILD, BENCH_RL_RATE (20),
BENCH_RL_SECONDS (20), BENCH_RL_LATENCY_MS (200), BENCH_RL_RUNS (4, the
runs_per_worker), BENCH_RL_WORKERS_MAX (16), BENCH_RL_POLICIES
("fixed,aimd").  Loopback only; about a minute with the defaults.
"""
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import harness as h  # noqa: E402

R = float(os.environ.get("BENCH_RL_RATE", "20"))
SECONDS = float(os.environ.get("BENCH_RL_SECONDS", "20"))
LAT = int(os.environ.get("BENCH_RL_LATENCY_MS", "200"))
RUNS = int(os.environ.get("BENCH_RL_RUNS", "4"))
WMAX = int(os.environ.get("BENCH_RL_WORKERS_MAX", "16"))
POLICIES = os.environ.get("BENCH_RL_POLICIES", "fixed,aimd").split(",")
TIMEOUT_MS = 10000
WARM = 4.0  # s of the window left out of the goodput


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def one_policy(policy):
    t = h.Troupe(conf={"edge": {"chat_timeout_ms": TIMEOUT_MS},
                       "dispatcher": {"policy": policy,
                                      "runs_per_worker": RUNS}},
                 workers_min=2, workers_max=WMAX,
                 sim_args=["--latency-ms", str(LAT), "--rate-limit",
                           "%g" % R])
    t.start()
    try:
        t.add_bot()
        tok = t.token(ttl=3600)
        for _ in range(3):
            t.chat("warm up", token=tok)
        time.sleep(1.5)         # the bucket fills again
        h.http_request(t.sim_port, "POST", "/sim/reset", {}, None, 5)
        results, lock = [], threading.Lock()
        bad = []
        tl, stop = [], threading.Event()

        def sample():
            t0 = time.monotonic()
            while not stop.is_set():
                try:
                    s = json.loads(t.ctl("status", "--json").stdout)
                    up = s["upstreams"][0] if s["upstreams"] else {}
                    tl.append((int(time.monotonic() - t0), s["target"],
                               s["ready"], up.get("children"),
                               up.get("limit")))
                except (h.Failure, ValueError, KeyError, IndexError):
                    pass
                stop.wait(1.0)

        def send(i):
            t0 = time.monotonic()
            r = t.chat("bench %d" % i, token=tok,
                       timeout=TIMEOUT_MS / 1000 + 5)
            dt = time.monotonic() - t0
            if r.status in (429, 503) and \
                    not r.headers.get("retry-after", "").isdigit():
                bad.append("%d without Retry-After" % r.status)
            elif r.status not in (200, 429, 503):
                bad.append("%d %r" % (r.status, r))
            with lock:
                results.append((r.status, dt, time.monotonic()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = []
        n = int(SECONDS * 2 * R)
        start = time.monotonic()
        for i in range(n):
            due = start + i / (2 * R)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=send, args=(i,), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join(TIMEOUT_MS / 1000 + 10)
        stop.set()
        sampler.join(5)
        st = h.http_request(t.sim_port, "GET", "/sim/stats", None, None,
                            5).json
        ok = [dt for s, dt, _ in results if s == 200]
        refused = sum(1 for s, _, _ in results if s in (429, 503))
        # Goodput: successes that ended inside the steady part of the
        # window (after WARM s: the simulator's bucket starts full, a
        # burst of R that is not a rate).
        w0, w1 = start + WARM, start + SECONDS
        served = sum(1 for s, _, end in results
                     if s == 200 and w0 <= end < w1)
        return {
            "policy": policy,
            "sent": n,
            "ok": len(ok),
            "served": served,
            "goodput": served / (SECONDS - WARM) / R,
            "p50": pct(ok, 50),
            "p99": pct(ok, 99),
            "p99_all": pct([dt for _, dt, _ in results], 99),
            "refused": refused,
            "other": len(results) - len(ok) - refused + (n - len(results)),
            "bad": bad[:5],
            "early": st.get("early", -1),
            "sim_429": st.get("by_status", {}).get("429", 0),
            "timeline": tl,
        }
    finally:
        t.teardown()


def main():
    print("rate-limit bench: R=%g req/s allowed, offered %g/s for %gs, "
          "upstream latency %d ms, %d runs per worker, workers 2..%d" %
          (R, 2 * R, SECONDS, LAT, RUNS, WMAX), flush=True)
    out = []
    for p in POLICIES:
        res = one_policy(p)
        out.append(res)
        print("\n%-5s goodput %.3f R (%d served in the steady %gs; %d ok "
              "of %d sent in all), p50 %.2fs, p99 "
              "%.2fs (all answers %.2fs), refused %d (429/503 with "
              "Retry-After), other %d, sim 429s %d, early %d%s" % (
                  p, res["goodput"], res["served"], SECONDS - WARM,
                  res["ok"], res["sent"], res["p50"],
                  res["p99"], res["p99_all"], res["refused"],
                  res["other"], res["sim_429"], res["early"],
                  ", BAD: %s" % res["bad"] if res["bad"] else ""),
              flush=True)
        print("      timeline (s: target/ready children, upstream "
              "children, limit): " + " ".join(
                  "%d:%d/%d,%s,%s" % x for x in res["timeline"]),
              flush=True)
    print("\nsummary:")
    for res in out:
        print("  %-5s goodput/R %.3f  p99 %.2fs  %s" % (
            res["policy"], res["goodput"], res["p99"],
            "ok" if res["goodput"] >= 0.95 else "below the 0.95 target"))
    return 0 if all(not r["bad"] and r["early"] == 0 for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
