"""Less common ways real code drives socketserver; each must behave as in the stdlib.

Custom serving loops that select() on the server's fileno (the logging
module's socket receiver does this), hooks overridden to keep or re-route
requests, and socket calls beyond the everyday ones.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from support import (
    ANY_PORT,
    WAIT,
    connect_to,
    recv_all,
    recv_line,
    request_reply,
    run_in_thread,
    serve_in_thread,
    sha256,
)


def echo_handler(ss):
    class Echo(ss.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    return Echo


def test_custom_loop_selecting_on_server_fileno(ss):
    """The logging.handlers receiver pattern: select() on fileno, then handle_request()."""
    with ss.TCPServer(ANY_PORT, echo_handler(ss)) as server:
        clients = [run_in_thread(request_reply, server, b"%d\n" % i) for i in range(3)]
        deadline = time.monotonic() + WAIT
        handled = 0
        while handled < 3 and time.monotonic() < deadline:
            readable, _, _ = select.select([server.socket.fileno()], [], [], 0.1)
            if readable:
                server.handle_request()
                handled += 1
        assert handled == 3
        assert sorted(c.join().value for c in clients) == [b"0\n", b"1\n", b"2\n"]


def test_server_fileno_not_readable_without_clients(ss):
    with ss.TCPServer(ANY_PORT, echo_handler(ss)) as server:
        assert select.select([server], [], [], 0.1)[0] == []


def test_handler_selects_on_request(ss):
    seen = []
    first_select_done = threading.Event()

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            readable, _, _ = select.select([self.request], [], [], 0.1)
            seen.append(bool(readable))
            first_select_done.set()
            readable, _, _ = select.select([self.request], [], [], WAIT)
            seen.append(bool(readable))
            self.request.sendall(self.request.recv(100))

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            assert first_select_done.wait(WAIT)
            sock.sendall(b"late")
            assert sock.recv(100) == b"late"
    assert seen == [False, True]


def test_more_socket_methods(ss, tmp_path):
    seen = {}
    payload = os.urandom(200_000)
    (tmp_path / "f.bin").write_bytes(payload)
    nonblocking_recv_done = threading.Event()

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            request = self.request
            seen["is_socket"] = isinstance(request, socket.socket)
            request.setblocking(False)
            try:
                request.recv(1)
            except BlockingIOError:
                seen["nonblocking"] = "BlockingIOError"
            nonblocking_recv_done.set()
            request.setblocking(True)
            request.settimeout(WAIT)
            buffer = bytearray(4)
            seen["recv_into"] = (request.recv_into(buffer), bytes(buffer))
            seen["send"] = request.send(b"!")
            with open(tmp_path / "f.bin", "rb") as f:
                seen["sendfile"] = request.sendfile(f)

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            # Only once the handler's non-blocking recv() has found nothing.
            assert nonblocking_recv_done.wait(WAIT)
            sock.sendall(b"abcd")
            assert recv_all(sock) == b"!" + payload
    assert seen == {
        "is_socket": True,
        "nonblocking": "BlockingIOError",
        "recv_into": (4, b"abcd"),
        "send": 1,
        "sendfile": len(payload),
    }


def test_shutdown_request_overridden_to_keep_connection(ss):
    """A server may keep a request open after the handler returns and answer later."""
    kept = []
    moved_on = threading.Event()

    class Server(ss.TCPServer):
        def shutdown_request(self, request):
            kept.append(request)

        def service_actions(self):
            # serve_forever calls this after it has finished with a request:
            # from here on the server has left the kept one behind.
            if kept:
                moved_on.set()

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"first\n")

    with Server(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            assert recv_line(sock) == b"first\n"
            assert moved_on.wait(WAIT)
            assert len(kept) == 1
            kept[0].sendall(b"later\n")
            assert recv_line(sock) == b"later\n"
            kept[0].close()
            assert recv_all(sock) == b""


def test_process_request_overridden_with_own_thread(ss):
    """An old-style custom mixin: process_request starts its own thread."""
    threads = []

    class Server(ss.TCPServer):
        def process_request(self, request, client_address):
            def run():
                try:
                    self.finish_request(request, client_address)
                finally:
                    self.shutdown_request(request)

            thread = threading.Thread(target=run)
            threads.append(thread)
            thread.start()

    with Server(ANY_PORT, echo_handler(ss)) as server, serve_in_thread(server):
        clients = [run_in_thread(request_reply, server, b"%d\n" % i) for i in range(5)]
        assert [c.join().value for c in clients] == [b"%d\n" % i for i in range(5)]
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def test_get_request_overridden_to_rewrite_address(ss):
    seen = []

    class Server(ss.TCPServer):
        def get_request(self):
            request, address = super().get_request()
            return request, ("rewritten", address[1])

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            seen.append(self.client_address)
            self.wfile.write(b"ok\n")

    with Server(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            port = sock.getsockname()[1]
            assert recv_all(sock) == b"ok\n"
    assert seen == [("rewritten", port)]


def test_unix_path_left_in_place_after_close(ss, unix_path):
    """Like the stdlib, server_close() does not unlink the socket file; users do."""
    with ss.UnixStreamServer(unix_path, echo_handler(ss)) as server, serve_in_thread(server):
        assert request_reply(server, b"x\n") == b"x\n"
    assert os.path.exists(unix_path)
    os.unlink(unix_path)
    with ss.UnixStreamServer(unix_path, echo_handler(ss)) as server, serve_in_thread(server):
        assert request_reply(server, b"y\n") == b"y\n"


def test_stale_unix_socket_file_is_in_use(ss, unix_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(unix_path)
    stale.close()
    with pytest.raises(OSError) as info:
        ss.UnixStreamServer(unix_path, echo_handler(ss))
    assert type(info.value) is OSError
    assert info.value.errno == 98


def test_handle_request_uses_listening_socket_timeout(ss):
    calls = []

    class Server(ss.TCPServer):
        def handle_timeout(self):
            calls.append("handle_timeout")

    with Server(ANY_PORT, echo_handler(ss)) as server:
        server.socket.settimeout(0.1)
        started = time.monotonic()
        server.handle_request()
        assert time.monotonic() - started < 2
    assert calls == ["handle_timeout"]


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_large_transfer_with_slow_peer(ss, direction):
    """Every byte arrives, in order, when the other side is slow (flow control)."""
    data = os.urandom(8 * 1024 * 1024)
    seen = []

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            if direction == "download":
                self.wfile.write(data)
            else:
                received = self.rfile.read(len(data))
                seen.append(sha256(received))
                self.wfile.write(b"done\n")

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            if direction == "download":
                time.sleep(0.3)
                chunks = []
                while chunk := sock.recv(1 << 20):
                    chunks.append(chunk)
                    if len(chunks) < 5:
                        time.sleep(0.05)
                assert sha256(b"".join(chunks)) == sha256(data)
            else:
                sock.sendall(data)
                assert recv_all(sock) == b"done\n"
                assert seen == [sha256(data)]


def test_unread_input_then_reply(ss):
    """The handler answers without reading all input; the reply still arrives."""

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"short answer\n")

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            sock.sendall(b"question\n")
            assert recv_line(sock) == b"short answer\n"


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_threading_mixin_on_user_server_class(ss, threaded, unix_path):
    """ThreadingMixIn mixed by the user into their own UnixStreamServer subclass."""

    class Base(ss.UnixStreamServer):
        def __init__(self, path, handler, greeting):
            self.greeting = greeting
            super().__init__(path, handler)

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.server.greeting + self.rfile.readline())

    cls = type("Server", (ss.ThreadingMixIn, Base), {}) if threaded else Base
    with cls(unix_path, Handler, b"> ") as server, serve_in_thread(server):
        assert request_reply(server, b"hi\n") == b"> hi\n"


def test_server_close_twice(ss):
    server = ss.ThreadingTCPServer(ANY_PORT, echo_handler(ss))
    with server, serve_in_thread(server):
        assert request_reply(server, b"x\n") == b"x\n"
    server.server_close()
    server.server_close()


def test_listening_socket_wrapped_in_tls_after_construction(ss, tls_cert):
    """The common HTTPS recipe: ``server.socket = ctx.wrap_socket(server.socket, ...)``."""
    import ssl

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tls_cert.cert_path, tls_cert.key_path)
    client_context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with ss.TCPServer(ANY_PORT, echo_handler(ss)) as server:
        server.socket = server_context.wrap_socket(server.socket, server_side=True)
        with serve_in_thread(server):
            for _ in range(2):
                with connect_to(server) as raw:
                    with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(b"over tls\n")
                        assert tls.recv(100) == b"over tls\n"


def test_listening_socket_replaced_by_inherited_one(ss):
    """Socket activation by hand: bind_and_activate=False, then adopt a listening socket."""
    listener = socket.socket()
    listener.bind(ANY_PORT)
    listener.listen(5)
    with ss.TCPServer(ANY_PORT, echo_handler(ss), bind_and_activate=False) as server:
        server.socket.close()
        server.socket = listener
        server.server_address = listener.getsockname()
        with serve_in_thread(server):
            assert request_reply(server, b"adopted\n") == b"adopted\n"
    assert listener.fileno() == -1


def test_no_busy_wait_while_sync_handler_blocks_with_queued_clients(ss):
    """Queued connections wait in the backlog; nobody spins on the readable socket."""
    started = threading.Event()
    release = threading.Event()

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            if not started.is_set():
                started.set()
                # Busy until the measurement below is over, however long it takes.
                release.wait(WAIT)
            self.wfile.write(self.rfile.readline())

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server, poll_interval=0.5):
        first = run_in_thread(request_reply, server, b"first\n")
        assert started.wait(WAIT)
        queued = [connect_to(server) for _ in range(3)]
        try:
            cpu = time.process_time()
            time.sleep(0.3)  # the window in which CPU use is measured
            assert time.process_time() - cpu < 0.15
            assert not first.done.is_set()
        finally:
            release.set()
            for sock in queued:
                sock.close()
        assert first.join().value == b"first\n"
