"""Whether this replica's state agrees with the other replicas', from the digest reports they append to the log.

Every replica appends, for each partition it applied commands on, a DigestReport with its digest at its applied
offset. Every other replica compares the report with its own digest at that offset (equal offsets must give equal
digests) and keeps the latest result per (peer, partition). A replica is *in the minority* while the peers that
disagree with it are at least as many as itself plus the peers that agree: with three replicas, the one that
applied the log differently finds two disagreeing peers and stops serving, the two others find one disagreeing
and one agreeing peer and go on, loudly. With two replicas neither can tell which one is right, so both stop.
Results do not age: a replica in the minority stays out until newer reports agree with it (an idle log must not
bring a wrong state back into service). A replica that left the deployment keeps its last result until this
replica restarts.

Pure logic: no I/O, times passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One comparison of a peer's reported digest with this replica's own at the same applied offset."""

    peer: str
    partition: int
    offset: int
    agrees: bool
    at: float  # monotonic seconds


@dataclass(frozen=True)
class Verdict:
    agreeing: tuple[str, ...]
    disagreeing: tuple[str, ...]

    @property
    def in_minority(self) -> bool:
        return len(self.disagreeing) >= 1 + len(self.agreeing)


class PeerAgreement:
    """The latest check per (peer, partition) and the verdict they give."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, int], Check] = {}

    def record(self, check: Check) -> None:
        """Keeps `check` unless a check at a later offset of the same peer and partition is already known."""
        key = (check.peer, check.partition)
        known = self._latest.get(key)
        if known is None or check.offset >= known.offset:
            self._latest[key] = check

    def checks(self) -> list[Check]:
        """The latest check per peer and partition, by peer and partition."""
        return sorted(self._latest.values(), key=lambda c: (c.peer, c.partition))

    def verdict(self) -> Verdict:
        """A peer disagrees when any of its partitions does, and agrees when all of them do."""
        by_peer: dict[str, bool] = {}
        for check in self.checks():
            by_peer[check.peer] = by_peer.get(check.peer, True) and check.agrees
        return Verdict(
            agreeing=tuple(sorted(p for p, ok in by_peer.items() if ok)),
            disagreeing=tuple(sorted(p for p, ok in by_peer.items() if not ok)),
        )
