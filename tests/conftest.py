"""Shared fixtures: one real embedded broker per test session, unique topics per test, ingest servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.broker import EmbeddedBroker

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
TEST_PSEUDONYM_KEY = "test-pseudonym-key-0123456789"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded Kafka-protocol broker on a free loopback port, for the whole test session."""
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(port=0, log_path=log_path) as running:
        yield running


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Makes topic names unique to this test: topic_name("raw") -> "test.<test>.raw.<random>"."""
    test = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]

    def make(purpose: str) -> str:
        return f"test.{test}.{purpose}.{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def ingest_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., object]:
    """Builds IngestSettings for a test: loopback, port 0, unique topics; keyword arguments override."""
    from services.ingest.settings import IngestSettings

    def make(**overrides: object) -> IngestSettings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "pseudonym_key": TEST_PSEUDONYM_KEY,
            "topic_raw": topic_name("raw"),
            "topic_deadletter": topic_name("deadletter"),
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "drain_seconds": 2.0,
            "log_format": "text",
        }
        values.update(overrides)
        return IngestSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def ingest_service(ingest_settings: Callable[..., object]) -> AsyncIterator[Callable[..., object]]:
    """Starts in-process ingest services (real gRPC, real broker); stops them after the test."""
    from services.ingest.service import IngestService

    started: list[IngestService] = []

    async def start(**overrides: object) -> IngestService:
        service = IngestService(ingest_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()


@pytest.fixture
def fusion_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., object]:
    """Builds FusionSettings for a test: loopback, port 0, unique topics and group; keyword arguments override."""
    from services.fusion.settings import FusionSettings

    group = topic_name("fusion-group")

    def make(**overrides: object) -> FusionSettings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "topic_raw": topic_name("raw"),
            "topic_fused": topic_name("fused"),
            "topic_deadletter": topic_name("deadletter"),
            "consumer_group": group,
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "idle_flush_seconds": 2.0,
            "drain_seconds": 0.5,
            "log_format": "text",
        }
        values.update(overrides)
        return FusionSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def fusion_service(fusion_settings: Callable[..., object]) -> AsyncIterator[Callable[..., object]]:
    """Starts in-process fusion workers (real consumer group, real broker); stops them after the test."""
    from services.fusion.service import FusionService

    started: list[FusionService] = []

    async def start(**overrides: object) -> FusionService:
        service = FusionService(fusion_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()


# Tiny inference models (random weights, fixed seeds) in a model repository, for the inference tests.
TINY_WINDOW = 64
TINY_TORCH = "beat-torch"  # runtime torch, versions 1 and 2
TINY_ONNX = "beat-onnx"  # runtime onnxruntime, version 1: the same weights as beat-torch version 2


def tiny_beat_net(seed: int):  # -> services.inference.nets.ServedBeatNet (torch is imported lazily)
    """A small ServedBeatNet with random weights and batch-norm statistics drawn from `seed`, in eval mode."""
    import torch

    from services.inference.nets import BeatNet, NetConfig, ServedBeatNet

    torch.manual_seed(seed)
    net = BeatNet(NetConfig(widths=(4, 8), kernel=5, hidden=8, window_samples=TINY_WINDOW))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return ServedBeatNet(net).eval()


def tiny_metadata(name: str, version: str, runtime: str, net_config: dict[str, object], seed: int):
    """ArtifactMetadata of a tiny beat model: input "ecg" FP32 (-1, 1, TINY_WINDOW), outputs logits and
    probabilities FP32 (-1, 2)."""
    from services.inference.repository import ArtifactMetadata, TensorSpec

    return ArtifactMetadata(
        name=name,
        version=version,
        task="ecg-beat",
        variant="student",
        runtime=runtime,
        precision="fp32",
        file="model.pt" if runtime == "torch" else "model.onnx",
        inputs=(TensorSpec("ecg", "FP32", (-1, 1, TINY_WINDOW)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 2)), TensorSpec("probabilities", "FP32", (-1, 2))),
        modality="ecg",
        channels=("II",),
        sample_rate_hz=256.0,
        window_samples=TINY_WINDOW,
        labels=("no_beat", "beat"),
        net=net_config,
        seed=seed,
    )


def write_tiny_models(root: Path) -> Path:
    """Writes TINY_TORCH (versions 1 and 2) and TINY_ONNX (version 1) into the repository at `root`."""
    import warnings

    import torch

    from services.inference.repository import write_artifact

    root.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f"{root.name}-staging"
    staging.mkdir(exist_ok=True)
    for version, seed in (("1", 1), ("2", 2)):
        served = tiny_beat_net(seed)
        payload = staging / f"{TINY_TORCH}-{version}.pt"
        torch.save(served.net.state_dict(), payload)
        write_artifact(root, tiny_metadata(TINY_TORCH, version, "torch", served.net.config.to_json(), seed), payload)
    served = tiny_beat_net(2)
    payload = staging / f"{TINY_ONNX}-1.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it is quick and enough here
        torch.onnx.export(
            served,
            (torch.zeros(2, 1, TINY_WINDOW),),
            str(payload),
            input_names=["ecg"],
            output_names=["logits", "probabilities"],
            dynamic_axes={"ecg": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
            dynamo=False,
        )
    write_artifact(root, tiny_metadata(TINY_ONNX, "1", "onnxruntime", served.net.config.to_json(), 2), payload)
    return root


@pytest.fixture(scope="session")
def tiny_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the tiny beat models (see write_tiny_models), written once per session."""
    return write_tiny_models(tmp_path_factory.mktemp("inference") / "models")


@pytest.fixture
def inference_settings(tiny_model_repository: Path) -> Callable[..., object]:
    """Builds InferenceSettings for a test: loopback, port 0, the tiny models, estimated energy, no Kafka worker;
    keyword arguments override."""
    from services.inference.settings import InferenceSettings

    def make(**overrides: object) -> InferenceSettings:
        values: dict[str, object] = {
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "model_repository": tiny_model_repository,
            "kafka_worker": False,
            "energy_source": "estimate",
            "drain_seconds": 1.0,
            "log_format": "text",
        }
        values.update(overrides)
        return InferenceSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def inference_service(inference_settings: Callable[..., object]) -> AsyncIterator[Callable[..., object]]:
    """Starts in-process inference services (real gRPC on loopback); stops them after the test."""
    from services.inference.service import InferenceService

    started: list[InferenceService] = []

    async def start(**overrides: object) -> InferenceService:
        service = InferenceService(inference_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()


@pytest.fixture
def tide_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., object]:
    """Builds TideSettings for a test: loopback, port 0, one unique command log per test."""
    from services.tide.settings import TideSettings

    topic = topic_name("tide-log")

    def make(**overrides: Any) -> TideSettings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "topic_log": topic,
            "kafka_topic_partitions": 3,
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "drain_seconds": 0.5,
            "log_format": "text",
            "energy_source": "estimate",
        }
        values.update(overrides)
        return TideSettings(**values)

    return make


@pytest.fixture
async def tide_replica(tide_settings: Callable[..., object]) -> AsyncIterator[Callable[..., Any]]:
    """Starts in-process Tide replicas and returns (service, stub); stops them (and closes channels) after the
    test."""
    import grpc

    from clisonix.tide.v1 import tide_pb2_grpc
    from services.tide.service import TideService

    started: list[tuple[Any, Any]] = []

    async def start(**overrides: Any) -> tuple[Any, Any]:
        service = TideService(tide_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        started.append((service, channel))
        return service, tide_pb2_grpc.TideServiceStub(channel)

    yield start
    for service, channel in reversed(started):
        await channel.close()
        if not service.runtime.lifecycle.stop.is_set():  # a test may have stopped it already
            await service.stop()


@pytest.fixture
def liam_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., object]:
    """Builds LiamSettings for a test: loopback, port 0, unique topics and group; keyword arguments override."""
    from services.liam.settings import LiamSettings

    def make(**overrides: object) -> LiamSettings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "topic_liam_metrics": topic_name("liam-metrics"),
            "topic_patterns": topic_name("liam-patterns"),
            "topic_deadletter": topic_name("deadletter"),
            "consumer_group": topic_name("liam-group"),
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "drain_seconds": 0.5,
            "log_format": "text",
            "energy_source": "estimate",
        }
        values.update(overrides)
        return LiamSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def liam_service(liam_settings: Callable[..., object]) -> AsyncIterator[Callable[..., Any]]:
    """Starts in-process LIAM services (real gRPC, real broker); stops them after the test."""
    from services.liam.service import LiamService

    started: list[Any] = []

    async def start(**overrides: object) -> Any:
        service = LiamService(liam_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        if not service.runtime.lifecycle.stop.is_set():
            await service.stop()
