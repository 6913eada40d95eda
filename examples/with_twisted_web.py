"""A txsocketserver server and a native ``twisted.web`` site in one process.

    python examples/with_twisted_web.py

* http://127.0.0.1:8080/ is ``twisted.web`` (a resource rendered on the reactor);
* http://127.0.0.1:8081/ is the stdlib's ``http.server`` handler, run by
  txsocketserver on pool threads of the same process, on the same reactor.

Both report a shared request counter, to show they are one program.  Ctrl-C
stops the reactor, which stops the socketserver service gracefully first.
"""

from __future__ import annotations

import itertools
from http.server import BaseHTTPRequestHandler

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.resource import Resource
from twisted.web.server import Site

import txsocketserver

counter = itertools.count(1)


class Hello(BaseHTTPRequestHandler):
    """A blocking stdlib handler: runs on a txsocketserver pool thread."""

    def do_GET(self) -> None:
        body = f"http.server handler, request #{next(counter)} of this process\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Native(Resource):
    """A twisted.web resource: runs on the reactor thread."""

    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return f"twisted.web resource, request #{next(counter)} of this process\n".encode()


async def main(reactor: object) -> None:
    web = endpoints.serverFromString(reactor, "tcp:8080:interface=127.0.0.1")
    await web.listen(Site(Native()))
    server = txsocketserver.ThreadingTCPServer(
        "tcp:8081:interface=127.0.0.1", Hello, bind_and_activate=False
    )
    service = await txsocketserver.start_server(server)
    print("twisted.web on http://127.0.0.1:8080/, http.server on http://127.0.0.1:8081/")
    # Serve until Ctrl-C/SIGTERM; then drain the socketserver before exiting.
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    await Deferred()  # never fires: react() stops the reactor on a signal


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
