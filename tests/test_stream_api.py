"""The stream half of the socketserver API: names, signatures, defaults.

The expectations are CPython 3.13's ``socketserver``, written out here so that
the tests hold on every supported Python (3.10's stdlib lacks
``allow_reuse_port``, for example).  Against the running stdlib they check the
table itself.
"""

from __future__ import annotations

import inspect
import io
import socket

import pytest

from support import ANY_PORT, connect_to, request_reply, serve_in_thread

# Class name -> the names of its bases, from CPython 3.13.
BASES = {
    "BaseServer": (),
    "TCPServer": ("BaseServer",),
    "UnixStreamServer": ("TCPServer",),
    "ThreadingMixIn": (),
    "ThreadingTCPServer": ("ThreadingMixIn", "TCPServer"),
    "ThreadingUnixStreamServer": ("ThreadingMixIn", "UnixStreamServer"),
    "BaseRequestHandler": (),
    "StreamRequestHandler": ("BaseRequestHandler",),
}

# (class, method) -> signature, from CPython 3.13 (inherited methods included).
_SERVER_METHODS = {
    "__init__": "(self, server_address, RequestHandlerClass)",
    "__enter__": "(self)",
    "__exit__": "(self, *args)",
    "serve_forever": "(self, poll_interval=0.5)",
    "shutdown": "(self)",
    "service_actions": "(self)",
    "handle_request": "(self)",
    "handle_timeout": "(self)",
    "verify_request": "(self, request, client_address)",
    "process_request": "(self, request, client_address)",
    "server_activate": "(self)",
    "server_close": "(self)",
    "finish_request": "(self, request, client_address)",
    "shutdown_request": "(self, request)",
    "close_request": "(self, request)",
    "handle_error": "(self, request, client_address)",
}
_TCP_METHODS = {
    **_SERVER_METHODS,
    "__init__": "(self, server_address, RequestHandlerClass, bind_and_activate=True)",
    "server_bind": "(self)",
    "fileno": "(self)",
    "get_request": "(self)",
}
_THREADING_METHODS = {
    "process_request": "(self, request, client_address)",
    "process_request_thread": "(self, request, client_address)",
    "server_close": "(self)",
}
_HANDLER_METHODS = {
    "__init__": "(self, request, client_address, server)",
    "setup": "(self)",
    "handle": "(self)",
    "finish": "(self)",
}
SIGNATURES = {
    "BaseServer": _SERVER_METHODS,
    "TCPServer": _TCP_METHODS,
    "UnixStreamServer": _TCP_METHODS,
    "ThreadingMixIn": _THREADING_METHODS,
    "ThreadingTCPServer": {**_TCP_METHODS, **_THREADING_METHODS},
    "ThreadingUnixStreamServer": {**_TCP_METHODS, **_THREADING_METHODS},
    "BaseRequestHandler": _HANDLER_METHODS,
    "StreamRequestHandler": _HANDLER_METHODS,
}

# (class, attribute) -> default, from CPython 3.13 (inherited attributes included).
_TCP_DEFAULTS = {
    "timeout": None,
    "address_family": socket.AF_INET,
    "socket_type": socket.SOCK_STREAM,
    "request_queue_size": 5,
    "allow_reuse_address": False,
    "allow_reuse_port": False,
}
_THREADING_DEFAULTS = {"daemon_threads": False, "block_on_close": True}
DEFAULTS = {
    "BaseServer": {"timeout": None},
    "TCPServer": _TCP_DEFAULTS,
    "UnixStreamServer": {**_TCP_DEFAULTS, "address_family": socket.AF_UNIX},
    "ThreadingMixIn": _THREADING_DEFAULTS,
    "ThreadingTCPServer": {**_TCP_DEFAULTS, **_THREADING_DEFAULTS},
    "ThreadingUnixStreamServer": {
        **_TCP_DEFAULTS,
        **_THREADING_DEFAULTS,
        "address_family": socket.AF_UNIX,
    },
    "StreamRequestHandler": {
        "rbufsize": -1,
        "wbufsize": 0,
        "timeout": None,
        "disable_nagle_algorithm": False,
    },
}

# Attributes the running stdlib may lack (added after 3.10): skipped for "stdlib" only.
NEWER_THAN_RUNNING_STDLIB = {"allow_reuse_port"}


def _is_stdlib(ss) -> bool:
    return ss.__name__ == "socketserver"


def _compatible(actual: inspect.Signature, expected: str) -> bool:
    """Same parameters as ``expected``, plus optionally keyword-only ones with defaults.

    The project's style wants options beyond the stdlib keyword-only, so those
    may follow; everything a stdlib caller can pass must match exactly.  Type
    hints (wanted too) are not part of the comparison.
    """
    params = [p.replace(annotation=inspect.Parameter.empty) for p in actual.parameters.values()]
    extra = [
        p
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    ]
    core = inspect.Signature([p for p in params if p not in extra])
    return str(core) == expected


@pytest.mark.parametrize("name", sorted(BASES))
def test_class_exists_with_same_bases(ss, name):
    cls = getattr(ss, name)
    assert isinstance(cls, type)
    for base in BASES[name]:
        assert issubclass(cls, getattr(ss, base)), (name, base)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_method_signatures(ss, name):
    cls = getattr(ss, name)
    wrong = {}
    for method, expected in SIGNATURES[name].items():
        actual = inspect.signature(getattr(cls, method))
        if not _compatible(actual, expected):
            wrong[method] = (str(actual), expected)
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_class_attribute_defaults(ss, name):
    cls = getattr(ss, name)
    wrong = {}
    for attribute, expected in DEFAULTS[name].items():
        if _is_stdlib(ss) and attribute in NEWER_THAN_RUNNING_STDLIB:
            if not hasattr(cls, attribute):
                continue
        actual = getattr(cls, attribute, "<missing>")
        if actual != expected or type(actual) is not type(expected):
            wrong[attribute] = (actual, expected)
    assert not wrong, wrong


def test_names_exported(ss):
    for name in BASES:
        assert name in ss.__all__, name


def test_instance_attributes(ss):
    class Handler(ss.BaseRequestHandler):
        pass

    with ss.TCPServer(ANY_PORT, Handler) as server:
        assert server.RequestHandlerClass is Handler
        host, port = server.server_address
        assert host == "127.0.0.1" and isinstance(port, int) and port > 0
        assert server.socket.getsockname() == server.server_address
        assert server.socket.family == socket.AF_INET
        assert server.socket.type == socket.SOCK_STREAM
        assert isinstance(server.fileno(), int)
        assert server.fileno() == server.socket.fileno()
        assert server.timeout is None


def test_unix_instance_attributes(ss, unix_path):
    with ss.UnixStreamServer(unix_path, ss.BaseRequestHandler) as server:
        assert server.server_address == unix_path
        assert server.socket.family == socket.AF_UNIX
        assert server.socket.getsockname() == unix_path


def test_context_manager_closes(ss):
    server = ss.TCPServer(ANY_PORT, ss.BaseRequestHandler)
    with server as entered:
        assert entered is server
    assert server.socket.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        connect_to(server).close()


def test_handler_attributes(ss):
    seen = {}

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            seen["connection_is_request"] = self.connection is self.request
            seen["server"] = self.server
            seen["client_address"] = self.client_address
            for name in ("rfile", "wfile"):
                stream = getattr(self, name)
                seen[name] = (
                    isinstance(stream, io.BufferedIOBase),
                    stream.fileno() == self.request.fileno(),
                )
            seen["readable"] = self.rfile.readable()
            seen["writable"] = self.wfile.writable()
            self.wfile.write(self.rfile.readline())

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        with connect_to(server) as sock:
            sock.sendall(b"ping\n")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b"ping\n"
            client = sock.getsockname()
    assert seen == {
        "connection_is_request": True,
        "server": server,
        "client_address": client,
        "rfile": (True, True),
        "wfile": (True, True),
        "readable": True,
        "writable": True,
    }


def test_buffered_wfile_flushed_on_finish(ss):
    class Handler(ss.StreamRequestHandler):
        wbufsize = -1

        def handle(self):
            assert isinstance(self.wfile, io.BufferedIOBase)
            for line in self.rfile:
                self.wfile.write(line.upper())

    with ss.TCPServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert request_reply(server, b"a\nb\nc\n") == b"A\nB\nC\n"
