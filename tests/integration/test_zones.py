"""Zones, on a synchronous cluster of its own (2 shards x 3 nodes over zones a, b, c;
the shardd instance in zone a): reads prefer the instance's zone, and losing a whole
zone under load (every Postgres node of zone a SIGKILLed) fails its primary over to
another zone while reads go on and nothing acknowledged is lost."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.harness.cluster import RunningCluster, start_cluster, wait_for
from tests.harness.http import item_path
from tests.harness.load import Load, Reader, assert_nothing_lost

TABLE = "zoned"


@pytest.fixture(scope="module")
def zoned() -> Iterator[RunningCluster]:
    running = start_cluster(shards=2, replicas=2, sync=True, write_buffer=5.0, zones="a,b,c")
    try:
        assert running.api().request("PUT", f"/v1/tables/{TABLE}").status == 201
        yield running
    finally:
        running.down()


def zones_of(cluster: RunningCluster) -> dict[str, tuple[str, str, str]]:
    """node -> (shard, role, zone), as shardctl status reports them."""
    status = json.loads(cluster.shardctl("status", "--json").stdout)
    return {
        node["name"]: (shard["name"], node["role"], node["zone"])
        for shard in status["shards"]
        for node in shard["nodes"]
    }


def test_nodes_spread_over_zones_and_reads_prefer_the_instances_zone(
    zoned: RunningCluster,
) -> None:
    nodes = zones_of(zoned)
    for shard in ("s1", "s2"):
        assert sorted(z for s, _, z in nodes.values() if s == shard) == ["a", "b", "c"]
    assert "zone=a" in zoned.shardctl("status").stdout
    api = zoned.api("write")
    # s2's replica in zone a serves every eventual read of s2 (one read per key: no key
    # gets hot, which would spread its reads over every node).
    local = next(n for n, (s, r, z) in nodes.items() if s == "s2" and r == "replica" and z == "a")
    keys = zoned.keys_on("s2", "near", 20)
    for key in keys:
        assert api.request("PUT", item_path(TABLE, key), body={"k": key}).status == 201
    served = set()
    for key in keys:
        got = api.request("GET", item_path(TABLE, key) + "?consistency=eventual")
        assert got.status == 200, got.body
        served.add(got.header("Shardd-Served-By"))
    assert served == {f"s2/{local}"}, served


def test_losing_a_zone_fails_over_to_another_and_loses_nothing(zoned: RunningCluster) -> None:
    before = zones_of(zoned)
    in_a = [n for n, (_, _, z) in before.items() if z == "a"]
    primary_in_a = next(n for n in in_a if before[n][1] == "primary")
    shard = before[primary_in_a][0]
    api = zoned.api("write")
    readable = zoned.keys_on("s1", "steady", 10) + zoned.keys_on("s2", "steady", 10)
    for key in readable:
        assert api.request("PUT", item_path(TABLE, key), body={"k": key}).status == 201
    with (
        Reader(zoned.api("read"), TABLE, readable) as reader,
        Load([api], TABLE, prefix="zone", writers=6) as load,
    ):
        wait_for(lambda: len(load.outcomes.acked) > 100, timeout=30, what="load running")
        for node in in_a:
            zoned.devcluster("kill", node)
        wait_for(
            lambda: zoned.primary_of(shard) not in ("", primary_in_a),
            timeout=30,
            what=f"{shard} failing over",
        )
        followed = time.monotonic()  # acknowledged from here on: by the new primary
        wait_for(
            lambda: load.acks_on(shard, after=followed) > 20,
            timeout=30,
            what=f"writes to {shard} resuming",
        )
    assert_nothing_lost(zoned, load.outcomes, TABLE)
    assert reader.reads > 0 and reader.failures == [], reader.failures[:5]
    after = zones_of(zoned)
    new_primary = zoned.primary_of(shard)
    assert after[new_primary][2] in ("b", "c")  # zone a had no node left to qualify
    kinds = zoned.sql("catalog", "SELECT kind FROM shardd_failovers ORDER BY id DESC LIMIT 1")
    assert kinds[0]["kind"] == "automatic"
