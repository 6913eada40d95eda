# -*- test-case-name: tests.test_async_task -*-
"""``HandlerTask``: runs one handler coroutine on the reactor thread.

What ``Deferred.fromCoroutine`` does, with four differences that handlers need:

* **Cheap resumption.**  A stream wait (``streams.Wait``) is no Deferred:
  when it fires, the coroutine is resumed with one ``send``.  Deferreds work
  as usual.
* **Writes leave per step.**  What the handler writes to its connection
  during one step (the code between two suspending awaits) reaches the
  transport in one piece when the step ends (``AsyncWriter.flush``).
* **asyncio futures.**  Under Twisted's asyncio reactor a handler may await
  asyncio futures (and so the coroutines of asyncio client libraries that end
  up awaiting them) as well as Deferreds; a bare ``yield`` (``asyncio.sleep(0)``)
  resumes on the next reactor iteration.
* **A reactor held too long is reported.**  Each step (the code a handler runs
  between two awaits) is timed; one longer than the handler class's
  ``blocking_warning`` seconds logs a warning naming the handler, as asyncio's
  debug mode reports slow callbacks.

Cancellation (:meth:`HandlerTask.cancel`) cancels what the coroutine awaits,
so it sees ``twisted.internet.defer.CancelledError`` at that ``await``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred

from txsocketserver._async.streams import Wait
from txsocketserver._core.base import log_warning

_monotonic = time.monotonic
_NOTHING = object()


class HandlerTask:
    """Drive a handler's ``setup``/``handle``/``finish`` coroutine on the reactor thread.

    Args:
        handler: the handler instance; its ``blocking_warning`` (seconds a step
            may hold the reactor before the warning; ``None``: never) applies.
        owner: told ``owner.handler_failed(task)`` inside the ``except`` block
            when the coroutine raises an ``Exception`` (so the exception is
            current, for ``handle_error``; a cancellation that reached the top
            is not an error), and ``owner.handler_ended(task)`` once it has
            ended, however it ended.
        reactor: schedules the resumption after a bare ``yield``.
        writer: the connection's ``AsyncWriter``, if any: what a step writes
            is flushed to the transport in one piece when the step ends.
    """

    __slots__ = (
        "handler",
        "_coroutine",
        "_owner",
        "_reactor",
        "_blocking_warning",
        "_awaiting",
        "_stepping",
        "_early",
        "_writer",
        "done",
    )

    def __init__(self, handler: Any, *, owner: Any, reactor: Any, writer: Any = None) -> None:
        self.handler = handler
        self._coroutine: Coroutine[Any, Any, Any] = handler._serve()
        self._owner = owner
        self._reactor = reactor
        self._blocking_warning: float | None = handler.blocking_warning
        self._awaiting: Any = None
        self._stepping = False
        self._early: Any = _NOTHING
        self._writer = writer
        self.done = False

    @property
    def name(self) -> str:
        handler = self.handler
        return f"{type(handler).__qualname__} (client {handler.client_address!r})"

    def start(self) -> None:
        self.resume()

    def cancel(self) -> None:
        """Cancel the handler at its current ``await`` (reactor thread).

        The coroutine may catch the ``CancelledError`` and go on (``finish()``
        does, to clean up); a later ``cancel()`` then cancels its next ``await``.
        Does nothing once the coroutine has ended.
        """
        awaiting, self._awaiting = self._awaiting, None
        if self.done or awaiting is None:
            return
        if isinstance(awaiting, (Deferred, Wait)):
            awaiting.cancel()
            return
        if isinstance(awaiting, _YieldResumption):
            awaiting.call.cancel()
        else:
            # An asyncio future: cancelling it would raise asyncio's
            # CancelledError; the handler sees Twisted's, as at every await.
            awaiting.remove_done_callback(self._future_done)
            awaiting.cancel()
        self.resume(CancelledError())

    def resume(self, error: BaseException | None = None) -> None:
        """What the task awaited is done: run the coroutine on, raising
        *error* at its ``await`` if given (reactor thread)."""
        self._awaiting = None
        coroutine = self._coroutine
        writer = self._writer
        while True:
            started = _monotonic()
            if writer is not None:
                writer.batching = True
            try:
                if error is None:
                    awaited = coroutine.send(None)
                else:
                    awaited = coroutine.throw(error)
            except StopIteration:
                self._finished(started)
                return
            except (CancelledError, asyncio.CancelledError):
                self._finished(started)
                return
            except Exception:
                self._held(started)
                self._owner.handler_failed(self)
                self._finished(None)
                return
            except BaseException:
                self._finished(started)
                raise
            finally:
                if writer is not None:
                    writer.batching = False
                    if writer._batch:
                        writer.flush()
            limit = self._blocking_warning
            if limit is not None and _monotonic() - started > limit:
                self._held(started)
            error = None
            if type(awaited) is Wait:
                awaited.task = self
                self._awaiting = awaited
                return
            if isinstance(awaited, Deferred):
                self._early = _NOTHING
                self._stepping = True
                awaited.addBoth(self._deferred_fired)
                self._stepping = False
                if self._early is _NOTHING:
                    self._awaiting = awaited
                    return
                # It fired during addBoth: go on here rather than recursing.
                self._early = _NOTHING
                continue
            if awaited is None:
                self._awaiting = _YieldResumption(self._reactor.callLater(0, self.resume))
                return
            if getattr(awaited, "_asyncio_future_blocking", None) is not None:
                awaited._asyncio_future_blocking = False
                self._awaiting = awaited
                awaited.add_done_callback(self._future_done)
                return
            error = TypeError(
                f"{self.name} awaited {awaited!r}: a handler can await coroutines, "
                "Deferreds and (under the asyncio reactor) asyncio futures"
            )

    def _deferred_fired(self, result: Any) -> Any:
        # The Deferred keeps its result: the coroutine's ``await`` reads it
        # back (and raises a Failure) when resumed.
        if self._stepping:
            self._early = result
        else:
            self.resume()
        return result

    def _future_done(self, future: Any) -> None:
        self.resume()

    def _held(self, started: float | None) -> None:
        if started is None or self._blocking_warning is None:
            return
        held = _monotonic() - started
        if held > self._blocking_warning:
            log_warning(
                "%s held the reactor for %.3f s without awaiting: every other connection "
                "waited meanwhile. Move blocking work to `await self.server.to_thread(...)`.",
                self.name,
                held,
            )

    def _finished(self, started: float | None) -> None:
        self._held(started)
        self.done = True
        self._awaiting = None
        self._owner.handler_ended(self)


class _YieldResumption:
    """What a task waits on after a bare ``yield``: the reactor's next turn."""

    __slots__ = ("call",)

    def __init__(self, call: Any) -> None:
        self.call = call
