"""The Tide apply function: put / compare-and-set / delete semantics, versions, idempotent retries, limits,
the change feed and digests that depend only on the log."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.tide.state import (
    Cas,
    Command,
    Delete,
    DigestReport,
    Limits,
    Outcome,
    PartitionState,
    Put,
    TideState,
    Version,
    digest_of,
    fingerprint,
)
from tests.unit.tide.helpers import random_log


def put(cid: str, key: str, value: bytes, content_type: str = "text/plain") -> Command:
    return Command(cid, key, Put(value, content_type))


def test_put_sets_the_value_and_the_version_is_the_records_position():
    state = TideState()
    result = state.apply(0, 5, put("c1", "a", b"1"))
    assert result.outcome is Outcome.APPLIED
    assert result.version == result.key_version == Version(0, 5)
    entry = state.get("a", 0)
    assert entry is not None and (entry.value, entry.content_type, entry.version) == (b"1", "text/plain", (0, 5))
    assert state.applied(0) == 6 and state.applied(1) == 0


def test_cas_applies_only_when_the_expected_version_matches_at_that_point_of_the_log():
    state = TideState()
    state.apply(0, 0, put("c1", "a", b"1"))
    ok = state.apply(0, 1, Command("c2", "a", Cas(b"2", expected=Version(0, 0))))
    assert ok.outcome is Outcome.APPLIED and ok.key_version == Version(0, 1)
    # The same expectation again is now stale.
    stale = state.apply(0, 2, Command("c3", "a", Cas(b"3", expected=Version(0, 0))))
    assert stale.outcome is Outcome.CAS_CONFLICT
    assert stale.version == Version(0, 2) and stale.key_version == Version(0, 1)
    entry = state.get("a", 0)
    assert entry is not None and entry.value == b"2"


def test_cas_expect_absent_creates_once_and_a_missing_key_matches_no_version():
    state = TideState()
    assert state.apply(1, 0, Command("c1", "k", Cas(b"x", expected=Version(1, 0)))).outcome is Outcome.CAS_CONFLICT
    assert state.apply(1, 1, Command("c2", "k", Cas(b"x", expect_absent=True))).outcome is Outcome.APPLIED
    assert state.apply(1, 2, Command("c3", "k", Cas(b"y", expect_absent=True))).outcome is Outcome.CAS_CONFLICT
    assert state.apply(1, 3, Command("c4", "k", Delete())).outcome is Outcome.APPLIED
    assert state.get("k", 1) is None
    # Deleted is absent again.
    assert state.apply(1, 4, Command("c5", "k", Cas(b"z", expect_absent=True))).outcome is Outcome.APPLIED


def test_delete_of_a_missing_key_is_not_found():
    state = TideState()
    result = state.apply(0, 0, Command("c1", "nope", Delete()))
    assert result.outcome is Outcome.NOT_FOUND and result.key_version is None


def test_a_retried_command_id_answers_the_first_result_and_changes_nothing():
    state = TideState()
    first = state.apply(0, 0, Command("same", "a", Cas(b"1", expect_absent=True)))
    state.apply(0, 1, put("other", "a", b"2"))
    retry = state.apply(0, 2, Command("same", "a", Cas(b"1", expect_absent=True)))
    assert retry.outcome is Outcome.APPLIED and retry.version == first.version == Version(0, 0)
    entry = state.get("a", 0)
    assert entry is not None and entry.value == b"2" and state.applied(0) == 3


def test_offsets_must_increase_per_partition_but_may_skip():
    state = TideState()
    state.apply(0, 3, put("c1", "a", b"1"))
    with pytest.raises(FailedPrecondition):
        state.apply(0, 3, put("c2", "a", b"2"))
    state.apply(0, 10, put("c3", "a", b"3"))
    state.apply(1, 0, put("c4", "b", b"4"))  # other partitions are independent
    assert state.applied(0) == 11 and state.applied(1) == 1


@pytest.mark.parametrize(
    "command",
    [
        put("c", "", b"v"),
        put("c", "k" * 17, b"v"),
        put("c", "k", b"v" * 33),
        put("", "k", b"v"),
        Command("c", "k", Cas(b"v")),
        Command("c", "k", Cas(b"v", expected=Version(0, 0), expect_absent=True)),
    ],
)
def test_malformed_or_oversized_commands_raise_invalid_argument_and_change_nothing(command):
    state = TideState(Limits(max_key_bytes=16, max_value_bytes=32))
    with pytest.raises(InvalidArgument):
        state.apply(0, 0, command)
    assert state.applied(0) == 0
    state.skip(0, 0)
    assert state.applied(0) == 1 and state.list() == []


def test_key_limit_counts_utf8_bytes_not_characters():
    state = TideState(Limits(max_key_bytes=4))
    with pytest.raises(InvalidArgument):
        state.apply(0, 0, put("c", "ééé", b""))
    state.apply(0, 0, put("c", "éé", b""))


def test_list_is_sorted_by_key_across_partitions_and_filtered_by_prefix():
    state = TideState()
    state.apply(1, 0, put("c1", "dev/b", b"2"))
    state.apply(0, 0, put("c2", "dev/a", b"1"))
    state.apply(2, 0, put("c3", "user/x", b"3"))
    assert [e.key for e in state.list("dev/")] == ["dev/a", "dev/b"]
    assert [e.key for e in state.list()] == ["dev/a", "dev/b", "user/x"]


def test_change_feed_is_in_log_order_bounded_and_refuses_starts_it_no_longer_holds():
    state = TideState(feed_length=3)
    for offset in range(5):
        state.apply(0, offset, put(f"c{offset}", f"k{offset % 2}", str(offset).encode()))
    state.apply(0, 5, Command("c5", "zz", Delete()))  # not found: no change
    changes = list(state.changes(0, 2))
    assert [c.version.offset for c in changes] == [2, 3, 4]
    assert [c.version.offset for c in state.changes(0, 2, prefix="k1")] == [3]
    with pytest.raises(FailedPrecondition):
        list(state.changes(0, 1))
    state.apply(0, 6, Command("c6", "k0", Delete()))
    last = list(state.changes(0, 6))
    assert len(last) == 1 and last[0].deleted and last[0].key == "k0"


def test_two_states_fed_the_same_log_give_equal_outcomes_and_digests():
    log = random_log(7)
    a, b = TideState(), TideState()
    assert [a.apply(*r) for r in log] == [b.apply(*r) for r in log]
    assert a.digests() == b.digests()
    assert len(a.digests()) == 3


def test_interleaving_partitions_differently_gives_equal_digests_per_partition():
    log = random_log(11)
    a, b = TideState(), TideState()
    for record in log:
        a.apply(*record)
    # Each partition's records in log order, but partitions one after another.
    for record in sorted(log, key=lambda r: (r[0], r[1])):
        b.apply(*record)
    assert a.digests() == b.digests()


def test_digests_differ_when_state_or_applied_offset_differs():
    a, b = TideState(), TideState()
    a.apply(0, 0, put("c1", "a", b"1"))
    b.apply(0, 0, put("c1", "a", b"2"))
    assert a.digests()[0] != b.digests()[0]
    c = TideState()
    c.apply(0, 0, put("c1", "a", b"1"))
    c.skip(0, 1)
    assert c.digests()[0][1] != a.digests()[0][1]


def test_digest_is_a_fixed_value_for_a_fixed_log():
    # Pinned, so a change of the digest's definition is a conscious one (replicas of two versions must agree).
    state = TideState()
    state.apply(0, 0, put("c1", "a", b"1"))
    assert state.digests() == {0: (1, "bbb8ec4979af81f974375f673689aef23471482fd9004d7d03ee1726a2e1c78b")}


def test_the_incremental_digest_equals_one_computed_from_the_entries_alone():
    state = TideState()
    for p, offset, command in random_log(seed=11):
        state.apply(p, offset, command)
    for p, partition in state.partitions.items():
        total = sum(fingerprint(e) for e in partition.entries.values())
        assert partition.entries_sum == total
        assert partition.digest() == digest_of(p, partition.applied, total)
        # The same entries stored in another order give the same digest.
        rebuilt = PartitionState(p, applied=partition.applied)
        for key in sorted(partition.entries, reverse=True):
            entry = partition.entries[key]
            rebuilt.store(type(entry)(entry.key, entry.value, entry.content_type, entry.version))
        assert rebuilt.digest() == partition.digest()


def test_digests_at_recent_offsets_are_remembered_and_older_ones_forgotten():
    state = TideState(digest_history=3)
    seen = {}
    for offset in range(6):
        state.apply(0, offset, put(f"c{offset}", "a", str(offset).encode()))
        seen[offset + 1] = state.digests()[0][1]
    partition = state.partition(0)
    assert [partition.digest_at(a) for a in (4, 5, 6)] == [seen[4], seen[5], seen[6]]
    assert partition.digest_at(3) is None and partition.digest_at(7) is None


def test_a_digest_report_changes_no_key_and_is_not_remembered_as_a_retry():
    state = TideState()
    state.apply(0, 0, put("c1", "a", b"1"))
    before = state.digests()[0][1]
    report = Command("r1", "", DigestReport("replica-1", 1, before))
    result = state.apply(0, 1, report)
    assert result.outcome is Outcome.APPLIED and result.key_version is None
    assert state.applied(0) == 2 and [e.key for e in state.list()] == ["a"]
    assert "r1" not in state.partition(0).seen
    assert state.partition(0).digest_at(1) == before


@pytest.mark.parametrize(
    "report",
    [
        Command("", "", DigestReport("r", 1, "0" * 64)),
        Command("c", "", DigestReport("", 1, "0" * 64)),
        Command("c", "", DigestReport("r", 1, "short")),
    ],
)
def test_malformed_digest_reports_are_invalid(report):
    with pytest.raises(InvalidArgument):
        TideState().apply(0, 0, report)
