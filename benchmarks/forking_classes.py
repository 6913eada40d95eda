"""Classes for the forking scenarios, at module level on purpose.

A txsocketserver forking server runs each request in a worker process that
finds the server and handler classes by importing them by name, so they cannot
be defined inside a factory function as in ``servers.py``.

Both implementations get the very same class bodies, defined here; only the
base classes differ, and each implementation's concrete classes live in a
module of its own (``forking_ours``, ``forking_stdlib``) so that a server
process imports only the implementation it runs: the stdlib's server must not
carry txsocketserver or Twisted, whose memory every fork would copy.
"""

from __future__ import annotations

BACKLOG = 1024
# Loop iterations of pure Python per CPU-bound request: about 20 ms on the
# 2-core benchmark machine (Python 3.11).
CPU_WORK = 300_000


def burn_cpu(iterations: int = CPU_WORK) -> int:
    """A fixed amount of pure-Python work (not a fixed time: on a busy core it
    takes longer, as real work would)."""
    total = 0
    for i in range(iterations):
        total += i * i
    return total


class Settings:
    """The benchmark's common server settings (see ``servers.py``)."""

    allow_reuse_address = True
    request_queue_size = BACKLOG


class LineEcho:
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class CpuBoundEcho:
    """Read one line, do ~20 ms of CPU work, echo the line."""

    def handle(self) -> None:
        line = self.rfile.readline()
        burn_cpu()
        self.wfile.write(line)
