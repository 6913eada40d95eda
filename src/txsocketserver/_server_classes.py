# -*- test-case-name: tests.test_server_classes -*-
"""The classes a front end serves with, from what its options name.

``--handler``/``--server`` name classes as ``package.module:Class``
(:func:`load_object`); ``--mode`` picks the mix-in (:func:`server_class`,
:func:`mode_for`).  Shared by the command line (``_cli``) and the worker
processes of ``--workers`` (``_workers.worker``), which build their servers
from the same names.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from twisted.python import usage

import txsocketserver

MODES = ("sync", "threading", "forking", "async")


def load_object(spec: str, option: str) -> Any:
    """Import ``package.module:Name`` (``Name`` may be dotted: ``Outer.Inner``).

    The current directory is searched too (as ``python -m`` does), so a
    handler module next to the operator works under ``twistd`` as well.

    Error handling:
        ``usage.UsageError`` naming *option* and saying what went wrong.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise usage.UsageError(f"{option} {spec!r}: expected package.module:Name")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise usage.UsageError(
            f"{option} {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for name in attribute.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise usage.UsageError(
                f"{option} {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(obj, type):
        raise usage.UsageError(f"{option} {spec!r} is not a class")
    return obj


def mode_for(handler_class: type, mode: str | None) -> str | None:
    """The ``--mode`` to build the server with: ``"async"`` for an async
    handler class (whatever was asked, if it fits), else *mode* as given.

    Error handling:
        ``usage.UsageError`` for ``--mode async`` with a handler class that is
        not async, or a mode other than async for one that is.
    """
    from txsocketserver._async import is_async_handler

    if not is_async_handler(handler_class):
        if mode == "async":
            raise usage.UsageError(
                f"--mode async needs an async handler class "
                f"(txsocketserver.AsyncStreamRequestHandler); {handler_class.__name__} is not one"
            )
        return mode
    if mode not in (None, "async", "sync"):
        raise usage.UsageError(
            f"--mode {mode}: {handler_class.__name__} is an async handler class, which runs "
            "on the reactor thread (leave --mode out, or say --mode async)"
        )
    return "async"


def server_class(spec: str | None, mode: str | None) -> type:
    """The server class for ``--server`` and ``--mode``.

    Error handling:
        ``usage.UsageError`` for a class that is not a txsocketserver stream
        server, or a mode it contradicts.
    """
    mixins: dict[str, type | None] = {
        "sync": None,
        # The async strategy comes from the handler class, not from a mix-in.
        "async": None,
        "threading": txsocketserver.ThreadingMixIn,
        "forking": txsocketserver.ForkingMixIn,
    }
    if spec is None:
        base: type = txsocketserver.TCPServer
        mode = mode or "threading"
    else:
        base = load_object(spec, "--server")
        if not issubclass(base, txsocketserver.BaseServer):
            hint = ""
            if any(cls.__module__ == "socketserver" for cls in base.__mro__):
                hint = " (it is built on the stdlib's socketserver; rebase it on txsocketserver)"
            raise usage.UsageError(f"--server {spec!r} is not a txsocketserver server{hint}")
        if mode is None:
            return base
    concurrent = (txsocketserver.ThreadingMixIn, txsocketserver.ForkingMixIn)
    current = next((m for m in concurrent if issubclass(base, m)), None)
    wanted = mixins[mode]
    if current is not None and current is not wanted:
        raise usage.UsageError(
            f"--mode {mode} contradicts --server {spec!r}, which is a {current.__name__}"
        )
    if wanted is None or current is wanted:
        return base
    if spec is None:
        return {
            "threading": txsocketserver.ThreadingTCPServer,
            "forking": txsocketserver.ForkingTCPServer,
        }[mode]
    # A class made here: a forking server's children get it by value.
    return type(f"{wanted.__name__.removesuffix('MixIn')}{base.__name__}", (wanted, base), {})


__all__ = ["MODES", "load_object", "mode_for", "server_class"]
