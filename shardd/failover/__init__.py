"""Replacing a shard's primary.

* :mod:`.decisions` — pure decisions on immutable health snapshots (whether to promote,
  which replicas qualify, whom), unit-tested without Postgres;
* :mod:`.actions` — what is done to nodes (positions, fence, promote, repoint, commit
  mode);
* :mod:`.steps` — the failover, forced promotion and planned switchover, in order;
* :mod:`.rejoin` — a fenced former primary back as a replica;
* :mod:`.patroni` — shards whose primary Patroni chooses: shardd follows its leader.

Safety, in short (each step's docstring has the details):

* A write is refused *by the node* once it is fenced (``shardd_node_state.fenced``,
  checked inside every write's transaction), and refused by every instance's router once
  the catalog marks the node fenced.  An instance that cannot confirm its topology for
  ``topology_lease`` seconds stops writing, so once a fence has been committed for that
  long no instance routes a write to the old primary.
* With synchronous replication every acknowledged commit is on at least one standby that
  was streaming; only such replicas qualify, and the one with the most WAL is promoted.
* Asynchronous mode never loses data silently: automatic promotion only picks a replica
  that was streaming and is within ``max_lag_on_failover``; anything else waits for an
  operator's ``--force``, which records and reports the loss.
"""

from . import patroni
from .actions import (
    SYNC_STANDBYS,
    FailoverError,
    connect,
    fence_on_node,
    positions,
    repoint,
    set_sync_standbys,
    slot_name,
)
from .decisions import (
    Candidate,
    Decision,
    ShardView,
    choose_candidate,
    decide,
    eligible,
    lost_bytes,
    preferred_replicas,
    previous_primary,
    shard_view,
)
from .rejoin import rejoin
from .steps import (
    Outcome,
    fail_over,
    finish_switchover,
    force_promotion,
    shard_lock,
    switch_over,
)

__all__ = [
    "SYNC_STANDBYS",
    "Candidate",
    "Decision",
    "FailoverError",
    "Outcome",
    "ShardView",
    "choose_candidate",
    "connect",
    "decide",
    "eligible",
    "fail_over",
    "fence_on_node",
    "finish_switchover",
    "force_promotion",
    "lost_bytes",
    "patroni",
    "positions",
    "preferred_replicas",
    "previous_primary",
    "rejoin",
    "repoint",
    "set_sync_standbys",
    "shard_lock",
    "shard_view",
    "slot_name",
    "switch_over",
]
