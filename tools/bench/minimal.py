"""The baseline a user writes by hand: one aiohttp handler over one asyncpg pool.

``minimal.py DSN PORT POOL_SIZE [uvloop|asyncio]``: the event loop is shardd's
(``event_loop``), so the ratios compare like with like."""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import orjson
import uvloop
from aiohttp import web


async def make_app(dsn: str, pool_size: int) -> web.Application:
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=pool_size)

    async def get(request: web.Request) -> web.Response:
        row = await pool.fetchrow(
            "SELECT v::text FROM bench_kv WHERE k = $1", request.match_info["k"]
        )
        if row is None:
            return web.Response(status=404)
        return web.Response(body=row[0].encode(), content_type="application/json")

    async def put(request: web.Request) -> web.Response:
        body = await request.read()
        version = await pool.fetchval(
            "INSERT INTO bench_kv (k, v, version) VALUES ($1, $2::jsonb, 1)"
            " ON CONFLICT (k) DO UPDATE SET v = excluded.v, version = bench_kv.version + 1"
            " RETURNING version",
            request.match_info["k"],
            orjson.loads(body) and body.decode(),
        )
        return web.Response(
            body=orjson.dumps({"version": version}), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/items/{k}", get)
    app.router.add_put("/items/{k}", put)
    return app


if __name__ == "__main__":
    uvloop_wanted = (sys.argv[4] if len(sys.argv) > 4 else "uvloop") == "uvloop"
    web.run_app(
        make_app(sys.argv[1], int(sys.argv[3])),
        host="127.0.0.1",
        port=int(sys.argv[2]),
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop() if uvloop_wanted else asyncio.new_event_loop(),
    )
