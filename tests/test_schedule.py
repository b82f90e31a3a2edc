"""Attack schedules: round windows, periods, per-round draws from the attacker pool."""

from __future__ import annotations

import pytest

from attacks.schedule import AttackSchedule, attacker_index

POOL = frozenset({1, 4, 6, 8})


def test_continuous_by_default():
    s = AttackSchedule()
    assert all(s.attackers(r, POOL, seed=0) == POOL for r in range(1, 20))


def test_window_period_and_single_shot():
    s = AttackSchedule(start_round=3, end_round=9, every=3)
    assert [r for r in range(1, 15) if s.attackers(r, POOL, 0)] == [3, 6, 9]
    single = AttackSchedule(start_round=5, end_round=5)
    assert [r for r in range(1, 15) if single.attackers(r, POOL, 0)] == [5]


def test_per_round_draw_is_seeded_and_varies_over_rounds():
    s = AttackSchedule(per_round=2)
    draws = [s.attackers(r, POOL, seed=7) for r in range(1, 11)]
    assert all(len(d) == 2 and d <= POOL for d in draws)
    assert draws == [s.attackers(r, POOL, seed=7) for r in range(1, 11)]  # every client computes the same
    assert len(set(draws)) > 1


@pytest.mark.parametrize("kwargs", [{"start_round": 0}, {"start_round": 5, "end_round": 4}, {"every": 0},
                                    {"per_round": -1}])
def test_invalid_schedules_are_rejected(kwargs):
    with pytest.raises(ValueError, match="attack.schedule"):
        AttackSchedule(**kwargs)


def test_attacker_index_is_the_rank_in_the_pool():
    assert [attacker_index(p, POOL) for p in sorted(POOL)] == [0, 1, 2, 3]
