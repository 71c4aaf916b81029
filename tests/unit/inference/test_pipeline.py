"""The whole model pipeline, end to end, on a real slice of MIT-BIH record 100 with tiny nets: artifacts in a
temporary repository, ONNX and int8 checks, the report."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from services.cli import build_parser
from services.common.energy import SOURCES
from services.inference.dataset import Split, load_record, segments_in
from services.inference.evaluation import onnx_session
from services.inference.export import compare_onnx
from services.inference.nets import LABELS, OUTPUTS, STUDENT, TEACHER, ServedBeatNet, config_of
from services.inference.pipeline import (
    ARTIFACTS,
    MEASURED,
    PipelineOptions,
    load_net,
    load_torch_model,
    options_from_args,
    run_steps,
)
from services.inference.repository import ModelRepository

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Run:
    options: PipelineOptions
    lines: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("pipeline")
    options = PipelineOptions(
        work=root / "work",
        repository=root / "models",
        seconds=120,
        teacher=replace(TEACHER, widths=(8, 8, 16, 16), hidden=8),
        student=replace(STUDENT, widths=(4, 4, 8, 8), hidden=8),
        teacher_epochs=3,
        samples_per_epoch=2048,
        student_epochs=3,
        finetune_epochs=2,
        student_samples_per_epoch=2048,
        pool_stride=4,
        calibration_segments=128,
        bench_rounds=2,
        bench_calls=2,
    )
    lines: list[str] = []
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        run_steps(["train", "distill", "prune", "export", "evaluate", "report"], options, lines.append)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return Run(options, lines)


def test_progress_is_reported_per_epoch(run: Run) -> None:
    assert any(line.startswith("teacher epoch 3/3: loss") for line in run.lines)
    assert any(line.startswith("student epoch 1/3") for line in run.lines)
    assert any(line.startswith("pruned epoch 2/2") for line in run.lines)


def test_the_repository_holds_four_valid_artifacts(run: Run) -> None:
    repository = ModelRepository(run.options.repository)
    assert sorted(repository.models) == sorted(name for name, *_ in ARTIFACTS.values())
    for variant, (name, runtime, precision, file) in ARTIFACTS.items():
        meta = repository.get(name).metadata
        assert (meta.version, meta.task, meta.variant, meta.runtime, meta.precision, meta.file) == (
            "1",
            "ecg-beat",
            variant,
            runtime,
            precision,
            file,
        )
        assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("ecg", "FP32", (-1, 1, 128))]
        assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [(o, "FP32", (-1, 2)) for o in OUTPUTS]
        assert (meta.modality, meta.channels, meta.sample_rate_hz) == ("ecg", ("MLII",), 256.0)
        assert meta.window_samples == 128 and meta.labels == LABELS and meta.seed == 0 and meta.sha256
        pre = meta.preprocessing
        assert (pre["stride_samples"], pre["threshold"], pre["refractory_ms"]) == (4, 0.5, 200.0)
        assert pre["normalisation"] == "none" and pre["unit"] == "mV"
        assert any("bandpass 0.5-40 Hz" in f for f in pre["filters"])
        held_out = meta.metrics["held_out"]
        for key in ("macro_f1", "sensitivity", "positive_predictivity"):
            assert 0.0 <= held_out["segment"][key] <= 1.0
        assert {"sensitivity", "positive_predictivity", "tp", "fp", "fn"} <= set(held_out["beat"])
        data = meta.training_data
        assert "last 20% held out" in data["split"] and data["parts"]["held_out"]["annotated_beats"] > 0
        assert "training" in data
        # Beyond record 100: the other records' leads, labelled by the classical detector (said so), first 80 %.
        extra = data["extra_training_data"]
        assert "not annotations" in extra["labels"] and "first 80%" in extra["split"]
        assert {(lead["record"], lead["lead"]) for lead in extra["leads"]} >= {("v102s", "II"), ("a103l", "V")}
        assert all(lead["training_seconds"][1] <= 0.8 * lead["duration_s"] + 0.01 for lead in extra["leads"])
        assert "agreement, not accuracy" in data["cross_record_check"]
        agreement = meta.metrics["cross_record_agreement"]
        assert set(agreement) == {"v102s II", "a103l II"}
        assert all(a["reference"] == "classical detector" for a in agreement.values())
        # Nothing names the machine it was built on (the ONNX exporter records stack traces unless stripped).
        for file_path in (repository.get(name).folder / "metadata.json", repository.get(name).path):
            content = file_path.read_bytes()
            for where in (run.options.work, REPO, Path.home()):
                assert str(where).encode() not in content, (file_path.name, where)
            assert b"stack_trace" not in content
    pruned = repository.get("ecg-beat-pruned").metadata
    assert pruned.net["widths"] == [2, 2, 4, 4] and "pruning" in pruned.training_data
    assert "quantisation" in repository.get("ecg-beat-pruned-int8").metadata.training_data


def test_the_torch_artifact_loads_as_the_served_net(run: Run) -> None:
    artifact = ModelRepository(run.options.repository).get("ecg-beat-teacher")
    served = load_torch_model(artifact)
    assert isinstance(served, ServedBeatNet) and not served.training
    assert config_of(served.net).widths == (8, 8, 16, 16)
    with torch.inference_mode():
        logits, probabilities = served(torch.zeros(3, 1, 128))
    assert logits.shape == probabilities.shape == (3, 2)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_onnx_agrees_with_torch_and_int8_mostly_with_fp32(run: Run) -> None:
    record = load_record(seconds=120)
    x = segments_in(record, Split.of(record.signal.size).held_out, 8).x
    for name in ("teacher", "student", "pruned"):
        net, _ = load_net(run.options.work, name)
        check = compare_onnx(net, run.options.work / f"{name}.onnx", x)
        assert check["max_abs_diff_logits"] <= 1e-5 + 1e-5 * check["max_abs_logit"], (name, check)
        assert check["max_abs_diff_probabilities"] <= 1e-5, (name, check)
    repository = ModelRepository(run.options.repository)
    fp32 = onnx_session(repository.get("ecg-beat-pruned").path)
    int8 = onnx_session(repository.get("ecg-beat-pruned-int8").path)
    assert [i.name for i in int8.get_inputs()] == ["ecg"] and [o.name for o in int8.get_outputs()] == list(OUTPUTS)
    for batch in (1, 7):  # the batch axis is dynamic
        assert int8.run(["probabilities"], {"ecg": x[:batch]})[0].shape == (batch, 2)
    p32 = fp32.run(["probabilities"], {"ecg": x})[0][:, 1]
    p8 = int8.run(["probabilities"], {"ecg": x})[0][:, 1]
    assert np.mean((p32 >= 0.5) == (p8 >= 0.5)) >= 0.9
    export = json.loads((run.options.work / "export.json").read_text())
    assert export["pruned-int8"]["decision_agreement_with_fp32"] >= 0.9


def test_report_writes_the_table_the_plot_and_the_figures(run: Run) -> None:
    folder = run.options.repository
    report = (folder / "REPORT.md").read_text()
    first = report.split("## Other records")[0]
    table = [line for line in first.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(MEASURED)
    assert "energy per window" in table[0] and "beat PPV" in table[0]
    assert "## Other records: agreement with the classical detector (not accuracy)" in report
    agreement = [line for line in report.splitlines() if line.startswith("| ") and "agreement Se" in line]
    assert agreement and "v102s II agreement Se" in agreement[0] and "a103l II agreement PPV" in agreement[0]
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((folder / "report.json").read_text())
    assert len(data["figures"]) == len(MEASURED)
    for figure in data["figures"]:
        assert figure["energy_source"] in SOURCES
        assert figure["batch_32"]["latency_us_per_window"] > 0 and figure["batch_1"]["energy_uj_per_window"] > 0
    if data["figures"][0]["energy_source"] == "estimate":
        assert "**estimate** (not a measurement)" in report
    assert {"pruned", "pruned-int8"} <= set(data["headline"]["targets"])


def test_cli_wires_every_step_and_its_options() -> None:
    parser = build_parser()
    for step in ("train", "distill", "prune", "export", "evaluate", "report", "all"):
        args = parser.parse_args(["model", step])
        assert args.step == step and args.func.__name__ == "cmd_model"
    args = parser.parse_args(
        ["model", "all", "--seconds", "60", "--work", "w", "--teacher-epochs", "1", "--student-widths", "2,2,4,4"]
    )
    options = options_from_args(args)
    assert options.seconds == 60 and options.work == Path("w") and options.teacher_epochs == 1
    assert options.student.widths == (2, 2, 4, 4) and options.teacher == TEACHER
    assert options.repository == PipelineOptions().repository


def test_a_step_before_its_inputs_exist_says_which_step_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["model", "distill", "--work", str(tmp_path / "w"), "--seconds", "60"])
    assert args.func(args) == 2
    assert "run `clisonix model train` first" in capsys.readouterr().err
