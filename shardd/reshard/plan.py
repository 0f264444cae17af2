"""Rebalance plans: pure functions from a slot map (and weights or load) to moves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import placement


class MoveError(Exception):
    """A move or a rebalance could not go on (the recorded phase says where it stopped)."""


@dataclass(frozen=True)
class PlannedMove:
    source: str
    target: str
    slots: tuple[int, ...]


def plan(
    current: Sequence[str | None],
    weights: dict[str, int],
    *,
    pinned: dict[int, str] | None = None,
    group_slots: int = 16,
) -> list[PlannedMove]:
    """The moves that take ``current`` to the balanced map for ``weights``.

    Slots are grouped per (source, target) pair into groups of at most ``group_slots``:
    a group is frozen together, so its size bounds the write pause of its cutover.
    """
    if any(owner is None for owner in current):
        raise MoveError("some slots have no owner; run `shardctl init` first")
    target = placement.balance(current, weights, pinned=pinned or {})
    pairs: dict[tuple[str, str], list[int]] = {}
    for slot, (before, after) in sorted(placement.moves(current, target).items()):
        assert before is not None
        pairs.setdefault((before, after), []).append(slot)
    planned = []
    for (source, dest), slots in sorted(pairs.items()):
        for start in range(0, len(slots), group_slots):
            planned.append(PlannedMove(source, dest, tuple(slots[start : start + group_slots])))
    return planned


def plan_by_load(
    current: Sequence[str | None],
    slot_load: dict[int, float],
    shards: Sequence[str],
    *,
    tolerance: float = 0.1,
    max_moves: int = 256,
    fixed: frozenset[int] | set[int] = frozenset(),
) -> list[PlannedMove]:
    """Single-slot moves from the busiest shards to the idlest until every shard is
    within ``tolerance`` of the mean load (or no move helps any more).

    Each step moves, from the busiest shard to the idlest, the heaviest slot that does
    not make the idlest busier than the busiest was: the gap always shrinks, so the
    loop ends.  A slot hotter than a whole shard's fair share stays where it is, and so
    do the ``fixed`` slots.
    """
    load = dict.fromkeys(shards, 0.0)
    owner = {slot: shard for slot, shard in enumerate(current) if shard is not None}
    for slot, value in slot_load.items():
        if slot in owner and owner[slot] in load:
            load[owner[slot]] += value
    mean = sum(load.values()) / max(1, len(load))
    planned: list[PlannedMove] = []
    while len(planned) < max_moves and mean > 0:
        busiest = max(load, key=lambda s: (load[s], s))
        idlest = min(load, key=lambda s: (load[s], s))
        if load[busiest] <= mean * (1 + tolerance):
            break
        gap = load[busiest] - load[idlest]
        movable = [
            (value, slot)
            for slot, value in slot_load.items()
            if owner.get(slot) == busiest and 0 < value < gap and slot not in fixed
        ]
        if not movable:
            break
        value, slot = max(movable)
        owner[slot] = idlest
        load[busiest] -= value
        load[idlest] += value
        planned.append(PlannedMove(busiest, idlest, (slot,)))
    return planned
