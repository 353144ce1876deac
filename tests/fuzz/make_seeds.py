#!/usr/bin/env python3
# SPDX-License-Identifier: ISC
"""Write the seed corpora of tests/fuzz (corpus/<harness>/<name>).

Run from anywhere: python3 tests/fuzz/make_seeds.py.  The seeds are
committed; this script says where each came from and writes them again
when a message or a format changes.  Message bodies are read from
proto/bodies.def and proto/messages.def, so every body and message type
gets a seed of its own.
"""
import base64
import hashlib
import hmac
import json
import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


# ---- a minimal msgpack writer (what proto's packers emit) ----
def mp(v):
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if v >= 0:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, (str, bytes)):
        b = v.encode() if isinstance(v, str) else v
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        if len(b) < 256:
            return b"\xd9" + bytes([len(b)]) + b
        return b"\xda" + struct.pack(">H", len(b)) + b
    if isinstance(v, list):
        if len(v) < 16:
            head = bytes([0x90 | len(v)])
        else:
            head = b"\xdc" + struct.pack(">H", len(v))
        return head + b"".join(mp(x) for x in v)
    if isinstance(v, RawBody):
        return v.b
    raise TypeError(v)


class RawBody:
    def __init__(self, b):
        self.b = b


def bodies():
    """[(name, [(type, field, opt)])] in bodies.def order."""
    out, cur = [], None
    for line in open(os.path.join(ROOT, "proto", "bodies.def")):
        m = re.match(r"BODY_BEGIN\((\w+)\)", line)
        if m:
            cur = (m.group(1), [])
            out.append(cur)
            continue
        m = re.match(r"(FIELD|OPT)\((\w+), (\w+), (\w+)\)", line)
        if m and cur:
            cur[1].append((m.group(3), m.group(4), m.group(1) == "OPT"))
    return out


def messages():
    """[(name, id, body)] from messages.def."""
    out = []
    for line in open(os.path.join(ROOT, "proto", "messages.def")):
        m = re.match(r"MSG\((\w+),\s*(0x[0-9a-f]+),\s*\w+,\s*(\w+),", line)
        if m:
            out.append((m.group(1), int(m.group(2), 16), m.group(3)))
    return out


SAMPLE = {
    "route": "v1.chat", "bot_id": "7392a8b4-xxxx-4f2c-b9d2-xxxxxxxxxxxx",
    "user_id": "u_123456", "query": "hello", "history_id": "h_abcdef123",
    "chat_id": "7400000000000000001", "messages":
    '[{"role":"user","type":"question","content":"hi",'
    '"content_type":"text"}]', "scopes": "chat,read",
    "upstream": "http://127.0.0.1:9090", "key": "sub-1|bot|v1.chat",
    "service": "storage", "cause": "postgres writer down",
    "text": "troupe_x_total 1\n", "spans": "", "op": "status", "args": "{}",
    "hash": "0" * 64, "sse": "event: done\ndata: \"[DONE]\"\n\n",
}


def sample_body(fields, with_opt=True):
    vals = []
    for t, f, opt in fields:
        if opt and not with_opt:
            break
        if t == "STR":
            vals.append(SAMPLE.get(f, f))
        elif t == "I64":
            vals.append(-1)
        else:
            vals.append(7)
    return mp(vals)


def write(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def envelope(mtype, body, seq=1):
    return mp([1, mtype, seq, "20261122-0000000001", "00-" + "a" * 32 +
               "-" + "b" * 16 + "-01", 1800000000000, "edge",
               RawBody(body)])


def main():
    bl = bodies()
    byname = {n: f for n, f in bl}
    # fuzz_body: selector byte + the body, whole and without OPT fields
    for i, (name, fields) in enumerate(bl):
        write("fuzz_body", name, bytes([i]) + sample_body(fields))
        if any(o for _, _, o in fields):
            write("fuzz_body", name + "-old",
                  bytes([i]) + sample_body(fields, with_opt=False))
    # fuzz_envelope: one batch per message type, and one with several
    head = mp(["trp", 1, "edge", 12345, 0])
    batch = head
    for seq, (name, mid, body) in enumerate(messages(), 1):
        env = envelope(mid, sample_body(byname[body]), seq)
        write("fuzz_envelope", name.lower(), head + env)
        batch += env
    write("fuzz_envelope", "batch-all", batch)

    # fuzz_chat_json: selector byte 0 v1, 1 v3, 2 ids, 3 query parameter,
    # 4 tracestate
    v1 = {"bot_id": SAMPLE["bot_id"], "user_id": "u_1", "query":
          "今天北京天气怎么样?", "history_id": "h_1"}
    write("fuzz_chat_json", "v1", b"\x00" + json.dumps(v1).encode())
    v3 = {"bot_id": SAMPLE["bot_id"], "user_id": "u_1", "stream": True,
          "auto_save_history": True, "additional_messages": [
              {"role": "user", "content": "hi", "content_type": "text"},
              {"role": "assistant", "type": "answer", "content": "hello"},
              {"role": "user", "content": "weather?"}]}
    write("fuzz_chat_json", "v3", b"\x01" + json.dumps(v3).encode())
    write("fuzz_chat_json", "ids",
          b"\x02conversation_id=7400000000000000001&chat_id=74000000000"
          b"00000002\n{\"chat_id\":\"7400000000000000003\"}")
    write("fuzz_chat_json", "query", b"\x03plugin\nplugin=w%20x+y&a=b")
    write("fuzz_chat_json", "tracestate",
          b"\x04rojo=00f067aa0ba902b7, ,congo=t61rcWkgMzE,fw529a3039@dt=a b,"
          + b",".join(b"m%d=%s" % (i, b"v" * 140) for i in range(4)))

    # fuzz_jwt: 0 a token as given, 1 header/claims JSON signed by the
    # harness, 2 base64 signing input signed by the harness
    hdr = '{"alg":"HS256","typ":"JWT"}'
    claims = '{"sub":"user-1","exp":1900000000,"iat":1690000000}'
    write("fuzz_jwt", "signed-json", "\x01" + hdr + "\n" + claims)
    b64 = (base64.urlsafe_b64encode(hdr.encode()).rstrip(b"=") + b"." +
           base64.urlsafe_b64encode(claims.encode()).rstrip(b"="))
    write("fuzz_jwt", "signed-b64", b"\x02" + b64)
    sig = base64.urlsafe_b64encode(hmac.new(
        b"another-key-another-key-another-key", b64,
        hashlib.sha256).digest()).rstrip(b"=")
    write("fuzz_jwt", "foreign", b"\x00" + b64 + b"." + sig)
    write("fuzz_jwt", "alg-none", b"\x01" + b'{"alg":"none"}\n' +
          claims.encode())
    write("fuzz_jwt", "api-key", b"\x00pat_" + b"A1b2" * 10)

    # fuzz_sse: even first byte: stream with cut sizes; odd: whole answer
    def chunk(delta, finish=None, usage=None):
        c = {"id": "c1", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            c["usage"] = usage
        return "data: " + json.dumps(c) + "\n\n"
    stream = (": keep-alive\n\n" + chunk({"role": "assistant"}) +
              chunk({"content": "Hel"}) + chunk({"content": "lo"}) +
              chunk({}, "stop", {"prompt_tokens": 3,
                                 "completion_tokens": 2}) +
              "data: [DONE]\n\n")
    write("fuzz_sse", "stream", b"\x00\x03\x05\x11\x40" + stream.encode())
    tools = (chunk({"tool_calls": [{"index": 0, "id": "call_1", "type":
                                    "function", "function": {
                                        "name": "weather", "arguments":
                                        "{\"ci"}}]}) +
             chunk({"tool_calls": [{"index": 0, "function": {
                 "arguments": "ty\":\"Beijing\"}"}}]}) +
             chunk({}, "tool_calls") + "data: [DONE]\r\n\r\n")
    write("fuzz_sse", "tools", b"\x00\x00" + tools.encode())
    write("fuzz_sse", "error", b"\x00\x00" + b'data: {"error":{"message":'
          b'"overloaded","type":"server_error"}}\n\n')
    whole = {"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 1,
                                              "completion_tokens": 1}}
    write("fuzz_sse", "whole", b"\x01\n" + json.dumps(whole).encode())
    write("fuzz_sse", "whole-429", b"\x07" + b"2\n" +
          b'{"error":{"message":"rate limited","code":"rate_limit"}}')

    # fuzz_ratelimit: one seed per dialect
    write("fuzz_ratelimit", "status-retry-after",
          "status 429\nRetry-After: 7\n")
    write("fuzz_ratelimit", "retry-after-date",
          "status 503\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT\n")
    write("fuzz_ratelimit", "x-ratelimit",
          "X-RateLimit-Limit: 100\nX-RateLimit-Remaining: 0\n"
          "X-RateLimit-Reset: 30\n")
    write("fuzz_ratelimit", "ietf-old",
          "RateLimit: limit=100, remaining=0, reset=5\n"
          "RateLimit-Policy: 100;w=60\n")
    write("fuzz_ratelimit", "ietf-sf",
          'RateLimit: "default";r=0;t=12\n'
          'RateLimit-Policy: "default";q=100;w=60\n')
    write("fuzz_ratelimit", "openai",
          "x-ratelimit-limit-requests: 60\nx-ratelimit-remaining-requests: 0"
          "\nx-ratelimit-reset-requests: 6m0s\nx-ratelimit-remaining-tokens:"
          " 1200\nx-ratelimit-reset-tokens: 20ms\n")
    write("fuzz_ratelimit", "coze", "status 200\ncode 4013\n")
    write("fuzz_ratelimit", "timeout", "timeout\n")

    # fuzz_webhook: odd first byte: the harness signs the call
    body = json.dumps({"user_id": "u_1", "bot_id": "bot-1", "arguments":
                       {"city": "Beijing"}})
    write("fuzz_webhook", "signed", "\x01bot-1\n1700000000\nnonce-1\n\n"
          "weather\n" + body)
    write("fuzz_webhook", "unsigned", "\x00bot-1\n1700000000\nnonce-1\n" +
          "0" * 40 + "\nweather\n" + body)

    # fuzz_conf: the shipped configuration and some edge cases
    conf = os.path.join(ROOT, "etc", "troupe.conf.example")
    if os.path.exists(conf):
        write("fuzz_conf", "troupe.conf", open(conf, "rb").read())
    write("fuzz_conf", "small", "[edge]\nlisten = 127.0.0.1:8080\n"
          "; comment\n# comment\n[dispatcher]\nworkers_max=8\n")
    write("fuzz_conf", "bad", "[edge\nkey\n=value\n")


if __name__ == "__main__":
    main()
