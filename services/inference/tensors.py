"""Tensors as the KServe v2 protocol carries them, and checks of a request's tensors against a model's specs.

Pure numpy: the servicer hands in the protocol's pieces (datatype, shape, raw bytes or typed values), so this is
tested without gRPC. Every problem is an InvalidArgument naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from services.common.errors import InvalidArgument
from services.inference.repository import TensorSpec

# KServe v2 datatypes with a fixed element size, and their little-endian numpy dtypes (raw contents are
# little-endian). BYTES (length-prefixed strings) is not supported: no model here reads strings.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The field of InferTensorContents that carries each datatype's values when they are sent typed (FP16 has none).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def dtype_of(datatype: str, name: str) -> np.dtype[Any]:
    """The numpy dtype of a KServe datatype; InvalidArgument for one this server does not take."""
    try:
        return DTYPES[datatype]
    except KeyError:
        raise InvalidArgument(
            f"tensor {name!r}: unsupported datatype {datatype!r}; expected one of {sorted(DTYPES)}",
            reason="datatype",
        ) from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The KServe datatype of a numpy dtype (e.g. float32 -> "FP32")."""
    little = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for datatype, candidate in DTYPES.items():
        if candidate == little:
            return datatype
    raise ValueError(f"no KServe datatype for numpy dtype {dtype}")


def _elements(shape: Sequence[int], name: str) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r}: negative dimension in shape {list(shape)}", reason="shape")
    return math.prod(shape)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """A tensor from its raw little-endian bytes; the byte count must be exactly the shape's."""
    dtype = dtype_of(datatype, name)
    expected = _elements(shape, name) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"tensor {name!r}: {len(raw)} bytes of raw contents, but {datatype} {list(shape)} needs {expected}",
            reason="byte_size",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def from_values(name: str, datatype: str, shape: Sequence[int], values: Sequence[Any]) -> np.ndarray:
    """A tensor from typed contents (e.g. InferTensorContents.fp32_contents); the count must match the shape."""
    dtype = dtype_of(datatype, name)
    if datatype not in CONTENTS_FIELDS:
        raise InvalidArgument(f"tensor {name!r}: {datatype} can only be sent as raw contents", reason="datatype")
    count = _elements(shape, name)
    if len(values) != count:
        raise InvalidArgument(
            f"tensor {name!r}: {len(values)} values, but shape {list(shape)} holds {count}", reason="byte_size"
        )
    return np.asarray(values, dtype=dtype).reshape(tuple(shape))


def to_raw(array: np.ndarray) -> bytes:
    """The raw little-endian bytes of a tensor, row-major."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> int:
    """Checks a request's tensors against a model's input specs and returns its row count (the batch).

    Every spec'd input must be present and no other; datatypes must match; shapes must have the spec's rank and
    its fixed dimensions (-1 takes any size); all inputs must have the same number of rows (axis 0), at least 1.
    """
    names = {spec.name for spec in specs}
    unknown = sorted(set(inputs) - names)
    if unknown:
        raise InvalidArgument(f"unknown input(s) {unknown}; the model reads {sorted(names)}", reason="input_name")
    missing = sorted(names - set(inputs))
    if missing:
        raise InvalidArgument(f"missing input(s) {missing}", reason="input_missing")
    rows: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        try:
            datatype = datatype_of(array.dtype)
        except ValueError:
            datatype = str(array.dtype)
        if datatype != spec.datatype:
            raise InvalidArgument(
                f"input {spec.name!r}: datatype {datatype}, the model takes {spec.datatype}", reason="datatype"
            )
        shape = array.shape
        fits = len(shape) == len(spec.shape) and all(s in (-1, d) for s, d in zip(spec.shape, shape, strict=True))
        if not fits or not shape:
            raise InvalidArgument(
                f"input {spec.name!r}: shape {list(shape)} does not fit {list(spec.shape)} (-1: any size)",
                reason="shape",
            )
        if shape[0] < 1:
            raise InvalidArgument(f"input {spec.name!r}: no rows (batch size 0)", reason="shape")
        if rows is not None and shape[0] != rows:
            raise InvalidArgument(f"inputs differ in batch size ({rows} and {shape[0]})", reason="shape")
        rows = shape[0]
    if rows is None:
        raise InvalidArgument("the model declares no inputs", reason="input_missing")
    return rows
