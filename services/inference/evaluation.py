"""Scores of a beat classifier on held-out signal: segment level and beat level, never bare accuracy.

Pure: numpy (torch and onnxruntime only inside the predictors that wrap a model).

Segment level: every `stride`-th segment of the part whose label is not don't care; macro-F1 over the two
classes, sensitivity (Se, recall of "beat") and positive predictivity (PPV, precision of "beat").
Beat level: the model slides over the part exactly as the served worker does (services.inference.beats:
sliding_segments, detect_beats with a threshold and a refractory period), and the detected beats are matched
one to one to the annotated beats within a tolerance: Se = TP / (TP + FN), PPV = TP / (TP + FP). The annotated
beats counted are those a segment centre can reach (between the first and the last centre).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.beats import detect_beats, match_beats, sliding_segments
from services.inference.dataset import IGNORE, EcgRecord, label_centres

# (n, 1, window) float32 segments -> (n,) probability of "beat".
Predict = Callable[[np.ndarray], np.ndarray]

STRIDE_SAMPLES = 4
THRESHOLD = 0.5
REFRACTORY_MS = 200.0
TOLERANCE_MS = 150.0


def torch_predictor(net: Any, batch_size: int = 1024) -> Predict:
    """Beat probabilities from a BeatNet (or anything returning logits) in eval mode, batch by batch."""
    import torch

    def predict(x: np.ndarray) -> np.ndarray:
        net.eval()
        out = np.empty(x.shape[0], dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                logits = net(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])))
                out[start : start + batch_size] = torch.softmax(logits, dim=1)[:, 1].numpy()
        return out

    return predict


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predictor(session: Any, batch_size: int = 1024) -> Predict:
    """Beat probabilities from an exported model's "probabilities" output."""

    def predict(x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[0], dtype=np.float32)
        for start in range(0, x.shape[0], batch_size):
            (probability,) = session.run(
                ["probabilities"], {"ecg": np.ascontiguousarray(x[start : start + batch_size])}
            )
            out[start : start + batch_size] = probability[:, 1]
        return out

    return predict


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def segment_scores(labels: np.ndarray, beat_probability: np.ndarray, threshold: float = THRESHOLD) -> dict[str, Any]:
    """Macro-F1 over the two classes, Se and PPV of "beat", and the confusion counts, for labelled segments
    (IGNORE labels are left out)."""
    labels = np.asarray(labels)
    keep = labels != IGNORE
    truth = labels[keep] == 1
    said = np.asarray(beat_probability)[keep] >= threshold
    tp = int((truth & said).sum())
    fp = int((~truth & said).sum())
    fn = int((truth & ~said).sum())
    tn = int((~truth & ~said).sum())
    f1_beat = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_none = _ratio(2 * tn, 2 * tn + fn + fp)
    return {
        "macro_f1": (f1_beat + f1_none) / 2,
        "f1_beat": f1_beat,
        "f1_no_beat": f1_none,
        "sensitivity": _ratio(tp, tp + fn),
        "positive_predictivity": _ratio(tp, tp + fp),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "segments": int(keep.sum()),
    }


def beat_scores(
    centres: np.ndarray,
    beat_probability: np.ndarray,
    reference: np.ndarray,
    rate_hz: float,
    threshold: float = THRESHOLD,
    refractory_ms: float = REFRACTORY_MS,
    tolerance_ms: float = TOLERANCE_MS,
    valid: np.ndarray | None = None,
) -> dict[str, Any]:
    """Beats detected from per-segment probabilities (detect_beats) matched to the `reference` beats (samples)
    that lie between the first and last centre: Se, PPV and the counts.

    valid: where the reference holds, per sample; beats of either side elsewhere are not counted (None: all)."""
    refractory = round(refractory_ms * rate_hz / 1000)
    detected, _ = detect_beats(centres, beat_probability, threshold, refractory)
    detected = detected.astype(np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    reachable = reference[(reference >= centres[0]) & (reference <= centres[-1])] if centres.size else reference[:0]
    if valid is not None:
        detected, reachable = (
            beats[valid[np.clip(np.rint(beats).astype(np.int64), 0, valid.size - 1)]] for beats in (detected, reachable)
        )
    tp, fp, fn = match_beats(detected, reachable, tolerance_ms * rate_hz / 1000)
    offsets = _matched_offsets_ms(detected, reachable, tolerance_ms * rate_hz / 1000, rate_hz)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "positive_predictivity": _ratio(tp, tp + fp),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "reference_beats": int(reachable.size),
        "median_offset_ms": float(np.median(offsets)) if offsets.size else 0.0,
    }


def _matched_offsets_ms(detected: np.ndarray, reference: np.ndarray, tolerance: float, rate_hz: float) -> np.ndarray:
    """Detected minus nearest reference time (ms) for detections within the tolerance of one."""
    if detected.size == 0 or reference.size == 0:
        return np.empty(0)
    reference = np.sort(reference)
    right = np.clip(np.searchsorted(reference, detected), 0, reference.size - 1)
    left = np.clip(right - 1, 0, reference.size - 1)
    nearest = np.where(
        np.abs(reference[right] - detected) < np.abs(reference[left] - detected), reference[right], reference[left]
    )
    delta = detected - nearest
    return delta[np.abs(delta) <= tolerance] * 1000.0 / rate_hz


def agreement_part(
    record: EcgRecord,
    bounds: tuple[int, int],
    predict: Predict,
    window_samples: int,
    stride: int = STRIDE_SAMPLES,
    threshold: float = THRESHOLD,
    refractory_ms: float = REFRACTORY_MS,
    tolerance_ms: float = TOLERANCE_MS,
) -> dict[str, Any]:
    """Agreement of the model's beats with a record's reference beats on samples [bounds), counting only beats
    (of either side) at samples where the reference holds (record.valid): Se = share of reference beats the
    model also finds, PPV = share of the model's beats the reference also has, both within `tolerance_ms`.
    For a record labelled by the classical detector this is agreement with that detector, not accuracy."""
    lo, hi = bounds
    x, centres = sliding_segments(record.signal[lo:hi], window_samples, stride)
    centres = centres + lo
    probability = predict(x)
    valid = record.valid if record.valid is not None else np.ones(record.signal.size, dtype=bool)
    scores = beat_scores(
        centres, probability, record.beats, record.rate_hz, threshold, refractory_ms, tolerance_ms, valid
    )
    return {
        **scores,
        "reference": record.labels_from,
        "seconds": [round(lo / record.rate_hz, 3), round(hi / record.rate_hz, 3)],
        "labels_hold_fraction": round(float(valid[lo:hi].mean()), 4),
        "tolerance_ms": tolerance_ms,
    }


def evaluate_part(
    record: EcgRecord,
    bounds: tuple[int, int],
    predict: Predict,
    window_samples: int,
    stride: int = STRIDE_SAMPLES,
    threshold: float = THRESHOLD,
    refractory_ms: float = REFRACTORY_MS,
    tolerance_ms: float = TOLERANCE_MS,
) -> dict[str, Any]:
    """Segment- and beat-level scores of `predict` on samples [bounds) of the record, from one pass of the
    model over its sliding segments (every `stride` samples)."""
    lo, hi = bounds
    x, centres = sliding_segments(record.signal[lo:hi], window_samples, stride)
    centres = centres + lo
    probability = predict(x)
    labels = label_centres(centres, record.beats, record.rate_hz)
    return {
        "segment": segment_scores(labels, probability, threshold),
        "beat": beat_scores(centres, probability, record.beats, record.rate_hz, threshold, refractory_ms, tolerance_ms),
        "stride_samples": stride,
        "threshold": threshold,
        "refractory_ms": refractory_ms,
        "tolerance_ms": tolerance_ms,
        "seconds": [round(lo / record.rate_hz, 3), round(hi / record.rate_hz, 3)],
    }
