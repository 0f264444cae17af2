"""The steps of replacing a shard's primary, against the catalog and the nodes.

:func:`fail_over` replaces a dead primary (run by the monitor, or by an operator with
``force``); :func:`switch_over` is planned (``shardctl failover``); both end in
:func:`_promote_and_record`.  Every step holds the shard's failover lock on the catalog,
so two monitors, or a monitor and an operator, never work on one shard at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from .. import admin, catalog, fencing, metrics
from ..topology import Node, Shard
from .actions import (
    FailoverError,
    answers,
    connect,
    fence_on_node,
    positions,
    promote,
    repoint,
    set_sync_standbys,
)
from .decisions import (
    Candidate,
    choose_candidate,
    lost_bytes,
    preferred_replicas,
    previous_primary,
)

log = logging.getLogger(__name__)
CATALOG_STATEMENT_SECONDS = 60.0
ZONE_GRACE = 1.0  # seconds a switchover waits for a replica in the primary's zone


@contextlib.asynccontextmanager
async def shard_lock(catalog_dsn: str, shard: str) -> AsyncIterator[asyncpg.Connection]:
    """A catalog connection holding the shard's failover lock (released on close)."""
    # Each statement is bounded (waiting for the lock too): a hung catalog or a hung
    # holder makes the step fail, never hang.
    async with admin.connect(catalog_dsn, command_timeout=CATALOG_STATEMENT_SECONDS) as conn:
        await conn.execute(
            "SELECT pg_advisory_lock($1, hashtext($2))", fencing.FAILOVER_LOCK_CLASS, shard
        )
        yield conn


@contextlib.asynccontextmanager
async def try_shard_lock(catalog_dsn: str, shard: str) -> AsyncIterator[asyncpg.Connection | None]:
    """The shard's failover lock if it is free now, else None: for steps the monitor
    runs, which never wait for it (a switchover holds it while it works) and try again
    next round."""
    async with admin.connect(catalog_dsn, command_timeout=CATALOG_STATEMENT_SECONDS) as conn:
        taken = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", fencing.FAILOVER_LOCK_CLASS, shard
        )
        yield conn if taken else None


@dataclass(frozen=True)
class Outcome:
    shard: str
    old_primary: str
    new_primary: str
    kind: str
    lost_bytes: int | None
    lost_exact: bool
    epoch: int
    seconds: float  # from detection (or the operator's command) to the recorded primary


async def _promote_and_record(
    conn: asyncpg.Connection,
    shard: Shard,
    old: Node,
    candidate: Candidate,
    *,
    kind: str,
    old_position: int | None,
    detected_at: datetime,
    started: float,
    promote_timeout: float,
) -> Outcome:
    """Promote, repoint the other replicas, set the commit mode, record the new primary.

    The loss recorded is WAL the old primary was known to have beyond the promoted
    node's position: exact for a planned switchover (0), a lower bound otherwise, made
    exact when the old primary answers again (the monitor reads its end of WAL).

    If the process dies after the promotion but before the record, the shard has no
    routable primary (the old one is fenced) and the next monitor finds the promoted
    node out of recovery and records it (see :func:`~.decisions.choose_candidate`).
    """
    new = next(node for node in shard.nodes if node.name == candidate.name)
    if not await _holds_lock(conn, shard.name):
        # Whoever holds it now works on this shard; the old primary stays fenced, and
        # the monitor completes the failover or finishes the switchover.
        raise FailoverError(f"shard {shard.name}: lost the shard's lock; nothing promoted")
    fork = await promote(new, wait_seconds=promote_timeout)
    others = [n for n in shard.replicas if n.name != new.name]
    repointed = [n for n in others if await repoint(n, new)]
    synchronous = await catalog.is_synchronous(conn)
    strict = await catalog.synchronous_mode(conn) == "strict"
    # Strict mode keeps waiting for a standby (the monitor refuses the shard's writes
    # meanwhile); degrade mode runs asynchronously until one streams, and says so.
    await set_sync_standbys(new, synchronous=synchronous and (strict or bool(repointed)))
    await catalog.set_degraded(conn, shard.name, synchronous and not strict and not repointed)
    exact = kind == "planned"
    lost = 0 if exact else lost_bytes(old_position, fork)
    epoch = await catalog.record_promotion(
        conn,
        shard=shard.name,
        old_primary=old.name,
        new_primary=new.name,
        kind=kind,
        lost_bytes=lost,
        lost_exact=exact,
        promoted_lsn=fork,
        detected_at=detected_at,
    )
    seconds = time.monotonic() - started
    metrics.FAILOVERS.labels(shard.name, kind).inc()
    metrics.FAILOVER_SECONDS.labels(kind).observe(seconds)
    log.warning(
        "shard %s: %s is the new primary (was %s; %s; lost %s%s bytes; %.2fs)",
        shard.name,
        new.name,
        old.name,
        kind,
        "" if exact else "at least ",
        "?" if lost is None else lost,
        seconds,
    )
    return Outcome(shard.name, old.name, new.name, kind, lost, exact, epoch, seconds)


async def fail_over(
    catalog_dsn: str,
    shard_name: str,
    *,
    lease: float,
    expected_primary: str | None,
    allowed: Sequence[str] | None = None,
    promote_timeout: float = 30.0,
    old_position: int | None = None,
    detected_at: datetime | None = None,
) -> Outcome | None:
    """Replace a dead primary: fence it, let instances see that, promote, record.

    Order and why it is safe:

    1. fence the old primary in the catalog (new epoch): instances stop routing writes
       to it and buffer them; also fence it on the node, in case it still answers;
    2. wait until every live instance reports that epoch, or a topology lease has passed
       since the fence *committed*: from then on no instance writes to the old primary
       (an instance that cannot confirm its topology for a lease stops writing);
    3. read the replicas' positions again and promote the one with the most WAL among
       ``allowed`` (the replicas the decision found eligible; None: any, which only a
       forced promotion asks for);
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
        old = previous_primary(shard)
        if old is None:
            raise FailoverError(f"shard {shard_name} has no primary on record")
        if not old.fenced and await answers(old):
            log.warning("shard %s: primary %s answers again; no failover", shard_name, old.name)
            return None
        if not await positions(shard.replicas):
            raise FailoverError(f"shard {shard_name} has no reachable replica to promote")
        if not old.fenced:
            epoch = await catalog.fence_node(conn, old.name)
            fenced_at = time.monotonic()
            await fence_on_node(old, "failed over")
            behind = await catalog.wait_for_instances(
                conn, epoch=epoch, lease=lease, since=fenced_at
            )
            if behind:
                log.warning("instances %s did not confirm epoch %s in time", behind, epoch)
        found = await positions(shard.replicas)
        if allowed is not None:
            found = [c for c in found if c.name in allowed]
        candidate = choose_candidate(found, preferred=preferred_replicas(shard))
        if candidate is None:
            raise FailoverError(f"shard {shard_name} has no eligible replica with a known position")
        # What the loss is measured against: the most WAL anyone saw on this shard (the
        # monitor records the primary's position each round, for callers without a
        # health history of their own, such as a forced promotion from shardctl).
        recorded = await catalog.primary_position(conn, shard_name)
        known = [p for p in (old_position, recorded, *(c.position for c in found)) if p is not None]
        return await _promote_and_record(
            conn,
            shard,
            old,
            candidate,
            kind="automatic" if allowed is not None else "forced",
            old_position=max(known) if known else None,
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

    On the old primary one transaction takes the node lock exclusively (waiting for the
    writes and control-plane effects in flight, holding back new ones), sets the node
    fenced and commits: every later write or move step there is refused and retried
    until the catalog names the new primary.  That commit's WAL position is the last
    write the candidate must have; once it has replayed it, it is promoted.  If the
    candidate does not catch up in time, the old primary is unfenced again and nothing
    else changed.  If the process dies between the fence and the record, the monitor
    finishes the switchover (:func:`finish_switchover`).
    """
    started = time.monotonic()
    detected_at = datetime.now(UTC)
    async with shard_lock(catalog_dsn, shard_name) as conn:
        topo = await catalog.load_topology(conn)
        shard = topo.shards.get(shard_name)
        if shard is None:
            raise FailoverError(f"no shard {shard_name}")
        if shard.primary is None:
            raise FailoverError(
                f"shard {shard_name} has no primary; the monitor replaces it"
                " (or force a promotion with --force)"
            )
        outcome = await _switch(
            conn,
            shard,
            to=to,
            catch_up_timeout=catch_up_timeout,
            promote_timeout=promote_timeout,
            started=started,
            detected_at=detected_at,
        )
        assert outcome is not None  # only a resumed switchover finds nothing to do
        return outcome


async def finish_switchover(
    catalog_dsn: str, shard_name: str, *, fenced_primary: str, catch_up_timeout: float = 10.0
) -> Outcome | None:
    """Finish a switchover whose process died after fencing the primary on its node.

    Such a primary answers but refuses every write, and the catalog still names it, so
    nothing else would end the outage.  It is finished only when all of these hold: the
    shard's lock is free (a live switchover holds it, and checks it still does before it
    promotes or unfences), the catalog still names ``fenced_primary``, and its node is
    fenced for a switchover whose own deadline has passed.  Then a replica the dead
    process promoted after the fence is recorded, or else a replica that replays the
    fenced primary's last write is promoted.  If no replica does, the primary is
    unfenced and keeps its role; if some replica does not answer (it may be a promoted
    one), nothing is decided and the next round tries again.  Returns None when there
    was nothing to finish.
    """
    started = time.monotonic()
    async with try_shard_lock(catalog_dsn, shard_name) as conn:
        if conn is None:
            return None
        shard = (await catalog.load_topology(conn)).shards.get(shard_name)
        old = shard.primary if shard else None
        if shard is None or old is None or old.name != fenced_primary:
            return None
        return await _switch(
            conn,
            shard,
            to=None,
            catch_up_timeout=catch_up_timeout,
            promote_timeout=30.0,
            started=started,
            detected_at=datetime.now(UTC),
            resuming=True,
        )


class Undecided(FailoverError):
    """Resuming a switchover, not every replica answered: the primary stays fenced."""


async def _switch(
    conn: asyncpg.Connection,
    shard: Shard,
    *,
    to: str | None,
    catch_up_timeout: float,
    promote_timeout: float,
    started: float,
    detected_at: datetime,
    resuming: bool = False,
) -> Outcome | None:
    """Fence the primary on its node (resuming: find it fenced), wait for a replica to
    replay that, promote it.  The caller holds the shard's lock, and it is checked again
    before anything is promoted or unfenced: a caller that lost its catalog session has
    lost the lock, and the fence then stays for :func:`finish_switchover`."""
    old = shard.primary
    assert old is not None
    replicas = [n for n in shard.replicas if to is None or n.name == to]
    if not replicas:
        raise FailoverError(f"no replica {to!r} in shard {shard.name}" if to else "no replica")
    async with connect(old) as old_conn:
        if resuming:
            state = await old_conn.fetchrow(
                "SELECT token FROM shardd_node_state WHERE fenced"
                " AND reason = 'switchover' AND expires_at < clock_timestamp()"
            )
            if state is None:
                return None  # not fenced, or by a switchover that may still be alive
            fence: UUID | None = state["token"]
            log.warning("shard %s: finishing the switchover of %s", shard.name, old.name)
        else:
            await fencing.fence_node(
                old_conn,
                "switchover",
                wait_for_writes=True,
                expires_in=catch_up_timeout + promote_timeout + 10.0,
            )
            fence = None
        target = int(await old_conn.fetchval("SELECT pg_current_wal_lsn()"))
        try:
            candidate = await _caught_up(
                replicas,
                target,
                wait_seconds=catch_up_timeout,
                resuming=resuming,
                fence=fence,
                preferred=preferred_replicas(shard),
            )
        except Undecided:
            raise
        except BaseException:
            if await _holds_lock(conn, shard.name):
                await fencing.unfence_node(old_conn, "switchover undone")
            raise
    return await _promote_and_record(
        conn,
        shard,
        old,
        candidate,
        kind="planned",
        old_position=target,
        detected_at=detected_at,
        started=started,
        promote_timeout=promote_timeout,
    )


async def _holds_lock(conn: asyncpg.Connection, shard: str) -> bool:
    """Whether ``conn``'s session still holds the shard's failover lock (False when the
    catalog cannot say: whoever asks then does nothing)."""
    try:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND granted AND objsubid = 2"
                " AND classid::bigint = $1 AND objid::bigint = hashtext($2)::bigint & 4294967295)",
                fencing.FAILOVER_LOCK_CLASS,
                shard,
            )
        )
    except Exception:
        return False


async def _replayed_fence(replicas: Sequence[Node], name: str, fence: UUID) -> bool:
    node = next(n for n in replicas if n.name == name)
    try:
        async with connect(node) as conn:
            token = await conn.fetchval("SELECT token FROM shardd_node_state")
    except Exception:
        return False
    return bool(token == fence)


async def force_promotion(catalog_dsn: str, shard_name: str, *, lease: float) -> Outcome:
    """Promote the most advanced reachable replica of a shard whose primary is down,
    whatever its lag (an operator's decision); the outcome reports the loss."""
    topo = await admin.topology(catalog_dsn)
    shard = topo.shards.get(shard_name)
    if shard is None:
        raise FailoverError(f"no shard {shard_name}")
    outcome = await fail_over(
        catalog_dsn,
        shard_name,
        lease=lease,
        expected_primary=shard.primary.name if shard.primary else None,
        allowed=None,
    )
    if outcome is None:
        raise FailoverError(f"the primary of {shard_name} answers: use a switchover instead")
    return outcome


async def _caught_up(
    replicas: Sequence[Node],
    target: int,
    *,
    wait_seconds: float,
    resuming: bool,
    fence: UUID | None,
    preferred: frozenset[str] = frozenset(),
) -> Candidate:
    """The replica with the most WAL once it has replayed up to ``target``; of those
    with as much, one of ``preferred`` (the old primary's zone), given ``ZONE_GRACE``
    seconds (within the deadline) to draw level.

    Resuming a switchover whose fence carries the token ``fence``: a replica the dead
    process promoted (it replayed the fence, so its fence row carries the same token)
    is the only one that may be; and every replica must answer, since one that does not
    may be it.
    """
    deadline = time.monotonic() + wait_seconds
    first_ready: float | None = None  # when a replica first had replayed ``target``
    while True:
        found = await positions(replicas)
        if resuming:
            promoted = [c for c in found if c.promoted]
            for candidate in promoted:
                if fence is not None and await _replayed_fence(replicas, candidate.name, fence):
                    return candidate
            if promoted or len(found) < len(replicas):
                if time.monotonic() > deadline:
                    raise Undecided(
                        "resuming a switchover: a replica did not answer, or one is out of"
                        " recovery since before the fence; the primary stays fenced"
                    )
                await asyncio.sleep(0.1)
                continue
        answered = [c for c in found if not c.promoted]
        # Only the zone's replicas that answer can be waited for.
        zone = preferred & {c.name for c in answered}
        best = choose_candidate(answered, preferred=zone)
        if best is not None and best.position is not None and best.position >= target:
            first_ready = first_ready or time.monotonic()
            waited = time.monotonic() - first_ready
            # The most WAL wins; the zone only on a tie, worth ZONE_GRACE seconds (never
            # past the deadline) for the zone's replica to catch up with the best.
            if best.name in zone or not zone or waited > ZONE_GRACE:
                return best
            if time.monotonic() > deadline:
                return best
        if time.monotonic() > deadline:
            raise FailoverError(
                f"no replica replayed the old primary's last write within {wait_seconds:.0f}s"
            )
        await asyncio.sleep(0.01)
