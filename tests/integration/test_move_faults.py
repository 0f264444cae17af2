"""Slot moves meet primary changes, on a cluster of its own, synchronous then asynchronous.

The operator's story: a rebalance is moving slots between s1 and s2 while writers run,
and the primary of the source (or the target) is switched over, or SIGKILLed and
failed over by the monitor, at a known phase of the move (the mover runs in this
process; its progress hook triggers the fault and waits for the new primary, so the
move continues exactly from there).  Afterwards the invariants themselves are checked
on every primary: no slot is owned on two shards, what the shards own is what the
catalog says, no rows sit in slots their shard does not own, nothing acknowledged is
lost, and the move finished or was aborted cleanly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from shardd import admin, reshard
from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, Instance, RunningCluster, start_cluster, wait_for
from tests.harness.http import Api
from tests.harness.load import Load, assert_nothing_lost, create_and_seed

TABLE = "mf"
SLOTS_PER_MOVE = 512


@pytest.fixture(scope="module", params=["sync", "async"])
def mf(request: pytest.FixtureRequest) -> Iterator[RunningCluster]:
    running = start_cluster(shards=2, replicas=2, sync=request.param == "sync", write_buffer=5.0)
    try:
        create_and_seed(running, TABLE)
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def second(mf: RunningCluster) -> Iterator[Instance]:
    with mf.instance() as instance:
        yield instance


@pytest.fixture
def healed(mf: RunningCluster, second: Instance) -> RunningCluster:
    mf.heal()
    for shard in ("s1", "s2"):
        assert mf.primary_of(shard) and len(mf.replicas_of(shard)) == 2
    return mf


def assert_one_owner_per_slot(cluster: RunningCluster) -> None:
    """The invariant itself, read from every shard's primary: each slot is owned on
    exactly the shard the catalog names, and no shard keeps rows of a slot it does not
    own."""
    slot_map = cluster.slot_map()
    owners: dict[int, list[str]] = {}
    for shard in ("s1", "s2"):
        primary = cluster.primary_of(shard)
        states = cluster.sql(primary, "SELECT slot, state FROM shardd_slots")
        for row in states:
            if row["state"] == "owned":
                owners.setdefault(row["slot"], []).append(shard)
        left = [r for r in states if r["state"] in ("frozen", "importing")]
        assert not left, f"{shard} has slots left {[tuple(r) for r in left[:5]]}"
        strays = cluster.sql(
            primary,
            "SELECT i.slot, count(*) AS n FROM shardd_items i LEFT JOIN shardd_slots s"
            " ON s.slot = i.slot WHERE s.state IS DISTINCT FROM 'owned' GROUP BY i.slot",
        )
        assert not strays, f"{shard} keeps rows of slots it does not own: {strays[:5]}"
    doubled = {slot: shards for slot, shards in owners.items() if len(shards) > 1}
    assert not doubled, f"slots owned on two shards: {list(doubled.items())[:5]}"
    assert {slot: shards[0] for slot, shards in owners.items()} == slot_map


def switch_over(cluster: RunningCluster, shard: str) -> None:
    old = cluster.primary_of(shard)
    cluster.shardctl("failover", "--shard", shard, "--yes")
    assert cluster.primary_of(shard) not in ("", old)


def kill_and_fail_over(cluster: RunningCluster, shard: str) -> None:
    old = cluster.primary_of(shard)
    cluster.devcluster("kill", old)
    wait_for(
        lambda: cluster.primary_of(shard) not in ("", old), timeout=30, what=f"{shard} failover"
    )
    # The old primary comes back (fenced by the monitor), so the loss becomes exact: an
    # asynchronous failover may lose acknowledged writes, but never silently.
    cluster.devcluster("start", old)
    wait_for(
        lambda: cluster.sql(
            "catalog",
            "SELECT lost_exact FROM shardd_failovers WHERE old_primary = $1"
            " ORDER BY id DESC LIMIT 1",
            old,
        )[0]["lost_exact"],
        timeout=30,
        what="the failover's exact loss",
    )


def synchronous(cluster: RunningCluster) -> bool:
    return bool(cluster.sql("catalog", "SELECT synchronous FROM shardd_cluster")[0]["synchronous"])


FAULTS = {"switchover": switch_over, "kill": kill_and_fail_over}


# Every fault on every side at every phase (``flipping``: the target owns the slots, the
# source handed them over, the catalog flip is not published yet): twenty cases.
PHASES = ("copying", "catching_up", "frozen", reshard.mover.FLIPPING, "flipped")
CASES = [(f, s, p) for f in sorted(FAULTS) for s in ("source", "target") for p in PHASES]


@pytest.mark.parametrize(("fault", "side", "phase"), CASES)
def test_a_primary_change_at_any_phase_of_a_move_keeps_one_owner_per_slot(
    healed: RunningCluster, second: Instance, fault: str, side: str, phase: str
) -> None:
    slot_map = healed.slot_map()
    counts = {s: sum(1 for o in slot_map.values() if o == s) for s in ("s1", "s2")}
    source = max(counts, key=lambda s: counts[s])
    target = "s2" if source == "s1" else "s1"
    slots = tuple(sorted(s for s, owner in slot_map.items() if owner == source)[:SLOTS_PER_MOVE])
    struck = source if side == "source" else target
    faulted: list[str] = []

    def progress(move: reshard.Move) -> None:
        # Runs inside the mover: the move waits right here while the primary changes.
        if move.phase == phase and not faulted:
            # In a thread of its own (the harness runs its own event loops), joined here.
            errors: list[BaseException] = []

            def strike() -> None:
                try:
                    faulted.append(healed.primary_of(struck))
                    FAULTS[fault](healed, struck)
                except BaseException as exc:
                    errors.append(exc)

            striking = threading.Thread(target=strike)
            striking.start()
            striking.join(timeout=120)
            if errors:
                raise errors[0]

    async def run_move() -> reshard.Move:
        async with admin.connect(healed.catalog_dsn()) as cat:
            [move] = await reshard.create_run(
                cat, [reshard.PlannedMove(source, target, slots)], reason="fault test"
            )
        mover = reshard.Mover(healed.catalog_dsn(), lease=2.0, progress=progress)
        [done] = await reshard.run_moves(mover, [move], max_parallel=1)
        return done

    [last_failover] = healed.sql(
        "catalog", "SELECT coalesce(max(id), 0) AS id FROM shardd_failovers"
    )
    token = healed.api("write").token
    apis = [healed.api("write"), Api(second.port, token=token)]
    with Load(apis, TABLE, prefix=f"{fault}-{side}-{phase}", writers=4) as load:
        wait_for(lambda: len(load.outcomes.acked) > 20, timeout=30, what="load running")
        before = len(load.outcomes.acked)
        done = asyncio.run(run_move())
        acked = len(load.outcomes.acked)
        wait_for(lambda: len(load.outcomes.acked) > acked + 20, timeout=30, what="more writes")
    assert faulted, f"the move never reached {phase}"
    # The writers reached the moving slots while the move and its fault ran.
    moving = set(slots)
    during = list(load.outcomes.acked)[before:acked]
    assert sum(slot_of(key, SLOTS) in moving for key in during) >= 5, len(during)
    assert done.phase in ("done", "aborted"), done
    if done.phase == "done":
        after = healed.slot_map()
        assert all(after[s] == target for s in slots)
    assert_one_owner_per_slot(healed)
    if synchronous(healed):
        assert_nothing_lost(healed, load.outcomes, TABLE)
    else:
        # Asynchronous: acknowledged writes may be lost only by a failover that says so.
        [recorded] = healed.sql(
            "catalog",
            "SELECT coalesce(sum(lost_bytes), 0) AS lost FROM shardd_failovers WHERE id > $1",
            last_failover["id"],
        )
        if recorded["lost"] == 0:
            assert_nothing_lost(healed, load.outcomes, TABLE)
    assert not healed.sql(
        "catalog", "SELECT id FROM shardd_moves WHERE phase NOT IN ('done', 'aborted')"
    )
