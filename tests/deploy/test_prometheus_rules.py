"""The Prometheus configuration and rules, checked by promtool (Debian's prometheus package): the config, the
recording and alerting rules, and the rules' unit tests (deploy/prometheus/tests)."""

from __future__ import annotations

from tests.deploy.conftest import DEPLOY, run, tool
from tests.deploy.metric_names import (
    BUILTIN,
    expression_metric_names,
    factory_metric_names,
    recording_rule_names,
    rule_expressions,
)

RULES = DEPLOY / "prometheus" / "rules" / "clisonix.yml"


def test_promtool_checks_the_config_and_its_rule_files():
    output = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "1 rule files found" in output


def test_promtool_checks_the_rules():
    run(tool("promtool"), "check", "rules", str(RULES))


def test_promtool_unit_tests_of_the_rules_pass():
    output = run(tool("promtool"), "test", "rules", "clisonix_test.yml", cwd=DEPLOY / "prometheus" / "tests")
    assert "SUCCESS" in output


def test_every_alert_has_a_unit_test():
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "clisonix_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert alerts == tested


def test_the_rules_name_only_metrics_the_services_export():
    known = factory_metric_names() | recording_rule_names(RULES) | BUILTIN
    for expr in rule_expressions(RULES):
        assert expression_metric_names(expr) <= known, expr
