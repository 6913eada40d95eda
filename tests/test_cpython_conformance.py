"""CPython's own ``test_socketserver``, run against txsocketserver.

The test module is the running interpreter's (``test.test_socketserver`` of
its installed ``test`` package), imported with ``socketserver`` bound to
txsocketserver (see ``cpython_conformance.py``).  Each of its tests runs in a
process of its own, bounded by a timeout, and must pass, except those named
in ``EXPECTED_TO_FAIL`` with the reason; for every test the report must show
that txsocketserver's servers were the ones built, and that the stdlib's
``socketserver`` was never loaded.  Every test, and the whole module run in
one process as regrtest runs it, must leave the environment as regrtest's
``--fail-env-changed`` wants it (``saved_test_environment``,
``threading_cleanup``, ``reap_children``), and no thread behind at all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "cpython_conformance.py")
# One test takes a second or two; a forking test on a loaded machine, more.
TEST_TIMEOUT = 120

EXPECTED_TO_FAIL = {
    # It lists the module's public names whose __module__ is the literal
    # "socketserver": ours are defined in txsocketserver's submodules, so the
    # list it expects is empty while __all__ holds the stdlib's names.  The
    # check is of the module's identity, not of its behaviour.
    "test.test_socketserver.MiscTestCase.test_all",
    # The handler writes to os_helper.TESTFN, a file name that os_helper
    # computes from os.getpid() when it is imported.  A forked request of the
    # stdlib shares the parent's memory, so the same name; ours runs in a
    # process forked from a template that imported os_helper itself, so it
    # writes to a file named after the template's pid, which the test never
    # reads.  docs/forking.md, "What the request's process sees": state
    # computed at import time in the parent is not carried.
    "test.test_socketserver.ErrorHandlerTest.test_forking_handled",
    "test.test_socketserver.ErrorHandlerTest.test_forking_not_handled",
}

# For those two: what the handler (and handle_error) wrote, under the
# template's TESTFN: the behaviour is the stdlib's, only the file name differs.
_ERRORS = "test.test_socketserver.ErrorHandlerTest."
WRITTEN_UNDER_ANOTHER_NAME = {
    _ERRORS + "test_forking_handled": "Handler called\nError handled\n",
    _ERRORS + "test_forking_not_handled": "Handler called\n",
}


def _run(*args: str, report: str, timeout: float = TEST_TIMEOUT) -> dict:
    done = subprocess.run(
        [sys.executable, RUNNER, *args, report],
        cwd=os.path.dirname(report),
        timeout=timeout,
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    with open(report) as f:
        found = json.load(f)
    found["process_output"] = done.stdout.decode(errors="replace")
    return found


def _assert_clean(found: dict, test_id: str) -> None:
    """What regrtest's environment checks, and a thread count, say of a test."""
    detail = found.get("output", "") + found["process_output"]
    assert not found["environment_altered"], detail
    assert found["threads_left"] == 0, found["threads_alive"]
    expected_files = 1 if test_id in WRITTEN_UNDER_ANOTHER_NAME else 0
    assert len(found["files_left"]) == expected_files, found["files_left"]


def _test_ids() -> list[str]:
    if importlib.util.find_spec("test.test_socketserver") is None:
        return []
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        return _run("list", report=os.path.join(scratch, "tests.json"))["tests"]


TEST_IDS = _test_ids()


def test_the_interpreters_test_module_is_found():
    # Without the test package (some distributions split it off), there is
    # nothing to run: say so rather than pass with zero tests.
    assert TEST_IDS, "this interpreter has no test.test_socketserver (install its test package)"
    assert len(TEST_IDS) >= 25
    assert EXPECTED_TO_FAIL <= set(TEST_IDS)


@pytest.mark.timeout(TEST_TIMEOUT + 10)
@pytest.mark.parametrize("test_id", TEST_IDS, ids=[t.rpartition(".")[2] for t in TEST_IDS])
def test_cpython(test_id, tmp_path):
    report = _run("run", test_id, report=str(tmp_path / "report.json"))
    _assert_clean(report, test_id)
    assert report["module_socketserver"] == "txsocketserver"
    assert not report["stdlib_socketserver_loaded"]
    if test_id in EXPECTED_TO_FAIL:
        assert report["outcome"] == "failed", report["output"]
        if test_id in WRITTEN_UNDER_ANOTHER_NAME:
            written = [p.read_text() for p in tmp_path.iterdir() if p.name.startswith("@test_")]
            assert written == [WRITTEN_UNDER_ANOTHER_NAME[test_id]], report["output"]
        return
    assert report["outcome"] == "passed", report["output"]
    assert report["servers_constructed"] > 0, "no txsocketserver server was built"


@pytest.mark.timeout(4 * TEST_TIMEOUT + 10)
def test_cpython_module_in_one_process_leaves_the_environment_clean(tmp_path):
    # regrtest runs a test module in one process: only the first test there
    # starts from a process that never served, and a thread the package kept
    # would show in every later test's threading_cleanup.
    assert TEST_IDS, "this interpreter has no test.test_socketserver"
    found = _run("module", report=str(tmp_path / "report.json"), timeout=4 * TEST_TIMEOUT)
    assert set(found["tests"]) == set(TEST_IDS)
    for test_id, outcome in found["tests"].items():
        outcome["process_output"] = ""
        _assert_clean(outcome, test_id)
        expected = "failed" if test_id in EXPECTED_TO_FAIL else "passed"
        assert outcome["outcome"] == expected, (test_id, outcome["output"])
    assert not found["environment_altered"], found["process_output"]
    assert found["threads_left"] == 0, found["threads_alive"]
