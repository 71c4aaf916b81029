"""Random command logs for the Tide unit tests."""

from __future__ import annotations

import random

from services.tide.state import Cas, Command, Delete, Put, Version


def random_log(seed: int, partitions: int = 3, length: int = 300) -> list[tuple[int, int, Command]]:
    """A log of random commands on a few keys, each key in one partition, with valid and stale CAS versions."""
    rng = random.Random(seed)
    keys = [f"key-{i}" for i in range(8)]
    next_offset = [0] * partitions
    log = []
    for n in range(length):
        key = rng.choice(keys)
        p = int(key.split("-")[1]) % partitions
        offset = next_offset[p]
        next_offset[p] += rng.choice([1, 1, 2])
        kind = rng.random()
        if kind < 0.4:
            op: Put | Cas | Delete = Put(rng.randbytes(4), "application/octet-stream")
        elif kind < 0.8:
            guess = Version(p, rng.randrange(max(1, offset)))
            op = Cas(rng.randbytes(4), expected=guess) if rng.random() < 0.8 else Cas(b"n", expect_absent=True)
        else:
            op = Delete()
        # Some command ids repeat: retries.
        cid = f"cmd-{n}" if rng.random() < 0.9 else f"cmd-{max(0, n - 3)}"
        log.append((p, offset, Command(cid, key, op)))
    return log
