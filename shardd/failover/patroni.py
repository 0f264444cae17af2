"""Shards whose primary Patroni chooses (``failover_mode = 'patroni'``).

Patroni promotes, repoints replicas (``pg_rewind``, replication slots) and sets the
commit mode (its ``synchronous_mode``) from its own DCS; shardd never does any of the
three to such a shard, and never fences its primary for a switchover.  shardd follows:

* each monitor round asks every node's Patroni REST API about itself (``GET /patroni``,
  :func:`member_states`).  When exactly one node says it is the running leader
  (:func:`leader_of`), its own Postgres is out of recovery, and the catalog names
  another primary, :func:`follow` records it: a new term and epoch, the old primary
  fenced in the catalog and, if it still answers as a primary, on the node (so writes
  from an instance with an older topology are refused there, not left to hang on a
  synchronous standby that follows someone else);
* a node the catalog keeps fenced that Patroni restarted as a replica of the recorded
  primary (it streams from it) is recorded as a replica again (:func:`record_rejoin`);
* ``shardctl failover`` asks Patroni's leader for a switchover (``POST /switchover``)
  and follows the leader it elects (:func:`switch_over`).

Why it is safe: Patroni lets one member at a time hold the leader key, and a leader
that cannot renew it demotes itself before the key expires (``ttl`` >= ``loop_wait`` +
2 x ``retry_timeout``).  In Patroni's synchronous mode it promotes only the synchronous
standby, whose name alone is in the old primary's ``synchronous_standby_names``: an old
primary left running (its Patroni dead) cannot acknowledge a commit once that standby
follows the new leader.  Writes routed to a dead, demoted or fenced old primary are
refused or fail before they commit, and instances retry them on the primary recorded
next.  The primary shardd records is the one Patroni *and* the node itself say leads;
two nodes claiming it (a transition) record nothing until one remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from .. import catalog, fencing, metrics
from ..topology import Node, Shard
from .actions import FailoverError, connect, fence_on_node, positions
from .decisions import lost_bytes, previous_primary
from .steps import Outcome, shard_lock, try_shard_lock

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)
REST_SECONDS = 1.0  # a Patroni REST call's deadline (a hung member is no answer)
LEADER_ROLES = frozenset({"master", "primary"})  # Patroni 3.0 says master, later primary


@dataclass(frozen=True)
class MemberState:
    """What a node's Patroni says about itself."""

    role: str  # 'leader' (it holds the leader key), 'replica', or Patroni's own word
    running: bool  # its Postgres runs (Patroni's ``state``)
    sync_standby: bool = False  # a replica Patroni's synchronous mode may promote


def _member_state(data: Mapping[str, Any], *, holds_lock: bool) -> MemberState:
    """From ``GET /primary``: its status says whether the member holds the leader key
    (200), its body is the member's status.  The body's ``role`` only tells whether its
    Postgres is out of recovery, which a member without the key may be too (Patroni
    paused, a manual promotion, a leader that lost its key and has not demoted yet).
    ``sync_standby`` is the DCS's word: in synchronous mode Patroni promotes no other."""
    role = str(data.get("role", ""))
    leader = holds_lock and role in LEADER_ROLES
    return MemberState(
        role="leader" if leader else ("replica" if role == "replica" else role or "unknown"),
        running=data.get("state") == "running",
        sync_standby=role == "replica" and data.get("sync_standby") is True,
    )


def sync_standbys(shard: Shard, states: Mapping[str, MemberState]) -> int:
    """The shard's running replicas Patroni's synchronous mode counts as synchronous."""
    return sum(
        1
        for node in shard.nodes
        if (state := states.get(node.name)) is not None and state.running and state.sync_standby
    )


def _client() -> aiohttp.ClientSession:
    """An HTTP client for Patroni's REST API.  aiohttp's client is imported here, not
    with the module: it is a quarter of a second of every shardctl and devcluster
    command's start, and only shards under Patroni need it."""
    import aiohttp

    return aiohttp.ClientSession()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with asyncio.timeout(REST_SECONDS), session.get(url) as resp:
        # Patroni answers some states with 503 and the same JSON body.
        return resp.status, orjson.loads(await resp.read())


async def member_states(nodes: Iterable[Node]) -> dict[str, MemberState]:
    """Each node's Patroni on itself; a node whose Patroni does not answer is absent."""
    asking = [n for n in nodes if n.patroni_url]
    if not asking:
        return {}
    async with _client() as session:
        answers = await asyncio.gather(
            *(_get(session, f"{n.patroni_url}/primary") for n in asking), return_exceptions=True
        )
    return {
        node.name: _member_state(answer[1], holds_lock=answer[0] == 200)
        for node, answer in zip(asking, answers, strict=True)
        if isinstance(answer, tuple) and isinstance(answer[1], dict)
    }


def leader_of(states: Mapping[str, MemberState]) -> str | None:
    """The node whose Patroni holds the leader key and runs a primary, when exactly one
    does."""
    leaders = [name for name, state in states.items() if state.role == "leader" and state.running]
    return leaders[0] if len(leaders) == 1 else None


def rejoined(shard: Shard, states: Mapping[str, MemberState]) -> list[str]:
    """Nodes the catalog keeps fenced that Patroni runs as replicas again (to be checked
    on the node before they are recorded, see :func:`record_rejoin`)."""
    return [
        node.name
        for node in shard.nodes
        if node.fenced
        and (state := states.get(node.name)) is not None
        and state.running
        and state.role == "replica"
    ]


async def _fork_of(leader: Node) -> int | None:
    """Where the leader's timeline began: the last WAL it replayed as a replica, which
    stays put once it is promoted (the position an asynchronous promotion's loss is
    measured from); None when unknown (it has not been a replica since it started)."""
    try:
        async with asyncio.timeout(5), connect(leader, connect_seconds=2.0) as conn:
            lsn = await conn.fetchval("SELECT pg_last_wal_replay_lsn()")
        return int(lsn) if lsn is not None else None
    except Exception as exc:
        log.warning("cannot read where the timeline of %s began: %s", leader.name, exc)
        return None


async def follow(
    catalog_dsn: str,
    shard_name: str,
    *,
    leader: str,
    expected_primary: str | None,
    detected_at: datetime | None = None,
) -> Outcome | None:
    """Record ``leader``, the node Patroni elected, as the shard's primary.

    Under the shard's failover lock (None when another step holds it), and only while
    the catalog still names ``expected_primary`` (else the caller's view was stale:
    None); see :func:`_follow`.
    """
    started = time.monotonic()
    async with try_shard_lock(catalog_dsn, shard_name) as conn:
        if conn is None:
            return None
        shard = (await catalog.load_topology(conn)).shards.get(shard_name)
        if shard is None or shard.failover_mode != "patroni":
            return None
        current = shard.primary.name if shard.primary else None
        if current != expected_primary or current == leader:
            return None
        return await _follow(
            conn, shard, leader, started=started, detected_at=detected_at or datetime.now(UTC)
        )


async def _follow(
    conn: asyncpg.Connection,
    shard: Shard,
    leader: str,
    *,
    started: float,
    detected_at: datetime,
    fence_old: bool = True,
) -> Outcome:
    """The caller holds the shard's lock.  The node must say it is out of recovery.
    Then one catalog transaction fences the old primary and records the leader (new term
    and epoch); a fence row the leader replayed (from the old timeline, or a switchover's)
    is cleared on it first; and the old primary, if it answers as a primary, is fenced on
    its node, its end of WAL making the recorded loss exact."""
    new = next((n for n in shard.nodes if n.name == leader), None)
    if new is None:
        raise FailoverError(f"Patroni's leader {leader} is not a node of shard {shard.name}")
    if not await _leads(new):  # asked again under the lock: a round can be long
        raise FailoverError(f"{leader} no longer holds Patroni's leader key")
    async with asyncio.timeout(10), connect(new) as node_conn:
        await fencing.unfence_node(node_conn, "Patroni's leader")
    old = previous_primary(shard)
    fork = await _fork_of(new)
    lost = lost_bytes(await catalog.primary_position(conn, shard.name), fork)
    epoch = await catalog.record_promotion(
        conn,
        shard=shard.name,
        old_primary=old.name if old else "",
        new_primary=new.name,
        kind="patroni",
        lost_bytes=lost,
        lost_exact=False,
        promoted_lsn=fork,
        detected_at=detected_at,
    )
    seconds = time.monotonic() - started
    metrics.FAILOVERS.labels(shard.name, "patroni").inc()
    metrics.FAILOVER_SECONDS.labels("patroni").observe(seconds)
    log.warning(
        "shard %s: following Patroni's leader %s (was %s; epoch %s)",
        shard.name,
        new.name,
        old.name if old else "none",
        epoch,
    )
    if fence_old and old is not None and not old.fenced:
        end = await fence_on_node(old, "replaced by Patroni's leader")
        if end is not None:
            await catalog.record_exact_loss(conn, old_primary=old.name, end_lsn=end)
    return Outcome(
        shard.name, old.name if old else "", new.name, "patroni", lost, False, epoch, seconds
    )


async def record_rejoin(catalog_dsn: str, shard_name: str, node_name: str) -> int | None:
    """Record a fenced node as a replica once it streams from the recorded primary (so
    its data is that primary's: Postgres streams only along the same history); returns
    the new epoch, or None when it does not (yet)."""
    async with try_shard_lock(catalog_dsn, shard_name) as conn:
        if conn is None:
            return None
        shard = (await catalog.load_topology(conn)).shards.get(shard_name)
        node = next((n for n in shard.nodes if n.name == node_name), None) if shard else None
        primary = shard.primary if shard else None
        if node is None or not node.fenced or primary is None:
            return None
        try:
            async with asyncio.timeout(5), connect(node, connect_seconds=2.0) as node_conn:
                sender = await node_conn.fetchrow(
                    "SELECT sender_host, sender_port FROM pg_stat_wal_receiver"
                    " WHERE status = 'streaming'"
                )
        except Exception as exc:
            log.info("%s does not answer yet: %s", node_name, exc)
            return None
        if sender is None or (sender["sender_host"], sender["sender_port"]) != (
            primary.host,
            primary.port,
        ):
            return None
        epoch = await catalog.record_rejoin(conn, node_name)
        log.warning("%s streams from %s again: recorded as a replica", node_name, primary.name)
        return epoch


async def _cluster_members(shard: Shard) -> dict[tuple[str, int], str]:
    """Patroni's member names by Postgres address, from the first node that answers."""
    async with _client() as session:
        for node in shard.nodes:
            if not node.patroni_url:
                continue
            try:
                _, data = await _get(session, f"{node.patroni_url}/cluster")
                return {
                    (m["host"], int(m["port"])): m["name"]
                    for m in data.get("members", [])
                    if "host" in m and "port" in m
                }
            except Exception:
                continue
    raise FailoverError(f"no Patroni member of shard {shard.name} answers")


async def switch_over(
    catalog_dsn: str, shard_name: str, *, to: str | None, wait_seconds: float = 30.0
) -> Outcome:
    """A planned switchover by Patroni, with the built-in one's promise: clients see
    added latency, not errors.

    Under the shard's lock: the primary is fenced on its node as for a built-in
    switchover (the fence waits for the writes in flight, and later ones are refused
    and retried by the instances until the catalog names the new primary); Patroni's
    leader is asked to hand over (``POST /switchover``) to ``to`` (None: a replica
    Patroni picks, in synchronous mode its synchronous standby); the leader it elects is
    followed (:func:`_follow`, which clears the fence the leader replayed).  If Patroni
    refuses, the old primary is unfenced.  If this process dies in between, the fence
    expires and the monitor lifts it while Patroni's leader is still that primary
    (:func:`lift_stale_fence`).
    """
    started = time.monotonic()
    async with shard_lock(catalog_dsn, shard_name) as conn:
        deadline = time.monotonic() + wait_seconds  # from the lock on
        shard = (await catalog.load_topology(conn)).shards.get(shard_name)
        if shard is None or shard.failover_mode != "patroni":
            raise FailoverError(f"no shard {shard_name} under Patroni")
        old = shard.primary
        if old is None or not old.patroni_url:
            raise FailoverError(f"shard {shard_name} has no primary on record")
        names = await _cluster_members(shard)
        request: dict[str, str] = {"leader": names.get((old.host, old.port), old.name)}
        if to is not None:
            target = next((n for n in shard.replicas if n.name == to), None)
            if target is None:
                raise FailoverError(f"no replica {to!r} in shard {shard_name}")
            request["candidate"] = names.get((target.host, target.port), target.name)
        try:
            async with asyncio.timeout(10), connect(old) as old_conn:
                await fencing.fence_node(
                    old_conn, "switchover", wait_for_writes=True, expires_in=wait_seconds + 10
                )
        except BaseException:
            await _undo_fence(old)  # a fence committed before a timeout cut the wait
            raise
        answer, text = await _ask_switchover(old, request, deadline)
        if answer is not None and 400 <= answer < 500:
            # A clear refusal (a candidate that is not the synchronous standby, a leader
            # that changed; or never sent): nothing happens, so the primary takes writes.
            await _undo_fence(old)
            raise FailoverError(f"Patroni refused the switchover ({answer}): {text}")
        # 200, or an answer that does not settle it (Patroni's 503 "status unknown", none
        # at all): Patroni may still switch over, so the fence stays (it expires, and the
        # monitor lifts it while that primary still leads) and the new leader is awaited.
        # A 503 that says it failed settles it once the old primary is seen leading.
        failed = answer == 503 and "failed" in text.lower()
        while True:
            leader = leader_of(await member_states(shard.nodes))
            if leader is not None and leader != old.name:
                with contextlib.suppress(FailoverError):  # not out of recovery yet
                    return await _follow(
                        conn,
                        shard,
                        leader,
                        started=started,
                        detected_at=datetime.now(UTC),
                        fence_old=False,  # fenced above; Patroni restarts it as a replica
                    )
            if failed and leader == old.name and await _still_primary(old):
                await _undo_fence(old)
                raise FailoverError(f"Patroni did not switch over ({answer}): {text}")
            if time.monotonic() > deadline:
                raise FailoverError(
                    f"Patroni's answer ({answer or 'none'}: {text}) leaves the outcome open, and"
                    f" no other leader was seen within {wait_seconds:.0f}s; {old.name} stays"
                    " fenced until its fence expires (the monitor lifts it if it still leads,"
                    " and follows a new leader if Patroni elects one)"
                )
            await asyncio.sleep(0.1)


async def _ask_switchover(
    leader: Node, request: Mapping[str, str], deadline: float
) -> tuple[int | None, str]:
    """POST the switchover to Patroni's leader: (HTTP status, text); (None, ...) when no
    answer came (it may have been acted on), (400, ...) when it was never sent."""
    import aiohttp  # as in _client

    url = f"{leader.patroni_url}/switchover"
    try:
        async with _client() as session:
            try:
                async with (
                    asyncio.timeout(max(5.0, deadline - time.monotonic())),
                    session.post(url, data=orjson.dumps(request)) as resp,
                ):
                    return resp.status, (await resp.read()).decode(errors="replace").strip()
            except aiohttp.ClientConnectorError as exc:  # never reached Patroni
                return 400, f"cannot reach {url}: {exc}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return None, f"no answer ({type(exc).__name__})"


async def _undo_fence(node: Node) -> None:
    """Unfence a primary whose switchover did not happen (if it still is one); a failure
    leaves the fence to expire (the monitor then lifts it)."""
    try:
        if await _still_primary(node):
            async with asyncio.timeout(10), connect(node) as node_conn:
                await fencing.unfence_node(node_conn, "switchover undone")
    except Exception as exc:
        log.warning("cannot unfence %s after its switchover did not happen: %s", node.name, exc)


async def _leads(node: Node) -> bool:
    """Whether ``node``'s Patroni holds the leader key now and its Postgres says it is out
    of recovery."""
    states = await member_states([node])
    return states.get(node.name, MemberState("", False)).role == "leader" and (
        await _still_primary(node)
    )


async def _still_primary(node: Node) -> bool:
    found = await positions([node])
    return bool(found and found[0].promoted)


async def lift_stale_fence(catalog_dsn: str, shard_name: str, node_name: str) -> bool:
    """Unfence Patroni's leader, which is also the recorded primary, when its node fence
    is not a live switchover's: a switchover that died before asking Patroni (its fence
    expired), or a fence from before the node was replaced and elected again (replayed
    or written by a step working on an older topology).  Only while the shard's lock is
    free (a live switchover holds it).  True when lifted."""
    async with try_shard_lock(catalog_dsn, shard_name) as conn:
        if conn is None:
            return False
        shard = (await catalog.load_topology(conn)).shards.get(shard_name)
        primary = shard.primary if shard else None
        if primary is None or primary.name != node_name or not await _leads(primary):
            return False
        async with asyncio.timeout(10), connect(primary) as node_conn:
            lifted = await node_conn.execute(
                "UPDATE shardd_node_state SET fenced = false, reason = 'stale fence lifted',"
                " changed_at = now(), expires_at = NULL WHERE fenced AND NOT"
                " (reason = 'switchover' AND expires_at >= clock_timestamp())"
            )
        if lifted.endswith(" 0"):
            return False
        log.warning("shard %s: lifted a stale fence of its primary %s", shard_name, node_name)
        return True
