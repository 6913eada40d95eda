"""How a stream server gets its connections (``_twisted/listeners.py``).

The listener a server picks when it is made, and ``SocketListener``'s own
promises: ``accept`` is ``socket.accept``, ``SO_REUSEADDR`` as Twisted's ports
set it for descriptions, socket files removed and nothing else.  Serving
through each kind of address is tested in ``test_stream_basic.py`` and
``test_endpoints.py`` (``unix:`` modes and lock files included).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import txsocketserver as ss
from support import ANY_PORT, LOCALHOST, connect
from txsocketserver._twisted.endpoints import EndpointListener
from txsocketserver._twisted.listeners import SocketListener, remove_socket_file


class Plain(ss.TCPServer):
    allow_reuse_address = False


@pytest.mark.parametrize(
    "address",
    [ANY_PORT, f"tcp:0:interface={LOCALHOST}", ss.Endpoint(f"tcp:0:interface={LOCALHOST}")],
)
def test_a_socket_address_or_socket_description_gets_the_servers_own_socket(
    address: object,
) -> None:
    with Plain(address, ss.BaseRequestHandler) as server:  # type: ignore[arg-type]
        assert isinstance(server._listener, SocketListener)
        assert type(server.socket) is socket.socket
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert server.server_address == server.socket.getsockname()


def test_an_endpoint_only_twisted_can_serve_gets_an_endpoint_listener() -> None:
    with ss.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", ss.BaseRequestHandler) as server:
        assert isinstance(server._listener, EndpointListener)
        assert server.socket is None


def test_descriptions_reuse_the_address_as_twisteds_ports_do() -> None:
    def reuses(address: object) -> int:
        with Plain(address, ss.BaseRequestHandler) as server:  # type: ignore[arg-type]
            return server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)

    assert not reuses(ANY_PORT)  # allow_reuse_address = False is obeyed
    assert reuses(f"tcp:0:interface={LOCALHOST}")


@pytest.mark.parametrize("listening_timeout", [None, 5.0])
def test_accept_gives_what_socket_accept_gives(listening_timeout: float | None) -> None:
    with (
        Plain(ANY_PORT, ss.BaseRequestHandler) as server,
        connect(server.server_address) as client,
        connect(server.server_address) as client2,
    ):
        server.socket.settimeout(listening_timeout)
        ours, address = server._listener.accept()
        theirs, address2 = server.socket.accept()
        with ours, theirs:
            assert type(ours) is type(theirs) is socket.socket
            kind = (theirs.family, theirs.type, theirs.proto)
            assert (ours.family, ours.type, ours.proto) == kind
            assert isinstance(ours.family, socket.AddressFamily)
            assert ours.gettimeout() == theirs.gettimeout()
            assert address == client.getsockname() and address2 == client2.getsockname()


def test_remove_socket_file_removes_sockets_only(tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_text("kept")
    remove_socket_file(str(regular))
    remove_socket_file(str(tmp_path / "missing"))
    assert regular.read_text() == "kept"
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(path)
    assert os.path.exists(path)
    remove_socket_file(path)
    assert not os.path.exists(path)
