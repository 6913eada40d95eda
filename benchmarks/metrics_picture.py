"""The operations page's picture: our own metrics, scraped during a benchmark run.

    flock /tmp/txss-bench.lock .venv/bin/python benchmarks/metrics_picture.py

Starts ``python -m txsocketserver --workers 2 --mode threading --metrics ...``
serving the line echo, drives it with the echo load client (``loads.py``) in
phases (1, 16 and 64 persistent connections, then 8 clients making a
connection per line, then a SIGKILLed worker under load), and scrapes
``/metrics`` every 0.5 s, as Prometheus would, throughout.  Every scrape is
written to ``docs/benchmarks/metrics-run.json``; the chart drawn from it alone
(request rate, latency quantiles from the histogram, connections active,
workers alive and restarts) to ``docs/benchmarks/metrics-run.svg``.

Needs matplotlib (``pip install -e '.[bench,metrics]'``) and gcc for the C client.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from loads import LoadTools, build_dir, echo_load

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "benchmarks"
HOST = "127.0.0.1"
SCRAPE_EVERY = 0.5
#: (label, load mode, connections, seconds)
PHASES = (
    ("1 connection", "persistent", 1, 6.0),
    ("16 connections", "persistent", 16, 6.0),
    ("64 connections", "persistent", 64, 6.0),
    ("8 clients, a connection per line", "connect", 8, 6.0),
    ("16 connections, a worker killed", "persistent", 16, 8.0),
)


class EchoHandler(socketserver.StreamRequestHandler):
    """The line echo of the echo scenarios (workers import it from here)."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


def scrape(address: str) -> dict[str, float]:
    """``{sample name{labels}: value}`` of one scrape (our families, summed over servers)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(("txsocketserver_", "process_cpu")):
                continue
            labels = {k: v for k, v in sample.labels.items() if k != "server"}
            key = sample.name + (json.dumps(labels, sort_keys=True) if labels else "")
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def run(out: Path) -> dict[str, Any]:
    with build_dir() as directory:
        return _run(out, LoadTools.find(Path(directory)))


def _run(out: Path, tools: LoadTools) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(HERE))
    server = subprocess.Popen(
        [
            sys.executable, "-m", "txsocketserver", "--workers", "2", "--mode", "threading",
            "--listen", f"tcp:0:interface={HOST}", "--handler", "metrics_picture:EchoHandler",
            "--metrics", f"tcp:0:interface={HOST}",
        ],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        port = metrics = None
        ready = 0
        assert server.stderr is not None
        for line in server.stderr:
            if match := re.search(r" at [\d.]+:(\d+) \(2 workers", line):
                port = int(match.group(1))
            if match := re.search(r"/readyz on \S+ at ([\d.]+:\d+)", line):
                metrics = match.group(1)
            ready += " ready" in line
            if port and metrics and ready >= 2:
                break
        assert port and metrics, "the server did not start"
        threading.Thread(target=server.stderr.read, daemon=True).start()  # drain
        scrapes: list[dict[str, Any]] = []
        phases: list[dict[str, Any]] = []
        stop = threading.Event()
        start = time.monotonic()

        def scraper() -> None:
            while not stop.wait(SCRAPE_EVERY):
                scrapes.append({"t": time.monotonic() - start, "samples": scrape(metrics)})

        scraping = threading.Thread(target=scraper)
        scraping.start()
        for label, mode, connections, seconds in PHASES:
            began = time.monotonic() - start
            if "killed" in label:
                pids = _worker_pids(server.pid)
                timer = threading.Timer(seconds / 3, os.kill, (min(pids), signal.SIGKILL))
                timer.start()
            measurement = echo_load(mode, connections)(port, tools, seconds)
            phases.append(
                {"label": label, "from": began, "to": time.monotonic() - start,
                 "requests": measurement.requests, "errors": measurement.errors}
            )  # fmt: skip
        stop.set()
        scraping.join()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    data = {"scrape_every": SCRAPE_EVERY, "phases": phases, "scrapes": scrapes}
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def _worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The *q* quantile from cumulative (upper bound, count) pairs, as
    Prometheus's ``histogram_quantile`` interpolates it."""
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


def draw(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scrapes = data["scrapes"]
    times, rates, p50, p99, active, workers, restarts = [], [], [], [], [], [], []
    for before, after in zip(scrapes, scrapes[1:], strict=False):
        dt = after["t"] - before["t"]
        a, b = after["samples"], before["samples"]
        times.append(after["t"])
        done = a["txsocketserver_requests_total"] - b["txsocketserver_requests_total"]
        rates.append(done / dt)
        bucket_keys = [
            k for k in a if k.startswith("txsocketserver_request_duration_seconds_bucket")
        ]
        buckets = sorted(
            (float(json.loads(k.split("bucket", 1)[1])["le"]), a[k] - b.get(k, 0.0))
            for k in bucket_keys
        )
        p50.append(quantile(buckets, 0.5))
        p99.append(quantile(buckets, 0.99))
        active.append(a.get("txsocketserver_connections_active", 0.0))
        workers.append(a.get("txsocketserver_workers", 0.0))
        restarts.append(a.get('txsocketserver_worker_restarts_total{"cause": "exited"}', 0.0))
    figure, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(times, rates, color="tab:blue")
    axes[0].set_ylabel("requests/s\n(rate of requests_total)")
    axes[1].plot(times, [x * 1e3 if x is not None else None for x in p50], label="p50")
    axes[1].plot(times, [x * 1e3 if x is not None else None for x in p99], label="p99")
    axes[1].set_ylabel("handler ms\n(histogram_quantile)")
    axes[1].set_yscale("log")
    axes[1].legend(loc="upper left")
    axes[2].plot(times, active, color="tab:green")
    axes[2].set_ylabel("connections_active")
    axes[3].plot(times, workers, label="workers alive")
    axes[3].plot(times, restarts, label="restarts (exited)")
    axes[3].set_ylabel("workers")
    axes[3].legend(loc="upper left")
    axes[3].set_xlabel("seconds; one scrape of the supervisor every 0.5 s, summed over 2 workers")
    for phase in data["phases"]:
        for axis in axes:
            axis.axvline(phase["from"], color="grey", linewidth=0.5)
        axes[0].annotate(
            phase["label"], (phase["from"], 0), xytext=(2, 2), textcoords="offset points",
            fontsize=7, rotation=90, va="bottom",
        )  # fmt: skip
    figure.suptitle("txsocketserver --workers 2 --metrics during a benchmark run")
    figure.tight_layout()
    figure.savefig(out, format="svg", metadata={"Date": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draw-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args()
    data_file = DOCS / "metrics-run.json"
    data = json.loads(data_file.read_text()) if args.draw_only else run(data_file)
    draw(data, DOCS / "metrics-run.svg")
    print(f"wrote {data_file} and {DOCS / 'metrics-run.svg'}")


if __name__ == "__main__":
    main()
