"""Several shardd instances behind a real HAProxy (``devcluster up --instances 3``): an
instance SIGKILLed under load fails only the requests it had in flight, and a rolling
restart with SIGTERM (each instance drains: not ready, still serving, then gone) fails
none."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.cluster import RunningCluster, start_cluster, wait_for
from tests.harness.http import item_path
from tests.harness.load import Pace

INSTANCES = 3
WORKERS = 6


@pytest.fixture(scope="module")
def lb() -> Iterator[RunningCluster]:
    running = start_cluster(failover=False, instances=INSTANCES)
    try:
        yield running
    finally:
        running.down()


class Load:
    """Writers and readers through the balancer, counting every answer."""

    def __init__(self, cluster: RunningCluster, table: str) -> None:
        self.cluster = cluster
        self.table = table
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[Any] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(WORKERS)]

    def _run(self, n: int) -> None:
        api = self.cluster.api()
        i = 0
        pace = Pace(50.0, self.stop)
        while not self.stop.is_set():
            pace.wait()
            i += 1
            path = item_path(self.table, f"w{n}-{i % 50}")
            try:
                if i % 2:
                    response = api.request("PUT", path, body={"i": i})
                    good = response.status in (200, 201)
                else:
                    response = api.request("GET", path)
                    good = response.status in (200, 404)
                # (The balancer's own error pages are not JSON.)
                outcome: Any = None if good else (response.status, response.raw[:200])
            except OSError as exc:  # the connection to the balancer itself
                outcome = repr(exc)
                api = self.cluster.api()
            with self.lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failed.append(outcome)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def instances(cluster: RunningCluster) -> list[dict[str, Any]]:
    status = json.loads(cluster.devcluster("status", "--json").stdout)
    return [row for row in status["nodes"] if row["role"] == "shardd"]


def instance_pids(cluster: RunningCluster) -> dict[str, int]:
    return {row["name"]: row["pid"] for row in instances(cluster) if row["pid"] is not None}


def in_balancer(cluster: RunningCluster, name: str) -> str:
    """HAProxy's state of instance ``name`` ("UP", "DOWN", "UP 1/2", ...)."""
    return next(row.get("balancer", "") for row in instances(cluster) if row["name"] == name)


def declare(cluster: RunningCluster, table: str) -> None:
    api = cluster.api()
    assert api.request("PUT", f"/v1/tables/{table}", body={}).status in (200, 201)


def test_an_instance_killed_under_load_fails_only_its_requests_in_flight(
    lb: RunningCluster,
) -> None:
    declare(lb, "balanced")
    with Load(lb, "balanced") as load:
        wait_for(lambda: load.ok > 200, timeout=30, what="load running")
        before = load.ok
        lb.devcluster("kill", "shardd-2")
        # The balancer's checks take it out; requests go on.
        wait_for(lambda: in_balancer(lb, "shardd-2") == "DOWN", timeout=30, what="shardd-2 out")
        out = load.ok
        wait_for(lambda: load.ok > out + 100, timeout=30, what="requests going on")
    # At most the requests it had in flight (one per worker) failed; the rest went on.
    assert len(load.failed) <= WORKERS, load.failed[:5]
    assert out > before  # and requests were answered while the balancer's checks took it out
    lb.devcluster("start", "shardd-2")
    wait_for(lambda: in_balancer(lb, "shardd-2") == "UP", timeout=30, what="shardd-2 back")


def test_a_rolling_restart_with_sigterm_fails_no_request(lb: RunningCluster) -> None:
    declare(lb, "rolled")
    with Load(lb, "rolled") as load:
        wait_for(lambda: load.ok > 200, timeout=30, what="load running")
        for n in range(1, INSTANCES + 1):
            name = f"shardd-{n}"
            pid = instance_pids(lb)[name]
            os.kill(pid, signal.SIGTERM)  # drains: not ready, still serving, then exits
            wait_for(
                lambda gone=name: gone not in instance_pids(lb), timeout=30, what=f"{name} gone"
            )
            # It drained for longer than the checks take to put it out.
            assert in_balancer(lb, name) == "DOWN"
            lb.devcluster("start", name)
            # Back in the balancer (two passing checks) before the next one goes.
            wait_for(
                lambda back=name: in_balancer(lb, back) == "UP", timeout=30, what=f"{name} back"
            )
        ok = load.ok
    assert load.failed == [], load.failed[:5]
    assert ok > 500
