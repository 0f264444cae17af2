"""Bad input gets a clear 4xx in the one error shape, never a 500, and writes nothing."""

from __future__ import annotations

import pytest

from tests.harness.cluster import RunningCluster
from tests.harness.http import Api, Response, item_path


def assert_error(response: Response, status: int, code: str | None = None) -> None:
    assert response.status == status, (response.status, response.raw[:300])
    body = response.body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["request_id"] == response.header("X-Request-Id")
    if code is not None:
        assert body["error"]["code"] == code


def count_items(cluster: RunningCluster, table: str) -> int:
    return sum(
        cluster.sql(
            f"{shard}-primary", "SELECT count(*) AS n FROM shardd_items WHERE tbl = $1", table
        )[0]["n"]
        for shard in ("s1", "s2", "s3")
    )


BAD_BODIES = {
    "nul_in_string": b'{"a": "x\\u0000y"}',
    "nul_in_key": b'{"a\\u0000": 1}',
    "invalid_utf8": b'{"a": "\xff\xfe"}',
    "lone_surrogate": b'{"a": "\\ud800"}',
    "not_json": b"{nope",
    "array": b"[1, 2]",
    "string": b'"text"',
    "number": b"42",
    "null": b"null",
    "empty": b"",
    "deep": b'{"a":' * 40 + b"1" + b"}" * 40,
    "deep_arrays": b'{"a":' + b"[" * 40 + b"]" * 40 + b"}",
    "trailing": b'{"a": 1} x',
    "infinite": b'{"a": 1e999}',
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_bodies_are_400_and_write_nothing(
    cluster: RunningCluster, api: Api, table: str, name: str
) -> None:
    for method in ("PUT", "PATCH"):
        response = api.request(method, item_path(table, "victim"), raw=BAD_BODIES[name])
        assert_error(response, 400)
    assert count_items(cluster, table) == 0


def test_huge_body_is_413(cluster: RunningCluster, api: Api, table: str) -> None:
    body = b'{"a": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    assert_error(api.request("PUT", item_path(table, "big"), raw=body), 413, "body_too_large")
    assert count_items(cluster, table) == 0


@pytest.mark.parametrize(
    "raw_key",
    [
        "%zz",  # malformed escape
        "abc%2",  # truncated escape
        "%FF%FE",  # invalid UTF-8
        "a%00b",  # NUL
        "a/b/c",  # too many segments
        "k" * 1025,  # oversized key
        "%C3%A9" * 513,  # oversized in bytes though not in characters
    ],
)
def test_bad_keys_are_400(cluster: RunningCluster, api: Api, table: str, raw_key: str) -> None:
    path = f"/v1/tables/{table}/items/{raw_key}"
    assert_error(api.request("PUT", path, body={"a": 1}), 400, "invalid_key")
    assert_error(api.request("GET", path), 400, "invalid_key")
    assert count_items(cluster, table) == 0


def test_empty_pk_is_400(api: Api, table: str) -> None:
    assert_error(api.request("PUT", f"/v1/tables/{table}/items//x", body={}), 400, "invalid_key")


def test_oversized_sort_key_is_400(api: Api, table: str) -> None:
    assert_error(api.request("PUT", item_path(table, "a", "s" * 1025), body={}), 400)


@pytest.mark.parametrize("name", ["Upper", "1abc", "a-b", "x" * 64, "%C3%BC", "ok%0A"])
def test_bad_table_names(api: Api, name: str) -> None:
    assert_error(api.request("PUT", f"/v1/tables/{name}", body={}), 400, "invalid_table_name")


def test_unknown_table(api: Api) -> None:
    assert_error(
        api.request("PUT", item_path("nope_nothing", "k"), body={}), 404, "table_not_found"
    )


def test_bad_table_spec(api: Api) -> None:
    assert_error(api.request("PUT", "/v1/tables/t_spec", body={"colour": "red"}), 400)
    assert_error(api.request("PUT", "/v1/tables/t_spec", body={"description": 7}), 400)
    assert api.request("GET", "/v1/tables/t_spec").status == 404


def test_bad_consistency_and_session(api: Api, table: str) -> None:
    path = item_path(table, "k")
    assert_error(api.request("GET", path + "?consistency=maybe"), 400, "invalid_consistency")
    assert_error(api.request("GET", path, headers={"Shardd-Consistency": "STRONG"}), 400)
    # The query parameter wins, but a malformed header beside it is still refused.
    both = api.request("GET", path + "?consistency=strong", headers={"Shardd-Consistency": "x"})
    assert_error(both, 400, "invalid_consistency")
    assert_error(
        api.request("GET", path, headers={"Shardd-Session": "garbage"}),
        400,
        "invalid_session_token",
    )


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
def test_bad_preconditions(api: Api, table: str, header: str) -> None:
    response = api.request("PUT", item_path(table, "k"), body={}, headers={header: '"abc"'})
    assert_error(response, 400, "invalid_precondition")


def test_a_bad_idempotency_key_is_400_before_conditions_that_cannot_hold(
    api: Api, table: str
) -> None:
    headers = {"If-Match": '"3"', "If-None-Match": "*", "Idempotency-Key": "bad key"}
    response = api.request("PUT", item_path(table, "k"), body={}, headers=headers)
    assert_error(response, 400, "invalid_idempotency_key")
    del headers["Idempotency-Key"]
    assert api.request("PUT", item_path(table, "k"), body={}, headers=headers).status == 412


def test_a_name_with_a_trailing_newline_is_refused(api: Api) -> None:
    # Python's "$" matches before a final newline; the names' patterns do not.
    assert_error(api.request("PUT", "/v1/consumers/c%0A", body={}), 400)
    # Nothing was registered (one registered before the check was whole-value could
    # still be read and deleted).
    assert_error(api.request("GET", "/v1/consumers/c%0A"), 404)


@pytest.mark.parametrize("name", ["after_pk", "after_sk"])
def test_a_scan_position_with_nul_is_400(api: Api, table: str, name: str) -> None:
    assert_error(api.request("GET", f"/v1/tables/{table}/scan?{name}=a%00"), 400)


def test_a_scan_cursor_is_refused_not_ignored(api: Api, table: str) -> None:
    # Ignoring it would hand an old client the first page again, forever.
    assert_error(api.request("GET", f"/v1/tables/{table}/scan?cursor=abc"), 400)


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1001", "99999999999", "", "%C2%B2"])
def test_bad_limits(api: Api, table: str, limit: str) -> None:
    assert_error(api.request("GET", f"/v1/tables/{table}/scan?limit={limit}"), 400)
    assert_error(api.request("GET", f"/v1/tables/{table}/partitions/p?limit={limit}"), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"keys": []},
        {"keys": "x"},
        {"keys": [{"pk": 1}]},
        {"keys": [{"pk": "a", "extra": 1}]},
        {"keys": [{"pk": "a"}] * 101},
        {"keys": [{"pk": "a", "sk": "\u0000"}]},
        {"keys": [{"pk": ""}]},
        {"other": []},
    ],
)
def test_bad_batch_get(api: Api, table: str, body: object) -> None:
    assert_error(api.request("POST", f"/v1/tables/{table}/batch/get", body=body), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"puts": [{"pk": "a"}]},
        {"puts": [{"pk": "a", "item": [1]}]},
        {"puts": [{"pk": "a", "item": {}}] * 101},
        {"updates": []},
        {"puts": [{"pk": "a", "item": {"x": "\u0000"}}]},
        {"puts": [{"pk": "ok", "item": {}}, {"pk": "k" * 2000, "item": {}}]},
        {"deletes": [{"pk": "a", "sk": 5}]},
    ],
)
def test_bad_batch_write_writes_nothing(
    cluster: RunningCluster, api: Api, table: str, body: object
) -> None:
    assert_error(api.request("POST", f"/v1/tables/{table}/batch/write", body=body), 400)
    assert count_items(cluster, table) == 0


def test_unknown_route_and_method(api: Api) -> None:
    assert_error(api.request("GET", "/v2/nothing"), 404, "route_not_found")
    not_allowed = api.request("POST", "/v1/tables")
    assert_error(not_allowed, 405, "method_not_allowed")
    assert not_allowed.header("Allow") == "GET"
    traced = api.request("TRACE", "/v1/tables/t/items/k")
    assert_error(traced, 405, "method_not_allowed")
    allowed = {method.strip() for method in traced.header("Allow").split(",")}
    assert allowed == {"DELETE", "GET", "PATCH", "PUT"}
