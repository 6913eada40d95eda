"""``_async/handlers.py``: the async handler classes.

Importing them loads no Twisted; a server that cannot run one says so.

Every test runs twice: connections read by the reactor, and through the
server's read multiplexer (``async_support.reads``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import txsocketserver
from async_handlers import AsyncEcho
from async_support import (
    SRC,
    reads,  # noqa: F401 (an autouse fixture: both read modes)
)
from support import (
    ANY_PORT,
)


@pytest.mark.parametrize(
    "server_class",
    [
        txsocketserver.ThreadingTCPServer,
        txsocketserver.ForkingTCPServer,
        txsocketserver.ThreadingUDPServer,
    ],
)
def test_threading_or_forking_with_an_async_handler_is_a_type_error(server_class: type) -> None:
    handler = (
        txsocketserver.AsyncDatagramRequestHandler if "UDP" in server_class.__name__ else AsyncEcho
    )
    with pytest.raises(TypeError, match="async handler"):
        server_class(ANY_PORT, handler)


def test_a_server_that_cannot_run_an_async_handler_says_so() -> None:
    class Custom(txsocketserver.BaseServer):
        pass

    with pytest.raises(TypeError, match="cannot run AsyncEcho"):
        Custom(ANY_PORT, AsyncEcho)


def test_a_coroutine_handle_on_a_sync_handler_class_is_a_type_error() -> None:
    class Mistaken(txsocketserver.StreamRequestHandler):
        async def handle(self) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match="AsyncStreamRequestHandler"):
        txsocketserver.TCPServer(ANY_PORT, Mistaken)


def test_importing_the_async_classes_loads_no_twisted() -> None:
    script = f"""
        import sys
        sys.path.insert(0, {SRC!r})
        import txsocketserver

        class Handler(txsocketserver.AsyncStreamRequestHandler):
            async def handle(self):
                pass

        class Datagrams(txsocketserver.AsyncDatagramRequestHandler):
            pass

        heavy = sorted(n for n in sys.modules if n.split(".")[0] in ("twisted", "zope", "asyncio"))
        assert not heavy, heavy
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
