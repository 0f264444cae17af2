"""The item cache against real Postgres and a real redis-server: what it serves, how
fast other instances' writes reach it, and Redis dying under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness.cluster import TOKENS, RunningCluster, wait_for
from tests.harness.http import Api, item_path

STALENESS_BOUND = 1.0  # seconds: cache_invalidation_interval, replica lag and slack


def declare(api: Api, table: str, **options: object) -> None:
    response = api.request("PUT", f"/v1/tables/{table}", body=options)
    assert response.status in (200, 201), response.body


def served_from_cache(api: Api, path: str) -> bool:
    return (api.request("GET", path).header("Shardd-Served-By") or "").endswith("/cache")


@pytest.fixture
def other(cluster: RunningCluster) -> Iterator[Api]:
    with cluster.instance() as instance:
        yield Api(instance.port, token=TOKENS["admin"])


def test_table_cache_options_are_declared_checked_and_sent(api: Api, table: str) -> None:
    declare(api, table, description="d", cache="all", cache_ttl=2.5, max_age=30)
    info = api.request("GET", f"/v1/tables/{table}").body
    assert (info["cache"], info["cache_ttl"], info["max_age"]) == ("all", 2.5, 30)
    for bad in ({"cache": "some"}, {"cache_ttl": 0}, {"cache_ttl": "1"}, {"max_age": -1},
                {"max_age": 1.5}, {"max_age": True}, {"cache_ttl": 1e9}):  # fmt: skip
        response = api.request("PUT", f"/v1/tables/{table}", body=bad)
        assert response.status == 400, bad
        assert response.body["error"]["code"] == "invalid_table_spec"
    assert api.request("GET", f"/v1/tables/{table}").body["cache"] == "all"  # unchanged
    assert api.request("PUT", item_path(table, "k"), body={"v": 1}).status == 201
    response = api.request("GET", item_path(table, "k"))
    assert response.header("Cache-Control") == "max-age=30"
    assert response.header("Vary") == "Shardd-Session, Shardd-Consistency"
    strong = api.request("GET", item_path(table, "k") + "?consistency=strong")
    assert strong.header("Cache-Control") == "no-store"
    assert strong.header("Vary") == "Shardd-Session, Shardd-Consistency"
    missing = api.request("GET", item_path(table, "absent"))
    assert missing.status == 404 and missing.header("Cache-Control") == "max-age=30"
    assert missing.header("Vary") == "Shardd-Session, Shardd-Consistency"
    declare(api, table)  # a PUT replaces the declaration: the defaults again
    info = api.request("GET", f"/v1/tables/{table}").body
    assert (info["cache"], info["cache_ttl"], info["max_age"]) == ("hot", 1.0, 0)
    assert api.request("GET", item_path(table, "k")).header("Cache-Control") == "no-cache"


def test_strong_reads_and_uncached_tables_never_use_the_cache(api: Api, table: str) -> None:
    declare(api, table, cache="all", cache_ttl=60)
    assert api.request("PUT", item_path(table, "k"), body={"v": 1}).status == 201
    path = item_path(table, "k")
    wait_for(
        lambda: served_from_cache(api, path + "?consistency=eventual"),
        timeout=10,
        what="an eventual read served from the cache",
    )
    for _ in range(5):
        assert not served_from_cache(api, path + "?consistency=strong")
    declare(api, table, cache="off")
    for _ in range(5):
        assert not served_from_cache(api, path + "?consistency=eventual")


def test_a_session_read_sees_its_own_write_through_the_cache(api: Api, table: str) -> None:
    declare(api, table, cache="all", cache_ttl=60)
    path = item_path(table, "k")
    assert api.request("PUT", path, body={"v": 1}).status == 201
    wait_for(lambda: served_from_cache(api, path + "?consistency=eventual"), timeout=10,
             what="the item cached")  # fmt: skip
    written = api.request("PUT", path, body={"v": 2})
    token = written.header("Shardd-Session")
    assert token
    for _ in range(20):
        read = api.request("GET", path, headers={"Shardd-Session": token})
        assert read.status == 200 and read.body["version"] == 2


def _versions_after_write(reader: Api, path: str, *, seconds: float) -> list[tuple[float, int]]:
    """(time, version or 0 for absent) of eventual reads for ``seconds``."""
    seen = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        response = reader.request("GET", path + "?consistency=eventual")
        seen.append((time.monotonic(), response.body["version"] if response.status == 200 else 0))
    return seen


def test_another_instances_write_reaches_this_cache_within_the_bound(
    cluster: RunningCluster, api: Api, table: str, other: Api
) -> None:
    """The TTL is a minute: only the change-log invalidation can end the old value."""
    declare(api, table, cache="all", cache_ttl=60)
    path = item_path(table, "k")
    assert api.request("PUT", path, body={"v": 1}).status == 201
    wait_for(lambda: served_from_cache(other, path + "?consistency=eventual"), timeout=10,
             what="the item cached on the other instance")  # fmt: skip
    cached = 0
    for version in range(2, 8):
        assert api.request("PUT", path, body={"v": version}).body["version"] == version
        acked = time.monotonic()
        seen = _versions_after_write(other, path, seconds=STALENESS_BOUND + 0.5)
        late = [v for t, v in seen if t > acked + STALENESS_BOUND]
        assert late and set(late) == {version}, (version, seen[-5:])
        cached += served_from_cache(other, path + "?consistency=eventual")
    assert cached >= 3  # the new versions were cached in turn, not just read through
    assert api.request("DELETE", path).status == 204
    acked = time.monotonic()
    seen = _versions_after_write(other, path, seconds=STALENESS_BOUND + 0.5)
    assert {v for t, v in seen if t > acked + STALENESS_BOUND} == {0}
    lag = cluster.metric("shardd_cache_invalidation_lag_seconds_count", port=other.port)
    assert lag and lag >= 6


def test_killing_redis_under_read_load_fails_no_read(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    declare(api, table, cache="all", cache_ttl=30)
    keys = [f"r-{i}" for i in range(20)]
    for key in keys:
        assert api.request("PUT", item_path(table, key), body={"k": key}).status == 201
    with cluster.instance(cache_backend="redis", redis_url=cluster.redis_url()) as instance:
        shared = Api(instance.port, token=TOKENS["read"])
        first = item_path(table, keys[0]) + "?consistency=eventual"
        wait_for(lambda: served_from_cache(shared, first), timeout=10, what="a Redis hit")
        statuses: list[int] = []
        stop = threading.Event()

        def reader(offset: int) -> None:
            client = Api(instance.port, token=TOKENS["read"])
            i = offset
            while not stop.is_set():
                path = item_path(table, keys[i % len(keys)]) + "?consistency=eventual"
                statuses.append(client.request("GET", path).status)
                i += 1

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            cluster.devcluster("kill", "redis")
            time.sleep(2.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            cluster.devcluster("start", "redis")
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        errors = cluster.metric("shardd_cache_backend_errors_total", port=instance.port)
        assert errors and errors > 0
        # Redis back (empty): reads fill it again and hit.
        wait_for(lambda: served_from_cache(shared, first), timeout=15, what="Redis hits again")
        # A write through an instance without Redis reaches the shared cache too.
        path = item_path(table, keys[0])
        assert api.request("PUT", path, body={"k": "new"}).body["version"] == 2
        acked = time.monotonic()
        seen = _versions_after_write(shared, path, seconds=STALENESS_BOUND + 0.5)
        assert {v for t, v in seen if t > acked + STALENESS_BOUND} == {2}
