# SPDX-License-Identifier: ISC
"""52: a bot's plugins in a v3 run, end to end: plugins registered with
troupectl, the (simulated) model asking for tools, the calls made in
parallel to webhooks served by troupe-upstream-sim (no auth, and HMAC with
a secret the simulator checks), every failure given back to the model,
the stream and the stored messages the same, and a cancel during a slow
plugin aborting its request (the simulator counts it).
"""
import importlib.util
import os
import time

import harness as h

_spec = importlib.util.spec_from_file_location(
    "v3", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "50_v3_chat.py"))
v3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v3)

SECRET = "plugin-secret-for-tests"


def cluster():
    t = h.troupe(conf={"edge": {"chat_timeout_ms": 15000}},
                 sim_args=["--plugin-secret", SECRET])
    if not getattr(t, "plugins", False):
        t.add_bot()
        base = t.sim_url.rstrip("/") + "/plugin/"
        t.ctl("plugin", "add", h.DEMO_BOT, "echo", "--url", base + "echo",
              "--description", "echoes its arguments", "--schema",
              '{"type":"object","properties":{"query":{"type":"string"}}}',
              "--auth", "token", "--secret", SECRET)
        t.ctl("plugin", "add", h.DEMO_BOT, "mac", "--url", base + "mac",
              "--auth", "hmac", "--secret", SECRET, "--timeout-ms", "1000")
        t.plugins = True
    return t


def completed(ev):
    return [d for e, d in ev if e == "conversation.message.completed"]


def test_tools_in_parallel_and_stored():
    t = cluster()
    out = t.ctl("plugin", "list", h.DEMO_BOT).stdout
    h.check("echo" in out and "mac" in out and SECRET not in out,
            "plugin list (secrets never shown): %r" % out)
    s = v3.Stream(t, v3.chat_body(
        "weather? [sim:tool=echo][sim:tool=mac][sim:tool=nope]", True))
    ev = s.all()
    h.eq(v3.names(ev)[-2:], ["conversation.chat.completed", "done"],
         "the chat completes")
    msgs = completed(ev)
    kinds = [m["type"] for m in msgs]
    h.eq(kinds, ["function_call"] * 3 + ["tool_response"] * 3 + ["answer"],
         "three calls, three results, then the answer")
    results = [m["content"] for m in msgs if m["type"] == "tool_response"]
    h.check('"plugin":"echo"' in results[0].replace(" ", ""),
            "echo answered (token accepted): %r" % results[0])
    h.check('"plugin":"mac"' in results[1].replace(" ", ""),
            "mac answered (HMAC accepted): %r" % results[1])
    h.check("error" in results[2] and "nope" in results[2],
            "the unknown tool is an error given to the model: %r" %
            results[2])
    answer = msgs[-1]["content"]
    h.check("tools=3" in answer, "the model saw three results: %r" % answer)
    chat = ev[0][1]
    r = v3.messages(t, chat["conversation_id"], chat["id"])
    h.eq(r.status, 200, "message list %r" % r)
    h.eq([(m["type"], m["content"]) for m in r.data
          if m["type"] != "question"],
         [(m["type"], m["content"]) for m in msgs], "stored == streamed")
    st = v3.sim_stats(t)["plugins"]
    h.eq(st["echo"].get("unauthorized", 0), 0, "no refused plugin call")


def test_plugin_failures_reach_the_model():
    t = cluster()
    s = v3.Stream(t, v3.chat_body(
        "[sim:tool=mac] [plugin:mac:delay=3000]", True))
    ev = s.all()
    h.eq(v3.names(ev)[-1], "done", "ends")
    res = [m["content"] for m in completed(ev)
           if m["type"] == "tool_response"]
    h.eq(len(res), 1, "one result")
    h.check("error" in res[0], "a plugin past its 1 s timeout is an "
            "error result: %r" % res[0])
    for directive in ("[plugin:status=500]", "[plugin:garbage]"):
        ev = v3.Stream(t, v3.chat_body("[sim:tool=echo] " + directive,
                                       True)).all()
        res = [m["content"] for m in completed(ev)
               if m["type"] == "tool_response"]
        h.check(res and "error" in res[0], "%s gives an error result: %r"
                % (directive, res))
        h.eq(v3.names(ev)[-2], "conversation.chat.completed",
             "%s: the chat still completes" % directive)
    ev = v3.Stream(t, v3.chat_body("[sim:tool=echo] [sim:badargs]",
                                   True)).all()
    res = [m["content"] for m in completed(ev)
           if m["type"] == "tool_response"]
    h.check(res and "error" in res[0], "broken arguments: %r" % res)


def test_cancel_aborts_a_slow_plugin():
    t = cluster()
    aborted0 = v3.sim_stats(t)["plugins"].get("echo", {}).get("aborted", 0)
    s = v3.Stream(t, v3.chat_body("slow [sim:tool=echo] [plugin:delay=8000]",
                                  True))
    chat = s.next()[1]
    h.wait_for(lambda: v3.sim_stats(t).get("plugin_in_flight") == 1, 5,
               0.05, "the plugin call to be in flight")
    t0 = time.monotonic()
    r = v3.cancel(t, chat["conversation_id"], chat["id"])
    h.eq((r.status, r.data["status"]), (200, "canceled"), "cancel %r" % r)
    h.wait_for(lambda: v3.sim_stats(t)["plugins"]["echo"]["aborted"] >
               aborted0, 3, 0.05, "the simulator to see the plugin call "
               "aborted")
    ev = s.all()
    h.eq(v3.names(ev)[-2:], ["conversation.chat.canceled", "done"],
         "the stream ends canceled")
    h.check(time.monotonic() - t0 < 3, "cancel took effect at once")


if __name__ == "__main__":
    h.main(globals())
