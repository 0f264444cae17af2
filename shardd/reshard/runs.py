"""Rebalance runs: plan from the live catalog, record, run moves in parallel, resume,
abort, remove a shard; one runner at a time (an advisory lock on the catalog)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

from .. import admin, catalog, changelog, fencing, hotkeys
from ..placement import slot_of
from ..topology import Topology
from ..views import progress
from .jobs import Move, Phase, create_run, finish_runs, list_moves
from .mover import Mover
from .plan import MoveError, PlannedMove, plan, plan_by_load

TO_COPY = (Phase.PLANNED, Phase.COPYING)


@contextlib.asynccontextmanager
async def runner_lock(catalog_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the one-rebalance-at-a-time lock (a session lock: released if we die)."""
    async with admin.connect(catalog_dsn) as conn:
        # A runner killed a moment ago holds it until the catalog notices: allow a little.
        deadline = time.monotonic() + 5
        while not await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, 0)", fencing.REBALANCE_LOCK_CLASS
        ):
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
            and move.phase in TO_COPY
            and last[0].phase in TO_COPY
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
                if batch[0].phase in TO_COPY:
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
    """Rows and bytes each planned move would copy, counted on the source primaries: one
    connection and one query per source shard, whatever the number of moves."""
    async with admin.connect(catalog_dsn) as cat:
        topo = await catalog.load_topology(cat)
    per_slot: dict[int, tuple[int, int]] = {}  # slot -> (rows, bytes)
    for source in sorted({move.source for move in moves}):
        primary = topo.shards[source].primary
        if primary is None:
            raise MoveError(f"shard {source} has no primary")
        slots = [slot for move in moves if move.source == source for slot in move.slots]
        async with admin.connect(primary.dsn()) as conn:
            rows = await conn.fetch(
                "SELECT slot, count(*) AS n, coalesce(sum(pg_column_size(i.*)), 0) AS b"
                " FROM shardd_items i WHERE slot = ANY($1::int[]) GROUP BY slot",
                slots,
            )
        per_slot.update({row["slot"]: (row["n"], int(row["b"])) for row in rows})
    return [
        {
            "source": move.source,
            "target": move.target,
            "slots": len(move.slots),
            "rows": sum(per_slot.get(slot, (0, 0))[0] for slot in move.slots),
            "bytes": sum(per_slot.get(slot, (0, 0))[1] for slot in move.slots),
        }
        for move in moves
    ]


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


@dataclass(frozen=True)
class Load:
    """Requests per second per slot, and the keys no slot move can balance."""

    slots: dict[int, float]
    celebrities: list[hotkeys.HotKey]  # each busier alone than a shard's fair share


async def measure_load(catalog_dsn: str, *, window: float = 600.0, report_age: float = 5.0) -> Load:
    """Each slot's load: the larger of its writes per second over the last ``window``
    seconds (the change logs) and its reads and writes per second now (the instances'
    traffic reports, when any instance reported within ``report_age`` seconds)."""
    async with admin.connect(catalog_dsn) as cat:
        topo = await catalog.load_topology(cat)
        reports = await hotkeys.fresh_reports(cat, max_age=report_age)
    load = await slot_write_load(topo, seconds=window)
    view = hotkeys.merge(reports, topo, window=window)
    for slot, rate in view.slot_rates.items():
        load[slot] = max(load.get(slot, 0.0), rate)
    active = [name for name, shard in topo.shards.items() if shard.weight > 0]
    fair = sum(load.values()) / max(1, len(active))
    celebrities = [
        key
        for key in view.keys
        if fair > 0
        and key.reads_per_s + key.writes_per_s > fair
        and key.shard in active  # not already alone on a shard of its own
    ]
    return Load(load, celebrities)


async def plan_for(
    catalog_dsn: str,
    *,
    group_slots: int,
    by: str = "slots",
    load: Load | None = None,
) -> list[PlannedMove]:
    """The plan ``shardctl rebalance`` runs: by slot counts (weighted ring), or by load
    (:func:`measure_load`, unless given)."""
    async with admin.connect(catalog_dsn) as cat:
        topo = await catalog.load_topology(cat)
        pinned = await catalog.pinned_slots(cat)
    if by == "load":
        measured = load or await measure_load(catalog_dsn)
        active = [name for name, shard in topo.shards.items() if shard.weight > 0]
        # A slot pinned to a shard of its own (an isolation) is never moved by load.
        fixed = {slot for slot, shard in pinned.items() if shard not in active}
        return plan_by_load(topo.slot_map, measured.slots, active, fixed=fixed)
    weights = {name: shard.weight for name, shard in topo.shards.items()}
    return plan(topo.slot_map, weights, pinned=pinned, group_slots=group_slots)


async def rebalance(
    mover: Mover,
    *,
    group_slots: int,
    max_parallel: int,
    reason: str = "rebalance",
    by: str = "slots",
    load: Load | None = None,
) -> list[Move]:
    """Plan, record and run a rebalance (refused while another run is unfinished).

    A load-based plan pins each slot it moves (``shardd_slot_overrides``), so a later
    slot-count rebalance keeps the hot slots where load balancing put them.
    """
    async with runner_lock(mover.catalog_dsn) as cat:
        if await list_moves(cat, open_only=True):
            raise MoveError("a rebalance is unfinished: resume it (--resume) or abort it (--abort)")
        planned = await plan_for(mover.catalog_dsn, group_slots=group_slots, by=by, load=load)
        if not planned:
            return []
        moves = await create_run(cat, planned, reason=reason if by == "slots" else "by load")
        done = await run_moves(mover, moves, max_parallel=max_parallel)
        if by == "load":
            await catalog.pin_slots(cat, {s: m.target for m in done for s in m.slots})
        return done


@dataclass(frozen=True)
class Isolation:
    slot: int
    shard: str
    planned: list[PlannedMove]  # the celebrity's slot onto the shard, the others off it


async def plan_isolation(catalog_dsn: str, *, pk: str, to: str, group_slots: int) -> Isolation:
    """The moves that leave ``pk``'s slot alone on shard ``to``: pinned there, and every
    other slot moved off it (its weight becomes 0)."""
    async with admin.connect(catalog_dsn) as cat:
        topo = await catalog.load_topology(cat)
        pinned = await catalog.pinned_slots(cat)
    if to not in topo.shards:
        raise MoveError(f"no shard {to}")
    slot = slot_of(pk, topo.slot_count)
    weights = {name: shard.weight for name, shard in topo.shards.items()}
    weights[to] = 0
    if not any(weights.values()):
        raise MoveError(f"isolating onto {to} would leave no shard for the other slots")
    # Other pins to the shard (a load rebalance's) give way: it holds this slot alone.
    pins = {s: shard for s, shard in pinned.items() if shard != to}
    planned = plan(topo.slot_map, weights, pinned={**pins, slot: to}, group_slots=group_slots)
    return Isolation(slot, to, planned)


async def isolate(
    mover: Mover, *, pk: str, to: str, group_slots: int, max_parallel: int
) -> tuple[Isolation, list[Move]]:
    """Give ``pk``'s slot a shard of its own, online (see :func:`plan_isolation`).

    The pin and the weight are recorded before anything moves, so a later rebalance (by
    slots or by load) keeps the slot there and gives the shard nothing else.
    """
    async with runner_lock(mover.catalog_dsn) as cat:
        if await list_moves(cat, open_only=True):
            raise MoveError("a rebalance is unfinished: resume it (--resume) or abort it (--abort)")
        isolation = await plan_isolation(mover.catalog_dsn, pk=pk, to=to, group_slots=group_slots)
        async with cat.transaction():
            # Under the lock, but check again where it is changed: the shard is not the
            # last one with a weight.
            others = await cat.fetchval(
                "SELECT count(*) FROM shardd_shards WHERE weight > 0 AND name <> $1", to
            )
            if not others:
                raise MoveError(f"isolating onto {to} would leave no shard for the other slots")
            await cat.execute(
                "DELETE FROM shardd_slot_overrides WHERE shard = $1 AND slot <> $2",
                to,
                isolation.slot,
            )
            await catalog.pin_slots(cat, {isolation.slot: to})
            await catalog.set_weight(cat, to, 0)
        if not isolation.planned:
            return isolation, []
        moves = await create_run(cat, isolation.planned, reason=f"isolate slot {isolation.slot}")
        return isolation, await run_moves(mover, moves, max_parallel=max_parallel)


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
    """Move every slot off shard ``name`` (weight 0, its pins dropped, then a
    rebalance), then unregister it."""
    async with runner_lock(mover.catalog_dsn) as cat:
        async with cat.transaction():
            await cat.execute("DELETE FROM shardd_slot_overrides WHERE shard = $1", name)
            await catalog.set_weight(cat, name, 0)
    moves = await rebalance(
        mover, group_slots=group_slots, max_parallel=max_parallel, reason=f"remove {name}"
    )
    async with admin.connect(mover.catalog_dsn) as cat:
        await _views_done_with(cat, name, within=mover.catch_up_timeout)
        await catalog.remove_shard(cat, name)
    return moves


async def _views_done_with(cat: asyncpg.Connection, name: str, *, within: float) -> None:
    """Before a shard goes: every view has applied its change log to the end (its
    slots are gone, so nothing more is written there)."""
    topology = await catalog.load_topology(cat)
    shard = topology.shards.get(name)
    if shard is None or not any(v.state != "deleting" for v in topology.views.values()):
        return
    if shard.primary is None:
        raise MoveError(
            f"{name} has no primary: the views' maintenance cannot confirm it applied"
            f" {name}'s last changes; {name} is kept, without slots"
        )
    async with admin.connect(shard.primary.dsn()) as conn:
        now = await changelog.position(conn)
    late = await progress.wait_applied(cat, name, now, within=within)
    if late:
        raise MoveError(
            f"views {', '.join(late)} have not applied {name}'s last changes within"
            f" {within:.0f}s (is view maintenance running?); {name} is kept, without"
            " slots; run the removal again"
        )
