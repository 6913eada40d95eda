"""Server factories: one per (scenario kind, implementation), run inside ``server.py``.

A factory binds a listening socket on 127.0.0.1 (port 0: the kernel picks one)
and returns a ``ServerHandle``: the port, and a callable that serves until the
process is killed.  Factories import their implementation lazily, so the driver
(``run.py``), which only names them, never imports Twisted or txsocketserver.

The ``socketserver`` factories build the very same class source against either
module: ``ours`` gets ``txsocketserver``, ``stdlib`` gets ``socketserver``.  The
``twisted`` factories are what a Twisted programmer would write by hand for the
same job: the reference for the async ceiling.

Common settings, identical for every implementation:
- listen backlog 1024 (``request_queue_size`` / ``backlog=``): the stdlib's 5
  turns connect bursts into one-second SYN retransmits and measures those;
- request logging off (``log_message``, ``Site.log``): one ``stderr`` line per
  request would be measured instead of the server;
- ``daemon_threads``: the process is killed at the end, nothing waits for handlers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

HOST = "127.0.0.1"
BACKLOG = 1024
HTTP_BODY = (b"Hello from the txsocketserver benchmark. " * 3)[:99] + b"\n"  # 100 bytes

# The module each socketserver-API implementation is imported from.
SOCKETSERVER_MODULES = {"ours": "txsocketserver", "stdlib": "socketserver"}


class ServerHandle(NamedTuple):
    port: int
    serve: Callable[[], None]
    # The socketserver-API server object, where there is one (observed()).
    server: object = None


ServerStarter = Callable[[], ServerHandle]


def socketserver_module(impl: str) -> ModuleType:
    return importlib.import_module(SOCKETSERVER_MODULES[impl])


def listen_socketserver(module: ModuleType, server_class: str, handler: type) -> ServerHandle:
    """Bind ``module.<server_class>`` with the common benchmark settings."""

    class BenchServer(getattr(module, server_class)):
        allow_reuse_address = True
        request_queue_size = BACKLOG
        daemon_threads = True

    server = BenchServer((HOST, 0), handler)
    return ServerHandle(server.server_address[1], server.serve_forever, server)


def listen_twisted(factory: object) -> ServerHandle:
    """Listen with the default reactor; SIGTERM keeps its default action (exit)."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=HOST)
    return ServerHandle(port.getHost().port, lambda: reactor.run(installSignalHandlers=False))


# --- line echo -------------------------------------------------------------


def socketserver_echo(impl: str, server_class: str) -> ServerHandle:
    module = socketserver_module(impl)

    class EchoHandler(module.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    return listen_socketserver(module, server_class, EchoHandler)


def twisted_echo() -> ServerHandle:
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    class Echo(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            self.sendLine(line)

    return listen_twisted(Factory.forProtocol(Echo))


def echo_servers(server_class: str) -> dict[str, ServerStarter]:
    """Echo servers; ``server_class`` is ``TCPServer`` or ``ThreadingTCPServer``."""
    return {
        "ours": lambda: socketserver_echo("ours", server_class),
        "stdlib": lambda: socketserver_echo("stdlib", server_class),
        "twisted": twisted_echo,
    }


# --- async line echo (ours: an async handler on the reactor) ---------------------


def async_echo() -> ServerHandle:
    import txsocketserver

    class AsyncEchoHandler(txsocketserver.AsyncStreamRequestHandler):
        async def handle(self) -> None:
            async for line in self.rfile:
                self.wfile.write(line)
                await self.wfile.drain()

    class BenchServer(txsocketserver.TCPServer):
        allow_reuse_address = True
        request_queue_size = BACKLOG

    server = BenchServer((HOST, 0), AsyncEchoHandler)
    return ServerHandle(server.server_address[1], server.serve_forever, server)


def asyncio_echo(run: Callable[[Any], None] | None = None) -> ServerHandle:
    """What an asyncio programmer would write: ``asyncio.start_server``, same
    line echo; *run* runs its coroutine (default ``asyncio.run``)."""
    import asyncio
    import socket

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async for line in reader:
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    sock = socket.create_server((HOST, 0), backlog=BACKLOG)

    async def serve() -> None:
        server = await asyncio.start_server(echo, sock=sock, backlog=BACKLOG)
        async with server:
            await server.serve_forever()

    return ServerHandle(sock.getsockname()[1], lambda: (run or asyncio.run)(serve()))


def uvloop_echo() -> ServerHandle:
    """The same ``start_server`` line echo on uvloop's event loop: the fastest
    thing an asyncio programmer would pick instead."""
    import uvloop

    return asyncio_echo(run=uvloop.run)


def uvloop_protocol_echo() -> ServerHandle:
    """A raw ``asyncio.Protocol`` line echo on uvloop: no streams, no
    coroutine per connection, the ceiling of Python on an event loop."""
    import asyncio
    import socket

    import uvloop

    class Echo(asyncio.Protocol):
        __slots__ = ("transport", "pending")

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.pending = b""

        def data_received(self, data: bytes) -> None:
            data = self.pending + data
            end = data.rfind(b"\n") + 1
            self.pending = data[end:]
            if end:
                self.transport.write(data[:end])  # type: ignore[attr-defined]

    sock = socket.create_server((HOST, 0), backlog=BACKLOG)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, sock=sock, backlog=BACKLOG)
        async with server:
            await server.serve_forever()

    return ServerHandle(sock.getsockname()[1], lambda: uvloop.run(serve()))


def async_echo_on_asyncio_uvloop() -> ServerHandle:
    """Ours on Twisted's asyncio reactor (``--reactor asyncio``), with uvloop
    as the asyncio loop under it."""
    import asyncio

    import uvloop
    from twisted.internet import asyncioreactor

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    return async_echo()


def async_echo_servers() -> dict[str, ServerStarter]:
    """Async echo: ours (an async handler; also on the asyncio reactor over
    uvloop), stdlib's ThreadingTCPServer, Twisted, asyncio and uvloop."""
    return {
        "ours": async_echo,
        "stdlib": lambda: socketserver_echo("stdlib", "ThreadingTCPServer"),
        "twisted": twisted_echo,
        "asyncio": asyncio_echo,
        "uvloop": uvloop_echo,
        "uvloop-protocol": uvloop_protocol_echo,
        "ours-asyncio-uvloop": async_echo_on_asyncio_uvloop,
    }


# --- HTTP ------------------------------------------------------------------


def socketserver_http(impl: str, protocol_version: str) -> ServerHandle:
    from http.server import BaseHTTPRequestHandler

    class HelloHandler(BaseHTTPRequestHandler):
        # Headers and body are two writes: with Nagle on, keep-alive replies stall
        # on the client's delayed ACK (~40 ms each) and only the kernel is measured.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(HTTP_BODY)))
            self.end_headers()
            self.wfile.write(HTTP_BODY)

        def log_message(self, format: str, *args: object) -> None:
            pass

    HelloHandler.protocol_version = protocol_version
    return listen_socketserver(socketserver_module(impl), "ThreadingTCPServer", HelloHandler)


def twisted_http() -> ServerHandle:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request: object) -> bytes:
            request.setHeader(b"content-type", b"text/plain")
            return HTTP_BODY

    class QuietSite(Site):
        def log(self, request: object) -> None:
            pass

    return listen_twisted(QuietSite(Hello()))


def http_servers(protocol_version: str) -> dict[str, ServerStarter]:
    """HTTP servers; ``HTTP/1.0`` closes after each response, ``HTTP/1.1`` keeps alive.

    twisted.web speaks HTTP/1.1 either way and closes when the client asks
    (``Connection: close``), which the load client does for the HTTP/1.0 variant.
    """
    return {
        "ours": lambda: socketserver_http("ours", protocol_version),
        "stdlib": lambda: socketserver_http("stdlib", protocol_version),
        "twisted": twisted_http,
    }


# --- forking: a process per connection --------------------------------------


def socketserver_forking(impl: str, work: str, fork_from: str = "template") -> ServerHandle:
    """``ForkingTCPServer`` with the line echo (``work="echo"``) or the
    CPU-bound echo (``"cpu"``); classes from ``forking_ours`` or
    ``forking_stdlib``, so that the server process imports only *impl*.
    Ours forks its requests from *fork_from* (``"server"``: the serving
    process itself, as the stdlib does)."""
    classes = importlib.import_module(f"forking_{impl}")

    server_class = classes.Server
    if impl == "ours" and fork_from != "template":
        server_class = type("Server", (server_class,), {"fork_from": fork_from})
    server = server_class((HOST, 0), classes.HANDLERS[work])
    return ServerHandle(server.server_address[1], server.serve_forever)


def socketserver_forking_local_classes(impl: str) -> ServerHandle:
    """``ForkingTCPServer`` with the line echo, its classes defined here, inside
    the function, as test suites and ``python -c`` define them: txsocketserver
    carries them to its workers by value (cloudpickle), the stdlib's fork
    copies them with the rest of its memory."""
    module = socketserver_module(impl)

    class Server(module.ForkingTCPServer):
        allow_reuse_address = True
        request_queue_size = BACKLOG

    class LineEchoHandler(module.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    server = Server((HOST, 0), LineEchoHandler)
    return ServerHandle(server.server_address[1], server.serve_forever)


def twisted_cpu_bound_echo() -> ServerHandle:
    """The same CPU work in a ``LineReceiver``: one process, one core."""
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    from forking_classes import burn_cpu

    class CpuBoundEcho(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            burn_cpu()
            self.sendLine(line)
            self.transport.loseConnection()

    return listen_twisted(Factory.forProtocol(CpuBoundEcho))


def forking_servers(
    work: str, local_classes: bool = False, fork_from: str = "template"
) -> dict[str, ServerStarter]:
    """Forking servers; ``twisted`` is the single-process reference."""
    if local_classes:
        return {
            "ours": lambda: socketserver_forking_local_classes("ours"),
            "stdlib": lambda: socketserver_forking_local_classes("stdlib"),
            "twisted": twisted_echo,
        }
    return {
        "ours": lambda: socketserver_forking("ours", work, fork_from),
        "stdlib": lambda: socketserver_forking("stdlib", work),
        "twisted": twisted_echo if work == "echo" else twisted_cpu_bound_echo,
    }


# --- datagram echo ---------------------------------------------------------


def socketserver_datagram(impl: str, server_class: str) -> ServerHandle:
    module = socketserver_module(impl)

    class DatagramEchoHandler(module.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.packet)

    return listen_socketserver(module, server_class, DatagramEchoHandler)


def twisted_datagram() -> ServerHandle:
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    class Echo(DatagramProtocol):
        def datagramReceived(self, datagram: bytes, address: object) -> None:
            self.transport.write(datagram, address)

    port = reactor.listenUDP(0, Echo(), interface=HOST)
    return ServerHandle(port.getHost().port, lambda: reactor.run(installSignalHandlers=False))


def datagram_servers(server_class: str) -> dict[str, ServerStarter]:
    """Datagram echo servers; ``server_class`` is ``UDPServer`` or ``ThreadingUDPServer``."""
    return {
        "ours": lambda: socketserver_datagram("ours", server_class),
        "stdlib": lambda: socketserver_datagram("stdlib", server_class),
        "twisted": twisted_datagram,
    }


# --- line echo over TLS -------------------------------------------------------


def self_signed_cert(directory: str | None = None, ip: str = HOST) -> tuple[str, str]:
    """A throwaway self-signed certificate for *ip* and its key, written to
    *directory* (default: a new temporary one): their paths.  It is its own
    CA, so a client may verify the server with it as ``cafile``."""
    import datetime
    import ipaddress
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    if directory is None:
        directory = tempfile.mkdtemp(prefix="txss-bench-tls-")
    cert_path, key_path = f"{directory}/cert.pem", f"{directory}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _tls_endpoint(cert_path: str, key_path: str) -> str:
    return f"ssl:0:interface={HOST}:backlog={BACKLOG}:privateKey={key_path}:certKey={cert_path}"


def ours_tls_echo() -> ServerHandle:
    """txsocketserver on an ``ssl:`` endpoint description (served on the
    server's own socket, TLS by ``ssl`` in the handler's thread)."""
    module = socketserver_module("ours")

    class EchoHandler(module.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    class BenchServer(module.ThreadingTCPServer):
        daemon_threads = True

    server = BenchServer(_tls_endpoint(*self_signed_cert()), EchoHandler)
    return ServerHandle(server.server_address[1], server.serve_forever)


def stdlib_tls_echo() -> ServerHandle:
    """The stdlib's way: ``get_request`` wraps each accepted socket in ``ssl``
    (the handshake then happens in the handler's thread, on first read)."""
    import ssl

    module = socketserver_module("stdlib")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed_cert())

    class EchoHandler(module.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    class BenchServer(module.ThreadingTCPServer):
        allow_reuse_address = True
        request_queue_size = BACKLOG
        daemon_threads = True

        def get_request(self) -> tuple[object, object]:
            sock, address = self.socket.accept()
            return context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            ), address

    server = BenchServer((HOST, 0), EchoHandler)
    return ServerHandle(server.server_address[1], server.serve_forever)


def twisted_tls_echo() -> ServerHandle:
    from twisted.internet import endpoints, reactor
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    class Echo(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            self.sendLine(line)

    endpoint = endpoints.serverFromString(reactor, _tls_endpoint(*self_signed_cert()))
    port = []
    endpoint.listen(Factory.forProtocol(Echo)).addCallback(port.append)
    return ServerHandle(port[0].getHost().port, lambda: reactor.run(installSignalHandlers=False))


def tls_echo_servers() -> dict[str, ServerStarter]:
    """Line echo over TLS: ours on an ``ssl:`` endpoint, Twisted natively, and the
    stdlib wrapping accepted sockets in ``ssl`` (reference)."""
    return {"ours": ours_tls_echo, "stdlib": stdlib_tls_echo, "twisted": twisted_tls_echo}


# --- the cost of observing (metrics, the access log) --------------------------------


def observed(factory: ServerStarter, what: str) -> ServerStarter:
    """*factory*'s server (ours) with ``what`` attached: ``"metrics"`` (a
    ``txsocketserver.Metrics`` counting every request, its endpoint listening
    on a port nobody scrapes: as an operator runs it between scrapes) or
    ``"access-log"`` (one JSON access record per connection to a temporary file,
    through ``twisted.logger``, as ``--access-log FILE --log-format json`` writes it)."""

    def make() -> ServerHandle:
        import tempfile

        import txsocketserver

        handle = factory()
        server = handle.server
        if what == "metrics":
            metrics = txsocketserver.Metrics()
            metrics.observe(server, name="bench")
            metrics.listen_blocking(f"tcp:0:interface={HOST}")
        else:
            from twisted.logger import globalLogBeginner

            from txsocketserver._observability.access_log import (
                AccessLog,
                file_observer,
                is_access,
            )

            log = tempfile.NamedTemporaryFile("w", prefix="txss-bench-access-", delete=True)  # noqa: SIM115
            globalLogBeginner.beginLoggingTo(
                [file_observer(log, "json", accept=is_access)], redirectStandardIO=False
            )
            server.add_observer(AccessLog("bench"))  # type: ignore[attr-defined]
        return handle

    return make


def observed_servers(servers: dict[str, ServerStarter]) -> dict[str, ServerStarter]:
    """Ours as it is, with metrics, and with the access log."""
    return {
        "ours": servers["ours"],
        "metrics": observed(servers["ours"], "metrics"),
        "access-log": observed(servers["ours"], "access-log"),
    }
