"""The Grafana dashboard and provisioning: the JSON loads, every panel queries the provisioned Prometheus data
source, and every query names a metric the services export (or a recording rule)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.metric_names import BUILTIN, expression_metric_names, factory_metric_names, recording_rule_names

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clisonix.json"


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_loads_and_uses_the_provisioned_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    (source,) = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "clisonix.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_dashboard_shows_latency_energy_co2_throughput_lag_and_tide_digests():
    names = set().union(*(expression_metric_names(q) for q in queries(json.loads(DASHBOARD.read_text()))))
    for needed in (
        "clisonix_pipeline_latency_seconds_bucket",
        "clisonix_energy_joules_total",
        "clisonix_co2_grams_total",
        "clisonix_inference_energy_joules_sum",
        "clisonix_records_out_total",
        "clisonix_consumer_lag_records",
        "clisonix_tide_digest_prefix",
    ):
        assert needed in names


def test_every_query_names_a_metric_that_exists():
    known = factory_metric_names() | recording_rule_names(DEPLOY / "prometheus" / "rules" / "clisonix.yml") | BUILTIN
    for expr in queries(json.loads(DASHBOARD.read_text())):
        names = expression_metric_names(expr)
        assert names and names <= known, (expr, names - known)


def test_the_expression_parser_finds_metric_names_only():
    expr = 'histogram_quantile(0.99, sum by (le, service) (rate(foo_bucket{stage="x"}[5m]))) / bar:rec offset 1d'
    assert expression_metric_names(expr) == {"foo_bucket", "bar:rec"}
