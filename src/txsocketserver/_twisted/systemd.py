# -*- test-case-name: tests.test_systemd -*-
"""systemd's service notification protocol (``sd_notify``) and its watchdog.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to a datagram socket (a
path, or ``@name`` in the abstract namespace) on which the service sends
newline-separated ``KEY=value`` assignments: ``READY=1`` once it serves,
``RELOADING=1`` and ``READY=1`` again around a reload, ``STOPPING=1`` when a
stop begins, ``STATUS=...`` for ``systemctl status``, ``MAINPID=`` for the
process systemd should watch, and ``WATCHDOG=1`` at least every
``WATCHDOG_USEC`` microseconds when ``WatchdogSec=`` is set (systemd kills
and restarts a service that stops sending it).

Without ``NOTIFY_SOCKET`` every call here does nothing.  Sending never
blocks and never raises: a socket that cannot be written to is logged once
(a warning) and the server serves on.  Worker processes of ``--workers``
are started without these variables: only the supervisor speaks to systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

_log = Logger(namespace="txsocketserver.systemd")

#: The environment variables of the protocol; ``--workers`` keeps them from workers.
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | bytes:
    # "@name" is the abstract namespace: a leading NUL byte for the kernel.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notifications to the socket ``NOTIFY_SOCKET`` names, if any.

    Args:
        environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID`` (default: the process's environment).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        socket_name = environ.get("NOTIFY_SOCKET", "")
        self.address = _address(socket_name) if socket_name else None
        self._failed = False
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if self.address is not None and usec.isdigit() and int(usec) > 0:
            if not pid or pid == str(os.getpid()):
                # systemd's advice (sd_watchdog_enabled(3)): ping at half the timeout.
                self.watchdog_interval = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` *assignments* in one datagram; whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                _log.warn(
                    "cannot notify systemd on NOTIFY_SOCKET ({address!r}): {error}; "
                    "serving on without notifications (logged once)",
                    address=os.environ.get("NOTIFY_SOCKET"),
                    error=exc,
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with this process as ``MAINPID`` (and a status line)."""
        extra = [] if status is None else [f"STATUS={status}"]
        return self.notify("READY=1", f"MAINPID={os.getpid()}", *extra)

    def reloading(self) -> bool:
        """``RELOADING=1`` (``READY=1`` follows once the reload is done)."""
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) tell this
        # reload from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """``STOPPING=1``: a stop has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """``STATUS=text``: what ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")


_notifier: Notifier | None = None
_stopping_sent = False


def notifier() -> Notifier:
    """The process's :class:`Notifier`, made from the environment on first use."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier()
    return _notifier


def notify_stopping() -> None:
    """Tell systemd that a stop has begun (``STOPPING=1``), once per process.

    Called where every stop begins: ``Health.begin_stop``
    (``txsocketserver._observability.health``).
    """
    global _stopping_sent
    if _stopping_sent:
        return
    _stopping_sent = True
    notifier().stopping()


class Heartbeat:
    """On the reactor: ``WATCHDOG=1`` while *healthy* says so, and ``STATUS=``
    whenever *status* changes.

    Args:
        healthy: returns ``None`` when healthy, else why not (logged once
            per episode while ``WATCHDOG=1`` is withheld).  Runs on the
            reactor thread, so each ping also proves the reactor turns.
        status: the ``STATUS=`` line, polled every :data:`STATUS_INTERVAL`
            seconds and sent when it changed.
        sender: the :class:`Notifier` (default: the process's).
    """

    #: Seconds between looks at the status line.
    STATUS_INTERVAL = 1.0

    def __init__(
        self,
        healthy: Callable[[], str | None],
        status: Callable[[], str],
        sender: Notifier | None = None,
    ) -> None:
        self._notifier = sender or notifier()
        self._healthy = healthy
        self._status = status
        self._last_status: str | None = None
        self._unhealthy: str | None = None
        self._loops: list[Any] = []

    def start(self) -> None:
        """Start the loops (reactor thread); nothing without ``NOTIFY_SOCKET``."""
        if not self._notifier.enabled:
            return
        from twisted.internet.task import LoopingCall

        status = LoopingCall(self.send_status)
        status.start(self.STATUS_INTERVAL, now=False)
        self._loops.append(status)
        if self._notifier.watchdog_interval is not None:
            watchdog = LoopingCall(self._ping)
            watchdog.start(self._notifier.watchdog_interval, now=True)
            self._loops.append(watchdog)

    def stop(self) -> None:
        """Stop the loops (reactor thread)."""
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

    def ready(self) -> None:
        """Send ``READY=1`` (with ``MAINPID`` and the status line)."""
        self._last_status = self._status()
        self._notifier.ready(self._last_status)

    def send_status(self) -> None:
        """Send ``STATUS=`` now if it changed."""
        text = self._status()
        if text != self._last_status:
            self._last_status = text
            self._notifier.status(text)

    def _ping(self) -> None:
        problem = self._healthy()
        if problem is None:
            if self._unhealthy is not None:
                _log.info("healthy again: sending WATCHDOG=1 to systemd again")
            self._unhealthy = None
            self._notifier.notify("WATCHDOG=1")
        elif problem != self._unhealthy:
            self._unhealthy = problem
            _log.warn("not sending WATCHDOG=1 to systemd: {problem}", problem=problem)


def server_status(server: Any) -> str:
    """The ``STATUS=`` line of a single-process server: where, and its live count."""
    return (
        f"serving on {server.server_address!r}: "
        f"{len(server._requests_in_flight())} request(s) in flight"
    )


class ServerNotifications:
    """systemd notifications of a single-process server (no ``--workers``).

    ``start()`` (reactor thread, once the server listens) sends ``READY=1``
    with ``MAINPID`` and starts the :class:`Heartbeat`: ``WATCHDOG=1`` while
    the reactor turns, ``STATUS=`` with the requests in flight.  ``STOPPING=1``
    comes from :func:`notify_stopping` when the stop begins.
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        self._heartbeat = Heartbeat(lambda: None, lambda: server_status(server))

    def start(self) -> None:
        self._heartbeat.ready()
        self._heartbeat.start()

    def stop(self) -> None:
        self._heartbeat.stop()


__all__ = [
    "ENVIRONMENT",
    "Heartbeat",
    "Notifier",
    "ServerNotifications",
    "notifier",
    "notify_stopping",
    "server_status",
]
