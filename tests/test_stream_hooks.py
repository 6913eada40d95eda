"""The order in which the overridable hooks are called, stdlib vs txsocketserver.

A subclass overrides every hook and appends its name to a list; each scenario
compares the list with the stdlib's (spelled out, so a failure shows the
difference).  ``service_actions`` runs once per loop turn, a count that depends
on timing, so it is checked for presence and left out of the order.
"""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from support import ANY_PORT, connect_to, recv_all, run_in_thread, serve_in_thread, wait_until

SERVER_HOOKS = [
    "server_bind",
    "server_activate",
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "shutdown_request",
    "close_request",
    "handle_error",
    "handle_timeout",
    "service_actions",
    "server_close",
]


def recording_classes(ss, base, calls, verify=True, fail=False):
    """A server class derived from ``base`` and a handler, both logging hook calls."""
    lock = threading.Lock()

    def log(name):
        with lock:
            calls.append(name)

    def recorder(name):
        def hook(self, *args):
            log(name)
            result = getattr(super(Server, self), name)(*args)
            if name == "verify_request":
                return verify
            return result

        hook.__name__ = name
        return hook

    namespace = {name: recorder(name) for name in SERVER_HOOKS}
    # Quiet handle_error: record, do not print.
    namespace["handle_error"] = lambda self, request, address: log("handle_error")
    if issubclass(base, ss.ThreadingMixIn):
        namespace["process_request_thread"] = recorder("process_request_thread")
    Server = type("Server", (base,), namespace)

    class Handler(ss.StreamRequestHandler):
        def setup(self):
            log("setup")
            super().setup()

        def handle(self):
            log("handle")
            line = self.rfile.readline()
            if fail:
                raise ValueError("handler failed")
            self.wfile.write(line)

        def finish(self):
            log("finish")
            super().finish()

    return Server, Handler


CONSTRUCT = ["server_bind", "server_activate"]
SYNC_REQUEST = [
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "setup",
    "handle",
    "finish",
    "shutdown_request",
    "close_request",
]
THREAD_REQUEST = [
    "get_request",
    "verify_request",
    "process_request",
    "process_request_thread",
    "finish_request",
    "setup",
    "handle",
    "finish",
    "shutdown_request",
    "close_request",
]


def _one_request(server, payload=b"hi\n"):
    """Send ``payload`` and read the reply; b"" if the server dropped the connection."""
    with connect_to(server) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)
        except (ConnectionError, OSError) as exc:
            if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                raise
            return b""


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_hook_order_handle_request(ss, threaded):
    calls = []
    base = ss.ThreadingTCPServer if threaded else ss.TCPServer
    Server, Handler = recording_classes(ss, base, calls)
    with Server(ANY_PORT, Handler) as server:
        assert calls == CONSTRUCT
        client = run_in_thread(_one_request, server)
        server.handle_request()
        assert client.join().value == b"hi\n"
        assert wait_until(lambda: "close_request" in calls)
    expected = CONSTRUCT + (THREAD_REQUEST if threaded else SYNC_REQUEST) + ["server_close"]
    assert calls == expected


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_hook_order_handler_error(ss, threaded):
    calls = []
    base = ss.ThreadingTCPServer if threaded else ss.TCPServer
    Server, Handler = recording_classes(ss, base, calls, fail=True)
    with Server(ANY_PORT, Handler) as server:
        client = run_in_thread(_one_request, server)
        server.handle_request()
        assert client.join().value == b""
        assert wait_until(lambda: "close_request" in calls)
    request = THREAD_REQUEST if threaded else SYNC_REQUEST
    # finish() runs (BaseRequestHandler.__init__'s finally), then handle_error,
    # then the request is shut down and closed.
    expected = (
        CONSTRUCT
        + request[: request.index("finish") + 1]
        + ["handle_error", "shutdown_request", "close_request", "server_close"]
    )
    assert calls == expected


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_hook_order_verify_false(ss, threaded):
    calls = []
    base = ss.ThreadingTCPServer if threaded else ss.TCPServer
    Server, Handler = recording_classes(ss, base, calls, verify=False)
    with Server(ANY_PORT, Handler) as server:
        client = run_in_thread(_one_request, server)
        server.handle_request()
        assert client.join().value == b""
    assert calls == CONSTRUCT + [
        "get_request",
        "verify_request",
        "shutdown_request",
        "close_request",
        "server_close",
    ]


def test_hook_order_timeout(ss):
    calls = []
    Server, Handler = recording_classes(ss, ss.TCPServer, calls)
    with Server(ANY_PORT, Handler) as server:
        server.timeout = 0.05
        server.handle_request()
    assert calls == CONSTRUCT + ["handle_timeout", "server_close"]


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_hook_order_serve_forever(ss, threaded):
    calls = []
    base = ss.ThreadingTCPServer if threaded else ss.TCPServer
    Server, Handler = recording_classes(ss, base, calls)
    with Server(ANY_PORT, Handler) as server:
        with serve_in_thread(server, poll_interval=0.05):
            for _ in range(2):
                assert _one_request(server) == b"hi\n"
                assert wait_until(lambda: calls.count("close_request") == calls.count("setup"))
        assert wait_until(lambda: calls.count("service_actions") >= 1)
    request = THREAD_REQUEST if threaded else SYNC_REQUEST
    ordered = [name for name in calls if name != "service_actions"]
    assert ordered == CONSTRUCT + request + request + ["server_close"]


def test_hook_order_bind_and_activate_false(ss):
    calls = []
    Server, Handler = recording_classes(ss, ss.TCPServer, calls)
    with Server(ANY_PORT, Handler, bind_and_activate=False) as server:
        assert calls == []
        server.server_bind()
        server.server_activate()
    assert calls == CONSTRUCT + ["server_close"]


def test_hooks_run_on_the_serving_thread_for_sync_server(ss):
    """In a sync server, every request hook runs on the thread calling serve_forever."""
    threads = {}

    class Server(ss.TCPServer):
        def get_request(self):
            threads["get_request"] = threading.get_ident()
            return super().get_request()

        def finish_request(self, request, client_address):
            threads["finish_request"] = threading.get_ident()
            super().finish_request(request, client_address)

        def close_request(self, request):
            threads["close_request"] = threading.get_ident()
            super().close_request(request)

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            threads["handle"] = threading.get_ident()
            self.wfile.write(self.rfile.readline())

    with Server(ANY_PORT, Handler) as server:
        with serve_in_thread(server) as serving:
            assert _one_request(server) == b"hi\n"
            assert wait_until(lambda: "close_request" in threads)
    assert set(threads.values()) == {serving.thread.ident}
