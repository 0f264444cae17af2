"""The catalog on Patroni and etcd (``devcluster up --ha``), on a cluster of its own:
three catalog members (synchronous) on a three-member etcd, two shards.

Faults are real: a member is lost as a machine is (Patroni and its Postgres SIGKILLed
together), an etcd member is SIGKILLed.  Under read/write load: reads never fail,
writes resume within 15 s of losing the catalog primary, nothing acknowledged is lost,
and the monitor's lease works on the new catalog primary (it fails a shard over).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.harness.cluster import RunningCluster, start_cluster, wait_for
from tests.harness.http import Api, item_path
from tests.harness.load import Load, Reader, assert_nothing_lost

TABLE = "ha_catalog"


@pytest.fixture(scope="module")
def hac() -> Iterator[RunningCluster]:
    running = start_cluster(shards=2, replicas=1, ha=True, write_buffer=5.0)
    try:
        assert running.api().request("PUT", f"/v1/tables/{TABLE}").status == 201
        yield running
    finally:
        running.down()


def members(cluster: RunningCluster) -> dict[str, dict[str, Any]]:
    return {
        row["name"]: row
        for row in cluster.status()["nodes"]
        if row["name"].startswith(("catalog-", "etcd-"))
    }


def catalog_primary(cluster: RunningCluster) -> str:
    primaries = [n for n, row in members(cluster).items() if row["role"] == "primary"]
    return primaries[0] if len(primaries) == 1 else ""


def steady_keys(cluster: RunningCluster) -> list[str]:
    keys = cluster.keys_on("s1", "steady", 5) + cluster.keys_on("s2", "steady", 5)
    api = cluster.api("write")
    for key in keys:
        assert api.request("PUT", item_path(TABLE, key), body={"k": key}).status in (200, 201)
    return keys


def test_the_catalog_runs_as_three_patroni_members_on_etcd(hac: RunningCluster) -> None:
    found = members(hac)
    assert sorted(found) == [f"catalog-{i}" for i in (1, 2, 3)] + [f"etcd-{i}" for i in (1, 2, 3)]
    assert all(row["up"] for row in found.values()), found
    roles = sorted(found[f"catalog-{i}"]["role"] for i in (1, 2, 3))
    assert roles == ["primary", "replica", "replica"]
    # shardctl reaches the catalog through every member's address.
    assert re.search(r"^monitor: \S+:\d+:\d+$", hac.shardctl("status").stdout, re.M)


def test_losing_an_etcd_member_changes_nothing(hac: RunningCluster) -> None:
    keys = steady_keys(hac)
    primary = catalog_primary(hac)
    assert primary
    with (
        Reader(hac.api("read"), TABLE, keys) as reader,
        Load([hac.api("write")], TABLE, prefix="etcd") as load,
    ):
        wait_for(lambda: len(load.outcomes.acked) > 30, timeout=30, what="load running")
        hac.devcluster("kill", "etcd-1")
        killed_at = time.monotonic()
        wait_for(lambda: time.monotonic() > killed_at + 4, timeout=10, what="4 s of load")
        acked_after = sum(1 for at, _ in load.outcomes.ack_times if at > killed_at)
    hac.devcluster("start", "etcd-1")
    assert reader.reads > 0 and reader.failures == []
    assert load.outcomes.failures() == 0, (load.outcomes.refused, load.outcomes.unknown)
    assert acked_after > 20
    assert catalog_primary(hac) == primary  # no catalog failover
    assert_nothing_lost(hac, load.outcomes, TABLE)


def test_a_hung_catalog_replica_costs_nothing(hac: RunningCluster) -> None:
    """A catalog replica is SIGSTOPped and listed first in the DSN: new catalog
    connections (shardctl's, a starting instance's) still reach the primary, because the
    members are tried at once.  asyncpg's own connect, which tries them in turn, times
    out on the same DSN."""
    found = members(hac)
    hung = next(f"catalog-{i}" for i in (1, 2, 3) if found[f"catalog-{i}"]["role"] == "replica")
    order = [hung] + [f"catalog-{i}" for i in (1, 2, 3) if f"catalog-{i}" != hung]
    hosts = ",".join(f"127.0.0.1:{found[name]['port']}" for name in order)
    dsn = f"postgresql://shardd@{hosts}/shardd?target_session_attrs=read-write"
    postmaster = int((Path(found[hung]["datadir"]) / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    try:

        async def in_turn() -> None:
            conn = await asyncpg.connect(dsn, timeout=3)
            await conn.close()

        with pytest.raises((TimeoutError, OSError)):
            asyncio.run(in_turn())
        assert "monitor:" in hac.shardctl("--catalog-dsn", dsn, "status").stdout
        with hac.instance(catalog_dsn=dsn) as other:  # an instance starting now
            api = Api(other.port, token=hac.api("write").token)
            wait_for(
                lambda: api.request("GET", "/readyz/writes").status == 200,
                timeout=20,
                what="the new instance ready for writes",
            )
            written = api.request("PUT", item_path(TABLE, "through-new"), body={})
            assert written.status in (200, 201), written.body
    finally:
        os.kill(postmaster, signal.SIGCONT)


def test_losing_the_catalog_primary_under_load(hac: RunningCluster) -> None:
    keys = steady_keys(hac)
    old = wait_for(lambda: catalog_primary(hac), timeout=30, what="a catalog primary")
    with (
        Reader(hac.api("read"), TABLE, keys) as reader,
        Load([hac.api("write")], TABLE, prefix="cat") as load,
    ):
        wait_for(lambda: len(load.outcomes.acked) > 30, timeout=30, what="load running")
        killed_at = time.monotonic()
        hac.devcluster("kill", old)
        new = wait_for(
            lambda: (p := catalog_primary(hac)) not in ("", old) and p,
            timeout=30,
            what="another catalog primary",
        )
        seen_new = time.monotonic()

        def last_failure() -> float:
            with load._lock:
                return max((t for t in load.outcomes.failure_times if t > killed_at), default=0)

        def steady() -> bool:  # writes acknowledged on each shard since any failure
            since = max(last_failure(), seen_new)
            return min(load.acks_on("s1", after=since), load.acks_on("s2", after=since)) >= 10

        wait_for(steady, timeout=40, what="writes resuming")
        last = last_failure() or killed_at
        took = min(t for t, _ in load.outcomes.ack_times if t > last) - killed_at
    print(f"catalog primary {old} -> {new}: writes resumed {took:.1f} s after the kill")
    assert took < 15, took
    assert reader.reads > 0 and reader.failures == [], reader.failures[:5]
    assert_nothing_lost(hac, load.outcomes, TABLE)
    hac.devcluster("start", old)
    wait_for(lambda: members(hac)[old]["role"] == "replica", timeout=60, what=f"{old} rejoining")

    # The monitor's lease lives on the new catalog primary: it fails a shard over.
    shard_primary = hac.primary_of("s2")
    hac.devcluster("kill", shard_primary)
    wait_for(
        lambda: hac.primary_of("s2") not in ("", shard_primary),
        timeout=30,
        what="the monitor failing s2 over",
    )
    assert hac.api("write").request("PUT", item_path(TABLE, "after"), body={}).status == 201
