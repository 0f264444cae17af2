"""A view's definition, and what it makes of one source item: pure functions only.

A definition names JSON paths into the source item: ``key.pk`` (required) and
``key.sk`` (optional) place the view row, ``fields`` picks what it keeps (omitted: the
whole item), ``join`` copies fields from items of other tables with the same ``pk``
(they live on the same shard, so a join is a local read), ``where`` filters.  A path is
``$`` or ``$.name.name...``; names are letters, digits, ``_`` and ``-``.

View rows are items of an internal table (:func:`rows_table`) whose partition key is
the view's and whose sort key is :func:`row_sk`: the view sort key, then the source
item's key, each escaped so that rows sort by view sort key first and a prefix of the
view sort key is a prefix of the row's sort key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import TABLE_NAME
from ..errors import BadRequest, NotFound

ROWS_PREFIX = "~v:"  # item tables of views; user table names cannot start with "~"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_FIELDS = 64
MAX_JOINS = 8
MAX_JOIN_SK = 1024  # characters
# Row sort keys: "\x01" is escaped as "\x01\x02" and parts are joined by "\x01\x01", so
# the separator sorts below every character a key can hold and escaping keeps prefixes.
_ESC = "\x01"
_SEP = "\x01\x01"


def rows_table(view: str, generation: int) -> str:
    """The internal item table that holds the rows of one declaration of ``view``."""
    return f"{ROWS_PREFIX}{view}:{generation}"


def _escape(part: str) -> str:
    return part.replace(_ESC, _ESC + "\x02")


def _unescape(part: str) -> str:
    return part.replace(_ESC + "\x02", _ESC)


HASHED = "\x02#"  # the source-key part of a row sort key that would be too long


def row_sk(vsk: str, pk: str, sk: str, *, max_bytes: int = 1024) -> str:
    """The row's sort key; when the whole would exceed ``max_bytes`` (item keys have the
    same bound, which keeps index entries within Postgres's limit), the source key is
    replaced by its digest (the row still says which item it comes from)."""
    full = _SEP.join((_escape(vsk), _escape(pk), _escape(sk)))
    if len(full.encode()) <= max_bytes:
        return full
    digest = hashlib.sha256(f"{pk}\x00{sk}".encode()).hexdigest()
    return _SEP.join((_escape(vsk), HASHED + digest, ""))


def sk_prefix(vsk_prefix: str) -> str:
    """The row sort-key prefix of every row whose view sort key starts with this."""
    return _escape(vsk_prefix)


def exact_sk(vsk: str) -> str:
    """The row sort-key prefix of every row whose view sort key is exactly ``vsk``."""
    return _escape(vsk) + _SEP


def split_sk(row: str) -> tuple[str, str, str]:
    vsk, pk, sk = row.split(_SEP)
    return _unescape(vsk), _unescape(pk), _unescape(sk)


Path = tuple[str, ...]


def _name_ok(name: str, *, stored: bool) -> bool:
    """A field or path name: the whole of it matches.  A stored definition is held to
    the older check, which let a final newline through, so that a view declared before
    still loads (the topology holds every view)."""
    return bool((_NAME.match if stored else _NAME.fullmatch)(name))


def parse_path(text: Any, *, what: str, stored: bool = False) -> Path:
    if not isinstance(text, str) or not (text == "$" or text.startswith("$.")):
        raise BadRequest(f"{what} must be a JSON path like $.name", code="invalid_view")
    names = tuple(text[2:].split(".")) if text != "$" else ()
    if any(not _name_ok(name, stored=stored) for name in names):
        raise BadRequest(
            f"{what}: path names are letters, digits, _ and - ({text!r})", code="invalid_view"
        )
    return names


def path_text(path: Path) -> str:
    return "$" + "".join("." + name for name in path)


_MISSING = object()


def lookup(doc: Any, path: Path) -> Any:
    for name in path:
        if not isinstance(doc, dict) or name not in doc:
            return _MISSING
        doc = doc[name]
    return doc


@dataclass(frozen=True)
class Join:
    table: str
    sk: str
    fields: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class Where:
    path: Path
    equals: Any = None
    exists: bool | None = None  # set: the test is presence (True) or absence (False)

    def test(self, doc: Any) -> bool:
        value = lookup(doc, self.path)
        if self.exists is not None:
            return (value is not _MISSING) == self.exists
        return value is not _MISSING and value == self.equals and type(value) is type(self.equals)


@dataclass(frozen=True)
class ViewDef:
    name: str
    source: str
    pk: Path
    sk: Path | None
    fields: tuple[tuple[str, Path], ...] | None  # None: the whole item
    joins: tuple[Join, ...] = ()
    where: Where | None = None

    def as_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"key": {"pk": path_text(self.pk)}}
        if self.sk is not None:
            spec["key"]["sk"] = path_text(self.sk)
        if self.fields is not None:
            spec["fields"] = {name: path_text(path) for name, path in self.fields}
        if self.joins:
            spec["join"] = [
                {
                    "table": join.table,
                    "sk": join.sk,
                    "fields": {name: path_text(path) for name, path in join.fields},
                }
                for join in self.joins
            ]
        if self.where is not None:
            where: dict[str, Any] = {"path": path_text(self.where.path)}
            if self.where.exists is not None:
                where["exists"] = self.where.exists
            else:
                where["equals"] = self.where.equals
            spec["where"] = where
        return spec

    def join_tables(self) -> frozenset[str]:
        return frozenset(join.table for join in self.joins)

    def joined_by(self, table: str, sk: str) -> bool:
        """Whether a change of (table, any pk, sk) changes rows of this view."""
        return any(join.table == table and join.sk == sk for join in self.joins)


def _fields(spec: Any, *, what: str, stored: bool = False) -> tuple[tuple[str, Path], ...]:
    if not isinstance(spec, dict) or not spec or len(spec) > MAX_FIELDS:
        raise BadRequest(
            f"{what} must be an object of 1 to {MAX_FIELDS} name: path pairs",
            code="invalid_view",
        )
    for name in spec:
        if not _name_ok(name, stored=stored):
            raise BadRequest(
                f"{what}: field names are letters, digits, _ and - ({name!r})",
                code="invalid_view",
            )
    return tuple(
        (name, parse_path(path, what=f"{what}.{name}", stored=stored))
        for name, path in sorted(spec.items())
    )


def parse(
    name: str,
    source: str,
    spec: Mapping[str, Any],
    *,
    tables: Mapping[str, Any],
    stored: bool = False,
) -> ViewDef:
    """A definition from its JSON; 400 (``invalid_view``) or 404 (unknown table) when it
    is not one.  ``tables`` are the declared tables: joins must name one of them;
    ``stored``: one from the catalog (see :func:`_name_ok`)."""
    unknown = set(spec) - {"key", "fields", "join", "where", "description"}
    if unknown:
        raise BadRequest(f"unknown view fields: {', '.join(sorted(unknown))}", code="invalid_view")
    key = spec.get("key")
    if not isinstance(key, dict) or "pk" not in key or set(key) - {"pk", "sk"}:
        raise BadRequest('key must be {"pk": path[, "sk": path]}', code="invalid_view")
    pk = parse_path(key["pk"], what="key.pk", stored=stored)
    sk = parse_path(key["sk"], what="key.sk", stored=stored) if "sk" in key else None
    fields = _fields(spec["fields"], what="fields", stored=stored) if "fields" in spec else None
    joins_spec = spec.get("join", [])
    if not isinstance(joins_spec, list) or len(joins_spec) > MAX_JOINS:
        raise BadRequest(f"join must be a list of at most {MAX_JOINS}", code="invalid_view")
    joins = []
    taken = {name for name, _ in fields or ()}
    for index, join in enumerate(joins_spec):
        what = f"join[{index}]"
        if (
            not isinstance(join, dict)
            or set(join) - {"table", "sk", "fields"}
            or not {
                "table",
                "fields",
            }
            <= set(join)
        ):
            raise BadRequest(
                f'{what} must be {{"table": name, "sk": key, "fields": {{...}}}}',
                code="invalid_view",
            )
        table = join["table"]
        if not isinstance(table, str) or not TABLE_NAME.fullmatch(table):
            raise BadRequest(f"{what}.table must be a table name", code="invalid_view")
        if table not in tables:
            raise NotFound(f"{what}: no table named {table}", code="unknown_table")
        join_sk = join.get("sk", "")
        if not isinstance(join_sk, str) or "\x00" in join_sk or len(join_sk) > MAX_JOIN_SK:
            raise BadRequest(
                f"{what}.sk must be a string of at most {MAX_JOIN_SK} characters",
                code="invalid_view",
            )
        join_fields = _fields(join["fields"], what=f"{what}.fields", stored=stored)
        clash = taken & {name for name, _ in join_fields}
        if clash:
            raise BadRequest(
                f"{what}: field names used twice: {', '.join(sorted(clash))}",
                code="invalid_view",
            )
        taken |= {name for name, _ in join_fields}
        joins.append(Join(table, join_sk, join_fields))
    where = None
    if "where" in spec:
        where_spec = spec["where"]
        if (
            not isinstance(where_spec, dict)
            or "path" not in where_spec
            or len(set(where_spec) & {"equals", "exists"}) != 1
            or set(where_spec) - {"path", "equals", "exists"}
        ):
            raise BadRequest(
                'where must be {"path": path, "equals": value} or {"path": path, "exists": bool}',
                code="invalid_view",
            )
        path = parse_path(where_spec["path"], what="where.path", stored=stored)
        if "exists" in where_spec:
            if not isinstance(where_spec["exists"], bool):
                raise BadRequest("where.exists must be true or false", code="invalid_view")
            where = Where(path, exists=where_spec["exists"])
        else:
            where = Where(path, equals=where_spec["equals"])
    return ViewDef(name, source, pk, sk, fields, tuple(joins), where)


def from_json(name: str, source: str, spec: Mapping[str, Any]) -> ViewDef:
    """A stored definition (checked when it was declared)."""
    return parse(name, source, spec, tables=_ANY, stored=True)


class _AnyTable(dict[str, Any]):
    def __contains__(self, key: object) -> bool:
        return True


_ANY = _AnyTable()


def _key_text(value: Any) -> str | None:
    """A view key from an item's value: strings as they are, numbers as JSON writes them;
    anything else (and the empty string for a partition key) has no row."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return orjson.dumps(value).decode()
    return None


@dataclass(frozen=True)
class Row:
    """One view row: where it goes and what it holds."""

    pk: str  # the view's partition key
    sk: str  # the row's sort key (row_sk)
    doc: dict[str, Any]

    @property
    def source_version(self) -> int:
        return int(self.doc["source"]["version"])


def row_key(
    view: ViewDef, doc: Any, pk: str, sk: str, *, max_key_bytes: int
) -> tuple[str, str] | None:
    """(view pk, row sk) of the source item ``doc`` at (pk, sk), or None: no row."""
    if not isinstance(doc, dict) or (view.where is not None and not view.where.test(doc)):
        return None
    vpk = _key_text(lookup(doc, view.pk))
    if not vpk or len(vpk.encode()) > max_key_bytes or "\x00" in vpk:
        return None
    vsk = ""
    if view.sk is not None:
        found = _key_text(lookup(doc, view.sk))
        # Room is left for the separators and a digest of the source key.
        if found is None or len(_escape(found).encode()) > max_key_bytes - 72 or "\x00" in found:
            return None
        vsk = found
    return vpk, row_sk(vsk, pk, sk, max_bytes=max_key_bytes)


def project(
    view: ViewDef,
    doc: Any,
    *,
    pk: str,
    sk: str,
    version: int,
    joined: Mapping[tuple[str, str], Any],
    max_key_bytes: int,
) -> Row | None:
    """The view row of source item ``doc`` (at version ``version``), or None.

    ``joined`` holds the documents of the joined items, by (table, sk), of the same pk
    (absent ones missing): their fields are copied in, a missing one's are left out.
    """
    placed = row_key(view, doc, pk, sk, max_key_bytes=max_key_bytes)
    if placed is None:
        return None
    vpk, rsk = placed
    if view.fields is None:
        item: dict[str, Any] = dict(doc)
    else:
        item = {}
        for name, path in view.fields:
            value = lookup(doc, path)
            if value is not _MISSING:
                item[name] = value
    for join in view.joins:
        other = joined.get((join.table, join.sk))
        if other is None:
            continue
        for name, path in join.fields:
            value = lookup(other, path)
            if value is not _MISSING:
                item[name] = value
    vsk = split_sk(rsk)[0]
    return Row(
        vpk,
        rsk,
        {
            "pk": vpk,
            "sk": vsk,
            "item": item,
            "source": {"table": view.source, "pk": pk, "sk": sk, "version": version},
        },
    )
