"""Hot keys and the cache: detection accuracy, cache hit rates, and live mitigation.

Simulated (no servers; the same code shardd runs):

  1. accuracy   a Zipf(1.1) stream over --sim-keys keys, --sim-requests requests, through
                the per-instance detector (Space-Saving, ``hotkeys_capacity`` counters):
                precision and recall of its top 100 against the exact counts, memory.
  2. hit rate   the item cache (LRU, LFU, FIFO) at several capacities on the same stream.

Live (a devcluster of 3 shards x primary + replica, and shardd instances on it: A, the
devcluster's, and A2 with every mitigation on (the defaults), B with hot-key detection
off, C with every mitigation off (no detection, no coalescing, no cache); A2, B and C
log no access lines):

  3. detection  a Zipf load through A; one key jumps to 20% of the traffic; the time until
                ``GET /v1/admin/hotkeys`` (what ``shardctl hot`` prints) ranks it first.
  4. overhead   strong point GETs over uniform keys, A2 against B, interleaved rounds
                whose order turns; A3, configured as A2, shows the noise.
  5. mitigation eventual GETs of one celebrity key: shard queries per request, A against C;
                and a Zipf load with a 20% celebrity: the hot shard's p99 against the cold
                shards', A and C.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import click
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from loadgen import (  # noqa: E402
    Result,
    closed_loop,
    devcluster,
    markdown,
    percentile,
    ready,
    scratch_cluster,
)

from shardd import config, store  # noqa: E402
from shardd.cache import Entry, LocalStore  # noqa: E402
from shardd.hotkeys import Traffic  # noqa: E402
from shardd.placement import slot_of  # noqa: E402


def zipf_sampler(keys: int, s: float, seed: int) -> Iterator[int]:
    """Ranks 0..keys-1 with P(rank r) ~ 1/(r+1)^s, in batches (random.choices)."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1 / (rank**s) for rank in range(1, keys + 1)))
    population = range(keys)
    while True:
        yield from rng.choices(population, cum_weights=cumulative, k=100_000)


# -- 1. accuracy ----------------------------------------------------------------------------


def accuracy(requests: int, keys: int, capacity: int) -> str:
    stream = zipf_sampler(keys, 1.1, seed=7)
    exact: Counter[int] = Counter()
    traffic = Traffic(capacity=capacity, window=1e12)  # no decay: the whole stream counts
    names = [str(rank) for rank in range(keys)]
    record = traffic.record
    spent = 0.0
    for _ in range(requests // 100_000):
        batch = [next(stream) for _ in range(100_000)]
        exact.update(batch)
        began = time.perf_counter()
        for rank in batch:
            record("t", names[rank], 0)
        spent += time.perf_counter() - began
    traffic.fold()
    truth = {str(rank) for rank, _ in exact.most_common(100)}
    found = {pk for (_, pk), *_ in traffic.keys.top(100)}
    hits = len(truth & found)
    memory = traffic.keys.approx_bytes()
    counted = requests // 100_000 * 100_000
    return markdown(
        ["stream", "capacity", "top-100 precision", "top-100 recall", "summary bytes", "ns/record"],
        [
            [
                f"Zipf 1.1, {keys:,} keys, {counted:,} requests",
                str(capacity),
                f"{hits / len(found):.3f}",
                f"{hits / len(truth):.3f}",
                f"{memory:,}",
                f"{spent / counted * 1e9:.0f}",
            ]
        ],
    )


# -- 2. hit rate ----------------------------------------------------------------------------


def hit_rates(requests: int, keys: int, capacities: list[int]) -> str:
    stream = zipf_sampler(keys, 1.1, seed=11)
    ranks = [next(stream) for _ in range(requests)]
    item = store.Item("k", "", 1, orjson.Fragment(b"{}"))
    rows = []
    for capacity in capacities:
        row = [f"{capacity:,} entries"]
        for policy in ("lru", "lfu", "fifo"):
            local = LocalStore(policy=policy, max_entries=capacity, max_bytes=1 << 40)
            entry = Entry(item, "s1", "p", 0, float("inf"), 1)
            hits = 0
            for rank in ranks:
                if local.get(rank) is not None:
                    hits += 1
                else:
                    local.put(rank, entry)
            row.append(f"{hits / len(ranks):.3f}")
        rows.append(row)
    return markdown(["capacity", "LRU", "LFU", "FIFO"], rows)


# -- the live cluster -----------------------------------------------------------------------


@contextlib.contextmanager
def instance(cluster: str, catalog_dsn: str, port: int, **settings: str) -> Iterator[str]:
    """One more shardd on the cluster's catalog, with ``settings``; its base URL."""
    env = {
        **os.environ,
        "SHARDD_CATALOG_DSN": catalog_dsn,
        "SHARDD_PORT": str(port),
        "SHARDD_ACCESS_LOG": "false",
        **{f"SHARDD_{name.upper()}": value for name, value in settings.items()},
    }
    log = open(Path(cluster) / f"shardd-{port}.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "shardd.server"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def metric_sum(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, rest = sample.partition("{")
        if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


class Mix:
    """Keys of a Zipf(1.1) space over ``keys`` with ``share`` of requests on one celebrity."""

    def __init__(self, keys: int, seed: int) -> None:
        self.ranks = zipf_sampler(keys, 1.1, seed)
        self.rng = random.Random(seed)
        self.celebrity: str | None = None
        self.share = 0.0

    def next(self) -> str:
        if self.celebrity is not None and self.rng.random() < self.share:
            return self.celebrity
        return f"z-{next(self.ranks)}"


@contextlib.asynccontextmanager
async def background(
    http: aiohttp.ClientSession, base: str, mix: Mix, *, workers: int
) -> AsyncIterator[None]:
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            url = f"{base}/v1/tables/hot/items/{mix.next()}?consistency=eventual"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    await resp.read()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def detection(http: aiohttp.ClientSession, base: str, *, trials: int) -> str:
    """Seconds from the jump until the merged view lists the celebrity as hot (its share
    at least ``hot_key_share``) and until it ranks it first."""
    threshold = config.Settings().hot_key_share
    rows = []
    mix = Mix(10_000, seed=3)
    async with background(http, base, mix, workers=16):
        await asyncio.sleep(3)
        for trial in range(trials):
            mix.celebrity, mix.share = f"celebrity-{trial}", 0.2
            jumped = time.monotonic()
            listed = None
            while True:
                async with http.get(f"{base}/v1/admin/hotkeys?limit=10") as resp:
                    view = await resp.json()
                now = time.monotonic() - jumped
                mine = [k for k in view["keys"] if k["pk"] == mix.celebrity]
                if listed is None and mine and mine[0]["share"] >= threshold:
                    listed = now
                if view["keys"] and view["keys"][0]["pk"] == mix.celebrity:
                    break
                if now > 30:
                    raise RuntimeError("the celebrity was not ranked first in 30 s")
                await asyncio.sleep(0.05)
            rows.append(
                [
                    str(trial + 1),
                    f"{listed if listed is not None else now:.2f}",
                    f"{now:.2f}",
                    f"{view['keys'][0]['share']:.3f}",
                ]
            )
            mix.celebrity, mix.share = None, 0.0
            await asyncio.sleep(5)  # back to the plain load before the next jump
    return markdown(
        ["jump", "s until listed hot", "s until ranked first", "share shown then"], rows
    )


async def overhead(
    http: aiohttp.ClientSession,
    instances: list[tuple[str, str]],
    *,
    seconds: float,
    rounds: int,
) -> str:
    """Strong GETs through each (name, base URL), in rounds, the order turning each round
    so that no instance always runs first (or last)."""
    keys = [f"u-{i}" for i in range(10_000)]

    def getter(base: str) -> Any:
        async def op(key: str) -> bool:
            async with http.get(f"{base}/v1/tables/hot/items/{key}?consistency=strong") as r:
                await r.read()
                return r.status in (200, 404)

        return op

    measured: dict[str, Result] = {}
    for turn in range(rounds):
        shift = turn % len(instances)
        for name, base in instances[shift:] + instances[:shift]:
            one = await closed_loop(
                name, getter(base), keys, concurrency=32, seconds=seconds / rounds, warmup=1.0
            )
            measured[name] = measured[name] + one if name in measured else one
    results = [measured[name] for name, _ in instances]
    rows = [[r.name, f"{r.throughput:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"] for r in results]
    last = results[-1]
    for r in results[:-1]:
        rows.append(
            [
                f"{r.name} / {last.name}",
                f"{r.throughput / last.throughput:.3f}",
                "",
                f"{r.p99_ms / last.p99_ms:.2f}",
            ]
        )
    return markdown(["strong GET, uniform keys", "requests/s", "p50 ms", "p99 ms"], rows)


async def _mitigated(
    http: aiohttp.ClientSession,
    name: str,
    base: str,
    *,
    celebrity: str,
    slot_map: list[str],
    seconds: float,
) -> list[str]:
    """One instance: the celebrity alone (shard queries per request), then a Zipf load
    with the celebrity at 20% (p99 on the celebrity's shard and on the others)."""
    shard = slot_map[slot_of(celebrity, len(slot_map))]
    primer = Mix(10_000, seed=5)  # the detector must see the key hot before the cache takes it
    primer.celebrity, primer.share = celebrity, 1.0
    async with background(http, base, primer, workers=16):
        await asyncio.sleep(3)
    before = await metric_sum(http, base, "shardd_shard_query_seconds_count", shard=shard)

    async def get(key: str) -> bool:
        async with http.get(f"{base}/v1/tables/hot/items/{key}?consistency=eventual") as r:
            await r.read()
            return r.status == 200

    alone = await closed_loop(name, get, [celebrity], concurrency=32, seconds=seconds, warmup=0.0)
    after = await metric_sum(http, base, "shardd_shard_query_seconds_count", shard=shard)
    mix = Mix(10_000, seed=9)
    mix.celebrity, mix.share = celebrity, 0.2
    latencies: dict[bool, list[float]] = {True: [], False: []}
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            key = mix.next()
            began = time.perf_counter()
            await get(key)
            latencies[slot_map[slot_of(key, len(slot_map))] == shard].append(
                time.perf_counter() - began
            )

    await asyncio.gather(*(worker() for _ in range(32)))
    hot_p99 = percentile(latencies[True], 0.99) * 1000
    cold_p99 = percentile(latencies[False], 0.99) * 1000
    return [
        name,
        f"{alone.throughput:,.0f}",
        f"{1000 * (after - before) / max(1, alone.requests):.1f}",
        f"{hot_p99:.2f}",
        f"{cold_p99:.2f}",
        f"{hot_p99 / cold_p99:.2f}",
    ]


async def mitigation(
    http: aiohttp.ClientSession, on: str, off: str, slot_map: list[str], *, seconds: float
) -> str:
    rows = [
        await _mitigated(
            http, name, base, celebrity="the-celebrity", slot_map=slot_map, seconds=seconds
        )
        for name, base in (("mitigation on (A)", on), ("mitigation off (C)", off))
    ]
    on_q, off_q = float(rows[0][2]), float(rows[1][2])
    rows.append(["queries saved", "", f"{1 - on_q / off_q:.1%}" if off_q else "-", "", "", ""])
    return markdown(
        [
            "instance",
            "celebrity GETs/s",
            "shard queries per 1000 GETs",
            "hot shard p99 ms",
            "cold shards p99 ms",
            "hot/cold p99",
        ],
        rows,
    )


async def run_live(port: int, seconds: float, rounds: int, trials: int) -> list[str]:
    out = []
    with scratch_cluster() as directory:
        devcluster(directory, "up", "--port", str(port))
        catalog_dsn = f"postgresql://shardd@127.0.0.1:{port + 1}/shardd"
        a = f"http://127.0.0.1:{port}"
        with (
            instance(directory, catalog_dsn, port + 102) as a2,
            instance(directory, catalog_dsn, port + 103) as a3,
            instance(directory, catalog_dsn, port + 100, hotkeys="false") as b,
            instance(
                directory,
                catalog_dsn,
                port + 101,
                hotkeys="false",
                coalesce_reads="false",
                cache_backend="off",
            ) as c,
        ):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
                for base in (a, a2, a3, b, c):
                    await ready(http, base)
                async with http.put(f"{a}/v1/tables/hot", data=b'{"cache": "hot"}') as resp:
                    assert resp.status in (200, 201), await resp.text()
                async with http.put(
                    f"{a}/v1/tables/hot/items/the-celebrity", data=b'{"fans": 1}'
                ) as resp:
                    assert resp.status in (200, 201)
                async with http.get(f"{a}/v1/topology") as resp:
                    topology = await resp.json()
                slot_map = await _slot_map(catalog_dsn, topology["slot_count"])
                out.append(
                    "Detection (through A, 16 workers):\n\n"
                    + await detection(http, a, trials=trials)
                )
                out.append(
                    "Detector overhead (32 workers):\n\n"
                    + await overhead(
                        http,
                        [
                            ("detection on (A2)", a2),
                            ("detection on (A3, control)", a3),
                            ("detection off (B)", b),
                        ],
                        seconds=seconds,
                        rounds=rounds,
                    )
                )
                out.append(
                    "Mitigation (32 workers, eventual GETs):\n\n"
                    + await mitigation(http, a, c, slot_map, seconds=seconds / 2)
                )
    return out


async def _slot_map(catalog_dsn: str, slot_count: int) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(catalog_dsn)
    try:
        rows = await conn.fetch("SELECT slot, shard FROM shardd_slot_map")
    finally:
        await conn.close()
    owners = [""] * slot_count
    for row in rows:
        owners[row["slot"]] = row["shard"]
    return owners


@click.command()
@click.option("--sim-requests", default=10_000_000, show_default=True)
@click.option("--sim-keys", default=1_000_000, show_default=True)
@click.option("--seconds", default=12.0, show_default=True, help="Per live measurement.")
@click.option("--rounds", default=6, show_default=True)
@click.option("--trials", default=3, show_default=True, help="Celebrity jumps to time.")
@click.option("--port", default=18600, show_default=True)
@click.option("--live/--no-live", default=True, show_default=True)
def main(
    sim_requests: int,
    sim_keys: int,
    seconds: float,
    rounds: int,
    trials: int,
    port: int,
    live: bool,
) -> None:
    defaults = config.Settings()
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}; hotkeys_capacity={defaults.hotkeys_capacity},"
        f" hotkeys_window={defaults.hotkeys_window}, hot_key_share={defaults.hot_key_share}\n"
    )
    click.echo("Detection accuracy (simulated):\n")
    click.echo(accuracy(sim_requests, sim_keys, defaults.hotkeys_capacity) + "\n")
    click.echo("Cache hit rate by capacity and policy (simulated, Zipf 1.1, 1,000,000 keys):\n")
    click.echo(hit_rates(min(sim_requests, 2_000_000), sim_keys, [1_000, 10_000, 100_000]) + "\n")
    if live:
        for section in asyncio.run(run_live(port, seconds, rounds, trials)):
            click.echo(section + "\n")


if __name__ == "__main__":
    main()
