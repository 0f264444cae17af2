"""Online resharding, on a cluster of its own with two shardd instances.

The tests run in file order and share the cluster: grow to four shards and shrink back
under load, then kill rebalances at known points (a transaction held open on a node
makes the move wait exactly there), then single moves: a long transaction across a
move, empty slots, one huge partition, a thousand slots at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import asyncpg
import pytest

from shardd import admin, reshard
from shardd.placement import slot_of
from tests.harness.cluster import (
    ROOT,
    SLOTS,
    Holding,
    Instance,
    RunningCluster,
    start_cluster,
    wait_for,
)
from tests.harness.http import Api, after
from tests.harness.load import Load, assert_nothing_lost, create_and_seed, rows_by_shard

TABLE = "rs"


@pytest.fixture(scope="module")
def rs() -> Iterator[RunningCluster]:
    running = start_cluster(shards=3, failover=False)
    try:
        create_and_seed(running, TABLE)
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def second(rs: RunningCluster) -> Iterator[Instance]:
    with rs.instance() as instance:
        yield instance


def apis(cluster: RunningCluster, instance: Instance) -> list[Api]:
    token = cluster.api("write").token
    return [cluster.api("write"), Api(instance.port, token=token)]


def slot_counts(cluster: RunningCluster) -> dict[str, int]:
    rows = cluster.sql("catalog", "SELECT shard, count(*) AS n FROM shardd_slot_map GROUP BY 1")
    return {row["shard"]: row["n"] for row in rows}


def assert_clean(cluster: RunningCluster) -> None:
    """Every row only on its owning shard, no slot frozen or importing, no open move."""
    slot_map = cluster.slot_map()
    for shard, rows in rows_by_shard(cluster, TABLE).items():
        misplaced = [pk for pk, (slot, _) in rows.items() if slot_map[slot] != shard]
        assert not misplaced, f"{shard} holds rows of slots it does not own: {misplaced[:5]}"
        states = cluster.sql(
            cluster.primary_of(shard),
            "SELECT slot, state FROM shardd_slots WHERE state IN ('frozen', 'importing')",
        )
        assert not states, f"{shard} has slots left {[tuple(r) for r in states[:5]]}"
        owned = cluster.sql(
            cluster.primary_of(shard), "SELECT slot FROM shardd_slots WHERE state = 'owned'"
        )
        assert {r["slot"] for r in owned} == {s for s, o in slot_map.items() if o == shard}
    open_moves = cluster.sql(
        "catalog", "SELECT id, phase FROM shardd_moves WHERE phase NOT IN ('done', 'aborted')"
    )
    assert not open_moves


def all_rows(cluster: RunningCluster) -> dict[str, str]:
    merged: dict[str, str] = {}
    for rows in rows_by_shard(cluster, TABLE).values():
        for pk, (_, doc) in rows.items():
            assert pk not in merged, f"{pk} is on two shards"
            merged[pk] = doc
    return merged


def set_weight(cluster: RunningCluster, shard: str, weight: int) -> None:
    cluster.sql("catalog", "UPDATE shardd_shards SET weight = $2 WHERE name = $1", shard, weight)


def full_scan(api: Api) -> list[str]:
    keys: list[str] = []
    position = None
    while True:
        page = api.request("GET", f"/v1/tables/{TABLE}/scan?limit=500{after(position)}")
        assert page.status == 200, page.body
        keys += [item["pk"] for item in page.body["items"]]
        if page.body["next"] is None:
            return keys
        position = page.body["next"]


def test_adding_a_shard_under_load_fails_no_request(rs: RunningCluster, second: Instance) -> None:
    preloaded = {f"pre-{i}" for i in range(2000)}
    scans: list[list[str]] = []
    stop = threading.Event()

    def scanner() -> None:
        api = rs.api("read")
        while not stop.is_set():
            scans.append(full_scan(api))
            stop.wait(0.05)  # nearly always scanning, not quite flat out

    with Load(apis(rs, second), TABLE, prefix="grow", writers=6, read_back=True) as load:
        wait_for(lambda: len(load.outcomes.acked) > 100, timeout=30, what="load running")
        rs.devcluster("add-shard", "s4")
        dry = rs.shardctl("rebalance", "--dry-run", "--json")
        assert '"target": "s4"' in dry.stdout
        scanning = threading.Thread(target=scanner)
        scanning.start()
        try:
            rs.shardctl("rebalance", "--yes", "--json", "--max-parallel", "4")
        finally:
            stop.set()
            scanning.join(timeout=60)
        acked = len(load.outcomes.acked)
        wait_for(lambda: len(load.outcomes.acked) > acked + 50, timeout=30, what="more load")
    outcomes = load.outcomes
    # Scans running across the moves saw every pre-loaded item exactly once.
    assert len(scans) >= 5, len(scans)
    for keys in scans:
        assert len(keys) == len(set(keys))
        assert preloaded <= set(keys)
    assert outcomes.failures() == 0, (outcomes.refused, outcomes.unknown, outcomes.failed_reads)
    assert_nothing_lost(rs, outcomes, TABLE)
    assert slot_counts(rs) == {"s1": 1024, "s2": 1024, "s3": 1024, "s4": 1024}
    assert_clean(rs)
    moves = rs.sql("catalog", "SELECT phase, error FROM shardd_moves")
    assert moves and all(m["phase"] == "done" and m["error"] is None for m in moves)


def test_a_router_with_the_old_map_is_refused_by_the_old_owner(rs: RunningCluster) -> None:
    moved = rs.sql("s1-primary", "SELECT slot FROM shardd_slots WHERE state = 'moved' LIMIT 1")
    slot = moved[0]["slot"]
    with pytest.raises(asyncpg.PostgresError) as refused:
        rs.sql(
            "s1-primary",
            "CALL shardd_write('put', $1, $2, 'stale-router', '', '{}'::jsonb, NULL, NULL)",
            slot,
            TABLE,
        )
    assert refused.value.sqlstate == "SD001"
    answer = rs.sql(
        "s1-primary", "SELECT state FROM shardd_get($1, $2, 'x', '', NULL)", slot, TABLE
    )
    assert answer[0]["state"] == "moved"  # so reads are refused there too


def test_removing_a_shard_under_load_fails_no_request(rs: RunningCluster, second: Instance) -> None:
    with Load(apis(rs, second), TABLE, prefix="shrink", writers=6, read_back=True) as load:
        wait_for(lambda: len(load.outcomes.acked) > 100, timeout=30, what="load running")
        result = rs.shardctl("shard", "remove", "s4", "--yes", "--max-parallel", "4")
        assert "removed" in result.stdout
        acked = len(load.outcomes.acked)
        wait_for(lambda: len(load.outcomes.acked) > acked + 50, timeout=30, what="more load")
    outcomes = load.outcomes
    assert outcomes.failures() == 0, (outcomes.refused, outcomes.unknown, outcomes.failed_reads)
    assert_nothing_lost(rs, outcomes, TABLE)
    assert sorted(slot_counts(rs).values()) == [1365, 1365, 1366]
    assert "s4" not in {r["name"] for r in rs.sql("catalog", "SELECT name FROM shardd_shards")}
    assert_clean(rs)


def start_rebalance(cluster: RunningCluster) -> subprocess.Popen[str]:
    env = {**os.environ, "SHARDD_CATALOG_DSN": cluster.catalog_dsn()}
    return subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "shardctl"), "rebalance", "--yes", "--max-parallel", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_move(cluster: RunningCluster) -> reshard.PlannedMove:
    return asyncio.run(reshard.plan_for(cluster.catalog_dsn(), group_slots=16))[0]


def kill_rebalance_at(cluster: RunningCluster, phase: str, holding: Holding) -> None:
    """Run a rebalance until its first move waits in ``phase``; SIGKILL it there."""
    process = start_rebalance(cluster)
    try:
        wait_for(
            lambda: cluster.sql("catalog", "SELECT 1 FROM shardd_moves WHERE phase = $1", phase),
            timeout=30,
            what=f"a move waiting in phase {phase}",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        holding.release()


def hold_target_copy(cluster: RunningCluster, move: reshard.PlannedMove) -> Holding:
    """The target's table locked against writes: the move waits mid-copy."""
    return Holding(
        cluster.node_dsn(cluster.primary_of(move.target)),
        "LOCK TABLE shardd_items IN SHARE MODE",
    )


def hold_catalog_flip(cluster: RunningCluster, move: reshard.PlannedMove) -> Holding:
    """The slots' catalog rows locked: the move waits mid-cutover, after freezing the
    source, verifying and handing the slots to the target, before the catalog flip."""
    return Holding(
        cluster.node_dsn("catalog"),
        "SELECT 1 FROM shardd_slot_map WHERE slot = ANY($1::int[]) FOR UPDATE",
        list(move.slots),
    )


@pytest.mark.parametrize(
    ("weight", "hold", "phase", "finish"),
    [
        (2, hold_target_copy, "copying", "--resume"),
        (1, hold_catalog_flip, "frozen", "--abort"),
        (1, hold_catalog_flip, "frozen", "--resume"),
        (2, hold_target_copy, "copying", "--abort"),
    ],
    ids=["mid-copy-resume", "mid-cutover-abort", "mid-cutover-resume", "mid-copy-abort"],
)
def test_a_killed_rebalance_resumes_or_aborts_cleanly(
    rs: RunningCluster, weight: int, hold: object, phase: str, finish: str
) -> None:
    set_weight(rs, "s1", weight)
    before_rows = all_rows(rs)
    before_map = rs.slot_map()
    move = first_move(rs)
    kill_rebalance_at(rs, phase, hold(rs, move))  # type: ignore[operator]
    rs.shardctl("rebalance", finish, "--yes", "--json")
    assert all_rows(rs) == before_rows
    assert_clean(rs)
    if finish == "--abort":
        assert rs.slot_map() == before_map
    else:
        assert asyncio.run(reshard.plan_for(rs.catalog_dsn(), group_slots=16)) == []


def keys_in_slot(slot: int, count: int, prefix: str) -> list[str]:
    found = []
    i = 0
    while len(found) < count:
        key = f"{prefix}-{i}"
        if slot_of(key, SLOTS) == slot:
            found.append(key)
        i += 1
    return found


def test_a_long_transaction_across_a_move_is_applied_on_the_target(rs: RunningCluster) -> None:
    set_weight(rs, "s1", 1)
    slot_map = rs.slot_map()
    slot = next(s for s, owner in slot_map.items() if owner == "s2")
    late, *burst = keys_in_slot(slot, 21, "horizon")
    api = rs.api("write")
    source_dsn = rs.node_dsn(rs.primary_of("s2"))

    async def scenario() -> reshard.Move:
        src = await asyncpg.connect(source_dsn)
        long_txn = src.transaction()
        await long_txn.start()
        await src.execute(
            "SELECT shardd_put($1, $2, $3, '', '{\"late\": true}'::jsonb, NULL)", slot, TABLE, late
        )
        for n, key in enumerate(burst):  # later changes, committed first
            response = await asyncio.to_thread(
                api.request, "PUT", f"/v1/tables/{TABLE}/items/{key}", body={"n": n}
            )
            assert response.status == 201
        async with admin.connect(rs.catalog_dsn()) as cat:
            [move] = await reshard.create_run(
                cat, [reshard.PlannedMove("s2", "s3", (slot,))], reason="horizon"
            )
        mover = reshard.Mover(rs.catalog_dsn(), lease=2.0)
        running = asyncio.create_task(mover.run(move))
        # The freeze waits for the open transaction's slot lock: the copy and catch-up
        # have both run without seeing it.
        while not await src.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ):
            assert not running.done(), running
            await asyncio.sleep(0.02)
        await long_txn.commit()
        await src.close()
        return await running

    done = asyncio.run(scenario())
    assert done.phase == "done"
    on_target = rs.sql(
        rs.primary_of("s3"),
        "SELECT pk, doc::text AS doc FROM shardd_items WHERE tbl = $1 AND slot = $2",
        TABLE,
        slot,
    )
    docs = {row["pk"]: row["doc"] for row in on_target}
    assert docs[late] == '{"late": true}'
    assert set(burst) <= set(docs)
    assert_clean(rs)


def test_moves_of_empty_slots_one_huge_partition_and_a_thousand_slots(rs: RunningCluster) -> None:
    api = rs.api("write")
    slot_map = rs.slot_map()
    used = {slot for rows in rows_by_shard(rs, TABLE).values() for slot, _ in rows.values()}
    empty = [s for s, owner in slot_map.items() if owner == "s3" and s not in used][:5]
    assert rs.move("s3", "s1", empty).phase == "done"
    assert all(rs.slot_map()[s] == "s1" for s in empty)

    huge = "huge-partition"
    for start in range(0, 3000, 100):
        puts = [{"pk": huge, "sk": f"{i:05d}", "item": {"i": i}} for i in range(start, start + 100)]
        assert (
            api.request("POST", f"/v1/tables/{TABLE}/batch/write", body={"puts": puts}).status
            == 200
        )
    slot = slot_of(huge, SLOTS)
    owner = rs.slot_map()[slot]
    dest = "s2" if owner != "s2" else "s3"
    assert rs.move(owner, dest, [slot]).rows_copied >= 3000
    page = api.request("GET", f"/v1/tables/{TABLE}/partitions/{huge}?limit=1000&consistency=strong")
    assert page.status == 200 and len(page.body["items"]) == 1000
    assert (page.header("Shardd-Served-By") or "").startswith(f"{dest}/")

    before = all_rows(rs)
    thousand = [s for s, owner in rs.slot_map().items() if owner == "s1"][:1000]
    done = rs.move("s1", "s2", thousand)
    assert done.phase == "done" and len(done.slots) == 1000
    assert all_rows(rs) == before
    assert_clean(rs)
    rs.shardctl("rebalance", "--yes", "--json")
    assert sorted(slot_counts(rs).values()) == [1365, 1365, 1366]
    assert_clean(rs)


def test_rebalance_by_load_moves_hot_slots_off_the_busiest_shard(rs: RunningCluster) -> None:
    api = rs.api("write")
    slot_map = rs.slot_map()
    hot_slots = [s for s, owner in slot_map.items() if owner == "s1"][:3]
    hot_keys = [key for slot in hot_slots for key in keys_in_slot(slot, 33, f"hot{slot}")]
    # Earlier tests wrote too: make s1 the busiest shard by a clear margin, and the three
    # slots the hottest anywhere, whatever they did.
    window = 600.0
    topology = asyncio.run(admin.topology(rs.catalog_dsn()))
    load = asyncio.run(reshard.slot_write_load(topology, seconds=window))
    per_shard = dict.fromkeys(set(slot_map.values()), 0.0)
    for slot, rate in load.items():
        per_shard[slot_map[slot]] += rate * window
    behind = max(per_shard.values()) - per_shard["s1"]
    # Hotter than any slot, s1 ahead of every shard, and each hot slot worth moving.
    per_slot = max(
        max(load.values(), default=0.0) * window + 500, (behind + 3000) / 3, behind + 500
    )
    batch = [{"pk": key, "item": {"n": n}} for n, key in enumerate(hot_keys)]
    for _ in range(int(per_slot) // 33 + 1):  # each batch writes 33 keys of each hot slot
        response = api.request("POST", f"/v1/tables/{TABLE}/batch/write", body={"puts": batch})
        assert response.status == 200
    plan = rs.shardctl("rebalance", "--by", "load", "--dry-run", "--json")
    assert '"source": "s1"' in plan.stdout
    ran = rs.shardctl("rebalance", "--by", "load", "--yes", "--json")
    after = rs.slot_map()
    moved = [s for s in hot_slots if after[s] != "s1"]
    assert moved, (hot_slots, ran.stdout)
    pins = {
        r["slot"]: r["shard"]
        for r in rs.sql("catalog", "SELECT slot, shard FROM shardd_slot_overrides")
    }
    assert all(pins[s] == after[s] for s in moved)
    assert_clean(rs)
    for key in hot_keys:
        response = api.request("GET", f"/v1/tables/{TABLE}/items/{key}?consistency=strong")
        assert response.status == 200


def test_an_eventual_scan_across_a_move_with_lagging_replicas_sees_each_item_once(
    rs: RunningCluster,
) -> None:
    # An instance that reads from replicas however far behind they are, so the scan's
    # pages come from replicas that have not replayed the move.
    lenient = rs.start_instance(max_replica_lag_bytes=str(1 << 40), max_replica_lag_seconds="3600")
    replicas = [r for shard in ("s1", "s2", "s3") for r in rs.replicas_of(shard)]
    try:
        api = Api(lenient.port, token=rs.api("read").token)
        expected = {
            (row["pk"], row["sk"])
            for shard in ("s1", "s2", "s3")
            for row in rs.sql(
                rs.primary_of(shard), "SELECT pk, sk FROM shardd_items WHERE tbl = $1", TABLE
            )
        }
        for replica in replicas:
            rs.sql(replica, "SELECT pg_wal_replay_pause()")
        seen: list[tuple[str, str]] = []
        served: set[str] = set()
        position, pages = None, 0
        while True:
            if pages == 3:  # mid-scan: slots that hold items change shards
                slot_map = rs.slot_map()
                used = {s for rows in rows_by_shard(rs, TABLE).values() for s, _ in rows.values()}
                counts = slot_counts(rs)
                source = max(counts, key=lambda s: counts[s])
                target = min(counts, key=lambda s: counts[s])
                slots = [s for s, o in slot_map.items() if o == source and s in used][:64]
                assert rs.move(source, target, slots).phase == "done"
            page = api.request(
                "GET", f"/v1/tables/{TABLE}/scan?limit=100&consistency=eventual{after(position)}"
            )
            assert page.status == 200, page.body
            seen += [(item["pk"], item["sk"]) for item in page.body["items"]]
            served.update((page.header("shardd-served-by") or "").split(", "))
            pages += 1
            if page.body["next"] is None:
                break
            position = page.body["next"]
        assert pages > 3
        assert any("replica" in name for name in served), served  # lagging replicas answered
        assert len(seen) == len(set(seen)), "an item was returned twice"
        assert set(seen) == expected
    finally:
        for replica in replicas:
            rs.sql(replica, "SELECT pg_wal_replay_resume()")
        lenient.stop()
    assert_clean(rs)


def test_isolating_a_celebrity_moves_its_slot_alone_under_load_and_keeps_it_pinned(
    rs: RunningCluster, second: Instance
) -> None:
    api = rs.api("write")
    celebrity = "celebrity-isolated"
    slot = slot_of(celebrity, SLOTS)
    assert api.request("PUT", f"/v1/tables/{TABLE}/items/{celebrity}", body={"n": 0}).status in (
        200,
        201,
    )
    rs.devcluster("add-shard", "s5")
    dry = json.loads(
        rs.shardctl(
            "isolate", "--table", TABLE, "--pk", celebrity, "--to", "s5", "--dry-run", "--json"
        ).stdout
    )
    assert dry["slot"] == slot and dry["to"] == "s5"
    assert [m["slots"] for m in dry["moves"] if m["target"] == "s5"] == [[slot]]
    assert rs.slot_map()[slot] != "s5"  # a dry run changes nothing
    celebrity_failures: list[object] = []
    stop = threading.Event()

    def celebrity_traffic() -> None:  # the celebrity itself, written and read throughout
        client = rs.api("write")
        n = 0
        while not stop.is_set():
            n += 1
            path = f"/v1/tables/{TABLE}/items/{celebrity}"
            written = client.request("PUT", path, body={"n": n})
            token = written.header("Shardd-Session") or ""
            read = client.request("GET", path, headers={"Shardd-Session": token})
            if written.status != 200 or read.status != 200 or read.body["item"] != {"n": n}:
                celebrity_failures.append((n, written.status, read.status))

    traffic = threading.Thread(target=celebrity_traffic)
    try:
        with Load(apis(rs, second), TABLE, prefix="isolate", writers=4, read_back=True) as load:
            traffic.start()
            wait_for(lambda: len(load.outcomes.acked) > 100, timeout=30, what="load running")
            rs.shardctl("isolate", "--table", TABLE, "--pk", celebrity, "--to", "s5", "--yes")
            acked = len(load.outcomes.acked)
            wait_for(lambda: len(load.outcomes.acked) > acked + 50, timeout=30, what="more load")
        stop.set()
        traffic.join(timeout=60)
        outcomes = load.outcomes
        assert outcomes.failures() == 0, (outcomes.refused, outcomes.unknown, outcomes.failed_reads)
        assert not celebrity_failures, celebrity_failures[:5]
        assert_nothing_lost(rs, outcomes, TABLE)
        owned = {s for s, owner in rs.slot_map().items() if owner == "s5"}
        assert owned == {slot}
        pins = rs.sql("catalog", "SELECT shard FROM shardd_slot_overrides WHERE slot = $1", slot)
        assert [p["shard"] for p in pins] == ["s5"]
        assert_clean(rs)
        # Later rebalances, by slots and by load, leave the slot there and give s5 nothing.
        rs.shardctl("rebalance", "--yes", "--json")
        rs.shardctl("rebalance", "--by", "load", "--yes", "--json")
        assert {s for s, owner in rs.slot_map().items() if owner == "s5"} == {slot}
        assert_clean(rs)
    finally:
        stop.set()
        rs.shardctl("shard", "remove", "s5", "--yes")  # drops its pin and moves the slot off
    assert "s5" not in {r["name"] for r in rs.sql("catalog", "SELECT name FROM shardd_shards")}
    assert not rs.sql("catalog", "SELECT 1 FROM shardd_slot_overrides WHERE shard = 's5'")
    assert_clean(rs)
