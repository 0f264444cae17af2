"""Failover decisions: pure functions over immutable snapshots (unit-tested without
Postgres).

:func:`shard_view` summarizes one shard from the health snapshot, :func:`decide` says
whether to promote and whom, :func:`eligible` says which replicas may be promoted
automatically and :func:`choose_candidate` picks the one with the most WAL (among
those with as much, one in the old primary's zone: a zone is never chosen at the cost
of WAL).

Which replicas qualify (like Patroni's ``maximum_lag_on_failover``):

* it was streaming when its primary was last seen alive (a replica whose WAL receiver
  had stopped may be missing anything written since; its byte lag cannot tell);
* its WAL position is within ``max_lag_bytes`` of the primary's last known position;
* in synchronous mode (``ANY 1 (*)``: every streaming standby takes part in the
  quorum), the same streaming rule makes it one that was synchronous.

No qualifying replica means no automatic promotion: the shard's writes are refused
with a clear reason until an operator forces a promotion (``shardctl failover
--force``), which reports the loss.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ..nodes import HealthSnapshot
from ..topology import Node, Shard


@dataclass(frozen=True)
class Candidate:
    name: str
    position: int | None  # WAL received or replayed, whichever is further; None: unknown
    promoted: bool = False  # already out of recovery: a promotion that was not recorded
    streamed_at: float | None = None  # when it was last seen streaming (monotonic)


@dataclass(frozen=True)
class ShardView:
    shard: str
    primary: str | None  # the catalog's unfenced primary
    primary_failures: int  # its consecutive failed health checks
    primary_position: int | None  # its last known WAL position
    candidates: tuple[Candidate, ...]  # healthy replicas
    primary_seen_at: float | None = None  # when the primary last answered a check
    preferred: frozenset[str] = frozenset()  # replicas in the old primary's zone

    def needs_primary(self, failures_needed: int) -> bool:
        """No primary on record, or it failed ``failures_needed`` checks in a row."""
        return self.primary is None or self.primary_failures >= failures_needed


@dataclass(frozen=True)
class Decision:
    shard: str
    promote: Candidate | None
    reason: str
    blocked: bool = False  # a primary is needed but no replica qualifies


def previous_primary(shard: Shard) -> Node | None:
    """The unfenced primary, or else the fenced one a crashed failover left behind."""
    if shard.primary is not None:
        return shard.primary
    fenced = [n for n in shard.nodes if n.role == "primary" and n.fenced]
    return fenced[0] if len(fenced) == 1 else None


def shard_view(shard: Shard, health: HealthSnapshot) -> ShardView:
    primary = shard.primary
    # A failover that died after fencing the primary left none on record: the fenced
    # node's last known state still tells how far the replicas are behind it.
    previous = previous_primary(shard)
    primary_health = health.get(previous.name) if previous else None
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
                streamed_at=state.streamed_at,
            )
        )
    return ShardView(
        shard=shard.name,
        primary=primary.name if primary else None,
        primary_failures=primary_health.failures if primary_health and primary else 0,
        primary_position=primary_health.lsn if primary_health else None,
        candidates=tuple(candidates),
        primary_seen_at=primary_health.last_ok_at if primary_health else None,
        preferred=preferred_replicas(shard),
    )


def choose_candidate(
    candidates: Iterable[Candidate], *, preferred: Collection[str] = ()
) -> Candidate | None:
    """The replica to promote: the one with the most WAL (ties: one in ``preferred``,
    the old primary's zone, then the first by name).  The zone never costs WAL: the
    other replicas are repointed at the one promoted, which only works from behind it.

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
    tied = [c for c in known if c.position == best]
    return next((c for c in tied if c.name in preferred), tied[0])


def preferred_replicas(shard: Shard) -> frozenset[str]:
    """The replicas in the zone of the shard's (previous) primary; none without zones."""
    old = previous_primary(shard)
    if old is None or not old.zone:
        return frozenset()
    return frozenset(n.name for n in shard.replicas if n.zone == old.zone)


def eligible(view: ShardView, *, max_lag_bytes: int, tolerance: float) -> tuple[Candidate, ...]:
    """The replicas that may be promoted without an operator (see the module docstring).

    ``tolerance``: how much earlier than the primary's last good check a replica may
    have been seen streaming (checks of one round are a moment apart).
    """
    chosen = []
    for candidate in view.candidates:
        if candidate.promoted:
            chosen.append(candidate)
            continue
        if candidate.position is None or view.primary_position is None:
            continue
        if view.primary_seen_at is None or candidate.streamed_at is None:
            continue
        if candidate.streamed_at < view.primary_seen_at - tolerance:
            continue
        if view.primary_position - candidate.position > max_lag_bytes:
            continue
        chosen.append(candidate)
    return tuple(chosen)


def decide(
    view: ShardView, *, failures_needed: int, max_lag_bytes: int, tolerance: float
) -> Decision:
    """Promote when the primary failed ``failures_needed`` checks in a row, or is gone,
    and a replica qualifies; otherwise say why not."""
    if not view.needs_primary(failures_needed):
        return Decision(
            view.shard, None, f"primary healthy ({view.primary_failures} failed checks)"
        )
    candidate = choose_candidate(
        eligible(view, max_lag_bytes=max_lag_bytes, tolerance=tolerance),
        preferred=view.preferred,
    )
    if candidate is None:
        best = choose_candidate(view.candidates)
        if best is None:
            why = "no healthy replica with a known position"
        elif view.primary_position is None or best.position is None:
            why = f"the lag of {best.name} is unknown"
        else:
            lag = max(0, view.primary_position - best.position)
            streamed = (
                best.streamed_at is not None
                and view.primary_seen_at is not None
                and best.streamed_at >= view.primary_seen_at - tolerance
            )
            why = (
                f"{best.name} lags {lag} bytes (max_lag_on_failover {max_lag_bytes})"
                if streamed
                else f"{best.name} was not streaming when the primary was last seen"
            )
        return Decision(view.shard, None, f"no replica qualifies: {why}", blocked=True)
    why = "no primary" if view.primary is None else f"{view.primary_failures} failed checks"
    return Decision(view.shard, candidate, why)


def lost_bytes(old_position: int | None, new_position: int | None) -> int | None:
    if old_position is None or new_position is None:
        return None
    return max(0, old_position - new_position)
