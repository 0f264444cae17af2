"""Views against real Postgres: declaration, backfill, maintenance from the change log
(key moves, filters, deletes, join fan-out), session reads, verify and repair,
back-pressure, and maintenance taken over from a dead instance."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from shardd import changelog
from tests.harness.cluster import TOKENS, RunningCluster, wait_for
from tests.harness.http import Api, item_path
from tests.harness.load import Pace

SPEC = {
    "key": {"pk": "$.product_id", "sk": "$.created_at"},
    "fields": {"qty": "$.qty", "price": "$.price"},
    "join": [{"table": "USERS", "sk": "", "fields": {"user_name": "$.name"}}],
    "where": {"path": "$.status", "equals": "paid"},
}


def spec_for(users: str) -> dict[str, Any]:
    spec = json.loads(json.dumps(SPEC))
    spec["join"][0]["table"] = users
    return spec


def declare_table(api: Api, name: str) -> str:
    api.request("DELETE", f"/v1/tables/{name}?force=true")
    response = api.request("PUT", f"/v1/tables/{name}", body={})
    assert response.status == 201, response.body
    return name


def rows(api: Api, view: str, vpk: str, query: str = "") -> list[dict[str, Any]]:
    response = api.request("GET", f"/v1/views/{view}/partitions/{quote(vpk, safe='')}{query}")
    assert response.status == 200, response.body
    return list(response.body["items"])


def wait_rows(api: Api, view: str, vpk: str, want: Any, *, timeout: float = 10.0) -> Any:
    def check() -> Any:
        found = rows(api, view, vpk)
        return found if want(found) else None

    return wait_for(check, timeout=timeout, what=f"rows of {view}/{vpk}")


def wait_active(api: Api, table: str, view: str) -> None:
    wait_for(
        lambda: api.request("GET", f"/v1/tables/{table}/views/{view}").body["state"] == "active",
        timeout=30,
        what=f"view {view} active",
    )


@pytest.fixture
def orders(api: Api, request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(orders table, users table, view name), fresh, with the view declared."""
    base = "".join(ch for ch in request.node.name.lower() if ch.isalnum())[:30]
    view = f"v_{base}"
    for table in (f"o_{base}", f"u_{base}"):
        for listed in api.request("GET", f"/v1/tables/{table}/views").body.get("views", []):
            api.request("DELETE", f"/v1/tables/{table}/views/{listed['name']}")
    orders, users = declare_table(api, f"o_{base}"), declare_table(api, f"u_{base}")
    yield orders, users, view
    for table in (orders, users):
        for listed in api.request("GET", f"/v1/tables/{table}/views").body.get("views", []):
            api.request("DELETE", f"/v1/tables/{table}/views/{listed['name']}")
        api.request("DELETE", f"/v1/tables/{table}?force=true")


def test_declare_validate_backfill_and_follow(api: Api, orders: tuple[str, str, str]) -> None:
    table, users, view = orders
    # Items before the view: the backfill copies them.
    api.request("PUT", item_path(users, "u1"), body={"name": "Ann"})
    for n in range(5):
        api.request(
            "PUT",
            item_path(table, "u1", f"o{n}"),
            body={"product_id": "p1", "created_at": f"2026-01-0{n + 1}", "qty": n, "price": 9.5,
                  "status": "paid" if n != 4 else "open"},
        )  # fmt: skip
    for bad, code in (
        ({"key": {"pk": "product_id"}}, "invalid_view"),
        ({"key": {"pk": "$.a b"}}, "invalid_view"),
        ({"key": {}}, "invalid_view"),
        ({"key": {"pk": "$.p"}, "join": [{"table": "no", "fields": {"a": "$"}}]}, "unknown_table"),
        ({"key": {"pk": "$.p"}, "where": {"path": "$.s"}}, "invalid_view"),
        ({"key": {"pk": "$.p"}, "extra": 1}, "invalid_view"),
    ):  # fmt: skip
        response = api.request("PUT", f"/v1/tables/{table}/views/{view}", body=bad)
        assert response.status == (404 if code == "unknown_table" else 400), (bad, response.body)
        assert response.body["error"]["code"] == code
    assert api.request("GET", f"/v1/tables/{table}/views/{view}").status == 404
    created = api.request("PUT", f"/v1/tables/{table}/views/{view}", body=spec_for(users))
    assert created.status == 201, created.body
    again = api.request("PUT", f"/v1/tables/{table}/views/{view}", body=spec_for(users))
    assert again.status == 200
    other = {**spec_for(users), "key": {"pk": "$.qty"}}
    assert api.request("PUT", f"/v1/tables/{table}/views/{view}", body=other).status == 409
    wait_active(api, table, view)
    listed = api.request("GET", f"/v1/tables/{table}/views").body["views"]
    assert [v["name"] for v in listed] == [view]
    found = wait_rows(api, view, "p1", lambda r: len(r) == 4)
    assert [r["sk"] for r in found] == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    assert found[0]["item"] == {"qty": 0, "price": 9.5, "user_name": "Ann"}
    assert found[0]["source"] == {"table": table, "pk": "u1", "sk": "o0", "version": 1}
    # A change of the view key moves the row; a status change drops it; a delete too.
    api.request("PATCH", item_path(table, "u1", "o0"), body={"product_id": "p2"})
    api.request("PATCH", item_path(table, "u1", "o1"), body={"status": "refunded"})
    api.request("DELETE", item_path(table, "u1", "o2"))
    api.request("PATCH", item_path(table, "u1", "o4"), body={"status": "paid"})
    wait_rows(api, view, "p1", lambda r: [x["source"]["sk"] for x in r] == ["o3", "o4"])
    moved = wait_rows(api, view, "p2", lambda r: len(r) == 1)
    assert moved[0]["source"]["version"] == 2
    # The joined item changes: every dependent row gets the new name.
    api.request("PUT", item_path(users, "u1"), body={"name": "Bea"})
    wait_rows(api, view, "p1", lambda r: {x["item"]["user_name"] for x in r} == {"Bea"})
    wait_rows(api, view, "p2", lambda r: r[0]["item"]["user_name"] == "Bea")
    # Rows with one view key, and paging with the opaque cursor.
    exact = api.request("GET", f"/v1/views/{view}/items/p1/2026-01-04").body["items"]
    assert [x["source"]["sk"] for x in exact] == ["o3"]
    page = api.request("GET", f"/v1/views/{view}/partitions/p1?limit=1").body
    assert len(page["items"]) == 1 and page["next"]
    rest = api.request("GET", f"/v1/views/{view}/partitions/p1?after={page['next']}").body
    assert [x["source"]["sk"] for x in rest["items"]] == ["o4"]
    assert api.request("GET", f"/v1/views/{view}/partitions/p1?after=%25%25").status == 400
    described = api.request("GET", f"/v1/tables/{table}/views/{view}").body
    assert described["state"] == "active" and described["lag_seconds"] is not None
    # The source table cannot go while it has views; the view goes with its rows.
    assert api.request("DELETE", f"/v1/tables/{table}?force=true").status == 409
    assert api.request("DELETE", f"/v1/tables/{table}/views/{view}").status == 204
    assert api.request("GET", f"/v1/views/{view}/partitions/p1").status == 404


def test_session_read_sees_the_write(api: Api, orders: tuple[str, str, str]) -> None:
    table, users, view = orders
    assert (
        api.request("PUT", f"/v1/tables/{table}/views/{view}", body=spec_for(users)).status == 201
    )
    wait_active(api, table, view)
    for n in range(20):
        written = api.request(
            "PUT",
            item_path(table, f"u{n}", "o"),
            body={"product_id": "hot", "created_at": f"{n:03d}", "status": "paid", "qty": n},
        )
        token = written.header("Shardd-Session")
        assert token
        seen = api.request(
            "GET", f"/v1/views/{view}/partitions/hot", headers={"Shardd-Session": token}
        )
        assert seen.status == 200, seen.body
        assert len(seen.body["items"]) == n + 1, n
    via_param = api.request("GET", f"/v1/views/{view}/partitions/hot?wait_for={quote(token)}")
    assert len(via_param.body["items"]) == 20
    # Both: every position either names.  A malformed wait_for is refused even then.
    both = api.request(
        "GET",
        f"/v1/views/{view}/partitions/hot?wait_for={quote(token)}",
        headers={"Shardd-Session": token},
    )
    assert len(both.body["items"]) == 20
    bad = api.request(
        "GET", f"/v1/views/{view}/partitions/hot?wait_for=T", headers={"Shardd-Session": token}
    )
    assert bad.status == 400 and bad.body["error"]["code"] == "invalid_session_token", bad.body
    assert "wait_for" in bad.body["error"]["message"]


def test_verify_finds_and_repair_fixes(
    cluster: RunningCluster, api: Api, orders: tuple[str, str, str]
) -> None:
    table, users, view = orders
    api.request("PUT", f"/v1/tables/{table}/views/{view}", body=spec_for(users))
    for n in range(30):
        api.request(
            "PUT",
            item_path(table, f"u{n}", "o"),
            body={"product_id": f"p{n % 3}", "created_at": "x", "status": "paid", "qty": n},
        )
    wait_active(api, table, view)
    wait_for(
        lambda: sum(len(rows(api, view, f"p{i}")) for i in range(3)) == 30,
        timeout=10,
        what="30 rows",
    )
    clean = cluster.shardctl("views", "verify", view, "--json")
    assert json.loads(clean.stdout) == {
        "view": view, "checked": 30, "missing": 0, "extra": 0, "stale": 0
    }  # fmt: skip
    # Damage the stored rows behind maintenance's back (not logged as changes).
    damage = (
        "BEGIN; SET LOCAL shardd.copying = on;"
        f" DELETE FROM shardd_items WHERE tbl LIKE '~v:{view}:%' AND pk = 'p0';"
        f" UPDATE shardd_items SET doc = jsonb_set(doc, '{{item,qty}}', '999')"
        f" WHERE tbl LIKE '~v:{view}:%' AND pk = 'p1';"
        f" INSERT INTO shardd_items (tbl, pk, sk, slot, version, doc) SELECT tbl, 'p9', sk,"
        f" slot, version, doc FROM shardd_items WHERE tbl LIKE '~v:{view}:%' AND pk = 'p2' LIMIT 1;"
        " COMMIT;"
    )
    for shard in ("s1", "s2", "s3"):
        run_script(cluster.node_dsn(cluster.primary_of(shard)), damage)
    bad = cluster.shardctl("views", "verify", view, "--json", check=False)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["missing"] == 10 and report["stale"] == 10 and report["extra"] >= 1, report
    repaired = cluster.shardctl("views", "repair", view, "--json")
    assert json.loads(repaired.stdout)["missing"] == 10
    after = json.loads(cluster.shardctl("views", "verify", view, "--json").stdout)
    assert (after["missing"], after["extra"], after["stale"]) == (0, 0, 0)
    status = json.loads(cluster.shardctl("views", "status", view, "--json").stdout)
    assert {s["shard"] for s in status["shards"]} >= {"s1", "s2", "s3"}
    assert all(s["state"] == "following" for s in status["shards"])
    listed = json.loads(cluster.shardctl("views", "list", "--json").stdout)
    assert view in {v["name"] for v in listed}


def run_script(dsn: str, script: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(script)
        finally:
            await conn.close()

    asyncio.run(go())


def _main_shardd(cluster: RunningCluster) -> int:
    state = json.loads((cluster.dir / "cluster.json").read_text())
    return int(state["shardd_pid"])


def test_backpressure_when_maintenance_stops_then_takeover(
    cluster: RunningCluster, orders: tuple[str, str, str]
) -> None:
    """The only instance that maintains views is stopped (SIGSTOP): writes through an
    instance that does not are refused once the lag passes max_view_lag, and accepted
    again when it resumes.  Stopped again with a second maintaining instance running,
    that one takes its shards over when the lease lapses: writes flow without it."""
    table, users, view = orders
    main = _main_shardd(cluster)
    settings = {"views": "false", "max_view_lag": "1", "view_backpressure": "refuse"}
    with cluster.instance(**settings) as writer:
        api = Api(writer.port, token=TOKENS["admin"])
        response = api.request("PUT", f"/v1/tables/{table}/views/{view}", body=spec_for(users))
        assert response.status == 201
        wait_active(api, table, view)

        def put(pk: str) -> Any:
            body = {"product_id": "p", "status": "paid", "created_at": pk}
            return api.request("PUT", item_path(table, pk, "o"), body=body)

        assert put("u0").status == 201
        os.kill(main, signal.SIGSTOP)
        try:
            refused = wait_for(
                lambda: (r := put("u1")).status == 503 and r.body["error"]["code"] == "view_lag",
                timeout=15,
                what="writes refused for view lag",
            )
            assert refused
        finally:
            os.kill(main, signal.SIGCONT)
        wait_for(lambda: put("u2").status in (200, 201), timeout=15, what="writes again")
        with cluster.instance():
            os.kill(main, signal.SIGSTOP)
            try:
                wait_for(
                    lambda: put("u3").status in (200, 201), timeout=20, what="writes flow again"
                )
                wait_rows(api, view, "p", lambda r: "u3" in {x["source"]["pk"] for x in r})
            finally:
                os.kill(main, signal.SIGCONT)
        found = wait_rows(api, view, "p", lambda r: len(r) >= 3)
        assert {"u0", "u2", "u3"} <= {r["source"]["pk"] for r in found}


class LateCommit:
    """An item written on a shard primary in a transaction held open until
    ``commit()``: a long transaction whose change-log entry commits late."""

    def __init__(self, dsn: str, slot: int, table: str, pk: str, sk: str, doc: str) -> None:
        self.txid = 0  # the transaction's id, once it has written
        self._go = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run(dsn, slot, table, pk, sk, doc)), daemon=True
        )
        self._thread.start()
        assert self._ready.wait(timeout=30)

    async def _run(self, dsn: str, slot: int, table: str, pk: str, sk: str, doc: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(
                    "WITH f AS (SELECT shardd_fence_write($1))"
                    " INSERT INTO shardd_items (tbl, pk, sk, slot, version, doc)"
                    " SELECT $2, $3, $4, $1, 1, $5::jsonb FROM f",
                    slot,
                    table,
                    pk,
                    sk,
                    doc,
                )
                self.txid = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
                self._ready.set()
                await asyncio.to_thread(self._go.wait)
        finally:
            await conn.close()

    def commit(self) -> None:
        """Commit (idempotent; also what a failing test's cleanup calls)."""
        self._go.set()
        self._thread.join(timeout=30)


def test_a_view_equals_its_recomputation_after_faults_under_load(
    cluster: RunningCluster, api: Api, orders: tuple[str, str, str]
) -> None:
    """Concurrent writers (puts, patches, deletes, view-key changes), a joined item
    changing during bulk inserts of its dependents, a transaction that commits late, a
    maintaining instance killed mid-work, a rebalance there and back (source and view
    rows move) and a switchover: afterwards verify finds nothing to repair."""
    from shardd.placement import slot_of

    table, users, view = orders
    assert (
        api.request("PUT", f"/v1/tables/{table}/views/{view}", body=spec_for(users)).status == 201
    )
    wait_active(api, table, view)
    stop = threading.Event()
    unexpected: list[tuple[int, Any]] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        client = cluster.api()
        pace = Pace(50.0, stop)
        while not stop.is_set():
            pace.wait()
            pk, sk = f"u{rng.randrange(20)}", f"o{rng.randrange(8)}"
            roll = rng.random()
            if roll < 0.6:
                body = {
                    "product_id": f"p{rng.randrange(5)}",
                    "created_at": f"{rng.randrange(99)}",
                    "qty": rng.randrange(9),
                    "status": rng.choice(["paid", "paid", "open"]),
                }
                response = client.request("PUT", item_path(table, pk, sk), body=body)
            elif roll < 0.85:
                body = {"product_id": f"p{rng.randrange(5)}"}
                response = client.request("PATCH", item_path(table, pk, sk), body=body)
            else:
                response = client.request("DELETE", item_path(table, pk, sk))
            if response.status >= 500 and response.status != 503:
                unexpected.append((response.status, response.body))

    def joiner() -> None:
        rng = random.Random(7)
        client = cluster.api()
        pace = Pace(10.0, stop)  # batches of 20
        n = 0
        while not stop.is_set():
            pace.wait()
            user = f"u{rng.randrange(20)}"
            item = {"product_id": "bulk", "status": "paid"}
            puts = [
                {"pk": user, "sk": f"bulk{n}-{i}", "item": {**item, "created_at": f"{n}-{i}"}}
                for i in range(20)
            ]
            n += 1
            response = client.request(
                "POST", f"/v1/tables/{table}/batch/write", body={"puts": puts}
            )
            if response.status >= 500 and response.status != 503:
                unexpected.append((response.status, response.body))
            client.request("PUT", item_path(users, user), body={"name": f"name-{n}"})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=joiner))
    for thread in threads:
        thread.start()
    slot_count = int(cluster.sql("catalog", "SELECT slot_count FROM shardd_cluster")[0][0])
    late_pk = "late-user"
    slot = slot_of(late_pk, slot_count)
    owner = cluster.slot_map()[slot]
    late = LateCommit(
        cluster.node_dsn(cluster.primary_of(owner)),
        slot,
        table,
        late_pk,
        "o1",
        json.dumps({"product_id": "late", "created_at": "t", "status": "paid", "qty": 1}),
    )
    try:
        # Maintenance passes the late transaction: it reads the shard's log up to a
        # snapshot taken while the transaction is still open (and so not yet visible).
        def passed() -> bool:
            rows = cluster.sql(
                "catalog",
                "SELECT position FROM shardd_view_positions WHERE view = $1 AND shard = $2",
                view,
                owner,
            )
            return bool(rows) and _snapshot_xmax(rows[0]["position"]) > late.txid

        wait_for(passed, timeout=20, what="maintenance passing the late transaction")
        # Another instance takes its share of the shards, and is killed mid-work; its
        # shards are taken back once its leases lapse.
        other = cluster.start_instance()
        try:
            wait_for(
                lambda: (
                    cluster.sql(
                        "catalog",
                        "SELECT count(*) FROM shardd_view_leases WHERE holder LIKE $1"
                        " AND expires_at > now()",
                        f"%:{other.port}:%",
                    )[0][0]
                    > 0
                ),
                timeout=20,
                what="the other instance follows a shard",
            )
            time.sleep(0.5)
        finally:
            other.kill()
        # (A move cannot freeze a slot while a transaction holds it, so the late one
        # commits before the rebalance.)
        late.commit()
        set_weight(cluster, "s1", 2)
        cluster.shardctl("rebalance", "--yes", "--json")
        cluster.shardctl("failover", "--shard", "s2", "--yes")
        set_weight(cluster, "s1", 1)
        cluster.shardctl("rebalance", "--yes", "--json")
        time.sleep(1)
    finally:
        late.commit()
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        # The switched-over primary back as a replica: the session cluster stays whole
        # for the tests after this one.
        cluster.heal()
    assert not unexpected, unexpected[:3]
    wait_rows(api, view, "late", lambda r: [x["source"]["pk"] for x in r] == [late_pk], timeout=30)
    checked = cluster.shardctl("views", "verify", view, "--json", check=False)
    report = json.loads(checked.stdout)
    assert report["checked"] > 0
    assert (report["missing"], report["extra"], report["stale"]) == (0, 0, 0), (
        report,
        checked.stderr,
        (cluster.dir / "shardd.log").read_text()[-5000:],
    )


def _snapshot_xmax(position: str) -> int:
    """The xmax of the snapshot a view's position covers (see shardd.changelog)."""
    snapshot = changelog.parse_position(position)[0]
    return int(snapshot.split(":")[1])


def set_weight(cluster: RunningCluster, shard: str, weight: int) -> None:
    cluster.sql("catalog", "UPDATE shardd_shards SET weight = $2 WHERE name = $1", shard, weight)
