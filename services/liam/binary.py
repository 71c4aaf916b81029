"""Bit-packed binary hypervectors: encode, bind, bundle, permute, Hamming similarity and top-k search.

Layout: a hypervector of `bits` bits is a C-contiguous row of `words = ceil(bits / 64)` uint64 words; bit i is
bit (i % 64) of word i // 64 (least significant first). The `words * 64 - bits` padding bits of the last word
are always zero, so popcounts over whole words are exact. A set of n hypervectors is an (n, words) array; every
operation works on the last axis and keeps the leading ones.

torchhd, the usual reference library for this algebra, is not installable here; the tests check every operation
against a bit-by-bit reference (numpy.unpackbits and plain Python integers) instead.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.liam.errors import InvalidHypervector
from services.liam.streaming import as_metric_matrix

Words = NDArray[np.uint64]
Backend = Literal["auto", "numpy", "faiss"]
WORD_BITS = 64
# faiss's time for a single query over 1e6 x 1024 bits varied from 11 to 160 ms between runs on the 2-core build
# machine (the numpy route: 19 to 75 ms); for batches it was steadily faster than the numpy route (about 9 vs
# 14 ms per query). So "auto" hands faiss only batches of at least this many queries.
FAISS_MIN_QUERIES = 8
# Stored bytes per block, and XOR buffer bytes per thread for a group of queries against one block. Measured
# on the 2-core build machine (1e6 x 1024 and 1e5 x 10,000 bits, 1 and 32 queries): below ~1 MB blocks the
# per-step Python and ufunc overhead dominates (256 KB blocks were 1.3x slower for batches, 3.5x for one
# query); beyond ~4 MB the buffers fall out of cache and it slows again.
BLOCK_BYTES = 2 * 1024 * 1024
GROUP_BYTES = 4 * 1024 * 1024


def faiss_available() -> bool:
    """Whether faiss (faiss-cpu) can be imported."""
    return importlib.util.find_spec("faiss") is not None


class BinaryAlgebra:
    """Operations on `bits`-bit hypervectors (see the module docstring for the layout).

    `seed` fixes the Gaussian projection matrices of `encode` (one per input dimension) and the tie-breaker
    hypervector of `bundle`, so equal seeds give equal results on every process and machine.
    """

    def __init__(self, bits: int = 10_000, seed: int = 0) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise InvalidHypervector(f"bits must be a positive int, got {bits!r}", field="bits")
        self.bits = bits
        self.seed = seed
        self.words = -(-bits // WORD_BITS)
        tail = bits % WORD_BITS
        self._last_mask = np.uint64((1 << tail) - 1 if tail else (1 << WORD_BITS) - 1)
        self._projections: dict[int, NDArray[np.float64]] = {}
        self._tie_breaker: Words | None = None

    # -- layout -------------------------------------------------------------------------------------------------

    def check(self, vectors: Any, name: str = "vectors") -> Words:
        """Returns `vectors` unchanged if it is a valid hypervector array, else raises InvalidHypervector."""
        if not isinstance(vectors, np.ndarray) or vectors.dtype != np.uint64:
            kind = vectors.dtype if isinstance(vectors, np.ndarray) else type(vectors).__name__
            raise InvalidHypervector(f"{name} must be a uint64 numpy array, got {kind}", field=name)
        if vectors.ndim == 0 or vectors.shape[-1] != self.words:
            raise InvalidHypervector(
                f"{name} must end in {self.words} words ({self.bits} bits), got shape {vectors.shape}", field=name
            )
        if not vectors.flags.c_contiguous:
            raise InvalidHypervector(f"{name} must be C-contiguous", field=name)
        if (vectors[..., -1] & ~self._last_mask).any():
            raise InvalidHypervector(f"{name} has padding bits set beyond bit {self.bits}", field=name)
        return vectors

    def padding_clear(self, vectors: Words) -> bool:
        """Whether every padding bit of `vectors` is zero."""
        return not bool((vectors[..., -1] & ~self._last_mask).any())

    def pack(self, bits: ArrayLike) -> Words:
        """(..., bits) array of 0/1 (or booleans) -> (..., words) hypervectors."""
        array = np.asarray(bits)
        if array.ndim == 0 or array.shape[-1] != self.bits:
            raise InvalidHypervector(f"pack needs (..., {self.bits}) bits, got shape {array.shape}", field="bits")
        padded = np.zeros((*array.shape[:-1], self.words * WORD_BITS), dtype=np.uint8)
        padded[..., : self.bits] = array != 0
        packed = np.packbits(padded, axis=-1, bitorder="little")
        return np.ascontiguousarray(packed).view(np.dtype("<u8")).astype(np.uint64, copy=False)

    def unpack(self, vectors: Words) -> NDArray[np.uint8]:
        """(..., words) hypervectors -> (..., bits) array of 0/1 uint8."""
        vectors = self.check(vectors)
        as_bytes = vectors.astype(np.dtype("<u8"), copy=False).view(np.uint8)
        return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., : self.bits]

    def random(self, count: int, seed: int | None = None) -> Words:
        """`count` uniformly random hypervectors, shape (count, words), from `seed` (default: the algebra's)."""
        rng = np.random.default_rng([self.seed if seed is None else seed, 0x5EED])
        vectors = rng.integers(0, np.iinfo(np.uint64).max, size=(count, self.words), dtype=np.uint64, endpoint=True)
        vectors[:, -1] &= self._last_mask
        return vectors

    # -- algebra ------------------------------------------------------------------------------------------------

    def projection(self, dimensions: int) -> NDArray[np.float64]:
        """The seeded (dimensions x bits) standard Gaussian matrix `encode` uses for inputs of that length."""
        matrix = self._projections.get(dimensions)
        if matrix is None:
            matrix = np.random.default_rng([self.seed, dimensions]).standard_normal((dimensions, self.bits))
            self._projections[dimensions] = matrix
        return matrix

    def encode(self, vectors: ArrayLike) -> Words:
        """Sign random projection: bit j of a vector x is 1 where x . g_j > 0 (g_j column j of `projection`).

        Vectors at a small angle get hypervectors at a small Hamming distance (expected distance / bits =
        angle / pi). A 1-D input gives one (words,) hypervector, an (n, d) input an (n, words) array.
        """
        one = np.ndim(vectors) == 1
        matrix = as_metric_matrix(vectors, name="vectors")
        projection = self.projection(matrix.shape[1])
        out = np.empty((matrix.shape[0], self.words), dtype=np.uint64)
        rows = max(1, (1 << 22) // self.bits)  # bound the n x bits float temporary
        for start in range(0, matrix.shape[0], rows):
            out[start : start + rows] = self.pack(matrix[start : start + rows] @ projection > 0)
        return out[0] if one else out

    def bind(self, a: Words, b: Words) -> Words:
        """Binding: bitwise XOR (self-inverse: bind(bind(a, b), b) == a). Broadcasts over leading axes."""
        return np.bitwise_xor(self.check(a, "a"), self.check(b, "b"))

    @property
    def tie_breaker(self) -> Words:
        """The seeded hypervector whose bits decide `bundle`'s ties."""
        if self._tie_breaker is None:
            self._tie_breaker = self.random(1, seed=self.seed + 1)[0]
        return self._tie_breaker

    def bundle(self, vectors: Words) -> Words:
        """Bundling: bitwise majority over k hypervectors (k, words) -> (words,).

        A bit is 1 where more than k / 2 inputs have it set, 0 where fewer; on an exact tie (k even) it takes the
        bit of `tie_breaker`, a fixed seeded random hypervector: deterministic, and unbiased towards any input.
        """
        vectors = self.check(vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise InvalidHypervector(f"bundle needs a non-empty (k, {self.words}) array, got {vectors.shape}")
        counts = np.zeros(self.bits, dtype=np.int64)
        for start in range(0, vectors.shape[0], 1024):  # bound the k x bits unpacked temporary
            counts += self.unpack(vectors[start : start + 1024]).sum(axis=0, dtype=np.int64)
        k = vectors.shape[0]
        majority = np.where(2 * counts == k, self.unpack(self.tie_breaker), 2 * counts > k)
        return self.pack(majority)

    def permute(self, vectors: Words, shift: int = 1) -> Words:
        """Rotation of the whole `bits`-bit vector: bit i moves to bit (i + shift) % bits (padding untouched)."""
        return self.pack(np.roll(self.unpack(vectors), shift, axis=-1))

    def hamming(self, a: Words, b: Words) -> NDArray[np.int64]:
        """Hamming distance (number of differing bits), broadcasting over leading axes."""
        xor = np.bitwise_xor(self.check(a, "a"), self.check(b, "b"))
        return np.bitwise_count(xor).sum(axis=-1, dtype=np.int64)

    def similarity(self, a: Words, b: Words) -> NDArray[np.float64]:
        """1 - hamming / bits: 1 for equal vectors, about 0.5 for unrelated random ones, 0 for complements."""
        return 1.0 - self.hamming(a, b) / self.bits

    def top_k(
        self, queries: Words, stored: Words, k: int, *, backend: Backend = "numpy"
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The k stored hypervectors nearest each query: (indices, distances), both (q, k), nearest first, ties
        by lower index. Builds a HammingIndex each call; keep one for repeated searches."""
        return HammingIndex(self, stored, backend=backend).search(queries, k)


class HammingIndex:
    """Exact Hamming top-k search over a fixed set of stored hypervectors.

    numpy route: the stored rows are kept a second time, transposed per block of rows (words x rows), so
    that per query and block one XOR, one popcount and one reduction over words run on contiguous memory into
    buffers allocated once; blocks are split over `threads` threads (numpy releases the GIL in these ufuncs).
    A running k-th distance per query lets a block contribute only rows that beat it. While it scans, numpy's
    ufunc buffer is no longer than a block's rows (in an errstate scope: restored on return), so that the
    broadcast XOR runs in place rather than through copying buffers.

    faiss route (`backend="faiss"`, or "auto" for batches of FAISS_MIN_QUERIES queries or more where faiss is
    installed): faiss.IndexBinaryFlat over the uint8 view of the same words (padding bits are zero, so they
    change no distance). faiss keeps the lower index on ties; the tests check that against brute force.

    `stored` is kept by reference (do not modify it afterwards); the numpy route adds a transposed copy and the
    faiss route its own copy, each built on first use.
    """

    def __init__(
        self,
        algebra: BinaryAlgebra,
        stored: Words,
        *,
        backend: Backend = "auto",
        threads: int | None = None,
        block_rows: int | None = None,
    ) -> None:
        stored = algebra.check(stored, "stored")
        if stored.ndim != 2 or stored.shape[0] == 0:
            raise InvalidHypervector(f"stored must be a non-empty (n, {algebra.words}) array, got {stored.shape}")
        if backend not in ("auto", "numpy", "faiss"):
            raise InvalidHypervector(f"backend must be 'auto', 'numpy' or 'faiss', got {backend!r}", field="backend")
        if backend == "faiss" and not faiss_available():
            raise InvalidHypervector("backend 'faiss' requested but faiss is not installed", field="backend")
        self.algebra = algebra
        self.backend = backend
        self.count = stored.shape[0]
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.block_rows = block_rows or min(self.count, max(64, BLOCK_BYTES // (algebra.words * 8)))
        self._stored = stored
        self._blocks: Words | None = None
        self._faiss: Any = None

    def _transposed(self) -> Words:
        if self._blocks is None:
            words, rows = self.algebra.words, self.block_rows
            blocks = -(-self.count // rows)
            padded = np.zeros((blocks * rows, words), dtype=np.uint64)
            padded[: self.count] = self._stored
            self._blocks = np.ascontiguousarray(padded.reshape(blocks, rows, words).transpose(0, 2, 1))
        return self._blocks

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            import faiss

            index = faiss.IndexBinaryFlat(self.algebra.words * WORD_BITS)
            index.add(self._stored.view(np.uint8))
            self._faiss = index
        return self._faiss

    def route(self, queries: int) -> Literal["numpy", "faiss"]:
        """Which route a search of `queries` queries takes."""
        if self.backend == "auto":
            return "faiss" if queries >= FAISS_MIN_QUERIES and faiss_available() else "numpy"
        return self.backend

    def search(self, queries: Words, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(indices, distances), each (q, k) int64, nearest first, ties by lower index; k is capped at the
        number of stored vectors. A single (words,) query gives (k,) arrays."""
        one = queries.ndim == 1 if isinstance(queries, np.ndarray) else False
        queries = self.algebra.check(queries, "queries")
        batch = queries.reshape(-1, self.algebra.words)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidHypervector(f"k must be a positive int, got {k!r}", field="k")
        k = min(k, self.count)
        if self.route(batch.shape[0]) == "faiss":
            distances, indices = self._faiss_index().search(np.ascontiguousarray(batch).view(np.uint8), k)
            indices, distances = indices.astype(np.int64), distances.astype(np.int64)
        else:
            indices, distances = self._search_numpy(batch, k)
        return (indices[0], distances[0]) if one else (indices, distances)

    def _search_numpy(self, queries: Words, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        blocks = self._transposed()
        spans = np.array_split(np.arange(blocks.shape[0]), min(self.threads, blocks.shape[0]))
        if len(spans) == 1:
            partial = [self._scan(blocks, spans[0], queries, k)]
        else:
            with ThreadPoolExecutor(len(spans)) as pool:
                partial = list(pool.map(lambda span: self._scan(blocks, span, queries, k), spans))
        indices = np.empty((queries.shape[0], k), dtype=np.int64)
        distances = np.empty((queries.shape[0], k), dtype=np.int64)
        for q in range(queries.shape[0]):
            best_d = np.concatenate([p[q][0] for p in partial])
            best_i = np.concatenate([p[q][1] for p in partial])
            order = np.lexsort((best_i, best_d))[:k]
            indices[q], distances[q] = best_i[order], best_d[order]
        return indices, distances

    def _scan(
        self, blocks: Words, span: NDArray[np.intp], queries: Words, k: int
    ) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
        """Top-k candidates per query over the blocks in `span` (ascending), with this thread's own buffers.

        Queries go through each block in groups, one XOR, popcount and reduction per group, so that the Python
        overhead is per group and block, not per query and block; the block is read from memory once.
        """
        rows = self.block_rows
        columns = np.ascontiguousarray(queries)[:, :, np.newaxis]
        best = [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)) for _ in range(queries.shape[0])]
        # The k-th best distance so far per query; rows must beat it strictly (scanning in index order, an
        # equal distance never displaces an earlier, lower index). Above any distance until k rows are in.
        threshold = np.full(queries.shape[0], np.iinfo(np.int64).max)
        with np.errstate():  # restores numpy's ufunc buffer size on exit (it is per thread and context)
            # A ufunc whose inner dimension (here the rows of a block) is shorter than numpy's buffer (8192
            # elements) and that broadcasts an operand (the query column) is run through copying buffers: the
            # XOR took twice as long for 10,000-bit vectors (1669-row blocks) as for 1024-bit ones (16384 rows).
            # A buffer no longer than a block's rows lets it run on the arrays in place.
            np.setbufsize(max(16, min(np.getbufsize(), rows // 16 * 16)))  # numpy wants a multiple of 16
            self._scan_blocks(blocks, span, columns, k, best, threshold)
        return best

    def _scan_blocks(
        self,
        blocks: Words,
        span: NDArray[np.intp],
        columns: Words,
        k: int,
        best: list[tuple[NDArray[np.int64], NDArray[np.int64]]],
        threshold: NDArray[np.int64],
    ) -> None:
        words, rows = self.algebra.words, self.block_rows
        queries = columns.shape[0]
        group = max(1, min(queries, GROUP_BYTES // (words * rows * 8)))
        xor = np.empty((group, words, rows), dtype=np.uint64)
        counts = np.empty((group, words, rows), dtype=np.uint8)
        total = np.empty((group, rows), dtype=np.uint16 if words * WORD_BITS < 1 << 16 else np.uint32)
        for b in span:
            offset = int(b) * rows
            valid = min(rows, self.count - offset)
            block = blocks[b]
            for first in range(0, queries, group):
                size = min(group, queries - first)
                np.bitwise_xor(block, columns[first : first + size], out=xor[:size])
                np.bitwise_count(xor[:size], out=counts[:size])
                np.add.reduce(counts[:size], axis=1, dtype=total.dtype, out=total[:size])
                hits = total[:size, :valid] < threshold[first : first + size, np.newaxis]
                for g in np.flatnonzero(hits.any(axis=1)):
                    q = first + int(g)
                    candidates = np.flatnonzero(hits[g])
                    best_d, best_i = best[q]
                    merged_d = np.concatenate([best_d, total[g, candidates].astype(np.int64)])
                    merged_i = np.concatenate([best_i, candidates.astype(np.int64) + offset])
                    if merged_d.size > k:
                        key = merged_d * (self.count + 1) + merged_i  # unique, orders by (distance, index)
                        keep = np.argpartition(key, k - 1)[:k]
                        merged_d, merged_i = merged_d[keep], merged_i[keep]
                    order = np.lexsort((merged_i, merged_d))
                    best[q] = (merged_d[order], merged_i[order])
                    if best[q][0].size == k:
                        threshold[q] = best[q][0][-1]
