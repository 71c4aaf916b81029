"""The KServe v2 servicer without a network: proto <-> tensors, output selection, metadata and every error."""

from __future__ import annotations

import numpy as np
import pytest

from inference import grpc_predict_v2_pb2 as pb
from services.common.energy import EnergyMeter
from services.common.errors import InvalidArgument, NotFound
from services.common.metrics import ServiceMetrics
from services.inference.api import SERVER_NAME, SERVICE_NAME, InferenceServicer, server_version
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelServer
from tests.conftest import TINY_ONNX, TINY_TORCH, TINY_WINDOW


@pytest.fixture
async def served(tiny_model_repository):
    metrics = ServiceMetrics.create("inference")
    with EnergyMeter("estimate") as meter:
        models = ModelServer(tiny_model_repository, (), 32, 0.0, meter, InferenceMetrics.create(metrics))
        await models.load()
        yield InferenceServicer(models, models.metrics), metrics.registry
        await models.close()


def segments(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, TINY_WINDOW)).astype(np.float32)


def infer_request(
    x: np.ndarray, model: str = TINY_ONNX, version: str = "", outputs=(), **tensor
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    request.inputs.add(name=tensor.get("name", "ecg"), datatype=tensor.get("datatype", "FP32"), shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def output(response: pb.ModelInferResponse, index: int) -> np.ndarray:
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(tuple(tensor.shape))


def expected(servicer: InferenceServicer, x: np.ndarray, model: str = TINY_ONNX, version: str = ""):
    return servicer.models.get(model, version).batcher.backend.run({"ecg": x})


async def test_server_liveness_readiness_and_metadata(served):
    servicer, _ = served
    assert SERVICE_NAME == "inference.GRPCInferenceService"
    assert (await servicer.ServerLive(pb.ServerLiveRequest(), None)).live
    assert (await servicer.ServerReady(pb.ServerReadyRequest(), None)).ready
    meta = await servicer.ServerMetadata(pb.ServerMetadataRequest(), None)
    assert (meta.name, meta.version, list(meta.extensions)) == (SERVER_NAME, server_version(), [])
    await servicer.models.set_not_ready()
    assert not (await servicer.ServerReady(pb.ServerReadyRequest(), None)).ready


async def test_model_readiness_and_metadata(served):
    servicer, _ = served
    for version in ("", "1", "2"):
        assert (await servicer.ModelReady(pb.ModelReadyRequest(name=TINY_TORCH, version=version), None)).ready
    meta = await servicer.ModelMetadata(pb.ModelMetadataRequest(name=TINY_TORCH), None)
    assert (meta.name, list(meta.versions), meta.platform) == (TINY_TORCH, ["1", "2"], "pytorch_libtorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("ecg", "FP32", [-1, 1, TINY_WINDOW])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 2]),
        ("probabilities", "FP32", [-1, 2]),
    ]
    onnx = await servicer.ModelMetadata(pb.ModelMetadataRequest(name=TINY_ONNX, version="1"), None)
    assert (onnx.platform, list(onnx.versions)) == ("onnxruntime_onnx", ["1"])


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.ModelReady(pb.ModelReadyRequest(name="nope"), None),
        lambda s: s.ModelReady(pb.ModelReadyRequest(name=TINY_TORCH, version="3"), None),
        lambda s: s.ModelMetadata(pb.ModelMetadataRequest(name="nope"), None),
        lambda s: s.ModelMetadata(pb.ModelMetadataRequest(name=TINY_ONNX, version="2"), None),
        lambda s: s.ModelInfer(infer_request(segments(1), model="nope"), None),
        lambda s: s.ModelInfer(infer_request(segments(1), model=TINY_TORCH, version="9"), None),
    ],
    ids=["ready-model", "ready-version", "meta-model", "meta-version", "infer-model", "infer-version"],
)
async def test_unknown_models_and_versions_are_not_found(served, call):
    with pytest.raises(NotFound):
        await call(served[0])


async def test_infer_returns_every_output_when_none_is_requested(served):
    servicer, registry = served
    x = segments(3)
    response = await servicer.ModelInfer(infer_request(x, model=TINY_TORCH), None)
    assert (response.model_name, response.model_version, response.id) == (TINY_TORCH, "2", "req-1")
    assert [t.name for t in response.outputs] == ["logits", "probabilities"]
    assert [list(t.shape) for t in response.outputs] == [[3, 2], [3, 2]]
    want = expected(servicer, x, TINY_TORCH, "2")
    np.testing.assert_allclose(output(response, 0), want["logits"], atol=1e-6)
    np.testing.assert_allclose(output(response, 1), want["probabilities"], atol=1e-6)
    assert response.parameters["batch_size"].int64_param == 3
    assert response.parameters["energy_source"].string_param == "estimate"
    labels = {"model": TINY_TORCH, "path": "grpc"}
    assert registry.get_sample_value("clisonix_inference_request_latency_seconds_count", labels) == 1


async def test_infer_returns_only_the_requested_outputs_in_request_order(served):
    servicer, _ = served
    x = segments(2, seed=4)
    response = await servicer.ModelInfer(infer_request(x, version="1", outputs=("probabilities", "logits")), None)
    assert [t.name for t in response.outputs] == ["probabilities", "logits"]
    assert response.model_version == "1"
    want = expected(servicer, x)
    np.testing.assert_allclose(output(response, 0), want["probabilities"], atol=1e-6)
    np.testing.assert_allclose(output(response, 1), want["logits"], atol=1e-6)
    only = await servicer.ModelInfer(infer_request(x, outputs=("logits",)), None)
    assert [t.name for t in only.outputs] == ["logits"] and len(only.raw_output_contents) == 1


async def test_typed_fp32_contents_are_accepted(served):
    servicer, _ = served
    x = segments(2, seed=5)
    request = pb.ModelInferRequest(model_name=TINY_ONNX)
    tensor = request.inputs.add(name="ecg", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = await servicer.ModelInfer(request, None)
    np.testing.assert_allclose(output(response, 1), expected(servicer, x)["probabilities"], atol=1e-6)


def raw_request(**change) -> pb.ModelInferRequest:
    x = segments(2)
    request = infer_request(x)
    tensor = request.inputs[0]
    if "datatype" in change:
        tensor.datatype = change["datatype"]
    if "shape" in change:
        del tensor.shape[:]
        tensor.shape.extend(change["shape"])
    if "name" in change:
        tensor.name = change["name"]
    if "raw" in change:
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(change["raw"])
    if "outputs" in change:
        for name in change["outputs"]:
            request.outputs.add(name=name)
    return request


BAD_REQUESTS = {
    "wrong-datatype": (raw_request(datatype="FP64", shape=[1, 1, TINY_WINDOW]), "datatype FP64"),
    "unsupported-datatype": (raw_request(datatype="BYTES"), "unsupported datatype"),
    "short-bytes": (raw_request(raw=[segments(2).tobytes()[:-4]]), "bytes of raw contents"),
    "shape-vs-bytes": (raw_request(shape=[3, 1, TINY_WINDOW]), "bytes of raw contents"),
    "wrong-shape": (raw_request(shape=[2, 2, TINY_WINDOW // 2]), "does not fit"),
    "wrong-rank": (raw_request(shape=[2, TINY_WINDOW]), "does not fit"),
    "negative-dim": (raw_request(shape=[-2, 1, TINY_WINDOW]), "negative dimension"),
    "input-name": (raw_request(name="eeg"), "unknown input"),
    "raw-count": (raw_request(raw=[segments(2).tobytes()] * 2), "2 entries for 1 inputs"),
    "unknown-output": (raw_request(outputs=["logits", "embedding"]), "unknown output"),
    "output-twice": (raw_request(outputs=["logits", "logits"]), "requested twice"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_are_invalid_arguments(served, case):
    request, message = BAD_REQUESTS[case]
    with pytest.raises(InvalidArgument, match=message):
        await served[0].ModelInfer(request, None)


async def test_missing_and_duplicated_inputs_and_inputs_without_data(served):
    servicer, _ = served
    with pytest.raises(InvalidArgument, match="missing input"):
        await servicer.ModelInfer(pb.ModelInferRequest(model_name=TINY_ONNX), None)
    twice = infer_request(segments(1))
    twice.inputs.add(name="ecg", datatype="FP32", shape=[1, 1, TINY_WINDOW])
    twice.raw_input_contents.append(segments(1).tobytes())
    with pytest.raises(InvalidArgument, match="given twice"):
        await servicer.ModelInfer(twice, None)
    empty = pb.ModelInferRequest(model_name=TINY_ONNX)
    empty.inputs.add(name="ecg", datatype="FP32", shape=[1, 1, TINY_WINDOW])
    with pytest.raises(InvalidArgument, match="no data"):
        await servicer.ModelInfer(empty, None)
    typed = pb.ModelInferRequest(model_name=TINY_ONNX)
    typed.inputs.add(name="ecg", datatype="FP32", shape=[1, 1, TINY_WINDOW]).contents.fp32_contents.extend([0.0] * 3)
    with pytest.raises(InvalidArgument, match="3 values"):
        await servicer.ModelInfer(typed, None)
