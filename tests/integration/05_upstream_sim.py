# SPDX-License-Identifier: ISC
"""troupe-upstream-sim alone: the OpenAI-compatible simulator.

Starts the simulator (only it: no Redis, PostgreSQL or services) on free
loopback ports and checks what tests and benchmarks rely on: the exact
"sim: messages=..." content, the chat.completion and chunk shapes, stream
pacing, every [sim:...] directive, 400s, the rate limit and its headers,
/sim/stats with aborted clients, /sim/traces, /sim/config, --ready-file, READY=1 and a
clean exit on SIGTERM.  Run: TROUPE_BUILD=<build dir> python3
tests/integration/05_upstream_sim.py [name filter...]
"""

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, eq, Failure  # noqa: E402

TMP = tempfile.mkdtemp(prefix="troupe-sim-test-")
CHAT = "/v1/chat/completions"


class Sim:
    """One simulator process, waited for through READY=1."""

    def __init__(self, *args):
        self.log = os.path.join(TMP, "sim-%d.log" % len(_sims))
        self.port = harness.free_port()
        self.proc, _ = harness.spawn_notify(
            [harness.binary("upstream-sim"), "--listen",
             "127.0.0.1:%d" % self.port] + list(args), self.log,
            timeout=10)
        _sims.append(self)

    def conn(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=timeout)

    def req(self, method, path, body=None, headers=None, timeout=10):
        return harness.http_request(self.port, method, path, body,
                                    headers, timeout)

    def chat(self, content, messages=None, model="m-test", stream=False,
             **extra):
        msgs = (messages or []) + [{"role": "user", "content": content}]
        body = {"model": model, "messages": msgs, **extra}
        if stream:
            body["stream"] = True
        return self.req("POST", CHAT, body)

    def stats(self):
        r = self.req("GET", "/sim/stats")
        eq(r.status, 200, "GET /sim/stats")
        return r.json

    def reset(self):
        eq(self.req("POST", "/sim/reset").status, 200, "POST /sim/reset")

    def raw_chat(self, body):
        """A socket with a chat request sent on it (not read)."""
        b = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(b"POST %s HTTP/1.1\r\nHost: sim\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n"
                  % (CHAT.encode(), len(b)) + b)
        return s

    def stop(self):
        """SIGTERM; it must exit 0 with no sanitizer report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure("simulator ignored SIGTERM for 10s")
            eq(rc, 0, "exit status after SIGTERM (log:\n%s)" %
               harness.tail(self.log))
        text = open(self.log, encoding="utf-8", errors="replace").read()
        for mark in harness.SANITIZER_MARKS:
            check(mark not in text, "sanitizer report in %s:\n%s" %
                  (self.log, harness.tail(self.log)))


_sims = []
_main = None


def sim():
    """The shared simulator at latency 0, no token pacing, no limit."""
    global _main
    if _main is None or _main.proc.poll() is not None:
        _main = Sim()
    return _main


def expected(messages, model="m-test"):
    sys_ = 1 if messages[0]["role"] == "system" else 0
    n = len(messages)
    ctx = max(n - 2, 0) if sys_ else n - 1
    return "sim: messages=%d system=%d context=%d model=%s query=%s" % (
        n, sys_, ctx, model, messages[-1]["content"])


def sse_events(body):
    """The data: payloads of an event stream, in order."""
    out = []
    for block in body.decode("utf-8").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def chunks_of(events):
    check(events and events[-1] == "[DONE]",
          "stream must end with data: [DONE], got %r" % events[-1:])
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------ tests

def test_help_and_bad_options():
    b = harness.binary("upstream-sim")
    p = subprocess.run([b, "--help"], capture_output=True, text=True,
                       timeout=10)
    eq(p.returncode, 0, "--help exit status")
    for opt in ("--listen", "--latency-ms", "--token-rate", "--rate-limit",
                "--ready-file"):
        check(opt in p.stdout, "--help does not mention %s" % opt)
    for bad in (["--latency-ms", "abc"], ["--token-rate", "-1"],
                ["--listen", "nonsense"], ["--bogus"]):
        p = subprocess.run([b] + bad, capture_output=True, text=True,
                           timeout=10)
        check(p.returncode != 0, "%r: exit status 0, want non-zero" % bad)


def test_ready_file_start_line_and_sigterm():
    ready = os.path.join(TMP, "ready")
    log = os.path.join(TMP, "sim-ready.log")
    with open(log, "wb") as lf:
        p = subprocess.Popen([harness.binary("upstream-sim"), "--listen",
                              "127.0.0.1:0", "--ready-file", ready],
                             stdout=lf, stderr=lf,
                             env=harness.clean_env())
    try:
        addr = harness.wait_for(
            lambda: os.path.exists(ready) and open(ready).read().strip(),
            5, what="ready file")
        host, port = addr.rsplit(":", 1)
        eq(host, "127.0.0.1", "ready file host")
        check(int(port) > 0, "ready file port %r" % port)
        line = open(log).readline()
        check(("listening on %s" % addr) in line,
              "start line %r does not name %s" % (line, addr))
        r = harness.http_request(int(port), "GET", "/healthz")
        eq((r.status, r.body), (200, b"ok"), "GET /healthz")
        p.send_signal(signal.SIGTERM)
        eq(p.wait(10), 0, "exit status after SIGTERM")
        check(not os.path.exists(ready), "ready file left behind")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_endpoints():
    s = sim()
    r = s.req("GET", "/healthz")
    eq((r.status, r.body), (200, b"ok"), "GET /healthz")
    r = s.req("GET", "/v1/models")
    eq(r.status, 200, "GET /v1/models")
    eq(r.json["object"], "list", "models object")
    r = s.req("GET", "/nope")
    eq(r.status, 404, "unknown path")
    check("error" in (r.json or {}), "404 body %r" % r)
    eq(s.req("GET", CHAT).status, 405, "GET on chat completions")


def test_completion_shape_and_content():
    s = sim()
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two three"},
            {"role": "user", "content": 'what "is" \\ this?\nok'}]
    r = s.req("POST", CHAT, {"model": "gpt-sim", "messages": msgs})
    eq(r.status, 200, "status (%r)" % r)
    check(r.headers.get("content-type", "").startswith("application/json"),
          "content-type %r" % r.headers.get("content-type"))
    j = r.json
    check(isinstance(j.get("id"), str) and j["id"].startswith("chatcmpl-"),
          "id %r" % j.get("id"))
    eq(j["object"], "chat.completion", "object")
    check(isinstance(j.get("created"), int), "created %r" % j.get("created"))
    eq(j["model"], "gpt-sim", "model echo")
    eq(len(j["choices"]), 1, "choices")
    c = j["choices"][0]
    eq(c["index"], 0, "index")
    eq(c["finish_reason"], "stop", "finish_reason")
    eq(c["message"]["role"], "assistant", "role")
    want = expected(msgs, "gpt-sim")
    eq(c["message"]["content"], want, "content")
    u = j["usage"]
    eq(u["prompt_tokens"], 1 + 1 + 1 + 2 + 5, "prompt_tokens (words)")
    eq(u["completion_tokens"], len(want.split()), "completion_tokens")
    eq(u["total_tokens"], u["prompt_tokens"] + u["completion_tokens"],
       "total_tokens")


def test_context_counting():
    s = sim()
    cases = [
        [{"role": "user", "content": "solo"}],
        [{"role": "system", "content": "s"}, {"role": "user",
                                              "content": "q"}],
        [{"role": "user", "content": "a"}, {"role": "assistant",
                                            "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "system", "content": "s"}] +
        [{"role": "user" if i % 2 == 0 else "assistant",
          "content": "turn %d" % i} for i in range(9)],
    ]
    for msgs in cases:
        r = s.req("POST", CHAT, {"model": "m-test", "messages": msgs})
        eq(r.status, 200, "status for %d messages" % len(msgs))
        eq(r.json["choices"][0]["message"]["content"], expected(msgs),
           "content for %r" % [m["role"] for m in msgs])
    # content given as an array of text parts
    msgs = [{"role": "user", "content": [{"type": "text", "text": "ab"},
                                         {"type": "text", "text": "cd"}]}]
    r = s.req("POST", CHAT, {"model": "m-test", "messages": msgs})
    eq(r.json["choices"][0]["message"]["content"],
       "sim: messages=1 system=0 context=0 model=m-test query=abcd",
       "content from parts")


def test_keep_alive():
    s = sim()
    c = s.conn()
    try:
        for i in range(5):
            c.request("POST", CHAT, json.dumps(
                {"model": "k", "messages": [{"role": "user",
                                             "content": "n%d" % i}]}),
                {"Content-Type": "application/json"})
            r = c.getresponse()
            j = json.loads(r.read())
            eq(r.status, 200, "request %d on one connection" % i)
            check(j["choices"][0]["message"]["content"].endswith(
                "query=n%d" % i), "answer %d: %r" % (i, j))
            check(not r.will_close, "server closed a keep-alive connection")
    finally:
        c.close()


def test_stream():
    s = sim()
    msgs = [{"role": "system", "content": "x"},
            {"role": "user", "content": "tell me  a\tstory "}]
    r = s.req("POST", CHAT, {"model": "m-test", "stream": True,
                             "messages": msgs})
    eq(r.status, 200, "status")
    check(r.headers.get("content-type", "").startswith("text/event-stream"),
          "content-type %r" % r.headers.get("content-type"))
    chunks = chunks_of(sse_events(r.body))
    want = expected(msgs)
    pieces = []
    for ch in chunks[:-1]:
        eq(ch["object"], "chat.completion.chunk", "chunk object")
        eq(ch["model"], "m-test", "chunk model")
        eq(ch["choices"][0]["finish_reason"], None, "finish_reason early")
        pieces.append(ch["choices"][0]["delta"]["content"])
    eq(chunks[0]["choices"][0]["delta"].get("role"), "assistant",
       "first delta role")
    eq("".join(pieces), want, "joined deltas")
    eq(len(pieces), len(want.split()), "one piece per word")
    ids = {ch["id"] for ch in chunks}
    eq(len(ids), 1, "one id for the whole stream")
    last = chunks[-1]
    eq(last["choices"][0]["finish_reason"], "stop", "final finish_reason")
    eq(last["usage"]["completion_tokens"], len(want.split()),
       "final usage.completion_tokens")
    eq(last["usage"]["prompt_tokens"], 1 + 4, "final usage.prompt_tokens")


def test_stream_pacing():
    s = Sim("--latency-ms", "150", "--token-rate", "40")
    try:
        q = "a b c d e f g h i"      # content: 5 + 9 words = 14 pieces
        c = s.conn()
        t0 = time.monotonic()
        c.request("POST", CHAT, json.dumps(
            {"model": "p", "stream": True,
             "messages": [{"role": "user", "content": q}]}),
            {"Content-Type": "application/json"})
        r = c.getresponse()
        times = []
        while True:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                times.append(time.monotonic() - t0)
                if line.strip() == b"data: [DONE]":
                    break
        c.close()
        n = len(expected([{"role": "user", "content": q}], "p").split())
        eq(len(times), n + 2, "events (pieces + final + DONE)")
        check(0.14 <= times[0] < 0.6,
              "first token after %.3fs, want about 0.15s" % times[0])
        total = times[-1] - times[0]
        want = (n - 1) / 40.0
        check(want * 0.8 <= total <= want + 0.5,
              "stream took %.3fs after the first token, want ~%.3fs" %
              (total, want))
        # at latency 150 a plain answer takes at least that long
        t0 = time.monotonic()
        eq(s.chat("x").status, 200, "plain answer")
        check(time.monotonic() - t0 >= 0.14, "latency not applied")
    finally:
        s.stop()


def test_directive_status_and_429():
    s = sim()
    r = s.chat("boom [sim:status=503]")
    eq(r.status, 503, "[sim:status=503]")
    eq(r.json["error"]["type"], "server_error", "error type")
    check(isinstance(r.json["error"]["message"], str), "error message")
    r = s.chat("x [sim:status=401]")
    eq((r.status, r.json["error"]["code"]), (401, "invalid_api_key"),
       "[sim:status=401]")
    r = s.chat("x [sim:status=500][sim:retry-after=7]")
    eq((r.status, r.headers.get("retry-after")), (500, "7"),
       "[sim:retry-after=7]")
    r = s.chat("slow down [sim:429]", stream=True)
    eq(r.status, 429, "[sim:429]")
    eq(r.headers.get("retry-after"), "1", "Retry-After")
    eq(r.headers.get("x-ratelimit-remaining-requests"), "0",
       "x-ratelimit-remaining-requests")
    eq(r.json["error"]["code"], "rate_limit_exceeded", "429 code")


def test_directive_garbage():
    s = sim()
    r = s.chat("x [sim:garbage]")
    eq(r.status, 200, "[sim:garbage] status")
    check(r.body and r.json is None, "garbage body parses as JSON: %r" % r)
    r = s.chat("x [sim:garbage]", stream=True)
    eq(r.status, 200, "[sim:garbage] stream status")
    ev = sse_events(r.body)
    check(ev and "[DONE]" not in ev, "garbage stream events %r" % ev)
    try:
        json.loads(ev[0])
        raise Failure("garbage stream event is JSON: %r" % ev[0])
    except ValueError:
        pass


def test_directive_delay():
    s = sim()
    t0 = time.monotonic()
    r = s.chat("wait [sim:delay=300]")
    dt = time.monotonic() - t0
    eq(r.status, 200, "[sim:delay] status")
    check(0.29 <= dt < 2, "[sim:delay=300] took %.3fs" % dt)
    eq(r.json["choices"][0]["message"]["content"],
       "sim: messages=1 system=0 context=0 model=m-test query=wait "
       "[sim:delay=300]", "content keeps the directive")


def test_directive_close_and_cut():
    s = sim()
    s.reset()
    for content in ("bye [sim:close]", "bye [sim:delay=100][sim:close]"):
        b = {"model": "m", "messages": [{"role": "user",
                                         "content": content}]}
        data = json.dumps(b).encode()
        resp, closed, raw = harness.raw_request(
            s.port, b"POST %s HTTP/1.1\r\nHost: s\r\nContent-Length: %d"
            b"\r\n\r\n" % (CHAT.encode(), len(data)) + data, timeout=5)
        eq(raw, b"", "%s: bytes before close" % content)
        check(closed, "%s: connection not closed" % content)
    # cut: two pieces, then the connection goes
    s2 = s.raw_chat({"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "one two three [sim:cut=2]"}]})
    buf = b""
    while True:
        b = s2.recv(65536)
        if not b:
            break
        buf += b
    s2.close()
    text = buf.decode()
    check(text.startswith("HTTP/1.1 200"), "cut: status line %r" % text[:40])
    eq(text.count("data: "), 2, "cut: events before the close")
    check("[DONE]" not in text, "cut stream carried [DONE]")
    st = s.stats()
    eq(st["closed"], 3, "stats.closed")
    eq(st["aborted"], 0, "stats.aborted")
    eq(s.req("GET", "/healthz").status, 200, "alive after closes")


def test_directive_tool_calls():
    s = sim()
    tools = [{"type": "function", "function": {"name": "search",
                                               "parameters": {}}}]
    r = s.chat("look it up [sim:tool=search][sim:tool=calc]", tools=tools)
    eq(r.status, 200, "tool status")
    c = r.json["choices"][0]
    eq(c["finish_reason"], "tool_calls", "finish_reason")
    calls = c["message"]["tool_calls"]
    eq([t["function"]["name"] for t in calls], ["search", "calc"],
       "tool names")
    eq(len({t["id"] for t in calls}), 2, "distinct call ids")
    args = json.loads(calls[0]["function"]["arguments"])
    eq(args, {"query": "look it up [sim:tool=search][sim:tool=calc]"},
       "arguments")
    # the tool result comes back: a normal answer that shows the results
    # (JSON ones parsed) and the user's query, even though that query
    # still asks for the tool
    msgs = [{"role": "user", "content": "look [sim:tool=search]"},
            {"role": "assistant", "content": None, "tool_calls": calls[:1]},
            {"role": "tool", "tool_call_id": calls[0]["id"],
             "content": "result 42"}]
    r = s.req("POST", CHAT, {"model": "m-test", "messages": msgs,
                             "tools": tools})
    eq(r.json["choices"][0]["message"]["content"],
       'sim: messages=3 system=0 context=2 model=m-test tools=1 '
       'tool_results=["result 42"] query=look [sim:tool=search]',
       "answer after the tool result")
    eq(r.json["choices"][0]["finish_reason"], "stop", "follow-up finish")
    # streamed tool call
    r = s.chat("x [sim:tool=search]", stream=True, tools=tools)
    chunks = chunks_of(sse_events(r.body))
    name = args_s = ""
    for ch in chunks[:-1]:
        for tc in ch["choices"][0]["delta"].get("tool_calls", []):
            name += tc.get("function", {}).get("name", "")
            args_s += tc.get("function", {}).get("arguments", "")
    eq(name, "search", "streamed tool name")
    eq(json.loads(args_s), {"query": "x [sim:tool=search]"},
       "streamed arguments")
    eq(chunks[-1]["choices"][0]["finish_reason"], "tool_calls",
       "streamed finish_reason")


def test_tool_rounds_and_results():
    s = sim()
    q = "w [sim:tool=a][sim:tool-rounds=2]"
    r = s.chat(q)
    calls = r.json["choices"][0]["message"]["tool_calls"]
    msgs = [{"role": "user", "content": q},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"],
             "content": '{"result": {"x": 1}, "plugin": "a"}'}]
    # round 1 of 2 done: it asks again
    r = s.req("POST", CHAT, {"model": "m", "messages": msgs})
    eq(r.json["choices"][0]["finish_reason"], "tool_calls", "second ask")
    msgs += [{"role": "assistant", "content": None,
              "tool_calls": r.json["choices"][0]["message"]["tool_calls"]},
             {"role": "tool", "tool_call_id": "c2", "content": "[1]"}]
    r = s.req("POST", CHAT, {"model": "m", "messages": msgs,
                             "stream": True})
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks_of(sse_events(r.body))
                   if c["choices"])
    eq(text, 'sim: messages=5 system=0 context=4 model=m tools=2 '
       'tool_results=[{"result":{"x":1},"plugin":"a"},[1]] query=' + q,
       "answer after two rounds")
    # [sim:badargs]: arguments that are not JSON
    r = s.chat("x [sim:tool=a][sim:badargs]")
    args = r.json["choices"][0]["message"]["tool_calls"][0]["function"][
        "arguments"]
    try:
        json.loads(args)
        raise Failure("badargs gave JSON arguments: %r" % args)
    except ValueError:
        pass


def plugin_post(s, name, body, headers=None, timeout=10):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return s.req("POST", "/plugin/" + name,
                 body if isinstance(body, (bytes, str)) else body, h,
                 timeout)


def plugin_stats(s, name):
    return s.stats().get("plugins", {}).get(name, {})


def test_plugin_endpoint():
    s = Sim()
    try:
        r = plugin_post(s, "echo", {"city": "Paris", "n": [1, 2]})
        eq(r.status, 200, "plugin status")
        eq(r.json, {"result": {"city": "Paris", "n": [1, 2]},
                    "plugin": "echo"}, "plugin answer")
        r = plugin_post(s, "echo", {"q": "[plugin:status=503]"})
        eq(r.status, 503, "[plugin:status]")
        check("error" in r.json, "error JSON: %r" % r.json)
        r = plugin_post(s, "echo", {"q": "[plugin:garbage]"})
        eq(r.status, 200, "[plugin:garbage] status")
        try:
            json.loads(r.body)
            raise Failure("garbage was JSON")
        except ValueError:
            pass
        # a directive for another plugin does not apply
        r = plugin_post(s, "echo", {"q": "[plugin:other:status=500]"})
        eq(r.status, 200, "another plugin's directive")
        r = plugin_post(s, "other", {"q": "[plugin:other:status=500]"})
        eq(r.status, 500, "its own directive")
        r = plugin_post(s, "echo", "{not json")
        eq(r.status, 400, "body not JSON")
        eq(s.req("GET", "/plugin/echo").status, 405, "GET a plugin")
        t0 = time.monotonic()
        r = plugin_post(s, "slow", {"q": "[plugin:delay=300]"})
        dt = time.monotonic() - t0
        eq(r.status, 200, "delayed plugin")
        check(0.28 <= dt < 2, "delay 300 ms took %.2fs" % dt)
        st = s.stats()
        eq(st["plugins"]["echo"]["requests"], 5, "echo requests")
        eq(st["plugins"]["echo"]["by_status"],
           {"200": 3, "400": 1, "503": 1}, "echo by_status")
        eq(st["requests"], 0, "plugin calls are not chat requests")
        eq(st["by_status"], {}, "nor in the chat by_status")
        # a client that leaves a delayed plugin: counted at once
        b = json.dumps({"q": "[plugin:delay=5000]"}).encode()
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(b"POST /plugin/gone HTTP/1.1\r\nHost: s\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(b) + b)
        time.sleep(0.2)
        eq(s.stats()["plugin_in_flight"], 1, "in flight")
        c.close()
        end = time.monotonic() + 1
        while time.monotonic() < end and \
                plugin_stats(s, "gone").get("aborted") != 1:
            time.sleep(0.05)
        eq(plugin_stats(s, "gone").get("aborted"), 1, "aborted plugin")
        eq(s.stats()["plugin_in_flight"], 0, "none in flight")
        s.reset()
        eq(s.stats()["plugins"], {}, "reset clears plugins")
    finally:
        s.stop()


def test_plugin_secret():
    import hashlib
    import hmac
    s = Sim("--plugin-secret", "s3cr3t")
    try:
        body = b'{"a":1}'
        eq(plugin_post(s, "p", body).status, 401, "no auth")
        eq(plugin_post(s, "p", body,
                       {"Authorization": "Bearer nope"}).status, 401,
           "wrong token")
        eq(plugin_post(s, "p", body,
                       {"Authorization": "Bearer s3cr3t"}).status, 200,
           "token")
        ts = str(int(time.time()))
        sig = hmac.new(b"s3cr3t", ts.encode() + b"." + body,
                       hashlib.sha256).hexdigest()
        r = plugin_post(s, "p", body, {"X-Troupe-Timestamp": ts,
                                       "X-Troupe-Signature":
                                       "sha256=" + sig})
        eq(r.status, 200, "hmac")
        eq(r.json["result"], {"a": 1}, "hmac echo")
        eq(plugin_post(s, "p", b'{"a":2}',
                       {"X-Troupe-Timestamp": ts,
                        "X-Troupe-Signature": "sha256=" + sig}).status,
           401, "hmac of another body")
        old = str(int(time.time()) - 3600)
        sig = hmac.new(b"s3cr3t", old.encode() + b"." + body,
                       hashlib.sha256).hexdigest()
        eq(plugin_post(s, "p", body, {"X-Troupe-Timestamp": old,
                                      "X-Troupe-Signature":
                                      "sha256=" + sig}).status,
           401, "hmac an hour old")
        eq(plugin_stats(s, "p")["unauthorized"], 4, "unauthorized count")
        # chat completions do not need the secret
        eq(s.chat("hi").status, 200, "chat without auth")
    finally:
        s.stop()


def test_sim_traces():
    """GET /sim/traces: the trace headers of the last 64 chat and plugin
    requests, oldest first, lines joined with ',', absent ones null."""
    s = Sim()
    try:
        eq(s.req("GET", "/sim/traces").json, {"traces": []}, "none yet")
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        c = s.conn()
        b = json.dumps({"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}).encode()
        c.putrequest("POST", CHAT)
        for k, v in (("Content-Type", "application/json"),
                     ("Content-Length", str(len(b))), ("traceparent", tp),
                     ("tracestate", "rojo=1"), ("tracestate", "congo=2")):
            c.putheader(k, v)
        c.endheaders(b)
        eq(c.getresponse().status, 200, "chat")
        c.close()
        eq(plugin_post(s, "echo", {}).status, 200, "plugin")
        eq(s.req("GET", "/sim/traces").json["traces"],
           [{"path": CHAT, "traceparent": tp, "tracestate": "rojo=1,congo=2"},
            {"path": "/plugin/echo", "traceparent": None,
             "tracestate": None}], "what the simulator saw")
        for i in range(70):
            s.chat("n%d" % i)
        tr = s.req("GET", "/sim/traces").json["traces"]
        eq(len(tr), 64, "traces kept")
        eq(s.req("POST", "/sim/traces").status, 405, "POST /sim/traces")
        s.reset()
        eq(s.req("GET", "/sim/traces").json, {"traces": []}, "after reset")
    finally:
        s.stop()


def test_bad_requests():
    s = sim()
    cases = [("{not json", "invalid JSON"),
             ('{"model":"m"}', "no messages"),
             ('{"model":"m","messages":[]}', "empty messages"),
             ('{"model":"m","messages":"hi"}', "messages not an array"),
             ('{"messages":[{"role":"user","content":"x"}]}', "no model"),
             ('{"model":"m","messages":[{"content":"x"}]}', "no role"),
             ('[1,2]', "not an object"),
             ('{"model":"m","messages":[{"role":"user","content":"x"}],',
              "truncated after a comma")]
    for body, what in cases:
        r = s.req("POST", CHAT, body)
        eq(r.status, 400, what)
        e = (r.json or {}).get("error")
        check(isinstance(e, dict) and e.get("type") ==
              "invalid_request_error" and isinstance(e.get("message"), str),
              "%s: error JSON %r" % (what, r))


def test_rate_limit_and_config():
    s = Sim("--rate-limit", "5")
    try:
        codes = []
        r429 = None
        for i in range(20):
            r = s.chat("n%d" % i)
            codes.append(r.status)
            if r.status == 429 and r429 is None:
                r429 = r
        ok = codes.count(200)
        check(5 <= ok <= 7, "200s under --rate-limit 5: %d (%r)" %
              (ok, codes))
        eq(codes.count(200) + codes.count(429), 20, "only 200 and 429")
        h = r429.headers
        eq(h.get("retry-after"), "1", "Retry-After")
        eq(h.get("x-ratelimit-remaining-requests"), "0",
           "x-ratelimit-remaining-requests")
        eq(h.get("x-ratelimit-reset-requests"), "1s",
           "x-ratelimit-reset-requests")
        eq(h.get("ratelimit-policy"), "5;w=1", "RateLimit-Policy")
        check(h.get("ratelimit", "").startswith("limit=5, remaining=0"),
              "RateLimit %r" % h.get("ratelimit"))
        e = r429.json["error"]
        eq((e["type"], e["code"]), ("requests", "rate_limit_exceeded"),
           "429 error type/code")
        st = s.stats()
        eq(st["by_status"].get("429"), codes.count(429), "stats 429s")
        eq(st["rate_limited"], codes.count(429), "stats rate_limited")
        # the bucket refills at 5/s
        time.sleep(0.45)
        eq(s.chat("again").status, 200, "after 0.45s of refill")
        # lift it at runtime
        r = s.req("POST", "/sim/config", {"rate_limit": 0})
        eq((r.status, r.json["rate_limit"]), (200, 0), "POST /sim/config")
        codes = [s.chat("free %d" % i).status for i in range(20)]
        eq(codes, [200] * 20, "after lifting the limit")
        eq(s.req("POST", "/sim/config", {"rate_limit": -1}).status, 400,
           "negative rate_limit")
        r = s.req("GET", "/sim/config")
        eq(r.json, {"latency_ms": 0, "token_rate": 0, "rate_limit": 0,
                    "early_grace_ms": 200}, "GET /sim/config")
        # Retry-After windows: the 429s above opened one for their model;
        # requests inside it after the grace are "early"
        r = s.chat("[sim:429] [sim:retry-after=2] go away", model="m-w")
        eq(r.status, 429, "a 429 with Retry-After 2")
        s.chat("in flight", model="m-w")     # within the 200 ms grace
        eq(s.stats()["early_by_model"].get("m-w"), 0, "inside the grace")
        time.sleep(0.3)
        s.chat("too soon", model="m-w")
        s.chat("another model", model="m-other")
        eq(s.stats()["early_by_model"].get("m-w"), 1,
           "a chat 0.3 s into a 2 s window")
    finally:
        s.stop()


def test_stats_and_aborted_clients():
    s = Sim()
    try:
        s.reset()
        for i in range(3):
            eq(s.chat("ok %d" % i).status, 200, "ok request")
        eq(s.chat("x [sim:status=502]").status, 502, "502")
        # a client that leaves during a delay
        a = s.raw_chat({"model": "m", "messages": [
            {"role": "user", "content": "x [sim:delay=400]"}]})
        time.sleep(0.1)
        st = s.stats()
        eq(st["in_flight"], 1, "in_flight during the delay")
        a.close()
        # and one that leaves mid-stream
        s.req("POST", "/sim/config", {"token_rate": 20})
        b = s.raw_chat({"model": "m", "stream": True, "messages": [
            {"role": "user", "content": "a b c d e f g h i j k l"}]})
        first = b.recv(65536)
        check(first.startswith(b"HTTP/1.1 200"), "stream began: %r" %
              first[:40])
        b.close()
        s.req("POST", "/sim/config", {"token_rate": 0})

        def settled():
            st = s.stats()
            return st if st["in_flight"] == 0 and st["aborted"] == 2 \
                else None
        st = harness.wait_for(settled, 5, what="two aborted, none in flight")
        eq(st["requests"], 6, "requests")
        eq(st["by_status"], {"200": 4, "502": 1}, "by_status")
        eq(s.req("GET", "/healthz").status, 200, "alive after aborts")
        s.reset()
        st = s.stats()
        eq((st["requests"], st["by_status"], st["aborted"]), (0, {}, 0),
           "after reset")
    finally:
        s.stop()


def test_many_concurrent_delayed():
    s = Sim("--latency-ms", "200")
    try:
        n = 200
        body = json.dumps({"model": "c", "messages": [
            {"role": "user", "content": "hi"}]}).encode()
        req = (b"POST %s HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n"
               % (CHAT.encode(), len(body)) + body)
        socks = []
        t0 = time.monotonic()
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(req)
            socks.append(c)
        bufs = {c: b"" for c in socks}
        pending = set(socks)
        end = time.monotonic() + 10
        while pending and time.monotonic() < end:
            rd, _, _ = select.select(list(pending), [], [], 0.5)
            for c in rd:
                d = c.recv(65536)
                bufs[c] += d
                resp = harness.parse_responses(bufs[c])
                if not d or resp:
                    pending.discard(c)
        dt = time.monotonic() - t0
        for c in socks:
            c.close()
        eq(len(pending), 0, "answers missing")
        good = sum(1 for c in socks
                   if harness.parse_responses(bufs[c]) and
                   harness.parse_responses(bufs[c])[0].status == 200)
        eq(good, n, "200 answers")
        check(dt < 3, "%d concurrent delayed requests took %.2fs" % (n, dt))
    finally:
        s.stop()


def test_zz_shared_sim_exits_cleanly():
    global _main
    s = sim()
    s.stop()
    _main = None


def _cleanup():
    for s in _sims:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    if os.environ.get("TROUPE_TEST_KEEP") != "1":
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    import atexit
    atexit.register(_cleanup)
    harness.main(globals())
