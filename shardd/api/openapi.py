"""The OpenAPI 3 document for API v1 (a test checks it names every route of the app)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .. import __version__

ERROR = {"$ref": "#/components/schemas/Error"}
KEY = {"type": "string", "minLength": 1, "maxLength": 256}
TABLE = {
    "name": "table",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,62}$"},
}
PK = {"name": "pk", "in": "path", "required": True, "schema": KEY}
SK = {"name": "sk", "in": "path", "required": True, "schema": KEY}
CONSISTENCY = {
    "name": "consistency",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["strong", "session", "eventual"]},
}
SESSION = {
    "name": "Shardd-Session",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_-]*:[0-9]{1,19}$"},
}
IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": '^"[1-9][0-9]{0,8}"$'},
}
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": '^("[1-9][0-9]{0,8}"|\\*)$'},
}
LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
}
JSON_OBJECT = {"type": "object"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _json(ERROR, "Error") for status in statuses}


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


ITEM_RESPONSE = {
    "type": "object",
    "required": ["table", "pk", "sk", "version", "item"],
    "properties": {
        "table": {"type": "string"},
        "pk": {"type": "string"},
        "sk": {"type": "string"},
        "version": {"type": "integer"},
        "item": JSON_OBJECT,
    },
}
WRITE_RESPONSE = {
    "type": "object",
    "required": ["pk", "sk", "version"],
    "properties": {
        "pk": {"type": "string"},
        "sk": {"type": "string"},
        "version": {"type": "integer"},
    },
}
TABLE_RESPONSE = {
    "type": "object",
    "required": ["name", "description"],
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "state": {"type": "string", "enum": ["active", "deleting"]},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
    },
}
KEY_OBJECT = {
    "type": "object",
    "required": ["pk"],
    "properties": {"pk": KEY, "sk": {"type": "string", "maxLength": 256}},
    "additionalProperties": False,
}
BATCH_GET_RESPONSE = {
    "type": "object",
    "required": ["table", "results", "unprocessed"],
    "properties": {
        "table": {"type": "string"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["pk", "sk", "found"],
                "properties": {
                    "pk": {"type": "string"},
                    "sk": {"type": "string"},
                    "found": {"type": "boolean"},
                    "version": {"type": "integer"},
                    "item": JSON_OBJECT,
                },
            },
        },
        # Keys past max_response_bytes, in request order: ask for them again.
        "unprocessed": {"type": "array", "items": KEY_OBJECT},
    },
}
COMMON = (400, 401, 403, 503, 504)


def _item_ops(with_sk: bool) -> dict[str, Any]:
    params = [TABLE, PK, SK] if with_sk else [TABLE, PK]
    return {
        "put": {
            "summary": "Create or replace an item",
            "parameters": [*params, IF_MATCH, IF_NONE_MATCH, SESSION],
            "requestBody": _body(JSON_OBJECT),
            "responses": {
                "200": _json(WRITE_RESPONSE, "Replaced"),
                "201": _json(WRITE_RESPONSE, "Created"),
                **_errors(*COMMON, 404, 409, 412, 413),
            },
        },
        "get": {
            "summary": "Read an item",
            "parameters": [*params, CONSISTENCY, SESSION, IF_NONE_MATCH],
            "responses": {
                "200": _json(ITEM_RESPONSE),
                "304": {"description": "Unchanged"},
                **_errors(*COMMON, 404, 409),
            },
        },
        "patch": {
            "summary": "Merge-patch an item (RFC 7396)",
            "parameters": [*params, IF_MATCH, SESSION],
            "requestBody": _body(JSON_OBJECT),
            "responses": {"200": _json(ITEM_RESPONSE), **_errors(*COMMON, 404, 409, 412, 413)},
        },
        "delete": {
            "summary": "Delete an item",
            "parameters": [*params, IF_MATCH, SESSION],
            "responses": {"204": {"description": "Deleted"}, **_errors(*COMMON, 404, 409, 412)},
        },
    }


def document() -> dict[str, Any]:
    plain = {"type": "object"}
    readiness = {
        "type": "object",
        "required": ["ready", "reads", "writes", "reason", "catalog", "epoch"],
        "properties": {
            "ready": {"type": "boolean"},
            "reads": {"type": "boolean"},
            "writes": {"type": "boolean"},
            "reason": {"type": "string", "nullable": True, "example": "catalog_unavailable"},
            "catalog": {"type": "boolean", "description": "the last catalog request succeeded"},
            "epoch": {"type": "integer"},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "shardd",
            "version": __version__,
            "description": "Sharded JSON item store over PostgreSQL",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
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
                }
            },
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/healthz": {
                "get": {"summary": "Liveness", "security": [], "responses": {"200": _json(plain)}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness for reads; the body says whether writes work",
                    "security": [],
                    "responses": {"200": _json(readiness), **_errors(503)},
                }
            },
            "/readyz/writes": {
                "get": {
                    "summary": "Readiness for writes (503 catalog_unavailable when not)",
                    "security": [],
                    "responses": {"200": _json(readiness), **_errors(503)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {
                        "200": {"description": "Prometheus text", "content": {"text/plain": {}}}
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json(plain)},
                }
            },
            "/v1/topology": {
                "get": {
                    "summary": "Epoch, shards, nodes, slot counts",
                    "responses": {"200": _json(plain), **_errors(401, 403)},
                }
            },
            "/v1/tables": {
                "get": {
                    "summary": "List tables",
                    "responses": {"200": _json(plain), **_errors(401, 403)},
                }
            },
            "/v1/tables/{table}": {
                "put": {
                    "summary": "Create or update a table",
                    "parameters": [TABLE],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"description": {"type": "string", "maxLength": 1000}},
                        },
                        required=False,
                    ),
                    "responses": {
                        "200": _json(TABLE_RESPONSE, "Updated"),
                        "201": _json(TABLE_RESPONSE, "Created"),
                        **_errors(*COMMON, 409, 413),
                    },
                },
                "get": {
                    "summary": "Describe a table",
                    "parameters": [TABLE],
                    "responses": {"200": _json(TABLE_RESPONSE), **_errors(*COMMON, 404)},
                },
                "delete": {
                    "summary": "Delete a table (refuses a non-empty one without force); "
                    "repeat to resume a deletion that stopped",
                    "parameters": [
                        TABLE,
                        {
                            "name": "force",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["true", "false"]},
                        },
                    ],
                    "responses": {"204": {"description": "Deleted"}, **_errors(*COMMON, 404, 409)},
                },
            },
            "/v1/tables/{table}/items/{pk}": _item_ops(with_sk=False),
            "/v1/tables/{table}/items/{pk}/{sk}": _item_ops(with_sk=True),
            "/v1/tables/{table}/partitions/{pk}": {
                "get": {
                    "summary": "Items of one partition in sort-key order",
                    "parameters": [
                        TABLE,
                        PK,
                        CONSISTENCY,
                        SESSION,
                        LIMIT,
                        {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json(plain), **_errors(*COMMON, 404, 409)},
                }
            },
            "/v1/tables/{table}/batch/get": {
                "post": {
                    "summary": "Read many items",
                    "parameters": [TABLE, CONSISTENCY, SESSION],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["keys"],
                            "additionalProperties": False,
                            "properties": {
                                "keys": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 100,
                                    "items": KEY_OBJECT,
                                }
                            },
                        }
                    ),
                    "responses": {
                        "200": _json(BATCH_GET_RESPONSE),
                        **_errors(*COMMON, 404, 409, 413),
                    },
                }
            },
            "/v1/tables/{table}/batch/write": {
                "post": {
                    "summary": "Put and delete many items, atomically per shard",
                    "parameters": [TABLE, SESSION],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "puts": {
                                    "type": "array",
                                    "maxItems": 50,
                                    "items": {
                                        "type": "object",
                                        "required": ["pk", "item"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "pk": KEY,
                                            "sk": {"type": "string"},
                                            "item": JSON_OBJECT,
                                        },
                                    },
                                },
                                "deletes": {"type": "array", "maxItems": 50, "items": KEY_OBJECT},
                            },
                        }
                    ),
                    "responses": {"200": _json(plain), **_errors(*COMMON, 404, 409, 413)},
                }
            },
            "/v1/tables/{table}/scan": {
                "get": {
                    "summary": "Every item of a table across shards, paginated",
                    "parameters": [
                        TABLE,
                        CONSISTENCY,
                        SESSION,
                        LIMIT,
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json(plain), **_errors(*COMMON, 404, 409)},
                }
            },
        },
    }


_DOCUMENT = orjson.dumps(document())


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT, content_type="application/json")
