"""Datagram servers, stdlib vs txsocketserver: UDP (IPv4, IPv6) and Unix datagrams.

Every client here keeps a bounded number of datagrams in flight (usually one:
send, wait for the reply), so the kernel never has a reason to drop one on
loopback; a missing reply is then a bug of the server under test.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import pickle
import select
import socket
import socketserver
import struct
import sys
import threading
import time

import pytest

from support import (
    ANY_PORT,
    WAIT,
    fd_count,
    ipv6_loopback_available,
    run_in_thread,
    serve_in_thread,
    settle_resources,
    thread_count,
    wait_until,
    warm_up,
)

# Skipped only where Python was built without IPv6 (socket.has_ipv6 false) or
# the machine has no ::1; on the reference machine it runs.
needs_ipv6 = pytest.mark.skipif(
    not ipv6_loopback_available(), reason="no IPv6 (socket.has_ipv6 false or no ::1)"
)

KINDS = ["udp", pytest.param("udp6", marks=needs_ipv6), "unix"]


def server_class(ss, kind, threading_):
    if kind == "unix":
        return ss.ThreadingUnixDatagramServer if threading_ else ss.UnixDatagramServer
    base = ss.ThreadingUDPServer if threading_ else ss.UDPServer
    if kind == "udp6":
        return type("UDP6Server", (base,), {"address_family": socket.AF_INET6})
    return base


def server_address(kind, unix_path):
    return {"udp": ANY_PORT, "udp6": ("::1", 0), "unix": unix_path}[kind]


@contextlib.contextmanager
def datagram_server(ss, kind, threading_, handler, unix_path, **attributes):
    """A bound datagram server of ``kind``; class attributes overridden by ``attributes``."""
    cls = server_class(ss, kind, threading_)
    if attributes:
        cls = type("Custom" + cls.__name__, (cls,), attributes)
    with cls(server_address(kind, unix_path), handler) as server:
        yield server


@contextlib.contextmanager
def client_for(server, bind_path=None):
    """A datagram socket connected to ``server`` (so it only hears the server).

    A Unix client is bound to ``bind_path`` when given, else left unbound (it
    can send, but has no address a reply could be sent to).
    """
    sock = socket.socket(server.address_family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(WAIT)
        if bind_path is not None:
            sock.bind(bind_path)
        sock.connect(server.server_address)
        yield sock


def exchange(sock, payload):
    sock.send(payload)
    return sock.recv(65536)


def echo_handler(ss, seen=None):
    class Echo(ss.DatagramRequestHandler):
        def handle(self):
            if seen is not None:
                seen.append(self.client_address)
            self.wfile.write(self.rfile.read())

    return Echo


# -- the API surface -------------------------------------------------------------


def test_defaults(ss):
    assert ss.UDPServer.max_packet_size == 8192
    assert ss.UDPServer.allow_reuse_address is False
    assert ss.UDPServer.socket_type == socket.SOCK_DGRAM
    assert ss.UDPServer.address_family == socket.AF_INET
    assert ss.UnixDatagramServer.address_family == socket.AF_UNIX
    assert ss.UnixDatagramServer.socket_type == socket.SOCK_DGRAM
    assert issubclass(ss.UDPServer, ss.TCPServer)
    assert issubclass(ss.UnixDatagramServer, ss.UDPServer)
    assert issubclass(ss.ThreadingUDPServer, ss.ThreadingMixIn)
    assert issubclass(ss.ThreadingUDPServer, ss.UDPServer)
    assert issubclass(ss.ThreadingUnixDatagramServer, ss.UnixDatagramServer)
    assert issubclass(ss.DatagramRequestHandler, ss.BaseRequestHandler)


def test_allow_reuse_port(ss):
    """The newest API on every version: 3.10's stdlib lacks allow_reuse_port."""
    if ss is socketserver and sys.version_info < (3, 11):
        pytest.skip("socketserver before 3.11 has no allow_reuse_port")
    assert ss.UDPServer.allow_reuse_port is False

    class Shared(ss.UDPServer):
        allow_reuse_port = True

    with Shared(ANY_PORT, ss.DatagramRequestHandler) as first:
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        with Shared(first.server_address, ss.DatagramRequestHandler) as second:
            assert second.server_address == first.server_address


def test_request_packet_socket_and_get_request(ss):
    """``get_request`` returns ``((data, server.socket), client_address)``; the
    handler gets ``packet``, ``socket``, ``rfile`` and ``wfile`` from it."""
    seen = {}

    class Inspect(ss.DatagramRequestHandler):
        def handle(self):
            seen.update(
                request=self.request,
                packet=self.packet,
                socket=self.socket,
                client_address=self.client_address,
                line=self.rfile.readline(),
                rest=self.rfile.read(),
            )
            self.wfile.write(b"one ")
            self.wfile.write(b"datagram")

    with ss.UDPServer(ANY_PORT, Inspect) as server, client_for(server) as client:
        client.send(b"first\nsecond")
        request, address = server.get_request()
        assert request == (b"first\nsecond", server.socket)
        assert address == client.getsockname()
        client.send(b"line\nrest")
        server.timeout = WAIT
        server.handle_request()
        assert client.recv(100) == b"one datagram"
        assert seen["client_address"] == client.getsockname()
    assert seen["request"] == (b"line\nrest", server.socket)
    assert seen["packet"] == b"line\nrest"
    assert seen["socket"] is server.socket
    assert (seen["line"], seen["rest"]) == (b"line\n", b"rest")


# -- echo ------------------------------------------------------------------------


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
@pytest.mark.parametrize("kind", KINDS)
def test_echo(ss, kind, threading_, unix_path):
    seen = []
    with datagram_server(ss, kind, threading_, echo_handler(ss, seen), unix_path) as server:
        with serve_in_thread(server):
            for n in range(2):
                bind_path = f"{unix_path}.client{n}" if kind == "unix" else None
                with client_for(server, bind_path) as client:
                    for i in range(20):
                        payload = b"datagram %d-%d " % (n, i) * (1 + i * 30)
                        assert exchange(client, payload) == payload
                    assert exchange(client, b"") == b""
                    address = client.getsockname()
                assert seen[-21:] == [address] * 21
    if kind == "unix":
        assert address == f"{unix_path}.client1"
    else:
        assert address[0] in ("127.0.0.1", "::1")


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_handle_request_and_timeout(ss, threading_):
    timeouts = []

    class Server(ss.ThreadingUDPServer if threading_ else ss.UDPServer):
        timeout = 0.05

        def handle_timeout(self):
            timeouts.append(True)

    with Server(ANY_PORT, echo_handler(ss)) as server, client_for(server) as client:
        server.handle_request()
        assert timeouts == [True]
        client.send(b"ping")
        server.timeout = WAIT
        server.handle_request()
        assert client.recv(100) == b"ping"
        assert timeouts == [True]


def test_verify_request_filters_datagrams(ss):
    handled = []

    class Server(ss.UDPServer):
        def verify_request(self, request, client_address):
            return not request[0].startswith(b"deny")

    class Handler(ss.DatagramRequestHandler):
        def handle(self):
            handled.append(self.packet)
            self.wfile.write(self.packet)

    with Server(ANY_PORT, Handler) as server, serve_in_thread(server):
        with client_for(server) as client:
            client.send(b"deny me")
            assert exchange(client, b"allow me") == b"allow me"
    assert handled == [b"allow me"]


def test_overridden_get_request(ss):
    """A subclass reading datagrams its own way keeps working."""

    class Prefixing(ss.UDPServer):
        def get_request(self):
            data, client_address = self.socket.recvfrom(self.max_packet_size)
            return (b"got:" + data, self.socket), client_address

    with Prefixing(ANY_PORT, echo_handler(ss)) as server, serve_in_thread(server):
        with client_for(server) as client:
            assert exchange(client, b"x") == b"got:x"


# -- dispatch: one at a time, or on threads ---------------------------------------


def test_sync_server_leaves_waiting_datagrams_in_the_kernel(ss):
    """While a sync handler runs, later datagrams stay unread in the socket buffer."""
    release = threading.Event()
    entered = threading.Event()
    handled = []

    class Blocking(ss.DatagramRequestHandler):
        def handle(self):
            handled.append(self.packet)
            entered.set()
            release.wait(WAIT)
            self.wfile.write(self.packet)

    with ss.UDPServer(ANY_PORT, Blocking) as server, serve_in_thread(server):
        with client_for(server) as client:
            client.send(b"0")
            assert entered.wait(WAIT)
            for i in range(1, 4):
                client.send(b"%d" % i)
            # Nobody has read them: the server's socket is still readable.
            readable, _, _ = select.select([server.socket], [], [], WAIT)
            assert readable == [server.socket]
            assert handled == [b"0"]
            release.set()
            assert [client.recv(10) for _ in range(4)] == [b"0", b"1", b"2", b"3"]
    assert handled == [b"0", b"1", b"2", b"3"]


def test_threading_handlers_run_concurrently(ss):
    concurrency = 4
    barrier = threading.Barrier(concurrency, timeout=WAIT)

    class Meeting(ss.DatagramRequestHandler):
        def handle(self):
            barrier.wait()  # only returns once all of them run at the same time
            self.wfile.write(self.packet)

    with ss.ThreadingUDPServer(ANY_PORT, Meeting) as server, serve_in_thread(server):
        with client_for(server) as client:
            for i in range(concurrency):
                client.send(b"%d" % i)
            replies = sorted(client.recv(10) for _ in range(concurrency))
    assert replies == [b"%d" % i for i in range(concurrency)]


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_burst_is_served_whole(ss, threading_):
    """A burst sent without waiting (well within the kernel's receive buffer):
    every datagram is handled and answered, none lost between kernel and handler."""
    burst = 100

    with datagram_server(ss, "udp", threading_, echo_handler(ss), None) as server:
        with serve_in_thread(server), client_for(server) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            for i in range(burst):
                client.send(b"%03d" % i)
            replies = sorted(client.recv(10) for _ in range(burst))
    assert replies == [b"%03d" % i for i in range(burst)]


@pytest.mark.parametrize("kind", ["udp", "unix"])
def test_threaded_replies_under_load(ss, kind, unix_path):
    """Many handler threads replying on the one socket while datagrams keep
    arriving: every reply reaches its own client, whole and unmixed."""
    clients, per_client = 8, 60
    counted = []
    lock = threading.Lock()

    class Tagging(ss.DatagramRequestHandler):
        def handle(self):
            with lock:
                counted.append(1)
            time.sleep(0)  # let other handler threads interleave their sendto()
            self.wfile.write(b"re:" + self.packet)

    def client_loop(server, n):
        bind_path = f"{unix_path}.c{n}" if kind == "unix" else None
        with client_for(server, bind_path) as client:
            for i in range(per_client):
                payload = b"client %d datagram %d " % (n, i) * 20
                reply = exchange(client, payload)
                assert reply == b"re:" + payload, (n, i, reply[:40])
        return per_client

    with datagram_server(ss, kind, True, Tagging, unix_path) as server:
        with serve_in_thread(server):
            runs = [run_in_thread(client_loop, server, n) for n in range(clients)]
            results = [run.join(4 * WAIT) for run in runs]
    for result in results:
        if result.error is not None:
            raise result.error
    assert sum(result.value for result in results) == clients * per_client
    assert len(counted) == clients * per_client


# -- the logging cookbook's receiver ----------------------------------------------


def log_record_handler(ss, received):
    """The logging cookbook's receiver: each datagram is a 4-byte length and a
    pickled ``LogRecord.__dict__`` (what ``logging.handlers.DatagramHandler`` sends)."""

    class LogRecordDatagramHandler(ss.DatagramRequestHandler):
        def handle(self):
            (length,) = struct.unpack(">L", self.packet[:4])
            attributes = pickle.loads(self.packet[4 : 4 + length])
            received.append(logging.makeLogRecord(attributes))

    return LogRecordDatagramHandler


def send_log_records(address, count, received, name):
    """Log ``count`` records through a ``DatagramHandler`` to ``address``, at most
    16 ahead of what the server has received (a pace the kernel never drops at)."""
    host, port = address if isinstance(address, tuple) else (address, None)
    sender = logging.handlers.DatagramHandler(host, port)
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(sender)
    try:
        for i in range(count):
            logger.info("record %d of %s", i, "many", extra={"sequence": i})
            if i % 16 == 15:
                assert wait_until(lambda i=i: len(received) > i, WAIT)
    finally:
        logger.removeHandler(sender)
        sender.close()
    assert wait_until(lambda: len(received) == count, WAIT), len(received)


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_logging_cookbook_receiver(ss, threading_):
    received = []
    count = 300
    handler = log_record_handler(ss, received)
    with datagram_server(ss, "udp", threading_, handler, None) as server:
        with serve_in_thread(server):
            send_log_records(server.server_address, count, received, f"dgram.{ss.__name__}")
    assert sorted(record.sequence for record in received) == list(range(count))
    assert {record.getMessage() for record in received} == {
        f"record {i} of many" for i in range(count)
    }
    assert all(record.levelno == logging.INFO for record in received)


# -- Unix clients with and without an address -------------------------------------


def test_unbound_unix_client_address(ss, unix_path):
    """An unbound client's address is ``None`` (``''`` on some systems) for both."""
    seen = []

    class Record(ss.DatagramRequestHandler):
        def handle(self):
            seen.append((self.client_address, self.packet))

    class Quiet(ss.UnixDatagramServer):
        def handle_error(self, request, client_address):
            pass  # the stdlib's finish() fails here; see the next two tests

    with Quiet(unix_path, Record) as server, client_for(server) as client:
        client.send(b"anonymous")
        server.timeout = WAIT
        server.handle_request()
    assert seen in ([(None, b"anonymous")], [("", b"anonymous")])


def test_unbound_unix_client_stdlib_fails_in_finish(unix_path):
    """The reference behaviour we deliberately differ from: the stdlib's
    ``finish()`` calls ``sendto(reply, None)``, and ``handle_error`` gets the
    ``TypeError`` (``OSError`` where the address is ``''``) for every datagram."""
    errors = []

    class Server(socketserver.UnixDatagramServer):
        def handle_error(self, request, client_address):
            errors.append((client_address, sys.exc_info()[0]))

    with Server(unix_path, socketserver.DatagramRequestHandler) as server:
        with client_for(server) as client:
            client.send(b"anonymous")
            server.timeout = WAIT
            server.handle_request()
    assert errors in ([(None, TypeError)], [("", OSError)])


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_unbound_unix_client_reply_is_skipped(tx, threading_, unix_path, caplog):
    """Ours: no reply can reach an unbound client, so none is sent; a non-empty
    reply dropped that way is logged once per server; nothing reaches handle_error."""
    errors = []
    handled = []

    class Server(server_class(tx, "unix", threading_)):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    class MaybeReply(tx.DatagramRequestHandler):
        def handle(self):
            handled.append(self.packet)
            if self.packet.startswith(b"reply"):
                self.wfile.write(b"lost")

    caplog.set_level(logging.WARNING, logger="txsocketserver")
    with Server(unix_path, MaybeReply) as server, serve_in_thread(server):
        with client_for(server) as anonymous:
            for payload in (b"silent", b"reply 1", b"reply 2"):
                anonymous.send(payload)
        with client_for(server, f"{unix_path}.bound") as bound:
            # A bound client still gets its reply, after the unbound ones ran.
            assert exchange(bound, b"reply 3") == b"lost"
    assert sorted(handled) == [b"reply 1", b"reply 2", b"reply 3", b"silent"]
    assert errors == []
    warnings = [r for r in caplog.records if "unbound Unix socket" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "4-byte reply was dropped" in warnings[0].getMessage()


def test_logging_receiver_with_unbound_unix_sender(tx, unix_path):
    """``DatagramHandler`` on a Unix path sends from an unbound socket; on our
    server every record arrives and nothing is reported as an error."""
    received = []
    errors = []

    class Server(tx.UnixDatagramServer):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    with Server(unix_path, log_record_handler(tx, received)) as server:
        with serve_in_thread(server):
            send_log_records(unix_path, 50, received, "dgram.unix")
    assert sorted(record.sequence for record in received) == list(range(50))
    assert errors == []


# -- truncation --------------------------------------------------------------------


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
@pytest.mark.parametrize("kind", ["udp", "unix"])
def test_long_datagram_truncated_like_stdlib(ss, kind, threading_, unix_path):
    received = []

    class Record(ss.DatagramRequestHandler):
        def handle(self):
            received.append(self.packet)
            self.wfile.write(b"%d" % len(self.packet))

    with datagram_server(ss, kind, threading_, Record, unix_path, max_packet_size=100) as server:
        with serve_in_thread(server):
            bind_path = f"{unix_path}.client" if kind == "unix" else None
            with client_for(server, bind_path) as client:
                long = bytes(range(256)) * 4
                assert exchange(client, long) == b"100"
                assert exchange(client, b"x" * 100) == b"100"
                assert exchange(client, b"short") == b"5"
    assert received == [long[:100], b"x" * 100, b"short"]


def test_truncation_counted_and_logged_once(tx, caplog):
    caplog.set_level(logging.WARNING, logger="txsocketserver")

    class Small(tx.UDPServer):
        max_packet_size = 10

    with Small(ANY_PORT, echo_handler(tx)) as server, serve_in_thread(server):
        assert server.truncated_datagrams == 0
        with client_for(server) as client:
            assert exchange(client, b"0123456789") == b"0123456789"  # fits exactly
            assert server.truncated_datagrams == 0
            assert exchange(client, b"0123456789abc") == b"0123456789"
            assert exchange(client, b"ok") == b"ok"
            assert exchange(client, b"z" * 5000) == b"z" * 10
            client_address = client.getsockname()
        assert server.truncated_datagrams == 2
    assert tx.UDPServer.truncated_datagrams == 0
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "max_packet_size (10 bytes)" in message
    assert repr(client_address) in message
    assert warnings[0].name == "txsocketserver"


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_handler_error_goes_to_handle_error_and_next_datagram_is_served(ss, threading_):
    errors = []

    class Server(ss.ThreadingUDPServer if threading_ else ss.UDPServer):
        def handle_error(self, request, client_address):
            errors.append((request[0], client_address, sys.exc_info()[0]))

    class Fragile(ss.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(b"partial")
            if self.packet == b"boom":
                raise ValueError("handler failed")
            self.wfile.write(b" and whole")

    with Server(ANY_PORT, Fragile) as server, serve_in_thread(server):
        with client_for(server) as client:
            # finish() runs even when handle() raised: what was written is sent.
            assert exchange(client, b"boom") == b"partial"
            assert exchange(client, b"fine") == b"partial and whole"
            assert exchange(client, b"boom") == b"partial"
            address = client.getsockname()
    assert errors == [(b"boom", address, ValueError)] * 2


def test_default_handle_error_prints_traceback(ss, capsys):
    class Fragile(ss.DatagramRequestHandler):
        def handle(self):
            raise ValueError("handler failed")

    with ss.UDPServer(ANY_PORT, Fragile) as server, client_for(server) as client:
        client.send(b"boom")
        server.timeout = WAIT
        server.handle_request()
        assert client.recv(10) == b""
    err = capsys.readouterr().err
    assert "Exception occurred during processing of request from" in err
    assert "ValueError: handler failed" in err


def test_bind_udp_port_in_use(ss):
    warm_up(ss)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(ANY_PORT)
        fds = fd_count()
        with pytest.raises(OSError) as info:
            ss.UDPServer(taken.getsockname(), ss.DatagramRequestHandler)
        assert info.value.errno == errno.EADDRINUSE
        assert fd_count() == fds


@pytest.mark.parametrize(
    "address, exception",
    [(("no-such-host.invalid", 0), socket.gaierror), (("127.0.0.1", 70000), OverflowError)],
)
def test_bind_bad_address(ss, address, exception):
    warm_up(ss)
    fds = fd_count()
    with pytest.raises(exception):
        ss.UDPServer(address, ss.DatagramRequestHandler)
    assert fd_count() == fds


def test_bind_existing_unix_path(ss, unix_path):
    warm_up(ss)
    with ss.UnixDatagramServer(unix_path, ss.DatagramRequestHandler):
        fds = fd_count()
        with pytest.raises(OSError) as info:
            ss.UnixDatagramServer(unix_path, ss.DatagramRequestHandler)
        assert info.value.errno == errno.EADDRINUSE
        assert fd_count() == fds


def test_bind_unix_path_in_missing_directory(ss, unix_path):
    with pytest.raises(FileNotFoundError):
        ss.UnixDatagramServer(os.path.join(unix_path, "missing", "sock"), None)


# -- shutdown and resources --------------------------------------------------------


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
@pytest.mark.parametrize("kind", ["udp", "unix"])
def test_shutdown_while_datagrams_in_flight(ss, kind, threading_, unix_path):
    """Datagrams keep arriving while the server shuts down and closes: no error,
    every handler that started finishes, nothing is left behind."""
    warm_up(ss)
    fds, threads = fd_count(), thread_count()
    started = []
    finished = []
    stop_sending = threading.Event()

    class Slowish(ss.DatagramRequestHandler):
        def handle(self):
            started.append(1)
            time.sleep(0.005)
            self.wfile.write(self.packet)
            finished.append(1)

    def flood(address, family):
        sent = 0
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            while not stop_sending.is_set():
                try:
                    sock.sendto(b"in flight", address)
                    sent += 1
                except OSError:
                    pass  # buffer full, or the server is gone: keep going
                time.sleep(0.0005)
        return sent

    with datagram_server(ss, kind, threading_, Slowish, unix_path) as server:
        sender = run_in_thread(flood, server.server_address, server.address_family)
        with serve_in_thread(server) as serving:
            assert wait_until(lambda: len(started) >= 20)
            call_shutdown = run_in_thread(server.shutdown)
            call_shutdown.join()
            assert serving.done.wait(WAIT)
    # Closed (block_on_close): every started handler ran to its end.
    assert len(finished) == len(started)
    stop_sending.set()
    assert sender.join().error is None
    settle_resources(fds, threads)


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_fds_and_threads_back_to_baseline(ss, threading_, unix_path):
    warm_up(ss)
    fds, threads = fd_count(), thread_count()

    class Server(ss.ThreadingUDPServer if threading_ else ss.UDPServer):
        def handle_error(self, request, client_address):
            pass

    class Sometimes(ss.DatagramRequestHandler):
        def handle(self):
            if self.packet == b"fail":
                raise RuntimeError("expected")
            self.wfile.write(self.packet)

    for round_ in range(3):
        with Server(ANY_PORT, Sometimes) as server, serve_in_thread(server):
            with client_for(server) as client:
                for i in range(10):
                    assert exchange(client, b"fail") == b""
                    assert exchange(client, b"%d" % i) == b"%d" % i
        path = f"{unix_path}.{round_}"
        with datagram_server(ss, "unix", threading_, echo_handler(ss), path) as server:
            with serve_in_thread(server), client_for(server, path + ".c") as client:
                assert exchange(client, b"unix") == b"unix"
    settle_resources(fds, threads)
