"""Request handlers: parse and validate, call the cluster, shape the response.

Handlers stay thin: the operations, routing and fan-out live in shardd.dataplane,
node execution and retries in shardd.executor, input rules in shardd.api.validate.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .. import errors, idempotency, metrics, store, tables
from ..cluster import Cluster
from ..config import Settings
from ..dataplane import KeyOutcome
from ..executor import Served
from ..hotkeys import load_view as hotkeys_view
from ..nodes import describe
from ..router import SessionToken, resolve_consistency
from . import validate
from .keys import CLUSTER, SETTINGS

JSON = "application/json"
VARY = "Shardd-Session, Shardd-Consistency"


def respond(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def _ctx(request: web.Request) -> tuple[Cluster, Settings]:
    return request.app[CLUSTER], request.app[SETTINGS]


def _session(request: web.Request) -> SessionToken | None:
    raw = request.headers.get("Shardd-Session")
    return SessionToken.parse(raw) if raw is not None else None


def _consistency(request: web.Request, token: SessionToken | None) -> str:
    """The query parameter, else the header; both are checked when both are given."""
    header = request.headers.get("Shardd-Consistency")
    query = request.query.get("consistency")
    if query is not None and header is not None:
        resolve_consistency(header, token)
    return resolve_consistency(header if query is None else query, token)


def _etag(version: int) -> str:
    return f'"{version}"'


def _served_headers(
    served: Served, token: SessionToken | None = None, lsn: int | None = None
) -> dict[str, str]:
    headers = {"Shardd-Served-By": served.header()}
    if lsn is not None:
        headers["Shardd-Session"] = str((token or SessionToken({})).merged(served.shard, lsn))
    return headers


def _served_by(served: list[Served]) -> dict[str, str]:
    """Shardd-Served-By for a request that touched several shards (none: no header)."""
    if not served:
        return {}
    return {"Shardd-Served-By": ", ".join(sorted({s.header() for s in served}))}


async def _declared_table(request: web.Request) -> str:
    """The table named in the path; 404 unless it is declared."""
    cluster, _ = _ctx(request)
    return await cluster.data.declared_table(validate.table_name(request.match_info["table"]))


async def _table(request: web.Request) -> str:
    """The table named in the path, for reading or writing items: 404 unless declared,
    409 while it is being deleted."""
    cluster, _ = _ctx(request)
    return await cluster.data.active_table(validate.table_name(request.match_info["table"]))


def _key_path(request: web.Request) -> str:
    """The raw (percent-encoded) rest of /v1/tables/{table}/{items|partitions}/..., cut by
    segment, so that a table may be named ``items`` or ``partitions`` too."""
    return request.rel_url.raw_path.split("/", 5)[5]


def _item_keys(request: web.Request) -> tuple[str, str]:
    _, settings = _ctx(request)
    return validate.item_keys(_key_path(request), max_bytes=settings.max_key_bytes)


async def _body(request: web.Request) -> bytes:
    _, settings = _ctx(request)
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise errors.PayloadTooLarge(f"bodies are limited to {settings.max_body_bytes} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(
            f"bodies are limited to {settings.max_body_bytes} bytes"
        ) from None


def _limit(request: web.Request, settings: Settings) -> int:
    return validate.int_param(
        request.query.get("limit"),
        name="limit",
        default=settings.default_page_size,
        low=1,
        high=settings.max_page_size,
    )


def _item_json(table: str, item: store.Item) -> dict[str, Any]:
    return {"table": table, "pk": item.pk, "sk": item.sk, "version": item.version, "item": item.doc}


def _within(settings: Settings, entries: list[dict[str, Any]]) -> list[orjson.Fragment]:
    """The longest prefix of ``entries`` whose JSON totals at most ``max_response_bytes``
    (at least one entry, so every page makes progress), serialized once."""
    kept: list[orjson.Fragment] = []
    total = 0
    for entry in entries:
        encoded = orjson.dumps(entry)
        total += len(encoded) + 1  # and the comma
        if kept and total > settings.max_response_bytes:
            break
        kept.append(orjson.Fragment(encoded))
    return kept


# -- service endpoints ------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return respond({"status": "ok"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    metrics.observe_pools(cluster.executor.pools)
    body, content_type = metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def topology(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    topo = cluster.watcher.require_topology()
    counts = topo.slot_counts()
    health = cluster.health.snapshot
    shards = []
    for shard in topo.shards.values():
        shards.append(
            {
                "name": shard.name,
                "weight": shard.weight,
                "slots": counts.get(shard.name, 0),
                "nodes": [describe(node, health) for node in shard.nodes],
            }
        )
    return respond({"epoch": topo.epoch, "slot_count": topo.slot_count, "shards": shards})


# -- tables -----------------------------------------------------------------------


async def put_table(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    name = validate.table_name(request.match_info["table"])
    body = await _body(request)
    spec = validate.json_object(body, max_depth=settings.max_json_depth) if body else {}
    unknown = set(spec) - {"description", *validate.TABLE_OPTIONS}
    if unknown:
        raise errors.BadRequest(
            f"unknown table fields: {', '.join(sorted(unknown))}", code="invalid_table_spec"
        )
    description = spec.get("description", "")
    if not isinstance(description, str) or len(description) > 1000:
        raise errors.BadRequest(
            "description must be a string of at most 1000 characters", code="invalid_table_spec"
        )
    options = validate.table_options(spec)
    info, created = await tables.declare(
        cluster, name=name, description=description, options=options
    )
    return respond(info.as_json(), status=201 if created else 200)


async def hotkeys(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    limit = validate.int_param(
        request.query.get("limit"), name="limit", default=20, low=1, high=1000
    )
    topology = cluster.watcher.require_topology()
    async with cluster.watcher.catalog_connection() as conn:
        view = await hotkeys_view(conn, topology, settings)
    return respond(view.as_json(limit=limit))


async def list_tables(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    tables = cluster.watcher.require_topology().tables
    return respond({"tables": [tables[name].as_json() for name in sorted(tables)]})


async def get_table(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    name = await _declared_table(request)
    return respond(cluster.watcher.require_topology().tables[name].as_json())


async def delete_table(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    name = await _declared_table(request)
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise errors.BadRequest("force must be true or false", code="invalid_parameter")
    await tables.delete(cluster, name, force=force == "true")
    return web.Response(status=204)


# -- items ------------------------------------------------------------------------


async def put_item(request: web.Request) -> web.Response:
    return await _write_item(request, "put")


async def patch_item(request: web.Request) -> web.Response:
    return await _write_item(request, "patch")


async def delete_item(request: web.Request) -> web.Response:
    return await _write_item(request, "delete")


async def _write_item(request: web.Request, op: str) -> web.Response:
    cluster, settings = _ctx(request)
    table = await _table(request)
    pk, sk = _item_keys(request)
    token = _session(request)
    if_version = validate.version_condition(request.headers.get("If-Match"), header="If-Match")
    if if_version == 0:
        raise errors.BadRequest("If-Match takes an ETag, not *", code="invalid_precondition")
    none_match = None
    if op == "put":
        none_match = validate.version_condition(
            request.headers.get("If-None-Match"), header="If-None-Match"
        )
        if none_match not in (None, 0):
            raise errors.BadRequest(
                "on PUT, If-None-Match only takes *", code="invalid_precondition"
            )
    doc = None
    size = 0
    if op in ("put", "patch"):
        body = await _body(request)
        size = len(body)
        doc = validate.json_object(
            body,
            max_depth=settings.max_json_depth,
            what="the item" if op == "put" else "a merge patch",
        )
    # The item cannot both exist at a version and be absent (RFC 9110 13.2.2): 412, once
    # every input has been checked (a malformed Idempotency-Key is still 400).
    both = none_match is not None and if_version is not None
    if none_match is not None and not both:
        if_version = 0
    once = _once(request, (op, table, pk, sk, if_version, doc))
    if both:
        raise errors.PreconditionFailed(
            "If-Match and If-None-Match: * cannot both hold", current_version=None
        )
    result, served = await cluster.data.write(
        op=op, table=table, pk=pk, sk=sk, doc=doc, if_version=if_version, once=once, size=size
    )
    headers = _served_headers(served, token, result.lsn)
    if result.replayed:
        headers[idempotency.REPLAYED] = "true"
    if result.version is None:
        raise errors.NotFound(
            f"no item {pk!r}/{sk!r} in {table}", code="item_not_found", headers=headers
        )
    if op == "delete":
        return web.Response(status=204, headers=headers)
    headers["ETag"] = _etag(result.version)
    if op == "patch":
        return respond(
            {"table": table, "pk": pk, "sk": sk, "version": result.version, "item": result.doc},
            headers=headers,
        )
    return respond(
        {"pk": pk, "sk": sk, "version": result.version},
        status=201 if result.created else 200,
        headers=headers,
    )


def _once(request: web.Request, what: tuple[object, ...]) -> idempotency.Once | None:
    """The write's idempotency key, bound to this caller and to ``what`` it writes."""
    header = request.headers.get(idempotency.HEADER)
    if header is None:
        return None
    _, settings = _ctx(request)
    return idempotency.parse(
        header,
        authorization=request.headers.get("Authorization"),
        request=what,
        window=settings.idempotency_retention,
    )


async def get_item(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    table = await _table(request)
    pk, sk = _item_keys(request)
    token = _session(request)
    consistency = _consistency(request, token)
    none_match = validate.version_condition(
        request.headers.get("If-None-Match"), header="If-None-Match"
    )
    max_age = cluster.watcher.require_topology().tables[table].max_age
    item, served = await cluster.data.get(
        table=table, pk=pk, sk=sk, consistency=consistency, token=token
    )
    headers = _served_headers(served)
    # HTTP caches in front of shardd: an eventual read may be kept for the table's
    # max_age (else revalidated), a strong or session read is never stored, and the
    # headers that choose between them are part of the key (404s and 304s too).
    headers["Vary"] = VARY
    if consistency != "eventual":
        headers["Cache-Control"] = "no-store"
    else:
        headers["Cache-Control"] = f"max-age={max_age}" if max_age else "no-cache"
    if item is None:
        raise errors.NotFound(
            f"no item {pk!r}/{sk!r} in {table}", code="item_not_found", headers=headers
        )
    headers["ETag"] = _etag(item.version)
    if none_match is not None and (none_match == 0 or none_match == item.version):
        return web.Response(status=304, headers=headers)
    return respond(_item_json(table, item), headers=headers)


async def query_partition(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    table = await _table(request)
    pk = validate.decode_segment(_key_path(request), what="pk", max_bytes=settings.max_key_bytes)
    prefix = request.query.get("prefix")
    after = request.query.get("after")
    for name, value in (("prefix", prefix), ("after", after)):
        if value is not None:
            validate.key(value, what=name, max_bytes=settings.max_key_bytes, allow_empty=True)
    limit = _limit(request, settings)
    token = _session(request)
    items, served = await cluster.data.query(
        table=table,
        pk=pk,
        prefix=prefix,
        after=after,
        limit=limit,
        consistency=_consistency(request, token),
        token=token,
    )
    shaped = _within(settings, [_item_json(table, item) for item in items])
    more = len(shaped) < len(items) or len(items) == limit
    return respond(
        {"items": shaped, "next": items[len(shaped) - 1].sk if more else None},
        headers=_served_headers(served),
    )


async def scan(request: web.Request) -> web.Response:
    """One page of a table in global (pk, sk) order, after the position ``after_pk`` /
    ``after_sk`` (the ``next`` of the page before; see
    :meth:`shardd.dataplane.DataPlane.scan`)."""
    cluster, settings = _ctx(request)
    table = await _table(request)
    limit = _limit(request, settings)
    if "cursor" in request.query:
        raise errors.BadRequest(
            "scans continue at after_pk and after_sk (the page's next), not a cursor",
            code="invalid_parameter",
        )
    after_pk = validate.position(request.query.get("after_pk"), what="after_pk")
    after_sk = validate.position(request.query.get("after_sk"), what="after_sk")
    token = _session(request)
    items, served = await cluster.data.scan(
        table=table,
        after=(after_pk or "", after_sk or "") if after_pk or after_sk else None,
        limit=limit,
        consistency=_consistency(request, token),
        token=token,
    )
    shaped = _within(settings, [_item_json(table, item) for item in items[:limit]])
    last = items[len(shaped) - 1] if shaped else None
    more = len(items) > len(shaped)
    following = {"pk": last.pk, "sk": last.sk} if more and last else None
    return respond({"items": shaped, "next": following}, headers=_served_by(served))


# -- batches ----------------------------------------------------------------------


def _batch_keys(
    entries: Any, *, what: str, settings: Settings, with_item: bool
) -> list[tuple[str, str, Any]]:
    if not isinstance(entries, list):
        raise errors.BadRequest(f"{what} must be an array", code="invalid_batch")
    keys = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise errors.BadRequest(
                f"every entry of {what} must be an object", code="invalid_batch"
            )
        allowed = {"pk", "sk", "item"} if with_item else {"pk", "sk"}
        if set(entry) - allowed:
            raise errors.BadRequest(
                f"entries of {what} have only {', '.join(sorted(allowed))}", code="invalid_batch"
            )
        pk = validate.key(entry.get("pk"), what="pk", max_bytes=settings.max_key_bytes)
        sk = validate.key(
            entry.get("sk", ""), what="sk", max_bytes=settings.max_key_bytes, allow_empty=True
        )
        item = None
        if with_item:
            item = entry.get("item")
            if not isinstance(item, dict):
                raise errors.BadRequest("every put needs an item object", code="invalid_batch")
        keys.append((pk, sk, item))
    return keys


async def batch_get(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    table = await _table(request)
    body = validate.json_object(await _body(request), max_depth=settings.max_json_depth)
    if set(body) != {"keys"}:
        raise errors.BadRequest('the body is {"keys": [{"pk", "sk"}...]}', code="invalid_batch")
    entries = _batch_keys(body["keys"], what="keys", settings=settings, with_item=False)
    if not 1 <= len(entries) <= settings.max_batch_keys:
        raise errors.BadRequest(
            f"a batch holds 1 to {settings.max_batch_keys} keys", code="invalid_batch"
        )
    token = _session(request)
    keys = [(pk, sk) for pk, sk, _ in entries]
    found, served = await cluster.data.batch_get(
        table=table, keys=keys, consistency=_consistency(request, token), token=token
    )
    results = []
    for (pk, sk), item in zip(keys, found, strict=True):
        if item is None:
            results.append({"pk": pk, "sk": sk, "found": False})
        else:
            results.append(
                {"pk": pk, "sk": sk, "found": True, "version": item.version, "item": item.doc}
            )
    shaped = _within(settings, results)
    unprocessed = [{"pk": pk, "sk": sk} for pk, sk in keys[len(shaped) :]]
    return respond(
        {"table": table, "results": shaped, "unprocessed": unprocessed},
        headers=_served_by(served),
    )


def _refused_once(outcomes: list[KeyOutcome]) -> None:
    """A batch whose idempotency key was refused by a shard (in flight elsewhere, or
    used for another request) and that wrote nothing new is answered with that refusal
    as a whole."""
    refused = [
        o.error for o in outcomes if o.error is not None and o.error.code.startswith("idempotency_")
    ]
    if refused and all(o.replayed or o.error is not None for o in outcomes):
        raise refused[0]


async def batch_write(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    table = await _table(request)
    body = validate.json_object(await _body(request), max_depth=settings.max_json_depth + 3)
    if set(body) - {"puts", "deletes"}:
        raise errors.BadRequest(
            'the body is {"puts": [...], "deletes": [...]}', code="invalid_batch"
        )
    puts = _batch_keys(body.get("puts", []), what="puts", settings=settings, with_item=True)
    deletes = _batch_keys(
        body.get("deletes", []), what="deletes", settings=settings, with_item=False
    )
    for what, entries in (("puts", puts), ("deletes", deletes)):
        if len(entries) > settings.max_batch_keys:
            raise errors.BadRequest(
                f"{what} holds at most {settings.max_batch_keys} keys", code="invalid_batch"
            )
    for _, _, item in puts:
        validate.json_object(orjson.dumps(item), max_depth=settings.max_json_depth, what="an item")
    keys = [(pk, sk) for pk, sk, _ in puts + deletes]
    once = _once(request, ("batch", table, puts, [(pk, sk) for pk, sk, _ in deletes]))
    written = await cluster.data.batch_write(
        table=table,
        puts=puts,
        deletes=[(pk, sk) for pk, sk, _ in deletes],
        token=_session(request),
        once=once,
    )
    if once is not None:
        _refused_once(written.outcomes)
    shaped = []
    for index, ((pk, sk), outcome) in enumerate(zip(keys, written.outcomes, strict=True)):
        put = index < len(puts)
        entry: dict[str, Any] = {"op": "put" if put else "delete", "pk": pk, "sk": sk}
        if outcome.error is not None:
            entry["status"] = "error"
            entry["error"] = {"code": outcome.error.code, "message": outcome.error.message}
        elif put:
            entry.update(status="ok", version=outcome.version)
        else:
            entry["status"] = "deleted" if outcome.version is not None else "absent"
        shaped.append(entry)
    ok = all(r["status"] != "error" for r in shaped)
    headers = _served_by(written.served)
    if once is not None and written.outcomes and all(o.replayed for o in written.outcomes):
        headers[idempotency.REPLAYED] = "true"
    if written.session.positions:
        headers["Shardd-Session"] = str(written.session)
    return respond({"table": table, "ok": ok, "results": shaped}, headers=headers)
