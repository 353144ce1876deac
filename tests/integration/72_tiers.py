# SPDX-License-Identifier: ISC
"""72: degradation tiers L1/L2/L3 from measured signals (docs/tiers.md).

- L2: PostgreSQL is stopped; storage's HEALTH says so and within a few
  seconds /readyz answers 200 {"status":"ready","tier":"L2"} with the
  cause, /metrics shows troupe_dispatcher_tier 2 and the dispatcher's
  journal has one line for the change.  PostgreSQL comes back: the
  condition clears at once (troupe_dispatcher_tier_condition{tier="L2"}
  0) but the tier stays L2 for tier_leave_ms (the hysteresis, seen from
  outside), then /readyz says L0 again.
- L3: a slow simulator and one worker child holding two runs fill the
  run queue past its high mark: /readyz answers 503 {"status":"degraded",
  "tier":"L3"} with Retry-After; a new chat (v1 and v3) is answered 503
  with Retry-After at once (well under a second, never a timeout); the
  runs already taken still finish; the tier goes back to L0 after.
- L1: the eBPF probes see a stress-ng load (CPU hogs pinned beside
  Troupe's processes on CPU 0, and in a cgroup telemetry follows as
  service "stress", as in 42_ebpf.py); telemetry's SLA signal breaches
  (run-queue p99 over the window above [telemetry] sla_runq_p99_us) and
  the dispatcher enters L1; it leaves when the load ends.  Needs root
  and BPF: without them it prints why and skips.
"""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import harness as h

ENTER_MS = 1000
LEAVE_MS = 4000


def tier_conf(**extra):
    """Short tier timers; the eBPF probes off (so no SLA signal: the
    machine is shared, and a neighbour's load would bring L1) unless the
    test turns them on."""
    c = {"dispatcher": {"tier_enter_ms": ENTER_MS,
                        "tier_leave_ms": LEAVE_MS},
         "telemetry": {"ebpf": "off"}}
    for sec, kv in extra.items():
        c.setdefault(sec, {}).update(kv)
    return c


def start(conf, **kw):
    t = h.Troupe(conf=conf, **kw)
    try:
        t.start()
        t.add_bot()
    except BaseException:
        t.teardown()
        raise
    return t


def readyz(t):
    r = t.get("/readyz", timeout=5)
    try:
        body = json.loads(r.body)
    except ValueError:
        body = {}
    return r, body


def metrics(t):
    c = http.client.HTTPConnection("127.0.0.1", t.telemetry_port, timeout=10)
    try:
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()
    finally:
        c.close()


def metric(page, name, labels):
    """The value of name{...labels...} on the page, or None."""
    for line in page.splitlines():
        if not line.startswith(name + "{"):
            continue
        lb, _, v = line[len(name) + 1:].partition("} ")
        if all(('%s="%s"' % kv) in lb for kv in labels.items()):
            return float(v.split()[0])
    return None


def wait_tier(t, tier, timeout, what):
    """Poll /readyz until it says tier; returns (seconds, response,
    body)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            r, b = readyz(t)
        except OSError as e:
            last = e
        else:
            last = (r.status, b)
            if b.get("tier") == tier:
                return time.monotonic() - t0, r, b
        time.sleep(0.1)
    raise h.Failure("%s: /readyz not tier %s within %.0fs (last: %r)" %
                    (what, tier, timeout, last))


def test_l2_postgres_down_and_back():
    t = start(tier_conf(storage={"pg_timeout_ms": 1500}))
    try:
        r, b = readyz(t)
        h.eq(r.status, 200, "/readyz at start")
        h.eq(b, {"status": "ready", "tier": "L0"}, "/readyz body at start")
        # A chat first: storage then has the bot cached, and serves it
        # while PostgreSQL is down.
        h.eq(t.chat("before L2").status, 200, "a chat before L2")

        t.stop_pg()
        dt, r, b = wait_tier(t, "L2", 10, "PostgreSQL stopped")
        h.note("L2 shown %.1fs after PostgreSQL stopped: %s" % (dt, b))
        h.eq(r.status, 200, "/readyz in L2 (still ready)")
        h.eq(b.get("status"), "ready", "/readyz status in L2")
        h.check("postgres" in b.get("cause", ""),
                "L2 cause names postgres: %r" % b)
        # Chats go on (storage spools them: 31_pg_spool.py).
        h.eq(t.chat("in L2").status, 200, "a chat in L2")
        h.wait_for(lambda: metric(metrics(t), "troupe_dispatcher_tier",
                                  {"service": "dispatcher"}) == 2,
                   5, 0.2, "troupe_dispatcher_tier 2 on /metrics")
        h.check(re.search(r"tier: L0 -> L2: postgres down",
                          t.log("dispatcher")),
                "dispatcher journal line for L0 -> L2:\n%s" %
                h.tail(t.log_path("dispatcher"), 10))

        t.start_pg()
        t_back = time.monotonic()
        # The condition clears (storage reconnects, the spool drains)
        # while the tier holds: hysteresis.
        seen = []

        def cleared_but_held():
            p = metrics(t)
            c = metric(p, "troupe_dispatcher_tier_condition",
                       {"service": "dispatcher", "tier": "L2"})
            tier = metric(p, "troupe_dispatcher_tier",
                          {"service": "dispatcher"})
            seen[:] = [c, tier]
            return c == 0 and tier == 2
        try:
            h.wait_for(cleared_but_held, 15, 0.2, "L2 condition clear "
                       "while the tier holds")
        except h.Failure as e:
            raise h.Failure("%s (last condition, tier: %s)" % (e, seen))
        t_clear = time.monotonic()
        dt, r, b = wait_tier(t, "L0", LEAVE_MS / 1000 + 15,
                             "PostgreSQL back")
        held = time.monotonic() - t_clear
        h.note("L0 again %.1fs after PostgreSQL started, %.1fs after the "
               "condition cleared (tier_leave_ms %d)" %
               (time.monotonic() - t_back, held, LEAVE_MS))
        # Metrics lag up to ~2 s (1 s reports, our polling): allow it.
        h.check(held >= LEAVE_MS / 1000 - 2.5,
                "left L2 %.1fs after the condition cleared, before "
                "tier_leave_ms %d" % (held, LEAVE_MS))
        h.eq(r.status, 200, "/readyz after")
        h.eq(b, {"status": "ready", "tier": "L0"}, "/readyz body after")
        h.check(re.search(r"tier: L2 -> L0: L2 cleared for %d ms" %
                          LEAVE_MS, t.log("dispatcher")),
                "dispatcher journal line for L2 -> L0:\n%s" %
                h.tail(t.log_path("dispatcher"), 10))
        h.eq(t.chat("after L2").status, 200, "a chat after L2")
        t.check_exactly_once()
    finally:
        t.teardown()
    h.check(not t.problems, "teardown: %s" % t.problems)


def v3_start(t, query):
    """POST /v3/chat (stream); (status, headers, seconds)."""
    c = http.client.HTTPConnection("127.0.0.1", t.edge_port, timeout=30)
    body = {"bot_id": h.DEMO_BOT, "user_id": "u_tiers", "stream": True,
            "additional_messages": [{"role": "user", "content": query,
                                     "content_type": "text"}]}
    t0 = time.monotonic()
    try:
        c.request("POST", "/v3/chat", json.dumps(body).encode(),
                  {"Content-Type": "application/json",
                   "Authorization": "Bearer " + t.token()})
        r = c.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, \
            time.monotonic() - t0
    finally:
        c.close()


def test_l3_queue_pressure_sheds_at_once():
    t = start(tier_conf(dispatcher={"runs_per_worker": 2, "queue_max": 10,
                                    "tier_queue_high_pct": 50},
                        edge={"chat_timeout_ms": 40000}),
              workers_min=1, workers_max=1)
    slow = []
    lock = threading.Lock()

    def slow_chat(i):
        try:
            r = t.chat("slow %d [sim:delay=1500]" % i, timeout=60)
            st = r.status
        except Exception as e:          # noqa: BLE001
            st = repr(e)
        with lock:
            slow.append(st)
    try:
        r, b = readyz(t)
        h.eq(b.get("tier"), "L0", "tier before the load")
        # 2 run, 10 wait: the queue (10) is above the high mark (5).
        ths = [threading.Thread(target=slow_chat, args=(i,))
               for i in range(12)]
        for th in ths:
            th.start()
        dt, r, b = wait_tier(t, "L3", 8, "queue full")
        h.note("L3 after %.1fs: %s" % (dt, b))
        h.eq(r.status, 503, "/readyz in L3")
        h.eq(b.get("status"), "degraded", "/readyz status in L3")
        h.check("run queue" in b.get("cause", ""), "L3 cause: %r" % b)
        ra = r.headers.get("retry-after")
        h.check(ra is not None and int(ra) >= 1,
                "/readyz Retry-After in L3: %r" % ra)

        # New chats: 503 + Retry-After at once, never a timeout.
        t0 = time.monotonic()
        r = t.chat("shed me", timeout=10)
        dt = time.monotonic() - t0
        h.eq(r.status, 503, "v1 chat in L3")
        h.check_error_shape(r, 503, 5030, "v1 chat shed in L3")
        h.check(int(r.headers.get("retry-after", "0")) >= 1,
                "Retry-After of a shed v1 chat: %r" % r.headers)
        h.check(dt < 1.0, "v1 chat shed in %.2fs, not at once" % dt)
        st, hd, dt = v3_start(t, "shed me too")
        h.eq(st, 503, "v3 chat in L3")
        h.check(int(hd.get("retry-after", "0")) >= 1,
                "Retry-After of a shed v3 chat: %r" % hd)
        h.check(dt < 1.0, "v3 chat shed in %.2fs, not at once" % dt)
        # Health endpoints are never shed.
        h.eq(t.get("/healthz").status, 200, "/healthz in L3")

        for th in ths:
            th.join(60)
        h.note("slow chats: %s" % slow)
        # Every run taken was answered: 200, or 503 from the
        # dispatcher's own admission (queue full, or refused in L3);
        # never a 504 or a hang.
        h.check(all(s in (200, 503) for s in slow),
                "slow chats answered 200 or 503: %s" % slow)
        h.check(slow.count(200) >= 2, "at least the two running chats "
                "finished: %s" % slow)
        dt, r, b = wait_tier(t, "L0", LEAVE_MS / 1000 + 10, "queue drained")
        h.eq(r.status, 200, "/readyz after L3")
        h.eq(t.chat("after L3").status, 200, "a chat after L3")
        log = t.log("dispatcher")
        h.check(re.search(r"tier: L[0-2] -> L3: run queue \d+ of 10 above "
                          r"the high mark 5", log),
                "dispatcher journal line entering L3:\n%s" %
                h.tail(t.log_path("dispatcher"), 10))
        h.check(re.search(r"tier: L3 -> L[0-2]", log),
                "dispatcher journal line leaving L3")
        h.check(metric(metrics(t), "troupe_edge_shed_total",
                       {"service": "edge"}) >= 2,
                "troupe_edge_shed_total counts the shed chats")
    finally:
        t.teardown()
    h.check(not t.problems, "teardown: %s" % t.problems)


def bpf_reason():
    """Why the SLA test cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root (BPF needs CAP_BPF and CAP_PERFMON)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "no kernel BTF"
    if shutil.which("stress-ng") is None:
        return "stress-ng not installed"
    return None


def cgroup2():
    for line in open("/proc/self/mounts"):
        f = line.split()
        if f[2] == "cgroup2":
            return f[1]
    return None


def test_l1_sla_breach_under_stress():
    why = bpf_reason()
    if why:
        print("SKIP test_l1_sla_breach_under_stress: %s" % why, flush=True)
        return
    cg = cgroup2()
    root = None
    if cg:
        root = os.path.join(cg, "troupe-it-tiers-%d" % os.getpid())
        os.makedirs(os.path.join(root, "troupe-stress.service"),
                    exist_ok=True)
    tel = {"ebpf": "on", "sla_window_ms": 2000, "sla_runq_p99_us": 5000,
           "ebpf_pin_dir": ""}
    if root:
        tel["ebpf_cgroup_root"] = root
    t = start(tier_conf(telemetry=tel,
                        dispatcher={"tier_leave_ms": 3000}))
    st = None
    try:
        page = metrics(t)
        if metric(page, "troupe_ebpf_enabled",
                  {"service": "telemetry"}) != 1:
            m = re.search(r"eBPF probes off: (.*)", t.log("telemetry"))
            print("SKIP test_l1_sla_breach_under_stress: BPF not "
                  "permitted here: %s" % (m.group(1) if m else "?"),
                  flush=True)
            return
        h.check(re.search(r'troupe_sla_runq_threshold_seconds\{service='
                          r'"telemetry"\} 0\.005', page),
                "SLA threshold on /metrics")
        # Quiet first: no L1 from the SLA (the machine is shared; wait
        # for a calm spell rather than assume one).
        h.wait_for(lambda: readyz(t)[1].get("tier") == "L0", 20, 0.2,
                   "L0 before the load")

        # CPU hogs pinned to CPU 0 with Troupe's processes (their
        # threads then wait behind the hogs), in the stress cgroup.
        pids = [t.pid(s) for s in h.SERVICES] + t.worker_pids()
        for p in pids:
            subprocess.run(["taskset", "-a", "-p", "1", str(p)],
                           stdout=subprocess.DEVNULL, check=False)

        def enter():
            if root:
                with open(os.path.join(root, "troupe-stress.service",
                                       "cgroup.procs"), "w") as f:
                    f.write("0")
            h._child_setup()
        st = subprocess.Popen(["stress-ng", "--cpu", "4", "--cpu-method",
                               "int64", "--taskset", "0", "--timeout",
                               "40s", "--quiet"],
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, preexec_fn=enter)
        # A light chat load so Troupe's services wake up often.
        stop = threading.Event()

        def load():
            while not stop.is_set():
                try:
                    t.chat("sla", timeout=20)
                except Exception:       # noqa: BLE001
                    pass
                time.sleep(0.1)
        lt = threading.Thread(target=load)
        lt.start()
        try:
            dt, r, b = wait_tier(t, "L1", 25, "stress-ng running")
        finally:
            stop.set()
            lt.join(30)
        h.note("L1 after %.1fs: %s" % (dt, b))
        h.eq(r.status, 200, "/readyz in L1 (ready)")
        h.check(b.get("cause", "").startswith("SLA breach: "),
                "L1 cause is the SLA: %r" % b)
        page = metrics(t)
        breaching = sorted(
            m.group(1) for m in re.finditer(
                r'^troupe_sla_breach\{service="([^"]+)"\} 1$', page, re.M))
        p99 = {m.group(1): float(m.group(2)) * 1e3 for m in re.finditer(
            r'^troupe_sla_runq_p99_seconds\{service="([^"]+)"\} (\S+)$',
            page, re.M)}
        h.note("run-queue p99 (ms): %s; breaching: %s" % (
            ", ".join("%s %.1f" % kv for kv in sorted(p99.items())),
            breaching))
        ours = set(breaching) & {"edge", "auth", "dispatcher", "worker",
                                 "storage", "telemetry"}
        h.check(ours, "a Troupe service breaching its SLA (troupe_sla_"
                "breach 1), not only stress-ng: %s" % breaching)
        h.check(re.search(r"tier: L0 -> L1: SLA breach: ",
                          t.log("dispatcher")),
                "dispatcher journal line for L0 -> L1")
        st.send_signal(signal.SIGINT)
        st.wait(20)
        st = None
        for p in pids:
            subprocess.run(["taskset", "-a", "-p", "3", str(p)],
                           stdout=subprocess.DEVNULL, check=False)
        # The hogs are gone: their service has no events, so no breach.
        h.wait_for(lambda: metric(metrics(t), "troupe_sla_breach",
                                  {"service": "stress"}) == 0, 15, 0.5,
                   "troupe_sla_breach{service=\"stress\"} 0 after the load")
        # Back to L0 once no breach was seen for tier_leave_ms.  The
        # machine is shared: a neighbour's load can keep a Troupe
        # service above 5 ms now and then, and L1 then rightly holds;
        # that is noted, not failed (the unit test covers leaving).
        try:
            dt, r, b = wait_tier(t, "L0", 30, "stress-ng stopped")
            h.note("L0 again %.1fs after stress-ng stopped" % dt)
        except h.Failure as e:
            h.check("stress" not in str(e), "L1 held by stress-ng after "
                    "it stopped: %s" % e)
            h.note("L1 held by the machine's own noise after stress-ng "
                   "stopped: %s" % e)
    finally:
        if st is not None:
            st.kill()
            st.wait()
        t.teardown()
        if root:
            for d in (os.path.join(root, "troupe-stress.service"), root):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
    h.check(not t.problems, "teardown: %s" % t.problems)


if __name__ == "__main__":
    h.main(globals())
