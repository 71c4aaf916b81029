"""The scores: segment-level macro-F1, Se and PPV; beat-level Se and PPV as the served worker finds beats."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.dataset import IGNORE, Split, load_record, segments_in
from services.inference.evaluation import beat_scores, evaluate_part, segment_scores


def test_segment_scores_from_a_known_confusion() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, IGNORE, IGNORE])
    probability = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.1, 0.0, 0.4, 1.0, 0.0])
    scores = segment_scores(labels, probability)
    assert (scores["tp"], scores["fn"], scores["fp"], scores["tn"]) == (2, 1, 1, 4)
    assert scores["segments"] == 8  # don't care left out
    assert scores["sensitivity"] == pytest.approx(2 / 3)
    assert scores["positive_predictivity"] == pytest.approx(2 / 3)
    f1_beat, f1_none = 2 * 2 / (2 * 2 + 1 + 1), 2 * 4 / (2 * 4 + 1 + 1)
    assert scores["macro_f1"] == pytest.approx((f1_beat + f1_none) / 2)


def test_an_oracle_finds_every_held_out_beat_and_nothing_else() -> None:
    record = load_record(seconds=120)
    split = Split.of(record.signal.size)
    segments = segments_in(record, split.held_out, 4)
    oracle = (segments.labels == 1).astype(np.float32)
    scores = beat_scores(segments.centres, oracle, record.beats, record.rate_hz)
    assert scores["reference_beats"] > 20
    assert scores["sensitivity"] == 1.0 and scores["positive_predictivity"] == 1.0
    assert abs(scores["median_offset_ms"]) <= 50

    # evaluate_part slides over the part itself and scores both levels from one pass.
    def predict(x: np.ndarray) -> np.ndarray:
        assert x.shape == segments.x.shape
        return oracle

    both = evaluate_part(record, split.held_out, predict, 128)
    assert both["segment"]["macro_f1"] == 1.0 and both["beat"]["sensitivity"] == 1.0
    silent = evaluate_part(record, split.held_out, lambda x: np.zeros(x.shape[0], dtype=np.float32), 128)
    assert silent["beat"]["sensitivity"] == 0.0 and silent["segment"]["sensitivity"] == 0.0
    assert silent["segment"]["macro_f1"] < 0.5
