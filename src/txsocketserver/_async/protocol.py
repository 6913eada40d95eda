# -*- test-case-name: tests.test_async_protocol -*-
"""``Connection``: the Twisted protocol of one async stream connection.

It owns the connection's reader and writer, is the transport's push producer
(so it learns when the transport's buffer fills and drains), and reports to
its :class:`~txsocketserver._async.serving.AsyncServing` when it starts and
ends.  Behind a ``haproxy:`` endpoint it starts only once the PROXY header has
been parsed, so ``client_address`` is the real client's.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from txsocketserver._async.streams import AsyncReader, AsyncSocket, AsyncWriter
from txsocketserver._core import lifecycle
from txsocketserver._twisted import compat
from txsocketserver._twisted.addresses import socket_address, socket_family, underlying_socket
from txsocketserver._twisted.proxy_protocol import ProxyHeader
from txsocketserver._twisted.proxy_stage import (
    ProxyHeaderPolicy,
    ProxyHeaderStage,
    begin_header_stage,
)

_monotonic = time.monotonic


@implementer(IHalfCloseableProtocol, IPushProducer, IHandshakeListener)
class Connection(Protocol):
    """One connection of an async stream server (reactor thread only).

    Args:
        serving: the server's async strategy.
        client_address: the address ``get_request()`` returned, for a
            connection the server accepted itself; ``None`` to take it from
            the transport (endpoint connections).
        adopted: the accepted socket, for a connection the server accepted itself.
        proxy: read a PROXY protocol header first (``haproxy:``), admitting
            the connection as this policy says (see ``proxy_stage``).
    """

    # What most connections never change, and nothing reads for every chunk
    # of data, is a class attribute, set on the instance only where it
    # differs: each attribute an instance holds costs every idle connection
    # 8 bytes (see docs/async.md, "Limits and costs").  What is read for
    # every chunk stays on the instance only: on CPython 3.11 a class
    # attribute of the same name keeps its reads off the fast path.
    _proxy: ProxyHeaderPolicy | None = None
    _stage: ProxyHeaderStage | None = None
    # What getsockname() gives: the PROXY header's destination, if any.
    _host: Any = None
    #: The PROXY header the connection began with, if any.
    proxy_header: ProxyHeader | None = None
    writer: AsyncWriter | None = None
    request: AsyncSocket | None = None
    task: Any = None
    # How an endpoint connection half-closes (None: it cannot; see half_close).
    _half_close: Any = None
    last_activity = 0.0
    lost = False
    #: Registered as the transport's producer (until the writer is done).
    producing = False
    # Set once the request's handling is over (shutdown_request done).
    request_over = False

    def __init__(
        self,
        serving: Any,
        client_address: Any = None,
        adopted: Any = None,
        proxy: ProxyHeaderPolicy | None = None,
    ) -> None:
        self.serving = serving
        if proxy is not None:
            self._proxy = proxy
        self.client_address = client_address
        # The socket, for a connection the server accepted itself.
        self.adopted = adopted
        self.reader = AsyncReader(self)
        # Set by the serving once the handler starts if nothing but the reader
        # needs the bytes read (no idle_timeout, not observed; a header stage
        # is over by then): dataReceived goes straight to it.
        self.plain = False
        #: Seconds a read or drain may wait (the handler's ``timeout``).
        self.timeout: float | None = None
        self.idle_timer: Any = None
        #: The connection's lifecycle record (``None``: not observed).
        self.record: lifecycle.ConnectionRecord | None = None

    @property
    def half_close(self) -> Any:
        """What half-closes the connection (``None``: it cannot, as over TLS)."""
        if self.adopted is not None:
            # A socket the server accepted itself: a plain TCP or Unix transport.
            return self.transport.loseWriteConnection
        return self._half_close

    # -- IProtocol -------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        server = self.serving.server
        if server._observers:
            peer = self.client_address
            if peer is None:
                peer = socket_address(transport.getPeer())
            self.record = lifecycle.accepted(server, peer, self.client_address)
        self.writer = AsyncWriter(self)
        transport.registerProducer(self, True)
        self.producing = True
        adopted = self.adopted
        if adopted is not None:
            # A socket the server accepted itself: a plain TCP or Unix
            # transport, nothing to look through.
            self._start(self.serving.family, adopted)
            return
        self._half_close = compat.half_close(transport)
        if self._proxy is None:
            self._start()
            return
        self._stage = begin_header_stage(
            transport, self._proxy, self.serving.reactor, self._proxied_by, self.record
        )

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        """TLS started by the header stage is established (``IHandshakeListener``)."""
        if self._stage is not None:
            self._stage.tls_established()

    def _proxied_by(self, header: ProxyHeader | None) -> None:
        self.proxy_header = header
        if self._stage is not None and self._proxy is not None and self._proxy.tls is not None:
            # TLS began on the transport since connectionMade: half-closing
            # is now the TLS layer's business.
            self._half_close = compat.half_close(self.transport)
        if header is not None and header.family is not None:
            self.client_address = header.source
            self._host = header.destination
            self._start(header.family, underlying_socket(self.transport))
        else:
            self._start()

    def _start(self, family: int | None = None, os_socket: Any = None) -> None:
        transport = self.transport
        if family is None:
            peer = transport.getPeer()
            family = socket_family(peer)
            os_socket = underlying_socket(transport)
            if self.client_address is None:
                self.client_address = socket_address(peer)
        self.request = AsyncSocket(
            self, family=family, peer=self.client_address, host=self._host, os_socket=os_socket
        )
        record = self.record
        if record is not None:
            record.client_address = self.client_address
            record.bytes_received = record.bytes_sent = 0
            if ISSLTransport.providedBy(transport):
                lifecycle.add_detail(record, "tls", True)
        self.serving.connection_started(self)

    def dataReceived(self, data: bytes) -> None:
        if self.plain:
            self.reader.feed(data)
            return
        if self._stage is not None and self._stage.active:
            data = self._stage.feed(data)
            if not data:
                return
        self.last_activity = _monotonic()
        if self.record is not None:
            self.record.bytes_received += len(data)  # type: ignore[operator]
        self.reader.feed(data)

    def readConnectionLost(self) -> None:
        if self._stage is not None and self._stage.read_lost():
            return
        self.reader.feed_eof()

    def writeConnectionLost(self) -> None:
        """Only after our own half-close: nothing to do."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._stage is not None:
            self._stage.connection_lost(reason)
        self.lost = True
        reset = not self._clean_end(reason)
        record = self.record
        if record is not None:
            if type(reason.value).__module__.startswith("OpenSSL") and not (
                record.outcome.startswith("refused:")
            ):
                # Twisted's TLS reports a failed handshake (or a TLS error) so.
                lifecycle.refused(record, lifecycle.TLS_HANDSHAKE)
            elif reset and not self.request_over:
                lifecycle.reset(record)
            if record.started is None:
                # It never reached a handler (refused, or gone in its
                # header stage): its lifecycle ends here.
                lifecycle.ended(record)
        # The writer first: a handler woken by the reader finds it lost.
        if self.writer is not None:
            self.writer._lost_now(reset)
        self.reader.feed_eof(reset=reset)
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None
        self.serving.connection_lost(self)
        if self.task is None or self.request_over:
            self.release()

    def _clean_end(self, reason: Failure) -> bool:
        # Over TLS a TCP close without close_notify is reported as
        # ConnectionLost, like a reset; most clients close that way, so it
        # reads as EOF (the ssl module's suppress_ragged_eofs).  isinstance,
        # not Failure.check: that one compares qualified names, once per class.
        error = reason.value
        if isinstance(error, ConnectionDone):
            return True
        return isinstance(error, ConnectionLost) and ISSLTransport.providedBy(self.transport)

    # -- IPushProducer: the transport's buffer filled / drained ----------------------------

    def pauseProducing(self) -> None:
        if self.writer is not None:
            self.writer.pause()

    def resumeProducing(self) -> None:
        if self.idle_timer is not None:
            self.last_activity = _monotonic()
        if self.writer is not None:
            self.writer.resume()

    def stopProducing(self) -> None:
        """connectionLost follows, and tells the writer."""

    # -- for the streams and the strategy ----------------------------------------------------

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if not self.lost:
            self.transport.resumeProducing()

    def local_address(self) -> Any:
        return socket_address(self.transport.getHost())

    def call_later(self, delay: float, function: Any, *args: Any) -> Any:
        return self.serving.reactor.callLater(delay, function, *args)

    def cancel_handler(self) -> None:
        self.serving.call_soon(self._cancel)

    def _cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def ended(self) -> None:
        """The request's handling is over: release the connection once it is lost too."""
        if self.request_over:
            return
        self.request_over = True
        if self.lost:
            self.release()

    def release(self) -> None:
        """Cut the links back from this connection to its streams and handler.

        They refer to it and it to them; with its side cut, reference
        counting frees them all once the handler's objects are unreferenced,
        instead of leaving cycles for the garbage collector, whose passes cost
        more per connection than serving it.  Called once the connection is
        lost and its request over: nothing reads or writes through it then
        (the streams keep their own references, so a handler kept alive
        still finds them closed).
        """
        self.reader = self.writer = self.request = None  # type: ignore[assignment]
        self.task = None
