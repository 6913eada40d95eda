"""Command-line options shared by ``twistd socketserver`` and ``python -m txsocketserver``.

One :class:`Options` parser (Twisted's ``usage.Options``, which ``twistd``
plugins must use anyway) and one :func:`build_server` serve both front ends:
the ``twistd`` plugin wraps the server in a ``ServerService``, ``__main__``
runs ``serve_forever`` in the blocking world.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

import txsocketserver
from txsocketserver._twisted.endpoints import DEFAULT_HEADER_TIMEOUT, Endpoint, listening_socket
from txsocketserver._twisted.proxy_protocol import DEFAULT_TRUSTED_PROXIES, TrustedProxies
from txsocketserver._twisted.service import DEFAULT_DRAIN_TIMEOUT

MODES = ("sync", "threading", "forking", "async")

_handler_log = Logger(namespace="txsocketserver.handler")

_LISTEN_HELP = (
    "Twisted server endpoint to listen on, e.g. tcp:8000, "
    "tcp:8000:interface=127.0.0.1, tcp6:8000, unix:/run/app.sock, "
    "ssl:8443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0 "
    "(socket activation), haproxy:tcp:8000 (PROXY protocol v1/v2: handlers see "
    "the real client address). A bare port number means tcp:PORT."
)


def load_object(spec: str, option: str) -> Any:
    """Import ``package.module:Name`` (``Name`` may be dotted: ``Outer.Inner``).

    The current directory is searched too (as ``python -m`` does), so a
    handler module next to the operator works under ``twistd`` as well.

    Error handling:
        ``usage.UsageError`` naming *option* and saying what went wrong.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise usage.UsageError(f"{option} {spec!r}: expected package.module:Name")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise usage.UsageError(
            f"{option} {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for name in attribute.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise usage.UsageError(
                f"{option} {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(obj, type):
        raise usage.UsageError(f"{option} {spec!r} is not a class")
    return obj


class Options(usage.Options):
    """Options of ``twistd socketserver`` and ``python -m txsocketserver``."""

    synopsis = "--listen ENDPOINT --handler package.module:Class [options]"
    longdesc = (
        "Serve a socketserver request handler class (your own, or the stdlib's such "
        "as http.server:SimpleHTTPRequestHandler) with txsocketserver on any Twisted "
        "server endpoint. Each connection gets a new handler instance, as with "
        "socketserver. On stop (SIGTERM, Ctrl-C, twistd shutdown) the server stops "
        "accepting, lets the requests in flight finish for up to --drain-timeout "
        "seconds, then closes their connections."
    )
    optParameters = [
        ["listen", "l", None, _LISTEN_HELP],
        [
            "handler",
            None,
            None,
            "Request handler class to serve, as package.module:Class "
            "(e.g. http.server:SimpleHTTPRequestHandler, examples.echo:EchoHandler).",
        ],
        [
            "mode",
            "m",
            None,
            "How requests run: sync (one at a time, in the serving thread), threading "
            "(each on a pool thread), forking (each in a child process), or async (an "
            "async handler class: all on the reactor thread). Default: async for an async "
            "handler class, else threading, or the --server class as it is.",
        ],
        [
            "max-threads",
            None,
            None,
            "With threading: at most this many requests run at once; the others wait. "
            "Default: no limit.",
            int,
        ],
        [
            "server",
            None,
            None,
            "Server class, as package.module:Class: a subclass of txsocketserver.TCPServer "
            "(or another txsocketserver stream server) whose hooks you customised. "
            "Default: txsocketserver.TCPServer, with --mode's mix-in.",
        ],
        [
            "drain-timeout",
            None,
            DEFAULT_DRAIN_TIMEOUT,
            "Seconds requests in flight may take to finish when stopping, before "
            "their connections are closed.",
            float,
        ],
        [
            "trusted-proxies",
            None,
            ",".join(DEFAULT_TRUSTED_PROXIES),
            "With haproxy: endpoints, the comma-separated peer addresses or networks "
            "(10.0.0.0/8, fd00::/8) whose PROXY header is believed; '*' trusts any "
            "peer. Connections from other peers are refused and logged: their header "
            "could claim any client address. Unix-socket peers are always trusted.",
        ],
        [
            "header-timeout",
            None,
            DEFAULT_HEADER_TIMEOUT,
            "With haproxy: endpoints, seconds from accept for the PROXY header to "
            "arrive before the connection is closed.",
            float,
        ],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse *options*; under ``twistd``, a usage error exits with status 1.

        ``twistd`` before Twisted 26.4 prints a usage error and exits with
        status 0, so a supervisor would take a misconfigured server for a clean
        exit: as its subcommand (``parent`` set), we exit 1 ourselves, with the
        one-line message, on every Twisted version.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is None:
                raise  # python -m txsocketserver reports it itself
            raise SystemExit(f"twistd socketserver: {error}") from None

    def postOptions(self) -> None:
        if not self["listen"]:
            raise usage.UsageError("--listen ENDPOINT is required (e.g. --listen tcp:8000)")
        if not self["handler"]:
            raise usage.UsageError(
                "--handler package.module:Class is required "
                "(e.g. --handler http.server:SimpleHTTPRequestHandler)"
            )
        if self["listen"].isdigit():
            self["listen"] = f"tcp:{self['listen']}"
        mode = self["mode"]
        if mode is not None and mode not in MODES:
            raise usage.UsageError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        if self["max-threads"] is not None and self["max-threads"] < 1:
            raise usage.UsageError("--max-threads must be at least 1")
        if self["drain-timeout"] < 0:
            raise usage.UsageError("--drain-timeout must not be negative")
        if self["header-timeout"] <= 0:
            raise usage.UsageError("--header-timeout must be positive")
        self["trusted_proxies"] = tuple(
            entry.strip() for entry in self["trusted-proxies"].split(",") if entry.strip()
        )
        try:
            TrustedProxies(self["trusted_proxies"])
        except ValueError as exc:
            raise usage.UsageError(f"--trusted-proxies: {exc}") from exc
        self["handler_class"] = load_object(self["handler"], "--handler")
        mode = _async_mode(self["handler_class"], mode)
        self["server_class"] = server_class(self["server"], mode)
        if not issubclass(self["server_class"], txsocketserver.ForkingMixIn):
            # A forking child imports its handler class by name: it keeps the
            # stdlib's stderr lines.
            self["handler_class"] = logging_handler_class(self["handler_class"])
        if self["max-threads"] is not None and not issubclass(
            self["server_class"], txsocketserver.ThreadingMixIn
        ):
            raise usage.UsageError("--max-threads needs --mode threading")
        self["endpoint"] = Endpoint(self["listen"])
        try:
            self["endpoint"].resolve()
        except ValueError as exc:
            raise usage.UsageError(f"--listen: {exc}") from exc
        if issubclass(self["server_class"], txsocketserver.ForkingMixIn):
            listening = listening_socket(self["endpoint"])
            if listening is None or listening.tls is not None:
                raise usage.UsageError(
                    f"--listen {self['listen']!r}: forking servers hand each child the "
                    "accepted OS socket, so they need a plain tcp:PORT, tcp6:PORT or "
                    "unix:PATH; TLS and PROXY-protocol connections live in the parent "
                    "process (use --mode threading)"
                )
        self["address"] = self["endpoint"]


def _async_mode(handler_class: type, mode: str | None) -> str | None:
    """The ``--mode`` to build the server with: async handler classes run on
    the reactor, as a plain (sync) server's handlers."""
    from txsocketserver._async import is_async_handler

    if not is_async_handler(handler_class):
        if mode == "async":
            raise usage.UsageError(
                f"--mode async needs an async handler class "
                f"(txsocketserver.AsyncStreamRequestHandler); {handler_class.__name__} is not one"
            )
        return mode
    if mode not in (None, "async", "sync"):
        raise usage.UsageError(
            f"--mode {mode}: {handler_class.__name__} is an async handler class, which runs "
            "on the reactor thread (leave --mode out, or say --mode async)"
        )
    return "sync"


def server_class(spec: str | None, mode: str | None) -> type:
    """The server class for ``--server`` and ``--mode``.

    Error handling:
        ``usage.UsageError`` for a class that is not a txsocketserver stream
        server, or a mode it contradicts.
    """
    mixins: dict[str, type | None] = {
        "sync": None,
        "threading": txsocketserver.ThreadingMixIn,
        "forking": txsocketserver.ForkingMixIn,
    }
    if spec is None:
        base: type = txsocketserver.TCPServer
        mode = mode or "threading"
    else:
        base = load_object(spec, "--server")
        if not issubclass(base, txsocketserver.BaseServer):
            hint = ""
            if any(cls.__module__ == "socketserver" for cls in base.__mro__):
                hint = " (it is built on the stdlib's socketserver; rebase it on txsocketserver)"
            raise usage.UsageError(f"--server {spec!r} is not a txsocketserver server{hint}")
        if mode is None:
            return base
    concurrent = (txsocketserver.ThreadingMixIn, txsocketserver.ForkingMixIn)
    current = next((m for m in concurrent if issubclass(base, m)), None)
    wanted = mixins[mode]
    if current is not None and current is not wanted:
        raise usage.UsageError(
            f"--mode {mode} contradicts --server {spec!r}, which is a {current.__name__}"
        )
    if wanted is None or current is wanted:
        return base
    if mode == "forking":
        if spec is None:
            return txsocketserver.ForkingTCPServer
        # A child process imports its server class by name, so a class made
        # here on the fly would not do.
        raise usage.UsageError(
            f"--mode forking needs a forking --server class: define "
            f"class Forking{base.__name__}(ForkingMixIn, {base.__name__}) at the top "
            "level of a module and pass that"
        )
    # Only threading is left: sync and forking returned above.
    return type(f"Threading{base.__name__}", (wanted, base), {"__module__": __name__})


def build_server(options: Options) -> Any:
    """Create (bind, listen) the server the options describe.

    Error handling:
        ``usage.UsageError`` when listening fails (port in use, no systemd
        socket...), naming the endpoint.
    """
    try:
        server = options["server_class"](options["address"], options["handler_class"])
    except usage.UsageError:
        raise
    except Exception as exc:
        raise usage.UsageError(
            f"cannot listen on {options['listen']!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if options["max-threads"] is not None:
        server.max_threads = options["max-threads"]
    server.trusted_proxies = options["trusted_proxies"]
    server.header_timeout = options["header-timeout"]
    return server


def logging_handler_class(handler_class: type) -> type:
    """*handler_class*, made to log through ``twisted.logger`` if it writes
    log lines to stderr (``http.server``'s handlers: ``log_message``).

    An access line becomes an info event, ``log_error`` a warning, each with
    the client's address (``client``); other handler classes are returned
    unchanged.
    """
    import http.server

    if not issubclass(handler_class, http.server.BaseHTTPRequestHandler):
        return handler_class

    def log_message(self: Any, format: str, *args: Any) -> None:
        _handler_log.info(
            "{client} {message}", client=self.address_string(), message=format % args
        )

    def log_error(self: Any, format: str, *args: Any) -> None:
        _handler_log.warn(
            "{client} {message}", client=self.address_string(), message=format % args
        )

    return type(
        f"Logging{handler_class.__name__}",
        (handler_class,),
        {
            "__module__": __name__,
            "log_message": log_message,
            "log_error": log_error,
        },
    )


def makeService(options: Options) -> Any:
    """The ``twistd socketserver`` service: the server, listening, as a ServerService.

    The server listens here, before ``twistd`` daemonises or drops privileges
    (so ``tcp:80`` works when started as root), and serves once the reactor runs.
    """
    from txsocketserver._twisted.service import ServerService, _log

    server = build_server(options)
    _log.info("{description}", description=describe(options, server))
    return ServerService(server, drain_timeout=options["drain-timeout"])


def describe(options: Options, server: Any) -> str:
    """One line saying what is served where (for the logs)."""
    address = server.server_address
    if isinstance(address, tuple):
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        where = f"{host}:{address[1]}"
    else:
        where = str(address)
    return (
        f"serving {options['handler']} on {options['listen']} at {where} ({type(server).__name__})"
    )


__all__ = [
    "MODES",
    "Options",
    "build_server",
    "describe",
    "load_object",
    "logging_handler_class",
    "makeService",
    "server_class",
]
