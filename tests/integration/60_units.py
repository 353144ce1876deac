# SPDX-License-Identifier: ISC
"""60: the systemd units, their sandbox, and the .deb.

No systemd needs to run here (PID 1 on the build machines is not systemd):
- `systemd-analyze verify` on every unit in units/ must print nothing.  It
  wants the ExecStart= programs to exist, so the units are copied to a temp
  directory with ExecStart=/usr/bin/troupe-X pointed at the build tree's
  programs (an executable stub when one is not built).
- `systemd-analyze security --offline=true` scores each service; every
  score is printed, and any above 1.5 (telemetry: 3.5) fails.
- The settings the product relies on are there, in each unit: Type=notify,
  the watchdog, Restart=on-failure, user troupe, the shared /run/troupe
  kept across restarts, the strict sandbox, no capabilities but
  telemetry's CAP_BPF + CAP_PERFMON, the JWT credential, the edge's socket
  on 127.0.0.1:8080, and the dispatcher free to reach any upstream.
- The sysusers.d and tmpfiles.d snippets work on a temp root.
- The package: one made by `cpack -G DEB` into a temp directory when the
  build has a CPackConfig.cmake (else a troupe_<version>_amd64.deb in the
  build directory; else this part is skipped, with a note): its files,
  conffiles, maintainer scripts, the units identical to units/, and a
  Depends line naming the Debian package of every shared library its
  programs link to directly.
Python 3 standard library; uses only harness.py's runner and checks.
Under 60 s (mostly cpack, ~3 s).
"""
import atexit
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import harness as h

UNITS = os.path.join(h.TOP, "units")
SERVICES = ["edge", "auth", "dispatcher", "storage", "telemetry"]
LIMIT = {"telemetry": 3.5}
DEFAULT_LIMIT = 1.5
UNIT_FILES = (["troupe.target", "troupe-edge.socket"] +
              ["troupe-%s.service" % s for s in SERVICES])
# Where the build tree keeps each program ExecStart= names.
BUILT = {"troupe-%s" % s: os.path.join("services", s, "troupe-" + s)
         for s in SERVICES}

_tmp = tempfile.mkdtemp(prefix="troupe-units-")
atexit.register(shutil.rmtree, _tmp, True)


def run(argv, timeout=30, **kw):
    return subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout, **kw)


def parse_unit(name):
    """The unit's settings: {section: {key: [values in order]}}."""
    sec, out = None, {}
    with open(os.path.join(UNITS, name)) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                sec = line.strip("[]")
                out.setdefault(sec, {})
                continue
            k, _, v = line.partition("=")
            out[sec].setdefault(k.strip(), []).append(v.strip())
    return out


def one(u, sec, key, what):
    v = u.get(sec, {}).get(key)
    h.check(v, "%s: no %s= in [%s]" % (what, key, sec))
    return v[-1]


def words(u, sec, key):
    return " ".join(u.get(sec, {}).get(key, [])).split()


# ------------------------------------------------------------------ tests

def test_verify_clean():
    d = os.path.join(_tmp, "verify")
    os.makedirs(d)
    for name in UNIT_FILES:
        with open(os.path.join(UNITS, name)) as f:
            text = f.read()

        def exe(m):
            prog = m.group(1)
            p = os.path.join(h.BUILD, BUILT.get(prog, prog))
            if not os.access(p, os.X_OK):
                p = os.path.join(d, prog)
                h.note("%s not built: verifying against a stub" % prog)
                with open(p, "w") as s:
                    s.write("#!/bin/sh\nexit 0\n")
                os.chmod(p, 0o755)
            return "ExecStart=" + p
        text = re.sub(r"^ExecStart=/usr/bin/(\S+)", exe, text, flags=re.M)
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    r = run(["systemd-analyze", "verify"] +
            [os.path.join(d, n) for n in UNIT_FILES], cwd=d)
    out = (r.stdout + r.stderr).strip()
    h.check(r.returncode == 0 and out == "",
            "systemd-analyze verify: exit %d:\n%s" % (r.returncode, out))
    h.note("systemd-analyze verify: %d units clean" % len(UNIT_FILES))


def test_security_scores():
    scores, bad = {}, []
    for s in SERVICES:
        name = "troupe-%s.service" % s
        r = run(["systemd-analyze", "security", "--offline=true",
                 "--no-pager", os.path.join(UNITS, name)])
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)",
                      r.stdout + r.stderr)
        h.check(m, "%s: no score in:\n%s" % (name, r.stdout + r.stderr))
        scores[s] = float(m.group(1))
        limit = LIMIT.get(s, DEFAULT_LIMIT)
        h.note("exposure %-26s %.1f (at most %.1f)" %
               (name, scores[s], limit))
        if scores[s] > limit:
            bad.append("%s %.1f > %.1f" % (name, scores[s], limit))
            for line in r.stdout.splitlines():
                if line.startswith("\u2717"):
                    h.note(line.rstrip())
    h.check(not bad, "exposure too high: " + ", ".join(bad))


def test_service_settings():
    for s in SERVICES:
        name = "troupe-%s.service" % s
        u = parse_unit(name)
        S = "Service"
        want = {
            "Type": "notify", "NotifyAccess": "main",
            "Restart": "on-failure", "User": "troupe", "Group": "troupe",
            "RuntimeDirectory": "troupe", "RuntimeDirectoryPreserve": "yes",
            "StateDirectory": "troupe", "ProtectSystem": "strict",
            "ProtectHome": "yes", "PrivateTmp": "yes",
            "PrivateDevices": "yes", "NoNewPrivileges": "yes",
            "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes",
            "ProtectProc": "invisible", "RestrictNamespaces": "yes",
            "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
            "SystemCallArchitectures": "native", "UMask": "0077",
        }
        for k, v in want.items():
            h.eq(one(u, S, k, name), v, "%s %s" % (name, k))
        h.eq(one(u, S, "ExecStart", name).split()[0],
             "/usr/bin/troupe-" + s, name + " ExecStart")
        h.check(one(u, S, "WatchdogSec", name), name + ": no watchdog")
        h.eq(one(u, "Unit", "PartOf", name), "troupe.target",
             name + " PartOf")
        h.eq(one(u, "Install", "WantedBy", name), "troupe.target",
             name + " WantedBy")
        h.eq(u[S]["SystemCallFilter"][0], "@system-service",
             name + " first SystemCallFilter")
        caps = words(u, S, "CapabilityBoundingSet")
        amb = words(u, S, "AmbientCapabilities")
        if s == "telemetry":
            h.eq(sorted(caps), ["CAP_BPF", "CAP_PERFMON"], name + " caps")
            h.eq(sorted(amb), ["CAP_BPF", "CAP_PERFMON"],
                 name + " ambient caps")
            h.check("bpf" in words(u, S, "SystemCallFilter"),
                    name + ": bpf() not allowed")
        else:
            h.eq(caps, [], name + " CapabilityBoundingSet")
            h.eq(amb, [], name + " AmbientCapabilities")
            h.eq(one(u, S, "PrivateUsers", name), "yes",
                 name + " PrivateUsers")
        fam = set(words(u, S, "RestrictAddressFamilies"))
        h.check("AF_UNIX" in fam, name + ": no AF_UNIX for the mailboxes")
        h.check(fam <= {"AF_UNIX", "AF_INET", "AF_INET6"},
                "%s: address families %s" % (name, sorted(fam)))
        deny = words(u, S, "IPAddressDeny")
        if s == "dispatcher":
            # The workers call upstreams anywhere.
            h.eq(deny, [], name + " IPAddressDeny")
            h.check({"AF_INET", "AF_INET6"} <= fam,
                    name + ": workers need AF_INET and AF_INET6")
        else:
            h.eq(deny, ["any"], name + " IPAddressDeny")
        if s == "auth":
            h.eq(one(u, S, "LoadCredential", name),
                 "jwt-secret:/etc/troupe/jwt-secret", name + " credential")
            h.eq(fam, {"AF_UNIX"}, name + " RestrictAddressFamilies")
            h.eq(one(u, S, "PrivateNetwork", name), "yes",
                 name + " PrivateNetwork")
    sock = parse_unit("troupe-edge.socket")
    h.eq(sock["Socket"]["ListenStream"], ["127.0.0.1:8080"],
         "troupe-edge.socket ListenStream")
    edge = parse_unit("troupe-edge.service")
    h.eq(one(edge, "Service", "Sockets", "edge"), "troupe-edge.socket",
         "troupe-edge.service Sockets")
    target = parse_unit("troupe.target")
    wants = set(words(target, "Unit", "Wants"))
    for n in UNIT_FILES[1:]:
        h.check(n in wants, "troupe.target does not want " + n)


def test_sysusers_tmpfiles():
    root = os.path.join(_tmp, "root")
    os.makedirs(os.path.join(root, "etc"))
    r = run(["systemd-sysusers", "--root=" + root,
             os.path.join(UNITS, "troupe.sysusers")])
    h.eq(r.returncode, 0, "systemd-sysusers: " + r.stderr)
    with open(os.path.join(root, "etc/passwd")) as f:
        pw = [ln.split(":") for ln in f.read().splitlines()]
    users = {p[0]: p for p in pw}
    h.check("troupe" in users, "no user troupe in %r" % pw)
    uid = int(users["troupe"][2])
    h.check(0 < uid < 1000, "troupe is not a system user: uid %d" % uid)
    r = run(["systemd-tmpfiles", "--root=" + root, "--create",
             os.path.join(UNITS, "troupe.tmpfiles")])
    h.eq(r.returncode, 0, "systemd-tmpfiles: " + r.stderr)
    for p, mode, owner in (("run/troupe", 0o750, uid),
                           ("var/lib/troupe", 0o750, uid),
                           ("etc/troupe", 0o750, 0)):
        st = os.stat(os.path.join(root, p))
        h.eq((oct(st.st_mode & 0o7777), st.st_uid), (oct(mode), owner),
             "/" + p + " mode, owner")


def project_version():
    with open(os.path.join(h.TOP, "CMakeLists.txt")) as f:
        m = re.search(r"project\(\s*troupe\s+VERSION\s+([0-9.]+)", f.read())
    h.check(m, "no project(troupe VERSION ...) in CMakeLists.txt")
    return m.group(1)


def find_deb(version):
    """A fresh .deb made by cpack into a temp directory when the build has
    a CPackConfig.cmake (so a stale package never hides a change), else a
    troupe_<version>_amd64.deb found in the build directory, else None."""
    name = "troupe_%s_amd64.deb" % version
    cfg = os.path.join(h.BUILD, "CPackConfig.cmake")
    if not os.path.exists(cfg):
        p = os.path.join(h.BUILD, name)
        if os.path.exists(p):
            h.note("checking %s" % p)
            return p
        return None
    out = os.path.join(_tmp, "cpack")
    r = run(["cpack", "-G", "DEB", "--config", cfg, "-B", out],
            timeout=50, cwd=h.BUILD)
    h.check(r.returncode == 0, "cpack: exit %d:\n%s%s" %
            (r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
    p = os.path.join(out, name)
    h.check(os.path.exists(p), "cpack wrote %s, not %s" %
            (os.listdir(out), name))
    h.note("checking %s (made by cpack)" % p)
    return p


def deb_field(info, field):
    m = re.search(r"^ %s: (.*)$" % field, info, re.M)
    return m.group(1) if m else ""


def owner_packages(paths):
    """The Debian package of each library path (merged /usr: try both)."""
    q = []
    for p in paths:
        q.append(p)
        if p.startswith("/usr/lib/"):
            q.append(p[len("/usr"):])
        elif p.startswith("/lib"):
            q.append("/usr" + p)
    r = run(["dpkg", "-S"] + q)
    pkgs = {}
    for line in r.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        path = path.strip()
        if path.startswith("/usr/lib/"):
            path = path[len("/usr"):]
        pkgs[path] = pkg.split(":")[0]
    out = {}
    for p in paths:
        k = p[len("/usr"):] if p.startswith("/usr/lib/") else p
        out[p] = pkgs.get(k)
    return out


def test_deb():
    version = project_version()
    deb = find_deb(version)
    if deb is None:
        h.note("SKIP: no troupe_%s_amd64.deb and no CPackConfig.cmake in %s"
               % (version, h.BUILD))
        return
    info = run(["dpkg-deb", "-I", deb]).stdout
    h.eq(deb_field(info, "Package"), "troupe", "Package")
    h.eq(deb_field(info, "Version"), version, "Version")
    h.eq(deb_field(info, "Architecture"), "amd64", "Architecture")
    depends = deb_field(info, "Depends")
    h.note("Depends: " + depends)
    dep = {d.split()[0] for d in depends.split(", ") if d}
    rec = {d.split()[0] for d in deb_field(info, "Recommends").split(", ")}
    for p in ("systemd", "procps", "libnng1", "libhiredis0.14", "libpq5",
              "libsystemd0", "libcurl4", "libcjson1", "libh2o-evloop0.13",
              "libssl3"):
        h.check(p in dep, "Depends lacks %s: %s" % (p, depends))
    h.check({"redis-server", "postgresql"} <= rec,
            "Recommends: %s" % sorted(rec))

    ctl = os.path.join(_tmp, "control")
    r = run(["dpkg-deb", "-e", deb, ctl])
    h.eq(r.returncode, 0, "dpkg-deb -e: " + r.stderr)
    with open(os.path.join(ctl, "conffiles")) as f:
        h.eq(f.read().split(), ["/etc/troupe/troupe.conf"], "conffiles")
    for s in ("postinst", "prerm", "postrm"):
        p = os.path.join(ctl, s)
        h.check(os.access(p, os.X_OK), "no executable %s" % s)
        with open(p, "rb") as f, \
                open(os.path.join(UNITS, "debian", s), "rb") as g:
            h.check(f.read() == g.read(), "%s differs from units/debian/%s"
                    % (s, s))

    root = os.path.join(_tmp, "deb")
    r = run(["dpkg-deb", "-x", deb, root])
    h.eq(r.returncode, 0, "dpkg-deb -x: " + r.stderr)
    files = set()
    for d, _, fs in os.walk(root):
        for f in fs:
            files.add(os.path.relpath(os.path.join(d, f), root))
    progs = ["troupe-%s" % s for s in SERVICES + ["worker"]] + ["troupectl"]
    want = (["usr/bin/" + p for p in progs] +
            ["lib/systemd/system/" + n for n in UNIT_FILES] +
            ["usr/lib/sysusers.d/troupe.conf",
             "usr/lib/tmpfiles.d/troupe.conf",
             "etc/troupe/troupe.conf",
             "usr/share/doc/troupe/operations.md",
             "usr/share/doc/troupe/troupe.conf.example"])
    missing = [w for w in want if w not in files]
    h.check(not missing, "not in the .deb: %s" % missing)
    h.check("etc/troupe/jwt-secret" not in files,
            "the .deb ships a JWT secret")
    for n in UNIT_FILES:
        with open(os.path.join(root, "lib/systemd/system", n), "rb") as f, \
                open(os.path.join(UNITS, n), "rb") as g:
            h.eq(hashlib.sha256(f.read()).hexdigest(),
                 hashlib.sha256(g.read()).hexdigest(),
                 "%s in the .deb vs units/" % n)
    with open(os.path.join(root, "etc/troupe/troupe.conf")) as f:
        conf = f.read()
    h.check(re.search(r"^postgres = host=/run/postgresql ", conf, re.M),
            "packaged troupe.conf does not use PostgreSQL's socket")

    # Every shared library a program links to directly (DT_NEEDED) comes
    # from a package the .deb depends on.
    libs = set()
    for p in progs:
        exe = os.path.join(root, "usr/bin", p)
        r = run(["readelf", "-d", exe])
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]",
                            r.stdout)
        h.check(needed, "%s: no NEEDED libraries: %s" % (p, r.stderr))
        where = dict(re.findall(r"^\s*(\S+) => (/\S+)",
                                run(["ldd", exe]).stdout, re.M))
        for n in needed:
            if n.startswith("ld-linux"):
                continue
            h.check(n in where, "%s: %s not found by ldd" % (p, n))
            libs.add(where[n])
    owners = owner_packages(sorted(libs))
    unowned = [p for p, o in owners.items() if o is None]
    h.check(not unowned, "libraries of no package: %s" % unowned)
    lacking = sorted({o for o in owners.values() if o not in dep})
    h.check(not lacking, "Depends lacks %s" % lacking)
    h.note("%d files, %d libraries from %d packages, all in Depends" %
           (len(files), len(libs), len(set(owners.values()))))


if __name__ == "__main__":
    h.main(globals())
