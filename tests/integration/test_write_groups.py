"""Group commit (``coalesce_writes``) on the real session cluster: unconditional
single-item writes that wait for a connection to the same shard's primary share one
transaction, and each still gets its own answer; a write refused inside a group does not
fail the others.

The writes are held at a known point by a transaction holding the table's advisory
lock exclusively on the shard's primary (every write takes it shared): the groups
already sent wait inside Postgres, and the writes after them gather in the next group.
An instance of its own with ``pool_size`` 2 makes that happen after two groups."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from shardd.placement import slot_of
from tests.harness.cluster import SLOTS, TOKENS, Holding, Instance, RunningCluster, wait_for
from tests.harness.http import Api, Response, item_path

TABLE_LOCK = "SELECT pg_advisory_xact_lock(shardd_table_lock_class(), hashtext($1))"


@pytest.fixture(scope="module")
def narrow(cluster: RunningCluster) -> Iterator[Instance]:
    with cluster.instance(pool_size="2") as started:
        yield started


class Sent:
    """Requests (method, key) sent at once, each from a thread of its own (a PUT sends
    ``{"key": key}``)."""

    def __init__(self, port: int, table: str, requests: list[tuple[str, str]]) -> None:
        self._answers: list[Response | None] = [None] * len(requests)

        def send(i: int, method: str, key: str) -> None:
            api = Api(port, token=TOKENS["write"])
            body = {"key": key} if method == "PUT" else None
            self._answers[i] = api.request(method, item_path(table, key), body=body)

        self.threads = [
            threading.Thread(target=send, args=(i, method, key), daemon=True)
            for i, (method, key) in enumerate(requests)
        ]
        for thread in self.threads:
            thread.start()

    def answers(self) -> list[Response]:
        """Every answer, in the order of the requests, once all have come."""
        for thread in self.threads:
            thread.join(timeout=30)
        done = [answer for answer in self._answers if answer is not None]
        assert len(done) == len(self._answers), "a write did not answer"
        return done


def puts(port: int, table: str, keys: list[str]) -> Sent:
    return Sent(port, table, [("PUT", key) for key in keys])


def grouped(cluster: RunningCluster, port: int) -> tuple[float, float]:
    """Writes that have reached a group on the instance on ``port``: (sent in a group
    so far, waiting in the group not sent yet)."""
    sent = cluster.metric("shardd_write_group_size_sum", port=port) or 0.0
    return sent, cluster.metric("shardd_writes_grouping", port=port) or 0.0


def sent_held(
    cluster: RunningCluster, port: int, table: str, requests: list[tuple[str, str]]
) -> tuple[list[Response], int]:
    """``requests`` sent at once to the instance on ``port`` while s1's primary holds
    the table's writes, released once every write is in a group: (the answers, in the
    order of the requests; how many groups were sent)."""
    sent_before, _ = grouped(cluster, port)
    groups_before = cluster.metric("shardd_write_group_size_count", port=port) or 0.0
    hold = Holding(cluster.node_dsn(cluster.primary_of("s1")), TABLE_LOCK, table)
    try:
        sent = Sent(port, table, requests)
        wait_for(
            lambda: sum(grouped(cluster, port)) - sent_before == len(requests),
            timeout=30,
            what="every write in a group",
        )
    finally:
        hold.release()
    answers = sent.answers()
    groups = (cluster.metric("shardd_write_group_size_count", port=port) or 0.0) - groups_before
    return answers, int(groups)


def test_writes_waiting_for_a_connection_share_one_transaction(
    cluster: RunningCluster, table: str, narrow: Instance
) -> None:
    api = Api(narrow.port, token=TOKENS["write"])
    keys = cluster.keys_on("s1", "grouped", 16)
    existing = keys[:6]
    for key in existing:
        assert api.request("PUT", item_path(table, key), body={"old": True}).status == 201
    primary = cluster.primary_of("s1")
    replies, groups = sent_held(cluster, narrow.port, table, [("PUT", key) for key in keys])
    answers = dict(zip(keys, replies, strict=True))

    for key in keys:
        answer = answers[key]
        new = key not in existing
        assert answer.status == (201 if new else 200), (key, answer.status, answer.body)
        assert answer.body == {"pk": key, "sk": "", "version": 1 if new else 2}
        assert answer.header("ETag") == f'"{1 if new else 2}"'
        assert answer.header("Shardd-Served-By") == f"s1/{primary}"
    rows = cluster.sql(
        primary,
        "SELECT pk, xmin::text AS tx, doc::text AS doc FROM shardd_items"
        " WHERE tbl = $1 AND pk = ANY($2::text[])",
        table,
        keys,
    )
    assert sorted(row["pk"] for row in rows) == sorted(keys)
    assert all(row["doc"] == f'{{"key": "{row["pk"]}"}}' for row in rows)
    # One transaction per group, as Postgres itself recorded them, and fewer than writes.
    transactions = {row["tx"] for row in rows}
    assert len(transactions) == groups < len(keys), (len(transactions), groups)
    # Each write has its own change (the change log is what caches and views follow).
    changes = cluster.sql(
        primary,
        "SELECT count(*) AS n FROM shardd_changes WHERE tbl = $1 AND pk = ANY($2::text[])",
        table,
        keys,
    )
    assert changes[0]["n"] == len(keys) + len(existing)


def test_a_write_refused_in_a_group_does_not_fail_the_others(
    cluster: RunningCluster, table: str, narrow: Instance
) -> None:
    keys = cluster.keys_on("s1", "refused", 12)
    victim, others = keys[-1], keys[:-1]
    slot = slot_of(victim, SLOTS)
    primary = cluster.primary_of("s1")
    sent_before, _ = grouped(cluster, narrow.port)
    stale_before = cluster.metric("shardd_stale_map_retries_total", port=narrow.port) or 0.0

    hold = Holding(cluster.node_dsn(primary), TABLE_LOCK, table)
    frozen = False
    try:
        sent = puts(narrow.port, table, others)

        def open_group_with_all() -> bool:
            sent, waiting = grouped(cluster, narrow.port)
            return sent - sent_before + waiting == len(others) and waiting >= 1

        wait_for(open_group_with_all, timeout=30, what="a group still taking writes")
        victim_sent = puts(narrow.port, table, [victim])
        wait_for(
            lambda: sum(grouped(cluster, narrow.port)) - sent_before == len(keys),
            timeout=30,
            what="the victim in the open group",
        )
        # The victim's slot is cut over, as a move does: this shard refuses its writes.
        cluster.sql(primary, "UPDATE shardd_slots SET state = 'frozen' WHERE slot = $1", slot)
        frozen = True
    finally:
        hold.release()
    try:
        assert [answer.status for answer in sent.answers()] == [201] * len(others)
        assert victim_sent.threads[0].is_alive()  # still refused, retrying within its deadline
    finally:
        if frozen:
            cluster.sql(primary, "UPDATE shardd_slots SET state = 'owned' WHERE slot = $1", slot)
    (victim_answer,) = victim_sent.answers()
    assert victim_answer.status == 201, victim_answer.body
    stale = cluster.metric("shardd_stale_map_retries_total", port=narrow.port) or 0.0
    assert stale > stale_before
    rows = cluster.sql(
        primary,
        "SELECT pk, version FROM shardd_items WHERE tbl = $1 AND pk = ANY($2::text[])",
        table,
        keys,
    )
    assert {row["pk"]: row["version"] for row in rows} == dict.fromkeys(keys, 1)


def test_deletes_and_one_key_written_twice_in_a_group_each_keep_their_answer(
    cluster: RunningCluster, table: str, narrow: Instance
) -> None:
    api = Api(narrow.port, token=TOKENS["write"])
    keys = cluster.keys_on("s1", "mixed", 12)
    existing, new, absent, twice = keys[:4], keys[4:10], keys[10], keys[11]
    for key in existing:
        assert api.request("PUT", item_path(table, key), body={"old": True}).status == 201
    requests = [("PUT", key) for key in new]
    requests += [("DELETE", existing[0]), ("DELETE", existing[1]), ("DELETE", absent)]
    requests += [("PUT", twice), ("PUT", twice)]
    primary = cluster.primary_of("s1")
    answers, groups = sent_held(cluster, narrow.port, table, requests)
    statuses = [answer.status for answer in answers]
    assert statuses[: len(new)] == [201] * len(new), [a.body for a in answers]
    assert statuses[len(new) : len(new) + 3] == [204, 204, 404]
    # The key written twice: each write raised the version by one, in the order applied.
    doubled = sorted((a.body["version"], a.status) for a in answers[-2:])
    assert doubled == [(1, 201), (2, 200)], doubled
    assert groups < len(requests)
    rows = cluster.sql(
        primary,
        "SELECT pk, version FROM shardd_items WHERE tbl = $1 AND pk = ANY($2::text[])",
        table,
        keys,
    )
    expected = {key: 1 for key in [*existing[2:], *new]} | {twice: 2}
    assert {row["pk"]: row["version"] for row in rows} == expected
