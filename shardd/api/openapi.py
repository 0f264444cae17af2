"""The OpenAPI 3.1 document for API v1, generated from the route table and the settings.

Every route of :data:`shardd.api.app.ROUTES` names its :class:`Operation` here; the
document takes the paths, methods, summaries and scopes from the route table and every
limit from the settings the server runs with, so what it says is what the server
enforces: the same patterns (:mod:`shardd.api.validate` and :mod:`shardd.router` use the
same expressions), the same lengths and counts, and every status a route can answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__, changefeed, idempotency
from ..config import Settings
from ..router import CONSISTENCY_LEVELS, SESSION_TOKEN
from ..views.definition import MAX_JOIN_SK
from . import validate

if TYPE_CHECKING:
    from .app import Route

Schema = dict[str, Any]
ERROR: Schema = {"$ref": "#/components/schemas/Error"}
DOCUMENT: Schema = {"$ref": "#/components/schemas/Document"}
NO_NUL = "^[^\\u0000]*$"
# Statuses every route behind the table path can answer: bad input, auth, no topology
# or shard yet (503), the deadline (504), and 404 for an undeclared table.
TABLE_ROUTE = (400, 404, 503, 504)
WRITE_ERRORS = (409, 412, 413, 422)  # 409 and 422: idempotency keys


@dataclass(frozen=True)
class Operation:
    """What the document says about one route besides its summary and scope."""

    build: Callable[[Settings], Schema]  # parameters, requestBody and 2xx/3xx responses
    errors: tuple[int, ...] = ()


def _json(schema: Schema, description: str = "OK") -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Schema, *, required: bool = True) -> Schema:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _key(settings: Settings, *, empty: bool = False) -> Schema:
    return {
        "type": "string",
        "minLength": 0 if empty else 1,
        "maxLength": settings.max_key_bytes,
        "pattern": NO_NUL,
        "description": f"at most {settings.max_key_bytes} bytes of UTF-8, no NUL",
    }


def _param(name: str, where: str, schema: Schema, *, required: bool = False) -> Schema:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema}


TABLE = _param("table", "path", {"type": "string", "pattern": validate.TABLE_NAME.pattern})
CONSISTENCY = _param("consistency", "query", {"type": "string", "enum": list(CONSISTENCY_LEVELS)})
# The same as a header (the query parameter wins when both are given).
CONSISTENCY_HEADER = _param(
    "Shardd-Consistency", "header", {"type": "string", "enum": list(CONSISTENCY_LEVELS)}
)
SESSION = _param(
    "Shardd-Session",
    "header",
    {"type": "string", "pattern": SESSION_TOKEN.pattern},
)
IF_MATCH = _param("If-Match", "header", {"type": "string", "pattern": validate.ETAG.pattern})
IF_NONE_MATCH = _param(
    "If-None-Match", "header", {"type": "string", "pattern": validate.ETAG_OR_ANY.pattern}
)
ONLY_IF_ABSENT = _param("If-None-Match", "header", {"type": "string", "enum": ["*"]})
IDEMPOTENCY_KEY = {
    **_param(idempotency.HEADER, "header", {"type": "string", "pattern": idempotency.KEY_PATTERN}),
    "description": "A retry with the same key returns the first outcome and changes nothing"
    " (409 while the first is still applied; 422 when the key was used for another request).",
}


def _replayable(response: Schema) -> Schema:
    """A write's success, which may be the outcome recorded under its idempotency key."""
    replayed = {"schema": {"type": "string", "enum": ["true"]}}
    return {**response, "headers": {**response.get("headers", {}), idempotency.REPLAYED: replayed}}


def _limit(settings: Settings) -> Schema:
    return _param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": settings.max_page_size},
    )


def _keys(settings: Settings) -> tuple[Schema, ...]:
    return (_param("pk", "path", _key(settings)),)


def _key_object(settings: Settings, *, with_item: bool = False) -> Schema:
    properties: Schema = {"pk": _key(settings), "sk": _key(settings, empty=True)}
    if with_item:
        properties["item"] = DOCUMENT
    return {
        "type": "object",
        "required": ["pk", "item"] if with_item else ["pk"],
        "properties": properties,
        "additionalProperties": False,
    }


ITEM = {
    "type": "object",
    "required": ["table", "pk", "sk", "version", "item"],
    "properties": {
        "table": {"type": "string"},
        "pk": {"type": "string"},
        "sk": {"type": "string"},
        "version": {"type": "integer"},
        "item": {"type": "object"},
    },
}
WRITTEN = {
    "type": "object",
    "required": ["pk", "sk", "version"],
    "properties": {
        "pk": {"type": "string"},
        "sk": {"type": "string"},
        "version": {"type": "integer"},
    },
}
TABLE_INFO = {
    "type": "object",
    "required": ["name", "description"],
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "state": {"type": "string", "enum": ["active", "deleting"]},
        "cache": {"type": "string", "enum": list(validate.CACHE_MODES)},
        "cache_ttl": {"type": "number"},
        "max_age": {"type": "integer"},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
    },
}
READINESS = {
    "type": "object",
    "required": ["ready", "reads", "writes", "reason", "catalog", "epoch"],
    "properties": {
        "ready": {"type": "boolean"},
        "reads": {"type": "boolean"},
        "writes": {"type": "boolean"},
        "reason": {"type": ["string", "null"], "example": "catalog_unavailable"},
        "catalog": {"type": "boolean", "description": "the last catalog request succeeded"},
        "epoch": {"type": ["integer", "null"]},
    },
}


def _page(following: Schema) -> Schema:
    """A page of items and where the next one starts (null: this was the last)."""
    return {
        "type": "object",
        "required": ["items", "next"],
        "properties": {"items": {"type": "array", "items": ITEM}, "next": following},
    }


PLAIN = {"type": "object"}


# -- operations -------------------------------------------------------------------


def _plain(settings: Settings) -> Schema:
    return {"responses": {"200": _json(PLAIN)}}


def _readiness(settings: Settings) -> Schema:
    return {"responses": {"200": _json(READINESS)}}


def _metrics(settings: Settings) -> Schema:
    return {"responses": {"200": {"description": "Prometheus text", "content": {"text/plain": {}}}}}


def _put_table(settings: Settings) -> Schema:
    description = {"type": "string", "maxLength": 1000, "pattern": NO_NUL}
    return {
        "parameters": [TABLE],
        "requestBody": _body(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "description": description,
                    "cache": {
                        "type": "string",
                        "enum": list(validate.CACHE_MODES),
                        "description": "what the item cache keeps: nothing, hot keys, every"
                        " item read",
                    },
                    "cache_ttl": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": validate.MAX_CACHE_TTL,
                        "description": "seconds a cache entry lives",
                    },
                    "max_age": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": validate.MAX_AGE,
                        "description": "Cache-Control max-age of item reads",
                    },
                },
            },
            required=False,
        ),
        "responses": {
            "200": _json(TABLE_INFO, "Updated"),
            "201": _json(TABLE_INFO, "Created"),
        },
    }


def _get_table(settings: Settings) -> Schema:
    return {"parameters": [TABLE], "responses": {"200": _json(TABLE_INFO)}}


def _delete_table(settings: Settings) -> Schema:
    force = _param("force", "query", {"type": "string", "enum": ["true", "false"]})
    return {"parameters": [TABLE, force], "responses": {"204": {"description": "Deleted"}}}


def _item_op(method: str) -> Callable[[Settings], Schema]:
    """The item operations; each is declared for items/{pk} and items/{pk}/{sk}."""

    def build(settings: Settings) -> Schema:
        headers = {
            "PUT": [IF_MATCH, ONLY_IF_ABSENT, SESSION, IDEMPOTENCY_KEY],
            "GET": [CONSISTENCY, CONSISTENCY_HEADER, SESSION, IF_NONE_MATCH],
            "PATCH": [IF_MATCH, SESSION, IDEMPOTENCY_KEY],
            "DELETE": [IF_MATCH, SESSION, IDEMPOTENCY_KEY],
        }[method]
        responses = {
            "PUT": {
                "200": _replayable(_json(WRITTEN, "Replaced")),
                "201": _replayable(_json(WRITTEN, "Created")),
            },
            "GET": {
                "200": {
                    **_json(ITEM),
                    "headers": {
                        "Cache-Control": {
                            "description": "eventual reads: max-age=<the table's max_age>"
                            " (no-cache when 0); strong and session reads: no-store",
                            "schema": {"type": "string"},
                        },
                        "Vary": {"schema": {"type": "string"}},
                    },
                },
                "304": {"description": "Unchanged (If-None-Match)"},
            },
            "PATCH": {"200": _replayable(_json(ITEM))},
            "DELETE": {"204": _replayable({"description": "Deleted"})},
        }[method]
        operation: Schema = {
            "parameters": [TABLE, *_keys(settings), *headers],
            "responses": responses,
        }
        if method in ("PUT", "PATCH"):
            operation["requestBody"] = _body(DOCUMENT)
        return operation

    return build


def _partition(settings: Settings) -> Schema:
    return {
        "parameters": [
            TABLE,
            *_keys(settings),
            CONSISTENCY,
            CONSISTENCY_HEADER,
            SESSION,
            _limit(settings),
            _param("prefix", "query", _key(settings, empty=True)),
            _param("after", "query", _key(settings, empty=True)),
        ],
        "responses": {"200": _json(_page({"type": ["string", "null"]}))},
    }


def _scan(settings: Settings) -> Schema:
    position = {"type": "string", "pattern": NO_NUL}
    return {
        "parameters": [
            TABLE,
            CONSISTENCY,
            CONSISTENCY_HEADER,
            SESSION,
            _limit(settings),
            _param("after_pk", "query", position),
            _param("after_sk", "query", position),
        ],
        "responses": {
            "200": _json(
                _page(
                    {
                        "type": ["object", "null"],
                        "properties": {"pk": {"type": "string"}, "sk": {"type": "string"}},
                    }
                )
            )
        },
    }


def _batch_get(settings: Settings) -> Schema:
    keys = {
        "type": "array",
        "minItems": 1,
        "maxItems": settings.max_batch_keys,
        "items": _key_object(settings),
    }
    result = {
        "type": "object",
        "required": ["pk", "sk", "found"],
        "properties": {
            "pk": {"type": "string"},
            "sk": {"type": "string"},
            "found": {"type": "boolean"},
            "version": {"type": "integer"},
            "item": {"type": "object"},
        },
    }
    return {
        "parameters": [TABLE, CONSISTENCY, CONSISTENCY_HEADER, SESSION],
        "requestBody": _body(
            {
                "type": "object",
                "required": ["keys"],
                "additionalProperties": False,
                "properties": {"keys": keys},
            }
        ),
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["table", "results", "unprocessed"],
                    "properties": {
                        "table": {"type": "string"},
                        "results": {"type": "array", "items": result},
                        # Keys past max_response_bytes, in request order: ask again.
                        "unprocessed": {"type": "array", "items": _key_object(settings)},
                    },
                }
            )
        },
    }


def _batch_write(settings: Settings) -> Schema:
    def entries(with_item: bool) -> Schema:
        return {
            "type": "array",
            "maxItems": settings.max_batch_keys,
            "items": _key_object(settings, with_item=with_item),
        }

    return {
        "parameters": [TABLE, SESSION, IDEMPOTENCY_KEY],
        "requestBody": _body(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"puts": entries(True), "deletes": entries(False)},
            }
        ),
        "responses": {
            "200": _replayable(
                _json(
                    {
                        "type": "object",
                        "required": ["table", "ok", "results"],
                        "properties": {
                            "table": {"type": "string"},
                            "ok": {"type": "boolean"},
                            "results": {"type": "array", "items": PLAIN},
                        },
                    }
                )
            )
        },
    }


HOT_KEY = {
    "type": "object",
    "required": ["table", "pk", "slot", "shard", "reads_per_s", "writes_per_s", "share"],
    "properties": {
        "table": {"type": "string"},
        "pk": {"type": "string"},
        "slot": {"type": "integer"},
        "shard": {"type": ["string", "null"]},
        "reads_per_s": {"type": "number"},
        "writes_per_s": {"type": "number"},
        "share": {"type": "number", "description": "of all traffic through all instances"},
    },
}
HOT_VIEW = {
    "type": "object",
    "required": ["window_seconds", "instances", "requests_per_s", "keys", "slots", "shards"],
    "properties": {
        "window_seconds": {"type": "number"},
        "instances": {"type": "array", "items": {"type": "string"}},
        "requests_per_s": {"type": "number"},
        "keys": {"type": "array", "items": HOT_KEY, "description": "by share, highest first"},
        "slots": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "slot": {"type": "integer"},
                    "shard": {"type": ["string", "null"]},
                    "requests_per_s": {"type": "number"},
                    "share": {"type": "number"},
                },
            },
        },
        "shards": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "requests_per_s": {"type": "number"},
                    "vs_mean": {"type": "number"},
                },
            },
        },
    },
}


def _hotkeys(settings: Settings) -> Schema:
    limit = _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000})
    return {"parameters": [limit], "responses": {"200": _json(HOT_VIEW)}}


CONSUMER_NAME = _param(
    "name", "path", {"type": "string", "pattern": changefeed.CONSUMER_NAME.pattern}
)
CURSOR: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": changefeed.MAX_CURSOR_CHARS,
    "pattern": "^[A-Za-z0-9_-]+$",
    "description": "opaque: a cursor the feed returned (any other is 400 bad_cursor; one"
    " older than what the shards keep is 410 cursor_expired)",
}
CHANGE = {
    "type": "object",
    "required": ["op", "table", "pk", "sk", "version", "item", "at", "shard"],
    "properties": {
        "op": {"type": "string", "enum": ["put", "delete"]},
        "table": {"type": "string"},
        "pk": {"type": "string"},
        "sk": {"type": "string"},
        "version": {"type": "integer"},
        "item": {"type": ["object", "null"], "description": "the new item; null for a delete"},
        "at": {"type": "string", "description": "when the write's transaction started"},
        "shard": {"type": "string"},
    },
}
CONSUMER = {
    "type": "object",
    "required": ["name", "cursor", "created_at", "updated_at"],
    "properties": {
        "name": {"type": "string"},
        "cursor": {"type": "string"},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
    },
}


def _changes(settings: Settings) -> Schema:
    table = validate.TABLE_NAME.pattern.strip("^$")
    tables = {
        "type": "string",
        "pattern": f"^{table}(,{table}){{0,{changefeed.MAX_TABLES - 1}}}$",
        "description": "comma-separated declared tables (default: every table)",
    }
    return {
        "parameters": [
            _param("tables", "query", tables),
            _param("cursor", "query", CURSOR),
            _limit(settings),
            _param(
                "wait",
                "query",
                {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": changefeed.MAX_WAIT,
                    "description": "seconds to wait for a change when there is none",
                },
            ),
        ],
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["changes", "cursor", "more"],
                    "properties": {
                        "changes": {"type": "array", "items": CHANGE},
                        "cursor": {"type": "string"},
                        "more": {"type": "boolean"},
                    },
                }
            )
        },
    }


def _put_consumer(settings: Settings) -> Schema:
    return {
        "parameters": [CONSUMER_NAME],
        "requestBody": _body(
            {"type": "object", "additionalProperties": False, "properties": {"cursor": CURSOR}},
            required=False,
        ),
        "responses": {
            "200": _json(CONSUMER, "Cursor committed"),
            "201": _json(CONSUMER, "Registered"),
        },
    }


def _get_consumer(settings: Settings) -> Schema:
    return {"parameters": [CONSUMER_NAME], "responses": {"200": _json(CONSUMER)}}


def _delete_consumer(settings: Settings) -> Schema:
    return {"parameters": [CONSUMER_NAME], "responses": {"204": {"description": "Deleted"}}}


VIEW_NAME = _param("view", "path", {"type": "string", "pattern": validate.TABLE_NAME.pattern})
PATH = {"type": "string", "pattern": "^\\$(\\.[A-Za-z0-9_-]{1,64})*$"}
VIEW_FIELDS = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 64,
    "propertyNames": {"pattern": "^[A-Za-z0-9_-]{1,64}$"},
    "additionalProperties": PATH,
}
VIEW_SPEC = {
    "type": "object",
    "required": ["key"],
    "additionalProperties": False,
    "properties": {
        "description": {"type": "string", "maxLength": 1000, "pattern": NO_NUL},
        "key": {
            "type": "object",
            "required": ["pk"],
            "additionalProperties": False,
            "properties": {"pk": PATH, "sk": PATH},
        },
        "fields": VIEW_FIELDS,
        "join": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "required": ["table", "fields"],
                "additionalProperties": False,
                "properties": {
                    "table": {"type": "string", "pattern": validate.TABLE_NAME.pattern},
                    "sk": {"type": "string", "maxLength": MAX_JOIN_SK, "pattern": NO_NUL},
                    "fields": VIEW_FIELDS,
                },
            },
        },
        "where": {
            "type": "object",
            "required": ["path"],
            "additionalProperties": False,
            "properties": {"path": PATH, "equals": {}, "exists": {"type": "boolean"}},
            "oneOf": [{"required": ["equals"]}, {"required": ["exists"]}],
        },
    },
}
VIEW_INFO = {
    "type": "object",
    "required": ["name", "table", "key", "state"],
    "properties": {
        "name": {"type": "string"},
        "table": {"type": "string"},
        "description": {"type": "string"},
        "key": {"type": "object"},
        "fields": {"type": "object"},
        "join": {"type": "array"},
        "where": {"type": "object"},
        "state": {"type": "string", "enum": ["backfilling", "active", "deleting"]},
        "lag_seconds": {"type": ["number", "null"]},
        "shards": {"type": "array", "items": PLAIN},
        "created_at": {"type": "string"},
    },
}
VIEW_ROW = {
    "type": "object",
    "required": ["pk", "sk", "item", "source"],
    "properties": {
        "pk": {"type": "string"},
        "sk": {"type": "string"},
        "item": {"type": "object"},
        "source": {
            "type": "object",
            "required": ["table", "pk", "sk", "version"],
            "properties": {
                "table": {"type": "string"},
                "pk": {"type": "string"},
                "sk": {"type": "string"},
                "version": {"type": "integer"},
            },
        },
    },
}


def _put_view(settings: Settings) -> Schema:
    return {
        "parameters": [TABLE, VIEW_NAME],
        "requestBody": _body(VIEW_SPEC),
        "responses": {"200": _json(VIEW_INFO, "Unchanged"), "201": _json(VIEW_INFO, "Created")},
    }


def _get_view(settings: Settings) -> Schema:
    return {"parameters": [TABLE, VIEW_NAME], "responses": {"200": _json(VIEW_INFO)}}


def _delete_view(settings: Settings) -> Schema:
    return {"parameters": [TABLE, VIEW_NAME], "responses": {"204": {"description": "Deleted"}}}


def _list_views(settings: Settings) -> Schema:
    listing = {
        "type": "object",
        "required": ["views"],
        "properties": {"views": {"type": "array", "items": VIEW_INFO}},
    }
    return {"parameters": [TABLE], "responses": {"200": _json(listing)}}


def _view_read(*, exact: bool) -> Callable[[Settings], Schema]:
    def build(settings: Settings) -> Schema:
        extra = [] if exact else [_param("prefix", "query", _key(settings, empty=True))]
        return {
            "parameters": [
                VIEW_NAME,
                *_keys(settings),
                CONSISTENCY,
                CONSISTENCY_HEADER,
                SESSION,
                _param("wait_for", "query", {"type": "string", "pattern": SESSION_TOKEN.pattern}),
                _limit(settings),
                *extra,
                _param("after", "query", {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}),
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["items", "next"],
                        "properties": {
                            "items": {"type": "array", "items": VIEW_ROW},
                            "next": {"type": ["string", "null"]},
                        },
                    }
                )
            },
        }

    return build


OPERATIONS: dict[str, Operation] = {
    "list_views": Operation(_list_views, errors=TABLE_ROUTE),
    "put_view": Operation(_put_view, errors=(*TABLE_ROUTE, 409, 413)),
    "get_view": Operation(_get_view, errors=TABLE_ROUTE),
    "delete_view": Operation(_delete_view, errors=(*TABLE_ROUTE, 409)),
    "view_partition": Operation(_view_read(exact=False), errors=TABLE_ROUTE),
    "view_items": Operation(_view_read(exact=True), errors=TABLE_ROUTE),
    "hotkeys": Operation(_hotkeys, errors=(400, 503, 504)),
    "plain": Operation(_plain),
    "readiness": Operation(_readiness, errors=(503,)),
    "metrics": Operation(_metrics),
    "described": Operation(_plain, errors=(503,)),
    "put_table": Operation(_put_table, errors=(400, 409, 413, 503, 504)),
    "get_table": Operation(_get_table, errors=(400, 404, 503)),
    "delete_table": Operation(_delete_table, errors=(*TABLE_ROUTE, 409)),
    "put_item": Operation(_item_op("PUT"), errors=(*TABLE_ROUTE, *WRITE_ERRORS)),
    "get_item": Operation(_item_op("GET"), errors=(*TABLE_ROUTE, 409)),
    "patch_item": Operation(_item_op("PATCH"), errors=(*TABLE_ROUTE, *WRITE_ERRORS)),
    "delete_item": Operation(_item_op("DELETE"), errors=(*TABLE_ROUTE, 409, 412, 422)),
    "partition": Operation(_partition, errors=(*TABLE_ROUTE, 409)),
    "scan": Operation(_scan, errors=(*TABLE_ROUTE, 409)),
    "batch_get": Operation(_batch_get, errors=(*TABLE_ROUTE, 409, 413)),
    "batch_write": Operation(_batch_write, errors=(*TABLE_ROUTE, 409, 413, 422)),
    "changes": Operation(_changes, errors=(*TABLE_ROUTE, 410)),
    "put_consumer": Operation(_put_consumer, errors=(400, 410, 413, 503, 504)),
    "get_consumer": Operation(_get_consumer, errors=(400, 404, 503, 504)),
    "delete_consumer": Operation(_delete_consumer, errors=(400, 404, 503, 504)),
}


def _paths(path: str) -> list[str]:
    """The document's paths for a route path: the item route (one path segment or two
    of keys) is two."""
    if path.endswith("/{key:.+}"):
        base = path.removesuffix("{key:.+}")
        return [base + "{pk}", base + "{pk}/{sk}"]
    return [path]


def _with_sk(operation: Schema, settings: Settings) -> Schema:
    sk = _param("sk", "path", _key(settings, empty=True))
    params = operation["parameters"]
    at = next(i for i, p in enumerate(params) if p["name"] == "pk") + 1
    return {**operation, "parameters": [*params[:at], sk, *params[at:]]}


def document(routes: Sequence[Route], settings: Settings) -> Schema:
    paths: dict[str, dict[str, Schema]] = {}
    for route in routes:
        spec = OPERATIONS[route.operation]
        built = spec.build(settings)
        statuses = set(spec.errors)
        if route.scope is not None:
            statuses |= {401, 403}
        operation: Schema = {
            "summary": route.summary,
            "operationId": route.operation,
            **built,
            "responses": {
                **built["responses"],
                **{str(s): _json(ERROR, "Error") for s in sorted(statuses)},
            },
        }
        if route.scope is None:
            operation["security"] = []
        for index, path in enumerate(_paths(route.path)):
            described = dict(operation)
            if index:
                described = _with_sk(described, settings)
                described["operationId"] += "_sk"
            paths.setdefault(path, {})[route.method.lower()] = described
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shardd",
            "version": __version__,
            "description": "Sharded JSON item store over PostgreSQL",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(settings),
        },
        # Without tokens the server is open (and listens on loopback only).
        "security": [{"bearer": []}] if settings.tokens else [],
        "paths": paths,
    }


def _schemas(settings: Settings) -> Schema:
    text = {"type": "string", "pattern": NO_NUL}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "request_id"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "request_id": {"type": "string"},
                    },
                }
            },
        },
        # An item: a JSON object whose strings and keys hold no NUL (jsonb cannot store
        # it), nested at most max_json_depth deep.  (OpenAPI 3.1, for propertyNames.)
        "Document": {
            "type": "object",
            "propertyNames": text,
            "additionalProperties": {"$ref": "#/components/schemas/Value"},
            "description": f"nested at most {settings.max_json_depth} deep",
        },
        "Value": {
            "anyOf": [
                {"type": "null"},
                text,
                {"type": "number"},
                {"type": "boolean"},
                {"type": "array", "items": {"$ref": "#/components/schemas/Value"}},
                {"$ref": "#/components/schemas/Document"},
            ],
        },
    }
