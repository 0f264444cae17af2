"""Items through the API: CRUD, versions and ETags, conditions, merge patch, sessions."""

from __future__ import annotations

import pytest

from tests.harness.cluster import wait_for
from tests.harness.http import Api, item_path, topology_nodes


def test_put_get_replace_delete(api: Api, table: str) -> None:
    path = item_path(table, "alice")
    created = api.request("PUT", path, body={"name": "Alice", "age": 30})
    assert created.status == 201
    assert created.body == {"pk": "alice", "sk": "", "version": 1}
    assert created.header("ETag") == '"1"'
    shard, _, node = created.header("Shardd-Served-By").partition("/")
    assert node == f"{shard}-primary"

    got = api.request("GET", path + "?consistency=strong")
    assert got.status == 200
    assert got.body == {
        "table": table,
        "pk": "alice",
        "sk": "",
        "version": 1,
        "item": {"name": "Alice", "age": 30},
    }

    replaced = api.request("PUT", path, body={"name": "Alicia"})
    assert replaced.status == 200
    assert replaced.body["version"] == 2
    assert api.request("GET", path + "?consistency=strong").body["item"] == {"name": "Alicia"}

    assert api.request("DELETE", path).status == 204
    missing = api.request("GET", path + "?consistency=strong")
    assert missing.status == 404
    assert missing.body["error"]["code"] == "item_not_found"
    assert api.request("DELETE", path).status == 404


def test_sort_keys_and_keys_with_slashes_and_unicode(api: Api, table: str) -> None:
    pk, sk = "user/ü/1 %", "order/2026-01-01#7"
    path = item_path(table, pk, sk)
    assert api.request("PUT", path, body={"total": 12.5}).status == 201
    got = api.request("GET", path + "?consistency=strong")
    assert got.body["pk"] == pk and got.body["sk"] == sk
    # The same pk with no sk is another item.
    assert api.request("GET", item_path(table, pk) + "?consistency=strong").status == 404
    assert api.request("GET", item_path(table, pk, "") + "?consistency=strong").status == 404


def test_if_match_and_if_none_match(api: Api, table: str) -> None:
    path = item_path(table, "bob")
    assert api.request("PUT", path, body={"v": 1}, headers={"If-None-Match": "*"}).status == 201
    again = api.request("PUT", path, body={"v": 2}, headers={"If-None-Match": "*"})
    assert again.status == 412
    assert again.body["error"]["code"] == "precondition_failed"

    stale = api.request("PUT", path, body={"v": 2}, headers={"If-Match": '"7"'})
    assert stale.status == 412
    ok = api.request("PUT", path, body={"v": 2}, headers={"If-Match": '"1"'})
    assert ok.status == 200 and ok.body["version"] == 2
    assert api.request("DELETE", path, headers={"If-Match": '"1"'}).status == 412

    unchanged = api.request("GET", path + "?consistency=strong", headers={"If-None-Match": '"2"'})
    assert unchanged.status == 304
    assert unchanged.header("ETag") == '"2"'
    changed = api.request("GET", path + "?consistency=strong", headers={"If-None-Match": '"1"'})
    assert changed.status == 200

    assert api.request("DELETE", path, headers={"If-Match": '"2"'}).status == 204
    absent = api.request("PUT", path, body={"v": 3}, headers={"If-Match": '"2"'})
    assert absent.status == 412
    # The server's message only: no Postgres DETAIL, SQL or host in a response.
    assert absent.body["error"]["message"] == "expected version 2, item is at absent"
    assert api.request("GET", path + "?consistency=strong").status == 404
    both = {"If-Match": '"2"', "If-None-Match": "*"}  # can never hold together
    assert api.request("PUT", path, body={"v": 4}, headers=both).status == 412
    assert api.request("GET", path + "?consistency=strong").status == 404


def test_merge_patch(api: Api, table: str) -> None:
    path = item_path(table, "carol")
    api.request(
        "PUT",
        path,
        body={"name": "Carol", "address": {"city": "Oslo", "zip": "0150"}, "tags": ["a"]},
    )
    patched = api.request(
        "PATCH", path, body={"address": {"zip": None, "street": "Main"}, "tags": ["b"], "age": 40}
    )
    assert patched.status == 200
    assert patched.body["version"] == 2
    assert patched.body["item"] == {
        "name": "Carol",
        "address": {"city": "Oslo", "street": "Main"},
        "tags": ["b"],
        "age": 40,
    }
    assert api.request("GET", path + "?consistency=strong").body["item"] == patched.body["item"]
    assert api.request("PATCH", path, body={"x": 1}, headers={"If-Match": '"1"'}).status == 412
    assert api.request("PATCH", item_path(table, "nobody"), body={"x": 1}).status == 404


def test_session_token_gives_read_your_writes(api: Api, table: str) -> None:
    token = None
    for i in range(30):
        path = item_path(table, f"ryw-{i}")
        headers = {"Shardd-Session": token} if token else {}
        written = api.request("PUT", path, body={"i": i}, headers=headers)
        token = written.header("Shardd-Session")
        assert token
        read = api.request("GET", path, headers={"Shardd-Session": token})
        assert read.status == 200, read.body
        assert read.body["item"] == {"i": i}
    # The token accumulates positions for every shard written in this session.
    assert len(token.split(",")) == 3


def test_session_reads_use_a_replica_once_it_has_replayed_the_write(api: Api, table: str) -> None:
    """A session read goes to a replica (the primary only while none has replayed the
    session's writes); each answer has the session's write."""
    path = item_path(table, "session-replica")
    written = api.request("PUT", path, body={"v": 1})
    token = written.header("Shardd-Session")
    served: list[str] = []

    def read_from_replica() -> bool:
        read = api.request("GET", path, headers={"Shardd-Session": token})
        assert read.status == 200 and read.body["item"] == {"v": 1}, read.body
        served.append(read.header("Shardd-Served-By").split("/")[1])
        return "replica" in served[-1]

    wait_for(read_from_replica, timeout=10, what="a session read served by a replica")


def test_eventual_reads_use_replicas(api: Api, table: str) -> None:
    path = item_path(table, "replicated")
    api.request("PUT", path, body={"x": 1})
    served = set()
    for _ in range(20):
        got = api.request("GET", path + "?consistency=eventual")
        if got.status == 200:
            served.add(got.header("Shardd-Served-By").split("/")[1])
    # Roles as the topology has them now (an earlier switchover may have swapped names).
    roles = {name: node["role"] for name, node in topology_nodes(api).items()}
    assert any(roles.get(node) == "replica" for node in served), (served, roles)
    strong = api.request("GET", path, headers={"Shardd-Consistency": "strong"})
    assert roles[strong.header("Shardd-Served-By").split("/")[1]] == "primary"


def test_unknown_table_is_404(api: Api) -> None:
    response = api.request("GET", item_path("no_such_table", "x"))
    assert response.status == 404
    assert response.body["error"]["code"] == "table_not_found"


@pytest.mark.parametrize("name", ["items", "partitions", "scan", "batch", "views"])
def test_a_table_may_be_named_like_a_path_segment(api: Api, name: str) -> None:
    api.request("DELETE", f"/v1/tables/{name}?force=true")
    assert api.request("PUT", f"/v1/tables/{name}").status == 201
    try:
        for pk, sk in ((name, ""), ("alice", name), (name, name)):
            created = api.request("PUT", item_path(name, pk, sk or None), body={"k": [pk, sk]})
            assert created.status == 201, created.body
            assert (created.body["pk"], created.body["sk"]) == (pk, sk)
        got = api.request("GET", item_path(name, "alice", name) + "?consistency=strong")
        assert got.status == 200 and got.body["item"] == {"k": ["alice", name]}
        partition = api.request("GET", f"/v1/tables/{name}/partitions/{name}?consistency=strong")
        assert partition.status == 200
        assert [(i["pk"], i["sk"]) for i in partition.body["items"]] == [(name, ""), (name, name)]
        batch = api.request(
            "POST", f"/v1/tables/{name}/batch/get", body={"keys": [{"pk": name, "sk": name}]}
        )
        assert batch.status == 200, batch.body
        assert [r["item"] for r in batch.body["results"]] == [{"k": [name, name]}]
        scan = api.request("GET", f"/v1/tables/{name}/scan?consistency=strong")
        assert scan.status == 200 and len(scan.body["items"]) == 3
    finally:
        assert api.request("DELETE", f"/v1/tables/{name}?force=true").status == 204
