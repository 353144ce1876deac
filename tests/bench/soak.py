# SPDX-License-Identifier: ISC
"""Soak (`./troupe bench soak`): a long mixed load, and whether any
process grows.

A whole private Troupe (tests/integration/harness.py) carries, for
BENCH_SOAK_S seconds (default 600), a mixed load from client threads:
/v1/bot/chat chats, streaming /v3/chat chats read to `done`, non-streaming
/v3/chat chats that are cancelled while they run (the simulator answers
those slowly), and signed plugin webhook calls.  Every second the RSS and
the number of open file descriptors of every Troupe process (services and
each worker) are sampled.  After the warm-up (BENCH_SOAK_WARMUP_S, default
60) a least-squares line is fitted per process; the slope is printed in
KiB per minute and fds per minute next to the total change, with the
request counts and errors.  Target (issue 7): flat, i.e. no growth beyond
warm-up; a process whose RSS grows by more than BENCH_SOAK_RSS_KIB_MIN
(2048) KiB per minute or gains file descriptors is named as growing.

Environment: TROUPE_BUILD, BENCH_SOAK_S, BENCH_SOAK_WARMUP_S,
BENCH_SOAK_RSS_KIB_MIN.  Loopback only.  Exit 1 if anything grows or a
request fails in a way it should not.
"""
import hashlib
import http.client
import json
import os
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import harness as h  # noqa: E402

DURATION = float(os.environ.get("BENCH_SOAK_S", "600"))
WARMUP = float(os.environ.get("BENCH_SOAK_WARMUP_S", "60"))
RSS_SLOPE_MAX = float(os.environ.get("BENCH_SOAK_RSS_KIB_MIN", "2048"))
TOKEN = "soak-verify-token"
SECRET = "soak-plugin-secret-0123456789"


def proc_stats(pid):
    try:
        fds = len(os.listdir("/proc/%d/fd" % pid))
        with open("/proc/%d/status" % pid) as f:
            rss = next(int(ln.split()[1]) for ln in f
                       if ln.startswith("VmRSS:"))
        return rss, fds
    except (OSError, StopIteration):
        return None


class Sampler(threading.Thread):
    """Every second: {name: (rss KiB, fds)} for every live process."""

    def __init__(self, t):
        super().__init__(daemon=True)
        self.t = t
        self.series = {}            # name -> [(t, rss, fds)]
        self.stop = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic() - t0
            procs = [(n, p.pid) for n, p in self.t.procs.items()
                     if p.poll() is None]
            for pid in self.t.worker_pids():
                procs.append(("worker:%d" % pid, pid))
            for name, pid in procs:
                s = proc_stats(pid)
                if s:
                    self.series.setdefault(name, []).append((now,) + s)
            self.stop.wait(1.0)


def slope(points):
    """Least-squares slope of (x, y) points, per unit of x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return (sum((p[0] - mx) * (p[1] - my) for p in points) / den
            if den else 0.0)


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + 1


def request(t, method, path, body, headers, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port,
                                   timeout=timeout)
    try:
        c.request(method, path, body, headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def v1_loop(t, stop, counts, i):
    hd = {"Content-Type": "application/json",
          "Authorization": "Bearer " + t.soak_token}
    n = 0
    while not stop.is_set():
        n += 1
        body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_s%d" % i,
                           "query": "soak %d" % n,
                           "history_id": "h_soak_%d_%d" % (i, n % 50)})
        try:
            st, _ = request(t, "POST", "/v1/bot/chat", body.encode(), hd)
            counts.add("v1 %d" % st)
        except OSError as e:
            counts.add("v1 " + type(e).__name__)


def v3_stream_loop(t, stop, counts, i):
    hd = {"Content-Type": "application/json",
          "Authorization": "Bearer " + t.soak_token}
    while not stop.is_set():
        body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_v3%d" % i,
                           "stream": True, "additional_messages": [
                               {"role": "user", "content": "stream me",
                                "content_type": "text"}]}).encode()
        try:
            st, data = request(t, "POST", "/v3/chat", body, hd)
            done = b"event:done" in data.replace(b" ", b"")
            counts.add("v3 stream %d%s" % (st, "" if done else " no-done"))
        except OSError as e:
            counts.add("v3 stream " + type(e).__name__)


def v3_cancel_loop(t, stop, counts, i):
    hd = {"Content-Type": "application/json",
          "Authorization": "Bearer " + t.soak_token}
    while not stop.is_set():
        body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_c%d" % i,
                           "stream": False, "additional_messages": [
                               {"role": "user", "content":
                                "[sim:delay=2000] cancel me",
                                "content_type": "text"}]}).encode()
        try:
            st, data = request(t, "POST", "/v3/chat", body, hd)
            if st != 200:
                counts.add("v3 create %d" % st)
                continue
            d = json.loads(data)["data"]
            time.sleep(0.3)
            q = json.dumps({"conversation_id": d["conversation_id"],
                            "chat_id": d["id"]}).encode()
            st, _ = request(t, "POST", "/v3/chat/cancel", q, hd)
            counts.add("v3 cancel %d" % st)
        except (OSError, ValueError, KeyError) as e:
            counts.add("v3 cancel " + type(e).__name__)


def webhook_loop(t, stop, counts, i):
    while not stop.is_set():
        body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_w%d" % i,
                           "arguments": {"n": i}}).encode()
        ts, nonce = str(int(time.time())), uuid.uuid4().hex
        sig = hashlib.sha1((ts + nonce + TOKEN).encode() + body).hexdigest()
        hd = {"Content-Type": "application/json",
              "X-Coze-Bot-ID": h.DEMO_BOT, "X-Coze-Timestamp": ts,
              "X-Coze-Nonce": nonce, "X-Coze-Signature": sig}
        try:
            st, _ = request(t, "POST", "/api/v1/execute?plugin=echo", body,
                            hd)
            counts.add("webhook %d" % st)
        except OSError as e:
            counts.add("webhook " + type(e).__name__)
        time.sleep(0.05)


def main():
    t = h.Troupe(conf={"webhook": {"verify_token": TOKEN},
                       "edge": {"chat_timeout_ms": 15000}},
                 workers_min=2, workers_max=4,
                 sim_args=["--plugin-secret", SECRET, "--token-rate",
                           "200"])
    t.start()
    try:
        t.add_bot()
        t.ctl("plugin", "add", h.DEMO_BOT, "echo", "--url",
              t.sim_url.rstrip("/") + "/plugin/echo", "--auth", "token",
              "--secret", SECRET)
        t.soak_token = t.token(ttl=int(DURATION) + 3600)
        stop = threading.Event()
        counts = Counts()
        loops = ([(v1_loop, i) for i in range(3)] +
                 [(v3_stream_loop, i) for i in range(2)] +
                 [(v3_cancel_loop, i) for i in range(2)] +
                 [(webhook_loop, i) for i in range(1)])
        ths = [threading.Thread(target=f, args=(t, stop, counts, i),
                                daemon=True) for f, i in loops]
        sampler = Sampler(t)
        sampler.start()
        t0 = time.monotonic()
        for th in ths:
            th.start()
        print("soak: %d s of mixed load (%d client threads), sampling every "
              "second, warm-up %d s" % (DURATION, len(ths), WARMUP),
              flush=True)
        while time.monotonic() - t0 < DURATION:
            time.sleep(min(60, DURATION - (time.monotonic() - t0)))
            with counts.lock:
                total = sum(counts.c.values())
            print("  %4.0f s: %d requests" % (time.monotonic() - t0, total),
                  flush=True)
        stop.set()
        for th in ths:
            th.join(40)
        sampler.stop.set()
        sampler.join(5)
    finally:
        t.teardown()

    print("\nrequests:")
    bad = 0
    for k, v in sorted(counts.c.items()):
        ok = k.split()[-1] == "200"
        bad += 0 if ok else v
        print("  %-28s %8d%s" % (k, v, "" if ok else "   <- not 200"))
    print("\nper process after %d s warm-up (slope of a least-squares "
          "line):" % WARMUP)
    print("  %-16s %9s %9s %12s %8s %10s" % (
        "process", "RSS KiB", "end KiB", "KiB/min", "fds", "fds/min"))
    growing = []
    for name in sorted(sampler.series):
        pts = [p for p in sampler.series[name] if p[0] >= WARMUP]
        if len(pts) < 30:
            continue                # a short-lived worker
        rs = slope([(p[0], p[1]) for p in pts]) * 60
        fs = slope([(p[0], p[2]) for p in pts]) * 60
        print("  %-16s %9d %9d %12.1f %4d->%-3d %10.2f" % (
            name, pts[0][1], pts[-1][1], rs, pts[0][2], pts[-1][2], fs))
        if rs > RSS_SLOPE_MAX or (fs > 0.5 and pts[-1][2] > pts[0][2] + 4):
            growing.append(name)
    print("\nsoak: %s; %d requests not answered 200" % (
        "growing: " + ", ".join(growing) if growing else "flat", bad))
    # cancels may find the chat already finished (200 either way) and a
    # v3 chat may meet a busy conversation only if a cancel lagged
    sys.exit(1 if growing else 0)


if __name__ == "__main__":
    main()
