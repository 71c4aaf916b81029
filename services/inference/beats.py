"""From a beat classifier to beats: slide it over a signal, then turn its beat probabilities into beat times.

Shared by the Kafka worker (on each fused window's ECG) and the model evaluation (on held-out records), so what
is measured offline is what is served.
"""

from __future__ import annotations

import numpy as np

# Probabilities within this of a run's highest count as its plateau (detect_beats): float32 softmax outputs of
# a saturated net differ in their last digits only.
PLATEAU = 1e-3


def sliding_segments(signal: np.ndarray, window_samples: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Segments of `signal` (1-D) of `window_samples`, every `stride` samples, shaped (count, 1, window_samples)
    as float32, and the sample index of each segment's centre (start + window_samples // 2).

    A signal shorter than one segment gives no segments.
    """
    if window_samples <= 0 or stride <= 0:
        raise ValueError(f"window_samples and stride must be > 0, got {window_samples} and {stride}")
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 1:
        raise ValueError(f"expected a 1-D signal, got shape {signal.shape}")
    if signal.size < window_samples:
        return np.empty((0, 1, window_samples), dtype=np.float32), np.empty(0, dtype=np.int64)
    views = np.lib.stride_tricks.sliding_window_view(signal, window_samples)[::stride]
    starts = np.arange(views.shape[0], dtype=np.int64) * stride
    return np.ascontiguousarray(views[:, None, :]), starts + window_samples // 2


def detect_beats(
    centres: np.ndarray, beat_probability: np.ndarray, threshold: float = 0.5, refractory_samples: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Beats from per-segment beat probabilities: one per run of consecutive segments at or above `threshold`,
    at the middle of the run's plateau (the segments within PLATEAU of the run's highest probability, from the
    first to the last of them); of two beats closer than `refractory_samples`, the less probable is dropped.
    Returns (sample indices, probabilities), in time order.

    A classifier saturates near a beat: several neighbouring segments read 1.0, and taking the first of them
    would place every beat early by half the plateau; its middle is where the beat is.

    centres: segment centres in samples, increasing, evenly strided (as sliding_segments gives them).
    """
    centres = np.asarray(centres)
    probability = np.asarray(beat_probability, dtype=np.float64)
    if centres.shape != probability.shape:
        raise ValueError(f"centres {centres.shape} and probabilities {probability.shape} differ in shape")
    above = probability >= threshold
    if not above.any():
        return np.empty(0, dtype=np.int64), np.empty(0)
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    run_starts, run_stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    places: list[tuple[int, float]] = []
    for start, stop in zip(run_starts.tolist(), run_stops.tolist(), strict=True):
        run = probability[start:stop]
        top = float(run.max())
        plateau = np.flatnonzero(run >= top - PLATEAU)
        first, last = int(centres[start + plateau[0]]), int(centres[start + plateau[-1]])
        places.append(((first + last) // 2, top))
    beats, kept_p = [places[0][0]], [places[0][1]]
    for at, p in places[1:]:
        if at - beats[-1] < refractory_samples:
            if p > kept_p[-1]:
                beats[-1], kept_p[-1] = at, p
            continue
        beats.append(at)
        kept_p.append(p)
    return np.array(beats, dtype=np.int64), np.array(kept_p)


def match_beats(detected: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[int, int, int]:
    """Greedy one-to-one matching of detected to reference beat times (same unit) within `tolerance`:
    (true positives, false positives, false negatives), as beat-detection scores count them."""
    detected = np.sort(np.asarray(detected, dtype=np.float64))
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    used = np.zeros(reference.size, dtype=bool)
    hits = 0
    for t in detected:
        lo = int(np.searchsorted(reference, t - tolerance, side="left"))
        hi = int(np.searchsorted(reference, t + tolerance, side="right"))
        free = [i for i in range(lo, hi) if not used[i]]
        if free:
            best = min(free, key=lambda i: abs(reference[i] - t))
            used[best] = True
            hits += 1
    return hits, detected.size - hits, reference.size - hits
