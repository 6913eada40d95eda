# -*- test-case-name: tests.test_observability -*-
"""The access log, and the text and JSON formats of every log line we write.

:class:`AccessLog` is a lifecycle observer: at the end of each record (a
connection; a datagram for a datagram server) it emits one ``twisted.logger``
event in the namespace :data:`ACCESS_NAMESPACE`, so that ``twistd``'s own
observers and log files get it too.  :func:`file_observer` writes events to a
file (``--access-log PATH``, or the server's own log on stderr) as text or
JSON lines.

No client can forge a line: every value a client can influence (the peer's
and PROXY-named addresses, anything a handler logs) is escaped in the text
format (CR, LF and every other control character become ``\\r``, ``\\n``,
``\\xNN``), and JSON is ``json.dumps`` of the whole record, which escapes
them too.  A traceback's lines are indented, so that none begins a line.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import provider

#: The ``twisted.logger`` namespace of access records.
ACCESS_NAMESPACE = "txsocketserver.access"
FORMATS = ("text", "json")

_access_log = Logger(namespace=ACCESS_NAMESPACE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """*text* with backslashes and control characters escaped: one line, always."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def address_text(address: Any) -> str | None:
    """``host:port`` (``[v6]:port``) or a Unix path, as a log shows an address."""
    if address is None:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "backslashreplace")
    return str(address) or "unix"


class AccessLog:
    """Emit one access event (:data:`ACCESS_NAMESPACE`) per record, when it ends.

    Args:
        name: the server's label in each record (its listen description).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pid = os.getpid()

    def accepted(self, record: Any) -> None:
        pass

    def started(self, record: Any) -> None:
        pass

    def refused(self, record: Any) -> None:
        pass

    def ended(self, record: Any) -> None:
        started = record.started
        duration = None if started is None or record.ended is None else record.ended - started
        # The client a PROXY header named, where it differs from the peer.
        client = record.client_address if record.client_address != record.peer else None
        fields = {
            "time": record.accepted_at,
            "pid": self._pid,
            "server": self.name,
            "peer": address_text(record.peer),
            "client": address_text(client),
            "duration": None if duration is None else round(duration, 6),
            "bytes_in": record.bytes_received,
            "bytes_out": record.bytes_sent,
            "outcome": record.outcome,
        }
        _access_log.info("{access_line}", access_line=access_text(fields), access=fields)


def access_text(fields: dict[str, Any]) -> str:
    """An access record as one text line (escaped; ``-`` for what is unknown)."""

    def show(value: Any) -> str:
        return "-" if value is None else escape(str(value))

    return (
        f"{show(fields['server'])} {show(fields['peer'])} client={show(fields['client'])} "
        f"{show(fields['outcome'])} {show(fields['duration'])}s "
        f"in={show(fields['bytes_in'])} out={show(fields['bytes_out'])} pid={fields['pid']}"
    )


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e3):03d}Z"


def format_text(event: dict[str, Any]) -> str:
    """One event as a text line: time, level, namespace, the escaped message
    (and an indented traceback when it carries a failure)."""
    when = event.get("log_time") or time.time()
    level = event.get("log_level", LogLevel.info)
    line = (
        f"{_timestamp(when)} [{event.get('log_namespace', '-')}#{level.name}] "
        f"{escape(formatEvent(event))}"
    )
    failure = event.get("log_failure")
    if failure is not None:
        trace = failure.getTraceback()
        line += "".join(f"\n\t{escape(part)}" for part in trace.rstrip("\n").split("\n"))
    return line + "\n"


def format_json(event: dict[str, Any]) -> str:
    """One event as a JSON object on one line: an access record's fields
    as they are; other events as time, level, namespace, message."""
    when = event.get("log_time") or time.time()
    access = event.get("access")
    if access is not None:
        record: dict[str, Any] = {"time": _timestamp(access["time"] or when), "type": "access"}
        record.update({k: v for k, v in access.items() if k != "time"})
    else:
        level = event.get("log_level", LogLevel.info)
        record = {
            "time": _timestamp(when),
            "level": level.name,
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def formatter(log_format: str) -> Callable[[dict[str, Any]], str]:
    """The formatter of ``--log-format`` *log_format* (``ValueError`` if unknown)."""
    if log_format not in FORMATS:
        raise ValueError(f"{log_format!r}: choose one of {', '.join(FORMATS)}")
    return format_text if log_format == "text" else format_json


def file_observer(
    stream: IO[str],
    log_format: str,
    *,
    accept: Callable[[dict[str, Any]], bool] | None = None,
) -> ILogObserver:
    """A log observer writing the events *accept* takes (all: ``None``) to
    *stream*, one line each, flushed."""
    format_event = formatter(log_format)

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if accept is not None and not accept(event):
            return
        try:
            stream.write(format_event(event))
            stream.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed stream must not break serving

    return observe


def is_access(event: dict[str, Any]) -> bool:
    """Whether *event* is an access record."""
    return event.get("log_namespace") == ACCESS_NAMESPACE


def open_access_log(path: str) -> IO[str]:
    """The stream ``--access-log PATH`` writes to (``-``: standard output).

    Error handling:
        ``OSError`` when the file cannot be opened for appending.
    """
    import sys

    if path == "-":
        return sys.stdout
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
