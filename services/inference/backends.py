"""Model backends: one loaded model artifact that runs a batch of inputs to its named outputs.

Two runtimes, as the repository's metadata names them:

* ``torch``: a BeatNet rebuilt from the artifact's NetConfig, its state dict loaded with weights_only=True (no
  pickled code runs), wrapped in ServedBeatNet, in eval mode, run under torch.inference_mode.
* ``onnxruntime``: an InferenceSession on the CPU provider with one intra-op and one inter-op thread, sequential.

Both run on one thread: the service scales with processes (replicas, consumer group members), and the batcher
calls `run` from one dedicated thread per model, so a forward pass's CPU time is that thread's and attributable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch

from services.common.errors import FailedPrecondition
from services.inference.nets import OUTPUTS, BeatNet, NetConfig, ServedBeatNet
from services.inference.repository import ModelArtifact


class Backend(Protocol):
    """A loaded model. `run` takes every input the artifact's metadata names, batch on axis 0, and returns every
    output its metadata names (same batch). It is called from one thread at a time."""

    artifact: ModelArtifact

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _single_input(artifact: ModelArtifact) -> str:
    inputs = artifact.metadata.inputs
    if len(inputs) != 1:
        raise FailedPrecondition(
            f"model {artifact.metadata.name} version {artifact.metadata.version}: a BeatNet reads one input, "
            f"the metadata names {len(inputs)}"
        )
    return inputs[0].name


class TorchBackend:
    """A BeatNet state dict served by torch (CPU, one intra-op thread)."""

    def __init__(self, artifact: ModelArtifact) -> None:
        meta = artifact.metadata
        self.artifact = artifact
        self.input_name = _single_input(artifact)
        unknown = [spec.name for spec in meta.outputs if spec.name not in OUTPUTS]
        if unknown:
            raise FailedPrecondition(
                f"model {meta.name} version {meta.version}: outputs {unknown} are not among {list(OUTPUTS)}"
            )
        self.output_names = tuple(spec.name for spec in meta.outputs)
        try:
            net = BeatNet(NetConfig.from_json(meta.net))
            state = torch.load(artifact.path, map_location="cpu", weights_only=True)
            served = ServedBeatNet(net)
            # A state dict saved from the ServedBeatNet wrapper has its keys under "net.".
            target: torch.nn.Module = served if all(k.startswith("net.") for k in state) else net
            target.load_state_dict(state)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(
                f"model {meta.name} version {meta.version}: cannot load the torch state dict: {exc}"
            ) from exc
        self.module = served.eval()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for one batch."""
        x = inputs[self.input_name]
        if not x.flags.writeable:  # arrays over a request's bytes are read-only; torch wants to own writable memory
            x = x.copy()
        with torch.inference_mode():
            results = dict(zip(OUTPUTS, self.module(torch.from_numpy(x)), strict=True))
        return {name: results[name].numpy() for name in self.output_names}


class OnnxBackend:
    """An ONNX model served by ONNX Runtime (CPU provider, one intra-op and one inter-op thread, sequential)."""

    def __init__(self, artifact: ModelArtifact) -> None:
        meta = artifact.metadata
        self.artifact = artifact
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        try:
            self.session = ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise FailedPrecondition(
                f"model {meta.name} version {meta.version}: ONNX Runtime cannot load it: {exc}"
            ) from exc
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        wanted_inputs = {spec.name for spec in meta.inputs}
        wanted_outputs = [spec.name for spec in meta.outputs]
        if wanted_inputs != graph_inputs or not set(wanted_outputs) <= graph_outputs:
            raise FailedPrecondition(
                f"model {meta.name} version {meta.version}: the metadata's tensors (inputs {sorted(wanted_inputs)}, "
                f"outputs {wanted_outputs}) do not match the graph's (inputs {sorted(graph_inputs)}, "
                f"outputs {sorted(graph_outputs)})"
            )
        self.output_names = wanted_outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for one batch."""
        results: list[Any] = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, results, strict=True))


def load_backend(artifact: ModelArtifact) -> Backend:
    """Loads an artifact with the runtime its metadata names; FailedPrecondition when it cannot be served.

    Loading a torch artifact sets torch to one intra-op thread for the whole process (torch has one pool per
    process), as the service runs one forward pass at a time per model on one thread.
    """
    runtime = artifact.metadata.runtime
    if runtime == "torch":
        torch.set_num_threads(1)
        return TorchBackend(artifact)
    if runtime == "onnxruntime":
        return OnnxBackend(artifact)
    raise FailedPrecondition(
        f"model {artifact.metadata.name} version {artifact.metadata.version}: unknown runtime {runtime!r}"
    )
