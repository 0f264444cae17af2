"""The catalog's record of rebalance runs and moves (``shardd_rebalances``, ``shardd_moves``).

A move's row is written before each step it takes, so the row always says where a run
that died stopped.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

import asyncpg

from .plan import PlannedMove


class Phase(enum.StrEnum):
    PLANNED = "planned"
    COPYING = "copying"
    CATCHING_UP = "catching_up"
    FROZEN = "frozen"
    FLIPPED = "flipped"
    DONE = "done"
    ABORTED = "aborted"


OPEN_PHASES = (Phase.PLANNED, Phase.COPYING, Phase.CATCHING_UP, Phase.FROZEN, Phase.FLIPPED)
_OPEN = [str(p) for p in OPEN_PHASES]


@dataclass(frozen=True)
class Move:
    id: int
    rebalance: int
    source: str
    target: str
    slots: tuple[int, ...]
    phase: str
    position: str | None
    rows_copied: int
    bytes_copied: int
    changes_applied: int
    backlog: int | None
    pause_ms: float | None
    epoch: int | None
    error: str | None
    source_term: int | None = None  # the shards' terms the move's work so far was done in
    target_term: int | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Move:
        return cls(
            id=row["id"],
            rebalance=row["rebalance"],
            source=row["source"],
            target=row["target"],
            slots=tuple(row["slots"]),
            phase=row["phase"],
            position=row["position"],
            rows_copied=row["rows_copied"],
            bytes_copied=row["bytes_copied"],
            changes_applied=row["changes_applied"],
            backlog=row["backlog"],
            pause_ms=row["pause_ms"],
            epoch=row["epoch"],
            error=row["error"],
            source_term=row["source_term"],
            target_term=row["target_term"],
        )

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "rebalance": self.rebalance,
            "source": self.source,
            "target": self.target,
            "slots": len(self.slots),
            "first_slot": self.slots[0] if self.slots else None,
            "phase": self.phase,
            "rows_copied": self.rows_copied,
            "bytes_copied": self.bytes_copied,
            "changes_applied": self.changes_applied,
            "backlog": self.backlog,
            "pause_ms": self.pause_ms,
            "error": self.error,
        }


_MOVE_COLUMNS = (
    "id, rebalance, source, target, slots, phase, position, rows_copied, bytes_copied,"
    " changes_applied, backlog, pause_ms, epoch, error, source_term, target_term"
)


async def list_moves(conn: asyncpg.Connection, *, open_only: bool = False) -> list[Move]:
    rows = await conn.fetch(
        f"SELECT {_MOVE_COLUMNS} FROM shardd_moves WHERE NOT $1 OR phase = ANY($2::text[])"
        " ORDER BY id",
        open_only,
        _OPEN,
    )
    return [Move.from_row(row) for row in rows]


async def get_move(conn: asyncpg.Connection, move_id: int) -> Move:
    """The move as last recorded (a step that died may or may not have been)."""
    row = await conn.fetchrow(f"SELECT {_MOVE_COLUMNS} FROM shardd_moves WHERE id = $1", move_id)
    if row is None:
        raise LookupError(f"no move {move_id}")
    return Move.from_row(row)


async def create_run(
    conn: asyncpg.Connection, moves: Sequence[PlannedMove], *, reason: str
) -> list[Move]:
    async with conn.transaction():
        run_id = await conn.fetchval(
            "INSERT INTO shardd_rebalances (reason) VALUES ($1) RETURNING id", reason
        )
        rows = [
            await conn.fetchrow(
                f"INSERT INTO shardd_moves (rebalance, source, target, slots)"
                f" VALUES ($1, $2, $3, $4) RETURNING {_MOVE_COLUMNS}",
                run_id,
                m.source,
                m.target,
                list(m.slots),
            )
            for m in moves
        ]
    return [Move.from_row(row) for row in rows]


async def record_step(conn: asyncpg.Connection, move: Move, **changes: object) -> Move:
    """Write the move's row with ``changes`` applied; returns the updated move."""
    updated = replace(move, **changes)  # type: ignore[arg-type]
    await conn.execute(
        "UPDATE shardd_moves SET phase = $2, position = $3, rows_copied = $4,"
        " bytes_copied = $5, changes_applied = $6, backlog = $7, pause_ms = $8, epoch = $9,"
        " error = $10, source_term = $11, target_term = $12, updated_at = now() WHERE id = $1",
        updated.id,
        updated.phase,
        updated.position,
        updated.rows_copied,
        updated.bytes_copied,
        updated.changes_applied,
        updated.backlog,
        updated.pause_ms,
        updated.epoch,
        updated.error,
        updated.source_term,
        updated.target_term,
    )
    return updated


async def finish_runs(conn: asyncpg.Connection) -> None:
    """Close rebalance runs none of whose moves is open any more."""
    await conn.execute(
        "UPDATE shardd_rebalances r SET state = CASE WHEN EXISTS (SELECT 1 FROM shardd_moves m"
        " WHERE m.rebalance = r.id AND m.phase = 'aborted') THEN 'aborted' ELSE 'done' END,"
        " updated_at = now() WHERE state = 'running' AND NOT EXISTS (SELECT 1 FROM"
        " shardd_moves m WHERE m.rebalance = r.id AND m.phase = ANY($1::text[]))",
        _OPEN,
    )
