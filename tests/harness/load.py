"""Client load for fault tests: writers with unique ids, each reading its own writes back.

Every request's outcome is recorded, so a test can check afterwards that every
acknowledged write is still there, that nothing refused (503) was written, and which
writes were reported as ambiguous (504 outcome_unknown).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tests.harness.cluster import RunningCluster
from tests.harness.http import Api


@dataclass
class Outcomes:
    acked: dict[str, dict[str, object]] = field(default_factory=dict)  # key -> document
    refused: dict[str, int] = field(default_factory=dict)  # key -> status (nothing written)
    unknown: set[str] = field(default_factory=set)  # outcome_unknown or connection lost
    failed_reads: list[tuple[str, int]] = field(default_factory=list)
    ack_times: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, shard)
    failure_times: list[float] = field(default_factory=list)  # writes refused or ambiguous
    write_seconds: list[tuple[float, float, str]] = field(default_factory=list)  # start, s, shard

    def failures(self) -> int:
        return len(self.refused) + len(self.unknown) + len(self.failed_reads)


class Pace:
    """At most ``rate`` rounds a second for one client thread: load that proves a fault
    window is covered without taking the CPU the cluster needs to get through it (on a
    small machine, flat-out clients slow every failover, move and restart they watch)."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self.interval = 1.0 / rate
        self.stop = stop
        self.next = time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        self.next = max(self.next + self.interval, now)  # a slow round is not made up for
        if self.next > now:
            self.stop.wait(self.next - now)


class Load:
    """``writers`` threads PUT unique keys through one or more instances until stopped,
    each at most ``rate`` writes a second.

    With ``read_back`` each writer then GETs the key with its session token, which must
    return what it wrote (read-your-writes across replicas).
    """

    def __init__(
        self,
        apis: list[Api],
        table: str,
        *,
        prefix: str,
        writers: int = 8,
        read_back: bool = False,
        rate: float = 50.0,
    ) -> None:
        self.apis = apis
        self.rate = rate
        self.table = table
        self.prefix = prefix
        self.read_back = read_back
        self.outcomes = Outcomes()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._writer, args=(n,), daemon=True) for n in range(writers)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Outcomes:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.outcomes

    def acks_on(self, shard: str, *, after: float) -> int:
        with self._lock:
            return sum(1 for at, where in self.outcomes.ack_times if where == shard and at > after)

    def _writer(self, number: int) -> None:
        base = self.apis[number % len(self.apis)]
        api = Api(base.port, token=base.token)
        sequence = 0
        pace = Pace(self.rate, self._stop)
        while not self._stop.is_set():
            pace.wait()
            if self._stop.is_set():
                break
            key = f"{self.prefix}-{number}-{sequence}"
            sequence += 1
            doc = {"writer": number, "n": sequence}
            started = time.monotonic()
            try:
                response = api.request("PUT", f"/v1/tables/{self.table}/items/{key}", body=doc)
            except OSError:
                with self._lock:
                    self.outcomes.unknown.add(key)
                    self.outcomes.failure_times.append(time.monotonic())
                api = Api(base.port, token=base.token)
                continue
            shard = (response.header("Shardd-Served-By") or "/").split("/")[0]
            with self._lock:
                if response.status in (200, 201):
                    self.outcomes.acked[key] = doc
                    self.outcomes.ack_times.append((time.monotonic(), shard))
                    self.outcomes.write_seconds.append((started, time.monotonic() - started, shard))
                elif response.status == 504 and response.body["error"]["code"] in (
                    "outcome_unknown",
                    "timeout",
                ):
                    self.outcomes.unknown.add(key)
                    self.outcomes.failure_times.append(time.monotonic())
                else:
                    self.outcomes.refused[key] = response.status
                    self.outcomes.failure_times.append(time.monotonic())
            if self.read_back and response.status in (200, 201):
                token = response.header("Shardd-Session") or ""
                read = api.request(
                    "GET",
                    f"/v1/tables/{self.table}/items/{key}",
                    headers={"Shardd-Session": token},
                )
                if read.status != 200 or read.body["item"] != doc:
                    with self._lock:
                        self.outcomes.failed_reads.append((key, read.status))


class Reader:
    """Reads of a fixed set of keys in a loop (``?consistency=...``), at most ``rate`` a
    second, until the block ends; every failure, an unanswered read included, is kept."""

    def __init__(
        self,
        api: Api,
        table: str,
        keys: list[str],
        *,
        consistency: str = "eventual",
        rate: float = 100.0,
    ) -> None:
        self.api = api
        self.rate = rate
        self.paths = [f"/v1/tables/{table}/items/{k}?consistency={consistency}" for k in keys]
        self.reads = 0
        self.failures: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pace = Pace(self.rate, self._stop)
        while not self._stop.is_set():
            for path in self.paths:
                pace.wait()
                if self._stop.is_set():
                    return
                try:
                    status = self.api.request("GET", path).status
                except OSError:  # a read that got no answer failed too
                    status = 0
                    self.api = Api(self.api.port, token=self.api.token)
                self.reads += 1
                if status != 200:
                    self.failures.append((time.monotonic(), path, status))

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def create_and_seed(cluster: RunningCluster, table: str, *, items: int = 2000) -> None:
    """Create ``table`` and write ``items`` items (pk ``pre-N``) in batches of 100."""
    api = cluster.api()
    assert api.request("PUT", f"/v1/tables/{table}").status == 201
    for start in range(0, items, 100):
        puts = [{"pk": f"pre-{i}", "item": {"i": i}} for i in range(start, start + 100)]
        written = api.request("POST", f"/v1/tables/{table}/batch/write", body={"puts": puts})
        assert written.status == 200 and written.body["ok"], written.body


def rows_by_shard(cluster: RunningCluster, table: str) -> dict[str, dict[str, tuple[int, str]]]:
    """shard -> pk -> (slot, doc as text), read from every shard's current primary."""
    shards = [r["name"] for r in cluster.sql("catalog", "SELECT name FROM shardd_shards")]
    result = {}
    for shard in shards:
        rows = cluster.sql(
            cluster.primary_of(shard),
            "SELECT pk, slot, doc::text AS doc FROM shardd_items WHERE tbl = $1",
            table,
        )
        result[shard] = {row["pk"]: (row["slot"], row["doc"]) for row in rows}
    return result


def assert_nothing_lost(cluster: RunningCluster, outcomes: Outcomes, table: str) -> None:
    """Every acked write reads back as written; nothing refused (503) was written."""
    assert outcomes.acked, "the load acknowledged no write at all"
    rows: dict[str, tuple[int, str]] = {}
    for shard_rows in rows_by_shard(cluster, table).values():
        rows.update(shard_rows)
    lost = [key for key in outcomes.acked if key not in rows]
    assert not lost, f"{len(lost)} acknowledged writes are missing, e.g. {lost[:5]}"
    written_though_refused = [key for key in outcomes.refused if key in rows]
    assert not written_though_refused, written_though_refused[:5]
    api = cluster.api("read")
    for key in list(outcomes.acked)[:: max(1, len(outcomes.acked) // 200)]:
        response = api.request("GET", f"/v1/tables/{table}/items/{key}?consistency=strong")
        assert response.status == 200 and response.body["item"] == outcomes.acked[key]
