"""Model backends: torch and ONNX Runtime artifacts load from the repository and give the net's own outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition
from services.inference.backends import OnnxBackend, TorchBackend, load_backend
from services.inference.repository import METADATA_FILE, ModelRepository, read_artifact
from tests.conftest import TINY_ONNX, TINY_TORCH, TINY_WINDOW, tiny_beat_net


def reference(seed: int, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        logits, probabilities = tiny_beat_net(seed)(torch.from_numpy(x))
    return {"logits": logits.numpy(), "probabilities": probabilities.numpy()}


def segments(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, TINY_WINDOW)).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "version", "seed", "kind"),
    [(TINY_TORCH, "1", 1, TorchBackend), (TINY_TORCH, "2", 2, TorchBackend), (TINY_ONNX, "1", 2, OnnxBackend)],
)
@pytest.mark.parametrize("rows", [1, 7])
def test_backend_gives_the_nets_outputs(tiny_model_repository, name, version, seed, kind, rows):
    backend = load_backend(ModelRepository(tiny_model_repository).get(name, version))
    assert isinstance(backend, kind)
    assert backend.artifact.metadata.name == name
    x = segments(rows, seed=rows)
    outputs = backend.run({"ecg": x})
    assert list(outputs) == ["logits", "probabilities"]  # every output the metadata names, in its order
    expected = reference(seed, x)
    for key, value in outputs.items():
        assert value.shape == (rows, 2) and value.dtype == np.float32
        np.testing.assert_allclose(value, expected[key], atol=1e-5, rtol=1e-5)


def test_torch_backend_takes_read_only_arrays_and_runs_one_thread(tiny_model_repository):
    backend = load_backend(ModelRepository(tiny_model_repository).get(TINY_TORCH))
    x = segments(3)
    frozen = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)  # as a request's bytes arrive
    assert not frozen.flags.writeable
    np.testing.assert_array_equal(backend.run({"ecg": frozen})["logits"], backend.run({"ecg": x})["logits"])
    assert torch.get_num_threads() == 1


def test_onnx_session_uses_one_thread_sequentially(tiny_model_repository):
    backend = load_backend(ModelRepository(tiny_model_repository).get(TINY_ONNX))
    assert isinstance(backend, OnnxBackend)
    options = backend.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert backend.session.get_providers() == ["CPUExecutionProvider"]


def copy_version(repository: Path, name: str, version: str, target: Path) -> Path:
    folder = target / name / version
    shutil.copytree(repository / name / version, folder)
    return folder


def test_metadata_that_does_not_match_the_graph_is_refused(tiny_model_repository, tmp_path):
    folder = copy_version(tiny_model_repository, TINY_ONNX, "1", tmp_path)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["outputs"][1]["name"] = "scores"
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(FailedPrecondition, match="do not match the graph"):
        load_backend(read_artifact(folder))


def test_torch_state_dict_that_does_not_fit_the_config_is_refused(tiny_model_repository, tmp_path):
    folder = copy_version(tiny_model_repository, TINY_TORCH, "1", tmp_path)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["net"]["widths"] = [4, 16]
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(FailedPrecondition, match="cannot load the torch state dict"):
        load_backend(read_artifact(folder))


def test_unknown_runtime_is_refused(tiny_model_repository, tmp_path):
    folder = copy_version(tiny_model_repository, TINY_TORCH, "1", tmp_path)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["runtime"] = "tensorrt"
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(FailedPrecondition, match="unknown runtime"):
        load_backend(read_artifact(folder))
