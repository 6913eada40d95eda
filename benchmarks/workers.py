"""``--workers``: how 2 workers scale over 1, and how evenly they share the load, in one run.

Usage: python benchmarks/workers.py [--rounds N] [--duration S] [--connections C]
                                    [--json PATH]

The server is ``python -m txsocketserver --workers N --mode threading`` with
``workers_handler.BusyHTTPHandler``: ``BaseHTTPRequestHandler``, keep-alive,
about 1 ms of pure-Python CPU per request (calibrated once, here, into a fixed
amount of work).  The load is ``wrk`` (``apt-get install wrk``), paced by
``workers_shares.lua`` where it must not saturate (wrk has no rate option:
each connection thinks a fixed time between requests).  Each round starts
1 worker, then 2 workers sharing the supervisor's socket (the default) and
2 workers with ``--reuse-port`` (in alternating order), each a fresh server
after a 1 s warm-up, and measures on it:

* ``full``: C keep-alive connections back to back (saturated): the rate, and
  the 2-worker / 1-worker ratio of the round;
* ``half-close``, ``half-keepalive`` (2 workers): 8 connections paced to the
  round's 1-worker rate in all, so that each of 2 workers is about half busy;
  a connection per request, then keep-alive;
* ``light-close``: 1 client, a connection per request, 10 ms between them;
  ``light-keepalive``: 2 keep-alive clients, 10 ms between requests.

Reported per load: each worker's share of the requests (largest first; the
goal is that none serves more than 65% at half load), the CPU each worker
used per second ("busy"), and for full load the CPU all workers got ("cores":
below 2 with 2 workers, the machine was busy) and the requests per
CPU-second ("req/CPU-s": equal for 1 and 2 workers means the rate scales with
the cores the workers get).  ``--json`` writes every figure.

Every process started here is stopped (SIGTERM, then SIGKILL) when it ends.
The server processes import ``txsocketserver`` from ``PYTHONPATH`` first
(after this directory), so another checkout can be measured with this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workers_handler import busy  # noqa: E402

LISTENING = re.compile(r" at 127\.0\.0\.1:(\d+) \(")
READY = re.compile(r"<worker \d+ generation \d+> ready")
REQUESTS = re.compile(r"Requests/sec:\s+([\d.]+)")
WORKER = re.compile(r"^WORKER (\d+) (\d+) (\d+)$", re.MULTILINE)
START_TIMEOUT = 60.0
#: The share of the requests that no worker may exceed at half load.
HALF_LOAD_GOAL = 0.65

ONE = "1 worker"
SHARED = "2 workers, shared socket"
REUSE_PORT = "2 workers, --reuse-port"
CONFIGS = {ONE: (1, False), SHARED: (2, False), REUSE_PORT: (2, True)}


@dataclass
class Load:
    """One load of a round: how many connections, paced how."""

    name: str
    connections: int
    think_ms: float  # 0: back to back
    close: bool  # a connection per request


def loads(full_connections: int, one_worker_rate: float) -> list[Load]:
    """The loads measured on 2 workers; half load is paced so that the whole
    rate is what 1 worker serves saturated: each of 2 workers about half busy."""
    half = 8
    # Each connection: one request per (think + about one request's time).
    think = max(1.0, 1000 * half / one_worker_rate - 1.5)
    return [
        Load("full", full_connections, 0, False),
        Load("half-close", half, think, True),
        Load("half-keepalive", half, think, False),
        Load("light-close", 1, 10, True),
        Load("light-keepalive", 2, 10, False),
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
    # CPU seconds each worker used per wall-clock second of the run.
    busy: dict[int, float] = field(default_factory=dict)

    @property
    def cores(self) -> float:
        """How many cores the workers got (on a busy machine, fewer than they could use)."""
        return sum(self.busy.values())

    def shares(self, workers: int) -> list[float]:
        """Each worker's share of the requests, largest first (0 for a worker that served none)."""
        total = sum(self.requests.values()) or 1
        values = sorted((n / total for n in self.requests.values()), reverse=True)
        return (values + [0.0] * workers)[:workers]

    def busy_list(self, workers: int) -> list[float]:
        ordered = sorted(self.requests, key=lambda pid: -self.requests[pid])
        values = [self.busy.get(pid, 0.0) for pid in ordered]
        return (values + [0.0] * workers)[:workers]


class Server:
    def __init__(self, workers: int, reuse_port: bool, iterations: int) -> None:
        self.output = tempfile.TemporaryFile()
        self.connections_seen: dict[int, int] = {}
        path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, BUSY_ITERATIONS=str(iterations))
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

    def worker_cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system) of each of the supervisor's children so far."""
        seconds = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                ticks = int(fields[11]) + int(fields[12])
                seconds[int(entry.name)] = ticks / os.sysconf("SC_CLK_TCK")
        return seconds

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


def wrk(port: int, duration: int, load: Load, threads: int) -> Result:
    command = [
        "wrk", "-t", str(min(threads, load.connections)), "-c", str(load.connections),
        "-d", f"{duration}s", "-s", str(HERE / "workers_shares.lua"),
        f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    env = dict(os.environ, WORKERS_THINK_MS=str(round(load.think_ms, 2)))
    env["WORKERS_CLOSE"] = "1" if load.close else "0"
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 30, check=True, env=env
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


def measure_load(server: Server, duration: int, load: Load, threads: int) -> Result:
    cpu, start = server.worker_cpu_seconds(), time.monotonic()
    result = wrk(server.port, duration, load, threads)
    elapsed = time.monotonic() - start
    # Workers number their connections from their start: the connections
    # of this load are the numbers past the last load's.
    highest = result.connections
    result.connections = {
        pid: n - server.connections_seen.get(pid, 0) for pid, n in highest.items()
    }
    server.connections_seen.update(highest)
    result.busy = {
        pid: (seconds - cpu.get(pid, 0.0)) / elapsed
        for pid, seconds in server.worker_cpu_seconds().items()
    }
    return result


def measure(
    config: str, iterations: int, args: argparse.Namespace, one_worker_rate: float | None
) -> dict[str, Result]:
    """Every load on one fresh server of *config* (only ``full`` for 1 worker)."""
    workers, reuse_port = CONFIGS[config]
    server = Server(workers, reuse_port, iterations)
    results = {}
    try:
        full = Load("full", args.connections, 0, False)
        measure_load(server, 1, full, args.threads)  # warm-up
        results["full"] = measure_load(server, args.duration, full, args.threads)
        if one_worker_rate is not None:
            for load in loads(args.connections, one_worker_rate)[1:]:
                results[load.name] = measure_load(server, args.light, load, args.threads)
    finally:
        server.stop()
    return results


def percent(values: list[float]) -> str:
    return "/".join(f"{100 * v:.0f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds at full load")
    parser.add_argument("--light", type=int, default=5, help="seconds at half and light load")
    parser.add_argument("--connections", type=int, default=16, help="at full load")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    iterations = calibrate()
    print(f"busy loop: {iterations} iterations ~ 1 ms of CPU; {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.2f}")  # fmt: skip
    rounds: list[dict[str, dict[str, Result]]] = []
    for round_number in range(args.rounds):
        measured = {ONE: measure(ONE, iterations, args, None)}
        one_rate = measured[ONE]["full"].rate
        pair = [SHARED, REUSE_PORT] if round_number % 2 == 0 else [REUSE_PORT, SHARED]
        for config in pair:
            measured[config] = measure(config, iterations, args, one_rate)
        rounds.append(measured)
        for config, results in measured.items():
            workers = CONFIGS[config][0]
            for name, result in results.items():
                print(
                    f"round {round_number + 1}  {config:26} {name:15} {result.rate:7.0f} req/s  "
                    f"shares {percent(result.shares(workers)):>7}%  "
                    f"busy {percent(result.busy_list(workers)):>7}%  "
                    f"connections {sorted(result.connections.values(), reverse=True)}",
                    flush=True,
                )
    load_after = os.getloadavg()
    summary = summarize(rounds)
    print()
    print(f"{'full load':26} {'req/s median':>12} {'range':>13} {'cores':>6} {'req/CPU-s':>10}")
    for config in CONFIGS:
        fulls = [r[config]["full"] for r in rounds]
        rates = [r.rate for r in fulls]
        print(
            f"{config:26} {statistics.median(rates):12.0f} "
            f"{min(rates):6.0f}-{max(rates):<6.0f} "
            f"{statistics.median(r.cores for r in fulls):6.2f} "
            f"{statistics.median(r.rate / r.cores for r in fulls if r.cores):10.0f}"
        )
    for config in (SHARED, REUSE_PORT):
        ratios = summary["ratio"][config]
        print(
            f"{config} / 1 worker: median {statistics.median(ratios):.2f} "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        )
    print()
    print("largest worker's share of the requests, per round (goal at half load: "
          f"<= {100 * HALF_LOAD_GOAL:.0f}%)")  # fmt: skip
    for config in (SHARED, REUSE_PORT):
        for name, shares in summary["largest_share"][config].items():
            print(f"{config:26} {name:15} {'  '.join(f'{100 * s:3.0f}%' for s in shares)}")
    print(f"load average: before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        document = {
            "benchmark": "benchmarks/workers.py",
            "cpus": os.cpu_count(),
            "load_average": {"before": load_before, "after": load_after},
            "busy_iterations": iterations,
            "arguments": vars(args),
            "summary": summary,
            "rounds": [
                {
                    config: {name: asdict(result) for name, result in results.items()}
                    for config, results in measured.items()
                }
                for measured in rounds
            ],
        }
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    return 0


def summarize(rounds: list[dict[str, dict[str, Result]]]) -> dict[str, dict[str, object]]:
    """The 2/1 ratio of each round, and the largest worker's share of each load."""
    ratio = {
        config: [r[config]["full"].rate / r[ONE]["full"].rate for r in rounds]
        for config in (SHARED, REUSE_PORT)
    }
    largest = {
        config: {
            name: [r[config][name].shares(2)[0] for r in rounds] for name in rounds[0][config]
        }
        for config in (SHARED, REUSE_PORT)
    }
    return {"ratio": ratio, "largest_share": largest}


if __name__ == "__main__":
    sys.exit(main())
