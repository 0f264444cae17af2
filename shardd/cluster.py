"""One shardd instance's live view of the cluster, and the loop that runs work on it.

:class:`Cluster` owns the current :class:`~shardd.topology.Topology` (refreshed on
``LISTEN`` notifications and by polling the catalog epoch), the node pools and the
health monitor.  Its ``write``/``read`` methods route one operation to a node, translate
failures, and retry transparently when a shard refuses a slot it no longer owns.

Safety notes:

* Fencing is not ours to trust: the shard checks slot ownership in the same transaction
  as the write.  An instance with an old map is refused (``StaleMap``), refreshes, and
  retries until the request's deadline; nothing it does here can double-own a slot.
* A write whose connection is lost or whose deadline passes after it was sent may have
  committed: it is reported as ``OutcomeUnknown`` and never retried.
* A write that could not reach a primary (none on record, or the connection was
  refused) wrote nothing: it waits for a new primary up to ``write_buffer_timeout``.
* An instance writes only with a topology confirmed by the catalog within
  ``topology_lease`` seconds, and reports the epoch it uses to the catalog; a failover
  relies on both to know when no instance can still write to a fenced primary.  No write
  commits after the lease ends: see :meth:`Cluster.confirm_topology`.  Nor does one
  commit on a replaced primary after this instance reported the epoch that replaced it:
  see :meth:`Cluster._drain`.
* Every wait is bounded: catalog connects and queries by ``catalog_timeout``, topology
  refreshes on the request path by the request's deadline, shard statements, lock waits
  and idle transactions by server-side settings, and a query interrupted by the
  deadline is cancelled on the server, not left running.
* Without the catalog, reads go on from the cached topology; writes fail fast with 503
  ``catalog_unavailable`` once the lease is used up, and resume by themselves when the
  catalog answers the background poll again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from . import catalog, config, errors, metrics, router
from .config import Settings
from .monitor import Monitor
from .nodes import UNREPLICATED, HealthMonitor, NodePools, session_settings
from .placement import slot_of
from .topology import Node, Shard, Topology, set_routes

log = logging.getLogger(__name__)
T = TypeVar("T")
# Seconds a connection whose query the deadline interrupted may wait for the shard to
# confirm the cancel before it is dropped.
RETRY_BUDGET = 0.5  # seconds a retry after a refused slot needs left before the deadline
CANCEL_WAIT = 1.0
Work = Callable[[asyncpg.Connection], Awaitable[T]]


@dataclass(frozen=True)
class Served:
    """Where an operation ran."""

    shard: str
    node: str

    def header(self) -> str:
        return f"{self.shard}/{self.node}"


def _bind(work: Callable[..., Awaitable[T]], slot: int) -> Callable[..., Awaitable[T]]:
    """``work`` with the slot filled in: (conn, *rest) -> work(conn, slot, *rest)."""

    def bound(conn: asyncpg.Connection, *rest: Any) -> Awaitable[T]:
        return work(conn, slot, *rest)

    return bound


class NodeLost(Exception):
    """A read's node failed before answering; another node may serve it."""


class NotSent(Exception):
    """A write was not sent after all: route it again under the current topology."""


class LeaseLapsed(NotSent):
    """Too little of the lease was left once a write had its connection."""


class PrimaryReplaced(NotSent):
    """A newer topology arrived while the write waited for its connection, and its node
    is no longer a primary there."""


class Cluster:
    def __init__(self, settings: Settings) -> None:
        set_routes(config.node_routes(settings))
        if settings.statement_timeout >= settings.topology_lease:
            raise ValueError("statement_timeout must be shorter than topology_lease")
        self.settings = settings
        self.topology: Topology | None = None
        self.catalog_ok = False
        sessions = session_settings(
            statement_timeout=settings.statement_timeout,
            lock_timeout=settings.lock_timeout,
            idle_in_transaction_timeout=settings.idle_in_transaction_session_timeout,
        )
        connect_timeout = min(2.0, settings.request_timeout)
        self.pools = NodePools(
            pool_size=settings.pool_size, connect_timeout=connect_timeout, server_settings=sessions
        )
        # One connection per node for health checks, apart from the request pools.
        self._health_pools = NodePools(
            pool_size=1, connect_timeout=connect_timeout, server_settings=sessions
        )
        self.health = HealthMonitor(
            self._health_pools, lambda: self.topology, interval=settings.health_interval
        )
        self.instance = f"{socket.gethostname()}:{settings.port}:{os.getpid()}"
        self.monitor = Monitor(settings, self.instance, self.health, lambda: self.topology)
        self.confirmed_at = float("-inf")  # when the catalog last confirmed our topology
        self._refreshed_at = float("-inf")  # when the last successful refresh finished
        self._refresh_failed_at = float("-inf")  # when the last failed refresh gave up
        self._catalog: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._refresh_lock = asyncio.Lock()
        self._new_topology = asyncio.Event()
        self._writes_in_flight: collections.Counter[str] = collections.Counter()  # by node
        self._reported: Topology | None = None  # the topology last drained and reported
        self._write_ended = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._catalog = await asyncpg.create_pool(
            self.settings.catalog_dsn,
            min_size=0,
            max_size=4,
            timeout=self.settings.catalog_timeout,
            command_timeout=self.settings.catalog_timeout,
        )
        with contextlib.suppress(Exception):
            await self.refresh(force=True)
        self._tasks = [
            asyncio.create_task(self._poll_catalog(), name="catalog-poll"),
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(self.monitor.run(), name="monitor"),
        ]

    async def close(self) -> None:
        for task in (*self._tasks, *self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.monitor.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                async with self.catalog_connection() as conn:
                    await catalog.forget_instance(conn, self.instance)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=1)
        if self._catalog is not None:
            await self._catalog.close()
        await self.pools.close()
        await self._health_pools.close()

    @contextlib.asynccontextmanager
    async def catalog_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A catalog connection; an unreachable catalog is a 503, never a 500.

        Connecting and every query on it are bounded by ``catalog_timeout`` (the pool's
        command timeout), so a catalog that hangs rather than dies fails like a dead one.
        """
        if self._catalog is None:
            raise errors.NotReady("shardd is starting")
        try:
            conn = await self._catalog.acquire(timeout=self.settings.catalog_timeout)
        except (TimeoutError, *errors.CONNECT_ERRORS, *errors.LOST_CONNECTION_ERRORS) as exc:
            self.catalog_ok = False
            raise errors.CatalogUnavailable(f"the catalog is unreachable: {exc}") from exc
        try:
            yield conn
        except (TimeoutError, *errors.LOST_CONNECTION_ERRORS) as exc:
            self.catalog_ok = False
            raise errors.CatalogUnavailable(f"the catalog did not answer: {exc}") from exc
        finally:
            await self._catalog.release(conn)

    def require_topology(self) -> Topology:
        if self.topology is None:
            raise errors.NotReady("the topology has not been loaded from the catalog yet")
        return self.topology

    # -- topology ----------------------------------------------------------------

    async def refresh(
        self,
        *,
        force: bool = False,
        seen_epoch: int | None = None,
        deadline: float | None = None,
    ) -> Topology:
        """Reload the topology when the catalog has a newer epoch (or when forced).

        Waits (for a refresh already running, then for the catalog) until ``deadline`` at
        most; without one, each catalog step is still bounded by ``catalog_timeout``.
        Raises :class:`~shardd.errors.CatalogUnavailable` when the catalog does not
        answer in time.  Callers queued behind one refresh share its outcome rather than
        asking the catalog again one after another: a caller that gets the lock after a
        refresh ended since it called returns that topology, or fails at once if that
        refresh failed.
        """
        called = time.monotonic()
        try:
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - called)):
                async with self._refresh_lock:
                    current = self.topology
                    if current is not None and seen_epoch is not None:
                        if current.epoch > seen_epoch:
                            return current
                    if current is not None and not force:
                        if self._refreshed_at >= called:
                            return current
                        if self._refresh_failed_at >= called:
                            raise errors.CatalogUnavailable("the catalog did not answer just now")
                    return await self._reload(force=force)
        except TimeoutError as exc:
            raise errors.CatalogUnavailable(
                "the catalog did not confirm the topology before the request's deadline"
            ) from exc

    async def _reload(self, *, force: bool) -> Topology:
        """One refresh against the catalog (under ``_refresh_lock``)."""
        current = self.topology
        asked = time.monotonic()  # the lease counts from before the catalog was asked
        try:
            async with self.catalog_connection() as conn:
                if (
                    not force
                    and current is not None
                    and await catalog.current_epoch(conn) == current.epoch
                ):
                    loaded = current
                else:
                    loaded = await catalog.load_topology(conn)
                    self._install(current, loaded)
                if self._reported is not loaded:
                    # Also when an earlier refresh installed it but was cut short before
                    # its report (a request's deadline): the report always follows a
                    # complete drain.
                    await self._drain(loaded)
                    await self._report(conn, loaded.epoch)
                    self._reported = loaded
        except Exception as exc:  # fail closed: whatever went wrong, nothing is confirmed
            self.catalog_ok = False
            self._refresh_failed_at = time.monotonic()
            if isinstance(exc, errors.CatalogUnavailable):
                raise
            raise errors.CatalogUnavailable(f"cannot read the topology: {exc}") from exc
        self.catalog_ok = True
        self.confirmed_at = asked
        self._refreshed_at = time.monotonic()
        if loaded is current:
            return loaded
        self._install(current, loaded)
        if current is None:
            await self.health.check_all()
        return loaded

    def _install(self, current: Topology | None, loaded: Topology) -> None:
        """Route every new operation by ``loaded`` from now on."""
        if self.topology is loaded:
            return
        if current is None or loaded.epoch != current.epoch:
            log.info("topology epoch %s loaded", loaded.epoch)
            self._new_topology.set()
            self._new_topology = asyncio.Event()
        self.topology = loaded
        metrics.TOPOLOGY_EPOCH.set(loaded.epoch)

    async def _drain(self, loaded: Topology) -> None:
        """Before reporting ``loaded`` to the catalog, wait for the writes still in
        flight to a node that is no longer a primary in it.

        A failover takes the report to mean that this instance writes to the old
        primary no more; a write sent just before the new topology arrived could
        otherwise still commit there after the promotion (when the old primary cannot
        be fenced on its node, as in a partition that hides it from the monitor only).
        The shard ends every statement within ``statement_timeout``, so waiting that
        long from now is enough even when this instance never hears back.
        """
        gone = [
            n for n, count in self._writes_in_flight.items() if count and n not in loaded.primaries
        ]
        until = time.monotonic() + self.settings.statement_timeout
        while any(self._writes_in_flight[name] for name in gone):
            left = until - time.monotonic()
            if left <= 0:
                return
            ended = self._write_ended
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await ended.wait()

    def _still_primary(self, node: Node) -> bool:
        return self.topology is not None and node.name in self.topology.primaries

    def _write_done(self, node: str) -> None:
        self._writes_in_flight[node] -= 1
        self._write_ended.set()
        self._write_ended = asyncio.Event()

    async def _report(self, conn: asyncpg.Connection, epoch: int) -> None:
        """Tell the catalog which epoch this instance routes with (failovers wait for it)."""
        await catalog.report_instance(
            conn,
            instance=self.instance,
            address=f"{self.settings.host}:{self.settings.port}",
            epoch=epoch,
        )

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        conn = await asyncpg.connect(
            self.settings.catalog_dsn,
            timeout=self.settings.catalog_timeout,
            command_timeout=self.settings.catalog_timeout,
        )

        def notified(*_: object) -> None:
            task = asyncio.get_running_loop().create_task(self._refresh_quietly())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        try:
            async with asyncio.timeout(self.settings.catalog_timeout):
                await conn.add_listener(catalog.CHANNEL, notified)
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except errors.ApiError as exc:
            log.warning("catalog refresh failed: %s", exc.message)

    async def _poll_catalog(self) -> None:
        while True:
            try:
                await self._ensure_listener()
                await self.refresh()
                if self._reported is not None:  # a heartbeat; only a drained epoch
                    async with self.catalog_connection() as conn:
                        await self._report(conn, self._reported.epoch)
            except Exception as exc:
                self.catalog_ok = False
                log.warning("catalog poll failed: %s", exc)
            metrics.observe_pools(self.pools)
            await asyncio.sleep(self.settings.topology_poll_interval)

    # -- running work ------------------------------------------------------------

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout

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
                    if not self.may_send_write():
                        raise LeaseLapsed  # the pool was slow; the caller confirms again
                    # Counted, then checked, with no await between: either _drain sees
                    # this write, or this write sees the topology _drain installed.
                    self._writes_in_flight[node.name] += 1
                    sending, sent_at = True, time.monotonic()
                    if not self._still_primary(node):
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
                    # was sent: it counts as in flight (for _drain) until then.
                    asyncio.get_running_loop().call_later(
                        max(0.0, sent_at + self.settings.statement_timeout - time.monotonic()),
                        self._write_done,
                        node.name,
                    )
                    sending = False
                raise errors.OutcomeUnknown(
                    f"the connection to {node.name} failed before the commit was confirmed;"
                    " the write may or may not have been applied"
                ) from exc
            if isinstance(exc, TimeoutError):
                raise errors.Timeout(f"{node.name} did not answer before the deadline") from exc
            raise NodeLost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            translated = errors.from_postgres(exc)
            if isinstance(translated, errors.StaleMap):
                metrics.STALE_MAP_RETRIES.inc()
            elif type(translated) is errors.ApiError:
                metrics.QUERY_ERRORS.labels(shard, node.name, "sql").inc()
            raise translated from exc
        finally:
            if sending:
                self._write_done(node.name)
            if writing and conn is not None:
                UNREPLICATED.discard(conn)
            if conn is not None and pool is not None:
                metrics.QUERY_SECONDS.labels(shard, node.name).observe(
                    time.perf_counter() - started
                )
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

    async def after_stale(
        self, topology: Topology, attempt: int, deadline: float, shard: str
    ) -> None:
        """Refresh the map; back off a little while the catalog has nothing newer yet.

        The refresh compares epochs first: while a cutover is in progress the catalog has
        nothing newer, and reloading the whole map on every refused retry would only
        slow the moment it does.
        """
        changed = self._new_topology
        fresh = await self.refresh(seen_epoch=topology.epoch, deadline=deadline)
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

    def route(self, pk: str) -> tuple[Topology, int, Shard]:
        topology = self.require_topology()
        slot = slot_of(pk, topology.slot_count)
        shard = topology.shard_for_slot(slot)
        if shard is None:
            raise errors.ShardUnavailable("none", f"slot {slot} has no owner")
        return topology, slot, shard

    def lease_left(self) -> float:
        """Seconds until this instance's topology lease ends (negative once it has)."""
        return self.confirmed_at + self.settings.topology_lease - time.monotonic()

    def may_send_write(self) -> bool:
        """Whether a write sent now is sure to end before the lease does."""
        return self.lease_left() > self.settings.statement_timeout

    def readiness(self) -> dict[str, object]:
        """What this instance can serve now: reads need a topology; writes also need the
        lease (or a catalog that answers, to renew it)."""
        reads = self.topology is not None
        writes = reads and (self.may_send_write() or self.catalog_ok)
        return {
            "ready": reads,
            "reads": reads,
            "writes": writes,
            "reason": None if writes else "catalog_unavailable",
            "catalog": self.catalog_ok,
            "epoch": self.topology.epoch if self.topology is not None else None,
        }

    async def confirm_topology(self, deadline: float) -> None:
        """Let a write go out only under a topology lease that outlasts it.

        Safety: a write is sent only while more than ``statement_timeout`` of the lease
        is left (checked again once it has its connection, see :meth:`_run`), and every
        shard session runs with that server-side ``statement_timeout``: the writing
        statement ends, committed or cancelled by the shard itself, before the lease does,
        even if this process stalls or loses the shard and the catalog meanwhile.  The
        lease counts from before the confirming query was sent (``_reload``).  A failover
        that waited out the lease therefore knows no write of this instance can still
        commit on the fenced primary.

        With the catalog known to be unreachable and the lease used up, the write fails at
        once with 503 ``catalog_unavailable`` rather than at its deadline; the catalog
        poll renews the lease as soon as the catalog answers again.  Otherwise the
        topology is confirmed now, within the request's deadline and ``catalog_timeout``.
        """
        if self.may_send_write():
            return
        if not self.catalog_ok:
            raise errors.CatalogUnavailable(
                "the catalog is unreachable and this instance's topology lease has expired;"
                " writes resume when the catalog answers"
            )
        await self.refresh(deadline=min(deadline, time.monotonic() + self.settings.catalog_timeout))
        if not self.may_send_write():
            raise errors.CatalogUnavailable("the catalog did not confirm the topology in time")

    async def await_primary(
        self, topology: Topology, failure: errors.ShardUnavailable, until: float
    ) -> None:
        """Buffer a write that found no reachable primary: wait for a new topology (or a
        moment, to try again) until ``until``; then fail with the original 503."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            metrics.WRITES_NO_PRIMARY.labels(failure.shard).inc()
            raise failure
        changed = self._new_topology
        if self.topology is not None and self.topology.epoch != topology.epoch:
            return
        metrics.BUFFERED_WRITES.inc()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.25)):
                    await changed.wait()
        finally:
            metrics.BUFFERED_WRITES.dec()

    async def write(
        self, pk: str, work: Callable[[asyncpg.Connection, int], Awaitable[T]], *, deadline: float
    ) -> tuple[T, Served]:
        """Run a write on the primary owning ``pk``'s slot, following the map as it moves."""
        attempt = 0
        while True:
            topology, slot, shard = self.route(pk)
            try:
                return await self.write_shard(topology, shard, _bind(work, slot), deadline=deadline)
            except errors.StaleMap:
                await self.after_stale(topology, attempt, deadline, shard.name)
                attempt += 1

    async def write_shard(
        self, topology: Topology, shard: Shard, work: Work[T], *, deadline: float
    ) -> tuple[T, Served]:
        """Run a write on one shard's primary, waiting for one if there is none.

        A shard refusing the slots raises StaleMap: the caller re-routes (single writes)
        or regroups (batches).
        """
        buffer_until: float | None = None
        while True:
            await self.confirm_topology(deadline)
            primary = shard.primary
            if shard.write_block is not None:
                raise errors.WritesRefused(shard.name, shard.write_block)
            try:
                if primary is None:
                    raise errors.ShardUnavailable(shard.name, "it has no primary")
                result = await self._run(shard.name, primary, work, writing=True, deadline=deadline)
                return result, Served(shard.name, primary.name)
            except NotSent:  # route again under the topology now current
                fresh = self.require_topology().shards.get(shard.name)
                if fresh is None:
                    raise errors.StaleMap(f"shard {shard.name} is gone") from None
                shard = fresh
                continue
            except errors.ShardUnavailable as exc:  # nothing was written: wait for a primary
                if buffer_until is None:
                    buffer_until = min(
                        deadline - 0.05, time.monotonic() + self.settings.write_buffer_timeout
                    )
                await self.await_primary(topology, exc, buffer_until)
                topology = self.require_topology()
                shard = topology.shards.get(shard.name, shard)

    async def read_shard(
        self,
        shard: Shard,
        work: Callable[[asyncpg.Connection, int | None], Awaitable[T | None]],
        *,
        consistency: str,
        token: router.SessionToken | None,
        deadline: float,
    ) -> tuple[T, Served]:
        """Run a read on the best node of ``shard`` for the consistency asked.

        ``work`` gets the session position to require (or None) and returns None when the
        node had not replayed it; the next candidate (finally the primary) is tried.  A
        node that fails is skipped once; raises StaleMap when the shard refuses the slot.
        """
        min_lsn = token.positions.get(shard.name) if token is not None else None
        candidates = router.read_candidates(
            shard,
            self.health.snapshot,
            consistency=consistency,
            min_lsn=min_lsn,
            max_lag_bytes=self.settings.max_replica_lag_bytes,
            max_lag_seconds=self.settings.max_replica_lag_seconds,
        )
        failures = 0
        for node in candidates:
            try:
                result = await self._run(
                    shard.name,
                    node,
                    lambda conn: work(conn, min_lsn),
                    writing=False,
                    deadline=deadline,
                )
            except NodeLost:
                failures += 1
                metrics.READ_RETRIES.inc()
                if failures > 1:
                    break
                continue
            if result is not None:
                return result, Served(shard.name, node.name)
        raise errors.ShardUnavailable(shard.name, "no node could serve the read")

    async def read(
        self,
        pk: str,
        work: Callable[[asyncpg.Connection, int, int | None], Awaitable[T | None]],
        *,
        consistency: str,
        token: router.SessionToken | None,
        deadline: float,
    ) -> tuple[T, Served]:
        attempt = 0
        while True:
            topology, slot, shard = self.route(pk)
            try:
                return await self.read_shard(
                    shard,
                    _bind(work, slot),
                    consistency=consistency,
                    token=token,
                    deadline=deadline,
                )
            except errors.StaleMap:
                await self.after_stale(topology, attempt, deadline, shard.name)
                attempt += 1
