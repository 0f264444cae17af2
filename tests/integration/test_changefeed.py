"""The change feed on the real session cluster: every change, in per-key order, across
late commits and slot moves; cursors, consumers, trimming, long polls, bad input, and
``shardctl changes tail``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any
from urllib.parse import urlencode

import asyncpg

from shardd import changefeed, changelog
from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, RunningCluster, wait_for
from tests.harness.feed import by_key, drain, end_cursor, feed_page, follow
from tests.harness.http import Api, item_path


def test_concurrent_writers_and_a_late_commit_all_appear_in_per_key_order(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    start = end_cursor(api, table)
    late = cluster.keys_on("s1", "late", 1)[0]
    keys = [f"k{i}" for i in range(24)]
    rounds = 6
    failures: list[str] = []

    def writer(mine: list[str]) -> None:
        client = cluster.api("write")
        for n in range(rounds):
            for key in mine:
                response = client.request("PUT", item_path(table, key), body={"n": n})
                if response.status not in (200, 201):
                    failures.append(f"{key}: {response.status}")

    dsn = cluster.node_dsn(cluster.primary_of("s1"))

    async def scenario() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            held = conn.transaction()
            await held.start()
            # Takes its sequence number now, commits after everything below.
            await conn.execute(
                "SELECT shardd_put($1, $2, $3, '', '{\"late\": true}'::jsonb, NULL)",
                slot_of(late, SLOTS),
                table,
                late,
            )
            threads = [
                threading.Thread(target=writer, args=(keys[i::4],), daemon=True) for i in range(4)
            ]
            for thread in threads:
                thread.start()
            # A reader follows the feed while the writers run and the late write is open.
            first, _ = await asyncio.to_thread(
                follow, api, table, start, until=lambda seen: len(seen) >= 40
            )
            assert late not in {pk for pk, _, _ in first}
            for thread in threads:
                await asyncio.to_thread(thread.join, 60)
            await held.commit()
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert not failures
    expected = len(keys) * rounds + 1
    seen, _ = follow(api, table, start, until=lambda seen: len(seen) >= expected, limit=13)
    assert len(seen) == expected  # nothing twice when following without a failover
    versions = by_key(seen)
    assert versions[late] == [1]
    for key in keys:
        assert versions[key] == list(range(1, rounds + 1)), (key, versions[key])


def test_a_cursor_resumes_where_it_stopped_and_repeats_from_an_older_one(
    api: Api, table: str
) -> None:
    start = end_cursor(api, table)
    for i in range(5):
        assert api.request("PUT", item_path(table, f"r{i}"), body={"i": i}).status == 201
    assert api.request("DELETE", item_path(table, "r0")).status == 204
    cursor = start
    seen: list[dict[str, Any]] = []
    cursors = []
    while len(seen) < 6:
        page = feed_page(api, tables=table, cursor=cursor, limit=2)
        seen += page["changes"]
        cursors.append(cursor)
        cursor = page["cursor"]
    assert sorted((c["pk"], c["op"]) for c in seen) == sorted(
        [(f"r{i}", "put") for i in range(5)] + [("r0", "delete")]
    )
    put = next(c for c in seen if c["pk"] == "r3")
    assert put["item"] == {"i": 3} and put["sk"] == "" and put["shard"].startswith("s")
    deleted = next(c for c in seen if c["op"] == "delete")
    assert deleted["item"] is None and deleted["version"] == 1
    assert [c["op"] for c in seen if c["pk"] == "r0"] == ["put", "delete"]
    # At least once: an older cursor delivers the same changes again.
    again = feed_page(api, tables=table, cursor=cursors[1], limit=1000)["changes"]
    assert again == seen[2:]
    assert feed_page(api, tables=table, cursor=cursor)["changes"] == []


def test_a_cursor_from_before_a_slot_move_works_after_it(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    keys = cluster.keys_on("s1", "moving", 1)
    slot = slot_of(keys[0], SLOTS)
    keys += [k for k in (f"moving-{i}" for i in range(100_000)) if slot_of(k, SLOTS) == slot][1:6]
    before = end_cursor(api, table)
    for key in keys:
        assert api.request("PUT", item_path(table, key), body={"v": 1}).status == 201
    try:
        assert cluster.move("s1", "s2", [slot]).phase == "done"
        for key in keys:
            written = api.request("PUT", item_path(table, key), body={"v": 2})
            assert written.status == 200, written.body
            assert written.header("Shardd-Served-By").startswith("s2/")
        seen, _ = follow(api, table, before, until=lambda seen: len(seen) >= 2 * len(keys))
        assert by_key(seen) == {key: [1, 2] for key in keys}  # the copy is not a change
        after = end_cursor(api, table)
    finally:
        assert cluster.move("s2", "s1", [slot]).phase == "done"
    assert drain(api, table, after) == []  # moving back emitted nothing either


def trim_everywhere(cluster: RunningCluster) -> None:
    cluster.on_primaries(lambda conn: changelog.trim(conn, keep_seconds=0))


def test_consumers_hold_back_trimming_and_an_expired_cursor_is_410(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    before = end_cursor(api, table)
    registered = api.request("PUT", "/v1/consumers/feed-test", body={"cursor": before})
    assert registered.status == 201, registered.body
    for i in range(6):
        assert api.request("PUT", item_path(table, f"c{i}"), body={"i": i}).status == 201
    assert api.request("PUT", "/v1/consumers/feed-test", body={"cursor": before}).status == 200
    stored = api.request("GET", "/v1/consumers/feed-test").body
    assert stored["name"] == "feed-test" and stored["cursor"]
    held = cluster.sql(
        cluster.primary_of("s1"), "SELECT name FROM shardd_consumers WHERE name LIKE 'feed:%'"
    )
    assert "feed:feed-test" in {r["name"] for r in held}

    trim_everywhere(cluster)  # keeps what the consumer has not read
    seen, _ = follow(api, table, stored["cursor"], until=lambda seen: len(seen) >= 6)
    assert sorted(pk for pk, _, _ in seen) == [f"c{i}" for i in range(6)]

    # Past the retention cap the consumer no longer holds trimming back: its cursor is 410.
    dropped = cluster.on_primaries(lambda conn: changefeed.expire_consumers(conn, cap_seconds=0.0))
    assert all("feed:feed-test" in names for names in dropped)
    trim_everywhere(cluster)
    expired = api.request("GET", "/v1/changes?" + urlencode({"cursor": stored["cursor"]}))
    assert expired.status == 410, expired.body
    assert expired.body["error"]["code"] == "cursor_expired"
    refused = api.request("PUT", "/v1/consumers/feed-test", body={"cursor": stored["cursor"]})
    assert refused.status == 410
    assert (cluster.metric("shardd_changefeed_cursors_expired_total") or 0) >= 1
    # A fresh cursor starts at what the shards keep now.
    assert feed_page(api, tables=table)["changes"] == []

    assert api.request("DELETE", "/v1/consumers/feed-test").status == 204
    assert api.request("GET", "/v1/consumers/feed-test").status == 404
    assert api.request("DELETE", "/v1/consumers/feed-test").status == 404
    left = cluster.sql(
        cluster.primary_of("s2"), "SELECT name FROM shardd_consumers WHERE name LIKE 'feed:%'"
    )
    assert "feed:feed-test" not in {r["name"] for r in left}


def test_a_long_poll_returns_when_a_write_arrives(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    cursor = end_cursor(api, table)
    started = time.monotonic()
    quiet = feed_page(api, tables=table, cursor=cursor, wait=1)
    assert quiet["changes"] == [] and time.monotonic() - started >= 0.9
    answer: list[Any] = []
    poller = threading.Thread(
        target=lambda: answer.append(
            feed_page(Api(api.port, token=api.token), tables=table, cursor=cursor, wait=20)
        )
    )
    started = time.monotonic()
    poller.start()
    # Parked: its first round found nothing.
    waiting = "shardd_changefeed_waiting"
    wait_for(lambda: cluster.metric(waiting) == 1, timeout=10, what="the long poll waiting")
    assert api.request("PUT", item_path(table, "ping"), body={}).status == 201
    poller.join(timeout=30)
    assert answer and [c["pk"] for c in answer[0]["changes"]] == ["ping"]
    assert time.monotonic() - started < 20  # woken by the write, not by the deadline
    assert cluster.metric(waiting) == 0


def test_bad_input_is_a_clear_4xx(cluster: RunningCluster, api: Api, table: str) -> None:
    cases = {
        "cursor=not-a-cursor": (400, "bad_cursor"),
        "cursor=%00": (400, "bad_cursor"),
        "limit=0": (400, "invalid_parameter"),
        "limit=abc": (400, "invalid_parameter"),
        "wait=31": (400, "invalid_parameter"),
        "wait=-1": (400, "invalid_parameter"),
        "tables=Bad!": (400, "invalid_table_name"),
        "tables=": (400, "invalid_table_name"),
        f"tables={table},": (400, "invalid_table_name"),
        "tables=no_such_table": (404, "table_not_found"),
    }
    for query, (status, code) in cases.items():
        response = api.request("GET", f"/v1/changes?{query}")
        assert (response.status, response.body["error"]["code"]) == (status, code), query
    for body, code in (({"cursor": 5}, "bad_cursor"), ({"x": 1}, "invalid_consumer")):
        response = api.request("PUT", "/v1/consumers/c1", body=body)
        assert (response.status, response.body["error"]["code"]) == (400, code)
    assert api.request("PUT", "/v1/consumers/-bad-").status == 400
    assert api.request("GET", "/v1/consumers/no-such").status == 404
    reader = cluster.api("read")
    assert reader.request("GET", "/v1/changes?limit=1").status == 200
    assert reader.request("PUT", "/v1/consumers/c1").status == 403
    assert cluster.api(None).request("GET", "/v1/changes").status == 401


def test_internal_tables_never_reach_the_feed(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    [key] = cluster.keys_on("s2", "internal", 1)
    cursor = end_cursor(api, table)
    primary = cluster.primary_of("s2")
    cluster.sql(
        primary,
        "SELECT shardd_put($1, '~v:feedtest', $2, '', '{}'::jsonb, NULL)",
        slot_of(key, SLOTS),
        key,
    )
    assert api.request("PUT", item_path(table, key), body={}).status == 201
    try:
        seen: list[Any] = []
        while not any(c["table"] == table for c in seen):
            page = feed_page(api, cursor=cursor, limit=1000, wait=1)
            seen += page["changes"]
            cursor = page["cursor"]
        assert not [c for c in seen if c["table"].startswith("~")]
    finally:
        cluster.sql(
            primary,
            "SELECT shardd_delete($1, '~v:feedtest', $2, '', NULL)",
            slot_of(key, SLOTS),
            key,
        )


def test_shardctl_changes_tail_prints_one_line_per_change(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    for i in range(4):
        assert api.request("PUT", item_path(table, f"t{i}"), body={"i": i}).status == 201
    tail = cluster.shardctl("changes", "tail", "--tables", table, "--limit", "3", "--json")
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert len(lines) == 3
    assert all(c["table"] == table and c["op"] == "put" for c in lines)
    cursor = tail.stderr.strip().removeprefix("cursor: ")
    rest = cluster.shardctl("changes", "tail", "--tables", table, "--cursor", cursor, "--once")
    shown = {line.split()[4] for line in rest.stdout.splitlines()}
    assert {f"'{c['pk']}'/''" for c in lines}.isdisjoint(shown)
    assert len(lines) + len(rest.stdout.splitlines()) == 4
    wrong = cluster.shardctl("changes", "tail", "--cursor", "garbage", check=False)
    assert wrong.returncode != 0 and "cursor" in wrong.stderr
