"""Request handlers of views: declare, list, describe, delete, and read their rows.

A view row is returned as stored: ``{"pk", "sk", "item", "source": {"table", "pk",
"sk", "version"}}``.  Partition pages continue at ``after``, an opaque cursor (the last
row's sort key, base64url), because several rows may share a view sort key.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import orjson
from aiohttp import web

from .. import errors
from ..router import SessionToken
from ..views import definition, manage
from . import validate
from .handlers import (
    _body,
    _consistency,
    _ctx,
    _declared_table,
    _key_path,
    _limit,
    _served_headers,
    _session,
    _within,
    respond,
)

VIEW_NAME = validate.TABLE_NAME
CURSOR = "^[A-Za-z0-9_-]*$"
_CURSOR = re.compile(CURSOR)


def _view_name(request: web.Request) -> str:
    name = request.match_info["view"]
    if not VIEW_NAME.fullmatch(name):
        raise errors.BadRequest(
            "view names are 1-63 characters: a-z, then a-z, 0-9 or _", code="invalid_view_name"
        )
    return name


async def _view(request: web.Request, *, table: str | None) -> Any:
    cluster, _ = _ctx(request)
    name = _view_name(request)
    if name not in cluster.watcher.require_topology().views:
        await cluster.watcher.refresh()
    return manage.find(cluster.watcher.require_topology(), table, name)


async def _readable_view(request: web.Request) -> Any:
    """The view named in the path for reading its rows: 404 while it is being deleted."""
    view = await _view(request, table=None)
    if view.state == "deleting":
        raise errors.NotFound(f"view {view.name} is being deleted", code="view_not_found")
    return view


async def put_view(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    table = await _declared_table(request)
    name = _view_name(request)
    spec = validate.json_object(await _body(request), max_depth=settings.max_json_depth)
    view, created = await manage.declare(cluster, table=table, name=name, spec=spec)
    return respond(view.as_json(), status=201 if created else 200)


async def list_views(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    table = await _declared_table(request)
    views = cluster.watcher.require_topology().views
    return respond(
        {"views": [views[n].as_json() for n in sorted(views) if views[n].source == table]}
    )


async def get_view(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    table = await _declared_table(request)
    view = await _view(request, table=table)
    return respond(await manage.status(cluster, view))


async def delete_view(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    table = await _declared_table(request)
    view = await _view(request, table=table)
    await manage.delete(cluster, view)
    return web.Response(status=204)


def _cursor(raw: str | None, *, max_bytes: int) -> str | None:
    if raw is None:
        return None
    if not _CURSOR.fullmatch(raw):  # unpadded URL-safe base64 only, as the document says
        raise errors.BadRequest("after is not a cursor this view returned", code="bad_cursor")
    try:
        padded = (raw + "=" * (-len(raw) % 4)).encode()
        decoded = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise errors.BadRequest(
            "after is not a cursor this view returned", code="bad_cursor"
        ) from None
    if "\x00" in decoded or len(decoded.encode()) > 3 * 2 * max_bytes + 4:
        raise errors.BadRequest("after is not a cursor this view returned", code="bad_cursor")
    return decoded


def _encode(sk: str) -> str:
    return base64.urlsafe_b64encode(sk.encode()).decode().rstrip("=")


def _wait_token(request: web.Request) -> SessionToken | None:
    """The session to wait for: the ``Shardd-Session`` header, ``wait_for``, or both
    (then every position either names)."""
    token = _session(request)
    raw = request.query.get("wait_for")
    if raw is None:
        return token
    wanted = SessionToken.parse(raw, what="wait_for")
    return wanted if token is None else token.union(wanted)


async def _rows(
    request: web.Request, *, pk: str, prefix: str, limit: int
) -> tuple[list[Any], Any, bool]:
    cluster, settings = _ctx(request)
    view = await _readable_view(request)
    token = _wait_token(request)
    consistency = _consistency(request, token)
    after = _cursor(request.query.get("after"), max_bytes=settings.max_key_bytes)
    items, served = await cluster.data.view_rows(
        view=view.name,
        table=view.rows_table,
        pk=pk,
        prefix=prefix,
        after=after,
        limit=limit,
        consistency=consistency,
        token=token,
    )
    shaped = _within(settings, [orjson.loads(orjson.dumps(i.doc)) for i in items])
    more = len(shaped) < len(items) or len(items) == limit
    following = _encode(items[len(shaped) - 1].sk) if more and shaped else None
    return [shaped, following], served, more


async def view_partition(request: web.Request) -> web.Response:
    """Rows of one view partition in view-sort-key order (then source key)."""
    _, settings = _ctx(request)
    pk = validate.decode_segment(_key_path(request), what="pk", max_bytes=settings.max_key_bytes)
    prefix = request.query.get("prefix")
    if prefix is not None:
        validate.key(prefix, what="prefix", max_bytes=settings.max_key_bytes, allow_empty=True)
    (shaped, following), served, _ = await _rows(
        request,
        pk=pk,
        prefix=definition.sk_prefix(prefix) if prefix else "",
        limit=_limit(request, settings),
    )
    return respond({"items": shaped, "next": following}, headers=_served_headers(served))


async def view_items(request: web.Request) -> web.Response:
    """Every row with one (view pk, view sk), a page at a time."""
    _, settings = _ctx(request)
    pk, sk = validate.item_keys(_key_path(request), max_bytes=settings.max_key_bytes)
    (shaped, following), served, _ = await _rows(
        request, pk=pk, prefix=definition.exact_sk(sk), limit=_limit(request, settings)
    )
    return respond({"items": shaped, "next": following}, headers=_served_headers(served))
