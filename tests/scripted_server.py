"""A scripted HTTP server on 127.0.0.1 that stands in for a hosted OpenAI-compatible API's failures.

A hosted API's 5xx, 429, malformed bodies and hangs cannot be produced on demand here, so tests that
need them script the answers: `respond(body)` gets each POST's JSON body and returns
(status, body, headers, delay_s), or None to hang (the request is held and never answered).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Reply = tuple[int, "dict | str", dict, float]


class ScriptedServer:
    HANG_S = 5.0  # how long a hung request holds its connection before the handler gives up on it

    def __init__(self, respond: Callable[[dict], Reply | None]):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                reply = respond(body)
                if reply is None:
                    time.sleep(outer.HANG_S)
                    return
                status, payload, headers, delay = reply
                time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
