"""The inference service's Kafka worker on a real broker: fused windows in, one Prediction per window out, with
deterministic ids, skipped windows said so, bad records dead-lettered, re-deliveries not predicted twice, and
windows fetched together batched together. With the shipped models, the beats it finds are the annotated ones.

The windows are built here as fusion writes them (float32 little-endian, channel-major samples on a 256 Hz grid,
ids from services.fusion.windows.window_id) over MIT-BIH record 100's ECG, filtered as fusion filters it.
"""

from __future__ import annotations

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from clisonix.fusion.v1 import fusion_pb2
from clisonix.inference.v1 import inference_pb2
from services.common.kafka import ensure_topics
from services.common.settings import ServiceSettings
from services.inference.beats import match_beats
from services.inference.handlers import NO_ECG_STREAM, SAMPLE_RATE_MISMATCH, prediction_id
from tests.conftest import REPO, TINY_TORCH, TINY_WINDOW
from tests.helpers import read_all, read_topic, wait_for
from tests.integration.inference.helpers import (
    RATE,
    SESSION_T0,
    SHIPPED,
    STRIDE,
    WINDOW_SAMPLES,
    ecg_stream,
    ecg_windows,
    eeg_stream,
    fused_window,
    predictions,
    produce,
    tensor,
)

pytestmark = pytest.mark.integration


async def test_every_window_gets_one_prediction_and_windows_fetched_together_share_batches(
    broker, worker, record
) -> None:
    session = "ps-worker-main"
    good = ecg_windows(record, session, 24)
    gap = np.array(record.signal[30 * 256 : 30 * 256 + WINDOW_SAMPLES])
    gap[200:300] = np.nan  # a lost chunk: segments over it are not run
    uv = record.signal[40 * 256 : 40 * 256 + WINDOW_SAMPLES] * 1000.0
    odd = [
        fused_window(session, 30, [ecg_stream(gap)]),
        fused_window(session, 31, [eeg_stream(31)]),  # no ECG
        fused_window(session, 32, [ecg_stream(record.signal[:500], rate=250.0)]),  # not the model's rate
        fused_window(session, 33, [ecg_stream(np.full(WINDOW_SAMPLES, np.nan))]),  # the stream went silent
        fused_window(session, 34, [ecg_stream(uv, unit="uV")]),  # in microvolts: scaled to the model's mV
    ]
    topics = worker.topics
    # Written before the worker starts, so its first fetches return many windows at once: a burst.
    await ensure_topics(ServiceSettings(kafka_bootstrap_servers=broker.bootstrap_servers), [topics["topic_fused"]])
    await produce(broker.bootstrap_servers, topics["topic_fused"], good + odd)
    service = await worker()

    got = await predictions(broker.bootstrap_servers, topics["topic_results"], len(good) + len(odd))
    by_window = {p.window_id: p for p, _ in got}
    assert len(got) == len(by_window) == len(good) + len(odd), "one prediction per window"
    positions = (WINDOW_SAMPLES - TINY_WINDOW) // STRIDE + 1
    for window in good + odd:
        p = by_window[window.window_id]
        assert p.prediction_id == prediction_id(window.window_id, TINY_TORCH, "2")  # the newest version
        assert (p.session_id, p.window_start_s, p.window_end_s) == (session, window.start_s, window.end_s)
        assert (p.model_name, p.model_version, p.variant) == (TINY_TORCH, "2", "student")
        assert p.latency_s > 0
    for window in good:
        p = by_window[window.window_id]
        assert not p.skipped_reason and p.stream_id == "ecg-0"
        assert [(o.name, list(o.shape)) for o in p.outputs] == [
            ("logits", [positions, 2]),
            ("probabilities", [positions, 2]),
        ]
        np.testing.assert_allclose(tensor(p, "probabilities").sum(axis=1), 1.0, rtol=1e-5)
        times = [b.time_s for b in p.beats]
        assert times == sorted(times)
        assert all(window.start_s <= b.time_s <= window.end_s and 0.5 <= b.probability <= 1 for b in p.beats)
        assert p.HasField("heart_rate_bpm") == (len(times) >= 2)
        assert p.compute_s > 0 and p.queue_s >= 0 and p.batch_size >= positions
        assert p.joules > 0 and p.energy_source == "estimate"
    # Windows fetched together ran in common forward passes.
    assert max(by_window[w.window_id].batch_size for w in good) > positions

    gapped = by_window[odd[0].window_id]
    assert not gapped.skipped_reason
    probabilities = tensor(gapped, "probabilities")
    starts = np.arange(positions) * STRIDE
    over_gap = (starts + TINY_WINDOW > 200) & (starts < 300)
    assert np.isnan(probabilities[over_gap]).all() and np.isfinite(probabilities[~over_gap]).all()
    assert by_window[odd[1].window_id].skipped_reason == NO_ECG_STREAM
    assert by_window[odd[2].window_id].skipped_reason == SAMPLE_RATE_MISMATCH
    assert by_window[odd[3].window_id].skipped_reason == "ecg_missing"
    for skipped in odd[1:4]:
        p = by_window[skipped.window_id]
        assert not p.outputs and not p.beats and p.batch_size == 0 and p.joules == 0
    # A microvolt ECG gets the same outputs as the same ECG in millivolts would.
    same_in_mv = fused_window(session, 35, [ecg_stream(uv / 1000.0)])
    await produce(broker.bootstrap_servers, topics["topic_fused"], [same_in_mv])
    got = await predictions(broker.bootstrap_servers, topics["topic_results"], len(good) + len(odd) + 1)
    in_mv = next(p for p, _ in got if p.window_id == same_in_mv.window_id)
    np.testing.assert_allclose(
        tensor(by_window[odd[4].window_id], "logits"), tensor(in_mv, "logits"), rtol=1e-4, atol=1e-4
    )

    registry = service.runtime.metrics.registry
    assert (
        registry.get_sample_value("clisonix_inference_predictions_total", {"model": TINY_TORCH, "outcome": "predicted"})
        == len(good) + 3
    )
    assert registry.get_sample_value("clisonix_inference_windows_skipped_total", {"reason": NO_ECG_STREAM}) == 1
    assert (
        registry.get_sample_value(
            "clisonix_inference_request_latency_seconds_count", {"model": TINY_TORCH, "path": "kafka"}
        )
        == len(good) + len(odd) + 1
    )
    assert (
        registry.get_sample_value(
            "clisonix_records_out_total", {"service": "inference", "topic": topics["topic_results"]}
        )
        == len(good) + len(odd) + 1
    )
    # Every window's record timestamp -> its prediction: one observation each, none longer than the test.
    assert registry.get_sample_value("clisonix_pipeline_latency_seconds_count") == len(good) + len(odd) + 1
    assert 0 <= registry.get_sample_value("clisonix_pipeline_latency_seconds_sum") < 60 * (len(good) + len(odd) + 1)


async def test_redelivered_windows_are_predicted_once_and_keep_their_ids(broker, worker, record, topic_name) -> None:
    windows = ecg_windows(record, "ps-worker-redelivered", 6, first_sample=60 * 256)
    topics = worker.topics
    first = await worker()
    await produce(broker.bootstrap_servers, topics["topic_fused"], windows)
    await produce(broker.bootstrap_servers, topics["topic_fused"], windows[:4])  # re-delivered, as after a crash
    registry = first.runtime.metrics.registry
    out = {"service": "inference", "topic": topics["topic_results"]}
    await wait_for(lambda: registry.get_sample_value("clisonix_inference_windows_redelivered_total") == 4)
    assert registry.get_sample_value("clisonix_records_out_total", out) == len(windows)
    await predictions(broker.bootstrap_servers, topics["topic_results"], len(windows))
    got = await read_all(broker.bootstrap_servers, topics["topic_results"])
    assert len(got) == len(windows), "a re-delivered window the worker predicted already is not predicted again"
    earlier = {}
    for record_ in got:
        prediction = inference_pb2.Prediction()
        prediction.ParseFromString(record_.value)
        earlier[prediction.prediction_id] = prediction

    # Another group reading the same windows (a worker that never saw them) predicts them under the same ids.
    again = topic_name("results-again")
    await worker(consumer_group=topic_name("other-group"), topic_results=again)
    second = await predictions(broker.bootstrap_servers, again, len(windows))
    assert {p.prediction_id for p, _ in second} == set(earlier)
    for p, _ in second:
        np.testing.assert_allclose(tensor(p, "logits"), tensor(earlier[p.prediction_id], "logits"), atol=1e-5)
        assert [b.time_s for b in p.beats] == [b.time_s for b in earlier[p.prediction_id].beats]


async def test_bad_records_are_dead_lettered_and_the_rest_predicted(broker, worker, record) -> None:
    service = await worker()
    topics = worker.topics
    windows = ecg_windows(record, "ps-worker-dead", 3)
    short = fusion_pb2.FusedWindow()
    short.CopyFrom(windows[1])
    short.streams[1].samples = short.streams[1].samples[:-4]  # one sample short
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topics["topic_fused"], b"not a window", key=b"ps-worker-dead")
    finally:
        await producer.stop()
    await produce(broker.bootstrap_servers, topics["topic_fused"], [windows[0], short, windows[2]])

    dead = await read_topic(broker.bootstrap_servers, topics["topic_deadletter"], lambda got: len(got) >= 2)
    reasons = sorted(dict(r.headers)["deadletter_reason"].decode() for r in dead)
    assert reasons == ["missing_header", "sample_size_mismatch"]
    assert {dict(r.headers)["deadletter_consumer"].decode() for r in dead} == {topics["consumer_group"]}
    got = await predictions(broker.bootstrap_servers, topics["topic_results"], 2)
    assert {p.window_id for p, _ in got} == {windows[0].window_id, windows[2].window_id}
    registry = service.runtime.metrics.registry
    assert registry.get_sample_value(
        "clisonix_deadlettered_total", {"service": "inference", "reason": "sample_size_mismatch"}
    )


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="the shipped model repository (models/) is not built")
async def test_the_shipped_model_finds_the_annotated_beats(broker, worker, record) -> None:
    # The last minute of the record lies in the held-out part no model was trained or selected on.
    first = record.signal.size - 62 * 256
    windows = ecg_windows(record, "ps-worker-shipped", 60, first_sample=first)
    await worker(model_repository=REPO / "models", models=("ecg-beat-pruned",), worker_model="ecg-beat-pruned")
    await produce(broker.bootstrap_servers, worker.topics["topic_fused"], windows)
    got = await predictions(broker.bootstrap_servers, worker.topics["topic_results"], len(windows))
    tolerance = 0.15  # as the models' evaluation matches beats (their metadata's match_tolerance_ms)
    reference_all = SESSION_T0 + (record.beats - first) / RATE
    hits = false_positives = misses = 0
    for p, _ in got:
        assert p.model_name == "ecg-beat-pruned" and not p.skipped_reason
        # The beats the model can see (a segment centred on them fits in the window), less a tolerance at either
        # end: a beat there may be matched just outside.
        lo = p.window_start_s + 64 / RATE + tolerance
        hi = p.window_end_s - 64 / RATE - tolerance
        detected = np.array([b.time_s for b in p.beats])
        inner = detected[(detected >= lo) & (detected <= hi)]
        reference = reference_all[(reference_all >= lo) & (reference_all <= hi)]
        _, fp, _ = match_beats(inner, reference_all, tolerance)
        tp, _, fn = match_beats(detected, reference, tolerance)
        hits, false_positives, misses = hits + tp, false_positives + fp, misses + fn
        if p.HasField("heart_rate_bpm") and reference.size >= 2:
            assert p.heart_rate_bpm == pytest.approx(60 / np.median(np.diff(reference)), rel=0.15)
    assert hits / (hits + misses) >= 0.95 and hits / (hits + false_positives) >= 0.95, (hits, false_positives, misses)
