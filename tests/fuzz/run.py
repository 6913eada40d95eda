"""Run every fuzz harness for a bounded time; report executions and coverage; fail on a finding.

Usage: python tests/fuzz/run.py [--budget SECONDS | --time SECONDS] [--only NAME]
       [--corpus DIR] [--artifacts DIR] [-- LIBFUZZER_OPTIONS...]

Each ``fuzz_*.py`` here runs under atheris (libFuzzer) in its own process,
starting from its committed seeds (``corpus/NAME``) and the inputs of every
finding so far (``regressions/NAME``), for ``--time`` seconds (or an equal
share of ``--budget``).  A run fails if the harness raises anything but its
parser's documented exception or breaks an invariant (a crash), if one input
takes over ``--hang`` seconds (a hang), or if it exceeds 2 GB (libFuzzer's
memory limit); the input that did it is written to ``--artifacts`` and its
traceback printed.  Turn such an input into a regression test by copying it
into ``regressions/NAME/`` (``tests/test_fuzz_corpus.py`` replays them all in
the normal suite) and fixing the bug.

The inputs a run finds go to ``--corpus DIR/NAME`` (default: a temporary
directory, dropped): give a lasting directory to fuzz for hours across runs.
Reported per harness: executions, libFuzzer's coverage counters (``cov``:
edges of the instrumented modules, ``ft``: features), corpus size, and the
lines of the parser's own modules that the final corpus executes.

Needs atheris (``pip install -e '.[fuzz]'``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Per harness, the parser's own code: module, and the functions or classes
#: (qualified names) whose lines count as its coverage (all if empty).
TARGETS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    # With the TLV names of the PROXY v2 TLV support (absent names count nothing).
    "proxy_header": [
        ("txsocketserver._twisted.proxy_protocol",
         ("parse_header", "_could_become", "_parse_v1", "_parse_v2", "_ip_address",
          "parse_tlvs", "_split_tlvs", "_by_type", "_text", "_parse_ssl", "_vendor",
          "_check_crc32c", "crc32c")),
    ],
    "proxy_stage": [("txsocketserver._twisted.proxy_stage", ("ProxyHeaderStage",))],
    "endpoint": [
        ("txsocketserver._twisted.endpoints",
         ("Endpoint", "listening_socket", "proxy_protocol_endpoint", "endpoint_backlog")),
        ("txsocketserver._twisted.compat",
         ("tcp_parameters", "unix_parameters", "ssl_description_options", "proxied_endpoint")),
        ("txsocketserver._twisted.tls", ("server_context", "_load_with_chain")),
    ],
    "cli_options": [("txsocketserver._cli", ("Options",))],
    "config": [("txsocketserver._config", ())],
}  # fmt: skip
STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")
EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")


@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    executions: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    lines: str = ""
    output: str = ""


def harnesses() -> list[str]:
    return sorted(path.stem.removeprefix("fuzz_") for path in HERE.glob("fuzz_*.py"))


def available(name: str) -> bool:
    """Whether what the harness fuzzes exists yet (its ``AVAILABLE``, true by default)."""
    sys.path.insert(0, str(HERE))
    try:
        return bool(getattr(importlib.import_module(f"fuzz_{name}"), "AVAILABLE", True))
    finally:
        sys.path.remove(str(HERE))


def inputs(*directories: Path) -> list[Path]:
    return sorted(p for d in directories if d.is_dir() for p in d.iterdir() if p.is_file())


def fuzz_one(name: str, seconds: int, args: argparse.Namespace, work: Path) -> Outcome:
    corpus = work / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts = Path(args.artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(HERE / f"fuzz_{name}.py"), str(corpus),
        *(str(d) for d in (HERE / "corpus" / name, HERE / "regressions" / name) if d.is_dir()),
        f"-max_total_time={seconds}", f"-timeout={args.hang}", "-rss_limit_mb=2048",
        "-print_final_stats=1", f"-artifact_prefix={artifacts}/{name}-", *args.libfuzzer,
    ]  # fmt: skip
    started = time.monotonic()
    # Twice the time, and a margin for start-up: libFuzzer stops itself.
    try:
        done = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=2 * seconds + 60,
            cwd=HERE,
        )
        output, ok = done.stdout, done.returncode == 0
    except subprocess.TimeoutExpired as expired:
        output, ok = f"{expired.stdout or ''}\nrun.py: no end in time", False
    outcome = Outcome(name, ok, time.monotonic() - started, output=output)
    statuses = STATUS.findall(output)
    if statuses:
        _, cov, ft, corp = statuses[-1]
        outcome.cov, outcome.ft, outcome.corpus = int(cov), int(ft), int(corp)
    executed = EXECUTED.search(output)
    outcome.executions = int(executed.group(1)) if executed else 0
    return outcome


def executable_lines(module: types.ModuleType, functions: tuple[str, ...]) -> set[int]:
    """The lines of *module*'s *functions* (every function if empty)."""
    filename = module.__file__
    assert filename is not None
    source = Path(filename).read_text()
    text = source.splitlines()
    lines: set[int] = set()
    pending = list(compile(source, filename, "exec").co_consts)
    while pending:
        code = pending.pop()
        if not isinstance(code, types.CodeType):
            continue
        name = getattr(code, "co_qualname", code.co_name)  # 3.10: no qualified names
        # Function bodies only: a class body (its docstring, its attributes)
        # runs at import, not per input.
        function = code.co_flags & inspect.CO_OPTIMIZED
        if function and (
            not functions or any(name == f or name.startswith(f + ".") for f in functions)
        ):
            lines.update(line for _, _, line in code.co_lines() if line is not None)
        pending.extend(code.co_consts)
    # The def and decorator lines run at import too.
    return {n for n in lines if not text[n - 1].lstrip().startswith(("def ", "async def ", "@"))}


def line_coverage(name: str, corpus: list[Path]) -> str:
    """Lines of the harness's parser that replaying *corpus* executes."""
    sys.path.insert(0, str(HERE))
    try:
        harness = importlib.import_module(f"fuzz_{name}")
    finally:
        sys.path.remove(str(HERE))
    targets = [(importlib.import_module(m), f) for m, f in TARGETS.get(name, [])]
    seen: dict[str, set[int]] = {m.__file__: set() for m, _ in targets if m.__file__}

    def tracer(frame: types.FrameType, event: str, arg: object) -> object:
        lines = seen.get(frame.f_code.co_filename)
        if lines is None:
            return None
        lines.add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)  # type: ignore[arg-type]
    try:
        for path in corpus:
            try:
                harness.check(path.read_bytes())
            except Exception:
                pass  # reported by the fuzzing run itself
    finally:
        sys.settrace(None)
    parts = []
    for module, functions in targets:
        wanted = executable_lines(module, functions)
        hit = len(seen[module.__file__] & wanted)  # type: ignore[index]
        short = module.__name__.rsplit(".", 1)[-1]
        parts.append(f"{short}.py {hit}/{len(wanted)} ({100 * hit / max(1, len(wanted)):.0f}%)")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=int, help="seconds per harness")
    parser.add_argument("--budget", type=int, default=120, help="seconds for all harnesses")
    parser.add_argument("--only", action="append", help="harness name (repeatable)")
    parser.add_argument("--hang", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--corpus", help="keep the inputs found here (DIR/NAME)")
    parser.add_argument("--artifacts", default=None, help="where crashing inputs go")
    parser.add_argument("libfuzzer", nargs="*", help="more libFuzzer options, after --")
    args = parser.parse_args()
    names = args.only or harnesses()
    unknown = set(names) - set(harnesses())
    if unknown:
        parser.error(f"no harness {sorted(unknown)}; there are {harnesses()}")
    for name in [name for name in names if not available(name)]:
        print(f"{name:14} skipped: what it fuzzes is not in this tree (its AVAILABLE)")
        names.remove(name)
    seconds = args.time or max(5, args.budget // len(names))
    scratch = Path(tempfile.mkdtemp(prefix="txss-fuzz-"))
    work = Path(args.corpus) if args.corpus else scratch
    args.artifacts = args.artifacts or str(scratch / "artifacts")
    failed = []
    try:
        print(f"{len(names)} harnesses, {seconds} s each", flush=True)
        for name in names:
            outcome = fuzz_one(name, seconds, args, work)
            corpus = inputs(work / "corpus" / name, HERE / "corpus" / name,
                            HERE / "regressions" / name)  # fmt: skip
            outcome.lines = line_coverage(name, corpus)
            print(
                f"{name:14} {'ok  ' if outcome.ok else 'FAIL'} {outcome.executions:9} execs "
                f"in {outcome.seconds:4.0f} s  cov {outcome.cov:5} ft {outcome.ft:5} "
                f"corpus {outcome.corpus:4}  lines: {outcome.lines}",
                flush=True,
            )
            if not outcome.ok:
                failed.append(outcome)
        for outcome in failed:
            print(f"\n===== {outcome.name}: the end of libFuzzer's output =====")
            lines = [line for line in outcome.output.splitlines() if "REDUCE" not in line]
            print("\n".join(lines[-60:]))
            print(f"artifacts: {args.artifacts}")
    finally:
        if not failed:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
