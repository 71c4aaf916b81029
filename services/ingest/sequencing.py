"""Per-stream bookkeeping of what was written: channel layout, sequence numbers, gaps and duplicates.

Pure. The ingest pipeline admits each chunk here before producing it and reports the outcome after.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from services.common.errors import InvalidArgument


class Admission(Enum):
    NEW = "new"
    # Already written: answer with where it was written.
    DUPLICATE_WRITTEN = "duplicate_written"
    # Being written right now by an earlier send: answer once that one is acknowledged.
    DUPLICATE_PENDING = "duplicate_pending"


@dataclass
class Verdict:
    admission: Admission
    # Sequences skipped between the previous highest and this one (0 unless NEW).
    gap: int = 0
    location: tuple[int, int] | None = None


@dataclass
class StreamState:
    layout: str
    next_sequence: int
    written: OrderedDict[int, tuple[int, int]] = field(default_factory=OrderedDict)
    pending: set[int] = field(default_factory=set)
    # Sequences whose write failed or that were refused for rate: never written, so they may come again.
    retryable: set[int] = field(default_factory=set)
    gaps_total: int = 0
    last_seen: float = 0.0


class StreamBook:
    """The state of every stream this process has seen, bounded by streams and by remembered sequences.

    window: how many written sequences are remembered per stream for duplicate answers.
    max_streams: streams remembered; the least recently seen is forgotten first.
    """

    def __init__(self, window: int, max_streams: int) -> None:
        self.window = window
        self.max_streams = max_streams
        self.streams: OrderedDict[tuple[str, str], StreamState] = OrderedDict()

    def state(self, key: tuple[str, str]) -> StreamState | None:
        return self.streams.get(key)

    def admit(self, key: tuple[str, str], sequence: int, layout: str) -> Verdict:
        """Decides what to do with a valid chunk of stream `key`.

        Raises InvalidArgument when the stream changes its channel layout or its sequence goes backwards.
        """
        state = self.streams.get(key)
        if state is None:
            # First chunk this process sees: a restarted ingest must not count everything before it as a gap.
            state = StreamState(layout=layout, next_sequence=sequence)
            self.streams[key] = state
            while len(self.streams) > self.max_streams:
                self.streams.popitem(last=False)
        self.streams.move_to_end(key)
        state.last_seen = time.monotonic()
        if layout != state.layout:
            raise InvalidArgument(
                "stream changed its channel layout (modality, channels, units, rate or format)",
                reason="layout_changed",
            )
        if sequence in state.written:
            return Verdict(Admission.DUPLICATE_WRITTEN, location=state.written[sequence])
        if sequence in state.pending:
            return Verdict(Admission.DUPLICATE_PENDING)
        gap = 0
        if sequence >= state.next_sequence:
            gap = sequence - state.next_sequence
            state.gaps_total += gap
            state.next_sequence = sequence + 1
        elif sequence in state.retryable:
            state.retryable.discard(sequence)
        else:
            raise InvalidArgument(
                f"sequence {sequence} went backwards (next expected {state.next_sequence})",
                reason="sequence_backwards",
            )
        state.pending.add(sequence)
        return Verdict(Admission.NEW, gap=gap)

    def written(self, key: tuple[str, str], sequence: int, partition: int, offset: int) -> None:
        """Records that `sequence` is on Kafka at (partition, offset)."""
        state = self.streams.get(key)
        if state is None:
            return
        state.pending.discard(sequence)
        state.written[sequence] = (partition, offset)
        while len(state.written) > self.window:
            state.written.popitem(last=False)

    def failed(self, key: tuple[str, str], sequence: int) -> None:
        """Records that `sequence` was not written, so the client may send it again."""
        state = self.streams.get(key)
        if state is None:
            return
        state.pending.discard(sequence)
        self.release(key, sequence)

    def release(self, key: tuple[str, str], sequence: int) -> None:
        """Lets `sequence` come again although later ones were admitted (it was never written)."""
        state = self.streams.get(key)
        if state is None:
            return
        state.retryable.add(sequence)
        if len(state.retryable) > self.window:
            state.retryable.discard(min(state.retryable))


class TokenBucket:
    """A rate limit: `rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock or time.monotonic
        self.updated = self.clock()

    def take(self, tokens: float = 1.0) -> bool:
        """Takes `tokens` if there are enough; False means over the rate."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= tokens:
            self.tokens -= tokens
            return True
        return False

    def wait_s(self, tokens: float = 1.0) -> float:
        """Seconds until `tokens` could be taken (0 when they can now)."""
        return max(0.0, (tokens - self.tokens) / self.rate)
