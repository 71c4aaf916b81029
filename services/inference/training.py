"""Training of the beat nets: the teacher from labels, the student by knowledge distillation, structured pruning
of the student and its fine-tuning by distillation again.

Pure: torch, numpy and torch_pruning; no I/O besides the progress lines handed to `progress`.

Every run is reproducible from its seed: torch's and numpy's generators are seeded, torch runs deterministic
algorithms, and the number of intra-op threads is fixed (a sum split over another number of threads rounds
differently).

Training segments are cut on the fly from the training parts of the signals (any centre: small time shifts for
free) and augmented: amplitude scaling (0.5-2x: leads, devices and people differ in gain), a small offset and
white noise, as electrode contact, gain and a restarted filter change them. Each epoch draws as many "beat" as
"no_beat" segments (balanced sampling), so neither class weights nor a shifted threshold are needed.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from services.inference.dataset import IGNORE, EcgRecord, Split, label_centres, segments_in
from services.inference.evaluation import segment_scores, torch_predictor
from services.inference.nets import BeatNet, NetConfig, config_of, count_parameters

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seeds torch and fixes its threads and algorithms, so a run repeats exactly."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class Augmentation:
    """Random changes applied to each training segment (0 turns one off).

    scale: amplitude multiplied by exp(U(-scale, scale)) (the default ln 2: 0.5-2x). offset_mv: U(-offset,
    offset) added. noise_mv: white noise of a standard deviation drawn from U(0, noise_mv).
    """

    scale: float = math.log(2.0)
    offset_mv: float = 0.1
    noise_mv: float = 0.03

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = x.shape[0]
        out = x * np.exp(rng.uniform(-self.scale, self.scale, (n, 1, 1))).astype(np.float32)
        out += rng.uniform(-self.offset_mv, self.offset_mv, (n, 1, 1)).astype(np.float32)
        sigma = rng.uniform(0.0, self.noise_mv, (n, 1, 1)).astype(np.float32)
        out += rng.standard_normal(x.shape, dtype=np.float32) * sigma
        return out


NO_AUGMENTATION = Augmentation(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TrainSettings:
    """One training run. samples_per_epoch: segments drawn per epoch, half of each class. patience: epochs
    without a better validation macro-F1 before stopping (0: never stop early)."""

    epochs: int
    samples_per_epoch: int = 16_384
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 0
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""

    temperature: float = 4.0
    alpha: float = 0.7


class TrainingPool:
    """The labelled training segments of a record as centres, cut out batch by batch (a copy of every segment
    would take hundreds of MB). Segments that reach a sample whose labels do not hold (EcgRecord.valid) are
    left out. `joined` makes one pool of several records' pools."""

    def __init__(self, record: EcgRecord, bounds: tuple[int, int], window_samples: int, stride: int = 1) -> None:
        lo, hi = bounds
        half = window_samples // 2
        centres = np.arange(lo + half, hi - window_samples + half + 1, stride, dtype=np.int64)
        labels = label_centres(centres, record.beats, record.rate_hz)
        keep = (labels != IGNORE) & record.valid_segments(centres, window_samples)
        self.signal = record.signal
        self.window_samples = window_samples
        self.centres = centres[keep]
        self.labels = labels[keep].astype(np.int64)

    @classmethod
    def joined(cls, pools: list[TrainingPool]) -> TrainingPool:
        """One pool holding every entry of `pools` (same window), in their order: their signals end to end,
        each pool's centres shifted by the length of the signals before it."""
        if not pools or len({p.window_samples for p in pools}) != 1:
            raise ValueError("joined needs at least one pool, all of the same window")
        joined = cls.__new__(cls)
        offsets = np.cumsum([0] + [p.signal.size for p in pools[:-1]])
        joined.signal = np.concatenate([p.signal for p in pools])
        joined.window_samples = pools[0].window_samples
        joined.centres = np.concatenate([p.centres + o for p, o in zip(pools, offsets, strict=True)])
        joined.labels = np.concatenate([p.labels for p in pools])
        return joined

    def __len__(self) -> int:
        return int(self.centres.size)

    def cut(self, index: np.ndarray) -> np.ndarray:
        """Segments (n, 1, window) float32 of the pool entries `index`."""
        starts = self.centres[index] - self.window_samples // 2
        return self.signal[starts[:, None] + np.arange(self.window_samples)][:, None, :]

    def balanced(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` pool entries, half of each class, in random order (with replacement only when a class has
        fewer entries than its half)."""
        chosen = []
        for label in (0, 1):
            members = np.flatnonzero(self.labels == label)
            half = count // 2 if label == 0 else count - count // 2
            chosen.append(rng.choice(members, half, replace=half > members.size))
        return rng.permutation(np.concatenate(chosen))


def _epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]


def validation_scores(net: BeatNet, record: EcgRecord, split: Split, stride: int = 4) -> tuple[float, float]:
    """Macro-F1 and mean cross-entropy of `net` on the validation part's labelled segments (every `stride`)."""
    segments = segments_in(record, split.validation, stride, net.config.window_samples).labelled()
    probability = torch_predictor(net)(segments.x).astype(np.float64)
    p_true = np.clip(np.where(segments.labels == 1, probability, 1 - probability), 1e-7, 1.0)
    return float(segment_scores(segments.labels, probability)["macro_f1"]), float(-np.log(p_true).mean())


@dataclass
class TrainResult:
    """The selected net (best validation macro-F1) and the per-epoch history."""

    net: BeatNet
    best_epoch: int
    best_validation_macro_f1: float
    history: list[dict[str, float]]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "validation_macro_f1": self.best_validation_macro_f1,
            "epochs_run": len(self.history),
            "seconds": round(self.seconds, 1),
            "history": self.history,
            "parameters": count_parameters(self.net),
        }


def _fit(
    name: str,
    net: BeatNet,
    record: EcgRecord,
    split: Split,
    settings: TrainSettings,
    loss_of: Callable[[torch.Tensor, np.ndarray, np.ndarray], torch.Tensor],
    pool: TrainingPool,
    progress: Progress,
) -> TrainResult:
    """The loop all three trainings share: balanced epochs, AdamW with a one-cycle schedule, model selection on
    the validation part's macro-F1, ties (it saturates on clean records) broken by the lower validation
    cross-entropy. loss_of(logits, pool indices, labels) gives the batch loss."""
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(settings.samples_per_epoch / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=max(steps, 1), pct_start=0.15
    )
    best: tuple[float, float] = (-1.0, 0.0)
    best_epoch, best_state = 0, {k: v.clone() for k, v in net.state_dict().items()}
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        total, seen = 0.0, 0
        for index in _epoch_batches(pool.balanced(settings.samples_per_epoch, rng), settings.batch_size):
            x = settings.augmentation.apply(pool.cut(index), rng)
            logits = net(torch.from_numpy(x))
            loss = loss_of(logits, index, pool.labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * index.size
            seen += index.size
        net.eval()
        f1, cross_entropy = validation_scores(net, record, split)
        better = (round(f1, 6), -cross_entropy) > best
        if better:
            best, best_epoch = (round(f1, 6), -cross_entropy), epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        history.append(
            {
                "epoch": epoch,
                "loss": round(total / max(seen, 1), 6),
                "validation_macro_f1": round(f1, 6),
                "validation_cross_entropy": round(cross_entropy, 6),
            }
        )
        progress(
            f"{name} epoch {epoch}/{settings.epochs}: loss {total / max(seen, 1):.4f}, validation macro-F1 "
            f"{f1:.4f} cross-entropy {cross_entropy:.4f}{' (best)' if better else ''}, "
            f"{time.perf_counter() - t0:.1f} s"
        )
        if settings.patience and epoch - best_epoch >= settings.patience:
            progress(f"{name}: no better validation macro-F1 for {settings.patience} epochs; stopping")
            break
    net.load_state_dict(best_state)
    net.eval()
    return TrainResult(net, best_epoch, best[0], history, time.perf_counter() - started)


def train_teacher(
    config: NetConfig,
    record: EcgRecord,
    split: Split,
    settings: TrainSettings,
    progress: Progress = stderr_progress,
    pool: TrainingPool | None = None,
) -> TrainResult:
    """Trains a net from the labels alone (cross-entropy on balanced batches) on `pool` (None: the training
    part of `record`); the validation part of `record` selects the epoch."""
    torch.manual_seed(settings.seed)
    net = BeatNet(config)
    pool = pool or TrainingPool(record, split.train, config.window_samples)

    def loss_of(logits: torch.Tensor, index: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        return F.cross_entropy(logits, torch.from_numpy(labels))

    return _fit("teacher", net, record, split, settings, loss_of, pool, progress)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, distillation: Distillation
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(labels).

    The T^2 keeps the soft targets' gradients on the scale of the hard ones' as T changes (Hinton et al.)."""
    t = distillation.temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return distillation.alpha * t * t * soft + (1 - distillation.alpha) * hard


def teacher_logits(teacher: BeatNet, pool: TrainingPool, batch_size: int = 1024) -> np.ndarray:
    """The teacher's logits for every pool entry (clean segments), computed once for all distillation epochs."""
    teacher.eval()
    out = np.empty((len(pool), teacher.config.classes), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(pool), batch_size):
            index = np.arange(start, min(start + batch_size, len(pool)))
            out[index] = teacher(torch.from_numpy(pool.cut(index))).numpy()
    return out


def distill(
    name: str,
    student: BeatNet,
    pool: TrainingPool,
    soft_targets: np.ndarray,
    record: EcgRecord,
    split: Split,
    settings: TrainSettings,
    distillation: Distillation,
    progress: Progress = stderr_progress,
) -> TrainResult:
    """Trains `student` (fresh or pruned) on the teacher's logits for the pool (`soft_targets`, from clean
    segments; the student sees them augmented, so it learns to answer as the teacher does on clean signal) and
    on the labels."""
    targets = torch.from_numpy(soft_targets)

    def loss_of(logits: torch.Tensor, index: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        return distillation_loss(logits, targets[index], torch.from_numpy(labels), distillation)

    return _fit(name, student, record, split, settings, loss_of, pool, progress)


def mean_distillation_loss(
    student: BeatNet, pool: TrainingPool, soft_targets: np.ndarray, index: np.ndarray, distillation: Distillation
) -> float:
    """The distillation loss of `student` on the pool entries `index` (clean segments), in eval mode."""
    student.eval()
    with torch.inference_mode():
        logits = student(torch.from_numpy(pool.cut(index)))
        loss = distillation_loss(
            logits, torch.from_numpy(soft_targets[index]), torch.from_numpy(pool.labels[index]), distillation
        )
    return float(loss)


def final_linear(net: BeatNet) -> nn.Linear:
    return [m for m in net.head if isinstance(m, nn.Linear)][-1]


def prune_channels(net: BeatNet, ratio: float, seed: int = 0) -> BeatNet:
    """Removes `ratio` of the channels of every conv block and of the dense hidden layer, lowest group L2 norm
    first (torch_pruning's MetaPruner with GroupMagnitudeImportance; the logits layer keeps its outputs).
    The pruned layers are really narrower: a new BeatNet with the narrower config holds the kept weights."""
    if not 0 < ratio < 1:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    torch.manual_seed(seed)
    net = copy.deepcopy(net).eval()
    original = config_of(net)
    example = torch.zeros(1, net.config.in_channels, net.config.window_samples)
    pruner = tp.pruner.MetaPruner(
        net,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[final_linear(net)],
    )
    pruner.step()
    pruned_config = config_of(net)
    extra = {
        **pruned_config.extra,
        "pruned_from": original.to_json() | {"extra": {}},
        "pruning": f"torch_pruning MetaPruner, GroupMagnitudeImportance(p=2), ratio {ratio:g}",
    }
    rebuilt = BeatNet(NetConfig.from_json({**pruned_config.to_json(), "extra": extra}))
    rebuilt.load_state_dict(net.state_dict())
    return rebuilt.eval()


def macs_and_parameters(net: BeatNet) -> tuple[int, int]:
    """Multiply-accumulates of one segment's forward pass and parameters, as torch_pruning counts them."""
    example = torch.zeros(1, net.config.in_channels, net.config.window_samples)
    macs, params = tp.utils.count_ops_and_params(net, example)
    return int(macs), int(params)
