"""Forking serves what the stdlib's forking serves, written as users write servers.

Classes defined inside the test functions, closures, a server with its own
constructor, a ``python -c`` one-liner, a main script configured under its
``if __name__ == "__main__":`` guard: the same scenario against the stdlib's
``socketserver`` and against txsocketserver, real sockets and real clients.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from typing import Any

import pytest

import forking_handlers
from support import ANY_PORT, connect_to, fd_count, recv_all, serve_in_thread

WAIT_FORK = 20.0


@pytest.fixture
def ss(forking_ss: Any) -> Any:
    """Both fork modes of ours against the stdlib (``conftest.forking_ss``)."""
    return forking_ss
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def ask(server, payload: bytes) -> bytes:
    with connect_to(server, timeout=WAIT_FORK) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_classes_defined_in_the_test_function(ss):
    greeting = b"closure says "  # reached through the handler's closure

    class MyServer(ss.ForkingTCPServer):
        def handle_error(self, request, client_address):
            self.close_request(request)
            raise

    class MyHandler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(greeting + self.rfile.readline())

    with MyServer(ANY_PORT, MyHandler) as server, serve_in_thread(server):
        for n in range(3):
            assert ask(server, b"hello %d\n" % n) == b"closure says hello %d\n" % n
    assert not server.active_children


def test_datagram_classes_defined_in_the_test_function(ss):
    class MyHandler(ss.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(b"pid %d: " % os.getpid() + self.rfile.read())

    with ss.ForkingUDPServer(ANY_PORT, MyHandler) as server, serve_in_thread(server):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(WAIT_FORK)
            sock.sendto(b"ping", server.server_address)
            pid, _, payload = sock.recv(1024).partition(b": ")
    assert payload == b"ping"
    assert int(pid.split()[1]) != os.getpid()


def test_server_with_a_constructor_of_its_own(ss):
    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.server.config["greeting"] + self.rfile.readline())

    class ConfiguredServer(ss.TCPServer):
        def __init__(self, config):
            self.config = config
            super().__init__(ANY_PORT, Handler)

    class ForkingConfiguredServer(ss.ForkingMixIn, ConfiguredServer):
        pass

    with ForkingConfiguredServer({"greeting": b"configured: "}) as server:
        with serve_in_thread(server):
            assert ask(server, b"hi\n") == b"configured: hi\n"


def test_mixins_pass_keyword_arguments_through(ss):
    class Handler(ss.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"ok")

    for mixin in (ss.ForkingMixIn, ss.ThreadingMixIn):
        server_class = type("Server", (mixin, ss.TCPServer), {})
        server = server_class(
            server_address=ANY_PORT, RequestHandlerClass=Handler, bind_and_activate=False
        )
        try:
            assert server.socket.getsockname()[1] == 0, "not bound"
        finally:
            server.server_close()


ONE_LINER = (
    "import http.server, sys; sys.path.insert(0, {src!r}); "
    "import socketserver, txsocketserver; "
    "ss = txsocketserver if sys.argv[1] == 'tx' else socketserver; "
    "H = type('H', (http.server.BaseHTTPRequestHandler,), {{'do_GET': lambda self: "
    "(self.send_response(200), self.end_headers(), "
    "self.wfile.write(('forked ' + self.path).encode()))}}); "
    "s = ss.ForkingTCPServer(('127.0.0.1', 0), H); "
    "print(s.server_address[1], flush=True); "
    "[s.handle_request() for _ in range(2)]; s.server_close()"
)


def test_python_c_one_liner_forking_http_server(ss):
    which = "tx" if ss.__name__ == "txsocketserver" else "stdlib"
    proc = subprocess.Popen(
        [sys.executable, "-c", ONE_LINER.format(src=SRC), which],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        for path in ("/a", "/b"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT_FORK) as r:
                assert r.read() == b"forked " + path.encode()
        _out, err = proc.communicate(timeout=WAIT_FORK)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert '"GET /a HTTP/1.1" 200' in err


MAIN_GUARD_SCRIPT = """
    import socket, sys, threading
    sys.path.insert(0, {src!r})
    import socketserver
    import txsocketserver
    ss = txsocketserver if sys.argv[1] == "tx" else socketserver

    GREETING = None  # set from the command line, under the main guard

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(GREETING.encode() + b" " + self.rfile.readline())

    if __name__ == "__main__":
        GREETING = sys.argv[2]
        with ss.ForkingTCPServer(("127.0.0.1", 0), Handler) as server:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,))
            thread.start()
            for line in (b"one\\n", b"two\\n"):
                with socket.create_connection(server.server_address, timeout=20) as sock:
                    sock.sendall(line)
                    sys.stdout.write(sock.makefile("rb").readline().decode())
            server.shutdown()
            thread.join()
"""


def test_main_script_handler_reads_a_global_set_under_the_main_guard(ss, tmp_path):
    script = tmp_path / "configured_main.py"
    script.write_text(textwrap.dedent(MAIN_GUARD_SCRIPT.format(src=SRC)))
    which = "tx" if ss.__name__ == "txsocketserver" else "stdlib"
    result = subprocess.run(
        [sys.executable, str(script), which, "bonjour"],
        capture_output=True,
        text=True,
        timeout=WAIT_FORK * 2,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "bonjour one\nbonjour two\n"


def test_server_close_in_a_request_closes_only_that_process(ss, unix_path):
    # After os.fork, a request's server_close() closes the request process's
    # copy of the listening socket: the server goes on serving.
    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.server.server_close()
            self.wfile.write(b"closed mine: " + self.rfile.readline())

    server_class = type("Server", (ss.ForkingMixIn, ss.UnixStreamServer), {})
    with server_class(unix_path, Handler) as server, serve_in_thread(server):
        for n in range(3):
            assert ask(server, b"%d\n" % n) == b"closed mine: %d\n" % n
        assert os.path.exists(unix_path)


def test_server_close_in_a_request_keeps_a_unix_endpoints_files(tx, unix_path):
    # Ours only: a unix: endpoint's socket file and lock file are the serving
    # process's (its server_close removes them); a request's may not.
    class Handler(tx.StreamRequestHandler):
        def handle(self):
            self.server.server_close()
            self.wfile.write(b"closed mine: " + self.rfile.readline())

    server_class = type("Server", (tx.ForkingMixIn, tx.UnixStreamServer), {})
    with server_class(tx.Endpoint(f"unix:{unix_path}"), Handler) as server:
        with serve_in_thread(server):
            for n in range(3):
                assert ask(server, b"%d\n" % n) == b"closed mine: %d\n" % n
                assert os.path.exists(unix_path)
                assert os.path.lexists(unix_path + ".lock")
    assert not os.path.exists(unix_path)
    assert not os.path.lexists(unix_path + ".lock")


def test_what_reaches_the_request_follows_the_rule(tx):
    # Ours only (the stdlib's request has the whole server): the attributes a
    # user set arrive; those that act on the serving process do not.
    from txsocketserver._forking.carry import serving_process_only

    kept = serving_process_only(tx.ForkingTCPServer)
    assert {"_forking_dispatcher", "_listener"} <= kept
    assert "_BaseServer__in_flight" in kept
    assert not kept & {"socket", "server_address", "RequestHandlerClass", "timeout"}


def test_a_class_that_cannot_be_carried_is_refused_when_serving_starts(tx):
    # Ours only: the stdlib forks its memory and serves any class; ours must
    # pickle a class that a new process cannot import, and a lock does not.
    class LockedHandler(tx.StreamRequestHandler):
        lock = threading.Lock()

    fds = fd_count()
    with tx.ForkingTCPServer(ANY_PORT, LockedHandler) as server:
        for serve in (server.handle_request, lambda: server.serve_forever(0.05)):
            with pytest.raises(TypeError, match=r"LockedHandler.*lock"):
                serve()
    assert fd_count() == fds


def test_imported_module_state_is_as_imported(tx):
    # Ours only, the documented difference from os.fork (docs/forking.md):
    # a request sees modules as the template imported them, so neither a
    # change made to an imported module at run time nor a value computed
    # from the server process's pid at import time reaches it.
    original = forking_handlers.COUNTER

    class Handler(tx.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d" % forking_handlers.COUNTER)

    forking_handlers.COUNTER = 42
    try:
        with tx.ForkingTCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
            assert ask(server, b"") == b"%d" % original
    finally:
        forking_handlers.COUNTER = original


def test_classes_carried_by_value_cost_the_children_no_imports(tx):
    # Ours only: what cloudpickle would import in the template (threading's
    # at-fork hook above all) costs every request; the template rebuilds
    # classes, functions and closures without it (see _forking.by_value).
    suffix = b"!"

    class Base(tx.StreamRequestHandler):
        @property
        def heavy(self):
            watched = ("cloudpickle", "threading", "typing", "logging", "twisted")
            return " ".join(name for name in watched if name in sys.modules).encode()

    class Handler(Base):
        @classmethod
        def prefix(cls):
            return b"[" + cls.__name__.encode() + b"]"

        @staticmethod
        def wrap(data):
            return (lambda: data + suffix)()

        def handle(self):
            self.wfile.write(self.prefix() + self.wrap(self.heavy))

    with tx.ForkingTCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert ask(server, b"") == b"[Handler]!"


def test_a_by_value_pickle_beyond_the_rebuilders_still_loads(tx):
    # Ours only: an enum defined in a function needs a rebuilding function
    # that _by_value lacks; the template imports cloudpickle for it.
    import enum

    class Colour(enum.Enum):
        RED = 1

    class Handler(tx.StreamRequestHandler):
        colour = Colour.RED

        def handle(self):
            loaded = b"cloudpickle" if "cloudpickle" in sys.modules else b"-"
            self.wfile.write(self.colour.name.encode() + b" " + loaded)

    with tx.ForkingTCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert ask(server, b"") == b"RED cloudpickle"


def test_the_rebuilders_are_cloudpickles():
    # Ours only: _by_value stands in for these cloudpickle functions, for the
    # series it was written against; a new series must be checked (its
    # pickles would still load, through cloudpickle itself, but slower).
    import cloudpickle
    import cloudpickle.cloudpickle as implementation

    from txsocketserver._forking import by_value as _by_value

    assert cloudpickle.__version__.startswith(_by_value.CHECKED_SERIES), cloudpickle.__version__
    for name in _by_value.LOADERS:
        assert callable(getattr(implementation, name)), name
