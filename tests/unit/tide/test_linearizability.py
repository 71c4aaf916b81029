"""The per-key linearizability checker accepts histories a register could give and rejects ones it could not."""

from __future__ import annotations

import math

from services.tide.linearizability import Operation, check, check_key


def op(client, kind, invoke, response, **kw) -> Operation:
    return Operation(client=client, key=kw.pop("key", "k"), kind=kind, invoke=invoke, response=response, **kw)


def test_sequential_history_is_linearizable():
    history = [
        op("a", "cas", 0, 1, value=b"1", version=10, expected=None),
        op("b", "get", 2, 3, value=b"1", version=10),
        op("b", "cas", 4, 5, value=b"2", version=11, expected=10),
        op("a", "cas", 6, 7, value=b"3", version=12, expected=10, applied=False),
        op("a", "delete", 8, 9),
        op("b", "get", 10, 11, value=None),
    ]
    assert check(history)


def test_concurrent_cas_race_has_one_winner_in_either_order():
    # Both clients saw version 10 and raced; B's write lands first in the log although A was invoked first.
    history = [
        op("a", "put", 0, 1, value=b"0", version=10),
        op("a", "cas", 2, 6, value=b"a", version=12, expected=10, applied=False),
        op("b", "cas", 3, 5, value=b"b", version=11, expected=10),
        op("c", "get", 7, 8, value=b"b", version=11),
    ]
    assert check(history)


def test_two_winners_of_the_same_expectation_are_rejected():
    history = [
        op("a", "put", 0, 1, value=b"0", version=10),
        op("a", "cas", 2, 4, value=b"a", version=11, expected=10),
        op("b", "cas", 2, 4, value=b"b", version=12, expected=10),
    ]
    assert not check(history)


def test_a_stale_read_after_a_completed_write_is_rejected():
    history = [
        op("a", "put", 0, 1, value=b"1", version=10),
        op("a", "put", 2, 3, value=b"2", version=11),
        op("b", "get", 4, 5, value=b"1", version=10),
    ]
    assert not check(history)


def test_a_read_concurrent_with_a_write_may_see_either_value():
    for seen in ((b"1", 10), (b"2", 11)):
        history = [
            op("a", "put", 0, 1, value=b"1", version=10),
            op("a", "put", 2, 6, value=b"2", version=11),
            op("b", "get", 3, 4, value=seen[0], version=seen[1]),
        ]
        assert check(history)


def test_a_timed_out_write_may_or_may_not_have_happened():
    base = [
        op("a", "put", 0, 1, value=b"1", version=10),
        op("b", "put", 2, math.inf, value=b"2", version=11, applied=None),
    ]
    assert check([*base, op("c", "get", 5, 6, value=b"1", version=10)])
    assert check([*base, op("c", "get", 5, 6, value=b"2", version=11)])
    assert not check([*base, op("c", "get", 5, 6, value=b"3", version=12)])


def test_keys_are_independent_registers():
    history = [
        op("a", "put", 0, 1, key="x", value=b"1", version=1),
        op("b", "put", 0, 1, key="y", value=b"2", version=2),
        op("c", "get", 2, 3, key="x", value=b"1", version=1),
        op("c", "get", 2, 3, key="y", value=b"1", version=1),  # y never held that
    ]
    assert not check(history)
    assert check_key([h for h in history if h.key == "x"])


def test_a_long_counter_history_is_checked_without_running_out_of_stack():
    # 1,500 increments by two clients, one conflict each round: far deeper than Python's recursion limit.
    ops = []
    version = None
    for n in range(1500):
        t = float(n * 10)
        new = (0, n)
        ops.append(Operation("a", "k", "cas", t, t + 2, value=b"%d" % n, version=new, expected=version))
        ops.append(
            Operation(
                "b", "k", "cas", t + 1, t + 3, value=b"x", version=(0, 10_000 + n), expected=version, applied=False
            )
        )
        version = new
    assert check(ops)
    # The same history with one conflict reported as applied has no linearization.
    broken = list(ops)
    broken[3] = Operation("b", "k", "cas", 11.0, 13.0, value=b"x", version=(0, 10_001), expected=(0, 0), applied=True)
    assert not check(broken)
