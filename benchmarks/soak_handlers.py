"""The handlers of ``soak.py``: one class per supervisor, the role chosen by listening address.

A ``--workers`` supervisor serves one handler class on all its ``--listen``
sockets, so ``soak.py`` listens on a different loopback address per role
(Linux routes all of 127.0.0.0/8 to ``lo``) and these classes hand each
connection to the role's handler by the address it arrived on:

* ``127.0.0.1`` echo: line echo (the stdlib's ``StreamRequestHandler``),
  for persistent and per-request clients, and those that half-close;
* ``127.0.0.2`` HTTP: the stdlib's ``http.server.SimpleHTTPRequestHandler``
  serving ``SOAK_DOCROOT``;
* ``127.0.0.3`` TLS (an ``ssl:`` listener): the same line echo;
* ``127.0.0.4`` PROXY protocol (``haproxy:``): one line naming the client
  address the header claimed, then line echo;
* ``127.0.0.5`` and ``127.0.0.6``: the async supervisor's echo and
  PROXY-protocol roles, the same replies from async handlers.
"""

from __future__ import annotations

import os
import socketserver
from http.server import SimpleHTTPRequestHandler
from typing import Any

import txsocketserver

#: Seconds a blocking handler waits for a line: a stalled client is bounded.
READ_TIMEOUT = 20.0


class Echo(socketserver.StreamRequestHandler):
    """Line echo until the client ends its side."""

    timeout = READ_TIMEOUT

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Whoami(Echo):
    """The client address the PROXY header claimed, then line echo."""

    def handle(self) -> None:
        host, port = self.client_address[:2]
        self.wfile.write(f"{host} {port}\n".encode())
        super().handle()


class Files(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT

    def __init__(self, *args: Any) -> None:
        super().__init__(*args, directory=os.environ["SOAK_DOCROOT"])

    def log_message(self, format: str, *args: Any) -> None:
        pass


_BLOCKING_ROLES: dict[str, type[socketserver.BaseRequestHandler]] = {
    "127.0.0.1": Echo,
    "127.0.0.2": Files,
    "127.0.0.3": Echo,
    "127.0.0.4": Whoami,
}


class Mixed(socketserver.BaseRequestHandler):
    """The blocking supervisor's handler: the role's handler serves the connection."""

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        _BLOCKING_ROLES[server.server_address[0]](request, client_address, server)


class AsyncMixed(txsocketserver.AsyncStreamRequestHandler):
    """The async supervisor's handler: echo on 127.0.0.5, whoami then echo on 127.0.0.6."""

    timeout = READ_TIMEOUT

    async def handle(self) -> None:
        if self.server.server_address[0] == "127.0.0.6":
            host, port = self.client_address[:2]
            self.wfile.write(f"{host} {port}\n".encode())
        async for line in self.rfile:
            self.wfile.write(line)
            await self.wfile.drain()
