"""Generates the committed protobuf / gRPC stubs beside the .proto files (`make protos`).

Imports in the stubs stay as protoc writes them (`from clisonix.signal.v1 import signal_pb2`): the protos
folder is a package root, installed as such by pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path


def proto_files(root: Path) -> list[Path]:
    """Every .proto under `root`, sorted so generation is deterministic."""
    return sorted(root.rglob("*.proto"))


def generate(root: Path, out: Path) -> None:
    """Runs protoc (from grpcio-tools) on every .proto under `root`, writing stubs and type stubs into `out`."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    # mypy-protobuf's plugins sit beside the running interpreter, which need not be on PATH.
    bindir = Path(sys.executable).parent
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {root}")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "protos").resolve()
    generate(root, root)


if __name__ == "__main__":
    main()
