"""Where a request runs: the role every concurrency strategy fills.

``socketserver`` chooses the strategy by mixin (``ThreadingMixIn``,
``ForkingMixIn``), each overriding ``process_request``.  We keep that public
shape, and behind each mixin sits a dispatcher implementing
:class:`IRequestDispatcher`, so that limits and upkeep work the same
way whatever runs the request.  A synchronous server needs no dispatcher: its
requests run in the serving thread, as in the stdlib.

The dispatchers (``_thread_dispatcher``, ``_process_dispatcher``) are imported
by their mixins only when a server first dispatches a request: they and this
interface need Twisted and ``zope.interface``, which a process that merely
defines the server classes (a forking server's template and workers) must not
import.  What the workers run, ``run_request``, lives in ``_base``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Interface


class IRequestDispatcher(Interface):
    """Runs requests somewhere other than the serving thread."""

    def dispatch(function: Callable[..., object], *args: Any) -> None:
        """Start ``function(*args)`` (a server's ``process_request_thread`` or
        equivalent) and return without waiting for it."""

    def upkeep() -> None:
        """Periodic housekeeping, called from the serving loop (cheap when there
        is nothing to do)."""

    def close(wait: bool) -> None:
        """Release the dispatcher's resources; with *wait*, first let the
        requests in flight finish."""
