"""Which node serves an operation: pure decisions over immutable snapshots.

* Writes go to the shard's primary (fenced nodes are never primaries).
* ``strong`` reads go to the primary.
* ``session`` reads carry a token with, per shard, the WAL position of the caller's
  last write; replicas known to have replayed it come first, the primary last.  The
  read itself re-checks the position on the node, so a stale health snapshot can cost a
  retry on the primary but never a read that misses the caller's write.
* ``eventual`` reads go to healthy replicas within ``max_replica_lag_bytes`` and
  ``max_replica_lag_seconds``, spread
  round-robin, with the primary as the last resort.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import BadRequest
from .nodes import HealthSnapshot
from .topology import Node, Shard

CONSISTENCY_LEVELS = ("strong", "session", "eventual")
_POSITION = "[a-z][a-z0-9_-]{0,30}:[0-9]{1,20}"  # a shard name (as the catalog allows) : LSN
SESSION_TOKEN = re.compile(f"^{_POSITION}(,{_POSITION})*$")
MAX_LSN = 2**64 - 1


@dataclass(frozen=True)
class SessionToken:
    """shard -> WAL position (as an integer LSN) of the caller's latest write there."""

    positions: Mapping[str, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", MappingProxyType(dict(self.positions)))

    @classmethod
    def parse(cls, text: str, *, what: str = "Shardd-Session") -> SessionToken:
        if not SESSION_TOKEN.fullmatch(text):
            raise BadRequest(
                f"{what} must look like shard:lsn[,shard:lsn...]", code="invalid_session_token"
            )
        positions: dict[str, int] = {}
        for part in text.split(","):
            shard, _, lsn = part.partition(":")
            # No WAL position exceeds 64 bits: a larger one asks no more than the primary.
            positions[shard] = max(min(int(lsn), MAX_LSN), positions.get(shard, 0))
        return cls(positions)

    def merged(self, shard: str, lsn: int) -> SessionToken:
        return self._later(((shard, lsn),))

    def union(self, other: SessionToken) -> SessionToken:
        """Every shard of either, at the later position of the two."""
        return self._later(other.positions.items())

    def _later(self, pairs: Iterable[tuple[str, int]]) -> SessionToken:
        positions = dict(self.positions)
        for shard, lsn in pairs:
            positions[shard] = max(lsn, positions.get(shard, 0))
        return SessionToken(positions)

    def __str__(self) -> str:
        return ",".join(f"{shard}:{lsn}" for shard, lsn in sorted(self.positions.items()))


def resolve_consistency(requested: str | None, token: SessionToken | None) -> str:
    if requested is None:
        return "session" if token is not None else "eventual"
    if requested not in CONSISTENCY_LEVELS:
        raise BadRequest(
            f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}",
            code="invalid_consistency",
        )
    return requested


_spread = itertools.count()


def read_candidates(
    shard: Shard,
    health: HealthSnapshot,
    *,
    consistency: str,
    min_lsn: int | None,
    max_lag_bytes: int,
    max_lag_seconds: float,
    spread: bool = False,
    zone: str = "",
) -> tuple[Node, ...]:
    """Nodes to try for a read, best first; the primary is always the last resort, but
    with ``spread`` an eventual read takes turns over the primary as over the replicas
    (a hot key's reads use every node of its shard).  With ``zone`` (this instance's),
    the usable replicas of that zone come first, taking turns among themselves; a hot
    key's spread reads use every node whatever its zone."""
    primary = shard.primary
    tail = (primary,) if primary is not None else ()
    if consistency == "strong":
        return tail

    def usable(node: Node) -> bool:
        state = health.get(node.name)
        if state is None or not state.healthy or state.in_recovery is False:
            return False
        if consistency == "session" and min_lsn is not None:
            return state.lsn is not None and state.lsn >= min_lsn
        # Unknown lag (the primary is unreachable) still beats no read at all.
        if state.lag_seconds is not None and state.lag_seconds > max_lag_seconds:
            return False
        return state.lag_bytes is None or state.lag_bytes <= max_lag_bytes

    replicas = [node for node in shard.replicas if usable(node)]
    spreading = spread and consistency == "eventual" and primary is not None
    if spreading:
        assert primary is not None
        replicas.append(primary)
        tail = ()
    groups = [replicas]
    if zone and not spreading:
        groups = [[n for n in replicas if n.zone == zone], [n for n in replicas if n.zone != zone]]
    turn = next(_spread)
    ordered: list[Node] = []
    for group in groups:  # each group takes turns among its own nodes
        if group:
            at = turn % len(group)
            ordered += group[at:] + group[:at]
    return (*ordered, *tail)
