# SPDX-License-Identifier: ISC
"""61: Troupe under a real systemd, from its .deb, in a container.

PID 1 on the build machines is not systemd, so this test boots one: a
fresh Debian 12 root made by mmdebstrap (minbase, systemd, dbus,
redis-server, postgresql and the libraries the .deb depends on; cached
in <build>/nspawn/root, rebuilt only when missing or when its package
list changes) booted by systemd-nspawn with a private network and a
volatile overlay (the cached root is never written).  Then, inside:
- `cpack -G DEB` from the build directory, `dpkg -i` of the package, the
  PostgreSQL role and database the packaged config expects, the upstream
  simulator as a transient unit, the demo bot added with troupectl run as
  user troupe, `systemctl start troupe.target`;
- a chat succeeds (HTTP from this process, in the container's network
  namespace, to 127.0.0.1:8080, with a JWT signed with the container's
  /etc/troupe/jwt-secret);
- `journalctl -u troupe-edge -o json` has SERVICE, PRIORITY and, for a
  request, REQUEST_ID, TRACE_ID and BOT_ID; no line is there twice;
- `systemctl kill -s KILL` of each service: systemd restarts it and chats
  succeed again; SIGSTOP of every service: the watchdog kills and
  restarts each one;
- under a continuous chat load (threads sending /v1/bot/chat in a loop,
  half on keep-alive connections, half on a fresh connection each),
  `systemctl reload` then `systemctl restart` of each service in turn
  must cost no request: the numbers sent and failed are printed per
  step, and any failure fails the test with what the client saw and the
  journal of that moment; the upstream answers after 50 ms, so restarts
  meet runs in flight, and the dispatcher's workers must be told to stop
  once only (or they abandon their runs).

It needs root, systemd-nspawn and mmdebstrap (Debian packages
systemd-container and mmdebstrap), and network access to the machine's
Debian mirror the first time (to build the root); without them it fails
with a message, never skips.  About 40 s with a cached root (boot ~2.5
s), plus 25-45 s to build one and ~5 s for cpack.  TROUPE_TEST_KEEP=1
leaves the container running (its leader's pid is printed) for a look
around.
Python 3 standard library; uses harness.py's checks and JWT maker.
"""
import atexit
import ctypes
import glob
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import harness as h

SERVICES = ["telemetry", "storage", "auth", "dispatcher", "edge"]
NSPAWN_DIR = os.path.join(h.BUILD, "nspawn")
ROOT = os.path.join(NSPAWN_DIR, "root")
# What the root holds beyond minbase, besides every package the .deb
# depends on (its Depends line; the container has no network to fetch
# them at install time).
PACKAGES = ["systemd", "systemd-sysv", "dbus", "procps", "redis-server",
            "postgresql"]
DEB_IN_CT = "/srv/troupe-test/troupe.deb"
SIM = "127.0.0.1:9090"
# Every upstream call takes this long, so that restarts meet runs in
# flight in the workers.
SIM_LATENCY_MS = 50
EDGE_PORT = 8080
KEEP = os.environ.get("TROUPE_TEST_KEEP") == "1"
CLONE_NEWNET = 0x40000000

_tmp = tempfile.mkdtemp(prefix="troupe-61-")
if not KEEP:
    atexit.register(shutil.rmtree, _tmp, True)
_libc = ctypes.CDLL(None, use_errno=True)


class Container:
    """The booted container: its nspawn process and its leader (PID 1)."""
    nspawn = None
    leader = None
    secret = None
    token = None
    timings = {}


CT = Container()


def run(argv, timeout=60, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise h.Failure("%s: exit %d:\n%s%s" % (
            " ".join(argv), r.returncode, r.stdout[-3000:],
            r.stderr[-3000:]))
    return r


def need_up():
    h.check(CT.token, "no Troupe in a container: the set-up failed")


def ct(*argv, timeout=60, check=True):
    """Run a command inside the container (every namespace of PID 1)."""
    h.check(CT.leader, "the container is not running")
    return run(["nsenter", "-t", str(CT.leader), "-m", "-u", "-i", "-n",
                "-p", "-C", "-r", "-w", "--"] + list(argv),
               timeout=timeout, check=check)


def unit_prop(svc, prop):
    return ct("systemctl", "show", "-p", prop, "--value",
              "troupe-%s.service" % svc).stdout.strip()


# ---------------------------------------------------------------- set-up

def need_tools():
    h.check(os.geteuid() == 0, "61_systemd needs root (systemd-nspawn, "
            "mmdebstrap); CI runs as root")
    for tool, pkg in (("systemd-nspawn", "systemd-container"),
                      ("mmdebstrap", "mmdebstrap"), ("cpack", "cmake"),
                      ("nsenter", "util-linux")):
        h.check(shutil.which(tool), "61_systemd needs %s (Debian package "
                "%s; ./troupe deps installs it)" % (tool, pkg))


def mirrors():
    """The machine's own apt sources, as mmdebstrap takes them."""
    out = sorted(glob.glob("/etc/apt/sources.list.d/*.sources") +
                 glob.glob("/etc/apt/sources.list.d/*.list"))
    try:
        with open("/etc/apt/sources.list") as f:
            if re.search(r"^\s*deb\s", f.read(), re.M):
                out.append("/etc/apt/sources.list")
    except OSError:
        pass
    return out or ["http://deb.debian.org/debian"]


def deb_depends(deb):
    """The package names in the .deb's Depends (first alternatives)."""
    dep = run(["dpkg-deb", "-f", deb, "Depends"]).stdout.strip()
    return [d.split("|")[0].split("(")[0].strip()
            for d in dep.split(",") if d.strip()]


def build_root(deb):
    """The cached root, made by mmdebstrap when missing or stale."""
    stamp = os.path.join(NSPAWN_DIR, "root.stamp")
    pkgs = sorted(set(PACKAGES) | set(deb_depends(deb)))
    want = " ".join(pkgs) + "\n"
    try:
        with open(stamp) as f:
            if f.read() == want and os.path.isdir(os.path.join(ROOT, "etc")):
                h.note("root: cached in %s" % ROOT)
                return
    except OSError:
        pass
    os.makedirs(NSPAWN_DIR, exist_ok=True)
    tmp = ROOT + ".tmp"
    for d in (ROOT, tmp):
        shutil.rmtree(d, ignore_errors=True)
    if os.path.exists(stamp):
        os.unlink(stamp)
    t0 = time.monotonic()
    log = os.path.join(NSPAWN_DIR, "mmdebstrap.log")
    with open(log, "w") as f:
        r = subprocess.run(
            ["mmdebstrap", "--variant=minbase",
             "--include=" + ",".join(pkgs),
             "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
             "bookworm", tmp] + mirrors(),
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            timeout=240)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise h.Failure("mmdebstrap: exit %d (mirrors %s):\n%s" % (
            r.returncode, mirrors(), h.tail(log, 30)))
    os.rename(tmp, ROOT)
    with open(stamp, "w") as f:
        f.write(want)
    CT.timings["root build"] = time.monotonic() - t0
    h.note("root: built in %.1fs (%s)" % (CT.timings["root build"], ROOT))


def make_deb():
    cfg = os.path.join(h.BUILD, "CPackConfig.cmake")
    h.check(os.path.exists(cfg), "no %s: configure the build first" % cfg)
    out = os.path.join(_tmp, "cpack")
    t0 = time.monotonic()
    run(["cpack", "-G", "DEB", "--config", cfg, "-B", out], timeout=120,
        cwd=h.BUILD)
    debs = glob.glob(os.path.join(out, "troupe_*_amd64.deb"))
    h.check(len(debs) == 1, "cpack made %s" % os.listdir(out))
    h.note("cpack: %s in %.1fs" % (os.path.basename(debs[0]),
                                   time.monotonic() - t0))
    return debs[0]


def boot(deb):
    log = os.path.join(_tmp, "nspawn.log")
    t0 = time.monotonic()
    with open(log, "wb") as f:
        CT.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", ROOT, "--boot", "--register=no",
             "--keep-unit", "--console=read-only", "--volatile=overlay",
             "--private-network", "--machine=troupe-61",
             # troupe-telemetry's eBPF probes (PLATFORM.md)
             "--capability=CAP_BPF,CAP_PERFMON",
             "--system-call-filter=bpf perf_event_open",
             "--bind-ro=%s:%s" % (deb, DEB_IN_CT)],
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            preexec_fn=None if KEEP else h._child_setup)
    atexit.register(shutdown)

    def leader():
        h.check(CT.nspawn.poll() is None, "systemd-nspawn exited %s:\n%s" %
                (CT.nspawn.returncode, h.tail(log, 30)))
        r = run(["pgrep", "-P", str(CT.nspawn.pid), "-x", "systemd"],
                check=False)
        return int(r.stdout.split()[0]) if r.stdout.strip() else None
    CT.leader = h.wait_for(leader, timeout=20, what="the container's "
                           "systemd")

    def booted():
        s = ct("systemctl", "is-system-running", check=False).stdout.strip()
        h.check(s not in ("stopping", "offline"), "container: " + s)
        return s in ("running", "degraded")
    h.wait_for(booted, timeout=60, interval=0.1, what="the boot")
    CT.timings["boot"] = time.monotonic() - t0
    failed = ct("systemctl", "--failed", "--no-legend", "--plain").stdout
    h.note("booted systemd %s in %.1fs (leader pid %d)%s" % (
        ct("systemctl", "--version").stdout.split()[1],
        CT.timings["boot"], CT.leader,
        "; failed units: " + failed.replace("\n", " ") if failed else ""))
    # This process (and every thread it starts) now talks to the
    # container's loopback: only 127.0.0.1 inside is ever targeted.
    fd = os.open("/proc/%d/ns/net" % CT.leader, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise h.Failure("setns(net): %s" %
                            os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


def shutdown():
    p = CT.nspawn
    if p is None or p.poll() is not None:
        return
    if KEEP:
        print("TROUPE_TEST_KEEP=1: container left running, leader pid %d "
              "(nsenter -t %d -a; systemctl poweroff to stop)" %
              (CT.leader, CT.leader), flush=True)
        return
    try:
        ct("systemctl", "poweroff", "--no-block", timeout=10, check=False)
        p.wait(timeout=30)
    except Exception:                   # noqa: BLE001
        p.kill()
        p.wait()


def sanitized():
    return h.sanitized()


def install():
    t0 = time.monotonic()
    r = ct("dpkg", "-i", DEB_IN_CT, timeout=120)
    h.check("troupe.target" in ct("systemctl", "list-unit-files",
                                  "troupe.target").stdout,
            "troupe.target not installed:\n" + r.stdout)
    h.eq(ct("systemctl", "is-enabled", "troupe.target",
            check=False).stdout.strip(), "enabled", "troupe.target enabled")
    if sanitized():
        # LeakSanitizer stops the world with ptrace at exit, which the
        # units' SystemCallFilter= refuses ("LeakSanitizer has
        # encountered a fatal error"): leaks are checked by every other
        # test; here ASan and UBSan still check each access.  The drop-in
        # on the "troupe-" prefix reaches every troupe-*.service.
        ct("mkdir", "-p", "/etc/systemd/system/troupe-.service.d")
        ct("sh", "-c", "printf '[Service]\\nEnvironment=ASAN_OPTIONS="
           "detect_leaks=0\\n' > /etc/systemd/system/troupe-.service.d/"
           "61-asan.conf")
        ct("systemctl", "daemon-reload")
        h.note("sanitizer build: detect_leaks=0 in the units")
    ct("runuser", "-u", "postgres", "--", "createuser", "troupe")
    ct("runuser", "-u", "postgres", "--", "createdb", "-O", "troupe",
       "troupe")
    ct("systemd-run", "--unit=troupe-test-upstream-sim",
       "--property=Restart=always", "--property=DynamicUser=yes",
       "/usr/bin/troupe-upstream-sim", "--listen", SIM, "--latency-ms",
       str(SIM_LATENCY_MS))
    ct("systemctl", "start", "troupe.target", timeout=90)
    for s in SERVICES:
        h.eq(unit_prop(s, "ActiveState"), "active", "troupe-%s" % s)

    def bot():
        r = ct("runuser", "-u", "troupe", "--", "troupectl", "bot", "add",
               h.DEMO_BOT, "--upstream", "http://" + SIM, check=False)
        return r.returncode == 0
    h.wait_for(bot, timeout=20, interval=0.3, what="troupectl bot add")
    CT.secret = ct("cat", "/etc/troupe/jwt-secret").stdout.strip()
    h.check(len(CT.secret) >= 32, "short secret %r" % CT.secret)
    CT.token = h.jwt(CT.secret)
    CT.timings["install"] = time.monotonic() - t0
    h.note("installed, database made, troupe.target started, bot added "
           "in %.1fs" % CT.timings["install"])


# ---------------------------------------------------------------- chats

def chat(conn=None, query="Hello from 61_systemd", timeout=35):
    """One /v1/bot/chat; returns (status, body, logid) or raises OSError
    or http.client.HTTPException."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", EDGE_PORT,
                                           timeout=timeout)
    try:
        c.request("POST", "/v1/bot/chat", json.dumps(
            {"bot_id": h.DEMO_BOT, "user_id": "u_61", "query": query}),
            {"Authorization": "Bearer " + CT.token,
             "Content-Type": "application/json"})
        r = c.getresponse()
        b = r.read()
        return r.status, b, r.getheader("X-Tt-Logid")
    finally:
        if own:
            c.close()


def chat_ok(what, timeout=15):
    """Chats until one is 200 (at most timeout s); returns the tries."""
    n = [0]
    last = [None]

    def one():
        n[0] += 1
        try:
            st, b, _ = chat(timeout=10)
        except (OSError, http.client.HTTPException) as e:
            last[0] = repr(e)
            return False
        last[0] = "%d %s" % (st, b[:200])
        return st == 200 and json.loads(b)["code"] == 0
    try:
        h.wait_for(one, timeout=timeout, interval=0.2, what=what)
    except h.Failure:
        raise h.Failure("%s: no chat succeeded in %ds (%d tries), last: %s"
                        % (what, timeout, n[0], last[0]))
    return n[0]


class Load:
    """Threads sending /v1/bot/chat in a loop; half keep their connection
    (and, like curl, resend once on a fresh one when a reused connection
    turns out closed before any byte of the answer), half open one per
    request.  Every outcome is counted; a failure keeps what was seen."""

    def __init__(self, threads=8, pause=0.004):
        self.lock = threading.Lock()
        self.sent = self.ok = self.failed = self.stale = 0
        self.errors = []
        self.stop = threading.Event()
        self.pause = pause
        self.threads = [threading.Thread(target=self.loop, args=(i % 2,),
                                         daemon=True)
                        for i in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def snapshot(self):
        with self.lock:
            return (self.sent, self.failed, self.stale, len(self.errors))

    def count(self, ok, err=None, stale=False):
        with self.lock:
            self.sent += 1
            if stale:
                self.stale += 1
            if ok:
                self.ok += 1
            else:
                self.failed += 1
                if len(self.errors) < 1000:
                    self.errors.append("%s %s" % (
                        time.strftime("%H:%M:%S"), err))

    def loop(self, keepalive):
        conn = None
        reused = False
        n = 0
        while not self.stop.is_set():
            n += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", EDGE_PORT,
                                                  timeout=35)
                reused = False
            stale = False
            try:
                try:
                    st, b, logid = chat(conn, query="load %d" % n)
                except (ConnectionError, http.client.RemoteDisconnected,
                        http.client.BadStatusLine) as e:
                    if not reused:
                        raise
                    # The server closed a kept-alive connection before
                    # it read this request: send it again, once.
                    stale = True
                    conn.close()
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", EDGE_PORT, timeout=35)
                    reused = False
                    st, b, logid = chat(conn, query="load %d again (%r)"
                                        % (n, e))
                ok = st == 200
                self.count(ok, None if ok else "HTTP %d %s (logid %s)" %
                           (st, b[:300], logid), stale)
                reused = True
            except (OSError, http.client.HTTPException) as e:
                self.count(False, "%s%r" % ("after a stale connection: "
                                            if stale else "", e), stale)
                conn.close()
                conn = None
            if not keepalive and conn is not None:
                conn.close()
                conn = None
            elif conn is not None and conn.sock is None:
                conn = None             # the server said Connection: close
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(40)


# ---------------------------------------------------------------- tests

def test_boot_install_start():
    need_tools()
    t0 = time.monotonic()
    deb = make_deb()
    build_root(deb)
    boot(deb)
    install()
    n = chat_ok("the first chat")
    st, b, logid = chat()
    h.eq(st, 200, "chat: %s" % b[:300])
    d = json.loads(b)
    h.eq(d["code"], 0, "chat code")
    h.check(d["data"]["answer"].startswith("sim:"),
            "answer not from the simulator: %r" % d["data"])
    h.note("a chat answered 200 (logid %s; %d tries for the first); set-up "
           "%.1fs" % (logid, n, time.monotonic() - t0))


def journal(unit, *extra):
    r = ct("journalctl", "-u", unit, "-o", "json", "--no-pager",
           *extra, timeout=30)
    return [json.loads(line) for line in r.stdout.splitlines() if line]


def test_journal_fields():
    need_up()
    # Per-request lines are debug: turn that on the way an operator
    # would (a drop-in), restart the edge, make a request.
    d = "/run/systemd/system/troupe-edge.service.d"
    ct("mkdir", "-p", d)
    ct("sh", "-c", "printf '[Service]\\nEnvironment=TROUPE_LOG_LEVEL=debug"
       "\\n' > %s/61-debug.conf" % d)
    ct("systemctl", "daemon-reload")
    ct("systemctl", "restart", "troupe-edge")
    chat_ok("a chat after the edge restarted at debug level")
    st, b, logid = chat()
    h.eq(st, 200, "chat")
    ct("journalctl", "--sync")
    recs = journal("troupe-edge")
    ct("rm", "-rf", d)
    ct("systemctl", "daemon-reload")
    ct("systemctl", "restart", "troupe-edge")
    own = [r for r in recs if r.get("SYSLOG_IDENTIFIER") == "troupe-edge"]
    h.check(own, "no troupe-edge lines in the journal: %r" % recs[-5:])
    for r in own:
        h.eq(r.get("_TRANSPORT"), "journal",
             "transport of %r" % r.get("MESSAGE"))
        h.eq(r.get("SERVICE"), "edge", "SERVICE of %r" % r.get("MESSAGE"))
        h.check(r.get("PRIORITY") in ("3", "4", "6", "7"),
                "PRIORITY of %r: %r" % (r.get("MESSAGE"), r.get("PRIORITY")))
    ready = [r for r in own if r["MESSAGE"].startswith("ready:")]
    h.check(ready, "no ready: line")
    h.eq(ready[-1]["PRIORITY"], "6", "PRIORITY of the ready: line")
    for k in ("REQUEST_ID", "TRACE_ID", "BOT_ID"):
        h.check(k not in ready[-1], "%s on a line about no request: %r" %
                (k, ready[-1]))
    mine = [r for r in own if r.get("REQUEST_ID") == logid]
    h.check(mine, "no troupe-edge line with REQUEST_ID=%s; lines: %s" % (
        logid, [(r.get("MESSAGE"), r.get("REQUEST_ID")) for r in own[-8:]]))
    line = mine[-1]
    h.check(re.fullmatch(r"[0-9a-f]{32}", line.get("TRACE_ID", "")),
            "TRACE_ID of a request line: %r" % line)
    h.eq(line.get("BOT_ID"), h.DEMO_BOT, "BOT_ID of a request line")
    h.eq(line.get("PRIORITY"), "7", "PRIORITY of a debug line")
    seen = {}
    for r in recs:
        k = (r.get("_PID"), r.get("MESSAGE"), r.get("__REALTIME_TIMESTAMP"))
        h.check(k not in seen, "a line twice: %r and %r" % (seen.get(k), r))
        seen[k] = r
    # The same text from the same process in two transports (stderr
    # captured as well as sent to the journal) would be a duplicate too.
    texts = {}
    for r in own:
        k = (r.get("_PID"), r.get("MESSAGE"))
        texts.setdefault(k, set()).add(r.get("_TRANSPORT"))
    dup = [k for k, v in texts.items() if len(v) > 1]
    h.check(not dup, "lines both on stdout and in the journal: %r" % dup)
    h.note("journal: %d troupe-edge lines, none twice; %r has %s" % (
        len(own), line["MESSAGE"][:60], ", ".join(
            "%s=%s" % (k, line[k][:40]) for k in (
                "SERVICE", "PRIORITY", "REQUEST_ID", "TRACE_ID",
                "BOT_ID"))))


def wait_restarted(svc, old, timeout):
    def fresh():
        pid = unit_prop(svc, "MainPID")
        st = unit_prop(svc, "ActiveState")
        return pid not in ("", "0", old) and st == "active" and pid
    return h.wait_for(fresh, timeout=timeout, interval=0.1,
                      what="troupe-%s restarted (old pid %s)" % (svc, old))


def test_kill_restarts():
    need_up()
    for s in SERVICES:
        old = unit_prop(s, "MainPID")
        h.check(old not in ("", "0"), "troupe-%s has no main pid" % s)
        t0 = time.monotonic()
        ct("systemctl", "kill", "-s", "KILL", "troupe-%s" % s)
        new = wait_restarted(s, old, 15)
        dt = time.monotonic() - t0
        n = chat_ok("a chat after troupe-%s was SIGKILLed" % s)
        h.note("SIGKILL troupe-%-10s pid %s -> %s in %.1fs; chat ok after "
               "%d tries" % (s, old, new, dt, n))
        r = ct("journalctl", "-u", "troupe-%s" % s, "--no-pager", "-q",
               "-n", "300")
        h.check("signal=KILL" in r.stdout or "status=9/KILL" in r.stdout,
                "no KILL in troupe-%s's journal:\n%s" % (s, r.stdout))


def test_watchdog_restarts():
    need_up()
    old = {s: unit_prop(s, "MainPID") for s in SERVICES}
    t0 = time.monotonic()
    for s in SERVICES:
        ct("systemctl", "kill", "--kill-who=main", "-s", "STOP",
           "troupe-%s" % s)
    new = {s: wait_restarted(s, old[s], 30) for s in SERVICES}
    dt = time.monotonic() - t0
    n = chat_ok("a chat after the watchdog restarted every service")
    for s in SERVICES:
        r = ct("journalctl", "-u", "troupe-%s" % s, "--no-pager", "-q",
               "-n", "300")
        h.check("Watchdog timeout" in r.stdout,
                "troupe-%s: no watchdog timeout in its journal:\n%s" %
                (s, r.stdout))
    h.note("SIGSTOP of every service: all restarted by the watchdog "
           "within %.1fs (%s); chat ok after %d tries" % (
               dt, ", ".join("%s %s->%s" % (s, old[s], new[s])
                             for s in SERVICES), n))


def step(load, what, fn, settle=1.0):
    a = load.snapshot()
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 1))
    t0 = time.monotonic()
    fn()
    dt = time.monotonic() - t0
    time.sleep(settle)
    b = load.snapshot()
    return (what, b[0] - a[0], b[1] - a[1], b[2] - a[2], dt,
            load.errors[a[3]:b[3]][:5], since)


def test_reload_and_restart_under_load():
    need_up()
    load = Load().start()
    rows = []
    try:
        time.sleep(1.0)
        s0 = load.snapshot()
        h.check(s0[0] > 0 and s0[1] == 0, "the load does not run cleanly: "
                "%r %r" % (s0, load.errors[:5]))
        rows.append(step(load, "(nothing)", lambda: None))
        for s in SERVICES:
            pid = unit_prop(s, "MainPID")
            rows.append(step(load, "reload troupe-%s" % s, lambda s=s: ct(
                "systemctl", "reload", "troupe-%s" % s)))
            h.eq(unit_prop(s, "MainPID"), pid, "troupe-%s pid after reload"
                 % s)
            h.eq(unit_prop(s, "ActiveState"), "active",
                 "troupe-%s after reload" % s)
        for s in SERVICES:
            pid = unit_prop(s, "MainPID")
            rows.append(step(load, "restart troupe-%s" % s, lambda s=s: ct(
                "systemctl", "restart", "troupe-%s" % s, timeout=60),
                settle=1.5))
            h.check(unit_prop(s, "MainPID") != pid,
                    "troupe-%s not restarted" % s)
        pids = {s: unit_prop(s, "MainPID") for s in SERVICES}
        out = {}

        def roll():
            out["r"] = ct("troupectl", "roll", timeout=300)
        rows.append(step(load, "troupectl roll", roll, settle=1.5))
        done = [ln for ln in out["r"].stdout.splitlines()
                if "restarted, ready after" in ln]
        h.eq(len(done), len(SERVICES), "troupectl roll restarted every "
             "service: %r" % out["r"].stdout)
        for s in SERVICES:
            h.check(unit_prop(s, "MainPID") != pids[s],
                    "troupe-%s not restarted by troupectl roll" % s)
    finally:
        load.finish()
    h.note("%-28s %6s %6s %6s %8s" % ("step", "sent", "failed", "resent",
                                      "took"))
    for what, sent, failed, stale, dt, _, _ in rows:
        h.note("%-28s %6d %6d %6d %7.2fs" % (what, sent, failed, stale, dt))
    h.note("total: %d sent, %d ok, %d failed, %d resent on a fresh "
           "connection after a kept-alive one was closed" % (
               load.sent, load.ok, load.failed, load.stale))
    for r in rows:
        for e in r[5]:
            h.note("%s: failed: %s" % (r[0], e))
    bad = [r for r in rows if r[2] > 0]
    for row in bad[:2]:
        # The container's clock is the host's; its journal is in UTC.
        r = ct("env", "TZ=UTC", "journalctl", "-u", "troupe-*", "--no-pager",
               "-q", "--since", row[6], "-n", "40", check=False)
        h.note("journal from %s UTC (%s):\n%s" % (
            row[6], row[0], (r.stdout + r.stderr).rstrip()))
    # The dispatcher's restart: its workers must finish their runs, so
    # each must get one SIGTERM (from the dispatcher), not a second one
    # from systemd (KillMode=control-group signals the whole group; a
    # worker takes a second SIGTERM as "stop now").
    since = [w[6] for w in rows if w[0] == "restart troupe-dispatcher"][0]
    twice = ct("env", "TZ=UTC", "journalctl", "-u", "troupe-dispatcher",
               "--no-pager", "-q", "--since", since, "--grep",
               "again: stopping now", check=False).stdout.strip()
    problems = []
    if bad:
        problems.append("requests failed: %s" % ", ".join(
            "%s: %d of %d" % (w[0], w[2], w[1]) for w in bad))
    if twice:
        problems.append("workers were told twice to stop (by the "
                        "dispatcher and by systemd), so they did not "
                        "finish their runs:\n%s" % twice)
    h.check(not problems, "; ".join(problems))
    h.check(rows[-1][1] > 0, "no request went through")


def test_timings():
    for k, v in CT.timings.items():
        h.note("%-12s %.1fs" % (k, v))


h.main(globals())
