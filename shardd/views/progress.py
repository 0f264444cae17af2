"""How far the views have applied a source shard's change log (from the catalog).

A slot move hands a key's changes from one source shard's log to another's, each
applied by its own maintainer.  The target's maintainer holds back a batch that touches
slots moved in until every view has applied the source's log up to the move's last
position (so a key's older changes are never applied after its newer ones), and a shard
is unregistered only once every view has applied its log to the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

import asyncpg

from .. import changelog

HOLD_HORIZON = 3600.0  # seconds after a move during which its target may hold back


async def behind(conn: asyncpg.Connection, shard: str, position: str) -> list[str]:
    """The live views whose position on ``shard`` does not cover ``position``."""
    rows = await conn.fetch(
        "SELECT v.name, p.position FROM shardd_views v LEFT JOIN shardd_view_positions p"
        " ON p.view = v.name AND p.shard = $1 WHERE v.state <> 'deleting'",
        shard,
    )
    return sorted(
        row["name"]
        for row in rows
        if row["position"] is None or not changelog.covers(row["position"], position)
    )


async def wait_applied(
    conn: asyncpg.Connection, shard: str, position: str, *, within: float
) -> list[str]:
    """Wait until every view has applied ``shard``'s log up to ``position``; the views
    still behind after ``within`` seconds (none: all caught up)."""
    until = time.monotonic() + within
    while True:
        late = await behind(conn, shard, position)
        if not late or time.monotonic() > until:
            return late
        await asyncio.sleep(0.1)


async def incoming(conn: asyncpg.Connection, shard: str) -> list[tuple[frozenset[int], str, str]]:
    """Recent moves into ``shard`` (slots, source, the source position they were
    drained to)."""
    rows = await conn.fetch(
        "SELECT slots, source, position FROM shardd_moves WHERE target = $1"
        " AND phase IN ('flipped', 'done') AND position IS NOT NULL"
        " AND updated_at > now() - make_interval(secs => $2)",
        shard,
        HOLD_HORIZON,
    )
    return [(frozenset(r["slots"]), r["source"], r["position"]) for r in rows]


def held_back(
    moves: Iterable[tuple[frozenset[int], str, str]],
    slots: set[int],
    positions: Mapping[tuple[str, str], str],
    views: Iterable[str],
    shards: Iterable[str],
) -> list[str]:
    """The sources whose moved-in slots ``slots`` touch and whose log some view has not
    applied up to the move (``positions``: (view, shard) -> position).  A source no
    longer in the topology (``shards``) holds nothing back: nothing more comes from it."""
    live = set(shards)
    names = list(views)
    waiting = []
    for moved, source, drained in moves:
        if source not in live or not (moved & slots):
            continue
        for view in names:
            # A view without a position on the source is still copying it (a copy reads
            # the slots the source answers for when it runs, and the view turns active
            # only once its copies covered every slot): it does not hold anything back.
            position = positions.get((view, source))
            if position is not None and not changelog.covers(position, drained):
                waiting.append(source)
                break
    return sorted(set(waiting))
