"""Shared test harness: one real devcluster per test session (see tests/harness)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.cluster import RunningCluster, start_cluster
from tests.harness.http import Api


@pytest.fixture(scope="session")
def cluster() -> Iterator[RunningCluster]:
    # Failover has a cluster of its own (test_failover); here a killed node stays down.
    running = start_cluster(failover=False, redis=True)
    try:
        yield running
    finally:
        running.down()


@pytest.fixture(scope="session")
def api(cluster: RunningCluster) -> Api:
    return cluster.api()


@pytest.fixture
def table(api: Api, request: pytest.FixtureRequest) -> str:
    """A fresh table for one test."""
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)[:60]
    api.request("DELETE", f"/v1/tables/{name}?force=true")
    response = api.request("PUT", f"/v1/tables/{name}", body={"description": "test"})
    assert response.status == 201, response.body
    return name
