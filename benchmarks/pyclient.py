"""Closed-loop load client in pure Python, one process, one ``selectors`` loop.

The fallback for the two native load tools: it speaks the line-echo protocol
(like ``echoclient.c``) and HTTP (like ``wrk``), so every scenario still runs on
a machine without ``gcc`` or ``wrk``.  It costs more CPU per request than they
do, which on a small machine is CPU taken from the server, so figures taken with
it are lower for fast servers; ``run.py`` prints which client it used.

Each of ``--conns`` connections keeps one request in flight: send, wait for the
whole reply, send again (``--mode persistent``), or open a new connection for
every request (``--mode connect``).  Prints one JSON line:
``{"requests": N, "seconds": S, "errors": E}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import time

_CONNECT_PENDING = (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK)


def line_complete(buf: bytearray) -> bool:
    """An echoed line is complete at its newline."""
    return buf.endswith(b"\n")


def http_complete(buf: bytearray) -> bool:
    """An HTTP response is complete once its headers and Content-Length body arrived."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for header in bytes(buf[:end]).split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(buf) >= end + 4 + length


class Connection:
    """One client slot: a socket, its unsent request bytes and its reply so far."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pending = b""
        self.reply = bytearray()


class LoadClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.address = (args.host, args.port)
        self.persistent = args.mode == "persistent"
        if args.proto == "http":
            connection = "keep-alive" if self.persistent else "close"
            self.request = (
                f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                f"Connection: {connection}\r\n\r\n"
            ).encode()
            self.complete = http_complete
            self.expected: bytes | None = None
        else:
            self.request = args.message.encode() + b"\n"
            self.complete = line_complete
            self.expected = self.request
        self.selector = selectors.DefaultSelector()
        self.requests = 0
        self.errors = 0

    def open(self, conn: Connection) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        if sock.connect_ex(self.address) not in _CONNECT_PENDING:
            sock.close()
            self.errors += 1
            conn.sock = None
            return
        conn.sock = sock
        conn.pending = self.request
        conn.reply.clear()
        self.selector.register(sock, selectors.EVENT_WRITE, conn)

    def close(self, conn: Connection) -> None:
        if conn.sock is not None:
            self.selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def step(self, conn: Connection, events: int) -> None:
        sock = conn.sock
        assert sock is not None
        if events & selectors.EVENT_WRITE:
            sent = sock.send(conn.pending)
            conn.pending = conn.pending[sent:]
            if not conn.pending:
                self.selector.modify(sock, selectors.EVENT_READ, conn)
            return
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("server closed before replying")
        conn.reply += data
        if not self.complete(conn.reply):
            return
        if self.expected is not None and conn.reply != self.expected:
            raise ConnectionError("the reply is not the echo of the request")
        self.requests += 1
        if self.persistent:
            conn.reply.clear()
            conn.pending = self.request
            self.selector.modify(sock, selectors.EVENT_WRITE, conn)
        else:
            self.close(conn)
            self.open(conn)

    def run(self, conns: int, warmup: float, duration: float) -> dict[str, float]:
        slots = [Connection() for _ in range(conns)]
        for conn in slots:
            self.open(conn)
        start = time.monotonic()
        measure_from = start + warmup
        end = measure_from + duration
        counting = warmup <= 0
        while True:
            now = time.monotonic()
            if not counting and now >= measure_from:
                counting = True
                self.requests = self.errors = 0
            if now >= end:
                break
            limit = end if counting else measure_from
            for key, events in self.selector.select(limit - now):
                conn = key.data
                try:
                    self.step(conn, events)
                except OSError:
                    self.errors += 1
                    self.close(conn)
                    self.open(conn)
        elapsed = time.monotonic() - (measure_from if warmup > 0 else start)
        for conn in slots:
            self.close(conn)
        return {"requests": self.requests, "seconds": elapsed, "errors": self.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--proto", choices=["line", "http"], default="line")
    parser.add_argument("--mode", choices=["persistent", "connect"], default="persistent")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--message", default="hello")
    parser.add_argument("--path", default="/")
    args = parser.parse_args()
    result = LoadClient(args).run(args.conns, args.warmup, args.duration)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
