"""A raw HTTP client for tests: sends paths and bodies byte for byte (no re-encoding)."""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        return orjson.loads(self.raw) if self.raw else None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Api:
    def __init__(self, port: int, *, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self._conn: http.client.HTTPConnection | None = None

    def as_token(self, token: str | None) -> Api:
        return Api(self.port, token=token)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        payload = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        sent = {"Content-Type": "application/json"} if payload is not None else {}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self._conn.putrequest(method, path, skip_accept_encoding=True)
                for name, value in sent.items():
                    self._conn.putheader(name, value)
                if payload is not None:
                    self._conn.putheader("Content-Length", str(len(payload)))
                self._conn.endheaders(payload)
                resp = self._conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            result = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            if resp.will_close:
                self._conn.close()
                self._conn = None
            return result
        raise AssertionError("unreachable")


def topology_nodes(api: Api) -> dict[str, dict[str, Any]]:
    """Every node by name as ``GET /v1/topology`` describes it now (role, health, lag)."""
    shards = api.request("GET", "/v1/topology").body["shards"]
    return {node["name"]: node for shard in shards for node in shard["nodes"]}


def item_path(table: str, pk: str, sk: str | None = None) -> str:
    path = f"/v1/tables/{table}/items/{quote(pk, safe='')}"
    return path if sk is None else f"{path}/{quote(sk, safe='')}"


def after(position: dict[str, str] | None) -> str:
    """The query arguments that continue a scan at a page's ``next`` ("" for the start)."""
    if position is None:
        return ""
    return "&" + urlencode({"after_pk": position["pk"], "after_sk": position["sk"]})
