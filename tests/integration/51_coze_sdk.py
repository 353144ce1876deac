# SPDX-License-Identifier: ISC
"""51: the official Coze SDK for Node (@coze/api, pinned by
tests/sdk/package-lock.json, installed by `./troupe test` into
<build>/sdk/node_modules) against Troupe, unchanged: chat.stream,
chat.createAndPoll, chat.cancel, chat.messages.list, and an error.  What
the SDK got is checked against PostgreSQL.
"""
import json
import os
import shutil
import subprocess

import harness as h

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "sdk", "sdk_test.js")
MODULES = os.path.join(h.BUILD, "sdk", "node_modules")


def cluster():
    t = h.troupe(conf={"edge": {"chat_timeout_ms": 15000}})
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def sdk(t, case, query=None, token=None):
    h.check(shutil.which("node"), "node is not installed (./troupe deps "
            "installs nodejs)")
    h.check(os.path.isdir(os.path.join(MODULES, "@coze", "api")),
            "the Coze SDK is not installed in %s: run `./troupe test` "
            "(it runs npm ci there)" % MODULES)
    env = h.clean_env({
        "NODE_PATH": MODULES,
        "TROUPE_BASE_URL": "http://127.0.0.1:%d" % t.edge_port,
        "TROUPE_TOKEN": token or t.token(),
        "TROUPE_BOT": h.DEMO_BOT,
    })
    args = ["node", SCRIPT, case] + ([query] if query else [])
    r = subprocess.run(args, capture_output=True, text=True, env=env,
                       timeout=60)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    h.check(lines, "node %s: exit %d, no JSON: %s %s" % (
        case, r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
    out = json.loads(lines[-1])
    h.check(r.returncode == 0 and "threw" not in out or case == "error",
            "SDK %s failed: %s %s" % (case, out, r.stderr[-2000:]))
    return out


def stored_messages(t, chat_id):
    return t.psql("SELECT role, type, content FROM messages WHERE "
                  "chat_id = '%s' ORDER BY seq" % chat_id)


def test_stream():
    t = cluster()
    out = sdk(t, "stream", "SDK stream 今天")
    ev = out["events"]
    h.eq(ev[:2], ["conversation.chat.created",
                  "conversation.chat.in_progress"], "first events")
    h.eq(ev[-2:], ["conversation.chat.completed", "done"], "last events")
    h.check("conversation.message.delta" in ev, "deltas in %s" % ev)
    h.eq(out["deltas"], out["completed"]["content"],
         "deltas add up to the completed message")
    msgs = [(m["role"], m["type"], m["content"]) for m in out["messages"]]
    h.eq(msgs, [("user", "question", "SDK stream 今天"),
                ("assistant", "answer", out["completed"]["content"])],
         "messages.list after the stream")
    rows = stored_messages(t, out["chat"]["id"])
    h.eq([tuple(r) for r in rows], msgs, "PostgreSQL messages")


def test_create_and_poll():
    t = cluster()
    out = sdk(t, "poll", "SDK poll")
    h.eq(out["chat"]["status"], "completed", "polled chat status")
    ans = [m for m in out["messages"] if m["type"] == "answer"]
    h.eq(len(ans), 1, "one answer in %r" % out["messages"])
    h.check("query=SDK poll" in ans[0]["content"], "answer %r" % ans[0])
    rows = t.psql("SELECT status FROM chats WHERE chat_id = '%s'" %
                  out["chat"]["id"])
    h.eq(rows, [["completed"]], "the chat's row")


def test_cancel():
    t = cluster()
    out = sdk(t, "cancel", "[sim:delay=3000] SDK cancel")
    h.eq(out["canceled"]["status"], out["canceledStatus"],
         "chat.cancel answer")
    h.eq(out["after"]["status"], "canceled", "chat.retrieve after cancel")
    h.eq(out["after"]["id"], out["created"]["id"], "same chat")


def test_error():
    t = cluster()
    out = sdk(t, "error")
    h.eq(out.get("threw"), True, "an unknown bot throws: %r" % out)
    h.eq(out.get("code"), 4006, "the SDK sees Coze's code: %r" % out)
    h.check(out.get("logid"), "the SDK sees the logid: %r" % out)


if __name__ == "__main__":
    h.main(globals())
