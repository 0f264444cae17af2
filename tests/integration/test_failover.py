"""Failover, told as the operator's story, on a synchronous cluster of its own.

Primaries are killed for real (``devcluster kill``, SIGKILL) while writers run through
two shardd instances; afterwards every acknowledged write must still be there.  Every
shard has two replicas, so a failover also repoints the replica not promoted.  Each test starts
by rejoining any fenced former primary, so each finds every shard with a primary and its
replicas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, Instance, RunningCluster, start_cluster, wait_for
from tests.harness.feed import by_key, drain, end_cursor, follow
from tests.harness.http import Api, item_path
from tests.harness.load import Load, assert_nothing_lost

TABLE = "ha"


@pytest.fixture(scope="module")
def ha() -> Iterator[RunningCluster]:
    running = start_cluster(shards=2, replicas=2, sync=True, write_buffer=5.0)
    try:
        assert running.api().request("PUT", f"/v1/tables/{TABLE}").status == 201
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def second(ha: RunningCluster) -> Iterator[Instance]:
    with ha.instance() as instance:
        yield instance


@pytest.fixture
def healed(ha: RunningCluster, second: Instance) -> RunningCluster:
    ha.heal()
    for shard in ("s1", "s2"):
        assert ha.primary_of(shard) and ha.replicas_of(shard), "every shard has a replica"
    return ha


def apis(cluster: RunningCluster, instance: Instance) -> list[Api]:
    return [cluster.api("write"), Api(instance.port, token=cluster.api("write").token)]


def kill_primary_and_wait(cluster: RunningCluster, load: Load, shard: str) -> str:
    old = cluster.primary_of(shard)
    cluster.devcluster("kill", old)
    wait_for(
        lambda: cluster.primary_of(shard) not in ("", old), timeout=30, what=f"{shard} failover"
    )
    followed = time.monotonic()  # acknowledged from here on: by the new primary
    wait_for(
        lambda: load.acks_on(shard, after=followed) > 10,
        timeout=30,
        what=f"writes to {shard} resuming",
    )
    return old


def test_killed_primaries_lose_no_acknowledged_write(
    healed: RunningCluster, second: Instance
) -> None:
    with Load(apis(healed, second), TABLE, prefix="kill", writers=8) as load:
        wait_for(lambda: len(load.outcomes.acked) > 200, timeout=30, what="load running")
        old_s1 = kill_primary_and_wait(healed, load, "s1")
        old_s2 = kill_primary_and_wait(healed, load, "s2")
    outcomes = load.outcomes
    assert_nothing_lost(healed, outcomes, TABLE)
    history = healed.sql(
        "catalog", "SELECT shard, old_primary, kind FROM shardd_failovers ORDER BY id DESC LIMIT 2"
    )
    assert {(r["shard"], r["old_primary"], r["kind"]) for r in history} == {
        ("s1", old_s1, "automatic"),
        ("s2", old_s2, "automatic"),
    }
    fenced = {
        r["name"] for r in healed.sql("catalog", "SELECT name FROM shardd_nodes WHERE fenced")
    }
    assert {old_s1, old_s2} <= fenced


def test_a_batch_sent_while_its_shard_has_no_primary_waits_for_the_new_one(
    healed: RunningCluster,
) -> None:
    keys = healed.keys_on("s1", "batch-s1", 5) + healed.keys_on("s2", "batch-s2", 5)
    old = healed.primary_of("s2")
    healed.devcluster("kill", old)
    response = healed.api("write").request(
        "POST",
        f"/v1/tables/{TABLE}/batch/write",
        body={"puts": [{"pk": key, "item": {"k": key}} for key in keys]},
    )
    assert response.status == 200 and response.body["ok"], response.body
    new = healed.primary_of("s2")
    assert new not in ("", old)
    assert f"s2/{new}" in (response.header("Shardd-Served-By") or "")


def test_a_restarted_old_primary_takes_no_write_and_rejoins(
    healed: RunningCluster, second: Instance
) -> None:
    api = healed.api("write")
    old = healed.primary_of("s1")
    healed.devcluster("kill", old)
    wait_for(lambda: healed.primary_of("s1") not in ("", old), timeout=30, what="failover")
    new = healed.primary_of("s1")

    healed.devcluster("start", old)
    # The monitor fences the node itself once it answers again.
    wait_for(
        lambda: healed.sql(old, "SELECT fenced FROM shardd_node_state")[0]["fenced"],
        timeout=30,
        what="old primary fenced on the node",
    )
    keys = healed.keys_on("s1", "after-failover", 20)
    for n, key in enumerate(keys):
        target = api if n % 2 else Api(second.port, token=api.token)
        response = target.request("PUT", f"/v1/tables/{TABLE}/items/{key}", body={"n": n})
        assert response.status == 201, response.body
        assert response.header("Shardd-Served-By") == f"s1/{new}"
    on_old = healed.sql(
        old, "SELECT count(*) AS n FROM shardd_items WHERE pk = ANY($1::text[])", keys
    )
    assert on_old[0]["n"] == 0

    # A router that never heard of the failover is refused by the node itself.
    with pytest.raises(asyncpg.PostgresError) as refused:
        healed.sql(
            old,
            "CALL shardd_write('put', $1, $2, $3, '', '{}'::jsonb, NULL, NULL)",
            slot_of(keys[0], SLOTS),
            TABLE,
            keys[0],
        )
    assert refused.value.sqlstate == "SD002"

    healed.devcluster("rejoin", old)
    assert old in healed.replicas_of("s1")
    wait_for(
        lambda: (
            healed.sql(
                old, "SELECT count(*) AS n FROM shardd_items WHERE pk = ANY($1::text[])", keys
            )[0]["n"]
            == len(keys)
        ),
        timeout=30,
        what="rejoined node replaying the new primary's writes",
    )
    assert healed.sql(old, "SELECT pg_is_in_recovery() AS r")[0]["r"] is True


def test_planned_switchover_under_load_fails_no_request(
    healed: RunningCluster, second: Instance
) -> None:
    old = healed.primary_of("s2")
    with Load(apis(healed, second), TABLE, prefix="switch", writers=6, read_back=True) as load:
        wait_for(lambda: len(load.outcomes.acked) > 100, timeout=30, what="load running")
        result = healed.shardctl("failover", "--shard", "s2", "--yes")
        assert "is the primary" in result.stdout
        switched_at = time.monotonic()
        wait_for(lambda: load.acks_on("s2", after=switched_at) > 20, timeout=30, what="more writes")
    outcomes = load.outcomes
    assert outcomes.failures() == 0, (
        outcomes.refused,
        outcomes.unknown,
        outcomes.failed_reads[:5],
    )
    assert healed.primary_of("s2") not in ("", old)
    assert_nothing_lost(healed, outcomes, TABLE)
    kinds = healed.sql("catalog", "SELECT kind FROM shardd_failovers ORDER BY id DESC LIMIT 1")
    assert kinds[0]["kind"] == "planned"


def test_the_monitor_dies_and_another_instance_fails_over(
    healed: RunningCluster, second: Instance
) -> None:
    monitor = wait_for(healed.monitor, timeout=10, what="a monitor")
    monitor_port = int(monitor.split(":")[1])
    survivor = second.port if monitor_port == healed.port else healed.port
    if monitor_port == healed.port:
        healed.devcluster("kill", "shardd")
    else:
        second.kill()
    try:
        wait_for(
            lambda: int(healed.monitor().split(":")[1]) == survivor,
            timeout=15,
            what="the surviving instance taking the monitor lease",
        )
        old = healed.primary_of("s1")
        healed.devcluster("kill", old)
        wait_for(lambda: healed.primary_of("s1") not in ("", old), timeout=30, what="failover")
        api = Api(survivor, token=healed.api("write").token)
        key = healed.keys_on("s1", "after-monitor", 1)[0]
        assert api.request("PUT", f"/v1/tables/{TABLE}/items/{key}", body={}).status == 201
    finally:
        if monitor_port == healed.port:
            healed.devcluster("start", "shardd")
        else:
            replacement = healed.start_instance()  # the module's instance object lives on
            second.process, second.port = replacement.process, replacement.port


def test_a_change_feed_cursor_survives_a_killed_primary(
    healed: RunningCluster, second: Instance
) -> None:
    """A cursor taken before s1's primary is SIGKILLed still yields every acknowledged
    write after the failover: the new primary's history is read again from the start of
    what it keeps (at least once, never a gap and never a 410), each key in order."""
    api = healed.api("write")
    keys = healed.keys_on("s1", "feed", 6)
    cursor = end_cursor(api, TABLE)

    def write_round(n: int) -> None:
        for key in keys:
            deadline = time.monotonic() + 30
            while True:
                status = api.request("PUT", item_path(TABLE, key), body={"n": n}).status
                if status in (200, 201):
                    break
                assert status == 503 and time.monotonic() < deadline, (key, n, status)
                time.sleep(0.2)

    for n in (1, 2, 3):
        write_round(n)
    ours = set(keys)
    before, cursor = follow(
        api, TABLE, cursor, until=lambda seen: sum(pk in ours for pk, _, _ in seen) >= 18
    )
    old = healed.primary_of("s1")
    healed.devcluster("kill", old)
    wait_for(lambda: healed.primary_of("s1") not in ("", old), timeout=30, what="s1 failover")
    for n in (4, 5):
        write_round(n)
    after = drain(api, TABLE, cursor)

    seen_before, seen_after = by_key(before), by_key(after)
    for key in keys:
        assert seen_before[key] == [1, 2, 3], key
        assert set(seen_before[key]) | set(seen_after[key]) == {1, 2, 3, 4, 5}, key
        # Whatever is read again after the failover comes in order and ends at the last write.
        assert seen_after[key] == sorted(set(seen_after[key])), (key, seen_after[key])
        assert seen_after[key][-2:] == [4, 5], (key, seen_after[key])


def test_idempotency_records_survive_a_failover(healed: RunningCluster, second: Instance) -> None:
    """An acknowledged write's idempotency record is in the same synchronously replicated
    transaction: retried after its primary is killed, the write is replayed, not applied
    again."""
    api = healed.api("write")
    key = healed.keys_on("s2", "once", 1)[0]
    headers = {"Idempotency-Key": "survives"}
    first = api.request("PUT", item_path(TABLE, key), body={"n": 1}, headers=headers)
    assert first.status == 201, first.body
    old = healed.primary_of("s2")
    healed.devcluster("kill", old)
    wait_for(lambda: healed.primary_of("s2") not in ("", old), timeout=30, what="s2 failover")

    def retried() -> Any:
        sent = api.request("PUT", item_path(TABLE, key), body={"n": 1}, headers=headers)
        return sent if sent.status != 503 else None

    again = wait_for(retried, timeout=30, what="the retry answered")
    assert again.status == 201 and again.header("Idempotent-Replayed") == "true", again.body
    assert again.body == first.body
    got = api.request("GET", item_path(TABLE, key) + "?consistency=strong")
    assert got.body["version"] == 1
