"""Rejoin: turn a fenced former primary back into a replica of its shard."""

from __future__ import annotations

import asyncio
import logging
import time

from .. import admin, catalog, pgctl
from ..topology import Node
from .actions import FailoverError, connect, set_sync_standbys, slot_name
from .steps import shard_lock

log = logging.getLogger(__name__)


async def rejoin(
    catalog_dsn: str,
    node_name: str,
    *,
    datadir: str,
    logfile: str | None = None,
    wait_seconds: float = 120.0,
) -> int:
    """Turn a fenced former primary into a replica of its shard's primary.

    Runs on the node's host: the node is stopped, its data directory replaced by a
    fresh base backup of the current primary (keeping the node's own configuration
    files), started as a standby, and recorded as a replica once it streams.  Until that
    record the node stays fenced, so a failure midway leaves nothing routed to it.
    """
    nodes = (await admin.topology(catalog_dsn)).nodes()
    node = next((n for n in nodes if n.name == node_name), None)
    if node is None:
        raise FailoverError(f"no node {node_name}")
    async with shard_lock(catalog_dsn, node.shard) as conn:
        topo = await catalog.load_topology(conn)
        shard = topo.shards[node.shard]
        if shard.failover_mode == "patroni":
            raise FailoverError(
                f"Patroni rejoins {node_name} (pg_rewind or a new copy); the monitor records it"
                " as a replica once it streams from the primary"
            )
        node = next(n for n in shard.nodes if n.name == node_name)
        primary = shard.primary
        if primary is None:
            raise FailoverError(f"shard {shard.name} has no primary to follow")
        if primary.name == node.name:
            raise FailoverError(f"{node.name} is the primary of {shard.name}")
        async with connect(primary) as pconn:
            await pconn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = $1 AND NOT active",
                slot_name(node),
            )
        await asyncio.to_thread(
            pgctl.rebuild_standby,
            datadir,
            source_host=primary.host,
            source_port=primary.port,
            user=primary.username,
            slot=slot_name(node),
            application_name=node.name,
            logfile=logfile,
        )
        await _wait_streaming(node, wait_seconds=wait_seconds)
        epoch = await catalog.record_rejoin(conn, node.name)
        if await catalog.is_synchronous(conn):
            await set_sync_standbys(primary, synchronous=True)
            await catalog.set_degraded(conn, shard.name, False)
        log.info("%s rejoined shard %s as a replica of %s", node.name, shard.name, primary.name)
        return epoch


async def _wait_streaming(node: Node, *, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with connect(node, connect_seconds=2.0) as conn:
                status = await conn.fetchval("SELECT status FROM pg_stat_wal_receiver")
                if status == "streaming":
                    return
        except Exception as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise FailoverError(f"{node.name} is not streaming after {wait_seconds:.0f}s ({last})")
