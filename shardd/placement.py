"""Slots and the consistent-hash ring: where a partition key lives.

``slot_of(pk)`` is ``BLAKE2b-64(utf8(pk)) mod slot_count`` (big-endian digest), stable
across processes, versions and machines.

The *target* slot map comes from a uhashring ketama ring over the shard names and
weights, on which every slot has a position (its name ``slot-<n>``).  Walking the ring
from a slot's position gives that slot's *preference list* of shards.

Pure consistent hashing of only 4096 slots leaves shards up to ~20% above or below
their share (ketama arc noise plus sampling noise).  ``balance`` therefore adds exact
quotas on top of the ring (a deterministic bounded-load pass):

* every shard gets a quota proportional to its weight (largest remainder, so quotas add
  up to the slot count);
* a shard above quota gives up the slots it is least preferred for; slots of shards that
  left, and unassigned slots, are freed too;
* freed slots go, in slot order, to the first shard of their preference list that is
  still below quota.

Consequences, all unit-tested: counts are within one slot of the weighted share; adding a
shard moves about 1/(N+1) of the slots and every moved slot lands on the new shard;
removing a shard moves only the slots it held.  Pinned slots (operator overrides) stay
where they are pinned and count against their shard's quota.

Everything here is pure and works on immutable values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache

from uhashring import HashRing

VNODES_PER_WEIGHT = 160


@lru_cache(maxsize=1 << 16)  # every request asks, hot keys over and over
def slot_of(pk: str, slot_count: int) -> int:
    digest = hashlib.blake2b(pk.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % slot_count


def slot_name(slot: int) -> str:
    return f"slot-{slot}"


@lru_cache(maxsize=8)
def preference_lists(
    weights: tuple[tuple[str, int], ...], slot_count: int
) -> tuple[tuple[str, ...], ...]:
    """For every slot, the shards in ring order from the slot's position."""
    ring = HashRing(
        nodes={name: {"weight": weight, "vnodes": VNODES_PER_WEIGHT} for name, weight in weights},
        hash_fn="ketama",
    )
    return tuple(
        tuple(ring.iterate_nodes(slot_name(slot), distinct=True)) for slot in range(slot_count)
    )


def quotas(weights: Mapping[str, int], slot_count: int) -> dict[str, int]:
    """Slots per shard proportional to weight; largest remainder so they sum exactly."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("at least one shard with a positive weight is needed")
    exact = {name: slot_count * weight / total for name, weight in weights.items()}
    result = {name: int(share) for name, share in exact.items()}
    left = slot_count - sum(result.values())
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - result[name]), name))
    for name in by_remainder[:left]:
        result[name] += 1
    return result


def balance(
    current: Sequence[str | None],
    weights: Mapping[str, int],
    *,
    pinned: Mapping[int, str] | None = None,
) -> tuple[str, ...]:
    """The target slot map for ``weights``, moving as few slots of ``current`` as possible.

    ``current[slot]`` is the shard owning the slot now (``None``: unassigned).
    ``pinned`` maps slots to the shard they must be on; a shard of weight 0 keeps its
    pinned slots and takes no other (a shard dedicated to a celebrity's slot).
    """
    slot_count = len(current)
    pinned = dict(pinned or {})
    live = {name: weight for name, weight in weights.items() if weight > 0}
    for slot, shard in pinned.items():
        if shard not in weights:
            raise ValueError(f"slot {slot} is pinned to unknown shard {shard!r}")
    prefs = preference_lists(tuple(sorted(live.items())), slot_count)
    quota = quotas(live, slot_count)

    target: list[str | None] = [
        pinned.get(slot, owner if owner in live else None) for slot, owner in enumerate(current)
    ]
    load = dict.fromkeys(live, 0)
    for owner in target:
        if owner in load:
            load[owner] += 1

    # Shards above quota give up the unpinned slots they are least preferred for.
    rank = [{name: i for i, name in enumerate(pref)} for pref in prefs]
    for name in sorted(live):
        excess = load[name] - quota[name]
        if excess <= 0:
            continue
        mine = [s for s, owner in enumerate(target) if owner == name and s not in pinned]
        mine.sort(key=lambda s: (-rank[s][name], s))
        for slot in mine[:excess]:
            target[slot] = None
            load[name] -= 1

    for slot, owner in enumerate(target):
        if owner is not None:
            continue
        for name in prefs[slot]:
            if load[name] < quota[name]:
                target[slot] = name
                load[name] += 1
                break
        else:
            # Only reachable when pins alone exceed a shard's quota: fall back to the ring.
            target[slot] = prefs[slot][0]
            load[prefs[slot][0]] += 1
    return tuple(owner for owner in target if owner is not None)


def moves(
    current: Sequence[str | None], target: Sequence[str]
) -> dict[int, tuple[str | None, str]]:
    """slot -> (from, to) for every slot whose owner changes."""
    return {
        slot: (before, after)
        for slot, (before, after) in enumerate(zip(current, target, strict=True))
        if before != after
    }
