"""Input validation: keys, JSON bodies, cursors, preconditions."""

from __future__ import annotations

import pytest

from shardd.api import validate
from shardd.api.views import _cursor, _encode
from shardd.errors import BadRequest


def test_item_keys_decode_percent_encoding() -> None:
    assert validate.item_keys("a%2Fb", max_bytes=10) == ("a/b", "")
    assert validate.item_keys("%C3%BC/x%20y", max_bytes=10) == ("ü", "x y")
    assert validate.item_keys("pk/", max_bytes=10) == ("pk", "")


@pytest.mark.parametrize("raw", ["%zz", "%4", "%FF", "a%00", "", "a/b/c", "x" * 11])
def test_item_keys_reject(raw: str) -> None:
    with pytest.raises(BadRequest):
        validate.item_keys(raw, max_bytes=10)


def test_json_object_limits() -> None:
    assert validate.json_object(b'{"a": [1, {"b": null}]}', max_depth=3) == {"a": [1, {"b": None}]}
    with pytest.raises(BadRequest):
        validate.json_object(b'{"a": [1, {"b": [2]}]}', max_depth=3)
    for bad in (b"[]", b'{"a": "\\u0000"}', b"\xff", b"{", b""):
        with pytest.raises(BadRequest):
            validate.json_object(bad, max_depth=5)


def test_scan_positions_take_any_text_but_nul() -> None:
    assert validate.position("a/b ü", what="after_pk") == "a/b ü"
    assert validate.position(None, what="after_pk") is None
    with pytest.raises(BadRequest):
        validate.position("a\x00", what="after_pk")


def test_version_conditions() -> None:
    assert validate.version_condition('"3"', header="If-Match") == 3
    assert validate.version_condition('W/"3"', header="If-Match") == 3
    assert validate.version_condition("*", header="If-None-Match") == 0
    assert validate.version_condition(None, header="If-Match") is None
    for bad in ('"0"', '"x"', "", '"' + "9" * 30 + '"'):
        with pytest.raises(BadRequest):
            validate.version_condition(bad, header="If-Match")


def test_table_names() -> None:
    assert validate.table_name("orders_2026") == "orders_2026"
    for bad in ("Orders", "_x", "1x", "a" * 64, "", "orders\n"):
        with pytest.raises(BadRequest):
            validate.table_name(bad)


def test_view_cursors_are_unpadded_url_safe_base64_only() -> None:
    assert _cursor(_encode("sk-7"), max_bytes=1024) == "sk-7"
    for bad in ("QQ==", "Pz8+", "Pz8/", "!"):  # padding and the other alphabet's characters
        with pytest.raises(BadRequest):
            _cursor(bad, max_bytes=1024)
