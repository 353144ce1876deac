# SPDX-License-Identifier: ISC
"""storage plugins: troupe-storage alone against a private Redis and
PostgreSQL (tests/integration/harness.py), driven through its mailbox by
storage_drive (as troupectl and as a worker).

Checked: schema v3 (the plugins table), plugin.add (an upsert; answer
without the secret), plugin.list (no secrets, 404 for an unknown bot),
plugin.rm (404 for an unknown plugin or bot), every validation error,
the limit of plugins per bot, the cascade when the bot is removed,
CTX_REPLY.plugins (the bot's plugins with their secrets, "[]" if none),
and that add and rm forget the cached bot at once: bot_cache_ms is a
minute here, and a change made behind storage's back stays invisible.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "..", "integration"))
import harness as h  # noqa: E402
import storage_v3_test as v3  # noqa: E402

BOT = "plug-bot"
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string"},
                         "days": {"type": "integer", "default": None}},
          "required": ["city"]}


def cluster():
    t = h.troupe(conf={"storage": {"bot_cache_ms": 60000}},
                 services=["storage"])
    if not getattr(t, "plug_bot", False):
        h.wait_for(lambda: admin(t, "bot.add", {
            "id": BOT, "upstream": t.sim_url})["status"] == 0,
            15, 0.2, "bot.add to succeed")
        t.plug_bot = True
    return t


def admin(t, op, args=None):
    return v3.admin(t, op, args)


def ctx(t, bot=BOT):
    r = v3.one(t, {"cmd": "ctx", "bot_id": bot, "conversation_id": ""})
    h.eq((r["status"], r["code"]), (200, 0), "CTX_GET (%r)" % r)
    return json.loads(r["plugins"])


def add(t, **kw):
    args = {"bot_id": BOT, "name": "weather",
            "url": "http://127.0.0.1:9/plugin/weather"}
    args.update(kw)
    return admin(t, "plugin.add", args)


def ok(r, what):
    h.eq(r["status"], 0, "%s (%r)" % (what, r))
    return json.loads(r["text"])


def refused(r, status, word, what):
    h.eq(r["status"], status, "%s: status (%r)" % (what, r))
    h.check(word in r["text"], "%s: %r lacks %r" % (what, r["text"], word))


# ------------------------------------------------------------------ tests

def test_schema_v3():
    t = cluster()
    h.eq(t.psql("SELECT max(version) FROM schema_migrations"), [["3"]],
         "schema version")
    cols = t.psql("SELECT column_name, data_type FROM"
                  " information_schema.columns WHERE table_name ="
                  " 'plugins' ORDER BY ordinal_position")
    h.eq([c[0] for c in cols],
         ["bot_id", "name", "url", "description", "parameters",
          "auth_kind", "auth_header", "auth_secret", "timeout_ms",
          "created_at", "updated_at"], "plugins columns")
    h.eq(dict(cols)["parameters"], "jsonb", "parameters type")


def test_add_list_rm_and_ctx():
    t = cluster()
    h.eq(ctx(t), [], "CTX_REPLY.plugins of a bot without plugins")
    p = ok(add(t, description="Weather of a city",
               parameters=json.dumps(SCHEMA), auth="token",
               header="X-Api-Key", secret="s3cret", timeout_ms=2500),
           "plugin.add")
    h.eq((p["bot_id"], p["name"], p["url"], p["description"],
          p["parameters"], p["auth"], p["header"], p["secret"],
          p["timeout_ms"], p["created"]),
         (BOT, "weather", "http://127.0.0.1:9/plugin/weather",
          "Weather of a city", SCHEMA, "token", "X-Api-Key", "set", 2500,
          True), "plugin.add answer")
    h.check("s3cret" not in json.dumps(p), "secret in the add answer")
    # The cached bot (loaded by the first ctx) was forgotten.
    got = ctx(t)
    h.eq(got, [{"name": "weather",
                "url": "http://127.0.0.1:9/plugin/weather",
                "description": "Weather of a city", "parameters": SCHEMA,
                "auth": "token", "header": "X-Api-Key", "secret": "s3cret",
                "timeout_ms": 2500}], "CTX_REPLY.plugins after add")

    # Defaults, and a second plugin: sorted by name.
    p = ok(add(t, name="a-clock", url="https://127.0.0.1:9/c"),
           "plugin.add with defaults")
    h.eq((p["description"], p["parameters"], p["auth"], p["timeout_ms"],
          "secret" in p),
         ("", {"type": "object", "properties": {}}, "none", 5000, False),
         "defaults")
    got = ctx(t)
    h.eq([g["name"] for g in got], ["a-clock", "weather"], "two plugins")
    h.eq((got[0]["auth"], got[0]["secret"], got[0]["header"]),
         ("none", "", "Authorization"), "auth none in CTX_REPLY")

    # plugin.list: no secrets.
    r = admin(t, "plugin.list", {"bot_id": BOT})
    lst = ok(r, "plugin.list")
    h.eq([(x["name"], x.get("secret")) for x in lst],
         [("a-clock", None), ("weather", "set")], "list")
    h.check("s3cret" not in r["text"], "secret listed")
    h.check(all(isinstance(x["created_at"], int) for x in lst),
            "created_at %r" % lst)

    # Upsert: replaces every field.
    p = ok(add(t, url="http://127.0.0.1:9/v2", auth="hmac",
               secret="k2"), "plugin.add again")
    h.eq((p["created"], p["url"], p["auth"], p["description"],
          p["timeout_ms"]), (False, "http://127.0.0.1:9/v2", "hmac", "",
                             5000), "upsert answer")
    w = [g for g in ctx(t) if g["name"] == "weather"][0]
    h.eq((w["url"], w["auth"], w["secret"]),
         ("http://127.0.0.1:9/v2", "hmac", "k2"), "CTX_REPLY after upsert")

    # rm
    h.eq(ok(admin(t, "plugin.rm", {"bot_id": BOT, "name": "weather"}),
            "plugin.rm"), {"removed": True}, "rm answer")
    h.eq([g["name"] for g in ctx(t)], ["a-clock"], "CTX_REPLY after rm")
    refused(admin(t, "plugin.rm", {"bot_id": BOT, "name": "weather"}),
            404, "plugin not found", "rm twice")
    refused(admin(t, "plugin.rm", {"bot_id": "nobot", "name": "weather"}),
            404, "bot not found", "rm on an unknown bot")
    refused(admin(t, "plugin.list", {"bot_id": "nobot"}), 404,
            "bot not found", "list of an unknown bot")
    refused(add(t, bot_id="nobot"), 404, "bot not found",
            "add to an unknown bot")
    ok(admin(t, "plugin.rm", {"bot_id": BOT, "name": "a-clock"}), "rm")
    h.eq(ctx(t), [], "CTX_REPLY.plugins empty again")


def test_cache_is_used_and_invalidated():
    """With bot_cache_ms a minute, a row written behind storage's back
    stays unseen; a plugin.add or plugin.rm through storage shows at
    once (so the test above really saw the invalidation)."""
    t = cluster()
    h.eq(ctx(t), [], "no plugins")
    t.psql("INSERT INTO plugins (bot_id, name, url) VALUES"
           " ('%s', 'sneaky', 'http://127.0.0.1:9/s')" % BOT)
    h.eq(ctx(t), [], "cached copy served (no invalidation without storage)")
    ok(add(t, name="visible", url="http://127.0.0.1:9/v"), "add")
    h.eq([g["name"] for g in ctx(t)], ["sneaky", "visible"],
         "add invalidated the cached bot")
    t.psql("DELETE FROM plugins WHERE name = 'sneaky'")
    h.eq(len(ctx(t)), 2, "cached again")
    ok(admin(t, "plugin.rm", {"bot_id": BOT, "name": "visible"}), "rm")
    h.eq(ctx(t), [], "rm invalidated the cached bot")


def test_validation():
    t = cluster()
    base = {"bot_id": BOT, "name": "p", "url": "http://127.0.0.1:9/p"}
    cases = [
        ({"name": None}, "name is required"),
        ({"name": "has space"}, "name must be"),
        ({"name": "x" * 65}, "name"),
        ({"name": "dot.ted"}, "name must be"),
        ({"bot_id": None}, "bot_id is required"),
        ({"bot_id": "a:b"}, "bot_id must be"),
        ({"url": None}, "url is required"),
        ({"url": "ftp://x"}, "http"),
        ({"url": "http://"}, "http"),
        ({"url": "http://a b"}, "http"),
        ({"parameters": "{"}, "not valid JSON (at line 1, column 2)"),
        ({"parameters": "{\n\"a\": tru}"}, "at line 2"),
        ({"parameters": "[1]"}, "must be a JSON object"),
        ({"parameters": 7}, "JSON Schema object"),
        ({"parameters": '{"type":"string"}'}, "\"type\" must be"),
        ({"parameters": '{"properties":[]}'}, "\"properties\""),
        ({"parameters": '{"required":"city"}'}, "\"required\""),
        ({"parameters": '{"a":1} x'}, "not valid JSON"),
        ({"parameters": json.dumps({"d": "x" * 33000})}, "32768"),
        ({"auth": "basic"}, "auth must be none, token or hmac"),
        ({"auth": "token"}, "auth token needs a secret"),
        ({"auth": "hmac", "secret": ""}, "needs a secret"),
        ({"secret": "s"}, "secret is only for auth token or hmac"),
        ({"auth": "token", "secret": "a\nb"}, "printable ASCII"),
        ({"auth": "hmac", "secret": "s", "header": "X-K"},
         "header is only for auth token"),
        ({"auth": "token", "secret": "s", "header": "X K"},
         "HTTP header name"),
        ({"timeout_ms": 0}, "1..600000"),
        ({"timeout_ms": 600001}, "1..600000"),
        ({"timeout_ms": 1.5}, "1..600000"),
        ({"timeout_ms": "5"}, "integer"),
        ({"description": 3}, "string"),
        ({"extra": 1}, "unknown field \"extra\""),
    ]
    for over, word in cases:
        args = dict(base)
        for k, v in over.items():
            if v is None:
                args.pop(k, None)
            else:
                args[k] = v
        refused(admin(t, "plugin.add", args), 400, word, "add %r" % over)
    refused(admin(t, "plugin.list", {"bot_id": BOT, "name": "p"}), 400,
            "unknown field", "list with a name")
    refused(admin(t, "plugin.rm", {"bot_id": BOT}), 400,
            "name is required", "rm without a name")
    refused(admin(t, "plugin.frob", {}), 400, "unknown op", "unknown op")
    refused(admin(t, "plugin.add", "not json"), 400, "JSON object",
            "args not JSON")
    # PostgreSQL's own refusal of the JSON (jsonb has no \u0000) is the
    # operator's to fix: 400, not 500.
    refused(add(t, parameters='{"a":"\\u0000"}'), 400, "PostgreSQL",
            "NUL escape")
    h.eq(t.psql("SELECT count(*) FROM plugins WHERE bot_id = '%s'" % BOT),
         [["0"]], "nothing stored by refused adds")
    # Limits that pass: 64-character name, 600000 ms, the schema as an
    # object rather than text.
    ok(add(t, name="n" * 64, timeout_ms=600000, parameters=SCHEMA),
       "limits")
    ok(admin(t, "plugin.rm", {"bot_id": BOT, "name": "n" * 64}), "rm")


def test_limit_per_bot():
    t = cluster()
    bot = "many-plugins"
    ok(admin(t, "bot.add", {"id": bot, "upstream": t.sim_url}), "bot")
    t.psql("INSERT INTO plugins (bot_id, name, url) SELECT '%s',"
           " 'p' || i, 'http://127.0.0.1:9/p' FROM generate_series(1, 128)"
           " i" % bot)
    refused(add(t, bot_id=bot, name="one-more"), 409, "128 plugins",
            "129th plugin")
    r = ok(add(t, bot_id=bot, name="p7", url="http://127.0.0.1:9/new"),
           "replacing one of the 128")
    h.eq(r["created"], False, "replaced")
    h.eq(len(ctx(t, bot)), 128, "CTX_REPLY carries all 128")


def test_cascade_on_bot_rm():
    t = cluster()
    bot = "doomed-bot"
    ok(admin(t, "bot.add", {"id": bot, "upstream": t.sim_url}), "bot")
    ok(add(t, bot_id=bot), "plugin")
    h.eq(len(ctx(t, bot)), 1, "plugin in CTX_REPLY")
    ok(admin(t, "bot.rm", {"id": bot}), "bot.rm")
    h.eq(t.psql("SELECT count(*) FROM plugins WHERE bot_id = '%s'" % bot),
         [["0"]], "plugins removed with their bot")
    ok(admin(t, "bot.add", {"id": bot, "upstream": t.sim_url}), "re-add")
    h.eq(ok(admin(t, "plugin.list", {"bot_id": bot}), "list"), [],
         "a bot added again starts without plugins")
    h.eq(ctx(t, bot), [], "and so does its CTX_REPLY")


def test_pg_down():
    t = cluster()
    t.stop_pg()
    try:
        for op, args in (("plugin.list", {"bot_id": BOT}),
                         ("plugin.add", {"bot_id": BOT, "name": "x",
                                         "url": "http://127.0.0.1:9"}),
                         ("plugin.rm", {"bot_id": BOT, "name": "x"})):
            h.eq(admin(t, op, args)["status"], 503, op)
    finally:
        t.start_pg()


if __name__ == "__main__":
    h.main(globals())
