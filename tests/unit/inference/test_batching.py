"""Dynamic batching: batches form under concurrency with unbatched results, the policy holds (size, delay, order,
oversized requests, cancellation, close), failures stay in their batch, energy is shared by rows."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from services.common.energy import CpuTimeAttribution, EnergyMeter, EnergyReading
from services.common.errors import ClisonixError, InvalidArgument, Unavailable
from services.common.metrics import ServiceMetrics
from services.inference.backends import load_backend
from services.inference.batching import DynamicBatcher
from services.inference.metrics import InferenceMetrics
from services.inference.repository import ModelRepository
from tests.conftest import TINY_ONNX, TINY_WINDOW
from tests.helpers import wait_for

WATTS = 10.0


class Recording:
    """Wraps a backend: records each batch's rows and thread, optionally holds at a gate, burns CPU or fails."""

    def __init__(self, inner, gate: threading.Event | None = None, spin_s: float = 0.0, fail_batch: int = -1):
        self.inner = inner
        self.artifact = inner.artifact
        self.gate = gate
        self.spin_s = spin_s
        self.fail_batch = fail_batch
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()

    def run(self, inputs):
        self.batches.append(len(inputs["ecg"]))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "gate never opened"
            self.gate = None  # only the first batch waits
        start = time.thread_time()
        while time.thread_time() - start < self.spin_s:
            pass
        if len(self.batches) - 1 == self.fail_batch:
            raise RuntimeError("the runtime broke")
        return self.inner.run(inputs)


@pytest.fixture(scope="module")
def onnx_backend(tiny_model_repository):
    return load_backend(ModelRepository(tiny_model_repository).get(TINY_ONNX))


@pytest.fixture
def meter():
    with EnergyMeter("estimate", watts_per_core=WATTS) as m:
        yield m


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"ecg": np.random.default_rng(seed).standard_normal((n, 1, TINY_WINDOW)).astype(np.float32)}


async def test_concurrent_requests_form_batches_with_unbatched_results(onnx_backend, meter):
    backend = Recording(onnx_backend)
    batcher = DynamicBatcher(backend, 32, 0.0, meter)
    sizes = np.random.default_rng(7).integers(1, 4, size=64)
    requests = [rows(int(n), seed=i) for i, n in enumerate(sizes)]
    results = await asyncio.gather(*(batcher.infer(r) for r in requests))
    await batcher.close()

    assert max(backend.batches) > 1, backend.batches
    assert all(b <= 32 for b in backend.batches) and sum(backend.batches) == sizes.sum()
    assert len(backend.threads) == 1 and threading.current_thread().name not in backend.threads
    for request, result in zip(requests, results, strict=True):
        alone = onnx_backend.run(request)
        assert list(result.outputs) == ["logits", "probabilities"]
        for name, value in alone.items():
            np.testing.assert_allclose(result.outputs[name], value, atol=1e-5, rtol=0)
        assert result.batch_size in backend.batches and result.queue_s >= 0 and result.compute_s > 0


async def test_requests_queue_while_a_batch_runs_and_form_the_next(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate)
    batcher = DynamicBatcher(backend, 32, 0.0, meter)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(backend.entered.is_set)
    later = [asyncio.create_task(batcher.infer(rows(2, seed=i))) for i in range(5)]
    await wait_for(lambda: batcher.queued_rows == 10)
    gate.set()
    assert (await first).batch_size == 1
    assert [(await task).batch_size for task in later] == [10] * 5
    assert backend.batches == [1, 10]
    await batcher.close()


async def test_batches_stop_at_max_rows_and_keep_arrival_order(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate)
    batcher = DynamicBatcher(backend, 4, 0.0, meter)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(backend.entered.is_set)
    requests = [rows(1, seed=i) for i in range(6)]
    later = [asyncio.create_task(batcher.infer(r)) for r in requests]
    await wait_for(lambda: batcher.queued_rows == 6)
    gate.set()
    await first
    results = [await task for task in later]
    assert backend.batches == [1, 4, 2]
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result.outputs["logits"], onnx_backend.run(request)["logits"], atol=1e-5)
    await batcher.close()


async def test_a_request_over_max_batch_size_runs_alone(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate)
    batcher = DynamicBatcher(backend, 4, 0.0, meter)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(backend.entered.is_set)
    big = rows(10, seed=3)
    oversized = asyncio.create_task(batcher.infer(big))
    small = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(lambda: batcher.queued_rows == 11)
    gate.set()
    await first
    result = await oversized
    assert (await small).batch_size == 1
    assert backend.batches == [1, 10, 1] and result.batch_size == 10
    np.testing.assert_allclose(result.outputs["probabilities"], onnx_backend.run(big)["probabilities"], atol=1e-5)
    await batcher.close()


async def test_queue_delay_waits_for_a_full_batch_or_the_deadline(onnx_backend, meter):
    backend = Recording(onnx_backend)
    batcher = DynamicBatcher(backend, 4, 30.0, meter)
    # Four rows fill the batch: it runs at once, long before the 30 s delay.
    results = await asyncio.wait_for(asyncio.gather(*(batcher.infer(rows(1, seed=i)) for i in range(4))), 10)
    assert backend.batches == [4] and {r.batch_size for r in results} == {4}
    await batcher.close()

    backend = Recording(onnx_backend)
    batcher = DynamicBatcher(backend, 4, 0.05, meter)
    alone = await batcher.infer(rows(1))
    assert backend.batches == [1] and alone.queue_s >= 0.05
    await batcher.close()


async def test_energy_estimate_is_forward_cpu_times_watts_shared_by_rows(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate, spin_s=0.02)
    batcher = DynamicBatcher(backend, 32, 0.0, meter)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(backend.entered.is_set)
    one = asyncio.create_task(batcher.infer(rows(1)))
    three = asyncio.create_task(batcher.infer(rows(3)))
    await wait_for(lambda: batcher.queued_rows == 4)
    gate.set()
    await first
    a, b = await one, await three
    assert a.batch_size == b.batch_size == 4
    assert a.energy_source == b.energy_source == "estimate"
    # The forward pass's CPU time (at least the 20 ms spin), shared 1:3 by rows; joules = CPU x watts per core.
    assert a.cpu_s + b.cpu_s >= 0.02
    assert b.cpu_s == pytest.approx(3 * a.cpu_s, rel=1e-9)
    assert a.joules == pytest.approx(a.cpu_s * WATTS, rel=1e-9)
    assert b.joules == pytest.approx(b.cpu_s * WATTS, rel=1e-9)
    # CPU time is the forward-pass thread's own: never more than the pass's wall time (plus timer granularity).
    assert a.cpu_s + b.cpu_s <= a.compute_s + 0.005
    await batcher.close()


class FakeMachineMeter:
    """A machine-wide (rapl-like) meter whose counter the test moves."""

    source = "rapl"
    watts_per_core = 0.0

    def __init__(self) -> None:
        self.joules = 100.0

    def read(self) -> EnergyReading:
        return EnergyReading(self.joules, "rapl", 0.0)


def write_proc_stat(path, busy_s: float) -> None:
    ticks = int(round(busy_s * os.sysconf("SC_CLK_TCK")))
    # user nice system idle iowait irq softirq steal: busy = user + nice + system + irq + softirq
    path.write_text(f"cpu  {ticks} 0 0 99999 7 0 0 5\ncpu0 {ticks} 0 0 99999 7 0 0 5\n")


def test_measured_energy_is_attributed_by_cpu_time_over_machine_busy_time(tmp_path):
    stat = tmp_path / "stat"
    write_proc_stat(stat, 1000.0)
    meter = FakeMachineMeter()
    attribution = CpuTimeAttribution(meter, proc_stat=stat, interval_s=1e-9)  # type: ignore[arg-type]
    assert attribution.source == "rapl"
    assert attribution.joules(0.01) == 0.0  # nothing measured yet: nothing attributed
    # 50 J while the machine was busy 5 CPU-seconds: 10 J per busy CPU-second.
    meter.joules += 50.0
    write_proc_stat(stat, 1005.0)
    assert attribution.joules(0.002) == pytest.approx(0.02)
    # A span with no busy time keeps the last ratio rather than dividing by zero.
    meter.joules += 1.0
    assert attribution.joules(0.002) == pytest.approx(0.02)
    meter.joules += 29.0
    write_proc_stat(stat, 1015.0)
    assert attribution.joules(0.5) == pytest.approx(0.5 * 3.0)


def test_estimate_attribution_is_cpu_times_watts():
    with EnergyMeter("estimate", watts_per_core=12.5) as meter:
        attribution = CpuTimeAttribution(meter)
        assert meter.watts_per_core == 12.5
        assert attribution.joules(0.004) == pytest.approx(0.05)
        assert attribution.joules(0.0) == 0.0


async def test_a_failed_forward_pass_fails_its_batch_only(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate, fail_batch=1)
    batcher = DynamicBatcher(backend, 2, 0.0, meter)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(backend.entered.is_set)
    failing = [asyncio.create_task(batcher.infer(rows(1))) for _ in range(2)]
    last = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(lambda: batcher.queued_rows == 3)
    gate.set()
    assert (await first).batch_size == 1
    for failed in failing:
        with pytest.raises(ClisonixError, match="the runtime broke") as caught:
            await failed
        assert caught.value.code == "INTERNAL"
    assert (await last).batch_size == 1
    assert backend.batches == [1, 2, 1]
    await batcher.close()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros((1, 1, TINY_WINDOW), np.float32)}, "unknown input"),
        ({}, "missing input"),
        ({"ecg": np.zeros((1, 1, TINY_WINDOW), np.float64)}, "datatype FP64"),
        ({"ecg": np.zeros((1, 1, TINY_WINDOW), np.int32)}, "datatype INT32"),
        ({"ecg": np.zeros((1, 1, TINY_WINDOW - 1), np.float32)}, "shape"),
        ({"ecg": np.zeros((1, TINY_WINDOW), np.float32)}, "shape"),
        ({"ecg": np.zeros((0, 1, TINY_WINDOW), np.float32)}, "no rows"),
    ],
)
async def test_inputs_that_do_not_fit_the_model_are_refused_before_queueing(onnx_backend, meter, inputs, message):
    backend = Recording(onnx_backend)
    batcher = DynamicBatcher(backend, 32, 0.0, meter)
    with pytest.raises(InvalidArgument, match=message):
        await batcher.infer(inputs)
    assert backend.batches == [] and batcher.queued_rows == 0
    await batcher.close()


async def test_close_finishes_queued_work_then_refuses_new(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate)
    batcher = DynamicBatcher(backend, 2, 0.0, meter)
    tasks = [asyncio.create_task(batcher.infer(rows(1, seed=i))) for i in range(5)]
    await wait_for(backend.entered.is_set)
    closing = asyncio.create_task(batcher.close())
    gate.set()
    await closing
    assert all(task.done() and not task.exception() for task in tasks)
    assert sum(backend.batches) == 5
    with pytest.raises(Unavailable):
        await batcher.infer(rows(1))


async def test_a_cancelled_request_is_dropped_from_the_queue(onnx_backend, meter):
    gate = threading.Event()
    backend = Recording(onnx_backend, gate=gate)
    batcher = DynamicBatcher(backend, 32, 0.0, meter)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await wait_for(backend.entered.is_set)
    gone = asyncio.create_task(batcher.infer(rows(3)))
    kept = asyncio.create_task(batcher.infer(rows(2)))
    await wait_for(lambda: batcher.queued_rows == 5)
    gone.cancel()
    gate.set()
    await first
    assert (await kept).batch_size == 2
    assert backend.batches == [1, 2] and batcher.queued_rows == 0
    await batcher.close()


async def test_batch_queue_compute_and_energy_metrics(onnx_backend, meter):
    service_metrics = ServiceMetrics.create("inference")
    metrics = InferenceMetrics.create(service_metrics)
    batcher = DynamicBatcher(Recording(onnx_backend), 32, 0.0, meter, metrics)
    results = await asyncio.gather(*(batcher.infer(rows(1, seed=i)) for i in range(8)))
    await batcher.close()
    registry = service_metrics.registry
    model = {"model": TINY_ONNX}
    batches = registry.get_sample_value("clisonix_inference_batch_size_count", model)
    assert batches is not None and batches >= 1
    assert registry.get_sample_value("clisonix_inference_batch_size_sum", model) == 8
    assert registry.get_sample_value("clisonix_inference_compute_seconds_count", model) == batches
    assert registry.get_sample_value("clisonix_inference_queue_delay_seconds_count", model) == 8
    energy = {"model": TINY_ONNX, "variant": "student", "source": "estimate"}
    assert registry.get_sample_value("clisonix_inference_energy_joules_count", energy) == 8
    assert registry.get_sample_value("clisonix_inference_energy_joules_sum", energy) == pytest.approx(
        sum(r.joules for r in results)
    )
