"""A per-key linearizability checker for Tide histories (Wing & Gong search with memoisation).

Each key is a register whose state is None (absent) or (value, version). Operations come from several clients
with invocation and response times; the history is linearizable when, for every key, some order of its
operations that respects real time (an operation that responded before another was invoked comes first) and
the register's semantics gives every recorded result. Versions are opaque tokens: a write that applied sets
the key's version to the version it returned. Meant for the small histories tests record (exponential worst case).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

Register = tuple[bytes, Hashable] | None


@dataclass(frozen=True)
class Operation:
    """One client call and what it returned.

    kind: "put" (always applies), "cas" (applies iff the key's version equals `expected`, or, with
    `expected` None, iff the key is absent), "delete" (applied iff the key existed) or "get".
    value / version: for a write that applied, what it wrote and the version it returned; for a get, what it
    read (value None: the key was absent).
    applied: for cas and delete, whether it applied; None while unknown (a call that timed out, which may or may
    not have taken effect; give such calls `response` = math.inf).
    """

    client: str
    key: str
    kind: Literal["put", "cas", "delete", "get"]
    invoke: float
    response: float
    value: bytes | None = None
    version: Hashable = None
    expected: Hashable = None
    applied: bool | None = True


def _step(op: Operation, state: Register) -> tuple[bool, Register]:
    """Whether `op` may take effect on `state` with its recorded result, and the state after it."""
    written: Register = (op.value or b"", op.version)
    if op.kind == "get":
        observed: Register = None if op.value is None else (op.value, op.version)
        return observed == state, state
    if op.kind == "put":
        return True, written
    if op.kind == "delete":
        holds = state is not None
    else:
        holds = state is None if op.expected is None else state is not None and state[1] == op.expected
    if op.applied is None:
        return True, written if holds and op.kind == "cas" else (None if holds else state)
    if op.applied != holds:
        return False, state
    if not holds:
        return True, state
    return True, written if op.kind == "cas" else None


def check_key(operations: Sequence[Operation], initial: Register = None) -> bool:
    """True when the operations on one key have a valid linearization starting from `initial`."""
    ops = sorted(operations, key=lambda o: o.invoke)
    pending = {i for i, o in enumerate(ops) if math.isinf(o.response)}
    failed: set[tuple[frozenset[int], Register]] = set()

    def search(done: frozenset[int], state: Register) -> bool:
        remaining = [i for i in range(len(ops)) if i not in done]
        if all(i in pending for i in remaining):
            return True
        if (done, state) in failed:
            return False
        # Only an operation invoked before every remaining one has responded may come next.
        horizon = min(ops[i].response for i in remaining)
        for i in remaining:
            if ops[i].invoke > horizon:
                break
            ok, after = _step(ops[i], state)
            if ok and search(done | {i}, after):
                return True
        failed.add((done, state))
        return False

    return search(frozenset(), initial)


def check(operations: Sequence[Operation]) -> bool:
    """True when every key's operations are linearizable (keys are independent registers)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in operations:
        by_key[op.key].append(op)
    return all(check_key(ops) for ops in by_key.values())
