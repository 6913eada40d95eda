"""Run one test of CPython's own ``test.test_socketserver`` against txsocketserver.

Used by ``test_cpython_conformance.py``, one process per test::

    python cpython_conformance.py list REPORT
    python cpython_conformance.py run TEST_ID REPORT

``test.test_socketserver`` comes from the running interpreter's installed
``test`` package (never a copy of it).  While that module is imported, and only
then, ``sys.modules["socketserver"]`` is txsocketserver: the classes the module
defines at import time (``ForkingErrorTestServer`` and the like) derive from
ours, and ``socketserver.X`` in its test bodies is ours.  REPORT receives JSON:
the test ids (``list``), or the outcome of the test and what shows that our
code ran (``run``).
"""

from __future__ import annotations

import importlib
import io
import json
import sys
import unittest

import cloudpickle

# Loaded before the binding, so that nothing test.support imports (on any
# version) sees txsocketserver under the stdlib's name.
import test.support  # noqa: F401
import test.support.os_helper  # noqa: F401
import test.support.socket_helper  # noqa: F401
import test.support.threading_helper  # noqa: F401

import txsocketserver
from txsocketserver._core import base as _base
from txsocketserver._twisted import reactor as _reactor

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
    else:
        test_id = sys.argv[2]
        # Our reactor thread lives as long as the process, as the interpreter's
        # own machinery does: start it before the test, so that the thread
        # count threading_helper.reap_threads compares with includes it.
        _reactor.running_reactor()
        constructed = count_servers()
        stream = io.StringIO()
        result = unittest.TextTestRunner(stream=stream, verbosity=2).run(tests[test_id])
        report = {
            "outcome": _outcome(result),
            "output": stream.getvalue(),
            "servers_constructed": constructed[0],
            "module_socketserver": module.socketserver.__name__,
            "stdlib_socketserver_loaded": "socketserver" in sys.modules,
        }
    with open(sys.argv[-1], "w") as f:
        json.dump(report, f)


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
