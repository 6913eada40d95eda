"""Async handlers shared by the async tests and the processes they start (CLI, twistd)."""

from __future__ import annotations

import asyncio
import json

import txsocketserver


class AsyncEcho(txsocketserver.AsyncStreamRequestHandler):
    """Line echo, as the issue's example writes it."""

    async def handle(self) -> None:
        async for line in self.rfile:
            self.wfile.write(line)
            await self.wfile.drain()


class AsyncAddress(txsocketserver.AsyncStreamRequestHandler):
    """Replies with one JSON line: the client's and the server's address."""

    async def handle(self) -> None:
        reply = {"client": self.client_address, "server": self.request.getsockname()}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class AsyncioInterop(txsocketserver.AsyncStreamRequestHandler):
    """Awaits asyncio coroutines and futures (needs Twisted's asyncio reactor)."""

    async def handle(self) -> None:
        line = await self.rfile.readline()
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_later(0.01, future.set_result, b"future:")
        prefix = await future
        task_result = await asyncio.ensure_future(_upper(line))
        self.wfile.write(prefix + task_result)


async def _upper(data: bytes) -> bytes:
    await asyncio.sleep(0)
    return data.upper()
