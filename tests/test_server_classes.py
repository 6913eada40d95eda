"""What ``--handler``, ``--server`` and ``--mode`` name: the classes a front end serves with.

The front ends themselves (``python -m txsocketserver``, ``twistd socketserver``)
run in ``test_twistd_cli.py`` and ``test_async_cli.py``; here are the choices
they share with the worker processes of ``--workers``.
"""

from __future__ import annotations

import pytest
from twisted.python import usage

import txsocketserver as ss
from txsocketserver._server_classes import MODES, load_object, mode_for, server_class


class AsyncEcho(ss.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        self.wfile.write(await self.rfile.readline())


class ThreadingServer(ss.ThreadingMixIn, ss.TCPServer):
    pass


def test_every_mode_names_what_it_builds() -> None:
    assert mode_for(ss.StreamRequestHandler, None) is None
    for mode in ("sync", "threading", "forking"):
        assert mode_for(ss.StreamRequestHandler, mode) == mode
    # The mode an async handler class is built with is called async, not sync.
    for asked in (None, "async", "sync"):
        assert mode_for(AsyncEcho, asked) == "async"
    assert set(MODES) == {"sync", "threading", "forking", "async"}


def test_the_server_class_of_each_mode() -> None:
    assert server_class(None, None) is ss.ThreadingTCPServer
    assert server_class(None, "sync") is ss.TCPServer
    assert server_class(None, "threading") is ss.ThreadingTCPServer
    assert server_class(None, "forking") is ss.ForkingTCPServer
    # The async strategy comes from the handler class: no mix-in.
    assert server_class(None, "async") is ss.TCPServer
    spec = f"{__name__}:ThreadingServer"
    assert server_class(spec, "threading") is ThreadingServer
    made = server_class("txsocketserver:TCPServer", "forking")
    assert made.__name__ == "ForkingTCPServer"
    assert issubclass(made, ss.ForkingMixIn) and made is not ss.ForkingTCPServer


@pytest.mark.parametrize(
    ("handler", "mode", "message"),
    [
        (ss.StreamRequestHandler, "async", "--mode async needs an async handler class"),
        (AsyncEcho, "threading", "--mode threading: AsyncEcho is an async handler class"),
        (AsyncEcho, "forking", "--mode forking: AsyncEcho is an async handler class"),
    ],
)
def test_a_mode_that_does_not_fit_the_handler_says_why(
    handler: type, mode: str, message: str
) -> None:
    with pytest.raises(usage.UsageError, match=message):
        mode_for(handler, mode)


def test_an_async_handler_on_a_threading_server_class_names_the_async_mode() -> None:
    spec = f"{__name__}:ThreadingServer"
    with pytest.raises(usage.UsageError, match=r"--mode async contradicts --server"):
        server_class(spec, mode_for(AsyncEcho, None))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected package.module:Name"),
        ("no_such_module_here:Name", "cannot import module 'no_such_module_here'"),
        ("txsocketserver:NoSuchName", "has no attribute 'NoSuchName'"),
        ("txsocketserver:__version__", "is not a class"),
    ],
)
def test_load_object_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        load_object(spec, "--handler")


def test_load_object_finds_the_named_class() -> None:
    assert load_object("socketserver:TCPServer", "--server").__name__ == "TCPServer"
    assert load_object(f"{__name__}:ThreadingServer", "--server") is ThreadingServer


def test_a_stdlib_server_class_is_refused_with_a_hint() -> None:
    with pytest.raises(usage.UsageError, match="rebase it on txsocketserver"):
        server_class("socketserver:TCPServer", None)
