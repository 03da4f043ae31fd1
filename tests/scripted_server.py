"""A scripted HTTP server on 127.0.0.1 that stands in for a hosted OpenAI-compatible API's failures.

A hosted API's 5xx, 429, malformed bodies and hangs cannot be produced on demand here, so tests that
need them script the answers: `respond(body)` gets each POST's JSON body and returns
(status, body, headers, delay_s), or None to hang (the request is held and never answered).
The serving itself is `benchmarks.http_stub`, shared with the chaos benchmark's flaky proxy.
"""

from __future__ import annotations

import json
import time
from typing import Callable

from benchmarks.http_stub import Answer, HttpStub

Reply = tuple[int, "dict | str", dict, float]


class ScriptedServer:
    HANG_S = 5.0  # how long a hung request holds its connection before the handler gives up on it

    def __init__(self, respond: Callable[[dict], Reply | None]):
        self.requests: list[dict] = []
        self._respond = respond
        self._stub = HttpStub(self._handle)
        self.url = self._stub.url

    def _handle(self, path: str, raw: bytes) -> Answer | None:
        body = json.loads(raw)
        self.requests.append(body)
        reply = self._respond(body)
        if reply is None:
            time.sleep(self.HANG_S)
            return None
        status, payload, headers, delay = reply
        time.sleep(delay)
        return status, payload.encode() if isinstance(payload, str) else json.dumps(payload).encode(), headers

    def close(self):
        self._stub.close()
