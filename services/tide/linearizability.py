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
from collections.abc import Hashable, Iterator, Sequence
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
    """True when the operations on one key have a valid linearization starting from `initial`.

    A depth-first search with an explicit stack (histories of thousands of operations do not hit the recursion
    limit) and memoised dead ends (set of operations done, register state).
    """
    ops = sorted(operations, key=lambda o: o.invoke)
    pending = {i for i, o in enumerate(ops) if math.isinf(o.response)}

    def candidates(done: frozenset[int]) -> list[int] | None:
        """The operations that may take effect next; None when only unanswered ones remain (success)."""
        remaining = [i for i in range(len(ops)) if i not in done]
        if all(i in pending for i in remaining):
            return None
        # Only an operation invoked before every remaining one has responded may come next.
        horizon = min(ops[i].response for i in remaining)
        return [i for i in remaining if ops[i].invoke <= horizon]

    first = candidates(frozenset())
    if first is None:
        return True
    failed: set[tuple[frozenset[int], Register]] = set()
    stack: list[tuple[frozenset[int], Register, Iterator[int]]] = [(frozenset(), initial, iter(first))]
    while stack:
        done, state, options = stack[-1]
        for i in options:
            ok, after = _step(ops[i], state)
            then = done | {i}
            if not ok or (then, after) in failed:
                continue
            following = candidates(then)
            if following is None:
                return True
            stack.append((then, after, iter(following)))
            break
        else:
            failed.add((done, state))
            stack.pop()
    return False


def check(operations: Sequence[Operation]) -> bool:
    """True when every key's operations are linearizable (keys are independent registers)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in operations:
        by_key[op.key].append(op)
    return all(check_key(ops) for ops in by_key.values())
