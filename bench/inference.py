"""Inference benchmark: the teacher in torch eager against the distilled, pruned student on ONNX Runtime, side by
side in one run, on real held-out ECG; then ModelInfer over loopback at batch 1.

Compute leg (in this process, one thread, as the service runs a model): rounds in which every variant in turn
runs `--windows` single windows (batch 1) and the same windows in batches of 32, the order rotating per round.
Per variant: latency per call (median and p99 over rounds), CPU time per window (time.thread_time around the
passes) and energy per window (the common energy meter, attributed by that CPU time: services.common.energy
.CpuTimeAttribution), and macro-F1 / Se / PPV of each variant on the held-out part of MIT-BIH record 100,
computed here from the same backends. Targets: the compressed model >= 10x less energy per window than the
teacher for <= 1 point of held-out macro-F1.

Serving leg: the inference service as its own process on 127.0.0.1 (no Kafka worker), this process a plain gRPC
client making `--infer-calls` sequential ModelInfer calls at batch 1 per model, interleaved in blocks. Target:
ModelInfer p99 <= 2 ms for the served model.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import fmt_ratio, open_meter, run_and_report
from services.common.broker import free_port

TEACHER = "ecg-beat-teacher"
DEFAULT_MODELS = ("ecg-beat-teacher", "ecg-beat-student", "ecg-beat-pruned", "ecg-beat-pruned-int8")
# The model the Kafka worker serves by default (InferenceSettings.worker_model): the one the targets are for.
SERVED = "ecg-beat-pruned"
TARGET_ENERGY_RATIO = 10.0
TARGET_F1_LOSS_POINTS = 1.0
TARGET_INFER_P99_MS = 2.0
BATCH = 32
EMPTY_CALL = "ServerLive (empty call)"
REPOSITORY = Path(__file__).resolve().parents[1] / "models"


@dataclass
class VariantRun:
    """What one variant did over all rounds of the compute leg."""

    model: str
    variant: str
    runtime: str
    precision: str
    latency_b1_s: list[float] = field(default_factory=list)
    latency_b32_s: list[float] = field(default_factory=list)
    cpu_b1_s: float = 0.0
    cpu_b32_s: float = 0.0
    windows_b1: int = 0
    windows_b32: int = 0
    joules_per_window_b1: float = 0.0
    joules_per_window_b32: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)  # held-out macro-F1, Se, PPV


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisonix bench inference",
        description="Teacher (torch eager) vs distilled, pruned student (ONNX Runtime) side by side: latency, CPU "
        "time and energy per window, held-out macro-F1; then ModelInfer p99 at batch 1 over loopback.",
    )
    parser.add_argument("--repository", type=Path, default=REPOSITORY, help="model repository (default models/)")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"models to compare, the teacher first (default {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="compute-leg rounds, order rotating (default 5)")
    parser.add_argument(
        "--windows", type=int, default=320, help="windows per variant and round, at batch 1 and batch 32 (320)"
    )
    parser.add_argument(
        "--score-stride",
        type=int,
        default=4,
        help="stride in samples of the held-out segments scored for macro-F1 / Se / PPV (default 4)",
    )
    parser.add_argument("--infer-calls", type=int, default=2000, help="ModelInfer calls per model (default 2000)")
    parser.add_argument(
        "--infer-models",
        default=f"{SERVED},{TEACHER}",
        help=f"models called over gRPC (default {SERVED},{TEACHER})",
    )
    parser.add_argument("--energy-source", choices=["auto", "rapl", "nvml", "estimate"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def held_out_segments(stride: int) -> Any:
    """The labelled held-out segments of MIT-BIH record 100, preprocessed as fused windows carry ECG."""
    from services.inference.dataset import Split, load_record, segments_in

    record = load_record()
    split = Split.of(record.signal.size)
    return segments_in(record, split.held_out, stride).labelled()


def compute_leg(args: argparse.Namespace, models: list[str], console: Any) -> tuple[list[VariantRun], str]:
    from services.common.energy import CpuTimeAttribution
    from services.inference.backends import load_backend
    from services.inference.evaluation import segment_scores
    from services.inference.nets import LABELS
    from services.inference.repository import ModelRepository

    repository = ModelRepository(args.repository)
    backends = {name: load_backend(repository.get(name)) for name in models}
    meter = open_meter(args.energy_source)
    energy = CpuTimeAttribution(meter)
    segments = held_out_segments(args.score_stride)
    console.print(
        f"held-out data: {len(segments)} labelled segments of MIT-BIH 100 (last 20 %, stride {args.score_stride}); "
        f"energy source: {meter.source}"
    )
    beat = LABELS.index("beat")
    runs: dict[str, VariantRun] = {}
    for name, backend in backends.items():
        meta = backend.artifact.metadata
        input_name = meta.inputs[0].name
        probabilities = np.concatenate(
            [
                backend.run({input_name: segments.x[i : i + 256]})["probabilities"][:, beat]
                for i in range(0, len(segments), 256)
            ]
        )
        scores = segment_scores(segments.labels, probabilities)
        runs[name] = VariantRun(
            name,
            meta.variant,
            meta.runtime,
            meta.precision,
            scores={k: float(v) for k, v in scores.items() if isinstance(v, int | float)},
        )
    windows = segments.x[: max(BATCH, args.windows // BATCH * BATCH)]
    for round_index in range(args.rounds):
        order = models[round_index % len(models) :] + models[: round_index % len(models)]
        for name in order:
            backend, run = backends[name], runs[name]
            input_name = backend.artifact.metadata.inputs[0].name
            cpu0 = time.thread_time()
            for i in range(windows.shape[0]):
                t0 = time.perf_counter()
                backend.run({input_name: windows[i : i + 1]})
                run.latency_b1_s.append(time.perf_counter() - t0)
            cpu1 = time.thread_time()
            for i in range(0, windows.shape[0], BATCH):
                t0 = time.perf_counter()
                backend.run({input_name: windows[i : i + BATCH]})
                run.latency_b32_s.append(time.perf_counter() - t0)
            cpu2 = time.thread_time()
            run.cpu_b1_s += cpu1 - cpu0
            run.cpu_b32_s += cpu2 - cpu1
            run.windows_b1 += windows.shape[0]
            run.windows_b32 += windows.shape[0]
        console.print(f"  compute round {round_index + 1}/{args.rounds} done")
    for run in runs.values():
        run.joules_per_window_b1 = energy.joules(run.cpu_b1_s) / max(1, run.windows_b1)
        run.joules_per_window_b32 = energy.joules(run.cpu_b32_s) / max(1, run.windows_b32)
    return list(runs.values()), meter.source


def _infer(request: Any, stub: Any) -> Any:
    return stub.ModelInfer(request, timeout=10)


def _server_live(stub: Any) -> Any:
    from inference import grpc_predict_v2_pb2 as pb

    return stub.ServerLive(pb.ServerLiveRequest(), timeout=10)


def serving_leg(args: argparse.Namespace, models: list[str], console: Any) -> dict[str, dict[str, float]]:
    """ModelInfer at batch 1 from this process to the service in its own process on 127.0.0.1."""
    import grpc

    from inference import grpc_predict_v2_pb2 as pb
    from inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from services.inference.repository import ModelRepository
    from services.processes import ServiceProcess

    repository = ModelRepository(args.repository)
    requests = {}
    for name in models:
        meta = repository.get(name).metadata
        spec = meta.inputs[0]
        x = np.random.default_rng(0).standard_normal((1, *spec.shape[1:])).astype(np.float32)
        requests[name] = pb.ModelInferRequest(
            model_name=name,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=spec.name, datatype=spec.datatype, shape=x.shape)],
            raw_input_contents=[x.tobytes()],
        )
    with tempfile.TemporaryDirectory() as tmp:
        service = ServiceProcess(
            "inference",
            free_port(),
            free_port(),
            env={
                "CLISONIX_MODEL_REPOSITORY": str(args.repository.resolve()),
                "CLISONIX_MODELS": ",".join(models),
                "CLISONIX_KAFKA_WORKER": "false",
                "CLISONIX_GRPC_HOST": "127.0.0.1",
                "CLISONIX_METRICS_HOST": "127.0.0.1",
                "CLISONIX_LOG_FORMAT": "text",
            },
            log_path=Path(tmp) / "inference.log",
        )
        service.start(timeout_s=120)
        # The empty ServerLive call on the same channel, interleaved with the models: the floor any gRPC call
        # pays on this machine (client, loopback, server), against which ModelInfer's own cost shows.
        calls: dict[str, Callable[[Any], Any]] = {name: functools.partial(_infer, requests[name]) for name in models}
        calls[EMPTY_CALL] = _server_live
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        try:
            with grpc.insecure_channel(service.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for call in calls.values():  # warm-up: first calls load caches and the channel
                    for _ in range(100):
                        call(stub)
                block = 100
                while any(len(v) < args.infer_calls for v in latencies.values()):
                    for name, call in calls.items():
                        for _ in range(min(block, args.infer_calls - len(latencies[name]))):
                            t0 = time.perf_counter()
                            call(stub)
                            latencies[name].append(time.perf_counter() - t0)
                    done = min(len(v) for v in latencies.values())
                    console.print(f"  gRPC calls: {done}/{args.infer_calls} per model", end="\r")
            console.print()
        finally:
            service.stop()
    return {
        name: {
            "calls": len(values),
            "p50_ms": percentile_ms(values, 50),
            "p99_ms": percentile_ms(values, 99),
            "max_ms": max(values) * 1e3,
        }
        for name, values in latencies.items()
    }


def summarise(runs: list[VariantRun], source: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for run in runs:
        rows.append(
            {
                "model": run.model,
                "variant": run.variant,
                "runtime": run.runtime,
                "precision": run.precision,
                "latency_b1_ms": {
                    "p50": percentile_ms(run.latency_b1_s, 50),
                    "p99": percentile_ms(run.latency_b1_s, 99),
                },
                "latency_b32_ms": {
                    "p50": percentile_ms(run.latency_b32_s, 50),
                    "p99": percentile_ms(run.latency_b32_s, 99),
                },
                "cpu_ms_per_window_b1": run.cpu_b1_s / max(1, run.windows_b1) * 1e3,
                "cpu_ms_per_window_b32": run.cpu_b32_s / max(1, run.windows_b32) * 1e3,
                "joules_per_window_b1": run.joules_per_window_b1,
                "joules_per_window_b32": run.joules_per_window_b32,
                "energy_source": source,
                "macro_f1": run.scores.get("macro_f1"),
                "sensitivity": run.scores.get("sensitivity"),
                "positive_predictivity": run.scores.get("positive_predictivity"),
            }
        )
    base = rows[0]
    for row in rows:
        row["energy_ratio_b1"] = base["joules_per_window_b1"] / row["joules_per_window_b1"]
        row["energy_ratio_b32"] = base["joules_per_window_b32"] / row["joules_per_window_b32"]
        row["latency_ratio_b1"] = base["latency_b1_ms"]["p50"] / row["latency_b1_ms"]["p50"]
        if base["macro_f1"] is not None and row["macro_f1"] is not None:
            row["macro_f1_loss_points"] = (base["macro_f1"] - row["macro_f1"]) * 100
    return {"variants": rows}


def report(summary: dict[str, Any], serving: dict[str, dict[str, float]] | None, console: Any) -> dict[str, Any]:
    from rich.table import Table

    rows = summary["variants"]
    source = rows[0]["energy_source"]
    table = Table(title=f"compute leg (one thread; J: {source}; teacher/variant ratios, higher is better)")
    for column in (
        "model",
        "runtime",
        "b1 p50 / p99 ms",
        "b32 p50 ms",
        "CPU ms/window b1 / b32",
        "mJ/window b1 / b32",
        "energy ratio b1 / b32",
        "macro-F1",
        "Se / PPV",
    ):
        table.add_column(column)
    for row in rows:
        f1 = row["macro_f1"]
        table.add_row(
            row["model"],
            f"{row['runtime']} {row['precision']}",
            f"{row['latency_b1_ms']['p50']:.3f} / {row['latency_b1_ms']['p99']:.3f}",
            f"{row['latency_b32_ms']['p50']:.3f}",
            f"{row['cpu_ms_per_window_b1']:.3f} / {row['cpu_ms_per_window_b32']:.4f}",
            f"{row['joules_per_window_b1'] * 1e3:.4f} / {row['joules_per_window_b32'] * 1e3:.5f}",
            f"{fmt_ratio(row['energy_ratio_b1'])} / {fmt_ratio(row['energy_ratio_b32'])}",
            "n/a" if f1 is None else f"{f1:.4f}",
            f"{row['sensitivity'] or float('nan'):.4f} / {row['positive_predictivity'] or float('nan'):.4f}",
        )
    console.print(table)
    verdicts: dict[str, Any] = {}
    for row in rows[1:]:
        ratio = min(row["energy_ratio_b1"], row["energy_ratio_b32"])
        loss = row.get("macro_f1_loss_points")
        passed = ratio >= TARGET_ENERGY_RATIO and loss is not None and loss <= TARGET_F1_LOSS_POINTS
        verdicts[row["model"]] = {"energy_ratio_min": ratio, "macro_f1_loss_points": loss, "passed": passed}
        style = "green" if passed else "red"
        console.print(
            f"  {row['model']} vs {rows[0]['model']}: energy per window {fmt_ratio(ratio)} less (the smaller of "
            f"batch 1 and 32; target >= {TARGET_ENERGY_RATIO:g}x), macro-F1 "
            f"{'n/a' if loss is None else f'{loss:+.2f}'} points lost (target <= {TARGET_F1_LOSS_POINTS:g}): "
            f"[bold {style}]{'PASS' if passed else 'BELOW TARGET'}[/bold {style}]"
        )
    results: dict[str, Any] = {"targets": verdicts}
    if serving is not None:
        floor = serving[EMPTY_CALL]
        console.print(
            f"  {EMPTY_CALL} on the same channel, {floor['calls']} calls: p50 {floor['p50_ms']:.3f} / p99 "
            f"{floor['p99_ms']:.3f} / max {floor['max_ms']:.1f} ms: what any gRPC call costs here"
        )
        for name, figures in serving.items():
            if name == EMPTY_CALL:
                continue
            passed = figures["p99_ms"] <= TARGET_INFER_P99_MS
            style = "green" if passed else "red"
            target = f" (target p99 <= {TARGET_INFER_P99_MS:g} ms)" if name == SERVED else ""
            verdict = f": [bold {style}]{'PASS' if passed else 'BELOW TARGET'}[/bold {style}]" if target else ""
            console.print(
                f"  ModelInfer {name} at batch 1 over loopback, {figures['calls']} calls: p50 {figures['p50_ms']:.3f} "
                f"/ p99 {figures['p99_ms']:.3f} / max {figures['max_ms']:.1f} ms (over the empty call: p50 "
                f"{figures['p50_ms'] - floor['p50_ms']:+.3f} / p99 {figures['p99_ms'] - floor['p99_ms']:+.3f} ms)"
                f"{target}{verdict}"
            )
        results["model_infer"] = serving
    return results


async def run(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    infer_models = [m.strip() for m in args.infer_models.split(",") if m.strip()]
    started = time.time()
    runs, source = compute_leg(args, models, console)
    summary = summarise(runs, source)
    serving = serving_leg(args, infer_models, console) if args.infer_calls > 0 and infer_models else None
    results = report(summary, serving, console)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "seconds": time.time() - started,
        **summary,
        **results,
        "note": "energy 'estimate' is CPU time x watts per core, not a measurement",
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.windows < BATCH or args.score_stride < 1 or args.infer_calls < 0:
        parser.error(f"--rounds >= 1, --windows >= {BATCH}, --score-stride >= 1 and --infer-calls >= 0")
    return run_and_report(run, args, width=180)


if __name__ == "__main__":
    sys.exit(main())
