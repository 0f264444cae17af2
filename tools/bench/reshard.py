"""Online resharding under load: copy speed against a plain COPY pipe, and client pauses.

Starts its own devcluster (3 shards x primary + replica), bulk-loads ``--rows`` small
items straight into the shard primaries, then:

1. baseline: ``COPY (SELECT ... the rows of the slots that will move) TO STDOUT``
   streamed into ``COPY ... FROM STDIN`` of an identical table on the new shard's
   primary, the same pipe shardd's mover uses, without anything else;
2. adds shard s4 and rebalances it in, in this process, one move at a time, while
   closed-loop writers and readers run through shardd.

Prints copy throughput (rows/s, MB/s) of both and the ratio; per moved slot group the
longest write to its slots that overlapped its cutover (p50, p99, max); failed requests;
total time.
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from loadgen import devcluster, markdown, percentile, scratch_cluster  # noqa: E402

from shardd import admin, reshard  # noqa: E402
from shardd.placement import slot_of  # noqa: E402

SLOTS = 4096


@dataclass
class Call:
    slot: int
    write: bool
    started: float
    finished: float
    ok: bool


class Clients:
    """Writers overwrite random loaded keys; readers read them back (eventual)."""

    def __init__(self, url: str, keys: list[str], *, writers: int, readers: int) -> None:
        self.url = url
        self.keys = keys
        self.calls: list[Call] = []
        self._stop = asyncio.Event()
        self._plan = [True] * writers + [False] * readers

    async def __aenter__(self) -> Clients:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._client(w)) for w in self._plan]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _client(self, write: bool) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            key = rng.choice(self.keys)
            url = f"{self.url}/v1/tables/bench/items/{key}"
            started = time.monotonic()
            try:
                if write:
                    async with self._session.put(url, json={"v": rng.random()}) as resp:
                        await resp.read()
                        ok = resp.status in (200, 201)
                else:
                    async with self._session.get(url) as resp:
                        await resp.read()
                        ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            self.calls.append(Call(slot_of(key, SLOTS), write, started, time.monotonic(), ok))


async def bulk_load(catalog_dsn: str, rows: int) -> list[str]:
    """``rows`` items straight into their owners (no change log: this is set-up)."""
    topo = await admin.topology(catalog_dsn)
    keys = [f"item-{i}" for i in range(rows)]
    by_shard: dict[str, list[tuple[object, ...]]] = {}
    for key in keys:
        slot = slot_of(key, SLOTS)
        owner = topo.slot_map[slot]
        assert owner is not None
        by_shard.setdefault(owner, []).append(("bench", key, "", slot, 1, '{"n": 1}'))
    for shard, records in by_shard.items():
        primary = topo.shards[shard].primary
        assert primary is not None
        async with admin.connect(primary.dsn()) as conn, conn.transaction():
            await conn.execute("SET LOCAL shardd.copying = on")
            await conn.copy_records_to_table(
                "shardd_items",
                records=records,
                columns=("tbl", "pk", "sk", "slot", "version", "doc"),
            )
            await conn.execute("ANALYZE shardd_items")
    return keys


async def copy_pipe(source_dsn: str, target_dsn: str, slots: list[int]) -> tuple[int, int, float]:
    """The baseline: the same rows through a bare COPY pipe; (rows, bytes, seconds)."""
    async with admin.connect(source_dsn) as src, admin.connect(target_dsn) as dst:
        await dst.execute("DROP TABLE IF EXISTS bench_copy")
        await dst.execute("CREATE TABLE bench_copy (LIKE shardd_items INCLUDING ALL)")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
        size = 0

        async def produce() -> None:
            await src.copy_from_query(
                f"SELECT {', '.join(reshard.COLUMNS)} FROM shardd_items"
                " WHERE slot = ANY($1::int[])",
                slots,
                output=queue.put,
                format="binary",
            )
            await queue.put(None)

        async def chunks():  # type: ignore[no-untyped-def]
            nonlocal size
            while (chunk := await queue.get()) is not None:
                size += len(chunk)
                yield chunk

        started = time.perf_counter()
        producer = asyncio.create_task(produce())
        status = await dst.copy_to_table(
            "bench_copy", source=chunks(), columns=reshard.COLUMNS, format="binary"
        )
        await producer
        seconds = time.perf_counter() - started
        await dst.execute("DROP TABLE bench_copy")
    return int(status.split()[-1]), size, seconds


async def run(*, port: int, rows: int, writers: int, readers: int, directory: str) -> None:
    devcluster(directory, "up", "--port", str(port))
    catalog_dsn = f"postgresql://shardd@127.0.0.1:{port + 1}/shardd"
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await http.put(f"{url}/v1/tables/bench")
    loading = time.perf_counter()
    keys = await bulk_load(catalog_dsn, rows)
    click.echo(f"loaded {rows:,} rows in {time.perf_counter() - loading:.1f}s", err=True)
    devcluster(directory, "add-shard", "s4")

    phases: dict[int, dict[str, float]] = {}

    def progress(move: reshard.Move) -> None:
        phases.setdefault(move.id, {}).setdefault(move.phase, time.monotonic())

    mover = reshard.Mover(catalog_dsn, progress=progress)
    async with Clients(url, keys, writers=writers, readers=readers) as clients:
        await asyncio.sleep(3)
        # The baseline copies the same rows under the same client load.
        planned = await reshard.plan_for(catalog_dsn, group_slots=16)
        topo = await admin.topology(catalog_dsn)
        target = topo.shards["s4"].primary
        assert target is not None
        base_rows = base_bytes = 0
        base_seconds = 0.0
        for source in sorted({m.source for m in planned}):
            slots = [s for m in planned if m.source == source for s in m.slots]
            primary = topo.shards[source].primary
            assert primary is not None
            n, size, seconds = await copy_pipe(primary.dsn(), target.dsn(), slots)
            base_rows, base_bytes, base_seconds = (
                base_rows + n,
                base_bytes + size,
                base_seconds + seconds,
            )
        started = time.monotonic()
        moves = await reshard.rebalance(mover, group_slots=16, max_parallel=1)
        total = time.monotonic() - started
        await asyncio.sleep(1)

    # Moves copied together share one window: count wall-clock time once.
    copy_seconds = 0.0
    covered = float("-inf")
    for begin, end in sorted((p["copying"], p["catching_up"]) for p in phases.values()):
        copy_seconds += max(0.0, end - max(begin, covered))
        covered = max(covered, end)
    copied_rows = sum(m.rows_copied for m in moves)
    copied_bytes = sum(m.bytes_copied for m in moves)
    pauses = []
    for move in moves:
        times = phases[move.id]
        frozen, flipped = times["frozen"], times["flipped"]
        moved = set(move.slots)
        touching = [
            c.finished - c.started
            for c in clients.calls
            if c.write and c.slot in moved and c.finished >= frozen and c.started <= flipped
        ]
        pauses.append(max(touching, default=0.0))
    cutovers = [m.pause_ms or 0.0 for m in moves]
    failed = sum(1 for c in clients.calls if not c.ok)
    baseline_ms = [
        (c.finished - c.started) * 1000 for c in clients.calls if c.write and c.finished < started
    ]

    click.echo(
        f"\nmachine: {os.cpu_count()} cores, {platform.machine()}, Python"
        f" {platform.python_version()}; {rows:,} rows loaded, {len(moves)} moves of <=16 slots,"
        f" {writers} writers + {readers} readers through shardd\n"
    )
    mover_rate, pipe_rate = copied_rows / copy_seconds, base_rows / base_seconds
    click.echo(
        markdown(
            ["copy", "rows", "MB", "seconds", "rows/s", "MB/s"],
            [
                [
                    "a) shardd move (copy phase)",
                    f"{copied_rows:,}",
                    f"{copied_bytes / 1e6:.1f}",
                    f"{copy_seconds:.2f}",
                    f"{mover_rate:,.0f}",
                    f"{copied_bytes / 1e6 / copy_seconds:.1f}",
                ],
                [
                    "b) COPY pipe, same rows",
                    f"{base_rows:,}",
                    f"{base_bytes / 1e6:.1f}",
                    f"{base_seconds:.2f}",
                    f"{pipe_rate:,.0f}",
                    f"{base_bytes / 1e6 / base_seconds:.1f}",
                ],
            ],
        )
    )
    click.echo(f"\ncopy ratio a/b: {mover_rate / pipe_rate:.2f}\n")
    click.echo(
        markdown(
            ["write pause per slot group", "p50 ms", "p99 ms", "max ms"],
            [
                [
                    f"clients: longest write to the group's slots in its cutover ({len(pauses)})",
                    f"{percentile(pauses, 0.5) * 1000:.1f}",
                    f"{percentile(pauses, 0.99) * 1000:.1f}",
                    f"{max(pauses) * 1000:.1f}",
                ],
                [
                    "mover: frozen until the catalog named the new owner",
                    f"{percentile(cutovers, 0.5):.1f}",
                    f"{percentile(cutovers, 0.99):.1f}",
                    f"{max(cutovers):.1f}",
                ],
            ],
        )
    )
    click.echo(
        f"\nwrite latency before the rebalance: p50 {percentile(baseline_ms, 0.5):.1f} ms,"
        f" p99 {percentile(baseline_ms, 0.99):.1f} ms"
    )
    click.echo(f"requests: {len(clients.calls):,}, failed: {failed}; rebalance total {total:.1f}s")


@click.command()
@click.option("--port", default=29080, show_default=True)
@click.option("--rows", default=1_000_000, show_default=True, help="Items loaded first.")
@click.option("--writers", default=8, show_default=True)
@click.option("--readers", default=8, show_default=True)
def main(port: int, rows: int, writers: int, readers: int) -> None:
    """Measure an online rebalance onto a new shard under client load."""
    with scratch_cluster() as directory:
        asyncio.run(
            run(port=port, rows=rows, writers=writers, readers=readers, directory=directory)
        )


if __name__ == "__main__":
    main()
