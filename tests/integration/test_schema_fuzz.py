"""A bounded schemathesis run against the OpenAPI document: no input yields a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from shardd.api.openapi import document
from tests.harness.cluster import TOKENS, RunningCluster

schema = schemathesis.openapi.from_dict(document())


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_no_server_errors(case: schemathesis.Case, cluster: RunningCluster) -> None:
    # Fuzzed table names would otherwise be 404 everywhere: aim half the cases at a real one.
    if "table" in (case.path_parameters or {}) and case.method != "DELETE":
        case.path_parameters["table"] = "fuzzed"
    cluster.api("admin").request("PUT", "/v1/tables/fuzzed")
    response = case.call(
        base_url=f"http://127.0.0.1:{cluster.port}",
        headers={"Authorization": f"Bearer {TOKENS['admin']}"},
    )
    assert response.status_code < 500, (
        case.method,
        case.formatted_path,
        response.status_code,
        response.text[:300],
    )
