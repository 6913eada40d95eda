# -*- test-case-name: tests.test_forking_carry,tests.test_forking_werkzeug -*-
"""What a forked request's process gets of the server, decided in the server process.

``docs/forking.md`` tells the rule; this module applies it.  A child is
forked from a template process that imported the server's and the handler's
modules afresh, so what the program did to them at run time must be carried
there:

* the server's instance attributes (:meth:`Carrier.child_state`): each one
  that pickles, by value; one that does not, by the name a module holds it
  under (a module-level ``app`` in an importable module or in the main
  script, found there as multiprocessing's *spawn* finds it); any other is
  lost, with a warning, once, naming it;
* the attributes of the server's and the handler's classes
  (:meth:`Carrier.class_state`): those that the class body did not define
  (``WSGIRequestHandler.protocol_version = "HTTP/1.1"`` set by a server's
  ``__init__``), as they are now;
* classes and functions that a new process cannot import by name (defined
  in a function, in ``__main__``), by value, with cloudpickle
  (:class:`CarryingPickler`).
"""

from __future__ import annotations

import copy
import enum
import operator
import socket
import sys
import types
import warnings
from typing import Any

import cloudpickle

from txsocketserver._core.base import BaseServer
from txsocketserver._forking.template import dumps_with_fds, find_by_name, reduce_socket
from txsocketserver._forking.tls import ChildTLS

# Types whose instances pickle the same for as long as they are the same
# object (classes and functions pickle as their names).
_IMMUTABLE_TYPES = frozenset(
    {type(None), bool, int, float, complex, str, bytes, type, types.FunctionType}
)


def immutable(value: Any) -> bool:
    """Whether *value* pickles the same for as long as it is the same object."""
    kind = type(value)
    if kind in _IMMUTABLE_TYPES or isinstance(value, (socket.socket, enum.Enum, ByName, ChildTLS)):
        return True
    if kind is tuple or kind is frozenset:
        return all(immutable(item) for item in value)
    return False


class ByName:
    """An object that does not pickle, carried as the name a module holds it by.

    It pickles as a call of ``find_by_name(module, qualname)`` (in
    ``_forking.template``), which finds the template's own object of that
    name: the module imports it afresh, or, for ``__main__``, the template
    runs the main script once as ``__mp_main__``.
    """

    __slots__ = ("value", "module", "qualname")

    def __init__(self, value: Any, module: str, qualname: str) -> None:
        self.value = value
        self.module = module
        self.qualname = qualname

    def __reduce__(self) -> Any:
        return find_by_name, (self.module, self.qualname)

    def still_names(self, value: Any) -> bool:
        """Whether this reference still stands for *value*."""
        if value is not self.value:
            return False
        module = sys.modules.get(self.module)
        return module is not None and vars(module).get(self.qualname) is value


def _main_can_run_again(main: Any) -> bool:
    """Whether the template can run the main script again (as spawn would)."""
    spec = getattr(main, "__spec__", None)
    return spec is not None or isinstance(getattr(main, "__file__", None), str)


def find_name(value: Any) -> ByName | None:
    """A module-level name that holds *value* and that a new process can find:
    a global of an importable module first (the template imports it), else
    of the main script (the template runs it again); None if there is none."""
    modules = list(sys.modules.items())
    main = sys.modules.get("__main__")
    for key, module in modules:
        if (
            key in ("__main__", "__mp_main__")
            or not isinstance(module, types.ModuleType)
            or getattr(module, "__spec__", None) is None
            or getattr(module, "__name__", None) != key
        ):
            continue
        for name, held in list(vars(module).items()):
            if held is value:
                return ByName(value, key, name)
    if main is not None and _main_can_run_again(main):
        for name, held in list(vars(main).items()):
            if held is value:
                return ByName(value, "__main__", name)
    return None


class CarryingPickler(cloudpickle.Pickler):
    """Pickles what a child needs: sockets as fds, classes and functions by
    reference when a new process can import them by name, by value otherwise.

    By value (cloudpickle's job, as for loky, Dask and Ray) are the classes
    and functions of ``__main__`` and those a module cannot give by name
    (defined inside a function, a closure), with the globals their code uses
    as they are now: a handler of the main script reads the configuration
    that its ``if __name__ == "__main__":`` block set, as after ``os.fork``.
    The template loads these pickles without importing cloudpickle (see
    ``_forking.by_value``): a pickle with nothing by value names no cloudpickle
    function at all.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=-1)
        self.fds: list[int] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, socket.socket):
            return reduce_socket(self.fds, obj)
        return super().reducer_override(obj)


def carry(obj: Any) -> tuple[bytes, list[int]]:
    """Pickle *obj* for the template: the bytes and the fds of its sockets."""
    return dumps_with_fds(obj, CarryingPickler)


_ADDRESS_PARTS = frozenset({str, int})
_PIDS = frozenset({int})


def carry_request(volatile: dict[str, Any], name: str, args: tuple[Any, ...]) -> Any:
    """:func:`carry` of what travels with each request, ``(None, volatile,
    name, args)``: the same bytes, made by the C pickler alone when *args*
    are a plain socket and an address of strs and ints and *volatile* holds
    at most ``active_children`` (None or a set of pids), in which the
    cloudpickle pickler would carry nothing by value.  Its making, and its
    ``reducer_override`` for the function that rebuilds the socket, cost
    more than the rest of the pickling.  The test is made in C, without a
    Python call per item: it is on the path of every request."""
    message = (None, volatile, name, args)
    children = volatile.get("active_children")
    if (
        len(args) == 2
        and type(args[0]) is socket.socket
        and type(args[1]) is tuple
        and _ADDRESS_PARTS.issuperset(map(type, args[1]))
        and len(volatile) == (0 if children is None else 1)
        and (children is None or (type(children) is set and _PIDS.issuperset(map(type, children))))
    ):
        return dumps_with_fds(message)
    return carry(message)


def pickling_error(value: Any) -> Exception | None:
    """Why *value* cannot be carried by value; None if it can."""
    try:
        carry(value)
    except Exception as exc:
        return exc
    return None


def carried_by_reference(klass: type) -> bool:
    """Whether cloudpickle carries *klass* as its name (the template imports
    it), rather than by value (with its whole class dict, as it is now)."""
    return bool(cloudpickle.cloudpickle._should_pickle_by_reference(klass))


def check_carried(role: str, obj: Any) -> None:
    """Check that *obj* (the server or the handler class) can reach a child.

    Error handling:
        ``TypeError`` naming *obj* and saying why it cannot.
    """
    error = pickling_error(obj)
    if error is not None:
        name = getattr(obj, "__qualname__", None) or repr(obj)
        module = getattr(obj, "__module__", "?")
        raise TypeError(
            f"ForkingMixIn cannot carry the {role} {module}.{name} to the process "
            f"that runs each request ({error}). A class that a new process can import "
            "by name travels as that name; any other (defined inside a function, "
            "in __main__) is pickled by value, with the globals its methods use, "
            "and all of that must pickle: move what does not (a lock, an open "
            "file) out of the class, or create it in the handler."
        ) from error


def serving_process_only(server_class: type) -> frozenset[str]:
    """The instance attributes that stay with the serving process.

    The bookkeeping that ``BaseServer.__init__`` makes afresh for the
    child's server object, and the names that a class of the server lists in
    its ``_serving_process_only`` (what would act on the serving process's
    resources: a unix socket file to remove, a lock file, the dispatcher).
    """
    probe = BaseServer.__new__(BaseServer)
    BaseServer.__init__(probe, None, None)
    names = set(vars(probe)) - {"server_address", "RequestHandlerClass"}
    for klass in server_class.__mro__:
        names.update(vars(klass).get("_serving_process_only", ()))
    return frozenset(names)


def _defined_by_the_class_body(klass: type, name: str, value: Any) -> bool:
    """Whether *value* is what ``class`` statement of *klass* made for *name*:
    the template's import makes it again, so it need not travel."""
    if name.startswith("__") and name.endswith("__") or name == "_abc_impl":
        return True
    if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):
        return True
    function = value
    if isinstance(value, (staticmethod, classmethod)):
        function = value.__func__
    elif isinstance(value, property):
        function = value.fget
    # Under its own name, or its private one (``__name`` is ``_Class__name``).
    return (
        isinstance(function, types.FunctionType)
        and function.__qualname__ == f"{klass.__qualname__}.{function.__name__}"
        and function.__module__ == klass.__module__
    )


_LOST = "lost"
_KEPT = "kept"
_BY_VALUE = "value"
_BY_NAME = "name"
# What the value's for_child() gives instead (an ssl: server's connection
# security: the TLS a child does its handshake with, _forking.tls).
_FOR_CHILD = "for child"


class Carrier:
    """What one server's children get of it; remembers its decisions.

    Whether an instance attribute travels (by value, by name, or not at all)
    is decided once per (name, type); a class's entries are looked at again
    only when one of them is no longer the same object.
    """

    def __init__(self) -> None:
        self._decided: dict[tuple[str, type], str] = {}
        self._references: dict[str, ByName] = {}
        self._kept_back: frozenset[str] | None = None
        # The instance attributes' names and types last seen, and the names
        # of those that travel, if all of them travel by value.
        self._last_names: tuple[str, ...] = ()
        self._last_kinds: tuple[type, ...] = ()
        self._by_value: tuple[str, ...] | None = None
        self._classes: dict[type, _ClassEntries] = {}
        self._class_state: tuple[tuple[type, dict[str, Any]], ...] | None = None
        # The server and handler classes last seen, the classes of their
        # MROs, their dicts, a copy of each as last looked at, and the
        # classes with copies of entries to check.
        self._pair: tuple[Any, Any] | None = None
        self._mro: tuple[type, ...] = ()
        self._dicts: tuple[types.MappingProxyType[str, Any], ...] = ()
        self._seen: tuple[dict[str, Any], ...] = ()
        self._with_copies: list[_ClassEntries] = []

    def child_state(self, server: Any) -> dict[str, Any]:
        """The instance attributes the child's server object gets.

        Every attribute of *server*, except those that stay with the serving
        process (see :func:`serving_process_only`): by value if it pickles
        (sockets travel as fds), else by name if a module holds it (a
        :class:`ByName`).  Any other is left out, with a ``RuntimeWarning``
        the first time, naming it.
        """
        attributes = vars(server)
        # The fast path: the same names with values of the same types as
        # last time, so the same decisions, every one of them by value or
        # not at all: the attributes by value, taken in C.
        names = tuple(attributes)
        kinds = tuple(map(type, attributes.values()))
        if names == self._last_names and kinds == self._last_kinds and self._by_value is not None:
            by_value = self._by_value
            return dict(zip(by_value, map(attributes.__getitem__, by_value), strict=True))
        state = {}
        decided = self._decided
        if self._kept_back is None:
            self._kept_back = serving_process_only(type(server))
        kept_back = self._kept_back
        plain = True
        for name, value in attributes.items():
            key = (name, type(value))
            how = decided.get(key)
            if how is None:
                how = decided[key] = self._decide(server, name, value)
            if how is _BY_VALUE:
                state[name] = value
            elif how is _FOR_CHILD:
                plain = False
                state[name] = value.for_child()
            elif how is _BY_NAME:
                plain = False
                reference = self._reference(name, value)
                if reference is not None:
                    state[name] = reference
                elif pickling_error(value) is None:
                    state[name] = value
            elif how is _KEPT or name in kept_back:
                continue
        self._last_names, self._last_kinds = names, kinds
        self._by_value = tuple(state) if plain else None
        return state

    def _reference(self, name: str, value: Any) -> ByName | None:
        reference = self._references.get(name)
        if reference is None or not reference.still_names(value):
            reference = find_name(value)
            if reference is None:
                self._references.pop(name, None)
                return None
            self._references[name] = reference
        return reference

    def _decide(self, server: Any, name: str, value: Any) -> str:
        assert self._kept_back is not None
        if callable(getattr(type(value), "for_child", None)):
            return _FOR_CHILD
        if name in self._kept_back:
            return _KEPT
        error = pickling_error(value)
        if error is None:
            return _BY_VALUE
        if self._reference(name, value) is not None:
            return _BY_NAME
        kind = type(value)
        warnings.warn(
            f"ForkingMixIn: the server attribute {name!r} (a {kind.__module__}."
            f"{kind.__qualname__}) cannot reach the processes that run the requests: "
            f"it does not pickle ({type(error).__name__}: {error}) and no module "
            f"holds it by name, so self.server.{name} is missing there. Make it a "
            "module-level global of an importable module or of the main script (it "
            "is then found by that name, as multiprocessing's spawn finds it), "
            "create it where the request runs (in the handler), or set "
            'fork_from = "server" on the server class to fork the serving process '
            "itself, as the stdlib does; to keep it back knowingly, name it in the "
            "server class's _serving_process_only.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _LOST

    def class_state(self, server: Any) -> tuple[tuple[type, dict[str, Any]], ...]:
        """What the template must set on the classes it imported: for each
        class of the server and of the handler that travels by name, the
        entries of its dict that its class body did not make, as they are now
        (by value, or by name for one that does not pickle).  A class carried
        by value takes its whole dict along by itself.

        The same tuple comes back for as long as nothing in it has changed
        (an entry rebound, or a mutable one no longer equal to its copy), so
        that the state's last pickle serves again.
        """
        pair = (type(server), server.RequestHandlerClass)
        if pair != self._pair:
            found: dict[type, None] = {}
            for klass in pair:
                if isinstance(klass, type):
                    found.update(dict.fromkeys(klass.__mro__))
            self._pair = pair
            self._mro = tuple(klass for klass in found if klass.__module__ != "builtins")
            self._dicts = tuple(map(vars, self._mro))
        # The fast path, on every request: every class's dict compared with
        # a copy of it as last looked at, in C (identity first, nothing
        # allocated: a tuple of its values made each time cost twice as
        # much, with the collections of the young generation it brought),
        # and the copies of the mutable entries that travel.
        last = self._class_state
        try:
            same = last is not None and all(map(operator.eq, self._dicts, self._seen))
        except Exception:
            same = False  # an entry whose == raises: look at each class
        if last is not None and same:
            if all(entries.copies_still_equal() for entries in self._with_copies):
                return last
        self._seen = tuple(map(dict, self._dicts))
        changed = False
        state = []
        for klass in self._mro:
            entries, fresh = self._class_entries(klass)
            changed = changed or fresh
            if entries:
                state.append((klass, entries))
        if changed or self._class_state is None or len(state) != len(self._class_state):
            self._class_state = tuple(state)
        self._with_copies = [self._classes[klass] for klass in self._mro]
        self._with_copies = [entries for entries in self._with_copies if entries.copies]
        return self._class_state

    def _class_entries(self, klass: type) -> tuple[dict[str, Any], bool]:
        """The entries of *klass* that travel, and whether they changed."""
        own = vars(klass)
        names = tuple(own)
        values = tuple(own.values())
        cached = self._classes.get(klass)
        if cached is not None and cached.names == names:
            # Tuples compare item by item, identity first, in C: on the path
            # of every request.  An item rebound to an equal value counts as
            # unchanged: it pickles the same.
            try:
                same = cached.values == values
            except Exception:
                same = False
            if same and cached.copies_still_equal():
                return cached.entries, False
        entries: dict[str, Any] = {}
        copies: dict[str, Any] = {}
        if carried_by_reference(klass):
            for name, value in zip(names, values, strict=True):
                if _defined_by_the_class_body(klass, name, value):
                    continue
                if pickling_error(value) is not None:
                    # One that does not pickle: by name, or as the
                    # template's import made it.
                    reference = find_name(value)
                    if reference is not None:
                        entries[name] = reference
                    continue
                entries[name] = value
                if not immutable(value):
                    # Changed in place (a class-level dict updated) is
                    # changed too: keep a copy to compare with.
                    try:
                        copies[name] = _snapshot(value)
                    except Exception:
                        copies[name] = _NO_COPY
        self._classes[klass] = _ClassEntries(names, values, entries, copies)
        return entries, True


# A value that could not be copied: never equal, so pickled every time.
_NO_COPY = object()


def _snapshot(value: Any) -> Any:
    """What tells, compared later, whether *value* changed in place.

    One level deep, by identity (tuples compare their items by identity
    first): a dict's keys and values, a list's or a set's items, the
    attributes of an object whose equality is its identity; a copy of
    anything else.  A change further down (a list inside a class-level dict,
    changed in place) is not seen: rebind the entry to carry it.
    """
    kind = type(value)
    if kind is dict:
        return tuple(value), tuple(value.values())
    if kind is list or kind is set or kind is bytearray:
        return tuple(value)
    if kind.__eq__ is object.__eq__:
        attributes = getattr(value, "__dict__", None)
        return None if attributes is None else _snapshot(attributes)
    return copy.deepcopy(value)


class _ClassEntries:
    """One class's dict as last seen, and what of it travels."""

    __slots__ = ("names", "values", "entries", "copies")

    def __init__(
        self,
        names: tuple[str, ...],
        values: tuple[Any, ...],
        entries: dict[str, Any],
        copies: dict[str, Any],
    ) -> None:
        self.names = names
        self.values = values
        self.entries = entries
        self.copies = copies

    def copies_still_equal(self) -> bool:
        entries = self.entries
        for name, copied in self.copies.items():
            try:
                if copied is _NO_COPY or not bool(_snapshot(entries[name]) == copied):
                    return False
            except Exception:
                return False
        return True
