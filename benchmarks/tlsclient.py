"""Closed-loop TLS line-echo load client: one process, one ``selectors`` loop.

Each of ``--conns`` persistent TLS connections keeps one line in flight: send,
wait for the echo, send again.  The handshake happens (blocking) before the
clock starts; certificates are not verified (the servers use throwaway
self-signed ones).  Prints one JSON line: ``{"requests": N, "seconds": S, "errors": E}``.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import ssl
import time


def connect(address: tuple[str, int], context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(address, timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = context.wrap_socket(raw)  # handshake now, blocking
    sock.setblocking(False)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--message", default="hello")
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    line = args.message.encode() + b"\n"
    selector = selectors.DefaultSelector()
    replies: dict[ssl.SSLSocket, bytearray] = {}
    for _ in range(args.conns):
        sock = connect((args.host, args.port), context)
        replies[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)
    requests = errors = 0
    start = time.monotonic()
    end = start + args.duration
    for sock in replies:
        sock.sendall(line)  # a line this short never blocks
    while (now := time.monotonic()) < end:
        for key, _ in selector.select(end - now):
            sock = key.fileobj  # type: ignore[assignment]
            reply = replies[sock]
            try:
                # Drain what TLS already decrypted too: select() cannot see it.
                while True:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionResetError("server closed")
                    reply += data
                    if not sock.pending():
                        break
            except ssl.SSLWantReadError:
                continue
            except OSError:
                errors += 1
                selector.unregister(sock)
                continue
            if reply.endswith(b"\n"):
                if reply != line:
                    errors += 1
                requests += 1
                reply.clear()
                sock.sendall(line)
    elapsed = time.monotonic() - start
    for sock in replies:
        sock.close()
    print(json.dumps({"requests": requests, "seconds": elapsed, "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
