"""Idempotency keys on the real session cluster: a retried write has exactly one effect
and returns the first outcome; a key reused for another request is 422; a duplicate
while the first is applied is 409; a response lost with a killed instance, retried
through another, has one effect; records move with their slot and expire.

Writes are held at a known point by a transaction holding the item's row lock
(:class:`Holding`): the write waits inside its shard transaction, key lock taken."""

from __future__ import annotations

import threading
import time
from typing import Any

from shardd import idempotency
from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, Holding, RunningCluster, wait_for
from tests.harness.http import Api, Response, item_path

KEY = idempotency.HEADER


def put(api: Api, table: str, pk: str, body: Any, key: str | None = None) -> Response:
    return api.request("PUT", item_path(table, pk), body=body, headers={KEY: key} if key else {})


def version_of(api: Api, table: str, pk: str) -> int:
    got = api.request("GET", item_path(table, pk) + "?consistency=strong")
    assert got.status == 200, got.body
    return int(got.body["version"])


def hold_item(cluster: RunningCluster, table: str, pk: str) -> Holding:
    """Hold the item's row lock on its primary: a write of it waits, key lock taken."""
    owner = cluster.slot_map()[slot_of(pk, SLOTS)]
    return Holding(
        cluster.node_dsn(cluster.primary_of(owner)),
        "SELECT 1 FROM shardd_items WHERE tbl = $1 AND pk = $2 AND sk = '' FOR UPDATE",
        table,
        pk,
    )


def waiting_writes(cluster: RunningCluster, pk: str) -> int:
    owner = cluster.slot_map()[slot_of(pk, SLOTS)]
    rows = cluster.sql(
        cluster.primary_of(owner),
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND query LIKE 'CALL shardd_write_once%'",
    )
    return int(rows[0]["n"])


def in_background(work: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``work()`` in a thread; its result (or the exception it raised) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except Exception as exc:  # e.g. the connection of a killed instance
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_retried_write_has_one_effect_and_returns_the_first_outcome(api: Api, table: str) -> None:
    first = put(api, table, "a", {"n": 1}, key="put-a")
    assert first.status == 201 and first.header(idempotency.REPLAYED) is None
    again = put(api, table, "a", {"n": 1}, key="put-a")
    assert again.status == 201, again.body  # the first outcome: created
    assert again.body == first.body and again.header(idempotency.REPLAYED) == "true"
    assert again.header("ETag") == '"1"'
    assert version_of(api, table, "a") == 1

    assert put(api, table, "a", {"n": 2}).status == 200  # no key: a new write
    patched = api.request("PATCH", item_path(table, "a"), body={"extra": True}, headers={KEY: "p"})
    assert patched.status == 200 and patched.body["version"] == 3
    assert put(api, table, "a", {"n": 4}).status == 200  # version 4
    replayed = api.request("PATCH", item_path(table, "a"), body={"extra": True}, headers={KEY: "p"})
    assert replayed.status == 200 and replayed.header(idempotency.REPLAYED) == "true"
    assert replayed.body == patched.body  # version 3's outcome, not a patch of version 4
    assert version_of(api, table, "a") == 4

    deleted = api.request("DELETE", item_path(table, "a"), headers={KEY: "del-a"})
    assert deleted.status == 204
    assert put(api, table, "a", {"n": 5}).status == 201
    again = api.request("DELETE", item_path(table, "a"), headers={KEY: "del-a"})
    assert again.status == 204 and again.header(idempotency.REPLAYED) == "true"
    assert version_of(api, table, "a") == 1  # the re-created item was not deleted


def test_a_key_used_for_another_request_is_422_and_writes_nothing(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    assert put(api, table, "b", {"n": 1}, key="reuse").status == 201
    other_body = put(api, table, "b", {"n": 2}, key="reuse")
    assert other_body.status == 422, other_body.body
    assert other_body.body["error"]["code"] == "idempotency_key_reused"
    other_item = put(api, table, "c", {"n": 1}, key="reuse")
    assert other_item.status == 422
    assert api.request("GET", item_path(table, "c") + "?consistency=strong").status == 404
    assert version_of(api, table, "b") == 1
    # Keys belong to their caller: another token's "reuse" is its own.
    writer = cluster.api("write")  # the fixture's api is an admin's
    assert put(writer, table, "c", {"n": 1}, key="reuse").status == 201

    for bad in ("has space", "x" * 256, "tab\there"):
        refused = put(api, table, "d", {"n": 1}, key=bad)
        assert refused.status == 400, bad
        assert refused.body["error"]["code"] == "invalid_idempotency_key"
    assert api.request("GET", item_path(table, "d")).status == 404  # nothing written


def test_a_duplicate_while_the_first_is_applied_is_409_then_replayed(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    assert put(api, table, "e", {"n": 0}).status == 201
    holding = hold_item(cluster, table, "e")
    try:
        thread, out = in_background(lambda: put(cluster.api("write"), table, "e", {"n": 1}, "k"))
        wait_for(lambda: waiting_writes(cluster, "e") == 1, timeout=10, what="write waiting")
        duplicate = put(cluster.api("write"), table, "e", {"n": 1}, key="k")
        assert duplicate.status == 409, duplicate.body
        assert duplicate.body["error"]["code"] == "idempotency_in_flight"
        assert duplicate.header("Retry-After") == "1"
    finally:
        holding.release()
    thread.join(timeout=30)
    assert out[0].status == 200 and out[0].body["version"] == 2
    replayed = put(cluster.api("write"), table, "e", {"n": 1}, key="k")
    assert replayed.status == 200 and replayed.header(idempotency.REPLAYED) == "true"
    assert replayed.body["version"] == 2
    assert version_of(api, table, "e") == 2


def test_concurrent_duplicates_have_one_effect(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    assert put(api, table, "f", {"n": 0}).status == 201
    outcomes: list[tuple[int, int | None, str | None]] = []
    start = threading.Barrier(8)

    def client() -> None:
        mine = cluster.api("write")
        start.wait()
        deadline = time.monotonic() + 30
        while True:
            sent = put(mine, table, "f", {"n": 1}, key="together")
            if sent.status != 409 or time.monotonic() > deadline:
                version = sent.body.get("version") if isinstance(sent.body, dict) else None
                outcomes.append((sent.status, version, sent.header(idempotency.REPLAYED)))
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(status for status, _, _ in outcomes) == [200] * 8, outcomes
    assert {version for _, version, _ in outcomes} == {2}
    assert sum(replayed is None for _, _, replayed in outcomes) == 1  # one applied it
    assert version_of(api, table, "f") == 2


def test_a_lost_response_retried_through_another_instance_has_one_effect(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    assert put(api, table, "g", {"n": 0}).status == 201
    instance = cluster.start_instance()
    try:
        holding = hold_item(cluster, table, "g")
        try:
            lost = Api(instance.port, token=cluster.api("write").token)
            thread, out = in_background(lambda: put(lost, table, "g", {"n": 1}, key="lost"))
            wait_for(lambda: waiting_writes(cluster, "g") == 1, timeout=10, what="write waiting")
            instance.kill()  # its client never learns the outcome
        finally:
            holding.release()
        thread.join(timeout=30)
        assert isinstance(out[0], ConnectionError), out
    finally:
        instance.stop()

    writer = cluster.api("write")  # the same caller as the lost request

    def retried() -> Response | None:
        sent = put(writer, table, "g", {"n": 1}, key="lost")
        return None if sent.status == 409 else sent  # the orphaned write still running

    answer = wait_for(retried, timeout=30, what="the retry answered")
    assert answer.status == 200, answer.body
    assert answer.body["version"] == 2
    assert version_of(api, table, "g") == 2  # exactly one effect, whoever applied it
    assert put(writer, table, "g", {"n": 1}, key="lost").header(idempotency.REPLAYED) == "true"


def test_records_move_with_their_slot(cluster: RunningCluster, api: Api, table: str) -> None:
    pk = cluster.keys_on("s1", "moving-key", 1)[0]
    first = put(api, table, pk, {"n": 1}, key="moves")
    assert first.status == 201
    slot = slot_of(pk, SLOTS)
    try:
        assert cluster.move("s1", "s2", [slot]).phase == "done"
        again = put(api, table, pk, {"n": 1}, key="moves")
        assert again.header("Shardd-Served-By").startswith("s2/")
        assert again.status == 201 and again.header(idempotency.REPLAYED) == "true"
        assert again.body == first.body
    finally:
        assert cluster.move("s2", "s1", [slot]).phase == "done"
    assert version_of(api, table, pk) == 1


def test_a_batch_write_with_a_key_is_applied_once_per_key(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    body = {
        "puts": [{"pk": f"batch-{i}", "item": {"i": i}} for i in range(12)],
        "deletes": [{"pk": "batch-gone"}],
    }
    path = f"/v1/tables/{table}/batch/write"
    first = api.request("POST", path, body=body, headers={KEY: "batch"})
    assert first.status == 200 and first.body["ok"], first.body
    assert len(first.header("Shardd-Served-By").split(", ")) == 3  # every shard had a part
    assert put(api, table, "batch-0", {"i": "changed"}).status == 200  # version 2
    again = api.request("POST", path, body=body, headers={KEY: "batch"})
    assert again.status == 200 and again.header(idempotency.REPLAYED) == "true"
    assert again.body == first.body
    assert version_of(api, table, "batch-0") == 2  # the retry did not overwrite it
    assert all(version_of(api, table, f"batch-{i}") == 1 for i in range(1, 12))
    other = api.request("POST", path, body={"puts": body["puts"][:1]}, headers={KEY: "batch"})
    assert other.status == 422 and other.body["error"]["code"] == "idempotency_key_reused"


def test_records_expire_after_the_retention(cluster: RunningCluster, table: str) -> None:
    """An instance keeping keys 1 s: a retry within the window is replayed; two windows
    later it is a new request; the trim drops the expired buckets and only those."""
    with cluster.instance(idempotency_retention="1") as short:
        api = Api(short.port, token=cluster.api("write").token)
        assert put(api, table, "h", {"n": 1}, key="expires").status == 201
        replayed = put(api, table, "h", {"n": 1}, key="expires")
        assert replayed.header(idempotency.REPLAYED) == "true"
        time.sleep(2.1)  # two windows of 1 s: no bucket a lookup reads holds the record
        again = put(api, table, "h", {"n": 1}, key="expires")
        assert again.status == 200 and again.header(idempotency.REPLAYED) is None
        assert version_of(api, table, "h") == 2

    def short_buckets() -> int:
        counts = cluster.on_primaries(
            lambda conn: conn.fetchval(
                "SELECT count(*) FROM shardd_items WHERE tbl LIKE '~idem:1:%'"
            )
        )
        return sum(counts)

    def long_buckets() -> int:
        counts = cluster.on_primaries(
            lambda conn: conn.fetchval(
                "SELECT count(*) FROM shardd_items WHERE tbl LIKE '~idem:86400:%'"
            )
        )
        return sum(counts)

    kept = long_buckets()
    assert short_buckets() >= 4  # two claims and two records
    removed: list[int] = []

    def trimmed() -> bool:  # once the last bucket is a window old, the trim takes it
        removed.extend(cluster.on_primaries(lambda c: idempotency.trim(c, keep_seconds=1)))
        return short_buckets() == 0

    wait_for(trimmed, timeout=10, what="the expired buckets trimmed", every=0.5)
    assert sum(removed) >= 4
    assert long_buckets() == kept  # the buckets still in their window stay
