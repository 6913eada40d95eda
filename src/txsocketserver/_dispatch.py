"""Where a request runs: the role every concurrency strategy fills.

``socketserver`` chooses the strategy by mixin (``ThreadingMixIn``,
``ForkingMixIn``), each overriding ``process_request``.  We keep that public
shape, and behind each mixin sits a dispatcher implementing
:class:`IRequestDispatcher`, so that limits and upkeep work the same
way whatever runs the request.  A synchronous server needs no dispatcher: its
requests run in the serving thread, as in the stdlib.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Interface


def run_request(server: Any, request: Any, client_address: Any) -> bool:
    """Run one request away from the serving thread, as the stdlib's workers do.

    ``finish_request``, then ``handle_error`` if it raised an ``Exception``, and
    ``shutdown_request`` always.  Returns whether the handler succeeded.
    """
    try:
        server.finish_request(request, client_address)
        return True
    except Exception:
        server.handle_error(request, client_address)
        return False
    finally:
        server.shutdown_request(request)


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
