"""A loopback HTTP server whose answers come from a function: a stand-in for hosted APIs and proxies.

A hosted OpenAI-compatible API's 5xx, 429, malformed bodies, hangs and dropped connections cannot
be had on demand, so the chaos benchmark's flaky proxy and the tests' scripted server make them
here. Both need the same server, so it lives once: bound to 127.0.0.1 only (nothing off the
machine can reach it) on a free port, answering from a daemon thread until `close()`.

`handle(path, body)` gets each POST's path and raw body and returns `(status, data, headers)`, sent
as a JSON response, or None to drop the connection without an answer (a hang is a `handle` that
sleeps before returning None). It runs in the request's own thread, so it may block.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Answer = tuple[int, bytes, dict[str, str]]
Handle = Callable[[str, bytes], "Answer | None"]


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog (5 by default): hundreds of clients connecting at once must not be reset


class HttpStub:
    def __init__(self, handle: Handle):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                answer = handle(self.path, self.rfile.read(int(self.headers.get("Content-Length", 0))))
                try:
                    if answer is None:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    status, data, headers = answer
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up first (its own timeout): nobody is left to answer

            def log_message(self, *args):
                pass  # the callers count what matters; a line per request would drown test output

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
