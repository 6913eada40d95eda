"""Memory per idle connection, and the most connections one server process holds.

    .venv/bin/python benchmarks/idle_memory.py                      # 10,000 idle connections
    .venv/bin/python benchmarks/idle_memory.py --connections 19900 --impls ours,twisted
    .venv/bin/python benchmarks/idle_memory.py --max                # ours, up to the fd limit

For each implementation a server process (``server.py``, the ``async-echo-*``
servers: ours is ``TCPServer`` with an async handler, ``twisted`` a
``LineReceiver``, ``asyncio`` ``start_server``, ``uvloop`` the same on uvloop,
``uvloop-protocol`` a raw ``asyncio.Protocol`` on uvloop, ``ours-asyncio-uvloop``
ours on Twisted's asyncio reactor over uvloop, ``stdlib`` ``ThreadingTCPServer``)
is started; client processes open the connections, each sends one line and
reads its echo (so every handler has started and is waiting for the next
line), then all stay open and idle.  Reported: the server's RSS growth divided
by the number of connections (KB per connection), and its thread count.

``--max`` opens connections until the server stops taking them (its file
descriptor limit), and reports how many it held with how many threads.
Clients bind a fresh loopback address per run (127.0.0.N), so the TIME_WAIT
ports of a previous run never run out the ephemeral range.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PER_CLIENT = 9000  # connections per client process (each has the same fd limit)

CLIENT = r"""
import os, resource, socket, sys
host, port, count, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
try:
    for n in range(count):
        s = socket.socket()
        s.settimeout(5)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(b"hello\n")
        if s.recv(16) != b"hello\n":
            break
        held.append(s)
except OSError as error:
    print("stopped:", error, file=sys.stderr, flush=True)
print(len(held), flush=True)
sys.stdin.read()  # hold them until told to go
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def measure(impl: str, connections: int, source_index: int) -> tuple[int, float, int]:
    """(connections held, KB per connection, server threads)."""
    server = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), "--impl", impl, "--scenario",
         "async-echo-persistent-1"],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
    )  # fmt: skip
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        time.sleep(0.5)
        before = rss_kb(server.pid)
        held = 0
        remaining = connections
        while remaining > 0:
            count = min(PER_CLIENT, remaining)
            source = f"127.0.{source_index // 250}.{source_index % 250 + 2}"
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(count), source],
                stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
            )  # fmt: skip
            clients.append(client)
            assert client.stdout is not None
            got = int(client.stdout.readline())
            held += got
            remaining -= count
            if got < count:
                break
        time.sleep(1.0)
        after = rss_kb(server.pid)
        return held, (after - before) / max(held, 1), threads(server.pid)
    finally:
        for client in clients:
            client.kill()
            client.wait()
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument(
        "--impls",
        default="ours,twisted,asyncio,uvloop,uvloop-protocol,ours-asyncio-uvloop,stdlib",
    )
    parser.add_argument("--max", action="store_true", help="ours, up to the fd limit")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"file descriptor limit: {soft} (hard {hard})")
    impls = ["ours"] if args.max else args.impls.split(",")
    wanted = hard + 1000 if args.max else args.connections
    results = {}
    for index, impl in enumerate(impls):
        held, kb, thread_count = measure(impl, wanted, index + int(time.time()) % 200 * 5)
        results[impl] = {
            "connections": held,
            "kb_per_connection": round(kb, 3),
            "threads": thread_count,
        }
        print(
            f"{impl:19} {held:6d} idle connections: {kb:5.2f} KB per connection, "
            f"{thread_count} server threads",
            flush=True,
        )

    if args.json:
        Path(args.json).write_text(
            json.dumps({"python": sys.version.split()[0], "idle_connections": results}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
