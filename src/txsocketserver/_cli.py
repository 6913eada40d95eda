# -*- test-case-name: tests.test_twistd_cli,tests.test_async_cli,tests.test_workers -*-
"""Command-line options shared by ``twistd socketserver`` and ``python -m txsocketserver``.

One :class:`Options` parser (Twisted's ``usage.Options``, which ``twistd``
plugins must use anyway) and one :func:`build_server` serve both front ends:
the ``twistd`` plugin wraps the server in a ``ServerService``, ``__main__``
runs ``serve_forever`` in the blocking world.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

import txsocketserver
from txsocketserver import _config
from txsocketserver._observability.cli import OPTION_PARAMETERS, check_options, worker_fields
from txsocketserver._server_classes import MODES, load_object, mode_for, server_class
from txsocketserver._twisted.endpoints import DEFAULT_HEADER_TIMEOUT, Endpoint, listening_socket
from txsocketserver._twisted.proxy_protocol import DEFAULT_TRUSTED_PROXIES, TrustedProxies
from txsocketserver._twisted.service import DEFAULT_DRAIN_TIMEOUT

_handler_log = Logger(namespace="txsocketserver.handler")

_LISTEN_HELP = (
    "Twisted server endpoint to listen on, e.g. tcp:8000, "
    "tcp:8000:interface=127.0.0.1, tcp6:8000, unix:/run/app.sock, "
    "ssl:8443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0 "
    "(socket activation), haproxy:tcp:8000 (PROXY protocol v1/v2: handlers see "
    "the real client address). A bare port number means tcp:PORT. Repeat it "
    "(with --workers) to serve several sockets."
)


class Options(usage.Options):
    """Options of ``twistd socketserver`` and ``python -m txsocketserver``."""

    synopsis = "--listen ENDPOINT --handler package.module:Class [options]"
    # Options of `python -m txsocketserver` alone (MainOptions): a --config
    # file shared with it may hold them, and twistd ignores them.
    other_front_end_options: tuple[str, ...] = ("log-level", "reactor")
    longdesc = (
        "Serve a socketserver request handler class (your own, or the stdlib's such "
        "as http.server:SimpleHTTPRequestHandler) with txsocketserver on any Twisted "
        "server endpoint. Each connection gets a new handler instance, as with "
        "socketserver. On stop (SIGTERM, Ctrl-C, twistd shutdown) the server stops "
        "accepting, lets the requests in flight finish for up to --drain-timeout "
        "seconds, then closes their connections."
    )
    optFlags = [
        [
            "reuse-port",
            None,
            "With --workers: each worker binds its own SO_REUSEPORT socket, and the "
            "kernel spreads connections over them (tcp:, tcp6:, ssl: only). Default: "
            "the workers share the supervisor's socket.",
        ],
        # The configuration file: see txsocketserver._config.
        *_config.CONFIG_FLAGS,
    ]
    optParameters = [
        [
            "handler",
            None,
            None,
            "Request handler class to serve, as package.module:Class "
            "(e.g. http.server:SimpleHTTPRequestHandler, examples.echo_server:EchoHandler).",
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
        # Workers: see txsocketserver._workers and docs/operations.md.
        [
            "workers",
            "w",
            None,
            "Serve with this many worker processes sharing the listening socket(s), "
            "supervised: SIGHUP reloads (new workers, then the old ones drain), "
            "SIGTTIN/SIGTTOU add/remove one, a dead worker is replaced. Default: "
            "one process, no supervisor.",
            int,
        ],
        [
            "max-requests",
            None,
            0,
            "With --workers: recycle a worker after this many requests (0: never).",
            int,
        ],
        [
            "max-requests-jitter",
            None,
            0,
            "With --max-requests: add a random 0..N to each worker's limit, so that "
            "workers do not restart all at once.",
            int,
        ],
        [
            "worker-timeout",
            None,
            None,
            "With --workers: replace (and log) a worker whose serving loop or reactor "
            "has not made progress for this many seconds, e.g. a sync worker stuck in "
            "one request. Default: never.",
            float,
        ],
        # Worker lifecycle and log files (docs/operations.md).
        [
            "max-worker-memory",
            None,
            None,
            "With --workers: replace a worker whose resident memory exceeds this many "
            "megabytes (Linux); it drains once its replacement is ready. Default: no limit.",
            float,
        ],
        [
            "max-worker-lifetime",
            None,
            None,
            "With --workers: replace each worker after it has served this many seconds, "
            "plus a random 0..--max-worker-lifetime-jitter; it drains once its "
            "replacement is ready. Default: never.",
            float,
        ],
        [
            "max-worker-lifetime-jitter",
            None,
            None,
            "With --max-worker-lifetime: the most seconds added at random to each worker's "
            "lifetime, so that workers are not all replaced at once. Default: a tenth of "
            "the lifetime.",
            float,
        ],
        [
            "log-file",
            None,
            None,
            "Append standard output and standard error (the log, and with --workers every "
            "worker's output) to this file instead; SIGUSR1 reopens it (logrotate).",
        ],
        *_config.CONFIG_PARAMETERS,
    ]
    # Metrics, health, access log, the stop in phases: _observability/cli.py.
    optParameters += OPTION_PARAMETERS

    def __init__(self) -> None:
        super().__init__()
        self["listens"] = []

    def opt_version(self) -> None:
        """Print the version of txsocketserver (and of the Twisted and Python
        it runs on) and exit."""
        print(version_line())
        raise SystemExit(0)

    def opt_listen(self, description: str) -> None:
        if self.pop("listens-preset", False):
            # From --config or the environment: the command line's replace them.
            self["listens"] = []
            self["listener-options"] = []
        self["listens"].append(description)

    opt_listen.__doc__ = _LISTEN_HELP
    opt_l = opt_listen

    def opt_graceful_timeout(self, seconds: str) -> None:
        """Alias of --drain-timeout (gunicorn's name)."""
        try:
            self["drain-timeout"] = float(seconds)
        except ValueError:
            raise usage.UsageError(f"--graceful-timeout {seconds!r}: not a number") from None

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse *options*; under ``twistd``, a usage error exits with status 1.

        ``twistd`` before Twisted 26.4 prints a usage error and exits with
        status 0, so a supervisor would take a misconfigured server for a clean
        exit: as its subcommand (``parent`` set), we exit 1 ourselves, with the
        one-line message, on every Twisted version.
        """
        try:
            # The --config file and the environment first (txsocketserver._config).
            _config.parse(self, options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is None:
                raise  # python -m txsocketserver reports it itself
            if isinstance(error, _config.ConfigError):
                print(f"twistd socketserver: {error}", file=sys.stderr)
                raise SystemExit(2) from None
            raise SystemExit(f"twistd socketserver: {error}") from None

    def postOptions(self) -> None:
        if not self["listens"]:
            raise usage.UsageError("--listen ENDPOINT is required (e.g. --listen tcp:8000)")
        if not self["handler"]:
            raise usage.UsageError(
                "--handler package.module:Class is required "
                "(e.g. --handler http.server:SimpleHTTPRequestHandler)"
            )
        self["listens"] = [f"tcp:{d}" if d.isdigit() else d for d in self["listens"]]
        self["listen"] = self["listens"][0]
        self._check_workers()
        mode = self["mode"]
        if mode is not None and mode not in MODES:
            raise usage.UsageError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        if self["max-threads"] is not None and self["max-threads"] < 1:
            raise usage.UsageError("--max-threads must be at least 1")
        # "not >=": nan compares false both ways (a nan timeout broke every connection).
        if not self["drain-timeout"] >= 0:
            raise usage.UsageError("--drain-timeout must be a number, not negative")
        if not self["header-timeout"] > 0:
            raise usage.UsageError("--header-timeout must be a positive number")
        self["trusted_proxies"] = tuple(
            entry.strip() for entry in self["trusted-proxies"].split(",") if entry.strip()
        )
        try:
            TrustedProxies(self["trusted_proxies"])
        except ValueError as exc:
            raise usage.UsageError(f"--trusted-proxies: {exc}") from exc
        self["handler_class"] = load_object(self["handler"], "--handler")
        mode = mode_for(self["handler_class"], mode)
        self["server_class"] = server_class(self["server"], mode)
        if not issubclass(self["server_class"], txsocketserver.ForkingMixIn):
            # A forking child imports its handler class by name: it keeps the
            # stdlib's stderr lines.
            self["handler_class"] = logging_handler_class(self["handler_class"])
        if self["max-threads"] is not None and not issubclass(
            self["server_class"], txsocketserver.ThreadingMixIn
        ):
            raise usage.UsageError("--max-threads needs --mode threading")
        endpoints = []
        for description in self["listens"]:
            endpoint = Endpoint(description)
            try:
                endpoint.resolve()
            except ValueError as exc:
                raise usage.UsageError(f"--listen: {exc}") from exc
            if issubclass(self["server_class"], txsocketserver.ForkingMixIn):
                from txsocketserver._twisted import proxied_sockets

                listening = listening_socket(endpoint)
                if listening is None and not proxied_sockets.serves(endpoint):
                    raise usage.UsageError(
                        f"--listen {description!r}: forking servers hand each child the "
                        "accepted OS socket, so they need tcp:PORT, tcp6:PORT, unix:PATH, "
                        "ssl:PORT (the child does the TLS handshake) or haproxy: in front "
                        "of one of those (the PROXY header is read first)"
                    )
            endpoints.append(endpoint)
        self["endpoint"] = self["address"] = endpoints[0]
        check_options(self)

    def _check_workers(self) -> None:
        workers = self["workers"]
        if workers is None:
            needing = [
                option
                for option, given in (
                    ("several --listen", len(self["listens"]) > 1),
                    ("--reuse-port", self["reuse-port"]),
                    ("--max-requests", self["max-requests"]),
                    ("--worker-timeout", self["worker-timeout"] is not None),
                    ("--max-worker-memory", self["max-worker-memory"] is not None),
                    ("--max-worker-lifetime", self["max-worker-lifetime"] is not None),
                )
                if given
            ]
            if needing:
                raise usage.UsageError(f"{', '.join(needing)} need(s) --workers N")
            return
        if workers < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["max-requests"] < 0 or self["max-requests-jitter"] < 0:
            raise usage.UsageError("--max-requests and --max-requests-jitter must not be negative")
        if self["worker-timeout"] is not None and not self["worker-timeout"] > 0:
            raise usage.UsageError("--worker-timeout must be positive")
        for name in ("max-worker-memory", "max-worker-lifetime"):
            if self[name] is not None and not self[name] > 0:
                raise usage.UsageError(f"--{name} must be positive")
        jitter = self["max-worker-lifetime-jitter"]
        if jitter is not None and not jitter >= 0:
            raise usage.UsageError("--max-worker-lifetime-jitter must not be negative")


def version_line() -> str:
    """What ``--version`` prints: ours first, then what runs it."""
    import platform

    from twisted import version as twisted_version

    return (
        f"txsocketserver {txsocketserver.__version__} "
        f"(Twisted {twisted_version.public()}, "
        f"{platform.python_implementation()} {platform.python_version()})"
    )


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
    for attribute, value in _config.listener_settings(options, 0).items():
        setattr(server, attribute, value)
    return server


def build_workers(options: Options) -> Any:
    """The ``--workers`` supervisor the options describe, its sockets bound.

    Error handling:
        ``usage.UsageError`` when a socket cannot be made (port in use, an
        endpoint workers cannot share...), naming the reason.
    """
    from txsocketserver._workers.supervisor import Workers

    try:
        return Workers(
            options["handler"],
            options["listens"],
            workers=options["workers"],
            mode=options["mode"],
            server=options["server"],
            max_threads=options["max-threads"],
            drain_timeout=options["drain-timeout"],
            reuse_port=options["reuse-port"],
            max_requests=options["max-requests"],
            max_requests_jitter=options["max-requests-jitter"],
            worker_timeout=options["worker-timeout"],
            trusted_proxies=options["trusted_proxies"],
            header_timeout=options["header-timeout"],
            drain_delay=options["drain-delay"],
            observability=worker_fields(options),
            max_worker_memory=options["max-worker-memory"],
            max_worker_lifetime=options["max-worker-lifetime"],
            max_worker_lifetime_jitter=options["max-worker-lifetime-jitter"],
            log_file=options["log-file"],
            listener_settings=[
                _config.listener_settings(options, index)
                for index in range(len(options["listens"]))
            ],
        )
    except (OSError, ValueError, TypeError) as exc:
        raise usage.UsageError(f"cannot listen: {exc}") from exc


def describe_workers(options: Options, workers: Any) -> str:
    """One line per listener saying what is served where (for the logs)."""
    return "\n".join(
        f"serving {options['handler']} on {description} at {_where(address)} "
        f"({options['workers']} worker{'s' if options['workers'] != 1 else ''}, "
        f"{options['mode'] or 'default'} mode)"
        for description, address in zip(options["listens"], workers.addresses, strict=True)
    )


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
    With ``--workers``, the :class:`~txsocketserver.Workers` supervisor instead.
    """
    from txsocketserver._observability.cli import observed_service
    from txsocketserver._twisted.service import ServerService, _log

    start_log_file(options)
    if options["workers"] is not None:
        workers = build_workers(options)
        _log.info("{description}", description=describe_workers(options, workers))
        return observed_service(options, workers, workers=workers)
    server = build_server(options)
    _log.info("{description}", description=describe(options, server))
    from txsocketserver._twisted.tls import reload_certificates_on_sighup

    # twistd leaves SIGHUP alone: with ssl: listeners, it reloads their certificates.
    reload_certificates_on_sighup(server)
    service = ServerService(server, drain_timeout=options["drain-timeout"])
    return with_process_services(
        observed_service(options, service, server=server), server, options
    )


def start_log_file(options: Options) -> None:
    """With ``--log-file``: standard output and standard error go to it from now on.

    Error handling:
        ``usage.UsageError`` if the file cannot be opened for appending.
    """
    if options["log-file"] is None:
        return
    from txsocketserver import _logfiles

    try:
        _logfiles.log_to_file(options["log-file"])
    except OSError as exc:
        raise usage.UsageError(f"--log-file {options['log-file']!r}: {exc.strerror}") from exc


def with_process_services(service: Any, server: Any, options: Options) -> Any:
    """*service*, plus (under ``twistd``) SIGUSR1 for ``--log-file`` and systemd's
    notifications, when they are wanted; a single server only (``Workers``
    does both itself)."""
    from txsocketserver._twisted import systemd

    if options["log-file"] is None and not systemd.notifier().enabled:
        return service
    from twisted.application.service import MultiService, Service

    from txsocketserver import _logfiles

    notifications = systemd.ServerNotifications(server)

    class ProcessServices(Service):
        def startService(self) -> None:
            Service.startService(self)
            from twisted.internet import reactor

            def running() -> None:
                # After twistd's own SIGUSR1 handler (it rotates --logfile): ours chains to it.
                if options["log-file"] is not None:
                    _logfiles.handle_sigusr1()
                notifications.start()

            reactor.callWhenRunning(running)

        def stopService(self) -> None:
            notifications.stop()
            Service.stopService(self)

    both = MultiService()
    service.setServiceParent(both)
    ProcessServices().setServiceParent(both)
    return both


def describe(options: Options, server: Any) -> str:
    """One line saying what is served where (for the logs)."""
    return (
        f"serving {options['handler']} on {options['listen']} at "
        f"{_where(server.server_address)} ({type(server).__name__})"
    )


def _where(address: Any) -> str:
    if isinstance(address, tuple):
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"{host}:{address[1]}"
    return str(address)


__all__ = [
    "Options",
    "build_server",
    "build_workers",
    "describe",
    "describe_workers",
    "logging_handler_class",
    "makeService",
]
