"""Reading source items on one shard and turning them into view rows.

Everything here runs on a connection to a source shard's primary, inside the caller's
repeatable-read transaction, so the items and the joined items it reads are one
snapshot's.  Rows whose slot the shard does not answer for (moved away, or still being
copied in) are left out; :func:`owned` says which slots it does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from .definition import Row, ViewDef, project

PAGE = 500

_SOURCE_PAGE = """
SELECT i.pk, i.sk, i.version, i.doc::text AS doc
FROM shardd_items i
JOIN shardd_slots s ON s.slot = i.slot AND s.state IN ('owned', 'frozen')
WHERE i.tbl = $1 AND (i.pk, i.sk) > ($2, $3)
  AND ($5::int[] IS NULL OR i.slot = ANY($5::int[]))
ORDER BY i.pk, i.sk
LIMIT $4
"""

_KEYS = """
SELECT i.tbl, i.pk, i.sk, i.version, i.doc::text AS doc
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tbl, pk, sk)
JOIN shardd_items i ON i.tbl = k.tbl AND i.pk = k.pk AND i.sk = k.sk
"""

_PARTITIONS = """
SELECT i.pk, i.sk, i.version, i.doc::text AS doc
FROM unnest($2::text[]) AS k(pk)
JOIN shardd_items i ON i.tbl = $1 AND i.pk = k.pk
ORDER BY i.pk, i.sk
"""


@dataclass(frozen=True)
class SourceItem:
    pk: str
    sk: str
    version: int
    doc: Any


async def owned(conn: asyncpg.Connection, slots: Iterable[int]) -> set[int]:
    rows = await conn.fetch(
        "SELECT slot FROM shardd_slots WHERE slot = ANY($1::int[])"
        " AND state IN ('owned', 'frozen')",
        sorted(set(slots)),
    )
    return {row["slot"] for row in rows}


async def answered(conn: asyncpg.Connection) -> list[int]:
    """The slots this shard answers for (owned, or frozen by a move not yet flipped)."""
    rows = await conn.fetch("SELECT slot FROM shardd_slots WHERE state IN ('owned', 'frozen')")
    return sorted(row["slot"] for row in rows)


async def source_page(
    conn: asyncpg.Connection,
    table: str,
    after: tuple[str, str],
    limit: int = PAGE,
    *,
    slots: Sequence[int] | None = None,
) -> list[SourceItem]:
    """The next items of ``table`` on this shard in (pk, sk) order, of answered slots
    (of ``slots`` only, if given)."""
    rows = await conn.fetch(
        _SOURCE_PAGE, table, after[0], after[1], limit, list(slots) if slots is not None else None
    )
    return [SourceItem(r["pk"], r["sk"], r["version"], orjson.loads(r["doc"])) for r in rows]


async def partitions(conn: asyncpg.Connection, table: str, pks: Sequence[str]) -> list[SourceItem]:
    """Every item of ``table`` under each of ``pks``."""
    rows = await conn.fetch(_PARTITIONS, table, list(pks))
    return [SourceItem(r["pk"], r["sk"], r["version"], orjson.loads(r["doc"])) for r in rows]


Joined = dict[str, dict[tuple[str, str], Any]]  # pk -> (table, sk) -> document


async def joined(conn: asyncpg.Connection, views: Sequence[ViewDef], pks: Iterable[str]) -> Joined:
    """The documents the views join, for each of ``pks``."""
    wanted = {(join.table, join.sk) for view in views for join in view.joins}
    keys = [(table, pk, sk) for pk in set(pks) for table, sk in wanted]
    found: Joined = {}
    if not keys:
        return found
    rows = await conn.fetch(_KEYS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    for row in rows:
        found.setdefault(row["pk"], {})[(row["tbl"], row["sk"])] = orjson.loads(row["doc"])
    return found


async def row_pages(
    conn: asyncpg.Connection,
    view: ViewDef,
    *,
    max_key_bytes: int,
    slots: Sequence[int] | None = None,
) -> AsyncIterator[list[Row]]:
    """The view rows of every source item on this shard (of the slots it answers for;
    of ``slots`` only, if given), a page at a time, in the caller's snapshot."""
    after = ("", "")
    while True:
        items = await source_page(conn, view.source, after, slots=slots)
        if not items:
            return
        joins = await joined(conn, [view], (i.pk for i in items))
        yield rows_of(view, items, joins, max_key_bytes=max_key_bytes)
        after = (items[-1].pk, items[-1].sk)


def rows_of(
    view: ViewDef, items: Iterable[SourceItem], joins: Joined, *, max_key_bytes: int
) -> list[Row]:
    found = []
    for item in items:
        row = project(
            view,
            item.doc,
            pk=item.pk,
            sk=item.sk,
            version=item.version,
            joined=joins.get(item.pk, {}),
            max_key_bytes=max_key_bytes,
        )
        if row is not None:
            found.append(row)
    return found
