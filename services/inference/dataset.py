"""The beat-detection data: one labelled ECG record, preprocessed as fused windows carry it, cut into segments.

Pure: numpy, scipy and wfdb only.

The signal goes through what the fusion service does to ECG (services/fusion): the causal Butterworth band-pass
and mains notch of FusionSettings' defaults at the record's own rate, started from rest at the record's first
sample, then resampling onto the 256 Hz grid of fused windows (interpolation only, as fusion does for a stream
whose band-pass edge lies far below the new Nyquist frequency). The annotated beats are mapped to the same grid.

A segment of `window_samples` is labelled by how far its centre (start + window_samples // 2, as
services.inference.beats.sliding_segments places it) lies from the nearest annotated beat: "beat" within
`positive_ms`, "no_beat" beyond `negative_ms`, don't care (IGNORE) in between. The record is split in time:
the first part for training (its last part for validation: early stopping and selection), the rest held out for
every reported score. A segment belongs to a part only when all its samples do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.fusion.filters import apply_causal, filter_plan, resample_to_grid
from services.fusion.settings import DEFAULT_OUTPUT_RATES_HZ, FusionSettings
from services.inference.beats import sliding_segments

DEFAULT_RECORD = Path(__file__).resolve().parents[2] / "data" / "wfdb" / "100"
DEFAULT_CHANNEL = "MLII"
WINDOW_SAMPLES = 128
# WFDB annotation codes that mark a beat (PhysioNet's "beat annotations"); the others ('+' rhythm change,
# '~' noise, '|' artifact, ...) mark no QRS complex.
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")
POSITIVE_MS = 50.0
NEGATIVE_MS = 100.0
HELD_OUT_FRACTION = 0.2
VALIDATION_FRACTION = 1 / 8  # of the training part, at its end
IGNORE = -1
# Where the classical detector's beats are trusted as labels (reliable_samples): intervals of 0.3-2 s (200 to 30
# per minute) within 0.55-1.6 times the local median interval.
RR_RANGE_S = (0.3, 2.0)
RR_RATIO = (0.55, 1.6)


@dataclass(frozen=True)
class EcgFilters:
    """The fusion service's ECG preprocessing (its defaults, as services/fusion/settings.py states them)."""

    band_hz: tuple[float, float]
    order: int
    mains_hz: float
    notch_quality: float
    rate_hz: float

    @classmethod
    def fusion_defaults(cls) -> EcgFilters:
        fields = FusionSettings.model_fields
        band = fields["ecg_band_hz"].default
        return cls(
            band_hz=(float(band[0]), float(band[1])),
            order=int(fields["filter_order"].default),
            mains_hz=float(fields["mains_hz"].default),
            notch_quality=float(fields["notch_quality"].default),
            rate_hz=float(DEFAULT_OUTPUT_RATES_HZ["ecg"]),
        )


@dataclass(frozen=True)
class EcgRecord:
    """One preprocessed ECG lead and its annotated beats.

    signal: filtered ECG in the record's physical unit (mV), float32, at `rate_hz`.
    beats: annotated beat positions in samples of `signal` (fractional: mapped from the native rate).
    symbols: each beat's annotation code.
    filters: names of the causal filters applied, in order.
    """

    name: str
    channel: str
    unit: str
    signal: np.ndarray
    rate_hz: float
    native_rate_hz: float
    beats: np.ndarray
    symbols: tuple[str, ...]
    filters: tuple[str, ...]
    non_beat_annotations: int
    valid: np.ndarray | None = None
    labels_from: str = "annotations"

    @property
    def duration_s(self) -> float:
        return self.signal.size / self.rate_hz

    def valid_segments(self, centres: np.ndarray, window_samples: int) -> np.ndarray:
        """Whether each segment centred at `centres` lies wholly in samples whose labels hold (all of them
        when `valid` is None)."""
        centres = np.asarray(centres, dtype=np.int64)
        if self.valid is None:
            return np.ones(centres.shape, dtype=bool)
        bad = np.concatenate([[0], np.cumsum(~self.valid)])
        start = np.clip(centres - window_samples // 2, 0, self.signal.size)
        stop = np.clip(start + window_samples, 0, self.signal.size)
        return bad[stop] == bad[start]


def load_record(
    path: str | Path = DEFAULT_RECORD,
    channel: str = DEFAULT_CHANNEL,
    seconds: float | None = None,
    filters: EcgFilters | None = None,
) -> EcgRecord:
    """Reads a WFDB record and its .atr annotations and preprocesses one lead as fusion does.

    path: the record without extension (data/wfdb/100). channel: the lead's name in the header.
    seconds: keep only the record's first seconds (tests use a few minutes); None keeps it all.
    """
    import wfdb

    filters = filters or EcgFilters.fusion_defaults()
    path = Path(path)
    header = wfdb.rdheader(str(path))
    native = float(header.fs)
    stop = header.sig_len if seconds is None else min(header.sig_len, round(seconds * native))
    record = wfdb.rdrecord(str(path), channel_names=[channel], sampto=stop)
    if record.p_signal is None or record.p_signal.shape[1] != 1:
        raise ValueError(f"record {path.name} has no channel {channel!r}")
    raw = np.asarray(record.p_signal, dtype=np.float64)[:, 0]
    if not np.isfinite(raw).all():
        raise ValueError(f"record {path.name} has missing samples in {channel}")
    signal, _, names = preprocess(raw, native, filters)

    annotations = wfdb.rdann(str(path), "atr", sampto=stop)
    samples = np.asarray(annotations.sample, dtype=np.int64)
    symbols = list(annotations.symbol)
    is_beat = np.array([s in BEAT_SYMBOLS for s in symbols], dtype=bool)
    beats = samples[is_beat] * (filters.rate_hz / native)
    keep = beats < signal.size
    return EcgRecord(
        name=path.name,
        channel=channel,
        unit=str(record.units[0]),
        signal=signal,
        rate_hz=filters.rate_hz,
        native_rate_hz=native,
        beats=beats[keep],
        symbols=tuple(s for s, b in zip(symbols, is_beat, strict=True) if b)[: int(keep.sum())],
        filters=names,
        non_beat_annotations=int((~is_beat).sum()),
    )


def preprocess(
    raw: np.ndarray, native_rate_hz: float, filters: EcgFilters, gap_guard_s: float = 1.0
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One lead (1-D, physical units, NaN where samples are missing) filtered and resampled as fusion does.

    Missing samples are bridged linearly before filtering (fusion bridges gaps too); the grid samples within
    `gap_guard_s` of one are marked invalid, since the filters ring across a bridge. Returns the signal
    (float32), its validity mask and the filters' names.
    """
    n = raw.size
    missing = ~np.isfinite(raw)
    if missing.all():
        raise ValueError("the lead has no valid sample")
    filled = raw.copy()
    if missing.any():
        index = np.arange(n)
        filled[missing] = np.interp(index[missing], index[~missing], raw[~missing])
    plan = filter_plan(native_rate_hz, filters.band_hz, filters.order, filters.mains_hz, filters.notch_quality)
    filtered = apply_causal(plan, filled[None, :])
    times = np.arange(n) / native_rate_hz
    grid_count = int(np.floor(n * filters.rate_hz / native_rate_hz))
    # Fusion resamples band-limited ECG by interpolation alone (its band-pass edge is far below the new Nyquist
    # frequency), so no anti-aliasing FIR here either.
    resampled = resample_to_grid(filtered, times, np.ones(n, dtype=bool), 0.0, grid_count, filters.rate_hz, False)
    signal = resampled[0]
    finite = np.isfinite(signal)
    end = int(np.argmin(finite)) if not finite.all() else signal.size
    signal = signal[:end].astype(np.float32)
    valid = np.ones(signal.size, dtype=bool)
    if missing.any():
        guard = gap_guard_s * filters.rate_hz
        at = np.flatnonzero(missing) * (filters.rate_hz / native_rate_hz)
        grid = np.arange(signal.size)
        right = np.clip(np.searchsorted(at, grid), 0, at.size - 1)
        left = np.clip(right - 1, 0, at.size - 1)
        distance = np.minimum(np.abs(at[right] - grid), np.abs(at[left] - grid))
        valid = distance > guard
    return signal, valid, plan.names


def classical_beats(signal: np.ndarray, rate_hz: float, valid: np.ndarray | None = None) -> np.ndarray:
    """R-peaks (fractional samples) that the fusion service's classical detector (services.fusion.features:
    neurokit2's gradient method, both QRS polarities) finds in the whole signal; samples marked not `valid` are
    handed to it as missing, so no beat is placed at them."""
    from clisonix.signal.v1 import signal_pb2
    from services.fusion.features import FeatureInput, stream_features

    samples = np.asarray(signal, dtype=np.float64).copy()
    if valid is not None:
        samples[~valid] = np.nan
    end = samples.size / rate_hz
    features = stream_features(
        FeatureInput(
            modality=signal_pb2.MODALITY_ECG,
            channel_names=("ecg",),
            samples=samples[None, :],
            rate_hz=rate_hz,
            start_s=0.0,
            window_start_s=0.0,
            window_end_s=end,
            report_from_s=0.0,
            report_to_s=end,
        )
    )
    return np.asarray(features.ecg.r_peak_times_s, dtype=np.float64) * rate_hz


def reliable_samples(
    beats: np.ndarray,
    size: int,
    rate_hz: float,
    rr_s: tuple[float, float] = RR_RANGE_S,
    rr_ratio: tuple[float, float] = RR_RATIO,
    context: int = 5,
) -> np.ndarray:
    """Samples where a detector's beats can serve as labels: between two consecutive beats whose interval is
    plausible (within `rr_s`, and within `rr_ratio` of the median of the `context` intervals either side: a
    missed beat doubles an interval, a false one halves it). Flat or noisy spans, where the detector finds no
    beats or too many, fall outside."""
    beats = np.sort(np.asarray(beats, dtype=np.float64))
    reliable = np.zeros(size, dtype=bool)
    if beats.size < 3:
        return reliable
    rr = np.diff(beats) / rate_hz
    for i, interval in enumerate(rr):
        local = np.median(rr[max(0, i - context) : i + context + 1])
        if rr_s[0] <= interval <= rr_s[1] and rr_ratio[0] <= interval / local <= rr_ratio[1]:
            reliable[int(np.floor(beats[i])) : int(np.ceil(beats[i + 1])) + 1] = True
    return reliable


def load_silver(
    path: str | Path,
    channel: str,
    seconds: float | None = None,
    filters: EcgFilters | None = None,
) -> EcgRecord:
    """Reads one ECG lead of a WFDB record without beat annotations, preprocesses it as fusion does
    (preprocess) and labels it with the classical detector's beats ("silver" labels: classical_beats on the
    whole lead). `valid` marks the samples where those labels hold: away from missing samples and between
    beats at plausible intervals (reliable_samples). Multi-rate records are read at each signal's own rate.
    """
    import wfdb

    filters = filters or EcgFilters.fusion_defaults()
    path = Path(path)
    record = wfdb.rdrecord(str(path), channel_names=[channel], smooth_frames=False)
    if not record.e_p_signal or len(record.e_p_signal) != 1:
        raise ValueError(f"record {path.name} has no channel {channel!r}")
    native = float(record.fs) * int((record.samps_per_frame or [1])[0] or 1)
    raw = np.asarray(record.e_p_signal[0], dtype=np.float64)
    if seconds is not None:
        raw = raw[: round(seconds * native)]
    signal, valid, names = preprocess(raw, native, filters)
    beats = classical_beats(signal, filters.rate_hz, valid)
    valid &= reliable_samples(beats, signal.size, filters.rate_hz)
    return EcgRecord(
        name=path.name,
        channel=channel,
        unit=str(record.units[0]),
        signal=signal,
        rate_hz=filters.rate_hz,
        native_rate_hz=native,
        beats=beats,
        symbols=(),
        filters=names,
        non_beat_annotations=0,
        valid=valid,
        labels_from="classical detector",
    )


def label_centres(
    centres: np.ndarray,
    beats: np.ndarray,
    rate_hz: float,
    positive_ms: float = POSITIVE_MS,
    negative_ms: float = NEGATIVE_MS,
) -> np.ndarray:
    """Labels of segments centred at `centres` (samples): 1 where the nearest beat is within positive_ms,
    0 where it is further than negative_ms (or there is no beat), IGNORE in between. int8."""
    centres = np.asarray(centres, dtype=np.float64)
    beats = np.sort(np.asarray(beats, dtype=np.float64))
    if beats.size == 0:
        return np.zeros(centres.shape, dtype=np.int8)
    right = np.clip(np.searchsorted(beats, centres), 0, beats.size - 1)
    left = np.clip(right - 1, 0, beats.size - 1)
    distance_ms = np.minimum(np.abs(beats[right] - centres), np.abs(beats[left] - centres)) * 1000.0 / rate_hz
    labels = np.full(centres.shape, IGNORE, dtype=np.int8)
    labels[distance_ms <= positive_ms] = 1
    labels[distance_ms > negative_ms] = 0
    return labels


@dataclass(frozen=True)
class Split:
    """Sample ranges [start, stop) of the training, validation and held-out parts of a signal of `total`."""

    total: int
    train: tuple[int, int]
    validation: tuple[int, int]
    held_out: tuple[int, int]

    @classmethod
    def of(
        cls, total: int, held_out_fraction: float = HELD_OUT_FRACTION, validation_fraction: float = VALIDATION_FRACTION
    ) -> Split:
        """The first (1 - held_out_fraction) of the signal for training, of which the last validation_fraction
        is the validation part; the rest held out."""
        held = round(total * (1 - held_out_fraction))
        val = round(held * (1 - validation_fraction))
        return cls(total, (0, val), (val, held), (held, total))

    def part(self, name: str) -> tuple[int, int]:
        return {"train": self.train, "validation": self.validation, "held_out": self.held_out}[name]


@dataclass(frozen=True)
class Segments:
    """Segments cut from one part of a signal: x (n, 1, window) float32, absolute centres, labels (IGNORE kept)."""

    x: np.ndarray
    centres: np.ndarray
    labels: np.ndarray

    def labelled(self) -> Segments:
        """The segments whose label is not IGNORE."""
        keep = self.labels != IGNORE
        return Segments(self.x[keep], self.centres[keep], self.labels[keep])

    def __len__(self) -> int:
        return int(self.labels.size)


def segments_in(
    record: EcgRecord, bounds: tuple[int, int], stride: int, window_samples: int = WINDOW_SAMPLES
) -> Segments:
    """Every `stride`-th segment lying wholly inside samples [bounds[0], bounds[1]) of the record, labelled
    against all its beats (a beat just outside the part still makes a segment inside it "don't care")."""
    lo, hi = bounds
    x, centres = sliding_segments(record.signal[lo:hi], window_samples, stride)
    centres = centres + lo
    return Segments(x, centres, label_centres(centres, record.beats, record.rate_hz))


def describe(record: EcgRecord, split: Split, stride: int) -> dict[str, Any]:
    """What the training data was, for the artifacts' metadata: record, lead, split in seconds, segment and
    beat counts per part (segments every `stride` samples)."""
    parts: dict[str, Any] = {}
    for name in ("train", "validation", "held_out"):
        lo, hi = split.part(name)
        labels = segments_in(record, (lo, hi), stride).labels
        in_part = (record.beats >= lo) & (record.beats < hi)
        parts[name] = {
            "seconds": [round(lo / record.rate_hz, 3), round(hi / record.rate_hz, 3)],
            "annotated_beats": int(in_part.sum()),
            "segments_beat": int((labels == 1).sum()),
            "segments_no_beat": int((labels == 0).sum()),
            "segments_dont_care": int((labels == IGNORE).sum()),
        }
    symbols: dict[str, int] = {}
    for s in record.symbols:
        symbols[s] = symbols.get(s, 0) + 1
    return {
        "record": f"MIT-BIH Arrhythmia Database record {record.name} (PhysioNet), lead {record.channel}",
        "duration_s": round(record.duration_s, 3),
        "task": (
            f"beat detection as segment classification: a {WINDOW_SAMPLES}-sample segment "
            f"({WINDOW_SAMPLES / record.rate_hz:g} s at {record.rate_hz:g} Hz) is 'beat' when the nearest annotated "
            f"beat (any beat code in the .atr file; non-beat annotations such as '+' ignored) is within "
            f"{POSITIVE_MS:g} ms of its centre, 'no_beat' when it is more than {NEGATIVE_MS:g} ms away; segments in "
            "between are don't care, left out of training and of segment-level scores"
        ),
        "split": (
            f"in time: the first {1 - HELD_OUT_FRACTION:.0%} of the record for training (its last "
            f"{VALIDATION_FRACTION:.1%} as validation, for early stopping and model selection), the last "
            f"{HELD_OUT_FRACTION:.0%} held out for every reported score; a segment belongs to a part only when all "
            "its samples do"
        ),
        "segment_stride_samples": stride,
        "beat_symbols": symbols,
        "non_beat_annotations": record.non_beat_annotations,
        "parts": parts,
    }
