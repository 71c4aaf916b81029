"""Features of one stream within a fused window: EEG band powers, R-peaks and heart rate, pulse peaks and pulse
rate, respiration rate, tonic skin conductance, audio level and spectral centroid, motion intensity.

Pure: numpy and scipy, no I/O. Fusion hands each stream over resampled onto a uniform grid, with
CONTEXT_SECONDS[modality] of signal before the window (NaN where the stream had no data), and gets a
StreamFeatures message back. The same input always gives the same message bytes.

The beat detectors follow neurokit2's published algorithms (ecg_findpeaks method "neurokit", ppg_findpeaks method
"elgendi", Elgendi et al. 2013) re-written on whole arrays: neurokit2's versions loop in Python over every complex,
its ECG one looks for positive R waves only (it missed the one inverted ventricular beat of MIT-BIH record 100),
its PPG one raises IndexError on a signal without pulses, and importing it pulls in pandas and matplotlib.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import numpy as np
from scipy import ndimage, signal

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.fusion.filters import sosfilt_in_place, steady_state

# The compiled kernel behind scipy.ndimage.uniform_filter1d. Its public wrapper checks, converts and copies its
# arguments on every call, which costs several times the filtering itself on window-length signals. Same
# kernel, same results (tests check it against the public function); the public function where a scipy release
# lays it out differently. (The sosfilt kernel is used the same way, through filters.sosfilt_in_place.)
try:
    from scipy.ndimage._nd_image import uniform_filter1d as _uniform_filter1d_kernel
except ImportError:  # pragma: no cover - depends on the scipy release
    _uniform_filter1d_kernel = None

# Seconds of signal before the window start that each modality's features need; modalities not listed need none.
# ECG: the QRS threshold averages 0.75 s and a few beats give the RR median. PPG: the 0.5 Hz band-pass settles and
# pulses are slower. Respiration: at least two breaths even at 6 per minute. EDA: the tonic low-pass sees the
# slow trend rather than one skin conductance response.
CONTEXT_SECONDS: dict[int, float] = {
    signal_pb2.MODALITY_EEG: 0.0,
    signal_pb2.MODALITY_ECG: 4.0,
    signal_pb2.MODALITY_PPG: 6.0,
    signal_pb2.MODALITY_RESPIRATION: 20.0,
    signal_pb2.MODALITY_EDA: 8.0,
    signal_pb2.MODALITY_AUDIO: 0.0,
    signal_pb2.MODALITY_MOTION: 0.0,
}

# EEG bands in Hz, [low, high).
EEG_BANDS: tuple[tuple[str, float, float], ...] = (
    ("delta", 1.0, 4.0),
    ("theta", 4.0, 8.0),
    ("alpha", 8.0, 13.0),
    ("beta", 13.0, 30.0),
    ("gamma", 30.0, 45.0),
)

# Window-level features (EEG, EDA, audio, motion) are computed only when at least this fraction of the window's
# samples are valid, respiration only when this fraction of its whole span is; smaller gaps are bridged linearly.
MIN_VALID_FRACTION = 0.5

# Beats closer than this to a missing sample are dropped: interpolation across a gap can make a step that looks
# like a QRS or a pulse upstroke.
_GAP_GUARD_S = 0.05
# Radius of the search for the extremum of a detected beat. Consecutive windows see (nearly: each window's filters
# start from rest in its warm-up) the same samples around a beat, so they place it at the same time whatever the
# detector's threshold did at their edges; that is what keeps each beat in exactly one window.
_ECG_REFINE_S = 0.05
_PPG_REFINE_S = 0.08
# Shortest accepted interval between beats: 240 per minute, room for ventricular tachycardia.
_MIN_BEAT_INTERVAL_S = 0.25


@dataclass(frozen=True)
class FeatureInput:
    """One stream of one window on a uniform grid, with context before the window.

    `samples` is (channels, n) float64; NaN where the stream had no data. Sample i is at start_s + i / rate_hz on
    the session clock, and the last one ends at window_end_s. Beats (R-peaks, pulse peaks) are reported only when
    their time is in [report_from_s, report_to_s), so that consecutive windows report every beat once.
    """

    modality: int  # a signal_pb2.Modality value
    channel_names: tuple[str, ...]
    samples: np.ndarray
    rate_hz: float
    start_s: float
    window_start_s: float
    window_end_s: float
    report_from_s: float
    report_to_s: float


def stream_features(data: FeatureInput) -> fusion_pb2.StreamFeatures:
    """The features of one stream for one window; an empty message for modalities without features.

    Never raises on short, flat or missing data: features that cannot be determined are left unset (optional
    fields) or empty (lists); EEG channels with under MIN_VALID_FRACTION valid samples are left out; for audio
    and motion, whose features are plain numbers, the whole kind is left unset; and with no samples at all (or
    no rate) the message is empty.
    """
    compute = _BY_MODALITY.get(data.modality)
    samples = np.asarray(data.samples, dtype=np.float64)
    if samples.ndim == 1:
        samples = samples[None, :]
    if compute is None or samples.ndim != 2 or 0 in samples.shape or not data.rate_hz > 0:
        return fusion_pb2.StreamFeatures()
    # Most windows are complete: checked once here, they skip every step that looks for or bridges gaps (and
    # the samples are not copied: nothing below writes to them).
    finite = np.isfinite(samples)
    gaps = not finite.all()
    if gaps:
        # inf is as useless as NaN to every feature below.
        samples = np.where(finite, samples, np.nan)
    return compute(data, samples, gaps)


# --- per modality ------------------------------------------------------------------------------------------
# Each takes the samples (NaN where missing, none of them NaN when `gaps` is False) and fills its kind of the
# message in place: building the nested message and copying it into the outer one costs more than filling it.


def _eeg(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    window = samples[:, _window_index(data, samples.shape[1]) :]
    features = fusion_pb2.StreamFeatures()
    eeg = features.eeg
    eeg.SetInParent()
    rate = data.rate_hz
    n = window.shape[1]
    # Below a quarter second (or 8 samples) no band is resolved.
    if n < max(8, round(0.25 * rate)):
        return features
    channels: Sequence[int] = range(window.shape[0])
    if gaps and np.isnan(window).any():
        usable = np.ones(window.shape[0], dtype=bool)
        window = window.copy()
        for gappy in np.flatnonzero(np.isnan(window).any(axis=1)):
            filled = _filled(window[gappy], min_valid=MIN_VALID_FRACTION * n)
            usable[gappy] = filled is not None
            window[gappy] = filled[0] if filled is not None else 0.0
        channels = np.flatnonzero(usable).tolist()
    # One-second Hann segments, half overlapping: 1 Hz resolution, three segments in a 2 s window.
    powers = _band_powers(window, rate, min(n, max(8, round(rate)))).tolist()
    names = _channel_names(tuple(data.channel_names), window.shape[0])
    add = eeg.channels.add
    for channel in channels:
        delta, theta, alpha, beta, gamma = powers[channel]
        add(channel=names[channel], delta=delta, theta=theta, alpha=alpha, beta=beta, gamma=gamma)
    return features


def _ecg(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    features = fusion_pb2.StreamFeatures()
    ecg = features.ecg
    ecg.SetInParent()
    channel = _beat_channel(samples, gaps)
    if channel is not None:
        values, valid = channel
        # QRS complexes are found, and R-peaks placed, on |x - median|: upright and inverted beats alike. The
        # median is of the valid samples, which are all the samples (the same array) unless there are gaps.
        deviation = np.abs(values - _median(values))
        candidates = _qrs_peaks(values, data.rate_hz, deviation)
        shape = deviation if valid is None else np.abs(values - _median(values[valid]))
        reported, intervals = _beat_times(data, shape, candidates, valid, _ECG_REFINE_S)
        ecg.r_peak_times_s.extend(reported)
        ecg.rr_intervals_s.extend(intervals)
        if intervals:
            ecg.heart_rate_bpm = 60.0 / _median_of(intervals)
    return features


def _ppg(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    features = fusion_pb2.StreamFeatures()
    ppg = features.ppg
    ppg.SetInParent()
    channel = _beat_channel(samples, gaps)
    if channel is not None:
        values, valid = channel
        candidates = _systolic_peaks(values, data.rate_hz)
        reported, intervals = _beat_times(data, values, candidates, valid, _PPG_REFINE_S)
        ppg.pulse_peak_times_s.extend(reported)
        if intervals:
            ppg.pulse_rate_bpm = 60.0 / _median_of(intervals)
    return features


def _respiration(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    respiration = fusion_pb2.RespirationFeatures()
    x = samples[_best_channel(samples) if gaps else 0]
    filled = _filled(x, min_valid=MIN_VALID_FRACTION * x.size)
    if filled is not None:
        rate_bpm = _breaths_per_minute(filled[0], data.rate_hz)
        if rate_bpm is not None:
            respiration.respiration_rate_bpm = rate_bpm
    return fusion_pb2.StreamFeatures(respiration=respiration)


def _eda(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    eda = fusion_pb2.EdaFeatures()
    x = samples[_best_channel(samples) if gaps else 0]
    start = _window_index(data, x.size)
    valid = ~np.isnan(x)
    filled = _filled(x, min_valid=2)
    if filled is not None and valid[start:].sum() >= max(1.0, MIN_VALID_FRACTION * (x.size - start)):
        # The tonic level is the slow part below 0.05 Hz (neurokit2's and Biopac's split into tonic and
        # phasic); zero-phase, so it is not delayed against the window.
        tonic = _zero_phase(filled[0], _lowpass_sos(data.rate_hz, 0.05), data.rate_hz)
        eda.tonic_level = float(np.median(tonic[start:][valid[start:]]))
    return fusion_pb2.StreamFeatures(eda=eda)


def _audio(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    window = samples[:, _window_index(data, samples.shape[1]) :]
    valid = ~np.isnan(window)
    if window.shape[1] < 2 or valid.sum() < max(2.0, MIN_VALID_FRACTION * window.size):
        return fusion_pb2.StreamFeatures()
    rms = float(np.sqrt(np.mean(np.square(window[valid]))))
    # Missing samples count as silence in the spectrum; the DC bin is left out so an offset does not pull the
    # centroid towards 0 Hz.
    zeroed = np.where(valid, window, 0.0)
    means = zeroed.sum(axis=1, keepdims=True) / np.maximum(valid.sum(axis=1, keepdims=True), 1)
    centred = np.where(valid, zeroed - means, 0.0)
    magnitude = np.abs(np.fft.rfft(centred * _hann(window.shape[1]), axis=1)).sum(axis=0)[1:]
    freqs = np.fft.rfftfreq(window.shape[1], d=1.0 / data.rate_hz)[1:]
    total = float(magnitude.sum())
    centroid = float(freqs @ magnitude) / total if total > 0 else 0.0
    return fusion_pb2.StreamFeatures(audio=fusion_pb2.AudioFeatures(rms=rms, spectral_centroid_hz=centroid))


def _motion(data: FeatureInput, samples: np.ndarray, gaps: bool) -> fusion_pb2.StreamFeatures:
    window = samples[:, _window_index(data, samples.shape[1]) :]
    complete = ~np.isnan(window).any(axis=0)
    if complete.sum() < max(2.0, MIN_VALID_FRACTION * window.shape[1]):
        return fusion_pb2.StreamFeatures()
    magnitude = np.sqrt(np.sum(np.square(window[:, complete]), axis=0))
    magnitude_rms = float(np.sqrt(np.mean(np.square(magnitude - magnitude.mean()))))
    return fusion_pb2.StreamFeatures(motion=fusion_pb2.MotionFeatures(magnitude_rms=magnitude_rms))


_BY_MODALITY: dict[int, Callable[[FeatureInput, np.ndarray, bool], fusion_pb2.StreamFeatures]] = {
    signal_pb2.MODALITY_EEG: _eeg,
    signal_pb2.MODALITY_ECG: _ecg,
    signal_pb2.MODALITY_PPG: _ppg,
    signal_pb2.MODALITY_RESPIRATION: _respiration,
    signal_pb2.MODALITY_EDA: _eda,
    signal_pb2.MODALITY_AUDIO: _audio,
    signal_pb2.MODALITY_MOTION: _motion,
}


# --- beats -------------------------------------------------------------------------------------------------
# A window holds a handful of beats: past detection, plain Python on lists costs less than numpy's per-call
# overhead on arrays of a few elements, and gives the same floating-point results operation for operation.


def _beat_channel(samples: np.ndarray, gaps: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The best channel with its gaps bridged, and its validity mask (None when it has no gaps); None when it
    has fewer than two valid samples.
    """
    if not gaps:
        # Every channel is complete: the first one is the best.
        return (samples[0], None) if samples.shape[1] >= 2 else None
    filled = _filled(samples[_best_channel(samples)], min_valid=2)
    if filled is None:
        return None
    values, valid = filled
    return values, None if valid.all() else valid


def _beat_times(
    data: FeatureInput, shape: np.ndarray, candidates: np.ndarray, valid: np.ndarray | None, refine_s: float
) -> tuple[list[float], list[float]]:
    """The times of the beats to report, and the intervals between beats found before report_to_s.

    Each candidate sample index is moved to the maximum of `shape` (|x - median| for R-peaks, x for pulses)
    within refine_s, with sub-sample parabolic interpolation. `valid` (None: no gaps) marks the valid samples.
    """
    if candidates.size == 0:
        return [], []
    rate = data.rate_hz
    positions = _refined(shape, candidates, max(1, round(refine_s * rate)))
    if valid is None:
        times = [data.start_s + p / rate for p in positions]
        times = [t for t in times if t < data.report_to_s]
        intervals = [later - earlier for earlier, later in pairwise(times)]
        return [t for t in times if t >= data.report_from_s], intervals
    # Drop beats at or near missing samples, and remember which intervals cross a gap.
    located = np.asarray(positions)
    missing_before = np.concatenate(([0], np.cumsum(~valid)))
    guard = max(1, round(_GAP_GUARD_S * rate))
    nearest = np.clip(np.rint(located).astype(np.int64), 0, shape.size - 1)
    low = np.clip(nearest - guard, 0, shape.size)
    high = np.clip(nearest + guard + 1, 0, shape.size)
    clean = missing_before[high] == missing_before[low]
    located, nearest = located[clean], nearest[clean]
    gap_times = data.start_s + located / rate
    before_end = gap_times < data.report_to_s
    gap_times, nearest = gap_times[before_end], nearest[before_end]
    reported = gap_times[gap_times >= data.report_from_s]
    no_gap_between = missing_before[nearest[1:]] == missing_before[nearest[:-1]]
    return reported.tolist(), np.diff(gap_times)[no_gap_between].tolist()


def _qrs_peaks(x: np.ndarray, rate: float, deviation: np.ndarray) -> np.ndarray:
    """Sample indices of R-peaks: neurokit2's gradient method (Makowski et al. 2021), both QRS polarities.

    QRS complexes are where the 0.1 s smoothed absolute gradient exceeds 1.5 times its 0.75 s average; runs
    shorter than 0.4 times their mean length are dropped; the R-peak is the largest `deviation` (|x - median|)
    in the run.
    """
    if x.size < 3:
        return np.empty(0, dtype=np.int64)
    # |np.gradient(x)|, the same operations without its generality: central differences, one-sided at the ends.
    gradient = np.empty_like(x)
    np.subtract(x[2:], x[:-2], out=gradient[1:-1])
    gradient[1:-1] /= 2.0
    gradient[0] = x[1] - x[0]
    gradient[-1] = x[-1] - x[-2]
    slope = _moving_average(np.abs(gradient, out=gradient), _samples(0.1, rate))
    average = _moving_average(slope, _samples(0.75, rate))
    begins, ends = _runs(slope > 1.5 * average)
    if begins.size == 0:
        return np.empty(0, dtype=np.int64)
    lengths = ends - begins
    keep = lengths >= 0.4 * lengths.mean()
    peaks = [b + int(deviation[b:e].argmax()) for b, e in zip(begins[keep].tolist(), ends[keep].tolist(), strict=True)]
    return _spaced(peaks, _samples(_MIN_BEAT_INTERVAL_S, rate))


def _systolic_peaks(x: np.ndarray, rate: float) -> np.ndarray:
    """Sample indices of systolic peaks: Elgendi et al. (2013), as neurokit2's ppg_findpeaks "elgendi".

    The signal is band-passed 0.5-8 Hz (zero phase); its squared positive part is averaged over 0.111 s (a peak)
    and 0.667 s (a beat); blocks where the first exceeds the second plus 2 % of the mean, and last at least
    0.111 s, hold one systolic peak each: the block's maximum.
    """
    sos = _bandpass_sos(rate, 0.5, 8.0)
    if sos is None or x.size < _samples(1.0, rate):
        return np.empty(0, dtype=np.int64)
    cleaned = _zero_phase(x - x.mean(), sos, rate)
    # The positive part (maximum rather than clip: the same numbers, less overhead; the sign of a zero, which
    # the two may treat differently, is lost in the square).
    squared = np.square(np.maximum(cleaned, 0.0))
    peak_average = _moving_average(squared, _samples(0.111, rate))
    beat_average = _moving_average(squared, _samples(0.667, rate))
    begins, ends = _runs(peak_average > beat_average + 0.02 * squared.mean())
    keep = ends - begins >= _samples(0.111, rate)
    peaks = [b + int(cleaned[b:e].argmax()) for b, e in zip(begins[keep].tolist(), ends[keep].tolist(), strict=True)]
    return _spaced(peaks, _samples(0.3, rate))


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[begin, end) of the runs of True that start and end inside the mask (not those cut by its edges)."""
    # Changes alternate between begins and ends; a run cut by the start ends at the first change.
    changes = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    if mask.size and mask[0]:
        changes = changes[1:]
    ends = changes[1::2]
    return changes[: 2 * ends.size : 2], ends


def _spaced(peaks: list[int], min_distance: int) -> np.ndarray:
    """The peaks, in order, each kept only if it is more than min_distance after the last kept one."""
    kept: list[int] = []
    for peak in peaks:
        if not kept or peak - kept[-1] > min_distance:
            kept.append(peak)
    return np.asarray(kept, dtype=np.int64)


def _refined(shape: np.ndarray, candidates: np.ndarray, radius: int) -> list[float]:
    """Fractional indices of the maxima of `shape` within `radius` of each candidate, unique and in order.

    The vertex of the parabola through the maximum and its neighbours places a peak between samples.
    """
    last = shape.size - 1
    # The first maximum in each candidate's neighbourhood, cut at the edges.
    maxima = set()
    for candidate in candidates.tolist():
        low = max(candidate - radius, 0)
        maxima.add(low + int(shape[low : min(candidate + radius, last) + 1].argmax()))
    positions: list[float] = []
    for peak in sorted(maxima):
        position = float(peak)
        if 0 < peak < last:
            left, centre, right = shape.item(peak - 1), shape.item(peak), shape.item(peak + 1)
            curvature = left - 2.0 * centre + right
            if curvature < 0:
                # min/max order as np.clip's: a NaN shift stays NaN.
                position += min(max(0.5 * (left - right) / curvature, -0.5), 0.5)
        positions.append(position)
    return positions


# --- respiration ---------------------------------------------------------------------------------------------


def _breaths_per_minute(x: np.ndarray, rate: float) -> float | None:
    """Breaths per minute from the median interval between inhalation peaks; None when under two are found.

    The signal is band-passed 0.05-1 Hz (zero phase), which also removes spikes and cardiac ripple; peaks must
    be 1.5 s apart (at most 40 per minute) and stand out by 30 % of the 5-95 percentile range.
    """
    sos = _bandpass_sos(rate, 0.05, 1.0)
    if sos is None or x.size < _samples(6.0, rate):
        return None
    breathing = _zero_phase(x - np.mean(x), sos, rate)
    low, high = np.percentile(breathing, [5.0, 95.0])
    if not high > low:
        return None
    peaks, _ = signal.find_peaks(breathing, distance=_samples(1.5, rate), prominence=0.3 * (high - low))
    if peaks.size < 2:
        return None
    return 60.0 * rate / float(np.median(np.diff(peaks)))


# --- helpers -------------------------------------------------------------------------------------------------


def _window_index(data: FeatureInput, n: int) -> int:
    """Index of the first sample of the window proper (after the context)."""
    return min(max(round((data.window_start_s - data.start_s) * data.rate_hz), 0), n)


def _best_channel(samples: np.ndarray) -> int:
    """The channel with the most valid samples; the first one on ties."""
    return int(np.argmax((~np.isnan(samples)).sum(axis=1)))


@lru_cache(maxsize=64)
def _channel_names(names: tuple[str, ...], count: int) -> tuple[str, ...]:
    """The given channel names, padded with their indices when fewer names than channels were given."""
    return tuple(names[i] if i < len(names) else str(i) for i in range(count))


def _filled(x: np.ndarray, *, min_valid: float) -> tuple[np.ndarray, np.ndarray] | None:
    """x with NaN runs bridged linearly (held at the edges), and its validity mask; None below min_valid
    valid samples (and below two).
    """
    valid = ~np.isnan(x)
    count = int(valid.sum())
    if count < max(2.0, min_valid):
        return None
    if count == x.size:
        return x, valid
    index = np.arange(x.size)
    return np.interp(index, index[valid], x[valid]), valid


def _samples(seconds: float, rate: float) -> int:
    """A duration in samples, at least one."""
    return max(1, round(seconds * rate))


def _median(x: np.ndarray) -> float:
    """np.median of a 1-D array without NaN (the mean of the middle pair when even), without its generality."""
    half = x.size // 2
    if x.size % 2:
        return float(np.partition(x, half)[half])
    middle = np.partition(x, (half - 1, half))
    return float((middle[half - 1] + middle[half]) / 2)


def _median_of(values: list[float]) -> float:
    """np.median of a short list of numbers (not NaN), which sorting gives sooner."""
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def _moving_average(x: np.ndarray, size: int) -> np.ndarray:
    """ndimage.uniform_filter1d(x, size, mode="nearest") of a 1-D float64 array."""
    if _uniform_filter1d_kernel is None:  # pragma: no cover - depends on the scipy release
        return np.asarray(ndimage.uniform_filter1d(x, size, mode="nearest"))
    out = np.empty_like(x)
    _uniform_filter1d_kernel(x, size, 0, out, 0, 0.0, 0)  # axis 0, mode 0 ("nearest"), cval 0, origin 0
    return out


def _band_powers(x: np.ndarray, rate: float, nperseg: int) -> np.ndarray:
    """Power of each row in each of EEG_BANDS, (rows, bands): the sum of its Welch PSD (Hann segments of nperseg,
    half overlapping, mean removed, one-sided density) over the band's bins, times the bin width.

    scipy.signal.welch's computation, rearranged to pass over the segments fewer times; it agrees with it to
    rounding (1e-15 relative; an offset 10^4 times the signal costs both a few digits, 1e-12). Each segment's
    mean is taken out of its spectrum, where it only reaches the lowest bins (FFT((x - m) w) = FFT(x w) -
    m FFT(w)), rather than out of every sample; and only the bins up to the top band are squared, then averaged
    over segments and summed per band in one matrix product.
    """
    step = nperseg - nperseg // 2
    count = 1 + (x.shape[1] - nperseg) // step
    taper, taper_spectrum, weights = _band_weights(nperseg, rate, count)
    channels, bins = x.shape[0], weights.shape[0] // count
    # Removing each channel's own mean first keeps offsets out of the rounding, and a flat channel exactly 0.
    centred = np.subtract(x, np.add.reduce(x, axis=1, keepdims=True) / x.shape[1], order="C")
    # The segments as a view of the (new, contiguous) centred array: no copy gathered by fancy indexing, which
    # costs as much as their FFT.
    item = centred.itemsize
    strides = (centred.strides[0], step * item, item)
    segments = np.ndarray((channels, count, nperseg), np.float64, buffer=centred, strides=strides)
    means = np.add.reduce(segments, axis=-1, keepdims=True)
    means /= nperseg
    spectrum = np.fft.rfft(segments * taper, axis=-1)[..., :bins]
    # The taper's spectrum is 0 beyond bin 1: the means only reach bins 0 and 1.
    spectrum[..., :2] -= means * taper_spectrum
    power = np.square(spectrum.real)
    power += np.square(spectrum.imag)
    return power.reshape(channels, count * bins) @ weights


@lru_cache(maxsize=16)
def _band_weights(nperseg: int, rate: float, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For _band_powers: the taper, its spectrum's bins 0 and 1 (if in range), and the (count * bins, bands)
    matrix that turns the segments' squared spectra into band powers (density scale, one-sided doubling, mean
    over segments, bin width and the bins of each band in one).
    """
    taper = _periodic_hann(nperseg)
    freqs = np.fft.rfftfreq(nperseg, 1.0 / rate)
    members = np.stack([(freqs >= low) & (freqs < high) for _, low, high in EEG_BANDS], axis=1)
    used = np.flatnonzero(members.any(axis=1))
    bins = int(used[-1]) + 1 if used.size else 0
    one_sided = np.full(freqs.size, 2.0)
    one_sided[0] = 1.0  # DC, and Nyquist when the segment length is even, count once
    if nperseg % 2 == 0:
        one_sided[-1] = 1.0
    per_bin = one_sided[:bins] * (freqs[1] - freqs[0]) / (rate * float(taper @ taper) * count)
    weights = np.tile(members[:bins] * per_bin[:, None], (count, 1))
    taper_spectrum = np.fft.rfft(taper)[: min(bins, 2)]
    weights.flags.writeable = False
    taper_spectrum.flags.writeable = False
    return taper, taper_spectrum, weights


@lru_cache(maxsize=16)
def _periodic_hann(n: int) -> np.ndarray:
    taper = np.asarray(signal.get_window("hann", n))
    taper.flags.writeable = False
    return taper


def _zero_phase(x: np.ndarray, sos: np.ndarray, rate: float) -> np.ndarray:
    """x filtered forwards and backwards, padded by odd reflection of up to one second at each edge.

    The same result as scipy's sosfiltfilt, which solves for the filters' initial state on every call (most
    of its cost on window-length signals); here that state is computed once per filter.
    """
    if x.size < 2:
        return x.copy()
    pad = min(x.size - 1, _samples(1.0, rate))
    zi = steady_state(sos)
    filtered = np.concatenate((2 * x[0] - x[pad:0:-1], x, 2 * x[-1] - x[-2 : -pad - 2 : -1]))
    _sosfilt_in_place(sos, filtered, zi * filtered[0])
    filtered = filtered[::-1].copy()
    _sosfilt_in_place(sos, filtered, zi * filtered[0])
    return filtered[::-1][pad : pad + x.size]


def _sosfilt_in_place(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> None:
    """Filters the contiguous 1-D float64 x in place from the state zi, as signal.sosfilt(sos, x, zi=zi)."""
    sosfilt_in_place(sos, x[None, :], zi[None])  # zi is ours to overwrite


@lru_cache(maxsize=16)
def _hann(n: int) -> np.ndarray:
    """The Hann window of n samples, read-only (cached and shared: audio windows are long and all the same length)."""
    window = np.hanning(n)
    window.flags.writeable = False
    return window


@lru_cache(maxsize=64)
def _bandpass_sos(rate: float, low_hz: float, high_hz: float) -> np.ndarray | None:
    """Butterworth band-pass (order 2 per edge) as second-order sections, the high edge kept below Nyquist;
    None when the rate is too low for the band.
    """
    high_hz = min(high_hz, 0.45 * rate)
    if not high_hz > 2.0 * low_hz:
        return None
    return np.asarray(signal.butter(2, [low_hz, high_hz], btype="bandpass", fs=rate, output="sos"))


@lru_cache(maxsize=64)
def _lowpass_sos(rate: float, cutoff_hz: float) -> np.ndarray:
    """Butterworth low-pass of order 2 as second-order sections; the cutoff kept below Nyquist."""
    return np.asarray(signal.butter(2, min(cutoff_hz, 0.45 * rate), btype="lowpass", fs=rate, output="sos"))
