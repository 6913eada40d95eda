"""Stream servers on Twisted endpoints: tcp, tcp6, unix, ssl, haproxy (PROXY v1/v2).

``tcp:``, ``tcp6:``, ``unix:`` and ``ssl:`` are listening sockets: the server
binds and accepts them itself and handlers get real sockets (``test_tls.py``
covers ``ssl:``).  Every other endpoint is served through Twisted: Twisted
accepts the connections and handlers get a ``TransportSocket``, exercised
here with :func:`twisted_tcp`.  Either way, everything else (hooks,
threading, addresses) must look the same as with a socket address.
``systemd:`` needs a fresh process (the fds and environment systemd passes):
see ``test_twistd_cli.py``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import stat
import struct
import threading
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

import txsocketserver
from support import (
    LOCALHOST,
    WAIT,
    SelfSignedCert,
    connect,
    fd_count,
    ipv6_loopback_available,
    recv_all,
    recv_line,
    serve_in_thread,
    settle_resources,
    systemd_activation,
    thread_count,
    warm_up,
)
from test_twistd_cli import spawn  # noqa: F401 - a fixture
from twisted_world_handlers import (
    AddressHandler,
    EchoHandler,
    FirehoseHandler,
    firehose_digest,
    receive_firehose_digest,
    stalled_firehose,
)
from txsocketserver._twisted.transport_socket import SEND_WINDOW, TransportSocket

TCP = f"tcp:0:interface={LOCALHOST}"
SERVER_CLASSES = [txsocketserver.TCPServer, txsocketserver.ThreadingTCPServer]


@implementer(IStreamServerEndpoint)
class _ListenTCP:
    """A TCP endpoint of a type txsocketserver does not serve on a socket of
    its own, as a custom or third-party endpoint would be."""

    def listen(self, factory: Any) -> Deferred[Any]:
        from txsocketserver._twisted import reactor as _reactor

        reactor = _reactor.get_reactor()
        return defer.execute(reactor.listenTCP, 0, factory, interface=LOCALHOST)


def twisted_tcp() -> txsocketserver.Endpoint:
    """An endpoint whose connections Twisted accepts (handlers get TransportSockets)."""
    return txsocketserver.Endpoint(_ListenTCP())


class RecordingAddressHandler(AddressHandler):
    def handle(self) -> None:
        self.server.request_types.append(type(self.request))
        super().handle()


def ask_address(client: socket.socket) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(recv_line(client))
    return reply


@pytest.mark.parametrize("server_class", SERVER_CLASSES)
def test_tcp_description_string(server_class: type) -> None:
    with server_class(TCP, RecordingAddressHandler) as server:
        server.request_types = []
        host, port = server.server_address
        assert host == LOCALHOST and port != 0
        assert server.address_family == socket.AF_INET
        # A listening socket of its own, as for ("127.0.0.1", 0).
        assert server.socket.getsockname() == server.server_address
        assert server.request_queue_size == 50  # Twisted's default backlog
        with serve_in_thread(server):
            for _ in range(3):
                with connect(server.server_address) as client:
                    assert ask_address(client)["client"] == list(client.getsockname())
        assert server.request_types == [socket.socket] * 3


@pytest.mark.parametrize("server_class", SERVER_CLASSES)
def test_other_endpoints_go_through_twisted(server_class: type) -> None:
    with server_class(twisted_tcp(), RecordingAddressHandler) as server:
        server.request_types = []
        assert server.socket is None
        assert server.server_address[0] == LOCALHOST
        with serve_in_thread(server):
            for _ in range(3):
                with connect(server.server_address) as client:
                    assert ask_address(client)["client"] == list(client.getsockname())
        assert server.request_types == [TransportSocket] * 3


def test_echo_through_endpoint_wrapper() -> None:
    with (
        txsocketserver.ThreadingTCPServer(txsocketserver.Endpoint(TCP), EchoHandler) as server,
        serve_in_thread(server),
    ):
        with connect(server.server_address) as client:
            for line in (b"one\n", b"two\n"):
                client.sendall(line)
                assert recv_line(client) == line


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_tcp6_endpoint() -> None:
    with (
        txsocketserver.ThreadingTCPServer(r"tcp6:0:interface=\:\:1", AddressHandler) as server,
        serve_in_thread(server),
    ):
        assert server.address_family == socket.AF_INET6
        assert server.server_address[0] == "::1"
        with connect(server.server_address[:2], socket.AF_INET6) as client:
            assert ask_address(client)["client"] == list(client.getsockname())


@pytest.mark.parametrize(
    "server_class", [txsocketserver.UnixStreamServer, txsocketserver.ThreadingTCPServer]
)
def test_unix_endpoint(server_class: type, unix_path: str) -> None:
    endpoint = txsocketserver.Endpoint(f"unix:{unix_path}:mode=600")
    with server_class(endpoint, EchoHandler) as server, serve_in_thread(server):
        assert server.server_address == unix_path
        assert server.address_family == socket.AF_UNIX
        assert type(server.socket) is socket.socket
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o600
        # Twisted's default lockfile=1: PATH.lock guards the path.
        assert os.path.islink(f"{unix_path}.lock")
        with pytest.raises(OSError, match="held by another process"):
            server_class(txsocketserver.Endpoint(f"unix:{unix_path}"), EchoHandler)
        with connect(unix_path, socket.AF_UNIX) as client:
            client.sendall(b"over unix\n")
            assert recv_line(client) == b"over unix\n"
    # As Twisted does, closing removes the socket file and the lock.
    assert not os.path.lexists(unix_path)
    assert not os.path.lexists(f"{unix_path}.lock")


def test_unix_endpoint_replaces_a_stale_socket_file(unix_path: str) -> None:
    # A server that died: its socket file, and its lock naming a dead pid.
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(unix_path)
    os.symlink("999999999", f"{unix_path}.lock")
    endpoint = txsocketserver.Endpoint(f"unix:{unix_path}")
    with txsocketserver.ThreadingTCPServer(endpoint, EchoHandler) as server:
        with serve_in_thread(server), connect(unix_path, socket.AF_UNIX) as client:
            client.sendall(b"fresh\n")
            assert recv_line(client) == b"fresh\n"
    # Without the lock file nothing says the file is stale: as in Twisted,
    # it is in the way.
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(unix_path)
    unlocked = txsocketserver.Endpoint(f"unix:{unix_path}:lockfile=0")
    with pytest.raises(OSError):
        txsocketserver.TCPServer(unlocked, EchoHandler)
    assert os.path.exists(unix_path), "a file the server did not bind is not removed"


def test_plain_str_stays_a_unix_path(unix_path: str) -> None:
    # A Unix server's str address is a path, colon or not: never an endpoint.
    with txsocketserver.UnixStreamServer(unix_path, EchoHandler) as server:
        assert server.socket is not None
        assert server.server_address == unix_path


def tls_description(cert: SelfSignedCert) -> str:
    return (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}"
    )


def test_ssl_endpoint_verified_by_client(tls_cert: SelfSignedCert) -> None:
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with (
        txsocketserver.ThreadingTCPServer(tls_description(tls_cert), EchoHandler) as server,
        serve_in_thread(server),
    ):
        with (
            connect(server.server_address) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as client,
        ):
            assert client.version() is not None
            for line in (b"secret one\n", b"secret two\n" * 1000):
                client.sendall(line)
                received = b""
                while len(received) < len(line):
                    received += client.recv(65536)
                assert received == line


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header for a TCP over IPv4 connection."""
    addresses = (
        socket.inet_aton(source[0])
        + socket.inet_aton(destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("server_class", SERVER_CLASSES)
def test_haproxy_gives_real_client_address(version: int, server_class: type) -> None:
    client_address = ("198.51.100.7", 40123)
    balancer_target = ("203.0.113.1", 443)
    if version == 1:
        header = (
            f"PROXY TCP4 {client_address[0]} {balancer_target[0]} "
            f"{client_address[1]} {balancer_target[1]}\r\n"
        ).encode()
    else:
        header = proxy_v2_header(client_address, balancer_target)
    with server_class(f"haproxy:{TCP}", AddressHandler) as server, serve_in_thread(server):
        with connect(server.server_address) as client:
            client.sendall(header)
            assert ask_address(client)["client"] == list(client_address)


def test_fileno_is_readable_while_a_connection_waits() -> None:
    with txsocketserver.TCPServer(twisted_tcp(), EchoHandler) as server:
        server.timeout = WAIT
        with connect(server.server_address) as client:
            ready, _, _ = select.select([server], [], [], WAIT)
            assert ready == [server]
            client.sendall(b"selected\n")
            client.shutdown(socket.SHUT_WR)
            server.handle_request()
            assert recv_all(client) == b"selected\n"
        assert select.select([server], [], [], 0) == ([], [], [])


def test_server_close_closes_queued_connections() -> None:
    server = txsocketserver.TCPServer(twisted_tcp(), EchoHandler)
    address = server.server_address
    with connect(address) as client:
        assert select.select([server], [], [], WAIT)[0]  # queued, never served
        server.server_close()
        assert recv_all(client) == b""
    with pytest.raises(ConnectionRefusedError):
        connect(address).close()


def test_verify_request_applies() -> None:
    class Picky(txsocketserver.ThreadingTCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            self.seen = (type(request), client_address)
            return False

    with Picky(twisted_tcp(), EchoHandler) as server, serve_in_thread(server):
        with connect(server.server_address) as client:
            client.sendall(b"let me in\n")
            assert recv_all(client) == b""
            assert server.seen == (TransportSocket, client.getsockname())


def test_bad_addresses() -> None:
    with pytest.raises(ValueError, match="bogus"):
        txsocketserver.TCPServer("bogus:1234", EchoHandler)
    with pytest.raises(TypeError, match="stream endpoint"):
        txsocketserver.UDPServer(txsocketserver.Endpoint(TCP), EchoHandler)
    with pytest.raises(TypeError):
        txsocketserver.Endpoint(1234)  # type: ignore[arg-type]


def test_flow_control_bounds_memory_for_a_slow_reader() -> None:
    size = 100 * 1024 * 1024
    with (
        txsocketserver.ThreadingTCPServer(twisted_tcp(), FirehoseHandler) as server,
        serve_in_thread(server),
    ):
        server.written = 0
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.settimeout(WAIT)
            client.connect(server.server_address)
            client.sendall(b"%d\n" % size)
            # What the server holds: the send window, the transport's buffer,
            # and the kernel's socket buffers on both sides.
            stalled_at = stalled_firehose(server)
            assert SEND_WINDOW <= stalled_at < 16 * 1024 * 1024, stalled_at
            assert receive_firehose_digest(client, size) == firehose_digest(size)


def test_endpoint_servers_leave_nothing_behind() -> None:
    warm_up(txsocketserver)
    fds, threads = fd_count(), thread_count()
    for server_class in SERVER_CLASSES:
        for address in (TCP, TCP, twisted_tcp(), twisted_tcp()):
            with server_class(address, EchoHandler) as server, serve_in_thread(server):
                with connect(server.server_address) as client:
                    client.sendall(b"x\n")
                    assert recv_line(client) == b"x\n"
                with connect(server.server_address):
                    pass
    # Let the reactor finish closing the transports.
    threading.Event().wait(0.1)
    settle_resources(fds, threads)


# -- listener options: tcp6's ipv6only=, a Unix socket's mode and owner, fd:N, systemd:name= --


def reachable(address: Any, family: int) -> bool:
    try:
        with connect(address, family):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
@pytest.mark.parametrize("ipv6only", ["1", "0"])
def test_tcp6_ipv6only_chooses_ipv6_only_or_dual_stack(ipv6only: str) -> None:
    with (
        txsocketserver.ThreadingTCPServer(
            rf"tcp6:0:interface=\:\::ipv6only={ipv6only}", EchoHandler
        ) as server,
        serve_in_thread(server),
    ):
        port = server.server_address[1]
        assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == int(ipv6only)
        assert reachable(("::1", port), socket.AF_INET6)
        assert reachable((LOCALHOST, port), socket.AF_INET) is (ipv6only == "0")


def test_a_unix_sockets_default_mode_is_twisteds_0666(unix_path: str) -> None:
    with txsocketserver.ThreadingTCPServer(f"unix:{unix_path}", EchoHandler):
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o666


def test_a_unix_sockets_owner_and_group(unix_path: str) -> None:
    import grp
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    # A group this process may give its files: a supplementary one if it has one.
    gid = next((g for g in os.getgroups() if g != os.getgid()), os.getgid())
    group = grp.getgrgid(gid).gr_name
    address = f"unix:{unix_path}:mode=660:owner={user}:group={group}"
    with txsocketserver.ThreadingTCPServer(address, EchoHandler) as server:
        with serve_in_thread(server), connect(unix_path, socket.AF_UNIX) as client:
            client.sendall(b"owned\n")
            assert recv_line(client) == b"owned\n"
        status = os.stat(unix_path)
        assert (status.st_uid, status.st_gid) == (os.getuid(), gid)
        assert stat.S_IMODE(status.st_mode) == 0o660


@pytest.mark.parametrize(
    ("address", "named"),
    [
        ("unix:{path}:owner=no-such-user-here", "owner"),
        ("unix:{path}:group=no-such-group-here", "group"),
        ("tcp6:0:ipv6only=maybe", "ipv6only"),
        ("fd:banana", "fd:"),
        ("fd:987", "fd:987"),
    ],
)
def test_bad_listener_options_are_errors_naming_them(
    address: str, named: str, unix_path: str
) -> None:
    with pytest.raises(ValueError, match=named):
        txsocketserver.TCPServer(address.format(path=unix_path), EchoHandler)


@pytest.mark.parametrize("server_class", SERVER_CLASSES)
def test_fd_serves_an_inherited_listening_socket(server_class: type) -> None:
    fds = fd_count()
    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        address = listening.getsockname()
        # The server takes the descriptor over (as with systemd:).
        fd = listening.detach()
    with server_class(f"fd:{fd}", AddressHandler) as server:
        assert server.server_address == address
        with serve_in_thread(server), connect(address) as client:
            assert ask_address(client)["client"] == list(client.getsockname())
    with pytest.raises(OSError):
        os.fstat(fd)
    settle_resources(fds, thread_count())


def test_fd_refuses_a_socket_that_is_not_listening() -> None:
    with socket.socket() as idle, pytest.raises(ValueError, match="not a listening"):
        txsocketserver.TCPServer(f"fd:{idle.fileno()}", EchoHandler)


def test_systemd_socket_found_by_name(spawn: Any) -> None:  # noqa: F811
    """``systemd:domain=INET:name=NAME`` picks the socket systemd passed with
    ``FileDescriptorName=NAME`` (``LISTEN_FDNAMES``), whatever its index."""
    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        fd = listening.fileno()
        server = spawn(
            *systemd_activation(fd, "web.socket"),
            "--listen", "systemd:domain=INET:name=web.socket",
            "--handler", "twisted_world_handlers:AddressHandler",
            pass_fds=(fd,),
        )  # fmt: skip
        assert server.address() == listening.getsockname()
        with connect(listening.getsockname()) as client:
            assert ask_address(client)["client"] == list(client.getsockname())
        assert server.stop() == 0
