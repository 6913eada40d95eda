"""Two socketserver handlers in one Twisted application: plain TCP and TLS.

Run from the repository root (so that ``examples`` is importable)::

    # A self-signed certificate for localhost, valid 30 days (or use your own):
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \\
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \\
        -keyout examples/key.pem -out examples/cert.pem

    PYTHONPATH=. twistd -n -y examples/two_handlers.tac

Then::

    printf 'hello\\n' | nc -q1 127.0.0.1 8000                           # line echo
    curl --cacert examples/cert.pem https://localhost:8443/   # http.server, TLS

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

# An ssl: endpoint description: the server listens on its own socket and each
# handler gets an ssl.SSLSocket (the handshake runs in the handler's thread).
https = txsocketserver.ThreadingTCPServer(
    "ssl:8443:interface=127.0.0.1:privateKey=examples/key.pem:certKey=examples/cert.pem",
    SimpleHTTPRequestHandler,
)
txsocketserver.ServerService(https, drain_timeout=10).setServiceParent(application)
