# -*- test-case-name: tests.test_forking,tests.test_forking_fidelity,tests.test_forking_carry -*-
"""``ProcessDispatcher``: the server process's side of ``ForkingMixIn``.

See ``docs/architecture.md`` for the design.  This module runs only in the server
process, and is imported there when the server first starts its template:
it needs Twisted (``spawnProcess``, a ``ProcessProtocol``), which the
template and the children never import.
"""

from __future__ import annotations

import operator
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from txsocketserver._forking.carry import (
    Carrier,
    carry,
    carry_request,
    check_carried,
    immutable,
)
from txsocketserver._forking.exits import ExitReports
from txsocketserver._forking.template import (
    CHANNEL_FD,
    INSTALL_TAG,
    SPEC_TAG,
    STATUS_FD,
    TAKEN_TAG,
    rebuild_server,
    receive_fds,
    send_message,
)
from txsocketserver._twisted import compat
from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.interfaces import IProcessDispatcher

# recv() flags: take what has arrived, never wait (the socket itself blocks).
_RECEIVE_NOW = getattr(socket, "MSG_DONTWAIT", 0)

# Seconds a closing server waits for an idle template to exit before killing it.
TEMPLATE_EXIT_TIMEOUT = 10.0

# Attributes that change from one request to the next (ours): they travel
# with each request rather than being part of the state installed in the
# template.
_VOLATILE = ("active_children",)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TEMPLATE_COMMAND = (
    f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
    "from txsocketserver._forking.template import main; main()"
)


def _socket_key(sock: socket.socket) -> tuple[int, float | None]:
    """What, besides its identity, a socket's pickle depends on."""
    return sock.fileno(), sock.gettimeout()


class _TemplateLink:
    """The parent's view of one template process."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.protocol: _TemplateProtocol | None = None
        self.tags: set[int] = set()
        # The server state installed in the template (its pickle, and the
        # identities of its sockets), and a different one seen once since.
        self.installed: tuple[bytes, tuple[int, ...]] | None = None
        self.candidate: tuple[bytes, tuple[int, ...]] | None = None
        self.ready = False
        # Idle children, forked for the state installed last: (pid, the
        # socket their request goes to), oldest first; and that state's number.
        self.idle: list[tuple[int, socket.socket]] = []
        self.generation = 0
        # Children taken since the template was last told (see _tell_taken).
        self.taken: list[int] = []
        # Sockets received on the channel whose C line has not been read yet.
        self.pending_ends: list[int] = []
        # Closed on purpose (server_close, or replaced after a broken pipe).
        self.retired = False
        self.ended = threading.Event()
        # Its status lines come back on the channel: a thread is reading
        # them now, the channel has reached end of file, an unfinished line.
        self.reading = False
        self.channel_ended = False
        self.partial_line = b""
        self.poller = select.poll()
        self.poller.register(channel, select.POLLIN)

    def has_status_to_read(self) -> bool:
        """Whether a thread may read the status now, and some will come:
        a request is in flight, so an ``E`` line (or end of file) will; or
        no idle child is left, so a ``C`` line (or end of file) will."""
        return bool(
            (self.tags or not self.idle)
            and not (self.reading or self.retired or self.channel_ended)
        )

    def drop_idle(self) -> None:
        """Close the idle children's sockets: they exit unused."""
        for _pid, end in self.idle:
            end.close()
        self.idle = []


class _TemplateProtocol(ProcessProtocol):
    """Reactor-thread half: sees the template get ready, and end."""

    def __init__(self, dispatcher: ProcessDispatcher, template: _TemplateLink) -> None:
        self._dispatcher = dispatcher
        self._template = template
        self._ended = False

    def connectionMade(self) -> None:
        # The template reads nothing from stdin: give it end of file.
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Only ever "R": the rest of the status comes on the channel.
        if childFD == STATUS_FD and data:
            self._dispatcher._on_ready(self._template)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == STATUS_FD:
            # Without a SIGCHLD handler (ours runs with installSignalHandlers
            # off) Twisted tries to reap once, when the pipes close, which can
            # be a moment before the process has finished exiting: retry.
            self._reap_later(0.005)

    def _reap_later(self, delay: float) -> None:
        def reap() -> None:
            if self._ended:
                return
            compat.reap_process(self.transport)
            if not self._ended:
                self._reap_later(min(delay * 2, 0.5))

        _reactor.get_reactor().callLater(delay, reap)

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        value = reason.value
        code = getattr(value, "exitCode", None)
        signal_number = getattr(value, "signal", None)
        how = f"killed by signal {signal_number}" if signal_number else f"status {code}"
        self._dispatcher._on_template_ended(self._template, how)

    def kill(self) -> None:
        if not self._ended:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]


def _spawn_template(protocol: _TemplateProtocol, channel_fd: int) -> None:
    """Start a template process; runs on the reactor thread."""
    flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
    _reactor.get_reactor().spawnProcess(
        protocol,
        sys.executable,
        [sys.executable, *flags, "-c", _TEMPLATE_COMMAND],
        env=dict(os.environ),
        childFDs={0: "w", 1: 1, 2: 2, CHANNEL_FD: channel_fd, STATUS_FD: "r"},
    )


def _main_script() -> tuple[str | None, str | None]:
    """Where the template finds this process's main script, as multiprocessing's
    spawn does: its path, or its module name (``python -m``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        # A package's __main__ (python -m package) is its command line, not
        # a module to run again: spawn does not either.
        if spec.name == "__main__" or spec.name.endswith(".__main__"):
            return None, None
        return None, spec.name
    path = getattr(main, "__file__", None)
    return (os.path.abspath(path) if isinstance(path, str) else None), None


def _our_aliases() -> list[tuple[str, str]]:
    """The program's own names for our modules (``sys.modules["socketserver"]
    = txsocketserver``): the template makes them before it imports anything
    of the program's, so that what it imports binds to the same modules."""
    package = __name__.split(".")[0]
    aliases = []
    for alias, module in list(sys.modules.items()):
        name = getattr(module, "__name__", None)
        if (
            isinstance(name, str)
            and name != alias
            and (name == package or name.startswith(package + "."))
            and sys.modules.get(name) is module
        ):
            aliases.append((alias, name))
    return aliases


@implementer(IProcessDispatcher)
class ProcessDispatcher:
    """Runs each request in a new child process forked from a template.

    ``dispatch(function, *args)`` takes a *method of the server*: the child
    calls the method of that name on its own copy of the server (a new
    instance of the same class holding :meth:`child_state`) with a copy of
    *args*, sockets included.
    """

    def __init__(self, *, warm: int) -> None:
        self._warm = warm
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # tag -> the pid of the child running it, and back.
        self._running: dict[int, int] = {}
        self._pids: dict[int, int] = {}
        self._next_tag = SPEC_TAG + 1
        self._template: _TemplateLink | None = None
        # Every template not yet ended (the current one, retired ones).
        self._templates: set[_TemplateLink] = set()
        self._last_spec: bytes | None = None
        self._startup_failure: str | None = None
        self._closed = False
        self._carrier = Carrier()
        # The server and handler classes last found carriable.
        self._carried: tuple[type, Any] | None = None
        # The last state pickled, while its values are all immutable (see
        # _state_pickle): class, names, values, sockets' fds and timeouts,
        # class state, the sockets, then the pickle, its fds and their
        # inodes.  Holding the values keeps their identities from being
        # reused by new objects.
        self._state_cache: tuple[Any, ...] | None = None
        self._exits = ExitReports()

    # -- IRequestDispatcher --------------------------------------------------------

    def dispatch(self, function: Callable[..., object], *args: Any) -> Any:
        server = function.__self__  # type: ignore[attr-defined]
        # Outside the try: the warning for an attribute left out is the
        # caller's to see (an error under -W error), not a pickling failure.
        attributes = self.child_state(server)
        class_state = self._carrier.class_state(server)
        try:
            full = (
                rebuild_server,
                (type(server), attributes, class_state),
                function.__name__,
                args,
            )
            # What changes with every request travels with it; the rest is
            # installed in the template once (see _Template._install there).
            stable = dict(attributes)
            volatile = {name: stable.pop(name) for name in _VOLATILE if name in stable}
            state_body, state_fds, inodes = self._state_pickle(type(server), stable, class_state)
            body, fds = carry_request(volatile, function.__name__, args)
            key: tuple[bytes, tuple[int, ...]] | None = None
            if set(state_fds).isdisjoint(fds):
                # Sockets are told apart by inode: an fd number can be reused.
                key = (state_body, inodes)
            else:
                # A socket both in the state and in the request (a datagram
                # server's) must be one object in the child: one pickle.
                body, fds = carry(full)
        except Exception as exc:
            raise TypeError(
                "ForkingMixIn cannot hand this request to a child process: the request "
                "and client address must pickle, with their sockets real socket.socket "
                f"objects (not, e.g., an endpoint server's socket facade): {exc}"
            ) from exc
        # A template that died since the last request shows up as a broken
        # pipe: retire it and hand the request to a fresh one.
        for attempt in (1, 2):
            template = self._live_template(server)
            try:
                if key is not None and template.installed != key:
                    if template.installed is None or template.candidate == key:
                        # A state seen for the first time, or twice in a row:
                        # the idle children have the old one.
                        self._tell_taken(template)
                        with self._lock:
                            template.drop_idle()
                            template.generation += 1
                        send_message(template.channel, INSTALL_TAG, state_body, state_fds)
                        template.installed, template.candidate = key, None
                    else:
                        # A state that changes from request to request travels with it.
                        template.candidate = key
                        body, fds = carry(full)
                return self._send_request(template, body, fds)
            except OSError:
                self._retire(template)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _send_request(self, template: _TemplateLink, body: bytes, fds: list[int]) -> int:
        """Send a request straight to an idle child of *template*; return its tag.

        Waits for an idle child if none is left.  The child's socket is
        closed once the request is sent: a child gets exactly one request.
        Then the template hears that its child was taken, and forks a
        replacement.

        Error handling:
            ``OSError`` if the template is gone (the caller starts another);
            ``RuntimeError`` if it died before it was ready.
        """
        while True:
            tag, pid, end = self._take_idle_child(template)
            try:
                send_message(end, tag, body, fds)
            except OSError:
                # That idle child died (killed from outside): the next one.
                with self._changed:
                    self._forget(template, tag)
                    self._changed.notify_all()
                continue
            finally:
                end.close()
            template.taken.append(pid)
            if len(template.idle) <= self._warm // 2:
                self._tell_taken(template)
            return tag

    def _tell_taken(self, template: _TemplateLink) -> None:
        """Tell *template* which of its idle children were taken.

        Once half of them are, not at every request: the template forks
        their replacements in a row, and each wake-up of the template after
        a fork costs it page copies.  Before the server waits for an idle
        child or installs a state, too: the template must count every child
        taken before it.
        """
        if not template.taken:
            return
        pids, template.taken = template.taken, []
        try:
            send_message(template.channel, TAKEN_TAG, b" ".join(b"%d" % pid for pid in pids), [])
        except OSError:
            # The template is gone; the children run their requests all the
            # same, and their ends are counted when the template's is.
            pass

    def _take_idle_child(self, template: _TemplateLink) -> tuple[int, int, socket.socket]:
        """Take the oldest idle child of *template* for a new request, waiting
        for one if need be: the request's tag, the child's pid and socket."""
        while True:
            with self._lock:
                if template.idle:
                    # In one step with taking it: an exit reported for this
                    # pid from now on is the request's.
                    pid, end = template.idle.pop(0)
                    tag = self._next_tag
                    self._next_tag += 1
                    self._running[tag] = pid
                    self._pids[pid] = tag
                    template.tags.add(tag)
                    return tag, pid, end
                if template.channel_ended or template.retired:
                    break
            self._tell_taken(template)
            self._wait_until(
                lambda: bool(template.idle) or template.channel_ended or template.retired, None
            )
        # Its channel has ended: it is exiting, or has exited.  Tell a
        # start-up failure (reported once the reactor has reaped it) from a
        # template killed after it was ready (start another one).
        if not template.ready:
            template.ended.wait(TEMPLATE_EXIT_TIMEOUT)
        with self._lock:
            failure = self._startup_failure if template.ended.is_set() else None
            if failure is not None and not template.ready:
                self._startup_failure = None
        if failure is not None:
            self._retire(template)
            raise RuntimeError(failure)
        raise BrokenPipeError("the ForkingMixIn template process has exited")

    def _forget(self, template: _TemplateLink, tag: int) -> None:
        """Forget the request *tag* (lock held)."""
        pid = self._running.pop(tag, None)
        if pid is not None:
            self._pids.pop(pid, None)
        template.tags.discard(tag)

    def report_exit(self, tag: int, what: Any) -> None:
        """Have :meth:`take_exits` return *what* once the request *tag* has ended."""
        with self._lock:
            self._exits.watch(tag, what, running=tag in self._running)

    def take_exits(self, everything: bool = False) -> list[tuple[Any, int | None]]:
        """``(what, exit code)`` of the watched requests that have ended since
        the last call (the code is ``None`` when their template died first);
        with *everything*, the ones still running too (code ``None``)."""
        with self._lock:
            return self._exits.take(everything)

    def _state_pickle(
        self, server_class: type, stable: dict[str, Any], class_state: tuple[Any, ...]
    ) -> tuple[bytes, list[int], tuple[int, ...]]:
        """The pickle of the state to install, its fds and their inodes:
        remade only when it may differ.

        A state made of the very same objects as last time, all immutable,
        pickles the same (a socket: while its fd and timeout stay the same,
        and so does its inode), so its last pickle serves again; the class
        state is the same tuple for as long as it has not changed
        (``Carrier.class_state``).  A state holding anything mutable (a list,
        a user object) is pickled anew for every request: a change made
        inside it must reach the next request, as after ``os.fork``.
        """
        names = tuple(stable)
        values = tuple(stable.values())
        cached = self._state_cache
        # In C where it can be (no generator): on the path of every request.
        if (
            cached is not None
            and cached[0] is server_class
            and cached[4] is class_state
            and cached[1] == names
            and all(map(operator.is_, cached[2], values))
            and cached[3] == tuple(map(_socket_key, cached[5]))
        ):
            return cached[6], cached[7], cached[8]
        body, fds = carry((rebuild_server, (server_class, stable, class_state)))
        inodes = tuple(os.fstat(fd).st_ino for fd in fds)
        if all(immutable(value) for value in values):
            sockets = tuple(value for value in values if isinstance(value, socket.socket))
            self._state_cache = (
                server_class,
                names,
                values,
                tuple(map(_socket_key, sockets)),
                class_state,
                sockets,
                body,
                fds,
                inodes,
            )
        else:
            self._state_cache = None
        return body, fds, inodes

    def wait_idle(self, timeout: float | None) -> bool:
        return self._wait_until(lambda: not self._running, timeout)

    def upkeep(self) -> None:
        # Keep a template warm: replace one that died (killed from outside)
        # after it had been ready, so the next request does not wait for it.
        template = self._template
        if template is not None and template.ended.is_set() and template.ready:
            self._retire(template)
            if self._last_spec is not None and not self._closed:
                try:
                    self._start(self._last_spec)
                except Exception:
                    # Best effort, like warm_up(): the next request tries
                    # again, and handle_error reports what goes wrong then.
                    pass

    def close(self, wait: bool) -> None:
        try:
            self._close(wait)
        finally:
            _reactor.release(self)

    def _close(self, wait: bool) -> None:
        with self._lock:
            self._closed = True
            template, self._template = self._template, None
        if template is None:
            return
        if wait:
            self.wait_idle(None)
        self._retire(template)
        # The template exits once its children have: wait for that if it is
        # prompt, so that no process or pipe outlives a server with nothing
        # running; otherwise the reactor reaps it whenever it ends.
        if wait or not template.tags:
            if not template.ended.wait(TEMPLATE_EXIT_TIMEOUT) and template.protocol:
                _reactor.call_in_reactor(template.protocol.kill)
                template.ended.wait(TEMPLATE_EXIT_TIMEOUT)

    # -- for ForkingMixIn ------------------------------------------------------------

    def warm_up(self, server: Any) -> None:
        """Check that the classes can be carried, then start the template
        now, if none runs, so the first request finds it ready.

        Error handling:
            ``TypeError`` if the server or handler class cannot be carried
            (see :func:`check_carried`).  Otherwise best effort: what stops
            the template from starting is raised again by the first request,
            where ``handle_error`` reports it and the server keeps serving.
        """
        classes = (type(server), server.RequestHandlerClass)
        if classes != self._carried:
            # Once per pair of classes, not at every handle_request().
            check_carried("server class", classes[0])
            check_carried("request handler class", classes[1])
            self._carried = classes
        with self._lock:
            if self._startup_failure is not None:
                return
        try:
            self._live_template(server)
        except Exception:
            pass

    def wait_below(self, limit: int) -> None:
        """Block until fewer than *limit* requests are in flight."""
        self._wait_until(lambda: len(self._running) < limit, None)

    def running_pids(self) -> set[int]:
        """The pids of the children running now."""
        with self._lock:
            template = self._template
            if template is not None and template.has_status_to_read():
                self._take_status(template)
            return set(self._running.values())

    def child_state(self, server: Any) -> dict[str, Any]:
        """The instance attributes the child's server object gets (see
        ``Carrier.child_state``)."""
        return self._carrier.child_state(server)

    # -- the template's life -----------------------------------------------------------

    def _live_template(self, server: Any) -> _TemplateLink:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server's child processes have been shut down")
            template = self._template
            failure, self._startup_failure = self._startup_failure, None
        if template is not None and not template.ended.is_set():
            return template
        if template is not None:
            self._retire(template)
        if failure is not None:
            # Report it once; the next request tries a new template.
            raise RuntimeError(failure)
        return self._start(self._spec(server))

    def _spec(self, server: Any) -> bytes:
        check_carried("server class", type(server))
        check_carried("request handler class", server.RequestHandlerClass)
        sys_path = [os.getcwd() if entry == "" else entry for entry in sys.path]
        preload, _fds = carry((type(server), server.RequestHandlerClass))
        spec, _fds = carry(
            {
                "sys_path": sys_path,
                "sys_argv": list(sys.argv),
                "main": _main_script(),
                "aliases": _our_aliases(),
                "cloudpickle": cloudpickle.__version__,
                "warm": self._warm,
                "preload": preload,
            }
        )
        return spec

    def _start(self, spec: bytes) -> _TemplateLink:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        template = _TemplateLink(parent_end)
        template.protocol = _TemplateProtocol(self, template)
        # The template needs the reactor (its pipes, its reaping) until close().
        _reactor.hold(self)
        try:
            _reactor.call_in_reactor(_spawn_template, template.protocol, child_end.fileno())
            send_message(parent_end, SPEC_TAG, spec, [])
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self._last_spec = spec
        with self._lock:
            self._template = template
            self._templates.add(template)
        return template

    def _retire(self, template: _TemplateLink) -> None:
        with self._lock:
            if self._template is template:
                self._template = None
            if template.retired:
                return
            template.retired = True
            template.drop_idle()
            for fd in template.pending_ends:
                os.close(fd)
            template.pending_ends = []
            if template.reading:
                # Wake the reader; it closes the channel once it is done
                # with it, so that the fd cannot be reused under it.
                template.channel.shutdown(socket.SHUT_RDWR)
                return
        template.channel.close()

    # -- the status, read from the channel ------------------------------------------------

    def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``done()`` (called with the lock held), reading status
        lines meanwhile; return whether it became true within *timeout*."""
        # The plain lock (the condition's own): its C-level context manager
        # costs a fraction of the condition's, on the path of every request.
        with self._lock:
            if done():
                return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                readable = [t for t in self._templates if t.has_status_to_read()]
                if readable:
                    self._read_status(readable[0], remaining)
                else:
                    # Another thread reads the status, or only the reactor
                    # can tell what comes next (a template that ended):
                    # either notifies.
                    self._changed.wait(remaining)
            return True

    def _read_status(self, template: _TemplateLink, timeout: float | None) -> None:
        """Wait up to *timeout* seconds for status lines from *template*,
        and apply them.

        Called with the lock held, which is released while waiting; one
        thread at a time reads (``template.reading``).
        """
        template.reading = True
        self._lock.release()
        try:
            ready = template.poller.poll(None if timeout is None else timeout * 1000)
        finally:
            self._lock.acquire()
            template.reading = False
        if template.retired:
            template.channel.close()
        elif ready:
            self._take_status(template)
        # Whatever happened, the waiters look again: one of them may have to
        # take over the reading.
        self._changed.notify_all()

    def _take_status(self, template: _TemplateLink) -> None:
        """Apply the status lines that have arrived from *template*, if any
        (lock held; no waiting)."""
        try:
            data, fds = receive_fds(template.channel, 1 << 16, _RECEIVE_NOW)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []  # gone: as good as end of file
        template.pending_ends.extend(fds)
        if data == b"":
            # The template exits (processEnded will count its requests as
            # ended), or the channel was retired under the reader.
            template.channel_ended = True
        else:
            *lines, template.partial_line = (template.partial_line + data).split(b"\n")
            for line in lines:
                kind, pid_text, value = line.split()
                pid = int(pid_text)
                if kind == b"C":
                    # An idle child, its socket attached (fds come in the
                    # order of their lines); one forked for a state older
                    # than the one installed last is dropped: it exits unused.
                    # Family and type named: otherwise the socket object
                    # asks the kernel for them (three system calls).
                    end = socket.socket(
                        socket.AF_UNIX, socket.SOCK_STREAM, 0, template.pending_ends.pop(0)
                    )
                    if int(value) == template.generation:
                        template.idle.append((pid, end))
                    else:
                        end.close()
                elif kind == b"E":
                    tag = self._pids.get(pid)
                    if tag is not None:
                        self._forget(template, tag)
                        self._exits.ended(tag, int(value))
                    else:
                        # An idle child that died (killed from outside).
                        for index, (idle_pid, end) in enumerate(template.idle):
                            if idle_pid == pid:
                                end.close()
                                del template.idle[index]
                                break
        self._changed.notify_all()

    # -- reports, on the reactor thread ----------------------------------------------------

    def _on_ready(self, template: _TemplateLink) -> None:
        with self._changed:
            template.ready = True
            self._changed.notify_all()

    def _on_template_ended(self, template: _TemplateLink, how: str) -> None:
        with self._changed:
            # Children it had not reaped yet are no longer ours to count.
            for tag in list(template.tags):
                self._forget(template, tag)
                self._exits.ended(tag, None)
            template.drop_idle()
            self._templates.discard(template)
            if not template.ready and not template.retired:
                self._startup_failure = (
                    f"the ForkingMixIn template process exited ({how}) before it was "
                    "ready, taking the requests sent to it along; its traceback, if "
                    "any, is on stderr"
                )
            template.ended.set()
            self._changed.notify_all()
