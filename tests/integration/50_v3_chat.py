# SPDX-License-Identifier: ISC
"""50: Coze's v3 chat API over raw HTTP: streams, polling, the stored
messages, one chat per conversation, cancel, client disconnects, API keys
and bad input.

Every stream is read event by event from the socket; what the client saw
is compared with what /v3/chat/message/list and PostgreSQL hold, and the
simulator's counters show that a cancelled run's upstream request was
aborted.
"""
import http.client
import json
import socket
import threading
import time

import harness as h

SLOW_MS = 3000          # [sim:delay] of a run we cancel or collide with


def cluster():
    t = h.troupe(conf={"edge": {"chat_timeout_ms": 15000},
                       "auth": {"key_cache_ms": 300}},
                 workers_min=2, workers_max=4)
    if not getattr(t, "demo_bot", False):
        t.add_bot()
        t.demo_bot = True
    return t


def auth(t, token=None):
    return {"Authorization": "Bearer " + (token or t.token())}


def chat_body(query, stream, bot_id=h.DEMO_BOT, user_id="u_v3"):
    return {"bot_id": bot_id, "user_id": user_id, "stream": stream,
            "additional_messages": [{"role": "user", "content": query,
                                     "content_type": "text"}]}


class Stream:
    """A /v3/chat stream read event by event."""

    def __init__(self, t, body, conv=None, token=None, timeout=20):
        self.conn = http.client.HTTPConnection("127.0.0.1", t.edge_port,
                                               timeout=timeout)
        path = "/v3/chat" + ("?conversation_id=%s" % conv if conv else "")
        hd = {"Content-Type": "application/json"}
        hd.update(auth(t, token))
        self.conn.request("POST", path, json.dumps(body).encode(), hd)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.events = []

    def next(self):
        """The next (event, data) or None at the end of the stream."""
        ev, data = None, None
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.decode("utf-8").rstrip("\r\n")
            if line == "":
                if ev is not None:
                    e = (ev, json.loads(data) if data else None)
                    self.events.append(e)
                    return e
                continue
            k, _, v = line.partition(":")
            if k == "event":
                ev = v.strip()
            elif k == "data":
                data = v

    def all(self):
        while self.next() is not None:
            pass
        self.conn.close()
        return self.events

    def close(self):
        self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def names(events):
    return [e for e, _ in events]


def sim_stats(t):
    r = h.http_request(t.sim_port, "GET", "/sim/stats")
    return r.json


def retrieve(t, conv, chat, token=None, method="POST"):
    return h.http_request(
        t.edge_port, method,
        "/v3/chat/retrieve?conversation_id=%s&chat_id=%s" % (conv, chat),
        None, auth(t, token))


def messages(t, conv, chat, token=None):
    return h.http_request(
        t.edge_port, "GET",
        "/v3/chat/message/list?conversation_id=%s&chat_id=%s" % (conv, chat),
        None, auth(t, token))


def cancel(t, conv, chat, token=None):
    return t.post("/v3/chat/cancel",
                  {"conversation_id": conv, "chat_id": chat}, auth(t, token))


def wait_status(t, conv, chat, want, timeout=10):
    last = []

    def ok():
        r = retrieve(t, conv, chat)
        last[:] = [r]
        return r.status == 200 and r.data and r.data.get("status") in want
    h.wait_for(ok, timeout, 0.1, "chat %s status in %s (last %r)" %
               (chat, want, last))
    return last[0].data


def test_stream_events_in_order():
    t = cluster()
    s = Stream(t, chat_body("今天北京天气怎么样?", True))
    h.eq(s.status, 200, "stream status")
    h.check(s.headers.get("content-type", "").startswith(
        "text/event-stream"), "content-type %r" % s.headers)
    h.check(s.headers.get("x-tt-logid"), "X-Tt-Logid on a stream")
    ev = s.all()
    n = names(ev)
    h.eq(n[:2], ["conversation.chat.created",
                 "conversation.chat.in_progress"], "first events")
    h.eq(n[-3:], ["conversation.message.completed",
                  "conversation.chat.completed", "done"], "last events")
    deltas = [d for e, d in ev if e == "conversation.message.delta"]
    h.check(len(deltas) >= 1, "no delta in %s" % n)
    h.eq(ev[-1][1], "[DONE]", "done's data")
    chat = ev[0][1]
    conv, chat_id = chat["conversation_id"], chat["id"]
    h.check(conv.isdigit() and chat_id.isdigit(), "string numeric ids %r"
            % chat)
    for e, d in ev[:-1]:
        h.eq(d["conversation_id"], conv, "%s conversation_id" % e)
    answer = ev[-3][1]
    h.eq("".join(d["content"] for d in deltas), answer["content"],
         "deltas add up to the completed message")
    h.check("query=今天北京天气怎么样?" in answer["content"],
            "the simulator's echo of the query: %r" % answer["content"])
    h.eq((answer["role"], answer["type"]), ("assistant", "answer"),
         "answer message")
    done = ev[-2][1]
    h.eq(done["status"], "completed", "chat.completed status")
    h.check(done["usage"]["token_count"] > 0, "usage %r" % done["usage"])
    # "completed" means stored: the message list matches what streamed.
    r = messages(t, conv, chat_id)
    h.eq(r.status, 200, "message list %r" % r)
    h.eq(r.code, 0, "message list code")
    got = [(m["role"], m["type"], m["content"]) for m in r.data]
    h.eq(got, [("user", "question", "今天北京天气怎么样?"),
               ("assistant", "answer", answer["content"])],
         "stored messages")
    h.eq(r.data[1]["id"], answer["id"], "answer id, streamed vs stored")
    r = retrieve(t, conv, chat_id)
    h.eq((r.status, r.data["status"]), (200, "completed"), "retrieve")
    rows = t.psql("SELECT status FROM chats WHERE chat_id = '%s'" % chat_id)
    h.eq(rows, [["completed"]], "the chat's row")


def test_poll_and_context():
    t = cluster()
    r = t.post("/v3/chat", chat_body("first turn", False), auth(t))
    h.eq(r.status, 200, "create %r" % r)
    h.eq(r.code, 0, "create code")
    h.check(r.data["status"] in ("created", "in_progress"),
            "non-stream create answers at once: %r" % r.data)
    conv, chat_id = r.data["conversation_id"], r.data["id"]
    d = wait_status(t, conv, chat_id, ("completed",))
    h.check(d.get("completed_at", 0) >= d["created_at"], "times %r" % d)
    # The same conversation: the model sees the first turn.
    s = Stream(t, chat_body("second turn", True), conv=conv)
    ev = s.all()
    answer = [d for e, d in ev if e == "conversation.message.completed"][0]
    h.check("context=2" in answer["content"],
            "second turn sees the first (user + assistant): %r" %
            answer["content"])
    h.eq(ev[0][1]["conversation_id"], conv, "conversation kept")


def test_one_chat_per_conversation():
    t = cluster()
    s = Stream(t, chat_body("[sim:delay=%d] slow" % SLOW_MS, True))
    first = s.next()
    h.eq(first[0], "conversation.chat.created", "first event")
    conv = first[1]["conversation_id"]
    r = t.post("/v3/chat?conversation_id=" + conv,
               chat_body("while busy", False), auth(t))
    h.check_error_shape(r, 409, 4016, "second chat in a busy conversation")
    s.all()
    h.eq(names(s.events)[-2:], ["conversation.chat.completed", "done"],
         "the slow chat completed")
    r = t.post("/v3/chat?conversation_id=" + conv,
               chat_body("after it", False), auth(t))
    h.eq(r.status, 200, "a chat after the first ended %r" % r)
    wait_status(t, conv, r.data["id"], ("completed",))


def test_cancel():
    t = cluster()
    aborted0 = sim_stats(t)["aborted"]
    r = t.post("/v3/chat", chat_body("[sim:delay=%d] cancel me" % SLOW_MS,
                                     False), auth(t))
    h.eq(r.status, 200, "create %r" % r)
    conv, chat_id = r.data["conversation_id"], r.data["id"]
    time.sleep(0.3)     # the upstream call is under way
    c = cancel(t, conv, chat_id)
    h.eq(c.status, 200, "cancel %r" % c)
    h.eq(c.data["status"], "canceled", "cancel answer")
    d = wait_status(t, conv, chat_id, ("canceled",))
    h.eq(d["id"], chat_id, "retrieve after cancel")
    h.wait_for(lambda: sim_stats(t)["aborted"] > aborted0, 5, 0.1,
               "the simulator to see its request aborted")
    # The conversation is free again, and a finished chat cannot be
    # cancelled.
    r = t.post("/v3/chat?conversation_id=" + conv,
               chat_body("after cancel", False), auth(t))
    h.eq(r.status, 200, "a chat after the cancel %r" % r)
    wait_status(t, conv, r.data["id"], ("completed",))
    c = cancel(t, conv, r.data["id"])
    h.check_error_shape(c, 409, 4202, "cancel after completion")


def test_client_disconnect_cancels():
    t = cluster()
    aborted0 = sim_stats(t)["aborted"]
    s = Stream(t, chat_body("[sim:delay=%d] leave" % SLOW_MS, True))
    first = s.next()
    conv, chat_id = first[1]["conversation_id"], first[1]["id"]
    s.close()
    wait_status(t, conv, chat_id, ("canceled",))
    h.wait_for(lambda: sim_stats(t)["aborted"] > aborted0, 5, 0.1,
               "the simulator to see its request aborted")


def test_concurrent_streams():
    t = cluster()
    out, errs = [], []

    def one(i):
        try:
            out.append(names(Stream(t, chat_body("s%d" % i, True)).all()))
        except Exception as e:      # noqa: BLE001
            errs.append(repr(e))
    ths = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    h.eq(errs, [], "errors")
    h.eq(len(out), 40, "streams finished")
    for n in out:
        h.eq(n[-2:], ["conversation.chat.completed", "done"], "stream end")


def test_bad_input():
    t = cluster()
    a = auth(t)
    r = h.http_request(t.edge_port, "POST", "/v3/chat", "{not json", a)
    h.check_error_shape(r, 400, 4000, "malformed JSON")
    b = chat_body("x", "yes")
    r = t.post("/v3/chat", b, a)
    h.check_error_shape(r, 400, 4000, "stream of the wrong type")
    h.check("stream" in r.json["msg"], "names the field: %r" % r.json)
    for bad in ([], "hi", [{"role": "user"}],
                [{"role": "robot", "content": "x"}],
                [{"role": "user", "content": 5}]):
        b = chat_body("x", True)
        b["additional_messages"] = bad
        r = t.post("/v3/chat", b, a)
        h.check_error_shape(r, 400, 4000, "additional_messages %r" % (bad,))
    r = t.post("/v3/chat", chat_body("x", True), {})
    h.check_error_shape(r, 401, 4100, "no token")
    r = t.post("/v3/chat", chat_body("x", True, bot_id="no-such-bot"), a)
    h.check_error_shape(r, 404, 4006, "unknown bot")
    r = retrieve(t, "12345", "67890")
    h.check_error_shape(r, 404, (4200, 4201), "unknown chat")
    r = messages(t, "12345", "67890")
    h.check_error_shape(r, 404, (4200, 4201), "list of an unknown chat")
    r = h.http_request(t.edge_port, "GET",
                       "/v3/chat/retrieve?conversation_id=1", None, a)
    h.check_error_shape(r, 400, 4000, "retrieve without chat_id")
    r = retrieve(t, "abc", "1")
    h.check_error_shape(r, 400, 4000, "a conversation id that is not one")
    r = cancel(t, "12345", "67890")
    h.check_error_shape(r, 404, 4201, "cancel of an unknown chat")


def test_api_keys():
    t = cluster()
    out = t.ctl("key", "add", "--name", "it", "--sub", "key-user",
                "--scopes", "chat").stdout
    key = [w for w in out.split() if w.startswith("pat_")]
    h.eq(len(key), 1, "one pat_ key printed: %r" % out)
    key = key[0]
    kid = json.dumps(out)   # for messages
    rows = t.psql("SELECT count(*) FROM api_keys WHERE hash LIKE '%%%s%%'"
                  % key[4:12])
    h.eq(rows, [["0"]], "the key itself is not stored (%s)" % kid)
    s = Stream(t, chat_body("with a key", True), token=key)
    ev = s.all()
    h.eq(names(ev)[-1], "done", "chat with an API key")
    conv, chat_id = ev[0][1]["conversation_id"], ev[0][1]["id"]
    r = retrieve(t, conv, chat_id, token=key)
    h.check_error_shape(r, 403, 4101, "retrieve with a chat-only key")
    r = t.post("/v1/bot/chat", {"bot_id": h.DEMO_BOT, "user_id": "u",
                                "query": "q"}, auth(t, key))
    h.check_error_shape(r, 401, 4100, "an API key on /v1/bot/chat")
    r = t.post("/v3/chat", chat_body("x", False), auth(t, "pat_" + "x" * 48))
    h.check_error_shape(r, 401, 4100, "an unknown key")
    lst = t.ctl("key", "list").stdout
    kline = [ln for ln in lst.splitlines() if "it" in ln.split()]
    h.check(kline, "key list shows it: %r" % lst)
    key_id = kline[0].split()[0]
    t.ctl("key", "revoke", key_id)
    h.wait_for(lambda: t.post("/v3/chat", chat_body("x", False),
                              auth(t, key)).status == 401, 5, 0.2,
               "a revoked key to be refused")


if __name__ == "__main__":
    h.main(globals())
