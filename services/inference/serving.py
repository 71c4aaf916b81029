"""The models a server holds: every version of the chosen models of a repository, each loaded with its own
dynamic batcher, looked up by name and version for the gRPC API and the Kafka worker alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from services.common.energy import CpuTimeAttribution, EnergyMeter
from services.common.errors import FailedPrecondition, NotFound
from services.inference.backends import Backend, load_backend
from services.inference.batching import DynamicBatcher
from services.inference.metrics import InferenceMetrics
from services.inference.repository import ModelArtifact, ModelRepository, read_artifact
from services.inference.selection import is_path_segment
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


class ServedModel(NamedTuple):
    """One loaded model version: `artifact, batcher = server.get(name, version)`."""

    artifact: ModelArtifact
    batcher: DynamicBatcher


class ModelServer:
    """Loads models from a repository and hands out (artifact, batcher) by name and version.

    repository: the model repository's root folder.
    names: the models to serve, every version of each (empty: every model in the repository).
    max_batch_size, max_queue_delay_s: each batcher's policy (see DynamicBatcher).
    meter: the service's energy meter, shared by every batcher.
    metrics: the inference metrics (None: not recorded).

    `await load()` once; `ready` is true when every model has loaded and the server is not shutting down.
    """

    def __init__(
        self,
        repository: Path,
        names: Iterable[str],
        max_batch_size: int,
        max_queue_delay_s: float,
        meter: EnergyMeter,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        self.repository_root = Path(repository)
        self.names = tuple(names)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.energy = CpuTimeAttribution(meter)
        self.metrics = metrics
        self.models: dict[str, dict[str, ServedModel]] = {}
        self._loaded = False
        self._draining = False

    @property
    def ready(self) -> bool:
        """Every model loaded and not shutting down."""
        return self._loaded and not self._draining

    async def load(self) -> None:
        """Reads the repository and loads every version of the chosen models (off the event loop).

        Raises FailedPrecondition when a chosen model is not in the repository or an artifact cannot be loaded
        (a damaged or unreadable one is refused, never served).
        """
        repository = await asyncio.to_thread(ModelRepository, self.repository_root)
        names = self.names or tuple(sorted(repository.models))
        missing = [name for name in names if name not in repository.models]
        if missing:
            raise FailedPrecondition(f"models {missing} are not in the repository {self.repository_root}")
        if not names:
            log.warning("no models to serve", extra={"fields": {"repository": str(self.repository_root)}})
        for name in names:
            for version in repository.versions(name):
                await self._add(repository.get(name, version))
        self._loaded = True

    async def _add(self, artifact: ModelArtifact) -> ServedModel:
        """Loads an artifact's backend (off the event loop) and serves it with its own batcher."""
        backend: Backend = await asyncio.to_thread(load_backend, artifact)
        batcher = DynamicBatcher(backend, self.max_batch_size, self.max_queue_delay_s, self.energy, self.metrics)
        name, version = artifact.metadata.name, artifact.metadata.version
        served = ServedModel(artifact, batcher)
        self.models.setdefault(name, {})[version] = served
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": name,
                    "version": version,
                    "variant": artifact.metadata.variant,
                    "runtime": artifact.metadata.runtime,
                }
            },
        )
        return served

    async def load_version(self, name: str, version: str) -> ServedModel:
        """A model version, served already or loaded now from the repository's <name>/<version> folder (a model
        left out of `names` is served from then on, all calls alike).

        name: one folder name of the repository. version: a positive integer.
        NotFound when the repository has no such model version; FailedPrecondition when it cannot be loaded
        (damaged, unreadable, or the server is shutting down).
        """
        served = self.models.get(name, {}).get(version)
        if served is not None:
            return served
        if self._draining:
            raise FailedPrecondition("the model server is shutting down")
        if not is_path_segment(name) or not version.isdigit() or int(version) < 1:
            raise NotFound(f"no model {name!r} version {version!r} in the repository", reason="version")
        folder = self.repository_root / name / version
        if not folder.is_dir():
            raise NotFound(f"no model {name!r} version {version!r} in the repository", reason="version")
        artifact = await asyncio.to_thread(read_artifact, folder)
        if (artifact.metadata.name, artifact.metadata.version) != (name, version):
            raise FailedPrecondition(
                f"{name}/{version} holds model {artifact.metadata.name!r} version {artifact.metadata.version!r}"
            )
        served = self.models.get(name, {}).get(version)  # loaded meanwhile by another caller
        if served is not None:
            return served
        try:
            return await self._add(artifact)
        except Exception as exc:  # torch / onnxruntime raise their own types for an unloadable file
            raise FailedPrecondition(f"model {name!r} version {version!r} does not load: {exc}") from exc

    def versions(self, name: str) -> list[str]:
        """The served versions of a model, oldest first; NotFound for a model not served."""
        if name not in self.models:
            raise NotFound(f"unknown model {name!r}", reason="model")
        return sorted(self.models[name], key=int)

    def get(self, name: str, version: str = "") -> ServedModel:
        """A served model version (the newest when `version` is empty); NotFound when there is none."""
        versions = self.versions(name)
        chosen = version or versions[-1]
        if chosen not in self.models[name]:
            raise NotFound(f"model {name!r} has no version {chosen!r}; it has {versions}", reason="version")
        return self.models[name][chosen]

    async def set_not_ready(self) -> None:
        """Readiness turns false (the first step of a shutdown)."""
        self._draining = True

    async def close(self) -> None:
        """Finishes every queued request and stops every batcher."""
        self._draining = True
        for versions in self.models.values():
            for served in versions.values():
                await served.batcher.close()


def model_server(settings: InferenceSettings, meter: EnergyMeter, metrics: InferenceMetrics | None) -> ModelServer:
    """The ModelServer the settings describe (repository, models, batching)."""
    return ModelServer(
        settings.model_repository,
        settings.models,
        settings.max_batch_size,
        settings.max_queue_delay_s,
        meter,
        metrics,
    )
