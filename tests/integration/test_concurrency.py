"""Concurrent batches over the same keys: no deadlock, no 500, nothing lost."""

from __future__ import annotations

import threading

from tests.harness.cluster import RunningCluster
from tests.harness.http import Api, Response

ROUNDS = 40


def _race(api: Api, table: str, bodies: tuple[list[dict[str, object]], ...]) -> list[Response]:
    """Send each body list from its own client at the same moment, round by round."""
    responses: list[Response] = []
    lock = threading.Lock()
    start = threading.Barrier(len(bodies))

    def client(rounds: list[dict[str, object]]) -> None:
        own = api.as_token(api.token)
        for body in rounds:
            start.wait(timeout=60)
            response = own.request("POST", f"/v1/tables/{table}/batch/write", body=body)
            with lock:
                responses.append(response)

    threads = [threading.Thread(target=client, args=(rounds,)) for rounds in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return responses


def test_reversed_concurrent_batch_puts_never_fail(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    keys = cluster.keys_on("s1", "conc", 20) + cluster.keys_on("s2", "conc", 5)
    forward = {"puts": [{"pk": k, "item": {"by": "forward"}} for k in keys]}
    backward = {"puts": [{"pk": k, "item": {"by": "backward"}} for k in reversed(keys)]}

    responses = _race(api, table, ([forward] * ROUNDS, [backward] * ROUNDS))

    assert [r.status for r in responses] == [200] * 2 * ROUNDS, [
        r.body for r in responses if r.status != 200
    ]
    assert all(r.body["ok"] for r in responses), [r.body for r in responses if not r.body["ok"]]
    # Every put committed exactly once: each key went through 2 * ROUNDS versions.
    for key in keys:
        got = api.request("GET", f"/v1/tables/{table}/items/{key}?consistency=strong")
        assert got.body["version"] == 2 * ROUNDS, (key, got.body)


def test_reversed_concurrent_puts_and_deletes_never_fail(
    cluster: RunningCluster, api: Api, table: str
) -> None:
    """Each batch puts the keys the other deletes, in the opposite order: row locks are
    taken in key order whatever the mix of puts and deletes."""
    keys = cluster.keys_on("s3", "conc", 16)
    first, second = keys[:8], keys[8:]
    one = {
        "puts": [{"pk": k, "item": {"n": 1}} for k in first],
        "deletes": [{"pk": k} for k in second],
    }
    two = {
        "puts": [{"pk": k, "item": {"n": 2}} for k in reversed(second)],
        "deletes": [{"pk": k} for k in reversed(first)],
    }

    responses = _race(api, table, ([one] * ROUNDS, [two] * ROUNDS))

    assert [r.status for r in responses] == [200] * 2 * ROUNDS, [
        r.body for r in responses if r.status != 200
    ]
    assert all(r.body["ok"] for r in responses), [r.body for r in responses if not r.body["ok"]]
