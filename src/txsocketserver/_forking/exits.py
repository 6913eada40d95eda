# -*- test-case-name: tests.test_lifecycle,tests.test_forking_server_fork -*-
"""``ExitReports``: which forked requests' ends a dispatcher reports, and how they ended.

Both dispatchers (``dispatcher.ProcessDispatcher``, ``server_fork.ServerForkDispatcher``)
keep one, under their own lock: ``ForkingMixIn`` asks to hear of a request's
end (``report_exit``) right after handing it over, and collects the ends
(``take_exits``) once per loop, to end the request's lifecycle record
(``docs/architecture.md``, "The request lifecycle").
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ExitReports:
    """Requests whose end is wanted, by tag, until their child ends; then
    ``(what, exit code)`` until taken.  Not thread-safe: its owner calls it
    with its own lock held."""

    def __init__(self) -> None:
        self._watched: dict[int, Any] = {}
        self._ended: list[tuple[Any, int | None]] = []

    def watch(self, tag: int, what: Any, *, running: bool) -> None:
        """Report *what* when the request *tag* ends (at once if it is not *running*)."""
        if running:
            self._watched[tag] = what
        else:
            self._ended.append((what, None))

    def ended(self, tag: int, code: int | None) -> None:
        """The request *tag* ended with exit *code* (``None``: unknown)."""
        if self._watched and tag in self._watched:
            self._ended.append((self._watched.pop(tag), code))

    def take(self, everything: bool = False) -> list[tuple[Any, int | None]]:
        """The ends since the last call; with *everything*, the requests still
        running too (code ``None``), which are then forgotten."""
        ended, self._ended = self._ended, []
        if everything:
            ended += [(what, None) for what in self._watched.values()]
            self._watched.clear()
        return ended
