"""BinaryAlgebra and HammingIndex against a bit-by-bit reference (plain Python ints and numpy.unpackbits).

torchhd is not installable here, so it is not the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.liam import BinaryAlgebra, HammingIndex, InvalidHypervector
from services.liam.binary import FAISS_MIN_QUERIES, faiss_available

BITS = [1, 63, 64, 100, 130, 1024, 10_000]


def as_int(vector: np.ndarray) -> int:
    """Bit i of the hypervector is bit i of this integer (the documented layout)."""
    return sum(int(word) << (64 * i) for i, word in enumerate(vector))


def from_int(algebra: BinaryAlgebra, value: int) -> np.ndarray:
    return np.array([(value >> (64 * i)) & (2**64 - 1) for i in range(algebra.words)], dtype=np.uint64)


def assert_valid(algebra: BinaryAlgebra, vectors: np.ndarray) -> None:
    assert vectors.dtype == np.uint64 and vectors.flags.c_contiguous and vectors.shape[-1] == algebra.words
    assert algebra.padding_clear(vectors)


@pytest.mark.parametrize("bits", BITS)
def test_layout_pack_unpack_and_padding(bits: int) -> None:
    algebra = BinaryAlgebra(bits=bits, seed=1)
    vectors = algebra.random(5)
    assert_valid(algebra, vectors)
    unpacked = algebra.unpack(vectors)
    assert unpacked.shape == (5, bits)
    for vector, row in zip(vectors, unpacked, strict=True):
        value = as_int(vector)
        assert value < 2**bits
        assert [(value >> i) & 1 for i in range(bits)] == row.tolist()
    np.testing.assert_array_equal(algebra.pack(unpacked), vectors)


@pytest.mark.parametrize("bits", BITS)
def test_bind_hamming_similarity(bits: int) -> None:
    algebra = BinaryAlgebra(bits=bits)
    a, b = algebra.random(4, seed=2), algebra.random(4, seed=3)
    bound = algebra.bind(a, b)
    assert_valid(algebra, bound)
    for x, y, z in zip(a, b, bound, strict=True):
        assert as_int(z) == as_int(x) ^ as_int(y)
    np.testing.assert_array_equal(algebra.bind(bound, b), a)  # XOR is its own inverse
    distances = algebra.hamming(a, b)
    assert distances.tolist() == [bin(as_int(x) ^ as_int(y)).count("1") for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(algebra.similarity(a, b), 1 - distances / bits)
    assert algebra.similarity(a[0], a[0]) == 1.0
    complement = from_int(algebra, as_int(a[0]) ^ (2**bits - 1))
    assert algebra.similarity(a[0], complement) == 0.0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shift", [0, 1, 5, 63, 64, 65, -3, 10_007])
def test_permute_is_rotation(bits: int, shift: int) -> None:
    algebra = BinaryAlgebra(bits=bits)
    vectors = algebra.random(3, seed=4)
    rotated = algebra.permute(vectors, shift)
    assert_valid(algebra, rotated)
    r = shift % bits
    mask = 2**bits - 1
    for vector, result in zip(vectors, rotated, strict=True):
        x = as_int(vector)
        assert as_int(result) == ((x << r) | (x >> (bits - r))) & mask
    np.testing.assert_array_equal(algebra.permute(rotated, -shift), vectors)


@pytest.mark.parametrize("bits", [1, 64, 100, 130, 1024])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_bundle_is_majority_with_seeded_ties(bits: int, k: int) -> None:
    algebra = BinaryAlgebra(bits=bits, seed=9)
    vectors = algebra.random(k, seed=k)
    bundled = algebra.bundle(vectors)
    assert_valid(algebra, bundled)
    values, tie = [as_int(v) for v in vectors], as_int(algebra.tie_breaker)
    expected = 0
    for i in range(bits):
        ones = sum((v >> i) & 1 for v in values)
        bit = (tie >> i) & 1 if 2 * ones == k else int(2 * ones > k)
        expected |= bit << i
    assert as_int(bundled) == expected
    np.testing.assert_array_equal(BinaryAlgebra(bits=bits, seed=9).bundle(vectors), bundled)  # deterministic


def test_bundle_resembles_its_inputs() -> None:
    algebra = BinaryAlgebra(bits=10_000)
    vectors = algebra.random(5)
    bundled = algebra.bundle(vectors)
    assert np.all(algebra.similarity(vectors, bundled) > 0.6)
    assert algebra.similarity(algebra.random(1, seed=99)[0], bundled) < 0.55


def test_encode_is_sign_random_projection() -> None:
    algebra = BinaryAlgebra(bits=130, seed=5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7))
    codes = algebra.encode(x)
    assert_valid(algebra, codes)
    projection = algebra.projection(7)
    for row, code in zip(x, codes, strict=True):
        value = as_int(code)
        assert [(value >> j) & 1 for j in range(130)] == [int(row @ projection[:, j] > 0) for j in range(130)]
    one = algebra.encode(x[0])
    assert one.shape == (algebra.words,)
    np.testing.assert_array_equal(one, codes[0])
    np.testing.assert_array_equal(BinaryAlgebra(bits=130, seed=5).encode(x), codes)  # seeded: reproducible
    assert not np.array_equal(BinaryAlgebra(bits=130, seed=6).encode(x), codes)


def test_encode_keeps_angles() -> None:
    algebra = BinaryAlgebra(bits=10_000, seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64)
    near, far = x + 0.1 * rng.standard_normal(64), rng.standard_normal(64)
    codes = algebra.encode(np.vstack([x, near, far]))
    assert algebra.similarity(codes[0], codes[1]) > 0.9
    angle = np.arccos(x @ far / np.linalg.norm(x) / np.linalg.norm(far))
    assert algebra.hamming(codes[0], codes[2]) / 10_000 == pytest.approx(angle / np.pi, abs=0.02)


def test_invalid_hypervectors() -> None:
    algebra = BinaryAlgebra(bits=100)
    good = algebra.random(2)
    with pytest.raises(InvalidHypervector, match="uint64"):
        algebra.bind(good.astype(np.int64), good)  # type: ignore[arg-type]
    with pytest.raises(InvalidHypervector, match="words"):
        algebra.hamming(good[:, :1], good[:, :1])
    with pytest.raises(InvalidHypervector, match="padding"):
        algebra.bind(good | np.uint64(1 << 63), good)
    with pytest.raises(InvalidHypervector, match="contiguous"):
        algebra.bind(np.asfortranarray(algebra.random(2)), good)
    with pytest.raises(InvalidHypervector):
        algebra.bundle(good[:0])
    with pytest.raises(InvalidHypervector):
        BinaryAlgebra(bits=0)
    with pytest.raises(InvalidHypervector):
        HammingIndex(algebra, good).search(good, 0)
    with pytest.raises(ValueError):  # InvalidHypervector is an InvalidMetrics, a ValueError
        algebra.encode([[np.nan, 1.0]])


def brute_force(algebra: BinaryAlgebra, queries: np.ndarray, stored: np.ndarray, k: int) -> tuple:
    distances = np.array([[bin(as_int(q) ^ as_int(s)).count("1") for s in stored] for q in queries])
    order = np.array([np.lexsort((np.arange(len(stored)), row))[:k] for row in distances])
    return order, np.take_along_axis(distances, order, axis=1)


def tied_data(algebra: BinaryAlgebra, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored vectors with many duplicates and near-duplicates, so that ties at the k-th place are common."""
    base = algebra.random(7, seed=1)
    stored = base[np.random.default_rng(2).integers(0, 7, n)].copy()
    stored[::5] = algebra.random(len(stored[::5]), seed=3)
    queries = np.vstack([base[:3], algebra.random(2, seed=4)])
    return queries, stored


@pytest.mark.parametrize("bits", [64, 100, 1024])
@pytest.mark.parametrize(("threads", "block_rows"), [(1, 64), (2, 64), (2, 1000), (3, 7)])
def test_top_k_numpy_matches_brute_force(bits: int, threads: int, block_rows: int) -> None:
    algebra = BinaryAlgebra(bits=bits)
    queries, stored = tied_data(algebra, 300)
    index = HammingIndex(algebra, stored, backend="numpy", threads=threads, block_rows=block_rows)
    for k in (1, 5, 40, 300, 1000):
        indices, distances = index.search(queries, k)
        expected_indices, expected_distances = brute_force(algebra, queries, stored, k)
        np.testing.assert_array_equal(distances, expected_distances)
        np.testing.assert_array_equal(indices, expected_indices)
    single_i, single_d = index.search(queries[0], 3)
    np.testing.assert_array_equal(single_i, expected_indices[0, :3])
    np.testing.assert_array_equal(single_d, expected_distances[0, :3])


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("bits", [64, 100, 1024])
def test_top_k_faiss_matches_brute_force(bits: int) -> None:
    algebra = BinaryAlgebra(bits=bits)
    queries, stored = tied_data(algebra, 300)
    index = HammingIndex(algebra, stored, backend="faiss")
    for k in (1, 5, 40, 300):
        indices, distances = index.search(queries, k)
        expected_indices, expected_distances = brute_force(algebra, queries, stored, k)
        np.testing.assert_array_equal(distances, expected_distances)
        np.testing.assert_array_equal(indices, expected_indices)


def test_auto_route_and_top_k_shortcut() -> None:
    algebra = BinaryAlgebra(bits=256)
    stored = algebra.random(50)
    index = HammingIndex(algebra, stored, backend="auto")
    assert index.route(1) == "numpy"
    assert index.route(FAISS_MIN_QUERIES) == ("faiss" if faiss_available() else "numpy")
    indices, distances = algebra.top_k(stored[:3], stored, 1)
    np.testing.assert_array_equal(indices[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(distances, 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_search_leaves_ufunc_buffer_size_alone(threads: int) -> None:
    """The scan shrinks numpy's ufunc buffer for its own blocks only, inside an errstate scope."""
    algebra = BinaryAlgebra(bits=10_000)
    stored = algebra.random(3000)
    before = np.getbufsize()
    index = HammingIndex(algebra, stored, backend="numpy", threads=threads)
    assert index.block_rows < before  # the case the smaller buffer is for
    indices, distances = index.search(stored[[5, 17]], 3)
    assert np.getbufsize() == before
    np.testing.assert_array_equal(indices[:, 0], [5, 17])
    np.testing.assert_array_equal(distances[:, 0], 0)
