"""The blocking world's reactor thread lives only while something needs it.

Tests for ``txsocketserver._twisted.reactor`` (its theory of operation says
how).  Each scenario runs in a fresh interpreter (``lifecycle_scenarios.py``):
only there is the baseline a process that has never served, and only there may
a test run and stop Twisted's global reactor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "lifecycle_scenarios.py")
TIMEOUT = 90

SERVER_KINDS = [
    "tcp",
    "threading_tcp",
    "forking_tcp",
    "udp",
    "threading_udp",
    "unix_stream",
    "async_tcp",
    "async_udp",
    "endpoint",
    "threading_endpoint",
    "async_endpoint",
]


def run_scenario(*args: str, cwd: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", SCENARIOS, *args],
        cwd=cwd,
        timeout=TIMEOUT,
        capture_output=True,
    )
    output = done.stderr.decode(errors="replace")
    assert done.returncode == 0, output
    lines = done.stdout.decode().splitlines()
    assert lines, output
    found = json.loads(lines[-1])
    found["stderr"] = output
    return found


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_server_close_leaves_no_thread_or_process(kind, tmp_path):
    found = run_scenario("close", kind, cwd=str(tmp_path))
    # Served, twice in a row (the thread comes back for the second server).
    assert found["replies"] == [True, True], found["stderr"]
    # While a server was open, our thread ran the reactor...
    assert found["reactor_thread_while_open"] == [True, True]
    # ...and after each server_close(), at once, the process is as before:
    # no thread, no dangling Thread object, no child process, and the
    # reactor is not running.
    assert found["threads_after_close"] == [[], []], found["stderr"]
    assert found["dangling_after_close"] == [0, 0]
    assert found["children_after_close"] == [[], []]
    assert found["reactor_running_after_close"] == [False, False]


def test_the_thread_stays_between_serving_calls_of_an_open_server(tmp_path):
    found = run_scenario("between_calls", cwd=str(tmp_path))
    # handle_request() three times: one thread served all three.
    assert found["replies"] == 3
    assert found["thread_idents"] == 1
    assert found["alive_between_calls"] is True
    assert found["alive_after_close"] is False


def test_a_call_in_flight_holds_the_reactor_for_its_length(tmp_path):
    # An endpoint server listens at construction, with no reactor running;
    # closing it without ever serving needs the reactor for the port's close.
    found = run_scenario("call_in_flight", cwd=str(tmp_path))
    assert found["alive_before_close"] is False
    assert found["port_closed"] is True
    assert found["alive_after_close"] is False


def test_a_connection_that_outlives_its_server_is_served_to_its_end(tmp_path):
    # A daemon handler still talking on an endpoint connection after
    # server_close(): as the stdlib's request thread would, it finishes, and
    # only then does our thread go.
    found = run_scenario("outlived", cwd=str(tmp_path))
    assert found["reply_after_close"] == "late"
    assert found["alive_right_after_close"] is True
    assert found["alive_at_the_end"] is False


def test_a_server_dropped_without_server_close_releases_the_reactor(tmp_path):
    found = run_scenario("collected", cwd=str(tmp_path))
    assert found["reply"] is True
    assert found["alive_while_referenced"] is True
    assert found["gone_once_collected"] is True


@pytest.mark.parametrize("twisted_way", ["run", "react", "trial"])
@pytest.mark.parametrize("order", ["blocking_first", "twisted_first"])
def test_twisted_runs_the_reactor_before_and_after_the_blocking_world(
    order, twisted_way, tmp_path
):
    found = run_scenario("twisted", order, twisted_way, cwd=str(tmp_path))
    steps = found["steps"]
    if order == "blocking_first":
        assert [s[0] for s in steps] == ["blocking", "twisted", "blocking"]
    else:
        assert [s[0] for s in steps] == ["twisted", "blocking"]
    for name, ok in steps:
        assert ok is True, (name, found["stderr"])
    assert found["threads_at_the_end"] == []


def test_a_blocking_server_inside_the_twisted_world_holds_nothing(tmp_path):
    # The program runs the reactor (react); a thread of its own uses a server
    # through the blocking API: no thread of ours, and the reactor is the
    # program's to stop.
    found = run_scenario("inside_twisted", cwd=str(tmp_path))
    assert found["reply"] is True
    assert found["our_threads"] == []
    assert found["exit_code"] == 0
