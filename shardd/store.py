"""Item SQL on one shard: thin wrappers over the functions in migrations/shard.

Every statement here is one round trip and carries its own fencing: writes go through
``shardd_write`` / ``shardd_put`` (slot lock + ownership check in the same transaction),
reads through ``shardd_get`` / ``shardd_query`` / ``shardd_scan`` (slot state joined in
the same query).  A read returns None when the node is behind the caller's session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from .errors import StaleMap

READABLE = ("owned", "frozen")


@dataclass(frozen=True)
class WriteResult:
    version: int | None  # None: the item did not exist (patch / delete)
    created: bool
    doc: orjson.Fragment | None
    lsn: int


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
) -> WriteResult:
    row = await conn.fetchrow(
        "CALL shardd_write($1, $2, $3, $4, $5, $6, $7)",
        op,
        slot,
        table,
        pk,
        sk,
        doc,
        if_version,
    )
    return WriteResult(row["version"], bool(row["created"]), row["doc"], row["lsn"])


def _check_state(state: str | None, slot: int) -> None:
    if state not in READABLE:
        raise StaleMap(f"slot {slot} is {state or 'not owned'} on this node")


async def get(
    conn: asyncpg.Connection, *, slot: int, table: str, pk: str, sk: str, min_lsn: int | None
) -> tuple[Item | None] | None:
    """(item or None,) — or None when this node is behind ``min_lsn``."""
    row = await conn.fetchrow(
        "SELECT * FROM shardd_get($1, $2, $3, $4, $5)", slot, table, pk, sk, min_lsn
    )
    _check_state(row["state"], slot)
    if not row["caught_up"]:
        return None
    if row["version"] is None:
        return (None,)
    return (Item(pk, sk, row["version"], row["doc"]),)


async def get_many(
    conn: asyncpg.Connection,
    *,
    table: str,
    keys: list[tuple[int, str, str]],
    min_lsn: int | None,
) -> list[Item | None] | None:
    """Point reads of several (slot, pk, sk) on one shard in one query, in key order."""
    rows = await conn.fetch(
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
        _check_state(row["state"], row["slot"])
        if not row["caught_up"]:
            return None
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
) -> list[Item] | None:
    rows = await conn.fetch(
        "SELECT * FROM shardd_query($1, $2, $3, $4, $5, $6, $7)",
        slot,
        table,
        pk,
        prefix,
        after,
        limit,
        min_lsn,
    )
    _check_state(rows[0]["state"] if rows else None, slot)
    if not rows[0]["caught_up"]:
        return None
    return [Item(pk, r["sk"], r["version"], r["doc"]) for r in rows if r["version"] is not None]


async def scan(
    conn: asyncpg.Connection,
    *,
    table: str,
    after: tuple[str, str] | None,
    limit: int,
    min_lsn: int | None,
) -> list[Item] | None:
    rows = await conn.fetch(
        "SELECT * FROM shardd_scan($1, $2, $3, $4, $5)",
        table,
        after[0] if after else None,
        after[1] if after else None,
        limit,
        min_lsn,
    )
    if not rows[0]["caught_up"]:
        return None
    return [
        Item(r["pk"], r["sk"], r["version"], r["doc"]) for r in rows if r["version"] is not None
    ]


async def write_batch(
    conn: asyncpg.Connection,
    *,
    table: str,
    puts: list[tuple[int, str, str, Any]],
    deletes: list[tuple[int, str, str]],
) -> tuple[list[int], list[int | None], int]:
    """All puts and deletes for one shard in one transaction.

    Returns the new versions of the puts, the deleted versions (None: was absent), and
    the WAL position after the commit.
    """
    async with conn.transaction():
        put_rows = (
            await conn.fetch(
                "SELECT (shardd_put(k.slot, $1, k.pk, k.sk, k.doc, NULL)).version"
                " FROM unnest($2::int[], $3::text[], $4::text[], $5::jsonb[])"
                " WITH ORDINALITY AS k(slot, pk, sk, doc, ord) ORDER BY k.ord",
                table,
                [p[0] for p in puts],
                [p[1] for p in puts],
                [p[2] for p in puts],
                [p[3] for p in puts],
            )
            if puts
            else []
        )
        delete_rows = (
            await conn.fetch(
                "SELECT shardd_delete(k.slot, $1, k.pk, k.sk, NULL) AS version"
                " FROM unnest($2::int[], $3::text[], $4::text[])"
                " WITH ORDINALITY AS k(slot, pk, sk, ord) ORDER BY k.ord",
                table,
                [d[0] for d in deletes],
                [d[1] for d in deletes],
                [d[2] for d in deletes],
            )
            if deletes
            else []
        )
    lsn: int = await conn.fetchval("SELECT pg_current_wal_lsn()")
    return [r["version"] for r in put_rows], [r["version"] for r in delete_rows], lsn


async def table_has_items(conn: asyncpg.Connection, table: str) -> bool:
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM shardd_items WHERE tbl = $1)", table)
    )


async def delete_table_items(conn: asyncpg.Connection, table: str) -> int:
    status = await conn.execute("DELETE FROM shardd_items WHERE tbl = $1", table)
    return int(status.split()[-1])


async def item_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM shardd_items"))
