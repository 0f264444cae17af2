"""Everything a client sends is checked here before any shard sees it.

Keys arrive as percent-encoded path segments and may hold any UTF-8 but NUL ("/" is
sent as %2F), so they are decoded from the raw path strictly: malformed escapes, invalid
UTF-8, NUL bytes, empty or oversized keys are all 400s.  JSON bodies must be objects,
valid UTF-8, free of NUL characters (Postgres jsonb cannot store them) and no deeper
than ``max_json_depth``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from .. import config
from ..errors import BadRequest

TABLE_NAME = config.TABLE_NAME
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_VERSION = "[1-9][0-9]{0,17}"
# An entity tag as shardd issues it ("7"), weak (W/"7") or bare (7); with *, any version.
ETAG = re.compile(f'^(?:W/)?"({_VERSION})"$|^({_VERSION})$')
ETAG_OR_ANY = re.compile(f"^\\*$|{ETAG.pattern}")


CACHE_MODES = ("off", "hot", "all")
MAX_CACHE_TTL = 3600.0
MAX_AGE = 86400
TABLE_OPTIONS = ("cache", "cache_ttl", "max_age")


def table_options(spec: dict[str, Any]) -> dict[str, Any]:
    """A table's cache options from its declaration (defaults for the ones left out)."""
    cache = spec.get("cache", "hot")
    if cache not in CACHE_MODES:
        raise BadRequest(
            f"cache must be one of {', '.join(CACHE_MODES)}", code="invalid_table_spec"
        )
    ttl = spec.get("cache_ttl", 1.0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_CACHE_TTL:
        raise BadRequest(
            f"cache_ttl must be a number of seconds above 0 and at most {MAX_CACHE_TTL:g}",
            code="invalid_table_spec",
        )
    max_age = spec.get("max_age", 0)
    if isinstance(max_age, float) and max_age.is_integer():  # JSON does not tell 1.0 from 1
        max_age = int(max_age)
    if isinstance(max_age, bool) or not isinstance(max_age, int) or not 0 <= max_age <= MAX_AGE:
        raise BadRequest(
            f"max_age must be a whole number of seconds from 0 to {MAX_AGE}",
            code="invalid_table_spec",
        )
    return {"cache": cache, "cache_ttl": float(ttl), "max_age": max_age}


def table_name(name: str) -> str:
    if not TABLE_NAME.fullmatch(name):
        raise BadRequest("table names match ^[a-z][a-z0-9_]{0,62}$", code="invalid_table_name")
    return name


def decode_segment(raw: str, *, what: str, max_bytes: int, allow_empty: bool = False) -> str:
    if _BAD_ESCAPE.search(raw):
        raise BadRequest(f"{what}: malformed percent-encoding", code="invalid_key")
    data = unquote_to_bytes(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what}: not valid UTF-8", code="invalid_key") from None
    return key(text, what=what, max_bytes=max_bytes, allow_empty=allow_empty)


def key(text: Any, *, what: str, max_bytes: int, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a string", code="invalid_key")
    if not text and not allow_empty:
        raise BadRequest(f"{what} must not be empty", code="invalid_key")
    if "\x00" in text:
        raise BadRequest(f"{what} must not contain NUL", code="invalid_key")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid UTF-8", code="invalid_key") from None
    if size > max_bytes:
        raise BadRequest(f"{what} is longer than {max_bytes} bytes", code="invalid_key")
    return text


def item_keys(raw_rest: str, *, max_bytes: int) -> tuple[str, str]:
    """``pk`` or ``pk/sk`` (raw, percent-encoded) -> decoded (pk, sk); sk defaults to ""."""
    parts = raw_rest.split("/")
    if len(parts) not in (1, 2):
        raise BadRequest(
            "item paths are items/{pk} or items/{pk}/{sk}; encode '/' in keys as %2F",
            code="invalid_key",
        )
    pk = decode_segment(parts[0], what="pk", max_bytes=max_bytes)
    sk = (
        decode_segment(parts[1], what="sk", max_bytes=max_bytes, allow_empty=True)
        if len(parts) == 2
        else ""
    )
    return pk, sk


def json_value(body: bytes, *, max_depth: int) -> Any:
    if not body:
        raise BadRequest("a JSON body is required", code="invalid_json")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}", code="invalid_json") from None
    _check_tree(value, max_depth)
    return value


def json_object(body: bytes, *, max_depth: int, what: str = "the body") -> dict[str, Any]:
    value = json_value(body, max_depth=max_depth)
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object", code="invalid_json")
    return value


def _check_tree(value: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                raise BadRequest(f"JSON nested deeper than {max_depth}", code="invalid_json")
            for k, v in node.items():
                if "\x00" in k:
                    raise BadRequest("JSON keys must not contain NUL", code="invalid_json")
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > max_depth:
                raise BadRequest(f"JSON nested deeper than {max_depth}", code="invalid_json")
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str) and "\x00" in node:
            raise BadRequest("JSON strings must not contain NUL", code="invalid_json")


def int_param(raw: str | None, *, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise BadRequest(f"{name} must be an integer", code="invalid_parameter")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", code="invalid_parameter")
    return value


def version_condition(raw: str | None, *, header: str) -> int | None:
    """An ETag from If-Match / If-None-Match: '"7"', 'W/"7"' or '7'; '*' means 0 (absent)."""
    if raw is None:
        return None
    text = raw.strip()
    if text == "*":
        return 0
    matched = ETAG.fullmatch(text)
    if matched is None:
        raise BadRequest(f'{header} must be an ETag like "3"', code="invalid_precondition")
    return int(matched.group(1) or matched.group(2))


def position(raw: str | None, *, what: str) -> str | None:
    """A scan position (a key, or any string between keys): no NUL, no other limit."""
    if raw is not None and "\x00" in raw:
        raise BadRequest(f"{what} must not contain NUL", code="invalid_parameter")
    return raw
