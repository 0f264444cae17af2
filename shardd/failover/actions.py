"""What failover does to nodes: read positions, fence, promote, repoint, set the commit
mode.  Every call has its own connection and a bounded wait."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import asyncpg

from .. import admin, fencing
from ..topology import Node
from .decisions import Candidate

log = logging.getLogger(__name__)

SYNC_STANDBYS = "ANY 1 (*)"


class FailoverError(Exception):
    """A failover or switchover could not be carried out (nothing was promoted)."""


def connect(
    node: Node, *, connect_seconds: float = 3.0
) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
    """A node connection for a failover step; every statement is bounded (pg_promote
    passes a longer timeout of its own)."""
    return admin.connect(node.dsn(), connect_seconds=connect_seconds, command_timeout=30.0)


async def _position(node: Node) -> Candidate | None:
    try:
        async with asyncio.timeout(5), connect(node, connect_seconds=2.0) as conn:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS rec, pg_last_wal_receive_lsn() AS received,"
                " pg_last_wal_replay_lsn() AS replayed,"
                " CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn() END AS current"
            )
    except Exception as exc:  # an unreachable replica is no candidate
        log.warning("failover: cannot read the position of %s: %s", node.name, exc)
        return None
    if not row["rec"]:
        return Candidate(node.name, int(row["current"]), promoted=True)
    positions = [int(p) for p in (row["received"], row["replayed"]) if p is not None]
    return Candidate(node.name, max(positions) if positions else None)


async def answers(node: Node) -> bool:
    try:
        async with asyncio.timeout(2), connect(node, connect_seconds=1.0) as conn:
            await conn.fetchval("SELECT 1", timeout=1.0)
        return True
    except Exception:
        return False


async def positions(nodes: Sequence[Node]) -> list[Candidate]:
    found = await asyncio.gather(*(_position(node) for node in nodes))
    return [c for c in found if c is not None]


async def fence_on_node(node: Node, reason: str) -> int | None:
    """Make a former primary refuse every write; returns its end of WAL as it answered
    (before the fence), or None if it is unreachable.

    The end of WAL is what makes the loss of an asynchronous promotion exact: WAL the
    old primary had beyond the promoted node's position (see shardd.catalog).
    """
    try:
        async with asyncio.timeout(5), connect(node, connect_seconds=2.0) as conn:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS rec,"
                " CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn() END AS lsn"
            )
            if row["rec"]:
                return None
            await fencing.fence_node(conn, reason, wait_for_writes=False)
            return int(row["lsn"])
    except Exception as exc:
        log.warning("cannot fence %s on the node: %s", node.name, exc)
        return None


async def promote(node: Node, *, wait_seconds: float) -> int:
    """Promote a replica (a no-op when it already is out of recovery) and unfence it;
    returns its WAL position at promotion (where its new timeline forks).

    The replica may have replayed the old primary's fence row (a planned switchover
    writes it before promoting), so the new primary clears it; nothing routes writes to
    the node until the catalog records it as primary, after this.
    """
    async with connect(node, connect_seconds=5.0) as conn:
        fork = int(
            await conn.fetchval(
                "SELECT CASE WHEN pg_is_in_recovery() THEN greatest(pg_last_wal_receive_lsn(),"
                " pg_last_wal_replay_lsn()) ELSE pg_current_wal_lsn() END"
            )
        )
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            promoted = await conn.fetchval(
                "SELECT pg_promote(true, $1)", max(1, int(wait_seconds)), timeout=wait_seconds + 5
            )
            if not promoted:
                raise FailoverError(f"{node.name} did not finish promotion in {wait_seconds:.0f}s")
        await fencing.unfence_node(conn, "promoted")
        return fork


def _conninfo(primary: Node, application_name: str) -> str:
    parts = {
        "host": primary.host,
        "port": str(primary.port),
        "user": primary.username,
        "application_name": application_name,
    }
    if primary.password is not None:
        parts["password"] = primary.password
    return " ".join(f"{k}='{v.replace(chr(39), chr(92) + chr(39))}'" for k, v in parts.items())


def slot_name(node: Node) -> str:
    """The node's replication slot on its primary (a replication_slot, not a hash slot)."""
    return "".join(ch if ch.isalnum() else "_" for ch in node.name.lower())


async def repoint(replica: Node, primary: Node) -> bool:
    """Make a replica stream from a new primary (through a replication slot there);
    False on failure.

    Safe because the replica had at most as much WAL as the promoted node (which was
    chosen for having the most), so it can follow the new timeline from the fork point.
    """
    try:
        async with asyncio.timeout(10):
            async with connect(primary) as conn:
                await conn.execute(
                    "SELECT pg_create_physical_replication_slot($1) WHERE NOT EXISTS"
                    " (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                    slot_name(replica),
                )
            async with connect(replica) as conn:
                conninfo = _conninfo(primary, replica.name)
                await conn.execute(f"ALTER SYSTEM SET primary_conninfo = {_literal(conninfo)}")
                await conn.execute(
                    f"ALTER SYSTEM SET primary_slot_name = {_literal(slot_name(replica))}"
                )
                await conn.execute("SELECT pg_reload_conf()")
        return True
    except Exception as exc:
        log.warning("cannot repoint %s at %s: %s", replica.name, primary.name, exc)
        return False


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def set_sync_standbys(primary: Node, *, synchronous: bool) -> None:
    """Make commits on ``primary`` wait for one standby (``ANY 1 (*)``), or not.

    Setting it to asynchronous also releases commits already waiting for a standby.
    """
    value = SYNC_STANDBYS if synchronous else ""
    async with asyncio.timeout(10), connect(primary) as conn:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {_literal(value)}")
        await conn.execute("SELECT pg_reload_conf()")
