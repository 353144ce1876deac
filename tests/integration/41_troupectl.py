# SPDX-License-Identifier: ISC
"""41: troupectl manages bots through troupe-storage.

bot add / list (table and --json) / rm round trip; errors from storage exit
1 with the reason on stderr; usage errors exit 2; with storage gone it
exits 3 within --timeout saying so, and works again once storage is back.
It never links a database client, and leaves no mailbox behind.
"""
import json
import os
import signal
import subprocess
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


if __name__ == "__main__":
    h.main(globals())
