"""Reading the change feed (``GET /v1/changes``) from tests: pages, cursors, draining."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any
from urllib.parse import urlencode

from tests.harness.http import Api

Seen = list[tuple[str, int, str]]  # (pk, version, op) in feed order


def feed_page(api: Api, **query: Any) -> Any:
    response = api.request("GET", "/v1/changes?" + urlencode(query))
    assert response.status == 200, response.body
    return response.body


def end_cursor(api: Api, table: str) -> str:
    """A cursor past every change of ``table`` so far."""
    cursor = None
    while True:
        page = feed_page(api, tables=table, limit=1000, **({"cursor": cursor} if cursor else {}))
        cursor = page["cursor"]
        if not page["changes"] and not page["more"]:
            return str(cursor)


def drain(api: Api, table: str, cursor: str) -> Seen:
    """Every change of ``table`` after ``cursor`` there is now."""
    seen: Seen = []
    while True:
        page = feed_page(api, tables=table, cursor=cursor, limit=1000)
        seen += [(c["pk"], c["version"], c["op"]) for c in page["changes"]]
        cursor = page["cursor"]
        if not page["changes"] and not page["more"]:
            return seen


def follow(
    api: Api, table: str, cursor: str, *, until: Any, limit: int = 7, timeout: float = 60
) -> tuple[Seen, str]:
    """Read ``table``'s changes from ``cursor`` in pages of ``limit`` until ``until(seen)``."""
    seen: Seen = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, f"feed stalled after {len(seen)} changes"
        page = feed_page(api, tables=table, cursor=cursor, limit=limit, wait=1)
        assert len(page["changes"]) <= limit
        seen += [(c["pk"], c["version"], c["op"]) for c in page["changes"]]
        assert all(c["table"] == table for c in page["changes"])
        cursor = page["cursor"]
    return seen, cursor


def by_key(seen: Seen) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = defaultdict(list)
    for pk, version, _ in seen:
        versions[pk].append(version)
    return versions
