"""Drift check: the committed protobuf / gRPC stubs are exactly what protogen generates from protos/."""

from __future__ import annotations

from pathlib import Path

from services.common.protogen import generate, proto_files

PROTOS = Path(__file__).resolve().parents[2] / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def generated_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)}


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    assert proto_files(PROTOS), "no .proto files found"
    generate(PROTOS, tmp_path)
    fresh = generated_files(tmp_path)
    committed = generated_files(PROTOS)
    # Every .proto yields all four kinds of stub.
    for proto in proto_files(PROTOS):
        stem = proto.relative_to(PROTOS).with_suffix("")
        for suffix in GENERATED_SUFFIXES:
            assert stem.with_name(stem.name + suffix) in fresh
    assert fresh == committed, (
        f"only generated: {sorted(fresh - committed)}; only committed: {sorted(committed - fresh)}"
    )
    stale = [str(p) for p in sorted(fresh) if (tmp_path / p).read_bytes() != (PROTOS / p).read_bytes()]
    assert not stale, f"stubs differ from protos/ (run `make protos`): {stale}"
