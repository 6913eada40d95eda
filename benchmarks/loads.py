"""Load functions: drive one running server for a while, in a separate process.

A load function takes the server's port, the ``LoadTools`` found on this machine
and a duration in seconds, runs one load-client process against 127.0.0.1 and
returns a ``Measurement``.  The client is always its own process, so it never
competes with the server for a GIL (only, on a small machine, for a core).

Clients, fastest first:
- ``echoclient.c``, compiled with ``gcc`` at run time: line echo, both modes;
- ``udpclient.c``, likewise: datagram request/response (``udpclient.py`` when
  there is no ``gcc`` or with ``--echo-client python``);
- ``wrk``: HTTP (install: ``apt-get install wrk``); whole seconds only;
- ``pyclient.py``: both protocols, used when the other two are missing, and for
  HTTP runs shorter than one second (``--quick``, warm-ups).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
ECHO_MESSAGE = "txsocketserver benchmark line"
# Extra seconds a client may take beyond its duration before it is killed.
CLIENT_GRACE = 15.0


@dataclass(frozen=True)
class Measurement:
    requests: int
    seconds: float
    errors: int
    client: str
    # CPU seconds the server process used meanwhile (run.py fills it in).
    server_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_request(self) -> float:
        """Server CPU microseconds per request: steadier than the rate on a busy machine."""
        return self.server_cpu / self.requests * 1e6 if self.requests else 0.0


@dataclass(frozen=True)
class LoadTools:
    """The load clients available on this machine (None: not available)."""

    echo_client: Path | None
    wrk: str | None
    datagram_client: Path | None = None

    @classmethod
    def find(cls, build_dir: Path, echo: str = "auto", http: str = "auto") -> LoadTools:
        """Compile the C echo and datagram clients into ``build_dir``; look for ``wrk``.

        ``echo`` is ``auto``/``c``/``python``, ``http`` is ``auto``/``wrk``/``python``;
        asking for a native client that cannot be had raises ``RuntimeError``.
        """
        echo_client = None if echo == "python" else compile_client(build_dir, "echoclient")
        datagram_client = None if echo == "python" else compile_client(build_dir, "udpclient")
        if echo == "c" and echo_client is None:
            raise RuntimeError("the C echo client needs gcc (apt-get install gcc)")
        wrk = None if http == "python" else shutil.which("wrk")
        if http == "wrk" and wrk is None:
            raise RuntimeError("wrk not found; install it with: apt-get install -y wrk")
        return cls(echo_client, wrk, datagram_client)

    def describe(self) -> str:
        echo = "echoclient.c" if self.echo_client else "pyclient.py (no gcc)"
        http = self.wrk or "pyclient.py (wrk missing: apt-get install -y wrk)"
        datagram = "udpclient.c" if self.datagram_client else "udpclient.py"
        return f"echo load: {echo}; HTTP load: {http}; datagram load: {datagram}"


Load = Callable[[int, LoadTools, float], Measurement]


def compile_client(build_dir: Path, name: str) -> Path | None:
    """Compile ``<name>.c`` from this directory into ``build_dir/<name>``."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    binary = build_dir / name
    result = subprocess.run(
        [gcc, "-O2", "-o", str(binary), str(HERE / f"{name}.c")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        print(f"warning: could not compile {name}.c:\n{result.stderr}", file=sys.stderr)
        return None
    return binary


def run_client(cmd: list[str], duration: float) -> str:
    """Run one client process to completion (killed if it overruns); return stdout."""
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + CLIENT_GRACE, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def pyclient(port: int, duration: float, **options: object) -> Measurement:
    cmd = [sys.executable, str(HERE / "pyclient.py"), "--port", str(port)]
    cmd += ["--duration", str(duration)]
    for name, value in options.items():
        cmd += [f"--{name}", str(value)]
    return Measurement(**json.loads(run_client(cmd, duration)), client="pyclient")


def echo_load(mode: str, conns: int) -> Load:
    """Line echo: ``conns`` clients, ``mode`` is ``persistent`` or ``connect``."""

    def load(port: int, tools: LoadTools, duration: float) -> Measurement:
        if tools.echo_client is None:
            return pyclient(
                port, duration, proto="line", mode=mode, conns=conns, message=ECHO_MESSAGE
            )
        cmd = [
            str(tools.echo_client),
            HOST,
            str(port),
            mode,
            str(conns),
            "0",
            str(duration),
            ECHO_MESSAGE,
        ]
        return Measurement(**json.loads(run_client(cmd, duration)), client="echoclient")

    return load


_WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), "
    r"timeout (\d+)"
)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(output: str) -> Measurement:
    match = _WRK_REQUESTS.search(output)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = 0
    socket_errors = _WRK_SOCKET_ERRORS.search(output)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = _WRK_NON_2XX.search(output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    seconds = float(match.group(2)) * _TIME_UNITS[match.group(3)]
    return Measurement(int(match.group(1)), seconds, errors, client="wrk")


def http_load(conns: int, keep_alive: bool) -> Load:
    """``GET /`` from ``conns`` clients; a new connection per request unless ``keep_alive``."""

    def load(port: int, tools: LoadTools, duration: float) -> Measurement:
        mode = "persistent" if keep_alive else "connect"
        if tools.wrk is None or duration < 1:
            return pyclient(port, duration, proto="http", mode=mode, conns=conns)
        # wrk speaks HTTP/1.1 and keeps connections open unless told to close.
        cmd = [tools.wrk, "-t1", f"-c{conns}", f"-d{round(duration)}s"]
        if not keep_alive:
            cmd += ["-H", "Connection: close"]
        return parse_wrk(run_client(cmd + [f"http://{HOST}:{port}/"], duration))

    return load


def build_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="txss-bench-")


DATAGRAM_MESSAGE = "txsocketserver benchmark datagram"


def datagram_load(clients: int) -> Load:
    """Datagram echo: ``clients`` sockets, each keeping one datagram in flight."""

    def load(port: int, tools: LoadTools, duration: float) -> Measurement:
        if tools.datagram_client is None:
            cmd = [sys.executable, str(HERE / "udpclient.py"), "--port", str(port)]
            cmd += ["--clients", str(clients), "--duration", str(duration)]
            cmd += ["--message", DATAGRAM_MESSAGE]
            client = "udpclient.py"
        else:
            cmd = [str(tools.datagram_client), HOST, str(port), str(clients), "0"]
            cmd += [str(duration), DATAGRAM_MESSAGE]
            client = "udpclient"
        return Measurement(**json.loads(run_client(cmd, duration)), client=client)

    return load


def tls_echo_load(conns: int) -> Load:
    """Line echo over TLS: ``conns`` persistent connections (``tlsclient.py``)."""

    def load(port: int, tools: LoadTools, duration: float) -> Measurement:
        cmd = [sys.executable, str(HERE / "tlsclient.py"), "--port", str(port)]
        cmd += ["--conns", str(conns), "--duration", str(duration), "--message", ECHO_MESSAGE]
        return Measurement(**json.loads(run_client(cmd, duration)), client="tlsclient.py")

    return load
