"""The Kubernetes manifests: rendered with kustomize, validated strictly against the Kubernetes 1.37 schemas,
and checked for what the platform needs (ports, probes, limits, hardening, scaling, disruption budgets)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from services.processes import DEFAULT_PORTS, SERVICES
from tests.deploy.conftest import DEPLOY, K8S, documents, kustomize, run, tool

WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def validate_strict(path: Path) -> None:
    run(tool("kubernetes-validate"), "--strict", "--quiet", str(path))


def workloads(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] in WORKLOAD_KINDS}


def of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def config_map(resources: list[dict[str, Any]]) -> dict[str, str]:
    return dict(of_kind(resources, "ConfigMap")["clisonix-config"]["data"])


@pytest.mark.parametrize("kustomization", ["base", "overlays/tls"])
def test_every_kustomization_renders_and_validates_strictly(kustomization, tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(kustomize(K8S / kustomization))
    validate_strict(rendered)


def test_every_file_the_kustomizations_list_validates_strictly(tmp_path):
    files = sorted((K8S / "base").glob("*.yaml")) + [K8S / "examples" / "secrets.yaml"]
    for path in files:
        if path.name != "kustomization.yaml":
            validate_strict(path)


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    """The validator really is strict: a typo in a probe fails (so the passing tests above mean something)."""
    text = (K8S / "base" / "fusion.yaml").read_text().replace("failureThreshold: 2", "failureTreshold: 2", 1)
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    with pytest.raises(pytest.fail.Exception):
        validate_strict(broken)


def test_every_service_runs_with_its_ports_named_grpc_and_metrics(rendered_base):
    loads = workloads(rendered_base)
    services = of_kind(rendered_base, "Service")
    assert set(SERVICES) <= set(loads), "every service of `clisonix up` has a workload"
    for name, load in loads.items():
        ports = {p["name"]: p["containerPort"] for p in container(load)["ports"]}
        assert set(ports) == {"grpc", "metrics"}, name
        if name in DEFAULT_PORTS:
            assert (ports["grpc"], ports["metrics"]) == DEFAULT_PORTS[name], name
        env = {e["name"]: e.get("value") for e in container(load)["env"]}
        assert env["CLISONIX_GRPC_PORT"] == str(ports["grpc"]) and env["CLISONIX_METRICS_PORT"] == str(
            ports["metrics"]
        ), name
        service = services[name]
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
            "grpc": "grpc",
            "metrics": "metrics",
        }, name
        selector = service["spec"]["selector"]
        labels = load["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        annotations = load["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(ports["metrics"]), name


def test_probes_are_native_grpc_on_the_grpc_port(rendered_base):
    for name, load in workloads(rendered_base).items():
        spec = container(load)
        grpc_port = next(p["containerPort"] for p in spec["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert spec[probe]["grpc"]["port"] == grpc_port, (name, probe)


def test_resources_and_security_are_set_and_grace_outlasts_the_drain(rendered_base):
    drain_s = float(config_map(rendered_base)["CLISONIX_DRAIN_SECONDS"])
    for name, load in workloads(rendered_base).items():
        pod = load["spec"]["template"]["spec"]
        spec = container(load)
        assert {"cpu", "memory"} <= set(spec["resources"]["requests"]) and {"cpu", "memory"} <= set(
            spec["resources"]["limits"]
        ), name
        security = spec["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"], name
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], name
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == name, name
        # A read-only root needs a writable /tmp (onnxruntime, matplotlib's cache).
        assert any(m["mountPath"] == "/tmp" for m in spec["volumeMounts"]), name
        assert pod["terminationGracePeriodSeconds"] > drain_s + 5, name


def test_stateless_services_scale_and_tide_is_a_statefulset_with_volumes(rendered_base):
    loads = workloads(rendered_base)
    hpas = of_kind(rendered_base, "HorizontalPodAutoscaler")
    pdbs = of_kind(rendered_base, "PodDisruptionBudget")
    for name, load in loads.items():
        assert name in pdbs and pdbs[name]["spec"]["selector"]["matchLabels"].items() <= (
            load["spec"]["template"]["metadata"]["labels"].items()
        ), name
        if load["kind"] == "Deployment":
            assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    tide = loads["tide"]
    assert tide["kind"] == "StatefulSet" and tide["spec"]["replicas"] == 3
    (claim,) = tide["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(tide)["volumeMounts"]}
    snapshot = next(e["value"] for e in container(tide)["env"] if e["name"] == "CLISONIX_SNAPSHOT_PATH")
    assert snapshot.startswith(mounts[claim["metadata"]["name"]] + "/")
    # The other services list every replica by its stable name.
    targets = config_map(rendered_base)["CLISONIX_TIDE_TARGETS"].split(",")
    headless = tide["spec"]["serviceName"]
    assert targets == [f"tide-{i}.{headless}:{DEFAULT_PORTS['tide'][0]}" for i in range(3)]


def test_secrets_are_references_never_values(rendered_base):
    assert not of_kind(rendered_base, "Secret"), "the base ships no Secret: they come from a secret store"
    for name, load in workloads(rendered_base).items():
        for var in container(load)["env"]:
            secret_like = re.search(r"TOKEN|PASSWORD|KEY$", var["name"]) and not var["name"].endswith("_FILE")
            if secret_like and var["name"] != "CLISONIX_TIDE_TARGETS":
                assert "secretKeyRef" in var.get("valueFrom", {}), (name, var["name"])
    ingest_env = {e["name"]: e for e in container(workloads(rendered_base)["ingest"])["env"]}
    assert ingest_env["CLISONIX_PSEUDONYM_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is False


def test_network_policies_deny_by_default_and_open_the_named_ports(rendered_base):
    policies = of_kind(rendered_base, "NetworkPolicy")
    deny = policies["clisonix-default-deny"]["spec"]
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny and "egress" not in deny
    ports = {
        p["port"] for policy in policies.values() for rule in policy["spec"].get("ingress", []) for p in rule["ports"]
    }
    assert ports == {"grpc", "metrics"}


def test_the_tls_overlay_swaps_grpc_probes_for_tcp_where_it_enables_tls():
    loads = workloads(documents(kustomize(K8S / "overlays" / "tls")))
    for name, load in loads.items():
        spec = container(load)
        env = {e["name"] for e in spec["env"]}
        tls = "CLISONIX_TLS_CERT_FILE" in env
        assert tls == (name in ("ingest", "inference", "liam")), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ("tcpSocket" in spec[probe]) == tls and ("grpc" in spec[probe]) != tls, (name, probe)


def test_the_strimzi_example_makes_the_topics_the_compose_creator_makes():
    example = documents((K8S / "examples" / "kafka-strimzi.yaml").read_text())
    strimzi = {d["metadata"]["name"]: d["spec"]["partitions"] for d in example if d["kind"] == "KafkaTopic"}
    script = (DEPLOY / "kafka" / "create-topics.sh").read_text()
    created = {m[1]: int(m[2]) for m in re.finditer(r"^create (\S+) (\d+)", script, re.MULTILINE)}
    assert strimzi == created and len(created) >= 7
