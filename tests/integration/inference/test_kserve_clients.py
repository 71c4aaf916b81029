"""A standard client, unmodified, against the real server: Triton's tritonclient[grpc] in its own process and
venv (it pins protobuf < 7; `make .venv-clients/.installed` builds that venv, `make test` does it first)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest

from services.inference.api import SERVER_NAME, server_version
from tests.conftest import REPO, TINY_ONNX, TINY_TORCH, TINY_WINDOW

pytestmark = pytest.mark.integration

CLIENT_PYTHON = Path(os.environ.get("CLISONIX_CLIENTS_PYTHON", REPO / ".venv-clients" / "bin" / "python"))
CHECK = Path(__file__).with_name("triton_client_check.py")


@pytest.mark.skipif(
    not CLIENT_PYTHON.exists(), reason=f"no client venv at {CLIENT_PYTHON}: run `make .venv-clients/.installed`"
)
@pytest.mark.parametrize(
    ("model", "version", "platform"), [(TINY_ONNX, "1", "onnxruntime_onnx"), (TINY_TORCH, "2", "pytorch_libtorch")]
)
async def test_triton_client_against_the_server(inference_service, tmp_path, model, version, platform):
    service = await inference_service()
    x = np.random.default_rng(11).standard_normal((5, 1, TINY_WINDOW)).astype(np.float32)
    np.save(tmp_path / "input.npy", x)
    # The project's packages must not leak into the client's process (their protobuf 7 stubs would clash).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    process = await asyncio.create_subprocess_exec(
        str(CLIENT_PYTHON),
        str(CHECK),
        f"127.0.0.1:{service.grpc_port}",
        model,
        str(tmp_path / "input.npy"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout)

    assert (report["live"], report["ready"], report["model_ready"]) == (True, True, True)
    assert report["server"] == {"name": SERVER_NAME, "version": server_version()}
    assert report["model"]["name"] == model and report["model"]["platform"] == platform
    assert report["model"]["versions"][-1] == version
    assert report["model"]["inputs"] == [["ecg", "FP32", [-1, 1, TINY_WINDOW]]]
    assert report["model"]["outputs"] == [["logits", "FP32", [-1, 2]], ["probabilities", "FP32", [-1, 2]]]

    expected = service.models.get(model).batcher.backend.run({"ecg": x})
    every = report["infer_all"]
    assert (every["id"], every["model_version"]) == ("triton-1", version)
    assert list(every["outputs"]) == ["logits", "probabilities"]
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(every["outputs"][name], dtype=np.float32), value, atol=1e-6)
    assert list(report["infer_one"]) == ["probabilities"]
    np.testing.assert_allclose(np.array(report["infer_one"]["probabilities"]), expected["probabilities"], atol=1e-6)

    assert report["errors"] == {
        "unknown_model": "StatusCode.NOT_FOUND",
        "unknown_version": "StatusCode.NOT_FOUND",
        "wrong_shape": "StatusCode.INVALID_ARGUMENT",
    }
