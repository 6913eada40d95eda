"""Benchmark txsocketserver against stdlib socketserver and native Twisted, in one run.

Usage: python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--rounds N]
                                [--duration S] [--impls ours,stdlib,twisted,asyncio]

For each scenario, one server process per implementation is started (and warmed
up); then, round after round, each implementation is loaded in turn for
``--duration`` seconds (the order rotates every round, so no implementation is
always first or last after another).  The table gives the median requests/s per
implementation and the ratios ours/stdlib and ours/twisted.  See README.md.

Every process this script starts is killed when it ends, on error or Ctrl-C too;
servers also exit by themselves when this script's end of their stdin closes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO

from loads import LoadTools, Measurement, build_dir
from scenarios import IMPLEMENTATIONS, SCENARIOS, Scenario

#: The implementation ``--before SRC`` adds: ours, imported from SRC.
BEFORE = "before"

HERE = Path(__file__).resolve().parent
SERVER_START_TIMEOUT = 30.0  # seconds to import, bind and print the port
SERVER_STOP_TIMEOUT = 2.0  # seconds between SIGTERM and SIGKILL


def process_tree_cpu(pid: int) -> int:
    """CPU clock ticks (user + system) of *pid*, of the children it has reaped,
    and of its live descendants, recursively; 0 for a process that is gone.

    A child's time joins its parent's once the parent reaps it, so exited
    workers are counted through the process that reaped them (the stdlib's
    server, our template); only children exited and not yet reaped are missed
    (a few requests' worth at most).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return 0
    # utime, stime, cutime, cstime (proc(5): fields 14-17).
    ticks = sum(int(field) for field in fields[11:15])
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += sum(process_tree_cpu(int(child)) for child in children)
    return ticks


class ServerFailed(RuntimeError):
    pass


class ServerProcess:
    """One ``server.py`` child: started in its own session (Ctrl-C is ours to
    handle), its stderr kept in a temporary file to explain a failure."""

    def __init__(
        self, impl: str, scenario: str, cpus: str | None, before: str | None = None
    ) -> None:
        self.impl = impl
        self.scenario = scenario
        self.port: int | None = None
        self.stderr: IO[bytes] = tempfile.TemporaryFile()
        env = None
        if impl == BEFORE:
            # Ours, imported from another checkout's source: the same server
            # code in this tree, the package as it was.
            assert before is not None
            env = {**os.environ, "PYTHONPATH": before}
            impl = "ours"
        command = [sys.executable, str(HERE / "server.py"), "--impl", impl, "--scenario", scenario]
        self.process = subprocess.Popen(
            command + (["--cpus", cpus] if cpus else []),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )

    def wait_for_port(self, deadline: float) -> int:
        """Read ``PORT <n>`` from the child's stdout, failing at ``deadline``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in buffer:
                # Servers start in parallel and share the deadline: one that is
                # already listening when another has used it up still counts.
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    raise ServerFailed(f"no port within {SERVER_START_TIMEOUT:.0f}s{self.log()}")
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise ServerFailed(f"exited before listening{self.log()}")
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode(errors="replace")
        if not line.startswith("PORT "):
            raise ServerFailed(f"unexpected first line {line!r}{self.log()}")
        self.port = int(line.split()[1])
        return self.port

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server and of every process it started.

        A forking server's requests run in other processes: the stdlib's in
        children of the server (their fork is the server's CPU, their run is
        not), ours in workers of a template process (the fork is the
        template's). Counting the server process alone would charge the fork
        to one side only; counting the tree charges both the same work.
        """
        return process_tree_cpu(self.process.pid) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerFailed(f"exited with status {self.process.returncode}{self.log()}")

    def log(self, lines: int = 15) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace").splitlines()[-lines:]
        return "".join(f"\n    | {line}" for line in tail)

    def stop(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # The whole session: catches anything the server itself started.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()


def start_servers(
    scenario: Scenario, impls: list[str], cpus: str | None, before: str | None = None
) -> dict[str, ServerProcess]:
    """Start one server per implementation in parallel; drop (and report) failures."""
    servers = {impl: ServerProcess(impl, scenario.name, cpus, before) for impl in impls}
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    started = {}
    for impl, server in servers.items():
        try:
            server.wait_for_port(deadline)
            started[impl] = server
        except ServerFailed as failure:
            print(f"  ! {impl} server for {scenario.name} failed: {failure}", file=sys.stderr)
            server.stop()
    return started


def rotated(items: list[str], by: int) -> list[str]:
    by %= len(items) or 1
    return items[by:] + items[:by]


def run_scenario(
    scenario: Scenario,
    impls: list[str],
    tools: LoadTools,
    args: argparse.Namespace,
    results: dict[str, list[Measurement]],
) -> None:
    """Measure ``scenario``, appending to ``results`` as each measurement ends (so
    an interrupted run still shows the rounds it completed)."""
    impls = [impl for impl in impls if (impl if impl != BEFORE else "ours") in scenario.servers]
    for impl in impls:
        results.setdefault(impl, [])
    servers = start_servers(scenario, impls, args.server_cpus, args.before)
    try:
        if not servers:
            return
        if args.warmup > 0:
            for server in servers.values():
                assert server.port is not None
                scenario.load(server.port, tools, args.warmup)
        for round_index in range(args.rounds):
            line = []
            for impl in rotated(list(servers), round_index):
                server = servers[impl]
                assert server.port is not None
                try:
                    server.check_alive()
                    cpu_before = server.cpu_seconds()
                    measurement = scenario.load(server.port, tools, args.duration)
                    server.check_alive()
                    measurement = replace(
                        measurement, server_cpu=server.cpu_seconds() - cpu_before
                    )
                except (ServerFailed, RuntimeError, subprocess.TimeoutExpired) as failure:
                    print(f"  ! {impl} on {scenario.name}: {failure}", file=sys.stderr)
                    server.stop()
                    del servers[impl]
                    continue
                results[impl].append(measurement)
                errors = f" ({measurement.errors} errors)" if measurement.errors else ""
                line.append(f"{impl} {measurement.rate:,.0f}{errors}")
            print(
                f"  {scenario.name} round {round_index + 1}/{args.rounds}: " + ", ".join(line),
                file=sys.stderr,
                flush=True,
            )
    finally:
        for server in servers.values():
            server.stop()


def median_rate(measurements: list[Measurement]) -> float | None:
    return statistics.median(m.rate for m in measurements) if measurements else None


def format_rate(measurements: list[Measurement]) -> str:
    if not measurements:
        return "-"  # not run: the scenario has no server for this implementation
    median = median_rate(measurements)
    if not median:
        return "failed"
    rates = [m.rate for m in measurements]
    spread = (max(rates) - min(rates)) / 2 / median * 100
    return f"{median:,.0f} ±{spread:.0f}%"


def format_ratio(ours: list[Measurement], other: list[Measurement]) -> str:
    a, b = median_rate(ours), median_rate(other)
    return f"{a / b:.2f}" if a and b else "-"


def print_table(all_results: dict[str, dict[str, list[Measurement]]], impls: list[str]) -> None:
    headers = ["scenario", *impls]
    others = (
        "stdlib",
        "twisted",
        "asyncio",
        "metrics",
        "access-log",
        "uvloop",
        "uvloop-protocol",
        BEFORE,
    )
    ratios = [other for other in others if "ours" in impls and other in impls]
    headers += [f"ours/{other}" for other in ratios]
    rows = []
    for name, results in all_results.items():
        row = [name, *(format_rate(results.get(impl, [])) for impl in impls)]
        row += [format_ratio(results.get("ours", []), results.get(other, [])) for other in ratios]
        rows.append(row)
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)
    ]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print()
    print("median requests/s (± half the min-max range, in % of the median)")
    print(render(headers))
    print(render(["-" * width for width in widths]))
    for row in rows:
        print(render(row))
    print_cpu_table(all_results, impls, ratios)
    for name, results in all_results.items():
        for impl, measurements in results.items():
            errors = sum(m.errors for m in measurements)
            if errors:
                print(
                    f"note: {name} / {impl}: {errors} client-side errors "
                    "(connect/read/write failures or non-2xx replies)"
                )


def print_cpu_table(
    all_results: dict[str, dict[str, list[Measurement]]], impls: list[str], ratios: list[str]
) -> None:
    """Server CPU per request: what a request costs the server, whatever the
    machine's load does to the rates.  Ratios are other/ours, so that (as for
    the rates) above 1 means ours does better."""
    headers = ["scenario", *impls, *(f"{other}/ours" for other in ratios)]
    rows = []
    for name, results in all_results.items():
        cpu = {
            impl: statistics.median(m.cpu_per_request for m in results[impl])
            for impl in impls
            if results.get(impl)
        }
        row = [name, *(f"{cpu[impl]:.0f}" if impl in cpu else "-" for impl in impls)]
        row += [
            f"{cpu[other] / cpu['ours']:.2f}" if cpu.get("ours") and cpu.get(other) else "-"
            for other in ratios
        ]
        rows.append(row)
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)
    ]
    print()
    print("median server CPU microseconds per request")
    for cells in [headers, ["-" * width for width in widths], *rows]:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        print("  ".join([first, *rest]))


def select_scenarios(only: list[str] | None, quick: bool) -> list[Scenario]:
    if not only:
        return [s for s in SCENARIOS.values() if s.quick or not quick]
    patterns = [p for arg in only for p in arg.split(",") if p]
    selected = [
        s for s in SCENARIOS.values() if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)
    ]
    if not selected:
        sys.exit(f"no scenario matches {', '.join(patterns)}; try --list")
    return selected


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one scenario per family, 1 round of 0.3 s, no warm-up",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="scenario names or glob patterns, comma-separated; repeatable",
    )
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3; quick 1)")
    parser.add_argument(
        "--duration", type=float, help="seconds per measurement (default 3; quick 0.3)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of load per server before the rounds (default 1; quick 0)",
    )
    parser.add_argument(
        "--impls",
        default=",".join(IMPLEMENTATIONS),
        help="implementations to run, comma-separated",
    )
    parser.add_argument("--echo-client", choices=["auto", "c", "python"], default="auto")
    parser.add_argument("--http-client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on CPU 0, load clients on the other CPUs (steadier on small machines)",
    )
    parser.add_argument(
        "--before",
        metavar="SRC",
        help="also run ours from another checkout's src directory, as the implementation "
        f"{BEFORE!r} (ours/{BEFORE}: a change's effect, within one run)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args()
    defaults = (1, 0.3, 0.0) if args.quick else (3, 3.0, 1.0)
    for name, default in zip(("rounds", "duration", "warmup"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def pin_cpus() -> str | None:
    """Keep this process (so the load clients it starts) off the first allowed CPU
    and return that CPU for the servers; ``None`` with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("--pin ignored: fewer than two CPUs", file=sys.stderr)
        return None
    os.sched_setaffinity(0, cpus[1:])
    return str(cpus[0])


def describe_machine(tools: LoadTools, args: argparse.Namespace) -> dict[str, object]:
    """Where and when the run happened, for the JSON (charts cite it)."""
    from importlib.metadata import version

    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit or None,
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_start": round(os.getloadavg()[0], 2),
        "load_tools": tools.describe(),
        "servers_pinned_to_cpu": args.server_cpus,
    }


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:32} {scenario.description}")
        return
    impls = [impl for impl in args.impls.split(",") if impl]
    if args.before:
        if not (Path(args.before) / "txsocketserver" / "__init__.py").is_file():
            sys.exit(f"--before {args.before}: not a src directory holding txsocketserver")
        args.before = str(Path(args.before).resolve())
        impls.append(BEFORE)
    unknown = set(impls) - set(IMPLEMENTATIONS) - {BEFORE}
    if unknown or not impls:
        sys.exit(f"unknown implementation(s) {sorted(unknown)}; choose from {IMPLEMENTATIONS}")
    scenarios = select_scenarios(args.only, args.quick)
    args.server_cpus = pin_cpus() if args.pin else None
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally block stops its processes.
    signal.signal(signal.SIGTERM, raise_system_exit)
    signal.signal(signal.SIGHUP, raise_system_exit)

    with build_dir() as tmp:
        try:
            tools = LoadTools.find(Path(tmp), args.echo_client, args.http_client)
        except RuntimeError as error:
            sys.exit(str(error))
        print(f"{tools.describe()}", file=sys.stderr)
        print(
            f"{len(scenarios)} scenarios x {impls} x {args.rounds} rounds x "
            f"{args.duration:g}s; {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f}"
            + (f"; servers pinned to CPU {args.server_cpus}" if args.server_cpus else ""),
            file=sys.stderr,
            flush=True,
        )
        all_results: dict[str, dict[str, list[Measurement]]] = {}
        machine = describe_machine(tools, args)
        interrupted = False
        try:
            for scenario in scenarios:
                run_scenario(
                    scenario, impls, tools, args, all_results.setdefault(scenario.name, {})
                )
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted; partial results:", file=sys.stderr)
        print_table(all_results, impls)
        print(
            f"load average at the end: {os.getloadavg()[0]:.2f} "
            f"(figures are noisy when it is near or above {os.cpu_count()})"
        )
        if args.json:
            machine["load_average_end"] = round(os.getloadavg()[0], 2)
            dump = {
                "machine": machine,
                "settings": {
                    "rounds": args.rounds,
                    "duration": args.duration,
                    "warmup": args.warmup,
                    "impls": impls,
                },
                "results": {
                    name: {
                        impl: [asdict(m) | {"rate": m.rate} for m in ms]
                        for impl, ms in results.items()
                    }
                    for name, results in all_results.items()
                },
            }
            Path(args.json).write_text(json.dumps(dump, indent=2) + "\n")
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
