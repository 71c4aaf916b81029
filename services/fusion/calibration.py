"""Per-subject calibration baselines: the median of each scalar feature over a subject's first good windows.

Pure: protobuf and the standard library, no I/O. Fusion feeds a `CalibrationBook` with each stream window of a
subject until, per (subject pseudonym, modality), `windows` good windows with at least one feature have been
seen; the book then yields a `Baseline` (per feature: the median, robust to the odd mis-detected beat, and how many
windows had it). `delta()` gives a window's features minus the baseline medians.

Features are the scalar numeric fields of the modality's features message (proto descriptors, so a field added to
fusion.proto is picked up): optional fields count only when set, plain proto3 fields whenever the message is
present; NaN and infinite values never count. Repeated messages with a `channel` name (EEG band powers) give
"<channel>.<field>".
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from clisonix.fusion.v1 import fusion_pb2

# Layout version of the baseline JSON stored in Tide.
BASELINE_FORMAT = 1
_NUMERIC = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
    }
)


def _repeated(fd: Any) -> bool:
    return bool(fd.is_repeated)


def _scalars(message: Message, prefix: str, out: dict[str, float]) -> None:
    for fd in message.DESCRIPTOR.fields:
        if fd.type in _NUMERIC and not _repeated(fd):
            if fd.has_presence and not message.HasField(fd.name):
                continue
            value = float(getattr(message, fd.name))
            if math.isfinite(value):
                out[prefix + fd.name] = value


def scalar_features(features: fusion_pb2.StreamFeatures) -> dict[str, float]:
    """The finite scalar features of a stream window's features (empty when it has none)."""
    kind = features.WhichOneof("kind")
    out: dict[str, float] = {}
    if kind is None:
        return out
    message = getattr(features, kind)
    _scalars(message, "", out)
    for fd in message.DESCRIPTOR.fields:
        if fd.type != FieldDescriptor.TYPE_MESSAGE or not _repeated(fd):
            continue
        if "channel" not in fd.message_type.fields_by_name:
            continue
        for item in getattr(message, fd.name):
            if item.channel:
                _scalars(item, f"{item.channel}.", out)
    return out


def good_window(stream: fusion_pb2.StreamWindow, min_coverage: float) -> bool:
    """Whether a stream window may feed a baseline: no missing, clipped, flat or reset flag, and coverage at
    least `min_coverage` (a gap flag alone is judged by the coverage)."""
    quality = stream.quality
    if quality.missing or quality.clipped or quality.flat or quality.reset:
        return False
    return stream.coverage >= min_coverage


@dataclass(frozen=True)
class Baseline:
    """Per feature: the median over the baseline windows and how many of them had the feature."""

    medians: Mapping[str, float]
    counts: Mapping[str, int]
    windows: int

    def to_json(self) -> dict[str, Any]:
        """The value stored in Tide (JSON)."""
        return {
            "format": BASELINE_FORMAT,
            "windows": self.windows,
            "features": {
                name: {"median": self.medians[name], "count": self.counts[name]} for name in sorted(self.medians)
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> Baseline | None:
        """A baseline from its stored JSON, or None when the value is not one this version understands."""
        try:
            if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
                return None
            medians: dict[str, float] = {}
            counts: dict[str, int] = {}
            for name, entry in data["features"].items():
                median = float(entry["median"])
                if not math.isfinite(median):
                    return None
                medians[str(name)] = median
                counts[str(name)] = int(entry["count"])
            return cls(medians, counts, int(data["windows"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def to_proto(self, subject: str, features: Mapping[str, float]) -> fusion_pb2.Calibration:
        """The Calibration of a window with `features` (see scalar_features) for subject pseudonym `subject`."""
        return fusion_pb2.Calibration(
            subject_id=subject,
            baseline=dict(self.medians),
            delta=delta(self, features),
            baseline_windows=self.windows,
            baseline_counts=dict(self.counts),
        )


def delta(baseline: Baseline, features: Mapping[str, float]) -> dict[str, float]:
    """Per feature in both the baseline and `features` (finite values only): feature minus baseline median."""
    out: dict[str, float] = {}
    for name, value in features.items():
        median = baseline.medians.get(name)
        if median is not None and math.isfinite(value):
            out[name] = value - median
    return out


@dataclass
class _Gathering:
    values: dict[str, list[float]] = field(default_factory=dict)
    windows: int = 0
    baseline: Baseline | None = None


class CalibrationBook:
    """Gathers the first `windows` good windows per (subject, modality) and yields their baseline.

    min_coverage: the least coverage of a good window. max_entries: (subject, modality) pairs held at once; the
    least recently fed is dropped beyond it (its gathering starts over if it comes back).
    """

    def __init__(self, windows: int = 30, min_coverage: float = 0.95, max_entries: int = 10_000) -> None:
        if windows < 1:
            raise ValueError("windows must be at least 1")
        self.windows = windows
        self.min_coverage = min_coverage
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Gathering] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, subject: str, modality: str, stream: fusion_pb2.StreamWindow) -> Baseline | None:
        """Feeds one stream window; returns the baseline once it is complete (and on every later call, without
        gathering more), else None. Poor windows and windows without any finite feature do not count."""
        key = (subject, modality)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if entry.baseline is not None:
                return entry.baseline
        if not good_window(stream, self.min_coverage):
            return None
        features = scalar_features(stream.features)
        if not features:
            return None
        if entry is None:
            entry = self._entries[key] = _Gathering()
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        for name, value in features.items():
            entry.values.setdefault(name, []).append(value)
        entry.windows += 1
        if entry.windows >= self.windows:
            entry.baseline = Baseline(
                medians={name: float(statistics.median(values)) for name, values in entry.values.items()},
                counts={name: len(values) for name, values in entry.values.items()},
                windows=entry.windows,
            )
            entry.values = {}
        return entry.baseline

    def forget(self, subject: str, modality: str) -> None:
        """Drops what was gathered for (subject, modality): its baseline is known elsewhere, or was removed and is
        to be gathered afresh."""
        self._entries.pop((subject, modality), None)
