"""docker-compose.yml: valid against the Compose specification (check-jsonschema's vendored schema) and for
Debian's docker-compose, with Kafka in KRaft mode, the topic creator, every service and Prometheus scraping
every metrics port. Nothing is started: no Docker engine is needed."""

from __future__ import annotations

from typing import Any

import yaml

from services.processes import DEFAULT_PORTS, SERVICES
from tests.deploy.conftest import COMPOSE_ENV, COMPOSE_FILE, DEPLOY, REPO, run, tool

CLISONIX = ("ingest", "fusion", "inference", "tide-0", "tide-1", "tide-2", "liam")


def service_of(compose_name: str) -> str:
    """The Clisonix service a compose service runs (tide-1 -> tide)."""
    return compose_name.split("-")[0]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_the_compose_file_follows_the_compose_specification():
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))


def test_docker_compose_reads_the_file():
    run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q", env=COMPOSE_ENV)


def test_docker_compose_refuses_to_start_ingest_without_a_pseudonym_key():
    import subprocess

    env = {**{k: v for k, v in __import__("os").environ.items() if k != "CLISONIX_PSEUDONYM_KEY"}, **COMPOSE_ENV}
    del env["CLISONIX_PSEUDONYM_KEY"]
    completed = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode != 0 and "CLISONIX_PSEUDONYM_KEY" in completed.stderr


def test_kafka_runs_in_kraft_mode_with_internal_and_host_listeners_and_a_healthcheck(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised == {"INTERNAL": "kafka:29092", "HOST": "localhost:9092"}
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    assert "9092:9092" in kafka["ports"]
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_services_wait_for_the_topics_and_the_topics_for_a_healthy_kafka(compose):
    services = compose["services"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["topics"]["volumes"] == ["./deploy/kafka/create-topics.sh:/create-topics.sh:ro"]
    assert set(SERVICES) <= {service_of(name) for name in CLISONIX}
    for name in CLISONIX:
        service = services[name]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully", name
        env = env_of(service)
        assert env["CLISONIX_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092", name
        assert env["CLISONIX_CREATE_TOPICS"] == "false", name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        ports = (int(env["CLISONIX_GRPC_PORT"]), int(env["CLISONIX_METRICS_PORT"]))
        if service_of(name) in DEFAULT_PORTS:
            assert ports == DEFAULT_PORTS[service_of(name)], name


def test_three_tide_replicas_each_with_its_own_snapshot_volume(compose):
    replicas = [compose["services"][f"tide-{i}"] for i in range(3)]
    # Stable, distinct names: the replicas tell one another's digest reports apart by them.
    assert [r.get("hostname") for r in replicas] == ["tide-0", "tide-1", "tide-2"]
    volumes = [r["volumes"][0].split(":") for r in replicas]
    assert len({v[0] for v in volumes}) == 3 and {v[1] for v in volumes} == {"/var/lib/clisonix/tide"}
    assert all(env_of(r)["CLISONIX_SNAPSHOT_PATH"].startswith("/var/lib/clisonix/tide/") for r in replicas)
    targets = env_of(compose["services"]["fusion"])["CLISONIX_TIDE_TARGETS"]
    assert targets == "tide-0:50054,tide-1:50054,tide-2:50054"


def test_prometheus_scrapes_every_metrics_port_and_grafana_is_provisioned(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name in CLISONIX:
        assert f"{name}:{env_of(compose['services'][name])['CLISONIX_METRICS_PORT']}" in targets, name
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in prometheus["volumes"]
    grafana = compose["services"]["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]


def test_one_dockerfile_builds_every_service(compose):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG SERVICE" in dockerfile and 'python -m \\"services.${SERVICE}\\"' in dockerfile
    assert "USER 10001" in dockerfile
    # The final stage copies a built environment: no compiler or pip is installed in it.
    final = dockerfile.split("\nFROM ")[-1]
    assert "pip install" not in final and "apt-get" not in final
    for name in ("ingest", "fusion", "inference", "tide-0", "liam"):
        build = compose["services"][name]["build"]
        assert build["context"] == "." and build["args"]["SERVICE"] == service_of(name)
        assert build["args"]["TORCH_INDEX_URL"].startswith("${TORCH_INDEX_URL:?")
