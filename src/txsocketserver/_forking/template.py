# -*- test-case-name: tests.test_forking,tests.test_forking_carry,tests.test_layout -*-
"""The process side of ``ForkingMixIn``: the wire format and the child template.

The whole path of a forked request is in ``docs/architecture.md``; what
follows is what editing this module needs.

A forking server owns one *template* process, started with Twisted's
``reactor.spawnProcess`` (``_forking.dispatcher``).  The template is a fresh
interpreter that imports the server's and the handler's modules once (or
rebuilds the classes that were carried by value, ``_forking.by_value``),
then forks a few idle *children* ahead of need (``warm_children``), each
waiting on a socketpair of its own, and hands the server the other end of
each.  The server sends each request straight to one idle child, which runs
that one request and exits; the template forks replacements, off the
request's path.  The template never runs a request itself, so every child
starts from the same pristine state: nothing a request changes reaches the
parent, the template or any other request, and a child that crashes takes
only its own request with it.

File descriptors of the template (fixed numbers, set up by ``spawnProcess``):

* 0: ``/dev/null``-like stdin (the parent closes its end at once);
* 1, 2: the parent's own stdout and stderr, so handler output and the
  tracebacks of ``handle_error`` land where the stdlib's forked children
  would put them;
* 3 (:data:`CHANNEL_FD`): one end of a Unix stream socketpair.  The parent
  sends *messages* on it (the format of the requests it sends the children
  too): a header (tag, body length, number of fds), the fds themselves as
  ``SCM_RIGHTS`` ancillary data on the header, then a body.  Tag 0 is the
  start-up spec, :data:`INSTALL_TAG` a server state to install (see below),
  :data:`TAKEN_TAG` the pids of idle children the server has sent a request
  to (told once half of them are taken, for the template to fork their
  replacements in a row).  End of file means the server has closed: the template reaps its
  children, then exits.  The template sends back, on the same socket, one
  short line per event: ``C <pid> <state number>`` with the socket of a new
  idle child attached (the fds of a message come in the order of its
  lines; the state number counts the installs, so that the server drops
  the sockets of children forked before its last install), ``E <pid> <exit
  code>`` (a child was reaped; a negative code is the signal that killed
  it); the server's serving thread reads them when it needs them.
* 4 (:data:`STATUS_FD`): a pipe to the parent's ``ProcessProtocol``, on
  the reactor thread: one ``R`` line once the template is ready, then
  nothing; its end of file tells the reactor that the template is exiting.

Who reaps whom: the parent's reactor reaps exactly the template (Twisted's
``reapProcess`` waits on its pid alone); the template reaps exactly its own
children, by pid (it may ask which child has exited first, with ``waitid``'s
``WNOWAIT``, which reaps nothing).  Nothing ever calls ``waitpid(-1)``, so a
child that some other part of the program started is never reaped behind its
back.

A request body is the pickle of ``(make_server, make_server_args,
method_name, args)``: the child builds its server object with the first two
and calls the named method of it with *args*.  With ``make_server`` None, the
child uses the server object that the template built from the last
:data:`INSTALL_TAG` message (body: the pickle of ``(make_server,
make_server_args)``), updated with the dict in the second place: that spares
each child unpickling the state and building the object, which costs it page
copies (its pages are shared copy-on-write with the template) as much as CPU.
Sockets anywhere in it (the
accepted connection, a datagram server's socket, the server's own ``socket``
attribute) are pickled as references to one of the message's fds, and
rebuilt in the child as ``socket.socket`` objects on those fds; the same
socket object in the parent is the same object in the child.
"""

from __future__ import annotations

import _pickle
import _signal  # type: ignore[import-not-found]  # no stub: signal's C half
import _socket
import gc
import io
import os
import select
import signal
import socket
import struct
import sys

# What the template imports, every child carries and every fork copies:
# _pickle rather than pickle (which imports re), no typing, and traceback
# imported where it is used; cloudpickle only by a pickle that needs it.
from txsocketserver._core.base import BaseServer
from txsocketserver._forking import by_value as _by_value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHANNEL_FD = 3
STATUS_FD = 4

# tag, body length, number of fds.
_HEADER = struct.Struct("!QII")
# Most fds one message may carry: a request needs two (the connection and the
# server's socket); the kernel's own limit (SCM_MAX_FD) is 253.
MAX_FDS = 16
SPEC_TAG = 0
# A message that installs the server's state in the template (see
# ``_Template._install``) rather than carrying a request.
INSTALL_TAG = (1 << 64) - 1
# A message saying that the server took the idle children whose pids are its
# body (separated by spaces).
TAKEN_TAG = INSTALL_TAG - 1
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# waitid() flags naming an exited child without reaping it (no waitid on macOS).
_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT if hasattr(os, "waitid") else None


# -- the wire format (used by both sides) ------------------------------------


class SocketPickler(_pickle.Pickler):
    """A pickler that turns every ``socket.socket`` it meets into an fd to pass.

    After ``dump()``, :attr:`fds` lists the file descriptors to send with the
    message, in the order the pickle refers to them.  A socket is reduced to
    a call of :func:`_socket_from_message` with its fd's index: a
    ``reducer_override``, which the C pickler consults only for objects of
    classes it does not know (a persistent id function would be called for
    every object, each int and str included).

    Error handling:
        ``TypeError`` for a socket that cannot cross a process boundary: a
        closed one, or an ``ssl.SSLSocket`` (its TLS state lives in this
        process's memory).
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=-1)  # the highest
        self.fds: list[int] = []

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, socket.socket):
            return NotImplemented
        return reduce_socket(self.fds, obj)


def reduce_socket(fds: list[int], obj: socket.socket) -> Any:
    """The reduction of *obj* to the index of its fd in *fds* (appended to it).

    The pickler's memo makes a second reference to the same socket a
    reference to the first one's result: one fd, one object there too.

    Error handling:
        ``TypeError`` for a socket that cannot cross a process boundary.
    """
    if type(obj) is not socket.socket:
        if getattr(obj, "for_child", None) is not None:
            # An ssl: server's connection: its child does the handshake.
            from txsocketserver._forking.tls import reduce_for_child

            return reduce_for_child(fds, obj)
        # ssl.SSLSocket, say: its TLS state lives in this process, and
        # the bare fd would speak cleartext.
        raise TypeError(
            f"a {type(obj).__name__} cannot be handed to another process, only a "
            "plain socket.socket can; ForkingMixIn cannot serve a request that "
            "is wrapped in TLS by a get_request() of its own (an ssl: endpoint's "
            "connections cross: the child does their handshake)"
        )
    return reduce_fd(fds, obj)


def reduce_fd(fds: list[int], obj: socket.socket) -> Any:
    """The reduction of *obj* to its fd alone (appended to *fds*)."""
    fd = obj.fileno()
    if fd < 0:
        raise TypeError(f"cannot hand a closed socket to another process: {obj!r}")
    fds.append(fd)
    # The C-level attributes: socket.socket's own properties convert them
    # to enums, a dozen Python calls each.
    details = (_RAW_FAMILY.__get__(obj), _RAW_TYPE.__get__(obj), obj.proto, obj.gettimeout())
    return _socket_from_message, (len(fds) - 1, *details)


_RAW_FAMILY = _socket.socket.family
_RAW_TYPE = _socket.socket.type


def _socket_from_message(index: int, family: int, type_: int, proto: int, timeout: Any) -> Any:
    """What a pickled socket names; only :func:`loads_with_fds` can rebuild one."""
    raise _pickle.UnpicklingError("a socket passed as an fd can only be rebuilt by loads_with_fds")


def dumps_with_fds(obj: Any, pickler_class: Any = None) -> tuple[bytes, list[int]]:
    """Pickle *obj*; return the bytes and the fds of the sockets in it.

    *pickler_class* is :class:`SocketPickler` by default; the server process
    passes its own subclass of cloudpickle's pickler, which also carries
    classes by value and objects by name (``_forking.dispatcher``), and
    must keep a ``fds`` list the same way.

    Error handling:
        ``TypeError`` (or the pickler's own error) for what cannot be carried:
        a TLS socket, an object that does not pickle.
    """
    buffer = io.BytesIO()
    pickler = (pickler_class or SocketPickler)(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.fds


class _SocketUnpickler(_pickle.Unpickler):
    def __init__(self, file: io.BytesIO, fds: list[int]) -> None:
        super().__init__(file)
        self._fds = fds
        self.sockets: dict[int, socket.socket] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == _socket_from_message.__name__:
            return self._socket_from_message
        return _by_value.find(module, name) or super().find_class(module, name)

    def _socket_from_message(
        self, index: int, family: int, type_: int, proto: int, timeout: Any
    ) -> socket.socket:
        sock = socket.socket(family, type_, proto, fileno=self._fds[index])
        self.sockets[index] = sock
        # The O_NONBLOCK flag is shared with the parent's copy of the fd:
        # touch it only when the new object disagrees with the old one.
        if sock.gettimeout() != timeout:
            sock.settimeout(timeout)
        return sock


def loads_with_fds(data: bytes, fds: list[int]) -> Any:
    """Unpickle what :func:`dumps_with_fds` made, rebuilding sockets on *fds*."""
    return _SocketUnpickler(io.BytesIO(data), fds).load()


def send_message(sock: socket.socket, tag: int, body: bytes, fds: list[int]) -> None:
    """Send one message: header and fds in one ``sendmsg``, then the rest of the body.

    Error handling:
        ``ValueError`` if there are more than :data:`MAX_FDS` fds; ``OSError``
        (``EPIPE``...) if the other end is gone.
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"a request can carry at most {MAX_FDS} sockets, not {len(fds)}")
    header = _HEADER.pack(tag, len(body), len(fds))
    sent = socket.send_fds(sock, [header, body], fds, _SEND_FLAGS)
    if sent < len(header) + len(body):
        sock.sendall((header + body)[sent:], _SEND_FLAGS)


def receive_fds(sock: socket.socket, size: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """Receive up to *size* bytes and the fds that came with them (at most
    :data:`MAX_FDS`), close-on-exec in this process.

    ``socket.recv_fds`` would do, but before Python 3.13 it ignores *flags*.
    """
    data, ancillary, _flags, _address = sock.recvmsg(
        size, _socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), flags | _CLOSE_ON_EXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(struct.unpack(f"{usable // _FD_SIZE}i", payload[:usable]))
    return data, fds


_FD_SIZE = struct.calcsize("i")
_CLOSE_ON_EXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def receive_message(sock: socket.socket) -> tuple[int, bytes, list[int]] | None:
    """Receive one message: ``(tag, body, fds)``, or ``None`` at end of file.

    The caller owns the returned fds.
    """
    header, fds, _flags, _address = socket.recv_fds(sock, _HEADER.size, MAX_FDS)
    if not header:
        return None
    try:
        header += _receive_exactly(sock, _HEADER.size - len(header))
        tag, length, _count = _HEADER.unpack(header)
        return tag, _receive_exactly(sock, length), list(fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the channel closed in the middle of a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# -- the template process -------------------------------------------------------


def _print_exc() -> None:
    import traceback

    traceback.print_exc()


def _report_ready() -> None:
    try:
        os.write(STATUS_FD, b"R\n")
    except OSError:
        pass  # the server process is gone: the channel's end of file follows


def rebuild_server(
    server_class: type[BaseServer],
    state: dict[str, Any],
    class_state: tuple[tuple[type, dict[str, Any]], ...] = (),
) -> Any:
    """Build the child's server object; runs in the child (or the template).

    The classes imported here first get the attributes that the server
    process's classes hold now (*class_state*, see ``Carrier.class_state``
    in ``_forking.carry``: what the program set on them at run time, as
    after ``os.fork``).  Then ``BaseServer.__init__`` gives the
    object fresh private bookkeeping (it makes no socket: binding is
    ``TCPServer.__init__``'s job), and the parent's carried attributes (see
    ``Carrier.child_state``) are copied over.
    """
    _set_class_state(class_state)
    server = server_class.__new__(server_class)
    BaseServer.__init__(server, state.get("server_address"), state.get("RequestHandlerClass"))
    server.__dict__.update(
        (name, value) for name, value in state.items() if value is not NOT_FOUND
    )
    server._rebuilt_in_request_process()
    return server


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


_MISSING = object()
# (class, name) -> what the class held before the class state first set it:
# put back once the server process's class no longer has that entry.
_class_originals: dict[tuple[type, str], Any] = {}


def _set_class_state(class_state: tuple[tuple[type, dict[str, Any]], ...]) -> None:
    """Make the classes hold what the server process's hold (see ``rebuild_server``)."""
    wanted = {(klass, name) for klass, attributes in class_state for name in attributes}
    for klass, name in [key for key in _class_originals if key not in wanted]:
        original = _class_originals.pop((klass, name))
        if original is _MISSING:
            if name in vars(klass):
                delattr(klass, name)
        else:
            setattr(klass, name, original)
    for klass, attributes in class_state:
        own = vars(klass)
        for name, value in attributes.items():
            current = own.get(name, _MISSING)
            if value is NOT_FOUND or current is value:
                continue
            _class_originals.setdefault((klass, name), current)
            setattr(klass, name, value)


# True while the template runs the server process's main script (see
# find_by_name): a forking server that starts serving then is a main script
# without an ``if __name__ == "__main__":`` guard (ForkingMixIn refuses).
importing_main = False
# Where the server process's main script is: its path, or its module name
# (``python -m``); None for neither (``python -c``, an interactive session).
_main_script: tuple[str | None, str | None] = (None, None)


def find_by_name(module: str, qualname: str) -> Any:
    """The object that *module* holds under *qualname*: how an object that does
    not pickle, but that the server process found by name, is found here.

    ``__main__`` is the server process's main script, run here once under
    the name ``__mp_main__`` (not ``__main__``: the code under its
    ``if __name__ == "__main__":`` guard does not run), as
    multiprocessing's *spawn* runs it.
    """
    try:
        if module == "__main__":
            namespace = _main_module()
        else:
            __import__(module)
            namespace = sys.modules[module]
        found: Any = namespace
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        # One attribute lost, not the whole server: the requests run
        # without it, as the warning for one that does not pickle says.
        print(
            f"ForkingMixIn: the template process cannot find {module}.{qualname}, "
            "which the server holds; the requests run without it:",
            file=sys.stderr,
        )
        _print_exc()
        return NOT_FOUND
    return found


# What find_by_name gives for a name it cannot find; rebuild_server leaves
# such an attribute out.
NOT_FOUND: Any = type("NotFound", (), {"__repr__": lambda self: "<not found>"})()


def _main_module() -> Any:
    global importing_main, _main_script
    main = sys.modules.get("__mp_main__")
    if main is not None:
        return main
    path, name = _main_script
    if path is None and name is None:
        raise _pickle.UnpicklingError(
            "an object of the server process's __main__ is wanted, and its main "
            "script cannot be run again here (python -c, or an interactive session)"
        )
    import runpy
    import types

    # Once: a script that failed is not run again at the next state.
    _main_script = (None, None)
    importing_main = True
    try:
        if name is not None:
            namespace = runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
        else:
            namespace = runpy.run_path(str(path), run_name="__mp_main__")
    finally:
        importing_main = False
    main = types.ModuleType("__mp_main__")
    main.__dict__.update(namespace)
    sys.modules["__mp_main__"] = main
    return main


def _prepare(spec: dict[str, Any]) -> None:
    global _main_script
    sys.path[:] = spec["sys_path"]
    sys.argv[:] = spec["sys_argv"]
    _main_script = spec["main"]
    # The program's own names for our modules (``sys.modules["socketserver"]
    # = txsocketserver``): in place before anything imports the module
    # under that name.
    for alias, name in spec["aliases"]:
        if alias not in sys.modules:
            __import__(name)
            sys.modules[alias] = sys.modules[name]
    _by_value.enable_for(spec["cloudpickle"])
    # Importing the classes now (or rebuilding them, for classes carried by
    # value) is what makes each request cheap later.
    loads_with_fds(spec["preload"], [])


def _rehearse_hand_over() -> None:
    """Run a child's side of a request hand-over here, many times over.

    CPython (3.11 on) rewrites bytecode in place as it specializes it, and
    counts calls in the code object until it does: code that runs for the
    first time in a child writes to its code objects, so copies their
    pages, in every child.  Code that the template has run often enough
    is already specialized, and runs without writing to them.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        body, fds = dumps_with_fds((None, {}, "rehearsal", (ours, ("127.0.0.1", 0))))
        for _ in range(_REHEARSALS):
            send_message(ours, 1, body, fds)
            received = receive_message(theirs)
            assert received is not None
            _tag, received_body, received_fds = received
            _make_server, _attributes, _name, args = loads_with_fds(received_body, received_fds)
            args[0].close()
    finally:
        ours.close()
        theirs.close()


# Enough runs for CPython's specializing interpreter to settle (3.11 quickens
# a function after 8 calls, then specializes an instruction after ~50 runs).
_REHEARSALS = 100


def main() -> None:
    """Entry point of the template process (``spawnProcess`` runs it)."""
    # Ctrl-C reaches the whole process group: the server's process decides
    # what happens to its template (it closes the channel), and the children
    # get the usual KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=CHANNEL_FD)
    first = receive_message(channel)
    if first is None:
        return
    _tag, body, _fds = first
    spec = _pickle.loads(body)
    _prepare(spec)
    _rehearse_hand_over()
    flush_stdio()
    # Objects imported so far are never freed: keep the collector off their
    # pages, so that forked children share them instead of copying them.
    gc.freeze()
    _Template(channel, spec["warm"]).serve()


class _Template:
    """The template's loop: keep *warm* idle children forked ahead of need,
    hand each one's socket to the server, reap them and report.

    An idle child waits on a socketpair of its own.  The template sends the
    other end to the server (a ``C`` line with the fd attached) and keeps no
    copy: the server sends a request straight to the child, closes its end
    (so a child can never be given a second request) and tells the template
    it took that child (a :data:`TAKEN_TAG` message, once half of them are
    taken), which forks replacements, off the request's path.  A request thus crosses one process
    boundary, as with the stdlib's fork.
    """

    def __init__(self, channel: socket.socket, warm: int) -> None:
        self.channel: socket.socket | None = channel
        self.warm = warm
        # Children whose socket the server holds, waiting for a request.
        self.idle: set[int] = set()
        # Children the server took, running their request.
        self.running: set[int] = set()
        # Idle children of an earlier installed state: the server has closed
        # their sockets, so they exit unused.
        self.retiring: set[int] = set()
        # How many states have been installed: the ``C`` lines say which
        # state their child was forked with, for the server to drop the
        # sockets of children forked before the state it installed last.
        self.generation = 0
        # The sockets of the installed server object.
        self.installed_sockets: list[socket.socket] = []
        # Status lines for the server, sent once per turn of the loop.
        self.status: list[bytes] = []
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)

    def serve(self) -> None:
        # A SIGCHLD wakes select() through the pipe; the handler does nothing.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_write)
        self._fill()
        _report_ready()
        while self.channel is not None or self.running or self.idle or self.retiring:
            self._send_status()
            watched: list[Any] = [self.wake_read]
            if self.channel is not None:
                watched.append(self.channel)
            readable, _, _ = select.select(watched, [], [])
            if self.wake_read in readable:
                self._drain_wake_pipe()
                self._reap()
            if self.channel is not None and self.channel in readable:
                try:
                    message = receive_message(self.channel)
                except (OSError, EOFError):
                    # The server process died (with status lines unread, a
                    # reset): what its closing would have told us.
                    message = None
                if message is None:
                    self._stop_accepting()
                elif message[0] == INSTALL_TAG:
                    self._install(message[1], message[2])
                elif message[0] == TAKEN_TAG:
                    self._taken([int(pid) for pid in message[1].split()])
            # Refill once half the idle children are taken, forking them in
            # a row: every fork makes the pages that the template writes
            # afterwards copy-on-write again, so back-to-back forks cost
            # fewer page copies than forks spread over the loop.
            if len(self.idle) <= self.warm // 2:
                self._fill()

    def _send_status(self) -> None:
        """Send the status lines of this turn of the loop, in one write.

        They go back on the channel, where the server's serving thread
        reads them when it next needs an idle child or waits for a child
        to end (not on the reactor thread: a request then costs the server
        no thread switch).  Once the server has closed the channel, nobody
        waits for them any more: the server counts what is left of this
        template's requests as ended when the template exits.
        """
        if not self.status:
            return
        lines, self.status = b"".join(self.status), []
        if self.channel is None:
            return
        try:
            self.channel.sendall(lines, _SEND_FLAGS)
        except OSError:
            pass  # the server process is gone: the channel's end of file follows

    def _stop_accepting(self) -> None:
        assert self.channel is not None
        self.channel.close()
        self.channel = None
        # The idle children's sockets were the server's: with the channel
        # closed, they have been closed (or dropped, unread, with it), and
        # the idle children exit unused; the loop reaps them.
        self._uninstall()

    def _taken(self, pids: list[int]) -> None:
        """The server took the idle children *pids* (some may have ended already)."""
        for pid in pids:
            if pid in self.idle:
                self.idle.discard(pid)
                self.running.add(pid)

    def _install(self, body: bytes, fds: list[int]) -> None:
        """Build the child's server object once, here, from *body*.

        A request whose server state is the installed one then carries no
        state: its child, forked from here afterwards, finds the object
        already built (a copy-on-write copy of it, of its own), instead of
        unpickling the state and building the object itself.  Idle children
        forked before are retired unused (the server closed their sockets
        before it sent the state), and replaced.
        """
        global _installed_server
        self._uninstall()
        unpickler = _SocketUnpickler(io.BytesIO(body), fds)
        try:
            make_server, make_args = unpickler.load()
            _installed_server = make_server(*make_args)
        except Exception:
            _print_exc()
        # What unpickling made (the server object; classes carried by value
        # rebuilt) joins the objects the collector leaves alone: a child's
        # collections would otherwise walk them, copying their pages.
        gc.freeze()
        self.installed_sockets = list(unpickler.sockets.values())
        used = {sock.fileno() for sock in self.installed_sockets}
        for fd in fds:
            if fd not in used:
                os.close(fd)
        self.retiring |= self.idle
        self.idle = set()
        self.generation += 1

    def _uninstall(self) -> None:
        global _installed_server
        _installed_server = None
        for sock in self.installed_sockets:
            sock.close()
        self.installed_sockets = []

    def _fill(self) -> None:
        """Fork idle children up to *warm*, in a row, and send the server
        their sockets in one message."""
        lines: list[bytes] = []
        ends: list[socket.socket] = []
        try:
            while self.channel is not None and len(self.idle) < self.warm:
                try:
                    pid, end = self._fork_idle_child(ends)
                except OSError:
                    _print_exc()
                    break
                self.idle.add(pid)
                lines.append(b"C %d %d\n" % (pid, self.generation))
                ends.append(end)
            # The exits reaped so far first: a new child may have the pid of
            # one of them, and the server must hear of that exit before it
            # can take the new child.
            if ends:
                self._send_status()
            # One message per MAX_FDS children (the line of each child, its
            # socket attached): the server reads the fds in the order of
            # the lines.
            for first in range(0, len(ends), MAX_FDS):
                if self.channel is None:
                    break
                try:
                    socket.send_fds(
                        self.channel,
                        [b"".join(lines[first : first + MAX_FDS])],
                        [end.fileno() for end in ends[first : first + MAX_FDS]],
                        _SEND_FLAGS,
                    )
                except OSError:
                    break  # the server process is gone: the channel's end of file follows
        finally:
            # The server holds the only copies now: closing them is how it
            # tells an idle child to exit unused.
            for end in ends:
                end.close()

    def _fork_idle_child(self, unsent: list[socket.socket]) -> tuple[int, socket.socket]:
        """Fork a child that waits for one request on a socketpair; return its
        pid and the other end.  *unsent* (other children's ends, not sent
        to the server yet) are closed in it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        flush_stdio()
        try:
            pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            # Nothing of the template's may stay open in a child.
            if self.channel is not None:
                self.channel.close()
            for end in (ours, *unsent):
                end.close()
            _run_child(theirs, (STATUS_FD, self.wake_read, self.wake_write))
        theirs.close()
        return pid, ours

    def _drain_wake_pipe(self) -> None:
        while True:
            try:
                if not os.read(self.wake_read, 512):
                    return
            except BlockingIOError:
                return

    def _reap(self) -> None:
        while True:
            pid = self._exited_child()
            if pid == 0:
                return
            if pid is None:
                break
            self._reaped(pid, os.waitpid(pid, 0)[1])
        for pid in [*self.running, *self.idle, *self.retiring]:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._reaped(pid, status)

    def _exited_child(self) -> int | None:
        """The pid of a child that has exited, 0 if no child has, None if
        it cannot tell: then each child must be asked in turn.

        Asking each child costs a system call apiece at every wake-up (up
        to ``max_children`` of them); ``waitid(WNOWAIT)`` names an exited
        child without reaping it, in one.  The child it names may be
        somebody else's (one that a handler module started at import, say):
        that one is left alone.
        """
        if _PEEK is None:
            return None
        try:
            found = os.waitid(os.P_ALL, 0, _PEEK)
        except ChildProcessError:
            return 0
        if found is None or found.si_pid == 0:
            return 0
        pid = found.si_pid
        if pid in self.running or pid in self.retiring or pid in self.idle:
            return pid
        return None

    def _reaped(self, pid: int, status: int) -> None:
        # An idle child that ended is reported too: it may be one the server
        # took, whose TAKEN message the template has not read yet (a quick
        # request), or one killed from outside (the server drops its socket).
        if pid in self.retiring:
            self.retiring.discard(pid)
            return
        self.running.discard(pid)
        self.idle.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        self.status.append(b"E %d %d\n" % (pid, code))


# The server object that ``_Template._install`` built (None if none, or if
# building it failed): a child whose request carries no state uses it.
_installed_server: Any = None


def _run_child(own: socket.socket, fds_to_close: tuple[int, ...]) -> None:
    """Body of a child: wait for one request on *own*, run it, exit.  Never returns."""
    status = 1
    try:
        # _signal's C functions, not signal's Python wrappers: their enum
        # conversions would run, for the first time in this process, in every
        # child, writing to (and so copying) pages shared with the template.
        _signal.set_wakeup_fd(-1)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        for fd in fds_to_close:
            os.close(fd)
        message = receive_message(own)
        own.close()
        if message is None:
            # Never used: the server closed while this child was idle.
            status = 0
            return
        _tag, body, fds = message
        make_server, make_args, method_name, args = loads_with_fds(body, fds)
        if make_server is not None:
            server = make_server(*make_args)
        elif _installed_server is not None:
            # make_args: the attributes that travel with each request.
            server = _installed_server
            server.__dict__.update(make_args)
        else:
            raise RuntimeError(
                "the server's state could not be rebuilt in the template process "
                "(its traceback is above)"
            )
        # The method exits the process itself, with the stdlib's status codes.
        getattr(server, method_name)(*args)
        status = 0
    except BaseException:
        _print_exc()
    finally:
        flush_stdio()
        os._exit(status)


if __name__ == "__main__":
    main()
