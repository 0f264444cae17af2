"""Table declarations: create, update, list, describe, delete (refusing non-empty)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.harness.cluster import RunningCluster, wait_for
from tests.harness.http import Api, item_path


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


def _rows(cluster: RunningCluster, name: str) -> int:
    return sum(
        cluster.sql(f"{s}-primary", "SELECT count(*) AS n FROM shardd_items WHERE tbl = $1", name)[
            0
        ]["n"]
        for s in ("s1", "s2", "s3")
    )


def test_table_deletion_resumes_after_a_shard_outage(cluster: RunningCluster, api: Api) -> None:
    """A shard down mid-deletion: the table stays 'deleting' (no reads, no writes, no
    re-declaration), the next DELETE finishes, and the name comes back empty."""
    name = "t_delete_outage"
    assert api.request("PUT", f"/v1/tables/{name}").status == 201
    puts = [{"pk": f"old-{i}", "item": {"i": i}} for i in range(60)]
    assert api.request("POST", f"/v1/tables/{name}/batch/write", body={"puts": puts}).body["ok"]

    cluster.devcluster("kill", "s2-primary")
    try:
        failed = api.request("DELETE", f"/v1/tables/{name}?force=true")
        assert failed.status == 503 and failed.body["error"]["code"] == "shard_unavailable:s2"
        assert api.request("GET", f"/v1/tables/{name}").body["state"] == "deleting"
        for method, path in (
            ("GET", item_path(name, "old-1") + "?consistency=strong"),
            ("PUT", item_path(name, "new")),
            ("GET", f"/v1/tables/{name}/scan"),
            ("PUT", f"/v1/tables/{name}"),
        ):
            refused = api.request(method, path, body={} if method == "PUT" else None)
            assert refused.status == 409, (method, path, refused.body)
            assert refused.body["error"]["code"] == "table_deleting"
    finally:
        cluster.devcluster("start", "s2-primary")
    assert _rows(cluster, name) > 0  # s2's items wait for the resumed deletion

    wait_for(
        lambda: api.request("DELETE", f"/v1/tables/{name}?force=true").status == 204,
        timeout=30,
        what="the deletion to finish once s2 is back",
    )
    assert _rows(cluster, name) == 0
    assert api.request("GET", f"/v1/tables/{name}").status == 404

    # Declared again once the old table's fences may be lifted: empty, and writable.
    recreated = wait_for(
        lambda: (r := api.request("PUT", f"/v1/tables/{name}")).status != 409 and r,
        timeout=60,
        what="the name to be declarable again",
        every=0.5,
    )
    assert recreated.status == 201, recreated.body
    assert api.request("GET", f"/v1/tables/{name}/scan?consistency=strong").body["items"] == []
    assert api.request("GET", item_path(name, "old-1") + "?consistency=strong").status == 404
    assert api.request("PUT", item_path(name, "new"), body={"n": 1}).status == 201


def test_the_shard_refuses_every_write_path_to_a_fenced_table(cluster: RunningCluster) -> None:
    """The table fence on the shard itself, whatever a router believes: shardd_put and
    shardd_patch check it with the slot's state, any other insert or update meets the row
    trigger, and a check of one table never lets a write to another one through."""
    dsn = cluster.node_dsn(cluster.primary_of("s1"))

    async def scenario() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            slot = await conn.fetchval("SELECT min(slot) FROM shardd_slots WHERE state = 'owned'")
            await conn.execute("SELECT shardd_unfence_table('fenced_t', 0)")
            put = "CALL shardd_write('put', $1, $2, 'k', '', '{}'::jsonb, NULL, 1000)"
            await conn.execute(put, slot, "fenced_t")  # not fenced yet
            await conn.execute(put, slot, "open_t")
            await conn.execute("SELECT shardd_fence_table('fenced_t')")
            statements: list[tuple[str, tuple[object, ...]]] = [
                (put, (slot, "fenced_t")),
                (
                    "CALL shardd_write('patch', $1, $2, 'k', '', '{}'::jsonb, NULL, 1000)",
                    (slot, "fenced_t"),
                ),
                (
                    "CALL shardd_write_batch($1, ARRAY[$2::int], ARRAY['k'], ARRAY[''],"
                    " ARRAY['{}'::jsonb], ARRAY[true])",
                    ("fenced_t", slot),
                ),
                ("UPDATE shardd_items SET version = version + 1 WHERE tbl = $1", ("fenced_t",)),
            ]
            for statement, args in statements:
                with pytest.raises(asyncpg.PostgresError) as refused:
                    await conn.execute(statement, *args)
                assert refused.value.sqlstate == "SD410", statement
            # One transaction: a checked write to open_t, then a write to fenced_t.
            with pytest.raises(asyncpg.PostgresError) as refused:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT shardd_put($1, 'open_t', 'k', '', '{}'::jsonb, NULL)", slot
                    )
                    await conn.execute(
                        "UPDATE shardd_items SET version = version + 1 WHERE tbl = 'fenced_t'"
                    )
            assert refused.value.sqlstate == "SD410"
            await conn.execute(put, slot, "open_t")  # other tables are unaffected
        finally:
            await conn.execute("SELECT shardd_unfence_table('fenced_t', 0)")
            await conn.execute("DELETE FROM shardd_items WHERE tbl IN ('fenced_t', 'open_t')")
            await conn.close()

    asyncio.run(scenario())
