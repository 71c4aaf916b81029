"""One stream of a session inside the fusion worker: reorder buffer, de-duplication, clock placement, samples.

Pure: numpy only. Chunks go in as the raw log delivers them; they are placed on the session clock in sequence
order, waiting up to the lateness for a missing sequence number before calling it lost.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import physical_samples, unpack_samples
from services.fusion.buffers import SegmentSignal
from services.fusion.clocks import ClockLine, Continuity, StreamClock
from services.fusion.filters import FilterPlan

_INT16_EXTREMES = (-32768, 32767)


@dataclass(frozen=True)
class RawChunk:
    """A chunk as read from the raw topic, with where it was in the log."""

    chunk: signal_pb2.SignalChunk
    partition: int
    offset: int


@dataclass
class PlacedChunk:
    """A chunk placed on the session clock: sample index `index` of clock segment `segment` is its first sample."""

    sequence: int
    partition: int
    offset: int
    segment: int
    continuity: Continuity
    index: int
    line: ClockLine
    at_digital_limit: bool  # an int16 sample at an end of the int16 range
    source_time_s: float
    count: int
    start_s: float  # session time of the first sample, and just after the last one, by the line at placement
    end_s: float
    ingest_time_ns: int = 0  # when ingest received the chunk (0: not stamped)


class StreamState:
    """Everything the worker knows about one stream of one session.

    events: counts of what happened ("duplicate", "late", "gap", "reset", "restart"), read by the worker for
    its metrics.
    """

    def __init__(
        self,
        first: signal_pb2.SignalChunk,
        fit_seconds: float,
        reset_seconds: float,
        lateness_seconds: float,
        events: Counter[str],
        max_gap_seconds: float = 30.0,
        filter_plan: FilterPlan | None = None,
        filter_epoch_seconds: float = 8.0,
    ) -> None:
        self.stream_id = first.stream_id
        self.modality = int(first.modality)
        self.channel_names = tuple(first.channel_names)
        self.channel_units = tuple(first.channel_units) or ("",) * len(first.channel_names)
        self.nominal_rate_hz = first.nominal_rate_hz
        self.lateness_seconds = lateness_seconds
        self.events = events
        self.clock = StreamClock(first.nominal_rate_hz, fit_seconds, reset_seconds, max_gap_seconds)
        self.placed: deque[PlacedChunk] = deque()
        # The samples of each clock segment still held, raw and filtered (see buffers.py).
        self.signals: dict[int, SegmentSignal] = {}
        self.filter_plan = filter_plan
        self.filter_epoch_seconds = filter_epoch_seconds
        self._pending: dict[int, RawChunk] = {}
        self._next_sequence: int | None = None
        self._seq0_time: float | None = None  # source time of the current incarnation's sequence 0
        # Where this worker's knowledge of the stream starts: the session time of the first chunk it read,
        # or -inf when that chunk was the stream's first (sequence 0), so nothing before it exists.
        self.known_from_s = -np.inf
        # (end time, offset) of every chunk whose samples or clock point a future window may still need.
        self.retained: deque[tuple[float, int]] = deque()
        self.covered_to_s = -np.inf
        self.first_time_s = np.inf

    def matches(self, chunk: signal_pb2.SignalChunk) -> bool:
        """True when the chunk has this stream's layout (a stream may not change channels or rate mid-way)."""
        return (
            tuple(chunk.channel_names) == self.channel_names
            and chunk.nominal_rate_hz == self.nominal_rate_hz
            and int(chunk.modality) == self.modality
        )

    def add(self, raw: RawChunk) -> list[PlacedChunk]:
        """Takes a chunk; returns the chunks placed on the clock because of it (in sequence order)."""
        chunk = raw.chunk
        sequence = int(chunk.sequence)
        if self._next_sequence is None:
            if sequence in self._pending:
                self.events["duplicate"] += 1
                return []
            self._pending[sequence] = raw
            return self._start() if self._start_known() else []
        if sequence == 0 and self._seq0_time != chunk.first_sample_time_s and self._next_sequence > 0:
            # The stream restarted (a device reconnected): whatever was waiting belongs to the old run.
            self.events["restart"] += 1
            placed = self._flush_pending()
            self._next_sequence = 0
            self._seq0_time = chunk.first_sample_time_s
            self._pending[0] = raw
            return placed + self._drain()
        if sequence < self._next_sequence or sequence in self._pending:
            self.events["duplicate" if self._was_placed(sequence) or sequence in self._pending else "late"] += 1
            return []
        self._pending[sequence] = raw
        return self._drain()

    def _start_known(self) -> bool:
        """Whether the stream's first chunk is known: sequence 0, or chunks spanning the lateness after the
        lowest one seen (this worker started reading mid-stream; earlier chunks may still arrive out of order
        until then)."""
        if 0 in self._pending:
            return True
        times = [r.chunk.first_sample_time_s + r.chunk.clock_offset_s for r in self._pending.values()]
        return max(times) - min(times) >= self.lateness_seconds

    def _start(self) -> list[PlacedChunk]:
        first = min(self._pending)
        self._next_sequence = first
        chunk = self._pending[first].chunk
        if first == 0:
            self._seq0_time = chunk.first_sample_time_s
        else:
            self.known_from_s = chunk.first_sample_time_s + chunk.clock_offset_s
        return self._drain()

    def _was_placed(self, sequence: int) -> bool:
        return any(p.sequence == sequence for p in self.placed)

    def _drain(self) -> list[PlacedChunk]:
        placed: list[PlacedChunk] = []
        while self._pending:
            assert self._next_sequence is not None
            raw = self._pending.pop(self._next_sequence, None)
            if raw is None:
                # A hole: wait for it until the chunks after it reach `lateness` beyond where the stream stands.
                newest = max(r.chunk.first_sample_time_s + r.chunk.clock_offset_s for r in self._pending.values())
                if self.placed and newest - self.covered_to_s < self.lateness_seconds:
                    break
                self._next_sequence = min(self._pending)
                continue
            placed.append(self._place(raw))
            self._next_sequence += 1
        return placed

    def _flush_pending(self) -> list[PlacedChunk]:
        placed = []
        for sequence in sorted(self._pending):
            self._next_sequence = sequence
            placed.append(self._place(self._pending.pop(sequence)))
        return placed

    def _place(self, raw: RawChunk) -> PlacedChunk:
        chunk = raw.chunk
        placement = self.clock.place(
            int(chunk.sequence), chunk.first_sample_time_s, chunk.clock_offset_s, int(chunk.sample_count)
        )
        if placement.continuity is Continuity.GAP:
            self.events["gap"] += 1
        elif placement.continuity is Continuity.RESET:
            self.events["reset"] += 1
        at_limit = False
        if chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16:
            raw_values = unpack_samples(chunk)
            at_limit = bool(((raw_values == _INT16_EXTREMES[0]) | (raw_values == _INT16_EXTREMES[1])).any())
        placed = PlacedChunk(
            sequence=int(chunk.sequence),
            partition=raw.partition,
            offset=raw.offset,
            segment=placement.segment,
            continuity=placement.continuity,
            index=placement.index,
            line=placement.line,
            at_digital_limit=at_limit,
            source_time_s=chunk.first_sample_time_s,
            count=int(chunk.sample_count),
            start_s=placement.line.at(placement.index),
            end_s=placement.line.at(placement.index + int(chunk.sample_count)),
            ingest_time_ns=chunk.ingest_time.ToNanoseconds() if chunk.HasField("ingest_time") else 0,
        )
        self.placed.append(placed)
        segment = self.signals.get(placement.segment)
        if segment is None:
            segment = SegmentSignal(
                len(self.channel_names), placement.index, self.filter_plan, self.filter_epoch_seconds
            )
            self.signals[placement.segment] = segment
        segment.append(placement.index, physical_samples(chunk), placement.line)
        self.retained.append((placed.end_s, raw.offset))
        self.first_time_s = min(self.first_time_s, placed.start_s)
        self.covered_to_s = (
            placed.end_s if placement.continuity is Continuity.RESET else max(self.covered_to_s, placed.end_s)
        )
        return placed

    def flush(self) -> list[PlacedChunk]:
        """Places every waiting chunk, calling the holes before them lost (the session went idle)."""
        if self._next_sequence is None and self._pending:
            self._start()
        return self._flush_pending()

    def forget_before(self, samples_from_s: float, offsets_from_s: float, filter_epoch: int) -> None:
        """Drops samples ending before samples_from_s, filter runs that windows from filter epoch `filter_epoch`
        on do not use, and offset records ending before offsets_from_s."""
        while self.placed and self.placed[0].end_s < samples_from_s and len(self.placed) > 1:
            self.placed.popleft()
        first_held: dict[int, int] = {}
        if len(self.signals) == 1 and self.placed:  # the usual case: one clock segment
            first_held[self.placed[0].segment] = self.placed[0].index
        else:
            for placed in self.placed:
                first_held.setdefault(placed.segment, placed.index)
        for number in list(self.signals):
            if number in first_held:
                self.signals[number].forget_before(first_held[number], filter_epoch)
            else:
                del self.signals[number]
        while self.retained and self.retained[0][0] < offsets_from_s:
            self.retained.popleft()

    @property
    def waiting(self) -> bool:
        """True while chunks wait for a missing sequence number (or for the stream's start to be known)."""
        return bool(self._pending)

    def needed_offset(self) -> int | None:
        """The lowest raw-topic offset this stream still needs, or None."""
        offsets = [offset for _, offset in self.retained]
        offsets.extend(r.offset for r in self._pending.values())
        return min(offsets) if offsets else None
