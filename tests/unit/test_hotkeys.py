"""Hot-key detection on fake clocks and synthetic streams (pure, no Postgres)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shardd.hotkeys import SpaceSaving, Traffic, merge
from shardd.placement import slot_of
from shardd.topology import Shard, Topology


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def zipf_stream(n: int, *, keys: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (rank**s) for rank in range(1, keys + 1)]
    return rng.choices(range(keys), weights=weights, k=n)


def test_space_saving_keeps_the_heavy_hitters_of_a_skewed_stream() -> None:
    stream = zipf_stream(200_000, keys=50_000, s=1.1, seed=1)
    summary: SpaceSaving[int] = SpaceSaving(500)
    for start in range(0, len(stream), 2000):
        batch: dict[int, list[float]] = {}
        for key in stream[start : start + 2000]:
            batch.setdefault(key, [0.0, 0.0])[0] += 1
        summary.fold(batch)
    exact = Counter(stream)
    truth = {key for key, _ in exact.most_common(50)}
    found = {key for key, *_ in summary.top(50)}
    assert len(truth & found) >= 48
    assert len(summary.counters) <= 1000  # twice the capacity between trims
    for key, sure, reads, _ in summary.top(10):
        assert sure <= exact[key]  # a guaranteed lower bound
        assert reads == pytest.approx(sure)


def test_rates_follow_a_jump_and_decay_after_it() -> None:
    clock = Clock()
    traffic = Traffic(capacity=100, window=2.0, clock=clock)
    for _ in range(100):  # 10 s of 100 req/s on "a", in 0.1 s steps
        for _ in range(10):
            traffic.record("t", "a", 1)
        clock.now += 0.1
        traffic.fold()
    report = traffic.report()
    assert report["reads_per_s"] == pytest.approx(100, rel=0.1)
    assert report["keys"][0][:2] == ["t", "a"]
    assert report["keys"][0][2] == pytest.approx(100, rel=0.1)
    clock.now += 10  # five windows of silence
    assert traffic.report()["reads_per_s"] < 1


def test_counts_survive_a_rescale() -> None:
    clock = Clock()
    traffic = Traffic(capacity=10, window=0.01, clock=clock)
    for _ in range(200):  # the decay exponent passes the rescale point many times
        traffic.record("t", "k", 5, write=True)
        clock.now += 0.001
        traffic.fold()
    report = traffic.report(["s1"] * 8)
    assert report["writes_per_s"] == pytest.approx(1000, rel=0.15)
    assert report["slots"][0][0] == 5
    assert report["shards"]["s1"] == pytest.approx(report["writes_per_s"], rel=0.01)


def test_pending_keys_are_bounded() -> None:
    traffic = Traffic(capacity=10, window=1.0, clock=Clock())
    for i in range(10_000):
        traffic.record("t", str(i), 0)
    assert len(traffic._pending) <= 40
    assert len(traffic.keys.counters) <= 20


def _topology() -> Topology:
    slot_map = tuple("s1" if slot < 8 else "s2" for slot in range(16))
    return Topology(
        epoch=1, slot_count=16, shards={"s1": Shard("s1", 1, ()), "s2": Shard("s2", 1, ())},
        slot_map=slot_map,
    )  # fmt: skip


def by_shard(topology: Topology, slots: dict[int, float]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for slot, rate in slots.items():
        owner = topology.slot_map[slot]
        assert owner is not None
        rates[owner] = rates.get(owner, 0.0) + rate
    return rates


def test_merge_adds_instances_up_and_ranks_by_share_of_all_traffic() -> None:
    topology = _topology()
    celeb = slot_of("celeb", 16)
    other = (celeb + 8) % 16  # a slot of the other shard
    one = {
        "reads_per_s": 80.0,
        "writes_per_s": 20.0,
        "keys": [["t", "celeb", 30.0, 0.0], ["t", "x", 5.0, 5.0]],
        "slots": [[celeb, 40.0], [other, 60.0]],
        "shards": by_shard(topology, {celeb: 40.0, other: 60.0}),
    }
    two = {
        "reads_per_s": 100.0,
        "writes_per_s": 0.0,
        "keys": [["t", "celeb", 30.0, 0.0]],
        "slots": [[celeb, 100.0]],
        "shards": by_shard(topology, {celeb: 100.0}),
    }
    view = merge([("b", two), ("a", one)], topology, window=2.0)
    assert view.instances == ("a", "b")
    assert view.requests_per_s == 200.0
    top = view.keys[0]
    owner = topology.slot_map[celeb]
    assert (top.table, top.pk, top.slot, top.shard) == ("t", "celeb", celeb, owner)
    assert top.share == pytest.approx(0.3)
    assert [k.pk for k in view.keys] == ["celeb", "x"]
    shown = view.as_json(limit=1)
    assert len(shown["keys"]) == 1 and shown["slots"][0]["slot"] == celeb
    rates = {s["name"]: s["requests_per_s"] for s in shown["shards"]}
    assert sum(rates.values()) == pytest.approx(200.0)
    assert {s["name"]: s["vs_mean"] for s in shown["shards"]}[topology.slot_map[celeb]] > 1


def test_merge_of_nothing_is_empty() -> None:
    view = merge([], _topology(), window=2.0)
    assert view.keys == () and view.requests_per_s == 0
    assert view.as_json()["shards"] == [
        {"name": "s1", "requests_per_s": 0.0, "vs_mean": 0.0},
        {"name": "s2", "requests_per_s": 0.0, "vs_mean": 0.0},
    ]
