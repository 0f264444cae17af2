"""Replica reads survive a replica being killed under load; it rejoins the rotation."""

from __future__ import annotations

import threading

from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, RunningCluster, wait_for
from tests.harness.http import Api, item_path, topology_nodes


def test_killing_a_replica_under_read_load_fails_no_read(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    slot_map = cluster.slot_map()
    keys = [k for k in (f"rk-{i}" for i in range(400)) if slot_map[slot_of(k, SLOTS)] == "s1"][:20]
    for key in keys:
        assert api.request("PUT", item_path(table, key), body={"k": key}).status == 201
    wait_for(
        lambda: (
            api.request("GET", item_path(table, keys[-1]) + "?consistency=eventual").status == 200
        ),
        timeout=10,
        what="replica caught up",
    )

    statuses: list[int] = []
    served: list[str] = []
    stop = threading.Event()

    def reader(offset: int) -> None:
        client = cluster.api("read")
        i = offset
        while not stop.is_set():
            response = client.request(
                "GET", item_path(table, keys[i % len(keys)]) + "?consistency=eventual"
            )
            statuses.append(response.status)
            served.append(response.header("Shardd-Served-By") or "")
            i += 1

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        # The replica serves, then dies under the load, and the primary takes over
        # (answers from the item cache name no node).
        wait_for(lambda: "s1/s1-replica1" in served, timeout=10, what="the replica serving")
        cluster.devcluster("kill", "s1-replica1")
        # Through the moment its health check finds it dead, and on from there.
        wait_for(lambda: not healthy(cluster, "s1-replica1"), timeout=20, what="replica marked")
        marked_at = len(served)
        wait_for(
            lambda: len(served) > marked_at + 200 and "s1/s1-primary" in served[marked_at:],
            timeout=20,
            what="the primary serving",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    try:
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert [s for s in served if not s.endswith("/cache")][-1] == "s1/s1-primary"
    finally:
        cluster.devcluster("start", "s1-replica1")
    wait_for(
        lambda: (
            api.request("GET", item_path(table, keys[0]) + "?consistency=eventual").header(
                "Shardd-Served-By"
            )
            == "s1/s1-replica1"
        ),
        timeout=30,
        what="the replica back in rotation",
    )


def test_concurrent_eventual_reads_of_one_item_share_one_query(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    [key] = cluster.keys_on("s2", "coalesced", 1)
    path = item_path(table, key) + "?consistency=eventual"
    assert api.request("PUT", item_path(table, key), body={"v": 1}).status == 201
    wait_for(lambda: api.request("GET", path).status == 200, timeout=10, what="replica caught up")
    [replica] = cluster.replicas_of("s2")
    before = cluster.metric("shardd_reads_coalesced_total") or 0.0
    responses = []

    def read() -> None:
        responses.append(cluster.api("read").request("GET", path))

    readers = [threading.Thread(target=read) for _ in range(8)]
    with cluster.paused(replica):  # the first read waits on the replica; the rest join it
        for reader in readers:
            reader.start()
        wait_for(
            lambda: (cluster.metric("shardd_reads_coalesced_total") or 0.0) - before >= 7,
            timeout=10,
            what="seven reads joining the one in flight",
        )
    for reader in readers:
        reader.join(timeout=30)
    assert [r.status for r in responses] == [200] * 8
    assert {r.body["version"] for r in responses} == {1}
    # A strong read never joins another: it must see every write acknowledged before it.
    strong = api.request("GET", item_path(table, key) + "?consistency=strong")
    assert strong.status == 200 and strong.header("Shardd-Served-By") == "s2/s2-primary"


def healthy(cluster: RunningCluster, node: str) -> bool:
    """Whether the instance's last health check of ``node`` passed."""
    return bool(topology_nodes(cluster.api("read"))[node]["healthy"])
