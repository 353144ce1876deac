# SPDX-License-Identifier: ISC
"""Streaming scale (`./troupe bench streams`): how many concurrent
streaming /v3/chat chats Troupe carries with no error, and at what memory.

A whole private Troupe (tests/integration/harness.py) with the simulator
answering each chat in about a second (--latency-ms, --token-rate).  For
each N of BENCH_STREAMS (default 1000,2500,5000,10000): N asyncio clients
open their connections, send `POST /v3/chat` with stream:true at once, and
read the stream to `event:done`.  Reported per step: errors (a status other
than 200, a stream that ends without done, a socket error), p50/p99 time to
the first event, the whole run's time, and the peak total RSS of every
Troupe process (services and workers, sampled every 200 ms).  The largest N
with zero errors is the figure of PRODUCT.md §10 (target 10,000 under
1 GiB).  Reference in the same invocation: the same clients against
`/healthz` (what the client and the kernel cost alone).

Environment: TROUPE_BUILD, BENCH_STREAMS, BENCH_SIM_LATENCY_MS (500),
BENCH_SIM_TOKEN_RATE (20), BENCH_WORKERS_MAX (8).  Loopback only.
"""
import asyncio
import json
import os
import resource
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import harness as h  # noqa: E402

STEPS = [int(x) for x in os.environ.get(
    "BENCH_STREAMS", "1000,2500,5000,10000").split(",")]
LAT = os.environ.get("BENCH_SIM_LATENCY_MS", "500")
RATE = os.environ.get("BENCH_SIM_TOKEN_RATE", "20")
WMAX = int(os.environ.get("BENCH_WORKERS_MAX", "8"))


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for ln in f:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return 0


def troupe_pids(t):
    pids = [p.pid for n, p in t.procs.items() if p.poll() is None]
    return pids + t.worker_pids()


class Sampler(threading.Thread):
    def __init__(self, t):
        super().__init__(daemon=True)
        self.t, self.peak, self.stop = t, 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, sum(rss_kib(p)
                                           for p in troupe_pids(self.t)))
            time.sleep(0.2)


async def one(port, req, path_kind, res):
    t0 = time.monotonic()
    first = None
    try:
        rd, wr = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        res["errors"].append("connect: %s" % e)
        return
    try:
        wr.write(req)
        await wr.drain()
        head = await asyncio.wait_for(rd.readuntil(b"\r\n\r\n"), 60)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            res["errors"].append("status %d" % status)
            return
        if path_kind == "healthz":
            res["first"].append(time.monotonic() - t0)
            return
        buf = b""
        while b"event:done" not in buf:
            b = await asyncio.wait_for(rd.read(65536), 60)
            if not b:
                res["errors"].append("stream ended without done")
                return
            if first is None and b"event:" in b:
                first = time.monotonic() - t0
            buf = buf[-64:] + b
        res["first"].append(first)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            ValueError) as e:
        res["errors"].append(type(e).__name__)
    finally:
        wr.close()
    res["done"] += 1


async def step(port, n, req, kind):
    res = {"errors": [], "first": [], "done": 0}
    t0 = time.monotonic()
    await asyncio.gather(*(one(port, req, kind, res) for _ in range(n)))
    res["wall"] = time.monotonic() - t0
    return res


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] * 1000


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(STEPS) * 3 + 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    print("streaming scale: steps %s, simulator %s ms + %s tokens/s, "
          "workers up to %d, fd limit %d" % (
              STEPS, LAT, RATE, WMAX,
              resource.getrlimit(resource.RLIMIT_NOFILE)[0]), flush=True)
    t = h.Troupe(conf={"log": {"level": "warn"},
                       "edge": {"chat_timeout_ms": 60000},
                       "dispatcher": {"runs_per_worker": 4000,
                                      "queue_max": 100000},
                       "worker": {"upstream_connections": 4000}},
                 workers_min=2, workers_max=WMAX,
                 sim_args=["--latency-ms", LAT, "--token-rate", RATE])
    best = 0
    try:
        t.start()
        t.add_bot()
        tok = t.token(ttl=24 * 3600)
        body = json.dumps({
            "bot_id": h.DEMO_BOT, "user_id": "u_bench", "stream": True,
            "additional_messages": [{"role": "user", "content": "hi",
                                     "content_type": "text"}]}).encode()
        req = (b"POST /v3/chat HTTP/1.1\r\nHost: bench\r\n"
               b"Authorization: Bearer " + tok.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: " +
               str(len(body)).encode() + b"\r\n\r\n" + body)
        hz = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
        idle = sum(rss_kib(p) for p in troupe_pids(t))
        print("idle RSS of all Troupe processes: %.1f MiB" % (idle / 1024))
        print("%8s %8s %10s %10s %8s %10s" % (
            "N", "errors", "p50 first", "p99 first", "wall s", "peak RSS"))
        for n in STEPS:
            ref = asyncio.run(step(t.edge_port, n, hz, "healthz"))
            s = Sampler(t)
            s.start()
            r = asyncio.run(step(t.edge_port, n, req, "stream"))
            s.stop = True
            s.join()
            print("%8d %8d %8.0f ms %8.0f ms %8.1f %7.0f MiB   "
                  "(reference /healthz x%d: %d errors, p99 %.0f ms)" % (
                      n, len(r["errors"]), pct(r["first"], 0.5),
                      pct(r["first"], 0.99), r["wall"], s.peak / 1024, n,
                      len(ref["errors"]), pct(ref["first"], 0.99)),
                  flush=True)
            if r["errors"]:
                kinds = {}
                for e in r["errors"]:
                    kinds[e] = kinds.get(e, 0) + 1
                print("   errors: %s" % kinds)
                break
            best = n
            time.sleep(2)
        print("largest N with zero errors: %d (target 10000 under "
              "1024 MiB)" % best)
    finally:
        t.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
