"""The model pipeline behind `clisonix model`: train, distill, prune, export, evaluate, report.

Each step reads what the steps before it left in a work folder and writes its own results there; `export`
and `evaluate` write the served artifacts into the model repository (services.inference.repository), and
`report` writes the comparison (REPORT.md, pareto.png, report.json) beside them.

Work folder:
    run.json                    the data the run uses (record, lead, length, seed), fixed by `train`
    teacher|student|pruned.pt   state dicts; .json beside each: net config and how it was trained
    soft_targets.npz            the teacher's logits for the distillation pool (shared by distill and prune)
    teacher|student|pruned.onnx, pruned-int8.onnx, export.json (torch vs ONNX Runtime checks)
    evaluation.json             held-out scores of every variant on every runtime
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.errors import ClisonixError
from services.inference import report as reporting
from services.inference.dataset import (
    DEFAULT_CHANNEL,
    DEFAULT_RECORD,
    NEGATIVE_MS,
    POSITIVE_MS,
    WINDOW_SAMPLES,
    EcgRecord,
    Split,
    describe,
    load_record,
    load_silver,
    segments_in,
)
from services.inference.evaluation import (
    REFRACTORY_MS,
    STRIDE_SAMPLES,
    THRESHOLD,
    TOLERANCE_MS,
    agreement_part,
    evaluate_part,
    onnx_predictor,
    onnx_session,
    torch_predictor,
)
from services.inference.export import compare_onnx, export_onnx, quantize_int8
from services.inference.nets import LABELS, OUTPUTS, STUDENT, TEACHER, BeatNet, NetConfig, ServedBeatNet
from services.inference.repository import ArtifactMetadata, ModelArtifact, TensorSpec, read_artifact, write_artifact
from services.inference.training import (
    Augmentation,
    Distillation,
    Progress,
    TrainingPool,
    TrainSettings,
    distill,
    macs_and_parameters,
    prune_channels,
    seed_everything,
    stderr_progress,
    teacher_logits,
    train_teacher,
)

REPO = Path(__file__).resolve().parents[2]
TASK = "ecg-beat"
VERSION = "1"
STEPS = ("train", "distill", "prune", "export", "evaluate", "report")
# Variant -> (model name, runtime, precision, file) of the artifact shipped in the repository.
ARTIFACTS = {
    "teacher": ("ecg-beat-teacher", "torch", "fp32", "model.pt"),
    "student": ("ecg-beat-student", "onnxruntime", "fp32", "model.onnx"),
    "pruned": ("ecg-beat-pruned", "onnxruntime", "fp32", "model.onnx"),
    "pruned-int8": ("ecg-beat-pruned-int8", "onnxruntime", "int8", "model.onnx"),
}
# (variant, runtime) pairs that are scored and benchmarked, and the net behind each variant. The teacher is
# also quantised (not shipped) to show where int8 pays: in a net whose convolutions dominate its time.
MEASURED = (
    ("teacher", "torch"),
    ("teacher", "onnxruntime"),
    ("teacher-int8", "onnxruntime"),
    ("student", "torch"),
    ("student", "onnxruntime"),
    ("pruned", "torch"),
    ("pruned", "onnxruntime"),
    ("pruned-int8", "onnxruntime"),
)
NET_OF = {
    "teacher": "teacher",
    "teacher-int8": "teacher",
    "student": "student",
    "pruned": "pruned",
    "pruned-int8": "pruned",
}
# The step that writes each net (named in the error when it is missing).
STEP_OF = {"teacher": "train", "student": "distill", "pruned": "prune"}
DATA = REPO / "data" / "wfdb"
# Records without beat annotations whose ECG leads add training data, labelled by the classical detector
# (dataset.load_silver): the first 80 % of each (as record 100's split) for training, the rest never trained on.
EXTRA_RECORDS: tuple[tuple[Path, tuple[str, ...]], ...] = (
    (DATA / "v102s", ("II", "V")),
    (DATA / "a103l", ("II", "V")),
    (DATA / "mixedsignals", ("II", "III", "V")),
)
# (record name, lead) whose held-out last 20 % checks the models against the classical detector.
CROSS_RECORD = (("v102s", "II"), ("a103l", "II"))


@dataclass(frozen=True)
class PipelineOptions:
    """Everything a pipeline run depends on. Defaults are the shipped models' settings.

    seconds: use only the record's first seconds (tests); None: all of it.
    threads: torch intra-op threads while training (fixed, so runs repeat exactly).
    samples_per_epoch: segments per teacher epoch; student_samples_per_epoch: per distillation epoch.
    pool_stride: every how many samples a distillation segment is centred (the teacher labels them once).
    prune_ratio: fraction of each layer's channels pruning removes.
    bench_rounds, bench_calls: the report's interleaved rounds, and calls of each model per round and batch size.
    extra_records: unannotated records and leads added to training with the classical detector's beats as labels
    (their first 80 %; `seconds` cuts them too); cross_record: (record name, lead) of those whose held-out last
    20 % is scored as agreement with the detector.
    """

    work: Path = Path("build/models")
    repository: Path = Path("models")
    record: Path = DEFAULT_RECORD
    channel: str = DEFAULT_CHANNEL
    seconds: float | None = None
    seed: int = 0
    threads: int = 1
    teacher: NetConfig = TEACHER
    student: NetConfig = STUDENT
    teacher_epochs: int = 6
    samples_per_epoch: int = 16384
    student_epochs: int = 20
    finetune_epochs: int = 12
    student_samples_per_epoch: int = 16384
    pool_stride: int = 2
    prune_ratio: float = 0.5
    temperature: float = 4.0
    alpha: float = 0.7
    calibration_segments: int = 512
    bench_rounds: int = 30
    bench_calls: int = 10
    augmentation: Augmentation = field(default_factory=Augmentation)
    extra_records: tuple[tuple[Path, tuple[str, ...]], ...] = EXTRA_RECORDS
    cross_record: tuple[tuple[str, str], ...] = CROSS_RECORD


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _read_json(path: Path, step: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `clisonix model {step}` first")
    return json.loads(path.read_text())


def _record_label(path: Path) -> str:
    """The record's path relative to the project when it lies inside it (never a machine path)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return Path(path).name


@dataclass
class RunData:
    """The records and split a run uses: the annotated record (every score) and the extra leads labelled by
    the classical detector (training and the cross-record check)."""

    record: EcgRecord
    split: Split
    seed: int
    seconds: float | None
    extra: list[EcgRecord] = field(default_factory=list)
    cross_record: tuple[tuple[str, str], ...] = ()

    @cached_property
    def description(self) -> dict[str, Any]:
        """The training data as the artifacts' metadata states it."""
        return {**describe(self.record, self.split, STRIDE_SAMPLES), **describe_extra(self.extra, self.cross_record)}

    def pool(self, window_samples: int, stride: int = 1) -> TrainingPool:
        """Every training segment: record 100's training part and each extra lead's first 80 %."""
        pools = [TrainingPool(self.record, self.split.train, window_samples, stride)]
        for extra in self.extra:
            pools.append(TrainingPool(extra, extra_training_part(extra), window_samples, stride))
        return TrainingPool.joined(pools)

    def extra_lead(self, name: str, channel: str) -> EcgRecord:
        return next(r for r in self.extra if r.name == name and r.channel == channel)


def extra_training_part(record: EcgRecord) -> tuple[int, int]:
    """The first 80 % of an extra lead (as record 100's training and validation parts together)."""
    return (0, Split.of(record.signal.size).held_out[0])


def describe_extra(extra: list[EcgRecord], cross_record: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """What the extra training data was and how the cross-record check uses it, for the metadata."""
    leads = []
    for record in extra:
        lo, hi = extra_training_part(record)
        in_part = (record.beats >= lo) & (record.beats < hi)
        valid = record.valid if record.valid is not None else np.ones(record.signal.size, dtype=bool)
        leads.append(
            {
                "record": record.name,
                "lead": record.channel,
                "native_rate_hz": round(record.native_rate_hz, 3),
                "duration_s": round(record.duration_s, 3),
                "training_seconds": [round(lo / record.rate_hz, 3), round(hi / record.rate_hz, 3)],
                "detector_beats_in_training_part": int(in_part.sum()),
                "labels_hold_fraction_of_training_part": round(float(valid[lo:hi].mean()), 4),
            }
        )
    return {
        "extra_training_data": {
            "labels": (
                "silver labels, not annotations: the R-peaks of the project's classical detector (the fusion "
                "service's, services/fusion/features.py: neurokit2's gradient method, both QRS polarities) on the "
                "same preprocessed signal; segments are labelled against them as against annotated beats"
            ),
            "where_labels_hold": (
                "segments wholly between two detected beats at a plausible interval (0.3-2 s, 0.55-1.6 times the "
                "median of the 5 intervals either side) and more than 1 s from a missing sample; the rest left out"
            ),
            "split": (
                "the first 80% of each lead for training (no validation part: record 100's validation part "
                "selects every model); the last 20% never trained on"
            ),
            "leads": leads,
        },
        "cross_record_check": (
            "agreement, not accuracy: beats of the model against the classical detector's on the held-out last 20% "
            f"of {', '.join(f'{name} lead {lead}' for name, lead in cross_record)}, matched one to one within "
            f"{TOLERANCE_MS:g} ms, where the detector's labels hold"
        ),
    }


def _load_extra(extra_records: list[tuple[str, list[str]]], seconds: float | None) -> list[EcgRecord]:
    leads = []
    for path, channels in extra_records:
        record_path = Path(path) if Path(path).is_absolute() else REPO / path
        for channel in channels:
            leads.append(load_silver(record_path, channel, seconds))
    return leads


def _data(options: PipelineOptions) -> RunData:
    """Loads the records as `train` fixed them in run.json (or, for `train`, as the options say)."""
    run_file = options.work / "run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        record_path = Path(run["record_path"])
        record_path = record_path if record_path.is_absolute() else REPO / record_path
        record = load_record(record_path, run["channel"], run["seconds"])
        extra = _load_extra(run.get("extra_records", []), run["seconds"])
        cross = tuple((str(n), str(c)) for n, c in run.get("cross_record", []))
        return RunData(record, Split.of(record.signal.size), int(run["seed"]), run["seconds"], extra, cross)
    record = load_record(options.record, options.channel, options.seconds)
    extra = _load_extra(_extra_json(options), options.seconds)
    split = Split.of(record.signal.size)
    return RunData(record, split, options.seed, options.seconds, extra, options.cross_record)


def _extra_json(options: PipelineOptions) -> list[tuple[str, list[str]]]:
    return [(_record_label(path), list(channels)) for path, channels in options.extra_records]


def save_net(work: Path, name: str, net: BeatNet, info: dict[str, Any]) -> None:
    """Writes `name`.pt (the state dict) and `name`.json (net config and training info) into `work`."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), work / f"{name}.pt")
    _write_json(work / f"{name}.json", {"net": net.config.to_json(), **info})


def load_net(work: Path, name: str) -> tuple[BeatNet, dict[str, Any]]:
    """The net `name` (teacher, student, pruned) saved in `work` (eval mode) and its info."""
    info = _read_json(work / f"{name}.json", STEP_OF[name])
    net = BeatNet(NetConfig.from_json(info["net"]))
    net.load_state_dict(torch.load(work / f"{name}.pt", weights_only=True))
    return net.eval(), info


def load_torch_model(artifact: ModelArtifact) -> ServedBeatNet:
    """A torch artifact of the repository as the served module (eval mode): outputs (logits, probabilities)."""
    meta = artifact.metadata
    if meta.runtime != "torch":
        raise ValueError(f"model {meta.name} version {meta.version} is a {meta.runtime} artifact, not torch")
    net = BeatNet(NetConfig.from_json(meta.net))
    net.load_state_dict(torch.load(artifact.path, weights_only=True))
    return ServedBeatNet(net.eval()).eval()


def _train_settings(options: PipelineOptions, epochs: int, samples: int, seed_offset: int, lr: float) -> TrainSettings:
    return TrainSettings(
        epochs=epochs,
        samples_per_epoch=samples,
        learning_rate=lr,
        seed=options.seed + seed_offset,
        augmentation=options.augmentation,
    )


def step_train(options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Trains the teacher on the labels; fixes the run's data in run.json."""
    options.work.mkdir(parents=True, exist_ok=True)
    run_file = options.work / "run.json"
    run_file.unlink(missing_ok=True)
    seed_everything(options.seed, options.threads)
    data = _data(options)
    _write_json(
        run_file,
        {
            "record_path": _record_label(options.record),
            "channel": options.channel,
            "seconds": options.seconds,
            "seed": options.seed,
            "extra_records": _extra_json(options),
            "cross_record": [list(pair) for pair in options.cross_record],
        },
    )
    pool = data.pool(options.teacher.window_samples)
    progress(
        f"train: record {data.record.name} lead {data.record.channel}, {data.record.duration_s:.0f} s, "
        f"{data.record.beats.size} beats; {len(data.extra)} extra leads labelled by the classical detector; "
        f"{len(pool)} training segments; teacher widths {list(options.teacher.widths)}"
    )
    settings = _train_settings(options, options.teacher_epochs, options.samples_per_epoch, 0, 2e-3)
    result = train_teacher(options.teacher, data.record, data.split, settings, progress, pool)
    info = {"training": {**result.summary(), "loss": "cross-entropy, balanced batches", **_settings_json(settings)}}
    save_net(options.work, "teacher", result.net, info)
    return info


def _settings_json(settings: TrainSettings) -> dict[str, Any]:
    return {
        "epochs": settings.epochs,
        "samples_per_epoch": settings.samples_per_epoch,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "optimiser": f"AdamW (weight decay {settings.weight_decay:g}), one-cycle schedule",
        "augmentation": {
            "amplitude_scale": f"exp(U(-{settings.augmentation.scale:g}, {settings.augmentation.scale:g}))",
            "offset_mv": settings.augmentation.offset_mv,
            "noise_mv": settings.augmentation.noise_mv,
            "time_shift": "any segment centre of the training parts",
        },
        "seed": settings.seed,
    }


def _pool_and_targets(options: PipelineOptions, data: RunData, progress: Progress) -> tuple[TrainingPool, np.ndarray]:
    """The distillation pool and the teacher's logits for it (computed once, kept in soft_targets.npz)."""
    pool = data.pool(options.teacher.window_samples, options.pool_stride)
    cache = options.work / "soft_targets.npz"
    if cache.is_file():
        stored = np.load(cache)
        if np.array_equal(stored["centres"], pool.centres):
            return pool, stored["logits"]
    teacher, _ = load_net(options.work, "teacher")
    progress(f"distill: teacher logits for {len(pool)} training segments (every {options.pool_stride} samples)")
    logits = teacher_logits(teacher, pool)
    np.savez(cache, centres=pool.centres, logits=logits)
    return pool, logits


def step_distill(options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Trains the student on the teacher's soft targets and the labels."""
    seed_everything(options.seed, options.threads)
    data = _data(options)
    pool, logits = _pool_and_targets(options, data, progress)
    torch.manual_seed(options.seed + 1)
    student = BeatNet(options.student)
    kd = Distillation(options.temperature, options.alpha)
    settings = _train_settings(options, options.student_epochs, options.student_samples_per_epoch, 1, 5e-3)
    result = distill("student", student, pool, logits, data.record, data.split, settings, kd, progress)
    info = {
        "training": {**result.summary(), **_kd_json(kd, len(pool), options.pool_stride), **_settings_json(settings)}
    }
    save_net(options.work, "student", result.net, info)
    return info


def _kd_json(kd: Distillation, pool: int, stride: int) -> dict[str, Any]:
    return {
        "loss": (
            f"knowledge distillation: {kd.alpha:g} x T^2 x KL(teacher_T || student_T) + {1 - kd.alpha:g} x "
            f"cross-entropy(labels), T = {kd.temperature:g}, on balanced batches"
        ),
        "distillation_pool": f"{pool} training segments centred every {stride} samples, teacher logits on clean input",
    }


def step_prune(options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Prunes the student's channels (structured: the layers get narrower) and fine-tunes it by distillation."""
    seed_everything(options.seed, options.threads)
    data = _data(options)
    student, _ = load_net(options.work, "student")
    pool, logits = _pool_and_targets(options, data, progress)
    before = macs_and_parameters(student)
    pruned = prune_channels(student, options.prune_ratio, options.seed)
    after = macs_and_parameters(pruned)
    progress(
        f"prune: widths {list(student.config.widths)} -> {list(pruned.config.widths)}, hidden "
        f"{student.config.hidden} -> {pruned.config.hidden}; parameters {before[1]} -> {after[1]}, "
        f"MACs {before[0]} -> {after[0]}"
    )
    kd = Distillation(options.temperature, options.alpha)
    settings = _train_settings(options, options.finetune_epochs, options.student_samples_per_epoch, 2, 2e-3)
    result = distill("pruned", pruned, pool, logits, data.record, data.split, settings, kd, progress)
    info = {
        "pruning": {
            "method": pruned.config.extra.get("pruning", ""),
            "ratio": options.prune_ratio,
            "parameters": [before[1], after[1]],
            "macs": [before[0], after[0]],
        },
        "training": {**result.summary(), **_kd_json(kd, len(pool), options.pool_stride), **_settings_json(settings)},
    }
    save_net(options.work, "pruned", result.net, info)
    return info


def preprocessing(record: EcgRecord) -> dict[str, Any]:
    """What the served model expects its input to be, for the artifacts' metadata."""
    return {
        "input": (
            f"filtered single-lead ECG in {record.unit}, {WINDOW_SAMPLES} samples at {record.rate_hz:g} Hz, as the "
            "fusion service's fused windows carry it; no normalisation (the net reads the signal as it is)"
        ),
        "filters": list(record.filters),
        "filters_applied": (
            f"causally at the native rate ({record.native_rate_hz:g} Hz in training), then resampled onto the "
            f"{record.rate_hz:g} Hz grid by linear interpolation (services.fusion.filters.resample_to_grid)"
        ),
        "normalisation": "none",
        "unit": record.unit,
        "sample_rate_hz": record.rate_hz,
        "window_samples": WINDOW_SAMPLES,
        "segment_centre": f"start + {WINDOW_SAMPLES // 2}",
        "label_positive_ms": POSITIVE_MS,
        "label_negative_ms": NEGATIVE_MS,
        "stride_samples": STRIDE_SAMPLES,
        "threshold": THRESHOLD,
        "refractory_ms": REFRACTORY_MS,
        "match_tolerance_ms": TOLERANCE_MS,
        "beats": (
            "slide over the signal every stride_samples (services.inference.beats.sliding_segments), then "
            "detect_beats(threshold, refractory) on the 'beat' probability"
        ),
    }


def _check_tolerance(check: dict[str, float], atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    return (
        check["max_abs_diff_logits"] <= atol + rtol * check["max_abs_logit"]
        and check["max_abs_diff_probabilities"] <= atol
    )


def step_export(options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Exports every net to ONNX (checked against torch), quantises the pruned one to int8, and writes the
    four artifacts into the repository (their held-out metrics follow from `evaluate`)."""
    seed_everything(options.seed, options.threads)
    data = _data(options)
    check_x = segments_in(data.record, data.split.validation, 16).x[:512]
    nets: dict[str, tuple[BeatNet, dict[str, Any]]] = {}
    checks: dict[str, Any] = {}
    for name in ("teacher", "student", "pruned"):
        nets[name] = load_net(options.work, name)
        path = export_onnx(nets[name][0], options.work / f"{name}.onnx")
        check = compare_onnx(nets[name][0], path, check_x)
        check["within_tolerance"] = _check_tolerance(check)
        if not check["within_tolerance"]:
            raise RuntimeError(f"ONNX Runtime and torch disagree on the {name}: {check}")
        checks[name] = check
        progress(f"export: {name}.onnx, largest |ONNX - torch| logit difference {check['max_abs_diff_logits']:.2e}")
    pool = data.pool(WINDOW_SAMPLES)
    calibration = pool.cut(pool.balanced(options.calibration_segments, np.random.default_rng(options.seed + 3)))
    for name in ("pruned", "teacher"):
        int8_path = options.work / f"{name}-int8.onnx"
        quantisation = quantize_int8(options.work / f"{name}.onnx", int8_path, calibration)
        fp32 = onnx_predictor(onnx_session(options.work / f"{name}.onnx"))(check_x)
        int8 = onnx_predictor(onnx_session(int8_path))(check_x)
        agreement = float(np.mean((fp32 >= THRESHOLD) == (int8 >= THRESHOLD)))
        checks[f"{name}-int8"] = {
            **quantisation,
            "decision_agreement_with_fp32": agreement,
            "max_abs_diff_probabilities": float(np.abs(fp32 - int8).max()),
        }
        progress(f"export: {name}-int8.onnx agrees with fp32 on {agreement:.2%} of {check_x.shape[0]} segments")
    _write_json(options.work / "export.json", checks)
    for variant in ARTIFACTS:
        publish(options, data, variant, nets[NET_OF[variant]], metrics={})
    return checks


def publish(
    options: PipelineOptions,
    data: RunData,
    variant: str,
    net_and_info: tuple[BeatNet, dict[str, Any]],
    metrics: dict[str, Any],
) -> ModelArtifact:
    """Writes one artifact into the repository from the work folder's files."""
    name, runtime, precision, file = ARTIFACTS[variant]
    net, info = net_and_info
    source = options.work / ({"teacher": "teacher.pt"}.get(variant) or f"{variant}.onnx")
    training = {**data.description, "training": info.get("training", {})}
    if "pruning" in info:
        training["pruning"] = info["pruning"]
    if variant == "pruned-int8":
        training["quantisation"] = _read_json(options.work / "export.json", "export").get("pruned-int8", {})
    metadata = ArtifactMetadata(
        name=name,
        version=VERSION,
        task=TASK,
        variant=variant,
        runtime=runtime,
        precision=precision,
        file=file,
        inputs=(TensorSpec("ecg", "FP32", (-1, 1, WINDOW_SAMPLES)),),
        outputs=tuple(TensorSpec(o, "FP32", (-1, len(LABELS))) for o in OUTPUTS),
        modality="ecg",
        channels=(data.record.channel,),
        sample_rate_hz=data.record.rate_hz,
        window_samples=WINDOW_SAMPLES,
        labels=LABELS,
        net=net.config.to_json(),
        preprocessing=preprocessing(data.record),
        metrics=metrics,
        training_data=training,
        seed=data.seed,
    )
    options.repository.mkdir(parents=True, exist_ok=True)
    # write_artifact moves its payload: hand it a copy on the repository's filesystem.
    with tempfile.TemporaryDirectory(dir=options.repository) as tmp:
        payload = Path(tmp) / file
        shutil.copyfile(source, payload)
        return write_artifact(options.repository, metadata, payload)


def _artifact(options: PipelineOptions, variant: str) -> ModelArtifact:
    name = ARTIFACTS[variant][0]
    return read_artifact(options.repository / name / VERSION)


def predictors(options: PipelineOptions) -> dict[tuple[str, str], Any]:
    """The model behind every measured (variant, runtime): a torch ServedBeatNet or an ONNX Runtime session.
    What the repository ships is loaded from it (so its files are what is scored); the rest from the work
    folder."""
    models: dict[tuple[str, str], Any] = {}
    for variant, runtime in MEASURED:
        shipped = variant in ARTIFACTS and ARTIFACTS[variant][1] == runtime
        if runtime == "torch":
            if shipped:
                models[variant, runtime] = load_torch_model(_artifact(options, variant))
            else:
                models[variant, runtime] = ServedBeatNet(load_net(options.work, NET_OF[variant])[0]).eval()
        else:
            path = _artifact(options, variant).path if shipped else options.work / f"{variant}.onnx"
            models[variant, runtime] = onnx_session(path)
    return models


def _predict(model: Any) -> Any:
    if isinstance(model, ServedBeatNet):
        return torch_predictor(model.net)
    return onnx_predictor(model)


def step_evaluate(options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Scores every variant on every runtime on the held-out part; writes evaluation.json and the artifacts'
    metrics."""
    seed_everything(options.seed, options.threads)
    data = _data(options)
    results: list[dict[str, Any]] = []
    for (variant, runtime), model in predictors(options).items():
        scores = evaluate_part(data.record, data.split.held_out, _predict(model), WINDOW_SAMPLES)
        cross = cross_record_scores(data, _predict(model))
        results.append({"variant": variant, "runtime": runtime, "held_out": scores, "cross_record": cross})
        seg, beat = scores["segment"], scores["beat"]
        agreement = "; ".join(
            f"{key} agreement Se {a['sensitivity']:.4f} PPV {a['positive_predictivity']:.4f}"
            for key, a in cross.items()
        )
        progress(
            f"evaluate: {variant:<12} {runtime:<11} segment macro-F1 {seg['macro_f1']:.4f} Se "
            f"{seg['sensitivity']:.4f} PPV {seg['positive_predictivity']:.4f}; beats Se {beat['sensitivity']:.4f} "
            f"PPV {beat['positive_predictivity']:.4f} ({beat['tp']} of {beat['reference_beats']}); {agreement}"
        )
    evaluation = {"split": data.description, "results": results}
    _write_json(options.work / "evaluation.json", evaluation)
    for variant, (_, runtime, _, _) in ARTIFACTS.items():
        scores = next(r["held_out"] for r in results if r["variant"] == variant and r["runtime"] == runtime)
        net_info = load_net(options.work, NET_OF[variant])
        validation = net_info[1].get("training", {}).get("validation_macro_f1")
        cross = next(r["cross_record"] for r in results if r["variant"] == variant and r["runtime"] == runtime)
        metrics = {"held_out": scores, "validation_macro_f1": validation, "cross_record_agreement": cross}
        publish(options, data, variant, net_info, metrics=metrics)
    return evaluation


def cross_record_scores(data: RunData, predict: Any) -> dict[str, Any]:
    """Agreement of a model's beats with the classical detector's on each cross-record lead's held-out last
    20 %, keyed "record lead"."""
    out: dict[str, Any] = {}
    for name, channel in data.cross_record:
        lead = data.extra_lead(name, channel)
        bounds = (extra_training_part(lead)[1], lead.signal.size)
        out[f"{name} {channel}"] = agreement_part(lead, bounds, predict, WINDOW_SAMPLES)
    return out


def step_report(options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Benchmarks every variant on every runtime side by side and writes REPORT.md, pareto.png and
    report.json into the repository folder."""
    seed_everything(options.seed, 1)
    data = _data(options)
    evaluation = _read_json(options.work / "evaluation.json", "evaluate")
    models = predictors(options)
    nets = {name: load_net(options.work, name)[0] for name in STEP_OF}
    held_out = segments_in(data.record, data.split.held_out, STRIDE_SAMPLES).x
    rows = reporting.build_rows(models, nets, NET_OF, evaluation["results"], options.work)
    figures = reporting.benchmark(rows, held_out, options.bench_rounds, options.bench_calls, progress)
    return reporting.write_report(options.repository, figures, evaluation, progress)


def run_steps(steps: list[str], options: PipelineOptions, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Runs the named steps in order (each as its own `clisonix model` command would)."""
    functions = {
        "train": step_train,
        "distill": step_distill,
        "prune": step_prune,
        "export": step_export,
        "evaluate": step_evaluate,
        "report": step_report,
    }
    out: dict[str, Any] = {}
    for step in steps:
        out[step] = functions[step](options, progress)
    return out


def parse_widths(text: str) -> tuple[int, ...]:
    """Conv widths from text: "64,128,128,256" -> (64, 128, 128, 256)."""
    widths = tuple(int(w) for w in text.split(",") if w.strip())
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be positive integers separated by commas, got {text!r}")
    return widths


def options_from_args(args: Any) -> PipelineOptions:
    """PipelineOptions from `clisonix model` arguments (an argparse namespace); an option left out (None)
    keeps the default."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    values: dict[str, Any] = {}
    for name in PipelineOptions.__dataclass_fields__:
        if name in given and name not in ("teacher", "student"):
            value = given[name]
            values[name] = Path(value) if name in ("work", "repository", "record") else value
    options = PipelineOptions(**values)
    if "teacher_widths" in given:
        options = replace(options, teacher=replace(options.teacher, widths=parse_widths(given["teacher_widths"])))
    if "student_widths" in given:
        options = replace(options, student=replace(options.student, widths=parse_widths(given["student_widths"])))
    return options


def main(args: Any) -> int:
    """`clisonix model STEP`: runs the step (or all of them for "all")."""
    steps = list(STEPS) if args.step == "all" else [args.step]
    try:
        run_steps(steps, options_from_args(args))
    except (FileNotFoundError, ClisonixError) as exc:
        stderr_progress(f"clisonix model {args.step}: {exc}")
        return 2
    return 0
