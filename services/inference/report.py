"""The model report: size, latency, CPU time and energy per window of every variant on every runtime, measured
side by side, with their held-out scores; a Markdown table, a Pareto plot and the figures as JSON.

Timing runs one intra-op thread (torch.set_num_threads(1); ONNX Runtime sessions with one intra- and one
inter-op thread) and interleaves the models round by round, so a noisy neighbour slows them all alike.
Energy comes from services.common.energy.EnergyMeter: RAPL where the machine lets it be read (then it is the
whole CPU package's energy over the span), otherwise an estimate from CPU time; the source is written beside
every figure, and an estimate is never called a measurement.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.energy import DEFAULT_WATTS_PER_CORE, EnergyMeter
from services.inference.nets import BeatNet, ServedBeatNet, count_parameters
from services.inference.training import Progress, macs_and_parameters

BATCH_SIZES = (1, 32)
LABELS = {
    "teacher": "teacher",
    "teacher-int8": "teacher",
    "student": "student",
    "pruned": "pruned student",
    "pruned-int8": "pruned student",
}
RUNTIME_LABELS = {"torch": "torch eager", "onnxruntime": "ONNX Runtime"}
MACS_SOURCE = (
    "torch_pruning.utils.count_ops_and_params on one 128-sample segment: the multiply-accumulates of the conv and "
    "linear layers plus its counts for batch norm, pooling and activations (the same for a net's fp32 and int8 "
    "ONNX models; ONNX Runtime folds batch norm into the convolutions)"
)


@dataclass
class Row:
    """One model on one runtime, and what is known of it before timing."""

    variant: str
    runtime: str
    precision: str
    model: Any
    parameters: int
    macs: int
    file_bytes: int
    scores: dict[str, Any]
    cross_record: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{LABELS[self.variant]} ({RUNTIME_LABELS[self.runtime]}, {self.precision})"

    def caller(self, x: np.ndarray) -> Callable[[], Any]:
        """A no-argument call running the model once on `x` (inputs prepared outside the timed call)."""
        if isinstance(self.model, ServedBeatNet):
            tensor = torch.from_numpy(np.ascontiguousarray(x))
            model = self.model

            def call_torch() -> Any:
                with torch.inference_mode():
                    return model(tensor)

            return call_torch
        session, feed = self.model, {"ecg": np.ascontiguousarray(x)}
        return lambda: session.run(None, feed)


def build_rows(
    models: dict[tuple[str, str], Any],
    nets: dict[str, BeatNet],
    net_of: dict[str, str],
    results: list[dict[str, Any]],
    work: Path,
) -> list[Row]:
    """A Row per measured model: its net's parameters and MACs, its file's size, its held-out scores."""
    rows = []
    for (variant, runtime), model in models.items():
        net = nets[net_of[variant]]
        macs, _ = macs_and_parameters(net)
        file = work / (f"{variant}.onnx" if runtime == "onnxruntime" else f"{net_of[variant]}.pt")
        result = next(r for r in results if r["variant"] == variant and r["runtime"] == runtime)
        precision = "int8" if variant.endswith("int8") else "fp32"
        size = file.stat().st_size
        cross = result.get("cross_record", {})
        rows.append(
            Row(variant, runtime, precision, model, count_parameters(net), macs, size, result["held_out"], cross)
        )
    return rows


def benchmark(
    rows: list[Row],
    segments: np.ndarray,
    rounds: int,
    calls: int,
    progress: Progress,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> list[dict[str, Any]]:
    """Times every row at every batch size, `calls` calls per row and batch size in each of `rounds` rounds
    (the rows' order rotating from round to round): median latency per call, CPU time (this thread) and
    energy (EnergyMeter, source "auto") per window."""
    torch.set_num_threads(1)
    meter = EnergyMeter("auto")
    callers = {(i, b): row.caller(segments[:b]) for i, row in enumerate(rows) for b in batch_sizes}
    for call in callers.values():  # warm-up: first-call allocations, lazy initialisation
        for _ in range(3):
            call()
    latency: dict[tuple[int, int], list[float]] = {key: [] for key in callers}
    cpu = dict.fromkeys(callers, 0.0)
    joules = dict.fromkeys(callers, 0.0)
    progress(f"report: timing {len(rows)} models x batch sizes {list(batch_sizes)}, {rounds} interleaved rounds")
    started = time.perf_counter()
    for r in range(rounds):
        for offset in range(len(rows)):
            i = (r + offset) % len(rows)
            for b in batch_sizes:
                call = callers[i, b]
                times = latency[i, b]
                with meter.measure() as span:
                    c0 = time.thread_time()
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - t0)
                    cpu[i, b] += time.thread_time() - c0
                joules[i, b] += span.joules
    progress(f"report: timed in {time.perf_counter() - started:.1f} s; energy source {meter.source}")
    figures = []
    for i, row in enumerate(rows):
        entry: dict[str, Any] = {
            "label": row.label,
            "variant": row.variant,
            "runtime": row.runtime,
            "precision": row.precision,
            "parameters": row.parameters,
            "macs": row.macs,
            "file_bytes": row.file_bytes,
            "energy_source": meter.source,
            "held_out": row.scores,
            "cross_record": row.cross_record,
        }
        for b in batch_sizes:
            windows = rounds * calls * b
            median = statistics.median(latency[i, b])
            entry[f"batch_{b}"] = {
                "latency_ms_per_batch": median * 1e3,
                "latency_us_per_window": median / b * 1e6,
                "cpu_us_per_window": cpu[i, b] / windows * 1e6,
                "energy_uj_per_window": joules[i, b] / windows * 1e6,
                "windows": windows,
            }
        figures.append(entry)
    meter.close()
    return figures


def _find(figures: list[dict[str, Any]], variant: str, runtime: str) -> dict[str, Any] | None:
    return next((f for f in figures if f["variant"] == variant and f["runtime"] == runtime), None)


def headline(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparisons the targets name: energy per window of the (pruned) student on ONNX Runtime against the
    teacher in torch eager, with the macro-F1 lost ("targets"); and what int8 changes against fp32 on ONNX
    Runtime for each net quantised ("int8_vs_fp32")."""
    out: dict[str, Any] = {"targets": {}, "int8_vs_fp32": {}}
    teacher = _find(figures, "teacher", "torch")
    for variant in ("pruned", "pruned-int8", "student"):
        other = _find(figures, variant, "onnxruntime")
        if teacher is None or other is None:
            continue
        out["targets"][variant] = {
            f"energy_ratio_batch_{b}": teacher[f"batch_{b}"]["energy_uj_per_window"]
            / max(other[f"batch_{b}"]["energy_uj_per_window"], 1e-12)
            for b in BATCH_SIZES
        } | {
            "macro_f1_loss_points": 100
            * (teacher["held_out"]["segment"]["macro_f1"] - other["held_out"]["segment"]["macro_f1"]),
        }
    for net in ("teacher", "pruned"):
        fp32, int8 = _find(figures, net, "onnxruntime"), _find(figures, f"{net}-int8", "onnxruntime")
        if fp32 is None or int8 is None:
            continue
        out["int8_vs_fp32"][net] = {
            f"energy_ratio_batch_{b}": fp32[f"batch_{b}"]["energy_uj_per_window"]
            / max(int8[f"batch_{b}"]["energy_uj_per_window"], 1e-12)
            for b in BATCH_SIZES
        } | {
            "macro_f1_loss_points": 100
            * (fp32["held_out"]["segment"]["macro_f1"] - int8["held_out"]["segment"]["macro_f1"]),
        }
    return out


def _energy_note(source: str) -> str:
    if source == "estimate":
        return (
            f"**estimate** (not a measurement): CPU time of this process x {DEFAULT_WATTS_PER_CORE:g} W per busy "
            'core (services.common.energy, source "estimate"; no RAPL counter was readable)'
        )
    return f"measured by {source} (whole-package energy over each span, services.common.energy)"


def markdown(figures: list[dict[str, Any]], evaluation: dict[str, Any]) -> str:
    """The report's Markdown: the table, how it was measured, the headline ratios."""
    source = figures[0]["energy_source"] if figures else "estimate"
    split = evaluation.get("split", {})
    held = split.get("parts", {}).get("held_out", {})
    start, stop = held.get("seconds", ["?", "?"])
    lines = [
        "# ECG beat models: size, speed, energy and held-out scores",
        "",
        f"Task: {split.get('task', '')}.",
        "",
        f"Data: {split.get('record', '')}; split {split.get('split', '')}. Held-out part: seconds "
        f"{start}-{stop}, {held.get('annotated_beats', '?')} "
        f"annotated beats, {held.get('segments_beat', '?')} 'beat' and {held.get('segments_no_beat', '?')} 'no_beat' "
        f"segments (every {split.get('segment_stride_samples', '?')} samples; "
        f"{held.get('segments_dont_care', '?')} don't care left out).",
        "",
        *_extra_data_lines(split.get("extra_training_data")),
        "| model | runtime | params | MACs | file | latency b1 (ms) | latency b32 (ms / batch) | b32 per window (us) "
        "| CPU per window b1 / b32 (us) | energy per window b1 / b32 (uJ) | segment macro-F1 | segment Se | "
        "segment PPV | beat Se | beat PPV |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in figures:
        seg, beat = f["held_out"]["segment"], f["held_out"]["beat"]
        b1, b32 = f["batch_1"], f["batch_32"]
        lines.append(
            f"| {LABELS[f['variant']]} | {RUNTIME_LABELS[f['runtime']]} {f['precision']} | {f['parameters']:,} | "
            f"{f['macs']:,} | {f['file_bytes'] / 1024:.1f} KiB | {b1['latency_ms_per_batch']:.3f} | "
            f"{b32['latency_ms_per_batch']:.3f} | {b32['latency_us_per_window']:.1f} | "
            f"{b1['cpu_us_per_window']:.1f} / {b32['cpu_us_per_window']:.1f} | "
            f"{b1['energy_uj_per_window']:.1f} / {b32['energy_uj_per_window']:.1f} | {100 * seg['macro_f1']:.2f} % | "
            f"{100 * seg['sensitivity']:.2f} % | {100 * seg['positive_predictivity']:.2f} % | "
            f"{100 * beat['sensitivity']:.2f} % | {100 * beat['positive_predictivity']:.2f} % |"
        )
    lines += _cross_record_table(figures, evaluation)
    summary = headline(figures)
    lines += ["", "## Against the targets", ""]
    for variant, h in summary["targets"].items():
        lines.append(
            f"- {LABELS[variant]}{' int8' if variant.endswith('int8') else ''} on ONNX Runtime vs the teacher in "
            f"torch eager: {h['energy_ratio_batch_32']:.1f}x less energy per window at batch 32 "
            f"({h['energy_ratio_batch_1']:.1f}x at batch 1); held-out macro-F1 {h['macro_f1_loss_points']:.2f} "
            "points lower (negative: higher)."
        )
    for net, h in summary["int8_vs_fp32"].items():
        verdict = "saves energy" if h["energy_ratio_batch_32"] > 1 else "costs more than it saves"
        lines.append(
            f"- int8 against fp32 on ONNX Runtime, {LABELS[net]}: energy per window fp32 / int8 = "
            f"{h['energy_ratio_batch_32']:.2f} at batch 32 ({h['energy_ratio_batch_1']:.2f} at batch 1), macro-F1 "
            f"{h['macro_f1_loss_points']:.2f} points lower: int8 {verdict} here."
        )
    lines += [
        "",
        "## How it was measured",
        "",
        f"- Energy: {_energy_note(source)}.",
        "- Latency: median wall time of one call (batch 1: one segment; batch 32: 32 segments; sliding every 4 "
        "samples, the worker scores 64 segments per second of ECG); per window = per batch / 32. "
        "One intra-op thread everywhere (torch.set_num_threads(1); ONNX Runtime intra_op_num_threads=1, "
        "inter_op_num_threads=1), models interleaved round by round in one process.",
        "- CPU per window: time.thread_time() over the timed calls / windows.",
        f"- MACs: {MACS_SOURCE}.",
        "- Scores: held-out part only. Segment level: macro-F1 over the two classes, Se = recall of 'beat', PPV = "
        "precision of 'beat', on labelled segments. Beat level: the model slides over the held-out signal every 4 "
        "samples, services.inference.beats.detect_beats (threshold 0.5, refractory 200 ms) gives beats, matched "
        "one to one to the annotated beats within 150 ms.",
        f"- Software: torch {torch.__version__}, onnxruntime {_ort_version()}, Python {platform.python_version()} on "
        f"{platform.machine()} ({os.cpu_count()} logical CPUs, shared with other work).",
        "",
        "![Pareto plot: held-out macro-F1 against energy per window](pareto.png)",
        "",
    ]
    return "\n".join(lines)


def _extra_data_lines(extra: dict[str, Any] | None) -> list[str]:
    """What the report says of the training data beyond the annotated record."""
    if not extra or not extra.get("leads"):
        return []
    leads = ", ".join(
        f"{lead['record']} {lead['lead']} (seconds {lead['training_seconds'][0]:g}-{lead['training_seconds'][1]:g}, "
        f"{lead['detector_beats_in_training_part']} detector beats, labels hold on "
        f"{100 * lead['labels_hold_fraction_of_training_part']:.0f} %)"
        for lead in extra["leads"]
    )
    return [
        f"Also trained on, with no annotations: {leads}. Their labels are {extra['labels']}; used only in "
        f"{extra['where_labels_hold']}. Split: {extra['split']}. No accuracy figure below comes from them.",
        "",
    ]


def _cross_record_table(figures: list[dict[str, Any]], evaluation: dict[str, Any]) -> list[str]:
    """The second table: each model's beats against the classical detector's on other records' held-out parts
    (agreement, not accuracy)."""
    keys = list(figures[0].get("cross_record", {})) if figures else []
    if not keys:
        return []
    first = figures[0]["cross_record"]
    parts = ", ".join(
        f"{key} seconds {first[key]['seconds'][0]:g}-{first[key]['seconds'][1]:g} ({first[key]['reference_beats']} "
        f"detector beats; the detector's labels hold on {100 * first[key]['labels_hold_fraction']:.0f} % of it)"
        for key in keys
    )
    lines = [
        "",
        "## Other records: agreement with the classical detector (not accuracy)",
        "",
        "No annotations exist for these records. The models' beats (slid every 4 samples, detect_beats as above) "
        "are matched one to one within 150 ms to the R-peaks of the project's classical detector "
        "(services/fusion/features.py) on the held-out last 20 % of each lead, which no model was trained on; "
        "beats of either side are counted only where the detector's labels hold (away from missing samples, "
        f"between beats at plausible intervals): {parts}. Se here = share of the detector's beats the model "
        "finds too, PPV = share of the model's beats the detector finds too; where they disagree either may be "
        "wrong.",
        "",
        "| model | runtime | " + " | ".join(f"{k} agreement Se | {k} agreement PPV" for k in keys) + " |",
        "| --- | --- | " + " | ".join("---: | ---:" for _ in keys) + " |",
    ]
    for f in figures:
        agreement = [f["cross_record"][k] for k in keys]
        cells = " | ".join(
            f"{100 * a['sensitivity']:.2f} % | {100 * a['positive_predictivity']:.2f} %" for a in agreement
        )
        lines.append(f"| {LABELS[f['variant']]} | {RUNTIME_LABELS[f['runtime']]} {f['precision']} | {cells} |")
    return lines


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower or equal x and higher or equal y, one strictly),
    sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy >= y) and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(figures: list[dict[str, Any]], path: Path) -> None:
    """Held-out macro-F1 against energy per window at batch 32 (log x), the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    source = figures[0]["energy_source"] if figures else "estimate"
    points = [(f["batch_32"]["energy_uj_per_window"], 100 * f["held_out"]["segment"]["macro_f1"]) for f in figures]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    markers = {"torch": "o", "onnxruntime": "s"}
    for f, (x, y) in zip(figures, points, strict=True):
        ax.scatter(x, y, marker=markers[f["runtime"]], s=56, zorder=3, label=f["label"])
    front = pareto_front(points)
    ax.plot(
        [points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", lw=1, label="Pareto front"
    )
    ax.set_xscale("log")
    kind = "estimated" if source == "estimate" else f"measured ({source})"
    ax.set_xlabel(f"energy per window at batch 32, uJ ({kind})")
    ax.set_ylabel("held-out segment macro-F1, %")
    ax.set_title("ECG beat models: accuracy against energy (one CPU thread)")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(loc="center right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_report(
    folder: Path, figures: list[dict[str, Any]], evaluation: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """Writes REPORT.md, pareto.png and report.json into `folder`; returns what report.json holds."""
    folder.mkdir(parents=True, exist_ok=True)
    plot(figures, folder / "pareto.png")
    (folder / "REPORT.md").write_text(markdown(figures, evaluation))
    data = {"figures": figures, "headline": headline(figures), "macs": MACS_SOURCE, "split": evaluation.get("split")}
    (folder / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for f in figures:
        progress(
            f"report: {f['label']:<42} {f['batch_32']['latency_us_per_window']:8.1f} us/window (b32), "
            f"{f['batch_32']['energy_uj_per_window']:8.1f} uJ/window ({f['energy_source']}), "
            f"macro-F1 {100 * f['held_out']['segment']['macro_f1']:.2f} %"
        )
    return data
