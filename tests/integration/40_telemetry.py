# SPDX-License-Identifier: ISC
"""40: troupe-telemetry serves every process's metrics on one valid page.

GET /metrics on [telemetry] listen merges the METRICS every process sends
each second: the page is valid exposition text (each family's HELP and
TYPE once, its samples together, no sample twice, histograms cumulative;
`promtool check metrics` too when it is installed), every service is up,
the edge's request counter and latency histogram show a chat, a killed
service goes down after [telemetry] stale_after_s and comes back when
restarted; other paths answer 404 and other methods 405.  Under a short
chat load (v1 and v3 streams) every series PRODUCT.md \u00a77 asks for is on
the page, `promtool check metrics` finds no error in a live scrape, and the
series move as requests are made.
"""
import concurrent.futures
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import harness as h

STALE_S = 2     # [telemetry] stale_after_s for this file

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(r"^(%s)(?:\{((?:%s)(?:,%s)*)?\})? (\S+)(?: (-?\d+))?$"
                    % (NAME, LABEL, LABEL))
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def cluster():
    t = h.troupe(conf={"telemetry": {"stale_after_s": STALE_S}})
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def fetch(t, path="/metrics", method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", t.telemetry_port, timeout=10)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def value(s):
    if s in ("NaN", "+Inf", "-Inf"):
        return float(s.replace("Inf", "inf").replace("NaN", "nan"))
    h.check(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s),
            "bad sample value %r" % s)
    return float(s)


def parse(text):
    """Check the exposition rules; return {family: (type, [(name, labels
    dict, value)])}."""
    h.check(text.endswith("\n"), "page does not end with a newline")
    fams, order, cur = {}, [], None
    seen = set()
    helped, typed = set(), set()

    def family(name):
        if name not in fams:
            fams[name] = ["untyped", []]
            order.append(name)
        elif name != cur:
            raise h.Failure("family %s appears in two places" % name)
        return name

    for n, line in enumerate(text.split("\n")[:-1], 1):
        if not line:
            continue
        if line.startswith("#"):
            m = re.match(r"^# (HELP|TYPE) (%s)(?: (.*))?$" % NAME, line)
            if not m:
                continue
            kw, name, rest = m.groups()
            cur = family(name)
            if kw == "HELP":
                h.check(name not in helped, "line %d: second HELP" % n)
                helped.add(name)
            else:
                h.check(name not in typed and not fams[name][1],
                        "line %d: second TYPE or TYPE after samples" % n)
                h.check(rest in TYPES, "line %d: bad type %r" % (n, rest))
                typed.add(name)
                fams[name][0] = rest
            continue
        m = SAMPLE.match(line)
        h.check(m, "line %d: not a sample: %r" % (n, line))
        name, labels, v, _ = m.groups()
        lab = dict(LABEL_RE.findall(labels or ""))
        h.check(len(lab) == len(LABEL_RE.findall(labels or "")),
                "line %d: repeated label" % n)
        key = (name, tuple(sorted(lab.items())))
        h.check(key not in seen, "line %d: repeated sample %s" % (n, line))
        seen.add(key)
        fam = None
        if cur is not None:
            ctype = fams[cur][0]
            if ctype in ("histogram", "summary"):
                sfx = ["_sum", "_count"] + (["_bucket"]
                                            if ctype == "histogram" else [])
                if any(name == cur + s for s in sfx) or (
                        ctype == "summary" and name == cur):
                    fam = cur
            elif name == cur:
                fam = cur
        if fam is None:
            cur = fam = family(name)
        fams[fam][1].append((name, lab, value(v)))
    for name, (typ, samples) in fams.items():
        if typ != "histogram":
            continue
        series = {}
        for sname, lab, v in samples:
            k = tuple(sorted((a, b) for a, b in lab.items() if a != "le"))
            s = series.setdefault(k, {"b": [], "count": None})
            if sname.endswith("_bucket"):
                h.check("le" in lab, "%s: bucket without le" % name)
                s["b"].append((value(lab["le"]), v))
            elif sname.endswith("_count"):
                s["count"] = v
        for k, s in series.items():
            les = [b[0] for b in s["b"]]
            h.check(les == sorted(les) and les and math.isinf(les[-1]),
                    "%s%s: buckets not ascending to +Inf" % (name, k))
            vs = [b[1] for b in s["b"]]
            h.check(vs == sorted(vs), "%s%s: buckets not cumulative" %
                    (name, k))
            h.check(s["count"] == vs[-1], "%s%s: +Inf %s != _count %s" %
                    (name, k, vs[-1], s["count"]))
    return fams


def samples(fams, family, **want):
    out = []
    for name, lab, v in fams.get(family, ("", []))[1]:
        if all(lab.get(k) == w for k, w in want.items()):
            out.append((name, lab, v))
    return out


def up(fams):
    return {lab["service"]: v for _, lab, v in
            samples(fams, "troupe_service_up")}


def page(t):
    st, hd, body = fetch(t)
    h.eq(st, 200, "GET /metrics status")
    h.check(hd.get("content-type", "").startswith("text/plain; version=0.0.4"),
            "content-type %r" % hd.get("content-type"))
    return body, parse(body)


def test_page_valid_and_everyone_up():
    t = cluster()
    want = {"edge", "auth", "dispatcher", "storage", "telemetry"}

    def all_up():
        u = up(page(t)[1])
        return want <= {s for s, v in u.items() if v == 1} and any(
            s.startswith("worker-") and v == 1 for s, v in u.items())
    h.wait_for(all_up, timeout=10, what="every service up on /metrics")
    body, fams = page(t)
    # Every process's ipc series, each labelled with its service.
    svcs = {lab.get("service") for _, lab, _ in
            samples(fams, "troupe_ipc_envelopes_total", direction="out")}
    h.check(want - {"telemetry"} <= svcs, "ipc series of %s only" % svcs)
    h.check(samples(fams, "process_cpu_seconds_total", service="telemetry"),
            "no process_cpu_seconds_total for telemetry")
    promtool(body)


def promtool(body):
    """`promtool check metrics` on a page: exit 0 (clean) or 3 (lint
    warnings only, printed) pass; 1 is a parsing error.  Skipped when
    promtool is not installed (Debian package prometheus)."""
    if not shutil.which("promtool"):
        h.note("promtool not installed: skipped")
        return
    r = subprocess.run(["promtool", "check", "metrics"], input=body,
                       capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    h.check(r.returncode in (0, 3), "promtool (exit %d): %s" %
            (r.returncode, out))
    if out:
        h.note("promtool warnings:\n" + out)


def test_reports_counted():
    t = cluster()
    fams = page(t)[1]
    a = {lab["service"]: v for _, lab, v in
         samples(fams, "troupe_telemetry_reports_total")}
    time.sleep(2.2)
    fams = page(t)[1]
    b = {lab["service"]: v for _, lab, v in
         samples(fams, "troupe_telemetry_reports_total")}
    for s in ("edge", "auth", "storage"):
        h.check(b.get(s, 0) >= a.get(s, 0) + 1,
                "%s: reports %s then %s" % (s, a.get(s), b.get(s)))


def test_chat_shows_on_page():
    """A chat's answer shows in the edge's counter, whatever it was (this
    file tests telemetry, not the chain behind the edge)."""
    t = cluster()
    r = t.chat("count me", timeout=15)
    h.check(r.status in (200, 502, 503, 504), "chat status %s" % r.status)

    def counted():
        fams = page(t)[1]
        return sum(v for _, lab, v in samples(
            fams, "coze_http_requests_total", service="edge",
            status=str(r.status))) >= 1
    h.wait_for(counted, timeout=5, what="coze_http_requests_total{status="
               "\"%d\"}" % r.status)
    fams = page(t)[1]
    hist = [f for f, (typ, ss) in fams.items()
            if typ == "histogram" and any(
                lab.get("service") == "edge" for _, lab, _ in ss)]
    h.check(hist, "no histogram from the edge on the page")


def test_down_then_up():
    t = cluster()
    h.wait_for(lambda: up(page(t)[1]).get("auth") == 1,
               timeout=5, what="troupe_service_up{auth} 1")
    t.kill("auth", signal.SIGKILL)
    h.wait_for(lambda: up(page(t)[1]).get("auth") == 0,
               timeout=STALE_S + 4, what="troupe_service_up{auth} 0")
    fams = page(t)[1]
    h.check(not samples(fams, "troupe_ipc_envelopes_total", service="auth"),
            "a down service's samples are still on the page")
    t.start_service("auth")
    h.wait_for(lambda: up(page(t)[1]).get("auth") == 1,
               timeout=5, what="troupe_service_up{auth} back to 1")


def test_other_paths_and_methods():
    t = cluster()
    st, _, _ = fetch(t, "/nope")
    h.eq(st, 404, "GET /nope")
    st, hd, _ = fetch(t, "/metrics", "POST")
    h.eq(st, 405, "POST /metrics")
    h.check("GET" in hd.get("allow", ""), "405 without Allow: %r" % hd)
    st, hd, body = fetch(t, "/metrics", "HEAD")
    h.eq(st, 200, "HEAD /metrics")
    h.eq(body, "", "HEAD body")


def test_telemetry_restart_loses_nothing_lasting():
    """Telemetry keeps no state worth keeping: after a restart every
    service is back on the page within a couple of seconds."""
    t = cluster()
    t.restart("telemetry")
    h.wait_for(lambda: {"edge", "auth", "storage"} <= {
        s for s, v in up(page(t)[1]).items() if v == 1},
        timeout=6, what="services up after a telemetry restart")


SIX = ("edge", "auth", "dispatcher", "storage", "telemetry", "worker")


def v3_stream(t, query):
    """One streamed /v3/chat read to its end; its HTTP status."""
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=20)
    try:
        body = {"bot_id": h.DEMO_BOT, "user_id": "u_met", "stream": True,
                "additional_messages": [{"role": "user", "content": query,
                                         "content_type": "text"}]}
        c.request("POST", "/v3/chat", json.dumps(body).encode(),
                  {"Content-Type": "application/json",
                   "Authorization": "Bearer " + t.token()})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def total(fams, family, suffix="", **want):
    """The sum of a family's samples named family+suffix matching want
    (service="worker" matches every worker-N)."""
    svc = want.pop("service", None)
    n = 0
    for name, lab, v in samples(fams, family, **want):
        if name != family + suffix:
            continue
        s = lab.get("service", "")
        if svc is None or s == svc or (svc == "worker" and
                                       s.startswith("worker-")):
            n += v
    return n


def has(fams, family, service):
    return any(lab.get("service") == service or
               (service == "worker" and
                lab.get("service", "").startswith("worker-"))
               for _, lab, _ in samples(fams, family))


def test_product_series_under_load():
    """PRODUCT.md 7: every series is on a page scraped under a chat load,
    promtool finds no error in it, and the series move with requests."""
    t = cluster()
    h.wait_for(lambda: {"edge", "auth", "dispatcher", "storage"} <= {
        s for s, v in up(page(t)[1]).items() if v == 1},
        timeout=10, what="services up")
    before = page(t)[1]
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(t.chat, "load %d" % i, timeout=20)
                for i in range(12)]
        futs += [ex.submit(v3_stream, t, "stream %d" % i)
                 for i in range(12)]
        time.sleep(0.3)
        body = fetch(t)[2]          # scraped while the load runs
        res = [f.result() for f in futs]
    v1 = [r.status for r in res[:12]]
    v3 = res[12:]
    h.check(v1.count(200) >= 10, "v1 chats: %s" % v1)
    h.check(v3.count(200) >= 10, "v3 streams: %s" % v3)
    parse(body)
    promtool(body)
    time.sleep(1.5)                 # one METRICS report later
    body, fams = page(t)
    promtool(body)
    # The families and their types.
    want = {
        "coze_http_requests_total": "counter",
        "coze_http_request_duration_seconds": "histogram",
        "troupe_time_to_first_token_seconds": "histogram",
        "troupe_ipc_envelopes_total": "counter",
        "troupe_ipc_backlog": "gauge",
        "troupe_dispatch_queue_depth": "gauge",
        "troupe_dispatch_queue_limit": "gauge",
        "troupe_worker_children": "gauge",
        "troupe_dispatch_concurrency_limit": "gauge",
        "troupe_dispatch_concurrency_max": "gauge",
        "troupe_upstream_rate_limit_signals_total": "counter",
        "troupe_degradation_tier": "gauge",
        "process_cpu_seconds_total": "counter",
        "process_resident_memory_bytes": "gauge",
        "troupe_telemetry_reports_unsent_total": "counter",
        "troupe_telemetry_dropped_messages_total": "counter",
    }
    for f, typ in want.items():
        h.check(f in fams, "%s missing from /metrics" % f)
        h.eq(fams[f][0], typ, "TYPE of %s" % f)
    # Buckets from 1 ms to 120 s.
    les = {lab.get("le") for name, lab, _ in samples(
        fams, "troupe_time_to_first_token_seconds")
        if name.endswith("_bucket")}
    h.check({"0.001", "120", "+Inf"} <= les, "TTFT buckets %s" % les)
    # They move.
    for ep in ("/v1/bot/chat", "/v3/chat"):
        h.check(total(fams, "coze_http_requests_total", endpoint=ep,
                      status="200") -
                total(before, "coze_http_requests_total", endpoint=ep,
                      status="200") >= 10, "%s chats not counted" % ep)
    h.check(total(fams, "coze_http_requests_total") -
            total(before, "coze_http_requests_total") >= 24,
            "requests not counted")
    h.check(total(fams, "coze_http_request_duration_seconds", "_count") -
            total(before, "coze_http_request_duration_seconds", "_count")
            >= 24, "latency histogram count did not move")
    ttft = total(fams, "troupe_time_to_first_token_seconds", "_count",
                 service="worker")
    h.check(ttft - total(before, "troupe_time_to_first_token_seconds",
                         "_count", service="worker") >= 10,
            "TTFT count %s after 12 streams" % ttft)
    for svc in ("edge", "auth", "dispatcher", "worker"):
        a = total(before, "troupe_ipc_envelopes_total", service=svc,
                  direction="in")
        b = total(fams, "troupe_ipc_envelopes_total", service=svc,
                  direction="in")
        h.check(b >= a + 12, "%s: envelopes in %s then %s" % (svc, a, b))
    h.check(total(fams, "troupe_worker_children") >= 1, "no worker children")
    h.check(total(fams, "troupe_dispatch_concurrency_limit") >= 1,
            "concurrency limit 0")
    h.eq(total(fams, "troupe_degradation_tier"), 0, "degradation tier")
    for svc in SIX:
        h.check(total(fams, "process_resident_memory_bytes",
                      service=svc) > 0, "RSS of %s" % svc)
        h.check(has(fams, "process_cpu_seconds_total", svc),
                "CPU seconds of %s" % svc)
    h.check(total(fams, "process_cpu_seconds_total", service="edge") >
            total(before, "process_cpu_seconds_total", service="edge"),
            "edge CPU seconds did not move")
    # Rate-limit signals: the simulator answers 429 and 503 when asked.
    for k in ("429", "503"):
        a = total(fams, "troupe_upstream_rate_limit_signals_total",
                  kind="upstream_" + k)
        r = t.chat("slow down [sim:status=%s]" % k, timeout=20)
        h.check(r.status >= 400, "[sim:status=%s] gave %s" % (k, r.status))

        def moved():
            return total(page(t)[1],
                         "troupe_upstream_rate_limit_signals_total",
                         kind="upstream_" + k) > a
        h.wait_for(moved, timeout=4, what="rate-limit signal " + k)


if __name__ == "__main__":
    h.main(globals())
