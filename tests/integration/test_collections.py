"""Partitions, batches and scans: multi-item reads and writes across shards."""

from __future__ import annotations

from urllib.parse import quote

from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, RunningCluster
from tests.harness.http import Api, after, item_path


def test_partition_query_orders_by_sort_key_and_pages(api: Api, table: str) -> None:
    pk = "user/42"
    for i in (5, 1, 3, 2, 4):
        api.request("PUT", item_path(table, pk, f"order#{i}"), body={"n": i})
    api.request("PUT", item_path(table, pk, "profile"), body={"name": "x"})
    api.request("PUT", item_path(table, "user/43", "order#9"), body={"n": 9})
    base = f"/v1/tables/{table}/partitions/{quote(pk, safe='')}?consistency=strong"

    every = api.request("GET", base)
    assert [item["sk"] for item in every.body["items"]] == [
        "order#1",
        "order#2",
        "order#3",
        "order#4",
        "order#5",
        "profile",
    ]
    assert every.body["next"] is None

    seen, after = [], None
    while True:
        url = base + "&prefix=order%23&limit=2" + (f"&after={quote(after)}" if after else "")
        page = api.request("GET", url).body
        seen += [item["item"]["n"] for item in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [1, 2, 3, 4, 5]
    empty = api.request("GET", f"/v1/tables/{table}/partitions/nobody?consistency=strong")
    assert empty.status == 200 and empty.body == {"items": [], "next": None}


def test_batch_write_then_batch_get_across_shards(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    puts = [{"pk": f"b-{i}", "sk": "s", "item": {"i": i}} for i in range(40)]
    written = api.request("POST", f"/v1/tables/{table}/batch/write", body={"puts": puts})
    assert written.status == 200
    assert written.body["ok"] is True
    assert [r["status"] for r in written.body["results"]] == ["ok"] * 40
    token = written.header("Shardd-Session")
    assert token and len(token.split(",")) == 3
    assert written.header("Shardd-Served-By") == "s1/s1-primary, s2/s2-primary, s3/s3-primary"

    keys = [{"pk": f"b-{i}", "sk": "s"} for i in range(45)]
    got = api.request(
        "POST",
        f"/v1/tables/{table}/batch/get",
        body={"keys": keys},
        headers={"Shardd-Session": token},
    )
    assert got.status == 200
    results = got.body["results"]
    assert [r["found"] for r in results] == [True] * 40 + [False] * 5
    assert [r["item"]["i"] for r in results[:40]] == list(range(40))

    mixed = api.request(
        "POST",
        f"/v1/tables/{table}/batch/write",
        body={
            "puts": [{"pk": "b-0", "sk": "s", "item": {"i": "new"}}],
            "deletes": [{"pk": "b-1", "sk": "s"}, {"pk": "never", "sk": "s"}],
        },
    )
    assert [r["status"] for r in mixed.body["results"]] == ["ok", "deleted", "absent"]
    assert mixed.body["results"][0]["version"] == 2
    total = sum(
        cluster.sql(f"{s}-primary", "SELECT count(*) AS n FROM shardd_items WHERE tbl = $1", table)[
            0
        ]["n"]
        for s in ("s1", "s2", "s3")
    )
    assert total == 39


def test_batch_write_is_atomic_per_shard(cluster: RunningCluster, api: Api, table: str) -> None:
    """A shard whose batch fails keeps none of it (a failing row aborts the whole group)."""
    slot_map = cluster.slot_map()
    on_s1 = [k for k in (f"atom-{i}" for i in range(500)) if slot_map[slot_of(k, SLOTS)] == "s1"][
        :3
    ]
    # Make the third key's slot refuse writes on s1 only long enough to see the rollback:
    # mark it 'frozen' so the shard raises inside the batch transaction.
    frozen = slot_of(on_s1[2], SLOTS)
    cluster.sql("s1-primary", "UPDATE shardd_slots SET state = 'frozen' WHERE slot = $1", frozen)
    try:
        response = api.request(
            "POST",
            f"/v1/tables/{table}/batch/write",
            body={"puts": [{"pk": k, "item": {}} for k in on_s1]},
        )
        assert response.status == 503
        assert response.body["error"]["code"] == "shard_unavailable:s1"
        assert response.header("Retry-After")
    finally:
        cluster.sql("s1-primary", "UPDATE shardd_slots SET state = 'owned' WHERE slot = $1", frozen)
    stored = cluster.sql("s1-primary", "SELECT pk FROM shardd_items WHERE tbl = $1", table)
    assert stored == []


def test_batch_writes_apply_in_order_and_may_be_empty(api: Api, table: str) -> None:
    url = f"/v1/tables/{table}/batch/write"
    for empty in ({}, {"puts": []}, {"puts": [], "deletes": []}):
        done = api.request("POST", url, body=empty)
        assert done.status == 200 and done.body["ok"] and done.body["results"] == []
        assert done.header("Shardd-Served-By") is None
    twice = {
        "puts": [{"pk": "dup", "item": {"n": 1}}, {"pk": "dup", "item": {"n": 2}}],
        "deletes": [{"pk": "kept"}],
    }
    written = api.request("POST", url, body=twice).body
    assert [r["version"] for r in written["results"][:2]] == [1, 2]
    got = api.request("GET", item_path(table, "dup") + "?consistency=strong")
    assert got.body["item"] == {"n": 2} and got.body["version"] == 2
    gone = {"puts": [{"pk": "dup", "item": {"n": 3}}], "deletes": [{"pk": "dup"}]}
    outcome = api.request("POST", url, body=gone).body["results"]
    assert [r["status"] for r in outcome] == ["ok", "deleted"]
    assert api.request("GET", item_path(table, "dup") + "?consistency=strong").status == 404


def test_scan_returns_every_item_once_across_shards(api: Api, table: str) -> None:
    puts = [{"pk": f"scan-{i:03d}", "item": {"i": i}} for i in range(95)]
    for chunk in range(0, 95, 50):
        api.request(
            "POST", f"/v1/tables/{table}/batch/write", body={"puts": puts[chunk : chunk + 50]}
        )
    seen: list[str] = []
    position = None
    pages = 0
    while True:
        url = f"/v1/tables/{table}/scan?limit=20&consistency=strong{after(position)}"
        page = api.request("GET", url)
        assert page.status == 200, page.body
        seen += [item["pk"] for item in page.body["items"]]
        position = page.body["next"]
        pages += 1
        if position is None:
            break
    assert sorted(seen) == sorted(p["pk"] for p in puts)
    assert len(seen) == len(set(seen))
    assert pages >= 5
