"""Each assumption ``txsocketserver._twisted.compat`` makes about Twisted's private
API, checked against the installed Twisted: a release that breaks one fails here,
by name, instead of quietly moving an endpoint off the socket path."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import endpoints, reactor

from txsocketserver._twisted import compat
from txsocketserver._twisted.endpoints import Endpoint, listening_socket


def parsed(description: str) -> object:
    return endpoints.serverFromString(reactor, description)


def test_tcp_parameters_read_what_the_description_says() -> None:
    got = compat.tcp_parameters(parsed("tcp:8123:interface=127.0.0.2:backlog=17"))
    assert got == (8123, "127.0.0.2", 17)
    assert compat.tcp_parameters(parsed("tcp6:8124:interface=\\:\\:1")) == (8124, "::1", 50)


def test_unix_parameters_read_what_the_description_says(tmp_path) -> None:
    path = str(tmp_path / "s.sock")
    got = compat.unix_parameters(parsed(f"unix:{path}:mode=600:backlog=9:lockfile=0"))
    assert got == (path, 9, 0o600, False)
    assert compat.unix_parameters(parsed(f"unix:{path}")).lockfile is True


def test_ssl_options_bind_to_twisteds_own_parser(tls_cert) -> None:
    chosen = compat.ssl_description_options(
        f"ssl:8125:privateKey={tls_cert.key_path}:certKey={tls_cert.cert_path}:interface=127.0.0.1"
    )
    assert chosen is not None
    assert chosen["port"] == "8125"
    assert chosen["privateKey"] == tls_cert.key_path
    assert chosen["certKey"] == tls_cert.cert_path
    assert chosen["interface"] == "127.0.0.1"
    assert set(chosen) >= {"extraCertChain", "dhParameters", "sslmethod", "backlog"}
    defaults = compat.ssl_description_options("ssl:8125")
    assert defaults is not None and defaults["certKey"] is None  # Twisted's: the privateKey file
    assert compat.ssl_description_options("ssl:8125:noSuchOption=1") is None
    assert compat.ssl_description_options("tcp:8125") is None


def test_other_endpoint_types_are_not_read() -> None:
    # A subclass may listen differently: only the exact types are read.
    class Custom(endpoints.TCP4ServerEndpoint):
        pass

    assert compat.tcp_parameters(Custom(reactor, 0)) is None
    assert compat.unix_parameters(Custom(reactor, 0)) is None


@pytest.mark.parametrize(
    ("description", "family"),
    [("tcp:0:interface=127.0.0.1", socket.AF_INET), ("tcp6:0:interface=\\:\\:1", socket.AF_INET6)],
)
def test_socket_descriptions_stay_on_the_socket_path(description: str, family: int) -> None:
    # What decides between a real socket (and forking) and the socket facade.
    listening = listening_socket(Endpoint(description))
    assert listening is not None and listening.family == family


def test_ssl_descriptions_stay_on_the_socket_path(tls_cert) -> None:
    listening = listening_socket(
        Endpoint(f"ssl:0:privateKey={tls_cert.key_path}:certKey={tls_cert.cert_path}")
    )
    assert listening is not None and listening.tls is not None
