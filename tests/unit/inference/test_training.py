"""Training, distillation and pruning really do what they claim: on a real slice of MIT-BIH record 100."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from services.inference.dataset import EcgRecord, Split, load_record
from services.inference.nets import STUDENT, TEACHER, BeatNet, config_of, count_parameters
from services.inference.training import (
    Distillation,
    TrainingPool,
    TrainSettings,
    distill,
    distillation_loss,
    macs_and_parameters,
    mean_distillation_loss,
    prune_channels,
    teacher_logits,
    train_teacher,
)

# Four blocks as the real nets have: with global average pooling, depth is what lets a net see where in the
# segment a QRS complex lies.
TINY_TEACHER = replace(TEACHER, widths=(8, 8, 16, 16), hidden=8)
TINY_STUDENT = replace(STUDENT, widths=(4, 4, 8, 8), hidden=4)


def quiet(line: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def record() -> EcgRecord:
    return load_record(seconds=90)


def tiny_settings(**overrides: object) -> TrainSettings:
    values: dict[str, object] = {"epochs": 3, "samples_per_epoch": 2048, "batch_size": 128, "learning_rate": 5e-3}
    values.update(overrides)
    return TrainSettings(**values)  # type: ignore[arg-type]


def test_training_repeats_exactly_from_its_seed(record: EcgRecord) -> None:
    split = Split.of(record.signal.size)
    settings = tiny_settings(epochs=1, samples_per_epoch=256)
    first = train_teacher(TINY_TEACHER, record, split, settings, quiet)
    again = train_teacher(TINY_TEACHER, record, split, settings, quiet)
    for key, value in first.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key]), key
    other = train_teacher(TINY_TEACHER, record, split, replace(settings, seed=1), quiet)
    assert not torch.equal(first.net.features[0].weight, other.net.features[0].weight)


def test_distillation_loss_is_zero_for_a_copy_of_a_confident_teacher() -> None:
    logits = torch.tensor([[8.0, -8.0], [-8.0, 8.0]])
    labels = torch.tensor([0, 1])
    assert float(distillation_loss(logits, logits, labels, Distillation(4.0, 1.0))) == pytest.approx(0.0, abs=1e-6)
    # Soft targets scaled by T^2; hard labels by (1 - alpha).
    student = torch.zeros(2, 2)
    hard = float(torch.nn.functional.cross_entropy(student, labels))
    assert float(distillation_loss(student, logits, labels, Distillation(4.0, 0.0))) == pytest.approx(hard)


def test_distillation_brings_the_student_closer_to_the_teacher(record: EcgRecord) -> None:
    split = Split.of(record.signal.size)
    teacher = train_teacher(TINY_TEACHER, record, split, tiny_settings(), quiet).net
    pool = TrainingPool(record, split.train, 128, stride=4)
    targets = teacher_logits(teacher, pool)
    kd = Distillation(temperature=4.0, alpha=0.7)
    probe = np.random.default_rng(5).choice(len(pool), 512, replace=False)
    torch.manual_seed(1)
    student = BeatNet(TINY_STUDENT)
    before = mean_distillation_loss(student, pool, targets, probe, kd)
    result = distill("student", student, pool, targets, record, split, tiny_settings(), kd, quiet)
    after = mean_distillation_loss(result.net, pool, targets, probe, kd)
    assert after < 0.8 * before, (before, after)


def _median_forward_seconds(nets: list[BeatNet], x: torch.Tensor, rounds: int = 15) -> list[float]:
    """Median time of a forward pass of each net, the nets interleaved round by round."""
    times: list[list[float]] = [[] for _ in nets]
    with torch.inference_mode():
        for net in nets:
            net(x)
        for _ in range(rounds):
            for i, net in enumerate(nets):
                t0 = time.perf_counter()
                net(x)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def test_pruning_removes_channels_parameters_macs_and_time() -> None:
    torch.manual_seed(0)
    net = BeatNet(TEACHER).eval()
    pruned = prune_channels(net, 0.75)
    config = config_of(pruned)
    assert config.widths == tuple(w // 4 for w in TEACHER.widths)
    assert config.hidden == TEACHER.hidden // 4
    assert pruned.config.widths == config.widths  # rebuilt from its own config: saves and loads as it is
    assert config_of(net).widths == TEACHER.widths  # the original is left alone
    convs = [m for m in pruned.features if isinstance(m, torch.nn.Conv1d)]
    assert [c.weight.shape[0] for c in convs] == list(config.widths)  # dense weights really narrower
    macs, params = macs_and_parameters(net)
    pruned_macs, pruned_params = macs_and_parameters(pruned)
    assert pruned_params == count_parameters(pruned) < params / 10
    assert pruned_macs < macs / 10
    # It still computes: the same state dict in a net built from the config gives the same outputs.
    x = torch.randn(32, 1, 128) * 0.3
    rebuilt = BeatNet(config).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), pruned(x))
    full, small = _median_forward_seconds([net, pruned], x)
    assert small < 0.6 * full, (full, small)
