"""A real Prometheus server (Debian's package) on loopback scraping `clisonix up`: every service's target is up,
the energy and latency series exist, the rules load, and `promtool check metrics` passes on every /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from services.processes import DEFAULT_PORTS, SERVICES
from tests.deploy.conftest import DEPLOY, REPO, tool
from tests.deploy.metric_names import (
    BUILTIN,
    exposition_metric_names,
    expression_metric_names,
    recording_rule_names,
    rule_expressions,
)
from tests.helpers import free_port_offset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = DEPLOY / "prometheus" / "rules" / "clisonix.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clisonix.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback only)
        return str(response.read().decode())


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Polls `condition` until it returns something truthy (returned) or `timeout_s` passes (fails the test)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except (OSError, ValueError) as exc:
            last_error = exc
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last error: {last_error})")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, int]]]:
    """`clisonix up` with every service on loopback ports shifted by a free offset; yields name -> ports."""
    log_dir = tmp_path_factory.mktemp("platform")
    offset = free_port_offset()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port-offset", str(offset), "--log-dir", str(log_dir)],
        cwd=REPO,
        env={**os.environ, "CLISONIX_PSEUDONYM_KEY": "a-test-key-of-enough-length"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        line = b""
        while b"Ctrl-C" not in line:
            line = process.stdout.readline()
            if not line or time.monotonic() > deadline:
                logs = {p.name: p.read_text()[-2000:] for p in log_dir.iterdir()}
                pytest.fail(f"clisonix up was not up (exit {process.poll()}); logs: {logs}")
        yield {name: (grpc + offset, metrics + offset) for name, (grpc, metrics) in DEFAULT_PORTS.items()}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def prometheus(platform: dict[str, tuple[int, int]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server on a free loopback port scraping every service of the platform each second, with the
    project's rules; yields its base URL."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}
            for name, (_, metrics) in platform.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(folder / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "Ready" in http_get(f"{url}/-/ready"), 30, "Prometheus to be ready")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    reply = json.loads(http_get(f"{url}/api/v1/{path}{query}"))
    assert reply["status"] == "success", reply
    return reply["data"]


def test_every_service_exposes_metrics_that_promtool_accepts(platform):
    assert set(platform) == set(SERVICES)
    exported: set[str] = set()
    for name, (_, metrics_port) in platform.items():
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        checked = subprocess.run(
            [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
        exported |= exposition_metric_names(text)
    # The dashboard's and the rules' metrics are all exported by the running services.
    known = exported | recording_rule_names(RULES) | BUILTIN
    expressions = rule_expressions(RULES) + [
        target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel.get("targets", [])
    ]
    for expr in expressions:
        assert expression_metric_names(expr) <= known, expr


def test_prometheus_scrapes_every_service_and_has_the_energy_and_latency_series(platform, prometheus):
    def all_up() -> bool:
        targets = api(prometheus, "targets")["activeTargets"]
        return len(targets) == len(platform) and all(t["health"] == "up" for t in targets)

    wait_until(all_up, 45, "every scrape target to be up")
    jobs = {t["labels"]["job"] for t in api(prometheus, "targets")["activeTargets"]}
    assert jobs == set(platform)

    def series(query: str) -> list[dict[str, Any]]:
        return list(api(prometheus, "query", query=query)["result"])

    energy = wait_until(lambda: series("clisonix_energy_joules_total"), 20, "the energy series")
    assert {s["metric"]["service"] for s in energy} == set(platform)
    co2 = series("clisonix_co2_grams_total")
    assert {s["metric"]["service"] for s in co2} == set(platform)
    latency = series('clisonix_stage_latency_seconds_bucket{le="+Inf"}')
    assert latency, "stage latency histograms"
    assert series('clisonix_pipeline_latency_seconds_bucket{le="0.05"}'), "the pipeline latency histogram"
    assert series(f'up{{job=~"{"|".join(platform)}"}} == 1'), "up"

    # The project's rules load and evaluate against the real series.
    groups = api(prometheus, "rules")["groups"]
    assert {g["name"] for g in groups} == {"clisonix.recording", "clisonix.alerts"}
    wait_until(
        lambda: all(rule["health"] == "ok" for g in api(prometheus, "rules")["groups"] for rule in g["rules"]),
        20,
        "every rule evaluated without error",
    )
    wait_until(
        lambda: {s["metric"]["service"] for s in series("clisonix:energy_watts:rate5m")} == set(platform),
        20,
        "the recorded power of every service",
    )


def test_every_dashboard_query_evaluates_on_the_real_server(platform, prometheus):
    """Grafana's interval variables replaced by fixed ranges, each query is valid PromQL to this Prometheus."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
            api(prometheus, "query", query=expr)  # fails on a parse or evaluation error
