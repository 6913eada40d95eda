# -*- test-case-name: tests.test_async_handlers -*-
"""Async handlers: ``async def handle`` on the reactor, no thread per connection.

How a server with an async handler class serves (who accepts, the request's
path on the reactor thread, the data path) is told once, in
``docs/architecture.md`` ("A server with an async handler class"); what a
user sees (the handler classes, the limits, stopping) in ``docs/async.md``.

Only the handler classes (``handlers``) are imported with the package; the
rest needs Twisted and loads when a server with an async handler is created.
"""

from txsocketserver._async.handlers import (
    AsyncBaseRequestHandler,
    AsyncDatagramRequestHandler,
    AsyncStreamRequestHandler,
    is_async_handler,
)

__all__ = [
    "AsyncBaseRequestHandler",
    "AsyncDatagramRequestHandler",
    "AsyncStreamRequestHandler",
    "is_async_handler",
]
