"""What fuzzing and the soak found (docs/reliability.md), each pinned by a test.

The fuzzers' crashing inputs are also replayed as they were found
(``tests/fuzz/regressions``, by ``test_fuzz_corpus.py``); these tests say
what each finding was in plain terms.
"""

from __future__ import annotations

import signal

import pytest
from twisted.python import usage

from support import wait_until
from test_twistd_cli import CLI, TCP, Spawn, spawn  # noqa: F401 - spawn: the fixture
from test_workers import Load, ready_workers, wait_for_workers
from txsocketserver._cli import Options
from txsocketserver._twisted.proxy_protocol import ProxyHeaderError, parse_header


def test_an_unknown_v1_line_holding_a_bare_lf_is_parsed_however_it_is_split() -> None:
    # Found by fuzz_proxy_header: the receiver ignores what an UNKNOWN line
    # says, so a bare LF inside it is no error; it used to be refused when a
    # segment ended after the LF and before the CRLF, accepted otherwise.
    line = b"PROXY UNKNOWN 1.2.3.4\n5.6.7.8 1 2\r\n"
    header = parse_header(line + b"payload")
    assert header is not None and header.length == len(line) and header.family is None
    for size in range(len(line)):
        assert parse_header(line[:size]) is None, size


def test_a_known_v1_line_with_a_bare_lf_is_refused_at_once() -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")


@pytest.mark.parametrize(
    "option",
    [
        "--header-timeout",
        "--drain-timeout",
        "--worker-timeout",
        "--max-worker-memory",
        "--max-worker-lifetime",
        "--max-worker-lifetime-jitter",
    ],
)
def test_a_nan_timeout_is_a_usage_error(option: str) -> None:
    # Found by fuzz_cli_options: nan compares false with everything, so it
    # passed the range checks; --header-timeout nan then failed every
    # haproxy: connection in reactor.callLater.
    options = Options()
    with pytest.raises(usage.UsageError, match=option):
        options.parseOptions(
            ["--listen", "tcp:0", "--workers", "2", option, "nan",
             "--handler", "socketserver:StreamRequestHandler"]
        )  # fmt: skip


def test_async_workers_serve_after_a_reload(spawn: Spawn) -> None:  # noqa: F811
    # Found by the soak: an async worker that stopped made the listening
    # socket it shares with the others blocking again (the mode belongs to
    # the open file, not the process), so after a SIGHUP the new workers'
    # reactors blocked in accept() and served nothing.
    server = spawn(
        *CLI, "--workers", "2", "--listen", TCP, "--handler", "worker_handlers:AsyncPidHandler",
    )  # fmt: skip
    address = server.address()
    old = wait_for_workers(server, 2, generation=0)
    server.process.send_signal(signal.SIGHUP)
    new = wait_for_workers(server, 2, generation=1)
    assert wait_until(lambda: not (ready_workers(server) & old)), server.output()
    with Load(address, clients=4) as load:
        load.wait_for_replies(40)
    assert not load.failures
    assert load.pids() <= new
    assert server.stop() == 0
