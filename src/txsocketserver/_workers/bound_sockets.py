# -*- test-case-name: tests.test_workers -*-
"""The sockets the supervisor binds from ``--listen`` descriptions and hands down.

The supervisor binds every socket itself, before any worker starts, and keeps
it open for its whole life: workers come and go (crash, reload, recycling)
while the kernel keeps queueing connections, so no client is refused.  Each
description becomes a :class:`BoundSocket`:

* ``tcp:``, ``tcp6:``, ``unix:`` and ``ssl:``: a socket bound and listened to
  as the stream server would (``_twisted.endpoints.listening_socket`` says how);
  workers serve it on the socket path, ``ssl:`` doing TLS in the worker.
* ``systemd:``: the socket systemd handed to the supervisor, passed on.
* ``haproxy:`` + one of the above: the same socket; workers read the PROXY
  header through our header stage over the adopted fd (``haproxy:systemd:``),
  and for ``haproxy:ssl:`` run TLS after it, as a single process does
  (``Endpoint.begin_tls_after_proxy``).
* With ``reuse_port`` (``tcp:``/``tcp6:``/``ssl:`` only): the supervisor binds
  but does not listen, which reserves the port (and fixes port 0 to one
  number); each worker binds and listens on its own ``SO_REUSEPORT`` socket,
  and the kernel spreads connections over them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from txsocketserver._twisted.endpoints import Endpoint, listening_socket
from txsocketserver._twisted.listeners import remove_socket_file

_PROXY_PREFIX = "haproxy:"


@dataclass
class BoundSocket:
    """One listening socket of the supervisor, and how workers serve it.

    Attributes:
        description: the ``--listen`` description it was made from.
        sock: the supervisor's socket (listening; with ``reuse_port``, only
            bound).
        inherited: whether workers get ``sock`` as an fd (else they bind
            their own ``SO_REUSEPORT`` socket).
    """

    description: str
    sock: socket.socket
    inherited: bool
    tls: str | None = None
    proxy: str | None = None
    backlog: int = 50
    unix_path: str | None = None

    @property
    def address(self) -> Any:
        """The bound address: ``(host, port)`` or a Unix socket path."""
        return self.sock.getsockname()

    def worker_spec(self) -> dict[str, Any]:
        """What a worker needs to serve this listener (JSON-serialisable)."""
        family = self.sock.family
        bind = None
        if not self.inherited:
            bind = {"family": int(family), "address": list(self.address), "backlog": self.backlog}
        return {
            "description": self.description,
            "domain": family.name.removeprefix("AF_"),
            "tls": self.tls,
            "proxy": self.proxy,
            "bind": bind,
        }

    def stop_listening(self) -> None:
        """Refuse new connections from now on (the workers are told to drain).

        A socket that workers accept from themselves is shut down: on Linux,
        ``shutdown()`` on a listening socket makes it refuse new connections
        and every ``accept()`` fail at once, in every process holding it,
        whereas ``close()`` would leave it listening, with nobody accepting,
        until the last draining worker (a synchronous one finishing its
        request) closed its copy.  A PROXY-protocol socket is accepted from
        by Twisted's port in each worker, which would log the failed
        ``accept()`` as an error: the supervisor only closes its copy, and
        the socket closes as the workers' ports stop listening, which they
        do as soon as they are told to drain.
        """
        if not self.inherited:
            return
        if self.proxy is not None:
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not listening any more: nothing to refuse

    def close(self) -> None:
        """Close the supervisor's socket (idempotent); remove a Unix socket's file."""
        self.sock.close()
        path, self.unix_path = self.unix_path, None
        if path is not None:
            remove_socket_file(path)


def bind_socket(description: str, *, reuse_port: bool = False) -> BoundSocket:
    """Bind (and, unless *reuse_port*, listen on) the socket *description* names.

    Error handling:
        ``ValueError`` for a description that cannot be served by workers
        (an endpoint that is not a listening socket, ``reuse_port`` with a
        Unix or systemd socket); ``OSError`` from binding (port in use...).
    """
    proxy = None
    inner = description
    if description.lower().startswith(_PROXY_PREFIX):
        proxy = description[: len(_PROXY_PREFIX)]
        inner = description[len(_PROXY_PREFIX) :]
    endpoint = Endpoint(inner)
    resolved = endpoint.resolve()
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    if isinstance(resolved, AdoptedStreamServerEndpoint):
        if reuse_port:
            raise ValueError(f"{description!r}: --reuse-port binds sockets, systemd passes one")
        sock = socket.socket(fileno=resolved.fileno)
        return BoundSocket(description, sock, inherited=True, proxy=proxy)
    listening = listening_socket(endpoint)
    if listening is None:
        raise ValueError(
            f"{description!r}: workers share a listening socket, so --listen must be "
            "tcp:, tcp6:, unix:, ssl: or systemd: (optionally behind haproxy:)"
        )
    unix = listening.family == getattr(socket, "AF_UNIX", None)
    if reuse_port and (unix or proxy is not None):
        raise ValueError(f"{description!r}: --reuse-port needs tcp:, tcp6: or ssl:")
    sock = socket.socket(listening.family, socket.SOCK_STREAM)
    try:
        if not unix:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if listening.options.ipv6_only is not None:
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(listening.options.ipv6_only)
            )
        if unix and os.path.exists(listening.address):
            _remove_stale_unix_socket(listening.address)
        sock.bind(listening.address)
        if unix and listening.unix_mode is not None:
            os.chmod(listening.address, listening.unix_mode)
            if (listening.options.owner, listening.options.group) != (-1, -1):
                os.chown(listening.address, listening.options.owner, listening.options.group)
        if not reuse_port:
            sock.listen(listening.backlog)
    except BaseException:
        sock.close()
        raise
    return BoundSocket(
        description,
        sock,
        inherited=not reuse_port,
        tls=inner if listening.tls is not None else None,
        proxy=proxy,
        backlog=listening.backlog,
        unix_path=listening.address if unix and not listening.address.startswith("\0") else None,
    )


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file nobody listens on any more; refuse to steal a live one."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.remove(path)
    except OSError:
        pass  # not a socket, or not ours to judge: bind() reports it
    else:
        raise OSError(f"{path}: another process is listening there")
    finally:
        probe.close()
