"""View maintenance: every source shard's change log applied to the views' rows.

One instance at a time follows a source shard (a lease row in the catalog, renewed every
round; another instance takes it once it lapses).  A round on a followed shard:

1. lists the views' source tables on the shard (``shardd_add_view_source``), so the
   change log keeps the document each change replaced, and registers the change-log
   consumer ``views`` so trimming keeps what the views have not applied;
2. backfills views that have no position on the shard (new views, a new shard, a
   position from another history): one repeatable-read transaction reads the source
   items and their joined items, their rows are applied, and the transaction's
   snapshot becomes the position;
3. reads, in one repeatable-read transaction, the changes visible in a new snapshot but
   not in each view's position (PgQ batches: never skipping a late commit), together
   with the joined items of the changed keys and the dependents of changed joined
   items, as of that snapshot;
4. applies the rows (puts and removals of rows under old view keys) through the fenced
   write path, each shard's share in one transaction, never replacing a row built from
   a newer source version (``shardd_view_apply``);
5. records the new position (only while still holding the lease) and moves the
   ``views`` consumer on.

A round that fails anywhere is retried from the same position: applies are idempotent.
A position carries its primary's history (system identifier and timeline): after a
promotion the shard is backfilled again instead of trusting transaction ids that the
new primary may hand out anew.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from .. import catalog, changelog, errors, metrics
from ..config import Settings
from ..dataplane import DataPlane
from ..executor import Executor
from ..topology import Shard, Topology, ViewInfo
from ..watcher import TopologyWatcher
from . import rows as source
from .definition import Row, ViewDef, project, row_key, rows_table

log = logging.getLogger(__name__)
CONSUMER = "views"  # the change-log consumer that keeps what views have not applied
APPLY_CHUNK = 500
ADVANCE_EVERY = 10.0  # seconds between consumer advances of an idle shard
FAR_VERSION = 2**62  # a removal that no stored row is newer than

_CHANGES = """
SELECT seq, op, tbl, pk, sk, slot, version, doc::text AS doc, old::text AS old, at
FROM shardd_changes
WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND pg_visible_in_snapshot(txid, $2::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)
  AND tbl = ANY($3::text[])
ORDER BY seq
"""


@dataclass(frozen=True)
class Change:
    op: str
    tbl: str
    pk: str
    sk: str
    slot: int
    version: int
    doc: Any  # the new document (None: a delete)
    old: Any  # the replaced document (None: none, or not kept)
    at: datetime


@dataclass
class Batch:
    """What one round read from a source shard, as of one snapshot."""

    position: str
    origin: str
    changes: dict[str, list[Change]]  # old position -> its changes
    joined: source.Joined = field(default_factory=dict)
    dependents: dict[tuple[str, str], list[source.SourceItem]] = field(default_factory=dict)
    moved: set[int] = field(default_factory=set)  # slots the shard no longer answers for


def live_views(topology: Topology) -> list[ViewInfo]:
    return [v for v in topology.views.values() if v.state != catalog.VIEW_DELETING]


def _removal(
    view: ViewDef, change_docs: Sequence[Any], pk: str, sk: str, key_bytes: int
) -> set[tuple[str, str]]:
    keys = set()
    for doc in change_docs:
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
) -> list[tuple[str, str, Any, int]]:
    """The row writes (view pk, row sk, doc or None, source version) that bring
    ``view`` up to date with ``changes`` (in log order).

    Per source key only its last change counts, but every view key any of its changes
    had (before or after) loses its row unless the last one puts it there again.  A
    change of a joined item re-projects every item of the source table under its pk.
    """
    by_key: dict[tuple[str, str], list[Change]] = {}
    rejoin: set[str] = set()
    for change in changes:
        if change.tbl == view.source:
            by_key.setdefault((change.pk, change.sk), []).append(change)
        if view.joined_by(change.tbl, change.sk):
            rejoin.add(change.pk)
    writes: dict[tuple[str, str], tuple[Any, int]] = {}

    def put(row: Row) -> None:
        key = (row.pk, row.sk)
        held = writes.get(key)
        if held is None or held[0] is None or held[1] <= row.source_version:
            writes[key] = (row.doc, row.source_version)

    for (pk, sk), keyed in by_key.items():
        last = keyed[-1]
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
        for gone in _removal(view, earlier, pk, sk, max_key_bytes):
            if row is None or gone != (row.pk, row.sk):
                writes.setdefault(gone, (None, last.version))
        if row is not None:
            put(row)
    for pk in rejoin:
        for item in dependents.get((view.source, pk), ()):
            row = project(
                view,
                item.doc,
                pk=item.pk,
                sk=item.sk,
                version=item.version,
                joined=joined.get(pk, {}),
                max_key_bytes=max_key_bytes,
            )
            if row is not None:
                put(row)
    return [(pk, sk, doc, version) for (pk, sk), (doc, version) in writes.items()]


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
        self._listed: dict[str, tuple[str, frozenset[str]]] = {}  # shard -> (primary, sources)
        self._advanced: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

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
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self.watcher.topology is not None and self._tasks:
            try:
                async with self.watcher.catalog_connection() as conn:
                    await conn.execute(
                        "DELETE FROM shardd_view_leases WHERE holder = $1", self.instance
                    )
            except Exception:  # the leases lapse on their own
                pass

    async def round(self) -> None:
        topology = self.watcher.topology
        if topology is None:
            return
        views = live_views(topology)
        await self._observe_lag(topology, views)
        if not views or not self.settings.views:
            return
        held = await self._hold(sorted(topology.shards))
        for name in held:
            task = self._tasks.get(name)
            if task is None or task.done():
                self._tasks[name] = asyncio.create_task(
                    self._follow_once(name), name=f"views-{name}"
                )

    async def _follow_once(self, name: str) -> None:
        topology = self.watcher.require_topology()
        shard = topology.shards.get(name)
        if shard is None:
            return
        try:
            await self.follow(topology, shard)
        except Exception as exc:
            metrics.VIEW_ROUND_FAILURES.labels(name).inc()
            log.warning("views: round on %s failed: %s", name, exc)

    async def _hold(self, shards: list[str]) -> list[str]:
        """Take or renew the leases of the shards no live instance holds; those held."""
        async with self.watcher.catalog_connection() as conn:
            rows = await conn.fetch(
                "INSERT INTO shardd_view_leases AS l (shard, holder, expires_at)"
                " SELECT s, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) s"
                " ON CONFLICT (shard) DO UPDATE SET holder = excluded.holder,"
                " expires_at = excluded.expires_at"
                " WHERE l.holder = excluded.holder OR l.expires_at < now()"
                " RETURNING shard",
                shards,
                self.instance,
                self.settings.view_lease,
            )
        return [row["shard"] for row in rows]

    async def _observe_lag(self, topology: Topology, views: list[ViewInfo]) -> None:
        if not views:
            self.data.view_lags = {}
            return
        async with self.watcher.catalog_connection() as conn:
            positions = await catalog.view_positions(conn)
        lags: dict[str, float] = {}
        active = {v.name: v for v in views if v.state == catalog.VIEW_ACTIVE}
        for row in positions:
            view, shard = str(row["view"]), str(row["shard"])
            if shard not in topology.shards or view not in topology.views:
                continue
            lag = max(0.0, float(row["lag_seconds"]))  # type: ignore[arg-type]
            metrics.VIEW_LAG_SECONDS.labels(view, shard).set(lag)
            metrics.VIEW_LAG_ENTRIES.labels(view, shard).set(row["last_batch"])  # type: ignore[arg-type]
            if view in active:
                table = active[view].source
                lags[table] = max(lags.get(table, 0.0), lag)
        self.data.view_lags = lags

    # -- one source shard --------------------------------------------------------

    async def follow(self, topology: Topology, shard: Shard) -> None:
        """One round on ``shard``: backfill what needs it, else apply the next batch."""
        views = live_views(topology)
        deadline = time.monotonic() + self.settings.view_backfill_timeout
        await self._list_sources(topology, shard, views, deadline)
        async with self.watcher.catalog_connection() as conn:
            stored = {
                str(row["view"]): row
                for row in await catalog.view_positions(conn)
                if row["shard"] == shard.name
            }
        positions = {v.name: str(stored[v.name]["position"]) for v in views if v.name in stored}
        for view in views:
            if view.name not in positions:
                await self.backfill(view.definition, shard, deadline=deadline)
                return  # the next round goes on from the new position
        taken_at = time.time()
        batch = await self._read_batch(shard, views, positions)
        stale = [v for v in views if stored[v.name]["origin"] != batch.origin]
        if stale:
            log.warning(
                "views: %s has a new history (%s): copying %s again",
                shard.name,
                batch.origin,
                ", ".join(v.name for v in stale),
            )
            await self.backfill(stale[0].definition, shard, deadline=deadline)
            return
        await self._apply_batch(topology, shard, views, positions, batch, taken_at)
        await self._activate(topology, views)

    async def _list_sources(
        self, topology: Topology, shard: Shard, views: list[ViewInfo], deadline: float
    ) -> None:
        primary = shard.primary.name if shard.primary is not None else ""
        sources = frozenset(v.source for v in views)
        if self._listed.get(shard.name) == (primary, sources):
            return

        async def work(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                for table in sorted(sources):
                    await conn.execute("SELECT shardd_add_view_source($1)", table)
                await conn.execute(
                    "INSERT INTO shardd_consumers (name, position)"
                    " VALUES ($1, pg_current_snapshot()) ON CONFLICT (name) DO NOTHING",
                    CONSUMER,
                )

        await self.executor.write(shard, work, epoch=topology.epoch, deadline=deadline)
        self._listed[shard.name] = (primary, sources)

    async def backfill(self, view: ViewDef, shard: Shard, *, deadline: float) -> int:
        """Copy ``view``'s rows of the items on ``shard`` and record the position they
        are as of; returns the rows written."""
        taken_at = time.time()
        table = rows_table(view.name)
        key_bytes = self.settings.max_key_bytes

        async def work(conn: asyncpg.Connection) -> tuple[str, str, int]:
            written = 0
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                position = await changelog.position(conn)
                history = await changelog.origin(conn)
                after = ("", "")
                while True:
                    items = await source.source_page(conn, view.source, after)
                    if not items:
                        break
                    joins = await source.joined(conn, [view], (i.pk for i in items))
                    found = source.rows_of(view, items, joins, max_key_bytes=key_bytes)
                    for start in range(0, len(found), APPLY_CHUNK):
                        chunk = found[start : start + APPLY_CHUNK]
                        written += await self.data.apply_view_rows(
                            table=table,
                            rows=[(r.pk, r.sk, r.doc, r.source_version) for r in chunk],
                            deadline=deadline,
                        )
                    after = (items[-1].pk, items[-1].sk)
            return position, history, written

        (position, history, written), _ = await self.executor.read(
            shard, work, consistency="strong", min_lsn=None, deadline=deadline
        )
        await self._save(
            view.name, shard.name, position, history, taken_at, batch=0, applied=written
        )
        metrics.VIEW_ROWS_APPLIED.labels(view.name).inc(written)
        log.info("views: %s backfilled from %s (%s rows)", view.name, shard.name, written)
        return written

    async def _read_batch(
        self, shard: Shard, views: list[ViewInfo], positions: dict[str, str]
    ) -> Batch:
        tables = sorted(
            {v.source for v in views} | {t for v in views for t in v.definition.join_tables()}
        )
        defs = [v.definition for v in views]

        async def work(conn: asyncpg.Connection) -> Batch:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                new = await changelog.position(conn)
                history = await changelog.origin(conn)
                batch = Batch(new, history, {})
                for old in sorted(set(positions.values())):
                    rows = await conn.fetch(_CHANGES, old, new, tables)
                    batch.changes[old] = [
                        Change(
                            r["op"],
                            r["tbl"],
                            r["pk"],
                            r["sk"],
                            r["slot"],
                            r["version"],
                            orjson.loads(r["doc"]) if r["doc"] is not None else None,
                            orjson.loads(r["old"]) if r["old"] is not None else None,
                            r["at"],
                        )
                        for r in rows
                    ]
                every = [c for changes in batch.changes.values() for c in changes]
                if not every:
                    return batch
                owned = await source.owned(conn, (c.slot for c in every))
                batch.moved = {c.slot for c in every} - owned
                here = {c.pk for c in every if c.slot in owned}
                batch.joined = await source.joined(conn, defs, here)
                rejoin = {
                    (v.source, c.pk)
                    for v in defs
                    for c in every
                    if c.slot in owned and v.joined_by(c.tbl, c.sk)
                }
                for table in {t for t, _ in rejoin}:
                    pks = sorted(pk for t, pk in rejoin if t == table)
                    for item in await source.partitions(conn, table, pks):
                        batch.dependents.setdefault((table, item.pk), []).append(item)
                return batch

        batch, _ = await self.executor.read(
            shard,
            work,
            consistency="strong",
            min_lsn=None,
            deadline=time.monotonic() + self.settings.request_timeout,
        )
        if batch.moved:
            await self._read_moved(batch, defs)
        return batch

    async def _read_moved(self, batch: Batch, views: list[ViewDef]) -> None:
        """Joined items and dependents of keys whose slot moved away, from their owner."""
        every = [c for changes in batch.changes.values() for c in changes]
        pks = {c.pk for c in every if c.slot in batch.moved}
        wanted = {(j.table, j.sk) for v in views for j in v.joins}
        for pk in pks:
            for table, sk in wanted:
                item, _ = await self.data.get(
                    table=table, pk=pk, sk=sk, consistency="strong", token=None
                )
                if item is not None:
                    batch.joined.setdefault(pk, {})[(table, sk)] = orjson.loads(
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
                    batch.dependents.setdefault((view.source, pk), []).extend(
                        source.SourceItem(i.pk, i.sk, i.version, orjson.loads(orjson.dumps(i.doc)))
                        for i in items
                    )
                    if len(items) < source.PAGE:
                        break
                    after = items[-1].sk

    async def _apply_batch(
        self,
        topology: Topology,
        shard: Shard,
        views: list[ViewInfo],
        positions: dict[str, str],
        batch: Batch,
        taken_at: float,
    ) -> None:
        deadline = time.monotonic() + self.settings.request_timeout
        applied: dict[str, int] = {}
        for view in views:
            changes = batch.changes[positions[view.name]]
            writes = plan_rows(
                view.definition,
                changes,
                joined=batch.joined,
                dependents=batch.dependents,
                max_key_bytes=self.settings.max_key_bytes,
            )
            written = 0
            for start in range(0, len(writes), APPLY_CHUNK):
                written += await self.data.apply_view_rows(
                    table=rows_table(view.name),
                    rows=writes[start : start + APPLY_CHUNK],
                    deadline=deadline,
                )
            applied[view.name] = written
            if written:
                metrics.VIEW_ROWS_APPLIED.labels(view.name).inc(written)
        now = datetime.now(UTC)
        for changes in batch.changes.values():
            for change in changes:
                metrics.VIEW_PROPAGATION_SECONDS.observe(
                    max(0.0, (now - change.at).total_seconds())
                )
        for view in views:
            await self._save(
                view.name,
                shard.name,
                batch.position,
                batch.origin,
                taken_at,
                batch=len(batch.changes[positions[view.name]]),
                applied=applied[view.name],
            )
        await self._advance(topology, shard, batch)

    async def _advance(self, topology: Topology, shard: Shard, batch: Batch) -> None:
        """Let the shard trim what every view has applied (the new position)."""
        busy = any(batch.changes.values())
        if not busy and time.monotonic() - self._advanced.get(shard.name, 0.0) < ADVANCE_EVERY:
            return

        async def work(conn: asyncpg.Connection) -> None:
            await changelog.advance(conn, CONSUMER, batch.position)

        try:
            await self.executor.write(
                shard,
                work,
                epoch=topology.epoch,
                deadline=time.monotonic() + self.settings.request_timeout,
            )
        except changelog.ConsumerExpired:
            # The log may have been trimmed past the positions: copy every view again.
            log.warning("views: the change-log consumer of %s expired; copying again", shard.name)
            self._listed.pop(shard.name, None)
            async with self.watcher.catalog_connection() as conn:
                await conn.execute("DELETE FROM shardd_view_positions WHERE shard = $1", shard.name)
            return
        self._advanced[shard.name] = time.monotonic()

    async def _save(
        self,
        view: str,
        shard: str,
        position: str,
        history: str,
        taken_at: float,
        *,
        batch: int,
        applied: int,
    ) -> None:
        """Record a view's position on a shard, only while this instance holds the
        shard's lease (a lapsed holder's late save would move another's position)."""
        async with self.watcher.catalog_connection() as conn:
            row = await conn.fetchrow(
                "INSERT INTO shardd_view_positions AS p"
                " (view, shard, position, origin, taken_at, last_batch, applied)"
                " SELECT $1, $2, $3, $4, to_timestamp($5), $6, $7"
                " WHERE EXISTS (SELECT 1 FROM shardd_view_leases WHERE shard = $2"
                " AND holder = $8 AND expires_at > now())"
                " AND EXISTS (SELECT 1 FROM shardd_views WHERE name = $1)"
                " ON CONFLICT (view, shard) DO UPDATE SET position = excluded.position,"
                " origin = excluded.origin, taken_at = excluded.taken_at,"
                " last_batch = excluded.last_batch, applied = p.applied + excluded.applied,"
                " updated_at = now()"
                " RETURNING 1",
                view,
                shard,
                position,
                history,
                taken_at,
                batch,
                applied,
                self.instance,
            )
        if row is None:
            raise LeaseLost(f"lost the view lease of {shard}")

    async def _activate(self, topology: Topology, views: list[ViewInfo]) -> None:
        """Mark views active once every shard has a position for them."""
        waiting = [v for v in views if v.state == catalog.VIEW_BACKFILLING]
        if not waiting:
            return
        async with self.watcher.catalog_connection() as conn:
            positions = await catalog.view_positions(conn)
            for view in waiting:
                covered = {str(p["shard"]) for p in positions if p["view"] == view.name}
                if set(topology.shards) <= covered and await catalog.set_view_state(
                    conn, view.name, old=catalog.VIEW_BACKFILLING, new=catalog.VIEW_ACTIVE
                ):
                    await catalog.bump_epoch(conn)
                    log.info("views: %s is active", view.name)

    # -- back-pressure -------------------------------------------------------------

    async def admit_write(self, table: str, deadline: float) -> None:
        """Before a write to ``table``: slow it or refuse it while one of its views lags
        past ``max_view_lag`` (view_backpressure)."""
        mode = self.settings.view_backpressure
        if mode == "off" or self.data.view_lags.get(table, 0.0) <= self.settings.max_view_lag:
            return
        if mode == "refuse":
            metrics.VIEW_BACKPRESSURE.labels("refused").inc()
            raise errors.ApiError(
                f"a view of table {table} lags {self.data.view_lags[table]:.1f} s behind its writes"
                f" (max_view_lag {self.settings.max_view_lag:g} s)",
                status=503,
                code="view_lag",
                headers={"Retry-After": "1"},
            )
        metrics.VIEW_BACKPRESSURE.labels("delayed").inc()
        until = min(deadline - 1.0, time.monotonic() + self.settings.view_backpressure_wait)
        while time.monotonic() < until:
            if self.data.view_lags.get(table, 0.0) <= self.settings.max_view_lag:
                return
            await asyncio.sleep(min(0.05, max(0.0, until - time.monotonic())))


class LeaseLost(Exception):
    """Another instance follows the shard now."""
