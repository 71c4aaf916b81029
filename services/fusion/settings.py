"""Settings of the fusion service (CLISONIX_* environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.common.settings import ServiceSettings

# The rate each modality is resampled to in fused windows (modality short name -> Hz).
DEFAULT_OUTPUT_RATES_HZ = {
    "eeg": 256.0,
    "ecg": 256.0,
    "ppg": 128.0,
    "respiration": 32.0,
    "eda": 32.0,
    "audio": 16000.0,
    "motion": 64.0,
    "other": 128.0,
}


class FusionSettings(ServiceSettings):
    """Fusion: clisonix.signals.raw.v1 in, clisonix.signals.fused.v1 out, one consumer group."""

    service_name: str = "fusion"
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # A window is worth sending at once: a short linger keeps the emit-to-Kafka time low (windows are large,
    # so batches still fill).
    kafka_linger_ms: int = Field(default=5, ge=0)
    # Fused windows are mostly float32 samples, which barely compress: aiokafka's lz4 runs at its slowest level
    # (about 1.4 ms per 75 kB window, ratio 1.0), zstd takes about 0.19 ms for a ratio of 0.90. Neither is worth
    # a worker's CPU beside 7.5 MB/s at 100 sessions; set zstd where the network is the narrower resource.
    kafka_compression: Literal["lz4", "zstd", "gzip", "none"] = "none"

    topic_raw: str = "clisonix.signals.raw.v1"
    topic_fused: str = "clisonix.signals.fused.v1"
    consumer_group: str = "clisonix-fusion"

    # Windows on the session clock: [k * hop, k * hop + length).
    window_seconds: float = Field(default=2.0, gt=0)
    hop_seconds: float = Field(default=1.0, gt=0)
    # Shift each session's window grid by a fraction of the hop derived from its id (spreads the work of sessions
    # that share one clock); off: windows start at whole multiples of the hop.
    stagger_windows: bool = True
    # Filters run once per sample, restarting from rest at every multiple of filter_epoch_seconds on the session
    # clock; a window uses the newest run that started at least filter_warmup_seconds (or its feature context)
    # before it, so its content depends on a bounded history.
    filter_warmup_seconds: float = Field(default=4.0, ge=0)
    filter_epoch_seconds: float = Field(default=8.0, gt=0)
    # R-peaks and pulse peaks are reported once this much signal after them has been seen.
    peak_latency_seconds: float = Field(default=0.3, ge=0)
    # Chunk timestamps of this last span (source clock) feed each stream's clock fit.
    clock_fit_seconds: float = Field(default=10.0, gt=0)
    # A timestamp this far behind the clock fit's prediction is a clock reset.
    clock_reset_seconds: float = Field(default=0.5, gt=0)
    # Timestamps that move ahead by up to this much are a gap (samples lost or skipped); further is a reset.
    max_gap_seconds: float = Field(default=30.0, gt=0)
    # A stream that has not covered a window when the others are this far past its end is marked missing;
    # a sequence hole older than this is a lost chunk rather than a late one.
    lateness_seconds: float = Field(default=2.0, ge=0)
    # Wall-clock seconds without a record for a session before its last windows are emitted with what is there.
    idle_flush_seconds: float = Field(default=5.0, gt=0)
    # Output rates per modality (JSON object in the environment: {"eeg": 256, ...}).
    output_rates_hz: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_OUTPUT_RATES_HZ))
    # EEG and ECG filters: causal Butterworth band-pass and a mains notch.
    mains_hz: float = Field(default=50.0, gt=0)
    eeg_band_hz: tuple[float, float] = (0.5, 45.0)
    ecg_band_hz: tuple[float, float] = (0.5, 40.0)
    filter_order: int = Field(default=4, ge=1, le=10)
    notch_quality: float = Field(default=30.0, gt=0)
    # Bounds on what one worker holds (chunks beyond them are dead-lettered).
    max_channels: int = Field(default=1024, gt=0)
    max_sessions: int = Field(default=10_000, gt=0)
    max_streams_per_session: int = Field(default=64, gt=0)
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    # Per-subject calibration baselines (only with CLISONIX_TIDE_TARGETS set): the median of each scalar feature
    # over a subject's first calibration_windows good windows of a modality, stored in Tide at
    # calibration/<subject>/<modality>. A good window has none of the missing, clipped, flat and reset flags and
    # covers at least calibration_min_coverage of the window.
    calibration_windows: int = Field(default=30, ge=1, le=10_000)
    calibration_min_coverage: float = Field(default=0.95, ge=0, le=1)
    # A baseline write that failed (or found no baseline in the cache afterwards) is tried again after this.
    calibration_retry_seconds: float = Field(default=5.0, gt=0)
    # Subjects x modalities whose baselines one worker gathers at once (the least recently fed are dropped).
    calibration_max_pending: int = Field(default=10_000, gt=0)

    @model_validator(mode="after")
    def _windows(self) -> FusionSettings:
        if self.hop_seconds > self.window_seconds:
            raise ValueError("hop_seconds must not exceed window_seconds (windows would leave holes)")
        if self.peak_latency_seconds >= self.window_seconds:
            raise ValueError("peak_latency_seconds must be shorter than window_seconds")
        return self
