"""Draw the ratio charts of a benchmark run: ``python benchmarks/charts.py RUN.json``.

``RUN.json`` is what ``run.py --json`` wrote.  For each comparison (ours vs
the stdlib, ours vs native Twisted) one horizontal bar chart: a bar per
scenario at the median of the per-round ratios, a line from the lowest to the
highest round's ratio, and a rule at 1 (parity).  Rounds are paired because
``run.py`` measures every implementation once per round, one after another,
so a round's ratio compares figures taken under the same load on the machine.

The documentation's performance page shows these charts, and a table drawn
from the same JSON, which is committed next to them (``docs/benchmarks/``).
Needs matplotlib: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "benchmarks"

COMPARISONS = {
    "stdlib": "txsocketserver / socketserver (stdlib): above 1 is faster than the stdlib",
    "twisted": "txsocketserver / native Twisted: above 1 is faster than Twisted",
    "uvloop": "txsocketserver / asyncio streams on uvloop: above 1 is faster than uvloop",
    "before": "txsocketserver / itself before (run.py --before): above 1 is faster than it was",
}


def round_ratios(results: dict[str, list[dict[str, Any]]], other: str) -> list[float]:
    """Ours / other for each round both completed (in round order)."""
    ours, theirs = results.get("ours", []), results.get(other, [])
    if len(ours) != len(theirs):
        # A server failed mid-scenario: rounds no longer pair; compare medians.
        if not ours or not theirs:
            return []
        a = statistics.median(m["rate"] for m in ours)
        b = statistics.median(m["rate"] for m in theirs)
        return [a / b] if b else []
    return [a["rate"] / b["rate"] for a, b in zip(ours, theirs, strict=True) if b["rate"]]


def ratio_summary(run: dict[str, Any], other: str) -> list[tuple[str, float, float, float]]:
    """(scenario, median, lowest, highest) of the per-round ratios, in run order."""
    rows = []
    for scenario, results in run["results"].items():
        ratios = round_ratios(results, other)
        if ratios:
            rows.append((scenario, statistics.median(ratios), min(ratios), max(ratios)))
    return rows


def caption(run: dict[str, Any]) -> str:
    machine = run.get("machine", {})
    settings = run["settings"]
    parts = [
        f"{settings['rounds']} rounds x {settings['duration']:g} s",
        f"{machine.get('cpus', '?')} CPUs",
        f"load average {machine.get('load_average_start', '?')}"
        f" -> {machine.get('load_average_end', '?')}",
        f"Python {machine.get('python', '?')}, Twisted {machine.get('twisted', '?')}",
        f"commit {machine.get('commit', '?')}, {machine.get('date', '?')}",
    ]
    return "; ".join(parts)


def draw(run: dict[str, Any], other: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ratio_summary(run, other)
    names = [r[0] for r in rows]
    medians = [r[1] for r in rows]
    lows = [r[1] - r[2] for r in rows]
    highs = [r[3] - r[1] for r in rows]
    height = 0.32 * len(rows) + 1.6
    figure, axes = plt.subplots(figsize=(8.5, height), layout="constrained")
    positions = range(len(rows))
    colours = ["#3b7dd8" if m >= 1 else "#d8833b" for m in medians]
    # Bars grow from parity (1), right for faster, left for slower: on a log
    # scale a ratio and its inverse are the same length.
    axes.barh(positions, [m - 1 for m in medians], left=1, color=colours, height=0.6, zorder=2)
    axes.errorbar(
        medians, positions, xerr=[lows, highs], fmt="none", ecolor="#333333", capsize=2, zorder=3
    )
    axes.axvline(1.0, color="#222222", linewidth=1, zorder=4)
    axes.set_yticks(list(positions), names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log", base=2)
    extreme = max(max(r[3] for r in rows), 1 / min(r[2] for r in rows), 1.5)
    axes.set_xlim(1 / (extreme * 1.15), extreme * 1.15)
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    axes.grid(axis="x", color="#dddddd", zorder=0)
    figure.suptitle(COMPARISONS[other], fontsize=10)
    axes.set_title(caption(run), fontsize=6.5, color="#555555", loc="left")
    axes.set_xlabel(
        "ratio of requests/s (bar: median of the rounds; line: lowest to highest round)",
        fontsize=8,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata={"Date": None})
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a JSON file written by run.py --json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the SVGs")
    args = parser.parse_args()
    run = json.loads(args.run.read_text())
    for other in COMPARISONS:
        if other in run["settings"]["impls"] and "ours" in run["settings"]["impls"]:
            path = args.out / f"ours-vs-{other}.svg"
            draw(run, other, path)
            print(path)


if __name__ == "__main__":
    main()
