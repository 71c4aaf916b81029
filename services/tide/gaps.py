"""Gaps (holes) in a partition's offsets while reading the command log: wait for the missing record, never
apply past it.

The command log is written without transactions or compaction, so its offsets are contiguous. A fetched record
past the next expected offset means the fetch skipped one that is not readable yet: a broker may answer a fetch
while a concurrent produce request to the same partition is still being stored (the embedded broker reserves
offsets before it stores the records, so a record at N+1 can be readable before the one at N). Applying past the
hole would leave a replica without a command every other replica applies. So the partition is read again from
the hole until the record shows up; a hole that stays for `wait_s` is a hole in the log itself (every replica
finds the same one), and is skipped.

Pure logic: no I/O, times passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """What to do with a fetched run of records of one partition.

    apply: how many of them (from the first) to apply now. reread_from: the offset to read the partition from
    again (the hole), or None. skipped: (first, last) offsets given up on, or None. filled_after_s: seconds a hole
    waited before its record arrived in this run, or None.
    """

    apply: int
    reread_from: int | None = None
    skipped: tuple[int, int] | None = None
    filled_after_s: float | None = None


class OffsetGaps:
    """The open hole per partition: (missing offset, when it was first found missing)."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._open: dict[int, tuple[int, float]] = {}

    def decide(self, partition: int, expected: int, offsets: Sequence[int], now: float) -> Decision:
        """The decision for records at `offsets` (increasing) of `partition`, whose next offset to apply is
        `expected`."""
        skipped = None
        filled_after = None
        for index, offset in enumerate(offsets):
            hole = self._open.get(partition)
            if offset > expected:
                if hole is None or hole[0] != expected:
                    hole = self._open[partition] = (expected, now)
                if now - hole[1] < self.wait_s:
                    return Decision(index, reread_from=expected, skipped=skipped, filled_after_s=filled_after)
                del self._open[partition]
                skipped = (expected, offset - 1)
            elif hole is not None and hole[0] == offset:
                del self._open[partition]
                filled_after = now - hole[1]
            expected = offset + 1
        return Decision(len(offsets), skipped=skipped, filled_after_s=filled_after)
