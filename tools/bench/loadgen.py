"""What the benchmarks share: closed-loop load (C workers, each sending its next request
when the last one answered), percentiles, Markdown tables, and a throw-away devcluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVCLUSTER = Path(__file__).resolve().parent.parent / "devcluster"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def devcluster(directory: str, *args: str) -> str:
    done = subprocess.run(
        [str(DEVCLUSTER), *args, "--dir", directory], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"devcluster {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def scratch_cluster() -> Iterator[str]:
    """A folder for a devcluster that is stopped and deleted afterwards, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="shardd-bench-") as tmp:
        os.chmod(tmp, 0o755)
        directory = str(Path(tmp) / "cluster")
        try:
            yield directory
        finally:
            subprocess.run([str(DEVCLUSTER), "down", "--dir", directory], capture_output=True)


@dataclass(frozen=True)
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies: tuple[float, ...]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else 0.0

    @property
    def p99_ms(self) -> float:
        return self.percentile(0.99) * 1000

    def __add__(self, other: Result) -> Result:
        """Two measurements of the same target as one (e.g. rounds of one run)."""
        return Result(
            self.name,
            self.requests + other.requests,
            self.errors + other.errors,
            self.seconds + other.seconds,
            self.latencies + other.latencies,
        )


async def closed_loop(
    name: str,
    op: Callable[[str], Awaitable[bool]],
    keys: list[str],
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
) -> Result:
    """Run ``op(key)`` from ``concurrency`` workers; count only after ``warmup`` seconds."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds

    async def worker(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        while True:
            began = time.perf_counter()
            if began >= stop:
                return
            ok = await op(rng.choice(keys))
            ended = time.perf_counter()
            if began >= measure_from:
                latencies.append(ended - began)
                if not ok:
                    errors += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return Result(name, len(latencies), errors, seconds, tuple(latencies))


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    return markdown(
        ["target", "requests/s", "p50 ms", "p99 ms", "errors"],
        [
            [r.name, f"{r.throughput:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", str(r.errors)]
            for r in results
        ],
    )


async def ready(http: Any, base: str) -> None:
    """Until ``base``'s ``/readyz`` answers 200 (30 s at most); ``http`` is an
    aiohttp client session."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not up yet, or not answering
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} not ready")
