"""Requests for an instruction count: run under ``valgrind --tool=callgrind``.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/instructions_per_request.py KIND N

One server of KIND in this process (a serving thread, the blocking world) and
one client thread making N requests, each on a new connection: a line and its
echo.  Run it for two values of N: the difference of the two totals divided by
the difference of the Ns is the instructions one request costs, start-up and
shutdown cancelled out.  KIND: ``tcp``, ``threading``, ``async``,
``endpoint`` (a threading server on ``haproxy:``), ``handle_request`` (a
synchronous server driven by ``handle_request()`` calls, one per request).
"""

from __future__ import annotations

import socket
import sys
import threading

import txsocketserver

HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40123 443\r\n"


class Echo(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class AsyncEcho(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        self.wfile.write(await self.rfile.readline())


def main() -> None:
    kind, count = sys.argv[1], int(sys.argv[2])
    address: object = ("127.0.0.1", 0)
    server_class: type = txsocketserver.TCPServer
    handler: type = Echo
    if kind == "threading":
        server_class = txsocketserver.ThreadingTCPServer
    elif kind == "async":
        handler = AsyncEcho
    elif kind == "endpoint":
        server_class = txsocketserver.ThreadingTCPServer
        address = "haproxy:tcp:0:interface=127.0.0.1"
    server = server_class(address, handler)
    header = HEADER if kind == "endpoint" else b""
    if kind == "handle_request":
        serving = threading.Thread(target=lambda: [server.handle_request() for _ in range(count)])
    else:
        serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        for _ in range(count):
            # Generous: under callgrind, Python runs some 50 times slower.
            with socket.create_connection(server.server_address, timeout=600) as client:
                client.sendall(header + b"ping\n")
                assert client.makefile("rb").readline() == b"ping\n"
    finally:
        if kind != "handle_request":
            server.shutdown()
        serving.join(600)
        server.server_close()


if __name__ == "__main__":
    main()
