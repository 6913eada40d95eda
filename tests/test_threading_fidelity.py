"""ThreadingMixIn as the stdlib's: exceptions escaping a request thread, ``_threads``.

The same scenario against the stdlib's ``socketserver`` and txsocketserver,
with the classes defined in the test functions, as users write them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from support import ANY_PORT, WAIT, connect_to, recv_all, serve_in_thread


@contextlib.contextmanager
def caught_thread_exceptions() -> Iterator[list]:
    """Collect what reaches ``threading.excepthook`` during the ``with`` body."""
    caught: list = []

    def hook(args):
        caught.append((args.exc_type, args.exc_value, args.exc_traceback is not None, args.thread))

    original, threading.excepthook = threading.excepthook, hook
    try:
        yield caught
    finally:
        threading.excepthook = original


def ask(server, payload: bytes) -> bytes:
    with connect_to(server, timeout=WAIT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_exceptions_escaping_a_request_reach_threading_excepthook(ss):
    class ReRaising(ss.ThreadingTCPServer):
        def handle_error(self, request, client_address):
            raise  # what escapes handle_error escapes the request thread

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"exit\n":
                raise SystemExit(3)
            if line == b"fail\n":
                raise ValueError("handler failed")
            self.wfile.write(b"served " + line)

    with caught_thread_exceptions() as caught:
        with ReRaising(ANY_PORT, Handler) as server, serve_in_thread(server):
            assert ask(server, b"exit\n") == b""
            assert ask(server, b"fail\n") == b""
            # The threads lived on (or new ones came): the server still serves.
            assert ask(server, b"ok\n") == b"served ok\n"
        # server_close() waited for the requests, hooks included.  In either
    # order: the client sees its connection closed before the request's
    # thread reaches the hook, so the next request's may get there first.
    reported = [(kind, str(value), has_tb) for kind, value, has_tb, _thread in caught]
    assert sorted(reported, key=repr) == sorted(
        [(SystemExit, "3", True), (ValueError, "handler failed", True)], key=repr
    )
    assert all(isinstance(thread, threading.Thread) for *_, thread in caught)
    assert all(thread is not threading.current_thread() for *_, thread in caught)


def test_a_failing_excepthook_falls_back_to_sys_excepthook(ss, capfd):
    class Handler(ss.BaseRequestHandler):
        def handle(self):
            raise SystemExit("from the handler")

    def broken_hook(args):
        raise RuntimeError("hook broken")

    original, threading.excepthook = threading.excepthook, broken_hook
    try:
        with ss.ThreadingTCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
            assert ask(server, b"") == b""
    finally:
        threading.excepthook = original
    err = capfd.readouterr().err
    assert "Exception in threading.excepthook:" in err
    assert "RuntimeError: hook broken" in err


def test_threads_lists_the_requests_running_and_is_reaped(ss):
    seen = []
    release = threading.Event()

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            seen.append(threading.current_thread() in self.server._threads)
            if self.rfile.readline() == b"wait\n":
                release.wait(WAIT)
            self.wfile.write(b"done")

    class Server(ss.ThreadingMixIn, ss.TCPServer):
        pass

    server = Server(ANY_PORT, Handler)
    try:
        with connect_to(server, timeout=WAIT) as blocked:
            blocked.sendall(b"wait\n")
            server.handle_request()
            for _ in range(10):
                with socket.create_connection(server.server_address, timeout=WAIT) as sock:
                    sock.sendall(b"go\n")
                    server.handle_request()
                    assert recv_all(sock) == b"done"
            # The blocked request's thread is listed while it runs; finished
            # ones do not pile up.
            assert 1 <= len(server._threads) < 10
            release.set()
            assert recv_all(blocked) == b"done"
        server._threads.join()
    finally:
        server.server_close()
    assert seen == [True] * 11
    assert len(server._threads) == 0


def test_threads_of_a_daemon_server_lists_none(ss):
    class Handler(ss.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"ok")

    class Server(ss.ThreadingTCPServer):
        daemon_threads = True

    with Server(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert ask(server, b"") == b"ok"
        assert len(server._threads) == 0
        server._threads.join()

    class Unwaited(Server):
        block_on_close = False

    with Unwaited(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert ask(server, b"") == b"ok"
        server._threads.join()
        assert not hasattr(server._threads, "__len__")
