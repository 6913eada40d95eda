"""The blocking API as a library user meets it: serve, talk, shut down.

    python examples/library_tour.py

A threading TCP server, then a forking one, each serving in a thread of this
program while the main thread is their client.  Both count requests in a
module global: the threading server's requests share this process's, each
forking request has a process of its own.  ``library_tour.out`` is what it
prints; the documentation shows that file and the test suite checks it.
"""

from __future__ import annotations

import socket
import threading

import txsocketserver as socketserver

requests_seen = 0


class Greeter(socketserver.StreamRequestHandler):
    """Read a name, answer with a greeting and this process's request count."""

    def handle(self) -> None:
        global requests_seen
        requests_seen += 1
        name = self.rfile.readline().strip().decode()
        self.wfile.write(f"hello {name}, request {requests_seen} in my process\n".encode())


def ask(address: tuple[str, int], name: str) -> str:
    with socket.create_connection(address, timeout=10) as connection:
        connection.sendall(f"{name}\n".encode())
        return connection.makefile().readline().strip()


def tour(server_class: type[socketserver.TCPServer]) -> None:
    with server_class(("127.0.0.1", 0), Greeter) as server:
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        for name in ("ada", "alan"):
            print(f"{server_class.__name__}: {ask(server.server_address, name)}")
        server.shutdown()  # returns once serve_forever has returned
        serving.join()


if __name__ == "__main__":
    # The forking server's worker processes import this module by name (as
    # multiprocessing's spawn does), so the servers start under this guard.
    tour(socketserver.ThreadingTCPServer)
    tour(socketserver.ForkingTCPServer)
    print(f"requests counted by this process: {requests_seen}")
