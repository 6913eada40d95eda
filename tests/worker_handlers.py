"""Handlers the worker tests serve (imported by worker processes, by name)."""

from __future__ import annotations

import json
import os
import socketserver
import time
from http.server import BaseHTTPRequestHandler

import txsocketserver

#: Read once per import: a reload (new workers, fresh interpreters) sees a new value.
VERSION = (
    os.environ.get("WORKER_TEST_VERSION_FILE")
    and open(  # noqa: SIM115
        os.environ["WORKER_TEST_VERSION_FILE"]
    )
    .read()
    .strip()
)

if os.environ.get("WORKER_TEST_CRASH_FILE") and os.path.exists(
    os.environ["WORKER_TEST_CRASH_FILE"]
):
    # Broken code, as a reload may import: the worker cannot boot.
    raise RuntimeError("crash file present: this worker dies at start")


class PidHandler(socketserver.StreamRequestHandler):
    """Per line received: a JSON line with the worker's pid, the client's
    address and the handler module's VERSION; ``sleep N`` sleeps first."""

    def handle(self) -> None:
        for line in self.rfile:
            words = line.split()
            if words[:1] == [b"sleep"]:
                time.sleep(float(words[1]))
            reply = {
                "pid": os.getpid(),
                "ppid": os.getppid(),  # a forking worker's: its template
                "client": list(self.client_address),
                "version": VERSION,
            }
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class PidHTTPHandler(BaseHTTPRequestHandler):
    """HTTP: the same JSON as PidHandler, for load balancers' HTTP checks."""

    def do_GET(self) -> None:
        body = json.dumps(
            {"pid": os.getpid(), "client": list(self.client_address), "path": self.path}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class AsyncPidHandler(txsocketserver.AsyncStreamRequestHandler):
    """PidHandler as an async handler: served on each worker's reactor."""

    async def handle(self) -> None:
        async for line in self.rfile:
            if line.split()[:1] == [b"sleep"]:
                await self.server.to_thread(time.sleep, float(line.split()[1]))
            reply = {"pid": os.getpid(), "client": list(self.client_address), "version": VERSION}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            await self.wfile.drain()
