"""Fencing: slot states, the node fence, and every advisory-lock key shardd uses.

This is the only module that changes a slot's state or a node's fence; it does so
through the shard's SQL functions (``migrations/shard/0004_fencing.sql``), each of
which first checks, in the same transaction, that it runs on an unfenced primary
(``shardd_assert_primary``, SQLSTATE SD002 otherwise).  A control-plane step that was
planned against one primary therefore cannot take effect on a node that has since been
fenced or turned into a replica, whatever the step's caller believes.

Lock keys.  On a shard: class :data:`SLOT_LOCK_CLASS`; key = slot for a slot (writes
shared, a freeze exclusive), key :data:`NODE_LOCK_KEY` for the whole node (writes and
control-plane effects shared, a switchover's fence exclusive).  On the catalog: the
migration lock, the failover class (the monitor lease and one lock per shard), and the
rebalance runner lock.  The table class fences a table being deleted (writes shared,
the table fence exclusive; see ``shardd/tables.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import asyncpg

SLOT_LOCK_CLASS = 1936221284  # shard: shardd_slot_lock_class()
NODE_LOCK_KEY = -1  # shard: the whole node, in the slot-lock class
MIGRATION_LOCK = 1936221285  # catalog and shards: one migration run at a time
FAILOVER_LOCK_CLASS = 1936221286  # catalog: monitor lease (key 0), per-shard failover lock
MONITOR_KEY = 0
REBALANCE_LOCK_CLASS = 1936221287  # catalog: one rebalance runner at a time
TABLE_LOCK_CLASS = 1936221288  # shard: shardd_table_lock_class(); key = the table's hash

FENCED_SQLSTATE = "SD002"


class SlotState(enum.StrEnum):
    """A slot's state on one shard.

    ``owned`` accepts writes and answers reads; ``frozen`` answers reads only (a move
    is cutting over); ``importing`` (being copied in) and ``moved`` (handed over)
    answer nothing, so a stale router is refused rather than served stale data.
    """

    OWNED = "owned"
    IMPORTING = "importing"
    FROZEN = "frozen"
    MOVED = "moved"


def is_fenced_error(exc: BaseException) -> bool:
    """The node refused because it is fenced or no longer a primary."""
    return getattr(exc, "sqlstate", None) == FENCED_SQLSTATE


async def set_slot_states(
    conn: asyncpg.Connection,
    slots: Sequence[int],
    state: SlotState,
    *,
    only_from: Iterable[SlotState] | None = None,
) -> int:
    """Set ``slots`` to ``state`` on the primary behind ``conn``; returns how many changed.

    ``only_from`` restricts the change to slots now in one of those states (and never
    creates a row).  Safe to repeat.  Refused (SD002) on a fenced node or a replica.
    """
    changed: int = await conn.fetchval(
        "SELECT shardd_set_slot_state($1::int[], $2, $3::text[])",
        list(slots),
        str(state),
        None if only_from is None else [str(s) for s in only_from],
    )
    return changed


async def forget_slots(conn: asyncpg.Connection, slots: Sequence[int]) -> None:
    """Remove the slots' state rows (the shard then answers nothing for them)."""
    await conn.execute("SELECT shardd_forget_slots($1::int[])", list(slots))


async def freeze(conn: asyncpg.Connection, slots: Sequence[int], *, lock_timeout: float) -> int:
    """Freeze owned slots, waiting at most ``lock_timeout`` for the writes in flight.

    Why it is safe: every write holds its slot's lock shared until it commits; the
    freeze takes the locks exclusively (ascending order, as batch writes do) and sets
    ``frozen`` in the same transaction, so every write after it sees ``frozen`` and is
    refused.  A lock wait past ``lock_timeout`` raises ``LockNotAvailableError`` and
    changes nothing; the caller retries.  Returns how many slots changed.
    """
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {max(1, int(lock_timeout * 1000))}")
        frozen: int = await conn.fetchval("SELECT shardd_freeze_slots($1::int[])", list(slots))
    return frozen


async def assert_primary(conn: asyncpg.Connection) -> None:
    """Raise SD002 unless ``conn`` is on an unfenced primary (call inside a transaction
    to hold the node lock shared until it ends)."""
    await conn.execute("SELECT shardd_assert_primary()")


async def fence_node(
    conn: asyncpg.Connection, reason: str, *, wait_for_writes: bool, expires_in: float | None = None
) -> None:
    """Make the node behind ``conn`` refuse every write and control-plane effect.

    ``wait_for_writes`` takes the node lock exclusively first, so the fence commits
    after every write in flight (a planned switchover: the fence's WAL position is then
    the last write a candidate must have).  Without it (a node that failed over and
    came back) the fence commits locally at once: waiting for a synchronous standby
    the node no longer has would hang.  The flag is a row on the node, so it holds for
    every router, however old its topology.  ``expires_in``: seconds after which the
    fencing process has given up for sure (a switchover's; see ``expires_at`` in
    ``migrations/shard/0007_switchover_expiry.sql``).
    """
    async with conn.transaction():
        if wait_for_writes:
            # Bounded: a write (or a move step) that holds the node lock longer makes the
            # switchover fail without effect rather than stall every later write.
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", SLOT_LOCK_CLASS, NODE_LOCK_KEY
            )
        else:
            await conn.execute("SET LOCAL synchronous_commit = local")
        await conn.execute(
            "UPDATE shardd_node_state SET fenced = true, reason = $1, changed_at = now(),"
            " expires_at = clock_timestamp() + make_interval(secs => $2),"
            " token = gen_random_uuid()",
            reason,
            expires_in,
        )


async def unfence_node(conn: asyncpg.Connection, reason: str) -> None:
    """Let the node take writes again (a promoted node, or a switchover undone)."""
    await conn.execute(
        "UPDATE shardd_node_state SET fenced = false, reason = $1, changed_at = now(),"
        " expires_at = NULL WHERE fenced",
        reason,
    )
