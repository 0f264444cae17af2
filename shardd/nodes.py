"""Connections to the Postgres nodes of every shard, and their health.

:class:`NodePools` keeps one asyncpg pool per node, created on first use (a node that is
down at start-up does not stop shardd).  :class:`HealthMonitor` checks every node each
``health_interval`` over connections of its own and publishes an immutable
:class:`HealthSnapshot`: reachable or not, WAL position, replica lag in bytes and seconds.
Routing reads only that snapshot.  Every session shardd opens on a node carries
server-side timeouts (:func:`session_settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import asyncpg
import orjson

from . import metrics
from .topology import Node, Topology

log = logging.getLogger(__name__)


# Connections on which a commit stopped waiting for its synchronous standby: the server
# then says so in a WARNING and reports success, although only the primary has the write
# (statement_timeout fired during the wait).  Such a write is reported as ambiguous
# (shardd/executor.py, Executor._run, which listens with ``on_notice`` while it writes),
# never as acknowledged.
UNREPLICATED: set[object] = set()


def on_notice(conn: object, message: object) -> None:
    if "wait for synchronous replication" in str(getattr(message, "message", "")):
        UNREPLICATED.add(conn)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Documents come back as pre-serialized JSON fragments: a read never parses and
    # re-serializes the item, it splices the bytes Postgres sent into the response.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.Fragment(data[1:]),
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: there is nothing to undo.

    asyncpg's default reset costs a round trip per release (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL).  shardd leaves no session state on pooled connections: locks
    are transaction-scoped, nothing LISTENs or SETs, a write's notice listener is removed
    before the release, and asyncpg itself still rolls back a connection returned inside
    a transaction.
    """


async def _initialized(pool: asyncpg.Pool) -> asyncpg.Pool:
    return await pool


def session_settings(
    *, statement_timeout: float, lock_timeout: float, idle_in_transaction_timeout: float
) -> dict[str, str]:
    """Server settings of every shard session shardd opens from its pools.

    Every wait on the shard is bounded on the server itself, whatever happens to the
    client: a statement, a lock wait, a transaction left idle.  A session whose client
    vanished (its connection dropped mid-query) is noticed within a second rather than
    when the query finally tries to send its result.
    """

    def ms(seconds: float) -> str:
        return str(max(1, round(seconds * 1000)))

    return {
        "application_name": "shardd",
        "statement_timeout": ms(statement_timeout),
        "lock_timeout": ms(lock_timeout),
        "idle_in_transaction_session_timeout": ms(idle_in_transaction_timeout),
        "client_connection_check_interval": "1000",
    }


class NodePools:
    """One asyncpg pool per node, all with the same size and session settings
    (by default none but the application name)."""

    def __init__(
        self,
        *,
        pool_size: int,
        connect_timeout: float,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._server_settings = dict(server_settings or {"application_name": "shardd"})
        self._pools: dict[str, asyncpg.Pool] = {}
        self._dsns: dict[str, str] = {}
        self._ready: dict[str, asyncio.Future[object]] = {}

    async def pool(self, node: Node) -> asyncpg.Pool:
        """The node's pool, created (without connecting) on first use."""
        dsn = node.dsn()
        if self._dsns.get(node.name) != dsn:
            old = self._pools.pop(node.name, None)
            if old is not None:
                asyncio.get_running_loop().create_task(old.close())
            pool = asyncpg.create_pool(
                dsn,
                min_size=0,
                max_size=self._pool_size,
                init=_init_connection,
                reset=_keep_session,
                timeout=self._connect_timeout,
                max_inactive_connection_lifetime=60.0,
                server_settings=self._server_settings,
            )
            self._pools[node.name] = pool
            self._dsns[node.name] = dsn
            # Several requests may need the new pool at once; they share one init.
            self._ready[node.name] = asyncio.ensure_future(_initialized(pool))
        await self._ready[node.name]
        return self._pools[node.name]

    @contextlib.asynccontextmanager
    async def connection(self, node: Node) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection to ``node`` for the block."""
        async with (await self.pool(node)).acquire() as conn:
            yield conn

    def usage(self) -> dict[str, tuple[int, int]]:
        """node -> (open connections, connections in use)."""
        result = {}
        for name, pool in self._pools.items():
            size = pool.get_size()
            result[name] = (size, size - pool.get_idle_size())
        return result

    async def close(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        self._dsns.clear()
        self._ready.clear()
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)


@dataclass(frozen=True)
class NodeHealth:
    healthy: bool
    in_recovery: bool | None = None
    lsn: int | None = None  # primary: current WAL position; replica: replay position
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    error: str | None = None
    checked_at: float = 0.0
    received_lsn: int | None = None  # replica: WAL received and flushed (None on a primary)
    failures: int = 0  # consecutive failed checks, 0 when healthy
    streaming: bool = False  # replica: its WAL receiver is streaming from a primary
    standbys: int | None = None  # primary: standbys streaming from it
    last_ok_at: float | None = None  # the last check that succeeded (carried over)
    streamed_at: float | None = None  # replica: the last check that found it streaming
    fenced: bool | None = None  # the node's own fence (shardd_node_state)
    synchronous: bool | None = None  # synchronous_standby_names is set on the node


@dataclass(frozen=True)
class HealthSnapshot:
    nodes: Mapping[str, NodeHealth] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", MappingProxyType(dict(self.nodes)))

    def get(self, name: str) -> NodeHealth | None:
        return self.nodes.get(name)


def describe(node: Node, health: HealthSnapshot) -> dict[str, object]:
    """A node as the topology endpoint and ``shardctl status`` show it."""
    state = health.get(node.name)
    return {
        "name": node.name,
        "role": node.role,
        "zone": node.zone,
        "host": node.host,
        "port": node.port,
        "fenced": node.fenced,
        "healthy": bool(state and state.healthy),
        "in_recovery": state.in_recovery if state else None,
        "lag_bytes": state.lag_bytes if state else None,
        "lag_seconds": state.lag_seconds if state else None,
        "failed_checks": state.failures if state else 0,
    }


_CHECK_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
            ELSE pg_current_wal_lsn() END AS lsn,
       CASE WHEN NOT pg_is_in_recovery() THEN 0
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
             AND (SELECT status = 'streaming' FROM pg_stat_wal_receiver) THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END AS lag_s,
       pg_last_wal_receive_lsn() AS received,
       coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false) AS streaming,
       CASE WHEN NOT pg_is_in_recovery() THEN
           (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming') END AS standbys,
       (SELECT fenced FROM shardd_node_state) AS fenced,
       current_setting('synchronous_standby_names') <> '' AS synchronous
"""


async def check_node(pools: NodePools, node: Node, limit: float) -> NodeHealth:
    """One health check, ``limit`` seconds at most, whatever the node or network does.

    A check that fails drops its connection rather than handing it back: returning a
    connection whose query was interrupted waits for the server to confirm the cancel,
    which a node behind a silent network never does.
    """
    now = time.monotonic()
    pool = conn = None
    try:
        async with asyncio.timeout(limit):
            pool = await pools.pool(node)
            conn = await pool.acquire()
            row = await conn.fetchrow(_CHECK_SQL)
    except Exception as exc:  # any failure means "not healthy", reported with its reason
        if conn is not None:
            conn.terminate()
        return NodeHealth(healthy=False, error=f"{type(exc).__name__}: {exc}", checked_at=now)
    finally:
        if pool is not None and conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(limit):
                    await pool.release(conn)
    return NodeHealth(
        healthy=True,
        in_recovery=row["in_recovery"],
        lsn=row["lsn"],
        lag_seconds=float(row["lag_s"] or 0.0),
        checked_at=now,
        received_lsn=row["received"],
        streaming=row["streaming"],
        standbys=row["standbys"],
        fenced=row["fenced"],
        synchronous=row["synchronous"],
    )


def with_lag(topology: Topology, raw: Mapping[str, NodeHealth]) -> HealthSnapshot:
    """Fill in each replica's byte lag from its primary's position."""
    result = dict(raw)
    for shard in topology.shards.values():
        primary = shard.primary
        primary_health = raw.get(primary.name) if primary else None
        for node in shard.replicas:
            health = raw.get(node.name)
            if health is None or not health.healthy:
                continue
            lag = None
            if primary_health and primary_health.lsn is not None and health.lsn is not None:
                lag = max(0, primary_health.lsn - health.lsn)
            result[node.name] = dataclasses.replace(health, lag_bytes=lag)
        if primary and primary_health and primary_health.healthy:
            result[primary.name] = dataclasses.replace(primary_health, lag_bytes=0, lag_seconds=0.0)
    return HealthSnapshot(result)


def with_failures(previous: HealthSnapshot, raw: Mapping[str, NodeHealth]) -> dict[str, NodeHealth]:
    """Carry each node's count of consecutive failed checks over from the last round."""
    result = {}
    for name, health in raw.items():
        before = previous.get(name)
        if health.healthy:
            # When it was last seen streaming decides whether it may be promoted: it must
            # have streamed when its primary was last seen alive (shardd.failover).
            streamed_at = health.checked_at if health.streaming else None
            result[name] = dataclasses.replace(
                health,
                last_ok_at=health.checked_at,
                streamed_at=streamed_at or (before.streamed_at if before else None),
            )
        else:
            # A failed node keeps its last known WAL position: a failover reports how far
            # the promoted replica was behind it.
            result[name] = dataclasses.replace(
                health,
                failures=(before.failures if before else 0) + 1,
                lsn=before.lsn if before else None,
                last_ok_at=before.last_ok_at if before else None,
                streamed_at=before.streamed_at if before else None,
            )
    return result


class HealthMonitor:
    """Checks every node each ``interval`` and publishes the result as :attr:`snapshot`.

    Give it pools of its own, not the request pools: a primary whose request pool is
    saturated by slow requests is busy, not down, and must never be failed over.
    """

    def __init__(
        self, pools: NodePools, topology: Callable[[], Topology | None], *, interval: float
    ) -> None:
        self._pools = pools
        self._topology = topology
        self._interval = interval
        self.snapshot = HealthSnapshot()

    async def check_all(self) -> HealthSnapshot:
        topology = self._topology()
        if topology is None:
            return self.snapshot
        nodes = topology.nodes()
        results = await asyncio.gather(
            *(check_node(self._pools, node, self._interval * 2) for node in nodes)
        )
        raw = dict(zip((n.name for n in nodes), results, strict=True))
        self.snapshot = with_lag(topology, with_failures(self.snapshot, raw))
        metrics.observe_health(topology, self.snapshot)
        return self.snapshot

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")
            await asyncio.sleep(self._interval)
