"""Fuzz the ``--config`` TOML file (``txsocketserver._config``), read as the CLI reads it.

Documented failure: ``twisted.python.usage.UsageError`` (``ConfigError``, a
subclass, lists every problem of the file with its place).  The file is
written from the input (raw text, or TOML assembled from the options' names,
values of every TOML type and ``[[listener]]`` tables) and read through
``Options().parseOptions(["--config", FILE, "--handler", ...])`` with an
empty environment; ``--handler`` and ``server`` can import only the
stdlib's ``socketserver``/``http.server`` and ``txsocketserver``
(``_harness.guarded_imports``).  Invariants after a parse that succeeds: the
same as ``fuzz_cli_options`` (listeners present, timeouts and counts in
range), and what each ``[[listener]]`` table sets is in range too.

Until the configuration file exists (``txsocketserver._config``), this
harness is not run (``AVAILABLE`` is false) and its inputs are not replayed.

Run: ``python tests/fuzz/fuzz_config.py CORPUS_DIR [libFuzzer options]``.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from _harness import FuzzInput, fuzz, guarded_imports, instrumented
from fuzz_cli_options import check_parsed
from twisted.python import usage

AVAILABLE = importlib.util.find_spec("txsocketserver._config") is not None

with instrumented("txsocketserver"):
    from txsocketserver._cli import Options


_DIRECTORY = tempfile.mkdtemp(prefix="txss-fuzz-config-")
atexit.register(shutil.rmtree, _DIRECTORY, True)
FILE = os.path.join(_DIRECTORY, "txsocketserver.toml")
COMMAND_LINE = ["--config", FILE, "--handler", "socketserver:StreamRequestHandler"]

# The seeds in corpus/config index these lists: add at the end only.
KEYS = ["listen", "mode", "workers", "drain-timeout", "graceful-timeout", "worker-timeout",
        "max-requests", "max-requests-jitter", "reuse-port", "trusted-proxies",
        "header-timeout", "max-threads", "server", "handler", "max-worker-memory",
        "log-file", "config", "help", "endpoint", "listener"]  # fmt: skip
STRINGS = ["tcp:0", "tcp:0:interface=127.0.0.1", "haproxy:tcp:0", "unix:/tmp/fuzz.sock",
           "ssl:0", "8000", "threading", "sync", "forking", "async", "10.0.0.0/8", "*",
           "txsocketserver:ThreadingTCPServer", "socketserver:StreamRequestHandler",
           "nan", "", "1.5"]  # fmt: skip
LISTENER_KEYS = ["endpoint", "trusted-proxies", "header-timeout", "max-threads", "mode"]


def value(given: FuzzInput, depth: int = 0) -> str:
    """A TOML value of any type."""
    kind = given.below(8)
    if kind == 0:
        return json.dumps(str(given.choice(STRINGS)))
    if kind == 1:
        return str(given.int(2) - 1000)
    if kind == 2:
        return str(given.choice(["0.0", "-1.5", "2.5", "nan", "inf", "-inf", "1e400", "0.25"]))
    if kind == 3:
        return given.choice(["true", "false"])  # type: ignore[return-value]
    if kind == 4 and depth == 0:
        return "[" + ", ".join(value(given, 1) for _ in range(given.below(4))) + "]"
    if kind == 5 and depth == 0:
        items = (f'"{given.choice(KEYS)}" = {value(given, 1)}' for _ in range(given.below(3)))
        return "{" + ", ".join(items) + "}"
    if kind == 6:
        return json.dumps(given.bytes(given.below(16)).decode("utf-8", "replace"))
    return json.dumps(str(given.choice(STRINGS)))


def document(data: bytes) -> bytes:
    """The --config file's bytes, made from the fuzzer's *data*."""
    given = FuzzInput(data)
    if given.below(8) == 0:
        return given.rest()
    lines = [f"{given.choice(KEYS)} = {value(given)}" for _ in range(given.below(8))]
    for _ in range(given.below(3)):
        lines.append("[[listener]]")
        keys = LISTENER_KEYS if given.below(4) else KEYS
        lines += [f"{given.choice(keys)} = {value(given)}" for _ in range(given.below(4))]
    return "\n".join(lines).encode() + b"\n"


def check(data: bytes) -> None:
    if not AVAILABLE:
        return
    with open(FILE, "wb") as file:
        file.write(document(data))
    options = Options()
    # The configuration reads TXSOCKETSERVER_*, PORT and WEB_CONCURRENCY too:
    # none of this process's, only the file's.
    hidden = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if name.startswith("TXSOCKETSERVER_") or name in ("PORT", "WEB_CONCURRENCY")
    }
    try:
        with guarded_imports():
            options.parseOptions(COMMAND_LINE)
    except usage.UsageError:
        return
    finally:
        os.environ.update(hidden)
    check_parsed(options)
    from txsocketserver import _config

    # What each [[listener]] table sets on its server (_cli applies these).
    for index in range(len(options["listens"])):
        settings = _config.listener_settings(options, index)
        timeout = settings.get("header_timeout")
        assert timeout is None or timeout > 0, settings
        threads = settings.get("max_threads")
        assert threads is None or threads >= 1, settings


if __name__ == "__main__":
    if not AVAILABLE:
        sys.exit("fuzz_config: txsocketserver._config is not there yet")
    sys.exit(fuzz(check))
