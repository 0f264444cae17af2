"""Failover under a steady write load: unplanned (SIGKILL) and planned, one run per
engine, the same load for each.

``--engine builtin`` starts a devcluster in synchronous mode (3 shards x primary +
replica, default failover settings) whose primaries shardd's monitor chooses;
``--engine patroni`` the same shards under Patroni on etcd (``devcluster up --ha
--sync``), whose leaders shardd follows; ``both`` (the default) runs one, then the other.
Each runs closed-loop writers with unique keys through shardd, and:

* kills a shard primary five times (shards in turn; the old primary is back as a
  replica before the next round: ``devcluster rejoin``, or under Patroni started again)
  and reports per kill the time from the kill to the first successful write on that
  shard, the requests that failed, and the acknowledged writes lost (checked at the
  end against the shards themselves);
* switches five primaries over (``shardctl failover``: shardd's switchover, or
  Patroni's followed by shardd) and reports failed requests and the write pause
  clients saw on that shard.

The baseline is the same load's write latency before any fault, measured in the same
run; with ``both``, a last table sets Patroni's numbers against the built-in monitor's.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from loadgen import devcluster, markdown, percentile, scratch_cluster  # noqa: E402

from shardd import failover  # noqa: E402
from shardd.placement import slot_of  # noqa: E402
from tools.ha import Ha  # noqa: E402


@dataclass
class Request:
    key: str
    shard: str
    node: str  # the node that served it (Shardd-Served-By), "" when it failed
    started: float
    finished: float
    status: int
    code: str

    @property
    def ok(self) -> bool:
        return self.status in (200, 201)

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass
class Kill:
    shard: str
    recovery: float
    failed: int
    unknown: int
    until: float


@dataclass
class Switch:
    shard: str
    pause: float
    failed: int
    server: float


class Writers:
    def __init__(self, url: str, slot_map: dict[int, str], slots: int, concurrency: int) -> None:
        self.url = url
        self.slot_map = slot_map
        self.slots = slots
        self.concurrency = concurrency
        self.log: list[Request] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Writers:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._writer(n)) for n in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _writer(self, number: int) -> None:
        sequence = 0
        while not self._stop.is_set():
            key = f"w{number}-{sequence}"
            sequence += 1
            shard = self.slot_map[slot_of(key, self.slots)]
            started = time.monotonic()
            try:
                async with self._session.put(
                    f"{self.url}/v1/tables/bench/items/{key}", json={"n": sequence}
                ) as resp:
                    body = await resp.json(content_type=None)
                    status = resp.status
                    node = resp.headers.get("Shardd-Served-By", "/").split("/")[1]
                    code = body.get("error", {}).get("code", "") if status >= 300 else ""
            except aiohttp.ClientError as exc:
                status, code, node = 0, type(exc).__name__, ""
            self.log.append(Request(key, shard, node, started, time.monotonic(), status, code))

    def acked(self) -> list[Request]:
        return [r for r in self.log if r.ok]

    def first_ack(self, shard: str, after: float, *, not_on: str) -> float | None:
        """When the first write on ``shard`` that another node than ``not_on`` served ended."""
        later = [
            r.finished
            for r in self.log
            if r.shard == shard and r.ok and r.finished > after and r.node != not_on
        ]
        return min(later) if later else None

    def window(self, start: float, end: float) -> list[Request]:
        return [r for r in self.log if r.finished >= start and r.started <= end]


async def sql(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@dataclass
class Summary:
    engine: str
    recovery_p50: float
    recovery_max: float
    pause_p50: float
    failed: int
    lost: int


async def wait_replica(catalog: str, node: str, *, within: float = 120) -> None:
    """Until the catalog records ``node`` as an unfenced replica again."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = await sql(catalog, "SELECT role, fenced FROM shardd_nodes WHERE name = $1", node)
        if rows and rows[0]["role"] == "replica" and not rows[0]["fenced"]:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{node} is not back as a replica after {within:.0f} s")


async def wait_synchronous(catalog: str, shard: str, *, within: float = 120) -> None:
    """Until the shard has a synchronous standby again (not degraded): a replica that
    only just came back is not one yet, and Patroni's synchronous mode promotes no other."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = await sql(catalog, "SELECT degraded FROM shardd_shards WHERE name = $1", shard)
        if rows and not rows[0]["degraded"]:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{shard} has no synchronous standby after {within:.0f} s")


async def run(*, engine: str, port: int, concurrency: int, rounds: int, directory: str) -> Summary:
    patroni = engine == "patroni"
    devcluster(directory, "up", "--port", str(port), "--sync", *(["--ha"] if patroni else []))
    if patroni:
        state = json.loads((Path(directory) / "cluster.json").read_text())
        catalog = Ha(Path(directory), state["ha"]).dsn()
    else:
        catalog = f"postgresql://shardd@127.0.0.1:{port + 1}/shardd"

    async def back_as_replica(old: str) -> None:
        """The old primary back as a replica: Patroni rewinds it once it runs again; the
        built-in cluster rebuilds it (``devcluster rejoin``)."""
        if patroni:
            devcluster(directory, "start", old)
        else:
            devcluster(directory, "rejoin", old)
        await wait_replica(catalog, old)

    async def primary(shard: str) -> tuple[str, str]:
        rows = await sql(
            catalog,
            "SELECT name, port FROM shardd_nodes WHERE shard = $1 AND role = 'primary'"
            " AND NOT fenced",
            shard,
        )
        if not rows:
            return "", ""
        return rows[0]["name"], f"postgresql://shardd@127.0.0.1:{rows[0]['port']}/shardd"

    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await http.put(f"{url}/v1/tables/bench")
    slot_rows = await sql(catalog, "SELECT slot, shard FROM shardd_slot_map")
    slot_map = {row["slot"]: row["shard"] for row in slot_rows}
    shards = sorted(set(slot_map.values()))
    unplanned: list[Kill] = []
    planned: list[Switch] = []
    async with Writers(url, slot_map, len(slot_map), concurrency) as writers:
        await asyncio.sleep(5)
        baseline = [r.finished - r.started for r in writers.acked()]
        for n in range(rounds):
            shard = shards[n % len(shards)]
            await wait_synchronous(catalog, shard)
            old, _ = await primary(shard)
            devcluster(directory, "kill", old)
            killed = time.monotonic()  # the SIGKILL is the command's last act
            while (first := writers.first_ack(shard, killed, not_on=old)) is None:
                if time.monotonic() - killed > 60:
                    raise RuntimeError(f"writes to {shard} did not resume within 60 s")
                await asyncio.sleep(0.05)
            window = writers.window(killed, first)
            unplanned.append(
                Kill(
                    shard,
                    recovery=first - killed,
                    failed=sum(1 for r in window if not r.ok),
                    unknown=sum(1 for r in window if r.code == "outcome_unknown"),
                    until=first,
                )
            )
            await back_as_replica(old)
            await asyncio.sleep(2)
        for n in range(rounds):
            shard = shards[n % len(shards)]
            await wait_synchronous(catalog, shard)
            old, _ = await primary(shard)
            started = time.monotonic()
            if patroni:
                outcome = await failover.patroni.switch_over(catalog, shard, to=None)
            else:
                outcome = await failover.switch_over(catalog, shard)
            ended = time.monotonic()
            await asyncio.sleep(1)
            window = writers.window(started, ended)
            planned.append(
                Switch(
                    shard,
                    pause=max((r.seconds for r in window if r.shard == shard), default=0.0),
                    failed=sum(1 for r in window if not r.ok),
                    server=outcome.seconds,
                )
            )
            if patroni:
                await wait_replica(catalog, old)  # Patroni restarts it as a replica
            else:
                devcluster(directory, "rejoin", old)
            await asyncio.sleep(2)
    # Lost: acknowledged writes missing from the shards' current primaries.
    present: set[str] = set()
    for shard in shards:
        _, dsn = await primary(shard)
        rows = await sql(dsn, "SELECT pk FROM shardd_items WHERE tbl = 'bench'")
        present |= {row["pk"] for row in rows}
    acked = writers.acked()
    lost = [r for r in acked if r.key not in present]
    base50, base99 = percentile(baseline, 0.5), percentile(baseline, 0.99)

    click.echo(f"\n## {engine}: {'Patroni on etcd, followed by shardd' if patroni else 'shardd'}")
    click.echo(
        f"\nmachine: {os.cpu_count()} cores, {platform.machine()},"
        f" Python {platform.python_version()}; {concurrency} writers,"
        f" {len(writers.log):,} requests, {len(acked):,} acknowledged"
    )
    click.echo(f"baseline write latency: p50 {base50 * 1000:.1f} ms, p99 {base99 * 1000:.1f} ms\n")
    rows_out = []
    previous = 0.0
    for i, kill in enumerate(unplanned, 1):
        lost_here = sum(1 for r in lost if previous < r.finished <= kill.until)
        previous = kill.until
        cells = (i, kill.shard, f"{kill.recovery:.2f}", kill.failed, kill.unknown, lost_here)
        rows_out.append([str(cell) for cell in cells])
    headers = ["kill", "shard", "kill → first write s", "failed", "of which outcome unknown"]
    click.echo(markdown([*headers, "acked writes lost"], rows_out))
    recoveries = [kill.recovery for kill in unplanned]
    click.echo(
        f"\nunplanned recovery p50 {statistics.median(recoveries):.2f} s,"
        f" max {max(recoveries):.2f} s\n"
    )
    rows_out = [
        [
            str(cell)
            for cell in (
                i,
                s.shard,
                s.failed,
                f"{s.pause * 1000:.0f}",
                f"{s.pause / base99:.1f}x",
                f"{s.server:.3f}",
            )
        ]
        for i, s in enumerate(planned, 1)
    ]
    headers = ["switchover", "shard", "failed", "write pause ms", "pause / baseline p99"]
    click.echo(markdown([*headers, "switchover s"], rows_out))
    pauses = [s.pause for s in planned]
    click.echo(
        f"\nplanned: {sum(s.failed for s in planned)} failed,"
        f" pause p50 {statistics.median(pauses) * 1000:.0f} ms,"
        f" p99 {percentile(pauses, 0.99) * 1000:.0f} ms"
    )
    failed_total = sum(1 for r in writers.log if not r.ok)
    click.echo(f"acknowledged writes lost: {len(lost)}; failed requests in all: {failed_total}")
    return Summary(
        engine,
        statistics.median(recoveries),
        max(recoveries),
        statistics.median(pauses),
        failed_total,
        len(lost),
    )


@click.command()
@click.option("--port", default=28080, show_default=True)
@click.option("--concurrency", default=16, show_default=True)
@click.option("--rounds", default=5, show_default=True, help="Kills, then switchovers.")
@click.option(
    "--engine",
    type=click.Choice(["builtin", "patroni", "both"]),
    default="both",
    show_default=True,
    help="Who chooses the shards' primaries.",
)
def main(port: int, concurrency: int, rounds: int, engine: str) -> None:
    """Measure unplanned failover and planned switchover under load."""
    summaries = []
    for name in ["builtin", "patroni"] if engine == "both" else [engine]:
        with scratch_cluster() as directory:
            summaries.append(
                asyncio.run(
                    run(
                        engine=name,
                        port=port,
                        concurrency=concurrency,
                        rounds=rounds,
                        directory=directory,
                    )
                )
            )
    if len(summaries) < 2:
        return
    base = summaries[0]
    rows = [
        [
            s.engine,
            f"{s.recovery_p50:.2f}",
            f"{s.recovery_max:.2f}",
            f"{s.recovery_p50 / base.recovery_p50:.1f}x",
            f"{s.pause_p50 * 1000:.0f}",
            str(s.failed),
            str(s.lost),
        ]
        for s in summaries
    ]
    headers = ["engine", "kill → write p50 s", "max s", "p50 / builtin", "switchover pause ms"]
    click.echo("\n" + markdown([*headers, "failed requests", "acked lost"], rows))


if __name__ == "__main__":
    main()
