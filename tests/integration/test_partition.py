"""A partition only the failover monitor sees: never two primaries acknowledging writes.

One shard, a primary and an asynchronous replica, two shardd instances.  The monitor
(instance M) reaches the primary through a TCP proxy (``node_addresses``); the instance
serving clients (instance C) and the replica reach it directly.  The proxy goes silent:
M sees the primary die and fails over, while C still reaches it and has a write in
flight there, held on a row lock.  The lock is released only once the catalog names the
new primary, so a write C sent to the old primary could commit there after the
promotion.  Afterwards: every write C acknowledged is on the new primary, and the old
primary holds nothing the new one lacks (it acknowledged nothing after the fork).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from shardd import pgctl
from tests.harness.cluster import Holding, Instance, RunningCluster, start_cluster, wait_for
from tests.harness.http import Api, Response
from tests.harness.load import Load
from tests.harness.proxy import Proxy

TABLE = "part"
HELD = "held-key"


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    running = Proxy()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def part(proxy: Proxy) -> Iterator[RunningCluster]:
    # Long statement and lock limits: the held write stays in flight well past the
    # moment the monitor could promote.
    running = start_cluster(
        shards=1,
        replicas=1,
        settings={
            "topology_lease": 20.0,
            "statement_timeout": 15.0,
            "lock_timeout": 14.0,
            "request_timeout": 20.0,
            "topology_poll_interval": 0.5,
        },
    )
    try:
        proxy.target = running.node_port("s1-primary")
        assert running.api().request("PUT", f"/v1/tables/{TABLE}").status == 201
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def monitor(part: RunningCluster, proxy: Proxy) -> Iterator[Instance]:
    """Instance M, through the proxy, made the monitor: the first instance stops (and
    leaves the instance registry) while M takes the lease, then comes back as C."""
    instance = part.start_instance(node_addresses=f"s1-primary=127.0.0.1:{proxy.port}")
    try:
        [first] = [n["pid"] for n in part.status()["nodes"] if n["name"] == "shardd"]
        os.kill(first, signal.SIGTERM)
        wait_for(lambda: not pgctl.alive(first), timeout=30, what="the first instance stopping")
        wait_for(
            lambda: part.monitor().split(":")[1] == str(instance.port),
            timeout=30,
            what="instance M holding the monitor lease",
        )
        part.devcluster("start", "shardd")
        yield instance
    finally:
        instance.stop()


def test_a_partition_hiding_the_primary_from_the_monitor_never_makes_two_primaries(
    part: RunningCluster, proxy: Proxy, monitor: Instance
) -> None:
    api = part.api("write")
    primary, [replica] = part.primary_of("s1"), part.replicas_of("s1")
    assert api.request("PUT", f"/v1/tables/{TABLE}/items/{HELD}", body={"v": 0}).status == 201
    holding = Holding(
        part.node_dsn(primary), "SELECT 1 FROM shardd_items WHERE pk = $1 FOR UPDATE", HELD
    )
    held: list[Response] = []
    writer = threading.Thread(
        target=lambda: held.append(
            Api(part.port, token=api.token).request(
                "PUT", f"/v1/tables/{TABLE}/items/{HELD}", body={"v": 1}
            )
        )
    )
    try:
        with Load([api], TABLE, prefix="part", writers=2) as load:
            wait_for(lambda: len(load.outcomes.acked) > 20, timeout=30, what="load running")
            writer.start()
            wait_for(
                lambda: (
                    part.sql(primary, "SELECT count(*) AS n FROM pg_locks WHERE NOT granted")[0][
                        "n"
                    ]
                    > 0
                ),
                timeout=10,
                what="C's write waiting on the held row",
            )
            proxy.cut()
            wait_for(lambda: part.primary_of("s1") == replica, timeout=60, what="M's failover")
            # The old primary may still take the held write now, if C still sent it.
            holding.release()
            writer.join(timeout=30)
            acked = len(load.outcomes.acked)
            wait_for(
                lambda: len(load.outcomes.acked) > acked + 20,
                timeout=30,
                what="writes acknowledged by the new primary",
            )
    finally:
        holding.release()
        proxy.mend()
    [response] = held
    new_rows = {
        row["pk"]: row["doc"]
        for row in part.sql(replica, "SELECT pk, doc::text AS doc FROM shardd_items")
    }
    if response.status in (200, 201):
        assert new_rows[HELD] == '{"v": 1}', "the held write was acknowledged but is lost"
    lost = [key for key in load.outcomes.acked if key not in new_rows]
    assert not lost, f"{len(lost)} acknowledged writes are missing, e.g. {lost[:5]}"
    old_rows = {
        row["pk"]: row["doc"]
        for row in part.sql(primary, "SELECT pk, doc::text AS doc FROM shardd_items")
    }
    only_old = {k: v for k, v in old_rows.items() if new_rows.get(k) != v}
    assert not only_old, f"the old primary took writes after the fork: {list(only_old)[:5]}"
    # The monitor reaches the old primary again: fenced on its node; then it rejoins.
    wait_for(
        lambda: part.sql(primary, "SELECT fenced FROM shardd_node_state")[0]["fenced"],
        timeout=30,
        what="the old primary fenced on its node",
    )
    part.heal()
    assert part.replicas_of("s1") == [primary]
