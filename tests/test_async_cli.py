"""Async handlers as operators run them: ``python -m txsocketserver`` and ``twistd``.

Real processes, real clients; the asyncio reactor interop runs here too, since
a reactor is chosen once per process.
"""

from __future__ import annotations

import signal

import pytest

from support import connect, recv_line, systemd_activation
from test_twistd_cli import CLI, TCP, TWISTD, Spawn, spawn  # noqa: F401


@pytest.mark.parametrize("front_end", ["cli", "twistd"])
def test_an_async_handler_served_from_the_command_line(spawn: Spawn, front_end: str) -> None:  # noqa: F811
    handler = ["--listen", TCP, "--handler", "async_handlers:AsyncEcho"]
    if front_end == "cli":
        server = spawn(*CLI, *handler)
    else:
        server = spawn(*TWISTD, "-n", "--pidfile=", "--logfile=-", "socketserver", *handler)
    address = server.address()
    assert "(TCPServer)" in server.output()
    with connect(address) as first, connect(address) as second:
        for client in (first, second, first):
            client.sendall(b"async from %d\n" % client.fileno())
            assert recv_line(client) == b"async from %d\n" % client.fileno()
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("front_end", ["cli", "twistd"])
def test_asyncio_reactor_lets_handlers_await_asyncio(spawn: Spawn, front_end: str) -> None:  # noqa: F811
    handler = ["--listen", TCP, "--handler", "async_handlers:AsyncioInterop"]
    if front_end == "cli":
        server = spawn(*CLI, "--reactor", "asyncio", *handler)
    else:
        server = spawn(
            *TWISTD, "-n", "--pidfile=", "--logfile=-", "-r", "asyncio", "socketserver", *handler
        )
    address = server.address()
    for _ in range(2):
        with connect(address) as client:
            client.sendall(b"hello asyncio\n")
            assert recv_line(client) == b"future:HELLO ASYNCIO\n"
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output()


def test_cli_refuses_threading_for_an_async_handler(spawn: Spawn) -> None:  # noqa: F811
    server = spawn(
        *CLI, "--listen", TCP, "--handler", "async_handlers:AsyncEcho", "--mode", "threading"
    )
    assert server.finish() == 2
    assert "is an async handler class" in server.output()


def test_systemd_socket_activation_serves_an_async_handler(spawn: Spawn) -> None:  # noqa: F811
    import json
    import socket

    from support import LOCALHOST

    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        fd = listening.fileno()
        server = spawn(
            *systemd_activation(fd, "echo.socket"),
            "--listen", "systemd:domain=INET:index=0",
            "--handler", "async_handlers:AsyncAddress",
            pass_fds=(fd,),
        )  # fmt: skip
        assert server.address() == listening.getsockname()
        with connect(listening.getsockname()) as client:
            reply = json.loads(recv_line(client))
            assert reply["client"] == list(client.getsockname())
        assert server.stop() == 0
