"""Online slot moves: plan a rebalance, move groups of slots under live traffic, resume
or abort a run that died.

A *move* takes a group of slots from a source shard to a target shard through phases,
each recorded in ``shardd_moves`` (catalog) before the next begins:

``planned``
    nothing done yet.
``copying``
    the target marks the slots ``importing`` (it answers nothing for them) and drops any
    rows a previous attempt left; then the rows are copied from one consistent snapshot
    of the source (``COPY ... TO STDOUT`` streamed into ``COPY ... FROM STDIN``).
``catching_up``
    the copy is complete as of its snapshot, which is the change-log position; batches
    of later changes to those slots are applied until the backlog is small.
``frozen``
    the source took each slot's advisory lock exclusively (waiting exactly for the
    writes in flight) and marked the slots ``frozen``: writes there are refused with
    SD001 and retried by shardd, reads are still served.  The last changes are drained,
    both sides are verified (per-slot row count and an order-independent checksum),
    then the target marks the slots ``owned``, the source marks them ``moved`` (it
    answers nothing for them any more) and the catalog publishes the new owner with a
    new epoch, recording ``flipped`` in the same transaction.
``flipped``
    once every live instance reports the new epoch (or a topology lease passed), the
    source's copy is deleted.
``done`` / ``aborted``

Safety: at every instant at most one shard accepts writes for a slot (the source stops
before the target starts, both inside the shards); at most one answers reads for it
(the source says ``moved`` before the catalog names the target, so a router with the old
map is refused and retries).  A crash anywhere leaves a recorded phase: ``--resume``
redoes the phase's idempotent steps and carries on; ``--abort`` before ``flipped`` gives
every slot back to the source (owned) and removes the target's partial copy; after
``flipped`` there is nothing to undo and the move is completed instead.
"""

from .jobs import Move, create_run, list_moves
from .mover import COLUMNS, Mover
from .plan import MoveError, PlannedMove, plan, plan_by_load
from .runs import (
    Isolation,
    Load,
    abort,
    estimate,
    isolate,
    measure_load,
    plan_for,
    plan_isolation,
    rebalance,
    remove_shard,
    resume,
    run_moves,
    slot_write_load,
)

__all__ = [
    "COLUMNS",
    "Isolation",
    "Load",
    "Move",
    "MoveError",
    "Mover",
    "PlannedMove",
    "abort",
    "create_run",
    "estimate",
    "isolate",
    "list_moves",
    "measure_load",
    "plan",
    "plan_by_load",
    "plan_for",
    "plan_isolation",
    "rebalance",
    "remove_shard",
    "resume",
    "run_moves",
    "slot_write_load",
]
