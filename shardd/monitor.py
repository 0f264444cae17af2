"""The failover monitor: one shardd instance at a time watches every primary.

Leadership is a session-level advisory lock on the catalog held on a dedicated
connection.  If the holder dies its connection closes and the lock is free; the other
instances try to take it every ``health_interval``, so a new monitor starts within about
one interval (plus the time the catalog needs to notice a vanished client: immediate
for a killed process, TCP keepalive for a lost host).  Any error while holding or
checking the lock means "not the monitor" (fail closed): the connection is dropped and
no failover work runs until the lock is won again.

The monitor also trims every shard's change log once a minute (leader-only work, like
failover).

Each round the monitor reads this instance's health snapshot (every instance checks
every node), calls :func:`~shardd.failover.decide` per shard, and runs
:func:`~shardd.failover.fail_over` where it says so.  It also fences, on the node, any
fenced former primary that answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from . import changelog, failover, metrics
from .config import Settings
from .nodes import HealthMonitor
from .topology import Topology

log = logging.getLogger(__name__)
TRIM_EVERY = 60.0  # seconds between change-log trims


class Monitor:
    def __init__(
        self,
        settings: Settings,
        instance: str,
        health: HealthMonitor,
        topology: Callable[[], Topology | None],
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.health = health
        self._topology = topology
        self._conn: asyncpg.Connection | None = None
        self.leading = False
        self._refenced: set[str] = set()
        self._trimmed_at = 0.0

    async def run(self) -> None:
        while True:
            try:
                if await self._hold_lease():
                    await self.round()
            except Exception:
                log.exception("monitor round failed; giving up the lease")
                await self._drop_lease()
            await asyncio.sleep(self.settings.health_interval)

    async def close(self) -> None:
        await self._drop_lease()

    async def _hold_lease(self) -> bool:
        """Take or confirm the lease; False (and not leading) on any doubt."""
        if self._conn is None or self._conn.is_closed():
            self._set_leading(False)
            self._conn = await asyncpg.connect(self.settings.catalog_dsn, timeout=2.0)
        async with asyncio.timeout(max(1.0, self.settings.health_interval * 2)):
            if self.leading:
                # Still ours?  The query fails if the connection (and so the lock) is gone.
                held = await self._conn.fetchval(
                    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND classid = $1 AND objid = $2"
                    " AND granted",
                    failover.LOCK_CLASS,
                    failover.MONITOR_KEY,
                )
            else:
                held = await self._conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    failover.LOCK_CLASS,
                    failover.MONITOR_KEY,
                )
                if held:
                    await self._conn.execute(
                        "INSERT INTO shardd_leases (name, holder) VALUES ('monitor', $1)"
                        " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                        " acquired_at = now()",
                        self.instance,
                    )
                    log.warning("this instance (%s) is now the failover monitor", self.instance)
        self._set_leading(bool(held))
        return self.leading

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        metrics.MONITOR_LEADER.set(1 if leading else 0)

    async def _drop_lease(self) -> None:
        self._set_leading(False)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=1)
            self._conn = None

    async def round(self) -> None:
        topology = self._topology()
        if topology is None or not self.settings.failover:
            return
        snapshot = self.health.snapshot
        await self._refence(topology)
        if time.monotonic() - self._trimmed_at > TRIM_EVERY:
            self._trimmed_at = time.monotonic()
            await self._trim(topology)
        for shard in topology.shards.values():
            view = failover.shard_view(shard, snapshot)
            decision = failover.decide(view, failures_needed=self.settings.failover_after_checks)
            if decision.promote is None:
                if view.needs_primary(self.settings.failover_after_checks):
                    log.error("shard %s needs a new primary: %s", shard.name, decision.reason)
                continue
            log.warning(
                "shard %s: primary %s is down (%s); failing over",
                shard.name,
                view.primary,
                decision.reason,
            )
            try:
                await failover.fail_over(
                    self.settings.catalog_dsn,
                    shard.name,
                    lease=self.settings.topology_lease,
                    expected_primary=view.primary,
                    old_position=view.primary_position,
                    detected_at=datetime.now(UTC),
                )
            except failover.FailoverError as exc:
                log.error("shard %s: failover not possible: %s", shard.name, exc)

    async def _trim(self, topology: Topology) -> None:
        for shard in topology.shards.values():
            if shard.primary is None:
                continue
            try:
                async with asyncio.timeout(30), failover.connect(shard.primary) as conn:
                    removed = await changelog.trim(
                        conn, keep_seconds=self.settings.changelog_retention
                    )
                if removed:
                    log.info("trimmed %s change-log entries on %s", removed, shard.name)
            except Exception as exc:
                log.warning("cannot trim the change log of %s: %s", shard.name, exc)

    async def _refence(self, topology: Topology) -> None:
        """Fence on the node every fenced former primary that answers again."""
        snapshot = self.health.snapshot
        for node in topology.nodes():
            state = snapshot.get(node.name)
            if not node.fenced:
                self._refenced.discard(node.name)
                continue
            if state is None or not state.healthy or state.in_recovery:
                self._refenced.discard(node.name)
                continue
            if node.name not in self._refenced:
                if await failover.fence_on_node(node, "replaced by a failover"):
                    log.warning("fenced %s, a former primary that came back", node.name)
                    self._refenced.add(node.name)
