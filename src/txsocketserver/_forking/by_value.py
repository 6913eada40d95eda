# -*- test-case-name: tests.test_forking_fidelity -*-
"""Rebuilding classes and functions carried by value, in a forking server's
template, without importing cloudpickle.

The server process pickles a class that a new process cannot import by name
(defined inside a function, in ``__main__``) with cloudpickle (see
``_forking.dispatcher``).  Such a pickle names the functions that rebuild it
as ``cloudpickle.cloudpickle.<name>``, and unpickling it would import
cloudpickle in the template, and with it ``threading``, ``logging`` and
``typing``: ``threading``'s at-fork hook alone doubles the CPU of each fork
(≈ 0.5 ms per request, measured), and every fork copies the page tables of
their memory.  So the template's unpickler (``_forking.template``) takes the
rebuilding functions below in their place: the few that classes, functions
and closures need, written for the cloudpickle series :data:`CHECKED_SERIES`
(the server process sends its version; ``tests/test_forking_fidelity.py``
checks the names against cloudpickle).  Any other name, or another cloudpickle
series, is looked up in cloudpickle itself, which is then imported: slower,
never wrong.
"""

from __future__ import annotations

import builtins
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# The cloudpickle releases whose pickles these functions rebuild.
CHECKED_SERIES = ("3.1.",)
CLOUDPICKLE_MODULE = "cloudpickle.cloudpickle"

# Classes rebuilt in this process, by cloudpickle's tracker id: the same class
# pickled twice (in the preload, then in the server's state) is one class here.
_classes_by_tracker_id: dict[str, type] = {}


def _builtin_type(name: str) -> Any:
    return getattr(types, name)


def subimport(name: str) -> types.ModuleType:
    __import__(name)
    return sys.modules[name]


def dynamic_subimport(name: str, namespace: dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(namespace)
    module.__dict__["__builtins__"] = builtins.__dict__
    return module


def _make_function(
    code: types.CodeType, globals: dict[str, Any], name: str, argdefs: Any, closure: Any
) -> types.FunctionType:
    globals["__builtins__"] = builtins.__dict__
    return types.FunctionType(code, globals, name, argdefs, closure)


def _make_empty_cell() -> Any:
    return types.CellType()


def _make_cell(value: Any) -> Any:
    return types.CellType(value)


def _make_skeleton_class(
    type_constructor: type,
    name: str,
    bases: tuple[type, ...],
    type_kwargs: dict[str, Any],
    class_tracker_id: str | None,
    extra: Any,
) -> type:
    """The class, empty until ``_class_setstate`` fills it (or the one rebuilt
    before under the same tracker id)."""
    type_kwargs = {sys.intern(key): value for key, value in type_kwargs.items()}
    skeleton = types.new_class(
        name, bases, {"metaclass": type_constructor}, lambda ns: ns.update(type_kwargs)
    )
    if class_tracker_id is None:
        return skeleton
    return _classes_by_tracker_id.setdefault(class_tracker_id, skeleton)


def _class_setstate(obj: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> Any:
    attributes, _slots = state
    registry = None
    for name, value in attributes.items():
        if name == "_abc_impl":
            registry = value
        else:
            setattr(obj, name, value)
    if sys.version_info >= (3, 13) and "__firstlineno__" in attributes:
        # Deleted by the setattr of __firstlineno__ itself: set it again.
        obj.__firstlineno__ = attributes["__firstlineno__"]
    if registry is not None:
        for subclass in registry:
            obj.register(subclass)
    return obj


def _function_setstate(obj: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    attributes, slots = state
    obj.__dict__.update(attributes)
    function_globals = slots.pop("__globals__")
    closure = slots.pop("__closure__")
    # Only there to have the submodules the code uses imported by now.
    slots.pop("_cloudpickle_submodules")
    obj.__globals__.update(function_globals)
    obj.__globals__["__builtins__"] = builtins.__dict__
    if closure is not None:
        for index, cell in enumerate(closure):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            obj.__closure__[index].cell_contents = value
    for name, value in slots.items():
        setattr(obj, name, value)


LOADERS: dict[str, Callable[..., Any]] = {
    function.__name__: function
    for function in (
        _builtin_type,
        subimport,
        dynamic_subimport,
        _make_function,
        _make_empty_cell,
        _make_cell,
        _make_skeleton_class,
        _class_setstate,
        _function_setstate,
    )
}

# Set by the template from the server process's cloudpickle version.
enabled = False


def enable_for(cloudpickle_version: str | None) -> None:
    global enabled
    enabled = cloudpickle_version is not None and cloudpickle_version.startswith(CHECKED_SERIES)


def find(module: str, name: str) -> Callable[..., Any] | None:
    """Our rebuilding function for ``module.name``, or None: look it up as usual."""
    if enabled and module == CLOUDPICKLE_MODULE:
        return LOADERS.get(name)
    return None
