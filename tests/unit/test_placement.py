"""Slot placement: balance, minimal movement, stability of the slot hash."""

from collections import Counter

import pytest

from shardd import placement

SLOTS = 4096


def names(n: int) -> list[str]:
    return [f"s{i}" for i in range(1, n + 1)]


def initial(n: int) -> tuple[str, ...]:
    return placement.balance([None] * SLOTS, dict.fromkeys(names(n), 1))


@pytest.mark.parametrize("n", range(2, 13))
def test_every_shard_within_ten_percent_of_mean(n: int) -> None:
    counts = Counter(initial(n))
    mean = SLOTS / n
    assert set(counts) == set(names(n))
    for shard, count in counts.items():
        assert abs(count - mean) <= 0.10 * mean, (shard, count, mean)


@pytest.mark.parametrize("n", range(2, 12))
def test_adding_a_shard_moves_its_share_all_onto_it(n: int) -> None:
    before = initial(n)
    after = placement.balance(before, dict.fromkeys(names(n + 1), 1))
    moved = placement.moves(before, after)
    new = f"s{n + 1}"
    assert all(to == new for _, to in moved.values())
    share = len(moved) / SLOTS
    assert 0.8 / (n + 1) <= share <= 1.2 / (n + 1), share


@pytest.mark.parametrize("n", range(3, 13))
def test_removing_a_shard_moves_only_its_slots(n: int) -> None:
    before = initial(n)
    gone = f"s{n // 2}"
    remaining = {name: 1 for name in names(n) if name != gone}
    after = placement.balance(before, remaining)
    moved = placement.moves(before, after)
    assert {src for src, _ in moved.values()} == {gone}
    assert len(moved) == before.count(gone)
    assert gone not in after


def test_balance_is_deterministic_and_a_fixed_point() -> None:
    first = initial(5)
    assert placement.balance([None] * SLOTS, dict.fromkeys(names(5), 1)) == first
    assert placement.balance(first, dict.fromkeys(names(5), 1)) == first


def test_weights_give_proportional_shares() -> None:
    target = placement.balance([None] * SLOTS, {"s1": 1, "s2": 3})
    counts = Counter(target)
    assert counts["s1"] == SLOTS // 4
    assert counts["s2"] == 3 * SLOTS // 4


def test_pinned_slots_stay_and_count_against_quota() -> None:
    before = initial(3)
    slot = next(s for s, owner in enumerate(before) if owner == "s1")
    after = placement.balance(before, dict.fromkeys(names(3), 1), pinned={slot: "s2"})
    assert after[slot] == "s2"
    counts = Counter(after)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_pin_to_unknown_shard_is_refused() -> None:
    with pytest.raises(ValueError):
        placement.balance([None] * 16, {"s1": 1}, pinned={3: "nope"})


def test_slot_hash_is_stable() -> None:
    # Pinned values: changing the hash would silently strand every stored row.
    assert [placement.slot_of(k, SLOTS) for k in ("a", "user-1", "ü/x")] == [559, 392, 522]
    spread = Counter(placement.slot_of(str(i), 16) for i in range(16000))
    assert set(spread) == set(range(16))
    assert max(spread.values()) < 1.1 * 1000


def test_a_shard_of_weight_zero_keeps_its_pinned_slot_and_takes_no_other() -> None:
    current = tuple(["s1"] * 6 + ["s2"] * 6)
    weights = {"s1": 1, "s2": 1, "s3": 0}
    target = placement.balance(current, weights, pinned={4: "s3"})
    assert [slot for slot, owner in enumerate(target) if owner == "s3"] == [4]
    assert target.count("s1") + target.count("s2") == 11
    with pytest.raises(ValueError, match="unknown shard"):
        placement.balance(current, weights, pinned={4: "s9"})
