# SPDX-License-Identifier: ISC
"""40: troupe-telemetry serves every process's metrics on one valid page.

GET /metrics on [telemetry] listen merges the METRICS every process sends
each second: the page is valid exposition text (each family's HELP and
TYPE once, its samples together, no sample twice, histograms cumulative;
`promtool check metrics` too when it is installed), every service is up,
the edge's request counter and latency histogram show a chat, a killed
service goes down after [telemetry] stale_after_s and comes back when
restarted; other paths answer 404 and other methods 405.
"""
import http.client
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
            samples(fams, "troupe_ipc_envelopes", direction="out")}
    h.check(want - {"telemetry"} <= svcs, "ipc series of %s only" % svcs)
    h.check(samples(fams, "process_cpu_seconds_total", service="telemetry"),
            "no process_cpu_seconds_total for telemetry")
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=body,
                           capture_output=True, text=True)
        h.check(r.returncode == 0, "promtool: %s" % (r.stdout + r.stderr))


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
    h.check(not samples(fams, "troupe_ipc_envelopes", service="auth"),
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


if __name__ == "__main__":
    h.main(globals())
