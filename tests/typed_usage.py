"""Code as a user types it against txsocketserver, for the type checker (``.ci/run``).

Never run: mypy checks that it type-checks as it would against the stdlib's
stubs (typeshed's ``socketserver``), e.g. that ``with`` gives the server's
own class, not ``BaseServer``.
"""

from __future__ import annotations

import socket

import txsocketserver


class Handler(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def serve() -> socket.socket:
    with txsocketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        listening: socket.socket = server.socket
        server.daemon_threads = True
        host, port = server.server_address[:2]
        assert isinstance(port, int)
        server.handle_request()
    with txsocketserver.ForkingUDPServer(("127.0.0.1", 0), Handler) as forking:
        forking.max_children = 4
        forking.collect_children(blocking=True)
    return listening
