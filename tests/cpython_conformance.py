"""Run one test of CPython's own ``test.test_socketserver`` against txsocketserver.

Used by ``test_cpython_conformance.py``, one process per test, or the whole
module in one process as regrtest runs it::

    python cpython_conformance.py list REPORT
    python cpython_conformance.py run TEST_ID REPORT
    python cpython_conformance.py module REPORT

``test.test_socketserver`` comes from the running interpreter's installed
``test`` package (never a copy of it).  While that module is imported, and only
then, ``sys.modules["socketserver"]`` is txsocketserver: the classes the module
defines at import time (``ForkingErrorTestServer`` and the like) derive from
ours, and ``socketserver.X`` in its test bodies is ours.  REPORT receives JSON:
the test ids (``list``), or the outcome of the test and what shows that our
code ran (``run``); for ``run`` and ``module``, also what regrtest's
``--fail-env-changed`` checks would say (``saved_test_environment``,
``threading_helper.threading_cleanup`` inside the tests, ``reap_children``)
and, stricter, whether any thread outlived a test at all.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib
import io
import json
import os
import sys
import threading
import unittest

import cloudpickle

# Loaded before the binding, so that nothing test.support imports (on any
# version) sees txsocketserver under the stdlib's name.
import test.support  # noqa: F401
import test.support.os_helper  # noqa: F401
import test.support.socket_helper  # noqa: F401
import test.support.threading_helper  # noqa: F401
from test import support
from test.libregrtest.save_env import saved_test_environment

import txsocketserver
from txsocketserver._core import base as _base

MODULE = "test.test_socketserver"


def load_bound_module():
    """Import CPython's test module with ``socketserver`` bound to txsocketserver."""
    assert "socketserver" not in sys.modules, "the stdlib's socketserver is loaded already"
    sys.modules["socketserver"] = txsocketserver  # type: ignore[assignment]
    try:
        module = importlib.import_module(MODULE)
    finally:
        del sys.modules["socketserver"]
    # A new process that imported the module by name would get the stdlib's
    # socketserver under it: its module-level classes (ForkingErrorTestServer)
    # must reach our forking workers by value, as classes defined under such a
    # binding must for any user (docs/forking.md, "What the request's process
    # sees").
    cloudpickle.register_pickle_by_value(module)
    return module


def count_servers() -> list[int]:
    """Count the txsocketserver servers constructed from now on."""
    constructed = [0]
    original = _base.BaseServer.__init__

    def counting_init(self, *args, **kwargs):
        constructed[0] += 1
        original(self, *args, **kwargs)

    _base.BaseServer.__init__ = counting_init  # type: ignore[method-assign]
    return constructed


def main() -> None:
    command = sys.argv[1]
    module = load_bound_module()
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    tests = {test.id(): test for test in _flatten(suite)}
    if command == "list":
        report = {"tests": sorted(tests)}
    elif command == "run":
        test_id = sys.argv[2]
        constructed = count_servers()
        stream = io.StringIO()
        with checked_environment() as environment:
            result = unittest.TextTestRunner(stream=stream, verbosity=2).run(tests[test_id])
        report = {
            "outcome": _outcome(result),
            "output": stream.getvalue(),
            "servers_constructed": constructed[0],
            "module_socketserver": module.socketserver.__name__,
            "stdlib_socketserver_loaded": "socketserver" in sys.modules,
            **environment,
        }
    else:
        report = {"tests": {}}
        with checked_environment() as environment:
            for test_id, test in sorted(tests.items()):
                stream = io.StringIO()
                with checked_environment() as test_environment:
                    result = unittest.TextTestRunner(stream=stream, verbosity=2).run(test)
                report["tests"][test_id] = {
                    "outcome": _outcome(result),
                    "output": stream.getvalue(),
                    **test_environment,
                }
        report.update(environment)
    with open(sys.argv[-1], "w") as f:
        json.dump(report, f)


class _SavedEnvironmentButFiles(saved_test_environment):
    """regrtest's checks but the one of the files in the working directory,
    which :func:`checked_environment` reports by name instead (the two tests
    expected to fail leave the files their handlers wrote)."""

    resources = tuple(r for r in saved_test_environment.resources if r != "files")


@contextlib.contextmanager
def checked_environment():
    """What regrtest (``--fail-env-changed``) checks around a test module,
    around the body; the dict it yields is filled in on the way out.

    ``environment_altered``: ``saved_test_environment`` found a change (threads
    in ``threading._dangling`` among them), or ``threading_cleanup`` (run by
    the tests' own ``reap_threads``) or ``reap_children`` reported one.
    ``files_left``: files the body left in the working directory.
    ``threads_left``: threads alive after the body that were not before it,
    counted at once (``threading_cleanup`` waits up to a second on 3.11+).
    """
    found: dict[str, object] = {}
    altered_before, support.environment_altered = support.environment_altered, False
    threads_before = _thread._count()
    files_before = set(os.listdir())
    with _SavedEnvironmentButFiles(MODULE, 0, False, pgo=False):
        yield found
    found["files_left"] = sorted(set(os.listdir()) - files_before)
    threads_left = _thread._count() - threads_before
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    support.reap_children()
    found["environment_altered"] = support.environment_altered
    found["threads_left"] = threads_left
    found["threads_alive"] = names
    support.environment_altered = altered_before or support.environment_altered


def _flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


def _outcome(result: unittest.TestResult) -> str:
    if result.errors or result.failures or result.unexpectedSuccesses:
        return "failed"
    if result.skipped:
        return "skipped"
    return "passed" if result.testsRun == 1 else f"ran {result.testsRun}"


if __name__ == "__main__":
    main()
