"""The catalog and the shards on Patroni and etcd (``devcluster up --ha --sync``), on a
cluster of its own: three catalog members (synchronous) on a three-member etcd, and two
shards, each a Patroni cluster of two synchronous members that shardd follows
(``failover_mode = 'patroni'``).

Faults are real: a member is lost as a machine is (Patroni and its Postgres SIGKILLed
together), an etcd member is SIGKILLed.  Under read/write load: reads never fail,
writes resume within 15 s of losing the catalog primary, nothing acknowledged is lost;
a Patroni shard's primary lost, or switched over by Patroni, is followed without an
operator; the catalog and a shard primary lost together (the monitor's lease moves
while a shard needs following) lose nothing either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from tools.ha import Ha

TABLE = "ha_catalog"


@pytest.fixture(scope="module")
def hac() -> Iterator[RunningCluster]:
    running = start_cluster(shards=2, replicas=1, ha=True, sync=True, write_buffer=5.0)
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


def patroni_leader(cluster: RunningCluster, shard: str) -> str:
    """The shard's member whose Patroni says it leads ('' unless exactly one does)."""
    ha = Ha(cluster.dir, json.loads((cluster.dir / "cluster.json").read_text())["ha"])
    leaders = [m["name"] for m in ha.shard_members(shard) if ha.role(m) == "primary"]
    return leaders[0] if len(leaders) == 1 else ""


def assert_one_primary_each(cluster: RunningCluster) -> None:
    """The invariant itself: every shard has exactly one unfenced primary on record,
    and it is the node Patroni says leads."""
    rows = cluster.sql(
        "catalog",
        "SELECT s.name, array_agg(n.name) FILTER (WHERE n.role = 'primary' AND NOT n.fenced)"
        " AS primaries FROM shardd_shards s JOIN shardd_nodes n ON n.shard = s.name"
        " GROUP BY s.name",
    )
    for row in rows:
        assert row["primaries"] == [patroni_leader(cluster, row["name"])], dict(row)


def wait_synchronous(cluster: RunningCluster, shard: str) -> None:
    """Until the shard is not degraded: Patroni counts a replica as synchronous (which
    in synchronous mode it alone may promote; a replica that only just rejoined is not
    one yet)."""
    wait_for(
        lambda: (
            not cluster.sql("catalog", "SELECT degraded FROM shardd_shards WHERE name = $1", shard)[
                0
            ]["degraded"]
        ),
        timeout=60,
        what=f"{shard} with a synchronous standby",
    )


@contextlib.contextmanager
def under_load(
    cluster: RunningCluster, keys: list[str], prefix: str
) -> Iterator[tuple[Reader, Load]]:
    """A reader of ``keys`` and 8 writers of new keys, running once this yields."""
    with (
        Reader(cluster.api("read"), TABLE, keys) as reader,
        Load([cluster.api("write")], TABLE, prefix=prefix) as load,
    ):
        wait_for(lambda: len(load.outcomes.acked) > 30, timeout=30, what="load running")
        yield reader, load


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
    with under_load(hac, keys, "etcd") as (reader, load):
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
    with under_load(hac, keys, "cat") as (reader, load):
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


def test_shards_run_under_patroni(hac: RunningCluster) -> None:
    status = json.loads(hac.shardctl("status", "--json").stdout)
    assert [s["failover_mode"] for s in status["shards"]] == ["patroni", "patroni"]
    assert_one_primary_each(hac)
    # What Patroni decides, shardd does not do.
    forced = hac.shardctl("failover", "--shard", "s1", "--force", "--yes", check=False)
    assert forced.returncode != 0 and "patronictl failover" in forced.stderr
    rejoin = hac.devcluster("rejoin", hac.replicas_of("s1")[0], check=False)
    assert rejoin.returncode != 0 and "Patroni rejoins" in rejoin.stderr


def test_a_patroni_switchover_under_load_fails_no_write(hac: RunningCluster) -> None:
    """``shardctl failover`` on a Patroni shard: the primary is fenced on its node (writes
    in flight finish, later ones wait), Patroni switches over, shardd follows."""
    keys = steady_keys(hac)
    wait_synchronous(hac, "s1")
    old = hac.primary_of("s1")
    with under_load(hac, keys, "psw") as (reader, load):
        said = hac.shardctl("failover", "--shard", "s1", "--yes").stdout
        switched = time.monotonic()
        wait_for(lambda: load.acks_on("s1", after=switched) >= 10, timeout=30, what="s1 writes")
    new = hac.primary_of("s1")
    assert new not in ("", old) and f"{new} is the primary" in said, said
    assert load.outcomes.failures() == 0, (load.outcomes.refused, load.outcomes.unknown)
    assert reader.reads > 0 and reader.failures == [], reader.failures[:5]
    assert_nothing_lost(hac, load.outcomes, TABLE)
    # Patroni restarts the old primary as a replica; the monitor records it as one.
    wait_for(lambda: old in hac.replicas_of("s1"), timeout=60, what=f"{old} recorded as replica")
    assert_one_primary_each(hac)


def test_losing_a_patroni_shard_primary_under_sync_writes(hac: RunningCluster) -> None:
    keys = steady_keys(hac)
    wait_synchronous(hac, "s1")  # the old primary, back as a replica, is synchronous
    old = hac.primary_of("s1")
    with under_load(hac, keys, "pkill") as (reader, load):
        hac.devcluster("kill", old)
        killed_at = time.monotonic()
        new = wait_for(
            lambda: (p := hac.primary_of("s1")) not in ("", old) and p,
            timeout=40,
            what="shardd following Patroni's new leader",
        )
        followed = time.monotonic()
        wait_for(lambda: load.acks_on("s1", after=followed) >= 10, timeout=30, what="s1 writes")
    print(f"s1: {old} lost, {new} followed {followed - killed_at:.1f} s after the kill")
    assert new == patroni_leader(hac, "s1")
    assert reader.reads > 0 and reader.failures == [], reader.failures[:5]
    assert_nothing_lost(hac, load.outcomes, TABLE)
    kind = hac.sql(
        "catalog", "SELECT kind FROM shardd_failovers WHERE shard = 's1' ORDER BY id DESC LIMIT 1"
    )
    assert kind[0]["kind"] == "patroni"
    hac.devcluster("start", old)
    wait_for(lambda: old in hac.replicas_of("s1"), timeout=90, what=f"{old} back as a replica")
    assert_one_primary_each(hac)


def test_losing_the_catalog_and_a_shard_primary_together(hac: RunningCluster) -> None:
    """Both Patroni clusters elect at once; the monitor's lease moves to the new catalog
    primary, and whoever holds it then follows the shard's new leader."""
    keys = steady_keys(hac)
    catalog_old = wait_for(lambda: catalog_primary(hac), timeout=30, what="a catalog primary")
    wait_synchronous(hac, "s2")
    shard_old = hac.primary_of("s2")
    with under_load(hac, keys, "pair") as (reader, load):
        hac.devcluster("kill", catalog_old)
        hac.devcluster("kill", shard_old)
        killed_at = time.monotonic()

        def s2_primary() -> str:  # '' while the catalog itself has no primary
            try:
                return hac.primary_of("s2")
            except (OSError, asyncpg.PostgresError):
                return ""

        wait_for(
            lambda: (p := s2_primary()) not in ("", shard_old) and p,
            timeout=60,
            what="s2 followed to Patroni's new leader",
        )
        wait_for(
            lambda: min(load.acks_on(s, after=time.monotonic() - 2) for s in ("s1", "s2")) >= 5,
            timeout=40,
            what="writes on both shards",
        )
    print(f"catalog and s2 primaries lost: writes back {time.monotonic() - killed_at:.1f} s later")
    assert catalog_primary(hac) not in ("", catalog_old)
    assert reader.reads > 0 and reader.failures == [], reader.failures[:5]
    assert_nothing_lost(hac, load.outcomes, TABLE)
    hac.devcluster("start", catalog_old)
    hac.devcluster("start", shard_old)
    wait_for(lambda: shard_old in hac.replicas_of("s2"), timeout=90, what=f"{shard_old} back")
    assert_one_primary_each(hac)
