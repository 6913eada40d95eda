"""What a forked request's process gets of the server (``_forking/carry.py``).

The stdlib's child is a copy of the server process.  Ours, by default, is
forked from a template that imported the modules afresh: the classes'
attributes as the program set them, the server's attributes by value or by
name, and the program's ``socketserver`` binding must reach it all the same
(``docs/forking.md``, *What the child gets*).  Same scenario, stdlib and
ours (both ways of forking), same reply.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import forking_handlers
from forking_handlers import handler
from support import ANY_PORT, connect_to, recv_all, serve_in_thread

WAIT_FORK = 20.0
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


@pytest.fixture(params=["stdlib", "tx", "tx-fork-from-server"])
def ss(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stdlib, ours, and ours with ``fork_from = "server"``."""
    import socketserver

    import txsocketserver

    if request.param == "stdlib":
        return socketserver
    if request.param == "tx-fork-from-server":
        monkeypatch.setattr(txsocketserver.ForkingMixIn, "fork_from", "server")
    return txsocketserver


def ask(server: Any, payload: bytes = b"") -> bytes:
    with connect_to(server, timeout=WAIT_FORK) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


@contextlib.contextmanager
def class_state_server(ss: Any) -> Iterator[Any]:
    with ss.ForkingTCPServer(ANY_PORT, handler(ss, "ClassState")) as server:
        with serve_in_thread(server):
            yield server


def test_class_attributes_set_at_run_time_reach_the_child(ss):
    # werkzeug's server __init__ sets WSGIRequestHandler.protocol_version:
    # the same, on a handler class that a new process imports by name.
    handler_class = handler(ss, "ClassState")
    table = forking_handlers._ClassState.table
    try:
        with class_state_server(ss) as server:
            assert ask(server) == b"as defined defined NoneType False\n"
            handler_class.greeting = b"set-at-run-time"
            assert ask(server) == b"set-at-run-time defined NoneType False\n"
            # Changed in place, a class-level dict of a base class.
            table["added"] = 2
            assert ask(server) == b"set-at-run-time added,defined NoneType False\n"
            del table["added"]
            handler_class.greeting = b"again"
            assert ask(server) == b"again defined NoneType False\n"
            # Deleted: the inherited value shows again.
            del handler_class.greeting
            assert ask(server) == b"as defined defined NoneType False\n"
    finally:
        table.pop("added", None)
        if "greeting" in vars(handler_class):
            del handler_class.greeting


def test_server_class_attributes_set_at_run_time_reach_the_child(ss):
    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(repr(type(self.server).setting).encode())

    server_class = type("Server", (ss.ForkingTCPServer,), {"setting": "defined"})
    with server_class(ANY_PORT, Handler) as server, serve_in_thread(server):
        assert ask(server) == b"'defined'"
        server_class.setting = "changed"
        assert ask(server) == b"'changed'"


def test_an_object_that_does_not_pickle_reaches_the_child_by_name(ss):
    # A module-level object of an importable module: the child's is the one
    # its import made, as multiprocessing's spawn finds it.
    with class_state_server(ss) as server:
        server.registry = forking_handlers.REGISTRY
        assert ask(server) == b"as defined defined Registry True\n"


def test_an_attribute_that_cannot_reach_the_child_is_named_once(tx):
    # Ours only: the stdlib's child has everything.  A lock held by the
    # server neither pickles nor has a name: a warning, at the first request
    # that forks, naming it, its type, why, and what to do; the requests run
    # without it.
    with class_state_server(tx) as server:
        server.registry = forking_handlers.Registry()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert ask(server) == b"as defined defined NoneType False\n"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    message = messages[0]
    assert "'registry' (a forking_handlers.Registry)" in message
    assert "TypeError: cannot pickle '_thread.lock' object" in message
    assert "module-level global" in message
    assert 'fork_from = "server"' in message
    assert "_serving_process_only" in message


def test_what_is_kept_back_knowingly_draws_no_warning(tx):
    server_class = type(
        "Server",
        (tx.ForkingTCPServer,),
        {"_serving_process_only": ("registry",)},
    )
    with server_class(ANY_PORT, handler(tx, "ClassState")) as server:
        server.registry = forking_handlers.Registry()
        with serve_in_thread(server), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert ask(server) == b"as defined defined NoneType False\n"


MAIN_BY_NAME = """
    import socket, sys, threading
    sys.path.insert(0, {src!r})
    import socketserver
    import txsocketserver
    ss = txsocketserver if sys.argv[1] == "tx" else socketserver

    class Pool:
        def __init__(self):
            self.lock = threading.Lock()  # does not pickle
            self.name = "pool of " + __name__

    POOL = Pool()

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.server.pool.name.encode() + b"\\n")

    if __name__ == "__main__":
        with ss.ForkingTCPServer(("127.0.0.1", 0), Handler) as server:
            server.pool = POOL
            thread = threading.Thread(target=server.serve_forever, args=(0.05,))
            thread.start()
            for _ in range(2):
                with socket.create_connection(server.server_address, timeout=20) as sock:
                    sys.stdout.write(sock.makefile("rb").readline().decode())
            server.shutdown()
            thread.join()
"""


def test_an_object_of_the_main_script_reaches_the_child_by_name(ss, tmp_path):
    # As multiprocessing's spawn: the template runs the main script again,
    # as __mp_main__ (its main guard does not run), and takes POOL from it.
    script = tmp_path / "main_by_name.py"
    script.write_text(textwrap.dedent(MAIN_BY_NAME.format(src=SRC)))
    which = "stdlib" if ss.__name__ == "socketserver" else "tx"
    result = subprocess.run(
        [sys.executable, str(script), which],
        capture_output=True,
        text=True,
        timeout=WAIT_FORK * 2,
    )
    assert result.returncode == 0, result.stderr
    name = "__main__" if which == "stdlib" else "__mp_main__"
    assert result.stdout == f"pool of {name}\n" * 2
    assert result.stderr == ""


UNGUARDED_MAIN = """
    import sys, threading
    sys.path.insert(0, {src!r})
    import txsocketserver

    POOL = threading.Lock()

    class Handler(txsocketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"pool: %s\\n" % str(hasattr(self.server, "pool")).encode())

    # No main guard: the template, running this script again to find POOL,
    # would start a server of its own, and a template for it, and so on.
    server = txsocketserver.ForkingTCPServer(("127.0.0.1", 0), Handler)
    server.pool = POOL
    print(server.server_address[1], flush=True)
    server.handle_request()
    server.server_close()
"""


def test_a_main_script_without_a_guard_is_refused_in_the_template(tx, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(UNGUARDED_MAIN.format(src=SRC)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_FORK) as sock:
            sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
        _out, err = proc.communicate(timeout=WAIT_FORK)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert reply == b"pool: False\n"
    assert 'Start it under an "if __name__ == \'__main__\':" guard' in err
    assert "cannot find __main__.POOL" in err


ALIASED = """
    import socket, sys, threading
    sys.path.insert(0, {src!r})
    sys.path.insert(0, {here!r})
    if sys.argv[1] == "tx":
        import txsocketserver
        sys.modules["socketserver"] = txsocketserver
    import socketserver
    import aliased_handler

    if __name__ == "__main__":
        server = socketserver.ForkingTCPServer(("127.0.0.1", 0), aliased_handler.Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,))
        thread.start()
        with socket.create_connection(server.server_address, timeout=20) as sock:
            sys.stdout.write(sock.makefile("rb").readline().decode())
        server.shutdown()
        thread.join()
        server.server_close()
"""

ALIASED_HANDLER = """
    import socketserver
    import sys

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            bound = sys.modules["socketserver"].__name__
            base = socketserver.StreamRequestHandler.__module__
            self.wfile.write(f"{bound} {base}\\n".encode())
"""


@pytest.mark.parametrize("which", ["stdlib", "tx"])
def test_the_programs_socketserver_binding_holds_in_the_child(which, tmp_path):
    (tmp_path / "aliased_handler.py").write_text(textwrap.dedent(ALIASED_HANDLER))
    script = tmp_path / "aliased.py"
    script.write_text(textwrap.dedent(ALIASED.format(src=SRC, here=str(tmp_path))))
    result = subprocess.run(
        [sys.executable, str(script), which],
        capture_output=True,
        text=True,
        timeout=WAIT_FORK * 2,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "stdlib": "socketserver socketserver\n",
        "tx": "txsocketserver txsocketserver._core.handlers\n",
    }
    assert result.stdout == expected[which]


def test_the_state_is_pickled_again_only_when_it_changed(tx):
    # Ours only, the cost side: unchanged class state is the same tuple,
    # so that the installed state's pickle serves again.
    from txsocketserver._forking.carry import Carrier

    handler_class = handler(tx, "ClassState")
    with tx.ForkingTCPServer(ANY_PORT, handler_class, bind_and_activate=False) as server:
        carrier = Carrier()
        first = carrier.class_state(server)
        assert carrier.class_state(server) is first
        forking_handlers._ClassState.table["added"] = 2
        try:
            second = carrier.class_state(server)
        finally:
            del forking_handlers._ClassState.table["added"]
        assert second is not first
        assert carrier.class_state(server) is not second  # changed back
    entries = dict(first)[forking_handlers._ClassState]
    assert entries == {"greeting": b"as defined", "table": {"defined": 1}}


def test_a_lock_on_a_handler_class_is_the_templates_own(tx):
    # A class attribute that does not pickle, on a class a new process
    # imports by name, is as the template's import made it: no warning.
    assert isinstance(forking_handlers.REGISTRY.lock, type(threading.Lock()))
    with class_state_server(tx) as server, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        type(server).lock_for_test = threading.Lock()
        try:
            assert ask(server) == b"as defined defined NoneType False\n"
        finally:
            del type(server).lock_for_test


def test_an_attribute_rebound_to_another_type_is_decided_again(tx):
    # Ours only, the cost side: the decisions are taken again when the
    # attributes' names or types change, not only the first time.
    from txsocketserver._forking.carry import Carrier

    handler_class = handler(tx, "ClassState")
    with tx.ForkingTCPServer(ANY_PORT, handler_class, bind_and_activate=False) as server:
        carrier = Carrier()
        server.extra = 1
        assert carrier.child_state(server)["extra"] == 1
        server.extra = 2
        assert carrier.child_state(server)["extra"] == 2
        server.extra = threading.Lock()  # does not pickle, no module holds it
        with pytest.warns(RuntimeWarning, match="'extra'"):
            assert "extra" not in carrier.child_state(server)
        server.extra = "again"
        server.added = (1, "two")
        state = carrier.child_state(server)
        assert (state["extra"], state["added"]) == ("again", (1, "two"))
        del server.added
        assert "added" not in carrier.child_state(server)


def test_a_method_rebound_on_a_class_is_seen(tx):
    from txsocketserver._forking.carry import Carrier

    handler_class = handler(tx, "ClassState")
    with tx.ForkingTCPServer(ANY_PORT, handler_class, bind_and_activate=False) as server:
        carrier = Carrier()
        first = carrier.class_state(server)

        def finish(self: Any) -> None:
            pass

        handler_class.finish = finish
        try:
            second = carrier.class_state(server)
        finally:
            del handler_class.finish
        assert second is not first
        assert dict(second)[handler_class]["finish"] is finish
        assert "finish" not in dict(carrier.class_state(server)).get(handler_class, {})


@pytest.mark.parametrize(
    "address",
    [("127.0.0.1", 5), ("::1", 5, 0, 0), "/run/a.sock", ("host", 5.0), (handler, 1)],
)
@pytest.mark.parametrize("children", [None, set(), {3, 4}, {3, "4"}])
def test_a_requests_message_pickles_as_cloudpickle_would(address, children):
    # The C pickler alone for plain requests, the carrying pickler
    # otherwise: the same bytes and fds either way.
    from txsocketserver._forking.carry import carry, carry_request

    volatile = {} if children is None else {"active_children": children}
    one, two = socket.socketpair()
    with one, two:
        args = (one, address)
        assert carry_request(volatile, "method", args) == carry((None, volatile, "method", args))
