"""``--workers``: 1 worker vs 2 workers, inherited socket vs ``--reuse-port``, in one run.

Usage: python benchmarks/workers.py [--rounds N] [--duration S] [--connections C]

The server is ``python -m txsocketserver --workers N --mode threading`` with
``workers_handler.BusyHTTPHandler``: ``BaseHTTPRequestHandler``, keep-alive,
about 1 ms of pure-Python CPU per request (calibrated once, here, into a fixed
amount of work).  The load is ``wrk`` (``apt-get install wrk``) with C
keep-alive connections.  Each round measures, in rotating order, 1 worker,
2 workers sharing the supervisor's socket, and 2 workers with
``--reuse-port``, each on a fresh server after a 1 s warm-up.  Reported: the
median requests/s (and the range over rounds), the 2-worker/1-worker ratio,
how evenly the requests and the connections spread over the workers
(max/min share; 1.00 is perfectly even), and the CPU the workers got per
second of the run ("cores": below 2 with 2 workers, the machine was busy)
and the requests per CPU-second they cost ("req/CPU-s": equal for 1 and 2
workers means the rate scales with the cores the workers get).

Every process started here is stopped (SIGTERM, then SIGKILL) when it ends.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workers_handler import busy  # noqa: E402

LISTENING = re.compile(r" at 127\.0\.0\.1:(\d+) \(")
READY = re.compile(r"<worker \d+ generation \d+> ready")
REQUESTS = re.compile(r"Requests/sec:\s+([\d.]+)")
WORKER = re.compile(r"^WORKER (\d+) (\d+) (\d+)$", re.MULTILINE)
START_TIMEOUT = 60.0

CONFIGS = [
    ("1 worker", 1, False),
    ("2 workers, shared socket", 2, False),
    ("2 workers, --reuse-port", 2, True),
]


def calibrate(target: float = 0.001) -> int:
    """Iterations of ``busy`` costing *target* seconds of CPU here (best of 5)."""
    iterations = 10_000
    best = min(_cpu_time(iterations) for _ in range(5))
    return max(1, round(iterations * target / best))


def _cpu_time(iterations: int) -> float:
    start = time.process_time()
    busy(iterations)
    return time.process_time() - start


@dataclass
class Result:
    rate: float
    requests: dict[int, int] = field(default_factory=dict)
    connections: dict[int, int] = field(default_factory=dict)
    # CPU seconds the workers used per wall-clock second of the run: how many
    # cores they actually got (on a busy machine, fewer than they could use).
    cores: float = 0.0

    @staticmethod
    def spread(shares: dict[int, int]) -> float:
        values = list(shares.values())
        if len(values) < 2:
            return 1.0
        return max(values) / max(1, min(values))


class Server:
    def __init__(self, workers: int, reuse_port: bool, iterations: int) -> None:
        self.output = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=str(HERE), BUSY_ITERATIONS=str(iterations))
        argv = [
            sys.executable, "-m", "txsocketserver", "--workers", str(workers),
            "--listen", "tcp:0:interface=127.0.0.1:backlog=1024", "--mode", "threading",
            "--handler", "workers_handler:BusyHTTPHandler",
        ] + (["--reuse-port"] if reuse_port else [])  # fmt: skip
        self.process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self.output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self.text()
            match = LISTENING.search(text)
            if match and len(READY.findall(text)) >= workers:
                self.port = int(match.group(1))
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{text}")
            time.sleep(0.1)

    def worker_cpu_seconds(self) -> float:
        """CPU time (user + system) of the supervisor's children so far."""
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def text(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.output.close()


def wrk(port: int, duration: int, connections: int, threads: int) -> Result:
    command = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
        "-s", str(HERE / "workers_shares.lua"), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 30, check=True
    )
    rate = REQUESTS.search(done.stdout)
    if rate is None:
        raise RuntimeError(f"no rate in wrk's output:\n{done.stdout}{done.stderr}")
    result = Result(float(rate.group(1)))
    for pid, count, connections_seen in WORKER.findall(done.stdout):
        result.requests[int(pid)] = result.requests.get(int(pid), 0) + int(count)
        highest = max(result.connections.get(int(pid), 0), int(connections_seen))
        result.connections[int(pid)] = highest
    return result


def measure(workers: int, reuse_port: bool, iterations: int, args: argparse.Namespace) -> Result:
    server = Server(workers, reuse_port, iterations)
    try:
        warm = wrk(server.port, 1, args.connections, args.threads)
        cpu, start = server.worker_cpu_seconds(), time.monotonic()
        result = wrk(server.port, args.duration, args.connections, args.threads)
        result.cores = (server.worker_cpu_seconds() - cpu) / (time.monotonic() - start)
    finally:
        server.stop()
    # Connection numbers count from the worker's start: take the warm-up's off.
    result.connections = {
        pid: n - warm.connections.get(pid, 0) for pid, n in result.connections.items()
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    iterations = calibrate()
    print(f"busy loop: {iterations} iterations ~ 1 ms of CPU; {os.cpu_count()} CPUs")
    results: dict[str, list[Result]] = {name: [] for name, _, _ in CONFIGS}
    for round_number in range(args.rounds):
        order = CONFIGS[round_number % len(CONFIGS) :] + CONFIGS[: round_number % len(CONFIGS)]
        for name, workers, reuse_port in order:
            result = measure(workers, reuse_port, iterations, args)
            results[name].append(result)
            print(
                f"round {round_number + 1}  {name:26} {result.rate:8.0f} req/s  "
                f"cores {result.cores:4.2f}  "
                f"requests {sorted(result.requests.values())}  "
                f"connections {sorted(result.connections.values())}",
                flush=True,
            )
    print()
    print(
        f"{'':26} {'req/s median':>12} {'range':>13} {'cores':>6} {'req/CPU-s':>10} "
        f"{'req max/min':>12} {'conn max/min':>13}"
    )
    for name, _, _ in CONFIGS:
        rates = [r.rate for r in results[name]]
        requests = statistics.median(Result.spread(r.requests) for r in results[name])
        connections = statistics.median(Result.spread(r.connections) for r in results[name])
        cores = statistics.median(r.cores for r in results[name])
        per_cpu = statistics.median(r.rate / r.cores for r in results[name] if r.cores)
        print(
            f"{name:26} {statistics.median(rates):12.0f} "
            f"{min(rates):6.0f}-{max(rates):<6.0f} {cores:6.2f} {per_cpu:10.0f} "
            f"{requests:12.2f} {connections:13.2f}"
        )
    one = [r.rate for r in results["1 worker"]]
    for name in ("2 workers, shared socket", "2 workers, --reuse-port"):
        ratios = [r.rate / o for r, o in zip(results[name], one, strict=True)]
        print(
            f"{name} / 1 worker: median {statistics.median(ratios):.2f} "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
