"""The failover monitor: one shardd instance at a time watches every primary.

Leadership is a session-level advisory lock on the catalog held on a dedicated
connection.  If the holder dies its connection closes and the lock is free; the other
instances try to take it every ``health_interval``, so a new monitor starts within about
one interval (plus the time the catalog needs to notice a vanished client: immediate
for a killed process, TCP keepalive for a lost host).  Any error while holding or
checking the lock means "not the monitor" (fail closed): the connection is dropped and
no failover work runs until the lock is won again.

Leader-only housekeeping runs whether or not automatic failover is on: every shard's
change log is trimmed once a minute and consumers that stopped advancing for
``consumer_expiry`` are dropped (change-feed consumers already after
``feed_retention_cap``); in a synchronous cluster each shard's commit mode
follows its standbys (``degrade``: asynchronous while none streams, recorded;
``strict``: writes refused with ``no_sync_standby`` instead).

Each round the monitor reads this instance's health snapshot (every instance checks
every node), calls :func:`~shardd.failover.decide` per shard, and runs
:func:`~shardd.failover.fail_over` where it says so; where no replica qualifies it
records a write block (``no_failover_candidate``) so every instance refuses the shard's
writes with that reason at once.  It also fences, on the node, any fenced former
primary that answers again, and records the exact loss of the promotion that replaced
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from . import admin, catalog, changefeed, changelog, failover, fencing, idempotency, metrics
from .config import Settings
from .nodes import HealthMonitor
from .topology import Shard, Topology

log = logging.getLogger(__name__)
# What a failover step on one shard may fail with (a node or the catalog gone or slow).
STEP_ERRORS = (
    failover.FailoverError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
TRIM_EVERY = 60.0  # seconds between change-log trims (at most; less with a short retention)


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
        self._fenced_rounds: dict[str, int] = {}  # primary -> rounds seen fenced on its node
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
            self._conn = await catalog.connect(self.settings.catalog_dsn, connect_seconds=2.0)
        async with asyncio.timeout(max(1.0, self.settings.health_interval * 2)):
            if self.leading:
                # Still ours?  The query fails if the connection (and so the lock) is gone.
                held = await self._conn.fetchval(
                    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND classid = $1 AND objid = $2"
                    " AND granted",
                    fencing.FAILOVER_LOCK_CLASS,
                    fencing.MONITOR_KEY,
                )
                # And the catalog node still commits: a write, not a read.  A primary left
                # behind by a catalog failover (its Patroni gone, its Postgres still up) keeps
                # the lock and answers reads, but with synchronous replication it commits
                # nothing any more, so this times out and the lease goes.
                held = held and bool(
                    await self._conn.fetchval(
                        "UPDATE shardd_leases SET holder = holder"
                        " WHERE name = 'monitor' AND holder = $1 RETURNING true",
                        self.instance,
                    )
                )
            else:
                held = await self._conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    fencing.FAILOVER_LOCK_CLASS,
                    fencing.MONITOR_KEY,
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
        if not leading:
            self._fenced_rounds.clear()  # counted afresh in the next tenure
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
        if topology is None:
            return
        snapshot = self.health.snapshot
        await self._follow_patroni(topology)
        await self._refence(topology)
        await self._finish_switchovers(topology)
        await self._follow_standbys(topology)
        every = min(
            TRIM_EVERY, self.settings.changelog_retention, self.settings.idempotency_retention
        )
        if time.monotonic() - self._trimmed_at > every:
            self._trimmed_at = time.monotonic()
            await self._trim(topology)
        await self._note_positions(topology)
        if not self.settings.failover:
            return
        for shard in _builtin(topology):
            view = failover.shard_view(shard, snapshot)
            decision = failover.decide(
                view,
                failures_needed=self.settings.failover_after_checks,
                max_lag_bytes=self.settings.max_lag_on_failover,
                tolerance=2 * self.settings.health_interval,
            )
            if decision.promote is None:
                if decision.blocked:
                    await self._block_writes(shard, "no_failover_candidate", decision.reason)
                else:  # the primary answers again: its writes need no operator any more
                    await self._unblock_writes(shard, "no_failover_candidate")
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
                    allowed=[
                        c.name
                        for c in failover.eligible(
                            view,
                            max_lag_bytes=self.settings.max_lag_on_failover,
                            tolerance=2 * self.settings.health_interval,
                        )
                    ],
                    old_position=view.primary_position,
                    detected_at=datetime.now(UTC),
                )
            except STEP_ERRORS as exc:  # one shard's trouble does not hold the others up
                log.error("shard %s: failover not possible: %s", shard.name, exc)

    async def _block_writes(self, shard: Shard, reason: str, why: str) -> None:
        """Record (once) that the shard's writes are refused, and say why in the log."""
        metrics.WRITE_BLOCKED.labels(shard.name, reason).set(1)
        if shard.write_block == reason:
            return
        async with self._catalog() as conn:
            if await catalog.set_write_block(conn, shard.name, reason):
                log.error("shard %s: writes refused (%s): %s", shard.name, reason, why)

    async def _unblock_writes(self, shard: Shard, reason: str) -> None:
        metrics.WRITE_BLOCKED.labels(shard.name, reason).set(0)
        if shard.write_block != reason:
            return
        async with self._catalog() as conn:
            if await catalog.set_write_block(conn, shard.name, None):
                log.warning("shard %s: writes accepted again (%s is over)", shard.name, reason)

    def _catalog(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        # Bounded: a catalog that hangs must not stall the monitor's round for good.
        return admin.connect(self.settings.catalog_dsn, connect_seconds=2.0, command_timeout=10.0)

    async def _follow_standbys(self, topology: Topology) -> None:
        """In a synchronous cluster, keep each shard's commit mode in step with its
        standbys: ``degrade`` turns synchronous commit off while no standby streams
        (releasing commits that wait for one) and back on when one does; ``strict``
        refuses the shard's writes meanwhile (503 no_sync_standby) instead of letting
        them hang until their deadline."""
        async with self._catalog() as conn:
            synchronous = await catalog.is_synchronous(conn)
            mode = await catalog.synchronous_mode(conn)
        if not synchronous:
            return
        for shard in _builtin(topology):  # Patroni sets its shards' commit mode itself
            primary = shard.primary
            state = self.health.snapshot.get(primary.name) if primary else None
            if primary is None or state is None or not state.healthy or state.standbys is None:
                continue
            has_standby = state.standbys > 0
            strict = mode == "strict"
            if strict and not has_standby:
                await self._block_writes(shard, "no_sync_standby", "no standby streams")
            else:
                await self._unblock_writes(shard, "no_sync_standby")
            # The node's setting and the catalog's flag are each compared with what they
            # should be, every round, so a monitor that died between the two converges.
            synchronous = strict or has_standby
            if state.synchronous != synchronous:
                await failover.set_sync_standbys(primary, synchronous=synchronous)
            metrics.DEGRADED.labels(shard.name).set(0 if synchronous else 1)
            if shard.degraded != synchronous:
                continue
            async with self._catalog() as conn:
                await catalog.set_degraded(conn, shard.name, not synchronous)
            log.warning(
                "shard %s: %s",
                shard.name,
                "synchronous commit restored"
                if synchronous
                else "no standby streams: running asynchronously (degrade mode)",
            )

    async def _trim(self, topology: Topology) -> None:
        for shard in topology.shards.values():
            if shard.primary is None:
                continue
            try:
                async with (
                    asyncio.timeout(30),
                    failover.connect(shard.primary) as conn,
                    conn.transaction(),
                ):
                    # Housekeeping never waits for a standby: in strict mode with none
                    # it would hold up the monitor's round (and with it the write block
                    # that strict mode owes its clients).  A trim lost in a failover is
                    # simply done again.
                    await conn.execute("SET LOCAL synchronous_commit = local")
                    expired = await changelog.expire_consumers(
                        conn, idle_seconds=self.settings.consumer_expiry
                    )
                    expired += await changefeed.expire_consumers(
                        conn, cap_seconds=self.settings.feed_retention_cap
                    )
                    removed = await changelog.trim(
                        conn, keep_seconds=self.settings.changelog_retention
                    )
                for name in expired:
                    log.warning("dropped change-log consumer %s on %s: idle", name, shard.name)
                if removed:
                    log.info("trimmed %s change-log entries on %s", removed, shard.name)
            except Exception as exc:
                log.warning("cannot trim the change log of %s: %s", shard.name, exc)
                continue
            try:  # in transactions of its own: a slow trim never holds the one above back
                async with asyncio.timeout(30), failover.connect(shard.primary) as conn:
                    dropped = await idempotency.trim(
                        conn, keep_seconds=self.settings.idempotency_retention
                    )
                if dropped:
                    log.info("dropped %s idempotency records on %s", dropped, shard.name)
            except Exception as exc:
                log.warning("cannot trim idempotency records of %s: %s", shard.name, exc)

    async def _note_positions(self, topology: Topology) -> None:
        """Record where each healthy primary's WAL was (the loss a later forced
        promotion reports is measured against it)."""
        snapshot = self.health.snapshot
        positions = {}
        for shard in topology.shards.values():
            primary = shard.primary
            health = snapshot.get(primary.name) if primary else None
            if primary and health and health.healthy and not health.in_recovery and health.lsn:
                positions[shard.name, primary.name] = health.lsn
        if positions:
            async with self._catalog() as conn:
                await catalog.note_primary_positions(conn, positions)

    async def _finish_switchovers(self, topology: Topology) -> None:
        """Finish the switchover of any primary found fenced on its node for
        ``failover_after_checks`` rounds although the catalog still names it: the
        process that fenced it died before recording a new primary (see
        :func:`~shardd.failover.finish_switchover`).  Lossless either way, so it runs
        whether or not automatic failover is on."""
        snapshot = self.health.snapshot
        for shard in _builtin(topology):  # shardd never fences a Patroni shard's primary
            primary = shard.primary
            health = snapshot.get(primary.name) if primary else None
            if primary is None or health is None or not (health.healthy and health.fenced):
                if primary is not None:
                    self._fenced_rounds.pop(primary.name, None)
                continue
            rounds = self._fenced_rounds.get(primary.name, 0) + 1
            self._fenced_rounds[primary.name] = rounds
            if rounds < self.settings.failover_after_checks:
                continue
            try:
                await failover.finish_switchover(
                    self.settings.catalog_dsn, shard.name, fenced_primary=primary.name
                )
            except STEP_ERRORS as exc:
                log.error("shard %s: interrupted switchover not finished: %s", shard.name, exc)

    async def _follow_patroni(self, topology: Topology) -> None:
        """For each shard under Patroni: record the leader Patroni elected, lift a stale
        fence off a primary that still leads, record fenced nodes Patroni runs as
        replicas again as replicas (see :mod:`shardd.failover.patroni`), and in a
        synchronous cluster mark the shard degraded while Patroni's DCS names no running
        synchronous standby (its non-strict ``synchronous_mode`` commits without one then,
        and would promote nobody)."""
        shards = [s for s in topology.shards.values() if s.failover_mode == "patroni"]
        if not shards:
            return
        patroni = failover.patroni
        snapshot = self.health.snapshot
        states = await patroni.member_states(n for s in shards for n in s.nodes)
        async with self._catalog() as conn:
            synchronous = await catalog.is_synchronous(conn)
        for shard in shards:
            leader = patroni.leader_of(
                {n.name: states[n.name] for n in shard.nodes if n.name in states}
            )
            health = snapshot.get(leader) if leader else None
            primary = shard.primary.name if shard.primary else None
            try:
                if leader is not None and leader == primary:
                    if health and health.fenced:
                        await patroni.lift_stale_fence(
                            self.settings.catalog_dsn, shard.name, leader
                        )
                    degraded = synchronous and patroni.sync_standbys(shard, states) == 0
                    # A member that did not answer this round is unknown, not "not
                    # synchronous": the flag (an epoch for every instance) waits for all.
                    answered = all(n.name in states for n in shard.nodes if not n.fenced)
                    if answered and shard.degraded != degraded:
                        async with self._catalog() as conn:
                            await catalog.set_degraded(conn, shard.name, degraded)
                    metrics.DEGRADED.labels(shard.name).set(int(degraded))
                elif leader is not None and health and health.healthy and not health.in_recovery:
                    await patroni.follow(
                        self.settings.catalog_dsn,
                        shard.name,
                        leader=leader,
                        expected_primary=primary,
                    )
                for name in patroni.rejoined(shard, states):
                    health = snapshot.get(name)
                    if health and health.healthy and health.in_recovery and health.streaming:
                        await patroni.record_rejoin(self.settings.catalog_dsn, shard.name, name)
                await self._refence_left_running(shard, states)
            except STEP_ERRORS as exc:  # one shard's trouble does not hold the others up
                log.error("shard %s: cannot follow Patroni: %s", shard.name, exc)

    async def _refence_left_running(
        self, shard: Shard, states: dict[str, failover.patroni.MemberState]
    ) -> None:
        """Fence on its node a replaced primary of a shard under Patroni that runs as a
        primary without holding the leader key (its Patroni dead or hung, its Postgres
        up): following fences it once, but it may not have answered then, or the
        follower died first.  Its own Patroni must answer that it does not lead (one
        that does not answer may be the leader this round's topology does not show)."""
        for node in shard.nodes:
            health = self.health.snapshot.get(node.name)
            state = states.get(node.name)
            if not node.fenced or health is None or not health.healthy or health.in_recovery:
                continue
            if health.fenced or state is None or state.role == "leader":
                continue
            if (
                await failover.fence_on_node(node, "replaced; Patroni does not lead here")
                is not None
            ):
                log.warning("fenced %s: a replaced primary still running as one", node.name)

    async def _refence(self, topology: Topology) -> None:
        """Fence on the node every fenced former primary that answers again, and make
        the loss of the promotion that replaced it exact from its end of WAL.  Not on a
        shard under Patroni: a node out of recovery there may be the leader Patroni
        elected again, which this round's topology may not show yet; following fences
        the old primary there (see :mod:`shardd.failover.patroni`)."""
        snapshot = self.health.snapshot
        for node in (n for s in _builtin(topology) for n in s.nodes):
            state = snapshot.get(node.name)
            if not node.fenced:
                self._refenced.discard(node.name)
                continue
            if state is None or not state.healthy or state.in_recovery:
                self._refenced.discard(node.name)
                continue
            if node.name not in self._refenced:
                end = await failover.fence_on_node(node, "replaced by a failover")
                if end is not None:
                    log.warning("fenced %s, a former primary that came back", node.name)
                    self._refenced.add(node.name)
                    async with self._catalog() as conn:
                        await catalog.record_exact_loss(conn, old_primary=node.name, end_lsn=end)


def _builtin(topology: Topology) -> list[Shard]:
    """The shards whose primary shardd's monitor chooses (not Patroni)."""
    return [s for s in topology.shards.values() if s.failover_mode == "builtin"]
