"""The executor: runs one unit of work on one node of a shard, under the request's deadline.

Work is one shape everywhere: ``work(conn) -> result``, an ``async`` function of a
connection (:data:`Work`).  The executor picks the node (the primary for writes, the
best node for the consistency asked for reads), translates every failure into what it
means for the caller, buffers writes while a shard has no primary, and paces the retries
of an operation that a shard refused because this instance's map was stale.

Safety notes:

* Fencing is not ours to trust: the shard checks slot ownership in the same transaction
  as the write.  An instance with an old map is refused (``StaleMap``), refreshes, and
  retries until the request's deadline; nothing it does here can double-own a slot.
* A write whose connection is lost or whose deadline passes after it was sent may have
  committed: it is reported as ``OutcomeUnknown`` and never retried.
* A write that could not reach a primary (none on record, or the connection was
  refused) wrote nothing: it waits for a new primary up to ``write_buffer_timeout``.
  So does a read that no node could serve (a primary gone while its replica is being
  promoted: out of recovery, so no replica any more, and not recorded as primary yet).
* A write goes out only under the watcher's topology lease and is counted in flight
  until it ends (see :mod:`shardd.watcher`).
* A query interrupted by the deadline is cancelled on the server, not left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from . import errors, metrics, router
from .config import Settings
from .nodes import UNREPLICATED, HealthMonitor, NodePools, on_notice
from .topology import Node, Shard, Topology
from .watcher import TopologyWatcher

T = TypeVar("T")
Work = Callable[[asyncpg.Connection], Awaitable[T]]


def _after(min_lsn: int, work: Work[T]) -> Work[T]:
    """``work`` on a replica, once it has replayed ``min_lsn`` (else NotCaughtUp).

    The position is checked in a statement of its own, before the read's.  The read's
    functions compare it too, but a statement takes its snapshot before its functions
    run: a commit replayed in between would pass that comparison while the snapshot
    misses it, and a session would not read its own write.  The read's statement here
    starts after the position was seen, so its snapshot has the commit.  (A primary
    needs no such check: what it acknowledged is visible there.)
    """

    async def run(conn: asyncpg.Connection) -> T:
        if not await conn.fetchval("SELECT shardd_caught_up($1)", min_lsn):
            raise errors.NotCaughtUp
        return await work(conn)

    return run


RETRY_BUDGET = 0.5  # seconds a retry after a refused slot needs left before the deadline
# Seconds a connection whose query the deadline interrupted may wait for the shard to
# confirm the cancel before it is dropped.
CANCEL_WAIT = 1.0


@dataclass(frozen=True)
class Served:
    """Where an operation ran."""

    shard: str
    node: str

    def header(self) -> str:
        return f"{self.shard}/{self.node}"


class NodeLost(Exception):
    """A read's node failed before answering; another node may serve it."""


class NotSent(Exception):
    """A write was not sent after all: route it again under the current topology."""


class LeaseLapsed(NotSent):
    """Too little of the lease was left once a write had its connection."""


class PrimaryReplaced(NotSent):
    """A newer topology arrived while the write waited for its connection, and its node
    is no longer a primary there."""


class Executor:
    def __init__(
        self,
        settings: Settings,
        *,
        watcher: TopologyWatcher,
        health: HealthMonitor,
        pools: NodePools,
    ) -> None:
        self.settings = settings
        self.watcher = watcher
        self.health = health
        self.pools = pools
        self._background: set[asyncio.Task[None]] = set()
        # node -> (epoch, when) it refused a write as fenced (see _known_fenced)
        self._fenced: dict[str, tuple[int, float]] = {}

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.pools.close()

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout

    def position_of(self, node: str) -> int:
        """A WAL position ``node`` had reached at its last health check (0: unknown): a
        read it answered since saw at least that much."""
        state = self.health.snapshot.get(node)
        return state.lsn if state is not None and state.lsn is not None else 0

    # -- writes ------------------------------------------------------------------

    async def write(
        self, shard: Shard, work: Work[T], *, epoch: int, deadline: float
    ) -> tuple[T, Served]:
        """Run a write on one shard's primary, waiting for one if there is none.

        ``shard`` is as the topology of ``epoch`` describes it.  A shard refusing the
        slots raises StaleMap: the caller re-routes (single writes) or regroups (batches).
        """
        buffer_until: float | None = None
        while True:
            await self.watcher.confirm_lease(deadline)
            primary = shard.primary
            if shard.write_block is not None:
                raise errors.WritesRefused(shard.name, shard.write_block)
            try:
                if primary is None:
                    raise errors.ShardUnavailable(shard.name, "it has no primary")
                if self._known_fenced(primary):
                    raise errors.ShardUnavailable(shard.name, f"{primary.name} is fenced")
                try:
                    result = await self._run(
                        shard.name, primary, work, writing=True, deadline=deadline
                    )
                except errors.NodeFenced:
                    # Its replacement is on the way: more writes sent there are refused
                    # too, and one sent as it shuts down (Patroni restarts a replaced
                    # primary) would end ambiguous.  Wait for the new primary instead.
                    self._fenced[primary.name] = (
                        self.watcher.require_topology().epoch,
                        time.monotonic(),
                    )
                    raise errors.ShardUnavailable(
                        shard.name, f"{primary.name} is fenced; its replacement is not recorded yet"
                    ) from None
                return result, Served(shard.name, primary.name)
            except NotSent:  # route again under the topology now current
                fresh = self.watcher.require_topology().shards.get(shard.name)
                if fresh is None:
                    raise errors.StaleMap(f"shard {shard.name} is gone") from None
                shard = fresh
                continue
            except errors.ShardUnavailable as exc:  # nothing was written: wait for a primary
                if buffer_until is None:
                    buffer_until = min(
                        deadline - 0.05, time.monotonic() + self.settings.write_buffer_timeout
                    )
                if primary is not None and self._known_fenced(primary):
                    # Its replacement is recorded any moment: ask the catalog (one query
                    # shared by every waiting write) rather than wait for its notice.
                    with contextlib.suppress(errors.CatalogUnavailable):
                        await self.watcher.refresh(
                            seen_epoch=self.watcher.require_topology().epoch,
                            deadline=buffer_until,
                        )
                await self._await_topology(epoch, exc, buffer_until, writing=True)
                topology = self.watcher.require_topology()
                epoch = topology.epoch
                shard = topology.shards.get(shard.name, shard)

    def _known_fenced(self, node: Node) -> bool:
        """Whether ``node`` refused a write as fenced under the current topology and no
        health check has found it unfenced since (a switchover undone)."""
        seen = self._fenced.get(node.name)
        if seen is None:
            return False
        epoch, at = seen
        topology = self.watcher.topology
        state = self.health.snapshot.get(node.name)
        if (topology is not None and topology.epoch != epoch) or (
            state is not None
            and state.checked_at > at
            and state.fenced is False
            and state.in_recovery is False
        ):
            del self._fenced[node.name]
            return False
        return True

    async def _await_topology(
        self, epoch: int, failure: errors.ShardUnavailable, until: float, *, writing: bool = False
    ) -> None:
        """Buffer an operation that found no node to serve it (a write: no reachable
        primary): wait for a new topology (or a moment, to try again) until ``until``;
        then fail with the original 503."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            if writing:
                metrics.WRITES_NO_PRIMARY.labels(failure.shard).inc()
            raise failure
        changed = self.watcher.changed()
        current = self.watcher.topology
        if current is not None and current.epoch != epoch:
            return
        gauge = metrics.BUFFERED_WRITES if writing else metrics.BUFFERED_READS
        gauge.inc()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.25)):
                    await changed.wait()
        finally:
            gauge.dec()

    # -- reads -------------------------------------------------------------------

    async def read(
        self,
        shard: Shard,
        work: Work[T],
        *,
        consistency: str,
        min_lsn: int | None,
        deadline: float,
        spread: bool = False,
    ) -> tuple[T, Served]:
        """Run a read on the best node of ``shard`` for the consistency asked (``spread``:
        an eventual read takes turns over the primary too, for hot keys).

        ``work`` raises :class:`~shardd.errors.NotCaughtUp` when its node has not replayed
        ``min_lsn`` (or a cutover), and a replica refuses a slot it has not replayed the
        cutover of: the next candidate, finally the primary, is tried.  A node that fails
        is skipped once; raises StaleMap when the primary refuses the slot.
        """
        buffer_until: float | None = None
        while True:
            epoch = self.watcher.require_topology().epoch
            try:
                return await self._read_once(
                    shard,
                    work,
                    consistency=consistency,
                    min_lsn=min_lsn,
                    deadline=deadline,
                    spread=spread,
                )
            except errors.ShardUnavailable as exc:
                # No node could serve it.  If its primary is gone too, a new one is on
                # the way (a replica being promoted is out of recovery, so no replica,
                # before it is recorded): like a write, it waits for a new topology.
                primary = shard.primary
                state = self.health.snapshot.get(primary.name) if primary else None
                coming = shard.write_block is None and (
                    shard.failover_mode == "patroni" or self.settings.failover
                )
                if (state is not None and state.healthy) or not coming:
                    raise
                if buffer_until is None:
                    buffer_until = min(
                        deadline - 0.05, time.monotonic() + self.settings.write_buffer_timeout
                    )
                await self._await_topology(epoch, exc, buffer_until)
                topology = self.watcher.require_topology()
                shard = topology.shards.get(shard.name, shard)

    async def _read_once(
        self,
        shard: Shard,
        work: Work[T],
        *,
        consistency: str,
        min_lsn: int | None,
        deadline: float,
        spread: bool,
    ) -> tuple[T, Served]:
        candidates = router.read_candidates(
            shard,
            self.health.snapshot,
            consistency=consistency,
            min_lsn=min_lsn,
            max_lag_bytes=self.settings.max_replica_lag_bytes,
            max_lag_seconds=self.settings.max_replica_lag_seconds,
            spread=spread,
            zone=self.settings.zone,
        )
        failures = 0
        for node in candidates:
            try:
                result = await self._run(
                    shard.name,
                    node,
                    work if min_lsn is None or node is shard.primary else _after(min_lsn, work),
                    writing=False,
                    deadline=deadline,
                )
            except NodeLost:
                failures += 1
                metrics.READ_RETRIES.inc()
                if failures > 1:
                    break
                continue
            except errors.NotCaughtUp:
                continue
            except errors.StaleMap:
                # A replica that has not replayed a cutover yet refuses the slot; its
                # primary answers (or, if it refuses too, the map is stale).
                if node is shard.primary:
                    raise
                continue
            return result, Served(shard.name, node.name)
        raise errors.ShardUnavailable(shard.name, "no node could serve the read")

    # -- stale maps --------------------------------------------------------------

    async def after_stale(
        self, topology: Topology, *, attempt: int, deadline: float, shard: str
    ) -> None:
        """Refresh the map; back off a little while the catalog has nothing newer yet.

        The refresh compares epochs first: while a cutover is in progress the catalog has
        nothing newer, and reloading the whole map on every refused retry would only
        slow the moment it does.
        """
        changed = self.watcher.changed()
        fresh = await self.watcher.refresh(seen_epoch=topology.epoch, deadline=deadline)
        if fresh.epoch == topology.epoch:
            pause = min(0.1, 0.005 * 2**attempt)
            # A retry that the deadline would cut short gains nothing: a write would end
            # ambiguous (504) instead of cleanly refused (503).
            if time.monotonic() + pause + RETRY_BUDGET >= deadline:
                raise errors.ShardUnavailable(
                    shard, "the slot is changing owner; retry", retry_after=1
                )
            # Woken early by the new topology (LISTEN) when the change is published.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await changed.wait()

    # -- one node ----------------------------------------------------------------

    async def _run(
        self, shard: str, node: Node, work: Work[T], *, writing: bool, deadline: float
    ) -> T:
        """Run ``work`` on one node, translating every failure into what it means."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.Timeout("the request deadline passed")
        started = time.perf_counter()
        pool = conn = None
        cancelled = sending = False
        sent_at = 0.0
        # One timer for the whole call; ``conn`` tells whether the work was already sent.
        try:
            async with asyncio.timeout(remaining):
                pool = await self.pools.pool(node)
                conn = await pool.acquire()
                if writing:
                    conn.add_log_listener(on_notice)  # a commit not confirmed by the standby
                    if not self.watcher.may_send_write():
                        raise LeaseLapsed  # the pool was slow; the caller confirms again
                    still_primary = self.watcher.write_sending(node)
                    sending, sent_at = True, time.monotonic()
                    if not still_primary:
                        raise PrimaryReplaced
                result = await work(conn)
                if writing and conn in UNREPLICATED:
                    UNREPLICATED.discard(conn)
                    raise errors.OutcomeUnknown(
                        f"{node.name} committed the write locally, but its synchronous standby"
                        " did not confirm it in time; it may be lost by a failover"
                    )
                return result
        except (TimeoutError, *errors.CONNECT_ERRORS, *errors.LOST_CONNECTION_ERRORS) as exc:
            if conn is None:
                metrics.QUERY_ERRORS.labels(shard, node.name, "connect").inc()
                if not writing:
                    raise NodeLost(str(exc)) from exc
                raise errors.ShardUnavailable(
                    shard, f"cannot connect to {node.name} ({type(exc).__name__}: {exc})"
                ) from exc
            metrics.QUERY_ERRORS.labels(shard, node.name, "lost").inc()
            if isinstance(exc, TimeoutError):
                # The deadline interrupted the query and asyncpg sent the server a cancel
                # request; dropping the connection now would leave the query running.
                cancelled = True
            else:
                with contextlib.suppress(Exception):  # the pool may have dropped it already
                    conn.terminate()
            if writing:
                if sending:
                    # It may still commit on the shard until statement_timeout after it
                    # was sent: it counts as in flight (for the watcher's drain) until then.
                    self.watcher.write_ends_by(node.name, sent_at + self.settings.statement_timeout)
                    sending = False
                raise errors.OutcomeUnknown(
                    f"the connection to {node.name} failed before the commit was confirmed;"
                    " the write may or may not have been applied"
                ) from exc
            if isinstance(exc, TimeoutError):
                raise errors.Timeout(f"{node.name} did not answer before the deadline") from exc
            raise NodeLost(str(exc)) from exc
        except asyncio.CancelledError:
            if sending:
                # Cancelled from outside (shutdown) after sending: the statement may still
                # commit until statement_timeout after it was sent.
                self.watcher.write_ends_by(node.name, sent_at + self.settings.statement_timeout)
                sending = False
            raise
        except asyncpg.PostgresError as exc:
            translated = errors.from_postgres(exc)
            if writing and isinstance(translated, errors.Timeout):
                # The shard holds a cancel back while it records a commit and delivers it
                # at the next statement of the call: a write cancelled by statement_timeout
                # may have committed just before.
                translated = errors.OutcomeUnknown(
                    f"{node.name} cancelled the write at its statement_timeout; it may have"
                    " committed just before"
                )
            if isinstance(translated, errors.StaleMap):
                metrics.STALE_MAP_RETRIES.inc()
            elif type(translated) is errors.ApiError:
                metrics.QUERY_ERRORS.labels(shard, node.name, "sql").inc()
            raise translated from exc
        finally:
            if sending:
                self.watcher.write_ended(node.name)
            if writing and conn is not None:
                UNREPLICATED.discard(conn)
                with contextlib.suppress(Exception):
                    conn.remove_log_listener(on_notice)
            if conn is not None and pool is not None:
                metrics.observe_query(shard, node.name, time.perf_counter() - started)
                if cancelled:
                    self._release_after_cancel(pool, conn)
                else:
                    with contextlib.suppress(Exception):
                        await pool.release(conn)

    def _release_after_cancel(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
        """Return a connection whose query was cancelled, without holding up the response.

        asyncpg's release waits for the server to confirm the cancel (at most
        ``CANCEL_WAIT``; then it drops the connection, and the server notices the closed
        socket within ``client_connection_check_interval``).
        """

        async def release() -> None:
            with contextlib.suppress(Exception):
                await pool.release(conn, timeout=CANCEL_WAIT)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
