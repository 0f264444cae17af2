"""The catalog database: topology, slot map and its epoch, tables.

Instances read it as one consistent :class:`~shardd.topology.Topology` snapshot.  Every
change goes through :func:`bump_epoch` in the same transaction, which raises the epoch
and notifies ``shardd_topology``; instances LISTEN on that channel and also poll the
epoch, so a lost notification only delays a refresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from . import errors
from .topology import Node, Shard, TableInfo, Topology, ViewInfo
from .views import definition

CHANNEL = "shardd_topology"


def members(dsn: str) -> list[str]:
    """One DSN per host of a multi-host DSN (``postgresql://u@h1:p1,h2:p2/db?...``, as
    for a catalog on Patroni), ``target_session_attrs`` dropped; [dsn] for one host."""
    parts = urlsplit(dsn)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return [dsn]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "target_session_attrs"])
    prefix = f"{userinfo}@" if userinfo else ""
    return [
        urlunsplit(parts._replace(netloc=prefix + host, query=query)) for host in hosts.split(",")
    ]


async def connect(dsn: str, *, connect_seconds: float, **options: Any) -> asyncpg.Connection:
    """A connection to the catalog: with several hosts, to the one that takes writes.

    The hosts are tried at once rather than in turn (asyncpg's way), so a member that
    hangs (SIGSTOP, a dead machine that drops packets) costs nothing while the primary
    answers; a member that is in recovery, or that refuses, is passed over."""
    dsns = members(dsn)
    if len(dsns) == 1:
        return await asyncpg.connect(dsn, timeout=connect_seconds, **options)

    async def writable(one: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(one, timeout=connect_seconds, **options)
        try:
            if await conn.fetchval("SELECT pg_is_in_recovery()", timeout=connect_seconds):
                raise ConnectionError(f"{urlsplit(one).netloc} is in recovery")
        except BaseException:
            conn.terminate()
            raise
        return conn

    tasks = [asyncio.ensure_future(writable(one)) for one in dsns]
    failures: list[BaseException] = []
    chosen: asyncpg.Connection | None = None
    try:
        for next_done in asyncio.as_completed(tasks, timeout=connect_seconds):
            try:
                chosen = await next_done
            except Exception as exc:  # one member's failure (or the deadline), not the race's
                failures.append(exc)
                continue
            return chosen
        raise ConnectionError(f"no catalog member takes writes: {failures}")
    finally:
        # Without awaiting (a cancelled caller must not leak): the others' connections are
        # dropped now, or when they arrive.
        for task in tasks:
            if task.done():
                _drop_unless(task, chosen)
            else:
                task.cancel()
                task.add_done_callback(lambda late: _drop_unless(late, None))


def _drop_unless(task: asyncio.Future[asyncpg.Connection], keep: object) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    conn = task.result()
    if conn is not keep:
        conn.terminate()


async def load_topology(conn: asyncpg.Connection) -> Topology:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cluster = await conn.fetchrow("SELECT epoch, slot_count FROM shardd_cluster")
        if cluster is None:
            raise LookupError("the catalog has no cluster; run `shardctl init`")
        shard_rows = await conn.fetch(
            "SELECT name, weight, term, write_block, degraded, failover_mode FROM shardd_shards"
            " ORDER BY name"
        )
        node_rows = await conn.fetch(
            "SELECT name, shard, role, host, port, dbname, username, password, fenced, zone,"
            " patroni_url FROM shardd_nodes ORDER BY shard, role, name"
        )
        slot_rows = await conn.fetch("SELECT slot, shard FROM shardd_slot_map")
        table_rows = await conn.fetch(
            "SELECT name, description, state, created_at, updated_at, cache, cache_ttl, max_age"
            " FROM shardd_tables"
        )
        view_rows = await conn.fetch(
            "SELECT name, source, definition::text, description, state, created_at, generation"
            " FROM shardd_views"
        )
    nodes: dict[str, list[Node]] = {}
    for row in node_rows:
        nodes.setdefault(row["shard"], []).append(Node(**dict(row)))
    shards = {
        row["name"]: Shard(
            row["name"],
            row["weight"],
            tuple(nodes.get(row["name"], ())),
            term=row["term"],
            write_block=row["write_block"],
            degraded=row["degraded"],
            failover_mode=row["failover_mode"],
        )
        for row in shard_rows
    }
    slot_map: list[str | None] = [None] * cluster["slot_count"]
    for row in slot_rows:
        slot_map[row["slot"]] = row["shard"]
    tables = {
        row["name"]: TableInfo(
            row["name"],
            row["description"],
            row["created_at"].isoformat(),
            row["updated_at"].isoformat(),
            row["state"],
            row["cache"],
            row["cache_ttl"],
            row["max_age"],
        )
        for row in table_rows
    }
    views = {
        row["name"]: ViewInfo(
            definition.from_json(row["name"], row["source"], orjson.loads(row["definition"])),
            row["description"],
            row["state"],
            row["created_at"].isoformat(),
            row["generation"],
        )
        for row in view_rows
    }
    return Topology(
        epoch=cluster["epoch"],
        slot_count=cluster["slot_count"],
        shards=shards,
        slot_map=tuple(slot_map),
        tables=tables,
        views=views,
    )


async def current_epoch(conn: asyncpg.Connection) -> int:
    epoch: int = await conn.fetchval("SELECT epoch FROM shardd_cluster")
    return epoch


async def pool_connect(dsn: str, **options: Any) -> asyncpg.Connection:
    """:func:`connect` for ``asyncpg.create_pool(connect=...)``."""
    options.pop("loop", None)
    return await connect(dsn, connect_seconds=options.pop("timeout", 5.0), **options)


async def bump_epoch(conn: asyncpg.Connection) -> int:
    """Raise the epoch and notify instances; call inside the changing transaction."""
    epoch: int = await conn.fetchval("UPDATE shardd_cluster SET epoch = epoch + 1 RETURNING epoch")
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(epoch))
    return epoch


async def create_cluster(conn: asyncpg.Connection, *, slot_count: int) -> bool:
    """Create the cluster row; False when it already exists (slot count is then fixed)."""
    status = await conn.execute(
        "INSERT INTO shardd_cluster (slot_count) VALUES ($1) ON CONFLICT (id) DO NOTHING",
        slot_count,
    )
    return bool(status.endswith("1"))


async def add_shard(
    conn: asyncpg.Connection,
    *,
    name: str,
    weight: int,
    nodes: Sequence[Node],
    failover_mode: str = "builtin",
) -> int:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO shardd_shards (name, weight, failover_mode) VALUES ($1, $2, $3)",
            name,
            weight,
            failover_mode,
        )
        for node in nodes:
            await conn.execute(
                "INSERT INTO shardd_nodes (name, shard, role, host, port, dbname, username,"
                " password, zone, patroni_url) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                node.name,
                name,
                node.role,
                node.host,
                node.port,
                node.dbname,
                node.username,
                node.password,
                node.zone,
                node.patroni_url,
            )
        return await bump_epoch(conn)


async def set_zone(conn: asyncpg.Connection, node: str, zone: str) -> int:
    """Label ``node`` with ``zone`` ('' for none); returns the new epoch."""
    async with conn.transaction():
        status = await conn.execute("UPDATE shardd_nodes SET zone = $2 WHERE name = $1", node, zone)
        if status.endswith(" 0"):
            raise LookupError(f"no node {node!r}")
        return await bump_epoch(conn)


async def set_slot_map(conn: asyncpg.Connection, assignment: dict[int, str]) -> int:
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO shardd_slot_map (slot, shard) VALUES ($1, $2)"
            " ON CONFLICT (slot) DO UPDATE SET shard = excluded.shard",
            list(assignment.items()),
        )
        return await bump_epoch(conn)


async def pinned_slots(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("SELECT slot, shard FROM shardd_slot_overrides")
    return {row["slot"]: row["shard"] for row in rows}


async def pin_slots(conn: asyncpg.Connection, pins: dict[int, str]) -> None:
    await conn.executemany(
        "INSERT INTO shardd_slot_overrides (slot, shard) VALUES ($1, $2)"
        " ON CONFLICT (slot) DO UPDATE SET shard = excluded.shard",
        list(pins.items()),
    )


TABLE_ACTIVE = "active"
TABLE_DELETING = "deleting"


async def put_table(
    conn: asyncpg.Connection,
    *,
    name: str,
    description: str,
    cache: str = "hot",
    cache_ttl: float = 1.0,
    max_age: int = 0,
) -> bool:
    """Create or update a table declaration; True when it was created.

    Refused (409) while the table is being deleted.  Creating forgets that the name was
    dropped: the caller has lifted the old table's fences on the shards first.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO shardd_tables AS t (name, description, cache, cache_ttl, max_age)"
            " VALUES ($1, $2, $4, $5, $6)"
            " ON CONFLICT (name) DO UPDATE SET description = excluded.description,"
            " cache = excluded.cache, cache_ttl = excluded.cache_ttl,"
            " max_age = excluded.max_age, updated_at = now()"
            " WHERE t.state = $3 RETURNING (xmax = 0) AS created",
            name,
            description,
            TABLE_ACTIVE,
            cache,
            cache_ttl,
            max_age,
        )
        if row is None:
            raise errors.TableDeleting(f"table {name} is being deleted")
        await conn.execute("DELETE FROM shardd_dropped_tables WHERE name = $1", name)
        await bump_epoch(conn)
    return bool(row["created"])


async def table_was_dropped(conn: asyncpg.Connection, name: str) -> bool:
    """Was a table of this name deleted (its fences may still stand on the shards)?"""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM shardd_dropped_tables WHERE name = $1)", name
        )
    )


async def mark_table_deleting(conn: asyncpg.Connection, name: str) -> None:
    """First step of a deletion: instances refuse the table once they see the epoch."""
    async with conn.transaction():
        status = await conn.execute(
            "UPDATE shardd_tables SET state = $2, updated_at = now()"
            " WHERE name = $1 AND state <> $2",
            name,
            TABLE_DELETING,
        )
        if not status.endswith(" 0"):
            await bump_epoch(conn)


async def drop_table(conn: asyncpg.Connection, name: str) -> bool:
    """Last step of a deletion (its items are gone): drop the row, remember the name."""
    async with conn.transaction():
        status = await conn.execute(
            "DELETE FROM shardd_tables WHERE name = $1 AND state = $2", name, TABLE_DELETING
        )
        if status.endswith(" 0"):
            return False
        await conn.execute(
            "INSERT INTO shardd_dropped_tables (name) VALUES ($1)"
            " ON CONFLICT (name) DO UPDATE SET dropped_at = now()",
            name,
        )
        await bump_epoch(conn)
    return True


# -- views ------------------------------------------------------------------------

VIEW_BACKFILLING = "backfilling"
VIEW_ACTIVE = "active"
VIEW_DELETING = "deleting"


async def put_view(conn: asyncpg.Connection, view: definition.ViewDef, *, description: str) -> bool:
    """Declare a view; True when it was created, False when the same one exists.

    409 when a view of that name exists with another source or definition, or is being
    deleted, and while its source table is being deleted.
    """
    spec = view.as_json()
    async with conn.transaction():
        source_state = await conn.fetchval(
            "SELECT state FROM shardd_tables WHERE name = $1 FOR SHARE", view.source
        )
        if source_state != TABLE_ACTIVE:
            raise errors.TableDeleting(f"table {view.source} is being deleted")
        row = await conn.fetchrow(
            "SELECT source, definition::text, state FROM shardd_views WHERE name = $1 FOR UPDATE",
            view.name,
        )
        if row is not None:
            if row["state"] == VIEW_DELETING:
                raise errors.Conflict(f"view {view.name} is being deleted", code="view_deleting")
            if row["source"] != view.source or orjson.loads(row["definition"]) != spec:
                raise errors.Conflict(
                    f"view {view.name} exists with another definition; delete it first",
                    code="view_exists",
                )
            if description:
                await conn.execute(
                    "UPDATE shardd_views SET description = $2, updated_at = now() WHERE name = $1",
                    view.name,
                    description,
                )
                await bump_epoch(conn)
            return False
        await conn.execute(
            "INSERT INTO shardd_views (name, source, definition, description)"
            " VALUES ($1, $2, $3::jsonb, $4)",
            view.name,
            view.source,
            orjson.dumps(spec).decode(),
            description,
        )
        await bump_epoch(conn)
    return True


async def mark_view_deleting(conn: asyncpg.Connection, name: str) -> None:
    async with conn.transaction():
        status = await conn.execute(
            "UPDATE shardd_views SET state = $2, updated_at = now()"
            " WHERE name = $1 AND state <> $2",
            name,
            VIEW_DELETING,
        )
        if not status.endswith(" 0"):
            await bump_epoch(conn)


async def drop_view(conn: asyncpg.Connection, name: str) -> None:
    async with conn.transaction():
        status = await conn.execute(
            "DELETE FROM shardd_views WHERE name = $1 AND state = $2", name, VIEW_DELETING
        )
        if not status.endswith(" 0"):
            await bump_epoch(conn)


async def view_positions(
    conn: asyncpg.Connection, *, view: str | None = None
) -> list[dict[str, object]]:
    """Each (view, source shard) position with its lag in seconds (the age of the
    snapshot it has applied up to)."""
    rows = await conn.fetch(
        "SELECT view, shard, position, origin, replaced, last_batch, applied, taken_at,"
        " extract(epoch FROM now() - taken_at)::float8 AS lag_seconds"
        " FROM shardd_view_positions WHERE $1::text IS NULL OR view = $1 ORDER BY view, shard",
        view,
    )
    return [dict(row) for row in rows]


async def source_lags(conn: asyncpg.Connection) -> dict[str, float]:
    """Per source table, the largest lag of its views' followed shards, in seconds."""
    rows = await conn.fetch(
        "SELECT v.source, max(extract(epoch FROM now() - p.taken_at))::float8 AS lag"
        " FROM shardd_views v JOIN shardd_view_positions p ON p.view = v.name"
        " WHERE v.state = $1 GROUP BY v.source",
        VIEW_ACTIVE,
    )
    return {row["source"]: row["lag"] for row in rows}


async def set_view_state(conn: asyncpg.Connection, name: str, *, old: str, new: str) -> bool:
    status = await conn.execute(
        "UPDATE shardd_views SET state = $3, updated_at = now() WHERE name = $1 AND state = $2",
        name,
        old,
        new,
    )
    return not status.endswith(" 0")


# -- failover ---------------------------------------------------------------------


async def is_synchronous(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT synchronous FROM shardd_cluster"))


async def set_synchronous(conn: asyncpg.Connection, synchronous: bool) -> None:
    await conn.execute("UPDATE shardd_cluster SET synchronous = $1", synchronous)


async def fence_node(conn: asyncpg.Connection, name: str) -> int:
    """Mark a node fenced: no instance routes anything to it once it has this epoch."""
    async with conn.transaction():
        await conn.execute("UPDATE shardd_nodes SET fenced = true WHERE name = $1", name)
        return await bump_epoch(conn)


async def record_promotion(
    conn: asyncpg.Connection,
    *,
    shard: str,
    old_primary: str,
    new_primary: str,
    kind: str,
    lost_bytes: int | None,
    detected_at: datetime,
    lost_exact: bool = True,
    promoted_lsn: int | None = None,
) -> int:
    """The promoted replica becomes the shard's primary; the old one stays fenced; the
    shard's term grows by one (moves compare it, see shardd/reshard/mover.py)."""
    async with conn.transaction():
        await conn.execute("UPDATE shardd_nodes SET fenced = true WHERE name = $1", old_primary)
        await conn.execute(
            "UPDATE shardd_nodes SET role = 'primary', fenced = false WHERE name = $1",
            new_primary,
        )
        await conn.execute(
            "UPDATE shardd_shards SET term = term + 1, write_block = NULL, primary_lsn = NULL,"
            " primary_lsn_at = NULL WHERE name = $1",
            shard,
        )
        await conn.execute(
            "INSERT INTO shardd_failovers (shard, kind, old_primary, new_primary, lost_bytes,"
            " lost_exact, promoted_lsn, detected_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            shard,
            kind,
            old_primary,
            new_primary,
            lost_bytes,
            lost_exact,
            promoted_lsn,
            detected_at,
        )
        return await bump_epoch(conn)


async def note_primary_positions(
    conn: asyncpg.Connection, positions: dict[tuple[str, str], int]
) -> None:
    """Record each shard's primary's WAL position, (shard, node) -> LSN, as the monitor
    last saw it; a position of a node that is no longer the primary is ignored."""
    await conn.execute(
        "UPDATE shardd_shards s SET primary_lsn = p.lsn, primary_lsn_at = now()"
        " FROM unnest($1::text[], $2::text[], $3::pg_lsn[]) AS p(shard, node, lsn)"
        " JOIN shardd_nodes n ON n.name = p.node AND n.role = 'primary' AND NOT n.fenced"
        " WHERE s.name = p.shard AND n.shard = p.shard",
        [shard for shard, _ in positions],
        [node for _, node in positions],
        list(positions.values()),
    )


async def primary_position(conn: asyncpg.Connection, shard: str) -> int | None:
    """The shard's primary's last WAL position the monitor recorded, if any."""
    lsn: int | None = await conn.fetchval(
        "SELECT primary_lsn FROM shardd_shards WHERE name = $1", shard
    )
    return lsn


async def record_exact_loss(conn: asyncpg.Connection, *, old_primary: str, end_lsn: int) -> None:
    """The old primary answered again: its end of WAL makes the last promotion's loss
    exact (WAL it had beyond the promoted node's position at promotion)."""
    await conn.execute(
        "UPDATE shardd_failovers SET lost_bytes = greatest(0, $2::pg_lsn - promoted_lsn)::bigint,"
        " lost_exact = true WHERE id = (SELECT max(id) FROM shardd_failovers"
        " WHERE old_primary = $1) AND NOT lost_exact AND promoted_lsn IS NOT NULL",
        old_primary,
        end_lsn,
    )


async def set_write_block(conn: asyncpg.Connection, shard: str, reason: str | None) -> bool:
    """Record why writes to ``shard`` are refused at once (None: they are not); True
    when that changed (and instances were told, with a new epoch)."""
    async with conn.transaction():
        status = await conn.execute(
            "UPDATE shardd_shards SET write_block = $2 WHERE name = $1"
            " AND write_block IS DISTINCT FROM $2",
            shard,
            reason,
        )
        if status.endswith(" 0"):
            return False
        await bump_epoch(conn)
    return True


async def set_degraded(conn: asyncpg.Connection, shard: str, degraded: bool) -> bool:
    """Record that ``shard`` runs asynchronously (degrade mode); True when it changed."""
    async with conn.transaction():
        status = await conn.execute(
            "UPDATE shardd_shards SET degraded = $2 WHERE name = $1 AND degraded <> $2",
            shard,
            degraded,
        )
        if status.endswith(" 0"):
            return False
        await bump_epoch(conn)
    return True


async def synchronous_mode(conn: asyncpg.Connection) -> str:
    """'degrade' or 'strict' (meaningful when the cluster is synchronous)."""
    return str(await conn.fetchval("SELECT synchronous_mode FROM shardd_cluster"))


async def set_synchronous_mode(conn: asyncpg.Connection, mode: str) -> None:
    await conn.execute("UPDATE shardd_cluster SET synchronous_mode = $1", mode)


async def record_rejoin(conn: asyncpg.Connection, name: str) -> int:
    async with conn.transaction():
        await conn.execute(
            "UPDATE shardd_nodes SET role = 'replica', fenced = false WHERE name = $1", name
        )
        return await bump_epoch(conn)


async def failovers(conn: asyncpg.Connection, *, limit: int = 20) -> list[dict[str, object]]:
    rows = await conn.fetch(
        "SELECT shard, kind, old_primary, new_primary, lost_bytes, lost_exact, detected_at,"
        " promoted_at"
        " FROM shardd_failovers ORDER BY id DESC LIMIT $1",
        limit,
    )
    return [dict(row) for row in rows]


# -- live instances -----------------------------------------------------------------


async def report_instance(
    conn: asyncpg.Connection, *, instance: str, address: str, epoch: int
) -> None:
    await conn.execute(
        "INSERT INTO shardd_instances (id, address, epoch) VALUES ($1, $2, $3)"
        " ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, seen_at = now()",
        instance,
        address,
        epoch,
    )


async def forget_instance(conn: asyncpg.Connection, instance: str) -> None:
    await conn.execute("DELETE FROM shardd_instances WHERE id = $1", instance)


async def instances_behind(conn: asyncpg.Connection, *, epoch: int, lease: float) -> list[str]:
    """Instances seen within ``lease`` seconds that still route with an older epoch."""
    rows = await conn.fetch(
        "SELECT id FROM shardd_instances WHERE epoch < $1"
        " AND seen_at > now() - make_interval(secs => $2)",
        epoch,
        lease,
    )
    return [row["id"] for row in rows]


async def live_instances(conn: asyncpg.Connection, *, lease: float) -> list[dict[str, object]]:
    rows = await conn.fetch(
        "SELECT id, address, epoch, started_at, seen_at FROM shardd_instances"
        " WHERE seen_at > now() - make_interval(secs => $1) ORDER BY started_at",
        lease,
    )
    return [dict(row) for row in rows]


async def wait_for_instances(
    conn: asyncpg.Connection, *, epoch: int, lease: float, since: float
) -> list[str]:
    """Wait until every live instance routes with ``epoch``, at most ``lease`` from ``since``.

    An instance that has not reported by then cannot write any more: it has been unable
    to confirm its topology for a whole lease.  Returns the instances that never
    reported (for the log).
    """
    while True:
        behind = await instances_behind(conn, epoch=epoch, lease=lease)
        if not behind or time.monotonic() - since >= lease:
            return behind
        await asyncio.sleep(0.02)


async def set_weight(conn: asyncpg.Connection, shard: str, weight: int) -> int:
    async with conn.transaction():
        status = await conn.execute(
            "UPDATE shardd_shards SET weight = $2 WHERE name = $1", shard, weight
        )
        if status.endswith(" 0"):
            raise LookupError(f"no shard {shard}")
        return await bump_epoch(conn)


async def remove_shard(conn: asyncpg.Connection, shard: str) -> int:
    """Unregister a shard that owns no slot any more (its nodes go with it)."""
    async with conn.transaction():
        owned = await conn.fetchval("SELECT count(*) FROM shardd_slot_map WHERE shard = $1", shard)
        if owned:
            raise ValueError(f"shard {shard} still owns {owned} slots; move them first")
        await conn.execute("DELETE FROM shardd_shards WHERE name = $1", shard)
        return await bump_epoch(conn)
