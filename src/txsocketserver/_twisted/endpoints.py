# -*- test-case-name: tests.test_endpoints -*-
"""Twisted endpoints as server addresses: :class:`Endpoint`, and the listener Twisted feeds.

:func:`listening_socket` tells which endpoints are nothing but a listening
socket (``tcp:``, ``tcp6:``, ``unix:``, ``ssl:``: served on the server's own
socket, ``_twisted.listeners``); every other endpoint (``haproxy:``,
``systemd:``, endpoint objects) gets an :class:`EndpointListener`, whose
port accepts on the reactor thread and queues each connection, as a socket
facade, for ``get_request()`` (the path is told in ``docs/architecture.md``).

The listener's local rules:

* The queue is the listen backlog: a connection holds one of
  ``request_queue_size`` slots from the moment it is accepted (a PROXY header
  stage included) until ``get_request()`` takes it; at the cap the port stops
  accepting, and the accept batch Twisted takes per read is capped to the
  free slots.  While every slot is taken, a connection that has not finished
  its header within :data:`HEADER_TIMEOUT_WHEN_FULL` seconds is closed to make
  room, so silent clients cannot lock the others out.
* ``haproxy:`` endpoints are served on the endpoint they wrap, by our own
  header stage (``proxy_stage``), not by Twisted's wrapper.
* The port, the factory and the protocols belong to the reactor thread; the
  queue is shared under one lock; ``get_request`` runs in the serving thread;
  ``close()`` may be called from any thread.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from txsocketserver._core import lifecycle
from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.addresses import SocketAddress, socket_address, socket_family
from txsocketserver._twisted.interfaces import IListener, IRequestReadiness
from txsocketserver._twisted.proxy_protocol import DEFAULT_TRUSTED_PROXIES, TrustedProxies
from txsocketserver._twisted.transport_socket import (
    ProxyHeaderPolicy,
    TransportSocket,
    TransportSocketProtocol,
    bad_file_descriptor,
)

if TYPE_CHECKING:
    from txsocketserver._twisted.tls import TLSConfig

_T = TypeVar("_T")

#: Seconds ``server_close()`` waits for the connections its handlers closed to
#: finish sending (a transport closes asynchronously, after its buffer drains).
CLOSE_FLUSH_TIMEOUT = 5.0

#: Seconds a connection may take to complete its PROXY header (from accept),
#: unless the server's ``header_timeout`` says otherwise.  A proxy sends the
#: header with its first segment, so this only ever cuts off stalled peers.
DEFAULT_HEADER_TIMEOUT = 10.0
#: While every slot (``request_queue_size``) is taken, connections older than
#: this that are still in their header stage are closed to let others in.
HEADER_TIMEOUT_WHEN_FULL = 0.25


# What Twisted's TLS needs (its ``tls`` extra), which ours installs.
TLS_EXTRA_MODULES = frozenset({"OpenSSL", "service_identity"})


class ListenerOptions(NamedTuple):
    """The listener options of a description, checked: ``ipv6_only``
    (``tcp6:...:ipv6only=1``, ``None``: the system's default), and a Unix
    socket file's owner and group (uid, gid; -1: unchanged)."""

    ipv6_only: bool | None = None
    owner: int = -1
    group: int = -1


class Endpoint:
    """A Twisted server endpoint, used as a stream server's ``server_address``.

    ``TCPServer(Endpoint("ssl:8443:privateKey=key.pem:certKey=cert.pem"), Handler)``
    serves ``Handler`` over TLS; every stream server class (``TCPServer``,
    ``UnixStreamServer``, their threading and forking variants, subclasses)
    accepts one.  For the ``TCPServer`` family a ``str`` containing ``":"`` is
    read as an endpoint description too (``TCPServer("tcp:8000", Handler)``);
    for ``UnixStreamServer`` a ``str`` stays a socket path, so wrap it.

    Args:
        endpoint: an endpoint description for
            ``twisted.internet.endpoints.serverFromString`` (``"tcp:8000"``,
            ``"tcp6:8000:interface=\\:\\:1"``, ``"unix:/run/app.sock"``,
            ``"ssl:8443:privateKey=key.pem:certKey=cert.pem"``,
            ``"systemd:domain=INET:index=0"``, ``"haproxy:tcp:8080"``), or an
            ``IStreamServerEndpoint`` object.

    Error handling:
        ``ValueError`` for a description Twisted cannot parse (unknown type,
        bad argument, unreadable certificate), raised when the server is
        created; for an ``ssl:`` description without the TLS libraries
        (pyOpenSSL, service_identity), a ``ValueError`` saying to install
        ``txsocketserver[tls]``.
    """

    # For an ``ssl:`` (or ``haproxy:ssl:``) description: its TLS, set by
    # resolve() (None until then, and for every other endpoint).
    _tls_config: TLSConfig | None = None
    # haproxy:ssl:: the TLS begins after the PROXY header (what HAProxy's
    # send-proxy sends to a TLS server), not under it as Twisted has it.
    _tls_after_proxy: bool = False
    # Our listener options (ipv6only=, owner=, group=), set by resolve().
    _listener_options: ListenerOptions = ListenerOptions()
    # ssl: with our TLS: the TCP endpoint under it.
    _plain: IStreamServerEndpoint | None = None

    def __init__(self, endpoint: str | IStreamServerEndpoint) -> None:
        if isinstance(endpoint, str):
            self.description: str | None = endpoint
            self._endpoint: IStreamServerEndpoint | None = None
        elif IStreamServerEndpoint.providedBy(endpoint):
            self.description = None
            self._endpoint = endpoint
        else:
            raise TypeError(
                f"Endpoint() takes a description string or an IStreamServerEndpoint, "
                f"not {type(endpoint).__name__}"
            )

    def __repr__(self) -> str:
        shown = self.description if self.description is not None else self._endpoint
        return f"Endpoint({shown!r})"

    def resolve(self, reactor: Any = None) -> IStreamServerEndpoint:
        """The endpoint object, parsing the description (once) if need be.

        Error handling:
            ``ValueError`` naming the description if Twisted cannot parse it.
        """
        if self._endpoint is None:
            assert self.description is not None
            # Imported here: it loads pyOpenSSL and cryptography (some 18 MB),
            # which every process importing txsocketserver would pay for,
            # forking servers' children included.
            from twisted.internet.endpoints import serverFromString

            from txsocketserver._twisted import tls

            reactor = reactor or _reactor.get_reactor()
            try:
                twisted_description, _ = tls.split_description(self.description)
                twisted_description, self._listener_options = listener_options(twisted_description)
                if self.description.startswith("fd:"):
                    resolved = inherited_descriptor(reactor, self.description)
                else:
                    resolved = serverFromString(reactor, twisted_description)
                self._endpoint = self._with_our_tls(reactor, resolved)
            except Exception as exc:
                missing = exc.name if isinstance(exc, ImportError) else None
                if missing and missing.partition(".")[0] in TLS_EXTRA_MODULES:
                    raise ValueError(
                        f"endpoint description {self.description!r} needs TLS support "
                        f"({missing} is not installed): pip install 'txsocketserver[tls]'"
                    ) from exc
                raise ValueError(f"bad endpoint description {self.description!r}: {exc}") from exc
        return self._endpoint

    def _with_our_tls(self, reactor: Any, resolved: IStreamServerEndpoint) -> Any:
        """*resolved*, its TLS made from our :class:`~txsocketserver._twisted.tls.TLSConfig`
        when the description is ``ssl:`` or ``haproxy:ssl:`` (Twisted's own
        parser knows none of our options, and reads a PROXY header inside TLS)."""
        from twisted.internet import endpoints

        from txsocketserver._twisted import compat, tls

        assert self.description is not None
        inner = proxy_protocol_endpoint(resolved)
        under = resolved if inner is None else inner
        if type(under) is not endpoints.SSL4ServerEndpoint:
            return resolved
        config = tls.server_context(self.description)
        if config is None:
            return resolved  # an sslmethod Twisted's TLS serves, not ours
        self._tls_config = config
        tcp = compat.tcp_parameters(under)
        assert tcp is not None
        plain = endpoints.TCP4ServerEndpoint(reactor, tcp.port, tcp.backlog, tcp.interface)
        if inner is None:
            # What a listener that runs the handshake itself listens on.
            self._plain = plain
            return endpoints.SSL4ServerEndpoint(
                reactor, tcp.port, config, tcp.backlog, tcp.interface
            )
        from twisted.protocols.haproxy import proxyEndpoint

        self._tls_after_proxy = True
        return proxyEndpoint(plain)

    def begin_tls_after_proxy(self, description: str) -> None:
        """Run TLS after each connection's PROXY header, made from the ``ssl:``
        *description*'s options: ``haproxy:ssl:`` where the socket is adopted
        (a ``--workers`` worker serves it as ``haproxy:systemd:...``).  Call
        before the endpoint listens.

        Error handling:
            ``ValueError`` naming the option or file that is wrong.
        """
        from txsocketserver._twisted import tls

        config = tls.server_context(description)
        if config is None:
            raise ValueError(f"{description!r}: this sslmethod cannot follow a PROXY header")
        self._tls_config = config
        self._tls_after_proxy = True

    def _staged(self) -> tuple[IStreamServerEndpoint, bool]:
        """Where a listener fed by Twisted listens for this endpoint, and
        whether each connection begins with our stage (``proxy_stage``: a
        PROXY header, a TLS handshake of our policy, or both)."""
        resolved = self.resolve()
        inner = proxy_protocol_endpoint(resolved)
        if inner is not None:
            return inner, True
        if self._plain is not None:
            return self._plain, True
        return resolved, False

    def _stage_policy(self, trusted: TrustedProxies, timeout: float | None) -> ProxyHeaderPolicy:
        """The stage of a connection arriving now (see :meth:`staged`)."""
        return ProxyHeaderPolicy(
            trusted,
            timeout,
            tls=self._tls_config if (self._tls_after_proxy or self._plain is not None) else None,
            header=proxy_protocol_endpoint(self.resolve()) is not None,
        )


#: Options txsocketserver adds to Twisted's descriptions, by endpoint type.
LISTENER_OPTIONS = {"tcp6": ("ipv6only",), "unix": ("owner", "group")}


def listener_options(description: str) -> tuple[str, ListenerOptions]:
    """Take our listener options (:data:`LISTENER_OPTIONS`) out of a ``tcp6:``
    or ``unix:`` description.

    Error handling:
        ``ValueError`` naming the option whose value is wrong.
    """
    from txsocketserver._twisted import tls

    kind = description.partition(":")[0]
    rest, taken = tls.split_options(description, (kind,), LISTENER_OPTIONS.get(kind, ()))
    options = ListenerOptions()
    if "ipv6only" in taken:
        value = taken["ipv6only"].lower()
        if value not in ("0", "1", "yes", "no", "true", "false"):
            raise ValueError(f"tcp6: option ipv6only={taken['ipv6only']!r}: expected 1 or 0")
        options = options._replace(ipv6_only=value in ("1", "yes", "true"))
    if "owner" in taken:
        import pwd

        name = taken["owner"]
        try:
            uid = int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
        except KeyError:
            raise ValueError(f"unix: option owner={name!r}: no such user") from None
        options = options._replace(owner=uid)
    if "group" in taken:
        import grp

        name = taken["group"]
        try:
            gid = int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
        except KeyError:
            raise ValueError(f"unix: option group={name!r}: no such group") from None
        options = options._replace(group=gid)
    return rest, options


def inherited_descriptor(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The endpoint of ``fd:N``: the listening stream socket this process
    inherited as descriptor N (from a supervisor, ``systemfd``, a shell).

    Error handling:
        ``ValueError`` if N is not a descriptor of a listening stream socket.
    """
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    text = description[len("fd:") :]
    if not text.isdigit():
        raise ValueError(f"fd: expected fd:N, a descriptor number, not {text!r}")
    fileno = int(text)
    try:
        probe = socket.socket(fileno=os.dup(fileno))
    except OSError as error:
        raise ValueError(f"fd:{fileno} is not an open socket: {error}") from None
    with probe:
        if probe.type != socket.SOCK_STREAM or not probe.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ValueError(f"fd:{fileno} is not a listening stream socket")
        family = probe.family
    return AdoptedStreamServerEndpoint(reactor, fileno, family)


class ListeningSocket(NamedTuple):
    """An endpoint that is nothing but a listening socket, which a stream
    server makes and accepts itself (see ``TCPServer.__init__``)."""

    family: socket.AddressFamily
    # (host, port), or a Unix socket path.
    address: Any
    backlog: int
    # For ssl: descriptions: what each accepted socket is wrapped with.
    tls: TLSConfig | None = None
    # The permissions Twisted gives a Unix socket's file.
    unix_mode: int | None = None
    # unix: with lockfile=1 (Twisted's default): a PATH.lock file guards the
    # socket file, and a stale socket file is removed under it.
    unix_lock: bool = False
    # Our listener options (ipv6only=, owner=, group=).
    options: ListenerOptions = ListenerOptions()


def listening_socket(endpoint: Endpoint) -> ListeningSocket | None:
    """How to serve *endpoint* on a listening socket of the server's own, or
    ``None`` if only Twisted can serve it.

    Twisted's ``tcp:``, ``tcp6:`` and ``unix:`` endpoints are plain
    listening sockets, and an ``ssl:`` description is
    one plus TLS options: a stream server binds and accepts them itself, so
    handlers get real sockets (``ssl.SSLSocket`` objects for ``ssl:``, see
    ``tls``) with no thread hop per read and write.  Subclasses and every
    other endpoint (``haproxy:``, ``systemd:``, an ``SSL4ServerEndpoint``
    object with its own TLS configuration...) go through Twisted
    (:class:`EndpointListener`).

    Error handling:
        ``ValueError`` as for :meth:`Endpoint.resolve`.
    """
    from twisted.internet import abstract, endpoints

    from txsocketserver._twisted import compat

    resolved = endpoint.resolve()
    unix = compat.unix_parameters(resolved)
    if unix is not None:
        return ListeningSocket(
            socket.AF_UNIX,
            unix.address,
            unix.backlog,
            unix_mode=unix.mode,
            unix_lock=unix.lockfile,
            options=endpoint._listener_options,
        )
    tcp = compat.tcp_parameters(resolved)
    if tcp is None:
        return None
    tls = None
    if type(resolved) is endpoints.SSL4ServerEndpoint:
        tls = endpoint._tls_config
        if tls is None:
            # An object with its own TLS configuration, or an sslmethod only
            # Twisted's TLS knows: served by Twisted.
            return None
    ipv6 = type(resolved) is endpoints.TCP6ServerEndpoint or abstract.isIPv6Address(tcp.interface)
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    host = tcp.interface or ("::" if ipv6 else "0.0.0.0")
    return ListeningSocket(
        family, (host, tcp.port), tcp.backlog, tls, options=endpoint._listener_options
    )


def proxy_protocol_endpoint(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint | None:
    """The endpoint under a PROXY-protocol one (``haproxy:...``), or ``None``.

    Twisted's ``HAProxyProtocolWrapper`` reads the header with no deadline,
    rejects a header split into small segments (it picks the parser from the
    first read) and, being a plain ``ProtocolWrapper``, turns a client's
    half-close into a lost connection.  So we listen on the endpoint it wraps
    and read the header ourselves (``TransportSocketProtocol`` with a
    ``ProxyHeaderPolicy``).  This reads two private attributes of Twisted's
    ``_WrapperServerEndpoint``, which ``proxyEndpoint`` has returned since
    Twisted 16; ``tests/test_twisted_compat.py::test_haproxy_endpoints_are_unwrapped``
    fails if that changes.
    """
    from txsocketserver._twisted import compat

    return compat.proxied_endpoint(endpoint)  # type: ignore[no-any-return]


def endpoint_backlog(endpoint: Endpoint) -> int | None:
    """The listen backlog a PROXY-protocol endpoint's wrapped endpoint asks
    for (``haproxy:tcp:8000:backlog=128``), if it names one."""
    from txsocketserver._twisted import compat

    inner = proxy_protocol_endpoint(endpoint.resolve())
    parameters = compat.tcp_parameters(inner) or compat.unix_parameters(inner)
    return parameters.backlog if parameters is not None and parameters.backlog > 0 else None


def listen_error(endpoint: Endpoint, error: Exception) -> Exception:
    """What a socket server would raise where *endpoint* failed to listen.

    Twisted raises ``CannotListenError`` for an address in use; ``socketserver``
    code catches ``OSError`` and looks at ``errno``, so that is what we raise,
    the Twisted exception as its ``__cause__``.  Other errors are returned as
    they are.
    """
    from twisted.internet.error import CannotListenError

    if not isinstance(error, CannotListenError):
        return error
    cause = error.socketError
    code = getattr(cause, "errno", None) or errno.EADDRINUSE
    converted = OSError(code, f"{os.strerror(code)}: cannot listen on {endpoint!r}")
    converted.__cause__ = error
    return converted


def as_endpoint(server_address: Any, address_family: int) -> Endpoint | None:
    """The endpoint ``server_address`` names, or ``None`` for a socket address.

    An :class:`Endpoint` always is one; a ``str`` with a ``":"`` is one for IP
    servers, whose socket addresses are tuples (a Unix server's ``str`` is a path).
    """
    if isinstance(server_address, Endpoint):
        return server_address
    if (
        isinstance(server_address, str)
        and ":" in server_address
        and address_family in (socket.AF_INET, socket.AF_INET6)
    ):
        return Endpoint(server_address)
    return None


class _TrackedProtocol(TransportSocketProtocol):
    """A ``TransportSocketProtocol`` that tells its listener when it is gone."""

    listener: EndpointListener

    def connectionMade(self) -> None:
        server = self.listener._server
        if server is not None and server._observers:
            peer = socket_address(self.transport.getPeer())  # type: ignore[union-attr]
            self.record = lifecycle.accepted(server, peer)
        super().connectionMade()
        self.listener._connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.listener._connection_lost(self)


class _ListenerFactory(Factory):
    """Makes a protocol per connection the endpoint accepts, for the listener."""

    # Twisted's "Starting factory" lines say nothing an operator needs.
    noisy = False

    def logPrefix(self) -> str:
        return "txsocketserver"

    def __init__(self, listener: EndpointListener, reactor: Any, proxied: bool) -> None:
        self._listener = listener
        self._reactor = reactor
        self._proxied = proxied

    def buildProtocol(self, addr: Any) -> _TrackedProtocol:
        policy = self._listener._proxy_policy() if self._proxied else None
        protocol = _TrackedProtocol(
            self._listener._on_connection, reactor=self._reactor, proxy=policy
        )
        protocol.factory = self
        protocol.listener = self._listener
        return protocol


@implementer(IRequestReadiness)
class EndpointReadiness:
    """Readiness of an endpoint server: a connection waits in the listener's queue."""

    def __init__(self, listener: EndpointListener) -> None:
        self._listener = listener
        self.wakes = 0  # wake() calls not yet consumed by wait(); under the listener's lock
        # A port opened before any reactor ran (the first server of a blocking
        # program) accepts only once one runs; the listener holds it until closed.
        _reactor.hold(listener)

    def wait(self, timeout: float | None) -> bool:
        return self._listener._wait(self, timeout)

    def wake(self) -> None:
        self._listener._wake(self)

    def close(self) -> None:
        # Nothing is registered with the reactor on our behalf: the port keeps
        # feeding the queue until the server closes.
        pass


@implementer(IListener)
class EndpointListener:
    """The endpoint side of a stream server: a listening port and its queue.

    Args:
        endpoint: where to listen.
        backlog: connections accepted and not yet taken by ``get_request()``
            (queued, or still in their PROXY header stage) before the port
            stops accepting (the server's ``request_queue_size``).
        server: the server it listens for: its ``server_address`` and
            ``address_family`` follow the port, and its ``trusted_proxies``
            and ``header_timeout`` apply to each new connection, read as it
            arrives.
    """

    #: Twisted accepts, not the serving loop: accepting may stop at any time.
    stops_at_once = True

    def __init__(self, endpoint: Endpoint, *, backlog: int, server: Any = None) -> None:
        self.endpoint = endpoint
        self._server = server
        self._backlog = max(1, backlog)
        self._trusted: TrustedProxies | None = None
        # Connections in their header stage, oldest first, with when they
        # were accepted (reactor thread only).
        self._pending: dict[_TrackedProtocol, float] = {}
        self._make_room_call: Any = None
        self._cap_scheduled = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Threads in wait_accepted_taken(): the queue's changes then wake all.
        self._draining = 0
        self._queue: collections.deque[tuple[TransportSocket, SocketAddress]] = collections.deque()
        self._port: IListeningPort | None = None
        self._accepting_paused = False  # port.stopReading() in effect; reactor thread
        self._stopped = False  # no new connections are wanted
        self._closed = False  # get_request() fails from now on
        # The socketpair behind fileno(), made on first use: its read end holds
        # one byte per queued connection.
        self._notify: tuple[socket.socket, socket.socket] | None = None
        self.host: SocketAddress | None = None
        self.family: socket.AddressFamily | None = None
        # Every connection not yet lost (reactor thread adds and removes).
        self._connections: set[_TrackedProtocol] = set()

    # -- listening -------------------------------------------------------------------

    def listen(self) -> None:
        """Start listening, from whichever thread constructs the server.

        With the reactor running in another thread (the blocking world, once a
        server has served), the port is opened there and this call waits.  With
        no reactor running (a ``.tac`` file, a ``twistd`` plugin, the first
        server of a blocking program) it is opened right here, as ``twistd``
        itself opens ports before it runs the reactor.

        Error handling:
            The endpoint's error (``CannotListenError`` for a port in use...)
            is raised; ``RuntimeError`` if the endpoint only listens
            asynchronously and this thread cannot wait for it (see
            :func:`txsocketserver.start_server`).
        """
        reactor = _reactor.get_reactor()
        if reactor.running and not _reactor.in_reactor_thread():
            _reactor.call_in_reactor(self.listen_deferred)
            return
        outcome: list[Any] = []
        self.listen_deferred().addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(
                f"{self.endpoint!r} does not start listening at once, and this thread "
                "cannot wait for the reactor. Create the server with "
                "bind_and_activate=False and start it with txsocketserver.start_server()."
            )
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    def listen_deferred(self) -> Deferred[None]:
        """Start listening; on the reactor thread (or with no reactor running)."""
        if self._port is not None or self._stopped:
            raise RuntimeError(f"{self.endpoint!r} was already listened on")
        reactor = _reactor.get_reactor()
        self.endpoint.resolve(reactor)
        listen_on, staged = self.endpoint._staged()
        factory = _ListenerFactory(self, reactor, proxied=staged)
        deferred = maybeDeferred(listen_on.listen, factory)

        def failed(failure: Failure) -> Failure:
            return Failure(listen_error(self.endpoint, failure.value))

        return deferred.addCallbacks(self._listening, failed)

    def _proxy_policy(self) -> ProxyHeaderPolicy:
        """The PROXY header policy for a connection arriving now (reactor thread)."""
        entries = tuple(getattr(self._server, "trusted_proxies", DEFAULT_TRUSTED_PROXIES))
        if self._trusted is None or self._trusted.entries != entries:
            self._trusted = TrustedProxies(entries)
        timeout = getattr(self._server, "header_timeout", DEFAULT_HEADER_TIMEOUT)
        return self.endpoint._stage_policy(self._trusted, timeout)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self._widen_backlog()
        self._cap_accepts()
        address = port.getHost()
        self.host = socket_address(address)
        self.family = socket_family(address)
        if self._server is not None:
            self._server.server_address = self.host
            self._server.address_family = self.family

    # -- IListener: what the server's hooks call ----------------------------------------

    def bind(self) -> None:
        """Listen on the endpoint (it binds and listens in one step)."""
        self.listen()

    def activate(self) -> None:
        """Nothing: the endpoint listened in :meth:`bind`."""

    def accept(self) -> tuple[TransportSocket, SocketAddress]:
        return self.take()

    def start_listening(self) -> Deferred[None] | None:
        return None if self.listening or self._stopped else self.listen_deferred()

    def stop_accepting(self) -> None:
        """Close the port: no new connection.  The connections accepted
        already (queued, or in their header stage) stay, for the serving loop
        to take (:meth:`wait_accepted_taken`); :meth:`close` closes whatever
        is left.  Any thread; waits for the port to close unless called on
        the reactor thread."""
        port, self._port = self._port, None
        if port is None:
            return
        if _reactor.in_reactor_thread():
            port.stopListening()
        else:
            _reactor.call_in_reactor(port.stopListening)

    def wait_accepted_taken(self, timeout: float) -> bool:
        with self._changed:
            self._draining += 1
            try:
                return bool(
                    self._changed.wait_for(lambda: self._closed or not self._load(), timeout)
                )
            finally:
                self._draining -= 1

    @property
    def listening(self) -> bool:
        return self._port is not None

    # -- the queue (reactor thread in, serving thread out) -----------------------------

    def _connection_made(self, protocol: _TrackedProtocol) -> None:
        """A connection was accepted (reactor thread, after its connectionMade)."""
        with self._lock:
            self._connections.add(protocol)
            if protocol.awaiting_header:
                self._pending[protocol] = time.monotonic()
            pause = self._load() >= self._backlog and not self._accepting_paused
            if pause:
                self._accepting_paused = True
        if pause:
            self._pause_accepting()
        if self._accepting_paused and self._pending:
            self._schedule_make_room()
        if not self._cap_scheduled:
            # After this accept batch, before the reactor polls again.
            self._cap_scheduled = True
            _reactor.get_reactor().callLater(0, self._cap_accepts)

    def _cap_accepts(self) -> None:
        """Make the port's next accept batch no larger than the free slots.

        Twisted's port accepts a whole batch per readable event, paused or
        not; how big is Twisted's private business: see ``compat``.
        """
        from txsocketserver._twisted import compat

        self._cap_scheduled = False
        if self._port is None:
            return
        with self._lock:
            free = self._backlog - self._load()
        compat.cap_accept_batch(self._port, free)

    def _connection_lost(self, protocol: _TrackedProtocol) -> None:
        with self._changed:
            self._connections.discard(protocol)
            self._pending.pop(protocol, None)
            resume = self._resume_wanted()
            self._changed.notify_all()
        if resume:
            self._resume_accepting()

    def _load(self) -> int:
        """Connections holding a slot: queued or in their header stage (lock held)."""
        return len(self._queue) + len(self._pending)

    def _resume_wanted(self) -> bool:
        """Whether accepting should resume now; claims the resume (lock held)."""
        if self._accepting_paused and self._load() < self._backlog:
            self._accepting_paused = False
            return True
        return False

    def _pause_accepting(self) -> None:
        stop_reading = getattr(self._port, "stopReading", None)
        if stop_reading is not None:
            stop_reading()

    def _schedule_make_room(self) -> None:
        """While full, close the header-stage connections that have had their
        chance (reactor thread)."""
        if self._make_room_call is not None or not self._pending:
            return
        oldest = next(iter(self._pending.values()))
        delay = max(0.0, oldest + HEADER_TIMEOUT_WHEN_FULL - time.monotonic())
        self._make_room_call = _reactor.get_reactor().callLater(delay, self._make_room)

    def _make_room(self) -> None:
        self._make_room_call = None
        if not self._accepting_paused or self._stopped:
            return
        limit = time.monotonic() - HEADER_TIMEOUT_WHEN_FULL
        with self._lock:
            stale = [p for p, accepted in self._pending.items() if accepted <= limit]
        for protocol in stale:
            protocol.evict(
                f"no complete PROXY header within {HEADER_TIMEOUT_WHEN_FULL}s "
                "while every slot was taken",
                refusal=lifecycle.MAX_CONNECTIONS,
            )
        if self._accepting_paused:
            self._schedule_make_room()

    def _closing_connections(self) -> bool:
        """Whether a connection its handler closed is still sending (lock held)."""
        # Reads the bridge's flags without its lock: each is a bool set once.
        return any(p._bridge.closed for p in self._connections)

    def _on_connection(self, transport_socket: TransportSocket, address: SocketAddress) -> None:
        """A connection is ready for a handler (reactor thread): queue it."""
        with self._lock:
            # Its slot moves from the header stage to the queue.
            self._pending.pop(transport_socket._protocol, None)  # type: ignore[call-overload]
            if self._stopped:
                accepted = False
            else:
                accepted = True
                self._queue.append((transport_socket, address))
                if self._notify is not None:
                    self._notify[1].send(b"\0")
                if self._draining:
                    self._changed.notify_all()
                else:
                    self._changed.notify()
                pause = self._load() >= self._backlog and not self._accepting_paused
                if pause:
                    self._accepting_paused = True
        if not accepted:
            transport_socket.close()
        elif pause:
            self._pause_accepting()

    def take(self) -> tuple[TransportSocket, SocketAddress]:
        """The next queued connection (serving thread).

        Error handling:
            ``OSError(EBADF)`` once closed; ``BlockingIOError`` if none is queued.
        """
        with self._lock:
            if self._closed:
                raise bad_file_descriptor("the server was closed")
            if not self._queue:
                raise BlockingIOError(errno.EAGAIN, "no connection is queued")
            request = self._queue.popleft()
            if self._notify is not None:
                self._notify[0].recv(1)
            if self._draining:
                self._changed.notify_all()
            resume = self._resume_wanted()
        if resume:
            _reactor.call_soon(self._resume_accepting)
        return request

    def _resume_accepting(self) -> None:
        port = self._port
        if port is not None and not self._stopped and not self._accepting_paused:
            start_reading = getattr(port, "startReading", None)
            if start_reading is not None:
                self._cap_accepts()
                start_reading()

    def _wait(self, readiness: EndpointReadiness, timeout: float | None) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._closed or readiness.wakes, timeout)
            if self._closed:
                raise bad_file_descriptor("the server was closed while serving")
            if readiness.wakes:
                readiness.wakes -= 1
                return False
            return bool(self._queue)

    def _wake(self, readiness: EndpointReadiness) -> None:
        with self._changed:
            readiness.wakes += 1
            self._changed.notify_all()

    def readiness(self) -> EndpointReadiness:
        self._widen_backlog()
        return EndpointReadiness(self)

    def _widen_backlog(self) -> None:
        """With ``max_connections``, clients beyond the cap wait in the port's
        kernel queue once this listener's is full: size it as a socket
        server's (``listeners.listen_backlog``)."""
        from txsocketserver._twisted import compat
        from txsocketserver._twisted.listeners import listen_backlog

        port = self._port
        if port is not None and getattr(self._server, "max_connections", None) is not None:
            compat.widen_listen_backlog(port, listen_backlog(self._server))

    def fileno(self) -> int:
        """A descriptor that is readable while a connection is queued.

        Twisted, not the server, accepts on the listening socket, so that
        socket says nothing about whether ``get_request()`` would block; this
        one does, which is what a ``selectors`` loop calling
        ``handle_request()`` needs.
        """
        if self._notify is None and not self._closed:
            # Whoever selects on it needs Twisted to accept meanwhile.
            _reactor.hold(self)
        with self._lock:
            if self._closed:
                raise bad_file_descriptor("the server was closed")
            if self._notify is None:
                reader, writer = socket.socketpair()
                reader.setblocking(False)
                writer.setblocking(False)
                if self._queue:
                    writer.send(b"\0" * len(self._queue))
                self._notify = (reader, writer)
            return self._notify[0].fileno()

    # -- ending ------------------------------------------------------------------------

    def stop_listening(self) -> None:
        """Stop accepting and close the queued connections; ``get_request`` keeps
        failing with ``BlockingIOError`` until :meth:`close`.  Any thread;
        waits for the port to close unless called on the reactor thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            queued = list(self._queue)
            self._queue.clear()
            if self._notify is not None:
                # Forget the bytes standing for the connections dropped.
                self._drain_notify()
        for transport_socket, _ in queued:
            transport_socket.close()
            record = transport_socket.lifecycle_record
            if record is not None:
                lifecycle.refused(record, lifecycle.STOPPING)
                lifecycle.ended(record)
        port, self._port = self._port, None
        if port is None and not self._pending:
            return
        if _reactor.in_reactor_thread():
            self._stop_port(port)
        else:
            # With no reactor running (listening happened before any ran, and
            # none runs now), call_in_reactor runs ours for the call: only a
            # running reactor closes a port.
            _reactor.call_in_reactor(self._stop_port, port)

    def _stop_port(self, port: IListeningPort | None) -> Any:
        """Close the port (if stop_accepting has not) and the connections
        still in their header stage (no handler will ever take them); reactor
        thread."""
        call, self._make_room_call = self._make_room_call, None
        if call is not None and call.active():
            call.cancel()
        for protocol in list(self._pending):
            protocol.evict("the server is stopping", level="info", refusal=lifecycle.STOPPING)
        return None if port is None else port.stopListening()

    def _drain_notify(self) -> None:
        assert self._notify is not None
        try:
            while self._notify[0].recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Stop listening, close queued connections, fail ``get_request`` and
        any ``wait`` from now on.  Idempotent; any thread.

        Off the reactor thread, also waits (at most ``CLOSE_FLUSH_TIMEOUT``
        seconds) until the connections whose handlers closed them have sent
        everything and closed.
        """
        self.stop_listening()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            notify, self._notify = self._notify, None
            if not _reactor.in_reactor_thread() and _reactor.get_reactor().running:
                # Nothing is lost: what handlers wrote before closing reaches
                # the clients even if the process exits right after this.
                self._changed.wait_for(
                    lambda: not self._closing_connections(), CLOSE_FLUSH_TIMEOUT
                )
        if notify is not None:
            for end in notify:
                end.close()
        _reactor.release(self)


__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "HEADER_TIMEOUT_WHEN_FULL",
    "Endpoint",
    "EndpointListener",
    "EndpointReadiness",
    "as_endpoint",
    "endpoint_backlog",
    "listen_error",
    "proxy_protocol_endpoint",
]
