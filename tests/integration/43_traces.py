# SPDX-License-Identifier: ISC
"""Traces (docs/tracing.md): a Python OTLP/HTTP sink on 127.0.0.1 takes
what troupe-telemetry exports and checks the OTLP JSON structure of every
POST; the tests check one span per hop with correct parents, that the
client's trace id comes back and is kept, that errors and slow runs are
always exported while sample_rate 0 exports nothing else, that a
collector refusing a batch gets it again later, that a client's W3C
tracestate reaches the upstream and plugins (checked, cut, or dropped),
and troupectl heatmap.
"""

import http.server
import json
import os
import re
import socketserver
import threading
import time

import harness as h

SLOW_MS = 1500
HEX32 = re.compile(r"[0-9a-f]{32}\Z")
HEX16 = re.compile(r"[0-9a-f]{16}\Z")
HOPS = {
    # span name -> (service.name, kind, parent span name)
    "edge": ("troupe-edge", 2, None),
    "auth": ("troupe-auth", 1, "edge"),
    "dispatcher": ("troupe-dispatcher", 1, "auth"),
    "worker": ("troupe-worker", 1, "dispatcher"),
    "storage.ctx": ("troupe-storage", 1, "worker"),
    "upstream": ("troupe-worker", 3, "worker"),
    "storage.commit": ("troupe-storage", 1, "worker"),
}


class Sink:
    """An OTLP/HTTP JSON collector: POST /v1/traces.  Every body is checked
    against the OTLP JSON shape; problems are collected, spans kept."""

    def __init__(self, fail_first=0):
        self.lock = threading.Lock()
        self.spans = []         # (service.name, span dict)
        self.posts = 0
        self.refused = 0
        self.fail_first = fail_first
        self.problems = []
        sink = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                with sink.lock:
                    sink.posts += 1
                    if sink.fail_first > 0:
                        sink.fail_first -= 1
                        sink.refused += 1
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                ok = (self.path == "/v1/traces" and
                      (self.headers.get("Content-Type") or "")
                      .startswith("application/json"))
                if not ok:
                    sink.problem("bad request line or type: %s %s" %
                                 (self.path,
                                  self.headers.get("Content-Type")))
                try:
                    sink.take(json.loads(body))
                except Exception as e:      # noqa: BLE001
                    sink.problem("bad body: %s: %r" % (e, body[:300]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
        self.srv = S(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def problem(self, p):
        with self.lock:
            self.problems.append(p)

    def take(self, doc):
        """Check one ExportTraceServiceRequest and keep its spans."""
        rs = doc["resourceSpans"]
        assert isinstance(rs, list) and rs, "resourceSpans empty"
        got = []
        for r in rs:
            attrs = {a["key"]: a["value"] for a in r["resource"]["attributes"]}
            svc = attrs["service.name"]["stringValue"]
            assert svc.startswith("troupe-"), svc
            for ss in r["scopeSpans"]:
                assert ss["scope"]["name"] == "troupe"
                for s in ss["spans"]:
                    assert HEX32.match(s["traceId"]), s
                    assert HEX16.match(s["spanId"]), s
                    if "parentSpanId" in s:
                        assert HEX16.match(s["parentSpanId"]), s
                    assert isinstance(s["name"], str) and s["name"], s
                    assert s["kind"] in (1, 2, 3), s
                    for k in ("startTimeUnixNano", "endTimeUnixNano"):
                        assert isinstance(s[k], str) and s[k].isdigit(), s
                    assert int(s["startTimeUnixNano"]) <= \
                        int(s["endTimeUnixNano"]), s
                    assert abs(int(s["startTimeUnixNano"]) / 1e9 -
                               time.time()) < 600, s
                    assert s["status"]["code"] in (0, 1, 2), s
                    for a in s["attributes"]:
                        assert isinstance(a["key"], str)
                        (v,) = a["value"].items()
                        assert v[0] in ("stringValue", "intValue"), a
                        assert isinstance(v[1], str), a
                    got.append((svc, s))
        with self.lock:
            self.spans += got

    def of(self, trace_id):
        with self.lock:
            return [(svc, s) for svc, s in self.spans
                    if s["traceId"] == trace_id]

    def close(self):
        self.srv.shutdown()


SINK = None


def setup(rate="0", fail_first=0):
    global SINK
    if SINK is None:
        SINK = Sink(fail_first=fail_first)
    t = h.troupe(conf={"trace": {"endpoint": SINK.url,
                                 "sample_rate": rate,
                                 "slow_ms": SLOW_MS}})
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def tp_of(r):
    v = r.headers.get("traceparent")
    h.check(v is not None, "no traceparent in the answer: %s" % r.headers)
    return v


def attr(s, key):
    for a in s["attributes"]:
        if a["key"] == key:
            return list(a["value"].values())[0]
    return None


def wait_trace(trace_id, names, timeout=12):
    """Wait until the sink has spans named names of trace_id."""
    def ok():
        got = {s["name"] for _, s in SINK.of(trace_id)}
        return set(names) <= got
    h.wait_for(ok, timeout, 0.1, "spans %s of trace %s (have %s)" % (
        sorted(names), trace_id,
        sorted(s["name"] for _, s in SINK.of(trace_id))))
    return SINK.of(trace_id)


def test_client_trace_one_span_per_hop():
    t = setup(fail_first=1)
    tid = os.urandom(16).hex()
    client_span = os.urandom(8).hex()
    sent = "00-%s-%s-01" % (tid, client_span)
    r = t.chat(query="trace me", headers={"traceparent": sent})
    h.eq(r.status, 200, "chat")
    back = tp_of(r)
    h.eq(back.split("-")[1], tid, "trace id of the answer's traceparent")
    # The first POST was refused (503): the spans come with a later one.
    spans = wait_trace(tid, HOPS)
    h.check(SINK.refused >= 1, "the sink refused no POST")
    by = {}
    for svc, s in spans:
        by.setdefault(s["name"], []).append((svc, s))
    for name, (svc, kind, parent) in HOPS.items():
        h.eq(len(by[name]), 1, "spans named %s (one per hop)" % name)
        got_svc, s = by[name][0]
        h.eq(got_svc, svc, "service.name of %s" % name)
        h.eq(s["kind"], kind, "kind of %s" % name)
        want_parent = (client_span if parent is None
                       else by[parent][0][1]["spanId"])
        h.eq(s.get("parentSpanId"), want_parent, "parent of %s" % name)
        h.eq(s["status"]["code"], 0, "status of %s" % name)
    ids = [s["spanId"] for _, s in spans]
    h.eq(len(ids), len(set(ids)), "distinct span ids")
    edge = by["edge"][0][1]
    h.eq(attr(edge, "http.route"), "/v1/bot/chat", "edge route")
    h.eq(attr(edge, "http.response.status_code"), "200", "edge status")
    h.eq(attr(by["upstream"][0][1], "url.full"),
         t.sim_url + "/v1/chat/completions", "upstream url")
    # Every hop lies within the edge's span.
    e0, e1 = int(edge["startTimeUnixNano"]), int(edge["endTimeUnixNano"])
    for _, s in spans:
        h.check(e0 <= int(s["startTimeUnixNano"]) and
                int(s["endTimeUnixNano"]) <= e1 + 50 * 10**6,
                "%s outside the edge's span" % s["name"])
    h.check(not SINK.problems, "sink: %s" % SINK.problems)


def test_sampling_errors_and_slow_always():
    t = setup()
    quiet, err, slow, own = (os.urandom(16).hex() for _ in range(4))
    r = t.chat(query="not sampled",
               headers={"traceparent": "00-%s-%s-00" %
                        (quiet, os.urandom(8).hex())})
    h.eq(r.status, 200, "unsampled chat")
    h.eq(tp_of(r).split("-")[1], quiet, "trace id kept (flag 00)")
    r = t.chat(query="no traceparent")
    h.eq(r.status, 200, "chat without traceparent")
    own = tp_of(r).split("-")[1]
    h.check(HEX32.match(own), "edge made a trace id: %r" % own)
    r = t.chat(query="fail [sim:status=500]",
               headers={"traceparent": "00-%s-%s-00" %
                        (err, os.urandom(8).hex())})
    h.check(r.status >= 500, "error chat: %d" % r.status)
    r = t.chat(query="slow [sim:delay=%d]" % (SLOW_MS + 300),
               headers={"traceparent": "00-%s-%s-00" %
                        (slow, os.urandom(8).hex())})
    h.eq(r.status, 200, "slow chat")
    spans = wait_trace(err, ["edge", "worker", "upstream"])
    edge = [s for _, s in spans if s["name"] == "edge"][0]
    h.eq(edge["status"]["code"], 2, "the error trace's edge status")
    up = [s for _, s in spans if s["name"] == "upstream"][0]
    h.eq(up["status"]["code"], 2, "the failed upstream call's status")
    h.eq(attr(up, "http.response.status_code"), "500", "upstream status")
    spans = wait_trace(slow, ["edge", "worker", "upstream"])
    edge = [s for _, s in spans if s["name"] == "edge"][0]
    dur = (int(edge["endTimeUnixNano"]) -
           int(edge["startTimeUnixNano"])) / 1e6
    h.check(dur >= SLOW_MS, "slow edge span lasted %.0f ms" % dur)
    # The two plain ones went out in the same batches or before: with
    # sample_rate 0 and no client flag they are never exported.
    time.sleep(1.5)
    h.eq(SINK.of(quiet), [], "spans of an unsampled trace")
    h.eq(SINK.of(own), [], "spans of an unsampled edge-made trace")
    st, _, page = fetch(t, "/metrics")
    h.eq(st, 200, "/metrics")
    m = re.search(r'troupe_trace_spans_sampled_out_total\{[^}]*\} (\d+)',
                  page)
    h.check(m and int(m.group(1)) >= 2 * len(HOPS),
            "sampled-out counter: %s" % (m and m.group(0)))
    h.check(re.search(r'troupe_trace_spans_exported_total\{[^}]*\} [1-9]',
                      page), "exported counter did not move")
    h.check(not SINK.problems, "sink: %s" % SINK.problems)


def test_v3_stream_trace():
    """A streamed /v3/chat: the same hops, the edge's span ends with the
    stream, and the upstream call (a stream) is a client span."""
    import http.client
    t = setup()
    tid = os.urandom(16).hex()
    sent = "00-%s-%s-01" % (tid, os.urandom(8).hex())
    body = {"bot_id": h.DEMO_BOT, "user_id": "u_trace", "stream": True,
            "additional_messages": [{"role": "user", "content": "hi",
                                     "content_type": "text"}]}
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=20)
    c.request("POST", "/v3/chat", json.dumps(body).encode(),
              {"Content-Type": "application/json", "traceparent": sent,
               "Authorization": "Bearer " + t.token()})
    r = c.getresponse()
    h.eq(r.status, 200, "v3 stream status")
    h.eq(r.getheader("traceparent").split("-")[1], tid, "stream trace id")
    text = r.read().decode()
    c.close()
    h.check("event:done" in text.replace(" ", ""), "stream end: %r" %
            text[-200:])
    spans = wait_trace(tid, HOPS)
    by = {}
    for _, sp in spans:
        by.setdefault(sp["name"], []).append(sp)
    for name, (_, _, parent) in HOPS.items():
        h.eq(len(by[name]), 1, "v3 spans named %s" % name)
        if parent is not None:
            h.eq(by[name][0].get("parentSpanId"), by[parent][0]["spanId"],
                 "v3 parent of %s" % name)
    h.eq(attr(by["edge"][0], "http.route"), "/v3/chat", "v3 edge route")
    # the edge's span ends after the commit (the stream's last event)
    h.check(int(by["edge"][0]["endTimeUnixNano"]) >=
            int(by["storage.commit"][0]["endTimeUnixNano"]),
            "edge span ends before the commit")


def sim_seen(t, tid, path="/v1/chat/completions"):
    """What the simulator saw of trace tid's requests on path: a list of
    {"path", "traceparent", "tracestate"} (an absent header is None)."""
    r = h.http_request(t.sim_port, "GET", "/sim/traces")
    h.eq(r.status, 200, "GET /sim/traces")
    return [x for x in r.json["traces"]
            if x["path"].startswith(path) and x["traceparent"] and
            x["traceparent"].split("-")[1] == tid]


def ts_chat(t, tracestate, traceparent=True):
    """A /v1/bot/chat with tracestate (a list: one header line each) and
    a valid traceparent of a new trace (or none, or "bad"); the trace id
    the chat ran in and the one tracestate the upstream got (None)."""
    import http.client
    tid = os.urandom(16).hex()
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=20)
    c.putrequest("POST", "/v1/bot/chat")
    body = json.dumps({"bot_id": h.DEMO_BOT, "user_id": "u_ts",
                       "query": "tracestate"}).encode()
    c.putheader("Content-Type", "application/json")
    c.putheader("Content-Length", str(len(body)))
    c.putheader("Authorization", "Bearer " + t.token())
    if traceparent == "bad":
        c.putheader("traceparent", "00-%s-%s-01" % (tid.upper(),
                                                    os.urandom(8).hex()))
    elif traceparent:
        c.putheader("traceparent", "00-%s-%s-01" % (tid,
                                                    os.urandom(8).hex()))
    for line in tracestate:
        c.putheader("tracestate", line)
    c.endheaders(body)
    r = c.getresponse()
    r.read()
    c.close()
    h.eq(r.status, 200, "chat with tracestate %r" % (tracestate,))
    back = r.getheader("traceparent").split("-")[1]
    if traceparent is True:
        h.eq(back, tid, "the client's trace id")
    else:
        h.check(back != tid.lower(), "a new trace for traceparent %r" %
                traceparent)
    seen = sim_seen(t, back)
    h.eq(len(seen), 1, "upstream calls the simulator saw in trace %s" %
         back)
    h.check(seen[0]["traceparent"] is not None, "no traceparent upstream")
    return seen[0]["tracestate"]


def test_tracestate_to_upstream():
    """W3C tracestate: checked at the edge, carried, sent upstream."""
    t = setup()
    ok = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,fw529a3039@dt=a b"
    h.eq(ts_chat(t, [ok]), ok, "a valid tracestate, unchanged")
    # Lines are joined with ','; whitespace and empty members go.
    h.eq(ts_chat(t, [" rojo=1 ,, ", "congo=2\t"]), "rojo=1,congo=2",
         "two lines, whitespace and empty members")
    # Invalid: dropped whole, the chat still answered.
    for bad in ("Rojo=1", "rojo=1,congo", "rojo=1,rojo=2", "rojo=a=b",
                ",".join("k%d=v" % i for i in range(33))):
        h.eq(ts_chat(t, [bad]), None, "invalid tracestate %r" % bad[:40])
    # Over 512 bytes: whole members go from the end, those over 128
    # characters first.
    mid = ["m%d=%s" % (i, "v" * 100) for i in range(4)]       # 103 each
    big = "big=" + "x" * 200                                   # 204
    sent = ",".join(mid[:1] + [big] + mid[1:] + ["tail=1"])   # 627
    h.eq(ts_chat(t, [sent]), ",".join(mid + ["tail=1"]),
         "the long member removed first")
    sent = ",".join(mid + ["m4=" + "v" * 100])                # 519
    h.eq(ts_chat(t, [sent]), ",".join(mid), "the last member removed")
    # A trace the edge starts carries no tracestate.
    h.eq(ts_chat(t, [ok], traceparent=False), None,
         "tracestate without a traceparent")
    h.eq(ts_chat(t, [ok], traceparent="bad"), None,
         "tracestate with an invalid traceparent")
    h.eq(ts_chat(t, []), None, "no tracestate")


def test_tracestate_to_plugins():
    """A v3 chat's tool call: the plugin gets the tracestate too."""
    import http.client
    t = setup()
    bot = "trace-plugin-bot"
    if not getattr(t, "ts_plugin", False):
        t.add_bot(bot)
        t.ctl("plugin", "add", bot, "echo", "--url",
              t.sim_url.rstrip("/") + "/plugin/echo")
        t.ts_plugin = True
    tid = os.urandom(16).hex()
    ts = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    body = {"bot_id": bot, "user_id": "u_ts", "stream": True,
            "additional_messages": [{"role": "user", "content_type": "text",
                                     "content": "tools [sim:tool=echo]"}]}
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=20)
    c.request("POST", "/v3/chat", json.dumps(body).encode(),
              {"Content-Type": "application/json",
               "traceparent": "00-%s-%s-01" % (tid, os.urandom(8).hex()),
               "tracestate": ts,
               "Authorization": "Bearer " + t.token()})
    r = c.getresponse()
    h.eq(r.status, 200, "v3 stream status")
    text = r.read().decode()
    c.close()
    h.check("tool_response" in text and "event:done" in
            text.replace(" ", ""), "the tool ran: %r" % text[-300:])
    plug = sim_seen(t, tid, "/plugin/echo")
    h.eq(len(plug), 1, "plugin calls of the trace")
    h.eq(plug[0]["tracestate"], ts, "the plugin's tracestate")
    ups = sim_seen(t, tid)
    h.eq(len(ups), 2, "LLM calls of the trace (before and after the tool)")
    h.eq([u["tracestate"] for u in ups], [ts, ts], "the LLM's tracestate")


def fetch(t, path, method="GET"):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", t.telemetry_port, timeout=10)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def test_troupectl_heatmap():
    t = setup()
    st, _, body = fetch(t, "/api/heatmap")
    h.eq(st, 200, "/api/heatmap")
    doc = json.loads(body)
    url = "http://127.0.0.1:%d" % t.telemetry_port
    r = t.ctl("heatmap", "--url", url, "--since", "20", "--no-color")
    out = r.stdout
    if not doc["enabled"]:
        h.check(doc["reason"] in out, "the reason is not shown: %r" % out)
        h.note("eBPF off (%s): only the reason was checked" % doc["reason"])
        return
    for i in range(5):
        t.chat(query="heat %d" % i)
    time.sleep(1.2)
    r = t.ctl("heatmap", "--url", url, "--since", "20", "--no-color")
    out = r.stdout
    for svc in doc["services"]:
        h.check(re.search(r"^== %s " % re.escape(svc), out, re.M),
                "no block for %s in:\n%s" % (svc, out))
    # 27 bucket rows per block, each with a cell per second: 20, or one
    # less when telemetry's latest second is not read yet.
    rows = re.findall(r"^ *[0-9.]+[mu]?s? *\|(.*)\|$", out, re.M)
    h.check(len(rows) >= 27 * len(doc["services"]),
            "bucket rows: %d in:\n%s" % (len(rows), out))
    h.check(all(19 <= len(x) <= 20 for x in rows), "row widths: %s" %
            sorted({len(x) for x in rows}))
    # Counts show: some cell is not blank.
    h.check(any(x.strip() for x in rows), "every cell empty:\n" + out)
    # Same numbers as the API: the per-second totals printed for edge.
    st, _, body = fetch(t, "/api/heatmap?service=edge&since=%d" %
                        (int(time.time()) - 19))
    h.eq(st, 200, "/api/heatmap?service=edge")
    r = t.ctl("heatmap", "--url", url, "--service", "edge", "--since", "20",
              "--no-color")
    h.check("== edge " in r.stdout and "== auth " not in r.stdout,
            "--service edge:\n" + r.stdout)
    r = t.ctl("heatmap", "--url", url, "--service", "nosuch",
              check_rc=False)
    h.check(r.returncode != 0 and "nosuch" in r.stderr,
            "unknown service: rc %d %r" % (r.returncode, r.stderr))


if __name__ == "__main__":
    h.main(globals())
