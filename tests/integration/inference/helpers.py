"""Fused windows as fusion writes them, and reading predictions back: shared by the inference worker tests."""

from __future__ import annotations

import numpy as np

from clisonix.fusion.v1 import fusion_pb2
from clisonix.inference.v1 import inference_pb2
from clisonix.signal.v1 import signal_pb2
from services.common.events import decode_event
from services.common.kafka import kafka_producer
from services.common.settings import ServiceSettings
from services.fusion.windows import window_id
from services.inference.dataset import EcgRecord
from tests.conftest import REPO
from tests.helpers import read_topic

RATE = 256.0
WINDOW_S = 2.0
HOP_S = 1.0
WINDOW_SAMPLES = int(WINDOW_S * RATE)
STRIDE = 4  # the tiny models' metadata says none: the worker's default
SESSION_T0 = 5000.0  # session clock of the first window's start
SHIPPED = REPO / "models" / "ecg-beat-pruned"


def ecg_stream(samples: np.ndarray, rate: float = RATE, unit: str = "mV") -> fusion_pb2.StreamWindow:
    """An ECG stream window of (channels, n) samples as fusion writes it."""
    samples = np.atleast_2d(samples)
    finite = np.isfinite(samples[0])
    return fusion_pb2.StreamWindow(
        stream_id="ecg-0",
        modality=signal_pb2.MODALITY_ECG,
        channel_names=["MLII", "V5"][: samples.shape[0]],
        channel_units=[unit] * samples.shape[0],
        sample_rate_hz=rate,
        sample_count=samples.shape[1],
        samples=np.ascontiguousarray(samples, dtype="<f4").tobytes(),
        nominal_rate_hz=rate,
        effective_rate_hz=rate,
        quality=fusion_pb2.QualityFlags(missing=not finite.any(), gap=0 < finite.mean() < 1),
        coverage=float(finite.mean()),
    )


def eeg_stream(seed: int) -> fusion_pb2.StreamWindow:
    samples = np.random.default_rng(seed).standard_normal((2, WINDOW_SAMPLES)).astype("<f4")
    return fusion_pb2.StreamWindow(
        stream_id="eeg-0",
        modality=signal_pb2.MODALITY_EEG,
        channel_names=["C3", "C4"],
        channel_units=["uV", "uV"],
        sample_rate_hz=RATE,
        sample_count=WINDOW_SAMPLES,
        samples=samples.tobytes(),
        coverage=1.0,
    )


def fused_window(session: str, index: int, streams: list[fusion_pb2.StreamWindow]) -> fusion_pb2.FusedWindow:
    start = SESSION_T0 + index * HOP_S
    return fusion_pb2.FusedWindow(
        session_id=session,
        window_id=window_id(session, start),
        start_s=start,
        end_s=start + WINDOW_S,
        window_index=index,
        streams=streams,
    )


def ecg_windows(record: EcgRecord, session: str, count: int, first_sample: int = 0) -> list[fusion_pb2.FusedWindow]:
    """`count` windows (2 s every 1 s) of the record's ECG from `first_sample`, each with an EEG stream first."""
    windows = []
    for index in range(count):
        at = first_sample + int(index * HOP_S * RATE)
        ecg = record.signal[at : at + WINDOW_SAMPLES]
        windows.append(fused_window(session, index, [eeg_stream(index), ecg_stream(np.stack([ecg, -ecg]))]))
    return windows


async def produce(bootstrap: str, topic: str, windows: list[fusion_pb2.FusedWindow]) -> None:
    """Writes windows as fusion does (CloudEvents, keyed by session, ce_id = window id) and waits for the acks."""
    async with kafka_producer(ServiceSettings(kafka_bootstrap_servers=bootstrap), "//clisonix/fusion") as events:
        futures = [await events.send(topic, w.session_id, w, event_id=w.window_id) for w in windows]
        for future in futures:
            await future


async def predictions(bootstrap: str, topic: str, count: int) -> list[tuple[inference_pb2.Prediction, object]]:
    """The first `count` predictions on `topic`, each with its record."""
    records = await read_topic(bootstrap, topic, lambda got: len(got) >= count)
    out = []
    for record in records:
        prediction, attributes = decode_event(inference_pb2.Prediction, record.value, record.headers)
        assert attributes.id == prediction.prediction_id and attributes.source == "//clisonix/inference"
        assert record.key == prediction.session_id.encode()
        out.append((prediction, record))
    return out


def tensor(prediction: inference_pb2.Prediction, name: str) -> np.ndarray:
    output = next(o for o in prediction.outputs if o.name == name)
    return np.asarray(output.values).reshape(tuple(output.shape))
