"""Table declarations: create, update, list, describe, delete (refusing non-empty)."""

from __future__ import annotations

from tests.harness.cluster import RunningCluster
from tests.harness.http import Api
from tests.integration.test_items import item_path


def test_table_lifecycle(cluster: RunningCluster, api: Api) -> None:
    name = "t_lifecycle"
    api.request("DELETE", f"/v1/tables/{name}?force=true")
    created = api.request("PUT", f"/v1/tables/{name}", body={"description": "first"})
    assert created.status == 201
    assert created.body["name"] == name and created.body["description"] == "first"
    updated = api.request("PUT", f"/v1/tables/{name}", body={"description": "second"})
    assert updated.status == 200 and updated.body["description"] == "second"
    assert api.request("PUT", f"/v1/tables/{name}").status == 200  # no body: keep defaults

    listed = api.request("GET", "/v1/tables").body["tables"]
    assert name in [t["name"] for t in listed]
    assert api.request("GET", f"/v1/tables/{name}").body["name"] == name

    api.request("PUT", item_path(name, "x"), body={"a": 1})
    refused = api.request("DELETE", f"/v1/tables/{name}")
    assert refused.status == 409
    assert refused.body["error"]["code"] == "table_not_empty"
    assert api.request("GET", item_path(name, "x") + "?consistency=strong").status == 200

    assert api.request("DELETE", f"/v1/tables/{name}?force=true").status == 204
    assert api.request("GET", f"/v1/tables/{name}").status == 404
    for shard in ("s1", "s2", "s3"):
        rows = cluster.sql(
            f"{shard}-primary", "SELECT count(*) AS n FROM shardd_items WHERE tbl = $1", name
        )
        assert rows[0]["n"] == 0
    assert api.request("DELETE", f"/v1/tables/{name}").status == 404


def test_empty_table_deletes_without_force(api: Api) -> None:
    api.request("PUT", "/v1/tables/t_empty_delete")
    assert api.request("DELETE", "/v1/tables/t_empty_delete").status == 204


def test_shardctl_lists_tables(cluster: RunningCluster, api: Api) -> None:
    api.request("PUT", "/v1/tables/t_ctl_listed", body={"description": "for ctl"})
    out = cluster.shardctl("tables", "--json").stdout
    assert '"t_ctl_listed"' in out
