# SPDX-License-Identifier: ISC
"""Integration harness: starts a whole private Troupe and pokes at it.

Every tests/integration/NN_*.py imports this module, defines test_*
functions and ends with ``harness.main(globals())``.  The harness starts, in
a fresh temporary directory, a private Redis (unix socket + a free loopback
port, no persistence), a private PostgreSQL (copied from an initdb template
cached under the build directory; fsync stays on), troupe-upstream-sim, and
the services, each with NOTIFY_SOCKET pointing at a datagram socket the
harness reads, so it waits for every READY=1 (a timeout fails the test with
the service's log tail).  It offers HTTP helpers (http.client and raw
sockets for malformed requests), JWT makers (good and bad), fault
injection (kill, restart, stop/start Redis or PostgreSQL), psql queries and
process lookups, and always tears everything down (atexit, and every child
gets PR_SET_PDEATHSIG so that even a SIGKILLed test leaves nothing behind).

Binaries are found by name under $TROUPE_BUILD (set by CTest; default
<repo>/build).  Python 3 standard library only.  Everything listens on
127.0.0.1; nothing here may ever target another address.

It is also the launcher behind ``./troupe run``:
    python3 harness.py spawn --log F --pidfile P [--timeout S] -- CMD...
starts CMD detached, waits for its READY=1 and writes its pid.
"""

import atexit
import base64
import ctypes
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("TROUPE_BUILD") or os.path.join(TOP, "build")

SERVICES = ["telemetry", "storage", "auth", "dispatcher", "edge"]
BINARIES = {
    "edge": "troupe-edge",
    "auth": "troupe-auth",
    "dispatcher": "troupe-dispatcher",
    "worker": "troupe-worker",
    "storage": "troupe-storage",
    "telemetry": "troupe-telemetry",
    "upstream-sim": "troupe-upstream-sim",
    "troupectl": "troupectl",
}
# The demo bot of the issue and the README.
DEMO_BOT = "7392a8b4-xxxx-4f2c-b9d2-xxxxxxxxxxxx"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:", "SUMMARY: UndefinedBehaviorSanitizer")

VERBOSE = os.environ.get("TROUPE_TEST_VERBOSE") == "1"
# Services started here put the time on each log line (common/log.c), so
# a failure's log tails can be read against the test's own timeline.
os.environ.setdefault("TROUPE_LOG_TIME", "1")


class Failure(AssertionError):
    pass


def note(*a):
    print("   ", *a, flush=True)


def check(cond, msg):
    """Fail the running test with msg unless cond holds."""
    if not cond:
        raise Failure(msg)


def eq(got, want, what=""):
    """Fail with "what: got X, want Y" unless got == want."""
    if got != want:
        raise Failure("%s: got %r, want %r" % (what or "value", got, want))


def wait_for(fn, timeout=10.0, interval=0.05, what="condition"):
    """Call fn until it returns a true value; return that value or fail."""
    end = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:          # noqa: BLE001 (report the last one)
            last = e
        if time.monotonic() > end:
            raise Failure("timed out after %.1fs waiting for %s%s" %
                          (timeout, what, (": %r" % last) if last else ""))
        time.sleep(interval)


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup():
    # Own process group (so a kill reaches a service's children too) and
    # death with the harness, even when the harness is SIGKILLed.
    os.setpgid(0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port():
    """A loopback TCP port nobody listens on right now."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


_bin_cache = {}


def binary(kind):
    """Path of a Troupe program under the build directory, or fail."""
    name = BINARIES.get(kind, kind)
    if name in _bin_cache:
        return _bin_cache[name]
    found = None
    for root, dirs, files in os.walk(BUILD):
        dirs[:] = [d for d in dirs if d != "CMakeFiles" and
                   not d.startswith(".")]
        if name in files:
            p = os.path.join(root, name)
            if os.access(p, os.X_OK):
                found = p
                break
    if not found:
        raise Failure("program %s not found under %s (not built?)" %
                      (name, BUILD))
    _bin_cache[name] = found
    return found


def sanitized():
    """Whether TROUPE_BUILD is the AddressSanitizer build."""
    try:
        with open(os.path.join(BUILD, "CMakeCache.txt")) as f:
            return "TROUPE_SANITIZE:BOOL=ON" in f.read()
    except OSError:
        return False


_drive_n = [0]


def storage_drive(t, cmds, kind="worker", final_ms=10000):
    """Send cmds (dicts, JSON lines) to troupe-storage through
    storage_drive (tests/unit/services/storage/storage_drive.c) from a
    fresh mailbox named after kind ("worker", "auth", "troupectl", ...);
    the answers by reqid (default "r<i>").  Fails on a line that is
    neither an answer nor the final TIMEOUT."""
    _drive_n[0] += 1
    name = "%s-%d%03d" % (kind, os.getpid() % 1000, _drive_n[0])
    for i, c in enumerate(cmds):
        c.setdefault("reqid", "r%d" % i)
    inp = "".join(json.dumps(c) + "\n" for c in cmds)
    p = subprocess.run([binary("storage_drive"), "-c", t.conf_path,
                        "-n", name, "-t", str(final_ms)], input=inp,
                       capture_output=True, text=True, env=clean_env(),
                       timeout=final_ms / 1000 + 30)
    out = {}
    for ln in p.stdout.splitlines():
        j = json.loads(ln)
        if "reqid" in j:
            out[j["reqid"]] = j
        elif j.get("type") != "TIMEOUT":
            raise Failure("storage_drive: %s" % ln)
    return out


def clean_env(extra=None):
    """The environment for a child: ours minus Troupe/systemd settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TROUPE_", "LISTEN_"))
           and k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC",
                         "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")}
    env.setdefault("ASAN_OPTIONS",
                   "abort_on_error=1:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env.setdefault("LSAN_OPTIONS", "suppressions=%s:print_suppressions=0"
                   % os.path.join(os.path.dirname(os.path.dirname(
                       os.path.abspath(__file__))), "lsan.supp"))
    if extra:
        env.update(extra)
    return env


def tail(path, n=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return "(no log %s: %s)" % (path, e)
    return "\n".join(lines[-n:])


def spawn_notify(cmd, log, env=None, timeout=20.0, notify_path=None,
                 detach=False):
    """Start cmd with NOTIFY_SOCKET and wait for READY=1.

    detach: the ./troupe run case: a new session, no death signal, and
    our environment passed on (TROUPE_* overrides included).

    Returns (Popen, status text).  On early exit or timeout the process is
    killed and Failure raised with its log tail.
    """
    if notify_path is None:
        notify_path = os.path.join(tempfile.gettempdir(), "troupe-notify-%s"
                                   % uuid.uuid4().hex[:12])
    try:
        os.unlink(notify_path)
    except FileNotFoundError:
        pass
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    os.chmod(notify_path, 0o777)
    logf = open(log, "ab")
    try:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            env=(dict(os.environ, NOTIFY_SOCKET=notify_path) if detach else
                 clean_env({"NOTIFY_SOCKET": notify_path, **(env or {})})),
            preexec_fn=(os.setsid if detach else _child_setup),
            close_fds=True)
    finally:
        logf.close()
    status = ""
    ready = False
    end = time.monotonic() + timeout
    try:
        while not ready:
            left = end - time.monotonic()
            if left <= 0:
                break
            ns.settimeout(min(left, 0.1))
            try:
                data = ns.recv(4096).decode("utf-8", "replace")
            except socket.timeout:
                if p.poll() is not None:
                    break
                continue
            for line in data.splitlines():
                if line == "READY=1":
                    ready = True
                elif line.startswith("STATUS="):
                    status = line[7:]
    finally:
        # Unlink at once: sd_notify() blocks on a full datagram queue
        # (net.unix.max_dgram_qlen may be 10), so later notifications
        # must fail fast with ENOENT instead of piling up here.
        ns.close()
        try:
            os.unlink(notify_path)
        except FileNotFoundError:
            pass
    if not ready:
        rc = p.poll()
        if rc is None:
            p.kill()
            p.wait()
            why = "no READY=1 within %.0fs" % timeout
        else:
            why = "exited with status %d before READY=1" % rc
        raise Failure("%s: %s; log %s:\n%s" % (os.path.basename(cmd[0]),
                                              why, log, tail(log)))
    return p, status


def children_of(pid):
    """Pids whose parent is pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: split after the last ')'.
        fields = st[st.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d))
    return sorted(out)


def proc_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
        return st[st.rfind(")") + 2] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ JWT

def b64url(b):
    if isinstance(b, str):
        b = b.encode()
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(secret, sub="u_123456", ttl=3600, alg="HS256", now=None,
        claims=None, header=None, sign_alg=None, key=None):
    """An HS256 JWT; every part can be bent to make bad variants.

    claims: extra/overriding claims (value None removes the claim);
    header: extra/overriding header fields; sign_alg: HS256/HS384/HS512 or
    "none" (empty signature); key: sign with this key instead of secret.
    """
    now = int(time.time()) if now is None else now
    h = {"alg": alg, "typ": "JWT"}
    h.update(header or {})
    c = {"sub": sub, "iat": now, "exp": now + ttl}
    for k, v in (claims or {}).items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    signing = (b64url(json.dumps(h, separators=(",", ":"))) + "." +
               b64url(json.dumps(c, separators=(",", ":"))))
    sa = sign_alg or alg
    if sa == "none":
        return signing + "."
    dig = {"HS256": hashlib.sha256, "HS384": hashlib.sha384,
           "HS512": hashlib.sha512}[sa]
    k = key if key is not None else secret
    if isinstance(k, str):
        k = k.encode()
    sig = hmac.new(k, signing.encode(), dig).digest()
    return signing + "." + b64url(sig)


# ------------------------------------------------------------------ HTTP

class Response:
    def __init__(self, status, headers, body, closed=False):
        self.status = status
        self.headers = headers      # lower-case name -> value
        self.body = body
        self.closed = closed        # the server closed after it
        try:
            self.json = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError):
            self.json = None

    @property
    def code(self):
        return self.json.get("code") if isinstance(self.json, dict) else None

    @property
    def data(self):
        return self.json.get("data") if isinstance(self.json, dict) else None

    def __repr__(self):
        b = self.body[:400].decode("utf-8", "replace")
        return "<HTTP %s %s %r>" % (self.status, {
            k: v for k, v in self.headers.items()
            if k in ("x-tt-logid", "retry-after", "connection")}, b)


def parse_responses(raw):
    """Split raw bytes into Responses (Content-Length framing only)."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            break
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", len(rest)))
        if len(rest) < n:
            break                       # incomplete
        out.append(Response(int(parts[1]), hdrs, rest[:n]))
        raw = rest[n:]
    return out


def raw_request(port, data, timeout=5.0, half_close=False, pause=0.0,
                expect=None):
    """Send raw bytes (a bytes or a list of chunks) and read until the
    server closes, goes quiet for timeout, or (expect) that many complete
    responses arrived.  Returns (responses, closed, raw bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buf = b""
    closed = False
    try:
        chunks = data if isinstance(data, list) else [data]
        for c in chunks:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break
            if pause:
                time.sleep(pause)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not b:
                closed = True
                break
            buf += b
            if expect and len(parse_responses(buf)) >= expect:
                break
    finally:
        s.close()
    return parse_responses(buf), closed, buf


def http_request(port, method, path, body=None, headers=None, timeout=30.0):
    """One request on a fresh connection; returns a Response."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        h = {"Content-Type": "application/json"} if body is not None else {}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        b = r.read()
        hdrs = {}
        for k, v in r.getheaders():
            k = k.lower()
            hdrs[k] = (hdrs[k] + ", " + v) if k in hdrs else v
        return Response(r.status, hdrs, b, closed=r.will_close)
    finally:
        c.close()


def check_error_shape(r, status, code=None, what="error"):
    """r is a Troupe error: the status, the JSON shape of PRODUCT.md §2
    ({"code","msg","detail":{"logid"}}) and X-Tt-Logid matching detail."""
    if isinstance(status, (tuple, list, set)):
        check(r.status in status, "%s: status %s, want one of %s; %r" %
              (what, r.status, sorted(status), r))
    else:
        eq(r.status, status, "%s: status (%r)" % (what, r))
    j = r.json
    check(isinstance(j, dict), "%s: body is not a JSON object: %r" %
          (what, r))
    check(isinstance(j.get("code"), int) and j.get("code") != 0,
          "%s: code missing or 0: %r" % (what, r))
    if isinstance(code, (tuple, list, set)):
        check(j.get("code") in code, "%s: code %s, want one of %s; %r" %
              (what, j.get("code"), sorted(code), r))
    elif code is not None:
        eq(j.get("code"), code, "%s: code (%r)" % (what, r))
    check(isinstance(j.get("msg"), str), "%s: msg missing: %r" % (what, r))
    d = j.get("detail")
    check(isinstance(d, dict) and isinstance(d.get("logid"), str) and
          d.get("logid"), "%s: detail.logid missing: %r" % (what, r))
    lid = r.headers.get("x-tt-logid")
    check(lid, "%s: no X-Tt-Logid header: %r" % (what, r))
    eq(d["logid"], lid, "%s: detail.logid vs X-Tt-Logid" % what)


# ------------------------------------------------------------- PostgreSQL

def pg_bindir():
    for v in sorted(os.listdir("/usr/lib/postgresql"),
                    key=lambda s: [int(x) for x in s.split(".")
                                   if x.isdigit()], reverse=True):
        d = "/usr/lib/postgresql/%s/bin" % v
        if os.path.exists(os.path.join(d, "postgres")):
            return d
    raise Failure("no PostgreSQL server under /usr/lib/postgresql "
                  "(run ./troupe deps)")


def _pg_user():
    """(uid, gid) PostgreSQL must run as: postgres when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def _pg_popen(args, log, **kw):
    ug = _pg_user()
    extra = {}
    if ug:
        extra = {"user": ug[0], "group": ug[1], "extra_groups": []}
    logf = open(log, "ab")
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, preexec_fn=_child_setup,
                                cwd="/", env=clean_env(), **extra, **kw)
    finally:
        logf.close()


def _chown_pg(path):
    ug = _pg_user()
    if ug:
        os.chown(path, ug[0], ug[1])


class Postgres:
    """A private PostgreSQL: data dir copied from a cached template."""

    def __init__(self, root):
        self.root = root
        self.bindir = pg_bindir()
        self.data = os.path.join(root, "pg")
        self.sockdir = os.path.join(root, "pgsock")
        self.log = os.path.join(root, "log", "postgresql.log")
        self.port = free_port()
        self.proc = None

    def _template(self):
        ver = os.path.basename(os.path.dirname(self.bindir))
        tpl = os.path.join(BUILD, ".pg-template-%s" % ver)
        if os.path.exists(os.path.join(tpl, "PG_VERSION")):
            return tpl
        # initdb must write where the postgres user can reach, which the
        # build directory may not be (e.g. under /root): build in /tmp,
        # then copy into the build directory as root (cp -a keeps owners).
        work = tempfile.mkdtemp(prefix="troupe-pgtpl-")
        os.chmod(work, 0o755)
        d = os.path.join(work, "pg")
        os.mkdir(d, 0o700)
        _chown_pg(d)
        log = os.path.join(work, "initdb.log")
        p = _pg_popen([os.path.join(self.bindir, "initdb"), "-D", d,
                       "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-sync"], log)
        if p.wait() != 0:
            raise Failure("initdb failed:\n" + tail(log))
        # Create the role and database once, in the template.
        sock = os.path.join(work, "sock")
        os.mkdir(sock)
        _chown_pg(sock)
        port = free_port()
        p = _pg_popen([os.path.join(self.bindir, "postgres"), "-D", d,
                       "-k", sock, "-p", str(port), "-c",
                       "listen_addresses="], log)
        try:
            wait_for(lambda: self._sql_ok(sock, port, "postgres"), 30,
                     0.1, "template PostgreSQL")
            for q in ("CREATE ROLE troupe LOGIN",
                      "CREATE DATABASE troupe OWNER troupe"):
                self._psql(sock, port, "postgres", "postgres", q)
        finally:
            p.send_signal(signal.SIGINT)
            p.wait(30)
        part = "%s.tmp.%d" % (tpl, os.getpid())
        subprocess.run(["cp", "-a", d, part], check=True)
        try:
            os.rename(part, tpl)
        except OSError:         # another test process won the race
            shutil.rmtree(part, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        return tpl

    def _psql(self, sock, port, user, db, q):
        r = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-At",
             "-F", "\t", "-v", "ON_ERROR_STOP=1", "-h", sock, "-p",
             str(port), "-U", user, "-d", db, "-c", q],
            capture_output=True, text=True, env=clean_env(), timeout=30)
        if r.returncode != 0:
            raise Failure("psql %r: %s" % (q, r.stderr.strip()))
        return r.stdout

    def _sql_ok(self, sock, port, user):
        r = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-At", "-h", sock,
             "-p", str(port), "-U", user, "-d", "postgres", "-c",
             "select 1"], capture_output=True, text=True,
            env=clean_env(), timeout=10)
        return r.returncode == 0

    def init(self):
        tpl = self._template()
        subprocess.run(["cp", "-a", tpl, self.data], check=True)
        os.makedirs(self.sockdir, exist_ok=True)
        _chown_pg(self.sockdir)
        open(self.log, "ab").close()
        _chown_pg(self.log)

    def start(self, timeout=30):
        self.proc = _pg_popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data,
             "-k", self.sockdir, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
             "-c", "max_connections=50", "-c", "shared_buffers=32MB"],
            self.log)
        wait_for(lambda: self.proc.poll() is None and
                 self._sql_ok(self.sockdir, self.port, "troupe"),
                 timeout, 0.1, "PostgreSQL on port %d (log %s)" %
                 (self.port, self.log))

    def stop(self, mode=signal.SIGINT):
        """Stop: SIGINT is a fast shutdown, SIGQUIT an immediate one."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(mode)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def query(self, q):
        """Rows of q as lists of strings (psql -At)."""
        out = self._psql(self.sockdir, self.port, "troupe", "troupe", q)
        return [ln.split("\t") for ln in out.splitlines() if ln != ""]

    def conninfo(self):
        return "host=%s port=%d dbname=troupe user=troupe" % (
            self.sockdir, self.port)


class Redis:
    """A private Redis: unix socket + loopback port, no persistence."""

    def __init__(self, root):
        self.root = root
        self.sock = os.path.join(root, "redis.sock")
        self.port = free_port()
        self.log = os.path.join(root, "log", "redis.log")
        self.dir = os.path.join(root, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None

    def start(self, timeout=15):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--unixsocket", self.sock, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", self.dir,
                 "--daemonize", "no", "--protected-mode", "yes",
                 "--loglevel", "warning"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                preexec_fn=_child_setup, env=clean_env())
        finally:
            logf.close()
        wait_for(lambda: self.proc.poll() is None and
                 self.command("PING") == b"+PONG", timeout, 0.05,
                 "Redis on %s" % self.sock)

    def command(self, *args):
        """One command over the unix socket; the raw first reply line."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(self.sock)
            req = b"*%d\r\n" % len(args)
            for a in args:
                a = a.encode() if isinstance(a, str) else a
                req += b"$%d\r\n%s\r\n" % (len(a), a)
            s.sendall(req)
            buf = b""
            while b"\r\n" not in buf:
                b = s.recv(4096)
                if not b:
                    break
                buf += b
            return buf.split(b"\r\n")[0]
        finally:
            s.close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ------------------------------------------------------------------ Troupe

class Troupe:
    """A whole private Troupe.  conf: {section: {key: value}} overrides."""

    def __init__(self, conf=None, workers_min=2, workers_max=4,
                 sim_args=None, services=None):
        self.root = tempfile.mkdtemp(prefix="troupe-it-")
        os.chmod(self.root, 0o755)     # PostgreSQL (user postgres) enters
        for d in ("log", "run"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.services = list(services or SERVICES)
        self.redis = Redis(self.root)
        self.pg = Postgres(self.root)
        self.edge_port = free_port()
        self.telemetry_port = free_port()
        self.sim_port = free_port()
        self.sim_url = "http://127.0.0.1:%d" % self.sim_port
        self.secret = "test-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
        self.workers_min = workers_min
        self.workers_max = workers_max
        self.sim_args = sim_args or []
        self.conf_over = conf or {}
        self.procs = {}                 # name -> Popen
        self.killed = set()             # names we killed on purpose
        self.sim = None
        self.ok_chats = []              # chat_ids of every 200 chat
        self.failed_chats = 0           # chats answered 5xx
        self.problems = []              # found at teardown
        self.conf_path = os.path.join(self.root, "troupe.conf")
        self.started = False

    # -- config
    def config(self):
        c = {
            "ipc": {"rundir": os.path.join(self.root, "run")},
            "edge": {"listen": "127.0.0.1:%d" % self.edge_port,
                     "chat_timeout_ms": "10000"},
            "auth": {"jwt_secret": self.secret},
            "dispatcher": {"workers_min": str(self.workers_min),
                           "workers_max": str(self.workers_max),
                           "worker_path": binary("worker")},
            "storage": {"redis": "unix:" + self.redis.sock,
                        "postgres": self.pg.conninfo()},
            # no pinned maps: two Troupes at once would share one pin
            # directory (42_ebpf.py pins on purpose)
            "telemetry": {"listen": "127.0.0.1:%d" % self.telemetry_port,
                          "ebpf_pin_dir": ""},
        }
        for sec, kv in self.conf_over.items():
            c.setdefault(sec, {}).update({k: str(v) for k, v in kv.items()})
        return c

    def write_config(self):
        with open(self.conf_path, "w") as f:
            f.write("# written by tests/integration/harness.py\n")
            for sec, kv in self.config().items():
                f.write("\n[%s]\n" % sec)
                for k, v in kv.items():
                    f.write("%s = %s\n" % (k, v))

    # -- lifecycle
    def start(self):
        _live.append(self)
        self.started = True
        t0 = time.monotonic()
        self.redis.start()
        self.pg.init()
        self.pg.start()
        self.write_config()
        self.start_sim()
        for s in self.services:
            self.start_service(s)
        if "edge" in self.services:
            self.wait_ready()
        if VERBOSE:
            note("troupe up in %.1fs at %s" % (time.monotonic() - t0,
                                               self.root))
        return self

    def log_path(self, name):
        return os.path.join(self.root, "log", name + ".log")

    def start_sim(self):
        log = self.log_path("upstream-sim")
        logf = open(log, "ab")
        try:
            self.sim = subprocess.Popen(
                [binary("upstream-sim"), "--listen",
                 "127.0.0.1:%d" % self.sim_port] + self.sim_args,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                preexec_fn=_child_setup, env=clean_env())
        finally:
            logf.close()
        wait_for(lambda: self.sim.poll() is None and
                 port_open(self.sim_port), 10, 0.05,
                 "troupe-upstream-sim on port %d (log:\n%s)" %
                 (self.sim_port, tail(log, 10)))

    def start_service(self, name, timeout=20):
        p, _ = spawn_notify(
            [binary(name), "-c", self.conf_path], self.log_path(name),
            timeout=timeout,
            notify_path=os.path.join(self.root, "notify-%s.sock" % name))
        self.procs[name] = p
        self.killed.discard(name)
        return p

    def wait_ready(self, timeout=15):
        """Wait until the edge answers /readyz 200 (or has no /readyz)."""
        last = []

        def ok():
            r = self.get("/readyz", timeout=3)
            last[:] = [r]
            return r.status in (200, 404)
        if set(SERVICES) <= set(self.services):
            wait_for(ok, timeout, 0.1, "edge /readyz 200 (last: %s)" %
                     last)
        # Workers announce themselves asynchronously; wait for the
        # configured minimum so the first test is not a race.
        if "dispatcher" in self.services:
            wait_for(lambda: len(self.worker_pids()) >= self.workers_min,
                     timeout, 0.1, "%d workers" % self.workers_min)

    def pid(self, name):
        p = self.procs.get(name)
        return p.pid if p and p.poll() is None else None

    def worker_pids(self):
        """Pids of the dispatcher's live children (the workers)."""
        d = self.pid("dispatcher")
        return children_of(d) if d else []

    def kill(self, name, sig=signal.SIGKILL, wait=True):
        p = self.procs[name]
        self.killed.add(name)
        p.send_signal(sig)
        if wait:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def restart(self, name, sig=signal.SIGTERM):
        """Stop a service (sig, then SIGKILL after 15 s) and start it."""
        self.kill(name, sig)
        return self.start_service(name)

    def stop_redis(self):
        self.redis.stop()

    def start_redis(self):
        self.redis.start()

    def stop_pg(self, mode=signal.SIGINT):
        self.pg.stop(mode)

    def start_pg(self):
        self.pg.start()

    def psql(self, q):
        return self.pg.query(q)

    def log(self, name):
        try:
            with open(self.log_path(name), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tails(self, n=25):
        out = []
        for name in (["upstream-sim"] + self.services +
                     ["redis", "postgresql"]):
            out.append("---- %s (%s)\n%s" % (name, self.log_path(name),
                                             tail(self.log_path(name), n)))
        return "\n".join(out)

    def teardown(self):
        if not self.started:
            return
        self.started = False
        # Stop in reverse order with SIGTERM: each must leave cleanly.
        for name in reversed(self.services):
            p = self.procs.get(name)
            if not p:
                continue
            kids = children_of(p.pid) if p.poll() is None else []
            if p.poll() is None:
                p.terminate()
                try:
                    rc = p.wait(10)
                except subprocess.TimeoutExpired:
                    self.problems.append("%s: no exit within 10s of "
                                         "SIGTERM" % name)
                    rc = None
                if rc not in (0, None) and name not in self.killed:
                    self.problems.append("%s: exit status %s after "
                                         "SIGTERM" % (name, rc))
            for pid in [p.pid] + kids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.sim and self.sim.poll() is None:
            self.sim.kill()
            self.sim.wait()
        self.pg.stop(signal.SIGQUIT)
        self.redis.stop()
        for name in self.services + ["worker"]:
            text = self.log(name)
            for mark in SANITIZER_MARKS:
                if mark in text:
                    i = text.index(mark)
                    self.problems.append("%s log has %r:\n%s" % (
                        name, mark, text[max(0, i - 200):i + 2500]))
                    break
        if os.environ.get("TROUPE_TEST_KEEP") == "1":
            note("kept", self.root)
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        if self in _live:
            _live.remove(self)

    # -- HTTP
    def get(self, path, headers=None, timeout=30):
        return http_request(self.edge_port, "GET", path, None, headers, timeout)

    def post(self, path, body, headers=None, timeout=30):
        return http_request(self.edge_port, "POST", path, body, headers, timeout)

    def raw(self, data, **kw):
        return raw_request(self.edge_port, data, **kw)

    def token(self, **kw):
        return jwt(self.secret, **kw)

    def chat(self, query="Hello, who are you?", bot_id=DEMO_BOT,
             user_id="u_123456", history_id=None, token=None, headers=None,
             timeout=30, body=None):
        """POST /v1/bot/chat; remembers the chat_id of every 200."""
        if body is None:
            body = {"bot_id": bot_id, "user_id": user_id, "query": query}
            if history_id is not None:
                body["history_id"] = history_id
        h = {"Authorization": "Bearer " + (token or self.token())}
        h.update(headers or {})
        r = self.post("/v1/bot/chat", body, h, timeout)
        if r.status == 200 and isinstance(r.data, dict):
            self.ok_chats.append(r.data.get("chat_id"))
        elif r.status >= 500:
            self.failed_chats += 1
        return r

    # -- bots
    def ctl(self, *args, check_rc=True):
        r = subprocess.run([binary("troupectl"), "-c", self.conf_path] +
                           list(args), capture_output=True, text=True,
                           env=clean_env(), timeout=30)
        if check_rc and r.returncode != 0:
            raise Failure("troupectl %s: exit %d: %s%s" % (
                " ".join(args), r.returncode, r.stdout, r.stderr))
        return r

    def add_bot(self, bot_id=DEMO_BOT, upstream=None, *extra):
        """troupectl bot add; retried for a while on 503 (troupe-storage
        says READY=1 before PostgreSQL is connected: it serves 503s)."""
        args = ["bot", "add", bot_id, "--upstream",
                upstream or self.sim_url] + list(extra)
        end = time.monotonic() + 15
        while True:
            r = self.ctl(*args, check_rc=False)
            if r.returncode == 0:
                return bot_id
            if "503" not in r.stdout + r.stderr or time.monotonic() > end:
                raise Failure("troupectl %s: exit %d: %s%s" % (
                    " ".join(args), r.returncode, r.stdout, r.stderr))
            time.sleep(0.2)

    # -- invariants
    def check_exactly_once(self):
        """Every 200 chat is in PostgreSQL `chats` exactly once; any other
        row belongs to a chat that was answered 5xx."""
        ids = [c for c in self.ok_chats if c]
        eq(len(ids), len(self.ok_chats), "200 answers carrying a chat_id")
        eq(len(set(ids)), len(ids), "distinct chat_ids among 200s")
        rows = self.psql("SELECT count(*), count(DISTINCT chat_id) "
                         "FROM chats")
        n, nd = int(rows[0][0]), int(rows[0][1])
        eq(nd, n, "chats rows vs distinct chat_id (duplicates)")
        stored = {r[0] for r in self.psql("SELECT chat_id FROM chats")}
        missing = set(ids) - stored
        check(not missing, "acknowledged chats missing from PostgreSQL: %s"
              % sorted(missing)[:5])
        # A row without a 200 is allowed only for a chat that got a 5xx:
        # a commit whose connection died before its result arrived is
        # stored, yet its client was told it failed (an error, never a
        # false success; PRODUCT.md §6).
        extra = n - len(ids)
        check(0 <= extra <= self.failed_chats,
              "rows in chats %d vs 200 answers %d (5xx answers %d)"
              % (n, len(ids), self.failed_chats))
        if extra:
            rows = self.psql("SELECT chat_id, query FROM chats")
            note("%d stored chat(s) were answered 5xx (commit outcome "
                 "unknown when PostgreSQL went away): %r" % (
                     extra, [r for r in rows if r[0] not in set(ids)]))


_live = []
_shared = None


def troupe(**kw):
    """The test file's shared Troupe, started on first use."""
    global _shared
    if _shared is None or not _shared.started:
        _shared = Troupe(**kw)
        try:
            _shared.start()
        except BaseException:
            _shared.teardown()
            _shared = None
            raise
    return _shared


def _teardown_all():
    for t in list(_live):
        try:
            t.teardown()
        except Exception:       # noqa: BLE001 (teardown must go on)
            traceback.print_exc()


atexit.register(_teardown_all)


def _on_signal(sig, frame):
    _teardown_all()
    os._exit(128 + sig)


# ------------------------------------------------------------------ runner

def main(ns):
    """Run every test_* function of a test module, in order."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    only = sys.argv[1:]
    tests = [(k, v) for k, v in ns.items()
             if k.startswith("test_") and callable(v)]
    if only:
        tests = [(k, v) for k, v in tests if any(o in k for o in only)]
    passed = failed = 0
    t_all = time.monotonic()
    for name, fn in tests:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:          # noqa: BLE001
            failed += 1
            print("FAIL %s (%.1fs): %s" % (name, time.monotonic() - t0, e),
                  flush=True)
            if not isinstance(e, Failure):
                traceback.print_exc()
            for t in list(_live):
                print(t.log_tails(), flush=True)
            # Start the next test from a fresh Troupe.
            _teardown_all()
            continue
        print("ok   %s (%.1fs)" % (name, time.monotonic() - t0), flush=True)
        passed += 1
    problems = []
    for t in list(_live):
        t.teardown()
        problems += t.problems
    if _shared is not None:
        problems += [p for p in _shared.problems if p not in problems]
    for p in problems:
        failed += 1
        print("FAIL teardown: %s" % p, flush=True)
    print("%.1fs" % (time.monotonic() - t_all))
    print("%d passed, %d failed" % (passed, failed), flush=True)
    sys.exit(1 if failed or not tests else 0)


def _cli(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="harness.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("spawn", help="start CMD, wait for READY=1")
    sp.add_argument("--log", required=True)
    sp.add_argument("--pidfile", required=True)
    sp.add_argument("--timeout", type=float, default=30)
    sp.add_argument("--notify", help="notify socket path")
    sp.add_argument("argv", nargs="+")
    a = ap.parse_args(argv)
    try:
        p, status = spawn_notify(a.argv, a.log, timeout=a.timeout,
                                 notify_path=a.notify, detach=True)
    except Failure as e:
        print(e, file=sys.stderr)
        return 1
    with open(a.pidfile, "w") as f:
        f.write("%d\n" % p.pid)
    print("%s ready (pid %d)%s" % (os.path.basename(a.argv[0]), p.pid,
                                   (": " + status) if status else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
