"""Whether the soak's handlers leave Python objects behind: tracemalloc over many connections.

Usage: python benchmarks/soak_tracemalloc.py {async,blocking} [--rounds N] [--per-round M]

A worker's resident memory can grow for reasons that are not leaks (the
allocator's arenas and fragmentation); this tells them apart.  It serves
``soak_handlers``' echo role in this process (an async server, or a
threading one), runs ``--per-round`` line-echo connections (1-5 random lines
each, 4 client threads) per round, and prints after each round the memory
that ``tracemalloc`` traces and the change in the number of objects the
garbage collector tracks, since a first round that warms everything up;
then the biggest differences by line.  Flat figures: nothing per connection
is kept.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import socket
import sys
import threading
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("SOAK_DOCROOT", os.getcwd())

import txsocketserver  # noqa: E402
from soak_handlers import AsyncMixed, Mixed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["async", "blocking"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=2000)
    args = parser.parse_args()
    if args.kind == "async":
        server: txsocketserver.TCPServer = txsocketserver.TCPServer(("127.0.0.5", 0), AsyncMixed)
    else:
        server = txsocketserver.ThreadingTCPServer(("127.0.0.1", 0), Mixed)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    address = server.server_address

    def session() -> None:
        with socket.create_connection(address, timeout=10) as sock, sock.makefile("rb") as replies:
            for _ in range(random.randint(1, 5)):
                line = random.randbytes(random.randint(0, 1500)).replace(b"\n", b"_") + b"\n"
                sock.sendall(line)
                assert replies.readline() == line

    def round_of(count: int) -> None:
        clients = [
            threading.Thread(target=lambda: [session() for _ in range(count // 4)])
            for _ in range(4)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()

    try:
        round_of(args.per_round)
        gc.collect()
        tracemalloc.start(10)
        base = tracemalloc.take_snapshot()
        objects = len(gc.get_objects())
        for number in range(1, args.rounds + 1):
            round_of(args.per_round)
            gc.collect()
            traced, _ = tracemalloc.get_traced_memory()
            print(
                f"{args.kind}: after {number * args.per_round} connections: "
                f"{traced} bytes traced, {len(gc.get_objects()) - objects:+} objects",
                flush=True,
            )
        for stat in tracemalloc.take_snapshot().compare_to(base, "lineno")[:8]:
            print(" ", stat)
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
