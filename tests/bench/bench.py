# SPDX-License-Identifier: ISC
"""The Troupe benchmark, in one invocation (tests/bench/run.sh runs it).

1. nginx `return 200 "ok"` (2 workers, access_log off) as the reference
   measured in the same run (the machine is noisy: compare ratios only);
2. a whole private Troupe (tests/integration/harness.py: Redis, PostgreSQL,
   troupe-upstream-sim at 0 ms latency, every service), the demo bot;
3. wrk -t1 -c64: 2 s warm-up, then 3 runs of 10 s (median) on nginx `/`,
   Troupe `/healthz` and Troupe `POST /v1/bot/chat` (chat.lua: one JWT,
   a fixed set of history_ids); a table of req/s, p50, p99, ratio to nginx;
4. troupe-openloop on /v1/bot/chat at 80 % of the wrk chat rate: p99 from
   each request's scheduled send time (target <= 10 ms, PRODUCT.md §10);
5. locust (FastHttpUser, JWT signed once per user) headless for 20 s:
   failures and p95.
Results go to stdout and tests/bench/results/<timestamp>.txt.  Every step
is bounded in time; everything listens on and targets 127.0.0.1 only.

Environment: TROUPE_BUILD (build dir), BENCH_DURATION (10), BENCH_RUNS (3),
BENCH_CONNS (64), BENCH_LOCUST_S (20), BENCH_WORKERS_MIN/MAX (2/4).
"""
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import harness as h  # noqa: E402

DUR = int(os.environ.get("BENCH_DURATION", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CONNS = int(os.environ.get("BENCH_CONNS", "64"))
LOCUST_S = int(os.environ.get("BENCH_LOCUST_S", "20"))
WMIN = int(os.environ.get("BENCH_WORKERS_MIN", "2"))
WMAX = int(os.environ.get("BENCH_WORKERS_MAX", "4"))

out_lines = []


def say(s=""):
    print(s, flush=True)
    out_lines.append(s)


def unit_ms(v, u):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]


def parse_wrk(text):
    r = {"rps": 0.0, "p50": None, "p99": None, "non2xx": 0, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    for p, k in (("50", "p50"), ("99", "p99")):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
        if m:
            r[k] = unit_ms(m.group(1), m.group(2))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                  r"timeout (\d+)", text)
    if m:
        r["errors"] = sum(int(x) for x in m.groups())
    return r


def wrk(url, script=None, env=None, seconds=DUR):
    cmd = ["wrk", "-t1", "-c%d" % CONNS, "-d%ds" % seconds, "--latency",
           "--timeout", "5s"]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})),
                       timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError("wrk failed: %s%s" % (p.stdout, p.stderr))
    return parse_wrk(p.stdout)


def wrk_series(name, url, script=None, env=None):
    wrk(url, script, env, seconds=2)            # warm-up
    runs = [wrk(url, script, env) for _ in range(RUNS)]
    med = {
        "name": name,
        "rps": statistics.median(r["rps"] for r in runs),
        "p50": statistics.median(r["p50"] or 0 for r in runs),
        "p99": statistics.median(r["p99"] or 0 for r in runs),
        "non2xx": sum(r["non2xx"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "all": [round(r["rps"]) for r in runs],
    }
    say("  %-22s runs %s req/s" % (name, med["all"]))
    return med


def start_nginx(tmp):
    port = h.free_port()
    d = os.path.join(tmp, "nginx")
    os.makedirs(d)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write("""worker_processes 2;
daemon off;
pid %(d)s/nginx.pid;
error_log %(d)s/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path %(d)s/body;
    proxy_temp_path %(d)s/proxy;
    fastcgi_temp_path %(d)s/fastcgi;
    uwsgi_temp_path %(d)s/uwsgi;
    scgi_temp_path %(d)s/scgi;
    server {
        listen 127.0.0.1:%(port)d;
        location / { default_type text/plain; return 200 "ok"; }
    }
}
""" % {"d": d, "port": port})
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen([exe, "-p", d, "-c", conf, "-e",
                          os.path.join(d, "error.log")],
                         stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         preexec_fn=h._child_setup)
    h.wait_for(lambda: p.poll() is None and h.port_open(port), 10, 0.05,
               "nginx on port %d" % port)
    return p, port


def openloop_binary(tmp):
    try:
        return h.binary("troupe-openloop")
    except h.Failure:
        # Not built by CMake (yet): build it here, same warnings.
        exe = os.path.join(tmp, "troupe-openloop")
        subprocess.run(["cc", "-std=c17", "-D_GNU_SOURCE", "-O2", "-Wall",
                        "-Wextra", "-o", exe,
                        os.path.join(HERE, "openloop.c")], check=True)
        return exe


def openloop(exe, port, rate, token, bot):
    body = ('{"bot_id":"%s","user_id":"u_123456",'
            '"query":"今天北京天气怎么样?","history_id":"bench-{n}"}' % bot)
    cmd = [exe, "--host", "127.0.0.1", "--port", str(port), "--method",
           "POST", "--path", "/v1/bot/chat",
           "--header", "Authorization: Bearer " + token,
           "--header", "Content-Type: application/json",
           "--body", body, "--vary", "64", "--rate", "%.0f" % rate,
           "--duration", str(DUR), "--warmup", "2",
           "--connections", str(CONNS), "--timeout-ms", "5000"]
    p = subprocess.run(cmd, capture_output=True, text=True,
                       timeout=DUR + 30)
    res = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            for kv in line.split()[1:]:
                k, _, v = kv.partition("=")
                res[k] = float(v)
        else:
            say("  " + line)
    if p.returncode != 0 or not res:
        raise RuntimeError("troupe-openloop failed: %s%s" %
                           (p.stdout, p.stderr))
    return res


def locust(tmp, port, secret, bot):
    exe = shutil.which("locust")
    if not exe:
        say("  locust not installed (python3-locust): skipped")
        return None
    prefix = os.path.join(tmp, "locust")
    cmd = [exe, "-f", os.path.join(HERE, "locustfile.py"), "--headless",
           "-u", "32", "-r", "32", "-t", "%ds" % LOCUST_S,
           "--host", "http://127.0.0.1:%d" % port, "--csv", prefix,
           "--only-summary", "--loglevel", "WARNING"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp,
                       env=dict(os.environ, TROUPE_BENCH_SECRET=secret,
                                TROUPE_BENCH_BOT=bot),
                       timeout=LOCUST_S + 60)
    try:
        with open(prefix + "_stats.csv") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        say("  locust produced no stats (exit %d): %s" %
            (p.returncode, (p.stderr or p.stdout)[-600:]))
        return None
    agg = [r for r in rows if r.get("Name") == "Aggregated"] or rows[-1:]
    r = agg[0]
    return {"requests": int(r["Request Count"]),
            "failures": int(r["Failure Count"]),
            "rps": float(r["Requests/s"]),
            "p50": float(r["50%"]), "p95": float(r["95%"]),
            "p99": float(r["99%"])}


def chat_ready(t):
    """Start t with the demo bot and check that a chat works; the
    environment of chat.lua, or None (said why)."""
    t.start()
    t.add_bot()
    tok = t.token(ttl=24 * 3600)
    r = t.chat("warm up")
    if r.status != 200:
        say("chat does not work (%r); logs:\n%s" % (r, t.log_tails()))
        return None
    return {"TROUPE_BENCH_TOKEN": tok, "TROUPE_BENCH_BOT": h.DEMO_BOT,
            "TROUPE_BENCH_HISTORIES": "64"}


def main():
    tmp = tempfile.mkdtemp(prefix="troupe-bench-")
    os.chmod(tmp, 0o755)
    started = time.strftime("%Y%m%d-%H%M%S")
    say("Troupe benchmark %s (%s, %d cores)" % (
        started, os.uname().release, os.cpu_count()))
    say("wrk -t1 -c%d, 2 s warm-up, median of %d x %d s; loopback only" %
        (CONNS, RUNS, DUR))
    ngx, ngx_port = start_nginx(tmp)
    t = h.Troupe(conf={"log": {"level": "warn"}},
                 workers_min=WMIN, workers_max=WMAX,
                 sim_args=["--latency-ms", "0"])
    try:
        env = chat_ready(t)
        if env is None:
            return 1
        tok = env["TROUPE_BENCH_TOKEN"]
        say("")
        rows = [
            wrk_series("nginx /", "http://127.0.0.1:%d/" % ngx_port),
            wrk_series("troupe /healthz",
                       "http://127.0.0.1:%d/healthz" % t.edge_port),
            wrk_series("troupe /v1/bot/chat",
                       "http://127.0.0.1:%d/v1/bot/chat" % t.edge_port,
                       os.path.join(HERE, "chat.lua"), env),
        ]
        ref = rows[0]["rps"] or 1
        say("")
        say("%-22s %10s %9s %9s %8s %8s" % ("target", "req/s", "p50 ms",
                                            "p99 ms", "vs nginx",
                                            "errors"))
        for r in rows:
            say("%-22s %10.0f %9.2f %9.2f %8.2f %8d" % (
                r["name"], r["rps"], r["p50"], r["p99"], r["rps"] / ref,
                r["non2xx"] + r["errors"]))
        say("PRODUCT.md §10: /healthz >= 1.00 x nginx, chat >= 0.25 x "
            "nginx")

        chat_rps = rows[2]["rps"]
        say("")
        say("open loop on /v1/bot/chat at 80 %% of %.0f req/s "
            "(latency from scheduled send):" % chat_rps)
        ol = None
        if chat_rps > 0:
            ol = openloop(openloop_binary(tmp), t.edge_port,
                          max(1.0, 0.8 * chat_rps), tok, h.DEMO_BOT)
            say("open-loop p99 %.2f ms at %.0f req/s (target <= 10 ms): %s"
                % (ol["p99_ms"], ol["achieved"],
                   "met" if ol["p99_ms"] <= 10 and ol["errors"] == 0
                   else "NOT met"))

        say("")
        say("locust (FastHttpUser, 32 users, %d s):" % LOCUST_S)
        lc = locust(tmp, t.edge_port, t.secret, h.DEMO_BOT)
        if lc:
            say("  %d requests (%.0f req/s), %d failures, p50 %.0f ms, "
                "p95 %.0f ms, p99 %.0f ms" % (
                    lc["requests"], lc["rps"], lc["failures"], lc["p50"],
                    lc["p95"], lc["p99"]))
        rows_db = t.psql("SELECT count(*) FROM chats")
        say("")
        say("chats stored in PostgreSQL during the run: %s" %
            rows_db[0][0])
    finally:
        t.teardown()
        ngx.terminate()
        try:
            ngx.wait(10)
        except subprocess.TimeoutExpired:
            ngx.kill()
        for p in t.problems:
            say("problem: " + p)
        resdir = os.path.join(HERE, "results")
        os.makedirs(resdir, exist_ok=True)
        path = os.path.join(resdir, started + ".txt")
        with open(path, "w") as f:
            f.write("\n".join(out_lines) + "\n")
        print("results: %s" % os.path.relpath(path, os.getcwd()))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
