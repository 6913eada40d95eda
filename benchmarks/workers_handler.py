"""The handler of ``workers.py``: keep-alive HTTP spending about 1 ms of CPU per request.

``BUSY_ITERATIONS`` (set by ``workers.py``, which calibrates it once so that
every worker does the same fixed amount of work) is how many rounds of the
busy loop one request runs.
"""

from __future__ import annotations

import itertools
import os
from http.server import BaseHTTPRequestHandler

ITERATIONS = int(os.environ.get("BUSY_ITERATIONS", "20000"))
_connections = itertools.count(1)


def busy(iterations: int) -> int:
    """Pure-Python work holding the GIL: what a CPU-bound handler does."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


class BusyHTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately: without this each keep-alive
    # response would wait for the client's delayed ACK.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.connection_number = next(_connections)

    def do_GET(self) -> None:
        body = b"%d\n" % busy(ITERATIONS)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        # Which worker answered, and how many connections it has accepted:
        # workers.py counts the shares.
        self.send_header("X-Worker", str(os.getpid()))
        self.send_header("X-Worker-Connections", str(self.connection_number))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass
