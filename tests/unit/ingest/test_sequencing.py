"""StreamBook (layout, sequences, gaps, duplicates, retries, bounds) and TokenBucket with a fake clock."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.ingest.sequencing import Admission, StreamBook, TokenBucket

KEY = ("session-a", "eeg-0")
LAYOUT = (1, ("C3", "C4"), ("uV", "uV"), 250.0, 1)


def book(window: int = 16, max_streams: int = 8) -> StreamBook:
    return StreamBook(window=window, max_streams=max_streams)


def admit_and_write(b: StreamBook, sequence: int, key: tuple[str, str] = KEY, offset: int | None = None) -> None:
    assert b.admit(key, sequence, LAYOUT).admission is Admission.NEW
    b.written(key, sequence, 0, sequence if offset is None else offset)


def test_first_chunk_sets_baseline_without_gap() -> None:
    b = book()
    verdict = b.admit(KEY, 41, LAYOUT)
    assert verdict.admission is Admission.NEW
    assert verdict.gap == 0
    state = b.state(KEY)
    assert state is not None
    assert state.gaps_total == 0
    assert state.next_sequence == 42
    assert b.admit(KEY, 42, LAYOUT).gap == 0


def test_gaps_are_counted() -> None:
    b = book()
    admit_and_write(b, 0)
    verdict = b.admit(KEY, 3, LAYOUT)
    assert (verdict.admission, verdict.gap) == (Admission.NEW, 2)
    assert b.admit(KEY, 4, LAYOUT).gap == 0
    assert b.admit(KEY, 10, LAYOUT).gap == 5
    state = b.state(KEY)
    assert state is not None
    assert state.gaps_total == 7
    assert state.next_sequence == 11


def test_duplicate_of_written_answers_with_its_location() -> None:
    b = book()
    assert b.admit(KEY, 0, LAYOUT).admission is Admission.NEW
    b.written(KEY, 0, 2, 99)
    verdict = b.admit(KEY, 0, LAYOUT)
    assert verdict.admission is Admission.DUPLICATE_WRITTEN
    assert verdict.location == (2, 99)
    assert verdict.gap == 0


def test_duplicate_while_pending() -> None:
    b = book()
    b.admit(KEY, 0, LAYOUT)
    verdict = b.admit(KEY, 0, LAYOUT)
    assert verdict.admission is Admission.DUPLICATE_PENDING
    assert verdict.location is None
    b.written(KEY, 0, 1, 5)
    assert b.admit(KEY, 0, LAYOUT).admission is Admission.DUPLICATE_WRITTEN


def test_backwards_sequence_rejected() -> None:
    b = book(window=2)
    for sequence in range(5):
        admit_and_write(b, sequence)
    # 1 was written but is no longer remembered (window 2): neither a duplicate nor new.
    with pytest.raises(InvalidArgument) as info:
        b.admit(KEY, 1, LAYOUT)
    assert info.value.reason == "sequence_backwards"


def test_backwards_after_gap_rejected() -> None:
    b = book()
    admit_and_write(b, 0)
    admit_and_write(b, 5)
    with pytest.raises(InvalidArgument) as info:
        b.admit(KEY, 3, LAYOUT)  # skipped, never sent: not retryable
    assert info.value.reason == "sequence_backwards"


def test_layout_change_rejected() -> None:
    b = book()
    admit_and_write(b, 0)
    changed = (1, ("C3", "C4"), ("uV", "uV"), 500.0, 1)
    with pytest.raises(InvalidArgument) as info:
        b.admit(KEY, 1, changed)
    assert info.value.reason == "layout_changed"
    # The stream keeps its original layout and carries on.
    assert b.admit(KEY, 1, LAYOUT).admission is Admission.NEW


def test_layout_is_per_stream() -> None:
    b = book()
    admit_and_write(b, 0)
    other = (2, ("II",), ("mV",), 500.0, 1)
    assert b.admit(("session-a", "ecg-0"), 0, other).admission is Admission.NEW


def test_failed_sequence_may_be_resent_after_later_ones() -> None:
    b = book()
    b.admit(KEY, 0, LAYOUT)
    b.admit(KEY, 1, LAYOUT)
    b.admit(KEY, 2, LAYOUT)
    b.written(KEY, 0, 0, 0)
    b.written(KEY, 2, 0, 1)
    b.failed(KEY, 1)
    state = b.state(KEY)
    assert state is not None
    assert 1 not in state.pending
    verdict = b.admit(KEY, 1, LAYOUT)
    assert verdict.admission is Admission.NEW
    assert verdict.gap == 0
    assert state.next_sequence == 3
    # Only once: a second resend while the first is in flight is a pending duplicate, after writing a duplicate.
    assert b.admit(KEY, 1, LAYOUT).admission is Admission.DUPLICATE_PENDING
    b.written(KEY, 1, 0, 2)
    assert b.admit(KEY, 1, LAYOUT).location == (0, 2)


def test_without_failed_an_earlier_unwritten_sequence_is_not_retryable() -> None:
    b = book()
    b.admit(KEY, 0, LAYOUT)
    b.admit(KEY, 1, LAYOUT)
    b.written(KEY, 1, 0, 0)
    b.failed(KEY, 1)  # a different sequence failed: 0 stays pending, not retryable
    assert b.admit(KEY, 0, LAYOUT).admission is Admission.DUPLICATE_PENDING
    b2 = book()
    admit_and_write(b2, 0)
    admit_and_write(b2, 2)
    with pytest.raises(InvalidArgument):
        b2.admit(KEY, 1, LAYOUT)


def test_release_makes_a_sequence_retryable() -> None:
    b = book()
    b.admit(KEY, 0, LAYOUT)
    b.failed(KEY, 0)
    b.admit(KEY, 1, LAYOUT)
    assert b.admit(KEY, 0, LAYOUT).admission is Admission.NEW


def test_unknown_stream_outcomes_are_ignored() -> None:
    b = book()
    b.written(KEY, 0, 0, 0)
    b.failed(KEY, 0)
    b.release(KEY, 0)
    assert b.state(KEY) is None


def test_window_bounds_remembered_sequences() -> None:
    b = book(window=3)
    for sequence in range(10):
        admit_and_write(b, sequence)
    state = b.state(KEY)
    assert state is not None
    assert list(state.written) == [7, 8, 9]
    assert b.admit(KEY, 7, LAYOUT).admission is Admission.DUPLICATE_WRITTEN
    with pytest.raises(InvalidArgument):
        b.admit(KEY, 6, LAYOUT)


def test_window_bounds_retryable_sequences() -> None:
    b = book(window=3)
    for sequence in range(6):
        b.admit(KEY, sequence, LAYOUT)
    for sequence in range(6):
        b.failed(KEY, sequence)
    state = b.state(KEY)
    assert state is not None
    assert state.retryable == {3, 4, 5}
    with pytest.raises(InvalidArgument):
        b.admit(KEY, 0, LAYOUT)
    assert b.admit(KEY, 3, LAYOUT).admission is Admission.NEW


def test_max_streams_evicts_least_recently_seen() -> None:
    b = book(max_streams=2)
    a, c, d = ("s", "a"), ("s", "c"), ("s", "d")
    admit_and_write(b, 0, a)
    admit_and_write(b, 0, c)
    admit_and_write(b, 1, a)  # a is now the most recently seen
    admit_and_write(b, 0, d)  # evicts c
    assert b.state(c) is None
    assert b.state(a) is not None and b.state(d) is not None
    assert len(b.streams) == 2
    # A forgotten stream starts a new baseline: no gap, no backwards error.
    verdict = b.admit(c, 0, LAYOUT)
    assert (verdict.admission, verdict.gap) == (Admission.NEW, 0)
    assert b.state(a) is None  # a was least recently seen now


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_empty() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]


def test_token_bucket_refills_at_rate() -> None:
    # Rates and steps are powers of two so the float arithmetic is exact.
    clock = FakeClock()
    bucket = TokenBucket(rate=8.0, burst=5, clock=clock)
    for _ in range(5):
        assert bucket.take()
    clock.now += 0.0625  # half a token
    assert not bucket.take()
    clock.now += 0.0625  # one token in all
    assert bucket.take()
    assert not bucket.take()
    clock.now += 0.375  # three tokens
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_token_bucket_saves_at_most_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    clock.now += 3600.0
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_token_bucket_takes_several_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=4, clock=clock)
    assert bucket.take(3.0)
    assert not bucket.take(2.0)  # a refusal takes nothing
    assert bucket.take(1.0)
    clock.now += 1.0
    assert bucket.take(2.0)
    assert not bucket.take(0.5)
