"""Rebalance plans on immutable slot maps (no Postgres)."""

from __future__ import annotations

import pytest

from shardd.reshard import MoveError, plan, plan_by_load


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


def test_load_plans_move_hot_slots_off_the_busiest_shard() -> None:
    current = ["s1", "s2", "s3"] * 4  # slots 0,3,6,9 on s1 ...
    load = {0: 50.0, 3: 30.0, 6: 20.0, 1: 10.0, 2: 10.0}
    moves = plan_by_load(current, load, ["s1", "s2", "s3"])
    assert moves and moves[0].source == "s1" and all(len(m.slots) == 1 for m in moves)
    after = dict(enumerate(current))
    for move in moves:
        after[move.slots[0]] = move.target
    per_shard = {
        s: sum(v for slot, v in load.items() if after[slot] == s) for s in ("s1", "s2", "s3")
    }
    assert max(per_shard.values()) <= 50.0  # s1 carried 100 of 120 before


def test_a_slot_hotter_than_a_fair_share_is_not_bounced_around() -> None:
    current = ["s1", "s2"] * 2
    assert plan_by_load(current, {0: 100.0}, ["s1", "s2"]) == []


def test_balanced_load_needs_no_move() -> None:
    current = ["s1", "s2"] * 2
    assert plan_by_load(current, {0: 10.0, 1: 10.5, 2: 5.0, 3: 5.0}, ["s1", "s2"]) == []
