"""Every wait is bounded, on a one-shard cluster with automatic failover on.

Requests that wait on a lock held by another transaction (``Holding``) stand in for slow
work: they fill the request pool, outlive their deadline, or hit the shard's
``lock_timeout``.  The shard's primary is busy, never down: no failover may happen, a
request past its deadline must not leave its query running on the shard, and a lock wait
past ``lock_timeout`` is a clean 503 that wrote nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness.cluster import Holding, RunningCluster, start_cluster, wait_for
from tests.harness.http import Api, topology_nodes

TABLE = "waits"
POOL_SIZE = 2
FAILOVER_AFTER_CHECKS = 3
REQUEST_TIMEOUT = 1.5
# Server-side limits far beyond the request deadline: only a cancel sent by shardd can end
# a query early.
SERVER_TIMEOUT = 8.0
LOCKED = "SELECT 1 FROM shardd_items WHERE tbl = $1 AND pk = $2 FOR UPDATE"


@pytest.fixture(scope="module")
def waits() -> Iterator[RunningCluster]:
    running = start_cluster(
        shards=1,
        replicas=1,
        failover=True,
        settings={
            "pool_size": POOL_SIZE,
            "failover_after_checks": FAILOVER_AFTER_CHECKS,
            "request_timeout": REQUEST_TIMEOUT,
            "topology_lease": 10.0,
            "statement_timeout": SERVER_TIMEOUT,
            "lock_timeout": SERVER_TIMEOUT,
        },
    )
    try:
        assert running.api().request("PUT", f"/v1/tables/{TABLE}").status == 201
        yield running
    finally:
        running.down()


def put(api: Api, key: str, doc: dict[str, object]) -> tuple[int, str | None]:
    response = api.request("PUT", f"/v1/tables/{TABLE}/items/{key}", body=doc)
    return response.status, response.body["error"]["code"] if response.status >= 400 else None


def waiting_on_locks(cluster: RunningCluster, node: str) -> int:
    """shardd sessions on ``node`` now waiting for a lock."""
    rows = cluster.sql(
        node,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE application_name = 'shardd' AND wait_event_type = 'Lock'",
    )
    return int(rows[0]["n"])


def failovers(cluster: RunningCluster) -> int:
    return int(cluster.sql("catalog", "SELECT count(*) AS n FROM shardd_failovers")[0]["n"])


def test_a_saturated_pool_is_not_a_dead_primary(waits: RunningCluster) -> None:
    api = waits.api("write")
    assert put(api, "busy", {"v": 0})[0] in (200, 201)
    primary = waits.primary_of("s1")
    before = failovers(waits)
    outcomes: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def writer() -> None:
        own = waits.api("write")
        while not stop.is_set():
            outcomes.append(put(own, "busy", {"v": 1}))

    holding = Holding(waits.node_dsn(primary), LOCKED, TABLE, "busy")
    threads = [threading.Thread(target=writer, daemon=True) for _ in range(3 * POOL_SIZE)]
    try:
        for thread in threads:
            thread.start()
        wait_for(
            lambda: waiting_on_locks(waits, primary) >= POOL_SIZE,
            timeout=30,
            what="every pooled connection of the primary busy",
        )
        # Several times what failover_after_checks failed checks take: the monitor would
        # have failed the primary over by the end if a busy pool counted as a dead node.
        until = time.monotonic() + 5.0
        while time.monotonic() < until:
            nodes = topology_nodes(waits.api("read"))
            assert nodes[primary]["failed_checks"] < FAILOVER_AFTER_CHECKS, nodes
            time.sleep(0.1)
        wait_for(
            lambda: waiting_on_locks(waits, primary) >= POOL_SIZE,
            timeout=5,
            what="the pool still saturated at the end",
        )
    finally:
        stop.set()
        holding.release()
        for thread in threads:
            thread.join(timeout=30)

    assert waits.primary_of("s1") == primary and failovers(waits) == before
    assert outcomes and {status for status, _ in outcomes} <= {200, 503, 504}, set(outcomes)
    assert put(api, "busy", {"v": 2})[0] == 200


def test_a_request_past_its_deadline_is_cancelled_on_the_shard(waits: RunningCluster) -> None:
    api = waits.api("write")
    assert put(api, "stuck", {"v": 0})[0] in (200, 201)
    primary = waits.primary_of("s1")
    answered: list[tuple[int, str | None]] = []
    holding = Holding(waits.node_dsn(primary), LOCKED, TABLE, "stuck")
    try:
        request = threading.Thread(target=lambda: answered.append(put(api, "stuck", {"v": 1})))
        request.start()
        wait_for(
            lambda: waiting_on_locks(waits, primary) == 1, timeout=10, what="the write waiting"
        )
        request.join(timeout=30)
        assert answered == [(504, "outcome_unknown")]
        # The shard would let the query wait SERVER_TIMEOUT seconds; only shardd's cancel
        # ends it sooner.
        wait_for(
            lambda: waiting_on_locks(waits, primary) == 0,
            timeout=SERVER_TIMEOUT - REQUEST_TIMEOUT - 2.5,
            what="the query past its deadline to be cancelled on the shard",
        )
    finally:
        holding.release()
    read = api.request("GET", f"/v1/tables/{TABLE}/items/stuck?consistency=strong")
    assert read.body["item"] == {"v": 0} and read.body["version"] == 1, read.body


def test_a_lock_wait_past_lock_timeout_is_a_clean_503(waits: RunningCluster) -> None:
    instance = waits.start_instance(lock_timeout="0.3", request_timeout="5")
    try:
        api = Api(instance.port, token=waits.api("write").token)
        assert put(api, "locked", {"v": 0})[0] in (200, 201)
        primary = waits.primary_of("s1")
        holding = Holding(waits.node_dsn(primary), LOCKED, TABLE, "locked")
        try:
            response = api.request("PUT", f"/v1/tables/{TABLE}/items/locked", body={"v": 1})
            assert response.status == 503, response.body
            assert response.body["error"]["code"] == "lock_timeout"
            assert response.header("Retry-After")
            assert waiting_on_locks(waits, primary) == 0
        finally:
            holding.release()
        read = api.request("GET", f"/v1/tables/{TABLE}/items/locked?consistency=strong")
        assert read.body["item"] == {"v": 0}, read.body
    finally:
        instance.stop()
