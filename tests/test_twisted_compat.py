"""Each assumption ``txsocketserver._twisted.compat`` makes about Twisted's private
API, checked against the installed Twisted: a release that breaks one fails here,
by name, instead of quietly moving an endpoint off the socket path."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import endpoints, reactor

from txsocketserver._twisted import compat
from txsocketserver._twisted.endpoints import Endpoint, listening_socket


def parsed(description: str) -> object:
    return endpoints.serverFromString(reactor, description)


def test_tcp_parameters_read_what_the_description_says() -> None:
    got = compat.tcp_parameters(parsed("tcp:8123:interface=127.0.0.2:backlog=17"))
    assert got == (8123, "127.0.0.2", 17)
    assert compat.tcp_parameters(parsed("tcp6:8124:interface=\\:\\:1")) == (8124, "::1", 50)


def test_unix_parameters_read_what_the_description_says(tmp_path) -> None:
    path = str(tmp_path / "s.sock")
    got = compat.unix_parameters(parsed(f"unix:{path}:mode=600:backlog=9:lockfile=0"))
    assert got == (path, 9, 0o600, False)
    assert compat.unix_parameters(parsed(f"unix:{path}")).lockfile is True


def test_ssl_options_bind_to_twisteds_own_parser(tls_cert) -> None:
    chosen = compat.ssl_description_options(
        f"ssl:8125:privateKey={tls_cert.key_path}:certKey={tls_cert.cert_path}:interface=127.0.0.1"
    )
    assert chosen is not None
    assert chosen["port"] == "8125"
    assert chosen["privateKey"] == tls_cert.key_path
    assert chosen["certKey"] == tls_cert.cert_path
    assert chosen["interface"] == "127.0.0.1"
    assert set(chosen) >= {"extraCertChain", "dhParameters", "sslmethod", "backlog"}
    defaults = compat.ssl_description_options("ssl:8125")
    assert defaults is not None and defaults["certKey"] is None  # Twisted's: the privateKey file
    assert compat.ssl_description_options("ssl:8125:noSuchOption=1") is None
    assert compat.ssl_description_options("tcp:8125") is None


def test_other_endpoint_types_are_not_read() -> None:
    # A subclass may listen differently: only the exact types are read.
    class Custom(endpoints.TCP4ServerEndpoint):
        pass

    assert compat.tcp_parameters(Custom(reactor, 0)) is None
    assert compat.unix_parameters(Custom(reactor, 0)) is None


@pytest.mark.parametrize(
    ("description", "family"),
    [("tcp:0:interface=127.0.0.1", socket.AF_INET), ("tcp6:0:interface=\\:\\:1", socket.AF_INET6)],
)
def test_socket_descriptions_stay_on_the_socket_path(description: str, family: int) -> None:
    # What decides between a real socket (and forking) and the socket facade.
    listening = listening_socket(Endpoint(description))
    assert listening is not None and listening.family == family


def test_ssl_descriptions_stay_on_the_socket_path(tls_cert) -> None:
    listening = listening_socket(
        Endpoint(f"ssl:0:privateKey={tls_cert.key_path}:certKey={tls_cert.cert_path}")
    )
    assert listening is not None and listening.tls is not None


def test_haproxy_endpoints_are_unwrapped() -> None:
    # If Twisted renames the wrapper endpoint's attributes, haproxy: would
    # fall back to Twisted's own wrapper (no deadline, no half-close).
    wrapped = compat.proxied_endpoint(parsed("haproxy:tcp:0:interface=127.0.0.1"))
    assert type(wrapped) is endpoints.TCP4ServerEndpoint
    assert compat.tcp_parameters(wrapped) == (0, "127.0.0.1", 50)
    assert compat.proxied_endpoint(parsed("tcp:0")) is None


def test_a_ports_accept_batch_can_be_capped() -> None:
    # If Twisted renames numberAccepts, silent clients could again take every
    # descriptor before the listener pauses the port.
    from twisted.internet import protocol

    from txsocketserver._twisted.reactor import call_in_reactor

    port = call_in_reactor(lambda: reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1"))
    try:
        assert isinstance(port.numberAccepts, int) and port.numberAccepts > 3
        call_in_reactor(compat.cap_accept_batch, port, 3)
        assert port.numberAccepts == 3
        call_in_reactor(compat.cap_accept_batch, port, 0)
        assert port.numberAccepts == 1
    finally:
        call_in_reactor(port.stopListening)


def test_half_close_is_found_through_wrappers_that_keep_the_bytes() -> None:
    from twisted.internet.testing import StringTransport
    from twisted.protocols import policies, tls

    class TCP(StringTransport):
        def loseWriteConnection(self) -> None:
            self.half_closed = True

    tcp = TCP()
    assert compat.half_close(tcp) == tcp.loseWriteConnection
    passing = policies.ProtocolWrapper(policies.WrappingFactory(None), None)
    passing.transport = tcp
    assert compat.half_close(passing) == tcp.loseWriteConnection
    # TLS transforms the bytes: the TCP half-close below it would cut a record.
    secure = tls.TLSMemoryBIOProtocol.__new__(tls.TLSMemoryBIOProtocol)
    secure.transport = tcp
    found = compat.half_close(secure)
    assert found is None or found.__self__ is secure


def test_a_stream_servers_transport_takes_the_adopted_arguments() -> None:
    # If tcp.Server/unix.Server change their constructor, an accepted async
    # connection could not be adopted.
    import inspect

    for unix in (False, True):
        kind = compat.stream_server_transport(unix)
        parameters = list(inspect.signature(kind.__init__).parameters)[1:7]
        assert parameters == ["sock", "protocol", "client", "server", "sessionno", "reactor"]


def test_what_a_transport_keeps_per_connection_can_be_shared() -> None:
    # tcp.Server.__init__ keeps logstr and repstr per connection (logPrefix
    # and __repr__ return them); if Twisted changes that, the adopted
    # transport's shared replacements would miss it.
    from twisted.internet.error import ConnectionDone
    from twisted.internet.protocol import Protocol
    from twisted.python.failure import Failure

    from txsocketserver._twisted.reactor import call_in_reactor

    def check(unix: bool) -> list[object]:
        ours, theirs = socket.socketpair()
        theirs.close()
        ours.setblocking(False)
        kind = compat.stream_server_transport(unix)
        plain = kind(ours.dup(), Protocol(), ("127.0.0.1", 1), None, 7, reactor)
        kept = [name for name in ("logstr", "repstr") if name in vars(plain)]
        plain.logstr, plain.repstr = "log", "repr"
        seen = [kept, plain.logPrefix(), repr(plain)]
        plain.stopReading()
        plain.connectionLost(Failure(ConnectionDone()))
        shared = type("Shared", (kind,), compat.shared_transport_attributes("prefix", "<r>"))
        transport = shared(ours, Protocol(), ("127.0.0.1", 1), None, 7, reactor)
        seen += [sorted({"logstr", "repstr"} & set(vars(transport)))]
        seen += [transport.logPrefix(), repr(transport), transport.fileno() == ours.fileno()]
        transport.stopReading()
        transport.connectionLost(Failure(ConnectionDone()))
        return [*seen, transport.fileno()]

    for unix in (False, True):
        assert call_in_reactor(check, unix) == [
            ["logstr"],
            "log",
            "repr",
            [],
            "prefix",
            "<r>",
            True,
            -1,
        ]


def test_what_a_transport_holds_queued_is_read_from_its_buffers() -> None:
    # If Twisted renames _tempDataBuffer or _writeDisconnected, a write could
    # overtake queued bytes, or go out after a half-close.
    from twisted.internet.protocol import Protocol

    from txsocketserver._twisted.reactor import call_in_reactor

    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)

        def check() -> list[bool]:
            kind = compat.stream_server_transport(True)
            transport = kind(ours, Protocol(), "peer", None, 1, reactor)
            seen = [compat.nothing_queued(transport), compat.can_send_now(transport)]
            transport._tempDataBuffer.append(b"queued")
            transport._tempDataLen += 6
            seen += [compat.nothing_queued(transport), compat.can_send_now(transport)]
            transport._tempDataBuffer.clear()
            transport._tempDataLen = 0
            transport._writeDisconnected = True
            seen += [compat.nothing_queued(transport), compat.can_send_now(transport)]
            transport.stopReading()
            return seen

        assert call_in_reactor(check) == [True, True, False, False, True, False]
    finally:
        ours.close()
        theirs.close()


def test_the_reactor_disconnects_a_selectable_as_the_multiplexer_does() -> None:
    # If Twisted renames _disconnectSelectable, the read multiplexer is not
    # used (ReadMultiplexer.for_reactor says None) rather than failing.
    disconnect = compat.disconnector(reactor)
    assert disconnect is not None and disconnect.__name__ == "_disconnectSelectable"
    assert list(__import__("inspect").signature(disconnect).parameters)[:3] == [
        "selectable",
        "why",
        "isRead",
    ]


def test_a_tcp_transport_turned_tls_by_starttls_is_not_half_closed(tls_cert) -> None:
    # haproxy:ssl: starts TLS on the TCP transport after the PROXY header;
    # Twisted marks such a transport with TLS = True, and its own
    # loseWriteConnection would shut the TCP stream under the TLS records.
    import threading

    from twisted.internet import protocol

    from txsocketserver._twisted import tls
    from txsocketserver._twisted.reactor import call_in_reactor, hold, release

    config = tls.server_context(
        f"ssl:0:privateKey={tls_cert.key_path}:certKey={tls_cert.cert_path}"
    )
    found: list[object] = []
    done = threading.Event()

    class StartsTLS(protocol.Protocol):
        def connectionMade(self) -> None:
            found.append(compat.half_close(self.transport))
            self.transport.startTLS(config)
            found.append(compat.half_close(self.transport))
            done.set()

    factory = protocol.Factory.forProtocol(StartsTLS)
    hold(factory)  # the port lives between calls into the reactor
    try:
        port = call_in_reactor(lambda: reactor.listenTCP(0, factory, interface="127.0.0.1"))
        try:
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5):
                assert done.wait(5)
        finally:
            call_in_reactor(port.stopListening)
    finally:
        release(factory)
    assert found[0] is not None and found[1] is None


def test_a_spawned_process_is_reaped_when_asked() -> None:
    # The forking template's reaping (``_forking.dispatcher``): with no
    # SIGCHLD handler and no pipe to Twisted, only reap_process notices the
    # exit, and it reaps nothing before.
    import os
    import select
    import sys
    import threading

    from twisted.internet.protocol import ProcessProtocol

    from txsocketserver._twisted import reactor as bridge

    ended = threading.Event()

    class Protocol(ProcessProtocol):
        def processEnded(self, reason: object) -> None:
            ended.set()

    protocol = Protocol()
    stdin_read, stdin_write = os.pipe()
    try:
        bridge.call_in_reactor(
            lambda: bridge.get_reactor().spawnProcess(
                protocol,
                sys.executable,
                [sys.executable, "-c", "import os; os.read(0, 1)"],
                env=None,
                childFDs={0: stdin_read},
            )
        )
    finally:
        os.close(stdin_read)
    transport = protocol.transport
    bridge.call_in_reactor(compat.reap_process, transport)
    assert not ended.is_set(), "reaped while it runs"
    pidfd = os.pidfd_open(transport.pid)
    try:
        os.close(stdin_write)  # end of file: it exits
        assert select.select([pidfd], [], [], 10)[0], "the process did not exit"
    finally:
        os.close(pidfd)
    bridge.call_in_reactor(compat.reap_process, transport)
    assert ended.wait(10)


# -- the blocking world's reactor thread: each in a fresh interpreter, where the
# global reactor may be run, stopped and inspected without another thread's.


def run_isolated(code: str) -> None:
    """Run *code* in a new interpreter; it must print ``ok`` as its last line."""
    import subprocess
    import sys
    import textwrap

    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        timeout=60,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0 and done.stdout.decode().splitlines()[-1:] == ["ok"], output


def test_a_stopped_reactor_is_made_runnable_again() -> None:
    # reactor_was_stopped reads _startedBefore and _started; make_runnable_again
    # resets the first and re-adds the shutdown triggers a stop consumed:
    # the second run's stop() must still end the loop (crash) and disconnect
    # what is registered (disconnectAll).
    run_isolated(
        """
        import socket
        from twisted.internet import reactor
        from txsocketserver._twisted import compat

        assert not compat.reactor_was_stopped(reactor)
        reactor.callWhenRunning(reactor.stop)
        reactor.run()
        assert compat.reactor_was_stopped(reactor)
        compat.make_runnable_again(reactor)
        assert not compat.reactor_was_stopped(reactor)

        ours, theirs = socket.socketpair()
        lost = []

        class Reader:
            def fileno(self):
                return ours.fileno()

            def logPrefix(self):
                return "test"

            def doRead(self):
                pass

            def connectionLost(self, reason):
                lost.append(reason)

        reactor.addReader(Reader())
        reactor.callWhenRunning(reactor.stop)
        reactor.run()
        assert lost, "disconnectAll ran at the second stop"
        assert compat.reactor_was_stopped(reactor)
        ours.close()
        theirs.close()
        print("ok")
        """
    )


def test_reactor_work_tells_idle_closing_and_busy() -> None:
    # _internalReaders (the waker is not work), reapProcessHandlers (a child
    # not yet reaped is), the reactor's pool (a busy thread is), a
    # descriptor's disconnecting flag and a delayed call due (closing, not
    # busy; a call due later is not work).
    run_isolated(
        """
        import socket, sys, threading
        from twisted.internet import protocol, reactor, threads
        from txsocketserver._twisted import compat

        assert compat.reactor_work(reactor) == compat.IDLE
        ours, theirs = socket.socketpair()

        class Reader:
            disconnecting = False
            def fileno(self):
                return ours.fileno()
            def logPrefix(self):
                return "test"
            def doRead(self):
                pass
            def connectionLost(self, reason):
                pass

        reader = Reader()
        reactor.addReader(reader)
        assert compat.reactor_work(reactor) == compat.BUSY
        reader.disconnecting = True
        assert compat.reactor_work(reactor) == compat.CLOSING
        reactor.removeReader(reader)
        assert compat.reactor_work(reactor) == compat.IDLE
        due = reactor.callLater(0, lambda: None)
        assert compat.reactor_work(reactor) == compat.CLOSING
        due.cancel()
        later = reactor.callLater(60, lambda: None)
        assert compat.reactor_work(reactor) == compat.IDLE
        later.cancel()
        ours.close()
        theirs.close()

        seen = {}
        release = threading.Event()

        class Child(protocol.ProcessProtocol):
            def processEnded(self, reason):
                seen["after_child"] = compat.reactor_work(reactor)
                in_pool = threads.deferToThread(release.wait, 10)
                seen["pool_busy"] = compat.reactor_work(reactor)
                release.set()
                in_pool.addCallback(lambda _: reactor.stop())

        def start():
            reactor.spawnProcess(
                Child(), sys.executable, [sys.executable, "-c", "import sys; sys.stdin.read()"],
                childFDs={0: "w", 1: 1, 2: 2},
            )
            seen["child"] = compat.reactor_work(reactor)
            reactor.callLater(0.05, lambda: [t.closeStdin() for t in
                              list(__import__("twisted.internet.process").internet.process.reapProcessHandlers.values())])

        reactor.callWhenRunning(start)
        reactor.run()
        assert seen == {"child": compat.BUSY, "after_child": compat.IDLE,
                        "pool_busy": compat.BUSY}, seen
        print("ok")
        """
    )


def test_the_reactor_thread_pool_is_stopped_and_made_again() -> None:
    # ReactorBase._stopThreadPool: joins the pool's threads and forgets it;
    # the next deferToThread makes a new one.
    run_isolated(
        """
        import threading
        from twisted.internet import reactor, threads
        from txsocketserver._twisted import compat

        seen = []

        def first(_):
            pool = reactor.threadpool
            compat.stop_reactor_thread_pool(reactor)
            seen.append(reactor.threadpool is None and not any(t.is_alive() for t in pool.threads))
            return threads.deferToThread(lambda: 2)

        def main():
            d = threads.deferToThread(lambda: 1).addCallback(first)
            d.addCallback(seen.append).addBoth(lambda _: reactor.stop())

        compat.stop_reactor_thread_pool(reactor)  # none made yet: nothing to do
        reactor.callWhenRunning(main)
        reactor.run()
        assert seen == [True, 2], seen
        print("ok")
        """
    )


def test_the_io_thread_is_read_and_set() -> None:
    import threading

    from twisted.python import threadable

    before = compat.io_thread()
    try:
        compat.set_io_thread(threading.get_ident())
        assert threadable.isInIOThread()
        assert compat.io_thread() == threading.get_ident()
        compat.set_io_thread(None)
        assert not threadable.isInIOThread()
    finally:
        compat.set_io_thread(before)


def test_a_ports_listen_backlog_is_widened() -> None:
    # Port.socket of Twisted's TCP port: listen() again changes the backlog
    # (Linux's TCP_INFO tells the accept queue's limit as tcpi_sacked).
    run_isolated(
        """
        import socket, struct
        from twisted.internet import protocol, reactor
        from txsocketserver._twisted import compat

        def limit(sock):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            return struct.unpack_from("I", info, 28)[0]

        port = reactor.listenTCP(0, protocol.Factory(), backlog=7, interface="127.0.0.1")
        assert limit(port.socket) == 7
        assert compat.widen_listen_backlog(port, 300)
        assert limit(port.socket) == 300
        assert not compat.widen_listen_backlog(object(), 300)
        port.stopListening()
        print("ok")
        """
    )


@pytest.mark.skipif(
    not hasattr(__import__("select"), "EPOLLEXCLUSIVE"), reason="EPOLLEXCLUSIVE is Linux's"
)
def test_a_reader_is_registered_exclusively_in_the_epoll_reactors_set() -> None:
    # exclusive_reader reads EPollReactor's _poller, _reads and _writes: the
    # entry of the reader's fd in the reactor's epoll set (the kernel lists
    # it in the set's fdinfo) gets EPOLLEXCLUSIVE, a second call re-adds it,
    # removeReader still removes it, a writer's fd and a reactor without an
    # epoll set are left alone.
    run_isolated(
        """
        import select, socket
        from twisted.internet import epollreactor
        epollreactor.install()
        from twisted.internet import reactor
        from txsocketserver._twisted import compat

        def mask(fd):
            epfd = reactor._poller.fileno()
            for line in open(f"/proc/self/fdinfo/{epfd}"):
                words = line.split()
                if words[:2] == ["tfd:", str(fd)]:
                    # The kernel adds these two to every entry.
                    return int(words[3], 16) & ~(select.EPOLLERR | select.EPOLLHUP)
            return None

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)

        class Reader:
            def fileno(self):
                return listening.fileno()

            def logPrefix(self):
                return "test"

            def doRead(self):
                pass

            def connectionLost(self, reason):
                pass

        reader = Reader()
        fd = listening.fileno()
        reactor.addReader(reader)
        assert mask(fd) == select.EPOLLIN, mask(fd)
        assert compat.exclusive_reader(reactor, fd)
        assert mask(fd) == select.EPOLLIN | select.EPOLLEXCLUSIVE, mask(fd)
        assert compat.exclusive_reader(reactor, fd)
        assert mask(fd) == select.EPOLLIN | select.EPOLLEXCLUSIVE, mask(fd)
        reactor.removeReader(reader)
        assert mask(fd) is None
        assert not compat.exclusive_reader(reactor, fd)  # not a reader any more

        reactor.addReader(reader)
        reactor.addWriter(reader)
        assert not compat.exclusive_reader(reactor, fd)  # a writer too: left alone
        assert mask(fd) == select.EPOLLIN | select.EPOLLOUT, mask(fd)
        reactor.removeReader(reader)
        reactor.removeWriter(reader)

        class NotEpoll:
            _reads = {fd}
            _writes = set()

        assert not compat.exclusive_reader(NotEpoll(), fd)
        listening.close()
        print("ok")
        """
    )
