"""The item cache: cache-aside for eventual and session point reads.

What is cached, per table (``PUT /v1/tables/{t}`` with ``cache``): nothing (``off``), the
items of hot keys (``hot``, the default: keys whose share of all traffic is at least
``hot_key_share``, see :mod:`shardd.hotkeys`), or every item read (``all``); each entry
lives at most the table's ``cache_ttl``.  ``strong`` reads never use the cache.

An entry is (the item or its absence, the shard it was read from, a WAL position the
node had reached before the read).  ``eventual`` reads take any live entry; a
``session`` read takes one only from its key's current shard and at least as new as its
token's position there.

Consistency (the memcache lease scheme, kept on each instance):

* A read that misses takes a **lease** on the key before it reads; its fill lands only
  if the lease is still there.  Invalidating a key drops its entry and its lease, so a
  read that started before a write can never put the old value back after it.
* A read that starts after the invalidation may still get the old value from a replica
  that has not replayed the write: each change seen (here or in a change log) leaves a
  WAL position at or after it as the key's **floor** for ``max_replica_lag_seconds``,
  and a fill from a replica not known (before the read) to have reached it is refused.
* Writes through this instance invalidate their keys at once (when they end, whatever
  the outcome, so an ambiguous write invalidates too).  Writes through other instances
  arrive from the shards' change logs (:class:`Invalidator`, every
  ``cache_invalidation_interval``); the delay from commit to invalidation is measured
  (``shardd_cache_invalidation_lag_seconds``).  Staleness is therefore bounded by that
  delay plus the replica lag an eventual read allows anyway, and never exceeds the TTL.
* In Redis (``cache_backend = redis``, shared by every instance) an invalidation leaves
  a tombstone with the change's shard and WAL position for as long as a floor lives, and
  a fill (an atomic script) lands only on an empty key or a tombstone its read is known
  to have seen: a read that started before a write, on any instance, cannot put the old
  value back after it.  Every
  instance invalidates the keys its change-log follower sees.  Redis that does not
  answer within ``redis_timeout`` is skipped (reads go to Postgres) for a second at a
  time and counted (``shardd_cache_backend_errors_total``); it never fails a request.
  Invalidations it missed are retried, and until they land this instance reads nothing
  from it.

Eviction in process is by ``cache_policy`` (``lru``, ``lfu`` or ``fifo``) within
``cache_max_entries`` and ``cache_max_bytes``; Redis evicts by its own ``maxmemory-policy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from . import changelog, errors, metrics, store
from .config import Settings
from .nodes import NodePools
from .router import SessionToken
from .topology import Shard, Topology

log = logging.getLogger(__name__)
Key = tuple[str, str, str]  # (table, pk, sk)
ENTRY_OVERHEAD = 200  # bytes an entry costs besides its document and keys
BACKEND_RETRY = 1.0  # seconds a failed Redis is left alone
# The labelled metrics, looked up once (labels() on every request is not free).
_HIT, _MISS = metrics.CACHE_LOOKUPS.labels("hit"), metrics.CACHE_LOOKUPS.labels("miss")
_STORED, _REFUSED = metrics.CACHE_FILLS.labels("stored"), metrics.CACHE_FILLS.labels("refused")
_EXPIRED = metrics.CACHE_EVICTIONS.labels("expired")
_EVICTED = metrics.CACHE_EVICTIONS.labels("capacity")
MAX_UNSENT = 100_000  # invalidations kept for a Redis that does not answer
BLIND_SECONDS = 3600  # the longest cache_ttl: every entry written before is gone by then


@dataclass(frozen=True, slots=True)
class Entry:
    item: store.Item | None  # None: the item was absent
    shard: str
    primary: str  # the shard's primary when it was read (positions are of its history)
    position: int  # a WAL position the node had reached before the read (0: unknown)
    expires: float  # time.monotonic() deadline (in Redis: its own TTL)
    size: int

    def serves(
        self,
        *,
        consistency: str,
        shard: str | None,
        primary: str | None,
        token: SessionToken | None,
    ) -> bool:
        """May this entry answer a read at ``consistency`` of a key that ``shard``, with
        ``primary``, owns now?"""
        if consistency == "eventual":
            return True
        if consistency != "session" or shard != self.shard or primary != self.primary:
            return False
        wanted = token.positions.get(shard) if token is not None else None
        return wanted is None or self.position >= wanted


def entry_size(key: Key, item: store.Item | None) -> int:
    doc = len(orjson.dumps(item.doc)) if item is not None else 0
    return ENTRY_OVERHEAD + doc + sum(len(part) for part in key)


# -- eviction policies -------------------------------------------------------------------


class Policy(Protocol):
    def add(self, key: Hashable) -> None: ...
    def touch(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victim(self) -> Hashable: ...


class FIFO:
    """Evicts the oldest entry; hits change nothing."""

    def __init__(self) -> None:
        self.order: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> None:
        self.order[key] = None

    def touch(self, key: Hashable) -> None:
        pass

    def remove(self, key: Hashable) -> None:
        self.order.pop(key, None)

    def victim(self) -> Hashable:
        return next(iter(self.order))


class LRU(FIFO):
    """Evicts the entry used longest ago."""

    def touch(self, key: Hashable) -> None:
        self.order.move_to_end(key)


class LFU:
    """Evicts the entry with the fewest hits (the oldest of those on a tie), in O(1):
    keys are kept in buckets by hit count."""

    def __init__(self) -> None:
        self.counts: dict[Hashable, int] = {}
        self.buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self.lowest = 0

    def add(self, key: Hashable) -> None:
        self.counts[key] = 1
        self.buckets.setdefault(1, OrderedDict())[key] = None
        self.lowest = 1

    def touch(self, key: Hashable) -> None:
        count = self.counts[key]
        self._unlink(key, count)
        self.counts[key] = count + 1
        self.buckets.setdefault(count + 1, OrderedDict())[key] = None

    def remove(self, key: Hashable) -> None:
        count = self.counts.pop(key, None)
        if count is not None:
            self._unlink(key, count)

    def _unlink(self, key: Hashable, count: int) -> None:
        bucket = self.buckets[count]
        del bucket[key]
        if not bucket:
            del self.buckets[count]
            if self.lowest == count:
                self.lowest = count + 1

    def victim(self) -> Hashable:
        if self.lowest not in self.buckets:
            self.lowest = min(self.buckets)
        return next(iter(self.buckets[self.lowest]))


POLICIES: dict[str, Callable[[], Policy]] = {"lru": LRU, "lfu": LFU, "fifo": FIFO}


class LocalStore:
    """Entries in this process, bounded by count and bytes, evicted by a policy."""

    def __init__(
        self,
        *,
        policy: str,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy: Policy = POLICIES[policy]()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.entries: dict[Hashable, Entry] = {}
        self.bytes = 0

    def get(self, key: Hashable) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self.remove(key)
            _EXPIRED.inc()
            return None
        self.policy.touch(key)
        return entry

    def put(self, key: Hashable, entry: Entry) -> None:
        if entry.size > self.max_bytes:
            return
        self.remove(key)
        while self.entries and (
            len(self.entries) >= self.max_entries or self.bytes + entry.size > self.max_bytes
        ):
            self.remove(self.policy.victim())
            _EVICTED.inc()
        self.entries[key] = entry
        self.bytes += entry.size
        self.policy.add(key)

    def remove(self, key: Hashable) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
            self.policy.remove(key)

    def clear(self) -> None:
        for key in list(self.entries):
            self.remove(key)


# -- the shared backend -------------------------------------------------------------------


CHUNK = 500  # invalidations per Redis round trip
# A fill lands on an empty key, or on a tombstone whose write the read had seen: the
# same shard, and the read's node known to be at or past the tombstone's WAL position.
_FILL = """
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, 2) ~= 'T|' then return 0 end
  local shard, lsn = string.match(v, '^T|([^|]*)|(%d+)$')
  if shard ~= ARGV[3] or ARGV[4] < lsn then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def _lsn(position: int) -> str:
    return f"{position:020d}"  # fixed width: Lua compares the strings


class RedisStore:
    """Entries in Redis shared by every instance (``redis_url``); failures are misses.

    Each operation is bounded by ``timeout`` and tried once (redis-py's own retries
    would multiply the wait).  An invalidation writes a tombstone holding the change's
    shard and WAL position instead of deleting: a fill (a script, atomic in Redis) lands
    only on an empty key or on a tombstone its read is known to have seen, so a read
    that started before a write, on any instance, cannot put the old value back.
    Invalidations that fail are kept and sent again by the change-log follower, in
    chunks; until they land this instance reads nothing from Redis.  Past
    ``MAX_UNSENT`` of them it gives up on them and reads nothing from Redis for
    ``BLIND_SECONDS`` (the longest TTL), after which every entry it missed is gone.
    """

    def __init__(self, url: str, *, timeout: float, tombstone_seconds: float) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.timeout = timeout
        self.tombstone_ms = max(1, int(tombstone_seconds * 1000))
        self.unsent: dict[str, bytes] = {}  # name -> tombstone still to write
        self._down_until = 0.0
        self._blind_until = 0.0
        self._fill = self.client.register_script(_FILL)

    @staticmethod
    def name(key: Key) -> str:
        return "shardd:item:" + orjson.dumps(key).decode()

    async def _call(self, run: Callable[[], Any]) -> tuple[bool, Any]:
        """(worked, result) of one Redis operation, within the timeout."""
        if time.monotonic() < self._down_until:
            return False, None
        try:
            async with asyncio.timeout(self.timeout):
                result = await run()
        except Exception as exc:  # any failure of Redis is a miss, never a failed read
            self._down_until = time.monotonic() + BACKEND_RETRY
            metrics.CACHE_BACKEND_ERRORS.inc()
            metrics.CACHE_BACKEND_UP.set(0)
            log.debug("redis failed: %s", exc)
            return False, None
        metrics.CACHE_BACKEND_UP.set(1)
        return True, result

    @property
    def readable(self) -> bool:
        return not self.unsent and time.monotonic() >= self._blind_until

    async def get(self, key: Key) -> Entry | None:
        if not self.readable:
            return None
        _, raw = await self._call(lambda: self.client.get(self.name(key)))
        if raw is None or raw.startswith(b"T|"):
            return None
        try:
            pk, sk, version, doc, shard, primary, position = orjson.loads(raw)
            item = None if version is None else store.Item(pk, sk, version, orjson.Fragment(doc))
            return Entry(item, shard, primary, position, float("inf"), len(raw))
        except (ValueError, TypeError):  # not an entry of this version of shardd
            return None

    async def put(self, key: Key, entry: Entry, *, ttl: float) -> None:
        item = entry.item
        value = orjson.dumps(
            [
                key[1],
                key[2],
                None if item is None else item.version,
                None if item is None else orjson.dumps(item.doc).decode(),
                entry.shard,
                entry.primary,
                entry.position,
            ]
        )
        args: list[bytes | str | int] = [
            value,
            max(1, int(ttl * 1000)),
            entry.shard,
            _lsn(entry.position),
        ]
        await self._call(lambda: self._fill(keys=[self.name(key)], args=args))

    async def remove(self, tombstones: Iterable[tuple[Key, str, int]]) -> None:
        """Invalidate keys changed on ``shard`` at or before WAL position ``lsn`` (shard
        ``"*"``: unknown, no replica read may fill the key for a while)."""
        for key, shard, lsn in tombstones:
            self.unsent[self.name(key)] = f"T|{shard}|{_lsn(lsn)}".encode()
        if len(self.unsent) > MAX_UNSENT:
            log.warning(
                "redis unreachable: %d cache invalidations dropped; not reading it for %d s",
                len(self.unsent),
                BLIND_SECONDS,
            )
            self.unsent.clear()
            self._blind_until = time.monotonic() + BLIND_SECONDS
        await self.flush(chunks=1)

    async def flush(self, *, chunks: int) -> None:
        """Write up to ``chunks`` x ``CHUNK`` of the tombstones still to write."""
        for _ in range(chunks):
            batch = list(itertools.islice(self.unsent.items(), CHUNK))
            if not batch:
                return

            async def send(batch: list[tuple[str, bytes]] = batch) -> None:
                async with self.client.pipeline(transaction=False) as pipe:
                    for name, tombstone in batch:
                        pipe.set(name, tombstone, px=self.tombstone_ms)
                    await pipe.execute()

            worked, _ = await self._call(send)
            if not worked:
                return
            for name, tombstone in batch:
                if self.unsent.get(name) == tombstone:
                    del self.unsent[name]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


# -- the cache -----------------------------------------------------------------------------


class Cache:
    """Lookups, leases, fills and invalidations over the configured backend."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.local = LocalStore(
            policy=settings.cache_policy,
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
            clock=clock,
        )
        # How long a replica may still answer with what was there before a change: the
        # lag reads accept, measured at most a health check (or two) ago.
        self._floor_seconds = settings.max_replica_lag_seconds + 3 * settings.health_interval + 1.0
        self.redis = (
            RedisStore(
                settings.redis_url,
                timeout=settings.redis_timeout,
                tombstone_seconds=self._floor_seconds,
            )
            if settings.cache_backend == "redis"
            else None
        )
        self._leases: dict[Key, int] = {}
        self._tokens = itertools.count(1)
        # key -> (until, shard, WAL position): a position on the shard at or after the
        # key's latest change, for keys changed lately; shard -> (until, position): the
        # same for every key of the shard (where following started, floors evicted
        # early).  A fill read from a replica not known, before the read, to have
        # reached its floor is refused: it may be the old value.
        self._floors: OrderedDict[Key, tuple[float, str, int]] = OrderedDict()
        self._shard_floors: dict[str, tuple[float, int]] = {}
        self._max_floors = settings.cache_max_entries
        # Called with every key invalidated (request coalescing ends its shared reads).
        self.on_invalidate: list[Callable[[Key], None]] = []
        # Fills wait until the invalidator follows every shard's change log.
        self.ready = False

    async def lookup(self, key: Key) -> Entry | None:
        entry = self.local.get(key) if self.redis is None else await self.redis.get(key)
        (_MISS if entry is None else _HIT).inc()
        return entry

    def lease(self, key: Key) -> int | None:
        """A lease for filling ``key`` (None: another read holds one and will fill it)."""
        if not self.ready or key in self._leases:
            return None
        token = self._leases[key] = next(self._tokens)
        return token

    def release(self, key: Key, token: int | None) -> None:
        if token is not None and self._leases.get(key) == token:
            del self._leases[key]

    def note(self, key: Key, shard: str, lsn: int) -> None:
        """Remember that ``key`` changed on ``shard`` at or before WAL position ``lsn``,
        for as long as a replica may still serve what was there before."""
        now = self.clock()
        floors = self._floors
        known = floors.pop(key, None)
        if known is not None and known[0] > now and known[1] == shard:
            lsn = max(lsn, known[2])
        floors[key] = (now + self._floor_seconds, shard, lsn)
        while floors:
            until, oldest_shard, oldest_lsn = next(iter(floors.values()))
            if until > now and len(floors) <= self._max_floors:
                break
            floors.popitem(last=False)
            if until > now:  # evicted early: its shard keeps the floor for it
                self.note_shard(oldest_shard, oldest_lsn, until=until)

    def note_shard(self, shard: str, lsn: int, *, until: float | None = None) -> None:
        """A floor for every key of ``shard`` (changes at or before ``lsn`` not seen)."""
        now = self.clock()
        until = now + self._floor_seconds if until is None else until
        known = self._shard_floors.get(shard)
        if known is not None and known[0] > now:
            until, lsn = max(until, known[0]), max(lsn, known[1])
        self._shard_floors[shard] = (until, lsn)

    def floor(self, key: Key) -> tuple[str, int]:
        """(shard, position) of ``key``'s floor; ("*", 0) when none is known."""
        known = self._floors.get(key)
        return (known[1], known[2]) if known is not None else ("*", 0)

    def _older_than_known(self, key: Key, entry: Entry, from_primary: bool) -> bool:
        if from_primary:  # a read that took its lease after the change saw it there
            return False
        now = self.clock()
        known = self._floors.get(key)
        if known is not None and known[0] > now:
            if known[1] != entry.shard or entry.position < known[2]:
                return True
        shard_floor = self._shard_floors.get(entry.shard)
        return shard_floor is not None and shard_floor[0] > now and entry.position < shard_floor[1]

    async def fill(
        self, key: Key, token: int | None, entry: Entry, *, ttl: float, from_primary: bool
    ) -> bool:
        """Store ``entry`` if ``token`` is still the key's lease and the read cannot have
        missed the key's latest known change; False otherwise."""
        if (
            token is None
            or self._leases.get(key) != token
            or self._older_than_known(key, entry, from_primary)
        ):
            _REFUSED.inc()
            return False
        del self._leases[key]
        _STORED.inc()
        if self.redis is not None:
            await self.redis.put(key, entry, ttl=ttl)
        else:
            self.local.put(key, entry)
            metrics.CACHE_ENTRIES.set(len(self.local.entries))
            metrics.CACHE_BYTES.set(self.local.bytes)
        return True

    async def invalidate(self, keys: Iterable[Key], *, source: str) -> None:
        """Drop ``keys``' entries and leases here (and in Redis, as tombstones at their
        floors: :meth:`note` them first)."""
        keys = list(keys)
        for key in keys:
            self._leases.pop(key, None)
            self.local.remove(key)
            for listener in self.on_invalidate:
                listener(key)
        metrics.CACHE_INVALIDATIONS.labels(source).inc(len(keys))
        if self.redis is not None:
            await self.redis.remove((key, *self.floor(key)) for key in keys)

    def clear(self) -> None:
        """Forget every local entry and lease (the change log was not followed)."""
        self._leases.clear()
        self.local.clear()

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()


# -- following the change logs ----------------------------------------------------------


_INSERT_LSN = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
FLUSH_CHUNKS = 20  # chunks of unsent Redis invalidations sent per round


class Invalidator:
    """Follows every shard's change log and invalidates the keys other instances wrote.

    One position per shard, on its current primary.  When the primary changes, a shard
    cannot be followed for a round, or this instance starts, the log was not followed
    for a while: fills stop at once, local entries are dropped (Redis entries carry
    tombstones and TTLs; other instances follow too) and following restarts from the
    current position.  Fills resume once a round has followed every shard.  Each round
    is bounded: a primary that does not answer has its connection terminated, not
    waited for.  It has connections of its own (one per primary), so a busy request
    pool never stops it.
    """

    def __init__(
        self,
        settings: Settings,
        cache: Cache,
        *,
        topology: Callable[[], Topology | None],
        pools: NodePools,
        any_hot: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.topology = topology
        self.pools = pools
        self.any_hot = any_hot
        self.positions: dict[str, tuple[str, str]] = {}  # shard -> (primary, snapshot)
        self.round_timeout = max(1.0, 10 * settings.cache_invalidation_interval)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.settings.cache_invalidation_interval)
                await self.round()
        finally:
            self.cache.ready = False

    async def round(self) -> None:
        topology = self.topology()
        if topology is None:
            return
        if not self.needed(topology):
            self.positions.clear()
            self._lost()
            return
        for gone in set(self.positions) - set(topology.shards):
            del self.positions[gone]
        followed = await asyncio.gather(*(self.follow(shard) for shard in topology.shards.values()))
        self.cache.ready = all(followed)
        if self.cache.redis is not None and self.cache.redis.unsent:
            await self.cache.redis.flush(chunks=FLUSH_CHUNKS)

    def needed(self, topology: Topology) -> bool:
        """Is anything cached, or about to be?  (Following costs a query per shard and
        round; a table caching only hot keys needs it only while some key is hot, and
        following starts over with a shard-wide floor when one turns hot.)"""
        modes = {t.cache for t in topology.tables.values()}
        if "all" in modes or (self.cache.redis is not None and "hot" in modes):
            return True  # (Redis: other instances' entries need this one's tombstones)
        return "hot" in modes and self.any_hot()

    def _lost(self) -> None:
        self.cache.ready = False
        self.cache.clear()

    async def follow(self, shard: Shard) -> bool:
        """One round of ``shard``'s change log; False when it could not be followed."""
        primary = shard.primary
        known = self.positions.get(shard.name)
        try:
            if primary is None:
                raise errors.ShardUnavailable(shard.name, "it has no primary")
            async with asyncio.timeout(self.round_timeout):
                pool = await self.pools.pool(primary)
                conn = await pool.acquire()
            try:
                async with asyncio.timeout(self.round_timeout):
                    if known is None or known[0] != primary.name:
                        start = await changelog.position(conn)
                        lsn = await conn.fetchval(_INSERT_LSN)
                        # Whatever changed before now was not seen: no entry survives,
                        # and no replica behind now may fill any key of the shard.
                        self._lost()
                        self.cache.note_shard(shard.name, lsn)
                        self.positions[shard.name] = (primary.name, start)
                        return False
                    changes, after, lsn = await changelog.changed_keys(conn, known[1])
            except BaseException:
                conn.terminate()  # never wait for a primary that does not answer
                raise
            finally:
                await pool.release(conn)
        except Exception as exc:  # a shard that cannot be followed: start over later
            self.positions.pop(shard.name, None)
            self._lost()
            metrics.CACHE_FOLLOW_FAILURES.inc()
            log.debug("change log of %s not followed: %s", shard.name, exc)
            return False
        self.positions[shard.name] = (primary.name, after)
        if changes:
            now = time.time()
            keys = set()
            for change in changes:
                key = (change.tbl, change.pk, change.sk)
                keys.add(key)
                self.cache.note(key, shard.name, lsn)
                if change.at is not None:
                    metrics.CACHE_INVALIDATION_LAG.observe(max(0.0, now - change.at.timestamp()))
            await self.cache.invalidate(keys, source="changelog")
        return True
