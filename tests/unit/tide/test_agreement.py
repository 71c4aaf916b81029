"""A replica's verdict on its own state from the other replicas' digest reports."""

from __future__ import annotations

from services.tide.agreement import Check, PeerAgreement


def check(peer: str, agrees: bool, at: float = 0.0, partition: int = 0, offset: int = 10) -> Check:
    return Check(peer, partition, offset, agrees, at)


def test_of_three_replicas_the_odd_one_is_in_the_minority_and_the_others_are_not():
    odd = PeerAgreement()
    odd.record(check("r1", False))
    odd.record(check("r3", False))
    assert odd.verdict().in_minority

    good = PeerAgreement()
    good.record(check("r2", False))
    assert good.verdict().in_minority  # alone against one: cannot tell yet
    good.record(check("r3", True))
    verdict = good.verdict()
    assert not verdict.in_minority and verdict.disagreeing == ("r2",) and verdict.agreeing == ("r3",)


def test_of_two_replicas_that_disagree_both_stop():
    a = PeerAgreement()
    a.record(check("b", False))
    assert a.verdict().in_minority


def test_no_reports_or_only_agreeing_ones_mean_serving():
    agreement = PeerAgreement()
    assert not agreement.verdict().in_minority
    agreement.record(check("r2", True))
    assert not agreement.verdict().in_minority


def test_one_disagreeing_partition_makes_the_peer_disagree():
    agreement = PeerAgreement()
    agreement.record(check("r2", True, partition=0))
    agreement.record(check("r2", False, partition=1))
    assert agreement.verdict().disagreeing == ("r2",)


def test_a_newer_report_replaces_an_older_one_but_not_the_other_way_round():
    agreement = PeerAgreement()
    agreement.record(check("r2", False, offset=10))
    agreement.record(check("r2", True, offset=20))
    agreement.record(check("r2", False, offset=15))  # arrived late: an older offset
    assert agreement.verdict().agreeing == ("r2",)


def test_old_disagreements_keep_counting_until_newer_reports_agree():
    agreement = PeerAgreement()
    agreement.record(check("r1", False, at=0.0))
    agreement.record(check("r2", False, at=0.0))
    assert agreement.verdict().in_minority  # an idle hour later still
    agreement.record(check("r1", True, offset=20))
    agreement.record(check("r2", True, offset=20))
    assert not agreement.verdict().in_minority
    assert [c.offset for c in agreement.checks()] == [20, 20]
