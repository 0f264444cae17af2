"""The change feed's pure parts: the cursor, where a cursor reads from, round plans."""

from __future__ import annotations

import base64
import zlib
from datetime import UTC, datetime

import orjson
import pytest

from shardd.changefeed import (
    BadCursor,
    Change,
    Cursor,
    CursorExpired,
    RoundBatch,
    ShardPosition,
    ShardState,
    _within,
    plan_round,
    resolve,
    start_at,
)

ORIGIN = "7301234567890123456:00000001"
PROMOTED = "7301234567890123456:00000002"


def state(snapshot: str = "900:905:901", *, horizon: int | None = None, **kw: object) -> ShardState:
    fields: dict[str, object] = {
        "snapshot": snapshot,
        "origin": ORIGIN,
        "horizon": horizon,
        "start": start_at(100),
        "owned": frozenset(),
    }
    fields.update(kw)
    return ShardState(**fields)  # type: ignore[arg-type]


def test_a_cursor_survives_its_round_trip() -> None:
    cursor = Cursor(
        {
            "s1": ShardPosition("10:12:10,11", ORIGIN),
            "s2": ShardPosition("5:5:", ORIGIN, upto="8:9:", after=42, rank=1, idle=True),
        }
    )
    text = cursor.encode()
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert Cursor.decode(text) == cursor


def _pack(data: object) -> str:
    return base64.urlsafe_b64encode(zlib.compress(orjson.dumps(data))).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        "abc",
        base64.urlsafe_b64encode(b"plain text").decode().rstrip("="),
        _pack([1, 2]),
        _pack({"v": 2, "shards": {}}),
        _pack({"v": 1, "shards": [], "x": 1}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2:", "origin": "x"}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2", "origin": ORIGIN}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2:", "origin": ORIGIN, "after": -1}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2:", "origin": ORIGIN, "rank": True}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2:", "origin": ORIGIN, "extra": 1}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2:", "origin": ORIGIN, "upto": "a:b:"}}}),
        # Snapshots Postgres would refuse (a 500 if they reached it): xmin after xmax, an
        # id of 0, one in progress outside [xmin, xmax), out of order, past 64 bits.
        _pack({"v": 1, "shards": {"s1": {"pos": "9:1:", "origin": ORIGIN}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "0:5:", "origin": ORIGIN}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:5:7", "origin": ORIGIN}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:9:5,3", "origin": ORIGIN}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": f"1:{2**64}:", "origin": ORIGIN}}}),
        _pack({"v": 1, "shards": {"s1": {"pos": "1:2:", "origin": ORIGIN, "upto": "3:2:"}}}),
        base64.urlsafe_b64encode(zlib.compress(b"[" * 2_000_000)).decode().rstrip("="),
        "A" * 9000,
    ],
)
def test_anything_but_a_cursor_is_a_bad_cursor(text: str) -> None:
    with pytest.raises(BadCursor) as refused:
        Cursor.decode(text)
    assert refused.value.status == 400 and refused.value.code == "bad_cursor"


def test_without_a_cursor_every_shard_starts_at_what_it_keeps() -> None:
    positions = resolve(None, {"s1": state(), "s2": state(start=start_at(7))})
    assert positions == {
        "s1": ShardPosition("100:100:", ORIGIN),
        "s2": ShardPosition("7:7:", ORIGIN),
    }


def test_a_shard_added_after_the_cursor_is_read_from_the_start() -> None:
    cursor = Cursor({"s1": ShardPosition("500:500:", ORIGIN)})
    positions = resolve(cursor, {"s1": state(), "s4": state(start=start_at(3))})
    assert positions["s1"] == ShardPosition("500:500:", ORIGIN)
    assert positions["s4"] == ShardPosition("3:3:", ORIGIN)


def test_a_changed_origin_rereads_from_the_start_without_410() -> None:
    held = ShardPosition("500:502:500", ORIGIN, upto="600:600:", after=9, rank=0)
    # A synchronous failover: same transaction ids, nothing trimmed past the cursor.
    positions = resolve(Cursor({"s1": held}), {"s1": state(origin=PROMOTED, horizon=420)})
    assert positions["s1"] == ShardPosition("100:100:", PROMOTED)


def test_trimmed_past_the_cursor_is_410_whatever_the_origin() -> None:
    held = ShardPosition("500:502:500", ORIGIN)
    for origin in (ORIGIN, PROMOTED):
        with pytest.raises(CursorExpired) as expired:
            resolve(Cursor({"s1": held}), {"s1": state(origin=origin, horizon=500)})
        assert expired.value.status == 410 and expired.value.code == "cursor_expired"
    # Everything up to 499 is visible in the position: a horizon of 499 lost nothing.
    assert resolve(Cursor({"s1": held}), {"s1": state(horizon=499)})["s1"] == held


def test_a_removed_shard_is_dropped_only_once_the_cursor_has_read_all_of_it() -> None:
    idle = ShardPosition("50:50:", ORIGIN, idle=True)
    assert resolve(Cursor({"gone": idle, "s1": ShardPosition("9:9:", ORIGIN)}), {"s1": state()})[
        "s1"
    ] == ShardPosition("9:9:", ORIGIN)
    for held in (
        ShardPosition("50:50:", ORIGIN),
        ShardPosition("50:50:", ORIGIN, upto="60:60:", idle=True),
    ):
        with pytest.raises(CursorExpired):
            resolve(Cursor({"gone": held}), {"s1": state()})


def batch(owned: set[int], slots: set[int]) -> RoundBatch:
    return RoundBatch(owned=frozenset(owned), slots=frozenset(slots))


def test_the_old_owner_of_a_slot_goes_before_the_new_one() -> None:
    # Slot 7 moved from s1 to s3: s1 holds its earlier changes, s3 (the owner) the later.
    order, held = plan_round(
        {"s3": batch({7, 8}, {7, 8}), "s1": batch({1}, {1, 7}), "s2": batch({2}, {2})}
    )
    assert held == []
    assert order.index("s1") < order.index("s3")
    assert sorted(order) == ["s1", "s2", "s3"]


def test_a_slot_owned_in_two_snapshots_holds_back_the_shards_that_touch_it() -> None:
    # s1's snapshot predates its freeze of slot 7: it may still get writes of 7, so the
    # new owner's changes of 7 must wait; so must s1's own (either may be the old one).
    order, held = plan_round(
        {"s1": batch({1, 7}, {1, 7}), "s3": batch({7}, {7}), "s2": batch({2}, {2})}
    )
    assert held == ["s1", "s3"] and order == ["s2"]
    order, held = plan_round({"s1": batch({1, 7}, {1}), "s3": batch({7}, {7})})
    assert held == ["s3"] and order == ["s1"]


def test_moves_both_ways_within_a_round_still_give_an_order() -> None:
    order, held = plan_round({"a": batch({1}, {1, 2}), "b": batch({2}, {1, 2})})
    assert held == [] and sorted(order) == ["a", "b"]


def change(seq: int, doc: str) -> Change:
    return Change("s1", seq, "put", "t", "k", "", 1, doc, datetime.now(UTC))


def test_a_page_stops_at_its_byte_budget_but_always_makes_progress() -> None:
    big = [change(i, "x" * 1000) for i in range(5)]
    assert len(_within(big, 2500, first=False)) == 2
    assert len(_within(big, 10, first=True)) == 1
    assert _within(big, 10, first=False) == []
