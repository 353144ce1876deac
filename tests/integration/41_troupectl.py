# SPDX-License-Identifier: ISC
"""41: troupectl manages bots and their plugins through troupe-storage.

bot add / list (table and --json) / rm round trip; plugin add (schema
inline or from a file, secret from a file) / list (table and --json,
never a secret) / rm, and a bot's plugins going with it; errors from
storage exit 1 with the reason on stderr; usage errors (a bad schema
named with its place) exit 2; with storage gone it exits 3 within
--timeout saying so, and works again once storage is back.  It never
links a database client, and leaves no mailbox behind.  As root it gets
the answer of a storage running as another user (systemd's troupe).
"""
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import harness as h


def cluster():
    t = h.troupe(services=["telemetry", "storage"])
    # storage is READY before PostgreSQL answers (it serves degraded).
    h.wait_for(lambda: t.ctl("bot", "list", check_rc=False).returncode == 0,
               timeout=15, what="storage serving bot list")
    return t


def test_add_list_rm():
    t = cluster()
    r = t.ctl("bot", "add", "bot-a", "--upstream", "http://127.0.0.1:1/v",
              "--model", "m-a", "--system-prompt", "Be brief.",
              "--context-turns", "3")
    bot = json.loads(r.stdout)
    h.eq((bot["id"], bot["upstream"], bot["model"], bot["system_prompt"],
          bot["context_turns"]),
         ("bot-a", "http://127.0.0.1:1/v", "m-a", "Be brief.", 3),
         "bot add answer")
    t.ctl("bot", "add", "bot-b", "--upstream", "http://127.0.0.1:2")
    # An update keeps what is not given.
    r = t.ctl("bot", "add", "bot-a", "--upstream", "http://127.0.0.1:3")
    h.eq(json.loads(r.stdout)["model"], "m-a", "model kept by an update")

    r = t.ctl("bot", "list")
    lines = r.stdout.splitlines()
    h.eq(lines[0].split(), ["ID", "UPSTREAM", "MODEL", "CONTEXT", "TURNS"],
         "table header")
    rows = {l.split()[0]: l.split() for l in lines[1:]}
    h.eq(rows.get("bot-a"), ["bot-a", "http://127.0.0.1:3", "m-a", "3"],
         "bot-a row")
    h.check("bot-b" in rows, "bot-b missing from %r" % lines)
    # Columns line up.
    h.eq(len({l.index(l.split()[1]) for l in lines}), 1, "column 2 start")

    r = t.ctl("bot", "list", "--json")
    ids = [b["id"] for b in json.loads(r.stdout)]
    h.check({"bot-a", "bot-b"} <= set(ids), "json list %r" % ids)

    t.ctl("bot", "rm", "bot-b")
    r = t.ctl("bot", "list", "--json")
    h.check("bot-b" not in [b["id"] for b in json.loads(r.stdout)],
            "bot-b still listed after rm")
    rows = t.psql("SELECT count(*) FROM bots WHERE id = 'bot-b'")
    h.eq(rows[0][0], "0", "bot-b rows in PostgreSQL")


def test_storage_errors_exit_1():
    t = cluster()
    for args, words in (
            (["bot", "rm", "no-such-bot"], "not found"),
            (["bot", "add", "bad id", "--upstream", "http://x"], "id"),
            (["bot", "add", "b", "--upstream", "http://x",
              "--context-turns", "100000"], "context_turns")):
        r = t.ctl(*args, check_rc=False)
        h.eq(r.returncode, 1, "exit of troupectl %s" % " ".join(args))
        h.check(words in r.stderr, "stderr %r lacks %r" % (r.stderr, words))
        h.eq(r.stdout, "", "stdout on error")


def test_usage_exit_2():
    t = cluster()
    for args in ([], ["bot"], ["bot", "frob"], ["frob"],
                 ["bot", "add", "x"], ["bot", "rm"],
                 ["bot", "add", "x", "--upstream"],
                 ["bot", "list", "--model", "m"],
                 ["bot", "add", "x", "--upstream", "u", "--context-turns",
                  "-1"],
                 ["--timeout", "0", "bot", "list"], ["--nope"],
                 ["bot", "rm", "a", "b"]):
        r = t.ctl(*args, check_rc=False)
        h.eq(r.returncode, 2, "exit of troupectl %s" % " ".join(args))
        h.check("usage:" in r.stderr, "no usage for %r: %r" %
                (args, r.stderr))
    for args in (["--help"], ["bot", "--help"], ["bot", "add", "-h"],
                 ["bot", "list", "--help"], ["bot", "rm", "--help"]):
        r = t.ctl(*args)
        h.check(r.stdout.startswith("usage:"), "help %r: %r" %
                (args, r.stdout[:80]))


def test_no_storage_exit_3():
    t = cluster()
    t.kill("storage", signal.SIGKILL)
    t0 = time.monotonic()
    r = t.ctl("--timeout", "1", "bot", "list", check_rc=False)
    dt = time.monotonic() - t0
    h.eq(r.returncode, 3, "exit without storage")
    h.check("did not answer within 1 s" in r.stderr, "stderr %r" % r.stderr)
    h.check(0.9 < dt < 5, "took %.1fs for a 1 s timeout" % dt)
    t.start_service("storage")
    h.wait_for(lambda: t.ctl("bot", "list", check_rc=False).returncode == 0,
               timeout=15, what="troupectl working after storage restart")


def test_leaves_nothing_behind():
    t = cluster()
    t.ctl("bot", "list")
    left = [f for f in os.listdir(os.path.join(t.root, "run"))
            if f.startswith("troupectl")]
    h.eq(left, [], "troupectl files left in the run directory")
    out = subprocess.run(["ldd", h.binary("troupectl")], capture_output=True,
                         text=True).stdout
    for lib in ("libpq", "libhiredis"):
        h.check(lib not in out, "troupectl links %s" % lib)


SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string",
                                  "description": "city name"}},
          "required": ["city"]}


def plugin_bot(t, bot="plug-bot"):
    t.ctl("bot", "add", bot, "--upstream", "http://127.0.0.1:1")
    return bot


def test_plugin_add_list_rm():
    t = cluster()
    bot = plugin_bot(t)
    d = tempfile.mkdtemp(prefix="troupectl-plugin-")
    try:
        sf = os.path.join(d, "schema.json")
        with open(sf, "w") as f:
            json.dump(SCHEMA, f, indent=2)
        kf = os.path.join(d, "secret")
        with open(kf, "w") as f:
            f.write("tok-from-file\nsecond line ignored\n")
        r = t.ctl("plugin", "add", bot, "weather", "--url",
                  "http://127.0.0.1:9/plugin/weather", "--description",
                  "Weather of a city", "--schema", "@" + sf, "--auth",
                  "token", "--header", "X-Api-Key", "--secret-file", kf,
                  "--timeout-ms", "2500")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    p = json.loads(r.stdout)
    h.eq((p["bot_id"], p["name"], p["url"], p["description"],
          p["parameters"], p["auth"], p["header"], p["secret"],
          p["timeout_ms"], p["created"]),
         (bot, "weather", "http://127.0.0.1:9/plugin/weather",
          "Weather of a city", SCHEMA, "token", "X-Api-Key", "set", 2500,
          True), "plugin add answer")
    h.check("tok-from-file" not in r.stdout + r.stderr, "secret printed")
    h.eq(t.psql("SELECT auth_secret FROM plugins WHERE bot_id = '%s' AND"
                " name = 'weather'" % bot), [["tok-from-file"]],
         "the first line of --secret-file is the secret")
    t.ctl("plugin", "add", bot, "sign_me", "--url", "https://127.0.0.1:9/s",
          "--schema", '{"type":"object","properties":{}}', "--auth", "hmac",
          "--secret", "k3y")
    t.ctl("plugin", "add", bot, "a-clock", "--url", "http://127.0.0.1:9/c")

    r = t.ctl("plugin", "list", bot)
    lines = r.stdout.splitlines()
    h.eq(lines[0].split(), ["NAME", "AUTH", "TIMEOUT_MS", "URL",
                            "DESCRIPTION"], "table header")
    h.eq([ln.split()[:4] for ln in lines[1:]],
         [["a-clock", "none", "5000", "http://127.0.0.1:9/c"],
          ["sign_me", "hmac", "5000", "https://127.0.0.1:9/s"],
          ["weather", "token:X-Api-Key", "2500",
           "http://127.0.0.1:9/plugin/weather"]], "table rows")
    h.check(lines[3].endswith("Weather of a city"), "description %r" %
            lines[3])
    h.eq(len({ln.index(ln.split()[3]) for ln in lines}), 1,
         "URL column lines up")
    r = t.ctl("plugin", "list", bot, "--json")
    h.eq([(x["name"], x.get("secret")) for x in json.loads(r.stdout)],
         [("a-clock", None), ("sign_me", "set"), ("weather", "set")],
         "json list")
    h.check("k3y" not in r.stdout and "tok-from-file" not in r.stdout,
            "secrets listed")

    # Replace: every option left out takes its default again.
    r = t.ctl("plugin", "add", bot, "weather", "--url", "http://127.0.0.1:9/w2")
    p = json.loads(r.stdout)
    h.eq((p["created"], p["auth"], p["timeout_ms"], p["description"],
          "secret" in p), (False, "none", 5000, "", False), "replaced")

    r = t.ctl("plugin", "rm", bot, "sign_me")
    h.eq(json.loads(r.stdout), {"removed": True}, "rm answer")
    names = [x["name"] for x in
             json.loads(t.ctl("plugin", "list", bot, "--json").stdout)]
    h.eq(names, ["a-clock", "weather"], "after rm")
    r = t.ctl("plugin", "rm", bot, "sign_me", check_rc=False)
    h.eq(r.returncode, 1, "rm twice")
    h.check("plugin not found" in r.stderr and "status 404" in r.stderr,
            "stderr %r" % r.stderr)

    # A bot's plugins go with it.
    t.ctl("bot", "rm", bot)
    h.eq(t.psql("SELECT count(*) FROM plugins WHERE bot_id = '%s'" % bot),
         [["0"]], "plugins of a removed bot")
    r = t.ctl("plugin", "list", bot, check_rc=False)
    h.eq(r.returncode, 1, "list of a removed bot")
    h.check("bot not found" in r.stderr, "stderr %r" % r.stderr)


def test_plugin_errors():
    t = cluster()
    bot = plugin_bot(t)
    add = ["plugin", "add", bot, "p", "--url", "http://127.0.0.1:9/p"]
    # Refused by storage: exit 1, its reason on stderr.
    for args, words in (
            (["plugin", "add", "no-such-bot", "p", "--url", "http://x"],
             "bot not found"),
            (["plugin", "add", bot, "bad.name", "--url", "http://x"],
             "name must be 1..64 letters"),
            (["plugin", "add", bot, "p", "--url", "ftp://x"], "url must be"),
            (add + ["--auth", "token"], "auth token needs a secret"),
            (add + ["--secret", "s"], "secret is only for auth token"),
            (add + ["--auth", "hmac", "--secret", "s", "--header", "X-K"],
             "header is only for auth token"),
            (add + ["--schema", '{"type":"string"}'],
             '"type" must be "object"'),
            (add + ["--schema", '{"required":"city"}'], '"required"')):
        r = t.ctl(*args, check_rc=False)
        h.eq(r.returncode, 1, "exit of troupectl %s" % " ".join(args))
        h.check(words in r.stderr and "(status 400)" in r.stderr or
                (words == "bot not found" and "(status 404)" in r.stderr),
                "stderr %r lacks %r" % (r.stderr, words))
        h.eq(r.stdout, "", "stdout on error")
    # Bad command lines: exit 2, what is wrong, the synopsis.
    for args, words in (
            (["plugin"], "want add, list or rm"),
            (["plugin", "frob"], "unknown command"),
            (["plugin", "add", bot], "which plugin?"),
            (["plugin", "add"], "which bot?"),
            (["plugin", "add", bot, "p"], "needs --url"),
            (add + ["extra"], "unexpected \"extra\""),
            (add + ["--auth", "basic"], "want none, token or hmac"),
            (add + ["--secret", "a", "--secret-file", "/dev/null"],
             "not both"),
            (add + ["--secret-file", "/nonexistent/secret"],
             "No such file"),
            (add + ["--secret-file", "/dev/null"], "1 to 1024 bytes"),
            (add + ["--timeout-ms", "0"], "want 1 to 600000"),
            (add + ["--timeout-ms", "600001"], "want 1 to 600000"),
            (add + ["--timeout-ms", "5s"], "want 1 to 600000"),
            (add + ["--schema", '{"city": tru}'],
             "--schema: not valid JSON at line 1, column 10, near \"tru}\""),
            (add + ["--schema", '{\n  "a": 1,\n'],
             "it ends too early (line 3, column 1)"),
            (add + ["--schema", "[1]"], "got an array"),
            (add + ["--schema", "@/nonexistent.json"], "No such file"),
            (["plugin", "list"], "which bot?"),
            (["plugin", "list", bot, "x"], "unexpected \"x\""),
            (["plugin", "rm", bot], "which plugin?"),
            (["plugin", "list", bot, "--url", "http://x"],
             "belong to plugin add"),
            (["plugin", "rm", bot, "p", "--json"], "--json belongs"),
            (["bot", "list", "--secret", "s"], "belong to plugin add"),
            (["key", "list", "--schema", "{}"], "belong to plugin add"),
            (add + ["--upstream", "http://x"], "belong to bot add"),
            (add + ["--scopes", "chat"], "belong to key add")):
        r = t.ctl(*args, check_rc=False)
        h.eq(r.returncode, 2, "exit of troupectl %s" % " ".join(args))
        h.check(words in r.stderr and "usage:" in r.stderr,
                "stderr of %r: %r lacks %r" % (args, r.stderr, words))
    h.eq(t.psql("SELECT count(*) FROM plugins WHERE bot_id = '%s'" % bot),
         [["0"]], "nothing stored by refused commands")
    for args in (["plugin", "--help"], ["plugin", "add", "--help"],
                 ["plugin", "list", "-h"], ["plugin", "rm", "--help"]):
        r = t.ctl(*args)
        h.check(r.stdout.startswith("usage: troupectl plugin"),
                "help %r: %r" % (args, r.stdout[:80]))
    h.check("plugin add <bot> <name>" in t.ctl("--help").stdout,
            "main help lists plugin add")


def test_root_with_a_rundir_of_another_user():
    """Under systemd the services run as user troupe (UMask=0077) in
    /run/troupe; root's troupectl must still get storage's answer.
    Here: storage runs as nobody in a run directory owned by nobody."""
    if os.geteuid() != 0:
        h.note("skipped: needs root")
        return
    t = cluster()
    nobody = pwd.getpwnam("nobody")
    root = tempfile.mkdtemp(prefix="troupe-ctl-root-")
    os.chmod(root, 0o755)
    run = os.path.join(root, "run")
    os.mkdir(run, 0o750)
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    exe = os.path.join(root, "troupe-storage")
    shutil.copy(h.binary("storage"), exe)
    os.chmod(exe, 0o755)
    conf = os.path.join(root, "troupe.conf")
    with open(conf, "w") as f:
        f.write("[ipc]\nrundir = %s\n\n[storage]\nredis = 127.0.0.1:1\n"
                "postgres = host=127.0.0.1 port=%d dbname=troupe "
                "user=troupe\n" % (run, t.pg.port))
    os.chmod(conf, 0o644)
    log = open(os.path.join(root, "storage.log"), "ab")

    def child():
        os.setpgid(0, 0)
        os.umask(0o077)
    p = subprocess.Popen(
        ["setpriv", "--reuid=%d" % nobody.pw_uid,
         "--regid=%d" % nobody.pw_gid, "--clear-groups", "--", exe,
         "-c", conf], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        preexec_fn=child, env=h.clean_env())
    log.close()
    try:
        h.wait_for(lambda: os.path.exists(os.path.join(run, "storage.ipc")),
                   10, 0.05, "storage's mailbox as nobody")

        def ctl(*args):
            return subprocess.run(
                [h.binary("troupectl"), "-c", conf, "--timeout", "3"] +
                list(args), capture_output=True, text=True,
                env=h.clean_env(), timeout=30)
        # Without the fix: exit 3, "did not answer" (storage cannot
        # reach a mailbox root owns), although the command took effect.
        end = time.monotonic() + 15
        while True:
            r = ctl("bot", "list", "--json")
            if r.returncode == 0 or time.monotonic() > end:
                break
            time.sleep(0.2)
        h.eq(r.returncode, 0, "troupectl as root (stderr %r)" % r.stderr)
        h.check(isinstance(json.loads(r.stdout), list),
                "bot list %r" % r.stdout)
        r = ctl("bot", "add", "root-bot", "--upstream", "http://127.0.0.1:9")
        h.eq((r.returncode, json.loads(r.stdout or "{}").get("id")),
             (0, "root-bot"), "bot add as root (%r)" % r.stderr)
        left = [f for f in os.listdir(run) if f.startswith("troupectl")]
        h.eq(left, [], "troupectl files left in the run directory")
        ctl("bot", "rm", "root-bot")
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def test_roll_plan():
    """troupectl roll restarts in dependency order, a subset keeps that
    order, and a wrong name is a usage error before anything restarts
    (the roll itself runs under systemd: 61_systemd.py)."""
    def roll(*args):
        return subprocess.run([h.binary("troupectl"), "roll"] + list(args),
                              capture_output=True, text=True,
                              env=h.clean_env(), timeout=30)
    r = roll("--dry-run")
    h.eq(r.returncode, 0, "roll --dry-run: %s" % r.stderr)
    units = [ln.split()[-1] for ln in r.stdout.splitlines()
             if ln.startswith("systemctl restart")]
    h.eq(units, ["troupe-%s.service" % s for s in
                 ("telemetry", "storage", "auth", "dispatcher", "edge")],
         "restart order")
    h.check(all("is-active" in ln for ln in r.stdout.splitlines()[1::2]),
            "each restart is checked active before the next: %r" %
            r.stdout)
    r = roll("--services", "edge,auth", "--dry-run")
    units = [ln.split()[-1] for ln in r.stdout.splitlines()
             if ln.startswith("systemctl restart")]
    h.eq(units, ["troupe-auth.service", "troupe-edge.service"],
         "a subset, in dependency order")
    for bad in ("edge,foo", "edge,edge", ""):
        r = roll("--services", bad, "--dry-run") if bad else \
            roll("extra", "--dry-run")
        h.eq(r.returncode, 2, "roll %r: usage error (%s)" % (bad, r.stderr))
        h.eq(r.stdout, "", "nothing restarted for %r" % bad)


if __name__ == "__main__":
    h.main(globals())
