"""View maintenance: every source shard's change log applied to the views' rows.

The source shards are shared out among the instances that keep views: each takes a
lease (a row in the catalog, renewed every round) on up to its fair share, gives back
what is over it when another instance joins, and takes lapsed leases of a dead one.  A
round on a shard held:

1. lists the views' source tables on the shard (``shardd_add_view_source``), so the
   change log keeps the document each change replaced, and registers the change-log
   consumer ``views`` so trimming keeps what the views have not applied;
2. backfills views that have no position on the shard (a new view, a new shard, a
   position the log was trimmed past): one repeatable-read transaction reads the source
   items and their joined items, their rows are applied, and the transaction's
   snapshot becomes the position;
3. reads the next batch: the changes visible in a new snapshot but not in each view's
   position (PgQ batches: a late commit is in the batch in which it becomes visible,
   never skipped), at most ``BATCH`` of them in sequence order; a round larger than
   that stays open in the position (``changelog.open_round``) and is read on in parts;
   with them, the joined items of the changed keys and the dependents of changed joined
   items, as of the batch's snapshot;
4. applies the rows (puts, and removals of rows under old view keys) through the fenced
   write path, each shard's share in one transaction (``shardd_view_apply``) that never
   replaces a row built from a newer source version and is refused once this
   instance's lease has run out (so a maintainer that stopped past its lease cannot
   land a stale apply after another took over);
5. records the new position, only while still holding the lease, and moves the
   ``views`` consumer on.

A round that fails anywhere is retried from the same position: applies are idempotent.
A position remembers the history (system identifier and timeline) of the primary it
was taken on; after a promotion the shard's log is read again from the start of what it
retains, rather than trusting transaction ids the new primary may hand out anew.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from .. import catalog, changelog, errors, metrics
from ..config import Settings
from ..dataplane import DataPlane, ViewRowWrite
from ..executor import Executor
from ..topology import Shard, Topology, ViewInfo
from ..watcher import TopologyWatcher
from . import progress
from . import rows as source
from .definition import Row, ViewDef, project, row_key

log = logging.getLogger(__name__)
CONSUMER = "views"  # the change-log consumer that keeps what views have not applied
APPLY_CHUNK = 500  # rows per apply call
BATCH = 5000  # changes read per round at most
ADVANCE_EVERY = 10.0  # seconds between consumer advances of an idle shard
HOLD_LIMIT = 30.0  # seconds a round waits at most for a shard it took slots from
FAR_VERSION = 2**62  # a removal that no stored row is newer than
# An apply is refused this long (plus statement_timeout, the longest one statement can
# run after the check) before the lease ends, so none commits once another may hold it.
LEASE_MARGIN = timedelta(seconds=0.5)

_CHANGES = """
SELECT seq, op, tbl, pk, sk, slot, version, doc::text AS doc, old::text AS old, at
FROM shardd_changes
WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND txid < pg_snapshot_xmax($2::text::pg_snapshot)
  AND pg_visible_in_snapshot(txid, $2::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)
  AND tbl = ANY($3::text[])
  AND seq > $4
  AND ($6::text IS NULL OR slot = ANY($7::int[])
       OR NOT pg_visible_in_snapshot(txid, $6::text::pg_snapshot))
ORDER BY seq
LIMIT $5
"""
# (While a shard's log is read again after a promotion, $6 is the position it had on the
# old history: changes of slots it no longer answers for ($7 are those it does) that
# this position had seen were applied then; their keys have moved on elsewhere.)

Positions = dict[str, tuple[str, str | None]]  # view -> (position, replaced)


@dataclass(frozen=True)
class Change:
    op: str
    tbl: str
    pk: str
    sk: str
    slot: int
    version: int
    doc: Any  # the new document (None: a delete)
    old: Any  # the replaced document (None: an insert, or a table not yet listed)
    at: datetime
    seq: int = 0


@dataclass
class Batch:
    """What one round read from a source shard for one position."""

    changes: list[Change]
    after: str  # the position once these are applied
    taken: float  # when (wall clock) the snapshot the round ends at was taken


@dataclass
class Reading:
    """One round's read of a source shard: a batch per distinct position, as of one
    snapshot, with what the changes need from the shard."""

    origin: str
    batches: dict[tuple[str, str | None], Batch]  # (position, replaced) -> its batch
    joined: source.Joined = field(default_factory=dict)
    dependents: dict[tuple[str, str], list[source.SourceItem]] = field(default_factory=dict)
    moved: set[int] = field(default_factory=set)  # slots the shard no longer answers for
    lost: bool = False  # the log was trimmed past a position: entries are gone

    def changes(self) -> list[Change]:
        return [c for batch in self.batches.values() for c in batch.changes]


def live_views(topology: Topology) -> list[ViewInfo]:
    return [v for v in topology.views.values() if v.state != catalog.VIEW_DELETING]


def _view_keys(
    view: ViewDef, docs: Sequence[Any], pk: str, sk: str, key_bytes: int
) -> set[tuple[str, str]]:
    keys = set()
    for doc in docs:
        placed = row_key(view, doc, pk, sk, max_key_bytes=key_bytes)
        if placed is not None:
            keys.add(placed)
    return keys


def plan_rows(
    view: ViewDef,
    changes: Sequence[Change],
    *,
    joined: source.Joined,
    dependents: dict[tuple[str, str], list[source.SourceItem]],
    max_key_bytes: int,
) -> list[ViewRowWrite]:
    """The row writes that bring ``view`` up to date with ``changes`` (in log order).

    Per source key only its last change counts, but every view key any of its changes
    had (before or after) loses its row unless the last one puts it there again, up to
    the highest version the changes reached.  An item created in these changes (an
    insert: no replaced document) may have had an earlier life at higher versions, since
    versions start again at 1: its row is written whatever version the stored row has.
    A change of a joined item re-projects every item of the source table under its pk.
    """
    by_key: dict[tuple[str, str], list[Change]] = {}
    rejoin: set[str] = set()
    for change in changes:
        if change.tbl == view.source:
            by_key.setdefault((change.pk, change.sk), []).append(change)
        if view.joined_by(change.tbl, change.sk):
            rejoin.add(change.pk)
    writes: dict[tuple[str, str], ViewRowWrite] = {}

    def put(row: Row, *, force: bool = False) -> None:
        key = (row.pk, row.sk)
        held = writes.get(key)
        if held is None or held.doc is None or held.version <= row.source_version or force:
            # A row forced for a re-created item stays forced when a join re-projects it.
            forced = force or (held is not None and held.force)
            writes[key] = ViewRowWrite(row.pk, row.sk, row.doc, row.source_version, forced)

    for (pk, sk), keyed in by_key.items():
        last = keyed[-1]
        created = any(c.op == "put" and c.old is None for c in keyed)
        reached = max(c.version for c in keyed)
        row = None
        if last.op == "put":
            row = project(
                view,
                last.doc,
                pk=pk,
                sk=sk,
                version=last.version,
                joined=joined.get(pk, {}),
                max_key_bytes=max_key_bytes,
            )
        earlier = [c.old for c in keyed] + [c.doc for c in keyed[:-1]]
        for gone in _view_keys(view, earlier, pk, sk, max_key_bytes):
            if row is None or gone != (row.pk, row.sk):
                writes.setdefault(gone, ViewRowWrite(gone[0], gone[1], None, reached, created))
        if row is not None:
            put(row, force=created)
    for pk in rejoin:
        for row in source.rows_of(
            view, dependents.get((view.source, pk), ()), joined, max_key_bytes=max_key_bytes
        ):
            put(row)
    return list(writes.values())


class LeaseLost(Exception):
    """Another instance follows the shard now."""


class ViewKeeper:
    def __init__(
        self,
        settings: Settings,
        instance: str,
        *,
        watcher: TopologyWatcher,
        executor: Executor,
        data: DataPlane,
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.watcher = watcher
        self.executor = executor
        self.data = data
        data.admit_write = self.admit_write
        # Applies stop statement_timeout + LEASE_MARGIN before the lease ends: it is
        # long enough to leave them a few seconds.
        self.lease = max(settings.view_lease, settings.statement_timeout + 3.0)
        # shard -> (primary, sources listed there, the xmax after the listing committed)
        self._listed: dict[str, tuple[str, frozenset[str], int]] = {}
        self._advanced: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # (shard, view) -> its copy in progress: a copy runs beside the shard's rounds,
        # which go on for the views already followed.
        self._copies: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._expires: dict[str, datetime] = {}  # shard -> when its lease ends (catalog)
        # shard -> the tenure of this instance's lease: it grows each time the lease is
        # taken (not renewed), and work begun under an older tenure applies nothing.
        self._tenure: dict[str, int] = {}
        self._held_since: dict[tuple[str, str], float] = {}  # (shard, move source) -> since
        # Whether the ``views`` consumers are known gone since the last view went (also
        # checked once after a start: a consumer left by an earlier run holds trimming).
        self._unregistered = False

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except Exception as exc:  # the next round tries again
                log.warning("view maintenance round failed: %s", exc)
            await asyncio.sleep(
                max(0.0, self.settings.view_interval - (time.monotonic() - started))
            )

    async def close(self) -> None:
        """Stop following.  The leases are left to run out (an apply sent before the
        stop may still commit until then); the other instances take them over after."""
        await self._stop(list(set(self._tasks) | {shard for shard, _ in self._copies}))
        if self.watcher.topology is None or not self.settings.views:
            return
        try:
            async with self.watcher.catalog_connection() as conn:
                await conn.execute(
                    "DELETE FROM shardd_view_keepers WHERE instance = $1", self.instance
                )
        except Exception:  # an instance not seen for a lease no longer counts
            pass

    async def _stop(self, shards: list[str]) -> None:
        tasks = [self._tasks.pop(name) for name in shards if name in self._tasks]
        tasks += [self._copies.pop(key) for key in list(self._copies) if key[0] in shards]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def round(self) -> None:
        topology = self.watcher.topology
        if topology is None:
            return
        views = live_views(topology)
        if views:
            self._unregistered = False
        await self._observe_lag(topology, views)
        if not views or not self.settings.views:
            await self._stop(list(set(self._tasks) | {shard for shard, _ in self._copies}))
            self._listed.clear()  # a view declared later lists its sources again
            if not topology.views and not self._unregistered:
                await self._unregister(topology)
            return
        held = await self._hold(sorted(topology.shards))
        # A shard no longer held is no longer followed here (its applies would be
        # refused anyway once the lease has run out).
        followed = set(self._tasks) | {shard for shard, _ in self._copies}
        await self._stop([name for name in followed if name not in held])
        for name in held:
            task = self._tasks.get(name)
            if task is None or task.done():
                self._tasks[name] = asyncio.create_task(
                    self._follow_once(name), name=f"views-{name}"
                )

    async def _unregister(self, topology: Topology) -> None:
        """No view is left: the ``views`` consumer no longer holds back trimming.  (If
        a view was declared meanwhile, its maintainer finds the consumer gone and
        registers it again where its views are.)"""
        async with self.watcher.catalog_connection() as conn:
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM shardd_views)"):
                return  # declared meanwhile

        async def work(conn: asyncpg.Connection) -> None:
            await changelog.unregister(conn, CONSUMER)

        done = True
        for shard in topology.shards.values():
            if shard.primary is None:  # on a later round
                done = False
                continue
            try:
                await self.executor.write(
                    shard, work, epoch=topology.epoch, deadline=self.executor.deadline()
                )
            except errors.ApiError as exc:
                log.warning("views: cannot unregister on %s: %s", shard.name, exc.message)
                done = False
        self._unregistered = done

    async def _follow_once(self, name: str) -> None:
        topology = self.watcher.require_topology()
        shard = topology.shards.get(name)
        if shard is None or shard.primary is None:
            return
        try:
            await self.follow(topology, shard, self._tenure.get(name, 0))
        except Exception as exc:
            metrics.VIEW_ROUND_FAILURES.labels(name).inc()
            log.warning("views: round on %s failed: %s", name, exc)

    async def _hold(self, shards: list[str]) -> list[str]:
        """Renew this instance's leases and take lapsed or free ones, up to a fair share
        (the shards over the instances that keep views, seen within a lease); what is
        over the share is left to run out, so a new instance gets its part.  Returns
        those held."""
        async with self.watcher.catalog_connection() as conn, conn.transaction():
            keepers = await conn.fetchval(
                "WITH seen AS (INSERT INTO shardd_view_keepers (instance) VALUES ($1)"
                " ON CONFLICT (instance) DO UPDATE SET seen_at = now())"
                " SELECT count(*) + 1 FROM shardd_view_keepers WHERE instance <> $1"
                " AND seen_at > now() - make_interval(secs => $2)",
                self.instance,
                self.lease,
            )
            rows = await conn.fetch(
                "SELECT shard, holder, expires_at > now() AS live FROM shardd_view_leases"
                " WHERE shard = ANY($1::text[]) FOR UPDATE",
                shards,
            )
            share = math.ceil(len(shards) / keepers)
            mine = sorted(r["shard"] for r in rows if r["holder"] == self.instance and r["live"])
            taken = {r["shard"] for r in rows if r["live"] and r["holder"] != self.instance}
            free = [s for s in shards if s not in taken and s not in mine]
            keep = mine[:share] + free[: max(0, share - len(mine))]
            # What is over the share is given back by not renewing it: another instance
            # takes it once it has run out, when no apply of ours can land any more.
            if not keep:
                return []
            held = await conn.fetch(
                "INSERT INTO shardd_view_leases AS l (shard, holder, expires_at)"
                " SELECT s, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) s"
                " ON CONFLICT (shard) DO UPDATE SET holder = excluded.holder,"
                " expires_at = excluded.expires_at"
                " WHERE l.holder = excluded.holder OR l.expires_at < now()"
                " RETURNING shard, expires_at",
                keep,
                self.instance,
                self.lease,
            )
        for row in held:
            if row["shard"] not in mine:
                self._tenure[row["shard"]] = self._tenure.get(row["shard"], 0) + 1
            self._expires[row["shard"]] = row["expires_at"]
        return [row["shard"] for row in held]

    def _not_after(self, shard: str, tenure: int) -> datetime:
        """The time after which this instance's applies for ``shard`` are refused; work
        begun under another tenure of the lease gets none."""
        expires = self._expires.get(shard)
        if expires is None or self._tenure.get(shard) != tenure:
            raise LeaseLost(f"the view lease of {shard} changed hands since this work began")
        return expires - LEASE_MARGIN - timedelta(seconds=self.settings.statement_timeout)

    async def _observe_lag(self, topology: Topology, views: list[ViewInfo]) -> None:
        """Every instance: each view's lag per source shard, as metrics and for
        back-pressure (per source table and shard)."""
        if not views:
            self.data.view_lags = {}
            return
        async with self.watcher.catalog_connection() as conn:
            positions = await catalog.view_positions(conn)
        lags: dict[tuple[str, str], float] = {}
        active = {v.name: v for v in views if v.state == catalog.VIEW_ACTIVE}
        for row in positions:
            view, shard = str(row["view"]), str(row["shard"])
            if shard not in topology.shards or view not in topology.views:
                continue
            lag = max(0.0, float(str(row["lag_seconds"])))
            metrics.VIEW_LAG_SECONDS.labels(view, shard).set(lag)
            metrics.VIEW_LAG_ENTRIES.labels(view, shard).set(int(str(row["last_batch"])))
            # A shard without a primary takes no writes to slow down.
            if view in active and topology.shards[shard].primary is not None:
                key = (active[view].source, shard)
                lags[key] = max(lags.get(key, 0.0), lag)
        self.data.view_lags = lags

    # -- one source shard --------------------------------------------------------

    async def follow(self, topology: Topology, shard: Shard, tenure: int) -> None:
        """One round on ``shard``: start copies for the views without a position there,
        copy the slots a view's copies left out, and apply the next batch for the views
        already followed."""
        views = live_views(topology)
        await self._list_sources(topology, shard, views)
        async with self.watcher.catalog_connection() as conn:
            every = await catalog.view_positions(conn)
            covered = {
                row["name"]: set(row["covered"])
                for row in await conn.fetch(
                    "SELECT name, covered FROM shardd_views WHERE state = $1",
                    catalog.VIEW_BACKFILLING,
                )
            }
        stored = {str(row["view"]): row for row in every if row["shard"] == shard.name}
        for view in views:
            if view.name not in stored:
                self._copy(view, shard, tenure, slots=None)
            elif view.name in covered:
                mine = {
                    slot
                    for slot, owner in enumerate(topology.slot_map)
                    if owner == shard.name and slot not in covered[view.name]
                }
                if mine:
                    self._copy(view, shard, tenure, slots=sorted(mine))
        following = [v for v in views if v.name in stored]
        if following:
            await self._follow_batch(topology, shard, following, stored, every, tenure)
        await self._activate(topology, views)

    def _copy(self, view: ViewInfo, shard: Shard, tenure: int, *, slots: list[int] | None) -> None:
        """Start copying ``view``'s rows of ``shard`` (of ``slots`` only: the view is
        followed there already) beside the shard's rounds, unless a copy runs."""
        key = (shard.name, view.name)
        running = self._copies.get(key)
        if running is not None and not running.done():
            return

        async def copy() -> None:
            try:
                await self.backfill(view, shard, tenure, slots=slots)
            except Exception as exc:  # the next round starts it again
                metrics.VIEW_ROUND_FAILURES.labels(shard.name).inc()
                log.warning("views: copying %s from %s failed: %s", view.name, shard.name, exc)

        self._copies[key] = asyncio.create_task(copy(), name=f"views-copy-{key}")

    async def _follow_batch(
        self,
        topology: Topology,
        shard: Shard,
        views: list[ViewInfo],
        stored: dict[str, Any],
        every: list[dict[str, object]],
        tenure: int,
    ) -> None:
        positions: Positions = {
            v.name: (str(stored[v.name]["position"]), _text(stored[v.name]["replaced"]))
            for v in views
        }
        reading = await self._read(shard, views, positions)
        if reading.lost:
            await self._forget(shard, "its change log was trimmed past the views' positions")
            return
        other = [v for v in views if stored[v.name]["origin"] != reading.origin]
        if other:
            await self._restart(shard, other, reading.origin, stored, tenure)
            return
        if await self._held_back(topology, shard, views, reading, every):
            return
        await self._apply(topology, shard, views, positions, reading, tenure)

    async def _held_back(
        self,
        topology: Topology,
        shard: Shard,
        views: list[ViewInfo],
        reading: Reading,
        every: list[dict[str, object]],
    ) -> bool:
        """Whether this round waits for a shard that ``shard`` took slots from: a key's
        changes there are older than its changes here.  The wait is bounded
        (``HOLD_LIMIT``): past it the round goes on (logged and counted), so two shards
        that moved slots to each other cannot wait for one another for good."""
        touched = {c.slot for c in reading.changes()}
        if not touched:
            return False
        async with self.watcher.catalog_connection() as conn:
            moves = await progress.incoming(conn, shard.name)
        waiting = progress.held_back(
            moves,
            touched,
            {(str(r["view"]), str(r["shard"])): str(r["position"]) for r in every},
            [v.name for v in views],
            [name for name, s in topology.shards.items() if s.primary is not None],
        )
        now = time.monotonic()
        for name in list(self._held_since):
            if name[0] == shard.name and name[1] not in waiting:
                del self._held_since[name]
        late = []
        for source_shard in waiting:
            since = self._held_since.setdefault((shard.name, source_shard), now)
            if now - since > HOLD_LIMIT:
                late.append(source_shard)
        if late:
            metrics.VIEW_HOLD_TIMEOUTS.labels(shard.name).inc()
            log.warning(
                "views: %s waited %.0f s for %s's changes; going on (run shardctl views verify)",
                shard.name,
                HOLD_LIMIT,
                ", ".join(late),
            )
        if set(waiting) - set(late):
            log.debug("views: %s waits for %s's changes", shard.name, ", ".join(waiting))
            return True
        return False

    async def _list_sources(self, topology: Topology, shard: Shard, views: list[ViewInfo]) -> None:
        """List the views' source tables on the shard and register the ``views``
        consumer.  The listing commits without locks; a copy waits until every
        transaction older than it has ended (see :meth:`_wait_listed`)."""
        primary = shard.primary.name if shard.primary is not None else ""
        sources = frozenset(v.source for v in views)
        listed = self._listed.get(shard.name)
        if listed is not None and listed[:2] == (primary, sources):
            return

        async def work(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                for table in sorted(sources):
                    await conn.execute(
                        "INSERT INTO shardd_view_sources (tbl) VALUES ($1)"
                        " ON CONFLICT (tbl) DO NOTHING",
                        table,
                    )
                await conn.execute(
                    "INSERT INTO shardd_consumers (name, position)"
                    " VALUES ($1, pg_current_snapshot()) ON CONFLICT (name) DO NOTHING",
                    CONSUMER,
                )
            # Every transaction from here on started after the listing committed.
            return int(await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))

        xmax, _ = await self.executor.write(
            shard, work, epoch=topology.epoch, deadline=self.executor.deadline()
        )
        self._listed[shard.name] = (primary, sources, xmax)

    async def _wait_listed(self, conn: asyncpg.Connection, shard: str, deadline: float) -> None:
        """Before a copy takes its snapshot: every write that began before the source
        tables were listed has ended (so its effect is in the copy, and every later
        change keeps the document it replaced)."""
        listed = self._listed.get(shard)
        if listed is None:
            raise LeaseLost(f"the view sources of {shard} are not listed yet")
        while True:
            oldest = int(
                await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            )
            if oldest >= listed[2]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"a transaction older than the view listing is open on {shard}")
            await asyncio.sleep(0.1)

    async def backfill(
        self, view: ViewInfo, shard: Shard, tenure: int, *, slots: list[int] | None = None
    ) -> int:
        """Copy ``view``'s rows of the items on ``shard`` (of ``slots`` only, for a view
        followed there already: its position stays) and record the position they are as
        of and the slots they cover; returns the rows written."""
        started = time.monotonic()
        deadline = started + self.settings.view_backfill_timeout
        definition = view.definition
        key_bytes = self.settings.max_key_bytes

        async def work(conn: asyncpg.Connection) -> tuple[str, str, int, list[int]]:
            await self._wait_listed(conn, shard.name, deadline)
            written = 0
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                position = await changelog.position(conn)
                history = await changelog.origin(conn)
                answered = await source.answered(conn)
                covered = answered if slots is None else sorted(set(slots) & set(answered))
                async for found in source.row_pages(
                    conn, definition, max_key_bytes=key_bytes, slots=covered
                ):
                    written += await self._write(
                        view,
                        shard.name,
                        [ViewRowWrite(r.pk, r.sk, r.doc, r.source_version) for r in found],
                        tenure,
                    )
            return position, history, written, covered

        (position, history, written, covered), _ = await self.executor.read(
            shard, work, consistency="strong", min_lsn=None, deadline=deadline
        )
        async with self.watcher.catalog_connection() as conn, conn.transaction():
            if slots is None:
                await self._save(
                    view.name,
                    shard.name,
                    position,
                    history,
                    time.monotonic() - started,
                    batch=0,
                    applied=written,
                    expected=None,
                    conn=conn,
                )
            await conn.execute(
                "UPDATE shardd_views SET covered ="
                " ARRAY(SELECT DISTINCT s FROM unnest(covered || $2::int[]) s ORDER BY s)"
                " WHERE name = $1",
                view.name,
                covered,
            )
        metrics.VIEW_ROWS_APPLIED.labels(view.name).inc(written)
        log.info(
            "views: %s copied from %s (%s rows, %s slots)",
            view.name,
            shard.name,
            written,
            len(covered),
        )
        return written

    async def _restart(
        self,
        shard: Shard,
        views: list[ViewInfo],
        origin: str,
        stored: dict[str, Any],
        tenure: int,
    ) -> None:
        """The shard's primary writes another history than the positions were taken on:
        read its log again from the start of what it retains (applies are idempotent)."""

        async def work(conn: asyncpg.Connection) -> tuple[str, bool]:
            return await changelog.retained_start(conn), await changelog.origin(conn) == origin

        (start, same), _ = await self.executor.read(
            shard,
            work,
            consistency="strong",
            min_lsn=None,
            deadline=self.executor.deadline(),
        )
        if not same:
            return  # promoted again meanwhile: the next round looks afresh
        log.warning(
            "views: %s writes a new history (%s): reading its log again for %s",
            shard.name,
            origin,
            ", ".join(v.name for v in views),
        )
        self._not_after(shard.name, tenure)  # still ours
        for view in views:
            old = str(stored[view.name]["position"])
            await self._save(
                view.name,
                shard.name,
                start,
                origin,
                None,  # the lag goes on growing until the log has been read again
                batch=0,
                applied=0,
                expected=old,
                replaced=changelog.parse_position(old)[0]
                if stored[view.name]["replaced"] is None
                else str(stored[view.name]["replaced"]),
            )

    async def _read(self, shard: Shard, views: list[ViewInfo], positions: Positions) -> Reading:
        tables = sorted(
            {v.source for v in views} | {t for v in views for t in v.definition.join_tables()}
        )
        defs = [v.definition for v in views]

        async def work(conn: asyncpg.Connection) -> Reading:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                taken = time.time()
                now = await changelog.position(conn)
                reading = Reading(await changelog.origin(conn), {})
                answered = await source.answered(conn)
                for old, replaced in sorted(set(positions.values()), key=str):
                    if await changelog.trimmed_past(conn, old):
                        reading.lost = True
                        return reading
                    start, end, seq = changelog.parse_position(old)
                    # A round read in parts: its end snapshot, and when it was taken.
                    end_at = changelog.round_taken(old) if end is not None else taken
                    end = end or now
                    rows = await conn.fetch(
                        _CHANGES, start, end, tables, seq, BATCH, replaced, answered
                    )
                    changes = [_change(r) for r in rows]
                    after = (
                        changelog.open_round(start, end, changes[-1].seq, end_at)
                        if len(changes) == BATCH
                        else end
                    )
                    reading.batches[(old, replaced)] = Batch(changes, after, end_at)
                every = reading.changes()
                if not every:
                    return reading
                owned = await source.owned(conn, (c.slot for c in every))
                reading.moved = {c.slot for c in every} - owned
                here = {c.pk for c in every if c.slot in owned}
                reading.joined = await source.joined(conn, defs, here)
                rejoin = {
                    (v.source, c.pk)
                    for v in defs
                    for c in every
                    if c.slot in owned and v.joined_by(c.tbl, c.sk)
                }
                for table in {t for t, _ in rejoin}:
                    pks = sorted(pk for t, pk in rejoin if t == table)
                    for item in await source.partitions(conn, table, pks):
                        reading.dependents.setdefault((table, item.pk), []).append(item)
                return reading

        reading, _ = await self.executor.read(
            shard, work, consistency="strong", min_lsn=None, deadline=self.executor.deadline()
        )
        if reading.moved:
            await self._read_moved(reading, defs)
        return reading

    async def _read_moved(self, reading: Reading, views: list[ViewDef]) -> None:
        """Joined items and dependents of keys whose slot moved away, from their owner."""
        every = reading.changes()
        pks = {c.pk for c in every if c.slot in reading.moved}
        wanted = {(j.table, j.sk) for v in views for j in v.joins}
        for pk in pks:
            for table, sk in wanted:
                item, _ = await self.data.get(
                    table=table, pk=pk, sk=sk, consistency="strong", token=None
                )
                if item is not None:
                    reading.joined.setdefault(pk, {})[(table, sk)] = orjson.loads(
                        orjson.dumps(item.doc)
                    )
            for view in views:
                if not any(view.joined_by(c.tbl, c.sk) for c in every if c.pk == pk):
                    continue
                after: str | None = None
                while True:
                    items, _ = await self.data.query(
                        table=view.source,
                        pk=pk,
                        prefix=None,
                        after=after,
                        limit=source.PAGE,
                        consistency="strong",
                        token=None,
                    )
                    reading.dependents.setdefault((view.source, pk), []).extend(
                        source.SourceItem(i.pk, i.sk, i.version, orjson.loads(orjson.dumps(i.doc)))
                        for i in items
                    )
                    if len(items) < source.PAGE:
                        break
                    after = items[-1].sk

    async def _write(
        self, view: ViewInfo, shard: str, writes: list[ViewRowWrite], tenure: int
    ) -> int:
        """Apply row writes in chunks, each under a deadline of its own and this
        instance's lease on the source shard."""
        written = 0
        for start in range(0, len(writes), APPLY_CHUNK):
            written += await self.data.apply_view_rows(
                table=view.rows_table,
                rows=writes[start : start + APPLY_CHUNK],
                deadline=self.executor.deadline(),
                not_after=self._not_after(shard, tenure),
            )
        return written

    async def _apply(
        self,
        topology: Topology,
        shard: Shard,
        views: list[ViewInfo],
        positions: Positions,
        reading: Reading,
        tenure: int,
    ) -> None:
        applied: dict[str, int] = {}
        for view in views:
            writes = plan_rows(
                view.definition,
                reading.batches[positions[view.name]].changes,
                joined=reading.joined,
                dependents=reading.dependents,
                max_key_bytes=self.settings.max_key_bytes,
            )
            applied[view.name] = await self._write(view, shard.name, writes, tenure)
            if applied[view.name]:
                metrics.VIEW_ROWS_APPLIED.labels(view.name).inc(applied[view.name])
        now = datetime.now(UTC)
        for change in reading.changes():
            metrics.VIEW_PROPAGATION_SECONDS.observe(max(0.0, (now - change.at).total_seconds()))
        self._not_after(shard.name, tenure)  # still ours
        for view in views:
            batch = reading.batches[positions[view.name]]
            # While a round is read in parts the view is as far behind as its start:
            # the age stays; once it ends, the view is as old as the round's end.
            closed = changelog.ROUND not in batch.after
            await self._save(
                view.name,
                shard.name,
                batch.after,
                reading.origin,
                max(0.0, time.time() - batch.taken) if closed else None,
                batch=len(batch.changes),
                applied=applied[view.name],
                expected=positions[view.name][0],
            )
        await self._advance(topology, shard, reading)

    async def _advance(self, topology: Topology, shard: Shard, reading: Reading) -> None:
        """Let the shard trim what every view has applied."""
        busy = bool(reading.changes())
        if not busy and time.monotonic() - self._advanced.get(shard.name, 0.0) < ADVANCE_EVERY:
            return
        oldest = min(
            (changelog.parse_position(b.after)[0] for b in reading.batches.values()),
            key=lambda snapshot: int(snapshot.split(":", 1)[0]),
        )

        async def work(conn: asyncpg.Connection) -> bool:
            """Advance the consumer; if it was dropped (expired, or unregistered when no
            view was left), register it again where the views are, unless the log was
            trimmed past that meanwhile (False: the views must copy again)."""
            try:
                await changelog.advance(conn, CONSUMER, oldest)
                return True
            except changelog.ConsumerExpired:
                if await changelog.trimmed_past(conn, oldest):
                    return False
                await changelog.register(conn, CONSUMER, oldest)
                return True

        kept, _ = await self.executor.write(
            shard, work, epoch=topology.epoch, deadline=self.executor.deadline()
        )
        if not kept:
            await self._forget(shard, "its change-log consumer expired and the log was trimmed")
            return
        self._advanced[shard.name] = time.monotonic()

    async def _forget(self, shard: Shard, why: str) -> None:
        """The log lost entries the views had not applied: copy them again.  (A copy
        writes the rows the items make now; rows of items deleted in the lost entries
        stay until ``shardctl views repair``.)"""
        log.warning(
            "views: %s: %s; copying every view again (run shardctl views verify)", shard.name, why
        )
        self._listed.pop(shard.name, None)
        async with self.watcher.catalog_connection() as conn:
            await conn.execute("DELETE FROM shardd_view_positions WHERE shard = $1", shard.name)

    async def _save(
        self,
        view: str,
        shard: str,
        position: str,
        history: str,
        age: float | None,
        *,
        batch: int,
        applied: int,
        expected: str | None,
        replaced: str | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> None:
        """Record a view's position on a shard, only while this instance holds the
        shard's lease, and only over the position the work began from (``expected``;
        None: a copy creates the position, where there is none).  So a late save of
        work begun under an earlier lease, or before a rebuild dropped the position,
        changes nothing.  ``age``: seconds since the position's snapshot was taken
        (None: unchanged)."""
        held = (
            "EXISTS (SELECT 1 FROM shardd_view_leases WHERE shard = $2"
            " AND holder = $8 AND expires_at > now())"
        )
        args: tuple[object, ...] = (
            view,
            shard,
            position,
            history,
            age,
            batch,
            applied,
            self.instance,
        )
        if expected is None:
            sql = (
                "INSERT INTO shardd_view_positions"
                " (view, shard, position, origin, taken_at, last_batch, applied)"
                " SELECT $1, $2, $3, $4, now() - make_interval(secs => $5), $6, $7"
                f" WHERE {held} AND EXISTS (SELECT 1 FROM shardd_views WHERE name = $1)"
                " ON CONFLICT (view, shard) DO NOTHING RETURNING 1"
            )
        else:
            # A replay ends with the round it started: then the old position is no
            # longer needed ($10 NULL, $11: the new position is a plain one).
            sql = (
                "UPDATE shardd_view_positions AS p SET position = $3, origin = $4,"
                " taken_at = coalesce(now() - make_interval(secs => $5), p.taken_at),"
                " last_batch = $6, applied = p.applied + $7, updated_at = now(),"
                " replaced = CASE WHEN $10::text IS NOT NULL THEN $10"
                " WHEN $11 THEN NULL ELSE p.replaced END"
                f" WHERE view = $1 AND shard = $2 AND position = $9 AND {held} RETURNING 1"
            )
            args += (expected, replaced, changelog.ROUND not in position)
        if conn is not None:
            row = await conn.fetchrow(sql, *args)
        else:
            async with self.watcher.catalog_connection() as own:
                row = await own.fetchrow(sql, *args)
        if row is None:
            raise LeaseLost(f"the view lease of {shard} or the position of {view} moved on")

    async def _activate(self, topology: Topology, views: list[ViewInfo]) -> None:
        """Mark views active once every shard has a position for them and their copies
        have read every slot (the owners of slots none has read copy them: see
        :meth:`follow`)."""
        waiting = [v for v in views if v.state == catalog.VIEW_BACKFILLING]
        if not waiting:
            return
        async with self.watcher.catalog_connection() as conn:
            positions = await catalog.view_positions(conn)
            for view in waiting:
                followed = {str(p["shard"]) for p in positions if p["view"] == view.name}
                if not set(topology.shards) <= followed:
                    continue
                covered = await conn.fetchval(
                    "SELECT cardinality(covered) FROM shardd_views WHERE name = $1", view.name
                )
                if covered != topology.slot_count:
                    continue
                if await catalog.set_view_state(
                    conn, view.name, old=catalog.VIEW_BACKFILLING, new=catalog.VIEW_ACTIVE
                ):
                    await catalog.bump_epoch(conn)
                    log.info("views: %s is active", view.name)

    # -- back-pressure -------------------------------------------------------------

    async def admit_write(self, table: str, shard: str, deadline: float) -> None:
        """Before a write to ``table`` on ``shard``: slow it or refuse it while a view of
        the table lags past ``max_view_lag`` on that shard (view_backpressure)."""
        mode = self.settings.view_backpressure
        limit = self.settings.max_view_lag
        if mode == "off" or self.data.view_lags.get((table, shard), 0.0) <= limit:
            return
        if mode == "refuse":
            metrics.VIEW_BACKPRESSURE.labels("refused").inc()
            raise errors.ApiError(
                f"a view of table {table} lags"
                f" {self.data.view_lags[(table, shard)]:.1f} s behind its writes on {shard}"
                f" (max_view_lag {limit:g} s)",
                status=503,
                code="view_lag",
                headers={"Retry-After": "1"},
            )
        metrics.VIEW_BACKPRESSURE.labels("delayed").inc()
        until = min(deadline - 1.0, time.monotonic() + self.settings.view_backpressure_wait)
        while time.monotonic() < until:
            if self.data.view_lags.get((table, shard), 0.0) <= limit:
                return
            await asyncio.sleep(min(0.05, max(0.0, until - time.monotonic())))


def _change(row: asyncpg.Record) -> Change:
    return Change(
        row["op"],
        row["tbl"],
        row["pk"],
        row["sk"],
        row["slot"],
        row["version"],
        orjson.loads(row["doc"]) if row["doc"] is not None else None,
        orjson.loads(row["old"]) if row["old"] is not None else None,
        row["at"],
        row["seq"],
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
