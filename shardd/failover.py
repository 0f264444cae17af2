"""Replacing a shard's primary: the decisions (pure) and the steps (on real nodes).

Decisions are pure functions over immutable snapshots and are unit-tested without
Postgres: :func:`shard_view` summarizes one shard from the health snapshot,
:func:`decide` says whether to promote, and :func:`choose_candidate` picks the replica
with the most WAL.

The steps are :func:`fail_over` (a dead primary, run by the monitor) and
:func:`switch_over` (planned, run by ``shardctl failover``); both end in
:func:`_promote_and_record`.  :func:`rejoin` turns a fenced former primary back into a
replica of its shard.  Every step takes a per-shard advisory lock on the catalog, so two
monitors, or a monitor and an operator, never work on one shard at once.

Safety, in short (each step's docstring has the details):

* A write is refused *by the node* once it is fenced (``shardd_node_state.fenced``,
  checked inside every write's transaction), and refused by every instance's router once
  the catalog marks the node fenced.  An instance that cannot confirm its topology for
  ``topology_lease`` seconds stops writing, so after a fence has been committed for that
  long no instance routes a write to the old primary.
* With synchronous replication every acknowledged commit is on at least one replica;
  the candidate is the replica with the most WAL, so it has them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from . import admin, catalog, metrics, pgctl
from .nodes import HealthSnapshot
from .topology import Node, Shard

log = logging.getLogger(__name__)

# Advisory-lock keys on the catalog: (class, key).  The monitor lease is one lock; the
# per-shard failover lock uses the shard name's hash as key.
LOCK_CLASS = 1936221286
MONITOR_KEY = 0
SYNC_STANDBYS = "ANY 1 (*)"


class FailoverError(Exception):
    """A failover or switchover could not be carried out (nothing was promoted)."""


# -- decisions (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    name: str
    position: int | None  # WAL received or replayed, whichever is further; None: unknown
    promoted: bool = False  # already out of recovery: a promotion that was not recorded


@dataclass(frozen=True)
class ShardView:
    shard: str
    primary: str | None  # the catalog's unfenced primary
    primary_failures: int  # its consecutive failed health checks
    primary_position: int | None  # its last known WAL position
    candidates: tuple[Candidate, ...]  # healthy replicas

    def needs_primary(self, failures_needed: int) -> bool:
        """No primary on record, or it failed ``failures_needed`` checks in a row."""
        return self.primary is None or self.primary_failures >= failures_needed


@dataclass(frozen=True)
class Decision:
    shard: str
    promote: Candidate | None
    reason: str


def shard_view(shard: Shard, health: HealthSnapshot) -> ShardView:
    primary = shard.primary
    primary_health = health.get(primary.name) if primary else None
    candidates = []
    for node in shard.replicas:
        state = health.get(node.name)
        if state is None or not state.healthy:
            continue
        positions = [p for p in (state.received_lsn, state.lsn) if p is not None]
        candidates.append(
            Candidate(
                node.name,
                max(positions) if positions else None,
                promoted=state.in_recovery is False,
            )
        )
    return ShardView(
        shard=shard.name,
        primary=primary.name if primary else None,
        primary_failures=primary_health.failures if primary_health else 0,
        primary_position=primary_health.lsn if primary_health else None,
        candidates=tuple(candidates),
    )


def choose_candidate(candidates: Iterable[Candidate]) -> Candidate | None:
    """The replica to promote: the one with the most WAL (ties: the first by name).

    A replica already out of recovery wins outright: a previous promotion got that far
    and was not recorded, and promoting a second node would fork the shard.  A replica
    whose position is unknown is never chosen: it might be missing acknowledged writes.
    """
    ordered = sorted(candidates, key=lambda c: c.name)
    promoted = [c for c in ordered if c.promoted]
    if promoted:
        return promoted[0]
    known = [c for c in ordered if c.position is not None]
    if not known:
        return None
    best = max(c.position for c in known if c.position is not None)
    return next(c for c in known if c.position == best)


def decide(view: ShardView, *, failures_needed: int) -> Decision:
    """Promote when the primary failed ``failures_needed`` checks in a row, or is gone."""
    if not view.needs_primary(failures_needed):
        return Decision(
            view.shard, None, f"primary healthy ({view.primary_failures} failed checks)"
        )
    candidate = choose_candidate(view.candidates)
    if candidate is None:
        return Decision(view.shard, None, "no healthy replica with a known position")
    why = "no primary" if view.primary is None else f"{view.primary_failures} failed checks"
    return Decision(view.shard, candidate, why)


def lost_bytes(old_position: int | None, new_position: int | None) -> int | None:
    if old_position is None or new_position is None:
        return None
    return max(0, old_position - new_position)


# -- talking to nodes -------------------------------------------------------------------


def connect(
    node: Node, *, connect_seconds: float = 3.0
) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
    return admin.connect(node.dsn(), connect_seconds=connect_seconds)


async def _position(node: Node) -> Candidate | None:
    try:
        async with connect(node, connect_seconds=2.0) as conn:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS rec, pg_last_wal_receive_lsn() AS received,"
                " pg_last_wal_replay_lsn() AS replayed,"
                " CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn() END AS current"
            )
    except Exception as exc:  # an unreachable replica is no candidate
        log.warning("failover: cannot read the position of %s: %s", node.name, exc)
        return None
    if not row["rec"]:
        return Candidate(node.name, int(row["current"]), promoted=True)
    positions = [int(p) for p in (row["received"], row["replayed"]) if p is not None]
    return Candidate(node.name, max(positions) if positions else None)


async def _answers(node: Node) -> bool:
    try:
        async with connect(node, connect_seconds=1.0) as conn:
            await conn.fetchval("SELECT 1", timeout=1.0)
        return True
    except Exception:
        return False


async def positions(nodes: Sequence[Node]) -> list[Candidate]:
    found = await asyncio.gather(*(_position(node) for node in nodes))
    return [c for c in found if c is not None]


async def fence_on_node(node: Node, reason: str) -> bool:
    """Make a node refuse every write (``shardd_node_state``); False if unreachable.

    Used on a former primary that answers again.  The flag is a row on the node, so it
    holds for every router, however old its topology.
    """
    try:
        async with asyncio.timeout(5), connect(node, connect_seconds=2.0) as conn:
            if await conn.fetchval("SELECT pg_is_in_recovery()"):
                return True
            # Local commit: the node's synchronous standby is gone, and waiting for one
            # would hang here (the fence matters only on this node).
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = local")
                await conn.execute(
                    "UPDATE shardd_node_state SET fenced = true, reason = $1,"
                    " changed_at = now() WHERE NOT fenced",
                    reason,
                )
            return True
    except Exception as exc:
        log.warning("cannot fence %s on the node: %s", node.name, exc)
        return False


async def _promote(node: Node, *, wait_seconds: float) -> None:
    """Promote a replica (a no-op when it already is out of recovery) and unfence it.

    The replica may have replayed the old primary's fence row (a planned switchover
    writes it before promoting), so the new primary clears it; nothing routes writes to
    the node until the catalog records it as primary, after this.
    """
    async with connect(node, connect_seconds=5.0) as conn:
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            promoted = await conn.fetchval(
                "SELECT pg_promote(true, $1)", max(1, int(wait_seconds)), timeout=wait_seconds + 5
            )
            if not promoted:
                raise FailoverError(f"{node.name} did not finish promotion in {wait_seconds:.0f}s")
        await conn.execute(
            "UPDATE shardd_node_state SET fenced = false, reason = 'promoted',"
            " changed_at = now() WHERE fenced"
        )


def _conninfo(primary: Node, application_name: str) -> str:
    parts = {
        "host": primary.host,
        "port": str(primary.port),
        "user": primary.username,
        "application_name": application_name,
    }
    if primary.password is not None:
        parts["password"] = primary.password
    return " ".join(f"{k}='{v.replace(chr(39), chr(92) + chr(39))}'" for k, v in parts.items())


def slot_name(node: Node) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in node.name.lower())


async def repoint(replica: Node, primary: Node) -> bool:
    """Make a replica stream from a new primary (through a slot there); False on failure.

    Safe because the replica had at most as much WAL as the promoted node (which was
    chosen for having the most), so it can follow the new timeline from the fork point.
    """
    try:
        async with connect(primary) as conn:
            await conn.execute(
                "SELECT pg_create_physical_replication_slot($1) WHERE NOT EXISTS"
                " (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                slot_name(replica),
            )
        async with connect(replica) as conn:
            conninfo = _conninfo(primary, replica.name)
            await conn.execute(f"ALTER SYSTEM SET primary_conninfo = {_literal(conninfo)}")
            await conn.execute(
                f"ALTER SYSTEM SET primary_slot_name = {_literal(slot_name(replica))}"
            )
            await conn.execute("SELECT pg_reload_conf()")
        return True
    except Exception as exc:
        log.warning("cannot repoint %s at %s: %s", replica.name, primary.name, exc)
        return False


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def set_sync_standbys(primary: Node, *, synchronous: bool) -> None:
    """Synchronous commit on a primary with at least one standby, else asynchronous.

    A primary whose only replica was promoted away would otherwise block every commit;
    like Patroni's non-strict synchronous mode it runs asynchronously until a replica
    rejoins, and ``shardctl status`` shows that.
    """
    value = SYNC_STANDBYS if synchronous else ""
    async with connect(primary) as conn:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {_literal(value)}")
        await conn.execute("SELECT pg_reload_conf()")


# -- the catalog side ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def shard_lock(catalog_dsn: str, shard: str) -> AsyncIterator[asyncpg.Connection]:
    """A catalog connection holding the shard's failover lock (released on close)."""
    async with admin.connect(catalog_dsn) as conn:
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", LOCK_CLASS, shard)
        yield conn


@dataclass(frozen=True)
class Outcome:
    shard: str
    old_primary: str
    new_primary: str
    kind: str
    lost_bytes: int | None
    epoch: int
    seconds: float  # from detection (or the operator's command) to the recorded primary


async def _promote_and_record(
    conn: asyncpg.Connection,
    shard: Shard,
    old: Node,
    candidate: Candidate,
    *,
    kind: str,
    lost: int | None,
    detected_at: datetime,
    started: float,
    promote_timeout: float,
) -> Outcome:
    """Promote, repoint the other replicas, set the commit mode, record the new primary.

    If the process dies after the promotion but before the record, the shard has no
    routable primary (the old one is fenced) and the next monitor finds the promoted
    node out of recovery and records it (see :func:`choose_candidate`).
    """
    new = next(node for node in shard.nodes if node.name == candidate.name)
    await _promote(new, wait_seconds=promote_timeout)
    others = [n for n in shard.replicas if n.name != new.name]
    repointed = [n for n in others if await repoint(n, new)]
    synchronous = await catalog.is_synchronous(conn)
    await set_sync_standbys(new, synchronous=synchronous and bool(repointed))
    epoch = await catalog.record_promotion(
        conn,
        shard=shard.name,
        old_primary=old.name,
        new_primary=new.name,
        kind=kind,
        lost_bytes=lost,
        detected_at=detected_at,
    )
    seconds = time.monotonic() - started
    metrics.FAILOVERS.labels(shard.name, kind).inc()
    metrics.FAILOVER_SECONDS.labels(kind).observe(seconds)
    log.warning(
        "shard %s: %s is the new primary (was %s; %s; lost %s bytes; %.2fs)",
        shard.name,
        new.name,
        old.name,
        kind,
        "?" if lost is None else lost,
        seconds,
    )
    return Outcome(shard.name, old.name, new.name, kind, lost, epoch, seconds)


def _old_primary(shard: Shard) -> Node | None:
    """The unfenced primary, or else the fenced one a crashed failover left behind."""
    if shard.primary is not None:
        return shard.primary
    fenced = [n for n in shard.nodes if n.role == "primary" and n.fenced]
    return fenced[0] if len(fenced) == 1 else None


async def fail_over(
    catalog_dsn: str,
    shard_name: str,
    *,
    lease: float,
    expected_primary: str | None,
    promote_timeout: float = 30.0,
    old_position: int | None = None,
    detected_at: datetime | None = None,
) -> Outcome | None:
    """Replace a dead primary: fence it, let instances see that, promote, record.

    Order and why it is safe:

    1. fence the old primary in the catalog (new epoch): instances stop routing writes
       to it and buffer them; also fence it on the node, in case it still answers;
    2. wait until every live instance reports that epoch (or a lease passes): from then
       on no instance writes to the old primary;
    3. read the replicas' positions again and promote the one with the most WAL;
    4. repoint the other replicas, set the commit mode, record the new primary.

    Dying after 1 leaves a shard without a primary, which the next monitor completes;
    after 3, see :func:`_promote_and_record`.

    ``expected_primary`` is the primary the caller saw fail (None: the shard had none);
    when the catalog names another, or the old primary answers again, the caller's view
    was stale and nothing is done (returns None).
    """
    started = time.monotonic()
    detected_at = detected_at or datetime.now(UTC)
    async with shard_lock(catalog_dsn, shard_name) as conn:
        topo = await catalog.load_topology(conn)
        shard = topo.shards.get(shard_name)
        if shard is None:
            return None
        current = shard.primary.name if shard.primary else None
        if current != expected_primary:
            return None
        old = _old_primary(shard)
        if old is None:
            raise FailoverError(f"shard {shard_name} has no primary on record")
        if not old.fenced and await _answers(old):
            log.warning("shard %s: primary %s answers again; no failover", shard_name, old.name)
            return None
        if not await positions(shard.replicas):
            raise FailoverError(f"shard {shard_name} has no reachable replica to promote")
        if not old.fenced:
            epoch = await catalog.fence_node(conn, old.name)
            await fence_on_node(old, "failed over")
            behind = await catalog.wait_for_instances(conn, epoch=epoch, lease=lease, since=started)
            if behind:
                log.warning("instances %s did not confirm epoch %s in time", behind, epoch)
        candidate = choose_candidate(await positions(shard.replicas))
        if candidate is None:
            raise FailoverError(f"shard {shard_name} has no replica with a known position")
        return await _promote_and_record(
            conn,
            shard,
            old,
            candidate,
            kind="automatic",
            lost=lost_bytes(old_position, candidate.position),
            detected_at=detected_at,
            started=started,
            promote_timeout=promote_timeout,
        )


async def switch_over(
    catalog_dsn: str,
    shard_name: str,
    *,
    to: str | None = None,
    catch_up_timeout: float = 10.0,
    promote_timeout: float = 30.0,
) -> Outcome:
    """Planned switchover: pause the shard's writes, let the candidate catch up, promote.

    On the old primary, one transaction takes the node lock exclusively (waiting for the
    writes in flight, holding back new ones), sets the node fenced and commits: every
    later write there is refused and retried by shardd until the catalog names the new
    primary.  That commit's WAL position is the last write the candidate must have;
    once it has replayed it, it is promoted.  If the candidate does not catch up in
    time, the old primary is unfenced again and nothing else changed.
    """
    started = time.monotonic()
    detected_at = datetime.now(UTC)
    async with shard_lock(catalog_dsn, shard_name) as conn:
        topo = await catalog.load_topology(conn)
        shard = topo.shards.get(shard_name)
        if shard is None:
            raise FailoverError(f"no shard {shard_name}")
        old = shard.primary
        if old is None:
            raise FailoverError(f"shard {shard_name} has no primary; the monitor replaces it")
        replicas = [n for n in shard.replicas if to is None or n.name == to]
        if not replicas:
            raise FailoverError(f"no replica {to!r} in shard {shard_name}" if to else "no replica")
        async with connect(old) as old_conn:
            async with old_conn.transaction():
                await old_conn.execute("SELECT pg_advisory_xact_lock(shardd_slot_lock_class(), -1)")
                await old_conn.execute(
                    "UPDATE shardd_node_state SET fenced = true, reason = 'switchover',"
                    " changed_at = now()"
                )
            target = int(await old_conn.fetchval("SELECT pg_current_wal_lsn()"))
            try:
                candidate = await _caught_up(replicas, target, wait_seconds=catch_up_timeout)
            except BaseException:
                await old_conn.execute(
                    "UPDATE shardd_node_state SET fenced = false, reason = 'switchover undone',"
                    " changed_at = now()"
                )
                raise
        return await _promote_and_record(
            conn,
            shard,
            old,
            candidate,
            kind="planned",
            lost=0,
            detected_at=detected_at,
            started=started,
            promote_timeout=promote_timeout,
        )


async def _caught_up(replicas: Sequence[Node], target: int, *, wait_seconds: float) -> Candidate:
    """The best replica once it has replayed up to ``target``."""
    deadline = time.monotonic() + wait_seconds
    while True:
        found = [c for c in await positions(replicas) if not c.promoted]
        best = choose_candidate(found)
        if best is not None and best.position is not None and best.position >= target:
            return best
        if time.monotonic() > deadline:
            raise FailoverError(
                f"no replica replayed the old primary's last write within {wait_seconds:.0f}s"
            )
        await asyncio.sleep(0.01)


async def rejoin(
    catalog_dsn: str,
    node_name: str,
    *,
    datadir: str,
    logfile: str | None = None,
    wait_seconds: float = 120.0,
) -> int:
    """Turn a fenced former primary into a replica of its shard's primary.

    Runs on the node's host: the node is stopped, its data directory replaced by a
    fresh base backup of the current primary (keeping the node's own configuration
    files), started as a standby, and recorded as a replica once it streams.  Until that
    record the node stays fenced, so a failure midway leaves nothing routed to it.
    """
    nodes = (await admin.topology(catalog_dsn)).nodes()
    node = next((n for n in nodes if n.name == node_name), None)
    if node is None:
        raise FailoverError(f"no node {node_name}")
    async with shard_lock(catalog_dsn, node.shard) as conn:
        topo = await catalog.load_topology(conn)
        shard = topo.shards[node.shard]
        node = next(n for n in shard.nodes if n.name == node_name)
        primary = shard.primary
        if primary is None:
            raise FailoverError(f"shard {shard.name} has no primary to follow")
        if primary.name == node.name:
            raise FailoverError(f"{node.name} is the primary of {shard.name}")
        async with connect(primary) as pconn:
            await pconn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = $1 AND NOT active",
                slot_name(node),
            )
        await asyncio.to_thread(
            pgctl.rebuild_standby,
            datadir,
            source_host=primary.host,
            source_port=primary.port,
            user=primary.username,
            slot=slot_name(node),
            application_name=node.name,
            logfile=logfile,
        )
        await _wait_streaming(node, wait_seconds=wait_seconds)
        epoch = await catalog.record_rejoin(conn, node.name)
        if await catalog.is_synchronous(conn):
            await set_sync_standbys(primary, synchronous=True)
        log.info("%s rejoined shard %s as a replica of %s", node.name, shard.name, primary.name)
        return epoch


async def _wait_streaming(node: Node, *, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with connect(node, connect_seconds=2.0) as conn:
                status = await conn.fetchval("SELECT status FROM pg_stat_wal_receiver")
                if status == "streaming":
                    return
        except Exception as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise FailoverError(f"{node.name} is not streaming after {wait_seconds:.0f}s ({last})")
