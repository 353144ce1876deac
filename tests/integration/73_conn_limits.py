# SPDX-License-Identifier: ISC
"""73: troupe-edge's per-client-address connection limits (issue 7).

The edge (with telemetry, for its metrics) and clients from two loopback
addresses: 127.0.0.1 plays the greedy client, 127.0.0.2 everybody else.

- `[edge] max_conns_per_addr` = N: N connections from 127.0.0.1 are
  served, the next one is answered at once with 503 (code 5030,
  Retry-After, Connection: close) and closed, while 127.0.0.2 still gets
  /healthz 200; closing one of the N lets a new one in; one warning with
  the address in the log, not one per refusal; the refusal metric moves.
- `conn_rate_per_addr` / `conn_burst_per_addr` (set by SIGHUP): a burst of
  new connections from 127.0.0.1 is cut after the burst, 127.0.0.2 is
  not, and 127.0.0.1 is let in again once its bucket refills.
- both 0 (SIGHUP): no limit at all.
"""
import http.client
import os
import signal
import socket
import time

import harness as h

GREEDY = "127.0.0.1"
OTHER = "127.0.0.2"
N = 4


def cluster():
    return h.troupe(conf={"edge": {"max_conns_per_addr": N,
                                   "conn_rate_per_addr": 0}},
                    services=["telemetry", "edge"])


def reload(t, **kw):
    t.conf_over.setdefault("edge", {}).update(kw)
    t.write_config()
    before = t.log("edge").count("config re-read")
    os.kill(t.pid("edge"), signal.SIGHUP)
    h.wait_for(lambda: t.log("edge").count("config re-read") > before,
               5, 0.05, "troupe-edge reloaded")


def connect(t, src):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((src, 0))
    s.connect(("127.0.0.1", t.edge_port))
    return s


def read_all(s):
    buf = b""
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return buf, "reset"
        except socket.timeout:
            return buf, "timeout"
        if not b:
            return buf, "eof"
        buf += b


def healthz_on(s):
    """GET /healthz on an open keep-alive socket; the status or None."""
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf or not buf.endswith(b"}"):
            b = s.recv(4096)
            if not b:
                break
            buf += b
    except OSError:
        return None
    rs = h.parse_responses(buf)
    return rs[0].status if rs else None


def healthz_from(t, src):
    """/healthz on a fresh connection from src: the status, or 'closed'
    (refused before an answer could be read)."""
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=5,
                                   source_address=(src, 0))
    try:
        c.request("GET", "/healthz")
        r = c.getresponse()
        body = r.read()
        return r.status, r, body
    except (OSError, http.client.HTTPException):
        return "closed", None, b""
    finally:
        c.close()


def metric(t, reason):
    c = http.client.HTTPConnection("127.0.0.1", t.telemetry_port,
                                   timeout=5)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    for ln in text.splitlines():
        if (ln.startswith("troupe_edge_refused_connections_total{") and
                'reason="%s"' % reason in ln):
            return float(ln.rsplit(" ", 1)[1])
    return 0.0


def check_refusal(buf, how, what):
    """buf: what a refused connection read before it was closed."""
    h.check(how in ("eof", "reset"), "%s: closed by the edge (got %s)" % (
        what, how))
    rs = h.parse_responses(buf)
    h.eq(len(rs), 1, "%s: one answer (raw %r)" % (what, buf[:300]))
    r = rs[0]
    h.eq(r.status, 503, "%s: status" % what)
    h.eq(r.headers.get("retry-after"), "1", "%s: Retry-After" % what)
    h.eq(r.headers.get("connection", "").lower(), "close",
         "%s: Connection" % what)
    h.check(r.json is not None, "%s: a JSON body (raw %r)" % (
        what, buf[:400]))
    body = r.json
    h.eq(body.get("code"), 5030, "%s: code" % what)
    h.check(body.get("msg"), "%s: a message" % what)
    h.check(len(r.headers.get("x-tt-logid", "")) == 32,
            "%s: X-Tt-Logid" % what)


def test_max_conns_per_addr():
    t = cluster()
    before = metric(t, "per_addr_conns")
    held = [connect(t, GREEDY) for _ in range(N)]
    for i, s in enumerate(held):
        h.eq(healthz_on(s), 200, "connection %d of %d" % (i + 1, N))
    # N+1: refused at once, before it says anything.
    s = connect(t, GREEDY)
    buf, how = read_all(s)
    s.close()
    check_refusal(buf, how, "connection %d from %s" % (N + 1, GREEDY))
    # Again, with a request sent: a 503 or a bare close, never served.
    st, _, _ = healthz_from(t, GREEDY)
    h.check(st in (503, "closed"), "a request on connection %d from %s: "
            "503 or closed, got %s" % (N + 1, GREEDY, st))
    # Another address is not affected.
    for i in range(2 * N):
        st, _, _ = healthz_from(t, OTHER)
        h.eq(st, 200, "/healthz %d from %s" % (i + 1, OTHER))
    keep = [connect(t, OTHER) for _ in range(N - 1)]
    for s in keep:
        h.eq(healthz_on(s), 200, "a held connection from %s" % OTHER)
    # Closing one of the N lets a new one in (once the edge saw the EOF).
    held.pop().close()
    got = []

    def again():
        s = connect(t, GREEDY)
        st = healthz_on(s)
        if st == 200:
            held.append(s)
        else:
            s.close()
        got.append(st)
        return st == 200
    h.wait_for(again, 5, 0.05, "a new connection from %s after a close "
               "(got %s)" % (GREEDY, got[-5:]))
    s = connect(t, GREEDY)
    buf, how = read_all(s)
    s.close()
    check_refusal(buf, how, "over the limit again")
    # One warning with the address, not one per refusal.
    h.wait_for(lambda: metric(t, "per_addr_conns") >= before + 3, 5, 0.1,
               "troupe_edge_refused_connections_total"
               "{reason=\"per_addr_conns\"} moved by 3 (now %s)" %
               metric(t, "per_addr_conns"))
    n = t.log("edge").count("%s: refusing new connections" % GREEDY)
    h.eq(n, 1, "warnings about %s in the edge log" % GREEDY)
    for s in held + keep:
        s.close()


def test_conn_rate_per_addr():
    t = cluster()
    reload(t, max_conns_per_addr=0, conn_rate_per_addr=5,
           conn_burst_per_addr=10)
    time.sleep(2.5)                 # both buckets full again
    before = metric(t, "per_addr_rate")
    t0 = time.monotonic()
    res = [healthz_from(t, GREEDY)[0] for _ in range(40)]
    took = time.monotonic() - t0
    ok = res.count(200)
    h.check(ok >= 10, "a burst of 10 is let in (%d of 40 were: %s)" % (
        ok, res))
    h.check(ok <= 10 + 5 * took + 1, "at most the burst + 5/s over %.2f s "
            "(%d of 40 were let in: %s)" % (took, ok, res))
    h.check(all(r in (200, 503, "closed") for r in res),
            "every other one refused (%s)" % res)
    # A refused one, read before sending: the 503 JSON.
    s = connect(t, GREEDY)
    buf, how = read_all(s)
    s.close()
    check_refusal(buf, how, "over the rate")
    # The other address has its own bucket.
    res2 = [healthz_from(t, OTHER)[0] for _ in range(10)]
    h.eq(res2, [200] * 10, "10 new connections from %s" % OTHER)
    h.wait_for(lambda: metric(t, "per_addr_rate") >= before + 20, 5, 0.1,
               "troupe_edge_refused_connections_total"
               "{reason=\"per_addr_rate\"} moved (now %s, was %s)" % (
                   metric(t, "per_addr_rate"), before))
    # Refilled at 5/s: in again within a second.
    time.sleep(0.5)
    h.wait_for(lambda: healthz_from(t, GREEDY)[0] == 200, 2, 0.1,
               "%s let in again after its bucket refilled" % GREEDY)


def test_off():
    t = cluster()
    reload(t, max_conns_per_addr=0, conn_rate_per_addr=0)
    held = [connect(t, GREEDY) for _ in range(3 * N)]
    for i, s in enumerate(held):
        h.eq(healthz_on(s), 200, "connection %d with no limit" % (i + 1))
    res = [healthz_from(t, GREEDY)[0] for _ in range(40)]
    h.eq(res, [200] * 40, "40 new connections with no limit")
    for s in held:
        s.close()


if __name__ == "__main__":
    h.main(globals())
