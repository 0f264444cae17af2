"""Handlers of the change feed and its registered consumers (see shardd.changefeed)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import changefeed, changelog, errors
from ..changefeed import Cursor, Feed
from ..cluster import Cluster
from ..topology import Shard, Topology
from . import validate
from .handlers import _body, _ctx, respond


def feed(cluster: Cluster) -> Feed:
    """The feed over this instance's topology, reading every shard's primary."""

    async def topology() -> Topology:
        return cluster.watcher.require_topology()

    async def run(shard: Shard, work: changefeed.Work) -> Any:
        result, _ = await cluster.executor.read(
            shard,
            work,
            consistency="strong",
            min_lsn=None,
            deadline=cluster.executor.deadline(),
        )
        return result

    return Feed(topology=topology, run=run, max_bytes=cluster.settings.max_response_bytes)


def _cursor(raw: str | None) -> Cursor | None:
    return Cursor.decode(raw) if raw is not None else None


async def _tables(cluster: Cluster, raw: str | None) -> list[str] | None:
    """The tables named in ``tables`` (comma-separated), each declared; None: all."""
    if raw is None:
        return None
    names = raw.split(",")
    if len(names) > changefeed.MAX_TABLES:
        raise errors.BadRequest(
            f"tables names at most {changefeed.MAX_TABLES} tables", code="invalid_parameter"
        )
    for name in names:
        await cluster.data.declared_table(validate.table_name(name))
    return sorted(set(names))


async def changes(request: web.Request) -> web.Response:
    cluster, settings = _ctx(request)
    tables = await _tables(cluster, request.query.get("tables"))
    cursor = _cursor(request.query.get("cursor"))
    limit = validate.int_param(
        request.query.get("limit"),
        name="limit",
        default=settings.default_page_size,
        low=1,
        high=settings.max_page_size,
    )
    wait = validate.int_param(
        request.query.get("wait"), name="wait", default=0, low=0, high=changefeed.MAX_WAIT
    )
    page = await feed(cluster).read(cursor, tables=tables, limit=limit, wait=wait)
    return respond(
        {
            "changes": [change.as_json() for change in page.changes],
            "cursor": page.cursor.encode(),
            "more": page.more,
        }
    )


def _consumer_name(request: web.Request, *, existing: bool = False) -> str:
    """The consumer named in the path.  ``existing`` (reading or deleting one): held to
    the older check, which let a final newline through, so that a consumer registered
    before can still be read and deleted (and stop holding back trimming)."""
    name = request.match_info["name"]
    check = changefeed.CONSUMER_NAME.match if existing else changefeed.CONSUMER_NAME.fullmatch
    if not check(name):
        raise errors.BadRequest(
            f"consumer names match {changefeed.CONSUMER_NAME.pattern}", code="invalid_consumer"
        )
    return name


async def _on_primaries(
    cluster: Cluster, topology: Topology, work: dict[str, changefeed.Work]
) -> None:
    """``work[shard]`` on each shard's primary, in parallel; the first failure once all
    ended."""
    deadline = cluster.executor.deadline()
    outcomes = await asyncio.gather(
        *(
            cluster.executor.write(
                topology.shards[name], job, epoch=topology.epoch, deadline=deadline
            )
            for name, job in work.items()
        ),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _register(name: str, at: str) -> changefeed.Work:
    return lambda conn: changelog.register(conn, name, at)


async def put_consumer(request: web.Request) -> web.Response:
    """Register a consumer, or commit its cursor: the catalog keeps the cursor, each
    shard the consumer's position (so trimming keeps what it has not read).

    The catalog is written first: should a shard fail, its position there stays behind
    the cursor, which only keeps more (the 503 tells the client to send it again).
    """
    cluster, settings = _ctx(request)
    name = _consumer_name(request)
    body = await _body(request)
    spec = validate.json_object(body, max_depth=settings.max_json_depth) if body else {}
    if set(spec) - {"cursor"}:
        raise errors.BadRequest('the body is {"cursor": "..."}', code="invalid_consumer")
    raw = spec.get("cursor")
    if "cursor" in spec and not isinstance(raw, str):
        raise changefeed.BadCursor("cursor must be a string (a cursor the feed returned)")
    # Positions the feed would read from: a shard the cursor lacks starts at the start
    # of what it retains; an expired cursor is refused (410) before anything is written.
    topology, positions = await feed(cluster).positions(_cursor(raw))
    async with cluster.watcher.catalog_connection() as conn:
        consumer, created = await changefeed.save_consumer(conn, name, Cursor(positions))
    registered = changefeed.CONSUMER_PREFIX + name
    await _on_primaries(
        cluster,
        topology,
        {shard: _register(registered, position.pos) for shard, position in positions.items()},
    )
    return respond(consumer.as_json(), status=201 if created else 200)


async def get_consumer(request: web.Request) -> web.Response:
    cluster, _ = _ctx(request)
    name = _consumer_name(request, existing=True)
    async with cluster.watcher.catalog_connection() as conn:
        consumer = await changefeed.get_consumer(conn, name)
    if consumer is None:
        raise errors.NotFound(f"no consumer {name}", code="consumer_not_found")
    return respond(consumer.as_json())


async def delete_consumer(request: web.Request) -> web.Response:
    """Unregister a consumer: its shard positions first (so a failure leaves the catalog
    row for a retry to find), then the catalog row."""
    cluster, _ = _ctx(request)
    name = _consumer_name(request, existing=True)
    async with cluster.watcher.catalog_connection() as conn:
        if await changefeed.get_consumer(conn, name) is None:
            raise errors.NotFound(f"no consumer {name}", code="consumer_not_found")
    topology = cluster.watcher.require_topology()
    registered = changefeed.CONSUMER_PREFIX + name
    await _on_primaries(
        cluster,
        topology,
        {shard: lambda conn: changelog.unregister(conn, registered) for shard in topology.shards},
    )
    async with cluster.watcher.catalog_connection() as conn:
        await changefeed.delete_consumer(conn, name)
    return web.Response(status=204)
