# -*- test-case-name: tests.test_observability,tests.test_observability_interop -*-
"""The ``--metrics`` endpoint: ``/metrics``, ``/livez``, ``/readyz``, over ``twisted.web``.

A small ``twisted.web`` site of its own on its own Twisted endpoint, next to
the served servers on the same reactor: its requests are never seen by a
served server, so they are counted nowhere.  Everything here runs on the
reactor thread.

* ``GET /metrics``: the registry's exposition (OpenMetrics when the scraper
  asks for it, as Prometheus does).
* ``GET /livez``: 200 as long as the reactor answers (under ``--workers``, the
  supervisor's).
* ``GET /readyz``: 200 while :meth:`Health.ready` holds, 503 from the moment
  a stop begins.
* Anything else: 404; a method other than GET or HEAD: 405.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

from txsocketserver._observability.health import Health


class _Root(Resource):
    isLeaf = True

    def __init__(self, registry: Any, health: Health) -> None:
        super().__init__()
        self._registry = registry
        self._health = health

    def render(self, request: Any) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b"method not allowed\n"
        path = request.path
        request.setHeader(b"cache-control", b"no-store")
        if path == b"/metrics" and self._registry is not None:
            from txsocketserver._observability.exposition import exposition

            accept = request.getHeader(b"accept")
            body, content_type = exposition(
                self._registry, None if accept is None else accept.decode("latin-1")
            )
            request.setHeader(b"content-type", content_type.encode("ascii"))
            return body
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if path == b"/livez":
            return b"ok\n"
        if path == b"/readyz":
            if self._health.ready():
                return b"ready\n"
            request.setResponseCode(503)
            return b"stopping\n" if self._health.stopping else b"not ready\n"
        request.setResponseCode(404)
        return b"not found: try /metrics, /livez or /readyz\n"


class _QuietSite(Site):
    # Health checks come every few seconds: no access line and no "Starting
    # factory" line for each.
    noisy = False

    def startFactory(self) -> None:
        # Not HTTPFactory's: it opens the access log we do not write and
        # starts a timer that refreshes that log's date every second, and a
        # pending timer costs the reactor work on every turn (measured: 5-10%
        # of an async echo request's instructions; benchmarks/README.md).
        pass

    def log(self, request: Any) -> None:
        pass


def listen_metrics(
    description: str, registry: Any, health: Health, reactor: Any = None
) -> Deferred[Any]:
    """Serve ``/metrics`` (from *registry*; ``None``: 404), ``/livez`` and
    ``/readyz`` (from *health*) on the server endpoint *description*.

    Returns the endpoint's Deferred: it fires with the listening port (stop
    it with ``stopListening()``), or fails if the endpoint cannot listen.
    Call it on the reactor thread (or before the reactor runs).

    Error handling:
        ``ValueError`` at once for a description that does not parse.
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    endpoint = serverFromString(reactor, description)
    return endpoint.listen(_QuietSite(_Root(registry, health)))
