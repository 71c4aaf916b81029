"""Shared helpers of the deployment tests: the repository's deployment files and the offline tools that check
them (kubectl's kustomize, kubernetes-validate, check-jsonschema, docker-compose, promtool, prometheus).

`make deploy-tools` (a prerequisite of `make test`) installs the Debian packages; a missing tool fails the
test that needs it, with that hint, rather than skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
# What `docker compose` needs in the environment to read the file (ingest's required pseudonym key).
# What compose refuses to start without: the pseudonym key, and the index serving torch's CPU wheels (a loopback
# stand-in: nothing is built or fetched).
COMPOSE_ENV = {"CLISONIX_PSEUDONYM_KEY": "a-compose-test-key-0123456789", "TORCH_INDEX_URL": "http://127.0.0.1:9/"}


def tool(name: str) -> str:
    """The path of a command-line tool: the venv's own first (kubernetes-validate, check-jsonschema), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make deploy-tools` (Debian packages prometheus, docker-compose)")
    return found


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    """Runs a tool; fails the test with its output when it exits non-zero; returns stdout and stderr together."""
    completed = subprocess.run(
        args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {completed.returncode}:\n{output}")
    return output


def kustomize(path: Path) -> str:
    """Renders a kustomization with kubectl's built-in kustomize."""
    return run(tool("kubectl"), "kustomize", str(path))


def documents(text: str) -> list[dict[str, Any]]:
    """The YAML documents of a multi-document text, empty ones dropped."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def rendered_base() -> list[dict[str, Any]]:
    """The resources of k8s/base as kustomize renders them."""
    return documents(kustomize(K8S / "base"))


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml as written (anchors and merge keys resolved by the YAML loader)."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded
