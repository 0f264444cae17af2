"""Hot-key detection: which keys, slots and shards take the traffic, live.

Each instance counts its own requests (:class:`Traffic`):

* per key (table, pk), reads and writes, in a Space-Saving summary of ``hotkeys_capacity``
  counters (:class:`SpaceSaving`): memory is bounded whatever the key space, and every key
  whose count exceeds total/capacity is in it;
* per slot, every request (the slot count bounds the table).

Counts decay exponentially with time constant ``hotkeys_window``: a count divided by the
window is a rate per second over (about) the last window.  Decay costs one ``exp`` per
request: a request adds ``e^((t - t0)/window)`` instead of 1, and reading divides by the
same factor (``t0`` moves on, and everything is rescaled, before the factor grows large).

Requests are first counted in a small pending table and folded into the summary in
batches (at every report, or sooner when the pending table reaches its bound), which
keeps the per-request cost at two dictionary updates.  A batch fold is Space-Saving's
rule applied to many keys at once: a key new to the summary enters with the largest
count dropped so far as its possible overcount (``error``); once the summary holds twice
``capacity`` keys, the ``capacity`` largest counts stay.  The count minus its error is a
guaranteed lower bound; that is what is ranked and reported.

Every ``hotkeys_report_interval`` each instance writes its summary (the top keys, the
busiest slots and every shard, as rates) to the catalog (``shardd_traffic_reports``); :func:`merge`
adds up the fresh reports of all instances into one view (``GET /v1/admin/hotkeys``,
``shardctl hot``), with each key's share of all traffic through all instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import orjson

from . import metrics
from .config import Settings
from .placement import slot_of
from .topology import Topology
from .watcher import TopologyWatcher

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
RESCALE_AT = 40.0  # rescale stored counts once the decay exponent reaches this
REPORT_KEYS = 100  # keys per instance report
REPORT_SLOTS = 256  # slots per instance report (the busiest)
SLOT_REPORT_EVERY = 4  # reports between two counts of slots and shards (they cost more)
PENDING_FACTOR = 4  # pending keys bound, as a multiple of the capacity


class SpaceSaving(Generic[K]):
    """The ``capacity`` heaviest keys of a stream with their counts (see module note).

    Counts are in stored units; :class:`Traffic` owns the decay scale.  Each counter is
    ``[count, reads, writes, error]``: ``count`` is an upper bound of the key's true count,
    ``count - error`` a lower bound.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.counters: dict[K, list[float]] = {}
        # The largest count dropped so far: a key not in the summary counted at most
        # this much, so a newcomer may have (and starts with) that much of an overcount.
        self.floor = 0.0

    def fold(self, batch: Mapping[K, Sequence[float]]) -> None:
        """Add a batch of (reads, writes) per key.

        The summary may grow to twice its capacity between trims, so a trim (a partial
        sort) is paid once per ``capacity`` new keys, not on every fold.
        """
        counters = self.counters
        floor = self.floor
        for key, (reads, writes) in batch.items():
            counter = counters.get(key)
            if counter is None:
                counters[key] = [floor + reads + writes, reads, writes, floor]
            else:
                counter[0] += reads + writes
                counter[1] += reads
                counter[2] += writes
        if len(counters) > 2 * self.capacity:
            cut = sorted([c[0] for c in counters.values()], reverse=True)[self.capacity]
            kept = {key: c for key, c in counters.items() if c[0] > cut}
            for key, c in counters.items():  # ties at the cut, while there is room
                if len(kept) >= self.capacity:
                    break
                if c[0] == cut:
                    kept[key] = c
            self.floor = max(self.floor, cut)
            self.counters = kept

    def scale(self, factor: float) -> None:
        self.floor *= factor
        for counter in self.counters.values():
            for i in range(4):
                counter[i] *= factor

    def top(self, n: int) -> list[tuple[K, float, float, float]]:
        """The ``n`` keys with the highest guaranteed count: (key, count, reads, writes),
        guaranteed counts, reads and writes scaled down to match."""
        ranked = heapq.nlargest(n, self.counters.items(), key=lambda kv: kv[1][0] - kv[1][3])
        out = []
        for key, (count, reads, writes, error) in ranked:
            sure = count - error
            # The overcount belongs to whichever kind the newcomer brought: scale both.
            total = reads + writes
            part = sure / total if total > 0 else 0.0
            out.append((key, sure, reads * part, writes * part))
        return out

    def approx_bytes(self) -> int:
        """A rough size of the summary in memory (keys, counters and the dict)."""
        size = sys.getsizeof(self.counters)
        for key, counter in self.counters.items():
            size += sys.getsizeof(counter) + 4 * 24
            size += sys.getsizeof(key)
            if isinstance(key, tuple):
                size += sum(sys.getsizeof(part) for part in key)
        return size


class Traffic:
    """This instance's request counts, decaying over ``window`` seconds."""

    def __init__(
        self,
        *,
        capacity: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.clock = clock
        self.keys: SpaceSaving[tuple[str, str]] = SpaceSaving(capacity)
        self.slots: defaultdict[int, float] = defaultdict(float)
        self._max_pending = PENDING_FACTOR * capacity
        self._pending: dict[tuple[str, str], list[float]] = {}
        self._t0 = clock()
        self.total_reads = 0.0
        self.total_writes = 0.0

    def record(self, table: str, pk: str, slot: int, *, write: bool = False, n: int = 1) -> None:
        """Count ``n`` requests for one key (cheap: called on every request)."""
        exponent = (self.clock() - self._t0) / self.window
        counts = self._pending.get((table, pk))
        if counts is None or exponent > RESCALE_AT:
            if len(self._pending) >= self._max_pending or exponent > RESCALE_AT:
                self.fold()
                exponent = (self.clock() - self._t0) / self.window
            counts = self._pending.setdefault((table, pk), [0.0, 0.0])
        w = n * math.exp(exponent)  # after a fold's rescale, never before
        counts[write] += w
        self.slots[slot] += w
        if write:
            self.total_writes += w
        else:
            self.total_reads += w

    def fold(self) -> None:
        """Move the pending counts into the summary (and rescale when it is time)."""
        pending, self._pending = self._pending, {}
        self.keys.fold(pending)
        if (self.clock() - self._t0) / self.window > RESCALE_AT:
            self._rescale()

    def _rescale(self) -> None:
        now = self.clock()
        factor = math.exp(-(now - self._t0) / self.window)
        self.keys.scale(factor)
        for slot in self.slots:
            self.slots[slot] *= factor
        self.total_reads *= factor
        self.total_writes *= factor
        self._t0 = now

    def report(
        self, slot_map: Sequence[str | None] = (), *, keys: int = REPORT_KEYS, slots: bool = True
    ) -> dict[str, Any]:
        """Rates per second over the window: the top keys and the totals; with ``slots``
        also the busiest slots and every shard's rate (by ``slot_map``, slot -> owner)."""
        self.fold()
        # stored units -> rate now: divide by e^((now - t0)/window) and by the window
        to_rate = math.exp(-(self.clock() - self._t0) / self.window) / self.window
        report: dict[str, Any] = {
            "window_seconds": self.window,
            "reads_per_s": round(self.total_reads * to_rate, 3),
            "writes_per_s": round(self.total_writes * to_rate, 3),
            "keys": [
                [table, pk, round(reads * to_rate, 3), round(writes * to_rate, 3)]
                for (table, pk), _, reads, writes in self.keys.top(keys)
            ],
        }
        if slots:
            shards: dict[str, float] = {}
            for slot, value in self.slots.items():
                owner = slot_map[slot] if 0 <= slot < len(slot_map) else None
                if owner is not None:
                    shards[owner] = shards.get(owner, 0.0) + value
            busiest = heapq.nlargest(REPORT_SLOTS, self.slots.items(), key=lambda kv: kv[1])
            report["slots"] = [
                [slot, round(value * to_rate, 3)]
                for slot, value in busiest
                if value * to_rate >= 0.001
            ]
            report["shards"] = {name: round(rate * to_rate, 3) for name, rate in shards.items()}
        return report


# -- the merged view -------------------------------------------------------------------


@dataclass(frozen=True)
class HotKey:
    table: str
    pk: str
    slot: int
    shard: str | None
    reads_per_s: float
    writes_per_s: float
    share: float

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "pk": self.pk,
            "slot": self.slot,
            "shard": self.shard,
            "reads_per_s": round(self.reads_per_s, 2),
            "writes_per_s": round(self.writes_per_s, 2),
            "share": round(self.share, 4),
        }


@dataclass(frozen=True)
class HotView:
    """The merged traffic of every instance that reported recently."""

    window_seconds: float
    instances: tuple[str, ...]
    requests_per_s: float
    keys: tuple[HotKey, ...]  # by share, highest first
    slot_rates: Mapping[int, float]
    shard_rates: Mapping[str, float]
    slot_owners: Mapping[int, str | None]

    def shard_vs_mean(self) -> dict[str, float]:
        mean = sum(self.shard_rates.values()) / max(1, len(self.shard_rates))
        return {name: (rate / mean if mean > 0 else 0.0) for name, rate in self.shard_rates.items()}

    def as_json(self, *, limit: int = 20) -> dict[str, Any]:
        total = self.requests_per_s
        top_slots = heapq.nlargest(limit, self.slot_rates.items(), key=lambda kv: kv[1])
        vs_mean = self.shard_vs_mean()
        return {
            "window_seconds": self.window_seconds,
            "instances": list(self.instances),
            "requests_per_s": round(total, 2),
            "keys": [key.as_json() for key in self.keys[:limit]],
            "slots": [
                {
                    "slot": slot,
                    "shard": self.slot_owners.get(slot),
                    "requests_per_s": round(rate, 2),
                    "share": round(rate / total, 4) if total > 0 else 0.0,
                }
                for slot, rate in top_slots
            ],
            "shards": [
                {
                    "name": name,
                    "requests_per_s": round(rate, 2),
                    "vs_mean": round(vs_mean[name], 3),
                }
                for name, rate in sorted(self.shard_rates.items())
            ],
        }


def merge(
    reports: Iterable[tuple[str, Mapping[str, Any]]], topology: Topology, *, window: float
) -> HotView:
    """One view of the reports (instance, report) against ``topology``: every rate is
    the sum over instances, each key's share is of all traffic through all of them."""
    reports_seen = list(reports)
    names: list[str] = []
    key_rates: dict[tuple[str, str], list[float]] = {}
    slot_rates: dict[int, float] = {}
    total = 0.0
    for instance, report in reports_seen:
        names.append(instance)
        total += float(report.get("reads_per_s", 0)) + float(report.get("writes_per_s", 0))
        for table, pk, reads, writes in report.get("keys", ()):
            rates = key_rates.setdefault((table, pk), [0.0, 0.0])
            rates[0] += reads
            rates[1] += writes
        for slot, rate in report.get("slots", ()):
            if 0 <= slot < topology.slot_count:
                slot_rates[slot] = slot_rates.get(slot, 0.0) + rate
    shard_rates = dict.fromkeys(topology.shards, 0.0)
    for _, report in reports_seen:
        for name, rate in report.get("shards", {}).items():
            if name in shard_rates:
                shard_rates[name] += rate
    keys = []
    for (table, pk), (reads, writes) in key_rates.items():
        slot = slot_of(pk, topology.slot_count)
        keys.append(
            HotKey(
                table,
                pk,
                slot,
                topology.slot_map[slot],
                reads,
                writes,
                (reads + writes) / total if total > 0 else 0.0,
            )
        )
    keys.sort(key=lambda k: (-k.share, k.table, k.pk))
    return HotView(
        window_seconds=window,
        instances=tuple(sorted(names)),
        requests_per_s=total,
        keys=tuple(keys),
        slot_rates=slot_rates,
        shard_rates=shard_rates,
        slot_owners={slot: topology.slot_map[slot] for slot in slot_rates},
    )


# -- the catalog side --------------------------------------------------------------------


def report_max_age(settings: Settings) -> float:
    """Reports older than this are of instances gone (or cut off from the catalog)."""
    return max(3 * settings.hotkeys_report_interval, 2.0)


async def publish(conn: asyncpg.Connection, instance: str, report: Mapping[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO shardd_traffic_reports (instance, report) VALUES ($1, $2::text::jsonb)"
        " ON CONFLICT (instance) DO UPDATE SET report = excluded.report, reported_at = now()",
        instance,
        orjson.dumps(report).decode(),
    )


async def fresh_reports(
    conn: asyncpg.Connection, *, max_age: float
) -> list[tuple[str, dict[str, Any]]]:
    """(instance, report) of every instance that reported within ``max_age`` seconds."""
    rows = await conn.fetch(
        "SELECT instance, report::text AS report FROM shardd_traffic_reports"
        " WHERE reported_at > now() - make_interval(secs => $1) ORDER BY instance",
        max_age,
    )
    return [(row["instance"], orjson.loads(row["report"])) for row in rows]


async def withdraw(conn: asyncpg.Connection, instance: str) -> None:
    await conn.execute("DELETE FROM shardd_traffic_reports WHERE instance = $1", instance)


async def load_view(conn: asyncpg.Connection, topology: Topology, settings: Settings) -> HotView:
    """The merged view of every fresh report in the catalog."""
    reports = await fresh_reports(conn, max_age=report_max_age(settings))
    return merge(reports, topology, window=settings.hotkeys_window)


# -- the reporting loop ---------------------------------------------------------------------


class Reporter:
    """Reports this instance's traffic and keeps the merged view (and the hot set) current.

    Every ``hotkeys_report_interval``: publish this instance's report, read every fresh
    report, merge.  A key is hot when it takes at least ``hot_key_share`` of all traffic
    and ``hot_key_min_rate`` requests per second.  The instance that sorts first among
    those reporting logs keys as they turn hot (and as they cool down) and counts the
    detections, so each is logged once in the cluster.  A catalog that does not answer
    costs a round, nothing else: counts still decay, and the hot set stays as it was
    until it answers.
    """

    def __init__(self, settings: Settings, watcher: TopologyWatcher, traffic: Traffic) -> None:
        self.settings = settings
        self.watcher = watcher
        self.traffic = traffic
        self.view: HotView | None = None
        self.hot: frozenset[tuple[str, str]] = frozenset()
        self._slots: dict[str, Any] | None = None  # the last report's slots and shards
        self._epoch: int | None = None
        self._logged: set[tuple[str, str]] = set()

    async def run(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.hotkeys_report_interval)
            topology = self.watcher.topology
            rounds += 1
            epoch = topology.epoch if topology is not None else None
            slots = rounds % SLOT_REPORT_EVERY == 1 or self._slots is None or epoch != self._epoch
            # (folds and decays, catalog or not)
            report = self.traffic.report(topology.slot_map if topology else (), slots=slots)
            if slots:
                self._slots = {name: report[name] for name in ("slots", "shards")}
                self._epoch = epoch  # shards were counted with this map
            else:  # slots and shards change slowly: the last ones go again
                report.update(self._slots or {})
            if topology is None:
                continue
            try:
                async with self.watcher.catalog_connection() as conn:
                    await publish(conn, self.watcher.instance, report)
                    reports = await fresh_reports(conn, max_age=report_max_age(self.settings))
                self.update(merge(reports, topology, window=self.settings.hotkeys_window))
            except Exception as exc:  # a round lost (catalog down, a report unreadable)
                metrics.TRAFFIC_REPORT_FAILURES.inc()
                log.debug("traffic report failed: %s", exc)

    def update(self, view: HotView) -> None:
        threshold = self.settings.hot_key_share
        self.view = view
        min_rate = self.settings.hot_key_min_rate
        hot = [
            key
            for key in view.keys
            if key.share >= threshold and key.reads_per_s + key.writes_per_s >= min_rate
        ]
        self.hot = frozenset((key.table, key.pk) for key in hot)
        metrics.HOT_KEYS.set(len(hot))
        metrics.TOP_KEY_SHARE.set(view.keys[0].share if view.keys else 0.0)
        for name, rate in view.shard_rates.items():
            metrics.SHARD_REQUEST_RATE.labels(name).set(rate)
        metrics.SHARD_IMBALANCE.set(max(view.shard_vs_mean().values(), default=0.0))
        if not view.instances or view.instances[0] != self.watcher.instance:
            self._logged = set(self.hot)  # another instance speaks for the cluster
            return
        for key in hot:
            if (key.table, key.pk) not in self._logged:
                metrics.HOT_KEY_DETECTIONS.inc()
                log.warning(
                    "hot key detected: %s/%s takes %.1f%% of all traffic"
                    " (%.1f reads/s, %.1f writes/s, slot %s on %s)",
                    key.table,
                    key.pk,
                    100 * key.share,
                    key.reads_per_s,
                    key.writes_per_s,
                    key.slot,
                    key.shard,
                )
        for table, pk in self._logged - self.hot:
            log.warning("hot key cooled down: %s/%s is below %.1f%%", table, pk, 100 * threshold)
        self._logged = set(self.hot)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with self.watcher.catalog_connection() as conn:
                await withdraw(conn, self.watcher.instance)
