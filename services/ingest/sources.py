"""Device and file adapters that produce SampleBlocks: synthetic, WFDB, EDF/BDF, XDF, LSL, BrainFlow and
session recordings (`clisonix record`).

Every source says up front which streams it produces (`specs()`), yields blocks of about `block_seconds` of
samples in time order across its streams (`blocks()`), and releases what it holds in `close()`. File and
synthetic sources yield as fast as they are read: the client paces replay by the block timestamps. Live
sources (LSL, BrainFlow) block until their device delivers.

Heavy device libraries are imported where a source opens, so importing this module stays cheap.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, modality_name

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SECONDS = 0.25
SOURCE_KINDS = ("synthetic", "wfdb", "edf", "bdf", "xdf", "lsl", "brainflow", "recording")

_INT16_MIN, _INT16_MAX = -32768, 32767


# --- shared helpers ----------------------------------------------------------------------------------------


class Source(ABC):
    """A producer of SampleBlocks for one or more streams; usable as a context manager."""

    block_seconds: float = DEFAULT_BLOCK_SECONDS
    # True when the next block may take a while to arrive (a device): read it off the event loop.
    live: bool = False

    @abstractmethod
    def specs(self) -> list[StreamSpec]:
        """The streams this source produces."""

    @abstractmethod
    def blocks(self) -> Iterator[SampleBlock]:
        """Blocks of every stream, in time order of their first sample."""

    @abstractmethod
    def close(self) -> None:
        """Releases files, sessions and sockets; a running `blocks()` ends at its next step."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Standard ECG lead names as WFDB and EDF headers spell them (upper-cased).
_ECG_LEADS = frozenset({"MLI", "MLII", "MLIII", "I", "II", "III", "AVR", "AVL", "AVF", "V", "ECG", "EKG"})
_ECG_LEAD_RE = re.compile(r"^(ML)?V[1-9]R?$")
# Keyword (token prefix) -> modality, checked before lead names so "EEG Fz" or "Resp" are not taken for ECG.
_KEYWORDS: tuple[tuple[tuple[str, ...], int], ...] = (
    (("EEG",), signal_pb2.MODALITY_EEG),
    (("ECG", "EKG"), signal_pb2.MODALITY_ECG),
    (("PPG", "PLETH"), signal_pb2.MODALITY_PPG),
    (("RESP", "BREATH", "THOR", "ABDO"), signal_pb2.MODALITY_RESPIRATION),
    (("EDA", "GSR", "SCL", "SCR"), signal_pb2.MODALITY_EDA),
    (("AUDIO", "MIC", "SOUND"), signal_pb2.MODALITY_AUDIO),
    (("ACC", "GYRO", "MOTION", "MOCAP", "IMU"), signal_pb2.MODALITY_MOTION),
)


def modality_from_label(label: str) -> int:
    """The Modality a signal label or stream type names ("MLII" -> ECG, "PLETH" -> PPG), else OTHER."""
    tokens = [t for t in re.split(r"[^A-Z0-9]+", label.upper()) if t]
    for prefixes, modality in _KEYWORDS:
        if any(t.startswith(prefixes) for t in tokens):
            return modality
    if any(t in _ECG_LEADS or _ECG_LEAD_RE.match(t) for t in tokens):
        return signal_pb2.MODALITY_ECG
    return signal_pb2.MODALITY_OTHER


def _block_edges(stop: int | None, rate: float, block_seconds: float) -> Iterator[tuple[int, int]]:
    """Sample index ranges [lo, hi) of consecutive blocks from 0 to `stop` (None: endless).

    Edges fall at round(k * rate * block_seconds) so blocks average exactly block_seconds and blocks of
    streams at different rates stay aligned in time.
    """
    per_block = max(rate * block_seconds, 1.0)
    k = 0
    lo = 0
    end = math.inf if stop is None else stop
    while lo < end:
        k += 1
        hi = max(lo + 1, round(k * per_block))
        hi = int(min(hi, end))
        yield lo, hi
        lo = hi


def _limit(total: int, rate: float, duration_s: float | None) -> int:
    """`total` samples, cut to the first duration_s seconds when given."""
    return total if duration_s is None else min(total, round(duration_s * rate))


def _merge_by_time(streams: Iterable[Iterator[SampleBlock]]) -> Iterator[SampleBlock]:
    """Interleaves per-stream block iterators by first sample time (stable for equal times)."""
    return heapq.merge(*streams, key=lambda block: block.first_sample_time_s)


def _unique_ids(bases: Sequence[str], rates: Sequence[float]) -> list[str]:
    """Stream ids from `bases` (reduced to [A-Za-z0-9._-]), made unique by the rate, then an index."""
    bases = [re.sub(r"[^A-Za-z0-9._-]+", "-", b).strip("-") or "stream" for b in bases]
    ids = []
    for base, rate in zip(bases, rates, strict=True):
        if bases.count(base) > 1:
            base = f"{base}-{rate:g}hz"
        ids.append(base)
    for i, sid in enumerate(ids):
        if ids.count(sid) > 1:
            ids[i] = f"{sid}-{i}"
    return ids


@dataclass
class _Group:
    """Channels of one file that become one stream: same rate and modality."""

    rate: float
    modality: int
    indices: list[int]


def _group_channels(rates: Sequence[float], modalities: Sequence[int]) -> list[_Group]:
    """Groups channel indices by (rate, modality), in order of each group's first channel."""
    groups: dict[tuple[float, int], _Group] = {}
    for i, (rate, modality) in enumerate(zip(rates, modalities, strict=True)):
        groups.setdefault((rate, modality), _Group(rate, modality, [])).indices.append(i)
    return list(groups.values())


# --- synthetic ---------------------------------------------------------------------------------------------

_SYNTH_MODALITIES: dict[str, int] = {
    "eeg": signal_pb2.MODALITY_EEG,
    "ecg": signal_pb2.MODALITY_ECG,
    "ppg": signal_pb2.MODALITY_PPG,
    "resp": signal_pb2.MODALITY_RESPIRATION,
    "audio": signal_pb2.MODALITY_AUDIO,
}
_SYNTH_ALIASES = {"respiration": "resp"}
_SYNTH_RATES = {"eeg": 256.0, "ecg": 250.0, "ppg": 125.0, "resp": 25.0, "audio": 8000.0}
_SYNTH_UNITS = {"eeg": "uV", "ecg": "mV", "ppg": "a.u.", "resp": "a.u.", "audio": "a.u."}
_SYNTH_NAMES = {
    "eeg": ("Fz", "Cz", "Pz", "Oz", "C3", "C4", "O1", "O2"),
    "ecg": ("I", "II"),
    "ppg": ("PLETH",),
    "resp": ("RESP",),
    "audio": ("MIC",),
}
_EEG_1020 = (
    "Fp1",
    "Fp2",
    "F3",
    "F4",
    "F7",
    "F8",
    "T7",
    "T8",
    "P3",
    "P4",
    "P7",
    "P8",
    "Fpz",
    "AFz",
    "FCz",
    "CPz",
    "POz",
)
# Fixed per-modality seed words, so adding a modality never changes another one's signal.
_SYNTH_SEED_WORD = {"eeg": 1, "ecg": 2, "ppg": 3, "resp": 4, "audio": 5, "heart": 100}


def _channel_names(key: str, spec: int | Sequence[str] | None) -> tuple[str, ...]:
    """Channel names for a synthetic modality from a count, explicit names, or the default."""
    if spec is None:
        return _SYNTH_NAMES[key]
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"{key}: channel count must be at least 1")
        pool = _SYNTH_NAMES[key] + (_EEG_1020 if key == "eeg" else ())
        if spec <= len(pool):
            return pool[:spec]
        return pool + tuple(f"{key.upper()}{i}" for i in range(len(pool), spec))
    names = tuple(str(n) for n in spec)
    if not names:
        raise ValueError(f"{key}: at least one channel name is needed")
    return names


class _Heart:
    """Beat times shared by the ECG and PPG streams: ~60-80 bpm with respiratory and random variability."""

    def __init__(self, rng: np.random.Generator, start_time: float) -> None:
        self._rng = rng
        self.mean_rr = 60.0 / rng.uniform(62.0, 78.0)
        # First beat somewhere in the first interval, with one beat before it for the waves that reach back.
        first = start_time + rng.uniform(0.0, self.mean_rr)
        self.beats: list[float] = [first - self.mean_rr, first]
        self.rrs: list[float] = [self.mean_rr, self.mean_rr]

    def _extend(self, until: float) -> None:
        """Appends beats until one lies past `until`."""
        while self.beats[-1] < until:
            t = self.beats[-1]
            # Respiratory sinus arrhythmia (0.25 Hz) plus a little beat-to-beat noise.
            rr = self.mean_rr * (1.0 + 0.04 * math.sin(2 * math.pi * 0.25 * t) + 0.015 * self._rng.standard_normal())
            self.beats.append(t + rr)
            self.rrs.append(rr)

    def window(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Beat times and their RR intervals near [t0, t1] (with margins for wave widths)."""
        self._extend(t1 + 2.0)
        beats = np.asarray(self.beats)
        rrs = np.asarray(self.rrs)
        keep = (beats > t0 - 1.5) & (beats < t1 + 1.0)
        # Drop history that no window can reach again, keeping memory flat for endless streams.
        if len(self.beats) > 64:
            cut = int(np.searchsorted(beats, t0 - 5.0))
            del self.beats[:cut]
            del self.rrs[:cut]
        return beats[keep], rrs[keep]


class _Generator:
    """Produces consecutive samples of one synthetic stream; `take` must be called in sample order."""

    def __init__(self, names: tuple[str, ...], rate: float, rng: np.random.Generator) -> None:
        self.names = names
        self.rate = rate
        self.rng = rng
        self.channels = len(names)

    def take(self, t: np.ndarray) -> np.ndarray:
        """Samples (channels, len(t)) at times t."""
        raise NotImplementedError


class _EegGenerator(_Generator):
    """Pink (1/f) background of ~10 uV plus intermittent ~10 Hz alpha bursts, stronger over the back."""

    # Paul Kellet's 3-pole approximation of a 1/f (pink) filter.
    _B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
    _A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])

    def __init__(self, names: tuple[str, ...], rate: float, rng: np.random.Generator) -> None:
        super().__init__(names, rate, rng)
        from scipy import signal

        self._lfilter = signal.lfilter
        impulse = np.zeros(8192)
        impulse[0] = 1.0
        self._pink_scale = 10.0 / float(np.sqrt(np.sum(signal.lfilter(self._B, self._A, impulse) ** 2)))
        zi = signal.lfilter_zi(self._B, self._A)
        self._zi = np.zeros((self.channels, len(zi)))
        # Warm the filters up so the first block has no start-up transient.
        self._pink(int(2 * rate))
        posterior = [n.upper().startswith(("O", "P")) for n in names]
        self._alpha_weight = np.where(posterior, 1.0, 0.5)
        self._alpha_phase = rng.uniform(0, 2 * np.pi, self.channels)
        self._bursts: list[tuple[float, float, float, float]] = []  # start, end, amplitude uV, frequency Hz
        self._next_burst_at: float | None = None

    def _pink(self, n: int) -> np.ndarray:
        """The next n samples of 1/f noise per channel, in uV."""
        white = self.rng.standard_normal((self.channels, n))
        out, self._zi = self._lfilter(self._B, self._A, white, axis=1, zi=self._zi)
        return out * self._pink_scale

    def _schedule(self, t_end: float, t_start: float) -> None:
        """Plans alpha bursts (start, end, amplitude, frequency) up to t_end."""
        if self._next_burst_at is None:
            self._next_burst_at = t_start + self.rng.uniform(0.0, 1.0)
        while self._next_burst_at < t_end:
            start = self._next_burst_at
            end = start + self.rng.uniform(1.0, 3.0)
            self._bursts.append((start, end, self.rng.uniform(10.0, 20.0), self.rng.uniform(9.5, 10.5)))
            self._next_burst_at = end + self.rng.uniform(0.5, 2.0)

    def take(self, t: np.ndarray) -> np.ndarray:
        out = self._pink(len(t))
        if len(t) == 0:
            return out
        self._schedule(float(t[-1]), float(t[0]))
        self._bursts = [b for b in self._bursts if b[1] > t[0]]
        for start, end, amp, freq in self._bursts:
            inside = (t >= start) & (t < end)
            if not inside.any():
                continue
            tt = t[inside]
            # Smooth 0.3 s raised-cosine ramps so bursts wax and wane rather than switch.
            ramp = np.clip(np.minimum(tt - start, end - tt) / 0.3, 0.0, 1.0)
            env = amp * 0.5 * (1.0 - np.cos(np.pi * ramp))
            wave = np.sin(2 * np.pi * freq * tt[None, :] + self._alpha_phase[:, None])
            out[:, inside] += self._alpha_weight[:, None] * env[None, :] * wave
        return out


# Per-lead scaling of the QRS and T waves, cycling for any channel count.
_LEAD_QRS = (1.0, 0.65, -0.45, 0.85, 1.2, 0.4)
_LEAD_T = (1.0, 0.8, -0.3, 0.9, 1.1, 0.5)


class _EcgGenerator(_Generator):
    """PQRST complexes (sums of Gaussians, QT following Bazett) on the shared heart beats, in mV."""

    def __init__(self, names: tuple[str, ...], rate: float, rng: np.random.Generator, heart: _Heart) -> None:
        super().__init__(names, rate, rng)
        self.heart = heart
        c = np.arange(self.channels)
        self._qrs = np.array([_LEAD_QRS[i % len(_LEAD_QRS)] for i in c])[:, None]
        self._t = np.array([_LEAD_T[i % len(_LEAD_T)] for i in c])[:, None]
        self._wander_phase = rng.uniform(0, 2 * np.pi, self.channels)[:, None]

    def take(self, t: np.ndarray) -> np.ndarray:
        out = np.zeros((self.channels, len(t)))
        if len(t) == 0:
            return out
        beats, rrs = self.heart.window(float(t[0]), float(t[-1]))
        p = np.zeros(len(t))
        qrs = np.zeros(len(t))
        tw = np.zeros(len(t))
        for beat, rr in zip(beats, rrs, strict=True):
            d = t - beat
            p += 0.12 * np.exp(-0.5 * ((d + 0.16) / 0.025) ** 2)
            qrs += -0.10 * np.exp(-0.5 * ((d + 0.03) / 0.010) ** 2)
            qrs += 1.10 * np.exp(-0.5 * (d / 0.011) ** 2)
            qrs += -0.25 * np.exp(-0.5 * ((d - 0.035) / 0.012) ** 2)
            tw += 0.30 * np.exp(-0.5 * ((d - 0.27 * math.sqrt(rr)) / 0.06) ** 2)
        out += p[None, :] + self._qrs * qrs[None, :] + self._t * tw[None, :]
        out += 0.04 * np.sin(2 * np.pi * 0.2 * t[None, :] + self._wander_phase)  # baseline wander
        out += 0.01 * self.rng.standard_normal(out.shape)
        return out


class _PpgGenerator(_Generator):
    """A pulse wave (systolic peak and dicrotic wave) ~0.2 s after each heart beat, in a.u."""

    def __init__(self, names: tuple[str, ...], rate: float, rng: np.random.Generator, heart: _Heart) -> None:
        super().__init__(names, rate, rng)
        self.heart = heart
        self._scale = (1.0 + 0.2 * np.arange(self.channels))[:, None]

    def take(self, t: np.ndarray) -> np.ndarray:
        wave = np.zeros(len(t))
        if len(t) == 0:
            return np.zeros((self.channels, 0))
        beats, _ = self.heart.window(float(t[0]), float(t[-1]))
        for beat in beats:
            d = t - beat - 0.2  # pulse transit time
            wave += np.exp(-0.5 * ((d - 0.12) / 0.07) ** 2) + 0.35 * np.exp(-0.5 * ((d - 0.40) / 0.09) ** 2)
        resp = 0.05 * np.sin(2 * np.pi * 0.25 * t)  # respiratory baseline modulation
        out = self._scale * (wave + resp)[None, :]
        return out + 0.01 * self.rng.standard_normal(out.shape)


class _RespGenerator(_Generator):
    """Breathing at ~0.25 Hz whose rate drifts slowly, in a.u."""

    def __init__(self, names: tuple[str, ...], rate: float, rng: np.random.Generator) -> None:
        super().__init__(names, rate, rng)
        self._phase = rng.uniform(0, 2 * np.pi)
        self._drift_phase = rng.uniform(0, 2 * np.pi)
        self._scale = (1.0 - 0.15 * np.arange(self.channels))[:, None]

    def take(self, t: np.ndarray) -> np.ndarray:
        freq = 0.25 + 0.03 * np.sin(2 * np.pi * t / 60.0 + self._drift_phase)
        # Integrate the frequency so the phase stays continuous across blocks.
        phase = self._phase + np.cumsum(2 * np.pi * freq / self.rate)
        if len(t):
            self._phase = float(phase[-1]) % (2 * np.pi)
        wave = np.sin(phase) + 0.15 * np.sin(2 * phase)
        out = self._scale * wave[None, :]
        return out + 0.02 * self.rng.standard_normal(out.shape)


class _AudioGenerator(_Generator):
    """A 440 Hz tone plus white noise, in a.u. of full scale."""

    def __init__(self, names: tuple[str, ...], rate: float, rng: np.random.Generator) -> None:
        super().__init__(names, rate, rng)
        self._phase = rng.uniform(0, 2 * np.pi, self.channels)[:, None]

    def take(self, t: np.ndarray) -> np.ndarray:
        tone = 0.3 * np.sin(2 * np.pi * 440.0 * t[None, :] + self._phase)
        return tone + 0.05 * self.rng.standard_normal((self.channels, len(t)))


class SyntheticSource(Source):
    """Realistic-looking EEG, ECG, PPG, respiration and audio streams, deterministic for a seed.

    `channels` maps a modality to a channel count or names, `rates` to a rate in Hz; `duration_s` None runs
    forever. Timestamps start at `start_time_s` and advance exactly by n / rate.
    """

    def __init__(
        self,
        modalities: Sequence[str] = ("eeg", "ecg", "ppg", "resp", "audio"),
        channels: Mapping[str, int | Sequence[str]] | None = None,
        rates: Mapping[str, float] | None = None,
        duration_s: float | None = None,
        seed: int = 0,
        start_time_s: float = 0.0,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
    ) -> None:
        if block_seconds <= 0:
            raise ValueError("block_seconds must be positive")
        if duration_s is not None and duration_s < 0:
            raise ValueError("duration_s must not be negative")
        keys = [self._key(m) for m in modalities]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"modalities must be distinct and non-empty, from {sorted(_SYNTH_MODALITIES)}")
        channels = {self._key(k): v for k, v in (channels or {}).items()}
        rates = {self._key(k): float(v) for k, v in (rates or {}).items()}
        self.block_seconds = block_seconds
        self.duration_s = duration_s
        self.seed = seed
        self.start_time_s = start_time_s
        self._closed = False
        self._specs: list[StreamSpec] = []
        for key in keys:
            rate = rates.get(key, _SYNTH_RATES[key])
            if not rate > 0:
                raise ValueError(f"{key}: rate must be positive")
            names = _channel_names(key, channels.get(key))
            self._specs.append(
                StreamSpec(
                    stream_id=f"synthetic-{key}",
                    modality=_SYNTH_MODALITIES[key],
                    channel_names=names,
                    channel_units=(_SYNTH_UNITS[key],) * len(names),
                    nominal_rate_hz=rate,
                )
            )
        self._keys = keys

    @staticmethod
    def _key(modality: str) -> str:
        """The canonical modality key ("respiration" -> "resp"); ValueError for unknown ones."""
        key = _SYNTH_ALIASES.get(modality.lower(), modality.lower())
        if key not in _SYNTH_MODALITIES:
            raise ValueError(f"unknown synthetic modality {modality!r}; modalities: {sorted(_SYNTH_MODALITIES)}")
        return key

    def specs(self) -> list[StreamSpec]:
        return list(self._specs)

    def _rng(self, key: str) -> np.random.Generator:
        """A generator seeded by the source seed and a fixed word per modality."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, _SYNTH_SEED_WORD[key]]))

    def _generators(self) -> list[_Generator]:
        """Fresh generators for every stream, ECG and PPG sharing one heart."""
        heart = _Heart(self._rng("heart"), self.start_time_s)
        gens: list[_Generator] = []
        for key, spec in zip(self._keys, self._specs, strict=True):
            args = (spec.channel_names, spec.nominal_rate_hz, self._rng(key))
            if key == "eeg":
                gens.append(_EegGenerator(*args))
            elif key == "ecg":
                gens.append(_EcgGenerator(*args, heart=heart))
            elif key == "ppg":
                gens.append(_PpgGenerator(*args, heart=heart))
            elif key == "resp":
                gens.append(_RespGenerator(*args))
            else:
                gens.append(_AudioGenerator(*args))
        return gens

    def _stream(self, spec: StreamSpec, gen: _Generator) -> Iterator[SampleBlock]:
        """Blocks of one synthetic stream until duration_s (or forever)."""
        rate = spec.nominal_rate_hz
        total = None if self.duration_s is None else round(self.duration_s * rate)
        for lo, hi in _block_edges(total, rate, self.block_seconds):
            if self._closed:
                return
            t = self.start_time_s + np.arange(lo, hi) / rate
            samples = gen.take(t).astype(np.float32)
            yield SampleBlock(spec=spec, first_sample_time_s=self.start_time_s + lo / rate, samples=samples)

    def blocks(self) -> Iterator[SampleBlock]:
        """Fresh, identical blocks on every call (generators restart from the seed)."""
        gens = self._generators()
        return _merge_by_time(self._stream(s, g) for s, g in zip(self._specs, gens, strict=True))

    def close(self) -> None:
        self._closed = True


# --- WFDB --------------------------------------------------------------------------------------------------


def _wfdb_invalid_values(fmts: Sequence[str]) -> list[int | None]:
    """The digital value WFDB uses for a missing sample, per signal format (None when it has none)."""
    try:
        from wfdb.io._signal import _digi_nan

        return [int(v) for v in _digi_nan(list(fmts))]
    except (ImportError, AttributeError, KeyError, TypeError):  # pragma: no cover - other wfdb versions
        bits = {"8": 8, "80": 8, "508": 8, "310": 10, "311": 10, "212": 12, "16": 16, "61": 16, "160": 16,
                "516": 16, "24": 24, "524": 24, "32": 32}  # fmt: skip
        return [-(2 ** (bits[f] - 1)) if f in bits else None for f in fmts]


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, stop) index ranges where `mask` is true."""
    if mask.all():
        return [(0, int(mask.size))] if mask.size else []
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _digital_block(
    spec: StreamSpec,
    t0: float,
    digital: np.ndarray,
    gain: tuple[float, ...],
    offset: tuple[float, ...],
    invalid: np.ndarray | None,
) -> SampleBlock:
    """A block of digital values as int16 with gain/offset, or float32 physical (NaN where invalid).

    float32 is the fallback for blocks with values outside int16 or with missing samples, which int16 cannot
    mark; the choice is per block so one gap does not widen a whole recording.
    """
    missing = invalid is not None and bool(invalid.any())
    fits = digital.size == 0 or (int(digital.min()) >= _INT16_MIN and int(digital.max()) <= _INT16_MAX)
    if fits and not missing:
        return SampleBlock(spec, t0, digital.astype(np.int16), gain=gain, offset=offset)
    physical = digital.astype(np.float64) * np.asarray(gain)[:, None] + np.asarray(offset)[:, None]
    if missing:
        physical[invalid] = np.nan
    return SampleBlock(spec, t0, physical.astype(np.float32))


class WfdbSource(Source):
    """Replays a WFDB record: one stream per (rate, modality), int16 digital samples with gain and offset.

    Multi-frequency records (several samples per frame) give one stream per distinct signal rate. Missing
    samples are left out (a gap in the timestamps); blocks with values beyond int16 fall back to float32.
    `duration_s` replays only the first seconds.
    """

    def __init__(
        self,
        record_path: str | Path,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        start_time_s: float = 0.0,
        duration_s: float | None = None,
    ) -> None:
        with warnings.catch_warnings():
            # wfdb's annotation tables use a pandas call that pandas now deprecates: noise at import.
            warnings.simplefilter("ignore")
            import wfdb

        path = str(record_path)
        if path.endswith(".hea"):
            path = path[:-4]
        self.block_seconds = block_seconds
        self.start_time_s = start_time_s
        self.duration_s = duration_s
        self._closed = False
        # smooth_frames=False keeps every sample of signals recorded at a multiple of the frame rate.
        rec = wfdb.rdrecord(path, physical=False, smooth_frames=False)
        self.record_name = str(rec.record_name)
        n_sig = int(rec.n_sig)
        spf = [int(s or 1) for s in (rec.samps_per_frame or [1] * n_sig)]
        rates = [float(rec.fs) * s for s in spf]
        names = [str(n) for n in rec.sig_name]
        units = [str(u or "") for u in (rec.units or [""] * n_sig)]
        adc_gain = [float(g) for g in rec.adc_gain]
        baseline = [float(b) for b in rec.baseline]
        invalid = _wfdb_invalid_values([str(f) for f in rec.fmt])
        self._signals: list[np.ndarray] = [np.asarray(x) for x in rec.e_d_signal]
        groups = _group_channels(rates, [modality_from_label(n) for n in names])
        ids = _unique_ids([f"{self.record_name}-{modality_name(g.modality)}" for g in groups], [g.rate for g in groups])
        self._streams = []
        for sid, g in zip(ids, groups, strict=True):
            spec = StreamSpec(
                stream_id=sid,
                modality=g.modality,
                channel_names=tuple(names[i] for i in g.indices),
                channel_units=tuple(units[i] for i in g.indices),
                nominal_rate_hz=g.rate,
            )
            # physical = (digital - baseline) / adc_gain, as wfdb computes it.
            gain = tuple(1.0 / adc_gain[i] for i in g.indices)
            offset = tuple(-baseline[i] / adc_gain[i] for i in g.indices)
            self._streams.append((spec, g.indices, gain, offset, [invalid[i] for i in g.indices]))
        log.info(
            "wfdb record opened",
            extra={"fields": {"streams": len(self._streams), "signals": n_sig, "frames": int(rec.sig_len)}},
        )

    def specs(self) -> list[StreamSpec]:
        return [s[0] for s in self._streams]

    def _stream(
        self,
        spec: StreamSpec,
        indices: list[int],
        gain: tuple[float, ...],
        offset: tuple[float, ...],
        invalid: list[int | None],
    ) -> Iterator[SampleBlock]:
        """Blocks of one WFDB stream, int16 where the block allows it."""
        data = np.stack([self._signals[i] for i in indices])
        nan_values = np.array([np.iinfo(np.int64).min if v is None else v for v in invalid])[:, None]
        rate = spec.nominal_rate_hz
        for lo, hi in _block_edges(_limit(data.shape[1], rate, self.duration_s), rate, self.block_seconds):
            if self._closed:
                return
            part = data[:, lo:hi]
            # Missing samples are left out, not sent as NaN (which ingest rejects): the next block starts
            # later, so the gap shows in the timestamps, where fusion looks for gaps.
            valid = ~(part == nan_values).any(axis=0)
            for run_lo, run_hi in _true_runs(valid):
                yield _digital_block(
                    spec, self.start_time_s + (lo + run_lo) / rate, part[:, run_lo:run_hi], gain, offset, None
                )

    def blocks(self) -> Iterator[SampleBlock]:
        return _merge_by_time(self._stream(*s) for s in self._streams)

    def close(self) -> None:
        self._closed = True


# --- EDF / BDF ---------------------------------------------------------------------------------------------


class EdfSource(Source):
    """Replays an EDF(+) or BDF(+) file: one stream per (rate, modality) of its signals.

    EDF gives int16 digital values with gain/offset from the physical and digital ranges; BDF (24-bit) gives
    float32 physical values. Timestamps start at `start_time_s`; EDF+D gaps are not honoured.
    """

    # Blocks read per pyedflib call, to keep per-call overhead low without loading whole files.
    _WINDOW_BLOCKS = 64

    def __init__(
        self,
        path: str | Path,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        start_time_s: float = 0.0,
        duration_s: float | None = None,
    ) -> None:
        import pyedflib

        self.block_seconds = block_seconds
        self.start_time_s = start_time_s
        self.duration_s = duration_s
        self._lock = threading.Lock()
        self._closed = False
        self._reader = pyedflib.EdfReader(str(path))
        reader = self._reader
        self.is_bdf = reader.filetype in (pyedflib.FILETYPE_BDF, pyedflib.FILETYPE_BDFPLUS)
        n = int(reader.signals_in_file)
        labels = [str(reader.getLabel(i)).strip() for i in range(n)]
        rates = [float(reader.getSampleFrequency(i)) for i in range(n)]
        self._lengths = [int(x) for x in reader.getNSamples()]
        groups = _group_channels(rates, [modality_from_label(lb) for lb in labels])
        stem = Path(path).stem
        ids = _unique_ids([f"{stem}-{modality_name(g.modality)}" for g in groups], [g.rate for g in groups])
        self._streams: list[tuple[StreamSpec, list[int], tuple[float, ...], tuple[float, ...]]] = []
        for sid, g in zip(ids, groups, strict=True):
            spec = StreamSpec(
                stream_id=sid,
                modality=g.modality,
                channel_names=tuple(labels[i] for i in g.indices),
                channel_units=tuple(str(reader.getPhysicalDimension(i)).strip() for i in g.indices),
                nominal_rate_hz=g.rate,
            )
            gains, offsets = [], []
            for i in g.indices:
                pmin, pmax = reader.getPhysicalMinimum(i), reader.getPhysicalMaximum(i)
                dmin, dmax = reader.getDigitalMinimum(i), reader.getDigitalMaximum(i)
                gain = (pmax - pmin) / (dmax - dmin)
                gains.append(float(gain))
                # The form edflib uses (bitvalue * (offset + digital)), so values match its readback.
                offsets.append(float(gain * (pmax / gain - dmax)))
            self._streams.append((spec, g.indices, tuple(gains), tuple(offsets)))
        log.info("edf file opened", extra={"fields": {"streams": len(self._streams), "signals": n, "bdf": self.is_bdf}})

    def specs(self) -> list[StreamSpec]:
        return [s[0] for s in self._streams]

    def _read(self, indices: list[int], start: int, count: int) -> np.ndarray:
        """Digital (EDF) or physical (BDF) samples of the given signals, shape (channels, count)."""
        with self._lock:
            if self._closed:
                raise EOFError
            rows = [self._reader.readSignal(i, start, count, digital=not self.is_bdf) for i in indices]
        return np.stack(rows)

    def _stream(
        self, spec: StreamSpec, indices: list[int], gain: tuple[float, ...], offset: tuple[float, ...]
    ) -> Iterator[SampleBlock]:
        """Blocks of one EDF/BDF stream, read a window of blocks at a time."""
        rate = spec.nominal_rate_hz
        total = _limit(min(self._lengths[i] for i in indices), rate, self.duration_s)
        window: np.ndarray | None = None
        w_lo = w_hi = 0
        for lo, hi in _block_edges(total, rate, self.block_seconds):
            if hi > w_hi:
                w_lo = lo
                w_hi = min(total, lo + max(hi - lo, round(rate * self.block_seconds)) * self._WINDOW_BLOCKS)
                try:
                    window = self._read(indices, w_lo, w_hi - w_lo)
                except EOFError:
                    return
            assert window is not None
            part = window[:, lo - w_lo : hi - w_lo]
            t0 = self.start_time_s + lo / rate
            if self.is_bdf:
                yield SampleBlock(spec, t0, part.astype(np.float32))
            else:
                yield _digital_block(spec, t0, part, gain, offset, None)

    def blocks(self) -> Iterator[SampleBlock]:
        return _merge_by_time(self._stream(*s) for s in self._streams)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._reader.close()


# --- XDF ---------------------------------------------------------------------------------------------------


def _xdf_first(info: Mapping[str, Any], key: str, default: str = "") -> str:
    """The first value of an XDF header field (pyxdf stores every field as a list)."""
    value = info.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else str(value)


def _xdf_channels(info: Mapping[str, Any], count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Channel labels and units from an XDF stream's desc/channels, else ch0.. and no units."""
    names = [f"ch{i}" for i in range(count)]
    units = [""] * count
    try:
        desc = info["desc"][0]
        channels = desc["channels"][0]["channel"]
    except (KeyError, IndexError, TypeError):
        return tuple(names), tuple(units)
    if len(channels) == count:
        for i, ch in enumerate(channels):
            names[i] = _xdf_first(ch, "label") or _xdf_first(ch, "name") or names[i]
            units[i] = _xdf_first(ch, "unit")
    return tuple(names), tuple(units)


class _ClockOffsets:
    """Interpolates an XDF stream's recorded clock offsets, one monotonic run at a time (clock resets)."""

    def __init__(self, times: Sequence[float], values: Sequence[float]) -> None:
        t = np.asarray(times, dtype=np.float64)
        v = np.asarray(values, dtype=np.float64)
        breaks = np.flatnonzero(np.diff(t) <= 0) + 1
        self._runs = [(tt, vv) for tt, vv in zip(np.split(t, breaks), np.split(v, breaks), strict=True) if len(tt)]

    def at(self, when: float) -> float:
        """The offset at `when`, from the run whose time range is nearest to it; 0 without measurements."""
        if not self._runs:
            return 0.0
        times, values = min(self._runs, key=lambda r: max(r[0][0] - when, when - r[0][-1], 0.0))
        return float(np.interp(when, times, values))


class XdfSource(Source):
    """Replays the regular-rate numeric streams of an XDF file, each on its own raw (unsynchronised) clock.

    Blocks start a new block at clock resets and gaps, so each block's first timestamp describes it;
    clock_offset_s is the stream's recorded LSL clock offset interpolated at that time. Marker, string and
    empty streams are skipped and logged.
    """

    def __init__(
        self,
        path: str | Path,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        gap_s: float = 1.0,
        duration_s: float | None = None,
    ) -> None:
        import pyxdf

        self.block_seconds = block_seconds
        self.gap_s = gap_s
        self.duration_s = duration_s
        self._closed = False
        streams, _ = pyxdf.load_xdf(
            str(path), synchronize_clocks=False, dejitter_timestamps=False, handle_clock_resets=False
        )
        kept: list[tuple[dict[str, Any], float, str]] = []
        for index, stream in enumerate(streams):
            info = stream["info"]
            stype = _xdf_first(info, "type")
            fmt = _xdf_first(info, "channel_format")
            try:
                rate = float(_xdf_first(info, "nominal_srate", "0"))
            except ValueError:
                rate = 0.0
            series = stream.get("time_series")
            reason = ""
            if rate <= 0:
                reason = "irregular_rate"
            elif fmt == "string" or not isinstance(series, np.ndarray):
                reason = "string_format"
            elif len(stream.get("time_stamps", ())) == 0:
                reason = "no_samples"
            if reason:
                log.info(
                    "xdf stream skipped",
                    extra={"fields": {"stream_index": index, "stream_type": stype, "reason": reason}},
                )
                continue
            kept.append((stream, rate, _xdf_first(info, "name", f"stream{index}") or f"stream{index}"))
        ids = _unique_ids([name for _, _, name in kept], [rate for _, rate, _ in kept])
        self._streams: list[tuple[StreamSpec, np.ndarray, np.ndarray, _ClockOffsets]] = []
        for sid, (stream, rate, _) in zip(ids, kept, strict=True):
            info = stream["info"]
            stamps = np.asarray(stream["time_stamps"], dtype=np.float64)
            series = np.asarray(stream["time_series"]).reshape(len(stamps), -1)
            names, units = _xdf_channels(info, series.shape[1])
            spec = StreamSpec(
                stream_id=sid,
                modality=modality_from_label(_xdf_first(info, "type")),
                channel_names=names,
                channel_units=units,
                nominal_rate_hz=rate,
            )
            clock = _ClockOffsets(stream.get("clock_times", []), stream.get("clock_values", []))
            self._streams.append((spec, stamps, series, clock))
        log.info(
            "xdf file opened", extra={"fields": {"streams": len(self._streams), "skipped": len(streams) - len(kept)}}
        )

    def specs(self) -> list[StreamSpec]:
        return [s[0] for s in self._streams]

    def _segments(self, stamps: np.ndarray, rate: float) -> list[tuple[int, int]]:
        """Index ranges without clock resets (time going back) or gaps longer than gap_s."""
        d = np.diff(stamps)
        cuts = np.flatnonzero((d < 0) | (d > max(self.gap_s, 2.0 / rate))) + 1
        edges = [0, *cuts.tolist(), len(stamps)]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def _stream(
        self, spec: StreamSpec, stamps: np.ndarray, series: np.ndarray, clock: _ClockOffsets
    ) -> Iterator[SampleBlock]:
        """Blocks of one XDF stream, each starting at a raw timestamp and never spanning a reset or gap."""
        rate = spec.nominal_rate_hz
        # duration_s counts samples, as timestamps may jump at clock resets.
        limit = _limit(len(stamps), rate, self.duration_s)
        for seg_lo, seg_hi in self._segments(stamps[:limit], rate):
            for lo, hi in _block_edges(seg_hi - seg_lo, rate, self.block_seconds):
                if self._closed:
                    return
                part = series[seg_lo + lo : seg_lo + hi].T
                t0 = float(stamps[seg_lo + lo])
                if part.dtype == np.int16:
                    ones = (1.0,) * spec.channel_count
                    zeros = (0.0,) * spec.channel_count
                    block = SampleBlock(spec, t0, np.ascontiguousarray(part), clock.at(t0), ones, zeros)
                else:
                    block = SampleBlock(spec, t0, np.ascontiguousarray(part, dtype=np.float32), clock.at(t0))
                yield block

    def blocks(self) -> Iterator[SampleBlock]:
        return _merge_by_time(self._stream(*s) for s in self._streams)

    def close(self) -> None:
        self._closed = True


# --- LSL ---------------------------------------------------------------------------------------------------


class LslSource(Source):
    """Receives one regular-rate LSL stream found by name or type.

    Blocks carry the LSL timestamp of their first sample and the inlet's time_correction() as clock offset,
    refreshed every `correction_interval_s`. Ends when `close()` is called or after `duration_s`.
    """

    live = True

    def __init__(
        self,
        name: str | None = None,
        type: str | None = None,  # the LSL property's name
        timeout_s: float = 5.0,
        duration_s: float | None = None,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        correction_interval_s: float = 5.0,
        stream_id: str | None = None,
    ) -> None:
        import pylsl

        if (name is None) == (type is None):
            raise ValueError("give exactly one of name or type")
        prop, value = ("name", name) if name is not None else ("type", type)
        found = pylsl.resolve_byprop(prop, value, 1, timeout_s)
        if not found:
            raise LookupError(f"no LSL stream with {prop}={value!r} found within {timeout_s} s")
        info = found[0]
        rate = float(info.nominal_srate())
        if rate <= 0:
            raise ValueError(
                f"LSL stream with {prop}={value!r} has an irregular rate; only regular streams are samples"
            )
        if info.channel_format() in (pylsl.cf_string, pylsl.cf_undefined):
            raise ValueError(f"LSL stream with {prop}={value!r} carries strings, not samples")
        self.block_seconds = block_seconds
        self.duration_s = duration_s
        self.timeout_s = timeout_s
        self.correction_interval_s = correction_interval_s
        self._int16 = info.channel_format() == pylsl.cf_int16
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._inlet: Any = pylsl.StreamInlet(info, max_buflen=60, recover=True)
        # Subscribe now, so samples pushed from here on are kept for the first pull.
        self._inlet.open_stream(timeout=timeout_s)
        full = self._inlet.info(timeout=timeout_s)
        count = int(full.channel_count())
        labels = full.get_channel_labels() or []
        units = full.get_channel_units() or []
        names = tuple((labels[i] if i < len(labels) and labels[i] else f"ch{i}") for i in range(count))
        unit_t = tuple((units[i] if i < len(units) and units[i] else "") for i in range(count))
        self._spec = StreamSpec(
            stream_id=stream_id or _unique_ids([str(full.name()) or "lsl"], [rate])[0],
            modality=modality_from_label(str(full.type())),
            channel_names=names,
            channel_units=unit_t,
            nominal_rate_hz=rate,
        )
        log.info(
            "lsl stream opened",
            extra={"fields": {"stream_type": str(full.type()), "channels": count, "rate_hz": rate}},
        )

    def specs(self) -> list[StreamSpec]:
        return [self._spec]

    def _correction(self, previous: float) -> float:
        """The inlet's current clock offset, or `previous` when LSL cannot tell."""
        try:
            with self._lock:
                if self._inlet is None:
                    return previous
                return float(self._inlet.time_correction(timeout=self.timeout_s))
        except Exception:  # liblsl raises its own timeout / lost errors: keep the last value
            log.debug("lsl time_correction failed", exc_info=True)
            return previous

    def blocks(self) -> Iterator[SampleBlock]:
        spec = self._spec
        per_block = max(1, round(spec.nominal_rate_hz * self.block_seconds))
        dtype = np.int16 if self._int16 else np.float32
        ones, zeros = (1.0,) * spec.channel_count, (0.0,) * spec.channel_count
        began = time.monotonic()
        offset = self._correction(0.0)
        corrected_at = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self.duration_s is not None and now - began >= self.duration_s:
                    return
                if now - corrected_at >= self.correction_interval_s:
                    offset = self._correction(offset)
                    corrected_at = now
                with self._lock:
                    if self._inlet is None:
                        return
                    # A short timeout so close() and duration_s are noticed within a fraction of a second.
                    samples, stamps = self._inlet.pull_chunk(
                        timeout=min(self.block_seconds, 0.1), max_samples=per_block
                    )
                if not stamps:
                    continue
                data = np.asarray(samples, dtype=dtype).reshape(len(stamps), -1).T
                if self._int16:
                    yield SampleBlock(spec, float(stamps[0]), np.ascontiguousarray(data), offset, ones, zeros)
                else:
                    yield SampleBlock(spec, float(stamps[0]), np.ascontiguousarray(data), offset)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._inlet is not None:
                self._inlet.close_stream()
                self._inlet = None


# --- BrainFlow ---------------------------------------------------------------------------------------------

# (group, BoardShim channel getter, modality, unit) in the order rows are claimed.
_BRAINFLOW_GROUPS = (
    ("eeg", "get_eeg_channels", signal_pb2.MODALITY_EEG, "uV"),
    ("ecg", "get_ecg_channels", signal_pb2.MODALITY_ECG, "uV"),
    ("ppg", "get_ppg_channels", signal_pb2.MODALITY_PPG, "a.u."),
    ("eda", "get_eda_channels", signal_pb2.MODALITY_EDA, "uS"),
    ("accel", "get_accel_channels", signal_pb2.MODALITY_MOTION, "g"),
    ("gyro", "get_gyro_channels", signal_pb2.MODALITY_MOTION, "deg/s"),
)


def _board_shim() -> Any:
    """brainflow.board_shim with its library loaded and its logger off.

    The library loads on first use through a pkg_resources fallback that warns; the warning is noise here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from brainflow import board_shim

        # Off, or BrainFlow writes its own lines to stderr.
        board_shim.BoardShim.disable_board_logger()
    return board_shim


def brainflow_board_id(board: int | str) -> int:
    """A BrainFlow board id from a number, a BoardIds member or a name like "synthetic" or "CYTON_BOARD"."""
    BoardIds = _board_shim().BoardIds

    if isinstance(board, int):
        return int(board)
    text = str(board).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    key = text.upper().replace("-", "_")
    for candidate in (key, f"{key}_BOARD"):
        if candidate in BoardIds.__members__:
            return int(BoardIds[candidate].value)
    raise ValueError(f"unknown BrainFlow board {board!r}")


class BrainFlowSource(Source):
    """Streams a BrainFlow board (the synthetic board by default): one stream per channel group.

    Rows a board lists in several groups (the synthetic board reuses its EXG rows) go to the first group only.
    Timestamps come from the board's timestamp row. The session opens when `blocks()` starts and is always
    stopped and released in `close()`.
    """

    live = True

    def __init__(
        self,
        board_id: int | str = -1,
        serial_port: str = "",
        duration_s: float | None = None,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        stream_prefix: str = "brainflow",
    ) -> None:
        shim = _board_shim()
        BoardShim, BrainFlowError = shim.BoardShim, shim.BrainFlowError
        self.board_id = brainflow_board_id(board_id)
        self.serial_port = serial_port
        self.duration_s = duration_s
        self.block_seconds = block_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._board: Any = None
        self._rate = float(BoardShim.get_sampling_rate(self.board_id))
        self._ts_row = int(BoardShim.get_timestamp_channel(self.board_id))
        try:
            eeg_names = list(BoardShim.get_eeg_names(self.board_id))
        except BrainFlowError:
            eeg_names = []
        claimed: set[int] = set()
        self._streams: list[tuple[StreamSpec, list[int]]] = []
        for group, getter, modality, unit in _BRAINFLOW_GROUPS:
            try:
                rows = [int(r) for r in getattr(BoardShim, getter)(self.board_id)]
            except BrainFlowError:
                rows = []  # the board has no such channels
            fresh = [r for r in rows if r not in claimed]
            if not fresh:
                continue
            claimed.update(fresh)
            if group == "eeg" and len(eeg_names) == len(fresh):
                names = tuple(eeg_names)
            else:
                names = tuple(f"{group}{i}" for i in range(len(fresh)))
            spec = StreamSpec(f"{stream_prefix}-{group}", modality, names, (unit,) * len(names), self._rate)
            self._streams.append((spec, fresh))

    def specs(self) -> list[StreamSpec]:
        return [s[0] for s in self._streams]

    def _open(self) -> None:
        """Prepares the board session and starts streaming into its ring buffer."""
        shim = _board_shim()
        params = shim.BrainFlowInputParams()
        params.serial_port = self.serial_port
        board = shim.BoardShim(self.board_id, params)
        board.prepare_session()
        # Held from here on, so a failing start_stream is still released.
        self._board = board
        board.start_stream(max(45000, int(self._rate * 60)))

    def _release(self) -> None:
        """Stops and releases the session once, whoever calls first (close() or the ending generator)."""
        with self._lock:
            board, self._board = self._board, None
        if board is None:
            return
        try:
            board.stop_stream()
        except Exception:  # the stream may not have started; release must still run
            log.debug("brainflow stop_stream failed", exc_info=True)
        finally:
            board.release_session()

    def blocks(self) -> Iterator[SampleBlock]:
        per_block = max(1, round(self._rate * self.block_seconds))
        try:
            with self._lock:
                if self._stop.is_set():
                    return
                self._open()
            began = time.monotonic()
            while not self._stop.is_set():
                if self.duration_s is not None and time.monotonic() - began >= self.duration_s:
                    return
                # Wait one block period (or until close()) for the board to deliver.
                if self._stop.wait(self.block_seconds):
                    return
                with self._lock:
                    if self._board is None:
                        return
                    data = self._board.get_board_data()
                stamps = data[self._ts_row]
                for lo in range(0, data.shape[1], per_block):
                    hi = min(lo + per_block, data.shape[1])
                    for spec, rows in self._streams:
                        samples = np.ascontiguousarray(data[rows, lo:hi], dtype=np.float32)
                        yield SampleBlock(spec, float(stamps[lo]), samples)
        finally:
            self._release()

    def close(self) -> None:
        self._stop.set()
        self._release()


# --- session recordings ------------------------------------------------------------------------------------


class RecordingSource(Source):
    """Replays a session recorded by `clisonix record` (Parquet): one block per recorded chunk.

    Each block packs back (`to_chunk`) into the recorded chunk's stream, layout, timestamps, clock offset,
    sample format, gain, offset and sample bytes, unchanged. Streams are yielded in time order, each in its
    recorded sequence order. `duration_s` keeps each stream's chunks while less than that much of it was
    replayed (whole chunks). Chunks are replayed as they were recorded, so a block size cannot be chosen.
    """

    def __init__(self, path: str | Path, duration_s: float | None = None, block_seconds: float | None = None) -> None:
        from services.recording import read_recording, spec_of, stream_chunks

        if block_seconds is not None:
            raise ValueError("a recording replays its chunks as they were recorded: block_seconds does not apply")
        recording = read_recording(path)
        self.session = recording.session
        self.duration_s = duration_s
        self._closed = False
        self._streams = [(spec_of(chunks[0]), chunks) for chunks in stream_chunks(recording)]
        durations = [c.sample_count / c.nominal_rate_hz for _, chunks in self._streams for c in chunks]
        if durations:
            self.block_seconds = float(np.median(durations))

    def specs(self) -> list[StreamSpec]:
        return [spec for spec, _ in self._streams]

    def _stream(self, spec: StreamSpec, chunks: list[signal_pb2.SignalChunk]) -> Iterator[SampleBlock]:
        from services.recording import block_of

        elapsed = 0.0
        for chunk in chunks:
            if self._closed or (self.duration_s is not None and elapsed >= self.duration_s):
                return
            block = block_of(chunk, spec)
            elapsed += block.duration_s
            yield block

    def blocks(self) -> Iterator[SampleBlock]:
        return _merge_by_time(self._stream(spec, chunks) for spec, chunks in self._streams)

    def close(self) -> None:
        self._closed = True


# --- factory -----------------------------------------------------------------------------------------------


def parse_synthetic(text: str) -> tuple[tuple[str, ...], dict[str, int], dict[str, float]]:
    """Parses "eeg=32@1000,ecg@500,ppg": modalities, each with an optional channel count and rate in Hz."""
    modalities: list[str] = []
    channels: dict[str, int] = {}
    rates: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        head, at, rate = item.partition("@")
        name, eq, count = head.partition("=")
        name = name.strip()
        try:
            if eq:
                channels[name] = int(count)
            if at:
                rates[name] = float(rate)
        except ValueError:
            raise ValueError(f"synthetic stream {item!r}: write MODALITY[=CHANNELS][@RATE], e.g. eeg=32@1000") from None
        if eq and channels[name] <= 0:
            raise ValueError(f"synthetic stream {item!r}: the channel count must be positive")
        modalities.append(name)
    return tuple(modalities), channels, rates


def open_source(spec: str, **options: Any) -> Source:
    """Opens a source from "KIND[:PATH]": synthetic[:eeg=32@1000,ecg@500,...], wfdb:RECORD, edf:FILE,
    bdf:FILE, xdf:FILE, lsl:name=X | lsl:type=EEG | lsl:NAME, brainflow[:BOARD], recording:FILE.parquet.
    Options go to the source.
    """
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; kinds: {', '.join(SOURCE_KINDS)}")
    if kind == "synthetic":
        if path:
            modalities, channels, rates = parse_synthetic(path)
            options.setdefault("modalities", modalities)
            options.setdefault("channels", channels)
            options.setdefault("rates", rates)
        return SyntheticSource(**options)
    if kind == "brainflow":
        if path:
            options.setdefault("board_id", brainflow_board_id(path))
        return BrainFlowSource(**options)
    if not path:
        raise ValueError(f"source kind {kind!r} needs a path or name: {kind}:PATH")
    if kind == "wfdb":
        return WfdbSource(path, **options)
    if kind in ("edf", "bdf"):
        return EdfSource(path, **options)
    if kind == "xdf":
        return XdfSource(path, **options)
    if kind == "recording":
        return RecordingSource(path, **options)
    key, eq, value = path.partition("=")
    if eq and key.strip().lower() == "type":
        return LslSource(type=value.strip(), **options)
    return LslSource(name=value.strip() if eq and key.strip().lower() == "name" else path, **options)
