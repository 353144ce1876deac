# SPDX-License-Identifier: ISC
"""Hostile clients (`./troupe bench hostile`, issue 7): the edge attacked
while a legitimate client works.  A benchmark, not a ctest: the figure is
a latency ratio measured against an unloaded run in the same invocation.

A legitimate client (from 127.0.0.2, so per-address limits on the
attackers' 127.0.0.1 cannot touch it) sends /v1/bot/chat at a fixed rate
and measures its latency, first alone, then during each attack:

- slowloris: `slowhttptest -H`, thousands of connections sending a header
  line now and then (the edge's head_timeout_ms cuts them);
- slow body: `slowhttptest -B`, thousands of POSTs trickling their bodies;
- header floods: heads over max_head and with too many fields;
- body floods: bodies over max_body, announced and chunked;
- pipelined garbage: connections writing junk requests back to back;
- connection churn: connections opened and closed as fast as possible;
  then again without a limit, and with [edge] conn_rate_per_addr at each
  of HOSTILE_CONN_RATES (default 100; burst twice the rate; off by
  default in the edge);
- slowloris again with [edge] max_conns_per_addr under its connection
  count (HOSTILE_SLOW_CAP, default 1024).

The slow attacks (thousands of connections) must leave the legitimate
client's p99 within RATIO_MAX times its unloaded value (issue 7); every
attack must leave all its requests answered 200, the attackers answered
with the right error (431, 413, 400), and the edge alive, answering and
back to its file-descriptor count after.  The floods' p99 ratio is
printed: they compete for the same two cores as everything else, so the
bound there is "no error, no stall" (FLOOD_RATIO_MAX).
slowhttptest is a Debian package (`./troupe deps` installs it); without it
the two slow attacks are skipped with a printed reason.
"""
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import harness as h  # noqa: E402

RATE = 100              # legitimate requests per second
MEASURE_S = 8.0         # each measurement
RATIO_MAX = 2.0         # p99 under a slow attack vs unloaded (issue 7)
FLOOD_RATIO_MAX = 50.0  # floods: CPU is shared; no stall, no error
SLOW_CONNS = 3000       # slowhttptest connections
LEGIT_SRC = "127.0.0.2"
# test_connection_churn_limited: [edge] conn_rate_per_addr values tried
CHURN_RATES = [int(r) for r in os.environ.get(
    "HOSTILE_CONN_RATES", "100").split(",")]
# test_slowloris_capped: [edge] max_conns_per_addr under SLOW_CONNS
SLOW_CAP = int(os.environ.get("HOSTILE_SLOW_CAP", "1024"))


def cluster():
    t = h.troupe(conf={"edge": {"head_timeout_ms": 5000}},
                 workers_min=2, workers_max=2)
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
        t.legit_token = t.token(ttl=3600)
    return t


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100.0))] if xs else 0.0


def legit(t, seconds=MEASURE_S):
    """Chats at RATE/s from LEGIT_SRC over one keep-alive connection (a
    new one after any error); returns (latencies ms, errors)."""
    lat, errors = [], []
    body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_legit",
                       "query": "hello"}).encode()
    hdr = {"Content-Type": "application/json",
           "Authorization": "Bearer " + t.legit_token}
    c = None
    start = time.monotonic()
    n = 0
    while True:
        due = start + n / RATE
        now = time.monotonic()
        if due - start >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        n += 1
        t0 = time.monotonic()
        try:
            if c is None:
                c = http.client.HTTPConnection(
                    "127.0.0.1", t.edge_port, timeout=10,
                    source_address=(LEGIT_SRC, 0))
            c.request("POST", "/v1/bot/chat", body, hdr)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(r.status)
        except (OSError, http.client.HTTPException) as e:
            errors.append(type(e).__name__)
            c = None
            continue
        # latency from the scheduled send: a stalled client shows
        lat.append((time.monotonic() - min(t0, due)) * 1000.0)
    if c is not None:
        c.close()
    return lat, errors


def edge_fds(t):
    return len(os.listdir("/proc/%d/fd" % t.pid("edge")))


BASE = {}
ROWS = []


def baseline(t):
    if "p99" not in BASE:
        legit(t, 2.0)                       # warm up
        lat, err = legit(t)
        h.eq(err, [], "errors of the unloaded legitimate client")
        BASE.update(p50=pct(lat, 50), p99=pct(lat, 99),
                    fds=edge_fds(t))
        h.note("unloaded: p50 %.2f ms, p99 %.2f ms, edge fds %d" % (
            BASE["p50"], BASE["p99"], BASE["fds"]))
    return BASE


def under_attack(t, name, attack, ratio_max=FLOOD_RATIO_MAX, settle=None):
    """Run attack(stop_event) in a thread while the legitimate client
    measures; check the ratio, the errors and the edge afterwards (after
    settle(), if given, ran)."""
    base = baseline(t)
    stop = threading.Event()
    stats = {}
    th = threading.Thread(target=attack, args=(t, stop, stats), daemon=True)
    th.start()
    time.sleep(2.0)                         # let the attack build up
    lat, err = legit(t)
    stop.set()
    th.join(30)
    if settle is not None:
        settle()
    p99 = pct(lat, 99)
    ratio = p99 / base["p99"] if base["p99"] else 0
    ROWS.append((name, pct(lat, 50), p99, ratio, len(err), stats))
    h.note("%-18s p50 %.2f ms p99 %.2f ms (%.2fx) errors %d %s" % (
        name, pct(lat, 50), p99, ratio, len(err), stats))
    h.eq(err, [], "%s: errors of the legitimate client" % name)
    h.check(ratio <= ratio_max, "%s: legitimate p99 %.2f ms is %.2fx the "
            "unloaded %.2f ms (at most %.1fx)" % (
                name, p99, ratio, base["p99"], ratio_max))
    # the edge is whole and lets go of the attackers' sockets
    r = t.get("/healthz", timeout=5)
    h.eq(r.status, 200, "%s: /healthz after the attack" % name)
    h.wait_for(lambda: edge_fds(t) <= base["fds"] + 16, 20, 0.2,
               "%s: edge fds back near %d (now %d)" % (
                   name, base["fds"], edge_fds(t)))


def slowhttptest(t, stop, stats, mode, path):
    exe = shutil.which("slowhttptest")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args = [exe, mode, "-c", str(SLOW_CONNS), "-r", "1000", "-i", "2",
            "-x", "16", "-s", "65536", "-l", str(int(MEASURE_S + 6)),
            "-p", "3", "-u", "http://127.0.0.1:%d%s" % (t.edge_port, path)]
    if mode == "-B":
        args += ["-t", "POST"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, preexec_fn=limits)
    peak = 0
    while not stop.is_set() and p.poll() is None:
        peak = max(peak, edge_fds(t))
        time.sleep(0.2)
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    stats["edge_fds_peak"] = peak


def need_slowhttptest():
    if shutil.which("slowhttptest") is None:
        print("SKIP: slowhttptest is not installed (./troupe deps "
              "installs it)")
        return False
    return True


def test_slowloris():
    t = cluster()
    if need_slowhttptest():
        under_attack(t, "slowloris", lambda t, s, st: slowhttptest(
            t, s, st, "-H", "/healthz"), RATIO_MAX)


def test_slow_body():
    t = cluster()
    if need_slowhttptest():
        under_attack(t, "slow body", lambda t, s, st: slowhttptest(
            t, s, st, "-B", "/v1/bot/chat"), RATIO_MAX)


def flood(t, stop, stats, payload, threads=4, expect=None):
    """Threads sending payload on fresh connections; count answers by
    their status line."""
    counts = {}
    lock = threading.Lock()

    def run():
        while not stop.is_set():
            s = socket.create_connection(("127.0.0.1", t.edge_port), 5)
            try:
                s.sendall(payload)
                data = s.recv(256)
            except OSError as e:
                data = type(e).__name__.encode()
            finally:
                s.close()
            key = data.split(b"\r\n", 1)[0][:32].decode("latin-1")
            with lock:
                counts[key] = counts.get(key, 0) + 1
    ths = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    stats.update(counts)
    if expect:
        bad = {k: v for k, v in counts.items() if expect not in k}
        h.check(not bad, "answers other than %r: %r" % (expect, bad))


def test_header_flood():
    t = cluster()
    big = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" +
           b"".join(b"X-Flood-%d: %s\r\n" % (i, b"a" * 200)
                    for i in range(100)) + b"\r\n")
    under_attack(t, "header flood", lambda t, s, st: flood(
        t, s, st, big, expect="431"))
    many = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" +
            b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n")
    under_attack(t, "header count", lambda t, s, st: flood(
        t, s, st, many, expect="431"))


def test_body_flood():
    t = cluster()
    announced = (b"POST /v1/bot/chat HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: 2000000\r\n\r\n" + b"x" * 65536)
    under_attack(t, "body flood", lambda t, s, st: flood(
        t, s, st, announced, expect="413"))
    chunked = (b"POST /v1/bot/chat HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" +
               (b"10000\r\n" + b"y" * 65536 + b"\r\n") * 20)
    under_attack(t, "chunked flood", lambda t, s, st: flood(
        t, s, st, chunked, threads=2))


def test_pipelined_garbage():
    t = cluster()
    junk = (b"GARBAGE /\x00\x01 HTTP/9.9\r\n\r\n" * 50 +
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    under_attack(t, "pipelined garbage", lambda t, s, st: flood(
        t, s, st, junk, expect="400"))


def churn(t, stop, stats):
    n = [0]

    def run():
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1",
                                              t.edge_port), 5)
                s.close()
                n[0] += 1
            except OSError:
                time.sleep(0.01)
    ths = [threading.Thread(target=run, daemon=True) for _ in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    stats["connections"] = n[0]


def edge_reload(t, **kw):
    """Set (None: drop, back to the default) [edge] keys and SIGHUP."""
    c = t.conf_over.setdefault("edge", {})
    for k, v in kw.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    t.write_config()
    before = t.log("edge").count("config re-read")
    os.kill(t.pid("edge"), signal.SIGHUP)
    h.wait_for(lambda: t.log("edge").count("config re-read") > before,
               5, 0.05, "troupe-edge reloaded")


def test_connection_churn():
    under_attack(cluster(), "connection churn", churn)


def test_connection_churn_limited():
    """The same churn with [edge] conn_rate_per_addr set (off by default:
    see docs/services/edge.md), at each rate of CHURN_RATES, burst twice
    the rate: the attacker's connections past its bucket are refused at
    accept, before h2o sees them.  The first churn of an invocation is
    the worst (2026-11-22: 17-42x, then 6-17x), so the churn without a
    limit runs again first, for a fair comparison."""
    t = cluster()
    under_attack(t, "churn again", churn)
    for rate in CHURN_RATES:
        edge_reload(t, conn_rate_per_addr=rate,
                    conn_burst_per_addr=2 * rate)
        try:
            under_attack(t, "churn, %d/s limit" % rate, churn,
                         settle=lambda: edge_reload(
                             t, conn_rate_per_addr=None))
        finally:
            edge_reload(t, conn_rate_per_addr=None,
                        conn_burst_per_addr=None)


def test_slowloris_capped():
    """slowloris with [edge] max_conns_per_addr under its connection count
    (SLOW_CAP): the attacker's connections past it are refused."""
    t = cluster()
    if not need_slowhttptest():
        return
    edge_reload(t, max_conns_per_addr=SLOW_CAP)
    try:
        under_attack(t, "slowloris, cap %d" % SLOW_CAP,
                     lambda t, s, st: slowhttptest(t, s, st, "-H",
                                                   "/healthz"), RATIO_MAX)
    finally:
        edge_reload(t, max_conns_per_addr=None)


def test_zz_report():
    h.check(ROWS, "no attack ran")
    print("\nattack              p50 ms   p99 ms  vs unloaded p99 %.2f ms" %
          BASE.get("p99", 0))
    for name, p50, p99, ratio, nerr, stats in ROWS:
        print("%-18s %7.2f %8.2f  %5.2fx  errors %d" % (
            name, p50, p99, ratio, nerr))


if __name__ == "__main__":
    h.main(globals())
