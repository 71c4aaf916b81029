"""The inference service over real gRPC on loopback: every KServe v2 RPC, error statuses, health, reflection,
batching under 64 concurrent ModelInfer calls, metrics on /metrics, shutdown."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.inference.api import SERVER_NAME, SERVICE_NAME, server_version
from tests.conftest import TINY_ONNX, TINY_TORCH, TINY_WINDOW

pytestmark = pytest.mark.integration


def segments(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, TINY_WINDOW)).astype(np.float32)


def infer_request(x: np.ndarray, model: str = TINY_ONNX, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="ecg", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        t.name: np.frombuffer(raw, dtype="<f4").reshape(tuple(t.shape))
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def in_process(service, x: np.ndarray, model: str = TINY_ONNX, version: str = "") -> dict[str, np.ndarray]:
    return service.models.get(model, version).batcher.backend.run({"ecg": x})


async def test_every_rpc_round_trips_over_grpc(inference_service):
    service = await inference_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=TINY_TORCH, version="1"))).ready
        meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert (meta.name, meta.version, list(meta.extensions)) == (SERVER_NAME, server_version(), [])
        model = await stub.ModelMetadata(pb.ModelMetadataRequest(name=TINY_TORCH))
        assert (model.name, list(model.versions), model.platform) == (TINY_TORCH, ["1", "2"], "pytorch_libtorch")
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            ("logits", "FP32", [-1, 2]),
            ("probabilities", "FP32", [-1, 2]),
        ]
        for name, version in ((TINY_TORCH, "1"), (TINY_TORCH, ""), (TINY_ONNX, "1")):
            x = segments(4, seed=len(version))
            response = await stub.ModelInfer(infer_request(x, name, model_version=version, id="abc"))
            used = version or "2"
            assert (response.model_name, response.model_version, response.id) == (name, used, "abc")
            got = outputs_of(response)
            assert list(got) == ["logits", "probabilities"]
            for key, value in in_process(service, x, name, used).items():
                np.testing.assert_allclose(got[key], value, atol=1e-6)
        request = infer_request(segments(1), outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")])
        assert [t.name for t in (await stub.ModelInfer(request)).outputs] == ["logits"]


def bad_infer_requests() -> dict[str, pb.ModelInferRequest]:
    x = segments(2)
    cases = {}
    cases["datatype"] = infer_request(x)
    cases["datatype"].inputs[0].datatype = "FP16"
    cases["shape"] = infer_request(x)
    cases["shape"].inputs[0].shape[:] = [2, 2, TINY_WINDOW // 2]
    cases["byte-size"] = infer_request(x)
    cases["byte-size"].raw_input_contents[0] = x.tobytes()[:-1]
    cases["input-name"] = infer_request(x)
    cases["input-name"].inputs[0].name = "ppg"
    cases["missing-input"] = pb.ModelInferRequest(model_name=TINY_ONNX)
    cases["unknown-output"] = infer_request(x, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="x")])
    return cases


async def test_errors_have_their_status_codes(inference_service):
    service = await inference_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        not_found = [
            stub.ModelReady(pb.ModelReadyRequest(name="nope")),
            stub.ModelMetadata(pb.ModelMetadataRequest(name=TINY_TORCH, version="7")),
            stub.ModelInfer(infer_request(segments(1), model="nope")),
            stub.ModelInfer(infer_request(segments(1), model=TINY_ONNX, model_version="2")),
        ]
        for call in not_found:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for case, request in bad_infer_requests().items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        # The server still answers after the errors.
        assert (await stub.ModelInfer(infer_request(segments(1)))).outputs


async def test_concurrent_model_infer_calls_batch_with_unbatched_results(inference_service):
    # A queue delay lets the first call wait for the others, so batches form whatever the scheduling.
    service = await inference_service(max_queue_delay_ms=50, max_batch_size=16)
    inputs = [segments(1 + i % 2, seed=i) for i in range(64)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        responses = await asyncio.gather(*(stub.ModelInfer(infer_request(x, id=str(i))) for i, x in enumerate(inputs)))
    sizes = [r.parameters["batch_size"].int64_param for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 16, sizes
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert response.id == str(i)
        got = outputs_of(response)
        for key, value in in_process(service, x).items():
            np.testing.assert_allclose(got[key], value, atol=1e-5, rtol=0)


async def test_health_reflection_and_metrics(inference_service):
    service = await inference_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        replies = [r async for r in reflection.ServerReflectionInfo(ask())]
        listed = {s.name for s in replies[0].list_services_response.service}
        assert SERVICE_NAME in listed and "grpc.health.v1.Health" in listed
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            await stub.ModelInfer(infer_request(segments(2)))

    url = f"http://127.0.0.1:{service.runtime.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("clisonix_inference_request_latency_seconds_count", model=TINY_ONNX, path="grpc") == 3
    assert value("clisonix_inference_batch_size_sum", model=TINY_ONNX) == 6
    assert value("clisonix_inference_queue_delay_seconds_count", model=TINY_ONNX) == 3
    assert value("clisonix_inference_compute_seconds_count", model=TINY_ONNX) == 3
    energy = value("clisonix_inference_energy_joules_sum", model=TINY_ONNX, variant="student", source="estimate")
    assert energy is not None and energy > 0
    assert value("clisonix_energy_joules_total", service="inference", source="estimate") is not None


async def test_stop_turns_not_ready_and_finishes_calls(inference_service):
    service = await inference_service()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert (await stub.ModelInfer(infer_request(segments(1)))).outputs
    await service.stop()
    assert not service.models.ready
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ServerLive(pb.ServerLiveRequest(), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()
