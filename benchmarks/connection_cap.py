"""Clients beyond ``max_connections``: are they all served, and how soon?

    python benchmarks/connection_cap.py [--kind threading] [--clients 200]
        [--hold 0.5] [--max-connections 50] [--request-queue-size N] [--timeout 40]

A server of the given kind (``threading``, ``forking``, ``async``,
``endpoint``: a threading server on ``haproxy:``, ``async_endpoint``) with
``max_connections`` and, unless given, the default ``request_queue_size``;
*clients* clients connect at once, each sends a line, and the handler holds
its connection *hold* seconds before it answers.  Prints one JSON line:
clients served within *timeout*, the time the last one took, and how much the
kernel's listen-overflow counters rose meanwhile (``ListenOverflows`` and
``ListenDrops`` of ``/proc/net/netstat``; counted machine-wide, so other
programs' overflows would show too).  Run it under
``flock /tmp/txss-bench.lock`` with the rest of the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import txsocketserver

HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40123 443\r\n"


def listen_counters() -> dict[str, int]:
    """TcpExt's ListenOverflows and ListenDrops."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
            return {key: table[key] for key in ("ListenOverflows", "ListenDrops")}
    return {}


def make_server(kind: str, hold: float, max_connections: int, queue: int | None):
    class Held(txsocketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            time.sleep(hold)
            self.wfile.write(line)

    class AsyncHeld(txsocketserver.AsyncStreamRequestHandler):
        async def handle(self) -> None:
            from twisted.internet import reactor, task

            line = await self.rfile.readline()
            await task.deferLater(reactor, hold, lambda: None)
            self.wfile.write(line)

    bases = {
        "threading": (txsocketserver.ThreadingTCPServer, ("127.0.0.1", 0), Held),
        "forking": (txsocketserver.ForkingTCPServer, ("127.0.0.1", 0), Held),
        "async": (txsocketserver.TCPServer, ("127.0.0.1", 0), AsyncHeld),
        "endpoint": (
            txsocketserver.ThreadingTCPServer,
            "haproxy:tcp:0:interface=127.0.0.1",
            Held,
        ),
        "async_endpoint": (
            txsocketserver.TCPServer,
            "haproxy:tcp:0:interface=127.0.0.1",
            AsyncHeld,
        ),
    }
    base, address, handler = bases[kind]
    attributes: dict[str, object] = {"max_connections": max_connections}
    if kind == "forking":
        attributes["max_children"] = max_connections
    if queue is not None:
        attributes["request_queue_size"] = queue
    server_class = type("CappedServer", (base,), attributes)
    return server_class(address, handler)


def run(
    kind: str, clients: int, hold: float, max_connections: int, queue: int | None, timeout: float
) -> dict[str, object]:
    server = make_server(kind, hold, max_connections, queue)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    header = HEADER if "endpoint" in kind else b""
    took: list[float | None] = [None] * clients
    before = listen_counters()
    start = time.monotonic()

    def client(number: int) -> None:
        line = f"client {number}\n".encode()
        deadline = start + timeout
        try:
            with socket.create_connection(server.server_address, timeout=timeout) as sock:
                sock.sendall(header + line)
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                if sock.makefile("rb").readline() == line:
                    took[number] = time.monotonic() - start
        except OSError:
            pass

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    after = listen_counters()
    server.shutdown()
    serving.join(timeout)
    server.server_close()
    served = [t for t in took if t is not None]
    return {
        "kind": kind,
        "clients": clients,
        "hold": hold,
        "max_connections": max_connections,
        "request_queue_size": server.request_queue_size,
        "served": len(served),
        "last_served_after": round(max(served), 2) if served else None,
        "listen_counters_rise": {key: after[key] - before.get(key, 0) for key in after},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="threading")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--hold", type=float, default=0.5)
    parser.add_argument("--max-connections", type=int, default=50)
    parser.add_argument("--request-queue-size", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=40.0)
    options = parser.parse_args()
    print(
        json.dumps(
            run(
                options.kind,
                options.clients,
                options.hold,
                options.max_connections,
                options.request_queue_size,
                options.timeout,
            )
        )
    )


if __name__ == "__main__":
    main()
