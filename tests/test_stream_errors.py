"""Errors: in handlers, when binding, from misbehaving clients; and the request socket."""

from __future__ import annotations

import errno
import gc
import os
import socket
import sys
import time

import pytest

from support import (
    ANY_PORT,
    WAIT,
    connect_to,
    fd_count,
    recv_all,
    recv_line,
    request_reply,
    reset_close,
    run_in_thread,
    serve_in_thread,
    wait_until,
    warm_up,
)


def failing_handler(ss):
    """Echo a line, but raise ValueError when the line is ``boom``."""

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line.strip() == b"boom":
                raise ValueError("boom requested")
            self.wfile.write(line)

    return Handler


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_handle_error_called_and_server_keeps_serving(ss, threaded):
    errors = []
    base = ss.ThreadingTCPServer if threaded else ss.TCPServer

    class Server(base):
        def handle_error(self, request, client_address):
            errors.append((sys.exc_info()[0], client_address, request.fileno() >= 0))

    with Server(ANY_PORT, failing_handler(ss)) as server, serve_in_thread(server):
        for _ in range(3):
            with connect_to(server) as sock:
                client = sock.getsockname()
                sock.sendall(b"boom\n")
                assert recv_all(sock) == b""
            assert request_reply(server, b"fine\n") == b"fine\n"
    # handle_error is called with the exception being handled, before the request is closed.
    assert [e[0] for e in errors] == [ValueError] * 3
    assert errors[-1][1] == client
    assert all(still_open for _, _, still_open in errors)


def test_default_handle_error_prints_traceback(ss, capsys):
    with ss.TCPServer(ANY_PORT, failing_handler(ss)) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            client = sock.getsockname()
            sock.sendall(b"boom\n")
            assert recv_all(sock) == b""
        assert request_reply(server, b"after\n") == b"after\n"
    err = capsys.readouterr().err
    assert "Exception occurred during processing of request from" in err
    assert str(client) in err
    assert "ValueError: boom requested" in err


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exception_propagates_from_handle_request(ss, exc_type):
    handled = []

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            raise exc_type("stop")

    class Server(ss.TCPServer):
        def handle_error(self, request, client_address):
            handled.append("handle_error")

        def shutdown_request(self, request):
            handled.append("shutdown_request")
            super().shutdown_request(request)

    with Server(ANY_PORT, Handler) as server:
        with connect_to(server) as sock:
            sock.sendall(b"x")
            outcome = run_in_thread(server.handle_request).join()
            assert type(outcome.error) is exc_type
            assert recv_all(sock) == b""
    # Not handled as an error; the request is still shut down.
    assert handled == ["shutdown_request"]


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exception_propagates_from_serve_forever(ss, exc_type):
    class Handler(ss.StreamRequestHandler):
        def handle(self):
            if self.rfile.readline() == b"stop\n":
                raise exc_type("stop")
            self.wfile.write(b"ok\n")

    with ss.TCPServer(ANY_PORT, Handler) as server:
        serving = run_in_thread(server.serve_forever, 0.05)
        assert request_reply(server, b"go\n") == b"ok\n"
        assert request_reply(server, b"stop\n") == b""
        serving.join()
        assert type(serving.error) is exc_type


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is the result
        return exc
    raise AssertionError("no exception raised")


def test_bind_port_in_use(ss):
    warm_up(ss)
    with socket.socket() as taken:
        taken.bind(ANY_PORT)
        taken.listen()
        address = taken.getsockname()
        before = fd_count()
        exc = _error_of(lambda: ss.TCPServer(address, ss.BaseRequestHandler))
        gc.collect()
        assert fd_count() == before
    assert type(exc) is OSError
    assert exc.errno == errno.EADDRINUSE


@pytest.mark.parametrize("address", [("256.1.1.1", 0), ("no-such-host.invalid", 0)])
def test_bind_bad_address_same_exception(ss, address):
    import socketserver

    reference = _error_of(lambda: socketserver.TCPServer(address, socketserver.BaseRequestHandler))
    warm_up(ss)
    before = fd_count()
    exc = _error_of(lambda: ss.TCPServer(address, ss.BaseRequestHandler))
    gc.collect()
    assert fd_count() == before
    assert type(exc) is type(reference)
    assert isinstance(exc, OSError)
    assert exc.args[0] == reference.args[0]


def test_bind_bad_address_type(ss):
    import socketserver

    reference = _error_of(
        lambda: socketserver.TCPServer(("127.0.0.1", "x"), socketserver.BaseRequestHandler)
    )
    before = fd_count()
    exc = _error_of(lambda: ss.TCPServer(("127.0.0.1", "x"), ss.BaseRequestHandler))
    gc.collect()
    assert fd_count() == before
    assert type(exc) is type(reference) is TypeError


def test_bind_existing_unix_path(ss, unix_path):
    with open(unix_path, "w"):
        pass
    warm_up(ss)
    before = fd_count()
    exc = _error_of(lambda: ss.UnixStreamServer(unix_path, ss.BaseRequestHandler))
    gc.collect()
    assert fd_count() == before
    assert type(exc) is OSError
    assert exc.errno == errno.EADDRINUSE
    # The existing file is left alone.
    assert os.path.isfile(unix_path)


def test_bind_unix_path_in_missing_directory(ss, unix_path):
    path = os.path.join(unix_path, "missing", "sock")
    exc = _error_of(lambda: ss.UnixStreamServer(path, ss.BaseRequestHandler))
    assert type(exc) is FileNotFoundError


def test_handler_timeout(ss):
    seen = {}

    class Handler(ss.StreamRequestHandler):
        timeout = 0.2

        def handle(self):
            seen["gettimeout"] = self.request.gettimeout()
            started = time.monotonic()
            try:
                self.rfile.readline()
            except Exception as exc:  # noqa: BLE001 - recorded for the test
                seen["error"] = type(exc)
            seen["elapsed"] = time.monotonic() - started
            self.wfile.write(b"timed out\n")

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            assert recv_all(sock) == b"timed out\n"
    assert seen["gettimeout"] == 0.2
    assert issubclass(seen["error"], TimeoutError)
    assert issubclass(seen["error"], socket.timeout)
    assert 0.15 <= seen["elapsed"] < 2


@pytest.mark.parametrize("nagle_off", [True, False])
def test_disable_nagle_algorithm(ss, nagle_off):
    seen = []

    class Handler(ss.StreamRequestHandler):
        disable_nagle_algorithm = nagle_off

        def handle(self):
            seen.append(self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            self.wfile.write(b"x")

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert request_reply(server, b"") == b"x"
    with socket.socket() as plain:
        default = plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert bool(seen[0]) is (True if nagle_off else bool(default))


def test_request_is_socket_like(ss):
    seen = {}

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            request = self.request
            seen["fileno"] = request.fileno()
            seen["family"] = (request.family, request.type)
            seen["peer"] = request.getpeername()
            seen["sockname"] = request.getsockname()
            request.settimeout(WAIT)
            seen["gettimeout"] = request.gettimeout()
            request.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            seen["keepalive"] = request.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            with request.makefile("rb") as rfile:
                seen["line"] = rfile.readline()
            request.sendall(b"ack\n")
            seen["recv"] = request.recv(5)
            with request.makefile("wb") as wfile:
                wfile.write(b"from makefile\n")
            request.sendall(b"bye\n")
            request.shutdown(socket.SHUT_WR)
            seen["after_shutdown"] = request.recv(100)
            with self.request as s:
                seen["with"] = s is request
            seen["closed_fileno"] = request.fileno()

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            client = sock.getsockname()
            server_end = sock.getpeername()
            sock.sendall(b"hello\n")
            assert recv_line(sock) == b"ack\n"
            sock.sendall(b"12345")
            assert recv_all(sock) == b"from makefile\nbye\n"
            sock.sendall(b"last")
            sock.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: "closed_fileno" in seen)
    assert isinstance(seen.pop("fileno"), int)
    assert seen == {
        "family": (socket.AF_INET, socket.SOCK_STREAM),
        "peer": client,
        "sockname": server_end,
        "gettimeout": WAIT,
        "keepalive": 1,
        "line": b"hello\n",
        "recv": b"12345",
        "after_shutdown": b"last",
        "with": True,
        "closed_fileno": -1,
    }


def test_unix_request_is_socket_like(ss, unix_path):
    seen = {}

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            seen["family"] = self.request.family
            seen["sockname"] = self.request.getsockname()
            seen["peer"] = self.request.getpeername()
            self.request.sendall(self.request.recv(10))

    with ss.UnixStreamServer(unix_path, Handler) as server, serve_in_thread(server):
        assert request_reply(server, b"unix") == b"unix"
    assert seen == {"family": socket.AF_UNIX, "sockname": unix_path, "peer": ""}


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_reset_and_vanishing_clients_cost_nothing(ss, threaded):
    errors = []
    base = ss.ThreadingTCPServer if threaded else ss.TCPServer

    class Server(base):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[0])

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line.endswith(b"\n"):
                self.wfile.write(line)

    with Server(ANY_PORT, Handler) as server, serve_in_thread(server):
        for _ in range(5):
            # Connect and reset at once.
            reset_close(connect_to(server))
            assert request_reply(server, b"next\n") == b"next\n"
            # Vanish in the middle of a request line.
            with connect_to(server) as sock:
                sock.sendall(b"half a req")
            assert request_reply(server, b"next\n") == b"next\n"
            # Reset in the middle of a request line.
            sock = connect_to(server)
            sock.sendall(b"half a req")
            reset_close(sock)
            assert request_reply(server, b"next\n") == b"next\n"
    # A reset may reach the handler as ConnectionResetError, never as anything else.
    assert set(errors) <= {ConnectionResetError}


def test_handler_sees_client_reset(ss):
    """A handler writing to a client that reset gets ConnectionResetError/BrokenPipeError."""
    seen = []

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            if self.request.recv(1) != b"g":
                return
            deadline = time.monotonic() + WAIT
            try:
                while time.monotonic() < deadline:
                    self.request.sendall(b"x" * 65536)
                    time.sleep(0.01)
            except OSError as exc:
                seen.append(type(exc))

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        sock = connect_to(server)
        sock.sendall(b"g")
        sock.recv(10)
        reset_close(sock)
        assert wait_until(lambda: seen)
        assert request_reply(server, b"") == b""
    assert seen[0] in (ConnectionResetError, BrokenPipeError)
