"""A line-echo server written exactly as for the stdlib's socketserver.

Run it, then talk to it::

    python examples/echo_server.py --port 8000
    printf 'hello\\n' | nc -q1 127.0.0.1 8000     # or: curl telnet://127.0.0.1:8000

The only txsocketserver-specific line is the import.
"""

from __future__ import annotations

import argparse

import txsocketserver as socketserver


class EchoHandler(socketserver.StreamRequestHandler):
    """Send every line back until the client closes the connection."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with EchoServer((args.host, args.port), EchoHandler) as server:
        host, port = server.server_address[:2]
        print(f"echoing lines on {host}:{port}; Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
