"""GRPCInferenceService servicer (KServe v2 / Open Inference Protocol): proto in, model server call, proto out.

Inputs come as raw_input_contents (little-endian bytes, one entry per input, as Triton and KServe clients send
them) or as typed contents; outputs always go back as raw_output_contents, named, typed and shaped: every output
of the model when the request names none, otherwise the named ones in the request's order. Errors are raised as
domain errors and mapped to status codes by the common ErrorInterceptor: NOT_FOUND for an unknown model or
version, INVALID_ARGUMENT for anything about the tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from importlib import metadata as package_metadata

import grpc
import numpy as np

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgument
from services.inference.metrics import InferenceMetrics
from services.inference.repository import ModelArtifact, TensorSpec
from services.inference.selection import ModelChoice, request_version
from services.inference.serving import ModelServer
from services.inference.tensors import CONTENTS_FIELDS, datatype_of, from_raw, from_values, to_raw

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "clisonix-inference"
# Protocol extensions served beyond the core (none: no model repository, statistics or shared-memory APIs).
EXTENSIONS: tuple[str, ...] = ()


def server_version() -> str:
    """The installed clisonix package's version."""
    try:
        return package_metadata.version("clisonix")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors by name, from raw contents (all inputs) or typed contents (each input)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs", reason="byte_size"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidArgument(f"input {tensor.name!r} is given twice", reason="input_name")
        if raw:
            inputs[tensor.name] = from_raw(tensor.name, tensor.datatype, tensor.shape, raw[index])
        elif tensor.HasField("contents") and tensor.datatype in CONTENTS_FIELDS:
            values = getattr(tensor.contents, CONTENTS_FIELDS[tensor.datatype])
            inputs[tensor.name] = from_values(tensor.name, tensor.datatype, tensor.shape, values)
        elif tensor.HasField("contents"):
            # from_values says why (an unknown datatype, or one with no typed field)
            inputs[tensor.name] = from_values(tensor.name, tensor.datatype, tensor.shape, [])
        else:
            raise InvalidArgument(f"input {tensor.name!r} has no data (neither raw nor typed contents)", reason="data")
    return inputs


def requested_outputs(request: pb.ModelInferRequest, artifact: ModelArtifact) -> list[str]:
    """The outputs to return: the request's, in its order, or every output of the model when it names none."""
    available = [spec.name for spec in artifact.metadata.outputs]
    if not request.outputs:
        return available
    names = [output.name for output in request.outputs]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise InvalidArgument(f"unknown output(s) {unknown}; the model returns {available}", reason="output_name")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"an output is requested twice: {names}", reason="output_name")
    return names


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in specs
    ]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 gRPC API over a ModelServer.

    models: the loaded models. metrics: where ModelInfer latencies go (path "grpc"; None: nowhere).
    active: the task's active model (services.inference.activation); a ModelInfer request for that model naming
        no version runs the active version instead of the newest (None: always the newest).
    """

    def __init__(
        self,
        models: ModelServer,
        metrics: InferenceMetrics | None = None,
        active: Callable[[], ModelChoice | None] | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.active = active
        self.version = server_version()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.models.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        self.models.get(request.name, request.version)  # NotFound for an unknown model or version
        return pb.ModelReadyResponse(ready=self.models.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        artifact = self.models.get(request.name, request.version).artifact
        return pb.ModelMetadataResponse(
            name=artifact.metadata.name,
            versions=self.models.versions(request.name),
            platform=artifact.platform,
            inputs=tensor_metadata(artifact.metadata.inputs),
            outputs=tensor_metadata(artifact.metadata.outputs),
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        active = self.active() if self.active is not None else None
        version = request_version(request.model_name, request.model_version, active)
        artifact, batcher = self.models.get(request.model_name, version)
        inputs = decode_inputs(request)
        names = requested_outputs(request, artifact)
        result = await batcher.infer(inputs)
        response = pb.ModelInferResponse(
            model_name=artifact.metadata.name, model_version=artifact.metadata.version, id=request.id
        )
        for name in names:
            array = result.outputs[name]
            response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            response.raw_output_contents.append(to_raw(array))
        # What this request cost, for clients that account for it (standard clients ignore parameters).
        parameters = response.parameters
        parameters["batch_size"].int64_param = result.batch_size
        parameters["queue_seconds"].double_param = result.queue_s
        parameters["compute_seconds"].double_param = result.compute_s
        parameters["joules"].double_param = result.joules
        parameters["energy_source"].string_param = result.energy_source
        if self.metrics is not None:
            self.metrics.observe_request(artifact.metadata.name, "grpc", time.perf_counter() - started)
        return response


def register(servicer: InferenceServicer) -> Callable[[grpc.aio.Server], None]:
    """A GrpcServer `register` callback adding the servicer."""

    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return add
