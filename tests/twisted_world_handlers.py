"""Handlers for the Twisted-world tests, importable by server subprocesses too.

Each handler works with a stdlib socket and a ``TransportSocket`` alike.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

import txsocketserver as socketserver

#: What :class:`FirehoseHandler` sends: this block, repeated.
FIREHOSE_BLOCK = bytes(range(256)) * 256  # 64 KiB


def firehose_digest(size: int) -> str:
    """sha256 of the first ``size`` bytes :class:`FirehoseHandler` sends."""
    digest = hashlib.sha256()
    full, rest = divmod(size, len(FIREHOSE_BLOCK))
    for _ in range(full):
        digest.update(FIREHOSE_BLOCK)
    digest.update(FIREHOSE_BLOCK[:rest])
    return digest.hexdigest()


def receive_firehose_digest(client: Any, size: int) -> str:
    """Read *size* bytes from *client* (a socket); return their sha256, to
    compare with :func:`firehose_digest`."""
    digest = hashlib.sha256()
    received = 0
    while received < size:
        chunk = client.recv(1 << 20)
        assert chunk, f"EOF after {received} bytes"
        digest.update(chunk)
        received += len(chunk)
    return digest.hexdigest()


def stalled_firehose(server: Any) -> int:
    """Wait until a :class:`FirehoseHandler` whose client does not read stops
    writing; return how many bytes it wrote (``server.written``)."""
    deadline = time.monotonic() + 10
    while not server.written:
        assert time.monotonic() < deadline, "the handler never wrote"
        time.sleep(0.01)
    time.sleep(0.5)
    stalled_at: int = server.written
    time.sleep(0.5)
    assert server.written == stalled_at, "the handler kept writing to a client that does not read"
    return stalled_at


class EchoHandler(socketserver.StreamRequestHandler):
    """Send each line back until end of stream."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class AddressHandler(socketserver.StreamRequestHandler):
    """Reply with one JSON line: the client address and the server address."""

    def handle(self) -> None:
        reply = {"client": list(self.client_address), "server": str(self.server.server_address)}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class FirehoseHandler(socketserver.StreamRequestHandler):
    """Read a byte count, then send that many bytes of the firehose pattern.

    ``server.written`` (if the server has it) counts the bytes handed to the
    socket so far, for flow-control tests.
    """

    def handle(self) -> None:
        size = int(self.rfile.readline())
        block = memoryview(FIREHOSE_BLOCK)
        sent = 0
        while sent < size:
            chunk = block[: min(len(block), size - sent)]
            self.request.sendall(chunk)
            sent += len(chunk)
            if hasattr(self.server, "written"):
                self.server.written = sent


class GateHandler(socketserver.StreamRequestHandler):
    """Read a line, tell the test (``server.started``), wait for
    ``server.release``, then answer ``done``.  Records in ``server.outcomes``
    how each request ended."""

    def handle(self) -> None:
        self.rfile.readline()
        self.server.started.set()
        released = self.server.release.wait(10)
        self.wfile.write(b"done\n" if released else b"timeout\n")
        self.server.outcomes.append("done")


class BlockingReadHandler(socketserver.StreamRequestHandler):
    """Read lines until end of stream: a handler a drain has to cut off."""

    def handle(self) -> None:
        self.server.started.set()
        try:
            for _ in self.rfile:
                pass
        except OSError as error:
            self.server.outcomes.append(type(error).__name__)
        else:
            self.server.outcomes.append("eof")


class FailingHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        raise ValueError("handler failure for the test")


def make_gate_server(server_class: type, address: object, handler: type) -> object:
    """A server with the attributes the gate/blocking handlers use."""
    server = server_class(address, handler)
    server.started = threading.Event()
    server.release = threading.Event()
    server.outcomes = []
    return server


class SlowEchoHandler(socketserver.StreamRequestHandler):
    """Echo one line after half a second: a request still in flight when a stop begins."""

    def handle(self) -> None:
        line = self.rfile.readline()
        time.sleep(0.5)
        self.wfile.write(line)


#: What :class:`MeasuredReplyHandler` sends after the digest line.
MEASURED_REPLY_BODY = FIREHOSE_BLOCK[:16384]


def measured_reply(body: bytes) -> bytes:
    """The whole reply :class:`MeasuredReplyHandler` gives to a request of *body*."""
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + MEASURED_REPLY_BODY


class MeasuredReplyHandler(socketserver.StreamRequestHandler):
    """Read ``<size>\\n`` and that many bytes, or ``eof\\n`` and everything up to
    the client's half-close; reply :func:`measured_reply` of the body.

    A request cut short (the client closed or reset mid-request) gets no reply
    and, for this handler, is no error: it counts it in ``server.cut_short``
    (if the server has it).  The stdlib's handlers would let the
    ``ConnectionResetError`` reach ``handle_error``.
    """

    def handle(self) -> None:
        try:
            first = self.rfile.readline()
            size = None if first == b"eof\n" else int(first or b"0")
            body = self.rfile.read() if size is None else self.rfile.read(size)
        except ConnectionResetError:
            body, size = b"", -1
        if size is not None and len(body) != size or not first.endswith(b"\n"):
            if hasattr(self.server, "cut_short"):
                self.server.cut_short.append(self.client_address)
            return
        self.wfile.write(measured_reply(body))


class SleepyHandler(socketserver.BaseRequestHandler):
    """Say ``started``, then sleep 30 s ignoring the connection: a handler that
    no drain can cut short, only the process's exit."""

    def handle(self) -> None:
        self.request.sendall(b"started\n")
        time.sleep(30)
