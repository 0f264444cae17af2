"""The change feed against the write rate, one run.

Starts its own devcluster (3 shards x primary + replica), then drives closed-loop PUTs
(C writers over K keys) through shardd while one follower reads ``GET /v1/changes``
(long-polling, pages of ``--page`` changes) from a cursor taken before the load.  Prints
the write rate, the delivery rate, their ratio, the delay from a write's
acknowledgement to its change's arrival (p50/p99), and how long the follower needed to
catch up once the writers stopped.  Every acknowledged write must arrive: the run fails
otherwise.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import click
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import devcluster, markdown, percentile, scratch_cluster  # noqa: E402

TABLE = "feedbench"


async def run(*, keys: int, concurrency: int, seconds: float, page: int, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    names = [f"key-{i}" for i in range(keys)]
    acked: dict[tuple[str, int], float] = {}  # (pk, version) -> when the write was answered
    arrived: dict[tuple[str, int], float] = {}
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/v1/tables/{TABLE}") as resp:
            assert resp.status in (200, 201), await resp.text()
        async with http.get(f"{base}/v1/changes", params={"tables": TABLE}) as resp:
            cursor = (await resp.json())["cursor"]
        stop = time.perf_counter() + seconds
        writing = True

        async def writer(n: int) -> None:
            i = n
            while time.perf_counter() < stop:
                pk = names[i % keys]
                i += concurrency
                async with http.put(f"{base}/v1/tables/{TABLE}/items/{pk}", data=b"{}") as resp:
                    body = await resp.read()
                    if resp.status in (200, 201):
                        acked[(pk, orjson.loads(body)["version"])] = time.perf_counter()

        async def follower() -> None:
            nonlocal cursor
            while writing or not set(acked) <= set(arrived):
                params = {"tables": TABLE, "cursor": cursor, "limit": str(page), "wait": "1"}
                async with http.get(f"{base}/v1/changes", params=params) as resp:
                    data = orjson.loads(await resp.read())
                now = time.perf_counter()
                for change in data["changes"]:
                    arrived.setdefault((change["pk"], change["version"]), now)
                cursor = data["cursor"]

        following = asyncio.create_task(follower())
        started = time.perf_counter()
        await asyncio.gather(*(writer(n) for n in range(concurrency)))
        wrote_for = time.perf_counter() - started
        writing = False
        await asyncio.wait_for(following, timeout=120)
        caught_up = time.perf_counter() - started - wrote_for
    missing = set(acked) - set(arrived)
    if missing:
        raise SystemExit(f"{len(missing)} acknowledged writes never reached the feed")
    delays = [arrived[key] - acked[key] for key in acked]
    in_time = sum(1 for key in acked if arrived[key] <= started + wrote_for)
    write_rate = len(acked) / wrote_for
    delivery_rate = in_time / wrote_for
    return markdown(
        ["writes/s", "changes/s delivered", "ratio", "delay p50 ms", "delay p99 ms", "catch-up s"],
        [
            [
                f"{write_rate:,.0f}",
                f"{delivery_rate:,.0f}",
                f"{delivery_rate / write_rate:.3f}",
                f"{percentile(delays, 0.5) * 1000:.1f}",
                f"{percentile(delays, 0.99) * 1000:.1f}",
                f"{caught_up:.2f}",
            ]
        ],
    )


@click.command()
@click.option("--keys", default=1000, show_default=True)
@click.option("--concurrency", default=16, show_default=True, help="Writers.")
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--page", default=1000, show_default=True, help="limit of each feed read.")
@click.option("--port", default=18400, show_default=True)
def main(keys: int, concurrency: int, seconds: float, page: int, port: int) -> None:
    """Change-feed delivery rate vs write rate on a fresh local cluster."""
    with scratch_cluster() as directory:
        devcluster(directory, "up", "--port", str(port))
        click.echo(
            asyncio.run(
                run(keys=keys, concurrency=concurrency, seconds=seconds, page=page, port=port)
            )
        )


if __name__ == "__main__":
    main()
