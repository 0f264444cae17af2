"""Point reads and writes: shardd vs a hand-written handler vs bare asyncpg, one run.

Starts its own devcluster (3 shards x primary + replica), loads the same keys into
shardd and into a plain table on one shard primary, then drives the same closed-loop
load (same concurrency, same keys, after a warm-up) against:

  a) shardd           GET (strong, and eventual) / PUT /v1/tables/bench/items/{k}
  b) minimal handler  aiohttp + asyncpg on one Postgres, no routing, no checks
  c) asyncpg          the same SQL straight from the load process, no HTTP
  d) asyncpg          the shard's write procedure (CALL shardd_write), no HTTP
  e) shardd           eventual GET of a table that caches every item (cache = all),
                      each read once before, in rounds of its own with (b) after the others

and prints throughput and p50/p99 latency with the ratios a/b and a/c.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import click
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from loadgen import Result, closed_loop, table  # noqa: E402

from shardd.placement import slot_of  # noqa: E402

# The minimal handler's pool: its connections into Postgres.  shardd gets the same
# budget by default, spread over the shards' primaries (3 x 4 = 12 connections): on a
# small machine more backends than cores only add contention, for both alike.
MINIMAL_POOL = 10
SHARDS = 3
CACHED_TABLE = orjson.dumps({"cache": "all", "cache_ttl": 3600})


def devcluster(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        [str(ROOT / "tools" / "devcluster"), *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout


async def wait_http(url: str) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def run(
    *,
    keys: int,
    concurrency: int,
    seconds: float,
    rounds: int,
    warmup: float,
    port: int,
    access_log: bool,
    pool_size: int,
    event_loop: str,
) -> list[Result]:
    names = [f"key-{i}" for i in range(keys)]
    doc = {"name": "benchmark item", "n": 12345, "tags": ["a", "b", "c"]}
    body = orjson.dumps(doc)
    shardd = f"http://127.0.0.1:{port}"
    minimal_port = port + 50
    with tempfile.TemporaryDirectory(prefix="shardd-bench-") as tmp:
        os.chmod(tmp, 0o755)
        env = {
            **os.environ,
            "SHARDD_ACCESS_LOG": str(access_log).lower(),
            "SHARDD_POOL_SIZE": str(pool_size),
            "SHARDD_EVENT_LOOP": event_loop,
        }
        devcluster("up", "--dir", tmp, "--port", str(port), env=env)
        minimal = None
        try:
            pg = f"postgresql://shardd@127.0.0.1:{port + 2}/shardd"  # s1-primary
            conn = await asyncpg.connect(pg)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_kv"
                " (k text PRIMARY KEY, v jsonb NOT NULL, version bigint NOT NULL)"
            )
            await conn.executemany(
                "INSERT INTO bench_kv VALUES ($1, $2::jsonb, 1) ON CONFLICT (k) DO NOTHING",
                [(k, body.decode()) for k in names],
            )
            await conn.close()
            minimal = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
                [
                    sys.executable,
                    str(HERE / "minimal.py"),
                    pg,
                    str(minimal_port),
                    str(MINIMAL_POOL),
                    event_loop,
                ]
            )
            await wait_http(f"http://127.0.0.1:{minimal_port}/items/x")
            results: list[Result] = []
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency * 2)
            ) as http:
                # bench: the defaults (cache = hot; uniform keys are never hot);
                # bench_cached: caches nothing until (e) (then cache = all).
                for name, spec in (("bench", b""), ("bench_cached", b'{"cache": "off"}')):
                    async with http.put(f"{shardd}/v1/tables/{name}", data=spec) as resp:
                        assert resp.status in (200, 201), await resp.text()
                    for i in range(0, keys, 100):
                        puts = [{"pk": k, "item": doc} for k in names[i : i + 100]]
                        async with http.post(
                            f"{shardd}/v1/tables/{name}/batch/write",
                            data=orjson.dumps({"puts": puts}),
                        ) as resp:
                            assert resp.status == 200, await resp.text()

                def http_op(method: str, base: str) -> Callable[[str], Awaitable[bool]]:
                    async def op(key: str) -> bool:
                        async with http.request(
                            method, f"{base}/{key}", data=body if method == "PUT" else None
                        ) as r:
                            await r.read()
                            return r.status < 300

                    return op

                pool = await asyncpg.create_pool(pg, min_size=concurrency, max_size=concurrency)

                async def direct_get(key: str) -> bool:
                    return (
                        await pool.fetchval("SELECT v::text FROM bench_kv WHERE k = $1", key)
                        is not None
                    )

                async def direct_put(key: str) -> bool:
                    await pool.fetchval(
                        "INSERT INTO bench_kv (k, v, version) VALUES ($1, $2::jsonb, 1)"
                        " ON CONFLICT (k) DO UPDATE SET v = excluded.v,"
                        " version = bench_kv.version + 1 RETURNING version",
                        key,
                        body.decode(),
                    )
                    return True

                async def rounds_of(
                    targets: list[tuple[str, Callable[[str], Awaitable[bool]]]],
                    measured: dict[str, Result],
                ) -> None:
                    """Rounds: every target runs in each, so a slow spell of the machine
                    (a checkpoint, autovacuum) falls on all of them rather than on one."""
                    for _ in range(rounds):
                        for name, op in targets:
                            one = await closed_loop(
                                name,
                                op,
                                local if name.startswith("d)") else names,
                                concurrency=concurrency,
                                seconds=seconds / rounds,
                                warmup=warmup,
                            )
                            measured[name] = measured[name] + one if name in measured else one

                def shardd_get(
                    consistency: str, table: str = "bench"
                ) -> Callable[[str], Awaitable[bool]]:
                    get = http_op("GET", f"{shardd}/v1/tables/{table}/items")

                    async def op(key: str) -> bool:
                        return await get(f"{key}?consistency={consistency}")

                    return op

                # The shard's own write procedure, called like shardd calls it, for the
                # keys whose slots the same primary owns: what fencing, the table fence
                # and the change log cost in Postgres alone.
                catalog = await asyncpg.connect(f"postgresql://shardd@127.0.0.1:{port + 1}/shardd")
                slot_count = await catalog.fetchval("SELECT slot_count FROM shardd_cluster")
                await catalog.close()
                owned = {
                    row[0]
                    for row in await pool.fetch(
                        "SELECT slot FROM shardd_slots WHERE state = 'owned'"
                    )
                }
                local = [k for k in names if slot_of(k, slot_count) in owned]

                async def procedure_put(key: str) -> bool:
                    await pool.fetchrow(
                        "CALL shardd_write('put', $1, 'bench', $2, '', $3::jsonb, NULL, $4)",
                        slot_of(key, slot_count),
                        key,
                        body.decode(),
                        1 << 20,
                    )
                    return True

                minimal_get = http_op("GET", f"http://127.0.0.1:{minimal_port}/items")
                targets = [
                    ("a) shardd GET", shardd_get("strong")),
                    ("a) shardd GET eventual", shardd_get("eventual")),
                    ("b) minimal handler GET", minimal_get),
                    ("c) asyncpg GET", direct_get),
                    ("a) shardd PUT", http_op("PUT", f"{shardd}/v1/tables/bench/items")),
                    (
                        "b) minimal handler PUT",
                        http_op("PUT", f"http://127.0.0.1:{minimal_port}/items"),
                    ),
                    ("c) asyncpg PUT", direct_put),
                    ("d) asyncpg shardd_write PUT", procedure_put),
                ]
                measured: dict[str, Result] = {}
                await rounds_of(targets, measured)
                # Then with a table that caches every item (cache = all), which has every
                # instance follow the change logs: measured apart so that the targets
                # above do not pay for it, against the baseline again.
                async with http.put(f"{shardd}/v1/tables/bench_cached", data=CACHED_TABLE) as resp:
                    assert resp.status == 200, await resp.text()
                # Cached items: every key read once first (the instance starts following
                # the change logs within a moment; reads before that fill nothing).
                warm = shardd_get("eventual", "bench_cached")
                await asyncio.sleep(1.0)
                for i in range(0, keys, concurrency):
                    await asyncio.gather(*(warm(k) for k in names[i : i + concurrency]))
                await rounds_of(
                    [
                        ("e) shardd GET eventual, cached", shardd_get("eventual", "bench_cached")),
                        ("b) minimal handler GET, with e", minimal_get),
                    ],
                    measured,
                )
                results.extend(measured.values())
                await pool.close()
            return results
        finally:
            if minimal is not None:
                minimal.terminate()
                minimal.wait()
            devcluster("down", "--dir", tmp, "--purge")


@click.command()
@click.option("--keys", default=10000, show_default=True)
@click.option("--concurrency", default=32, show_default=True)
@click.option("--seconds", default=12.0, show_default=True, help="Per target, over all rounds.")
@click.option("--rounds", default=3, show_default=True, help="Every target runs once per round.")
@click.option("--warmup", default=1.0, show_default=True, help="Per target and round.")
@click.option("--port", default=18400, show_default=True)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="shardd's per-request JSON log line (on by default in shardd).",
)
@click.option(
    "--pool-size",
    default=-(-MINIMAL_POOL // SHARDS),
    show_default=True,
    help="shardd's pool_size per node (default: the minimal handler's pool over the shards).",
)
@click.option(
    "--event-loop",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
    help="The loop of shardd and of the minimal handler alike (shardd's event_loop).",
)
def main(**options: Any) -> None:
    results = asyncio.run(run(**options))
    by = {r.name: r for r in results}
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; "
        + " ".join(f"{name}={value}" for name, value in options.items())
        + f" (shardd pool_size per primary, x{SHARDS}), minimal handler pool={MINIMAL_POOL}\n"
    )
    click.echo(table(results))
    click.echo("\n| ratio | throughput | p99 |\n|---|---:|---:|")
    for op in ("GET", "PUT"):
        a = by[f"a) shardd {op}"]
        for base in ("b) minimal handler", "c) asyncpg"):
            b = by[f"{base} {op}"]
            click.echo(
                f"| {op} a/{base[0]} | {a.throughput / b.throughput:.2f} | "
                f"{a.p99_ms / b.p99_ms:.2f} |"
            )
    d, c = by["d) asyncpg shardd_write PUT"], by["c) asyncpg PUT"]
    click.echo(f"| PUT d/c | {d.throughput / c.throughput:.2f} | {d.p99_ms / c.p99_ms:.2f} |")
    cached, minimal = by["e) shardd GET eventual, cached"], by["b) minimal handler GET, with e"]
    click.echo(
        f"| GET cached e/b | {cached.throughput / minimal.throughput:.2f} | "
        f"{cached.p99_ms / minimal.p99_ms:.2f} |"
    )
    eventual, strong = by["a) shardd GET eventual"], by["a) shardd GET"]
    click.echo(
        f"| GET eventual/strong | {eventual.throughput / strong.throughput:.2f} | "
        f"{eventual.p99_ms / strong.p99_ms:.2f} |"
    )


if __name__ == "__main__":
    main()
