"""Bearer tokens and scopes: read < write < admin; errors in the one shape."""

from __future__ import annotations

import pytest

from tests.harness.cluster import RunningCluster
from tests.harness.http import item_path
from tests.integration.test_bad_input import assert_error


def test_no_token_is_401(cluster: RunningCluster, table: str) -> None:
    anonymous = cluster.api(None)
    response = anonymous.request("GET", item_path(table, "x"))
    assert_error(response, 401, "unauthorized")
    assert (
        response.header(
            "WWW-Authenticate",
        )
        is not None
    )
    assert_error(
        anonymous.request("GET", "/v1/tables", headers={"Authorization": "Bearer wrong"}), 401
    )
    assert_error(
        anonymous.request("GET", "/v1/tables", headers={"Authorization": "Basic abc"}), 401
    )


def test_open_endpoints_need_no_token(cluster: RunningCluster) -> None:
    anonymous = cluster.api(None)
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        assert anonymous.request("GET", path).status == 200, path


@pytest.mark.parametrize(
    ("scope", "method", "expected"),
    [
        ("read", "GET", 404),
        ("read", "PUT", 403),
        ("write", "PUT", 201),
        ("write", "GET", 404),
    ],
)
def test_scopes_for_items(
    cluster: RunningCluster, table: str, scope: str, method: str, expected: int
) -> None:
    client = cluster.api(scope)
    path = item_path(table, f"auth-{scope}-{method}")
    response = client.request(method, path, body={"a": 1} if method == "PUT" else None)
    assert response.status == expected, response.body


def test_tables_need_admin(cluster: RunningCluster) -> None:
    assert_error(cluster.api("write").request("PUT", "/v1/tables/t_auth_admin"), 403, "forbidden")
    assert cluster.api("admin").request("PUT", "/v1/tables/t_auth_admin").status in (200, 201)
    assert cluster.api("read").request("GET", "/v1/tables/t_auth_admin").status == 200
    assert_error(cluster.api("write").request("DELETE", "/v1/tables/t_auth_admin"), 403)
