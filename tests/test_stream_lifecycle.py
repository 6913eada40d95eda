"""Starting, stopping and restarting servers; the blocking API and the reactor thread.

Tests named ``*_tx_only`` check documented improvements over the stdlib and
run against txsocketserver alone: each says why the stdlib cannot pass.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from support import (
    ANY_PORT,
    WAIT,
    call_with_timeout,
    connect_to,
    request_reply,
    run_in_thread,
    serve_in_thread,
    wait_until,
)


def echo_handler(ss):
    class Echo(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline())

    return Echo


def test_shutdown_right_after_starting_serve_forever(ss):
    """shutdown() possibly before serve_forever() began: neither may hang."""
    with ss.TCPServer(ANY_PORT, echo_handler(ss)) as server:
        for _ in range(10):
            serving = run_in_thread(server.serve_forever, 0.05)
            call_with_timeout(server.shutdown)
            serving.join()
            assert serving.error is None
        # Still a working server afterwards.
        with serve_in_thread(server):
            assert request_reply(server, b"alive\n") == b"alive\n"


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_serve_forever_and_shutdown_repeated(ss, threaded):
    cls = ss.ThreadingTCPServer if threaded else ss.TCPServer
    with cls(ANY_PORT, echo_handler(ss)) as server:
        for n in range(20):
            with serve_in_thread(server, poll_interval=0.05):
                payload = b"round %d\n" % n
                assert request_reply(server, payload) == payload


@pytest.mark.parametrize("kind", ["tcp", "unix", "threading-tcp"])
def test_many_servers_one_after_another(ss, kind, unix_path):
    for n in range(30):
        if kind == "unix":
            path = f"{unix_path}{n}"
            server = ss.UnixStreamServer(path, echo_handler(ss))
        elif kind == "tcp":
            server = ss.TCPServer(ANY_PORT, echo_handler(ss))
        else:
            server = ss.ThreadingTCPServer(ANY_PORT, echo_handler(ss))
        with server, serve_in_thread(server):
            assert request_reply(server, b"%d\n" % n) == b"%d\n" % n


def test_several_servers_at_once(ss, unix_path):
    servers = [
        ss.TCPServer(ANY_PORT, echo_handler(ss)),
        ss.ThreadingTCPServer(ANY_PORT, echo_handler(ss)),
        ss.UnixStreamServer(unix_path, echo_handler(ss)),
    ]
    try:
        serving = [run_in_thread(s.serve_forever, 0.05) for s in servers]
        for _ in range(3):
            for server in servers:
                assert request_reply(server, b"x\n") == b"x\n"
        for server in servers:
            call_with_timeout(server.shutdown)
        for thread in serving:
            assert thread.join().error is None
    finally:
        for server in servers:
            server.server_close()


def test_server_close_while_not_serving_refuses_connections(ss):
    server = ss.TCPServer(ANY_PORT, echo_handler(ss))
    with server, serve_in_thread(server):
        assert request_reply(server, b"a\n") == b"a\n"
    with pytest.raises(ConnectionRefusedError):
        connect_to(server).close()


def test_handle_request_loop_like_old_style_servers(ss):
    """``while not done: server.handle_request()`` with a timeout, as in the docs."""
    done = []

    class Server(ss.TCPServer):
        timeout = 0.05

        def handle_timeout(self):
            done.append("timeout")

    with Server(ANY_PORT, echo_handler(ss)) as server:
        clients = [run_in_thread(request_reply, server, b"%d\n" % i) for i in range(3)]
        deadline = time.monotonic() + WAIT
        while not all(c.done.is_set() for c in clients) and time.monotonic() < deadline:
            server.handle_request()
        assert sorted(c.join().value for c in clients) == [b"0\n", b"1\n", b"2\n"]


# --- tx-only: documented improvements over the stdlib -------------------------


def test_shutdown_returns_promptly_with_long_poll_interval_tx_only(tx):
    # tx-only: the stdlib's serve_forever only notices shutdown() between
    # select() calls, so with poll_interval=5 its shutdown() can take 5 s.
    # txsocketserver wakes serve_forever at once (documented improvement).
    looped = threading.Event()

    class Server(tx.TCPServer):
        def service_actions(self):
            looped.set()

    with Server(ANY_PORT, echo_handler(tx)) as server:
        serving = run_in_thread(server.serve_forever, 5)
        assert request_reply(server, b"up\n") == b"up\n"
        # Past the request, serve_forever goes back to its 5 s wait.
        assert looped.wait(WAIT)
        started = time.monotonic()
        call_with_timeout(server.shutdown)
        assert time.monotonic() - started < 1.0
        serving.join(2)
        assert serving.error is None


def test_shutdown_from_handler_of_sync_server_tx_only(tx):
    # tx-only: in the stdlib, shutdown() called from a handler of a sync
    # server deadlocks (it waits for serve_forever, which waits for the
    # handler).  txsocketserver returns at once; serve_forever returns after
    # the handler finishes (documented improvement).
    events = []

    class Handler(tx.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            started = time.monotonic()
            self.server.shutdown()
            events.append(("shutdown returned", time.monotonic() - started))
            time.sleep(0.2)
            self.wfile.write(b"bye\n")
            events.append(("handler done", time.monotonic()))

    with tx.TCPServer(ANY_PORT, Handler) as server:
        serving = run_in_thread(server.serve_forever, 0.05)
        assert request_reply(server, b"stop\n") == b"bye\n"
        serving.join()
        returned_at = time.monotonic()
        assert serving.error is None
        assert events[0][0] == "shutdown returned" and events[0][1] < 0.5
        assert events[1][0] == "handler done" and events[1][1] <= returned_at


def _on_reactor_thread(fn):
    """Run ``fn`` on the Twisted reactor thread; return (result, exception)."""
    from twisted.internet import reactor

    assert reactor.running, "the background reactor should be running"
    outcome = []
    finished = threading.Event()

    def call():
        try:
            outcome.append((fn(), None))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append((None, exc))
        finally:
            finished.set()

    reactor.callFromThread(call)
    assert finished.wait(WAIT), "reactor thread blocked"
    return outcome[0]


@pytest.mark.parametrize("method", ["serve_forever", "handle_request", "shutdown"])
def test_blocking_api_from_reactor_thread_raises_tx_only(tx, method):
    # tx-only: the stdlib has no reactor.  Blocking calls on the reactor
    # thread would deadlock txsocketserver, so they must raise RuntimeError.
    with tx.TCPServer(ANY_PORT, echo_handler(tx)) as server:
        # Serve once so the background reactor runs, and keep serving so that
        # shutdown() has something to stop.
        with serve_in_thread(server):
            assert request_reply(server, b"up\n") == b"up\n"
            result, error = _on_reactor_thread(getattr(server, method))
            assert result is None
            assert type(error) is RuntimeError, error
            assert "reactor" in str(error).lower()
            # The server is not disturbed.
            assert request_reply(server, b"still\n") == b"still\n"


def test_threading_handler_calls_shutdown(ss):
    """A handler of a *threading* server may call shutdown() (works in the stdlib too)."""

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.server.shutdown()
            self.wfile.write(b"stopped\n")

    with ss.ThreadingTCPServer(ANY_PORT, Handler) as server:
        serving = run_in_thread(server.serve_forever, 0.05)
        assert request_reply(server, b"stop\n") == b"stopped\n"
        serving.join()
        assert serving.error is None
        with socket.socket() as probe:
            probe.settimeout(0.5)
            # Not serving any more; the listening socket still queues connections.
            probe.connect(server.server_address)
        assert wait_until(lambda: not serving.thread.is_alive())
