"""The load balancer's cost: shardd GETs straight to one instance, and through HAProxy
(deploy/haproxy.cfg as it is) in front of 1, 2 and 3 instances, one run on a fresh
cluster (``devcluster up --instances 3``).  Targets take turns in rounds; each is
reported against the instance without a balancer.  On a 2-core machine more instances
add no cores: the interesting ratio is the balancer's own cost (1 instance through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from loadgen import Result, closed_loop, devcluster, markdown, ready, scratch_cluster  # noqa: E402

INSTANCES = 3


@contextlib.contextmanager
def haproxy(directory: str, port: int, servers: list[int]) -> Iterator[str]:
    """HAProxy with deploy/haproxy.cfg on ``port`` in front of ``servers``."""
    config = Path(directory) / f"bench-{port}.cfg"
    config.write_text(
        "backend shardd\n" + "".join(f"    server i{p} 127.0.0.1:{p} check\n" for p in servers)
    )
    proc = subprocess.Popen(
        [
            shutil.which("haproxy") or "/usr/sbin/haproxy",
            "-db",
            "-f",
            str(ROOT / "deploy" / "haproxy.cfg"),
            "-f",
            str(config),
        ],
        env={**os.environ, "SHARDD_LISTEN": f"127.0.0.1:{port}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run(port: int, seconds: float, rounds: int, concurrency: int) -> str:
    with scratch_cluster() as directory:
        devcluster(directory, "up", "--port", str(port), "--instances", str(INSTANCES))
        direct = [port + 100 + i for i in range(1, INSTANCES + 1)]
        with contextlib.ExitStack() as stack:
            targets = [("one instance, no balancer", f"http://127.0.0.1:{direct[0]}")]
            for n in range(1, INSTANCES + 1):
                base = stack.enter_context(haproxy(directory, port + 200 + n, direct[:n]))
                targets.append((f"HAProxy, {n} instance(s)", base))
            connector = aiohttp.TCPConnector(limit=concurrency * 2)
            async with aiohttp.ClientSession(connector=connector) as http:
                for _, base in targets:
                    await ready(http, base)
                keys = [f"k{i}" for i in range(1000)]
                first = targets[0][1]
                async with http.put(f"{first}/v1/tables/lb", data=b"{}") as resp:
                    assert resp.status in (200, 201)
                for key in keys:
                    async with http.put(f"{first}/v1/tables/lb/items/{key}", data=b"{}") as r:
                        assert r.status in (200, 201)
                totals: dict[str, Result] = {}
                for round_ in range(rounds):
                    order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
                    for name, base in order:

                        async def get(key: str, base: str = base) -> bool:
                            url = f"{base}/v1/tables/lb/items/{key}?consistency=strong"
                            async with http.get(url) as resp:
                                await resp.read()
                                return resp.status == 200

                        result = await closed_loop(
                            name, get, keys, concurrency=concurrency, seconds=seconds, warmup=1.0
                        )
                        totals[name] = totals[name] + result if name in totals else result
    base_rate = totals[targets[0][0]].throughput
    return markdown(
        ["strong GETs", "requests/s", "p50 ms", "p99 ms", "errors", "vs no balancer"],
        [
            [
                name,
                f"{r.throughput:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                str(r.errors),
                f"{r.throughput / base_rate:.2f}",
            ]
            for name, r in ((n, totals[n]) for n, _ in targets)
        ],
    )


@click.command()
@click.option("--seconds", default=8.0, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--concurrency", default=32, show_default=True)
@click.option("--port", default=19000, show_default=True)
def main(seconds: float, rounds: int, concurrency: int, port: int) -> None:
    """shardd straight and behind HAProxy with 1, 2 and 3 instances."""
    click.echo(f"machine: {platform.machine()}, {os.cpu_count()} cores\n")
    click.echo(asyncio.run(run(port, seconds, rounds, concurrency)))


if __name__ == "__main__":
    main()
