# SPDX-License-Identifier: ISC
"""Locust load for POST /v1/bot/chat (run headless by tests/bench/bench.py).

FastHttpUser; each simulated user signs its HS256 JWT once (on_start) with
the secret in TROUPE_BENCH_SECRET and sends the issue's request with a
history_id of its own.  Host: --host (the bench gives 127.0.0.1 only).
"""
import base64
import hashlib
import hmac
import json
import os
import time
import uuid

from locust import constant, task
from locust.contrib.fasthttp import FastHttpUser


def _b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(secret, sub, ttl=3600):
    now = int(time.time())
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"},
                           separators=(",", ":")).encode())
    claims = _b64(json.dumps({"sub": sub, "iat": now, "exp": now + ttl},
                             separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), (head + "." + claims).encode(),
                   hashlib.sha256).digest()
    return head + "." + claims + "." + _b64(sig)


class ChatUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.user = "u_%s" % uuid.uuid4().hex[:8]
        self.headers = {
            "Authorization": "Bearer " + make_jwt(
                os.environ["TROUPE_BENCH_SECRET"], self.user),
            "Content-Type": "application/json",
        }
        self.body = json.dumps({
            "bot_id": os.environ["TROUPE_BENCH_BOT"],
            "user_id": self.user,
            "query": "今天北京天气怎么样?",
            "history_id": "locust-" + self.user,
        })

    @task
    def chat(self):
        with self.client.post("/v1/bot/chat", data=self.body,
                              headers=self.headers,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure("HTTP %s" % r.status_code)
