"""The operations page's Prometheus config, alert rules and Kubernetes Deployment, checked.

``promtool`` (Debian's ``prometheus`` package, which ``.ci/run`` installs)
checks the scrape config and the alert rules as the page gives them; the
Deployment's probes and grace period are checked against the options they name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support import WAIT

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")


def yaml_block(first_line: str) -> str:
    """The page's ```yaml block that starts with *first_line*."""
    for block in re.findall(r"```yaml\n(.*?)```", OPERATIONS.read_text(), re.DOTALL):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no yaml block starting {first_line!r} in {OPERATIONS}")


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_alert_rules(tmp_path: Path) -> None:
    (tmp_path / "prometheus.yml").write_text(yaml_block("# prometheus.yml"))
    (tmp_path / "txsocketserver-alerts.yml").write_text(yaml_block("# txsocketserver-alerts.yml"))
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "txsocketserver-alerts.yml"],
    ):
        checked = subprocess.run(
            ["promtool", *command], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = yaml.safe_load(yaml_block("# txsocketserver-alerts.yml"))["groups"][0]["rules"]
    # Every metric an alert names is one we expose.
    named = set(re.findall(r"txsocketserver_\w+", str(rules)))
    exposed = {
        "txsocketserver_requests_failed_total", "txsocketserver_requests_total",
        "txsocketserver_request_duration_seconds_bucket", "txsocketserver_worker_restarts_total",
        "txsocketserver_connections_refused_total",
    }  # fmt: skip
    assert named <= exposed, named - exposed


def test_the_kubernetes_deployment_probes_our_endpoints_and_needs_no_prestop() -> None:
    deployment = yaml.safe_load(yaml_block("apiVersion: apps/v1"))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    option = {
        name: args[args.index(name) + 1]
        for name in ("--metrics", "--drain-delay", "--drain-timeout")
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert option["--metrics"] == f"tcp:{ports['metrics']}"
    assert "lifecycle" not in container  # no preStop sleep
    assert pod["terminationGracePeriodSeconds"] > float(option["--drain-delay"]) + float(
        option["--drain-timeout"]
    )
