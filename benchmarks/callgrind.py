"""Instructions per request, counted by valgrind's callgrind: figures noise cannot move.

Timing ratios on a small shared machine move by +-20% between runs; the number of
instructions a server executes for the same requests does not.  For each scenario
and implementation this script starts the benchmark server (``server.py``) under
``valgrind --tool=callgrind``, warms it up, zeroes callgrind's counters (``vgdb
... zero``), sends exactly ``--requests`` requests from this process, one at a
time, dumps the counters (``vgdb ... dump``) and divides::

    .venv/bin/python benchmarks/callgrind.py                      # the default set
    .venv/bin/python benchmarks/callgrind.py --only 'connect-*' --requests 500
    .venv/bin/python benchmarks/callgrind.py --json callgrind.json
    .venv/bin/python benchmarks/callgrind.py --only http-1 --keep dumps/   # then:
    callgrind_annotate --inclusive=yes dumps/http-1-ours.*

Every thread of the server process is counted (the reactor thread, pool threads);
processes it starts are not (``--trace-children=no``).  So the forking scenarios
count the server process alone: its own user-space work per request (ours: hand
the request to an idle pre-forked child; the stdlib's: its ``os.fork`` and the
bookkeeping around it), not the template's, the children's or the kernel's.
The client runs outside valgrind and sends one request at a time, so each count
is the server's cost for a request arriving at an idle server (the ``-1``
scenarios of ``run.py``), which is also where the per-request overhead of a code
path shows most plainly.

Needs Debian's ``valgrind`` (``vgdb`` comes with it).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
LINE = b"x" * 29 + b"\n"  # the 30-byte line of the echo scenarios
HTTP_REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"

Client = Callable[[int, int], None]  # (port, requests)


def _read_line(sock: socket.socket) -> None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection mid-reply")
        data += chunk
    if data != LINE:
        raise ValueError(f"bad echo: {data!r}")


def echo_persistent(port: int, requests: int) -> None:
    with socket.create_connection((HOST, port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            sock.sendall(LINE)
            _read_line(sock)


class Lockstep:
    """*connections* persistent connections in lockstep: a line sent on each,
    then every echo read, until *requests* lines have been echoed (so the
    server reads several ready connections per wake-up, as under load).

    Its connections are opened before callgrind's counters are zeroed and
    closed after they are dumped (``session``), and exactly *requests* lines
    are echoed in the counted window (the last round on the first
    connections only): a count per request is then the cost of a request on
    an open connection, as in the ``-1`` scenario.  (Opening them inside the
    window added the accept, handler start and close of every connection,
    128 of them spread over 384 echoes yet divided by 500, which read as a
    per-request cost growing with the number of clients.)
    """

    def __init__(self, connections: int) -> None:
        self.connections = connections

    def __call__(self, port: int, requests: int) -> None:
        with self.session(port) as run:
            run(requests)

    @contextlib.contextmanager
    def session(self, port: int) -> Iterator[Callable[[int], None]]:
        """Open the connections; give what echoes *requests* lines on them."""
        socks = [
            socket.create_connection((HOST, port), timeout=60) for _ in range(self.connections)
        ]

        def run(requests: int) -> None:
            while requests > 0:
                batch = socks[:requests]
                for sock in batch:
                    sock.sendall(LINE)
                for sock in batch:
                    _read_line(sock)
                requests -= len(batch)

        try:
            for sock in socks:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield run
        finally:
            for sock in socks:
                sock.close()


def echo_persistent_many(connections: int) -> Client:
    """A :class:`Lockstep` client of *connections* connections."""
    return Lockstep(connections)


def echo_connect_per_request(port: int, requests: int) -> None:
    for _ in range(requests):
        with socket.create_connection((HOST, port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(LINE)
            _read_line(sock)


def http_connect_per_request(port: int, requests: int) -> None:
    for _ in range(requests):
        with socket.create_connection((HOST, port), timeout=60) as sock:
            sock.sendall(HTTP_REQUEST)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            if not reply.startswith(b"HTTP/1.") or b" 200 " not in reply.split(b"\r\n", 1)[0]:
                raise ValueError(f"bad HTTP reply: {reply[:80]!r}")


def datagram(port: int, requests: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(60)
        for _ in range(requests):
            sock.sendto(LINE, (HOST, port))
            if sock.recv(65536) != LINE:
                raise ValueError("bad datagram echo")


# run.py's scenario (its server) -> the client that drives it, one request at a time
# (also for a scenario named for 16 clients).
SCENARIOS: dict[str, Client] = {
    "echo-persistent-1": echo_persistent,
    "echo-persistent-1-sync": echo_persistent,
    "connect-per-request-sync-1": echo_connect_per_request,
    "connect-per-request-threading-1": echo_connect_per_request,
    "http-1": http_connect_per_request,
    "async-echo-persistent-1": echo_persistent,
    "async-echo-persistent-16": echo_persistent_many(16),
    "async-echo-persistent-128": echo_persistent_many(128),
    "async-connect-per-request-16": echo_connect_per_request,
    "datagram-sync-1": datagram,
    "datagram-threading-1": datagram,
    "observed-async-echo-persistent-16": echo_persistent,
    "observed-connect-per-request-threading-8": echo_connect_per_request,
    # The server process alone (see the module docstring).
    "forking-connect-per-request-1": echo_connect_per_request,
    "forking-local-classes-connect-per-request-1": echo_connect_per_request,
}


def vgdb(pid: int, command: str) -> None:
    """Send a callgrind monitor command, retrying until valgrind has its FIFO up."""
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(
            ["vgdb", f"--pid={pid}", command], capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0 and "error" not in (done.stdout + done.stderr).lower():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"vgdb {command} failed: {done.stdout}{done.stderr}")
        time.sleep(0.2)


def measure(scenario: str, impl: str, requests: int, warmup: int, out_dir: Path) -> float | None:
    """Instructions per request of *impl* serving *scenario*, or None if it has no server."""
    from scenarios import SCENARIOS as TABLE  # imports no implementation

    if impl not in TABLE[scenario].servers:
        return None
    prefix = out_dir / f"{scenario}-{impl}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={prefix}.%p",
        "--trace-children=no",
        sys.executable,
        str(HERE / "server.py"),
        "--impl",
        impl,
        "--scenario",
        scenario,
    ]
    server = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=HERE,
        # A fixed string hash: dict and set layouts (and the instructions
        # their lookups take) then repeat from run to run; with random
        # hashing the same async server's count moved by up to 2%.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        match = re.match(r"PORT (\d+)", line)
        if not match:
            raise RuntimeError(f"{scenario}/{impl}: server did not print its port: {line!r}")
        port = int(match.group(1))
        client = SCENARIOS[scenario]
        if isinstance(client, Lockstep):
            with client.session(port) as run:
                # At least a round on every connection: all are accepted and
                # their handlers waiting before the count starts.
                run(max(warmup, client.connections))
                vgdb(server.pid, "zero")
                run(requests)
                vgdb(server.pid, "dump")
        else:
            client(port, warmup)
            vgdb(server.pid, "zero")
            client(port, requests)
            vgdb(server.pid, "dump")
    finally:
        server.kill()
        server.wait(timeout=60)
    dumps = sorted(out_dir.glob(f"{prefix.name}.{server.pid}.*"))
    if not dumps:
        raise RuntimeError(f"{scenario}/{impl}: callgrind wrote no dump")
    text = dumps[0].read_text()
    total = int(re.search(r"^summary: (\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return total / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="scenario names or glob patterns")
    parser.add_argument(
        "--impls",
        default="ours,stdlib,twisted,asyncio,uvloop,uvloop-protocol,ours-asyncio-uvloop",
        help="the implementations; those a scenario has no server for are skipped",
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep callgrind's dumps (SCENARIO-IMPL.PID) in DIR, for callgrind_annotate",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    names = [
        name
        for name in SCENARIOS
        if not args.only or any(fnmatch.fnmatch(name, pattern) for pattern in args.only)
    ]
    impls = args.impls.split(",")
    results: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="callgrind-"))
        for name in names:
            row = results.setdefault(name, {})
            for impl in impls:
                figure = measure(name, impl, args.requests, args.warmup, Path(tmp))
                if figure is not None:
                    row[impl] = figure
            cells = "  ".join(f"{impl} {row[impl]:>10,.0f}" for impl in impls if impl in row)
            ratios = "  ".join(
                f"ours/{impl} {row['ours'] / row[impl]:.3f}"
                for impl in impls
                if impl != "ours" and impl in row and "ours" in row
            )
            print(f"{name:34} {cells}   {ratios}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "requests": args.requests,
                    "python": sys.version.split()[0],
                    "pid": os.getpid(),
                    "instructions_per_request": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
