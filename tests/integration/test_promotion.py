"""Promotion that never silently loses data, and synchronous mode that cannot wedge.

A cluster of its own: one shard, a primary and one replica, one shardd instance (the
monitor), asynchronous to start with.  The tests run in file order: first the
replica's WAL receiver is stopped and the primary killed (no automatic promotion; an
operator forces one and the loss is reported), then the cluster is made synchronous and
its only replica is killed under each ``synchronous_mode``; a switchover dies after its
fence; a failed move's change-log consumer is left behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.harness.cluster import RunningCluster, start_cluster, wait_for
from tests.harness.http import Api

TABLE = "pr"
CONSUMER_EXPIRY = 8.0


@pytest.fixture(scope="module")
def pr() -> Iterator[RunningCluster]:
    running = start_cluster(
        shards=1,
        replicas=1,
        write_buffer=1.0,
        settings={"changelog_retention": 1.0, "consumer_expiry": CONSUMER_EXPIRY},
    )
    try:
        assert running.api().request("PUT", f"/v1/tables/{TABLE}").status == 201
        yield running
    finally:
        running.down()


def put(api: Api, key: str, **doc: object) -> tuple[int, str, float]:
    """(status, error code or "", seconds) of one write."""
    started = time.monotonic()
    response = api.request("PUT", f"/v1/tables/{TABLE}/items/{key}", body=doc)
    code = response.body["error"]["code"] if response.status >= 400 else ""
    return response.status, code, time.monotonic() - started


def test_a_replica_that_stopped_streaming_is_not_promoted_until_forced(pr: RunningCluster) -> None:
    api = pr.api("write")
    primary, [replica] = pr.primary_of("s1"), pr.replicas_of("s1")
    for n in range(20):
        assert put(api, f"before-{n}", n=n)[0] == 201
    wait_for(
        lambda: pr.sql(replica, "SELECT count(*) AS n FROM shardd_items")[0]["n"] >= 20,
        timeout=10,
        what="the replica replaying the first writes",
    )
    # The replica stops streaming; what the primary acknowledges from now on it lacks.
    pr.sql(replica, "ALTER SYSTEM SET primary_conninfo = ''")
    pr.sql(replica, "SELECT pg_reload_conf()")
    wait_for(
        lambda: not pr.sql(replica, "SELECT 1 FROM pg_stat_wal_receiver"),
        timeout=10,
        what="the WAL receiver stopping",
    )
    for n in range(50):
        assert put(api, f"unreplicated-{n}", n=n)[0] == 201
    # A health round saw the primary alive past those writes (the monitor recorded its
    # position, which the loss is measured against) and the replica without them.
    end = pr.sql(primary, "SELECT pg_current_wal_lsn() AS at")[0]["at"]
    wait_for(
        lambda: pr.sql(
            "catalog", "SELECT primary_lsn >= $1 AS ok FROM shardd_shards WHERE name = 's1'", end
        )[0]["ok"],
        timeout=10,
        what="the monitor recording the primary's position",
    )
    pr.devcluster("kill", primary)

    # No automatic promotion: writes are refused at once with the reason; reads go on.
    wait_for(
        lambda: put(api, "refused")[1] == "no_failover_candidate",
        timeout=20,
        what="writes refused with no_failover_candidate",
    )
    status, code, seconds = put(api, "refused-again")
    assert (status, code) == (503, "no_failover_candidate") and seconds < 2.0
    assert pr.primary_of("s1") == primary
    read = pr.api("read").request("GET", f"/v1/tables/{TABLE}/items/before-3")
    assert read.status == 200 and read.body["item"] == {"n": 3}
    shard = json.loads(pr.shardctl("status", "--json").stdout)["shards"][0]
    assert shard["write_block"] == "no_failover_candidate"
    assert pr.metric("shardd_shard_writes_blocked", shard="s1") == 1.0
    assert pr.sql("catalog", "SELECT count(*) AS n FROM shardd_failovers")[0]["n"] == 0

    # The operator forces it: the replica is promoted, the loss reported.
    forced = pr.shardctl("failover", "--shard", "s1", "--force", "--yes", check=False)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "forced" in forced.stdout and "lost at least" in forced.stdout
    assert pr.primary_of("s1") == replica
    wait_for(lambda: put(api, "after-force")[0] == 201, timeout=10, what="writes resuming")
    [event] = pr.sql("catalog", "SELECT kind, lost_bytes, lost_exact FROM shardd_failovers")
    assert event["kind"] == "forced" and event["lost_exact"] is False
    # Measured against the primary's position the monitor recorded, not the replica's own.
    assert event["lost_bytes"] > 0

    # The old primary comes back: fenced on the node, and the loss becomes exact.
    pr.devcluster("start", primary)
    wait_for(
        lambda: pr.sql("catalog", "SELECT lost_exact FROM shardd_failovers")[0]["lost_exact"],
        timeout=20,
        what="the exact loss recorded",
    )
    [event] = pr.sql("catalog", "SELECT lost_bytes FROM shardd_failovers")
    assert event["lost_bytes"] > 0  # the 50 unreplicated writes
    assert pr.sql(primary, "SELECT fenced FROM shardd_node_state")[0]["fenced"] is True
    missing = pr.api("read").request(
        "GET", f"/v1/tables/{TABLE}/items/unreplicated-0?consistency=strong"
    )
    assert missing.status == 404  # lost, as reported: nothing claims otherwise
    pr.heal()
    assert pr.replicas_of("s1") == [primary]


def make_synchronous(cluster: RunningCluster, mode: str) -> None:
    cluster.sql("catalog", "UPDATE shardd_cluster SET synchronous = true")
    cluster.shardctl("sync-mode", mode)
    primary = cluster.primary_of("s1")
    cluster.sql(primary, "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'")
    cluster.sql(primary, "SELECT pg_reload_conf()")


def standby_names(cluster: RunningCluster) -> str:
    rows = cluster.sql(cluster.primary_of("s1"), "SHOW synchronous_standby_names")
    return str(rows[0][0])


def test_degrade_mode_runs_asynchronously_while_the_only_replica_is_down(
    pr: RunningCluster,
) -> None:
    make_synchronous(pr, "degrade")
    api = pr.api("write")
    [replica] = pr.replicas_of("s1")
    assert put(api, "sync-1")[0] in (200, 201)
    pr.devcluster("kill", replica)
    try:
        # Writes go on (asynchronously) once the monitor degrades the shard.
        wait_for(
            lambda: put(api, "degraded")[0] in (200, 201) and standby_names(pr) == "",
            timeout=20,
            what="writes accepted without a standby",
        )
        shard = json.loads(pr.shardctl("status", "--json").stdout)["shards"][0]
        assert shard["degraded"] is True and shard["write_block"] is None
        assert pr.metric("shardd_shard_degraded", shard="s1") == 1.0
    finally:
        pr.devcluster("start", replica)
    wait_for(
        lambda: standby_names(pr) == "ANY 1 (*)", timeout=30, what="synchronous commit restored"
    )
    assert not pr.sql("catalog", "SELECT degraded FROM shardd_shards")[0]["degraded"]
    assert put(api, "sync-again")[0] in (200, 201)


def test_strict_mode_refuses_writes_at_once_while_the_only_replica_is_down(
    pr: RunningCluster,
) -> None:
    make_synchronous(pr, "strict")
    api = pr.api("write")
    [replica] = pr.replicas_of("s1")
    pr.devcluster("kill", replica)
    try:
        wait_for(
            lambda: put(api, "strict")[1] == "no_sync_standby",
            timeout=30,
            what="writes refused with no_sync_standby",
        )
        status, code, seconds = put(api, "strict-again")
        assert (status, code) == (503, "no_sync_standby") and seconds < 2.0
        assert standby_names(pr) == "ANY 1 (*)"  # never silently asynchronous
    finally:
        pr.devcluster("start", replica)
    wait_for(lambda: put(api, "strict-ok")[0] in (200, 201), timeout=30, what="writes resuming")
    assert pr.sql("catalog", "SELECT write_block FROM shardd_shards")[0]["write_block"] is None


def test_a_switchover_that_died_after_its_fence_is_finished_by_the_monitor(
    pr: RunningCluster,
) -> None:
    api = pr.api("write")
    primary, [replica] = pr.primary_of("s1"), pr.replicas_of("s1")
    for n in range(20):
        assert put(api, f"pre-fence-{n}", n=n)[0] in (200, 201)
    # What a `shardctl failover` leaves when it dies right after its first step: the
    # primary fenced on its node, the catalog still naming it.  Writes are refused...
    pr.sql(
        primary,
        "UPDATE shardd_node_state SET fenced = true, reason = 'switchover', changed_at = now(),"
        " expires_at = now() + interval '3 seconds', token = gen_random_uuid()",
    )
    # ...and while the switchover could still be alive (its deadline is ahead), the
    # monitor leaves it alone...
    time.sleep(1.5)
    assert pr.primary_of("s1") == primary
    # ...then finishes it: the caught-up replica is promoted.
    wait_for(
        lambda: pr.primary_of("s1") == replica,
        timeout=30,
        what="the monitor finishing the switchover",
    )
    [event] = pr.sql(
        "catalog",
        "SELECT kind, old_primary, lost_bytes FROM shardd_failovers ORDER BY id DESC LIMIT 1",
    )
    assert (event["kind"], event["old_primary"], event["lost_bytes"]) == ("planned", primary, 0)
    pr.heal()
    assert pr.replicas_of("s1") == [primary]
    wait_for(lambda: put(api, "after-finish")[0] in (200, 201), timeout=30, what="writes resuming")
    reads = pr.api("read")
    for n in range(20):
        path = f"/v1/tables/{TABLE}/items/pre-fence-{n}?consistency=strong"
        response = reads.request("GET", path)
        assert response.status == 200 and response.body["item"] == {"n": n}


def test_a_failed_moves_consumer_expires_and_the_change_log_is_trimmed(pr: RunningCluster) -> None:
    api = pr.api("write")
    primary = pr.primary_of("s1")
    # The previous test's outage is over for this instance too before the clock starts.
    wait_for(lambda: put(api, "logged-first")[0] in (200, 201), timeout=30, what="writes")
    # A move that failed and that nobody resumes: its consumer stays at this position.
    pr.sql(
        primary,
        "INSERT INTO shardd_consumers (name, position) VALUES ('move-999', pg_current_snapshot())",
    )
    registered = time.monotonic()
    for n in range(20):
        written = put(api, f"logged-{n}", n=n)
        assert written[0] in (200, 201), written
    count = "SELECT count(*) AS n FROM shardd_changes WHERE pk LIKE 'logged-%'"
    # Past the retention (1s) the consumer still holds its entries back...
    time.sleep(3.0)
    assert time.monotonic() - registered < CONSUMER_EXPIRY
    assert pr.sql(primary, count)[0]["n"] == 20
    # ...until it has been idle for consumer_expiry: dropped, and the log trimmed.
    wait_for(
        lambda: not pr.sql(primary, "SELECT 1 FROM shardd_consumers WHERE name = 'move-999'"),
        timeout=30,
        what="the idle consumer dropped",
    )
    wait_for(lambda: pr.sql(primary, count)[0]["n"] == 0, timeout=30, what="the log trimmed")


def test_a_commit_its_synchronous_standby_never_confirms_is_ambiguous(pr: RunningCluster) -> None:
    make_synchronous(pr, "degrade")
    api = pr.api("write")
    [replica] = pr.replicas_of("s1")
    wait_for(lambda: put(api, "before-hang")[0] in (200, 201), timeout=30, what="a sync write")
    # The standby hangs (its walsender still reports it streaming): the commit waits for
    # it until statement_timeout, and the server then reports success with a WARNING
    # although only the primary has the write.  shardd must not acknowledge that.
    batch = {"puts": [{"pk": key, "item": {}} for key in pr.keys_on("s1", "hung-batch", 2)]}
    with pr.paused(replica):
        status, code, _ = put(api, "during-hang")
        batched = api.request("POST", f"/v1/tables/{TABLE}/batch/write", body=batch)
    assert (status, code) == (504, "outcome_unknown")
    # A batch commits inside its one statement as well: its keys are ambiguous, not ok.
    assert batched.status == 200 and not batched.body["ok"], batched.body
    assert {r["error"]["code"] for r in batched.body["results"]} == {"outcome_unknown"}
    wait_for(lambda: put(api, "after-hang")[0] in (200, 201), timeout=30, what="writes resuming")
