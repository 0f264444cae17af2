"""Item SQL on one shard: thin wrappers over the functions in migrations/shard.

Every statement here is one round trip and carries its own fencing: writes go through
``shardd_write`` / ``shardd_put`` (slot lock + ownership check in the same transaction),
reads through ``shardd_get`` / ``shardd_query`` / ``shardd_scan`` (slot state joined in
the same query).  A read raises :class:`~shardd.errors.NotCaughtUp` when the node is
behind the caller's session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from . import errors
from .errors import NotCaughtUp, StaleMap
from .idempotency import Once

READABLE = ("owned", "frozen")
READ_ATTEMPTS = 3


@dataclass(frozen=True)
class WriteResult:
    version: int | None  # None: the item did not exist (patch / delete)
    created: bool
    doc: orjson.Fragment | None
    lsn: int
    replayed: bool = False  # the outcome recorded under an idempotency key, not a new write


@dataclass(frozen=True)
class Item:
    pk: str
    sk: str
    version: int
    doc: orjson.Fragment


async def write(
    conn: asyncpg.Connection,
    *,
    op: str,
    slot: int,
    table: str,
    pk: str,
    sk: str,
    doc: Any,
    if_version: int | None,
    max_item_bytes: int,
    once: Once | None = None,
) -> WriteResult:
    """One write in its own transaction.  A patch whose result would grow the item past
    ``max_item_bytes`` is refused by the same statement (SQLSTATE SD413).  With ``once``
    (an idempotency key) the outcome recorded under the key is returned, when there is
    one, instead of writing (see :mod:`shardd.idempotency`)."""
    args = (op, slot, table, pk, sk, doc, if_version, max_item_bytes)
    if once is None:
        row = await conn.fetchrow("CALL shardd_write($1, $2, $3, $4, $5, $6, $7, $8)", *args)
    else:
        row = await conn.fetchrow(
            "CALL shardd_write_once($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            *args,
            once.claim,
            once.record(0),
            once.digest,
            once.window,
        )
    return WriteResult(
        row["version"],
        bool(row["created"]),
        row["doc"],
        row["lsn"],
        bool(row.get("replayed")),
    )


async def _read(conn: asyncpg.Connection, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run a read, again (at most twice more) when Postgres cancels it for a conflict.

    A replica cancels queries that conflict with the WAL it replays (SQLSTATE 40001); a
    moment later the same query usually succeeds.  The caller's deadline bounds it all.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            return list(await conn.fetch(query, *args))
        except asyncpg.PostgresError as exc:
            if not errors.is_transient(exc) or attempt == READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _check(row: asyncpg.Record, slot: int) -> None:
    state = row["state"]
    if state not in READABLE:
        raise StaleMap(f"slot {slot} is {state or 'not owned'} on this node")
    if not row["caught_up"]:
        raise NotCaughtUp


async def get(
    conn: asyncpg.Connection, *, slot: int, table: str, pk: str, sk: str, min_lsn: int | None
) -> Item | None:
    """The item, or None when there is none."""
    (row,) = await _read(
        conn, "SELECT * FROM shardd_get($1, $2, $3, $4, $5)", slot, table, pk, sk, min_lsn
    )
    _check(row, slot)
    if row["version"] is None:
        return None
    return Item(pk, sk, row["version"], row["doc"])


async def get_many(
    conn: asyncpg.Connection,
    *,
    table: str,
    keys: list[tuple[int, str, str]],
    min_lsn: int | None,
) -> list[Item | None]:
    """Point reads of several (slot, pk, sk) on one shard in one query, in key order."""
    rows = await _read(
        conn,
        "SELECT k.slot, g.* FROM unnest($1::int[], $2::text[], $3::text[])"
        " WITH ORDINALITY AS k(slot, pk, sk, ord)"
        " CROSS JOIN LATERAL shardd_get(k.slot, $4, k.pk, k.sk, $5) g ORDER BY k.ord",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        table,
        min_lsn,
    )
    result: list[Item | None] = []
    for (_, pk, sk), row in zip(keys, rows, strict=True):
        _check(row, row["slot"])
        result.append(None if row["version"] is None else Item(pk, sk, row["version"], row["doc"]))
    return result


async def query_partition(
    conn: asyncpg.Connection,
    *,
    slot: int,
    table: str,
    pk: str,
    prefix: str | None,
    after: str | None,
    limit: int,
    min_lsn: int | None,
) -> list[Item]:
    rows = await _read(
        conn,
        "SELECT * FROM shardd_query($1, $2, $3, $4, $5, $6, $7)",
        slot,
        table,
        pk,
        prefix,
        after,
        limit,
        min_lsn,
    )
    if not rows:
        raise StaleMap(f"slot {slot} is not owned on this node")
    _check(rows[0], slot)
    return [Item(pk, r["sk"], r["version"], r["doc"]) for r in rows if r["version"] is not None]


async def scan(
    conn: asyncpg.Connection,
    *,
    table: str,
    slots: list[int],
    after: tuple[str, str] | None,
    limit: int,
    min_lsn: int | None,
) -> list[Item]:
    """One page of ``table`` in (pk, sk) order, of the ``slots`` the caller's topology
    gives this shard.  Raises NotCaughtUp when this node is behind ``min_lsn`` or is a
    replica that does not yet answer for every one of those slots (read the page
    elsewhere).

    Raises StaleMap when a primary does not answer for them: the topology is stale.
    """
    rows = await _read(
        conn,
        "SELECT * FROM shardd_scan_slots($1, $2, $3, $4, $5, $6::int[])",
        table,
        after[0] if after else None,
        after[1] if after else None,
        limit,
        min_lsn,
        slots,
    )
    first = rows[0]
    if not first["covers"]:
        if first["in_recovery"]:
            raise NotCaughtUp
        raise StaleMap("this shard does not answer for every slot the topology gives it")
    if not first["caught_up"]:
        raise NotCaughtUp
    return [
        Item(r["pk"], r["sk"], r["version"], r["doc"]) for r in rows if r["version"] is not None
    ]


@dataclass(frozen=True)
class BatchWrite:
    """One key of a batch: a put (``doc`` set) or a delete (``doc`` None)."""

    slot: int
    pk: str
    sk: str
    doc: Any = None
    index: int = 0  # the op's place in its request (its idempotency record)


@dataclass(frozen=True)
class BatchResult:
    versions: list[int | None]  # in the order of the ops
    lsn: int  # the WAL position after the commit
    replayed: list[bool]  # per op: its outcome was recorded under the idempotency key


async def write_batch(
    conn: asyncpg.Connection, *, table: str, ops: list[BatchWrite], once: Once | None = None
) -> BatchResult:
    """All puts and deletes for one shard in one transaction, in one statement that also
    commits (``shardd_write_batch``: its note says why that matters and why it cannot
    deadlock).

    Returns, in the order of ``ops``, each put's new version and each delete's deleted
    version (None: was absent), and the WAL position after the commit.  Two ops on the
    same key run in the order of ``ops``.  With ``once``, an op whose outcome was
    recorded under the key returns it instead of being applied again.
    """
    order = sorted(range(len(ops)), key=lambda i: (ops[i].slot, ops[i].pk, ops[i].sk))
    args = (
        table,
        [ops[i].slot for i in order],
        [ops[i].pk for i in order],
        [ops[i].sk for i in order],
        [ops[i].doc for i in order],
        [ops[i].doc is not None for i in order],
    )
    if once is None:
        row = await conn.fetchrow(
            "CALL shardd_write_batch($1, $2::int[], $3::text[], $4::text[], $5::jsonb[],"
            " $6::bool[])",
            *args,
        )
    else:
        row = await conn.fetchrow(
            "CALL shardd_write_batch_once($1, $2::int[], $3::text[], $4::text[], $5::jsonb[],"
            " $6::bool[], $7, $8::text[], $9, $10)",
            *args,
            once.claim,
            [once.record(ops[i].index) for i in order],
            once.digest,
            once.window,
        )
    versions: list[int | None] = [None] * len(ops)
    replayed = [False] * len(ops)
    for i, version, again in zip(
        order, row["versions"], row.get("replayed") or [False] * len(ops), strict=True
    ):
        versions[i] = version
        replayed[i] = again
    return BatchResult(versions, row["lsn"], replayed)


async def table_has_items(conn: asyncpg.Connection, table: str) -> bool:
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM shardd_items WHERE tbl = $1)", table)
    )


async def fence_table(conn: asyncpg.Connection, table: str) -> None:
    """Refuse every later write to ``table`` on this shard (SQLSTATE SD410).

    Safe because every item write holds the table's lock shared until it commits and
    the fence takes it exclusively: the fence commits after the writes in flight, and
    every write after it sees the fence.
    """
    await conn.execute("SELECT shardd_fence_table($1)", table)


async def delete_table_items(conn: asyncpg.Connection, table: str, *, batch: int) -> int:
    """Delete up to ``batch`` of the table's items (each batch its own transaction)."""
    deleted: int = await conn.fetchval("SELECT shardd_delete_table_items($1, $2)", table, batch)
    return deleted


async def unfence_table(conn: asyncpg.Connection, table: str, *, min_age: float) -> float:
    """Lift the table's fence if it is ``min_age`` seconds old; else the seconds left."""
    left: float = await conn.fetchval("SELECT shardd_unfence_table($1, $2)", table, min_age)
    return left


async def item_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM shardd_items"))


@dataclass(frozen=True)
class ViewRowWrite:
    """One view row to apply: a put (``doc`` set) or a delete (``doc`` None), done only
    where the stored row was built from a source version at most ``version`` (any, with
    ``force``)."""

    slot: int
    pk: str
    sk: str
    doc: Any
    version: int
    force: bool = False


async def view_apply(
    conn: asyncpg.Connection,
    *,
    table: str,
    rows: list[ViewRowWrite],
    not_after: datetime | None = None,
) -> int:
    """Apply view rows on one shard in one transaction (``shardd_view_apply``), refused
    (SQLSTATE SD020) after ``not_after``; returns how many rows changed.  Rows are sent
    in key order, the last of two for one key kept, so that two appliers lock rows in
    the same order."""
    unique = {(r.slot, r.pk, r.sk): r for r in rows}
    ordered = [unique[key] for key in sorted(unique)]
    row = await conn.fetchrow(
        "CALL shardd_view_apply($1, $2::int[], $3::text[], $4::text[], $5::jsonb[],"
        " $6::bigint[], $7::bool[], $8)",
        table,
        [r.slot for r in ordered],
        [r.pk for r in ordered],
        [r.sk for r in ordered],
        [r.doc for r in ordered],
        [r.version for r in ordered],
        [r.force for r in ordered],
        not_after,
    )
    return int(row["written"])
