"""Declaring and deleting tables, so that a deletion survives crashes and shard outages.

Deleting a table takes three steps, each safe to repeat:

1. the catalog row is marked ``deleting`` (a new epoch): every instance refuses the
   table's reads and writes (409 ``table_deleting``) and a PUT of the name;
2. on every shard primary the table is fenced (no write may create or change one of its
   items, whatever topology the writer routes with), then its items are deleted in
   batches;
3. the catalog row is dropped and the name recorded as dropped.

A DELETE that stops anywhere (a shard down answers 503, the request runs out of time,
the instance dies) leaves the row ``deleting``; the next DELETE starts again at step 2,
which finds less to do.  Items go before the row, so no item outlives its table.

The fences stay after step 3: an instance that loaded its topology before step 1 may
still send a write for the old table until its lease and its request deadline have run
out.  Declaring the name again lifts them first, and only once they are older than
``topology_lease + request_timeout``; a re-declared table therefore never shows an old
row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from . import catalog, errors, store
from .cluster import Cluster
from .topology import TableInfo

T = TypeVar("T")
DELETE_BATCH = 2000
# Stop starting item batches when less than this is left of the request's deadline.
BATCH_MARGIN = 1.0


async def declare(
    cluster: Cluster, *, name: str, description: str, options: Mapping[str, Any]
) -> tuple[TableInfo, bool]:
    """Create or update a table; True when it was created.

    A name whose earlier table was deleted is declared only after every shard has
    lifted that table's fence (503 while a shard is down, 409 while a fence is young).
    """
    async with cluster.watcher.catalog_connection() as conn:
        dropped = await catalog.table_was_dropped(conn, name)
    if dropped:
        min_age = cluster.settings.topology_lease + cluster.settings.request_timeout
        waits = await cluster.data.on_every_primary(
            lambda conn: store.unfence_table(conn, name, min_age=min_age)
        )
        if max(waits) > 0:
            seconds = math.ceil(max(waits))
            raise errors.TableDeleting(
                f"table {name} was deleted moments ago; it can be declared again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
    async with cluster.watcher.catalog_connection() as conn:
        created = await catalog.put_table(conn, name=name, description=description, **options)
    topology = await cluster.watcher.refresh(force=True)
    return topology.tables[name], created


async def fence_and_empty(cluster: Cluster, table: str, *, still: str) -> None:
    """Step 2 of a deletion: fence the item table ``table`` on every shard primary and
    delete its items in batches, within the request's deadline (503
    ``deletion_incomplete``, saying ``still``, when it runs out: repeat to go on)."""
    deadline = cluster.executor.deadline()
    await cluster.data.on_every_primary(
        lambda conn: store.fence_table(conn, table), deadline=deadline
    )
    while True:
        if time.monotonic() > deadline - BATCH_MARGIN:
            raise errors.ApiError(
                f"{still}; repeat the DELETE to continue",
                status=503,
                code="deletion_incomplete",
                headers={"Retry-After": "1"},
            )
        deleted = await cluster.data.on_every_primary(
            lambda conn: store.delete_table_items(conn, table, batch=DELETE_BATCH),
            deadline=deadline,
        )
        if not any(deleted):
            return


async def delete(cluster: Cluster, name: str, *, force: bool) -> None:
    """Delete a table and its items (see the module note); resumes a stopped deletion."""
    topology = cluster.watcher.require_topology()
    views = [
        v.name
        for v in topology.views.values()
        if v.source == name or name in v.definition.join_tables()
    ]
    if views:
        raise errors.Conflict(
            f"table {name} has views ({', '.join(sorted(views))}); delete them first",
            code="table_has_views",
        )
    if topology.tables[name].state == catalog.TABLE_ACTIVE:
        if not force:
            found = await cluster.data.on_every_primary(
                lambda conn: store.table_has_items(conn, name)
            )
            if any(found):
                raise errors.Conflict(
                    f"table {name} is not empty; use ?force=true", code="table_not_empty"
                )
        async with cluster.watcher.catalog_connection() as conn:
            await catalog.mark_table_deleting(conn, name)
        await cluster.watcher.refresh(force=True)
    await fence_and_empty(cluster, name, still=f"table {name} still has items")
    async with cluster.watcher.catalog_connection() as conn:
        await catalog.drop_table(conn, name)
    await cluster.watcher.refresh(force=True)
