"""Placement and fencing, checked on the shards themselves with SQL."""

from __future__ import annotations

import re

from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, RunningCluster, wait_for
from tests.harness.http import Api, item_path


def test_every_item_sits_on_the_shard_its_slot_maps_to(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    keys = [f"route-{i}" for i in range(60)]
    for key in keys:
        assert api.request("PUT", item_path(table, key), body={"k": key}).status == 201
    slot_map = cluster.slot_map()
    found: dict[str, str] = {}
    for shard in ("s1", "s2", "s3"):
        rows = cluster.sql(
            f"{shard}-primary", "SELECT pk, slot FROM shardd_items WHERE tbl = $1", table
        )
        for row in rows:
            assert row["pk"] not in found, f"{row['pk']} stored twice"
            found[row["pk"]] = shard
            assert row["slot"] == slot_of(row["pk"], SLOTS)
    assert set(found) == set(keys)
    for key, shard in found.items():
        assert slot_map[slot_of(key, SLOTS)] == shard
    assert len(set(found.values())) == 3


def test_shard_refuses_write_for_a_slot_it_does_not_own(cluster: RunningCluster) -> None:
    slot_map = cluster.slot_map()
    foreign = next(slot for slot, shard in slot_map.items() if shard != "s1")
    try:
        cluster.sql(
            "s1-primary", "SELECT * FROM shardd_put($1, 'x', 'k', '', '{}'::jsonb, NULL)", foreign
        )
    except Exception as exc:  # asyncpg raises the shard's own SQLSTATE
        assert getattr(exc, "sqlstate", None) == "SD001"
    else:
        raise AssertionError("the shard accepted a write for a slot it does not own")
    assert (
        cluster.sql(
            "s1-primary", "SELECT count(*) AS n FROM shardd_items WHERE slot = $1", foreign
        )[0]["n"]
        == 0
    )


def _move_slot_behind_shardds_back(
    cluster: RunningCluster, slot: int, source: str, target: str
) -> None:
    """Hand a slot to another shard the way a move's cutover does, without notifying."""
    cluster.sql(
        f"{target}-primary",
        "INSERT INTO shardd_slots (slot, state) VALUES ($1, 'owned')"
        " ON CONFLICT (slot) DO UPDATE SET state = 'owned'",
        slot,
    )
    cluster.sql(
        f"{source}-primary", "UPDATE shardd_slots SET state = 'moved' WHERE slot = $1", slot
    )
    cluster.sql("catalog", "UPDATE shardd_slot_map SET shard = $2 WHERE slot = $1", slot, target)
    cluster.sql("catalog", "UPDATE shardd_cluster SET epoch = epoch + 1")


def _stale_retries(api: Api) -> float:
    text = api.request("GET", "/metrics").raw.decode()
    match = re.search(r"^shardd_stale_map_retries_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_stale_map_is_refused_by_the_shard_then_retried(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    slot_map = cluster.slot_map()
    used = {
        row["slot"]
        for shard in ("s1", "s2", "s3")
        for row in cluster.sql(f"{shard}-primary", "SELECT DISTINCT slot FROM shardd_items")
    }
    pk = next(
        f"mover-{i}"
        for i in range(100000)
        if slot_map[slot_of(f"mover-{i}", SLOTS)] == "s1"
        and slot_of(f"mover-{i}", SLOTS) not in used
    )
    slot = slot_of(pk, SLOTS)
    before = _stale_retries(api)
    _move_slot_behind_shardds_back(cluster, slot, "s1", "s2")
    try:
        written = api.request("PUT", item_path(table, pk), body={"after": "move"})
        assert written.status == 201, written.body
        assert written.header("Shardd-Served-By") == "s2/s2-primary"
        assert (
            cluster.sql("s1-primary", "SELECT count(*) AS n FROM shardd_items WHERE pk = $1", pk)[
                0
            ]["n"]
            == 0
        )
        assert (
            cluster.sql("s2-primary", "SELECT count(*) AS n FROM shardd_items WHERE pk = $1", pk)[
                0
            ]["n"]
            == 1
        )
        assert _stale_retries(api) > before
        read = api.request("GET", item_path(table, pk) + "?consistency=strong")
        assert read.status == 200 and read.header("Shardd-Served-By") == "s2/s2-primary"
    finally:
        api.request("DELETE", item_path(table, pk))
        _move_slot_behind_shardds_back(cluster, slot, "s2", "s1")
        wait_for(
            lambda: (
                api.request("PUT", item_path(table, pk), body={}).header("Shardd-Served-By")
                == "s1/s1-primary"
            ),
            timeout=10,
            what="slot back on s1",
        )
        api.request("DELETE", item_path(table, pk))


def test_a_replica_of_a_shard_that_no_longer_owns_a_slot_never_answers(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    slot_map = cluster.slot_map()
    foreign = next(slot for slot, shard in slot_map.items() if shard == "s2")
    rows = cluster.sql(
        "s1-replica1", "SELECT * FROM shardd_get($1, $2, 'k', '', NULL)", foreign, table
    )
    assert rows[0]["state"] is None and rows[0]["version"] is None
