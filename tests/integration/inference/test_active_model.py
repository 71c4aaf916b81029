"""The inference service follows Tide's active model of its task, on the real broker with a real Tide replica:
the worker's predictions name the model version Tide makes active, switch back when it changes, and keep the
default (no crash) when Tide names a model the repository does not hold or Tide cannot be reached.
`clisonix model activate` (run as a child process) writes the record after checking the local repository.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from services.inference.activation import check_local
from services.inference.selection import FROM_DEFAULT, FROM_TIDE, ModelChoice
from services.tide.client import ActiveModel, TideClient, get_active_model, set_active_model
from tests.conftest import REPO, TINY_ONNX, TINY_TORCH
from tests.helpers import wait_for
from tests.integration.inference.helpers import WINDOW_SAMPLES, ecg_stream, fused_window, predictions, produce

pytestmark = pytest.mark.integration

TASK = "ecg-beat"
SHIPPED = REPO / "models"


def ecg_window(session: str, index: int):
    """A fused window of synthetic ECG (the model's rate and unit: it is predicted, not skipped)."""
    samples = np.random.default_rng(index).standard_normal(WINDOW_SAMPLES).astype(np.float32)
    return fused_window(session, index, [ecg_stream(samples)])


async def predicted_by(broker, topics, window, count: int) -> tuple[str, str]:
    """The (model, version) the worker predicted `window` with; `count`: predictions on the topic by then."""
    await produce(broker.bootstrap_servers, topics["topic_fused"], [window])
    got = await predictions(broker.bootstrap_servers, topics["topic_results"], count)
    prediction = next(p for p, _ in got if p.window_id == window.window_id)
    assert not prediction.skipped_reason
    return prediction.model_name, prediction.model_version


async def test_the_worker_follows_the_active_model_in_tide(broker, worker, tide_replica) -> None:
    tide, _ = await tide_replica()
    target = f"127.0.0.1:{tide.grpc_port}"
    # Only TINY_TORCH is configured (newest: version 2, the default); TINY_ONNX is loaded when Tide names it.
    service = await worker(tide_targets=target, task=TASK)
    selector = service.selector
    registry = service.runtime.metrics.registry
    topics = worker.topics
    session = "ps-active-model"
    assert selector.choice == ModelChoice(TINY_TORCH, "2", FROM_DEFAULT)
    assert await predicted_by(broker, topics, ecg_window(session, 0), 1) == (TINY_TORCH, "2")

    async with TideClient(target) as client:
        steps = [
            ((TINY_TORCH, "1"), ModelChoice(TINY_TORCH, "1", FROM_TIDE)),
            ((TINY_ONNX, "1"), ModelChoice(TINY_ONNX, "1", FROM_TIDE)),
            (("no-such-model", "1"), ModelChoice(TINY_TORCH, "2", FROM_DEFAULT)),  # kept the default, no crash
            ((TINY_TORCH, "1"), ModelChoice(TINY_TORCH, "1", FROM_TIDE)),  # and follows again
        ]
        for index, ((model, version), expected) in enumerate(steps, start=1):
            written = await set_active_model(client, TASK, model, version)
            assert written.applied

            def switched(expected: ModelChoice = expected) -> bool:
                return selector.choice == expected

            await wait_for(switched, timeout_s=10)
            assert await predicted_by(broker, topics, ecg_window(session, index), index + 1) == (
                expected.model,
                expected.version,
            )
            assert (
                registry.get_sample_value(
                    "clisonix_inference_active_model_info",
                    {"task": TASK, "model": expected.model, "version": expected.version, "source": expected.source},
                )
                == 1
            )
        assert await get_active_model(client, TASK) is not None
    assert not service.runtime.lifecycle.stop.is_set(), "an unknown model must not stop the service"
    # Only served model versions ever become labels (never a record's text).
    assert registry.get_sample_value(
        "clisonix_inference_active_model_info",
        {"task": TASK, "model": "no-such-model", "version": "1", "source": FROM_TIDE},
    ) in (None, 0)


async def clisonix_activate(target: str, repository: Path, model: str) -> tuple[int, str, str]:
    """Runs `clisonix model activate` (version 1 of `model` for TASK) in a child process."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "model", "activate", "--task", TASK, "--model", model),
        *("--version", "1", "--tide", target, "--repository", str(repository)),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_record_written_before_the_start_is_served_from_the_first_window(
    broker,
    worker,
    tide_replica,
    tiny_model_repository,
) -> None:
    tide, _ = await tide_replica()
    target = f"127.0.0.1:{tide.grpc_port}"
    refused = await clisonix_activate(target, tiny_model_repository, "no-such-model")
    assert refused[0] == 2 and "no model 'no-such-model'" in refused[2]
    code, out, err = await clisonix_activate(target, tiny_model_repository, TINY_TORCH)
    assert code == 0, err
    async with TideClient(target) as client:
        entry = await client.get(f"models/active/{TASK}")
        assert entry is not None
        assert f"(tide version {entry.version.partition}:{entry.version.offset})" in out
        assert await get_active_model(client, TASK) == ActiveModel(TINY_TORCH, "1")
    service = await worker(tide_targets=target, task=TASK)
    assert service.selector.choice == ModelChoice(TINY_TORCH, "1", FROM_TIDE)
    assert await predicted_by(broker, worker.topics, ecg_window("ps-active-first", 0), 1) == (TINY_TORCH, "1")


@pytest.mark.skipif(
    not (SHIPPED / "ecg-beat-student" / "1").is_dir() or not (SHIPPED / "ecg-beat-pruned" / "1").is_dir(),
    reason="the shipped model repository (models/) is not built",
)
async def test_the_shipped_student_replaces_the_pruned_model_and_back(
    broker,
    worker,
    tide_replica,
) -> None:
    check_local(SHIPPED, TASK, "ecg-beat-student", "1")
    tide, _ = await tide_replica()
    target = f"127.0.0.1:{tide.grpc_port}"
    service = await worker(
        tide_targets=target,
        task=TASK,
        model_repository=SHIPPED,
        models=("ecg-beat-pruned",),
        worker_model="ecg-beat-pruned",
    )
    session = "ps-active-shipped"
    assert await predicted_by(broker, worker.topics, ecg_window(session, 0), 1) == ("ecg-beat-pruned", "1")
    async with TideClient(target) as client:
        await set_active_model(client, TASK, "ecg-beat-student", "1")
        await wait_for(lambda: service.selector.choice.model == "ecg-beat-student", timeout_s=10)
        assert await predicted_by(broker, worker.topics, ecg_window(session, 1), 2) == ("ecg-beat-student", "1")
        await client.delete(f"models/active/{TASK}")  # no record: the default again
        await wait_for(lambda: service.selector.choice.source == FROM_DEFAULT, timeout_s=10)
        assert await predicted_by(broker, worker.topics, ecg_window(session, 2), 3) == ("ecg-beat-pruned", "1")


async def test_without_a_reachable_tide_the_default_serves(broker, worker) -> None:
    service = await worker(tide_targets="127.0.0.1:1", task=TASK)  # nothing listens there
    assert service.selector.choice == ModelChoice(TINY_TORCH, "2", FROM_DEFAULT)
    assert not service.follower.started
    assert await predicted_by(broker, worker.topics, ecg_window("ps-active-no-tide", 0), 1) == (TINY_TORCH, "2")
    assert not service.runtime.lifecycle.stop.is_set()
