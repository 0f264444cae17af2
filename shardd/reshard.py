"""Online slot moves: plan a rebalance, move groups of slots under live traffic, resume
or abort a run that died.

A *move* takes a group of slots from a source shard to a target shard through phases,
each recorded in ``shardd_moves`` (catalog) before the next begins:

``planned``
    nothing done yet.
``copying``
    the target marks the slots ``importing`` (it answers nothing for them) and drops any
    rows a previous attempt left; then the rows are copied from one consistent snapshot
    of the source (``COPY ... TO STDOUT`` streamed into ``COPY ... FROM STDIN``).
``catching_up``
    the copy is complete as of its snapshot, which is the change-log position; batches
    of later changes to those slots are applied until the backlog is small.
``frozen``
    the source took each slot's advisory lock exclusively (waiting exactly for the
    writes in flight) and marked the slots ``frozen``: writes there are refused with
    SD001 and retried by shardd, reads are still served.  The last changes are drained,
    both sides are verified (per-slot row count and an order-independent checksum),
    then the target marks the slots ``owned``, the source marks them ``moved`` (it
    answers nothing for them any more) and the catalog publishes the new owner with a
    new epoch, recording ``flipped`` in the same transaction.
``flipped``
    once every live instance reports the new epoch (or a topology lease passed), the
    source's copy is deleted.
``done`` / ``aborted``

Safety: at every instant at most one shard accepts writes for a slot (the source stops
before the target starts, both inside the shards); at most one answers reads for it
(the source says ``moved`` before the catalog names the target, so a router with the old
map is refused and retries).  A crash anywhere leaves a recorded phase: ``--resume``
redoes the phase's idempotent steps and carries on; ``--abort`` before ``flipped`` gives
every slot back to the source (owned) and removes the target's partial copy; after
``flipped`` there is nothing to undo and the move is completed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import asyncpg

from . import admin, catalog, changelog, placement
from .topology import Shard, Topology

log = logging.getLogger(__name__)

LOCK_CLASS = 1936221287  # catalog advisory lock: one rebalance runner at a time
OPEN_PHASES = ("planned", "copying", "catching_up", "frozen", "flipped")
COLUMNS = ("tbl", "pk", "sk", "slot", "version", "doc", "updated_at")


class MoveError(Exception):
    """A move or a rebalance could not go on (the recorded phase says where it stopped)."""


# -- planning (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedMove:
    source: str
    target: str
    slots: tuple[int, ...]


def plan(
    current: Sequence[str | None],
    weights: dict[str, int],
    *,
    pinned: dict[int, str] | None = None,
    group_slots: int = 16,
) -> list[PlannedMove]:
    """The moves that take ``current`` to the balanced map for ``weights``.

    Slots are grouped per (source, target) pair into groups of at most ``group_slots``:
    a group is frozen together, so its size bounds the write pause of its cutover.
    """
    if any(owner is None for owner in current):
        raise MoveError("some slots have no owner; run `shardctl init` first")
    target = placement.balance(current, weights, pinned=pinned or {})
    pairs: dict[tuple[str, str], list[int]] = {}
    for slot, (before, after) in sorted(placement.moves(current, target).items()):
        assert before is not None
        pairs.setdefault((before, after), []).append(slot)
    planned = []
    for (source, dest), slots in sorted(pairs.items()):
        for start in range(0, len(slots), group_slots):
            planned.append(PlannedMove(source, dest, tuple(slots[start : start + group_slots])))
    return planned


def plan_by_load(
    current: Sequence[str | None],
    slot_load: dict[int, float],
    shards: Sequence[str],
    *,
    tolerance: float = 0.1,
    max_moves: int = 256,
) -> list[PlannedMove]:
    """Single-slot moves from the busiest shards to the idlest until every shard is
    within ``tolerance`` of the mean load (or no move helps any more).

    Each step moves, from the busiest shard to the idlest, the heaviest slot that does
    not make the idlest busier than the busiest was: the gap always shrinks, so the
    loop ends.  A slot hotter than a whole shard's fair share stays where it is.
    """
    load = dict.fromkeys(shards, 0.0)
    owner = {slot: shard for slot, shard in enumerate(current) if shard is not None}
    for slot, value in slot_load.items():
        if slot in owner and owner[slot] in load:
            load[owner[slot]] += value
    mean = sum(load.values()) / max(1, len(load))
    planned: list[PlannedMove] = []
    while len(planned) < max_moves and mean > 0:
        busiest = max(load, key=lambda s: (load[s], s))
        idlest = min(load, key=lambda s: (load[s], s))
        if load[busiest] <= mean * (1 + tolerance):
            break
        gap = load[busiest] - load[idlest]
        movable = [
            (value, slot)
            for slot, value in slot_load.items()
            if owner.get(slot) == busiest and 0 < value < gap
        ]
        if not movable:
            break
        value, slot = max(movable)
        owner[slot] = idlest
        load[busiest] -= value
        load[idlest] += value
        planned.append(PlannedMove(busiest, idlest, (slot,)))
    return planned


# -- move records ------------------------------------------------------------------------


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
    " changes_applied, backlog, pause_ms, epoch, error"
)


async def list_moves(conn: asyncpg.Connection, *, open_only: bool = False) -> list[Move]:
    where = f"WHERE phase IN {OPEN_PHASES!r}" if open_only else ""
    rows = await conn.fetch(f"SELECT {_MOVE_COLUMNS} FROM shardd_moves {where} ORDER BY id")
    return [Move.from_row(row) for row in rows]


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


async def _record(conn: asyncpg.Connection, move: Move, **changes: object) -> Move:
    updated = replace(move, **changes)  # type: ignore[arg-type]
    await conn.execute(
        "UPDATE shardd_moves SET phase = $2, position = $3, rows_copied = $4,"
        " bytes_copied = $5, changes_applied = $6, backlog = $7, pause_ms = $8, epoch = $9,"
        " error = $10, updated_at = now() WHERE id = $1",
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
    )
    return updated


async def finish_runs(conn: asyncpg.Connection) -> None:
    """Close rebalance runs none of whose moves is open any more."""
    await conn.execute(
        "UPDATE shardd_rebalances r SET state = CASE WHEN EXISTS (SELECT 1 FROM shardd_moves m"
        " WHERE m.rebalance = r.id AND m.phase = 'aborted') THEN 'aborted' ELSE 'done' END,"
        " updated_at = now() WHERE state = 'running' AND NOT EXISTS (SELECT 1 FROM"
        f" shardd_moves m WHERE m.rebalance = r.id AND m.phase IN {OPEN_PHASES!r})"
    )


# -- the mover ---------------------------------------------------------------------------


Progress = Callable[[Move], None]


class Mover:
    """Drives moves through their phases against the catalog and the shard primaries.

    ``catch_up_backlog``: freeze once a catch-up batch is at most this many changes.
    ``lease``: how long cleanup waits for instances to report the flip epoch at most.
    """

    def __init__(
        self,
        catalog_dsn: str,
        *,
        lease: float = 5.0,
        catch_up_backlog: int = 200,
        progress: Progress | None = None,
    ) -> None:
        self.catalog_dsn = catalog_dsn
        self.lease = lease
        self.catch_up_backlog = catch_up_backlog
        self.progress = progress or (lambda move: None)

    async def _shard(self, conn: asyncpg.Connection, name: str) -> tuple[Topology, Shard]:
        topo = await catalog.load_topology(conn)
        shard = topo.shards.get(name)
        if shard is None or shard.primary is None:
            raise MoveError(f"shard {name} has no primary")
        return topo, shard

    async def run(self, move: Move) -> Move:
        """Carry one move from its recorded phase to ``done``."""
        async with admin.connect(self.catalog_dsn) as cat:
            _, source = await self._shard(cat, move.source)
            _, target = await self._shard(cat, move.target)
            assert source.primary is not None and target.primary is not None
            async with (
                admin.connect(source.primary.dsn()) as src,
                admin.connect(target.primary.dsn()) as dst,
            ):
                if move.phase in ("planned", "copying"):
                    [move] = await self._copy(cat, src, dst, [move])
                if move.phase == "catching_up":
                    move = await self._catch_up(cat, src, dst, move)
                    move = await self._freeze(cat, src, move)
                if move.phase == "frozen":
                    move = await self._cut_over(cat, src, dst, move)
                if move.phase == "flipped":
                    move = await self._clean_up(cat, src, move)
        return move

    async def copy(self, moves: Sequence[Move]) -> list[Move]:
        """Copy several moves of one (source, target) pair in one pass over the source.

        Rows of a slot are scattered over the source's heap, so each pass reads much of
        it; copying a batch of groups together and cutting each over on its own keeps
        both the copy fast and every cutover small.
        """
        source, target = moves[0].source, moves[0].target
        assert all(m.source == source and m.target == target for m in moves)
        async with admin.connect(self.catalog_dsn) as cat:
            _, src_shard = await self._shard(cat, source)
            _, dst_shard = await self._shard(cat, target)
            assert src_shard.primary is not None and dst_shard.primary is not None
            async with (
                admin.connect(src_shard.primary.dsn()) as src,
                admin.connect(dst_shard.primary.dsn()) as dst,
            ):
                return await self._copy(cat, src, dst, list(moves))

    async def _copy(
        self,
        cat: asyncpg.Connection,
        src: asyncpg.Connection,
        dst: asyncpg.Connection,
        moves: list[Move],
    ) -> list[Move]:
        """Target importing and empty for the slots, then one consistent copy."""
        moves = [
            await _record(cat, m, phase="copying", rows_copied=0, bytes_copied=0) for m in moves
        ]
        for move in moves:
            self.progress(move)
        slots = [slot for move in moves for slot in move.slots]
        async with dst.transaction():
            await dst.execute("SET LOCAL shardd.copying = on")
            await dst.execute(
                "INSERT INTO shardd_slots (slot, state) SELECT unnest($1::int[]), 'importing'"
                " ON CONFLICT (slot) DO UPDATE SET state = 'importing', changed_at = now()",
                slots,
            )
            await dst.execute("DELETE FROM shardd_items WHERE slot = ANY($1::int[])", slots)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        copied_bytes = 0

        async def produce() -> str:
            async with src.transaction(isolation="repeatable_read", readonly=True):
                snapshot = await changelog.position(src)
                await src.copy_from_query(
                    f"SELECT {', '.join(COLUMNS)} FROM shardd_items WHERE slot = ANY($1::int[])",
                    slots,
                    output=queue.put,
                    format="binary",
                )
            await queue.put(None)
            return snapshot

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal copied_bytes
            while (chunk := await queue.get()) is not None:
                copied_bytes += len(chunk)
                yield chunk

        producer = asyncio.create_task(produce())
        try:
            async with dst.transaction():
                await dst.execute("SET LOCAL shardd.copying = on")
                status = await dst.copy_to_table(
                    "shardd_items", source=chunks(), columns=COLUMNS, format="binary"
                )
            snapshot = await producer
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(BaseException):
                    await producer
        total_rows = max(1, int(status.split()[-1]))
        per_slot = {
            row["slot"]: row["n"]
            for row in await dst.fetch(
                "SELECT slot, count(*) AS n FROM shardd_items WHERE slot = ANY($1::int[])"
                " GROUP BY slot",
                slots,
            )
        }
        copied = []
        for move in moves:
            await changelog.register(src, f"move-{move.id}", snapshot)
            rows = sum(per_slot.get(slot, 0) for slot in move.slots)
            move = await _record(
                cat,
                move,
                phase="catching_up",
                position=snapshot,
                rows_copied=rows,
                bytes_copied=copied_bytes * rows // total_rows,
            )
            self.progress(move)
            copied.append(move)
        return copied

    async def _apply_batch(
        self,
        cat: asyncpg.Connection,
        src: asyncpg.Connection,
        dst: asyncpg.Connection,
        move: Move,
        *,
        keep_log: bool = True,
    ) -> tuple[Move, int]:
        """Apply the changes since the move's position; ``keep_log`` also advances the
        move's consumer position on the source (skipped in the cutover, to keep it short:
        the position only protects entries from trimming)."""
        assert move.position is not None
        changes, position = await changelog.next_batch(src, move.position, slots=move.slots)
        applied = await changelog.apply(dst, changes) if changes else 0
        if keep_log:
            await changelog.register(src, f"move-{move.id}", position)
        move = await _record(
            cat,
            move,
            position=position,
            changes_applied=move.changes_applied + applied,
            backlog=len(changes),
        )
        return move, len(changes)

    async def _catch_up(
        self, cat: asyncpg.Connection, src: asyncpg.Connection, dst: asyncpg.Connection, move: Move
    ) -> Move:
        while True:
            move, pending = await self._apply_batch(cat, src, dst, move)
            self.progress(move)
            if pending <= self.catch_up_backlog:
                return move

    async def _freeze(self, cat: asyncpg.Connection, src: asyncpg.Connection, move: Move) -> Move:
        """Freeze the slots on the source, waiting exactly for the writes in flight.

        The exclusive slot locks are granted once every write holding the shared lock
        has committed or rolled back; every later write sees ``frozen`` and is refused.
        """
        async with src.transaction():
            await src.execute(
                "SELECT pg_advisory_xact_lock(shardd_slot_lock_class(), s)"
                " FROM unnest($1::int[]) AS s ORDER BY s",
                list(move.slots),
            )
            await src.execute(
                "UPDATE shardd_slots SET state = 'frozen', changed_at = now()"
                " WHERE slot = ANY($1::int[]) AND state = 'owned'",
                list(move.slots),
            )
        move = await _record(cat, move, phase="frozen", pause_ms=None)
        self.progress(move)
        return move

    async def _cut_over(
        self, cat: asyncpg.Connection, src: asyncpg.Connection, dst: asyncpg.Connection, move: Move
    ) -> Move:
        """Drain, verify, hand the slots over: target owned, source moved, catalog flip."""
        started = time.perf_counter()
        move, _ = await self._apply_batch(cat, src, dst, move, keep_log=False)
        slots = list(move.slots)
        source_sums, target_sums = await asyncio.gather(
            _checksums(src, slots), _checksums(dst, slots)
        )
        if source_sums != target_sums:
            differing = sorted(
                s
                for s in set(source_sums) | set(target_sums)
                if source_sums.get(s) != target_sums.get(s)
            )
            await self._undo(cat, src, dst, move)
            raise MoveError(
                f"move {move.id}: verification failed for slots {differing[:10]}; move aborted"
            )
        await dst.execute(
            "UPDATE shardd_slots SET state = 'owned', changed_at = now()"
            " WHERE slot = ANY($1::int[])",
            slots,
        )
        await src.execute(
            "UPDATE shardd_slots SET state = 'moved', changed_at = now()"
            " WHERE slot = ANY($1::int[])",
            slots,
        )
        async with cat.transaction():
            epoch = await catalog.set_slot_map(cat, dict.fromkeys(slots, move.target))
            move = await _record(
                cat,
                move,
                phase="flipped",
                epoch=epoch,
                pause_ms=(time.perf_counter() - started) * 1000,
            )
        self.progress(move)
        return move

    async def _clean_up(self, cat: asyncpg.Connection, src: asyncpg.Connection, move: Move) -> Move:
        """Delete the source's copy once no live instance can still route to it."""
        assert move.epoch is not None
        slots = list(move.slots)
        # A crash between the catalog flip and here may have left the source 'frozen'.
        await src.execute(
            "UPDATE shardd_slots SET state = 'moved', changed_at = now()"
            " WHERE slot = ANY($1::int[]) AND state <> 'moved'",
            slots,
        )
        behind = await catalog.wait_for_instances(
            cat, epoch=move.epoch, lease=self.lease, since=time.monotonic()
        )
        if behind:
            log.warning(
                "move %s: instances %s did not confirm epoch %s", move.id, behind, move.epoch
            )
        async with src.transaction():
            await src.execute("SET LOCAL shardd.copying = on")
            await src.execute("DELETE FROM shardd_items WHERE slot = ANY($1::int[])", slots)
        await changelog.unregister(src, f"move-{move.id}")
        move = await _record(cat, move, phase="done", backlog=0)
        self.progress(move)
        return move

    async def _undo(
        self, cat: asyncpg.Connection, src: asyncpg.Connection, dst: asyncpg.Connection, move: Move
    ) -> Move:
        slots = list(move.slots)
        await src.execute(
            "UPDATE shardd_slots SET state = 'owned', changed_at = now()"
            " WHERE slot = ANY($1::int[]) AND state IN ('frozen', 'moved')",
            slots,
        )
        async with dst.transaction():
            await dst.execute("SET LOCAL shardd.copying = on")
            await dst.execute("DELETE FROM shardd_items WHERE slot = ANY($1::int[])", slots)
            await dst.execute("DELETE FROM shardd_slots WHERE slot = ANY($1::int[])", slots)
        await changelog.unregister(src, f"move-{move.id}")
        move = await _record(cat, move, phase="aborted")
        self.progress(move)
        return move

    async def abort(self, move: Move) -> Move:
        """Give the slots back to the source (before ``flipped``), else finish the move."""
        if move.phase == "flipped":
            return await self.run(move)
        async with admin.connect(self.catalog_dsn) as cat:
            _, source = await self._shard(cat, move.source)
            _, target = await self._shard(cat, move.target)
            assert source.primary is not None and target.primary is not None
            async with (
                admin.connect(source.primary.dsn()) as src,
                admin.connect(target.primary.dsn()) as dst,
            ):
                return await self._undo(cat, src, dst, move)


async def _checksums(conn: asyncpg.Connection, slots: list[int]) -> dict[int, tuple[int, int]]:
    """slot -> (rows, order-independent checksum of every row's key, version and doc)."""
    rows = await conn.fetch(
        "SELECT slot, count(*) AS n, sum(hashtextextended(tbl || chr(31) || pk || chr(31) || sk"
        " || chr(31) || version::text, 0)::numeric + jsonb_hash_extended(doc, 0)) AS h"
        " FROM shardd_items WHERE slot = ANY($1::int[]) GROUP BY slot",
        slots,
    )
    return {row["slot"]: (row["n"], int(row["h"])) for row in rows}


# -- runs --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def runner_lock(catalog_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the one-rebalance-at-a-time lock (a session lock: released if we die)."""
    async with admin.connect(catalog_dsn) as conn:
        # A runner killed a moment ago holds it until the catalog notices: allow a little.
        deadline = time.monotonic() + 5
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1, 0)", LOCK_CLASS):
            if time.monotonic() > deadline:
                raise MoveError("another rebalance is running")
            await asyncio.sleep(0.1)
        yield conn


async def run_moves(
    mover: Mover, moves: Sequence[Move], *, max_parallel: int, copy_slots: int = 256
) -> list[Move]:
    """Run moves, at most ``max_parallel`` batches at once; stops at the first failure.

    Moves still to be copied are copied together per (source, target) pair, up to
    ``copy_slots`` slots per pass over the source; each is then caught up and cut over
    alone.
    """
    gate = asyncio.Semaphore(max_parallel)
    failed: list[BaseException] = []
    batches: list[list[Move]] = []
    for move in moves:
        last = batches[-1] if batches else None
        if (
            last is not None
            and move.phase in ("planned", "copying")
            and last[0].phase in ("planned", "copying")
            and (last[0].source, last[0].target) == (move.source, move.target)
            and sum(len(m.slots) for m in last) + len(move.slots) <= copy_slots
        ):
            last.append(move)
        else:
            batches.append([move])

    async def one(batch: list[Move]) -> list[Move]:
        async with gate:
            if failed:
                return batch
            try:
                if batch[0].phase in ("planned", "copying"):
                    batch = await mover.copy(batch)
                return [await mover.run(move) for move in batch]
            except BaseException as exc:
                failed.append(exc)
                raise

    results = await asyncio.gather(*(one(b) for b in batches), return_exceptions=True)
    async with admin.connect(mover.catalog_dsn) as cat:
        await finish_runs(cat)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [move for result in results if isinstance(result, list) for move in result]


async def estimate(catalog_dsn: str, moves: Sequence[PlannedMove]) -> list[dict[str, object]]:
    """Rows and bytes each planned move would copy (counted on the source primaries)."""
    async with admin.connect(catalog_dsn) as cat:
        topo = await catalog.load_topology(cat)
    result = []
    for move in moves:
        primary = topo.shards[move.source].primary
        if primary is None:
            raise MoveError(f"shard {move.source} has no primary")
        async with admin.connect(primary.dsn()) as conn:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(sum(pg_column_size(i.*)), 0) AS b"
                " FROM shardd_items i WHERE slot = ANY($1::int[])",
                list(move.slots),
            )
        result.append(
            {
                "source": move.source,
                "target": move.target,
                "slots": len(move.slots),
                "rows": row["n"],
                "bytes": int(row["b"]),
            }
        )
    return result


async def slot_write_load(topo: Topology, *, seconds: float) -> dict[int, float]:
    """Writes per second per slot over the last ``seconds``, from every shard's change log."""
    load: dict[int, float] = {}
    for shard in topo.shards.values():
        if shard.primary is None:
            continue
        async with admin.connect(shard.primary.dsn()) as conn:
            rows = await conn.fetch(
                "SELECT slot, count(*) AS n FROM shardd_changes"
                " WHERE at > now() - make_interval(secs => $1) GROUP BY slot",
                seconds,
            )
        for row in rows:
            load[row["slot"]] = load.get(row["slot"], 0.0) + row["n"] / seconds
    return load


async def plan_for(
    catalog_dsn: str,
    *,
    group_slots: int,
    by: str = "slots",
    load_window: float = 600.0,
) -> list[PlannedMove]:
    """The plan ``shardctl rebalance`` runs: by slot counts (weighted ring), or by load
    (the writes each slot took in the last ``load_window`` seconds)."""
    async with admin.connect(catalog_dsn) as cat:
        topo = await catalog.load_topology(cat)
        pinned = await catalog.pinned_slots(cat)
    if by == "load":
        load = await slot_write_load(topo, seconds=load_window)
        active = [name for name, shard in topo.shards.items() if shard.weight > 0]
        return plan_by_load(topo.slot_map, load, active)
    weights = {name: shard.weight for name, shard in topo.shards.items()}
    return plan(topo.slot_map, weights, pinned=pinned, group_slots=group_slots)


async def rebalance(
    mover: Mover,
    *,
    group_slots: int,
    max_parallel: int,
    reason: str = "rebalance",
    by: str = "slots",
) -> list[Move]:
    """Plan, record and run a rebalance (refused while another run is unfinished).

    A load-based plan pins each slot it moves (``shardd_slot_overrides``), so a later
    slot-count rebalance keeps the hot slots where load balancing put them.
    """
    async with runner_lock(mover.catalog_dsn) as cat:
        if await list_moves(cat, open_only=True):
            raise MoveError("a rebalance is unfinished: resume it (--resume) or abort it (--abort)")
        planned = await plan_for(mover.catalog_dsn, group_slots=group_slots, by=by)
        if not planned:
            return []
        moves = await create_run(cat, planned, reason=reason if by == "slots" else "by load")
        done = await run_moves(mover, moves, max_parallel=max_parallel)
        if by == "load":
            await catalog.pin_slots(cat, {s: m.target for m in done for s in m.slots})
        return done


async def resume(mover: Mover, *, max_parallel: int) -> list[Move]:
    async with runner_lock(mover.catalog_dsn) as cat:
        moves = await list_moves(cat, open_only=True)
        return await run_moves(mover, moves, max_parallel=max_parallel)


async def abort(mover: Mover) -> list[Move]:
    """Roll back every unfinished move (moves already flipped are completed instead)."""
    async with runner_lock(mover.catalog_dsn) as cat:
        moves = await list_moves(cat, open_only=True)
        done = [await mover.abort(move) for move in moves]
        await finish_runs(cat)
        return done


async def remove_shard(
    mover: Mover, name: str, *, group_slots: int, max_parallel: int
) -> list[Move]:
    """Move every slot off shard ``name`` (weight 0, then a rebalance), then unregister it."""
    async with admin.connect(mover.catalog_dsn) as cat:
        await catalog.set_weight(cat, name, 0)
    moves = await rebalance(
        mover, group_slots=group_slots, max_parallel=max_parallel, reason=f"remove {name}"
    )
    async with admin.connect(mover.catalog_dsn) as cat:
        await catalog.remove_shard(cat, name)
    return moves
