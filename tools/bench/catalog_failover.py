"""Catalog failover under a steady read/write load (``devcluster up --ha``), one run.

Starts its own devcluster with the catalog on Patroni and etcd (2 shards x primary +
replica, each under Patroni too), runs closed-loop writers (unique keys) and readers
through shardd, and kills the catalog's primary member (Patroni and its Postgres,
SIGKILL) ``--kills`` times; the member is started again and rejoins as a replica before
the next kill.  Per kill: the seconds from the kill to the first write acknowledged
after the last failed one ("writes resume"), the failed writes and reads, and the
catalog primary before and after.  The baseline is the same load's write latency before
any kill, in this run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import aiohttp
import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import devcluster, markdown, percentile, ready, scratch_cluster  # noqa: E402


def roles(directory: str) -> dict[str, str]:
    """Catalog member -> the role Patroni reports ("down" when it does not answer)."""
    nodes = json.loads(devcluster(directory, "status", "--json"))["nodes"]
    return {n["name"]: n["role"] for n in nodes if n["name"].startswith("catalog-")}


def catalog_primary(directory: str) -> str:
    return next((n for n, role in roles(directory).items() if role == "primary"), "")


async def run(kills: int, writers: int, port: int) -> None:
    with scratch_cluster() as directory:
        devcluster(directory, "up", "--ha", "--shards", "2", "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            await ready(http, base)
            async with http.put(f"{base}/v1/tables/bench") as resp:
                assert resp.status in (200, 201), await resp.text()
            writes: list[tuple[float, float, bool]] = []  # started, finished, ok
            reads: list[tuple[float, bool]] = []
            stop = asyncio.Event()

            async def writer(number: int) -> None:
                n = 0
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        async with http.put(
                            f"{base}/v1/tables/bench/items/w{number}-{n}", data=b'{"v": 1}'
                        ) as resp:
                            await resp.read()
                            ok = resp.status in (200, 201)
                    except aiohttp.ClientError:
                        ok = False
                    writes.append((started, time.monotonic(), ok))
                    n += 1
                    if not ok:
                        await asyncio.sleep(0.05)

            async def reader() -> None:
                n = 0
                while not stop.is_set():
                    try:
                        async with http.get(f"{base}/v1/tables/bench/items/w0-{n % 50}") as r:
                            await r.read()
                            ok = r.status in (200, 404)
                    except aiohttp.ClientError:
                        ok = False
                    reads.append((time.monotonic(), ok))
                    n += 1

            tasks = [asyncio.create_task(writer(i)) for i in range(writers)]
            tasks.append(asyncio.create_task(reader()))
            await asyncio.sleep(5)
            baseline = [f - s for s, f, ok in writes if ok]
            rows = []
            resumed_all = []
            for _ in range(kills):
                old = await asyncio.to_thread(catalog_primary, directory)
                killed_at = time.monotonic()
                await asyncio.to_thread(devcluster, directory, "kill", old)
                new = ""
                while not new or new == old:
                    await asyncio.sleep(0.2)
                    new = await asyncio.to_thread(catalog_primary, directory)
                await asyncio.sleep(5)  # writes settle on the new primary
                failed = [f for s, f, ok in writes if not ok and s >= killed_at]
                last = max(failed, default=killed_at)
                resumed = min(f for s, f, ok in writes if ok and f > last) - killed_at
                resumed_all.append(resumed)
                failed_reads = sum(1 for at, ok in reads if not ok and at >= killed_at)
                rows.append([old, new, f"{resumed:.1f}", str(len(failed)), str(failed_reads)])
                await asyncio.to_thread(devcluster, directory, "start", old)
                deadline = time.monotonic() + 120
                while (await asyncio.to_thread(roles, directory))[old] != "replica":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{old} did not rejoin as a replica")
                    await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        click.echo(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python"
            f" {platform.python_version()}; writers={writers}, 1 reader, kills={kills}\n"
        )
        click.echo(
            f"baseline write latency: p50 {percentile(baseline, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(baseline, 0.99) * 1000:.1f} ms ({len(baseline)} writes)\n"
        )
        click.echo(
            markdown(
                ["killed", "new primary", "writes resume s", "failed writes", "failed reads"],
                rows,
            )
        )
        click.echo(
            f"\nwrites resume: p50 {percentile(resumed_all, 0.5):.1f} s,"
            f" max {max(resumed_all):.1f} s"
        )


@click.command()
@click.option("--kills", default=5, show_default=True)
@click.option("--writers", default=8, show_default=True)
@click.option("--port", default=18900, show_default=True)
def main(kills: int, writers: int, port: int) -> None:
    asyncio.run(run(kills, writers, port))


if __name__ == "__main__":
    main()
