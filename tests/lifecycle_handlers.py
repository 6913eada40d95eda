"""Handlers the worker lifecycle tests serve (imported by worker processes, by name)."""

from __future__ import annotations

import json
import os
import socketserver
import sys
import time

import txsocketserver

#: Memory a request asked this worker to hold ("grow MB").
_held: list[bytearray] = []

# A reload's first worker to import this module claims the file and is slow to
# start: the others get ready first.
_slow = os.environ.get("LIFECYCLE_SLOW_START_FILE")
if _slow:
    try:
        os.rename(_slow, f"{_slow}.{os.getpid()}")
    except OSError:
        pass
    else:
        time.sleep(float(os.environ.get("LIFECYCLE_SLOW_START_SECONDS", "4")))


class LineHandler(socketserver.StreamRequestHandler):
    """One line in, one JSON line out: ``{"pid": ...}``.

    ``sleep S`` sleeps first; ``grow MB`` keeps MB more megabytes alive in
    the worker; ``say TEXT`` prints TEXT on stderr (the log).
    """

    def handle(self) -> None:
        for line in self.rfile:
            words = line.decode().split()
            if words[:1] == ["sleep"]:
                time.sleep(float(words[1]))
            elif words[:1] == ["grow"]:
                # Written to, so that the pages are resident.
                _held.append(bytearray(b"x" * (int(words[1]) * 1_000_000)))
            elif words[:1] == ["say"]:
                print(f"{os.getpid()} says {' '.join(words[1:])}", file=sys.stderr, flush=True)
            self.wfile.write(json.dumps({"pid": os.getpid()}).encode() + b"\n")
            self.wfile.flush()


class ReactorBlockingHandler(txsocketserver.AsyncStreamRequestHandler):
    """An async handler that blocks its reactor: ``sleep S`` calls time.sleep."""

    async def handle(self) -> None:
        async for line in self.rfile:
            words = line.decode().split()
            if words[:1] == ["sleep"]:
                time.sleep(float(words[1]))  # the mistake --worker-timeout catches
            self.wfile.write(json.dumps({"pid": os.getpid()}).encode() + b"\n")
            await self.wfile.drain()
