"""The model repository: versioned model artifacts on disk, each with the metadata a server and a user need.

Layout (as Triton's and KServe's repositories, one folder per model, one per version):

    <root>/<model name>/<version>/metadata.json
    <root>/<model name>/<version>/<file>          model.onnx (ONNX Runtime) or model.pt (a torch state dict)

Versions are positive integers; the newest is served when a request names none. metadata.json says what the
model reads (modality, channels, rate, segment length, preprocessing), what it returns (labels, tensors), how it
was made (variant, runtime, precision, net config, seed, training data) and how well it did (metrics on the
held-out data), and the SHA-256 of its file so a damaged artifact is refused, not served.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, NotFound

METADATA_FILE = "metadata.json"
RUNTIMES = ("torch", "onnxruntime")
# The platform names KServe / Triton clients know the runtimes by.
PLATFORMS = {"torch": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: KServe v2 datatype ("FP32", "INT8" ...) and shape, -1 for the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class ArtifactMetadata:
    """Everything metadata.json holds. `file` is relative to the version folder."""

    name: str
    version: str
    task: str
    variant: str
    runtime: str
    precision: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    modality: str
    channels: tuple[str, ...]
    sample_rate_hz: float
    window_samples: int
    labels: tuple[str, ...]
    net: dict[str, Any]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("inputs", "outputs"):
            data[key] = [{**spec, "shape": list(spec["shape"])} for spec in data[key]]
        for key in ("channels", "labels"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactMetadata:
        values = dict(data)
        values["inputs"] = tuple(TensorSpec.from_json(t) for t in data["inputs"])
        values["outputs"] = tuple(TensorSpec.from_json(t) for t in data["outputs"])
        values["channels"] = tuple(data["channels"])
        values["labels"] = tuple(data["labels"])
        values["version"] = str(data["version"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class ModelArtifact:
    """One version of one model on disk."""

    folder: Path
    metadata: ArtifactMetadata

    @property
    def path(self) -> Path:
        return self.folder / self.metadata.file

    @property
    def platform(self) -> str:
        return PLATFORMS[self.metadata.runtime]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(root: Path, metadata: ArtifactMetadata, payload: Path) -> ModelArtifact:
    """Moves `payload` (the model file, written anywhere on the same filesystem) into
    <root>/<name>/<version>/ with its metadata and checksum; replaces what that version held."""
    if metadata.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {metadata.runtime!r}; expected one of {RUNTIMES}")
    if not metadata.version.isdigit() or int(metadata.version) < 1:
        raise ValueError(f"versions are positive integers, got {metadata.version!r}")
    folder = Path(root) / metadata.name / metadata.version
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / metadata.file
    os.replace(payload, target)
    final = ArtifactMetadata.from_json({**metadata.to_json(), "sha256": file_sha256(target)})
    tmp = folder / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(final.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / METADATA_FILE)
    return ModelArtifact(folder, final)


def read_artifact(folder: Path, verify: bool = True) -> ModelArtifact:
    """The artifact in a version folder; FailedPrecondition when its metadata is unreadable or its file is
    missing or does not match its checksum."""
    try:
        metadata = ArtifactMetadata.from_json(json.loads((folder / METADATA_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"model artifact {folder.name} has unreadable metadata: {exc}") from exc
    artifact = ModelArtifact(folder, metadata)
    if not artifact.path.is_file():
        raise FailedPrecondition(f"model {metadata.name} version {metadata.version}: {metadata.file} is missing")
    if verify and metadata.sha256 and file_sha256(artifact.path) != metadata.sha256:
        raise FailedPrecondition(f"model {metadata.name} version {metadata.version}: checksum mismatch")
    return artifact


class ModelRepository:
    """The models under one root folder, read once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models: dict[str, dict[str, ModelArtifact]] = {}
        if not self.root.is_dir():
            return
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
                artifact = read_artifact(version_dir)
                self.models.setdefault(artifact.metadata.name, {})[artifact.metadata.version] = artifact

    def versions(self, name: str) -> list[str]:
        """The model's versions, oldest first; NotFound for an unknown model."""
        if name not in self.models:
            raise NotFound(f"unknown model {name!r}")
        return sorted(self.models[name], key=int)

    def get(self, name: str, version: str = "") -> ModelArtifact:
        """A version of a model (the newest when `version` is empty); NotFound when there is none."""
        versions = self.versions(name)
        chosen = version or versions[-1]
        if chosen not in self.models[name]:
            raise NotFound(f"model {name!r} has no version {chosen!r}")
        return self.models[name][chosen]

    def next_version(self, name: str) -> str:
        """The version number a new artifact of `name` gets."""
        return str(int(self.versions(name)[-1]) + 1) if name in self.models else "1"
