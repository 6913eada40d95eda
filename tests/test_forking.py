"""Forking servers, stdlib vs txsocketserver: each request in a process of its own.

The handlers live in ``forking_handlers`` (a request's process imports them by
name).  Every wait is bounded by ``WAIT_FORK``: starting txsocketserver's
template process takes a fraction of a second, more on a loaded machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import forking_handlers
from forking_handlers import handler
from support import (
    ANY_PORT,
    connect_to,
    fd_count,
    recv_all,
    serve_in_thread,
    wait_until,
)

WAIT_FORK = 20.0


@pytest.fixture
def ss(forking_ss: Any) -> Any:
    """Both fork modes of ours against the stdlib (``conftest.forking_ss``)."""
    return forking_ss
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


# -- helpers -------------------------------------------------------------------


def ask(server: Any, payload: bytes) -> bytes:
    """Send ``payload`` on a new connection, half-close, return the whole reply."""
    with connect_to(server, timeout=WAIT_FORK) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def ask_datagram(server: Any, payload: bytes, client_path: str | None = None) -> bytes:
    """Send one datagram to ``server`` and return the one reply."""
    family = server.address_family
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT_FORK)
        if client_path is not None:
            sock.bind(client_path)
        sock.sendto(payload, server.server_address)
        return sock.recv(65536)


def process_states(pids: set[int] | None = None) -> dict[int, tuple[int, str]]:
    """``pid -> (ppid, state)`` for every process visible in /proc."""
    states = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        states[int(entry)] = (int(fields[1]), fields[0])
    return states


def descendants() -> dict[int, str]:
    """``pid -> state`` of every descendant of this test process."""
    states = process_states()
    found: dict[int, str] = {}
    frontier = {os.getpid()}
    while frontier:
        children = {pid for pid, (ppid, _) in states.items() if ppid in frontier}
        children -= found.keys()
        for pid in children:
            found[pid] = states[pid][1]
        frontier = children
    return found


def zombies() -> set[int]:
    return {pid for pid, state in descendants().items() if state == "Z"}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that are open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def timed_requests(
    server: Any, count: int, seconds: float, how: str
) -> list[tuple[int, float, float]]:
    """Run ``count`` Timed requests at once; return ``(pid, start, end)`` each."""
    with ThreadPoolExecutor(count) as pool:
        replies = list(
            pool.map(lambda _: ask(server, b"%r %s\n" % (seconds, how.encode())), range(count))
        )
    results = []
    for reply in replies:
        pid, start, end = reply.split()
        results.append((int(pid), float(start), float(end)))
    return results


def forking_class(ss: Any, base: str) -> type:
    """``ss.Forking<base>``; the stdlib has the Unix ones only from Python 3.12."""
    cls = getattr(ss, "Forking" + base, None)
    if cls is None:
        cls = type("Forking" + base, (ss.ForkingMixIn, getattr(ss, base)), {})
    return cls


@contextlib.contextmanager
def forking_server(
    ss: Any, kind: str, name: str, unix_path: str, **attributes: Any
) -> Iterator[Any]:
    """A serving forking server of ``kind`` (tcp, udp, unix, unixdgram) with handler ``name``."""
    classes = {
        "tcp": (ss.ForkingTCPServer, ANY_PORT),
        "udp": (ss.ForkingUDPServer, ANY_PORT),
        "unix": (forking_class(ss, "UnixStreamServer"), unix_path),
        "unixdgram": (forking_class(ss, "UnixDatagramServer"), unix_path),
    }
    server_class, address = classes[kind]
    with server_class(address, handler(ss, name)) as server:
        for attribute, value in attributes.items():
            setattr(server, attribute, value)
        with serve_in_thread(server):
            yield server


@pytest.fixture(autouse=True)
def no_zombies_left() -> Iterator[None]:
    """Every test leaves no zombie descendant behind."""
    yield
    assert wait_until(lambda: not zombies(), WAIT_FORK), zombies()


# -- the API -------------------------------------------------------------------


def test_api(ss):
    assert ss.ForkingMixIn.max_children == 40
    assert ss.ForkingMixIn.timeout == 300
    assert ss.ForkingMixIn.active_children is None
    assert ss.ForkingMixIn.block_on_close is True
    for name, base in (
        ("ForkingTCPServer", ss.TCPServer),
        ("ForkingUDPServer", ss.UDPServer),
        ("ForkingUnixStreamServer", ss.UnixStreamServer),
        ("ForkingUnixDatagramServer", ss.UnixDatagramServer),
    ):
        cls = getattr(ss, name, None)
        if cls is None and ss.__name__ == "socketserver" and sys.version_info < (3, 12):
            continue  # new in the stdlib's 3.12; ours has them on every version
        assert cls.__mro__[1:3] == (ss.ForkingMixIn, base)
        assert name in ss.__all__
    assert "ForkingMixIn" in ss.__all__


# -- echo on every socket kind ------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_stream_echo(ss, kind, unix_path):
    with forking_server(ss, kind, "Echo", unix_path) as server:
        pids = set()
        for n in range(3):
            payload = b"".join(b"line %d-%d\n" % (n, i) for i in range(100))
            reply = ask(server, payload)
            assert reply.startswith(payload)
            pids.add(int(reply[len(payload) :].split()[1]))
        assert os.getpid() not in pids
        assert len(pids) == 3, "each request runs in a process of its own"
        assert isinstance(server.active_children, set)


@pytest.mark.parametrize("kind", ["udp", "unixdgram"])
def test_datagram_echo(ss, kind, unix_path, tmp_path):
    with forking_server(ss, kind, "DatagramEcho", unix_path) as server:
        pids = set()
        for n in range(3):
            client_path = str(tmp_path / f"c{n}") if kind == "unixdgram" else None
            data, _, pid = ask_datagram(server, b"packet %d" % n, client_path).partition(b"|")
            assert data == b"packet %d" % n
            pids.add(int(pid))
        assert os.getpid() not in pids and len(pids) == 3


# -- isolation ---------------------------------------------------------------------


def test_state_isolation(ss, unix_path):
    with forking_server(ss, "tcp", "State", unix_path) as server:
        replies = [ask(server, b"").split() for _ in range(3)]
        # Each request saw the module global as imported and the server without
        # what earlier requests set on it.
        assert [(counter, seen) for _, counter, seen in replies] == [(b"1", b"None")] * 3
        assert not hasattr(server, "touched_by")
    assert forking_handlers.COUNTER == 0


def test_crash_isolation(ss, unix_path, capfd):
    with forking_server(ss, "tcp", "Crash", unix_path) as server:
        for command in (b"exit", b"raise", b"kill"):
            assert ask(server, command + b"\n") == b""
            reply = ask(server, b"after-" + command + b"\n").split()
            assert reply[0] == b"after-" + command
        assert wait_until(lambda: (server.collect_children(), not server.active_children)[1])
    err = capfd.readouterr().err
    # handle_error ran in the request's process, and only for the exception.
    assert err.count("ValueError: handler failed on purpose") == 1
    assert "Exception occurred during processing of request from" in err


# -- concurrency ----------------------------------------------------------------------


def test_max_children(ss, unix_path):
    with forking_server(ss, "tcp", "Timed", unix_path, max_children=2) as server:
        results = timed_requests(server, 6, 0.3, "sleep")
    assert len({pid for pid, _, _ in results}) == 6
    assert max_overlap([(start, end) for _, start, end in results]) == 2


def test_cpu_bound_requests_run_in_parallel(ss, unix_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    with forking_server(ss, "tcp", "Timed", unix_path) as server:
        timed_requests(server, 2, 0.01, "cpu")  # warm
        results = timed_requests(server, 2, 0.5, "cpu")
    (_, start1, end1), (_, start2, end2) = results
    overlap = min(end1, end2) - max(start1, start2)
    assert overlap > 0.25, results


# -- closing ------------------------------------------------------------------------------


def slow_request(server: Any, seconds: float) -> tuple[socket.socket, bytes]:
    """Start a Slow request and wait until its handler runs; return the socket."""
    sock = connect_to(server, timeout=WAIT_FORK)
    sock.sendall(b"%r\n" % seconds)
    sock.shutdown(socket.SHUT_WR)
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed before the handler started"
        line += chunk
    return sock, line


@pytest.mark.parametrize("block_on_close", [True, False])
def test_server_close_and_block_on_close(ss, unix_path, block_on_close):
    server = ss.ForkingTCPServer(ANY_PORT, handler(ss, "Slow"))
    server.block_on_close = block_on_close
    try:
        with serve_in_thread(server):
            sock, line = slow_request(server, 0.8)
            assert line == b"started\n"
            child_pids = set(server.active_children or ())
    finally:
        started = time.monotonic()
        server.server_close()
        took = time.monotonic() - started
    with sock:
        assert recv_all(sock) == b"done\n", "the request finishes either way"
    if block_on_close:
        assert took > 0.5, took
    else:
        assert took < 0.5, took
        if ss.__name__ == "socketserver":
            # The stdlib leaves its running children to a later collect_children().
            for pid in child_pids:
                os.waitpid(pid, 0)


def test_server_close_stops_every_process(tx, unix_path):
    before = set(descendants())
    with forking_server(tx, "tcp", "Echo", unix_path) as server:
        ask(server, b"x\n")
        assert set(descendants()) - before, "a template process runs while serving"
    # Template and children are gone (what ran before may have ended too).
    assert wait_until(lambda: set(descendants()) <= before), (descendants(), before)


def test_template_killed_from_outside_is_replaced(tx, unix_path):
    with forking_server(tx, "tcp", "Echo", unix_path) as server:
        assert ask(server, b"a\n").startswith(b"a\npid ")
        template = server._forking_dispatcher._template
        os.kill(template.protocol.transport.pid, signal.SIGKILL)
        assert template.ended.wait(WAIT_FORK)
        assert ask(server, b"b\n").startswith(b"b\npid ")


def test_a_request_goes_straight_to_an_idle_child(tx, unix_path):
    # The server holds the idle children's sockets: a request reaches one
    # with the template stopped, crossing one process boundary.
    with forking_server(tx, "tcp", "Echo", unix_path) as server:
        assert ask(server, b"a\n").startswith(b"a\npid ")
        template = server._forking_dispatcher._template
        idle = {pid for pid, _end in list(template.idle)}
        assert idle, "the server holds idle children"
        os.kill(template.protocol.transport.pid, signal.SIGSTOP)
        try:
            reply = ask(server, b"b\n")
        finally:
            os.kill(template.protocol.transport.pid, signal.SIGCONT)
        assert reply.startswith(b"b\npid ")
        assert int(reply.split()[2]) in idle, (reply, idle)


def test_idle_children_killed_from_outside_are_passed_over(tx, unix_path):
    with forking_server(tx, "tcp", "Echo", unix_path) as server:
        assert ask(server, b"a\n").startswith(b"a\npid ")
        idle = [pid for pid, _end in list(server._forking_dispatcher._template.idle)]
        assert idle
        for pid in idle:
            os.kill(pid, signal.SIGKILL)
        wait_for_exit(idle, timeout=WAIT_FORK)
        for payload in (b"b\n", b"c\n", b"d\n", b"e\n", b"f\n"):
            reply = ask(server, payload)
            assert reply.startswith(payload + b"pid "), reply
            assert int(reply.split()[2]) not in idle


KILLED_SERVER_SCRIPT = """
    import sys
    sys.path.insert(0, {src!r})
    sys.path.insert(0, {tests!r})
    import txsocketserver
    import forking_handlers

    server = txsocketserver.ForkingTCPServer(("127.0.0.1", 0), forking_handlers.TxEcho)
    print(server.server_address[1], flush=True)
    server.serve_forever()
"""


def test_server_process_killed_leaves_no_process_and_no_noise(tmp_path):
    # The template sees the channel end (reset, with status lines unread)
    # and exits quietly, its idle children with it.
    script = tmp_path / "killed_server.py"
    script.write_text(textwrap.dedent(KILLED_SERVER_SCRIPT.format(src=SRC, tests=HERE)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        port = int(proc.stdout.readline())
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_FORK) as sock:
                sock.sendall(b"x\n")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock).startswith(b"x\npid ")
        spawned = [pid for pid, (ppid, _state) in process_states().items() if ppid == proc.pid]
        assert spawned, "the template runs"
    finally:
        proc.kill()
        # End of file on stderr: the template and its children have closed it,
        # which they do on their way out, an instant before they have exited.
        _out, err = proc.communicate(timeout=WAIT_FORK)
    assert err == b""
    wait_for_exit(spawned, timeout=WAIT_FORK)
    assert all(process_states().get(pid, (0, "Z"))[1] == "Z" for pid in spawned)


def wait_for_exit(pids: list[int], timeout: float) -> None:
    """Wait until each process has exited (a zombie or gone), at most ``timeout``.

    A pidfd becomes readable when its process exits: an event to wait on for
    processes that are not our children.
    """
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
        finally:
            os.close(pidfd)


# -- resources ---------------------------------------------------------------------------


def test_no_zombies_or_fds_after_many_requests_with_errors(ss, unix_path, capfd):
    with forking_server(ss, "tcp", "Crash", unix_path):
        pass  # starts whatever lives for the whole process (the reactor)
    baseline = fd_count()
    commands = [b"raise", b"exit", b"ok", b"ok", b"ok"] * 100

    with forking_server(ss, "tcp", "Crash", unix_path) as server:

        def one(command: bytes) -> bytes:
            return ask(server, command + b"\n")

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, commands))
    assert [r.split()[0] if r else b"" for r in replies] == [
        b"ok" if c == b"ok" else b"" for c in commands
    ]
    assert zombies() == set()
    assert wait_until(lambda: fd_count() <= baseline, WAIT_FORK), (fd_count(), baseline)
    assert capfd.readouterr().err.count("ValueError: handler failed on purpose") == 100


def test_foreign_children_are_not_reaped(tx, unix_path):
    # Ours only: above max_children the stdlib's collect_children() calls
    # waitpid(-1), which reaps whatever child exits first, the test's own
    # ones included. Not reaping them is an improvement we promise.
    ss = tx
    before = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    try:
        with forking_server(ss, "tcp", "Echo", unix_path, max_children=3) as server:
            during = subprocess.Popen(
                [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(9)"]
            )
            try:
                with ThreadPoolExecutor(6) as pool:
                    list(pool.map(lambda _: ask(server, b"x\n"), range(12)))
            finally:
                assert during.wait(WAIT_FORK) == 9
    finally:
        assert before.wait(WAIT_FORK) == 7


def run_ok_script(script: str, timeout: float) -> None:
    """Run *script* (``{src}`` standing for the source directory) in a fresh
    interpreter; it must exit 0 having printed exactly ``ok``."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script.format(src=SRC))],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


TEMPLATE_REAPS_ONLY_ITS_OWN = """
    import os, socket, subprocess, sys, time
    sys.path.insert(0, {src!r})
    from txsocketserver._forking import template as _forking_child

    # A child of the template's that is none of its request children (a handler module may start
    # one at import): it exits first, and must stay for its owner to reap.
    foreign = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(5)"])
    # Until it has exited, without reaping it.
    os.waitid(os.P_PID, foreign.pid, os.WEXITED | os.WNOWAIT)
    ours, theirs = socket.socketpair()
    template = _forking_child._Template(ours, warm=2)
    template._fill()
    # The idle children's sockets come to the server's end of the channel.
    lines, ends = _forking_child.receive_fds(theirs, 1 << 16)
    pids = [int(line.split()[1]) for line in lines.splitlines()]
    assert sorted(pids) == sorted(template.idle) and len(ends) == 2, (lines, ends)
    os.close(ends[0])  # end of file: this idle child exits unused
    deadline = time.monotonic() + 20
    while pids[0] in template.idle and time.monotonic() < deadline:
        time.sleep(0.01)
        template._reap()
    assert pids[0] not in template.idle, "the child was reaped"
    assert foreign.wait(20) == 5, "the foreign child was left to its owner"
    os.close(ends[1])
    while template.idle and time.monotonic() < deadline:
        time.sleep(0.01)
        template._reap()
    assert not template.idle
    print("ok")
"""


def test_template_reaps_only_its_workers():
    run_ok_script(TEMPLATE_REAPS_ONLY_ITS_OWN, timeout=WAIT_FORK * 2)


def test_parent_state_changes_reach_later_requests(ss, unix_path):
    # What os.fork gives: each request's process sees the server as the parent
    # has it at that moment, and never what an earlier request changed on it.
    with forking_server(ss, "tcp", "State", unix_path) as server:
        seen = []
        for value in ("parent-1", "parent-1", "parent-2", "parent-2"):
            server.touched_by = value
            seen.append(ask(server, b"").split()[2])
        assert seen == [b"parent-1", b"parent-1", b"parent-2", b"parent-2"]
        assert server.touched_by == "parent-2"
        # A change made inside a mutable attribute reaches the next request too.
        server.touched_by = ["parent-3"]
        assert ask(server, b"").split(maxsplit=2)[2] == b"['parent-3']\n"
        server.touched_by.append("parent-4")
        assert ask(server, b"").split(maxsplit=2)[2] == b"['parent-3', 'parent-4']\n"


# -- what the child carries -------------------------------------------------------------

# Every fork copies the page tables of the template's memory, and every child
# copies the pages it writes: a template that imported Twisted and
# zope.interface (some 20 MB) makes each request cost about twice the CPU.
IMPORT_LIGHT_SCRIPT = """
    import sys
    sys.path.insert(0, {src!r})
    # What the interpreter loaded at start-up (site may import more here
    # than elsewhere) is not the package's doing.
    preloaded = set(sys.modules)
    import txsocketserver

    class Server(txsocketserver.ForkingTCPServer):
        pass

    class Handler(txsocketserver.StreamRequestHandler):
        pass

    heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("twisted", "zope"))
    assert not heavy, heavy
    # Nor what socketserver does without (each costs every fork a megabyte),
    # nor threading (its at-fork hook runs in every child).
    heavy = {{"typing", "logging", "traceback", "pickle", "threading"}}
    extra = heavy & (set(sys.modules) - preloaded)
    assert not extra, extra
    # The Twisted world's names are there all the same, loaded on first use.
    assert "start_server" in dir(txsocketserver)
    assert txsocketserver.Endpoint("tcp:0").description == "tcp:0"
    from txsocketserver import *
    assert ServerService.__module__ == "txsocketserver._twisted.service"
    print("ok")
"""


def test_importing_the_package_loads_no_twisted():
    run_ok_script(IMPORT_LIGHT_SCRIPT, timeout=WAIT_FORK)


def test_children_import_no_twisted(tx, unix_path):
    with forking_server(tx, "tcp", "Modules", unix_path) as server:
        assert ask(server, b"") == b"loaded: \n"


# -- where the handler class lives -----------------------------------------------------


MAIN_SCRIPT = """
    import socket, sys, threading
    sys.path.insert(0, {src!r})
    import socketserver
    import txsocketserver
    ss = txsocketserver if sys.argv[1] == "tx" else socketserver

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"main says " + self.rfile.readline())

    if __name__ == "__main__":
        with ss.ForkingTCPServer(("127.0.0.1", 0), Handler) as server:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,))
            thread.start()
            with socket.create_connection(server.server_address, timeout=20) as sock:
                sock.sendall(b"hello\\n")
                sys.stdout.write(sock.makefile("rb").readline().decode())
            server.shutdown()
            thread.join()
"""


def test_handler_defined_in_main_script(ss, tmp_path):
    script = tmp_path / "main_handler.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT.format(src=SRC)))
    which = "tx" if ss.__name__ == "txsocketserver" else "stdlib"
    result = subprocess.run(
        [sys.executable, str(script), which],
        capture_output=True,
        text=True,
        timeout=WAIT_FORK * 2,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "main says hello\n"


def test_tls_sockets_cannot_be_handed_over(tx, tls_cert, capfd):
    """A request that get_request wrapped in TLS cannot cross processes: it gets
    handle_error and is closed, and the server keeps serving."""
    with forking_handlers.TLSOnceServer(ANY_PORT, handler(tx, "Echo")) as server:
        server.cert = tls_cert
        with serve_in_thread(server):
            assert ask(server, b"a\n") == b""
            assert ask(server, b"b\n").startswith(b"b\npid ")
    assert "cannot be handed to another process" in capfd.readouterr().err


def test_endpoint_descriptions_that_are_sockets_fork(tx, unix_path):
    """tcp:, tcp6: and unix: descriptions are served on the server's own
    socket, so their connections can be handed to children."""
    for description in (f"tcp:0:interface={ANY_PORT[0]}", f"unix:{unix_path}"):
        endpoint = tx.Endpoint(description)
        with tx.ForkingTCPServer(endpoint, handler(tx, "Echo")) as server:
            with serve_in_thread(server):
                assert ask(server, b"forked\n").startswith(b"forked\npid ")
