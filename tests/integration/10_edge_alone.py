# SPDX-License-Identifier: ISC
"""10: troupe-edge alone, without any peer.

The edge runs on its own (no auth, dispatcher or storage: its CHAT_REQUESTs
queue for auth and are never answered), each test with the config it
needs.  What it must do by itself: /healthz, /readyz naming the peers that
are down, request ids and traceparents on every answer, routing (404, 405),
the chat checks it makes before anything leaves it (401, 400), the chat
deadline (504), a full backlog to auth (503 + Retry-After), every limit
(head 431, body 413, head/body timeout 408, idle keep-alive close) with the
JSON error and a clean close, malformed requests (400 JSON), keep-alive and
pipelining, no HTTP/2, a listening socket passed by systemd, reload on
SIGHUP and a clean exit on SIGTERM.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import harness as h

LOGID = re.compile(r"^[0-9]{14}[0-9a-f]{18}$")
TRACE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
CLIENT_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
GOOD = {"bot_id": "b1", "user_id": "u1", "query": "hello"}
AUTH = {"Authorization": "Bearer some.token.here"}


class Edge:
    """One troupe-edge with a private rundir and config."""

    def __init__(self, edge_conf=None, ipc_conf=None, socket_activate=False):
        self.root = tempfile.mkdtemp(prefix="troupe-edge-it-")
        self.port = h.free_port()
        self.conf_path = os.path.join(self.root, "troupe.conf")
        self.log = os.path.join(self.root, "edge.log")
        self.edge_conf = {"listen": "127.0.0.1:%d" % self.port}
        self.edge_conf.update(edge_conf or {})
        self.ipc_conf = {"rundir": self.root}
        self.ipc_conf.update(ipc_conf or {})
        self.socket_activate = socket_activate
        self.proc = None
        self.write()

    def write(self):
        with open(self.conf_path, "w") as f:
            for sec, kv in (("ipc", self.ipc_conf), ("edge", self.edge_conf)):
                f.write("[%s]\n" % sec)
                for k, v in kv.items():
                    f.write("%s = %s\n" % (k, v))

    def start(self):
        cmd = [h.binary("edge"), "-c", self.conf_path]
        first = None
        if self.socket_activate:
            # systemd-socket-activate starts the program on the first
            # connection, which waits in the listen queue meanwhile.
            first = []
            threading.Timer(0.3, lambda: first.append(
                self.get("/healthz"))).start()
            # systemd's helper binds, then execs us with LISTEN_FDS=1;
            # the config's listen points elsewhere and must be ignored.
            self.edge_conf["listen"] = "127.0.0.1:%d" % h.free_port()
            self.write()
            cmd = ["systemd-socket-activate", "-E", "NOTIFY_SOCKET",
                   "-l", "127.0.0.1:%d" % self.port] + cmd
        self.proc, self.status = h.spawn_notify(
            cmd, self.log, notify_path=os.path.join(self.root, "notify"))
        if first is not None:
            h.wait_for(lambda: first, 10, 0.05, "the first request")
            self.first = first[0]
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10):
        rc = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise h.Failure("troupe-edge: no exit within %ds" % timeout)
        text = self.logtext()
        for mark in h.SANITIZER_MARKS:
            if mark in text:
                raise h.Failure("edge log has %r:\n%s" % (mark, text[-3000:]))
        return rc

    def cleanup(self):
        try:
            self.stop(signal.SIGKILL)
        except h.Failure:
            pass
        if os.environ.get("TROUPE_TEST_KEEP") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def logtext(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def get(self, path, headers=None):
        return h.http_request(self.port, "GET", path, None, headers, 10)

    def post(self, path, body, headers=None, timeout=10):
        return h.http_request(self.port, "POST", path, body, headers, timeout)

    def raw(self, data, **kw):
        return h.raw_request(self.port, data, **kw)


_edges = []


def edge(**kw):
    e = Edge(**kw)
    _edges.append(e)
    try:
        return e.start()
    except BaseException:
        e.cleanup()
        raise


def done(e):
    """Stop e with SIGTERM: it must exit 0 and leave a clean log."""
    rc = e.stop()
    _edges.remove(e)
    e.cleanup()
    h.eq(rc, 0, "exit status after SIGTERM")


def check_ids(r, what):
    lid = r.headers.get("x-tt-logid", "")
    h.check(LOGID.match(lid), "%s: X-Tt-Logid %r is not 14 digits + 18 "
            "hex" % (what, lid))
    tp = r.headers.get("traceparent", "")
    h.check(TRACE.match(tp), "%s: traceparent %r is not W3C" % (what, tp))
    h.eq(r.headers.get("content-type"), "application/json",
         "%s: Content-Type" % what)


def one(e, data, what, **kw):
    rs, closed, raw = e.raw(data, **kw)
    h.check(rs, "%s: no HTTP response (closed=%s, raw %r)" %
            (what, closed, raw[:300]))
    return rs[0], closed, rs


# ------------------------------------------------------------------ tests

def test_healthz_and_ids():
    e = edge()
    r = e.get("/healthz")
    h.eq(r.status, 200, "GET /healthz")
    h.eq(r.json, {"status": "ok"}, "/healthz body")
    check_ids(r, "/healthz")
    ids = {e.get("/healthz").headers["x-tt-logid"] for _ in range(50)}
    h.eq(len(ids), 50, "distinct request ids in 50 answers")
    # A valid client traceparent comes back as is; a bad one is replaced.
    r = e.get("/healthz", {"traceparent": CLIENT_TRACE})
    h.eq(r.headers.get("traceparent"), CLIENT_TRACE, "client traceparent")
    for bad in ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "garbage"):
        r = e.get("/healthz", {"traceparent": bad})
        tp = r.headers.get("traceparent")
        h.check(tp != bad and TRACE.match(tp or ""),
                "bad traceparent %r: got %r back, want a new one" % (bad, tp))
    done(e)


def test_readyz_without_peers():
    e = edge()
    r = e.get("/readyz")
    h.check_error_shape(r, 503, 5030, "/readyz without peers")
    h.eq(r.json["detail"].get("down"), ["auth", "dispatcher", "storage"],
         "peers reported down")
    h.eq(r.headers.get("retry-after"), "1", "Retry-After on /readyz")
    done(e)


def test_routes():
    e = edge()
    r = e.get("/nope")
    h.check_error_shape(r, 404, 4000, "unknown path")
    h.eq(r.json["msg"], "no such route", "404 msg")
    for path in ("/v1/bot/chat", "/v1/bot/chat?x=1"):
        r = e.get(path)
        h.check_error_shape(r, 405, 4000, "GET " + path)
        h.eq(r.headers.get("allow"), "POST", "Allow on 405")
    r = e.post("/healthz", "{}")
    h.check_error_shape(r, 405, 4000, "POST /healthz")
    h.eq(r.headers.get("allow"), "GET", "Allow on 405 /healthz")
    done(e)


def test_chat_checks_at_the_edge():
    e = edge()
    for what, hdrs in (("no Authorization", {}),
                       ("Basic", {"Authorization": "Basic dTpw"}),
                       ("empty Bearer", {"Authorization": "Bearer "})):
        r = e.post("/v1/bot/chat", GOOD, hdrs)
        h.check_error_shape(r, 401, 4100, what)
        h.eq(r.json["msg"], "missing token", what + ": msg")
    for what, body, msg in (
            ("not JSON", "hello", "invalid JSON body"),
            ("empty", "", "invalid JSON body"),
            ("array", "[]", "invalid JSON body: not an object"),
            ("trailing", json.dumps(GOOD) + "}", "invalid JSON body"),
            ("no query", {"bot_id": "b", "user_id": "u"}, "missing query"),
            ("bot_id number", dict(GOOD, bot_id=5),
             "bot_id must be a string"),
            ("empty user_id", dict(GOOD, user_id=""),
             "user_id must not be empty"),
            ("history_id number", dict(GOOD, history_id=1),
             "history_id must be a string"),
            ("case matters", {"Bot_id": "b", "user_id": "u", "query": "q"},
             "missing bot_id")):
        r = e.post("/v1/bot/chat", body, AUTH)
        h.check_error_shape(r, 400, 4000, what)
        h.eq(r.json["msg"], msg, what + ": msg")
        h.check(not r.closed, "%s: connection closed after a 400" % what)
    done(e)


def test_chat_deadline():
    e = edge(edge_conf={"chat_timeout_ms": 700})
    t0 = time.monotonic()
    r = e.post("/v1/bot/chat", GOOD, dict(AUTH, traceparent=CLIENT_TRACE))
    dt = time.monotonic() - t0
    h.check_error_shape(r, 504, 5040, "chat with nobody to answer")
    h.eq(r.json["msg"], "deadline exceeded", "504 msg")
    h.eq(r.headers.get("traceparent"), CLIENT_TRACE, "trace on the 504")
    h.check(0.65 <= dt <= 2.0, "504 after %.2fs, want about 0.7s" % dt)
    done(e)


def test_backlog_full_503():
    # ipc refuses past max_backlog envelopes queued for a peer (auth is
    # not there): the edge answers 503 + Retry-After at once.
    e = edge(edge_conf={"chat_timeout_ms": 2000},
             ipc_conf={"max_backlog": 16})
    socks = []
    try:
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", e.port), timeout=5)
            body = json.dumps(GOOD).encode()
            s.sendall(b"POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
                      b"Authorization: Bearer x\r\nContent-Length: %d\r\n"
                      b"\r\n%s" % (len(body), body))
            socks.append(s)
        time.sleep(0.3)
        t0 = time.monotonic()
        r = e.post("/v1/bot/chat", GOOD, AUTH)
        h.check(time.monotonic() - t0 < 1.0, "503 took too long")
        h.check_error_shape(r, 503, 5030, "chat past the backlog")
        h.eq(r.headers.get("retry-after"), "1", "Retry-After on 503")
    finally:
        for s in socks:
            s.close()
    done(e)


def test_head_limits():
    e = edge(edge_conf={"max_head": 4096})
    # A complete head over the limit, in one write.
    r, closed, _ = one(e, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " +
                       b"a" * 5000 + b"\r\n\r\n", "5000-byte head")
    h.check_error_shape(r, 431, 4000, "5000-byte head")
    h.check(closed, "connection not closed after 431")
    # A head that never ends, sent slowly: cut at the limit.
    r, closed, _ = one(e, [b"GET /healthz HTTP/1.1\r\nX-Big: "] +
                       [b"a" * 1000] * 8, "endless head", pause=0.05)
    h.check_error_shape(r, 431, 4000, "endless head")
    h.check(closed, "connection not closed after 431 (endless head)")
    # Just under the limit is fine.
    start = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-P: "
    pad = 4096 - len(start + b"\r\n\r\n")
    r, _, _ = one(e, start + b"p" * pad + b"\r\n\r\n", "4096-byte head")
    h.eq(r.status, 200, "head of exactly max_head bytes")
    # More than 100 header fields (h2o's own cap).
    r, closed, _ = one(e, b"GET /healthz HTTP/1.1\r\n" + b"".join(
        b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n", "120 headers")
    h.check_error_shape(r, 431, 4000, "120 headers")
    h.check(closed, "connection not closed after 120 headers")
    done(e)


def test_body_limit():
    e = edge(edge_conf={"max_body": 4096})
    body = json.dumps(dict(GOOD, query="q" * 5000)).encode()
    head = (b"POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer x\r\nContent-Length: %d\r\n\r\n" %
            len(body))
    # Sent whole: the 413 must still arrive (lingering close, no RST).
    r, closed, _ = one(e, [head] + [body[i:i + 1000] for i in
                                    range(0, len(body), 1000)], "big body")
    h.check_error_shape(r, 413, 4000, "body over max_body")
    h.check(closed, "connection not closed after 413")
    # Chunked, same limit.
    chunked = (b"POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
               b"Authorization: Bearer x\r\nTransfer-Encoding: chunked\r\n"
               b"\r\n" + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n"
                                  for _ in range(6)) + b"0\r\n\r\n")
    r, closed, _ = one(e, chunked, "chunked body")
    h.check_error_shape(r, 413, 4000, "chunked body over max_body")
    h.check(closed, "connection not closed after chunked 413")
    # Under the limit, the edge reads it and goes on (no token check
    # needed: a JSON error proves the body was read and parsed).
    r = e.post("/v1/bot/chat", "x" * 4000, AUTH)
    h.check_error_shape(r, 400, 4000, "4000-byte body")
    done(e)


def test_malformed():
    e = edge()
    for what, data in (("garbage line", b"GARBAGE\r\n\r\n"),
                       ("bad version", b"GET /healthz HTTP/9\r\n\r\n"),
                       ("no colon", b"GET / HTTP/1.1\r\nHost: t\r\nbad\r\n"
                                    b"\r\n"),
                       ("obs-fold", b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
                       ("binary", b"\x00\x01\x02\xff\r\n\r\n"),
                       ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")):
        r, closed, _ = one(e, data, what)
        h.check_error_shape(r, 400, 4000, what)
        h.check(closed, "%s: connection not closed after 400" % what)
    # After a good request on the same connection too.
    r, closed, rs = one(e, [b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
                            b"JUNK\r\n\r\n"], "junk after keep-alive",
                        pause=0.2)
    h.eq([x.status for x in rs], [200, 400], "statuses")
    h.check_error_shape(rs[1], 400, 4000, "junk after keep-alive")
    done(e)


def test_timeouts():
    e = edge(edge_conf={"head_timeout_ms": 600, "idle_timeout_ms": 1500})
    # A head that stalls: 408 after head_timeout_ms.
    t0 = time.monotonic()
    r, closed, _ = one(e, b"GET /healthz HTTP/1.1\r\nHost: t\r\n",
                       "stalled head")
    dt = time.monotonic() - t0
    h.check_error_shape(r, 408, 4000, "stalled head")
    h.check(closed, "connection not closed after 408")
    h.check(0.5 <= dt <= 2.5, "408 after %.2fs, want about 0.6s" % dt)
    # A body that stalls: the same.
    r, closed, _ = one(e, b"POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
                       b"Authorization: Bearer x\r\nContent-Length: 50\r\n"
                       b"\r\n{\"bot", "stalled body")
    h.check_error_shape(r, 408, 4000, "stalled body")
    # Idle keep-alive: closed after idle_timeout_ms, without a word.
    s = socket.create_connection(("127.0.0.1", e.port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(0.1)
    h.check(s.recv(4096).startswith(b"HTTP/1.1 200"), "first answer")
    t0 = time.monotonic()
    left = s.recv(4096)
    dt = time.monotonic() - t0
    s.close()
    h.eq(left, b"", "bytes after the idle close")
    h.check(1.2 <= dt <= 3.5, "idle close after %.2fs, want about 1.5s" % dt)
    done(e)


def test_keepalive_and_pipelining():
    e = edge()
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", e.port, timeout=5)
    for i in range(5):
        c.request("GET", "/healthz")
        r = c.getresponse()
        r.read()
        h.eq(r.status, 200, "keep-alive request %d" % i)
        h.check(not r.will_close, "server closed a keep-alive connection")
    c.close()
    reqs = (b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /v1/bot/chat HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer x\r\nContent-Length: 2\r\n\r\n{}"
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    rs, closed, raw = e.raw(reqs)
    h.eq([r.status for r in rs], [200, 404, 400, 200],
         "pipelined statuses in order")
    h.eq(len({r.headers.get("x-tt-logid") for r in rs}), 4,
         "distinct logids")
    h.check(closed, "Connection: close honoured")
    done(e)


def test_no_http2():
    e = edge()
    r = e.get("/healthz", {"Connection": "Upgrade, HTTP2-Settings",
                           "Upgrade": "h2c",
                           "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})
    h.eq(r.status, 200, "h2c upgrade ignored, HTTP/1.1 answer")
    done(e)


def test_systemd_socket():
    if not shutil.which("systemd-socket-activate"):
        h.note("systemd-socket-activate not installed: skipped")
        return
    e = edge(socket_activate=True)
    h.eq(e.first.status, 200, "the request that started the edge")
    r = e.get("/healthz")
    h.eq(r.status, 200, "/healthz on the socket from systemd")
    h.check("socket from systemd" in e.status,
            "STATUS= does not say the socket came from systemd: %r" %
            e.status)
    done(e)


def test_reload_and_stop():
    e = edge(edge_conf={"max_body": 100000, "chat_timeout_ms": 800})
    r = e.post("/v1/bot/chat", "x" * 5000, AUTH)
    h.eq(r.status, 400, "5000-byte body before reload")
    e.edge_conf["max_body"] = 1000
    e.write()
    e.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: "config re-read" in e.logtext(), 5, 0.05,
               "reload in the log")
    r = e.post("/v1/bot/chat", "x" * 5000, AUTH)
    h.check_error_shape(r, 413, 4000, "5000-byte body after reload")
    # A bad value is refused and the old config kept.
    e.edge_conf["max_body"] = "lots"
    e.write()
    e.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: "old values kept" in e.logtext(), 5, 0.05,
               "refused reload in the log")
    r = e.post("/v1/bot/chat", "x" * 500, AUTH)
    h.check_error_shape(r, 400, 4000, "500-byte body after refused reload")
    # SIGTERM with a chat pending: the chat is answered (504 at its
    # deadline, shorter than drain_ms), then the edge exits 0.
    got = []
    t = threading.Thread(target=lambda: got.append(
        e.post("/v1/bot/chat", GOOD, AUTH)))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    done(e)
    dt = time.monotonic() - t0
    t.join(5)
    h.check(got, "no answer to the chat pending at SIGTERM")
    h.check_error_shape(got[0], 504, 5040, "chat pending at SIGTERM")
    h.check(dt < 3, "exit %.1fs after SIGTERM" % dt)


if __name__ == "__main__":
    try:
        h.main(globals())
    finally:
        for e in list(_edges):
            e.cleanup()
