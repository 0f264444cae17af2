"""The per-shard change log: reading it without ever skipping an entry, and trimming it.

Every item change appends a row to ``shardd_changes`` in the same transaction (a
trigger, see ``migrations/shard/0003_changelog.sql``), with the writing transaction's id.
A consumer's position is a snapshot (``pg_snapshot`` as text).  :func:`next_batch` takes
a new snapshot and returns the entries of the transactions visible in it but not in the
old one, so an entry whose transaction commits late (after later sequence numbers were
read) is picked up by the batch in which it becomes visible.  The lower bound
``txid >= xmin(old)`` lets the txid index serve the query: everything below the old
snapshot's xmin was already visible in it.

Delivery is at least once (a consumer that dies before saving its position reads the
batch again); :func:`apply` is idempotent, so that is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from . import fencing

_BATCH = """
SELECT seq, op, tbl, pk, sk, slot, version, doc::text AS doc, at
FROM shardd_changes
WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND pg_visible_in_snapshot(txid, $2::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)
  AND ($3::int[] IS NULL OR slot = ANY($3::int[]))
ORDER BY seq
"""


@dataclass(frozen=True)
class Change:
    seq: int
    op: str  # 'put' | 'delete'
    tbl: str
    pk: str
    sk: str
    slot: int
    version: int
    doc: str | None  # JSON text
    at: datetime | None = None  # when the change was written


async def position(conn: asyncpg.Connection) -> str:
    """The current position: every entry committed before now is behind it."""
    return str(await conn.fetchval("SELECT pg_current_snapshot()::text"))


async def next_batch(
    conn: asyncpg.Connection,
    after: str,
    *,
    slots: Sequence[int] | None = None,
) -> tuple[list[Change], str]:
    """Entries that became visible since ``after`` (in commit-consistent order), and the
    new position."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        new = await position(conn)
        rows = await conn.fetch(_BATCH, after, new, list(slots) if slots is not None else None)
    changes = [Change(**dict(r)) for r in rows]
    return changes, new


async def apply(conn: asyncpg.Connection, changes: Sequence[Change]) -> int:
    """Make the rows on ``conn`` what the changes say; idempotent.

    Only each key's last change counts (for one key, sequence order is commit order:
    the row lock serializes its writers).  Applied rows are not changes of this shard,
    so the trigger is told to skip them.  Returns the number of keys written.
    """
    last: dict[tuple[str, str, str], Change] = {}
    for change in changes:
        last[(change.tbl, change.pk, change.sk)] = change
    puts = [c for c in last.values() if c.op == "put"]
    deletes = [c for c in last.values() if c.op == "delete"]
    async with conn.transaction():
        # Only ever on the shard's current primary (the caller may be out of date).
        await fencing.assert_primary(conn)
        await conn.execute("SET LOCAL shardd.copying = on")
        if puts:
            await conn.execute(
                "INSERT INTO shardd_items AS i (tbl, pk, sk, slot, version, doc)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[],"
                " $5::bigint[], $6::jsonb[])"
                " ON CONFLICT (tbl, pk, sk) DO UPDATE SET slot = excluded.slot,"
                " version = excluded.version, doc = excluded.doc, updated_at = now()",
                [c.tbl for c in puts],
                [c.pk for c in puts],
                [c.sk for c in puts],
                [c.slot for c in puts],
                [c.version for c in puts],
                [c.doc for c in puts],
            )
        if deletes:
            await conn.execute(
                "DELETE FROM shardd_items i USING unnest($1::text[], $2::text[], $3::text[])"
                " AS d(tbl, pk, sk) WHERE i.tbl = d.tbl AND i.pk = d.pk AND i.sk = d.sk",
                [c.tbl for c in deletes],
                [c.pk for c in deletes],
                [c.sk for c in deletes],
            )
    return len(last)


_CHANGED_KEYS = """
WITH now AS (
    SELECT pg_current_snapshot() AS snap,
           (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS lsn
)
SELECT c.seq, c.op, c.tbl, c.pk, c.sk, c.slot, c.version, NULL::text AS doc, c.at,
       now.snap::text AS position, now.lsn
FROM now LEFT JOIN LATERAL (
    SELECT seq, op, tbl, pk, sk, slot, version, at
    FROM shardd_changes
    WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
      AND pg_visible_in_snapshot(txid, now.snap)
      AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)
) c ON true
ORDER BY c.seq
"""


async def changed_keys(conn: asyncpg.Connection, after: str) -> tuple[list[Change], str, int]:
    """The entries (without documents) that became visible since ``after``, the new
    position, and a WAL position at or after every one of them: one statement, whose
    snapshot is the new position (so no transaction is needed), on the primary."""
    rows = await conn.fetch(_CHANGED_KEYS, after)
    # Each row: a change's fields in Change's order (all NULL when there is none), then
    # the position and the WAL position.
    changes = [Change(*tuple(r)[:-2]) for r in rows if r["seq"] is not None]
    return changes, rows[0]["position"], rows[0]["lsn"]


async def register(conn: asyncpg.Connection, name: str, at: str) -> None:
    """Record a consumer's position: trimming keeps every entry it has not passed."""
    await conn.execute(
        "INSERT INTO shardd_consumers (name, position) VALUES ($1, $2::text::pg_snapshot)"
        " ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()",
        name,
        at,
    )


class ConsumerExpired(Exception):
    """A consumer stopped advancing for longer than the expiry and was dropped: the log
    may have been trimmed past its position, so it cannot go on from there."""


async def advance(conn: asyncpg.Connection, name: str, at: str) -> None:
    """Move a registered consumer's position on; raises ConsumerExpired if it is gone."""
    status = await conn.execute(
        "UPDATE shardd_consumers SET position = $2::text::pg_snapshot, updated_at = now()"
        " WHERE name = $1",
        name,
        at,
    )
    if status.endswith(" 0"):
        raise ConsumerExpired(f"change-log consumer {name} expired")


async def unregister(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("DELETE FROM shardd_consumers WHERE name = $1", name)


async def expire_consumers(conn: asyncpg.Connection, *, idle_seconds: float) -> list[str]:
    """Drop consumers that have not advanced for ``idle_seconds``: a consumer left behind
    (a failed move nobody resumes) must not keep the log from being trimmed forever."""
    rows = await conn.fetch(
        "DELETE FROM shardd_consumers WHERE updated_at < now() - make_interval(secs => $1)"
        " RETURNING name",
        idle_seconds,
    )
    return [row["name"] for row in rows]


async def trim(conn: asyncpg.Connection, *, keep_seconds: float) -> int:
    """Delete entries older than ``keep_seconds`` that every consumer has passed."""
    status = await conn.execute(
        "DELETE FROM shardd_changes WHERE at < now() - make_interval(secs => $1)"
        " AND txid < coalesce((SELECT min(pg_snapshot_xmin(position))"
        " FROM shardd_consumers), pg_snapshot_xmin(pg_current_snapshot()))",
        keep_seconds,
    )
    return int(status.split()[-1])


def _parse_snapshot(text: str) -> tuple[int, int, frozenset[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x)


# A position may hold a round still being read in parts:
# "<from>|<to>|<last seq read>|<when <to> was taken, unix time>" (every entry of the
# transactions visible in <to> but not in <from> up to that sequence number is read).
# It covers <from> only.
ROUND = "|"


def open_round(start: str, end: str, seq: int, taken: float) -> str:
    return f"{start}{ROUND}{end}{ROUND}{seq}{ROUND}{taken:.3f}"


def parse_position(position: str) -> tuple[str, str | None, int]:
    """(snapshot read up to, the round's end or None, the last sequence number read)."""
    if ROUND not in position:
        return position, None, 0
    start, end, seq, _ = position.split(ROUND)
    return start, end, int(seq)


def round_taken(position: str) -> float:
    """When the end snapshot of an open round was taken (unix time)."""
    return float(position.split(ROUND)[3])


def start_at(txid: int) -> str:
    """A position before every transaction from ``txid`` on (and after all before it)."""
    return f"{txid}:{txid}:"


def covers(position: str, other: str) -> bool:
    """Whether every transaction visible in snapshot ``other`` is visible in
    ``position`` too (both of one shard's history)."""
    position = parse_position(position)[0]
    _, a_xmax, a_xip = _parse_snapshot(position)
    _, b_xmax, b_xip = _parse_snapshot(other)
    if a_xmax < b_xmax and (
        b_xmax - a_xmax > len(b_xip) or not set(range(a_xmax, b_xmax)) <= b_xip
    ):
        return False
    return all(t >= b_xmax or t in b_xip for t in a_xip)


# A primary's origin: its system identifier and timeline (a promotion changes either).
ORIGIN = (
    "(SELECT system_identifier FROM pg_control_system())::text || ':'"
    " || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
)


async def position_and_origin(conn: asyncpg.Connection) -> tuple[str, str]:
    row = await conn.fetchrow(f"SELECT pg_current_snapshot()::text AS p, {ORIGIN} AS o")
    return str(row["p"]), str(row["o"])


async def retained_start(conn: asyncpg.Connection) -> str:
    """A position before every entry this shard's log still holds (and after every
    entry it trimmed): where a reader whose own position cannot be trusted goes on."""
    first = await conn.fetchval(
        "SELECT greatest(least((SELECT min(txid)::text::bigint FROM shardd_changes),"
        " pg_snapshot_xmin(pg_current_snapshot())::text::bigint),"
        " (SELECT trimmed_to::text::bigint + 1 FROM shardd_changes_horizon))::text"
    )
    return start_at(int(first))


async def trimmed_past(conn: asyncpg.Connection, position: str) -> bool:
    """Whether the log has lost entries a reader at ``position`` has not read."""
    horizon = await conn.fetchval("SELECT trimmed_to::text FROM shardd_changes_horizon")
    snapshot = parse_position(position)[0]
    return horizon is not None and int(horizon) >= int(snapshot.split(":", 1)[0])


async def origin(conn: asyncpg.Connection) -> str:
    """Which history ``conn``'s node writes: its system identifier and current timeline.
    A promotion starts a new timeline, and snapshots from before it may not describe
    what the new primary's transaction ids mean."""
    return str(await conn.fetchval(f"SELECT {ORIGIN}"))
