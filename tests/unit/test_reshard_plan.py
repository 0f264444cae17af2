"""Rebalance plans on immutable slot maps (no Postgres)."""

from __future__ import annotations

import pytest

from shardd.reshard import MoveError, plan


def test_a_new_shard_receives_its_share_in_groups_from_every_shard() -> None:
    current = ["s1", "s2", "s3"] * 1365 + ["s1"]
    moves = plan(current, {"s1": 1, "s2": 1, "s3": 1, "s4": 1}, group_slots=32)
    assert {m.target for m in moves} == {"s4"}
    assert {m.source for m in moves} == {"s1", "s2", "s3"}
    assert sum(len(m.slots) for m in moves) == 1024
    assert all(0 < len(m.slots) <= 32 for m in moves)
    moved = [s for m in moves for s in m.slots]
    assert len(moved) == len(set(moved))
    assert all(current[s] == m.source for m in moves for s in m.slots)


def test_a_removed_shard_gives_away_exactly_its_slots() -> None:
    current = ["s1", "s2", "s3", "s4"] * 1024
    moves = plan(current, {"s1": 1, "s2": 1, "s3": 1, "s4": 0}, group_slots=64)
    assert {m.source for m in moves} == {"s4"}
    assert sum(len(m.slots) for m in moves) == 1024


def test_a_balanced_map_needs_no_move() -> None:
    current = ["s1", "s2", "s3", "s4"] * 1024
    first = plan(current, {"s1": 1, "s2": 1, "s3": 1, "s4": 1})
    after = list(current)
    for move in first:
        for slot in move.slots:
            after[slot] = move.target
    assert plan(after, {"s1": 1, "s2": 1, "s3": 1, "s4": 1}) == []


def test_pinned_slots_stay_and_unowned_slots_are_refused() -> None:
    current = ["s1", "s2"] * 8
    moves = plan(current, {"s1": 1, "s2": 1, "s3": 1}, pinned={0: "s1"}, group_slots=4)
    assert all(0 not in m.slots for m in moves)
    with pytest.raises(MoveError):
        plan([None, "s1"], {"s1": 1})
