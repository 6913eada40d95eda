"""Request handlers for the forking tests, importable by name from a new process.

A forking server's request runs in another process, which finds the handler
class by importing its module: so these live at module level, not inside test
functions.  Each handler exists twice, once on the stdlib's base classes and
once on txsocketserver's; :func:`handler` picks the one for the module under
test.

Every handler's reply says which process ran it, so tests can tell requests
apart and check where state went.
"""

from __future__ import annotations

import os
import socketserver
import ssl
import sys
import threading
import time
from types import ModuleType

import txsocketserver

# Changed by StateHandler in the request's process; must stay 0 everywhere else.
COUNTER = 0


def _burn_cpu(seconds: float) -> None:
    """Spin pure Python for about ``seconds`` of wall time."""
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        n += 1


class _Echo:
    """Echo each line until EOF, then one last line: ``pid <pid>``."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)
        self.wfile.write(b"pid %d\n" % os.getpid())


class _DatagramEcho:
    """Reply with the datagram, then ``|<pid>``."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.read() + b"|%d" % os.getpid())


class _State:
    """Change module and server state; reply with what this process saw."""

    def handle(self) -> None:
        global COUNTER
        COUNTER += 1
        seen_before = getattr(self.server, "touched_by", None)
        self.server.touched_by = os.getpid()
        self.wfile.write(b"%d %d %s\n" % (os.getpid(), COUNTER, str(seen_before).encode()))


class _Crash:
    """First line is a command: ``exit`` (``os._exit(3)``), ``raise`` (ValueError),
    ``kill`` (SIGKILL itself); anything else is echoed with the pid."""

    def handle(self) -> None:
        command = self.rfile.readline().strip()
        if command == b"exit":
            os._exit(3)
        if command == b"raise":
            raise ValueError("handler failed on purpose")
        if command == b"kill":
            os.kill(os.getpid(), 9)
        self.wfile.write(command + b" %d\n" % os.getpid())


class _Timed:
    """Read ``<seconds> <cpu|sleep>``; busy or asleep that long; reply
    ``<pid> <start> <end>`` (wall clock, so the parent can compare)."""

    def handle(self) -> None:
        seconds, how = self.rfile.readline().split()
        start = time.time()
        if how == b"cpu":
            _burn_cpu(float(seconds))
        else:
            time.sleep(float(seconds))
        end = time.time()
        self.wfile.write(b"%d %r %r\n" % (os.getpid(), start, end))


class _Slow:
    """Write ``started``, sleep the number of seconds sent, write ``done``."""

    def handle(self) -> None:
        seconds = float(self.rfile.readline())
        self.wfile.write(b"started\n")
        time.sleep(seconds)
        self.wfile.write(b"done\n")


class _Modules:
    """Reply with which of Twisted, zope.interface and cloudpickle this process has imported."""

    def handle(self) -> None:
        watched = ("twisted", "zope.interface", "cloudpickle")
        loaded = [name for name in watched if name in sys.modules]
        self.wfile.write(b"loaded: %s\n" % " ".join(loaded).encode())


class _ClassState:
    """Reply with what this process sees of the classes and the server:
    ``greeting`` (a class attribute), the keys of ``table`` (a class-level
    dict), and the type of ``self.server.registry`` and whether it is this
    module's ``REGISTRY``."""

    greeting = b"as defined"
    table: dict[str, int] = {"defined": 1}

    def handle(self) -> None:
        registry = getattr(self.server, "registry", None)
        self.wfile.write(
            b"%s %s %s %s\n"
            % (
                self.greeting,
                ",".join(sorted(self.table)).encode(),
                type(registry).__name__.encode(),
                str(registry is REGISTRY).encode(),
            )
        )


class Registry:
    """Something a server holds that does not pickle (it holds a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


# A module-level object that does not pickle: a child finds it by this name.
REGISTRY = Registry()


class StdlibEcho(_Echo, socketserver.StreamRequestHandler):
    pass


class StdlibDatagramEcho(_DatagramEcho, socketserver.DatagramRequestHandler):
    pass


class StdlibState(_State, socketserver.StreamRequestHandler):
    pass


class StdlibCrash(_Crash, socketserver.StreamRequestHandler):
    pass


class StdlibTimed(_Timed, socketserver.StreamRequestHandler):
    pass


class StdlibSlow(_Slow, socketserver.StreamRequestHandler):
    pass


class StdlibClassState(_ClassState, socketserver.StreamRequestHandler):
    pass


class TxClassState(_ClassState, txsocketserver.StreamRequestHandler):
    pass


class TxEcho(_Echo, txsocketserver.StreamRequestHandler):
    pass


class TxDatagramEcho(_DatagramEcho, txsocketserver.DatagramRequestHandler):
    pass


class TxState(_State, txsocketserver.StreamRequestHandler):
    pass


class TxCrash(_Crash, txsocketserver.StreamRequestHandler):
    pass


class TxTimed(_Timed, txsocketserver.StreamRequestHandler):
    pass


class TxSlow(_Slow, txsocketserver.StreamRequestHandler):
    pass


class TxModules(_Modules, txsocketserver.StreamRequestHandler):
    pass


class TLSOnceServer(txsocketserver.ForkingTCPServer):
    """Wraps its first connection in TLS (set ``cert`` first), the rest not."""

    cert = None
    wrapped = False

    def get_request(self):
        sock, address = super().get_request()
        if not self.wrapped:
            self.wrapped = True
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert.cert_path, self.cert.key_path)
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


def handler(ss: ModuleType, name: str) -> type:
    """The handler called *name* (``Echo``, ``State``...) built on ``ss``'s classes."""
    prefix = "Tx" if ss is txsocketserver else "Stdlib"
    return globals()[prefix + name]
