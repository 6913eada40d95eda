"""Scenarios of ``test_reactor_lifecycle.py``, each in a fresh interpreter.

    python lifecycle_scenarios.py close KIND
    python lifecycle_scenarios.py between_calls | call_in_flight | outlived | collected
    python lifecycle_scenarios.py twisted (blocking_first|twisted_first) (run|react|trial)
    python lifecycle_scenarios.py inside_twisted

Prints one JSON line: what the test asserts on.  Every wait is bounded.
"""

from __future__ import annotations

import gc
import io
import json
import os
import socket
import sys
import threading
import time

import txsocketserver

WAIT = 10.0
REACTOR_THREAD = "txsocketserver-reactor"
HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40123 443\r\n"


class Echo(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class DatagramEcho(txsocketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


class AsyncEcho(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        self.wfile.write(await self.rfile.readline())


class AsyncDatagramEcho(txsocketserver.AsyncDatagramRequestHandler):
    async def handle(self) -> None:
        self.wfile.write(await self.rfile.read())


ENDPOINT = "haproxy:tcp:0:interface=127.0.0.1"
KINDS = {
    "tcp": (txsocketserver.TCPServer, ("127.0.0.1", 0), Echo),
    "threading_tcp": (txsocketserver.ThreadingTCPServer, ("127.0.0.1", 0), Echo),
    "forking_tcp": (txsocketserver.ForkingTCPServer, ("127.0.0.1", 0), Echo),
    "udp": (txsocketserver.UDPServer, ("127.0.0.1", 0), DatagramEcho),
    "threading_udp": (txsocketserver.ThreadingUDPServer, ("127.0.0.1", 0), DatagramEcho),
    "unix_stream": (txsocketserver.UnixStreamServer, "lifecycle.sock", Echo),
    "async_tcp": (txsocketserver.TCPServer, ("127.0.0.1", 0), AsyncEcho),
    "async_udp": (txsocketserver.UDPServer, ("127.0.0.1", 0), AsyncDatagramEcho),
    "endpoint": (txsocketserver.TCPServer, ENDPOINT, Echo),
    "threading_endpoint": (txsocketserver.ThreadingTCPServer, ENDPOINT, Echo),
    "async_endpoint": (txsocketserver.TCPServer, ENDPOINT, AsyncEcho),
}


def our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t is not threading.main_thread()]


def reactor_thread_alive() -> bool:
    return any(t.name == REACTOR_THREAD for t in threading.enumerate())


def reactor_thread_ident() -> int | None:
    for thread in threading.enumerate():
        if thread.name == REACTOR_THREAD:
            return thread.ident
    return None


def wait_for(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def child_processes() -> list[int]:
    """Our child processes, alive or not yet reaped (from /proc)."""
    mine = str(os.getpid())
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == mine:
            children.append(int(entry))
    return children


def ask(kind: str, server) -> bool:
    """One request and its reply."""
    address = server.server_address
    if kind.endswith("udp"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.sendto(b"ping\n", address)
            return client.recv(100) == b"ping\n"
    family = socket.AF_UNIX if kind == "unix_stream" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.connect(address)
        client.sendall((HEADER if "endpoint" in kind else b"") + b"ping\n")
        return client.makefile("rb").readline() == b"ping\n"


def serve_in_thread(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return thread


def close_scenario(kind: str) -> dict:
    server_class, address, handler = KINDS[kind]
    found: dict[str, list] = {
        key: []
        for key in (
            "replies",
            "reactor_thread_while_open",
            "threads_after_close",
            "dangling_after_close",
            "children_after_close",
            "reactor_running_after_close",
        )
    }
    dangling_before = len(threading._dangling)  # type: ignore[attr-defined]
    from twisted.internet import reactor

    for _ in range(2):
        server = server_class(address, handler)
        thread = serve_in_thread(server)
        found["replies"].append(ask(kind, server))
        found["reactor_thread_while_open"].append(reactor_thread_alive())
        server.shutdown()
        thread.join(WAIT)
        server.server_close()
        del thread
        found["threads_after_close"].append(our_threads())
        # As regrtest does before it compares threading._dangling: the pool
        # of a threading server is freed by the collector.
        gc.collect()
        found["dangling_after_close"].append(
            len(threading._dangling) - dangling_before  # type: ignore[attr-defined]
        )
        found["children_after_close"].append(child_processes())
        found["reactor_running_after_close"].append(reactor.running)
        if kind == "unix_stream":
            os.unlink(address)
    return found


def between_calls_scenario() -> dict:
    server = txsocketserver.TCPServer(("127.0.0.1", 0), Echo)
    idents = set()
    replies = 0
    alive_between = True
    for _ in range(3):
        serving = threading.Thread(target=server.handle_request)
        serving.start()
        # Let the serving call wait in the reactor before the client comes
        # (a thread just started has no ident yet).
        assert wait_for(lambda: reactor_thread_ident() is not None)
        idents.add(reactor_thread_ident())
        replies += ask("tcp", server)
        serving.join(WAIT)
        alive_between = alive_between and reactor_thread_alive()
    server.server_close()
    return {
        "replies": replies,
        "thread_idents": len(idents),
        "alive_between_calls": alive_between,
        "alive_after_close": reactor_thread_alive(),
    }


def call_in_flight_scenario() -> dict:
    server = txsocketserver.TCPServer(ENDPOINT, Echo)
    address = server.server_address
    alive_before = reactor_thread_alive()
    server.server_close()
    try:
        socket.create_connection(address, timeout=WAIT).close()
        closed = False
    except ConnectionRefusedError:
        closed = True
    return {
        "alive_before_close": alive_before,
        "port_closed": closed,
        "alive_after_close": reactor_thread_alive(),
    }


def outlived_scenario() -> dict:
    entered = threading.Event()
    go_on = threading.Event()

    class Late(txsocketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            entered.set()
            go_on.wait(WAIT)
            self.wfile.write(b"late\n")

    class Server(txsocketserver.ThreadingTCPServer):
        daemon_threads = True
        block_on_close = False

    server = Server(ENDPOINT, Late)
    thread = serve_in_thread(server)
    with socket.create_connection(server.server_address, timeout=WAIT) as client:
        client.sendall(HEADER + b"hello\n")
        assert entered.wait(WAIT)
        server.shutdown()
        thread.join(WAIT)
        server.server_close()
        alive_right_after = reactor_thread_alive()
        go_on.set()
        reply = client.makefile("rb").readline().decode().strip()
    gone = wait_for(lambda: not reactor_thread_alive())
    return {
        "reply_after_close": reply,
        "alive_right_after_close": alive_right_after,
        "alive_at_the_end": not gone,
    }


def collected_scenario() -> dict:
    """A server served, then dropped without server_close() (its socket
    closed by hand): its listener's hold goes with it."""
    server = txsocketserver.TCPServer(("127.0.0.1", 0), Echo)
    serving = threading.Thread(target=server.handle_request)
    serving.start()
    replied = ask("tcp", server)
    serving.join(WAIT)
    alive_while_referenced = reactor_thread_alive()
    server.socket.close()
    del server, serving
    gc.collect()
    return {
        "reply": replied,
        "alive_while_referenced": alive_while_referenced,
        "gone_once_collected": wait_for(lambda: not reactor_thread_alive()),
    }


# -- the program runs Twisted itself ----------------------------------------------------


def blocking_step() -> bool:
    """Serve through several kinds of server: what they leave in the reactor
    (a descriptor, a delayed call) would fail trial's clean-reactor check."""
    replied = True
    for kind in ("threading_tcp", "forking_tcp", "threading_endpoint", "async_tcp"):
        server_class, address, handler = KINDS[kind]
        server = server_class(address, handler)
        thread = serve_in_thread(server)
        replied = ask(kind, server) and replied
        server.shutdown()
        thread.join(WAIT)
        server.server_close()
    return replied and our_threads() == []


def twisted_work(reactor):
    """What a Twisted program does: a thread of the reactor's pool, and a
    child process (reaped through the SIGCHLD handling run() installs)."""
    from twisted.internet import defer, threads, utils

    @defer.inlineCallbacks
    def work():
        value = yield threads.deferToThread(lambda: 42)
        code = yield utils.getProcessValue(sys.executable, ["-c", "pass"], reactor=reactor)
        return value == 42 and code == 0

    return work()


def twisted_step(way: str) -> bool:
    from twisted.internet import reactor, task

    if way == "run":
        outcome: list[bool] = []

        def main() -> None:
            d = twisted_work(reactor)
            d.addCallbacks(outcome.append, lambda f: outcome.append(False))
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(main)
        reactor.run()
        return outcome == [True]
    if way == "react":
        outcome = []

        def react_main(reactor):
            return twisted_work(reactor).addCallback(outcome.append)

        try:
            task.react(react_main)
        except SystemExit as exit:
            return exit.code == 0 and outcome == [True]
        return False
    from twisted.trial import reporter, runner, unittest

    class TwistedTest(unittest.TestCase):
        def test_1_nothing(self):
            # Never runs the reactor: trial's janitor then sees whatever an
            # earlier user of the reactor left there (delayed calls, readers).
            pass

        def test_2_work(self):
            return twisted_work(reactor).addCallback(self.assertTrue)

    stream = io.StringIO()
    trial = runner.TrialRunner(reporter.Reporter, stream=stream)
    result = trial.run(runner.TestLoader().loadClass(TwistedTest))
    if not result.wasSuccessful() or result.testsRun != 2:
        print(stream.getvalue(), file=sys.stderr)
        return False
    return True


def twisted_scenario(order: str, way: str) -> dict:
    steps = []
    if order == "blocking_first":
        steps.append(("blocking", blocking_step()))
    steps.append(("twisted", twisted_step(way)))
    steps.append(("blocking", blocking_step()))
    return {"steps": steps, "threads_at_the_end": our_threads()}


def inside_twisted_scenario() -> dict:
    from twisted.internet import task, threads

    found: dict = {}

    def use_a_server() -> None:
        server = txsocketserver.TCPServer(("127.0.0.1", 0), Echo)
        serving = threading.Thread(target=server.handle_request)
        serving.start()
        found["reply"] = ask("tcp", server)
        serving.join(WAIT)
        server.server_close()
        found["our_threads"] = [n for n in our_threads() if n.startswith("txsocketserver")]

    def main(reactor):
        return threads.deferToThread(use_a_server)

    try:
        task.react(main)
    except SystemExit as exit:
        found["exit_code"] = exit.code
    return found


def main() -> None:
    command, *args = sys.argv[1:]
    scenarios = {
        "close": close_scenario,
        "between_calls": between_calls_scenario,
        "call_in_flight": call_in_flight_scenario,
        "outlived": outlived_scenario,
        "collected": collected_scenario,
        "twisted": twisted_scenario,
        "inside_twisted": inside_twisted_scenario,
    }
    print(json.dumps(scenarios[command](*args)), flush=True)


if __name__ == "__main__":
    main()
