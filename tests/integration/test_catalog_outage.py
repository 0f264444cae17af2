"""The catalog goes away under load: reads carry on, writes stop cleanly, all resumes.

The catalog is killed (SIGKILL) or frozen (SIGSTOP: its port still accepts connections,
nothing answers) while readers and writers run.  Reads keep being served from the cached
topology; once the topology lease is used up, writes answer 503 ``catalog_unavailable``
with ``Retry-After`` long before their deadline; ``/readyz`` stays 200 and says writes
are off, ``/readyz/writes`` answers 503; the failover monitor promotes nothing.  When the
catalog is back, writes resume by themselves, and no acknowledged write is lost.  In
pair with a primary that dies while the catalog hangs: nothing is promoted until the
catalog answers, then the dead primary is replaced once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import pytest

from tests.harness.cluster import RunningCluster, start_cluster, wait_for
from tests.harness.http import Api
from tests.harness.load import rows_by_shard

TABLE = "outage"
LEASE = 2.0
REQUEST_TIMEOUT = 4.0
SEEDED = [f"seed-{n}" for n in range(40)]


@pytest.fixture(scope="module")
def outage() -> Iterator[RunningCluster]:
    running = start_cluster(
        shards=2,
        replicas=1,
        failover=True,
        settings={
            "topology_lease": LEASE,
            "statement_timeout": 0.5,
            "catalog_timeout": 0.5,
            "topology_poll_interval": 0.5,
            "request_timeout": REQUEST_TIMEOUT,
        },
    )
    try:
        api = running.api()
        assert api.request("PUT", f"/v1/tables/{TABLE}").status == 201
        for key in SEEDED:
            response = api.request("PUT", f"/v1/tables/{TABLE}/items/{key}", body={"k": key})
            assert response.status == 201, response.body
        yield running
    finally:
        running.down()


@dataclass(frozen=True)
class Outcome:
    kind: str  # "read" or "write"
    key: str
    started: float
    seconds: float
    status: int
    code: str | None
    retry_after: str | None


class Traffic:
    """Readers GET seeded items, writers PUT unique keys, until stopped; every outcome kept."""

    def __init__(self, cluster: RunningCluster, *, prefix: str) -> None:
        self._cluster = cluster
        self._prefix = prefix
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._run, args=(kind, n), daemon=True)
            for kind, n in (("read", 0), ("read", 1), ("read", 2), ("write", 0), ("write", 1))
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, kind: str, number: int) -> None:
        api = self._cluster.api("write")
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            if kind == "read":
                key = SEEDED[(number * 7 + sequence) % len(SEEDED)]
                method, body = "GET", None
            else:
                key = f"{self._prefix}-{number}-{sequence}"
                method, body = "PUT", {"n": sequence}
            started = time.monotonic()
            response = api.request(method, f"/v1/tables/{TABLE}/items/{key}", body=body)
            error = response.body.get("error") if response.status >= 400 else None
            outcome = Outcome(
                kind,
                key,
                started,
                time.monotonic() - started,
                response.status,
                error["code"] if error else None,
                response.header("Retry-After"),
            )
            with self._lock:
                self.outcomes.append(outcome)
            time.sleep(0.01)

    def since(self, moment: float, kind: str) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.kind == kind and o.started >= moment]

    def between(self, start: float, end: float, kind: str) -> list[Outcome]:
        return [o for o in self.since(start, kind) if o.started < end]


def readiness(api: Api) -> tuple[int, dict[str, object], int]:
    """(/readyz status, its body, /readyz/writes status)."""
    ready = api.request("GET", "/readyz")
    writes = api.request("GET", "/readyz/writes")
    return ready.status, ready.body, writes.status


@contextmanager
def catalog_killed(cluster: RunningCluster) -> Iterator[None]:
    cluster.devcluster("kill", "catalog")
    try:
        yield
    finally:
        cluster.devcluster("start", "catalog")


def catalog_frozen(cluster: RunningCluster) -> AbstractContextManager[None]:
    return cluster.paused("catalog")


def failovers(cluster: RunningCluster) -> int:
    return int(cluster.sql("catalog", "SELECT count(*) AS n FROM shardd_failovers")[0]["n"])


@pytest.mark.parametrize("fault", [catalog_killed, catalog_frozen], ids=["sigkill", "sigstop"])
def test_catalog_outage_stops_only_writes_and_everything_resumes(
    outage: RunningCluster, fault: Callable[[RunningCluster], AbstractContextManager[None]]
) -> None:
    api = outage.api("read")
    primaries = {shard: outage.primary_of(shard) for shard in ("s1", "s2")}
    failovers_before = failovers(outage)
    wait_for(lambda: readiness(api)[2] == 200, timeout=30, what="writes ready before the fault")

    with Traffic(outage, prefix=fault.__name__) as traffic:
        wait_for(lambda: traffic.since(0, "write"), timeout=30, what="the first writes")
        with fault(outage):
            faulted_at = time.monotonic()
            # Writes stop once the lease is used up; the instance stays ready for reads.
            wait_for(
                lambda: readiness(api)[1]["writes"] is False,
                timeout=LEASE + 10,
                what="/readyz to report writes off",
            )
            status, body, writes_status = readiness(api)
            assert (status, writes_status) == (200, 503), body
            assert body["reads"] is True and body["reason"] == "catalog_unavailable", body
            refused_from = time.monotonic()
            wait_for(
                lambda: len(traffic.since(refused_from, "write")) >= 20,
                timeout=30,
                what="writes during the outage",
            )
            resumed_at = time.monotonic()
        wait_for(lambda: readiness(api)[2] == 200, timeout=30, what="writes ready again")
        back_at = time.monotonic()
        wait_for(
            lambda: [o for o in traffic.since(back_at, "write") if o.status in (200, 201)],
            timeout=30,
            what="a write acknowledged after the catalog came back",
        )

    during = traffic.between(refused_from, resumed_at, "write")
    assert during and all(o.status == 503 for o in during), {o.status for o in during}
    assert all(o.code == "catalog_unavailable" and o.retry_after for o in during)
    # Refused at once, not after the request deadline, whether the catalog died or hangs.
    assert max(o.seconds for o in during) < REQUEST_TIMEOUT

    reads = traffic.since(faulted_at, "read")
    served = [o for o in reads if o.status == 200]
    assert len(reads) >= 100 and len(served) >= 0.99 * len(reads), {o.code for o in reads}
    every = traffic.since(0, "read") + traffic.since(0, "write")
    assert max(o.seconds for o in every) < REQUEST_TIMEOUT + 2.0, "a request hung"

    # Nothing acknowledged is missing and nothing refused was written.
    rows: dict[str, object] = {}
    for shard_rows in rows_by_shard(outage, TABLE).values():
        rows.update(shard_rows)
    writes = traffic.since(0, "write")
    assert all(o.key in rows for o in writes if o.status in (200, 201))
    assert not [o.key for o in writes if o.status == 503 and o.key in rows]

    # The failover monitor did nothing while the catalog was away.
    assert failovers(outage) == failovers_before
    assert {shard: outage.primary_of(shard) for shard in primaries} == primaries


def test_a_primary_dying_while_the_catalog_hangs_fails_over_once_it_answers(
    outage: RunningCluster,
) -> None:
    api = outage.api("read")
    primary, [replica] = outage.primary_of("s1"), outage.replicas_of("s1")
    failovers_before = failovers(outage)
    wait_for(lambda: readiness(api)[2] == 200, timeout=30, what="writes ready before the fault")
    with Traffic(outage, prefix="pair") as traffic:
        wait_for(lambda: traffic.since(0, "write"), timeout=30, what="the first writes")
        with catalog_frozen(outage):
            wait_for(
                lambda: readiness(api)[1]["writes"] is False,
                timeout=LEASE + 10,
                what="/readyz to report writes off",
            )
            # Writes have stopped: the (asynchronous) replica gets every acknowledged one
            # before its primary dies.
            end = outage.sql(primary, "SELECT pg_current_wal_lsn() AS at")[0]["at"]
            replayed = "SELECT pg_last_wal_replay_lsn() >= $1 AS ok"
            wait_for(
                lambda: outage.sql(replica, replayed, end)[0]["ok"],
                timeout=10,
                what="the replica replaying every acknowledged write",
            )
            outage.devcluster("kill", primary)
            time.sleep(3.0)  # many health rounds: the monitor cannot fence without a catalog
            assert outage.sql(replica, "SELECT pg_is_in_recovery() AS r")[0]["r"] is True
        # The catalog answers again: the dead primary is replaced, writes resume.
        wait_for(lambda: outage.primary_of("s1") == replica, timeout=30, what="the failover")
        back_at = time.monotonic()
        wait_for(
            lambda: [o for o in traffic.since(back_at, "write") if o.status in (200, 201)],
            timeout=30,
            what="writes acknowledged after the failover",
        )
    assert failovers(outage) == failovers_before + 1
    assert outage.sql(replica, "SELECT pg_is_in_recovery() AS r")[0]["r"] is False
    rows: dict[str, object] = {}
    for shard_rows in rows_by_shard(outage, TABLE).values():
        rows.update(shard_rows)
    writes = traffic.since(0, "write")
    missing = [o.key for o in writes if o.status in (200, 201) and o.key not in rows]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    every = traffic.since(0, "read") + traffic.since(0, "write")
    assert max(o.seconds for o in every) < REQUEST_TIMEOUT + 2.0, "a request hung"
    outage.heal()
    assert outage.replicas_of("s1") == [primary]
