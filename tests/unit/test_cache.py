"""The item cache's policies, bounds, TTL and leases (pure, no Postgres)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from shardd import config, store
from shardd.cache import Cache, Entry, LocalStore
from shardd.router import SessionToken


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(size: int = 300, *, expires: float = 1e9, shard: str = "s1", position: int = 0) -> Entry:
    item = store.Item("pk", "", 1, orjson.Fragment(b"{}"))
    return Entry(item, shard, "s1-primary", position, expires, size)


def filled(policy: str, *, max_entries: int = 3, max_bytes: int = 10**9) -> LocalStore:
    local = LocalStore(policy=policy, max_entries=max_entries, max_bytes=max_bytes)
    for key in "abc":
        local.put(key, entry())
    return local


def test_lru_evicts_the_least_recently_used() -> None:
    local = filled("lru")
    local.get("a")
    local.put("d", entry())
    assert set(local.entries) == {"a", "c", "d"}


def test_fifo_evicts_the_oldest_whatever_was_used() -> None:
    local = filled("fifo")
    local.get("a")
    local.put("d", entry())
    assert set(local.entries) == {"b", "c", "d"}


def test_lfu_evicts_the_least_frequently_used() -> None:
    local = filled("lfu")
    for _ in range(3):
        local.get("a")
    local.get("b")
    local.put("d", entry())  # c was never hit
    assert set(local.entries) == {"a", "b", "d"}
    local.put("e", entry())  # d has one use, as few as any: the oldest of those goes
    assert set(local.entries) == {"a", "b", "e"}
    local.remove("e")
    local.put("f", entry())
    assert set(local.entries) == {"a", "b", "f"}


def test_bytes_bound_the_store() -> None:
    local = LocalStore(policy="lru", max_entries=100, max_bytes=1000)
    for key in "abcdef":
        local.put(key, entry(300))
    assert local.bytes <= 1000 and len(local.entries) == 3
    local.put("huge", entry(5000))  # larger than the whole store: not kept
    assert "huge" not in local.entries and local.bytes <= 1000


def test_entries_expire() -> None:
    clock = Clock()
    local = LocalStore(policy="lru", max_entries=10, max_bytes=10**6, clock=clock)
    local.put("a", entry(expires=5.0))
    clock.now = 4.9
    assert local.get("a") is not None
    clock.now = 5.0
    assert local.get("a") is None and local.bytes == 0


def test_session_reads_take_only_entries_as_new_as_their_token() -> None:
    cached = entry(shard="s1", position=100)

    def serves(consistency: str, token: SessionToken | None, **where: str) -> bool:
        owner = {"shard": "s1", "primary": "s1-primary", **where}
        return cached.serves(consistency=consistency, token=token, **owner)

    assert serves("eventual", None, shard="s2")
    assert serves("session", None)
    assert serves("session", SessionToken({"s1": 100}))
    assert serves("session", SessionToken({"s2": 900}))
    assert not serves("session", SessionToken({"s1": 101}))
    assert not serves("session", None, shard="s2")  # the slot moved
    assert not serves("session", None, primary="s1-replica1")  # a failover: a new history
    assert not serves("strong", None)


def test_an_invalidation_during_a_read_refuses_its_fill() -> None:
    async def scenario() -> None:
        cache = Cache(config.Settings())
        cache.ready = True
        key = ("t", "pk", "")
        lease = cache.lease(key)
        assert lease is not None
        assert cache.lease(key) is None  # one reader fills a key at a time
        await cache.invalidate([key], source="write")  # a write lands during the read
        assert not await cache.fill(key, lease, entry(), ttl=1.0, from_primary=True)
        assert await cache.lookup(key) is None
        lease = cache.lease(key)
        assert await cache.fill(key, lease, entry(), ttl=1.0, from_primary=True)
        assert await cache.lookup(key) is not None

    asyncio.run(scenario())


def test_a_replica_not_known_to_have_replayed_a_change_fills_nothing() -> None:
    async def scenario() -> None:
        clock = Clock()
        settings = config.Settings(max_replica_lag_seconds=10, health_interval=1)
        cache = Cache(settings, clock=clock)
        cache.ready = True
        key = ("t", "pk", "")

        async def fill(position: int, *, shard: str = "s1", from_primary: bool = False) -> bool:
            await cache.invalidate([key], source="write")
            lease = cache.lease(key)
            try:
                return await cache.fill(
                    key,
                    lease,
                    entry(position=position, shard=shard),
                    ttl=1.0,
                    from_primary=from_primary,
                )
            finally:
                cache.release(key, lease)

        cache.note(key, "s1", 500)  # a write committed at or before WAL position 500 of s1
        assert not await fill(499)
        assert await fill(0, from_primary=True)  # a lease taken after it: the primary saw it
        assert await fill(500)
        assert not await fill(900, shard="s2")  # positions of another shard say nothing
        clock.now += 14.5  # the floor outlives the replica lag reads accept, and no more
        assert await fill(1)
        cache.note_shard("s1", 700)  # following s1 (re)started at 700: nothing before seen
        assert not await fill(699)
        assert await fill(700)

    asyncio.run(scenario())


def test_floors_evicted_early_stay_with_their_shard() -> None:
    async def scenario() -> None:
        cache = Cache(config.Settings(cache_max_entries=2), clock=Clock())
        cache.ready = True
        for n in range(3):
            cache.note(("t", f"k{n}", ""), "s1", 100 + n)
        key = ("t", "k0", "")  # its own floor was evicted
        lease = cache.lease(key)
        assert not await cache.fill(key, lease, entry(position=50), ttl=1.0, from_primary=False)

    asyncio.run(scenario())


def test_no_fills_before_the_change_logs_are_followed() -> None:
    cache = Cache(config.Settings())
    assert cache.lease(("t", "pk", "")) is None


def test_settings_refuse_unknown_choices() -> None:
    with pytest.raises(ValueError, match="cache_policy"):
        config.Settings(cache_policy="random")
