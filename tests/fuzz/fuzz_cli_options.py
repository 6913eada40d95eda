"""Fuzz what an operator types: the options of ``python -m txsocketserver`` and
``twistd socketserver`` (``_cli.Options``), the way both parse them.

Documented failure: ``twisted.python.usage.UsageError`` (the CLI prints it
with "try --help" and exits 2).  Covered: ``--listen`` (endpoint
descriptions, a bare port), ``--trusted-proxies`` (``TrustedProxies``),
``--header-timeout``, ``--drain-timeout``, ``--graceful-timeout``,
``--workers`` and its companions, ``--mode``, ``--max-threads``.
``--handler`` is always the stdlib's ``socketserver:StreamRequestHandler``:
a fuzzed name would import arbitrary modules.  Invariants: a parse that
succeeds leaves the endpoints, trusted proxies and numbers checked (no
negative timeouts, at least one worker, ...).

The ``--config`` file, once the CLI has one, belongs here too: see
docs/reliability.md for how to add its harness.

Run: ``python tests/fuzz/fuzz_cli_options.py CORPUS_DIR [libFuzzer options]``.
"""

from __future__ import annotations

import sys

from _harness import FuzzInput, fuzz, guarded_imports, instrumented
from twisted.python import usage

with instrumented("txsocketserver"):
    from txsocketserver._cli import Options


HANDLER = ["--handler", "socketserver:StreamRequestHandler"]
# The seeds in corpus/cli_options index these lists: add at the end only.
OPTIONS = ["--listen", "--trusted-proxies", "--header-timeout", "--drain-timeout",
           "--graceful-timeout", "--workers", "--max-requests", "--max-requests-jitter",
           "--worker-timeout", "--mode", "--max-threads", "--reuse-port",
           "-l", "-w", "-m", "--max-worker-memory", "--max-worker-lifetime",
           "--max-worker-lifetime-jitter"]  # fmt: skip
VALUES = ["8000", "0", "-1", "1.5", "nan", "inf", "1e999", "tcp:0", "tcp:0:interface=127.0.0.1",
          "haproxy:tcp:0", "unix:/tmp/fuzz.sock", "ssl:0", "10.0.0.0/8", "fd00::/8", "*",
          "127.0.0.1,::1", ",", " , 10.0.0.1 ", "::ffff:10.0.0.5", "10.0.0.0/33",
          "threading", "sync", "forking", "async", "", "2"]  # fmt: skip


def argv(data: bytes) -> list[str]:
    given = FuzzInput(data)
    arguments: list[str] = []
    for _ in range(1 + given.below(7)):
        arguments.append(str(given.choice(OPTIONS)))
        if given.below(4):
            arguments.append(str(given.choice(VALUES)))
        else:
            arguments.append(given.bytes(given.below(24)).decode("utf-8", "replace"))
    return arguments + HANDLER


def check(data: bytes) -> None:
    options = Options()
    try:
        with guarded_imports():
            options.parseOptions(argv(data))
    except usage.UsageError:
        return
    check_parsed(options)


def check_parsed(options: Options) -> None:
    """What a parse that succeeded must have checked."""
    assert options["listens"] and all(":" in d for d in options["listens"]), options["listens"]
    assert options["drain-timeout"] >= 0, options["drain-timeout"]
    assert options["header-timeout"] > 0, options["header-timeout"]
    assert options["workers"] is None or options["workers"] >= 1, options["workers"]
    assert options["max-threads"] is None or options["max-threads"] >= 1
    assert options["worker-timeout"] is None or options["worker-timeout"] > 0
    assert options["endpoint"] is not None
    if options["workers"] is None:
        return  # the worker options are not checked, as they are not used
    for name in ("max-worker-memory", "max-worker-lifetime"):
        assert options.get(name) is None or options[name] > 0, (name, options[name])
    jitter = options.get("max-worker-lifetime-jitter")
    assert jitter is None or jitter >= 0, jitter


if __name__ == "__main__":
    sys.exit(fuzz(check))
