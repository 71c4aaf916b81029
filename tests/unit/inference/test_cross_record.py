"""Beyond record 100: beat times from saturated probabilities, the classical detector's labels on unannotated
leads, and the shipped model on a recording of another person and device (PhysioNet/CinC 2015 v102s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.inference.backends import load_backend
from services.inference.beats import detect_beats, match_beats, sliding_segments
from services.inference.dataset import (
    EcgRecord,
    Split,
    classical_beats,
    label_centres,
    load_silver,
    reliable_samples,
)
from services.inference.evaluation import REFRACTORY_MS, STRIDE_SAMPLES, THRESHOLD, TOLERANCE_MS, agreement_part
from services.inference.repository import ModelRepository
from services.inference.training import TrainingPool

REPO = Path(__file__).resolve().parents[3]
WFDB = REPO / "data" / "wfdb"


@pytest.fixture(scope="module")
def v102s_ii() -> EcgRecord:
    return load_silver(WFDB / "v102s", "II")


def test_a_saturated_run_gives_the_middle_of_its_plateau() -> None:
    centres = np.arange(64, 64 + 4 * 12, 4)
    probability = np.array([0.1, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.2, 0.0, 0.0, 0.0])
    beats, p = detect_beats(centres, probability, 0.5)
    # Plateau from centres[2] = 72 to centres[6] = 88: the beat is at 80, not at the first maximum (72).
    assert beats.tolist() == [80] and p.tolist() == [1.0]
    # float32 softmax outputs of a saturated net differ in their last digits: still one plateau.
    nearly = probability.copy()
    nearly[2:7] = [0.99999, 0.999999, 1.0, 0.9999995, 0.99998]
    assert detect_beats(centres, nearly, 0.5)[0].tolist() == [80]
    # A single peak stays where it is.
    peaked = np.array([0.1, 0.6, 0.8, 0.95, 0.8, 0.6, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert detect_beats(centres, peaked, 0.5)[0].tolist() == [76]


def test_refractory_keeps_the_more_probable_of_two_close_runs() -> None:
    centres = np.arange(0, 40 * 4, 4)
    probability = np.zeros(40)
    probability[[5, 6]] = 0.9  # plateau 20-24 -> 22
    probability[10] = 0.99  # 40, 18 samples after the first
    probability[30:33] = 1.0  # 120-128 -> 124
    beats, p = detect_beats(centres, probability, 0.5, refractory_samples=25)
    assert beats.tolist() == [40, 124] and p.tolist() == [0.99, 1.0]
    assert detect_beats(centres, np.zeros(40), 0.5)[0].size == 0


def test_detector_labels_hold_only_between_beats_at_plausible_intervals() -> None:
    rate = 256.0
    beats = np.array([100.0, 300.0, 500.0, 700.0, 1500.0, 1700.0, 1900.0, 2100.0])  # one 3.1 s gap: missed beats
    reliable = reliable_samples(beats, 2400, rate)
    assert reliable[100:701].all() and reliable[1500:2101].all()
    assert not reliable[720:1480].any() and not reliable[:99].any() and not reliable[2102:].any()
    # A false beat between two true ones halves two intervals: both fall out.
    extra = np.sort(np.concatenate([beats[:4], [400.0], beats[4:]]))
    assert not reliable_samples(extra, 2400, rate)[320:480].any()


def test_silver_lead_is_fusions_ecg_labelled_by_the_classical_detector(v102s_ii: EcgRecord) -> None:
    lead = v102s_ii
    assert (lead.rate_hz, lead.native_rate_hz, lead.unit, lead.labels_from) == (
        256.0,
        250.0,
        "mV",
        "classical detector",
    )
    assert lead.signal.size == 300 * 256 and lead.valid is not None
    # v102s lead II has missing samples (WFDB reads them as NaN): the second around them is left out.
    missing = 5591 * 256 / 250
    assert not lead.valid[int(missing) - 200 : int(missing) + 200].any()
    assert 0.7 < lead.valid.mean() < 1.0
    assert np.isfinite(lead.signal).all() and 400 <= lead.beats.size <= 560  # about 100 per minute
    # The labels are the classical detector's beats on the whole lead, missing samples handed to it as such.
    assert np.isin(lead.beats, classical_beats(lead.signal, 256.0)).mean() > 0.95
    # The training pool of its first 80 % keeps only segments wholly where the labels hold.
    part = (0, Split.of(lead.signal.size).held_out[0])
    pool = TrainingPool(lead, part, 128, stride=4)
    assert len(pool) > 1000 and (pool.labels == 1).sum() > 300
    assert lead.valid_segments(pool.centres, 128).all() and pool.centres.max() + 64 <= part[1]
    np.testing.assert_array_equal(pool.labels, label_centres(pool.centres, lead.beats, 256.0))


def test_joined_pool_cuts_each_records_own_segments(v102s_ii: EcgRecord) -> None:
    first = TrainingPool(v102s_ii, (0, 20_000), 128, stride=8)
    second = TrainingPool(v102s_ii, (40_000, 60_000), 128, stride=8)
    joined = TrainingPool.joined([first, second])
    assert len(joined) == len(first) + len(second)
    np.testing.assert_array_equal(joined.labels, np.concatenate([first.labels, second.labels]))
    index = np.array([0, len(first) - 1])
    np.testing.assert_array_equal(joined.cut(index), first.cut(index))
    np.testing.assert_array_equal(joined.cut(index + len(first)), second.cut(index))


def test_shipped_model_finds_the_detectors_beats_on_another_persons_held_out_ecg(v102s_ii: EcgRecord) -> None:
    """v102s (PhysioNet/CinC 2015, another person and monitor than MIT-BIH record 100): on lead II's last 20 %,
    which no model was trained on, the served model's beats and the classical detector's agree both ways."""
    artifact = ModelRepository(REPO / "models").get("ecg-beat-pruned")
    backend = load_backend(artifact)
    pre = artifact.metadata.preprocessing
    assert (pre["stride_samples"], pre["threshold"], pre["refractory_ms"]) == (
        STRIDE_SAMPLES,
        THRESHOLD,
        REFRACTORY_MS,
    )

    def predict(x: np.ndarray) -> np.ndarray:
        return backend.run({"ecg": x})["probabilities"][:, 1]

    lead = v102s_ii
    bounds = (Split.of(lead.signal.size).held_out[0], lead.signal.size)
    agreement = agreement_part(lead, bounds, predict, 128)
    assert agreement["reference_beats"] >= 80
    assert agreement["sensitivity"] >= 0.9 and agreement["positive_predictivity"] >= 0.9, agreement
    assert abs(agreement["median_offset_ms"]) <= 60, agreement  # the detector marks the largest deflection

    # The same, spelled out as the worker does it, over the whole held-out part (no span left out).
    x, centres = sliding_segments(lead.signal[bounds[0] :], 128, STRIDE_SAMPLES)
    beats, _ = detect_beats(centres + bounds[0], predict(x), THRESHOLD, round(REFRACTORY_MS * 256 / 1000))
    reference = lead.beats[lead.beats >= bounds[0] + 64]
    tp, fp, fn = match_beats(beats, reference, TOLERANCE_MS * 256 / 1000)
    assert tp >= 0.8 * reference.size and tp >= 0.8 * (tp + fp), (tp, fp, fn)
