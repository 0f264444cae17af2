"""The topology watcher: keeps this instance's :class:`~shardd.topology.Topology` current.

It loads the topology from the catalog, refreshes it on ``LISTEN`` notifications and by
polling the catalog epoch, holds the topology lease, and reports the epoch it routes
with to the catalog.  The executor routes every operation by :attr:`TopologyWatcher.topology`
and asks the watcher before it sends a write.

Safety notes:

* An instance writes only with a topology confirmed by the catalog within
  ``topology_lease`` seconds, and reports the epoch it uses; a failover relies on both to
  know when no instance can still write to a fenced primary.  No write commits after the
  lease ends: see :meth:`TopologyWatcher.confirm_lease`.  Nor does one commit on a
  replaced primary after this instance reported the epoch that replaced it: see
  :meth:`TopologyWatcher._drain`.
* Every wait is bounded: catalog connects and queries by ``catalog_timeout``, refreshes
  on the request path by the request's deadline.
* Without the catalog, reads go on from the cached topology; writes fail fast with 503
  ``catalog_unavailable`` once the lease is used up, and resume by themselves when the
  catalog answers the background poll again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg

from . import catalog, errors, metrics
from .config import Settings
from .topology import Node, Topology

log = logging.getLogger(__name__)


class TopologyWatcher:
    def __init__(self, settings: Settings, instance: str) -> None:
        if settings.statement_timeout >= settings.topology_lease:
            raise ValueError("statement_timeout must be shorter than topology_lease")
        self.settings = settings
        self.instance = instance
        self.topology: Topology | None = None
        self.catalog_ok = False
        self.confirmed_at = float("-inf")  # when the catalog last confirmed our topology
        self._refreshed_at = float("-inf")  # when the last successful refresh finished
        self._refresh_failed_at = float("-inf")  # when the last failed refresh gave up
        self._catalog: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._refresh_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._writes_in_flight: collections.Counter[str] = collections.Counter()  # by node
        self._reported: Topology | None = None  # the topology last drained and reported
        self._write_ended = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        # Set when the instance stops: /readyz answers 503 while it still serves, so a
        # load balancer sends it nothing new before its listener closes.
        self.draining = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._catalog = await asyncpg.create_pool(
            self.settings.catalog_dsn,
            connect=catalog.pool_connect,
            min_size=0,
            max_size=4,
            timeout=self.settings.catalog_timeout,
            command_timeout=self.settings.catalog_timeout,
        )
        with contextlib.suppress(Exception):
            await self.refresh(force=True)
        self._tasks = [asyncio.create_task(self._poll_catalog(), name="catalog-poll")]

    async def close(self) -> None:
        # The listener goes first: a notification must not start a refresh that reports
        # this instance again after it was forgotten.
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=1)
        for task in (*self._tasks, *self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                async with self.catalog_connection() as conn:
                    await catalog.forget_instance(conn, self.instance)
        if self._catalog is not None:
            await self._catalog.close()

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

    def changed(self) -> asyncio.Event:
        """An event set when the next topology (a new epoch) is installed."""
        return self._changed

    # -- refreshing --------------------------------------------------------------

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
                    self._install(loaded)
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
        return loaded

    def _install(self, loaded: Topology) -> None:
        """Route every new operation by ``loaded`` from now on."""
        current = self.topology
        if current is loaded:
            return
        if current is None or loaded.epoch != current.epoch:
            log.info("topology epoch %s loaded", loaded.epoch)
            self._changed.set()
            self._changed = asyncio.Event()
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
        conn = await catalog.connect(
            self.settings.catalog_dsn,
            connect_seconds=self.settings.catalog_timeout,
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
            await asyncio.sleep(self.settings.topology_poll_interval)

    # -- writes in flight --------------------------------------------------------

    def write_sending(self, node: Node) -> bool:
        """Count a write to ``node`` as in flight; False when ``node`` is no longer a
        primary in the current topology (the write must not be sent; end it at once).

        Counted, then checked, with no await between: either :meth:`_drain` sees this
        write, or this write sees the topology that ``_drain`` waits for.
        """
        self._writes_in_flight[node.name] += 1
        return self.topology is not None and node.name in self.topology.primaries

    def write_ended(self, node: str) -> None:
        self._writes_in_flight[node] -= 1
        self._write_ended.set()
        self._write_ended = asyncio.Event()

    def write_ends_by(self, node: str, when: float) -> None:
        """A write whose outcome is unknown may still commit until ``when`` (monotonic):
        it counts as in flight until then."""
        delay = max(0.0, when - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self.write_ended, node)

    # -- the lease ---------------------------------------------------------------

    def lease_left(self) -> float:
        """Seconds until this instance's topology lease ends (negative once it has)."""
        return self.confirmed_at + self.settings.topology_lease - time.monotonic()

    def may_send_write(self) -> bool:
        """Whether a write sent now is sure to end before the lease does."""
        return self.lease_left() > self.settings.statement_timeout

    async def confirm_lease(self, deadline: float) -> None:
        """Let a write go out only under a topology lease that outlasts it.

        Safety: a write is sent only while more than ``statement_timeout`` of the lease
        is left (checked again once it has its connection, see
        :meth:`shardd.executor.Executor._run`), and every shard session runs with that
        server-side ``statement_timeout``: the writing statement ends, committed or
        cancelled by the shard itself, before the lease does, even if this process stalls
        or loses the shard and the catalog meanwhile.  The lease counts from before the
        confirming query was sent (``_reload``).  A failover that waited out the lease
        therefore knows no write of this instance can still commit on the fenced primary.

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

    def readiness(self) -> dict[str, object]:
        """What this instance can serve now: reads need a topology; writes also need the
        lease (or a catalog that answers, to renew it).  A stopping instance (draining,
        see :mod:`shardd.server`) still serves but is not ready."""
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
