"""Which model version serves a task: the record's parsing, ModelInfer's version rule and the selector over the
tiny model repository (a model named by Tide that is not served yet is loaded; anything unusable falls back to
the default). No network."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference import grpc_predict_v2_pb2 as pb
from services.common.energy import EnergyMeter
from services.common.errors import FailedPrecondition, NotFound
from services.common.metrics import ServiceMetrics
from services.inference.activation import ActiveModelSelector, check_local
from services.inference.api import InferenceServicer
from services.inference.metrics import InferenceMetrics
from services.inference.selection import (
    FROM_DEFAULT,
    FROM_TIDE,
    JSON,
    ActiveRecord,
    BadRecord,
    ModelChoice,
    parse_active_record,
    request_version,
)
from services.inference.serving import ModelServer
from tests.conftest import TINY_ONNX, TINY_TORCH, TINY_WINDOW

TASK = "ecg-beat"


def record(model: str, version: object = "1") -> bytes:
    return json.dumps({"model": model, "version": version}).encode()


def test_a_record_names_a_model_and_a_version() -> None:
    assert parse_active_record(record("m", "2"), JSON) == ActiveRecord("m", "2")
    assert parse_active_record(record("m", 3), JSON) == ActiveRecord("m", "3")
    assert parse_active_record(b'{"model": "m"}', JSON) == ActiveRecord("m", "")  # the newest


@pytest.mark.parametrize(
    ("value", "content_type"),
    [
        (record("m"), "text/plain"),
        (b"not json", JSON),
        (b"[1, 2]", JSON),
        (b'{"version": "1"}', JSON),
        (record("../etc"), JSON),
        (record("a/b"), JSON),
        (record("m", "0"), JSON),
        (record("m", "v1"), JSON),
        (record("m", True), JSON),
        (record("m", None), JSON),
    ],
)
def test_records_that_name_no_model_version_are_refused(value: bytes, content_type: str) -> None:
    with pytest.raises(BadRecord):
        parse_active_record(value, content_type)


def test_a_request_without_a_version_gets_the_active_version_only_for_the_active_model_from_tide() -> None:
    from_tide = ModelChoice("a", "1", FROM_TIDE)
    assert request_version("a", "", from_tide) == "1"
    assert request_version("a", "2", from_tide) == "2"  # a version named is the version run
    assert request_version("b", "", from_tide) == ""  # another model: the newest
    assert request_version("a", "", ModelChoice("a", "1", FROM_DEFAULT)) == ""  # no Tide record: as before
    assert request_version("a", "", None) == ""


@pytest.fixture
async def server(tiny_model_repository):
    metrics = ServiceMetrics.create("inference")
    with EnergyMeter("estimate") as meter:
        # Only TINY_TORCH is served at first: TINY_ONNX is loaded when Tide names it.
        models = ModelServer(tiny_model_repository, (TINY_TORCH,), 32, 0.0, meter, InferenceMetrics.create(metrics))
        await models.load()
        yield models, metrics.registry
        await models.close()


def active_info(registry) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in registry.collect():
        if family.name == "clisonix_inference_active_model_info":
            for sample in family.samples:
                labels = sample.labels
                assert labels["task"] == TASK
                out[(labels["model"], labels["version"], labels["source"])] = sample.value
    return out


async def test_the_selector_follows_usable_records_and_falls_back_to_the_default(server) -> None:
    models, registry = server
    selector = ActiveModelSelector(models, TASK, models.get(TINY_TORCH), models.metrics)
    assert selector.choice == ModelChoice(TINY_TORCH, "2", FROM_DEFAULT)
    assert active_info(registry) == {(TINY_TORCH, "2", FROM_DEFAULT): 1.0}

    assert await selector.apply(record(TINY_TORCH, "1")) == ModelChoice(TINY_TORCH, "1", FROM_TIDE)
    assert selector.served is models.get(TINY_TORCH, "1")
    # Not served yet, but in the repository and for the task: loaded.
    assert await selector.apply(record(TINY_ONNX, "1")) == ModelChoice(TINY_ONNX, "1", FROM_TIDE)
    assert selector.served is models.get(TINY_ONNX, "1")
    assert await selector.apply(b'{"model": "%s"}' % TINY_TORCH.encode()) == ModelChoice(TINY_TORCH, "2", FROM_TIDE)
    assert active_info(registry) == {(TINY_TORCH, "2", FROM_TIDE): 1.0}

    default = ModelChoice(TINY_TORCH, "2", FROM_DEFAULT)
    for unusable in (record("no-such-model"), record(TINY_TORCH, "9"), b"garbage", record("../..", "1")):
        await selector.apply(record(TINY_TORCH, "1"))
        assert await selector.apply(unusable) == default
        assert selector.served is models.get(TINY_TORCH, "2")
    await selector.apply(record(TINY_TORCH, "1"))
    assert await selector.apply(None) == default  # the record was deleted
    assert active_info(registry) == {(TINY_TORCH, "2", FROM_DEFAULT): 1.0}
    assert await selector.apply(record(TINY_ONNX, "1")) == ModelChoice(TINY_ONNX, "1", FROM_TIDE)
    assert await ActiveModelSelector(models, "another-task", None).apply(record(TINY_ONNX, "1")) is None


async def test_model_infer_without_a_version_runs_the_active_version_of_the_active_model(server) -> None:
    models, _ = server
    selector = ActiveModelSelector(models, TASK, models.get(TINY_TORCH), None)
    servicer = InferenceServicer(models, None, active=lambda: selector.choice)
    x = np.zeros((2, 1, TINY_WINDOW), dtype=np.float32)

    async def version_run(model: str, version: str = "") -> str:
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        request.inputs.add(name="ecg", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        return (await servicer.ModelInfer(request, None)).model_version  # type: ignore[arg-type]

    assert await version_run(TINY_TORCH) == "2"  # the default is no Tide choice: the newest
    await selector.apply(record(TINY_TORCH, "1"))
    assert await version_run(TINY_TORCH) == "1"
    assert await version_run(TINY_TORCH, "2") == "2"
    await selector.apply(record(TINY_ONNX, "1"))
    assert await version_run(TINY_TORCH) == "2"


def test_activate_checks_the_local_repository(tiny_model_repository) -> None:
    assert check_local(tiny_model_repository, TASK, TINY_ONNX, "1").metadata.name == TINY_ONNX
    for model, version in (("no-such-model", "1"), (TINY_ONNX, "2"), ("..", "1"), (TINY_ONNX, "x")):
        with pytest.raises(NotFound):
            check_local(tiny_model_repository, TASK, model, version)
    with pytest.raises(FailedPrecondition):
        check_local(tiny_model_repository, "another-task", TINY_ONNX, "1")
