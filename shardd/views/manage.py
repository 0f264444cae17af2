"""Declaring, describing, deleting, verifying, repairing and rebuilding views.

* **Declare**: the definition is checked (:func:`definition.parse`) and the view is
  recorded ``backfilling`` under a new generation (its rows' item table is that
  declaration's own); the keepers copy every source shard and then follow it, and the
  view turns ``active`` once every shard is followed.
* **Delete**: ``deleting`` (keepers stop), the rows table fenced on every shard and its
  rows deleted, then the catalog row dropped; repeatable like a table deletion.
* **Verify** recomputes the rows from the sources (each source shard read in one
  snapshot, its items and joined items together) and compares them with the stored
  rows: *missing* (expected, not stored), *extra* (stored, not expected) and *stale*
  (stored with other content).  Maintenance goes on meanwhile, so a difference may only
  be lag: after the first pass it waits until the view has applied every source
  shard's changes up to the snapshots it read, compares again, and reports the
  differences found both times.
* **Repair** writes exactly those; **rebuild** copies every source shard again while
  maintenance continues (``backfilling`` meanwhile) and then repairs what the copy
  cannot see (rows whose source item is gone).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from .. import catalog, changelog, errors, tables
from ..cluster import Cluster
from ..dataplane import ViewRowWrite
from ..topology import Topology, ViewInfo
from . import definition
from . import rows as source
from .keeper import APPLY_CHUNK, FAR_VERSION

CATCH_UP_TIMEOUT = 30.0  # seconds verify waits for the view to apply what it read


async def declare(
    cluster: Cluster, *, table: str, name: str, spec: dict[str, Any]
) -> tuple[ViewInfo, bool]:
    description = spec.pop("description", "")
    if not isinstance(description, str) or len(description) > 1000 or "\x00" in description:
        raise errors.BadRequest(
            "description must be a string of at most 1000 characters", code="invalid_view"
        )
    topology = cluster.watcher.require_topology()
    view = definition.parse(name, table, spec, tables=topology.tables)
    if name in topology.tables:
        raise errors.Conflict(
            f"{name} names a table; views and tables share names", code="view_exists"
        )
    async with cluster.watcher.catalog_connection() as conn:
        created = await catalog.put_view(conn, view, description=description)
    fresh = await cluster.watcher.refresh(force=True)
    if name not in fresh.views:
        raise errors.Conflict(f"view {name} was deleted meanwhile", code="view_deleting")
    return fresh.views[name], created


def find(topology: Topology, table: str | None, name: str) -> ViewInfo:
    view = topology.views.get(name)
    if view is None or (table is not None and view.source != table):
        raise errors.NotFound(f"view {name} does not exist", code="view_not_found")
    return view


async def status(cluster: Cluster, view: ViewInfo) -> dict[str, Any]:
    """The view's description with its per-source-shard positions and lag."""
    topology = cluster.watcher.require_topology()
    async with cluster.watcher.catalog_connection() as conn:
        positions = {str(p["shard"]): p for p in await catalog.view_positions(conn, view=view.name)}
        state = await conn.fetchval("SELECT state FROM shardd_views WHERE name = $1", view.name)
    shards: list[dict[str, Any]] = []
    for name in sorted(topology.shards):
        p = positions.get(name)
        shards.append(
            {
                "shard": name,
                "state": "following" if p is not None else "backfilling",
                "lag_seconds": round(float(str(p["lag_seconds"])), 3) if p is not None else None,
                "last_batch": p["last_batch"] if p is not None else None,
                "rows_applied": p["applied"] if p is not None else 0,
            }
        )
    lags = [s["lag_seconds"] for s in shards if s["lag_seconds"] is not None]
    return {
        **view.as_json(),
        "state": state or view.state,
        "lag_seconds": max(lags) if lags and len(lags) == len(shards) else None,
        "shards": shards,
    }


async def delete(cluster: Cluster, view: ViewInfo) -> None:
    if view.state != catalog.VIEW_DELETING:
        async with cluster.watcher.catalog_connection() as conn:
            await catalog.mark_view_deleting(conn, view.name)
        await cluster.watcher.refresh(force=True)
    await tables.fence_and_empty(cluster, view.rows_table, still=f"view {view.name} still has rows")
    async with cluster.watcher.catalog_connection() as conn:
        await catalog.drop_view(conn, view.name)
    await cluster.watcher.refresh(force=True)


# -- verify, repair, rebuild -----------------------------------------------------------

Rows = dict[tuple[str, str], tuple[int, bytes]]  # (view pk, row sk) -> (version, item JSON)


@dataclass
class Report:
    view: str
    checked: int
    missing: list[tuple[str, str]]
    extra: list[tuple[str, str]]
    stale: list[tuple[str, str]]

    def as_json(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "checked": self.checked,
            "missing": len(self.missing),
            "extra": len(self.extra),
            "stale": len(self.stale),
        }

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.stale)


def _canonical(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


async def _expected(
    cluster: Cluster, view: definition.ViewDef
) -> tuple[Rows, dict[str, Any], dict[str, str]]:
    """The rows the sources make now: per source shard in one snapshot.  Also each row's
    document and the snapshot (position) each shard was read at."""
    topology = cluster.watcher.require_topology()
    key_bytes = cluster.settings.max_key_bytes
    expected: Rows = {}
    docs: dict[str, Any] = {}
    read_at: dict[str, str] = {}
    deadline = time.monotonic() + cluster.settings.view_backfill_timeout

    for shard in topology.shards.values():

        async def work(conn: Any) -> tuple[str, list[definition.Row]]:
            found: list[definition.Row] = []
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                position = await changelog.position(conn)
                async for page in source.row_pages(conn, view, max_key_bytes=key_bytes):
                    found.extend(page)
            return position, found

        (position, found), _ = await cluster.executor.read(
            shard, work, consistency="strong", min_lsn=None, deadline=deadline
        )
        read_at[shard.name] = position
        for row in found:
            key = (row.pk, row.sk)
            expected[key] = (row.source_version, _canonical(row.doc))
            docs[f"{row.pk}\x00{row.sk}"] = row.doc
    return expected, docs, read_at


async def _stored(cluster: Cluster, view: ViewInfo) -> Rows:
    stored: Rows = {}
    after: tuple[str, str] | None = None
    table = view.rows_table
    while True:
        items, _ = await cluster.data.scan(
            table=table, after=after, limit=1000, consistency="strong", token=None
        )
        for item in items:
            doc = orjson.loads(orjson.dumps(item.doc))
            stored[(item.pk, item.sk)] = (int(doc["source"]["version"]), _canonical(doc))
        if len(items) < 1000:
            return stored
        after = (items[-1].pk, items[-1].sk)


def _compare(expected: Rows, stored: Rows) -> tuple[set[Any], set[Any], set[Any]]:
    missing = expected.keys() - stored.keys()
    extra = stored.keys() - expected.keys()
    stale = {k for k in expected.keys() & stored.keys() if expected[k] != stored[k]}
    return set(missing), set(extra), stale


async def _caught_up(cluster: Cluster, view: str, read_at: dict[str, str]) -> None:
    """Wait (bounded) until the view has applied each shard up to ``read_at``; 504
    ``view_behind`` when it does not within ``CATCH_UP_TIMEOUT``."""
    until = time.monotonic() + CATCH_UP_TIMEOUT
    while time.monotonic() < until:
        async with cluster.watcher.catalog_connection() as conn:
            applied = {
                str(p["shard"]): str(p["position"])
                for p in await catalog.view_positions(conn, view=view)
            }
        if all(
            name in applied and changelog.covers(applied[name], position)
            for name, position in read_at.items()
        ):
            return
        await asyncio.sleep(0.1)
    raise errors.ApiError(
        f"view {view} did not apply its sources' changes within {CATCH_UP_TIMEOUT:g} s;"
        " cannot tell lag from differences",
        status=504,
        code="view_behind",
    )


async def verify(cluster: Cluster, view: ViewInfo, *, repair: bool = False) -> Report:
    """Compare the view with its sources (twice, see the module note); with ``repair``,
    write exactly the differences found."""
    expected, docs, read_at = await _expected(cluster, view.definition)
    stored = await _stored(cluster, view)
    first = _compare(expected, stored)
    if any(first):
        await _caught_up(cluster, view.name, read_at)
        expected, docs, read_at = await _expected(cluster, view.definition)
        stored = await _stored(cluster, view)
        second = _compare(expected, stored)
        first = (first[0] & second[0], first[1] & second[1], first[2] & second[2])
    missing, extra, stale = first
    report = Report(view.name, len(expected), sorted(missing), sorted(extra), sorted(stale))
    if repair and not report.clean:
        await _repair(cluster, view, report, expected_docs=docs)
    return report


async def _repair(
    cluster: Cluster, view: ViewInfo, report: Report, *, expected_docs: dict[str, Any]
) -> None:
    """Write the differences: each as the sources make it now, whatever the stored row
    was built from (forced: it may come from an earlier life of a re-created item)."""
    writes: list[ViewRowWrite] = []
    for pk, sk in report.extra:
        if f"{pk}\x00{sk}" not in expected_docs:
            writes.append(ViewRowWrite(pk, sk, None, FAR_VERSION, force=True))
    for pk, sk in [*report.missing, *report.stale]:
        doc = expected_docs.get(f"{pk}\x00{sk}")
        if doc is not None:
            writes.append(ViewRowWrite(pk, sk, doc, int(doc["source"]["version"]), force=True))
    deadline = time.monotonic() + cluster.settings.view_backfill_timeout
    for start in range(0, len(writes), APPLY_CHUNK):
        await cluster.data.apply_view_rows(
            table=view.rows_table, rows=writes[start : start + APPLY_CHUNK], deadline=deadline
        )


async def rebuild(cluster: Cluster, view: ViewInfo) -> Report:
    """Copy every source shard again (the keepers do it, maintenance going on), wait for
    it, then repair what a copy cannot remove."""
    async with cluster.watcher.catalog_connection() as conn:
        async with conn.transaction():
            await conn.execute("DELETE FROM shardd_view_positions WHERE view = $1", view.name)
            await conn.execute("UPDATE shardd_views SET covered = '{}' WHERE name = $1", view.name)
            await catalog.set_view_state(
                conn, view.name, old=catalog.VIEW_ACTIVE, new=catalog.VIEW_BACKFILLING
            )
            await catalog.bump_epoch(conn)
    until = time.monotonic() + cluster.settings.view_backfill_timeout
    while time.monotonic() < until:
        async with cluster.watcher.catalog_connection() as conn:
            state = await conn.fetchval("SELECT state FROM shardd_views WHERE name = $1", view.name)
        if state == catalog.VIEW_ACTIVE:
            break
        await asyncio.sleep(0.2)
    else:
        raise errors.ApiError(
            f"view {view.name} is still being copied", status=504, code="rebuild_incomplete"
        )
    fresh = await cluster.watcher.refresh(force=True)
    return await verify(cluster, find(fresh, None, view.name), repair=True)
