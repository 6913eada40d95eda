"""``fork_from = "server"`` (``_forking/server_fork.py``): the serving process
forks, as the stdlib's does.

The scenarios of ``test_forking.py`` and ``test_forking_carry.py`` already
run this way too (their ``ss`` fixture); here is what only this way has:
the child is a copy (a TLS socket crosses), Python 3.12's warning about
forking a multi-threaded process, what cannot cross (a socket facade of the
reactor's), and the processes after ``server_close()``.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import warnings
from typing import Any

import pytest

import forking_handlers
from forking_handlers import handler
from support import ANY_PORT, connect_to, recv_all, serve_in_thread, wait_until
from test_forking import descendants

WAIT_FORK = 20.0


def ask(server: Any, payload: bytes) -> bytes:
    with connect_to(server, timeout=WAIT_FORK) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def server_fork(tx: Any, base: type) -> type:
    return type("ServerFork" + base.__name__, (base,), {"fork_from": "server"})


def test_an_unknown_fork_from_is_refused_when_serving_starts(tx):
    server_class = type("Server", (tx.ForkingTCPServer,), {"fork_from": "elsewhere"})
    with server_class(ANY_PORT, handler(tx, "Echo")) as server:
        with pytest.raises(ValueError, match="fork_from must be 'template' or 'server'"):
            server.handle_request()


def test_the_child_is_a_copy_of_the_server_process(tx):
    # What no template can give: module state changed at run time, an
    # attribute that neither pickles nor has a name.
    server_class = server_fork(tx, tx.ForkingTCPServer)

    class Handler(tx.StreamRequestHandler):
        def handle(self):
            lock = self.server.registry.lock
            self.wfile.write(b"%d %s" % (forking_handlers.COUNTER, type(lock).__name__.encode()))

    original = forking_handlers.COUNTER
    forking_handlers.COUNTER = 42
    try:
        with server_class(ANY_PORT, Handler) as server, serve_in_thread(server):
            server.registry = forking_handlers.Registry()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                assert ask(server, b"") == b"42 lock"
    finally:
        forking_handlers.COUNTER = original


def test_a_tls_connection_crosses(tx, tls_cert):
    # The stdlib's child inherits the TLS state with the process; so does
    # this one (a template's child cannot: test_tls_sockets_cannot_be_handed_over).
    server_class = server_fork(tx, forking_handlers.TLSOnceServer)
    with server_class(ANY_PORT, handler(tx, "Echo")) as server:
        server.cert = tls_cert
        with serve_in_thread(server):
            context = ssl.create_default_context(cafile=tls_cert.cert_path)
            with connect_to(server, timeout=WAIT_FORK) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(b"secret\n")
                    reply = sock.makefile("rb").readline()
                    # The child holds a copy of every fd of this process,
                    # this client's own included (the stdlib's too): only a
                    # shutdown, not a close, gives the handler end of file.
                    sock.shutdown(socket.SHUT_RDWR)
            assert reply == b"secret\n"
            assert ask(server, b"plain\n").startswith(b"plain\npid ")


def test_python_312s_fork_warning_is_the_stdlibs_not_ours(ss):
    # Both processes are multi-threaded here (serve_in_thread).  From 3.12
    # Python warns at each such fork: the stdlib's ForkingMixIn gets it;
    # ours, which chose the fork knowingly (server_fork.py says why it is
    # safe for what the child does), does not pass it on.
    server_class = ss.ForkingTCPServer
    if ss.__name__ == "txsocketserver":
        server_class = server_fork(ss, ss.ForkingTCPServer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with server_class(ANY_PORT, handler(ss, "Echo")) as server:
            with serve_in_thread(server):
                assert ask(server, b"x\n").startswith(b"x\npid ")
    forks = [w for w in caught if "multi-threaded, use of fork()" in str(w.message)]
    expected = 1 if ss.__name__ == "socketserver" and sys.version_info >= (3, 12) else 0
    assert len(forks) == expected, [str(w.message) for w in caught]


def test_a_reactor_socket_facade_is_refused(tx, capfd):
    # An endpoint served by Twisted (an endpoint object of a type of its
    # own) hands the handler a facade whose bytes the reactor thread moves:
    # a forked child has no reactor.  (haproxy: gives children real sockets:
    # tests/test_forking_proxy.py.)
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from txsocketserver._twisted.reactor import get_reactor

    class OwnEndpoint(TCP4ServerEndpoint):
        pass

    endpoint = tx.Endpoint(OwnEndpoint(get_reactor(), 0, interface="127.0.0.1"))
    server_class = server_fork(tx, tx.ForkingTCPServer)
    with server_class(endpoint, handler(tx, "Echo")) as server:
        with serve_in_thread(server):
            with connect_to(server, timeout=WAIT_FORK) as sock:
                sock.sendall(b"x\n")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b""
    err = capfd.readouterr().err
    assert 'fork_from = "server" needs the request to be a socket' in err


@pytest.mark.parametrize("fork_from", ["template", "server"])
def test_after_server_close_no_process_is_left(tx, fork_from):
    # Issue 19: the process count is back to its baseline when
    # server_close() returns, not some time later.
    before = set(descendants())
    server_class = type("Server", (tx.ForkingTCPServer,), {"fork_from": fork_from})
    with server_class(ANY_PORT, handler(tx, "Echo")) as server, serve_in_thread(server):
        for n in range(3):
            assert ask(server, b"%d\n" % n).startswith(b"%d\npid " % n)
        assert set(descendants()) - before or fork_from == "server"
    assert set(descendants()) <= before, (descendants(), before)


def test_without_block_on_close_the_children_are_reaped_as_they_end(tx):
    server_class = server_fork(tx, tx.ForkingTCPServer)
    server = server_class(ANY_PORT, handler(tx, "Slow"))
    server.block_on_close = False
    try:
        with serve_in_thread(server):
            sock = connect_to(server, timeout=WAIT_FORK)
            sock.sendall(b"0.3\n")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(8) == b"started\n"
            children = set(server.active_children or ())
            assert len(children) == 1
    finally:
        server.server_close()
    with sock:
        assert recv_all(sock) == b"done\n"
    # No zombie: a reaper thread of ours waits for it, then ends.
    assert wait_until(lambda: not set(descendants()) & children, WAIT_FORK)
    assert wait_until(
        lambda: "txsocketserver-fork-reaper" not in {t.name for t in threading.enumerate()},
        WAIT_FORK,
    )


def test_children_of_others_are_not_reaped(tx):
    # Each child is reaped by its pid (a pidfd tells when it has exited):
    # a process that the program started itself keeps its exit status.
    import subprocess

    server_class = server_fork(tx, tx.ForkingTCPServer)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    try:
        with server_class(ANY_PORT, handler(tx, "Echo")) as server, serve_in_thread(server):
            server.max_children = 2
            for n in range(6):
                assert ask(server, b"%d\n" % n).startswith(b"%d\npid " % n)
    finally:
        assert other.wait(WAIT_FORK) == 7


def test_it_fills_the_role_of_the_template_dispatcher():
    from zope.interface.verify import verifyClass

    from txsocketserver._forking.dispatcher import ProcessDispatcher
    from txsocketserver._forking.server_fork import ServerForkDispatcher
    from txsocketserver._twisted.interfaces import IProcessDispatcher

    assert verifyClass(IProcessDispatcher, ServerForkDispatcher)
    assert verifyClass(IProcessDispatcher, ProcessDispatcher)
