"""Operator actions that span the catalog and the shards (used by shardctl and devcluster).

Each function opens its own connections from DSNs, so it runs without a shardd server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from . import catalog, migrate, placement, store
from .nodes import NodePools, check_node, describe, with_lag
from .topology import Node, Topology


def node_from_dsn(dsn: str, *, name: str, shard: str, role: str, zone: str = "") -> Node:
    """A Node from ``postgresql://user[:password]@host[:port]/dbname``."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
        raise ValueError(f"not a postgresql:// DSN with a host: {dsn!r}")
    return Node(
        name=name,
        shard=shard,
        role=role,
        host=parts.hostname,
        port=parts.port or 5432,
        dbname=unquote(parts.path.lstrip("/")) or "postgres",
        username=unquote(parts.username or "postgres"),
        password=unquote(parts.password) if parts.password else None,
        zone=zone,
    )


@contextlib.asynccontextmanager
async def connect(
    dsn: str, *, connect_seconds: float = 5.0, command_timeout: float | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """One connection for an operator action; closing a broken one is not an error.

    ``command_timeout`` bounds each statement (None: unbounded, for copies and
    migrations whose length depends on the data)."""
    conn = await catalog.connect(
        dsn, connect_seconds=connect_seconds, command_timeout=command_timeout
    )
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)


async def topology(catalog_dsn: str) -> Topology:
    async with connect(catalog_dsn) as conn:
        return await catalog.load_topology(conn)


async def migrate_all(
    catalog_dsn: str, *, slot_count: int, synchronous: bool | None = None
) -> dict[str, list[int]]:
    """Apply migrations to the catalog and every shard primary; create the cluster row.

    ``synchronous`` records whether shards replicate synchronously (None: unchanged).
    """
    applied: dict[str, list[int]] = {}
    async with connect(catalog_dsn) as conn:
        applied["catalog"] = await migrate.apply(conn, "catalog")
        await catalog.create_cluster(conn, slot_count=slot_count)
        if synchronous is not None:
            await catalog.set_synchronous(conn, synchronous)
        topo = await catalog.load_topology(conn)
    for shard in topo.shards.values():
        if shard.primary is not None:
            async with connect(shard.primary.dsn()) as conn:
                applied[shard.name] = await migrate.apply(conn, "shard")
    return applied


async def add_shard(
    catalog_dsn: str,
    *,
    name: str,
    primary_dsn: str,
    replica_dsns: Sequence[str] = (),
    weight: int = 1,
    zones: Sequence[str] = (),
    patroni_urls: Sequence[str] = (),
) -> int:
    """Register a shard (migrating its primary first); it owns no slot until a rebalance.
    ``zones``: the primary's zone, then each replica's (missing: none).  ``patroni_urls``:
    each node's Patroni REST API, in the same order, for a shard whose primary Patroni
    chooses (``failover_mode = 'patroni'``, see :mod:`shardd.failover.patroni`)."""
    dsns = [primary_dsn, *replica_dsns]
    if len(zones) > len(dsns):
        raise ValueError(f"{len(zones)} zones for {len(dsns)} nodes")
    if patroni_urls and len(patroni_urls) != len(dsns):
        raise ValueError(f"{len(patroni_urls)} Patroni URLs for {len(dsns)} nodes: give one each")
    labels = [*zones, *[""] * (len(dsns) - len(zones))]
    names = [f"{name}-primary", *(f"{name}-replica{i}" for i in range(1, len(dsns)))]
    nodes = [
        dataclasses.replace(
            node_from_dsn(
                dsn, name=node, shard=name, role="replica" if i else "primary", zone=zone
            ),
            patroni_url=patroni_urls[i].rstrip("/") if patroni_urls else None,
        )
        for i, (dsn, node, zone) in enumerate(zip(dsns, names, labels, strict=True))
    ]
    async with connect(nodes[0].dsn()) as conn:
        await migrate.apply(conn, "shard")
    async with connect(catalog_dsn) as conn:
        return await catalog.add_shard(
            conn,
            name=name,
            weight=weight,
            nodes=nodes,
            failover_mode="patroni" if patroni_urls else "builtin",
        )


async def init_slots(catalog_dsn: str) -> dict[str, int]:
    """Give every slot of a new cluster to the registered shards (balanced ring).

    Safe to repeat: a cluster whose slots are already assigned is left alone.  Each
    shard learns the slots it owns before the catalog publishes the map, so no router
    can send a write to a shard that would refuse it for lack of an ownership row.
    """
    async with connect(catalog_dsn) as conn:
        topo = await catalog.load_topology(conn)
        if any(owner is not None for owner in topo.slot_map):
            return topo.slot_counts()
        if not topo.shards:
            raise ValueError("register shards first (shardctl shard add)")
        weights = {name: shard.weight for name, shard in topo.shards.items()}
        pinned = await catalog.pinned_slots(conn)
        target = placement.balance(topo.slot_map, weights, pinned=pinned)
        for name, shard in topo.shards.items():
            if shard.primary is None:
                raise ValueError(f"shard {name} has no primary")
            async with connect(shard.primary.dsn()) as shard_conn:
                await shard_conn.executemany(
                    "INSERT INTO shardd_slots (slot, state) VALUES ($1, 'owned')"
                    " ON CONFLICT (slot) DO UPDATE SET state = 'owned', changed_at = now()",
                    [(slot,) for slot, owner in enumerate(target) if owner == name],
                )
        await catalog.set_slot_map(conn, dict(enumerate(target)))
        return (await catalog.load_topology(conn)).slot_counts()


async def status(catalog_dsn: str) -> dict[str, Any]:
    """Shards, slots, items and node health, as ``shardctl status --json`` prints it."""
    async with connect(catalog_dsn) as conn:
        topo = await catalog.load_topology(conn)
        synchronous = await catalog.is_synchronous(conn)
        synchronous_mode = await catalog.synchronous_mode(conn)
        monitor = await conn.fetchval("SELECT holder FROM shardd_leases WHERE name = 'monitor'")
        instances = await catalog.live_instances(conn, lease=60.0)
        history = await catalog.failovers(conn, limit=10)
    pools = NodePools(pool_size=1, connect_timeout=2.0)
    try:
        nodes = topo.nodes()
        raw = await asyncio.gather(*(check_node(pools, node, 3.0) for node in nodes))
        health = with_lag(topo, dict(zip((n.name for n in nodes), raw, strict=True)))

        async def count(node: Node | None) -> int | None:
            if node is None or not (h := health.get(node.name)) or not h.healthy:
                return None
            async with pools.connection(node) as conn:
                return await store.item_count(conn)

        counts = await asyncio.gather(*(count(s.primary) for s in topo.shards.values()))
    finally:
        await pools.close()
    slots = topo.slot_counts()
    shards = []
    for shard, items in zip(topo.shards.values(), counts, strict=True):
        shard_nodes = [describe(node, health) for node in shard.nodes]
        shards.append(
            {
                "name": shard.name,
                "weight": shard.weight,
                "term": shard.term,
                "write_block": shard.write_block,
                "degraded": shard.degraded,
                "failover_mode": shard.failover_mode,
                "slots": slots.get(shard.name, 0),
                "items": items,
                "nodes": shard_nodes,
            }
        )
    return {
        "epoch": topo.epoch,
        "slot_count": topo.slot_count,
        "synchronous": synchronous,
        "synchronous_mode": synchronous_mode,
        "monitor": monitor,
        "instances": instances,
        "shards": shards,
        "failovers": history,
    }
