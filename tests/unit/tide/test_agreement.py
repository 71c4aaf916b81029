"""A replica's verdict on its own state from the other replicas' digest reports."""

from __future__ import annotations

from services.tide.agreement import Check, PeerAgreement


def check(peer: str, agrees: bool, at: float = 0.0, partition: int = 0, offset: int = 10) -> Check:
    return Check(peer, partition, offset, agrees, at)


def test_of_three_replicas_the_odd_one_is_in_the_minority_and_the_others_are_not():
    odd = PeerAgreement(window_s=60)
    odd.record(check("r1", False))
    odd.record(check("r3", False))
    assert odd.verdict(1.0).in_minority

    good = PeerAgreement(window_s=60)
    good.record(check("r2", False))
    assert good.verdict(1.0).in_minority  # alone against one: cannot tell yet
    good.record(check("r3", True))
    verdict = good.verdict(1.0)
    assert not verdict.in_minority and verdict.disagreeing == ("r2",) and verdict.agreeing == ("r3",)


def test_of_two_replicas_that_disagree_both_stop():
    a = PeerAgreement(window_s=60)
    a.record(check("b", False))
    assert a.verdict(0.0).in_minority


def test_no_reports_or_only_agreeing_ones_mean_serving():
    agreement = PeerAgreement(window_s=60)
    assert not agreement.verdict(0.0).in_minority
    agreement.record(check("r2", True))
    assert not agreement.verdict(0.0).in_minority


def test_one_disagreeing_partition_makes_the_peer_disagree():
    agreement = PeerAgreement(window_s=60)
    agreement.record(check("r2", True, partition=0))
    agreement.record(check("r2", False, partition=1))
    assert agreement.verdict(0.0).disagreeing == ("r2",)


def test_a_newer_report_replaces_an_older_one_but_not_the_other_way_round():
    agreement = PeerAgreement(window_s=60)
    agreement.record(check("r2", False, offset=10))
    agreement.record(check("r2", True, offset=20))
    agreement.record(check("r2", False, offset=15))  # arrived late: an older offset
    assert agreement.verdict(0.0).agreeing == ("r2",)


def test_reports_older_than_the_window_stop_counting():
    agreement = PeerAgreement(window_s=60)
    agreement.record(check("gone", False, at=0.0))
    assert agreement.verdict(59.0).in_minority
    assert not agreement.verdict(61.0).in_minority
    assert agreement.checks(61.0) == []
