"""One move's steps against the catalog and the two shard primaries: copy, catch up,
freeze, verify, flip, clean up, and undo (see the package docstring for the safety
argument)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg

from .. import admin, catalog, changelog
from .jobs import Move, record_step
from .plan import MoveError

log = logging.getLogger(__name__)

COLUMNS = ("tbl", "pk", "sk", "slot", "version", "doc", "updated_at")


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

    @contextlib.asynccontextmanager
    async def _sides(
        self, source: str, target: str
    ) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection, asyncpg.Connection]]:
        """Connections to the catalog and to the source's and target's primaries."""
        async with admin.connect(self.catalog_dsn) as cat:
            topo = await catalog.load_topology(cat)
            primaries = []
            for name in (source, target):
                shard = topo.shards.get(name)
                if shard is None or shard.primary is None:
                    raise MoveError(f"shard {name} has no primary")
                primaries.append(shard.primary)
            async with (
                admin.connect(primaries[0].dsn()) as src,
                admin.connect(primaries[1].dsn()) as dst,
            ):
                yield cat, src, dst

    async def run(self, move: Move) -> Move:
        """Carry one move from its recorded phase to ``done``."""
        async with self._sides(move.source, move.target) as (cat, src, dst):
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
        async with self._sides(source, target) as (cat, src, dst):
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
            await record_step(cat, m, phase="copying", rows_copied=0, bytes_copied=0) for m in moves
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
            move = await record_step(
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
        move = await record_step(
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
        move = await record_step(cat, move, phase="frozen", pause_ms=None)
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
            move = await record_step(
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
        move = await record_step(cat, move, phase="done", backlog=0)
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
        move = await record_step(cat, move, phase="aborted")
        self.progress(move)
        return move

    async def abort(self, move: Move) -> Move:
        """Give the slots back to the source (before ``flipped``), else finish the move."""
        if move.phase == "flipped":
            return await self.run(move)
        async with self._sides(move.source, move.target) as (cat, src, dst):
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
