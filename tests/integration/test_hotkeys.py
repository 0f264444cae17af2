"""Hot keys: a celebrity in a skewed load is found on every instance's merged view, logged
once, and absorbed (cached, spread over the shard's nodes)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness.cluster import TOKENS, RunningCluster, wait_for
from tests.harness.http import Api, item_path


@dataclass
class ReadLoad:
    """Eventual GETs over a Zipf-skewed key space through several instances, in threads;
    ``celebrity_share`` of them (settable while running) go to one key."""

    ports: list[int]
    table: str
    keys: int = 2000
    celebrity: str = "celebrity"
    celebrity_share: float = 0.0
    statuses: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> ReadLoad:
        weights = [1 / rank**1.1 for rank in range(1, self.keys + 1)]
        for n, port in enumerate(self.ports * 3):
            thread = threading.Thread(target=self._run, args=(port, weights, n), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _run(self, port: int, weights: list[float], seed: int) -> None:
        rng = random.Random(seed)
        client = Api(port, token=TOKENS["read"])
        while not self._stop.is_set():
            if rng.random() < self.celebrity_share:
                key = self.celebrity
            else:
                key = f"zipf-{rng.choices(range(self.keys), weights=weights)[0]}"
            response = client.request("GET", item_path(self.table, key) + "?consistency=eventual")
            self.statuses.append(response.status)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.fixture
def second(cluster: RunningCluster) -> Iterator[int]:
    with cluster.instance() as instance:
        yield instance.port


def _top(port: int) -> dict[str, object] | None:
    view = Api(port, token=TOKENS["admin"]).request("GET", "/v1/admin/hotkeys?limit=5").body
    keys = view["keys"]
    return keys[0] if keys else None


def test_a_celebrity_is_detected_on_every_instance_and_absorbed(
    cluster: RunningCluster, api: Api, table: str, second: int
) -> None:
    assert api.request("PUT", item_path(table, "celebrity"), body={"fans": 1}).status == 201
    ports = [cluster.port, second]

    def total(name: str, **labels: str) -> float:
        return sum(cluster.metric(name, port=p, **labels) or 0 for p in ports)

    hits_before = total("shardd_cache_lookups_total", result="hit")
    detections_before = total("shardd_hot_key_detections_total")
    with ReadLoad(ports, table) as load:
        time.sleep(1.0)  # the skewed load alone first
        load.celebrity_share = 0.25
        jumped = time.monotonic()
        for port in ports:
            wait_for(
                lambda port=port: (top := _top(port)) is not None and top["pk"] == "celebrity",
                timeout=10,
                what=f"the celebrity first in the merged view of instance {port}",
            )
        detected_after = time.monotonic() - jumped
        view = json.loads(cluster.shardctl("hot", "--json").stdout)

        def celebrity_shard_above_mean() -> bool:
            # Shard rates are recounted every few reports: they follow within seconds.
            merged = api.request("GET", "/v1/admin/hotkeys").body
            shard = cluster.slot_map()[view["keys"][0]["slot"]]
            return any(s["name"] == shard and s["vs_mean"] > 1 for s in merged["shards"])

        wait_for(celebrity_shard_above_mean, timeout=10, what="the celebrity's shard above mean")
        wait_for(
            lambda: all((cluster.metric("shardd_hot_keys", port=p) or 0) >= 1 for p in ports),
            timeout=10,
            what="both instances to count the celebrity hot",
        )
        time.sleep(1.0)  # the hot cache at work
    assert detected_after < 10
    assert set(load.statuses) <= {200, 404}, sorted(set(load.statuses))
    top = view["keys"][0]
    assert (top["table"], top["pk"]) == (table, "celebrity")
    assert top["share"] > 0.15 and top["reads_per_s"] > 0
    assert top["shard"] == cluster.slot_map()[top["slot"]]
    assert sorted(view["instances"]) == sorted(
        json.loads(cluster.shardctl("hot", "--json").stdout)["instances"]
    )
    assert len(view["instances"]) >= 2
    # Logged (and counted) once for the cluster, by one instance.
    assert total("shardd_hot_key_detections_total") - detections_before >= 1
    assert total("shardd_cache_lookups_total", result="hit") - hits_before > 50


def test_the_merged_view_is_admin_only_and_validates_its_limit(
    cluster: RunningCluster, api: Api
) -> None:
    assert cluster.api("read").request("GET", "/v1/admin/hotkeys").status == 403
    response = api.request("GET", "/v1/admin/hotkeys?limit=0")
    assert response.status == 400 and response.body["error"]["code"] == "invalid_parameter"
    view = api.request("GET", "/v1/admin/hotkeys").body
    assert set(view) == {"window_seconds", "instances", "requests_per_s", "keys", "slots", "shards"}
