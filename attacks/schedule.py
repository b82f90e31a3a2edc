"""When malicious clients attack: a round window, a period, and an optional per-round draw.

- `start_round`..`end_round` (inclusive; `end_round: null` = to the end), every `every` rounds:
  `start_round = end_round` is a single-shot attack, the default is continuous.
- `per_round: null`: every member of the attacker pool attacks in an attack round (a fixed attacker
  set). `per_round: k`: k pool members are drawn per round, seeded by (seed, round), so every client
  computes the same draw without talking to anyone (FLAME issue #4 asks for exactly this realism).

A pool member that does not attack in a round trains like a benign client, and its truth record
says so: detection metrics count what a client did in that round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AttackSchedule:
    start_round: int = 1
    end_round: int | None = None
    every: int = 1
    per_round: int | None = None

    def __post_init__(self) -> None:
        if self.start_round < 1:
            raise ValueError(f"attack.schedule.start_round={self.start_round} must be >= 1")
        if self.end_round is not None and self.end_round < self.start_round:
            raise ValueError(f"attack.schedule.end_round={self.end_round} must be >= start_round ({self.start_round})")
        if self.every < 1:
            raise ValueError(f"attack.schedule.every={self.every} must be >= 1")
        if self.per_round is not None and self.per_round < 0:
            raise ValueError(f"attack.schedule.per_round={self.per_round} must be >= 0 or null")

    def is_attack_round(self, server_round: int) -> bool:
        if server_round < self.start_round or (self.end_round is not None and server_round > self.end_round):
            return False
        return (server_round - self.start_round) % self.every == 0

    def attackers(self, server_round: int, pool: frozenset[int], seed: int) -> frozenset[int]:
        """The pool members that attack in `server_round`."""
        if not pool or not self.is_attack_round(server_round):
            return frozenset()
        if self.per_round is None or self.per_round >= len(pool):
            return frozenset(pool)
        drawn = np.random.default_rng([seed, server_round, 2_147_483_647]).choice(
            sorted(pool), size=self.per_round, replace=False)
        return frozenset(int(i) for i in drawn)


def attacker_index(partition_id: int, pool: frozenset[int]) -> int:
    """This attacker's rank in the pool (0, 1, ...): what distributed triggers (DBA) split by."""
    return sorted(pool).index(partition_id) if partition_id in pool else partition_id
