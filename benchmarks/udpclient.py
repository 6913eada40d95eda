"""Closed-loop datagram load client in pure Python: the fallback for ``udpclient.c``.

Same protocol and output as the C client: each of ``--clients`` connected UDP
sockets keeps one datagram in flight (an 8-digit sequence number, a space and
``--message``), waits for its echo and sends the next.  A reply missing after
``LOSS_TIMEOUT`` counts as an error and the next datagram goes out; a late echo
of an earlier datagram is ignored.  Prints ``{"requests": N, "seconds": S,
"errors": E}``.  It costs more CPU per request than the C client, which on a
small machine is CPU taken from the server.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time

LOSS_TIMEOUT = 0.2


class Client:
    def __init__(self, address: tuple[str, int], message: bytes) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(address)
        self.message = message
        self.seq = 0
        self.in_flight = b""
        self.sent_at = 0.0

    def send_next(self) -> bool:
        self.seq += 1
        self.in_flight = b"%08d %s" % (self.seq % 100_000_000, self.message)
        self.sent_at = time.monotonic()
        try:
            return self.sock.send(self.in_flight) == len(self.in_flight)
        except OSError:
            return False

    def read_reply(self) -> int:
        """1: the echo of the datagram in flight; 0: wait; -1: error."""
        while True:
            try:
                reply = self.sock.recv(2048)
            except BlockingIOError:
                return 0
            except OSError:
                return -1
            if reply == self.in_flight:
                return 1
            if reply[8:] != self.in_flight[8:]:
                return -1


def run(args: argparse.Namespace) -> dict[str, float]:
    selector = selectors.DefaultSelector()
    clients = [Client((args.host, args.port), args.message.encode()) for _ in range(args.clients)]
    requests = errors = 0
    start = time.monotonic()
    measure_from = start + args.warmup
    end = measure_from + args.duration
    counting = args.warmup <= 0
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
        errors += not client.send_next()
    while True:
        now = time.monotonic()
        if not counting and now >= measure_from:
            counting = True
            requests = errors = 0
        if now >= end:
            break
        limit = end if counting else measure_from
        for key, _ in selector.select(min(limit - now, 0.01)):
            client = key.data
            outcome = client.read_reply()
            if outcome == 0:
                continue
            requests += outcome == 1
            errors += outcome == -1
            errors += not client.send_next()
        now = time.monotonic()
        for client in clients:
            if now - client.sent_at > LOSS_TIMEOUT:
                errors += 1
                errors += not client.send_next()
    elapsed = time.monotonic() - (measure_from if args.warmup > 0 else start)
    for client in clients:
        selector.unregister(client.sock)
        client.sock.close()
    return {"requests": requests, "seconds": elapsed, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--message", default="hello")
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
