"""Views under a sustained write load, one run on a fresh local cluster.

* Write throughput: closed-loop PUTs (C writers) to a table with no view, one view and
  three views, in rounds whose order turns, each reported against the table without a
  view in the same run (maintenance runs on the same machine, so its cost is included).
* Propagation: while writers load the one-view table, a sampler takes the newest
  acknowledged write every few ms and polls the view (strong reads of the view
  partition) until its row shows that version: the lag from acknowledgement to
  visibility, p50 / p99.
* Verify: ``verify`` of a view of N rows (rows/s) against ``SELECT count(*)`` of the
  same source rows on every shard primary.
* The change feed's delivery rate against the write rate comes from
  ``tools/bench/changefeed`` on the same cluster.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from changefeed import run as changefeed_run  # noqa: E402
from loadgen import Result, closed_loop, devcluster, markdown, percentile, scratch_cluster  # noqa: E402

VIEW = {
    "key": {"pk": "$.product", "sk": "$.at"},
    "fields": {"qty": "$.qty"},
    "join": [{"table": "vb_users", "sk": "", "fields": {"user_name": "$.name"}}],
}


async def put(http: aiohttp.ClientSession, url: str, body: Any) -> int:
    async with http.put(url, json=body) as resp:
        await resp.read()
        return resp.status


async def setup(http: aiohttp.ClientSession, base: str) -> None:
    for table in ("vb_users", "vb_none", "vb_one", "vb_three"):
        assert await put(http, f"{base}/v1/tables/{table}", {}) in (200, 201)
    for n in range(200):
        await put(http, f"{base}/v1/tables/vb_users/items/u{n}", {"name": f"user {n}"})
    views = [("vb_one", "vb_one_v")] + [("vb_three", f"vb_three_v{i}") for i in range(3)]
    for table, view in views:
        status = await put(http, f"{base}/v1/tables/{table}/views/{view}", VIEW)
        assert status in (200, 201), status
    deadline = time.monotonic() + 60
    for table, view in views:
        while time.monotonic() < deadline:
            async with http.get(f"{base}/v1/tables/{table}/views/{view}") as resp:
                if (await resp.json())["state"] == "active":
                    break
            await asyncio.sleep(0.2)


def writer(http: aiohttp.ClientSession, base: str, table: str) -> Any:
    counter = iter(range(10**9))

    async def op(key: str) -> bool:
        n = next(counter)
        body = {"product": f"p{n % 500}", "at": f"{n:09d}", "qty": n}
        status = await put(http, f"{base}/v1/tables/{table}/items/u{key}/o{n}", body)
        return status in (200, 201)

    return op


async def throughput(
    http: aiohttp.ClientSession, base: str, *, seconds: float, rounds: int, concurrency: int
) -> str:
    keys = [str(n) for n in range(200)]
    targets = [("no view", "vb_none"), ("1 view", "vb_one"), ("3 views", "vb_three")]
    totals: dict[str, Result] = {}
    for round_ in range(rounds):
        order = targets[round_ % 3 :] + targets[: round_ % 3]
        for name, table in order:
            result = await closed_loop(
                name,
                writer(http, base, table),
                keys,
                concurrency=concurrency,
                seconds=seconds,
                warmup=1.0,
            )
            totals[name] = totals[name] + result if name in totals else result
            await asyncio.sleep(2.0)  # let maintenance drain between phases
    base_rate = totals["no view"].throughput
    rows = [
        [
            name,
            f"{totals[name].throughput:,.0f}",
            f"{totals[name].p50_ms:.2f}",
            f"{totals[name].p99_ms:.2f}",
            str(totals[name].errors),
            f"{totals[name].throughput / base_rate:.2f}",
        ]
        for name, _ in targets
    ]
    return markdown(
        ["PUTs to a table with", "requests/s", "p50 ms", "p99 ms", "errors", "vs no view"], rows
    )


async def propagation(
    http: aiohttp.ClientSession, base: str, *, seconds: float, concurrency: int
) -> str:
    """Lag from a write's acknowledgement to its row in the view, sampled under load."""
    latest: list[tuple[str, str, int, float]] = []  # (product, source pk, version, acked at)
    stop = time.perf_counter() + seconds
    samples: list[float] = []

    async def load(worker: int) -> None:
        n = worker
        while time.perf_counter() < stop:
            n += concurrency
            body = {"product": f"lag{worker}", "at": "t", "qty": n}
            url = f"{base}/v1/tables/vb_one/items/w{worker}/o"
            async with http.put(url, json=body) as resp:
                data = await resp.json()
                if resp.status in (200, 201):
                    latest.append(
                        (f"lag{worker}", f"w{worker}", data["version"], time.perf_counter())
                    )

    async def sampler() -> None:
        while time.perf_counter() < stop:
            if not latest:
                await asyncio.sleep(0.01)
                continue
            product, pk, version, acked = latest[-1]
            url = f"{base}/v1/views/vb_one_v/partitions/{product}?consistency=strong"
            while True:
                async with http.get(url) as resp:
                    items = (await resp.json())["items"]
                got = max(
                    (i["source"]["version"] for i in items if i["source"]["pk"] == pk), default=0
                )
                if got >= version:
                    samples.append(time.perf_counter() - acked)
                    break
                await asyncio.sleep(0.005)

    await asyncio.gather(*(load(w) for w in range(concurrency)), sampler())
    return markdown(
        ["samples", "p50 ms", "p99 ms", "max ms"],
        [
            [
                str(len(samples)),
                f"{percentile(samples, 0.5) * 1000:.0f}",
                f"{percentile(samples, 0.99) * 1000:.0f}",
                f"{max(samples) * 1000:.0f}",
            ]
        ],
    )


async def verify_speed(directory: str, catalog_dsn: str, base: str, http: Any, rows: int) -> str:
    from shardd import config
    from shardd.cluster import Cluster
    from shardd.views import manage

    # Bulk rows through batch writes.
    batch: list[dict[str, Any]] = []
    for n in range(rows):
        batch.append({"pk": f"u{n % 200}", "sk": f"bulk{n}", "item": {"product": f"p{n % 500}",
                      "at": f"{n:09d}", "qty": n}})  # fmt: skip
        if len(batch) == 100 or n == rows - 1:
            async with http.post(f"{base}/v1/tables/vb_one/batch/write", json={"puts": batch}) as r:
                assert r.status == 200, await r.text()
            batch = []
    settings = config.load(environ={}, overrides={"catalog_dsn": catalog_dsn})
    cluster = Cluster(settings)
    await cluster.start()
    try:
        await asyncio.sleep(3)  # maintenance catches up
        view = cluster.watcher.require_topology().views["vb_one_v"]
        started = time.perf_counter()
        report = await manage.verify(cluster, view)
        verify_s = time.perf_counter() - started
        topology = cluster.watcher.require_topology()
        started = time.perf_counter()
        counted = 0
        for shard in topology.shards.values():
            assert shard.primary is not None
            conn = await asyncpg.connect(shard.primary.dsn())
            try:
                counted += await conn.fetchval(
                    "SELECT count(*) FROM shardd_items WHERE tbl = 'vb_one'"
                )
            finally:
                await conn.close()
        count_s = time.perf_counter() - started
    finally:
        await cluster.close()
    ratio = (report.checked / verify_s) / (counted / count_s)
    return markdown(
        ["", "rows", "seconds", "rows/s", "differences"],
        [
            [
                "verify",
                f"{report.checked:,}",
                f"{verify_s:.2f}",
                f"{report.checked / verify_s:,.0f}",
                str(len(report.missing) + len(report.extra) + len(report.stale)),
            ],
            [
                "SELECT count(*) per shard",
                f"{counted:,}",
                f"{count_s:.2f}",
                f"{counted / count_s:,.0f}",
                "",
            ],
            [
                "verify / count(*)",
                "",
                "",
                f"{ratio:.3f}",
                "",
            ],
        ],
    )


async def run(port: int, seconds: float, rounds: int, concurrency: int, rows: int) -> list[str]:
    out = []
    with scratch_cluster() as directory:
        devcluster(directory, "up", "--port", str(port))
        catalog_dsn = f"postgresql://shardd@127.0.0.1:{port + 1}/shardd"
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            await setup(http, base)
            out.append(
                f"Write throughput ({concurrency} writers, {rounds} rounds of {seconds:g} s):\n\n"
                + await throughput(
                    http, base, seconds=seconds, rounds=rounds, concurrency=concurrency
                )
            )
            out.append(
                f"Propagation, write acknowledged -> row visible ({concurrency} writers):\n\n"
                + await propagation(http, base, seconds=seconds * 2, concurrency=concurrency)
            )
            out.append(
                "Verify against a count of the same rows:\n\n"
                + await verify_speed(directory, catalog_dsn, base, http, rows)
            )
        out.append(
            "Change feed against the write rate (tools/bench/changefeed):\n\n"
            + await changefeed_run(
                keys=1000, concurrency=concurrency, seconds=seconds, page=1000, port=port
            )
        )
    return out


@click.command()
@click.option("--seconds", default=8.0, show_default=True, help="Per measured phase.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--concurrency", default=16, show_default=True, help="Writers.")
@click.option("--rows", default=20000, show_default=True, help="Rows for the verify run.")
@click.option("--port", default=18800, show_default=True)
def main(seconds: float, rounds: int, concurrency: int, rows: int, port: int) -> None:
    """View maintenance cost, propagation lag, verify speed and the change feed's rate."""
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}\n"
    )
    for part in asyncio.run(run(port, seconds, rounds, concurrency, rows)):
        click.echo(part + "\n")


if __name__ == "__main__":
    main()
