"""Two socketserver handlers in one Twisted application: plain TCP and TLS.

Run from the repository root (so that ``examples`` is importable)::

    # A self-signed certificate for localhost, valid 30 days (or use your own):
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \\
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \\
        -keyout examples/key.pem -out examples/cert.pem

    PYTHONPATH=. twistd -n -y examples/two_handlers.tac

Then::

    printf 'hello\\n' | nc -q1 127.0.0.1 8000                           # line echo
    curl --no-alpn --cacert examples/cert.pem https://localhost:8443/   # http.server, TLS

(``--no-alpn``: with Twisted 26.10, a TLS handshake that offers ALPN to an
``ssl:`` endpoint whose factory negotiates no protocol ends in an "internal
error" alert; a native Twisted ``Factory`` does the same.  Python's ``ssl``
offers no ALPN unless asked to.)

``twistd`` stops both gracefully on SIGTERM/Ctrl-C: each stops accepting, lets
its requests in flight finish (up to ``drain_timeout`` seconds), then closes.
"""

from http.server import SimpleHTTPRequestHandler

from twisted.application.service import Application

import txsocketserver
from examples.echo_server import EchoHandler

application = Application("txsocketserver example")

# A plain address tuple: a socket server, its handlers get the real socket.
echo = txsocketserver.ThreadingTCPServer(("127.0.0.1", 8000), EchoHandler)
txsocketserver.ServerService(echo).setServiceParent(application)

# An endpoint description: Twisted does the TLS, handlers get a TransportSocket.
https = txsocketserver.ThreadingTCPServer(
    "ssl:8443:interface=127.0.0.1:privateKey=examples/key.pem:certKey=examples/cert.pem",
    SimpleHTTPRequestHandler,
)
txsocketserver.ServerService(https, drain_timeout=10).setServiceParent(application)
