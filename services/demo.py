"""`clisonix demo`: real recordings through ingest, fusion and inference, with the fused windows and the
predictions shown as they arrive.

Two sessions stream at once: a cardio-respiratory ICU recording (ECG, PPG, respiration: heart rate, pulse rate,
breathing rate) and a BioSemi EEG recording with a real clock reset (band powers). Plain Kafka consumers read
clisonix.signals.fused.v1 and clisonix.inference.results.v1, as any downstream user would: for every window the
inference worker's beat model says where the beats are, with its latency and the energy it took (the EEG
session's windows, which hold no ECG, get predictions that say so).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer

from clisonix.fusion.v1 import fusion_pb2
from clisonix.inference.v1 import inference_pb2
from services.ingest.client import StreamClient, StreamProgress
from services.ingest.sources import open_source

REPO = Path(__file__).resolve().parents[1]
DEMO_SOURCES = {
    "cardio": f"wfdb:{REPO / 'data' / 'wfdb' / 'v102s'}",
    "eeg": f"xdf:{REPO / 'data' / 'xdf' / 'clock_resets.xdf'}",
}
DEMO_DESCRIPTIONS = {
    "cardio": "PhysioNet/CinC 2015 v102s: ECG II + V, PLETH (PPG), RESP at 250 Hz",
    "eeg": "BioSemi EEG, 8 channels at ~93 Hz, with a clock reset in the middle",
}
BANDS = ("delta", "theta", "alpha", "beta", "gamma")


@dataclass(frozen=True)
class PredictionFigures:
    """What the demo's summary needs of one prediction."""

    latency_s: float
    joules: float
    energy_source: str
    skipped: bool


@dataclass
class SessionView:
    """What the demo shows for one session: ingest progress, the latest fused window's features and the latest
    prediction."""

    label: str
    progress: StreamProgress | None = None
    pseudonym: str = ""
    windows: int = 0
    window_start_s: float = math.nan
    heart_rate_bpm: float = math.nan
    pulse_rate_bpm: float = math.nan
    respiration_bpm: float = math.nan
    band_powers: dict[str, float] = field(default_factory=dict)
    resets: int = 0
    gaps: int = 0
    heart_rates: list[float] = field(default_factory=list)
    # The inference worker's predictions: the latest, and every prediction's figures (by prediction id, so a
    # prediction re-produced after a failover counts once).
    prediction: inference_pb2.Prediction | None = None
    predicted: dict[str, PredictionFigures] = field(default_factory=dict)
    skipped: int = 0

    def take(self, window: fusion_pb2.FusedWindow) -> None:
        self.windows += 1
        self.window_start_s = window.start_s
        for stream in window.streams:
            self.resets += stream.quality.reset
            self.gaps += stream.quality.gap
            kind = stream.features.WhichOneof("kind")
            if kind == "ecg" and stream.features.ecg.HasField("heart_rate_bpm"):
                self.heart_rate_bpm = stream.features.ecg.heart_rate_bpm
                self.heart_rates.append(self.heart_rate_bpm)
            elif kind == "ppg" and stream.features.ppg.HasField("pulse_rate_bpm"):
                self.pulse_rate_bpm = stream.features.ppg.pulse_rate_bpm
            elif kind == "respiration" and stream.features.respiration.HasField("respiration_rate_bpm"):
                self.respiration_bpm = stream.features.respiration.respiration_rate_bpm
            elif kind == "eeg" and stream.features.eeg.channels:
                channels = stream.features.eeg.channels
                self.band_powers = {band: float(np.mean([getattr(c, band) for c in channels])) for band in BANDS}

    def take_prediction(self, prediction: inference_pb2.Prediction) -> None:
        if prediction.prediction_id in self.predicted:
            return
        self.prediction = prediction
        self.predicted[prediction.prediction_id] = PredictionFigures(
            prediction.latency_s, prediction.joules, prediction.energy_source, bool(prediction.skipped_reason)
        )
        self.skipped += bool(prediction.skipped_reason)

    @property
    def predictions(self) -> int:
        return len(self.predicted)

    def prediction_line(self) -> str:
        """The latest prediction: model, beats and heart rate, latency and energy (or why it was skipped)."""
        p = self.prediction
        if p is None:
            return f"{'':<7} {0:>5} predictions"
        text = f"{'':<7} {self.predictions:>5} predictions, model {p.model_name} v{p.model_version} ({p.variant})"
        if p.skipped_reason:
            return text + f" | skipped: {p.skipped_reason.replace('_', ' ')}"
        rate = p.heart_rate_bpm if p.HasField("heart_rate_bpm") else math.nan
        return (
            text
            + f" | {len(p.beats)} beats, HR {_num(rate)} bpm | latency {1000 * p.latency_s:5.1f} ms, "
            + f"{energy_text(p.joules, p.energy_source)}, batch {p.batch_size}"
        )

    def line(self) -> str:
        acked = self.progress.chunks_acked if self.progress else 0
        text = f"{self.label:<7} {acked:>5} chunks in, {self.windows:>4} windows out"
        if not math.isnan(self.window_start_s):
            text += f", t={self.window_start_s:8.1f} s"
        if self.label == "cardio":
            text += f" | HR {_num(self.heart_rate_bpm)} bpm, pulse {_num(self.pulse_rate_bpm)} bpm, "
            text += f"breathing {_num(self.respiration_bpm)} /min"
        elif self.band_powers:
            total = sum(self.band_powers.values()) or 1.0
            shares = " ".join(f"{band} {100 * self.band_powers[band] / total:4.1f}%" for band in BANDS)
            text += f" | band power {shares}"
        if self.resets:
            text += f" | clock reset seen in {self.resets} window(s)"
        return text


def _num(value: float) -> str:
    return "  -  " if math.isnan(value) else f"{value:5.1f}"


def energy_text(joules: float, source: str) -> str:
    """Joules in millijoules with where the figure comes from, e.g. "0.12 mJ (estimate)"."""
    return f"{1000 * joules:.3g} mJ ({source or 'unknown'})"


async def watch_predictions(
    bootstrap_servers: str, topic: str, views: dict[str, SessionView], stop: asyncio.Event
) -> None:
    """Reads predictions from the beginning of `topic` (no group) and hands each to its session's view."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest", fetch_max_wait_ms=5
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            by_pseudonym = {v.pseudonym: v for v in views.values() if v.pseudonym}
            for records in batches.values():
                for record in records:
                    prediction = inference_pb2.Prediction()
                    prediction.ParseFromString(record.value)
                    view = by_pseudonym.get(prediction.session_id)
                    if view is not None:
                        view.take_prediction(prediction)
    finally:
        await consumer.stop()


async def watch_fused(bootstrap_servers: str, topic: str, views: dict[str, SessionView], stop: asyncio.Event) -> None:
    """Reads fused windows from the beginning of `topic` (no group) and hands each to its session's view."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest", fetch_max_wait_ms=5
    )
    await consumer.start()
    try:
        by_pseudonym = {}
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            by_pseudonym = {v.pseudonym: v for v in views.values() if v.pseudonym}
            for records in batches.values():
                for record in records:
                    window = fusion_pb2.FusedWindow()
                    window.ParseFromString(record.value)
                    view = by_pseudonym.get(window.session_id)
                    if view is not None:
                        view.take(window)
    finally:
        await consumer.stop()


async def run_demo(
    ingest_target: str,
    bootstrap_servers: str,
    topic_fused: str,
    speed: float,
    duration_s: float,
    settle_s: float = 15.0,
    topic_results: str | None = None,
    tide_target: str | None = None,
    liam_target: str | None = None,
) -> int:
    """Streams the demo recordings, shows fused windows (and with `topic_results`, the predictions) live,
    prints a summary (with `tide_target`, also the shared state the services keep in Tide); returns an exit
    code."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    views = {label: SessionView(label) for label in DEMO_SOURCES}
    stop = asyncio.Event()
    watchers = [asyncio.create_task(watch_fused(bootstrap_servers, topic_fused, views, stop))]
    if topic_results is not None:
        watchers.append(asyncio.create_task(watch_predictions(bootstrap_servers, topic_results, views, stop)))

    def show() -> str:
        lines = []
        for view in views.values():
            lines.append(view.line())
            if topic_results is not None:
                lines.append(view.prediction_line())
        return "\n".join(lines)

    async def stream(label: str) -> StreamProgress:
        source = open_source(DEMO_SOURCES[label], duration_s=duration_s)
        # The ack carries the pseudonym, so the demo can match fused windows to the session without the key.
        client = StreamClient(
            ingest_target, f"demo-{label}-{uuid.uuid4().hex[:8]}", subject_id=f"demo-{label}", speed=speed
        )

        def on_progress(progress: StreamProgress) -> None:
            views[label].progress = progress
            views[label].pseudonym = progress.last_session_id

        try:
            return await client.run(source.blocks(), on_progress)
        finally:
            source.close()

    for label, description in DEMO_DESCRIPTIONS.items():
        console.print(f"{label:<7} {description}")
    started = time.monotonic()
    try:
        if console.is_terminal:
            with Live(show(), console=console, refresh_per_second=4) as live:
                task = asyncio.gather(*(stream(label) for label in views))
                while not task.done():
                    live.update(show())
                    await asyncio.sleep(0.25)
                results = await task
                await _settle(views, settle_s, lambda: live.update(show()))
        else:
            task = asyncio.gather(*(stream(label) for label in views))
            while not task.done():
                print(show(), flush=True)
                await asyncio.sleep(1.0)
            results = await task
            await _settle(views, settle_s, lambda: None)
            print(show(), flush=True)
    finally:
        stop.set()
        await asyncio.gather(*watchers)
    rejected = sum(p.rejected for p in results)
    cardio = views["cardio"]
    median_hr = float(np.median(cardio.heart_rates)) if cardio.heart_rates else math.nan
    print(
        f"demo done in {time.monotonic() - started:.1f} s: "
        + ", ".join(f"{label} {p.chunks_acked} chunks acked" for label, p in zip(views, results, strict=True))
        + f", {rejected} rejected; fused windows: "
        + ", ".join(f"{label} {view.windows}" for label, view in views.items())
        + f"; median heart rate {median_hr:.1f} bpm",
        flush=True,
    )
    ok = rejected == 0 and all(view.windows > 0 for view in views.values())
    if topic_results is not None:
        print(prediction_summary(views), flush=True)
        ok = ok and all(view.predictions > 0 for view in views.values())
    if tide_target is not None:
        summary, registered = await tide_summary(tide_target, views)
        print(summary, flush=True)
        ok = ok and registered
    if liam_target is not None:
        print(await liam_summary(liam_target), flush=True)
    return 0 if ok else 3


async def liam_summary(target: str, services: tuple[str, ...] = ("ingest", "fusion", "inference", "tide")) -> str:
    """What LIAM learnt of the platform's own operating metrics during the replay: per service, the records it
    folded in and its mean power, labelled with its source (an estimate stays one)."""
    import grpc

    from clisonix.liam.v1 import liam_pb2, liam_pb2_grpc
    from services.common.energy import EnergyMeter

    # The services run on this machine with the same settings: their energy source is the one found here.
    meter = EnergyMeter(os.environ.get("CLISONIX_ENERGY_SOURCE", "auto"))
    source = meter.source
    meter.close()
    parts = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = liam_pb2_grpc.LiamServiceStub(channel)
        for name in services:
            try:
                report = await stub.Analyze(liam_pb2.AnalyzeRequest(stream=f"service/{name}"), timeout=5)
            except grpc.aio.AioRpcError:
                parts.append(f"{name} no report yet")
                continue
            power = dict(zip(report.metrics, report.mean, strict=True)).get("power_watts", math.nan)
            parts.append(f"{name} {report.records} reports, {power:.1f} W ({source})")
    return "liam (operating metrics each 10 s): " + "; ".join(parts)


async def tide_summary(target: str, views: dict[str, SessionView]) -> tuple[str, bool]:
    """What the services keep in Tide after the replay: each session's registered streams, the calibration
    baselines and active models; and whether every demo session was registered. Shows no pseudonyms."""
    from services.tide.client import TideClient, get_session

    async with TideClient(target) as client:
        parts = []
        registered = True
        for label, view in views.items():
            record = await get_session(client, view.pseudonym) if view.pseudonym else None
            registered = registered and record is not None
            streams = sorted({s["modality"] for s in record.streams}) if record is not None else []
            parts.append(f"{label} session registered with {', '.join(streams) or 'no'} streams")
        baselines = await client.list("calibration/")
        active = await client.list("models/active/")
    models = ", ".join(f"{e.key.rsplit('/', 1)[1]} -> {e.value.decode()}" for e in active) or "none set"
    return (
        "tide: " + "; ".join(parts) + f"; {len(baselines)} calibration baselines; active models: {models}",
        registered,
    )


def prediction_summary(views: dict[str, SessionView]) -> str:
    """Predictions per session (skipped ones too), and over the windows the model ran on: the median latency and
    the mean energy per window."""
    made = [figures for view in views.values() for figures in view.predicted.values() if not figures.skipped]
    sources = sorted({figures.energy_source for figures in made})
    text = "predictions: " + ", ".join(
        f"{label} {view.predictions} ({view.skipped} skipped)" for label, view in views.items()
    )
    if made:
        latency_ms = 1000 * float(np.median([figures.latency_s for figures in made]))
        joules = float(np.mean([figures.joules for figures in made]))
        text += f"; median latency {latency_ms:.1f} ms, mean {energy_text(joules, '/'.join(sources))} per window"
    return text


async def _settle(views: dict[str, SessionView], settle_s: float, refresh: Callable[[], None]) -> None:
    """Waits (up to settle_s) for fusion to emit the sessions' last windows after the streams ended, and for
    their predictions."""
    deadline = time.monotonic() + settle_s
    last = -1
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        total = sum(view.windows + view.predictions for view in views.values())
        if total != last:
            last, quiet_since = total, time.monotonic()
        elif total and time.monotonic() - quiet_since > 7.0:
            return  # nothing new for longer than fusion's idle flush (5 s): the last windows are out
        refresh()
        await asyncio.sleep(0.25)
