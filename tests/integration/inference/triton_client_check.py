"""Talks to a KServe v2 gRPC server with the standard Triton client, unmodified, and prints what it saw as JSON.

Run with the client venv's python (tritonclient pins protobuf < 7, so it cannot share the project's process):

    .venv-clients/bin/python tests/integration/inference/triton_client_check.py HOST:PORT MODEL INPUT.npy

It imports nothing from the project. INPUT.npy holds the FP32 batch sent as the model's first input.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    url, model, input_path = sys.argv[1:4]
    x = np.load(input_path)
    client = grpcclient.InferenceServerClient(url=url)
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
    }
    server = client.get_server_metadata(as_json=True)
    report["server"] = {"name": server["name"], "version": server["version"]}
    meta = client.get_model_metadata(model, as_json=True)
    report["model"] = {
        "name": meta["name"],
        "versions": meta["versions"],
        "platform": meta["platform"],
        "inputs": [[t["name"], t["datatype"], [int(d) for d in t["shape"]]] for t in meta["inputs"]],
        "outputs": [[t["name"], t["datatype"], [int(d) for d in t["shape"]]] for t in meta["outputs"]],
    }
    input_name = meta["inputs"][0]["name"]

    tensor = grpcclient.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    # Every output, unrequested, then one requested output.
    every = client.infer(model, [tensor], request_id="triton-1")
    response = every.get_response(as_json=True)
    report["infer_all"] = {
        "id": response["id"],
        "model_version": response["model_version"],
        "outputs": {o["name"]: every.as_numpy(o["name"]).tolist() for o in response["outputs"]},
    }
    one = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    report["infer_one"] = {
        o["name"]: one.as_numpy(o["name"]).tolist() for o in one.get_response(as_json=True)["outputs"]
    }

    # Errors arrive as the client's exception with the gRPC status.
    errors: dict[str, str | None] = {}
    for case, call in {
        "unknown_model": lambda: client.get_model_metadata("no-such-model"),
        "unknown_version": lambda: client.get_model_metadata(model, model_version="999"),
        "wrong_shape": lambda: client.infer(model, [wrong_shape(input_name, x)]),
    }.items():
        try:
            call()
            errors[case] = None
        except InferenceServerException as exc:
            errors[case] = exc.status()
    report["errors"] = errors
    client.close()
    print(json.dumps(report))


def wrong_shape(name: str, x: np.ndarray) -> grpcclient.InferInput:
    flat = np.ascontiguousarray(x.reshape(x.shape[0], -1))
    tensor = grpcclient.InferInput(name, list(flat.shape), "FP32")
    tensor.set_data_from_numpy(flat)
    return tensor


if __name__ == "__main__":
    main()
