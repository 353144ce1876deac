# SPDX-License-Identifier: ISC
"""42: the eBPF scheduler probes of troupe-telemetry, and their heatmaps.

Needs root (CI runs as root), kernel BTF, bpftool, libbpf-tools (runqlat),
stress-ng and chromium; a missing tool fails the test with its name.

- The probes load: /api/heatmap says enabled and lists every service,
  /metrics has troupe_ebpf_enabled 1 and the two histograms per service.
- Cross-check with libbpf-tools' runqlat: a stress-ng load (4 CPU hogs
  pinned to CPU 0) runs in a cgroup named troupe-stress.service under the
  [telemetry] ebpf_cgroup_root this file configures, so telemetry follows
  it as service "stress" (the systemd keying, without systemd).  runqlat -P
  (one histogram per process) runs over the whole life of those processes;
  the processes' run-queue histogram from the pinned map (bpftool) must
  agree with the sum of runqlat's histograms of the same pids:
    * total events within 10 %;
    * every bucket within 10 % of the total mass:
      |ours[i]/N_ours - runqlat[i]/N_runqlat| <= 0.10;
    * and half the L1 distance of the two normalised histograms (the mass
      that would have to move) at most 0.10.
  Both histograms are printed.  The per-second ring (/api/heatmap) must
  hold exactly the map's events.
- The pinned maps dump with their BTF types (bpftool -j map dump pinned).
- Headless Chromium renders /heatmap: a non-empty screenshot, and after the
  page's scripts ran the DOM has one section.heatmap per listed service.
- A telemetry in a cgroup named troupe-telemetry.service, without
  ebpf_cgroup_root, follows the troupe-*.service directories beside it.
- troupe-telemetry run as nobody (no CAP_BPF) stays up, logs one line
  saying the probes are off and why, and shows troupe_ebpf_enabled 0.
"""
import http.client
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
import zlib

import harness as h

PIN_DIR = "/sys/fs/bpf/troupe"
TOL = 0.10


def cgroup2_mount():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a, b = line.split(" - ", 1)
            if b.split()[0] == "cgroup2":
                return a.split()[4]
    raise h.Failure("no cgroup2 mount in /proc/self/mountinfo")


def tool(name):
    p = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    h.check(p, "%s is not installed" % name)
    return p


_cg_root = None


def cg_root():
    """Our own cgroup2 directory (removed at exit)."""
    global _cg_root
    if _cg_root is None:
        _cg_root = os.path.join(cgroup2_mount(),
                                "troupe-it-" + uuid.uuid4().hex[:10])
        os.mkdir(_cg_root)
        os.mkdir(os.path.join(_cg_root, "troupe-stress.service"))
    return _cg_root


def cg_cleanup():
    if _cg_root is None:
        return
    for d in (os.path.join(_cg_root, "troupe-stress.service"),
              os.path.join(_cg_root, "troupe-telemetry.service"), _cg_root):
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


import atexit                                   # noqa: E402
atexit.register(cg_cleanup)


SERVICES = {"edge", "auth", "dispatcher", "worker", "storage", "telemetry"}


def cluster():
    """The shared Troupe, once telemetry follows all its services."""
    h.check(os.geteuid() == 0, "needs root (CI runs as root)")
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"],
                       check=True)
    t = h.troupe(conf={"telemetry": {"ebpf_cgroup_root": cg_root(),
                                      "ebpf_pin_dir": "/sys/fs/bpf/troupe"}})
    h.wait_for(lambda: SERVICES <= set(api(t)["services"]), 10, 0.2,
               "every service in /api/heatmap")
    return t


def fetch(t, path, port=None):
    c = http.client.HTTPConnection("127.0.0.1", port or t.telemetry_port,
                                   timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def api(t, path="/api/heatmap", port=None):
    st, hd, body = fetch(t, path, port)
    h.eq(st, 200, "GET %s" % path)
    h.check(hd.get("content-type", "").startswith("application/json"),
            "content-type %r" % hd.get("content-type"))
    return json.loads(body)


def bpftool_dump(name):
    r = subprocess.run([tool("bpftool"), "-j", "map", "dump", "pinned",
                        os.path.join(PIN_DIR, name)],
                       capture_output=True, text=True, timeout=20)
    h.check(r.returncode == 0, "bpftool map dump %s: %s" % (name, r.stderr))
    # With BTF every entry has "formatted": {"key": .., "value": ..}
    # besides the raw bytes.
    out = []
    for e in json.loads(r.stdout):
        h.check("formatted" in e, "%s dumped without BTF types: %r" %
                (name, e))
        out.append(e["formatted"])
    return out


def hist_of(service_id, name="runq"):
    for e in bpftool_dump(name):
        if e["key"] == service_id:
            return e["value"]
    raise h.Failure("no key %d in %s" % (service_id, name))


def show(title, a, b):
    h.note(title)
    h.note("%22s %10s %10s" % ("usecs", "troupe", "runqlat"))
    last = max([i for i in range(len(a)) if a[i] or b[i]] or [0])
    for i in range(last + 1):
        lo = 0 if i == 0 else 1 << i
        h.note("%10d -> %-9d %10d %10d" % (lo, (1 << (i + 1)) - 1,
                                           a[i], b[i]))
    h.note("%22s %10d %10d" % ("total", sum(a), sum(b)))


def parse_runqlat(text):
    """{pid: [count per log2 slot]} from runqlat -P output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^pid = (\d+)", line)
        if m:
            cur = out.setdefault(int(m.group(1)), [0] * 27)
            continue
        m = re.match(r"^\s*(\d+) -> (\d+)\s*: (\d+)", line)
        if m and cur is not None:
            lo = int(m.group(1))
            slot = 0 if lo <= 1 else lo.bit_length() - 1
            cur[min(slot, 26)] += int(m.group(3))
    return out


# ------------------------------------------------------------------ tests

def test_probes_on_every_service_listed():
    t = cluster()
    want = SERVICES
    j = api(t)
    h.eq(j["enabled"], True, "enabled")
    h.eq(j["reason"], "", "reason")
    h.check(j["window_s"] >= 10, "window_s %r" % j["window_s"])
    log = t.log("telemetry")
    h.check("eBPF probes on" in log, "no 'eBPF probes on' line in the "
            "log:\n%s" % log[-2000:])
    st, _, page = fetch(t, "/metrics")
    h.eq(st, 200, "GET /metrics")
    h.check(re.search(r'^troupe_ebpf_enabled\{service="telemetry"\} 1$',
                      page, re.M), "troupe_ebpf_enabled 1 not on the page")
    for s in want:
        for fam in ("troupe_runq_latency_seconds", "troupe_offcpu_seconds"):
            h.check(re.search(r'^%s_bucket\{service="%s",le="\+Inf"\} \d+$'
                              % (fam, s), page, re.M),
                    "%s for %s not on the page" % (fam, s))
            h.check(re.search(r'^%s_count\{service="%s"\} \d+$' % (fam, s),
                              page, re.M), "%s_count %s" % (fam, s))
    # The edge's threads wake up for a chat: its counts move.
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True

    def edge_count():
        _, _, p = fetch(t, "/metrics")
        m = re.search(r'^troupe_runq_latency_seconds_count\{service="edge"'
                      r'\} (\d+)$', p, re.M)
        return int(m.group(1))
    before = edge_count()
    for _ in range(5):
        h.eq(t.chat().status, 200, "chat")
    h.wait_for(lambda: edge_count() > before, 5, 0.2,
               "edge's run-queue count to grow past %d" % before)
    # The per-second series of a service.
    now = int(time.time())
    j = api(t, "/api/heatmap?service=edge&since=%d" % (now - 30))
    h.eq(j["service"], "edge", "service")
    h.eq(len(j["buckets"]), 27, "buckets")
    h.eq(j["buckets"][0], {"lo_us": 0, "hi_us": 2}, "first bucket")
    h.eq(j["buckets"][10], {"lo_us": 1024, "hi_us": 2048}, "bucket 10")
    h.check(j["seconds"], "no seconds since %d" % (now - 30))
    ts = [s["t"] for s in j["seconds"]]
    h.eq(ts, sorted(ts), "seconds in order")
    h.check(ts[0] >= now - 30, "a second before since: %d" % ts[0])
    h.check(all(len(s["runq"]) == 27 and len(s["offcpu"]) == 27
                for s in j["seconds"]), "27 counts per kind and second")
    h.check(sum(sum(s["runq"]) for s in j["seconds"]) > 0,
            "edge: no run-queue event in 30 s")
    st, _, _ = fetch(t, "/api/heatmap?service=nope")
    h.eq(st, 404, "unknown service")
    st, _, _ = fetch(t, "/api/heatmap?service=edge&since=x")
    h.eq(st, 400, "bad since")


def test_runqlat_agrees():
    t = cluster()
    runqlat, stress = tool("runqlat"), tool("stress-ng")
    cg = os.path.join(cg_root(), "troupe-stress.service")
    ino = os.stat(cg).st_ino
    # Telemetry finds the cgroup within 2 s (its scan period).
    h.wait_for(lambda: any(e["key"] == ino
                           for e in bpftool_dump("cgroup")), 6, 0.2,
               "cgroup %d in %s/cgroup" % (ino, PIN_DIR))
    sid = [e["value"] for e in bpftool_dump("cgroup") if e["key"] == ino][0]
    h.check("stress" in api(t)["services"], "service stress not listed")
    base = hist_of(sid)
    h.eq(base["count"], 0, "events of the empty cgroup")
    t0 = int(time.time()) - 1

    out = open(os.path.join(t.root, "runqlat.txt"), "w+")
    # Line-buffered, so its "Tracing..." line (printed once attached)
    # shows at once.
    rq = subprocess.Popen([tool("stdbuf"), "-oL", runqlat, "-P"],
                          stdout=out, stderr=subprocess.STDOUT,
                          preexec_fn=h._child_setup)
    try:
        h.wait_for(lambda: rq.poll() is None and "Tracing" in
                   open(out.name).read(), 20, 0.05,
                   "runqlat attached (output: %r)" % out.name)

        def enter_cgroup():
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write("0")
            h._child_setup()
        st = subprocess.Popen([stress, "--cpu", "4", "--cpu-method",
                               "int64", "--taskset", "0", "--timeout",
                               "4s", "--quiet"],
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              preexec_fn=enter_cgroup)
        pids = set()
        while st.poll() is None:
            try:
                with open(os.path.join(cg, "cgroup.procs")) as f:
                    pids |= {int(x) for x in f.read().split()}
            except OSError:
                pass
            time.sleep(0.05)
        h.eq(st.returncode, 0, "stress-ng exit status")
        h.wait_for(lambda: not open(os.path.join(cg, "cgroup.procs"))
                   .read().strip(), 5, 0.1, "stress-ng's processes gone")
        time.sleep(0.5)
    finally:
        rq.send_signal(signal.SIGINT)
        try:
            rq.wait(15)
        except subprocess.TimeoutExpired:
            rq.kill()
            rq.wait()
    ours = hist_of(sid)
    out.seek(0)
    text = out.read()
    out.close()
    per_pid = parse_runqlat(text)
    h.check(pids, "no stress-ng process seen in the cgroup")
    theirs = [0] * 27
    for p in pids:
        for i, c in enumerate(per_pid.get(p, [])):
            theirs[i] += c
    a = ours["slots"]
    show("run-queue latency of stress-ng (pids %s), troupe probe vs "
         "runqlat -P" % sorted(pids), a, theirs)
    na, nb = sum(a), sum(theirs)
    h.eq(na, ours["count"], "map: sum of slots vs count")
    h.check(nb > 100, "runqlat saw only %d events of stress-ng" % nb)
    h.check(abs(na - nb) <= TOL * nb,
            "totals: troupe %d vs runqlat %d (more than %d %% apart)" %
            (na, nb, TOL * 100))
    worst = max(abs(a[i] / na - theirs[i] / nb) for i in range(27))
    tvd = sum(abs(a[i] / na - theirs[i] / nb) for i in range(27)) / 2
    h.note("totals differ by %.2f %%, worst bucket by %.2f %% of the mass, "
           "mass to move %.2f %%" % (100 * abs(na - nb) / nb, 100 * worst,
                                     100 * tvd))
    h.check(worst <= TOL, "a bucket differs by %.1f %% of the mass" %
            (100 * worst))
    h.check(tvd <= TOL, "histograms differ by %.1f %% of the mass" %
            (100 * tvd))
    # The per-second ring holds the same events.
    time.sleep(2.2)
    j = api(t, "/api/heatmap?service=stress&since=%d" % t0)
    ring = [sum(s["runq"][i] for s in j["seconds"]) for i in range(27)]
    h.eq(ring, a, "per-second ring summed vs the map")
    busy = [s["t"] for s in j["seconds"] if sum(s["runq"])]
    h.check(3 <= len(busy) <= 7, "seconds with events: %s" % busy)


def test_pinned_maps_dump_with_types():
    t = cluster()
    for name in ("tgid", "cgroup", "runq", "offcpu"):
        h.check(os.path.exists(os.path.join(PIN_DIR, name)),
                "%s/%s not pinned" % (PIN_DIR, name))
    tg = bpftool_dump("tgid")
    keys = {e["key"] for e in tg}
    pid = t.pid("telemetry")
    h.check(pid in keys, "telemetry's pid %d not in tgid map %s" %
            (pid, sorted(keys)))
    h.check(t.pid("edge") in keys, "edge's pid not in the tgid map")
    for w in t.worker_pids():
        h.check(w in keys, "worker %d not in the tgid map" % w)
    h.check(all(isinstance(e["value"], int) and 0 < e["value"] < 64
                for e in tg), "tgid values: %s" % tg[:3])
    for name in ("runq", "offcpu"):
        d = bpftool_dump(name)
        h.eq(len(d), 64, "%s entries" % name)
        v = d[0]["value"]
        h.check(isinstance(v, dict) and set(v) == {"slots", "count",
                                                   "sum_ns"},
                "%s dumped without its BTF type: %r" % (name, v))
        h.eq(len(v["slots"]), 27, "%s slots" % name)
        tot = sum(e["value"]["count"] for e in d)
        h.check(tot > 0, "%s: no event at all" % name)
    # The plain (non-JSON) dump names the fields too.
    r = subprocess.run([tool("bpftool"), "map", "dump", "pinned",
                        os.path.join(PIN_DIR, "runq")],
                       capture_output=True, text=True, timeout=20)
    h.check('"sum_ns"' in r.stdout, "bpftool map dump without types")


def png_colours(path):
    """Distinct pixel colours of an 8-bit RGB/RGBA non-interlaced PNG."""
    with open(path, "rb") as f:
        data = f.read()
    h.eq(data[:8], b"\x89PNG\r\n\x1a\n", "PNG signature")
    pos, idat = 8, b""
    w = ht = ctype = None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, ht, depth, ctype, _, _, inter = struct.unpack(">IIBBBBB",
                                                             body)
            h.check(depth == 8 and ctype in (2, 6) and inter == 0,
                    "unexpected PNG format")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    colours = set()
    for y in range(ht):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pr = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[x] = (line[x] + pr) & 255
        if y % 4 == 0:
            for x in range(0, stride, bpp * 2):
                colours.add(bytes(line[x:x + 3]))
        prev = line
    return w, ht, len(colours)


def chromium(args, timeout=90):
    prof = tempfile.mkdtemp(prefix="troupe-chromium-")
    try:
        return subprocess.run(
            [tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-dev-shm-usage",
             "--user-data-dir=" + prof, "--virtual-time-budget=6000"] + args,
            capture_output=True, text=True, timeout=timeout, cwd=prof,
            env=h.clean_env({"HOME": prof}))
    finally:
        shutil.rmtree(prof, ignore_errors=True)


def test_heatmap_page_renders_in_chromium():
    t = cluster()
    st, hd, page = fetch(t, "/heatmap")
    h.eq(st, 200, "GET /heatmap")
    h.check(hd.get("content-type", "").startswith("text/html"),
            "content-type %r" % hd.get("content-type"))
    h.check(not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page),
            "the page loads something from elsewhere")
    services = api(t)["services"]
    h.check(len(services) >= 6, "services %s" % services)
    url = "http://127.0.0.1:%d/heatmap" % t.telemetry_port
    r = chromium(["--dump-dom", url])
    h.eq(r.returncode, 0, "chromium --dump-dom (stderr %s)" % r.stderr[-800:])
    dom = r.stdout
    h.check('data-ready="1"' in dom, "the page's script did not finish: "
            "%s" % dom[-1500:])
    shown = re.findall(r'<section class="heatmap" data-service="([^"]+)"',
                       dom)
    h.eq(sorted(shown), sorted(services), "one heatmap per service")
    h.check('data-services="%d"' % len(services) in dom,
            "data-services count")
    png = os.path.join(t.root, "heatmap.png")
    r = chromium(["--screenshot=" + png, "--window-size=1400,1600",
                  "--hide-scrollbars", url])
    h.check(os.path.exists(png), "no screenshot (stderr %s)" %
            r.stderr[-800:])
    size = os.path.getsize(png)
    w, ht, n = png_colours(png)
    h.note("screenshot %dx%d, %d bytes, %d distinct colours sampled" %
           (w, ht, size, n))
    h.check(size > 10000 and n >= 16, "screenshot looks empty (%d bytes, "
            "%d colours)" % (size, n))


def test_unit_cgroup_found_from_own_cgroup():
    """Without ebpf_cgroup_root, a telemetry whose own cgroup is
    troupe-telemetry.service follows the troupe-*.service next to it (the
    systemd layout, without systemd)."""
    cluster()
    d = tempfile.mkdtemp(prefix="troupe-it-cg-")
    own = os.path.join(cg_root(), "troupe-telemetry.service")
    os.mkdir(own)
    p = None
    try:
        port = h.free_port()
        conf = os.path.join(d, "troupe.conf")
        with open(conf, "w") as f:
            f.write("[ipc]\nrundir = %s\n[telemetry]\nlisten = "
                    "127.0.0.1:%d\nebpf_pin_dir =\n" % (d, port))
        log = os.path.join(d, "telemetry.log")

        def enter():
            with open(os.path.join(own, "cgroup.procs"), "w") as f:
                f.write("0")
            h._child_setup()
        with open(log, "wb") as lf:
            p = subprocess.Popen([h.binary("telemetry"), "-c", conf],
                                 stdout=lf, stderr=lf,
                                 stdin=subprocess.DEVNULL,
                                 preexec_fn=enter, env=h.clean_env())
        h.wait_for(lambda: h.port_open(port), 10, 0.1,
                   "telemetry listening (log:\n%s)" % h.tail(log))
        text = open(log).read()
        h.check("by unit cgroup under %s;" % cg_root() in text,
                "cgroup root not found from our own cgroup:\n%s" % text)
        h.check("maps not pinned" in text, "pinned with ebpf_pin_dir "
                "empty:\n%s" % text)
        j = h.wait_for(lambda: (lambda j: j if {"stress", "telemetry"} <=
                                set(j["services"]) else None)(
                                    api(None, port=port)), 6, 0.2,
                       "stress and telemetry listed")
        h.eq(sorted(j["services"]), ["stress", "telemetry"], "services")
    finally:
        if p is not None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for _ in range(50):
            try:
                os.rmdir(own)
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_telemetry_runs_without_probes():
    h.check(os.geteuid() == 0, "needs root to become nobody")
    tool("runuser")
    d = tempfile.mkdtemp(prefix="troupe-it-nobody-")
    try:
        os.chmod(d, 0o777)
        binp = os.path.join(d, "troupe-telemetry")
        shutil.copy(h.binary("telemetry"), binp)
        os.chmod(binp, 0o755)
        run = os.path.join(d, "run")
        os.mkdir(run)
        os.chmod(run, 0o777)
        port = h.free_port()
        conf = os.path.join(d, "troupe.conf")
        with open(conf, "w") as f:
            f.write("[ipc]\nrundir = %s\n[telemetry]\nlisten = "
                    "127.0.0.1:%d\nebpf_pin_dir = %s/pins\n" %
                    (run, port, d))
        os.chmod(conf, 0o644)
        log = os.path.join(d, "telemetry.log")
        with open(log, "wb") as lf:
            p = subprocess.Popen(["runuser", "-u", "nobody", "--", binp,
                                  "-c", conf], stdout=lf, stderr=lf,
                                 stdin=subprocess.DEVNULL,
                                 preexec_fn=h._child_setup,
                                 env=h.clean_env())
        try:
            h.wait_for(lambda: h.port_open(port), 10, 0.1,
                       "unprivileged telemetry listening (log:\n%s)" %
                       h.tail(log))
            time.sleep(1.5)
            h.check(p.poll() is None, "it exited: %s" % h.tail(log))
            text = open(log).read()
            off = [ln for ln in text.splitlines() if "eBPF probes off" in ln]
            h.eq(len(off), 1, "lines saying the probes are off in:\n%s" %
                 text)
            h.note(off[0])
            h.check("CAP_BPF" in off[0], "the line does not say what is "
                    "missing: %s" % off[0])
            j = api(None, port=port)
            h.eq(j["enabled"], False, "enabled")
            h.check(j["reason"], "no reason given")
            st, _, page = fetch(None, "/metrics", port)
            h.eq(st, 200, "/metrics")
            h.check(re.search(r'^troupe_ebpf_enabled\{service="telemetry"'
                              r'\} 0$', page, re.M),
                    "troupe_ebpf_enabled 0 not on the page")
            h.check("troupe_runq_latency_seconds" not in page,
                    "histograms without probes")
            st, _, html = fetch(None, "/heatmap", port)
            h.eq(st, 200, "/heatmap without probes")
        finally:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)


h.main(globals())
