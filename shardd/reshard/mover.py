"""One move's steps against the catalog and the two shard primaries: copy, catch up,
freeze, verify, flip, clean up, and undo (see the package docstring for the safety
argument).

Primary changes.  A move records the terms of its source and target shards (the
catalog raises a shard's term with every promotion) when it starts copying.  Every
effect on a shard runs through :mod:`shardd.fencing`, whose SQL checks in the same
transaction that the node is an unfenced primary; and before each phase the mover
compares the recorded terms with the catalog's.  When a primary changes under a move
(its node refuses with SD002, its connection drops, or the term differs), the mover
waits for the shard's new primary and then:

* before the flip, starts the move over from the copy: the target gives up the slots
  (``importing``) *before* the source takes back any it had frozen, so at no instant do
  both own a slot, and the copy and the change-log position come from the new primary
  (an async promotion may reuse transaction ids that a position taken on the old one
  already counts as seen: never resume from such a position);
* after the flip, finishes the cleanup on the new primary (every step is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

import asyncpg

from .. import admin, catalog, changelog, errors, fencing
from ..fencing import SlotState
from .jobs import Move, Phase, get_move, record_step
from .plan import MoveError

log = logging.getLogger(__name__)

COLUMNS = ("tbl", "pk", "sk", "slot", "version", "doc", "updated_at")


Progress = Callable[[Move], None]
# What a move reports to its progress callback between verifying its copy and
# publishing the flip: the target owns the slots, the source has handed them over, the
# catalog does not say so yet.  Never recorded in the catalog (the row stays 'frozen').
FLIPPING = "flipping"


class PrimaryChanged(Exception):
    """A shard's primary changed under a move (or could not be reached)."""


# What a lost or replaced primary looks like from the mover's side.
_PRIMARY_LOST = (
    PrimaryChanged,
    TimeoutError,
    asyncpg.ReadOnlySQLTransactionError,
    *errors.CONNECT_ERRORS,
    *errors.LOST_CONNECTION_ERRORS,
)


def _primary_lost(exc: BaseException) -> bool:
    return isinstance(exc, _PRIMARY_LOST) or fencing.is_fenced_error(exc)


@dataclass
class Sides:
    cat: asyncpg.Connection
    src: asyncpg.Connection
    dst: asyncpg.Connection
    source_term: int
    target_term: int


class Mover:
    """Drives moves through their phases against the catalog and the shard primaries.

    ``catch_up_backlog``: freeze once a catch-up batch is at most this many changes.
    ``lease``: how long cleanup waits for instances to report the flip epoch at most.
    ``freeze_lock_timeout``: how long one freeze attempt waits for the writes in flight.
    ``primary_wait``: how long a move waits for a shard that lost its primary to get a
    new one before it gives up (and aborts, if it has not flipped).
    ``catch_up_timeout``: how long the catch-up, and then the freeze, may each take
    before the move is aborted (writes to the slots outpacing the copy, or a
    transaction holding a slot's lock for good).
    """

    def __init__(
        self,
        catalog_dsn: str,
        *,
        lease: float = 5.0,
        catch_up_backlog: int = 200,
        freeze_lock_timeout: float = 0.5,
        primary_wait: float = 60.0,
        catch_up_timeout: float = 600.0,
        progress: Progress | None = None,
    ) -> None:
        self.catalog_dsn = catalog_dsn
        self.lease = lease
        self.catch_up_backlog = catch_up_backlog
        self.freeze_lock_timeout = freeze_lock_timeout
        self.primary_wait = primary_wait
        self.catch_up_timeout = catch_up_timeout
        self.progress = progress or (lambda move: None)

    # -- connections --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _sides(self, source: str, target: str) -> AsyncIterator[Sides]:
        """Connections to the catalog and to the source's and target's primaries."""
        # Catalog statements are short: bounded, so a hung catalog fails the step.
        async with admin.connect(self.catalog_dsn, command_timeout=60.0) as cat:
            topo = await catalog.load_topology(cat)
            shards = []
            for name in (source, target):
                shard = topo.shards.get(name)
                if shard is None or shard.primary is None:
                    raise PrimaryChanged(f"shard {name} has no primary")
                shards.append(shard)
            async with (
                admin.connect(shards[0].primary.dsn()) as src,  # type: ignore[union-attr]
                admin.connect(shards[1].primary.dsn()) as dst,  # type: ignore[union-attr]
            ):
                yield Sides(cat, src, dst, shards[0].term, shards[1].term)

    async def _check_terms(self, sides: Sides, move: Move) -> None:
        """Raise PrimaryChanged when a shard's primary changed since ``sides`` opened."""
        rows = await sides.cat.fetch(
            "SELECT name, term FROM shardd_shards WHERE name = ANY($1::text[])",
            [move.source, move.target],
        )
        terms = {row["name"]: row["term"] for row in rows}
        if (terms.get(move.source), terms.get(move.target)) != (
            sides.source_term,
            sides.target_term,
        ):
            raise PrimaryChanged(f"move {move.id}: a primary changed (terms {terms})")

    # -- driving a move -----------------------------------------------------------

    async def run(self, move: Move) -> Move:
        """Carry one move from its recorded phase to ``done``, riding out primary changes."""
        return await self._persist(move, self._run_once)

    async def copy(self, moves: Sequence[Move]) -> list[Move]:
        """Copy several moves of one (source, target) pair in one pass over the source.

        Rows of a slot are scattered over the source's heap, so each pass reads much of
        it; copying a batch of groups together and cutting each over on its own keeps
        both the copy fast and every cutover small.  A primary change during the copy
        only makes each move start over in :meth:`run`.
        """
        source, target = moves[0].source, moves[0].target
        assert all(m.source == source and m.target == target for m in moves)
        try:
            async with self._sides(source, target) as sides:
                return await self._copy(sides, list(moves))
        except Exception as exc:
            if not _primary_lost(exc):
                raise
            log.warning("copy of moves %s interrupted: %s", [m.id for m in moves], exc)
            return list(moves)

    async def _persist(self, move: Move, step: Callable[[Sides, Move], Awaitable[Move]]) -> Move:
        """Run ``step`` until it finishes, waiting out primary changes for at most
        ``primary_wait`` since the move last got somewhere; give up (undo before the
        flip) after that."""
        waiting_since = time.monotonic()
        seen: Move | None = None
        while True:
            try:
                async with self._sides(move.source, move.target) as sides:
                    move = await get_move(sides.cat, move.id)
                    if move != seen:  # the last attempt got somewhere: a new wait begins
                        seen, waiting_since = move, time.monotonic()
                    return await step(sides, move)
            except changelog.ConsumerExpired as exc:
                await self._give_up(move, exc)
            except Exception as exc:
                if not _primary_lost(exc):
                    raise
                if time.monotonic() - waiting_since > self.primary_wait:
                    await self._give_up(
                        move,
                        PrimaryChanged(
                            f"no usable primaries within {self.primary_wait:.0f}s: {exc}"
                        ),
                    )
                log.warning("move %s: %s; waiting for the shards' primaries", move.id, exc)
                await asyncio.sleep(0.2)

    async def _give_up(self, move: Move, exc: BaseException) -> NoReturn:
        """Abort a move that cannot go on (undo, before the flip) and raise MoveError."""
        with contextlib.suppress(Exception):
            async with self._sides(move.source, move.target) as sides:
                move = await get_move(sides.cat, move.id)
                if move.phase not in (Phase.FLIPPED, Phase.DONE, Phase.ABORTED):
                    await self._undo(sides, move)
        raise MoveError(f"move {move.id} aborted: {exc}") from exc

    async def _run_once(self, sides: Sides, move: Move) -> Move:
        if move.phase in (Phase.DONE, Phase.ABORTED):
            return move
        if move.phase != Phase.FLIPPED and (move.source_term, move.target_term) != (
            sides.source_term,
            sides.target_term,
        ):
            if move.phase != Phase.PLANNED:
                log.warning(
                    "move %s: a primary changed during %s; copying again", move.id, move.phase
                )
            [move] = await self._copy(sides, [move])
        if move.phase in (Phase.PLANNED, Phase.COPYING):
            [move] = await self._copy(sides, [move])
        if move.phase == Phase.CATCHING_UP:
            move = await self._catch_up(sides, move)
        if move.phase in (Phase.CATCHING_UP, Phase.FROZEN):
            # Resuming from 'frozen' freezes again: a promotion may have lost the freeze.
            move = await self._freeze(sides, move)
            move = await self._cut_over(sides, move)
        if move.phase == Phase.FLIPPED:
            move = await self._clean_up(sides, move)
        return move

    # -- the phases ---------------------------------------------------------------

    async def _copy(self, sides: Sides, moves: list[Move]) -> list[Move]:
        """Target importing and empty, source owning, then one consistent copy.

        The target gives up the slots before the source takes back any it froze or
        handed over in an earlier attempt: never two owners.  The move's change-log
        consumer is registered before the copy's snapshot is taken, so nothing the
        catch-up needs can be trimmed meanwhile.
        """
        cat, src, dst = sides.cat, sides.src, sides.dst
        moves = [
            await record_step(
                cat,
                m,
                phase=Phase.COPYING,
                rows_copied=0,
                bytes_copied=0,
                source_term=sides.source_term,
                target_term=sides.target_term,
            )
            for m in moves
        ]
        for move in moves:
            self.progress(move)
        slots = [slot for move in moves for slot in move.slots]
        async with dst.transaction():
            await fencing.set_slot_states(dst, slots, SlotState.IMPORTING)
            await dst.execute("SET LOCAL shardd.copying = on")
            await dst.execute("DELETE FROM shardd_items WHERE slot = ANY($1::int[])", slots)
        await fencing.set_slot_states(
            src, slots, SlotState.OWNED, only_from=(SlotState.FROZEN, SlotState.MOVED)
        )
        before = await changelog.position(src)
        for move in moves:
            await changelog.register(src, f"move-{move.id}", before)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        copied_bytes = 0

        async def produce() -> str:
            try:
                async with src.transaction(isolation="repeatable_read", readonly=True):
                    snapshot = await changelog.position(src)
                    await src.copy_from_query(
                        f"SELECT {', '.join(COLUMNS)} FROM shardd_items"
                        " WHERE slot = ANY($1::int[])",
                        slots,
                        output=queue.put,
                        format="binary",
                    )
            finally:
                # Also when the source fails: the target's COPY must end, not wait forever
                # (its partial copy is thrown away when the producer's error surfaces).
                await queue.put(None)
            return snapshot

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal copied_bytes
            while (chunk := await queue.get()) is not None:
                copied_bytes += len(chunk)
                yield chunk

        # Checked on its own, not inside the COPY's transaction: holding the node lock for
        # the whole copy would stall a switchover (and every write queued behind it).  A
        # copy that lands on a node fenced meanwhile is caught by the next step's fencing
        # or term check, and copied again.
        await fencing.assert_primary(dst)
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
            await changelog.advance(src, f"move-{move.id}", snapshot)
            rows = sum(per_slot.get(slot, 0) for slot in move.slots)
            move = await record_step(
                cat,
                move,
                phase=Phase.CATCHING_UP,
                position=snapshot,
                rows_copied=rows,
                bytes_copied=copied_bytes * rows // total_rows,
            )
            self.progress(move)
            copied.append(move)
        return copied

    async def _apply_batch(
        self, sides: Sides, move: Move, *, keep_log: bool = True
    ) -> tuple[Move, int]:
        """Apply the changes since the move's position; ``keep_log`` also advances the
        move's consumer position on the source (skipped in the cutover, to keep it short:
        the position only protects entries from trimming)."""
        assert move.position is not None
        changes, position = await changelog.next_batch(sides.src, move.position, slots=move.slots)
        applied = await changelog.apply(sides.dst, changes) if changes else 0
        if keep_log:
            await changelog.advance(sides.src, f"move-{move.id}", position)
        move = await record_step(
            sides.cat,
            move,
            position=position,
            changes_applied=move.changes_applied + applied,
            backlog=len(changes),
        )
        return move, len(changes)

    async def _catch_up(self, sides: Sides, move: Move) -> Move:
        deadline = time.monotonic() + self.catch_up_timeout
        while True:
            move, pending = await self._apply_batch(sides, move)
            self.progress(move)
            if pending <= self.catch_up_backlog:
                return move
            if time.monotonic() > deadline:
                await self._undo(sides, move)
                raise MoveError(
                    f"move {move.id}: the slots' writes outpaced the catch-up for"
                    f" {self.catch_up_timeout:.0f}s (backlog {pending}); move aborted"
                )

    async def _freeze(self, sides: Sides, move: Move) -> Move:
        """Freeze the slots on the source (see :func:`shardd.fencing.freeze`).

        Each attempt waits at most ``freeze_lock_timeout`` for the writes in flight; a
        long transaction on a slot makes the attempt fail without effect, and the mover
        catches up again and retries.
        """
        await self._check_terms(sides, move)
        deadline = time.monotonic() + self.catch_up_timeout
        while True:
            try:
                await fencing.freeze(sides.src, move.slots, lock_timeout=self.freeze_lock_timeout)
                break
            except asyncpg.LockNotAvailableError:
                if time.monotonic() > deadline:
                    await self._undo(sides, move)
                    raise MoveError(
                        f"move {move.id}: writes in flight held the freeze back for"
                        f" {self.catch_up_timeout:.0f}s; move aborted"
                    ) from None
                log.info("move %s: writes in flight held the freeze back; retrying", move.id)
                move, _ = await self._apply_batch(sides, move)
        move = await record_step(sides.cat, move, phase=Phase.FROZEN, pause_ms=None)
        self.progress(move)
        return move

    async def _cut_over(self, sides: Sides, move: Move) -> Move:
        """Drain, verify, hand the slots over: target owned, source moved, catalog flip."""
        cat, src, dst = sides.cat, sides.src, sides.dst
        started = time.perf_counter()
        move, _ = await self._apply_batch(sides, move, keep_log=False)
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
            await self._undo(sides, move)
            raise MoveError(
                f"move {move.id}: verification failed for slots {differing[:10]}; move aborted"
            )
        await self._check_terms(sides, move)
        await fencing.set_slot_states(dst, slots, SlotState.OWNED)
        await fencing.set_slot_states(src, slots, SlotState.MOVED)
        self.progress(replace(move, phase=FLIPPING))
        async with cat.transaction():
            # The flip is published only if both primaries are still the ones that took
            # the states above (a lock on the shard rows holds promotions back meanwhile;
            # a mover that stalls here lets go of it after a few seconds).
            await cat.execute("SET LOCAL idle_in_transaction_session_timeout = '10s'")
            await cat.execute(
                "SELECT 1 FROM shardd_shards WHERE name = ANY($1::text[]) FOR SHARE",
                [move.source, move.target],
            )
            await self._check_terms(sides, move)
            epoch = await catalog.set_slot_map(cat, dict.fromkeys(slots, move.target))
            move = await record_step(
                cat,
                move,
                phase=Phase.FLIPPED,
                epoch=epoch,
                pause_ms=(time.perf_counter() - started) * 1000,
            )
        self.progress(move)
        return move

    async def _clean_up(self, sides: Sides, move: Move) -> Move:
        """Delete the source's copy once no live instance can still route to it.

        Idempotent, and runs on whatever nodes are the primaries now: after a promotion
        the source may lack 'moved' (lost with an asynchronous primary) and gets it
        again; the catalog has named the target.
        """
        assert move.epoch is not None
        slots = list(move.slots)
        if sides.target_term != move.target_term:
            # The target was promoted since the flip: an asynchronous (or forced) promotion
            # may have lost the copy.  The target's WAL has the 'owned' states after every
            # copied row, so the copy survived exactly when they did; otherwise the
            # source's copy is the only good one and stays.  (Comparing the two copies
            # would not tell: the target has taken writes since the flip.)
            owned = await sides.dst.fetchval(
                "SELECT count(*) FROM shardd_slots WHERE slot = ANY($1::int[]) AND state = $2",
                slots,
                str(SlotState.OWNED),
            )
            if owned != len(slots):
                raise MoveError(
                    f"move {move.id}: the target's promotion after the flip lost the copy"
                    f" ({len(slots) - owned} slots not owned there); the source's copy is"
                    " kept (repair before --resume)"
                )
        await fencing.set_slot_states(sides.dst, slots, SlotState.OWNED)
        await fencing.set_slot_states(sides.src, slots, SlotState.MOVED)
        behind = await catalog.wait_for_instances(
            sides.cat, epoch=move.epoch, lease=self.lease, since=time.monotonic()
        )
        if behind:
            log.warning(
                "move %s: instances %s did not confirm epoch %s", move.id, behind, move.epoch
            )
        async with sides.src.transaction():
            await fencing.assert_primary(sides.src)
            await sides.src.execute("SET LOCAL shardd.copying = on")
            await sides.src.execute("DELETE FROM shardd_items WHERE slot = ANY($1::int[])", slots)
        await changelog.unregister(sides.src, f"move-{move.id}")
        move = await record_step(sides.cat, move, phase=Phase.DONE, backlog=0)
        self.progress(move)
        return move

    async def _undo(self, sides: Sides, move: Move) -> Move:
        """Give the slots back to the source: the target forgets them first, then the
        source owns them again (never two owners), then the partial copy goes."""
        slots = list(move.slots)
        async with sides.dst.transaction():
            await fencing.forget_slots(sides.dst, slots)
            await sides.dst.execute("SET LOCAL shardd.copying = on")
            await sides.dst.execute("DELETE FROM shardd_items WHERE slot = ANY($1::int[])", slots)
        await fencing.set_slot_states(
            sides.src, slots, SlotState.OWNED, only_from=(SlotState.FROZEN, SlotState.MOVED)
        )
        await changelog.unregister(sides.src, f"move-{move.id}")
        move = await record_step(sides.cat, move, phase=Phase.ABORTED)
        self.progress(move)
        return move

    async def abort(self, move: Move) -> Move:
        """Give the slots back to the source (before ``flipped``), else finish the move."""

        async def step(sides: Sides, move: Move) -> Move:
            if move.phase in (Phase.FLIPPED, Phase.DONE, Phase.ABORTED):
                return await self._run_once(sides, move)
            return await self._undo(sides, move)

        return await self._persist(move, step)


async def _checksums(conn: asyncpg.Connection, slots: list[int]) -> dict[int, tuple[int, int]]:
    """slot -> (rows, order-independent checksum over the rows).

    Each row's hash covers its key, version and document together (the key's hash
    seeds the document's), so two rows that swapped documents change the sum.
    """
    rows = await conn.fetch(
        "SELECT slot, count(*) AS n, sum(jsonb_hash_extended(doc, hashtextextended(tbl"
        " || chr(31) || pk || chr(31) || sk || chr(31) || version::text, 0))::numeric) AS h"
        " FROM shardd_items WHERE slot = ANY($1::int[]) GROUP BY slot",
        slots,
    )
    return {row["slot"]: (row["n"], int(row["h"])) for row in rows}
