"""Operator surface: health, readiness, metrics, topology, shardctl, devcluster, faults."""

from __future__ import annotations

import json
import os
import subprocess

from shardd.placement import slot_of
from tests.harness.cluster import ROOT, SLOTS, RunningCluster, wait_for
from tests.harness.http import Api, item_path
from tests.integration.test_bad_input import assert_error


def test_health_ready_and_request_ids(api: Api) -> None:
    assert api.request("GET", "/healthz").body == {"status": "ok"}
    ready = api.request("GET", "/readyz")
    assert ready.status == 200 and ready.body["epoch"] >= 1
    echoed = api.request("GET", "/healthz", headers={"X-Request-Id": "abc-123"})
    assert echoed.header("X-Request-Id") == "abc-123"
    generated = api.request("GET", "/healthz", headers={"X-Request-Id": "bad id!"})
    assert generated.header("X-Request-Id") not in (None, "bad id!")


def test_metrics_expose_requests_shards_pools_and_lag(api: Api, table: str) -> None:
    api.request("PUT", item_path(table, "m"), body={})
    api.request("GET", item_path(table, "m"))
    text = api.request("GET", "/metrics").raw.decode()
    for name in (
        'shardd_http_requests_total{method="PUT",route="/v1/tables/{table}/items/{key}"',
        "shardd_http_request_seconds_bucket",
        "shardd_shard_query_seconds_bucket",
        "shardd_pool_connections{",
        "shardd_topology_epoch ",
        'shardd_replica_lag_bytes{node="s1-replica1",shard="s1"}',
        'shardd_node_up{node="s2-primary",role="primary",shard="s2"} 1.0',
    ):
        assert name in text, name


def test_topology_endpoint(api: Api) -> None:
    topo = api.request("GET", "/v1/topology").body
    assert topo["slot_count"] == SLOTS
    assert [s["name"] for s in topo["shards"]][:3] == ["s1", "s2", "s3"]
    assert sum(s["slots"] for s in topo["shards"]) == SLOTS
    roles = {n["name"]: n["role"] for s in topo["shards"] for n in s["nodes"]}
    assert roles["s1-primary"] == "primary" and roles["s1-replica1"] == "replica"


def test_shardctl_status_json(cluster: RunningCluster, api: Api, table: str) -> None:
    api.request("PUT", item_path(table, "counted"), body={})
    status = json.loads(cluster.shardctl("status", "--json").stdout)
    assert set(status) >= {"epoch", "shards"}
    shards = {s["name"]: s for s in status["shards"]}
    assert sum(s["slots"] for s in shards.values()) == SLOTS
    assert sum(s["items"] for s in shards.values()) >= 1
    node = shards["s1"]["nodes"][0]
    assert set(node) >= {"name", "role", "host", "port", "healthy", "lag_bytes"}
    assert all(n["healthy"] for s in shards.values() for n in s["nodes"])
    assert "s1-primary" in cluster.shardctl("shard", "list").stdout
    assert "up to date" in cluster.shardctl("migrate", "--yes").stdout
    bare = cluster.shardctl()
    assert "Usage" in bare.stdout


def test_devcluster_status_lists_every_node(cluster: RunningCluster) -> None:
    nodes = {n["name"]: n for n in cluster.status()["nodes"]}
    assert set(nodes) >= {"catalog", "s1-primary", "s1-replica1", "s3-replica1", "shardd"}
    assert all(n["up"] and n["pid"] for n in nodes.values())
    env = cluster.devcluster("env").stdout
    assert "export SHARDD_CATALOG_DSN=postgresql://" in env


def test_a_down_shard_is_503_naming_it_and_others_keep_working(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    slot_map = cluster.slot_map()
    on = {
        shard: next(
            f"down-{i}" for i in range(1000) if slot_map[slot_of(f"down-{i}", SLOTS)] == shard
        )
        for shard in ("s2", "s3")
    }
    assert api.request("PUT", item_path(table, on["s2"]), body={"before": 1}).status == 201
    cluster.devcluster("kill", "s2-primary")
    try:
        failed = api.request("PUT", item_path(table, on["s2"]), body={"during": 1})
        assert_error(failed, 503, "shard_unavailable:s2")
        assert failed.header("Retry-After")
        strong = api.request("GET", item_path(table, on["s2"]) + "?consistency=strong")
        assert_error(strong, 503, "shard_unavailable:s2")
        # Eventual reads are still served by the replica; other shards are unaffected.
        eventual = api.request("GET", item_path(table, on["s2"]) + "?consistency=eventual")
        assert eventual.status == 200 and eventual.body["item"] == {"before": 1}
        assert api.request("PUT", item_path(table, on["s3"]), body={}).status == 201
    finally:
        cluster.devcluster("start", "s2-primary")
    wait_for(
        lambda: api.request("PUT", item_path(table, on["s2"]), body={"after": 1}).status == 200,
        timeout=30,
        what="s2 writable again",
    )
    assert api.request("GET", item_path(table, on["s2"]) + "?consistency=strong").body["item"] == {
        "after": 1
    }


def test_add_shard_registers_without_moving_data(cluster: RunningCluster, api: Api) -> None:
    before = api.request("GET", "/v1/topology").body
    result = cluster.devcluster("add-shard", "s9")
    assert "registered" in result.stdout
    topo = wait_for(
        lambda: (t := api.request("GET", "/v1/topology").body)["epoch"] > before["epoch"] and t,
        timeout=10,
        what="new epoch",
    )
    shards = {s["name"]: s for s in topo["shards"]}
    assert shards["s9"]["slots"] == 0
    assert {s["name"]: s["slots"] for s in before["shards"]} == {
        name: s["slots"] for name, s in shards.items() if name != "s9"
    }
    assert cluster.sql("s9-primary", "SELECT count(*) AS n FROM shardd_slots")[0]["n"] == 0
    assert {n["name"] for n in shards["s9"]["nodes"]} == {"s9-primary", "s9-replica1"}


def test_shardd_refuses_a_public_address_without_tokens(cluster: RunningCluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDD_")}
    result = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "shardd"),
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--catalog-dsn",
            cluster.catalog_dsn(),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without tokens" in result.stderr
