"""Every CLISONIX_* variable the deployment files set is a settings field of the service it is given to, so a
misspelt or stale name cannot be silently ignored (the settings ignore unknown variables)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from services.common.settings import ServiceSettings
from tests.deploy.conftest import K8S, documents, kustomize
from tests.deploy.test_compose import CLISONIX, env_of, service_of


def settings_class(service: str) -> type[ServiceSettings]:
    """The settings class services/<service>/settings.py defines."""
    module = importlib.import_module(f"services.{service}.settings")
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, ServiceSettings)
        and value is not ServiceSettings
        and value.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"services.{service}.settings should define one settings class, has {classes}"
    return classes[0]


def env_names(service: str) -> set[str]:
    return {f"CLISONIX_{field.upper()}" for field in settings_class(service).model_fields}


def unknown(service: str, names: set[str]) -> set[str]:
    return {name for name in names if name.startswith("CLISONIX_")} - env_names(service)


def test_compose_environment_names_are_settings_fields(compose):
    for name in CLISONIX:
        assert not unknown(service_of(name), set(env_of(compose["services"][name]))), name


@pytest.mark.parametrize("kustomization", ["base", "overlays/tls"])
def test_k8s_environment_names_are_settings_fields(kustomization):
    resources = documents(kustomize(K8S / kustomization))
    config_maps: dict[str, dict[str, Any]] = {
        r["metadata"]["name"]: r.get("data", {}) for r in resources if r["kind"] == "ConfigMap"
    }
    checked = 0
    for resource in resources:
        if resource["kind"] not in ("Deployment", "StatefulSet"):
            continue
        service = resource["metadata"]["name"]
        for spec in resource["spec"]["template"]["spec"]["containers"]:
            names = {e["name"] for e in spec.get("env", [])}
            for source in spec.get("envFrom", []):
                names |= set(config_maps[source["configMapRef"]["name"]])
            assert not unknown(service, names), service
            checked += len(names)
    assert checked > 50


def test_a_wrong_name_is_caught():
    assert unknown("fusion", {"CLISONIX_WINDOW_SECONDS", "CLISONIX_WINDOW_SECS"}) == {"CLISONIX_WINDOW_SECS"}
