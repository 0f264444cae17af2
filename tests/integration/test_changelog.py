"""The change log on a real shard: every change once, late commits never skipped, trim."""

from __future__ import annotations

import asyncio

import asyncpg

from shardd import changelog
from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, RunningCluster
from tests.harness.http import Api, item_path


def test_batches_follow_commits_not_sequence_numbers(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    late, *others = cluster.keys_on("s1", "log", 6)
    dsn = cluster.node_dsn("s1-primary")

    async def scenario() -> tuple[list[changelog.Change], list[changelog.Change], int, int]:
        reader = await asyncpg.connect(dsn)
        writer = await asyncpg.connect(dsn)
        try:
            start = await changelog.position(reader)
            long_txn = writer.transaction()
            await long_txn.start()
            await writer.execute(
                "SELECT shardd_put($1, $2, $3, '', '{\"late\": 1}'::jsonb, NULL)",
                slot_of(late, SLOTS),
                table,
                late,
            )
            for key in others:  # later sequence numbers, committed first
                response = await asyncio.to_thread(
                    api.request, "PUT", item_path(table, key), body={"k": key}
                )
                assert response.status == 201
            first, middle = await changelog.next_batch(reader, start)
            await long_txn.commit()
            second, _ = await changelog.next_batch(reader, middle)
            # Trim keeps what a registered consumer has not passed.
            await changelog.register(reader, "test-consumer", middle)
            await changelog.trim(reader, keep_seconds=0)
            kept = await reader.fetchval(
                "SELECT count(*) FROM shardd_changes WHERE tbl = $1 AND pk = $2", table, late
            )
            await changelog.unregister(reader, "test-consumer")
            await changelog.trim(reader, keep_seconds=0)
            left = await reader.fetchval(
                "SELECT count(*) FROM shardd_changes WHERE tbl = $1", table
            )
            return first, second, kept, left
        finally:
            await reader.close()
            await writer.close()

    first, second, kept, left = asyncio.run(scenario())
    mine = [c for c in first if c.tbl == table]
    assert [c.pk for c in mine] == others
    assert all(c.op == "put" and c.version == 1 for c in mine)
    late_changes = [c for c in second if c.tbl == table]
    assert [c.pk for c in late_changes] == [late]
    assert late_changes[0].doc == '{"late": 1}'
    assert late_changes[0].seq < mine[0].seq  # it took its number first, committed last
    assert kept == 1
    assert left == 0


def test_deletes_are_logged_and_apply_is_idempotent(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    [key] = cluster.keys_on("s2", "apply", 1)
    dsn = cluster.node_dsn("s2-primary")

    async def scenario() -> tuple[list[changelog.Change], int]:
        conn = await asyncpg.connect(dsn)
        try:
            start = await changelog.position(conn)
            for body in ({"v": 1}, {"v": 2}):
                await asyncio.to_thread(api.request, "PUT", item_path(table, key), body=body)
            await asyncio.to_thread(api.request, "DELETE", item_path(table, key))
            await asyncio.to_thread(api.request, "PUT", item_path(table, key), body={"v": 3})
            changes, _ = await changelog.next_batch(conn, start, slots=[slot_of(key, SLOTS)])
            mine = [c for c in changes if c.tbl == table]
            await conn.execute(
                "CREATE TEMP TABLE shardd_items (LIKE public.shardd_items INCLUDING DEFAULTS)"
            )
            await conn.execute("CREATE UNIQUE INDEX ON pg_temp.shardd_items (tbl, pk, sk)")
            for _ in range(2):  # at least once delivery: applying twice changes nothing
                await changelog.apply(conn, mine)
            rows = await conn.fetchval(
                "SELECT count(*) FROM pg_temp.shardd_items WHERE doc = '{\"v\": 3}'::jsonb"
            )
            return mine, rows
        finally:
            await conn.close()

    changes, rows = asyncio.run(scenario())
    assert [(c.op, c.version) for c in changes] == [
        ("put", 1),
        ("put", 2),
        ("delete", 2),
        ("put", 1),
    ]
    assert rows == 1
