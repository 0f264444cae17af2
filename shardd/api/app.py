"""The aiohttp application: the route table, middlewares and the one error shape.

Every route is declared once in :data:`ROUTES` with the scope it needs; the router,
the auth check and the OpenAPI document all read that table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from .. import errors, metrics
from ..cluster import Cluster
from ..config import Settings
from ..logs import AccessLog
from . import changes, handlers, openapi, views
from .auth import TokenTable
from .keys import ACCESS_LOG, CLUSTER, OPENAPI, SETTINGS, TOKENS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: str | None  # None: no token needed
    summary: str
    operation: str  # its entry in shardd.api.openapi.OPERATIONS


async def readyz(request: web.Request) -> web.Response:
    """200 while this instance can serve reads, with whether it can write in the body.

    A catalog outage stops writes only (once the topology lease is used up), so a load
    balancer keeps the instance for reads; ``/readyz/writes`` is the check for writes.
    """
    watcher = request.app[CLUSTER].watcher
    if watcher.draining:
        raise errors.NotReady("this instance is stopping")
    state = watcher.readiness()
    if not state["reads"]:
        raise errors.NotReady("the topology has not been loaded from the catalog yet")
    return handlers.respond(state)


async def readyz_writes(request: web.Request) -> web.Response:
    """200 while a write sent to this instance would be attempted, else 503."""
    watcher = request.app[CLUSTER].watcher
    if watcher.draining:
        raise errors.NotReady("this instance is stopping")
    state = watcher.readiness()
    if not state["reads"]:
        raise errors.NotReady("the topology has not been loaded from the catalog yet")
    if not state["writes"]:
        raise errors.CatalogUnavailable(
            "the catalog is unreachable and the topology lease has expired: writes fail"
        )
    return handlers.respond(state)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


ITEM = "/v1/tables/{table}/items/{key:.+}"
TABLE = "/v1/tables/{table}"
VIEW = TABLE + "/views/{view}"
CONSUMER = "/v1/consumers/{name}"

ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", handlers.healthz, None, "Liveness", "plain"),
    Route(
        "GET",
        "/readyz",
        readyz,
        None,
        "Readiness for reads; the body says whether writes work",
        "readiness",
    ),
    Route(
        "GET",
        "/readyz/writes",
        readyz_writes,
        None,
        "Readiness for writes (503 when not)",
        "readiness",
    ),
    Route("GET", "/metrics", handlers.metrics_endpoint, None, "Prometheus metrics", "metrics"),
    Route("GET", "/v1/openapi.json", openapi_document, None, "This OpenAPI document", "plain"),
    Route(
        "GET",
        "/v1/topology",
        handlers.topology,
        "read",
        "Epoch, shards, nodes, slot counts",
        "described",
    ),
    Route(
        "GET",
        "/v1/admin/hotkeys",
        handlers.hotkeys,
        "admin",
        "The hottest keys, slots and shards over all instances",
        "hotkeys",
    ),
    Route("GET", "/v1/tables", handlers.list_tables, "read", "List tables", "described"),
    Route("PUT", TABLE, handlers.put_table, "admin", "Create or update a table", "put_table"),
    Route("GET", TABLE, handlers.get_table, "read", "Describe a table", "get_table"),
    Route(
        "DELETE",
        TABLE,
        handlers.delete_table,
        "admin",
        "Delete a table (refuses a non-empty one without force); repeat to resume a deletion"
        " that stopped",
        "delete_table",
    ),
    Route("PUT", ITEM, handlers.put_item, "write", "Create or replace an item", "put_item"),
    Route("GET", ITEM, handlers.get_item, "read", "Read an item", "get_item"),
    Route(
        "PATCH", ITEM, handlers.patch_item, "write", "Merge-patch an item (RFC 7396)", "patch_item"
    ),
    Route("DELETE", ITEM, handlers.delete_item, "write", "Delete an item", "delete_item"),
    Route(
        "GET",
        TABLE + "/partitions/{pk}",
        handlers.query_partition,
        "read",
        "Items of one partition in sort-key order",
        "partition",
    ),
    Route(
        "POST",
        TABLE + "/batch/get",
        handlers.batch_get,
        "read",
        "Read many items",
        "batch_get",
    ),
    Route(
        "POST",
        TABLE + "/batch/write",
        handlers.batch_write,
        "write",
        "Put and delete many items, atomically per shard",
        "batch_write",
    ),
    Route(
        "GET",
        TABLE + "/scan",
        handlers.scan,
        "read",
        "Every item of a table across shards in (pk, sk) order, paginated",
        "scan",
    ),
    Route("GET", TABLE + "/views", views.list_views, "read", "List a table's views", "list_views"),
    Route(
        "PUT",
        VIEW,
        views.put_view,
        "admin",
        "Declare a view of a table (re-partitioned, projected, joined); backfilled online",
        "put_view",
    ),
    Route("GET", VIEW, views.get_view, "read", "Describe a view, with its lag", "get_view"),
    Route("DELETE", VIEW, views.delete_view, "admin", "Delete a view and its rows", "delete_view"),
    Route(
        "GET",
        "/v1/views/{view}/partitions/{pk}",
        views.view_partition,
        "read",
        "Rows of one view partition in view sort-key order",
        "view_partition",
    ),
    Route(
        "GET",
        "/v1/views/{view}/items/{key:.+}",
        views.view_items,
        "read",
        "The rows with one view key",
        "view_items",
    ),
    Route(
        "GET",
        "/v1/changes",
        changes.changes,
        "read",
        "The change feed: item changes after a cursor, in per-key order, long-polling",
        "changes",
    ),
    Route(
        "PUT",
        CONSUMER,
        changes.put_consumer,
        "write",
        "Register a change-feed consumer or commit its cursor (holds back trimming)",
        "put_consumer",
    ),
    Route("GET", CONSUMER, changes.get_consumer, "read", "A consumer's cursor", "get_consumer"),
    Route(
        "DELETE",
        CONSUMER,
        changes.delete_consumer,
        "write",
        "Unregister a change-feed consumer",
        "delete_consumer",
    ),
)


def error_body(exc: errors.ApiError, request_id: str) -> bytes:
    return orjson.dumps(
        {"error": {"code": exc.code, "message": exc.message, "request_id": request_id}}
    )


def _http_error(exc: web.HTTPException) -> errors.ApiError:
    codes = {404: "route_not_found", 405: "method_not_allowed", 413: "body_too_large"}
    allow = exc.headers.get("Allow")  # a 405 says which methods the route takes
    return errors.ApiError(
        exc.reason,
        status=exc.status,
        code=codes.get(exc.status, exc.reason.lower().replace(" ", "_")),
        headers={"Allow": allow} if allow else None,
    )


def canonical(path: str) -> str:
    """The path template aiohttp reports for a route (regex parts dropped)."""
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)


_SCOPES = {(route.method, canonical(route.path)): route.scope for route in ROUTES}


_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    """Unique across instances (random per-process prefix) without a syscall per request."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, auth, the one error shape, metrics and the access log, for every request.

    One middleware rather than several: each layer costs a coroutine per request.
    """
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID.fullmatch(incoming) else _new_request_id()
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route_name = resource.canonical if resource is not None else "unmatched"
    try:
        scope = _SCOPES.get((request.method, route_name))
        request.app[TOKENS].check(request.headers.get("Authorization"), scope)
        response = await handler(request)
    except errors.ApiError as exc:
        response = _render(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _render(_http_error(exc), request_id)
    except (*errors.CONNECT_ERRORS, *errors.LOST_CONNECTION_ERRORS) as exc:
        # Which backend and why go to the log, not to the client.
        log.warning(
            "backend connection failed: %s", exc, extra={"fields": {"request_id": request_id}}
        )
        response = _render(
            errors.ApiError(
                "a backend connection failed",
                status=503,
                code="backend_unavailable",
                headers={"Retry-After": "1"},
            ),
            request_id,
        )
    except Exception:
        log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
        response = _render(errors.ApiError("internal error"), request_id)
    response.headers["X-Request-Id"] = request_id
    elapsed = time.perf_counter() - started
    metrics.observe_request(route_name, request.method, response.status, elapsed)
    if request.app[SETTINGS].access_log:
        request.app[ACCESS_LOG].record(
            {
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "ms": round(elapsed * 1000, 3),
            }
        )
    return response


def _render(exc: errors.ApiError, request_id: str) -> web.Response:
    return web.Response(
        body=error_body(exc, request_id),
        status=exc.status,
        content_type="application/json",
        headers=exc.headers,
    )


def make_app(settings: Settings, cluster: Cluster | None = None) -> web.Application:
    app = web.Application(middlewares=[observe], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[TOKENS] = TokenTable.parse(settings.tokens)
    app[CLUSTER] = cluster or Cluster(settings)
    app[ACCESS_LOG] = AccessLog()
    app[OPENAPI] = orjson.dumps(openapi.document(ROUTES, settings))
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)

    async def run_cluster(app: web.Application) -> AsyncIterator[None]:
        cluster = app[CLUSTER]
        await cluster.start()
        loop = asyncio.get_running_loop()
        writer = loop.create_task(app[ACCESS_LOG].run(), name="access-log")
        loops = [loop.create_task(cluster.monitor.run(), name="monitor")]
        if cluster.reporter is not None:
            loops.append(loop.create_task(cluster.reporter.run(), name="traffic-reports"))
        if cluster.invalidator is not None:
            loops.append(loop.create_task(cluster.invalidator.run(), name="cache-invalidation"))
        loops.append(loop.create_task(cluster.views.run(), name="views"))
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            writer.cancel()  # writes what is left
            await asyncio.gather(*loops, writer, return_exceptions=True)
            await cluster.monitor.close()
            await cluster.close()

    app.cleanup_ctx.append(run_cluster)
    return app
