"""Response and item size bounds: pages capped in bytes, PATCH capped at the item limit."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import orjson
import pytest

from tests.harness.cluster import TOKENS, Instance, RunningCluster
from tests.harness.http import Api, after, item_path

CAP = 4000
FILLER = "x" * 900  # about a quarter of CAP per item


@pytest.fixture
def capped(cluster: RunningCluster) -> Iterator[Api]:
    """An instance on the same cluster whose responses are capped at CAP bytes."""
    instance: Instance = cluster.start_instance(max_response_bytes=str(CAP))
    try:
        yield Api(instance.port, token=TOKENS["admin"])
    finally:
        instance.stop()


def _size(entries: list[object]) -> int:
    return sum(len(orjson.dumps(entry)) + 1 for entry in entries)


def test_scan_and_partition_pages_are_capped_in_bytes(api: Api, capped: Api, table: str) -> None:
    puts = [{"pk": f"cap-{i:02d}", "item": {"f": FILLER}} for i in range(12)]
    puts += [{"pk": "cap-part", "sk": f"{i:02d}", "item": {"f": FILLER}} for i in range(12)]
    assert api.request("POST", f"/v1/tables/{table}/batch/write", body={"puts": puts}).body["ok"]

    seen: list[tuple[str, str]] = []
    position, pages = None, 0
    while True:
        url = f"/v1/tables/{table}/scan?limit=100&consistency=strong"
        page = capped.request("GET", url + after(position)).body
        assert 1 <= len(page["items"]) < 24 and _size(page["items"]) <= CAP
        seen += [(item["pk"], item["sk"]) for item in page["items"]]
        position, pages = page["next"], pages + 1
        if position is None:
            break
    assert seen == sorted((p["pk"], p.get("sk", "")) for p in puts)
    assert pages >= 6

    sks: list[str] = []
    sk_after = None
    while True:
        url = f"/v1/tables/{table}/partitions/cap-part?consistency=strong"
        page = capped.request("GET", url + (f"&after={quote(sk_after)}" if sk_after else "")).body
        assert 1 <= len(page["items"]) < 12 and _size(page["items"]) <= CAP
        sks += [item["sk"] for item in page["items"]]
        sk_after = page["next"]
        if sk_after is None:
            break
    assert sks == [f"{i:02d}" for i in range(12)]


def test_batch_get_reports_unprocessed_keys(api: Api, capped: Api, table: str) -> None:
    puts = [{"pk": f"bg-{i:02d}", "item": {"f": FILLER}} for i in range(10)]
    api.request("POST", f"/v1/tables/{table}/batch/write", body={"puts": puts})
    keys: list[dict[str, str]] = [{"pk": f"bg-{i:02d}", "sk": ""} for i in range(10)]
    found: list[str] = []
    rounds = 0
    while keys:
        got = capped.request(
            "POST", f"/v1/tables/{table}/batch/get?consistency=strong", body={"keys": keys}
        ).body
        assert got["results"] and _size(got["results"]) <= CAP
        found += [r["pk"] for r in got["results"] if r["found"]]
        # The unprocessed keys are exactly the ones after those answered, in order.
        assert got["unprocessed"] == keys[len(got["results"]) :]
        keys = got["unprocessed"]
        rounds += 1
    assert found == [f"bg-{i:02d}" for i in range(10)]
    assert rounds >= 3
    whole = api.request("POST", f"/v1/tables/{table}/batch/get", body={"keys": [{"pk": "bg-00"}]})
    assert whole.body["unprocessed"] == []


def test_an_item_over_the_cap_still_comes_alone(api: Api, capped: Api, table: str) -> None:
    api.request("PUT", item_path(table, "big"), body={"f": "y" * (2 * CAP)})
    api.request("PUT", item_path(table, "small"), body={"f": 1})
    page = capped.request("GET", f"/v1/tables/{table}/scan?consistency=strong").body
    assert [item["pk"] for item in page["items"]] == ["big"] and page["next"]


def test_patch_never_grows_an_item_past_the_item_limit(api: Api, table: str) -> None:
    half = "z" * (600 * 1024)  # two of these are over the 1 MiB default
    assert api.request("PUT", item_path(table, "p"), body={"a": half}).status == 201
    refused = api.request("PATCH", item_path(table, "p"), body={"b": half})
    assert refused.status == 413, refused.body
    assert refused.body["error"]["code"] == "item_too_large"
    got = api.request("GET", item_path(table, "p") + "?consistency=strong").body
    assert got["version"] == 1 and set(got["item"]) == {"a"}
    # A patch that keeps it within the limit still applies.
    grown = api.request("PATCH", item_path(table, "p"), body={"b": "small"})
    assert grown.status == 200 and grown.body["version"] == 2
