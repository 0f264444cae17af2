"""Pure view logic: definitions, row keys and their order, projection, the rows a batch
of changes makes, and snapshot coverage."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from shardd import changelog
from shardd.errors import ApiError
from shardd.views import definition
from shardd.views.keeper import Change, plan_rows
from shardd.views.rows import SourceItem

TABLES = {"orders": 1, "users": 1}
SPEC = {
    "key": {"pk": "$.product_id", "sk": "$.created_at"},
    "fields": {"qty": "$.qty"},
    "join": [{"table": "users", "sk": "", "fields": {"user_name": "$.name"}}],
    "where": {"path": "$.status", "equals": "paid"},
}


def view() -> definition.ViewDef:
    return definition.parse("by_product", "orders", SPEC, tables=TABLES)


def test_definition_round_trips_and_rejects_bad_ones() -> None:
    parsed = view()
    assert parsed.as_json() == SPEC
    assert definition.from_json("by_product", "orders", parsed.as_json()) == parsed
    for bad in (
        {},
        {"key": {"pk": "product_id"}},
        {"key": {"pk": "$..x"}},
        {"key": {"pk": "$.x", "zz": "$.y"}},
        {"key": {"pk": "$.x"}, "fields": {}},
        {"key": {"pk": "$.x"}, "join": [{"table": "nope", "fields": {"a": "$"}}]},
        {"key": {"pk": "$.x"}, "join": [{"table": "users", "fields": {"qty": "$"}}],
         "fields": {"qty": "$.q"}},
        {"key": {"pk": "$.x"}, "where": {"path": "$.s", "equals": 1, "exists": True}},
        {"key": {"pk": "$.x"}, "where": {"path": "$.s", "exists": "yes"}},
    ):  # fmt: skip
        with pytest.raises(ApiError):
            definition.parse("v", "orders", bad, tables=TABLES)


@pytest.mark.parametrize("chars", ["ab", "a\x01\x02b", "\x01", "zA\x01"])
def test_row_keys_sort_by_view_key_then_source_and_keep_prefixes(chars: str) -> None:
    parts = ["", *("".join(p) for n in (1, 2) for p in itertools.product(chars, repeat=n))]
    keys = [(vsk, pk, sk) for vsk in parts for pk in parts[:4] for sk in parts[:3]]
    encoded = sorted(keys, key=lambda k: definition.row_sk(*k))
    assert encoded == sorted(keys)
    for vsk, pk, sk in keys:
        row = definition.row_sk(vsk, pk, sk)
        assert definition.split_sk(row) == (vsk, pk, sk)
        for cut in range(len(vsk) + 1):
            assert row.startswith(definition.sk_prefix(vsk[:cut]))
        assert row.startswith(definition.exact_sk(vsk))
        for other in parts:
            if other != vsk:
                assert not row.startswith(definition.exact_sk(other))


def test_projection_filters_joins_and_places() -> None:
    paid = {"product_id": "p1", "created_at": "t1", "qty": 2, "status": "paid", "x": 1}
    row = definition.project(
        view(), paid, pk="u1", sk="o1", version=3, joined={("users", ""): {"name": "Ann"}},
        max_key_bytes=1024,
    )  # fmt: skip
    assert row is not None
    assert (row.pk, definition.split_sk(row.sk)) == ("p1", ("t1", "u1", "o1"))
    assert row.doc["item"] == {"qty": 2, "user_name": "Ann"}
    assert row.doc["source"] == {"table": "orders", "pk": "u1", "sk": "o1", "version": 3}
    numeric = {**paid, "product_id": 17}
    assert definition.project(view(), numeric, pk="u", sk="", version=1, joined={},
                              max_key_bytes=1024).pk == "17"  # fmt: skip
    for no_row in ({**paid, "status": "open"}, {**paid, "product_id": None},
                   {**paid, "product_id": ""}, {k: v for k, v in paid.items() if k != "created_at"},
                   {**paid, "product_id": "x" * 2000}):  # fmt: skip
        assert (
            definition.project(
                view(), no_row, pk="u", sk="", version=1, joined={}, max_key_bytes=1024
            )
            is None
        )


def change(op: str, pk: str, sk: str, version: int, doc: Any, old: Any = None,
           tbl: str = "orders") -> Change:  # fmt: skip
    return Change(op, tbl, pk, sk, 0, version, doc, old, datetime.now(UTC))


def test_plan_moves_rows_removes_filtered_and_rejoins() -> None:
    a = {"product_id": "A", "created_at": "t", "qty": 1, "status": "paid"}
    b = {**a, "product_id": "B"}
    c = {**a, "product_id": "C"}
    changes = [
        change("put", "u1", "o1", 2, b, old=a),  # A -> B
        change("put", "u1", "o1", 3, c, old=b),  # B -> C: rows at A and B go
        change("put", "u2", "o1", 5, {**a, "status": "open"}, old=a),  # filtered out now
        change("delete", "u3", "o1", 7, None, old=a),
        change("put", "u4", "", 2, {"name": "New"}, old={"name": "Old"}, tbl="users"),
    ]
    dependents = {("orders", "u4"): [SourceItem("u4", "o9", 4, a)]}
    joined = {"u4": {("users", ""): {"name": "New"}}}
    writes = plan_rows(view(), changes, joined=joined, dependents=dependents, max_key_bytes=1024)
    got = {(w.pk, definition.split_sk(w.sk)[1]): (w.doc is not None, w.version) for w in writes}
    assert not any(w.force for w in writes)
    assert got == {
        ("A", "u1"): (False, 3), ("B", "u1"): (False, 3), ("C", "u1"): (True, 3),
        ("A", "u2"): (False, 5), ("A", "u3"): (False, 7), ("A", "u4"): (True, 4),
    }  # fmt: skip
    rejoined = next(w.doc for w in writes if definition.split_sk(w.sk)[1] == "u4")
    assert rejoined["item"]["user_name"] == "New"


def test_plan_replaces_the_row_of_an_item_deleted_and_created_again() -> None:
    """Versions start again at 1 after a delete: the new life's row is forced over the
    old one's, and the old view key's row goes up to the highest version seen."""
    a = {"product_id": "A", "created_at": "t", "qty": 1, "status": "paid"}
    b = {**a, "product_id": "B"}
    changes = [
        change("put", "u1", "o1", 3, a, old={**a, "qty": 0}),
        change("delete", "u1", "o1", 3, None, old=a),
        change("put", "u1", "o1", 1, b, old=None),  # created anew
    ]
    writes = plan_rows(view(), changes, joined={}, dependents={}, max_key_bytes=1024)
    got = {w.pk: (w.doc is not None, w.version, w.force) for w in writes}
    assert got == {"A": (False, 3, True), "B": (True, 1, True)}
    same_key = plan_rows(
        view(), [changes[1], change("put", "u1", "o1", 1, a, old=None)], joined={},
        dependents={}, max_key_bytes=1024,
    )  # fmt: skip
    assert [(w.pk, w.doc is not None, w.version, w.force) for w in same_key] == [
        ("A", True, 1, True)
    ]


def test_snapshot_coverage() -> None:
    assert changelog.covers("10:20:", "10:20:")
    assert changelog.covers("15:25:", "10:20:12,15")
    assert not changelog.covers("10:20:12", "10:20:")  # 12 visible in the other only
    assert changelog.covers("10:20:12", "10:20:12")
    assert not changelog.covers("10:18:", "10:20:")
    assert changelog.covers("10:18:", "10:20:18,19")
    assert changelog.covers("30:40:35", "10:20:")


def test_a_forced_row_stays_forced_when_a_join_re_projects_it() -> None:
    a = {"product_id": "A", "created_at": "t", "qty": 1, "status": "paid"}
    changes = [
        change("delete", "u1", "o7", 7, None, old=a),
        change("put", "u1", "o7", 1, a, old=None),  # created anew
        change("put", "u1", "", 3, {"name": "Bob"}, old={"name": "Ann"}, tbl="users"),
    ]
    dependents = {("orders", "u1"): [SourceItem("u1", "o7", 1, a)]}
    joined = {"u1": {("users", ""): {"name": "Bob"}}}
    writes = plan_rows(view(), changes, joined=joined, dependents=dependents, max_key_bytes=1024)
    assert [(w.version, w.force, w.doc["item"]["user_name"]) for w in writes] == [(1, True, "Bob")]


def test_a_moved_in_slot_waits_for_its_source_to_be_applied() -> None:
    from shardd.views.progress import held_back

    moves = [(frozenset({1, 2}), "s1", "10:12:"), (frozenset({7}), "gone", "5:5:")]
    applied = {("v", "s1"): "10:11:", ("w", "s1"): "12:12:"}
    assert held_back(moves, {2, 3}, applied, ["v", "w"], ["s1", "s2"]) == ["s1"]
    assert held_back(moves, {3}, applied, ["v", "w"], ["s1", "s2"]) == []
    assert held_back(moves, {7}, applied, ["v", "w"], ["s1", "s2"]) == []  # source gone
    caught_up = {("v", "s1"): "12:14:", ("w", "s1"): "12:12:"}
    assert held_back(moves, {1}, caught_up, ["v", "w"], ["s1", "s2"]) == []
    assert held_back(moves, {1}, caught_up, ["v", "w", "new"], ["s1"]) == []  # still copying


def test_open_rounds_cover_only_where_they_started() -> None:
    position = changelog.open_round("10:20:", "30:40:", 17, 1700000000.25)
    assert changelog.parse_position(position) == ("10:20:", "30:40:", 17)
    assert changelog.round_taken(position) == 1700000000.25
    assert changelog.covers(position, "10:20:")
    assert not changelog.covers(position, "25:26:")
    assert changelog.parse_position("10:20:") == ("10:20:", None, 0)


def test_a_name_must_match_whole_but_a_stored_definition_still_loads() -> None:
    spec = {"key": {"pk": "$.a"}, "fields": {"x\n": "$.b"}}
    with pytest.raises(ApiError):
        definition.parse("v", "t", spec, tables={"t": {}})
    # Declared before the check took the whole name: the topology still loads it.
    assert definition.from_json("v", "t", spec).fields == (("x\n", ("b",)),)
