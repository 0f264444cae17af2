"""The change feed for applications (CDC): ``GET /v1/changes`` and ``shardctl changes tail``.

The feed reads every shard's change log (:mod:`shardd.changelog`) on the shard's
primary.  Positions are PgQ snapshots, never "the highest sequence number read": a
:class:`Cursor` holds, per shard, a snapshot ``pos`` (every change of a transaction
visible in it was delivered) and the ``origin`` it was taken on (the primary's system
identifier and timeline).  The cursor is opaque to clients: base64url of compressed
JSON.

**Rounds.**  A read starts a *round* by taking a new snapshot ``upto`` on every shard
(in the same statement as the slots the shard owns); the round's batch on a shard is
the changes visible in ``upto`` and not in ``pos``, in sequence order.  ``limit`` (and
``max_response_bytes``) may cut a batch: the cursor then keeps the round open, with
the sequence number of the last change delivered (``after``), so the rest of the same
batch comes next and a shard's position never passes a change that was not returned.
No new round starts until every batch of the open one was delivered.

**Per-key order.**  One key's changes are on one shard at a time, and within a shard a
batch is in sequence order, which for one key is commit order (the row lock serializes
its writers).  Across a slot move a key's earlier changes are on the old shard and the
later ones on the new shard; rows the move copies are not logged (``shardd.copying``),
so they are never emitted as changes.  Within a round, a shard whose batch holds changes
of a slot that another shard of the round owns is delivered before that owner's batch
(:func:`plan_round`).  A snapshot of the old shard taken before its freeze would miss
writes committed between it and the freeze, so a slot that two shards' snapshots both
show ``owned`` holds back the shards whose batches touch it until the next round
(nothing of theirs is delivered, their positions stay).  Per-key order therefore holds
across any single move of a key's slot between two rounds.  A slot that moved more than
once within one round (A to B to C; or out and back, where A's one batch holds both its
periods and comes after B's) may have its changes out of order across those moves:
versions tell the order then.  (Splitting such a batch at each move's final source
position, recorded with the move, would lift this.)

**Guarantees.**  At least once: a change is delivered again when a client resumes from
an older cursor, and after a failover.  Never a skip: a shard missing from the cursor
(added later) is read from the start of what it retains; a shard whose origin changed
(a promotion starts a timeline; an asynchronous one may reuse transaction ids) is read
again from the start of what it retains.  Trimming never makes a silent gap: every
deletion from a shard's log records the highest transaction id it removed (the trim
horizon, ``migrations/shard/0011_changefeed.sql``); a cursor whose position on a shard
does not see every transaction up to the horizon has lost entries and is refused with
410 ``cursor_expired``.  So is a cursor naming a shard that was removed before the
cursor had read all of it.

**Consumers.**  A registered consumer (``PUT /v1/consumers/{name}``) commits its cursor;
the catalog keeps the cursor, and every shard keeps its position there as the change-log
consumer ``feed:<name>``, so trimming keeps what it has not read, until it has not
committed for ``feed_retention_cap`` seconds (the monitor then drops its shard
positions; a later read of its cursor gets 410 if entries it needed were trimmed).

A read waits for every shard's primary: while one cannot be reached the feed answers
503 rather than deliver around it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeGuard

import asyncpg
import orjson

from . import config, errors, metrics
from .changelog import ORIGIN, start_at
from .topology import Shard, Topology

POLL_INTERVAL = 0.1  # seconds between rounds while a long poll waits for a change
MAX_WAIT = 30  # longest long poll, seconds
MAX_TABLES = 64  # tables one read may name
MAX_CURSOR_CHARS = 8000  # a cursor travels in the query string
CONSUMER_PREFIX = "feed:"  # their names among a shard's change-log consumers
CONSUMER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# User tables only: internal item tables (view rows, "~v:<view>") never reach the feed.
USER_TABLE = config.TABLE_NAME.pattern
_SNAPSHOT = re.compile(r"^[0-9]{1,20}:[0-9]{1,20}:([0-9]{1,20}(,[0-9]{1,20})*)?$")
_ORIGIN = re.compile(r"^[0-9]{1,20}:[0-9A-F]{8}$")
_MAX_JSON = 1 << 20  # bytes a cursor may inflate to

Work = Callable[[asyncpg.Connection], Awaitable[Any]]
# Runs one unit of work on a shard's primary and returns its result.
Runner = Callable[[Shard, Work], Awaitable[Any]]


class BadCursor(errors.BadRequest):
    code = "bad_cursor"


def xmin(snapshot: str) -> int:
    """The lowest transaction id not visible in a snapshot (every lower one is)."""
    return int(snapshot.split(":", 1)[0])


# -- the cursor -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPosition:
    """Where a cursor stands on one shard.

    ``pos``: every change of a transaction visible in this snapshot was delivered.
    ``upto``: while a round is open on the shard, its end; the changes visible in it and
    not in ``pos`` with a sequence number above ``after`` are still to come, and the
    shard's place in the round is ``rank``.  ``idle``: the shard owned no slot at its
    latest snapshot (``upto`` while open, else ``pos``), so it takes no more changes.
    """

    pos: str
    origin: str
    upto: str | None = None
    after: int = 0
    rank: int = 0
    idle: bool = False

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pos": self.pos, "origin": self.origin}
        if self.upto is not None:
            data.update(upto=self.upto, after=self.after, rank=self.rank)
        if self.idle:
            data["idle"] = True
        return data


@dataclass(frozen=True)
class Cursor:
    shards: Mapping[str, ShardPosition] = field(default_factory=dict)

    def encode(self) -> str:
        data = {"v": 1, "shards": {n: p.as_json() for n, p in sorted(self.shards.items())}}
        packed = zlib.compress(orjson.dumps(data), 9)
        return base64.urlsafe_b64encode(packed).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor ``text`` encodes; BadCursor (400 bad_cursor) for anything else."""
        if not text or len(text) > MAX_CURSOR_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise BadCursor("not a change-feed cursor")
        try:
            packed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            inflater = zlib.decompressobj()
            raw = inflater.decompress(packed, _MAX_JSON)
            if inflater.unconsumed_tail or not inflater.eof:
                raise BadCursor("not a change-feed cursor")
            data = orjson.loads(raw)
        except (binascii.Error, ValueError, zlib.error):
            raise BadCursor("not a change-feed cursor") from None
        if not isinstance(data, dict) or data.get("v") != 1 or set(data) != {"v", "shards"}:
            raise BadCursor("not a change-feed cursor (or one of another version)")
        shards = data["shards"]
        if not isinstance(shards, dict):
            raise BadCursor("not a change-feed cursor")
        return cls({name: _position(name, entry) for name, entry in shards.items()})


def _snapshot(text: Any) -> TypeGuard[str]:
    """Whether ``text`` is a snapshot Postgres accepts as ``pg_snapshot``: xmin and xmax
    valid 64-bit ids with xmin <= xmax, in-progress ids ascending within [xmin, xmax)."""
    if not (isinstance(text, str) and _SNAPSHOT.fullmatch(text)):
        return False
    xmin, xmax, xip = text.split(":")
    running = [int(x) for x in xip.split(",") if x]
    return (
        0 < int(xmin) <= int(xmax) < 2**64
        and all(int(xmin) <= x < int(xmax) for x in running)
        and running == sorted(running)
    )


def _position(name: str, entry: Any) -> ShardPosition:
    def bad() -> BadCursor:
        return BadCursor(f"the cursor's position on shard {name!r} is malformed")

    if not isinstance(entry, dict) or not set(entry) <= {
        "pos",
        "origin",
        "upto",
        "after",
        "rank",
        "idle",
    }:
        raise bad()
    pos, origin, upto = entry.get("pos"), entry.get("origin"), entry.get("upto")
    after, rank, idle = entry.get("after", 0), entry.get("rank", 0), entry.get("idle", False)
    if not _snapshot(pos) or (upto is not None and not _snapshot(upto)):
        raise bad()
    if not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
        raise bad()
    for number in (after, rank):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**63:
            raise bad()
    if not isinstance(idle, bool):
        raise bad()
    return ShardPosition(pos, origin, upto, after, rank, idle)


# -- pure decisions --------------------------------------------------------------------


@dataclass(frozen=True)
class ShardState:
    """One shard's primary, read in one statement: a new snapshot, the origin it was
    taken on, the trim horizon, where reading from scratch starts, the slots it owns."""

    snapshot: str
    origin: str
    horizon: int | None
    start: str
    owned: frozenset[int]


class CursorExpired(errors.ApiError):
    status = 410
    code = "cursor_expired"


def resolve(cursor: Cursor | None, states: Mapping[str, ShardState]) -> dict[str, ShardPosition]:
    """Where to read each shard of ``states`` from, for ``cursor`` (None: from scratch).

    Raises CursorExpired when a shard trimmed entries the cursor had not passed (its
    position does not see every transaction up to the horizon), or when the cursor names
    a shard that is gone although it might have held changes the cursor had not read.
    A shard missing from the cursor starts at the start of what it retains; so does a
    shard whose origin changed, after the same check for trimmed entries (a synchronous
    failover keeps the transaction ids, and the horizon, of the old primary).
    """
    given = cursor.shards if cursor is not None else {}
    for name, held in sorted(given.items()):
        if name not in states and not (held.idle and held.upto is None):
            raise CursorExpired(
                f"shard {name} was removed before this cursor had read all of its changes;"
                " start again without a cursor"
            )
    positions: dict[str, ShardPosition] = {}
    for name, state in states.items():
        if name not in given:
            positions[name] = ShardPosition(state.start, state.origin)
            continue
        held = given[name]
        if state.horizon is not None and state.horizon >= xmin(held.pos):
            raise CursorExpired(
                f"shard {name} trimmed changes this cursor had not read; start again"
                " without a cursor (or register a consumer to keep them)"
            )
        if held.origin != state.origin:
            positions[name] = ShardPosition(state.start, state.origin)
        else:
            positions[name] = held
    return positions


@dataclass(frozen=True)
class RoundBatch:
    """What planning a round needs of one shard's batch: the slots the shard owned at
    the round's snapshot, and the slots its batch holds changes of."""

    owned: frozenset[int]
    slots: frozenset[int]


def plan_round(batches: Mapping[str, RoundBatch]) -> tuple[list[str], list[str]]:
    """(the order to deliver the round's batches in, the shards held back to the next
    round).

    A slot owned in two shards' snapshots moved between them: the old owner's snapshot
    predates its freeze and may miss its last writes of the slot, so every shard whose
    batch touches such a slot waits.  Of the rest, a shard goes before every shard that
    owns a slot both batches touch (the owner's changes are the later ones); a cycle
    (moves both ways within one round) is broken by name.
    """
    owners: dict[int, int] = {}
    for batch in batches.values():
        for slot in batch.owned:
            owners[slot] = owners.get(slot, 0) + 1
    contested = {slot for slot, count in owners.items() if count > 1}
    held = sorted(name for name, batch in batches.items() if batch.slots & contested)
    kept = sorted(set(batches) - set(held))
    before: dict[str, set[str]] = {name: set() for name in kept}
    for later in kept:
        mine = batches[later].slots & batches[later].owned
        for earlier in kept:
            if earlier != later and batches[earlier].slots & mine:
                before[later].add(earlier)
    order: list[str] = []
    remaining = list(kept)
    while remaining:
        ready = [n for n in remaining if not before[n] & set(remaining)] or remaining[:1]
        order.append(ready[0])
        remaining.remove(ready[0])
    return order, held


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    shard: str
    seq: int
    op: str  # 'put' | 'delete'
    table: str
    pk: str
    sk: str
    version: int
    doc: str | None  # JSON text; None for a delete
    at: datetime  # when the writing transaction started on its shard

    def as_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "table": self.table,
            "pk": self.pk,
            "sk": self.sk,
            "version": self.version,
            "item": orjson.Fragment(self.doc) if self.doc is not None else None,
            "at": self.at.isoformat(),
            "shard": self.shard,
        }

    def size(self) -> int:
        return len(self.doc or "") + len(self.pk) + len(self.sk) + 100


@dataclass(frozen=True)
class Page:
    changes: list[Change]
    cursor: Cursor
    more: bool  # more changes can be read at once (a round is open, or shards waited)


_STATE = f"""
SELECT s.snap::text AS snapshot,
       CASE WHEN NOT pg_is_in_recovery() THEN {ORIGIN} END AS origin,
       (SELECT trimmed_to FROM shardd_changes_horizon)::text AS horizon,
       least((SELECT min(txid) FROM shardd_changes), pg_snapshot_xmin(s.snap))::text AS first,
       ARRAY(SELECT slot FROM shardd_slots WHERE state = 'owned') AS owned
FROM (SELECT pg_current_snapshot() AS snap) AS s
"""
# The changes of a batch: visible in $2, not in $1 (the txid bounds let the index
# serve it), of the tables asked for ($3; NULL: every user table).
_IN_BATCH = f"""
FROM shardd_changes
WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND txid < pg_snapshot_xmax($2::text::pg_snapshot)
  AND pg_visible_in_snapshot(txid, $2::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)
  AND CASE WHEN $3::text[] IS NULL THEN tbl ~ '{USER_TABLE}' ELSE tbl = ANY($3::text[]) END
"""
_SLOTS = "SELECT coalesce(array_agg(DISTINCT slot), '{}') " + _IN_BATCH
_CHANGES = (
    "SELECT seq, op, tbl, pk, sk, version, doc::text AS doc, at "
    + _IN_BATCH
    + " AND seq > $4 ORDER BY seq LIMIT $5"
)


async def shard_state(conn: asyncpg.Connection, shard: str) -> ShardState:
    row = await conn.fetchrow(_STATE)
    if row["origin"] is None:
        raise errors.ShardUnavailable(shard, "its primary is in recovery")
    horizon = int(row["horizon"]) if row["horizon"] is not None else None
    first = int(row["first"])
    if horizon is not None:
        first = max(first, horizon + 1)
    return ShardState(
        snapshot=row["snapshot"],
        origin=row["origin"],
        horizon=horizon,
        start=start_at(first),
        owned=frozenset(row["owned"]),
    )


def _state_of(shard: str) -> Work:
    return lambda conn: shard_state(conn, shard)


def _query(sql: str, *args: Any, one: bool = False) -> Work:
    """``sql`` with ``args`` as work: its rows (``one``: its one value)."""
    if one:
        return lambda conn: conn.fetchval(sql, *args)
    return lambda conn: conn.fetch(sql, *args)


class Feed:
    """Reads the change feed through ``run`` (work on a shard's primary) over the
    topology ``topology`` returns."""

    def __init__(
        self,
        *,
        topology: Callable[[], Awaitable[Topology]],
        run: Runner,
        max_bytes: int,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._topology = topology
        self._run = run
        self.max_bytes = max_bytes
        self.poll_interval = poll_interval

    async def states(self, topology: Topology) -> dict[str, ShardState]:
        names = sorted(topology.shards)
        found = await asyncio.gather(*(self._run(topology.shards[n], _state_of(n)) for n in names))
        return dict(zip(names, found, strict=True))

    async def positions(self, cursor: Cursor | None) -> tuple[Topology, dict[str, ShardPosition]]:
        """The current topology and where ``cursor`` reads each of its shards from."""
        topology = await self._topology()
        return topology, resolve(cursor, await self.states(topology))

    async def read(
        self,
        cursor: Cursor | None,
        *,
        tables: Sequence[str] | None,
        limit: int,
        wait: float,
    ) -> Page:
        """Up to ``limit`` changes after ``cursor``; with none yet, a new round every
        poll interval until there is one or ``wait`` seconds have passed (the empty page
        then carries the advanced cursor)."""
        until = time.monotonic() + wait
        waiting = False
        try:
            while True:
                page = await self.read_once(cursor, tables=tables, limit=limit)
                if page.changes or time.monotonic() + self.poll_interval > until:
                    return page
                cursor = page.cursor
                if not waiting:
                    waiting = True
                    metrics.CHANGEFEED_WAITING.inc()
                await asyncio.sleep(self.poll_interval)
        finally:
            if waiting:
                metrics.CHANGEFEED_WAITING.dec()

    async def read_once(
        self, cursor: Cursor | None, *, tables: Sequence[str] | None, limit: int
    ) -> Page:
        topology = await self._topology()
        states = await self.states(topology)
        try:
            positions = resolve(cursor, states)
        except CursorExpired:
            metrics.CHANGEFEED_CURSORS_EXPIRED.inc()
            raise
        names = list(tables) if tables is not None else None
        open_round = sorted(
            (n for n, p in positions.items() if p.upto is not None),
            key=lambda n: (positions[n].rank, n),
        )
        held: list[str] = []
        if not open_round:
            slots = await asyncio.gather(
                *(
                    self._run(
                        topology.shards[n],
                        _query(_SLOTS, positions[n].pos, states[n].snapshot, names, one=True),
                    )
                    for n in sorted(states)
                )
            )
            batches = {
                n: RoundBatch(owned=states[n].owned, slots=frozenset(found))
                for n, found in zip(sorted(states), slots, strict=True)
            }
            open_round, held = plan_round(batches)
            for rank, n in enumerate(open_round):
                positions[n] = replace(
                    positions[n],
                    upto=states[n].snapshot,
                    after=0,
                    rank=rank,
                    idle=not states[n].owned,
                )
        changes: list[Change] = []
        budget = self.max_bytes
        more = bool(held)
        for n in open_round:
            room = limit - len(changes)
            if room <= 0 or (changes and budget <= 0):
                more = True
                break
            position = positions[n]
            rows = await self._run(
                topology.shards[n],
                _query(_CHANGES, position.pos, position.upto, names, position.after, room + 1),
            )
            got = [Change(n, *row) for row in rows]
            kept = _within(got[:room], budget, first=not changes)
            budget -= sum(c.size() for c in kept)
            changes.extend(kept)
            metrics.CHANGEFEED_CHANGES.labels(n).inc(len(kept))
            if len(kept) < len(got):  # cut: the rest of this batch comes next
                if kept:
                    positions[n] = replace(position, after=kept[-1].seq)
                more = True
                break
            assert position.upto is not None
            positions[n] = ShardPosition(position.upto, position.origin, idle=position.idle)
        return Page(changes, Cursor(positions), more)


def _within(changes: list[Change], budget: int, *, first: bool) -> list[Change]:
    """The longest prefix of ``changes`` within ``budget`` bytes (at least one change
    when it would be the page's first, so every read makes progress)."""
    kept: list[Change] = []
    for change in changes:
        budget -= change.size()
        if budget < 0 and not (first and not kept):
            break
        kept.append(change)
    return kept


# -- consumers ----------------------------------------------------------------------------


async def expire_consumers(conn: asyncpg.Connection, *, cap_seconds: float) -> list[str]:
    """Drop the shard positions of feed consumers that have not committed a cursor for
    ``cap_seconds``: they stop holding back trimming (and their cursors get 410 once
    trimmed past)."""
    rows = await conn.fetch(
        "DELETE FROM shardd_consumers WHERE starts_with(name, $1)"
        " AND updated_at < now() - make_interval(secs => $2) RETURNING name",
        CONSUMER_PREFIX,
        cap_seconds,
    )
    return [row["name"] for row in rows]


@dataclass(frozen=True)
class Consumer:
    name: str
    cursor: str
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cursor": self.cursor,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


async def get_consumer(conn: asyncpg.Connection, name: str) -> Consumer | None:
    """A consumer from the catalog."""
    row = await conn.fetchrow(
        "SELECT name, cursor, created_at, updated_at FROM shardd_feed_consumers WHERE name = $1",
        name,
    )
    return Consumer(**dict(row)) if row is not None else None


async def save_consumer(
    conn: asyncpg.Connection, name: str, cursor: Cursor
) -> tuple[Consumer, bool]:
    """Record a consumer's cursor in the catalog; (the consumer, whether it is new)."""
    row = await conn.fetchrow(
        "INSERT INTO shardd_feed_consumers AS c (name, cursor) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = now()"
        " RETURNING name, cursor, created_at, updated_at, xmax = 0 AS created",
        name,
        cursor.encode(),
    )
    data = dict(row)
    created = bool(data.pop("created"))
    return Consumer(**data), created


async def delete_consumer(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("DELETE FROM shardd_feed_consumers WHERE name = $1", name)


# -- following the feed without a server (shardctl changes tail) ---------------------------

FOLLOW_WAIT = 5  # seconds each read of a follower long-polls
FOLLOW_POLL = 0.5  # seconds between its rounds while it waits (it reloads the topology)


async def follow(
    catalog_dsn: str,
    *,
    cursor: Cursor | None,
    tables: Sequence[str] | None,
    on_page: Callable[[Page], None],
    limit: int | None = None,
    once: bool = False,
    page_size: int = 100,
    max_bytes: int = 4 * 1024 * 1024,
) -> None:
    """Read the feed straight from the catalog and the shard primaries, handing each
    page to ``on_page``, until ``limit`` changes were delivered, after one read
    (``once``), or forever.  Every query is bounded (10 s on the catalog, 30 s per unit
    of work on a shard)."""
    from . import admin, catalog
    from .nodes import NodePools

    pools = NodePools(pool_size=1, connect_timeout=5.0)
    try:
        async with admin.connect(catalog_dsn, command_timeout=10.0) as cat:

            async def topology() -> Topology:
                return await catalog.load_topology(cat)

            async def run(shard: Shard, work: Work) -> Any:
                if shard.primary is None:
                    raise errors.ShardUnavailable(shard.name, "it has no primary")
                async with asyncio.timeout(30), pools.connection(shard.primary) as conn:
                    return await work(conn)

            known = await topology()
            for name in tables or ():
                if name not in known.tables:
                    raise LookupError(f"no table {name}")
            feed = Feed(topology=topology, run=run, max_bytes=max_bytes, poll_interval=FOLLOW_POLL)
            delivered = 0
            while True:
                size = page_size if limit is None else min(page_size, limit - delivered)
                page = await feed.read(
                    cursor, tables=tables, limit=size, wait=0 if once else FOLLOW_WAIT
                )
                on_page(page)
                cursor = page.cursor
                delivered += len(page.changes)
                if once or (limit is not None and delivered >= limit):
                    return
    finally:
        await pools.close()
