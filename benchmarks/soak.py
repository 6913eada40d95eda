"""The soak: ``python -m txsocketserver --workers 2`` under a mixed load, for a set time.

Usage: python benchmarks/soak.py [--duration S] [--hup-interval S] [--clients N]
       [--json FILE] [--plot FILE] [--check]

Two supervisors run, each with ``--workers 2`` (a supervisor serves one
handler class, and async handlers need ``--mode async``; see
``soak_handlers.py`` for the roles):

* blocking (``--mode threading``): line echo on ``tcp:``, the stdlib's
  ``http.server`` on ``tcp:``, line echo over TLS on ``ssl:``, and the PROXY
  protocol on ``haproxy:tcp:``;
* async: line echo and the PROXY protocol, from an async handler.

``--clients`` threads (default 6) then loop over the sessions below, picked
at random by weight, all to loopback, with a short pause between sessions
(a modest rate: the machine is shared).  Correct clients, which must never
fail: persistent echo (several lines on one connection), per-request echo
(one line per connection), a client that half-closes after its lines and
reads every reply, HTTP (``http.client``, keep-alive, a file and a 404),
TLS echo, and PROXY v1 and v2 headers claiming a random client address that
the handler must report back (blocking and async).  Deliberately broken
clients, whose failures are expected and only counted: a reset in the middle
of a line, a stall (a partial line, then silence for a few seconds), and
random bytes sent to a random listener.  Every ``--hup-interval`` seconds
(default 60) both supervisors get SIGHUP: new workers start, the old ones
drain.

Every ``--sample-interval`` seconds the resident memory (``VmRSS``) and the
open descriptors of each supervisor and each of its workers are read from
``/proc``.  Reported: sessions served and failed per kind, and the slopes
(least squares, per minute) of memory and descriptors for each supervisor
over the whole run and for each worker over its life, after a warm-up
(``--warmup``, default 15 s, in which a process's thread pool, allocator
arenas and import-time caches fill).  ``--plot`` draws memory and
descriptors over time (needs matplotlib: the ``bench`` extra); ``--json``
keeps every sample.

``--check`` (what ``.ci/run`` uses) exits 1 if a correct client failed, a
supervisor did not stop cleanly, or a slope exceeds the thresholds below.
Every process started here is stopped (SIGTERM, then SIGKILL) when it ends.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import re
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import self_signed_cert  # benchmarks/, beside this script

HERE = Path(__file__).resolve().parent

#: What --check allows, per minute of the least-squares slope.  See
#: docs/reliability.md ("The soak") for why these figures.
MAX_SUPERVISOR_KB_PER_MIN = 256.0
MAX_WORKER_KB_PER_MIN = 2048.0
#: Descriptors are judged by the median of the last quarter of a process's
#: settled life against that of the first quarter: a reload's pipes and the
#: connections in flight come and go between two samples, a leak stays.
MAX_SUPERVISOR_FDS_GROWTH = 0
MAX_WORKER_FDS_GROWTH = 3

CLIENT_TIMEOUT = 15.0
START_TIMEOUT = 60.0
SERVING = re.compile(r"serving \S+ on (\S+) at 127\.0\.0\.\d+:(\d+) ")
READY = re.compile(r"<worker \d+ generation (\d+)> ready")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

BROKEN_KINDS = ("reset", "stall", "garbage")
#: Seconds of a worker's life not drawn: the interpreter starting.
WORKER_START = 3.0


# -- the servers --------------------------------------------------------------------------


class Supervisor:
    """One ``python -m txsocketserver --workers 2`` process and its log."""

    def __init__(self, name: str, arguments: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "txsocketserver", "--workers", "2", *arguments]
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ports: dict[str, int] = {}
        self.exit_status: int | None = None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, listeners: int, generation: int = 0) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self.text()
            self.ports = {kind: int(port) for kind, port in SERVING.findall(text)}
            ready = [int(g) for g in READY.findall(text)].count(generation)
            if len(self.ports) >= listeners and ready >= 2:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{text}")
            time.sleep(0.1)

    def workers(self) -> list[int]:
        """Pids of the supervisor's children (its workers)."""
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                children.append(int(entry))
        return children

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_status = self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            self.exit_status = self.process.returncode
        self.log.close()


# -- the clients --------------------------------------------------------------------------


class Failed(Exception):
    """A session got a wrong answer."""


def connect(port: int, host: str) -> socket.socket:
    return socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)


def read_line(stream: Any) -> bytes:
    line: bytes = stream.readline()
    if not line.endswith(b"\n"):
        raise Failed(f"connection ended inside a reply: {line[:60]!r}")
    return line


def some_lines(count: int) -> list[bytes]:
    return [
        random.randbytes(random.randint(0, 1500)).replace(b"\n", b"_") + b"\n"
        for _ in range(count)
    ]


def echo_lines(sock: socket.socket, lines: list[bytes]) -> None:
    with sock.makefile("rb") as replies:
        for line in lines:
            sock.sendall(line)
            if read_line(replies) != line:
                raise Failed("echo differs")


class Load:
    """The sessions, and what became of them."""

    def __init__(self, blocking: Supervisor, asynchronous: Supervisor, docroot: str) -> None:
        self.ports = {
            "echo": blocking.ports["tcp:0:interface=127.0.0.1"],
            "http": blocking.ports["tcp:0:interface=127.0.0.2"],
            "tls": next(p for k, p in blocking.ports.items() if k.startswith("ssl:")),
            "proxy": blocking.ports["haproxy:tcp:0:interface=127.0.0.4"],
            "async-echo": asynchronous.ports["tcp:0:interface=127.0.0.5"],
            "async-proxy": asynchronous.ports["haproxy:tcp:0:interface=127.0.0.6"],
        }
        self.hosts = {
            "echo": "127.0.0.1",
            "http": "127.0.0.2",
            "tls": "127.0.0.3",
            "proxy": "127.0.0.4",
            "async-echo": "127.0.0.5",
            "async-proxy": "127.0.0.6",
        }
        self.files = {name: Path(docroot, name).read_bytes() for name in os.listdir(docroot)}
        self.tls = ssl.create_default_context(cafile=os.path.join(docroot, "..", "cert.pem"))
        self.sessions: list[tuple[str, Any, int]] = [
            ("persistent echo", self.persistent_echo, 14),
            ("per-request echo", self.per_request_echo, 14),
            ("half-close", self.half_close, 6),
            ("http", self.http, 14),
            ("tls echo", self.tls_echo, 8),
            ("proxy v1", self.proxy_v1, 6),
            ("proxy v2", self.proxy_v2, 6),
            ("async persistent echo", self.async_echo, 10),
            ("async proxy v2", self.async_proxy, 6),
            ("reset", self.reset, 4),
            ("stall", self.stall, 2),
            ("garbage", self.garbage, 4),
        ]
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.failures: list[str] = []

    def open(self, role: str) -> socket.socket:
        return connect(self.ports[role], self.hosts[role])

    # correct clients

    def persistent_echo(self) -> None:
        with self.open("echo") as sock:
            echo_lines(sock, some_lines(random.randint(2, 20)))

    def per_request_echo(self) -> None:
        with self.open("echo") as sock:
            echo_lines(sock, some_lines(1))

    def half_close(self) -> None:
        lines = some_lines(random.randint(1, 10))
        with self.open(random.choice(["echo", "async-echo"])) as sock:
            sock.sendall(b"".join(lines))
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        if received != b"".join(lines):
            raise Failed(f"half-closed: {len(received)} bytes back of {len(b''.join(lines))}")

    def http(self) -> None:
        connection = http.client.HTTPConnection(
            self.hosts["http"], self.ports["http"], timeout=CLIENT_TIMEOUT
        )
        try:
            for _ in range(random.randint(1, 5)):
                name = random.choice([*self.files, "missing"])
                connection.request("GET", "/" + name)
                response = connection.getresponse()
                body = response.read()
                expected = (200, self.files[name]) if name in self.files else (404, None)
                if response.status != expected[0] or expected[1] not in (None, body):
                    raise Failed(f"GET /{name}: {response.status}, {len(body)} bytes")
        finally:
            connection.close()

    def tls_echo(self) -> None:
        with self.tls.wrap_socket(self.open("tls"), server_hostname="127.0.0.3") as sock:
            echo_lines(sock, some_lines(random.randint(1, 8)))

    def _whoami(self, role: str, header: bytes, claimed: tuple[str, int]) -> None:
        with self.open(role) as sock, sock.makefile("rb") as replies:
            sock.sendall(header)
            reply = read_line(replies).decode()
            if reply != f"{claimed[0]} {claimed[1]}\n":
                raise Failed(f"PROXY header claimed {claimed}, the handler saw {reply!r}")
            line = some_lines(1)[0]
            sock.sendall(line)
            if read_line(replies) != line:
                raise Failed("echo after the PROXY header differs")

    def proxy_v1(self) -> None:
        source = (str(ipaddress.IPv4Address(random.getrandbits(32))), random.randint(1, 65535))
        header = f"PROXY TCP4 {source[0]} 127.0.0.4 {source[1]} 80\r\n".encode()
        self._whoami("proxy", header, source)

    @staticmethod
    def _v2_header() -> tuple[bytes, tuple[str, int]]:
        if random.random() < 0.5:
            source = (str(ipaddress.IPv4Address(random.getrandbits(32))), random.randint(1, 65535))
            addresses = socket.inet_pton(socket.AF_INET, source[0]) + bytes(4)
            body = addresses + struct.pack("!HH", source[1], 80)
            family = 0x11
        else:
            packed = random.randbytes(16)
            # Expected as socket.accept() (inet_ntop) writes it, which is not
            # always str(IPv6Address): glibc shortens a lone zero group.
            source = (socket.inet_ntop(socket.AF_INET6, packed), random.randint(1, 65535))
            addresses = packed + bytes(16)
            body = addresses + struct.pack("!HH", source[1], 80)
            family = 0x21
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body, source

    def proxy_v2(self) -> None:
        self._whoami("proxy", *self._v2_header())

    def async_echo(self) -> None:
        with self.open("async-echo") as sock:
            echo_lines(sock, some_lines(random.randint(1, 20)))

    def async_proxy(self) -> None:
        self._whoami("async-proxy", *self._v2_header())

    # broken clients: whatever happens to them is expected

    def reset(self) -> None:
        with self.open(random.choice(list(self.ports))) as sock:
            sock.sendall(b"half a li")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def stall(self) -> None:
        with self.open(random.choice(list(self.ports))) as sock:
            sock.sendall(random.choice([b"", b"GET / HT", b"PROXY TCP4 ", V2_SIGNATURE[:7]]))
            time.sleep(random.uniform(2.0, 6.0))

    def garbage(self) -> None:
        with self.open(random.choice(list(self.ports))) as sock:
            sock.settimeout(3.0)
            sock.sendall(random.randbytes(random.randint(1, 4000)))
            try:
                while sock.recv(65536):
                    pass
            except (OSError, TimeoutError):
                pass

    # the loop

    def run(self, stop: threading.Event, pause: float) -> None:
        kinds = [kind for kind, _, _ in self.sessions]
        calls = {kind: call for kind, call, _ in self.sessions}
        weights = [weight for _, _, weight in self.sessions]
        while not stop.is_set():
            kind = random.choices(kinds, weights)[0]
            try:
                calls[kind]()
            except Exception as error:
                with self.lock:
                    self.failed[kind] += 1
                    if kind.split()[0] not in BROKEN_KINDS and len(self.failures) < 50:
                        self.failures.append(f"{time.strftime('%H:%M:%S')} {kind}: {error!r}")
            else:
                with self.lock:
                    self.served[kind] += 1
            stop.wait(random.uniform(0, 2 * pause))


# -- the samples --------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    supervisor: str
    pid: int
    role: str  # "supervisor" or "worker"
    rss_kb: int
    fds: int


def measure(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    times = [t for t, _ in points]
    values = [v for _, v in points]
    if len(points) < 3 or max(times) == min(times):
        return 0.0
    return statistics.linear_regression(times, values).slope * 60


@dataclass
class Report:
    duration: float
    served: dict[str, int]
    failed: dict[str, int]
    failures: list[str]
    reloads: int
    exit_status: dict[str, int | None]
    hup_interval: float = 60.0
    supervisors: dict[str, dict[str, float]] = field(default_factory=dict)
    workers: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)


def analyse(report: Report, warmup: float) -> None:
    by_process: dict[tuple[str, int, str], list[Sample]] = {}
    for sample in report.samples:
        by_process.setdefault((sample.supervisor, sample.pid, sample.role), []).append(sample)
    for (name, pid, role), samples in sorted(by_process.items(), key=lambda kv: kv[1][0].t):
        born = samples[0].t
        settled = [s for s in samples if s.t >= born + warmup]
        summary = {
            "pid": pid,
            "first_s": round(born, 1),
            "last_s": round(samples[-1].t, 1),
            "rss_first_kb": samples[0].rss_kb,
            "rss_last_kb": samples[-1].rss_kb,
            "rss_max_kb": max(s.rss_kb for s in samples),
            "fds_first": samples[0].fds,
            "fds_last": samples[-1].fds,
            "fds_max": max(s.fds for s in samples),
            "rss_kb_per_min": round(slope_per_minute([(s.t, s.rss_kb) for s in settled]), 1),
            "fds_per_min": round(slope_per_minute([(s.t, s.fds) for s in settled]), 2),
            "settled_s": round(settled[-1].t - settled[0].t, 1) if settled else 0.0,
            "fds_growth": fds_growth(settled),
        }
        if role == "supervisor":
            report.supervisors[name] = summary
        else:
            report.workers.setdefault(name, []).append(summary)


def fds_growth(samples: list[Sample]) -> float:
    """Median descriptors of the last quarter of *samples* minus the first quarter's."""
    quarter = len(samples) // 4
    if quarter < 2:
        return 0.0
    first = statistics.median(s.fds for s in samples[:quarter])
    last = statistics.median(s.fds for s in samples[-quarter:])
    return last - first


def judged_workers(report: Report, hup_interval: float) -> list[dict[str, float]]:
    """Workers with enough settled life for a slope to mean something."""
    least = min(30.0, hup_interval / 2) if hup_interval > 0 else 30.0
    return [w for ws in report.workers.values() for w in ws if w["settled_s"] >= least]


def verdict(report: Report, hup_interval: float) -> list[str]:
    problems = [f"correct client failed: {line}" for line in report.failures]
    for name, status in report.exit_status.items():
        if status != 0:
            problems.append(f"{name} supervisor exited with {status}")
    for name, summary in report.supervisors.items():
        if summary["rss_kb_per_min"] > MAX_SUPERVISOR_KB_PER_MIN:
            problems.append(f"{name} supervisor memory grows {summary['rss_kb_per_min']} kB/min")
        if summary["fds_growth"] > MAX_SUPERVISOR_FDS_GROWTH:
            problems.append(f"{name} supervisor descriptors grew by {summary['fds_growth']}")
    for worker in judged_workers(report, hup_interval):
        if worker["rss_kb_per_min"] > MAX_WORKER_KB_PER_MIN:
            problems.append(
                f"worker {worker['pid']} memory grows {worker['rss_kb_per_min']} kB/min"
            )
        if worker["fds_growth"] > MAX_WORKER_FDS_GROWTH:
            problems.append(f"worker {worker['pid']} descriptors grew by {worker['fds_growth']}")
    return problems


def print_report(report: Report, hup_interval: float) -> None:
    total = sum(report.served.values())
    print(f"\n{report.duration:.0f} s, {report.reloads} SIGHUP reloads per supervisor")
    print(f"sessions: {total} served ({total / report.duration:.1f}/s)")
    for kind in sorted(set(report.served) | set(report.failed)):
        broken = " (deliberately broken)" if kind in BROKEN_KINDS else ""
        print(
            f"  {kind:24} served {report.served.get(kind, 0):7}  "
            f"failed {report.failed.get(kind, 0):5}{broken}"
        )
    for line in report.failures:
        print("  FAILED", line)
    print("supervisors (whole run after the warm-up), slope per minute:")
    for name, s in report.supervisors.items():
        print(
            f"  {name:9} rss {s['rss_first_kb']}->{s['rss_last_kb']} kB "
            f"({s['rss_kb_per_min']:+.1f} kB/min)  fds {s['fds_first']}->{s['fds_last']} "
            f"({s['fds_per_min']:+.2f}/min, median growth {s['fds_growth']:+g})  "
            f"exit {report.exit_status[name]}"
        )
    workers = judged_workers(report, hup_interval)
    print(
        f"workers: {sum(len(ws) for ws in report.workers.values())} ran, {len(workers)} "
        f"lived long enough to judge (slope over each one's life after the warm-up):"
    )
    for name, ws in report.workers.items():
        judged = [w for w in ws if w in workers]
        if not judged:
            continue
        rss = [w["rss_kb_per_min"] for w in judged]
        fds = [w["fds_per_min"] for w in judged]
        growth = [w["fds_growth"] for w in judged]
        print(
            f"  {name:9} rss slope median {statistics.median(rss):+.1f} kB/min "
            f"(min {min(rss):+.1f}, max {max(rss):+.1f}); fds slope median "
            f"{statistics.median(fds):+.2f}/min (max {max(fds):+.2f}), median growth max "
            f"{max(growth):+g}; rss at end of life "
            f"{min(w['rss_last_kb'] for w in judged)}-{max(w['rss_last_kb'] for w in judged)} kB"
        )


def plot(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, descriptors) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colours = {"blocking": "tab:blue", "async": "tab:orange"}
    lines: dict[tuple[str, int, str], list[Sample]] = {}
    for sample in report.samples:
        lines.setdefault((sample.supervisor, sample.pid, sample.role), []).append(sample)
    labelled: set[tuple[str, str]] = set()
    for (name, _, role), samples in lines.items():
        if role == "worker":
            # Its first seconds are the interpreter starting, not serving.
            samples = [s for s in samples if s.t >= samples[0].t + WORKER_START]
        minutes = [s.t / 60 for s in samples]
        label = f"{name} {role}" + ("s" if role == "worker" else "")
        style = {"linewidth": 2.0} if role == "supervisor" else {"linewidth": 0.8, "alpha": 0.7}
        show = None if (name, role) in labelled else label
        labelled.add((name, role))
        dash = "-" if role == "supervisor" else ":"
        memory.plot(minutes, [s.rss_kb / 1024 for s in samples], dash,
                    color=colours[name], label=show, **style)  # fmt: skip
        descriptors.plot(minutes, [s.fds for s in samples], dash,
                         color=colours[name], **style)  # fmt: skip
    memory.set_ylabel("resident memory (MiB)")
    memory.set_ylim(bottom=0)
    descriptors.set_ylabel("open descriptors")
    descriptors.set_ylim(bottom=0)
    reloads = (
        f"a SIGHUP reload every {report.hup_interval:.0f} s starts new workers"
        if report.reloads
        else "no reloads: the same workers throughout"
    )
    descriptors.set_xlabel(f"minutes ({reloads}; workers from {WORKER_START:.0f} s after start)")
    memory.legend(loc="lower right", fontsize="small")
    total = sum(report.served.values())
    memory.set_title(
        f"Soak: --workers 2, {report.duration / 60:.0f} min, {total} sessions, "
        f"{report.reloads} reloads"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# -- the run ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument(
        "--hup-interval", type=float, default=60.0, help="seconds between SIGHUPs (0: none)"
    )
    parser.add_argument("--sample-interval", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--pause", type=float, default=0.02, help="mean seconds between sessions")
    parser.add_argument("--json", help="write the report and every sample here")
    parser.add_argument("--plot", help="draw memory and descriptors over time here (PNG)")
    parser.add_argument("--logs", help="keep the supervisors' logs in this directory")
    parser.add_argument("--check", action="store_true", help="exit 1 on a failure or growth")
    parser.add_argument(
        "--from-json", help="report (and --plot) a run saved with --json instead of running"
    )
    args = parser.parse_args()
    if args.from_json:
        return conclude(load_report(args.from_json), args)

    work = tempfile.mkdtemp(prefix="txss-soak-")
    logs = Path(args.logs or work)
    logs.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed_cert(work, "127.0.0.3")
    docroot = os.path.join(work, "www")
    os.mkdir(docroot)
    for name, size in (("small.txt", 100), ("page.html", 12_000), ("blob.bin", 300_000)):
        Path(docroot, name).write_bytes(random.randbytes(size))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        SOAK_DOCROOT=docroot,
    )
    common = ["--trusted-proxies", "127.0.0.0/8", "--drain-timeout", "30"]
    blocking = Supervisor(
        "blocking",
        [
            "--mode", "threading", "--handler", "soak_handlers:Mixed", *common,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", "tcp:0:interface=127.0.0.2",
            "--listen", f"ssl:0:interface=127.0.0.3:privateKey={key}:certKey={cert}",
            "--listen", "haproxy:tcp:0:interface=127.0.0.4",
        ],
        env,
        logs / "blocking.log",
    )  # fmt: skip
    asynchronous = Supervisor(
        "async",
        [
            "--handler", "soak_handlers:AsyncMixed", *common,
            "--listen", "tcp:0:interface=127.0.0.5",
            "--listen", "haproxy:tcp:0:interface=127.0.0.6",
        ],
        env,
        logs / "async.log",
    )  # fmt: skip
    supervisors = [blocking, asynchronous]
    stop = threading.Event()
    samples: list[Sample] = []
    reloads = 0
    clients: list[threading.Thread] = []
    try:
        blocking.wait_ready(4)
        asynchronous.wait_ready(2)
        load = Load(blocking, asynchronous, docroot)
        start = time.monotonic()
        clients = [
            threading.Thread(target=load.run, args=(stop, args.pause), daemon=True)
            for _ in range(args.clients)
        ]
        for client in clients:
            client.start()
        # --hup-interval 0: no reloads (workers then live the whole run).
        next_hup = start + args.hup_interval if args.hup_interval > 0 else float("inf")
        next_report = start + 60
        while (now := time.monotonic()) < start + args.duration:
            for supervisor in supervisors:
                pids = [(supervisor.process.pid, "supervisor")]
                pids += [(pid, "worker") for pid in supervisor.workers()]
                for pid, role in pids:
                    measured = measure(pid)
                    if measured is not None:
                        samples.append(Sample(now - start, supervisor.name, pid, role, *measured))
            if now >= next_hup:
                for supervisor in supervisors:
                    supervisor.process.send_signal(signal.SIGHUP)
                reloads += 1
                next_hup += args.hup_interval
            if now >= next_report:
                with load.lock:
                    print(
                        f"{(now - start) / 60:5.1f} min: served {sum(load.served.values())}, "
                        f"failed {dict(load.failed)}",
                        flush=True,
                    )
                next_report += 60
            time.sleep(max(0.0, min(args.sample_interval, start + args.duration - now)))
        duration = time.monotonic() - start
    finally:
        stop.set()
        for client in clients:
            client.join(CLIENT_TIMEOUT + 10)
        for supervisor in supervisors:
            supervisor.stop()
    report = Report(
        duration=duration,
        served=dict(load.served),
        failed=dict(load.failed),
        failures=load.failures,
        reloads=reloads,
        exit_status={s.name: s.exit_status for s in supervisors},
        hup_interval=args.hup_interval,
        samples=samples,
    )
    for supervisor in supervisors:
        text = supervisor.text()
        warnings = len(re.findall(r"#(?:warn|error|critical)\]", text))
        print(
            f"{supervisor.name} log: {text.count('Traceback')} tracebacks, "
            f"{warnings} warnings or errors ({supervisor.log_path})"
        )
    if args.json:
        data = {
            k: v for k, v in vars(report).items() if k not in ("samples", "supervisors", "workers")
        }
        data["samples"] = [vars(s) for s in report.samples]
        data["arguments"] = vars(args)
        Path(args.json).write_text(json.dumps(data) + "\n")
    return conclude(report, args)


def load_report(path: str) -> Report:
    data = json.loads(Path(path).read_text())
    samples = [Sample(**sample) for sample in data.pop("samples")]
    for derived in ("arguments", "supervisors", "workers"):
        data.pop(derived, None)
    return Report(**data, samples=samples)


def conclude(report: Report, args: argparse.Namespace) -> int:
    """Analyse, print, plot and judge *report*; the exit status."""
    analyse(report, args.warmup)
    print_report(report, report.hup_interval)
    if args.plot:
        plot(report, args.plot)
    problems = verdict(report, report.hup_interval)
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
