"""Gaps (holes) in a partition's offsets: a replica applies only up to the hole, reads again from it, and skips it only
once it has stayed for the wait (a hole in the log itself)."""

from __future__ import annotations

from services.tide.gaps import Decision, OffsetGaps


def test_contiguous_records_are_all_applied():
    gaps = OffsetGaps(wait_s=10)
    assert gaps.decide(0, 5, [5, 6, 7], now=0.0) == Decision(3)


def test_a_hole_stops_before_it_and_rereads_from_it():
    gaps = OffsetGaps(wait_s=10)
    # 800 is reserved but not readable yet; 801 arrived first (the embedded broker under concurrent appends).
    assert gaps.decide(1, 800, [801, 802], now=0.0) == Decision(0, reread_from=800)
    assert gaps.decide(1, 798, [798, 799, 801], now=0.0) == Decision(2, reread_from=800)


def test_a_hole_that_fills_is_applied_in_order_and_timed():
    gaps = OffsetGaps(wait_s=10)
    gaps.decide(1, 800, [801], now=1.0)
    decision = gaps.decide(1, 800, [800, 801, 802], now=1.25)
    assert decision.apply == 3 and decision.reread_from is None and decision.skipped is None
    assert decision.filled_after_s == 0.25
    # The hole is closed: a later one is timed from when it is found.
    assert gaps.decide(1, 803, [805], now=50.0) == Decision(0, reread_from=803)


def test_a_hole_that_stays_for_the_wait_is_skipped_once():
    gaps = OffsetGaps(wait_s=10)
    assert gaps.decide(2, 10, [12], now=0.0).reread_from == 10
    assert gaps.decide(2, 10, [12], now=9.9).reread_from == 10
    assert gaps.decide(2, 10, [12, 13], now=10.0) == Decision(2, skipped=(10, 11))


def test_a_second_hole_in_the_same_fetch_waits_on_its_own():
    gaps = OffsetGaps(wait_s=10)
    gaps.decide(0, 0, [2], now=0.0)
    decision = gaps.decide(0, 0, [2, 3, 5], now=20.0)
    assert decision == Decision(2, reread_from=4, skipped=(0, 1))


def test_partitions_are_independent():
    gaps = OffsetGaps(wait_s=10)
    gaps.decide(0, 0, [1], now=0.0)
    assert gaps.decide(1, 0, [0, 1], now=0.0) == Decision(2)
    assert gaps.decide(0, 0, [1], now=5.0) == Decision(0, reread_from=0)
