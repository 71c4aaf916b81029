"""ONNX export of a beat net as it is served, the check that ONNX Runtime computes what torch does, and int8
static quantisation with calibration data.

Pure: torch, onnx and onnxruntime on files the caller names; no network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.inference.evaluation import onnx_session
from services.inference.nets import OUTPUTS, BeatNet, ServedBeatNet

INPUT_NAME = "ecg"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the exporter's progress lines and warnings about optional packages (torchvision ops)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(net: BeatNet, path: Path) -> Path:
    """Writes ServedBeatNet(net) as ONNX: input "ecg" (batch, 1, window) float32 with a dynamic batch axis,
    outputs "logits" and "probabilities" (batch, classes). Batch norm is folded into the convolutions."""
    served = ServedBeatNet(net).eval()
    example = torch.zeros(2, net.config.in_channels, net.config.window_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        torch.onnx.export(
            served,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUTS),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    strip_debug_metadata(path)
    return path


def strip_debug_metadata(path: Path) -> None:
    """Removes what the exporter records for debugging (each node's Python stack trace, fx node and module
    path): it names the files of the machine that exported the model, and no runtime reads it."""
    import onnx

    model = onnx.load(str(path))
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        graph.doc_string = ""
        del graph.metadata_props[:]
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.HasField("g") else [])
                graphs.extend(attribute.graphs)
        values: list[Any] = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
        for value in values:
            del value.metadata_props[:]
    del model.metadata_props[:]
    model.doc_string = ""
    onnx.save(model, str(path))


def compare_onnx(net: BeatNet, path: Path, x: np.ndarray) -> dict[str, float]:
    """The largest absolute differences between torch's and ONNX Runtime's outputs on segments `x`."""
    session = onnx_session(path)
    logits, probabilities = session.run(list(OUTPUTS), {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    with torch.inference_mode():
        t_logits, t_probabilities = ServedBeatNet(net).eval()(torch.from_numpy(x))
    return {
        "max_abs_diff_logits": float(np.abs(logits - t_logits.numpy()).max()),
        "max_abs_diff_probabilities": float(np.abs(probabilities - t_probabilities.numpy()).max()),
        "max_abs_logit": float(np.abs(t_logits.numpy()).max()),
        "segments": int(x.shape[0]),
    }


class SegmentCalibration:
    """onnxruntime.quantization's CalibrationDataReader over segments, `batch_size` at a time."""

    def __init__(self, segments: np.ndarray, batch_size: int = 64) -> None:
        self._batches = [
            {INPUT_NAME: np.ascontiguousarray(segments[i : i + batch_size], dtype=np.float32)}
            for i in range(0, segments.shape[0], batch_size)
        ]
        self._next = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._batches)


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, per_channel: bool = True) -> dict[str, Any]:
    """Static int8 quantisation (QDQ: int8 weights per output channel, int8 activations, MinMax calibration on
    `calibration` segments) of the convolutions and dense layers; softmax stays float. Returns its settings."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        reader: Any = SegmentCalibration(calibration)
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MaxPool", "Relu", "ReduceMean"],
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    strip_debug_metadata(out)
    return {
        "format": "QDQ",
        "weights": "int8, symmetric" + (", per output channel" if per_channel else ", per tensor"),
        "activations": "int8, asymmetric",
        "calibration": f"MinMax over {calibration.shape[0]} training segments",
        "operators": "Conv, Gemm, MaxPool, Relu, ReduceMean (softmax in float)",
    }
