"""Start and drive a real devcluster (Postgres processes + shardd) for the tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from shardd import admin, pgctl, reshard
from shardd.placement import slot_of
from tests.harness.http import Api
from tools.ha import Ha

ROOT = Path(__file__).resolve().parents[2]
SLOTS = 4096  # the slot count of every test cluster (shardd's default)
DEVCLUSTER = ROOT / "tools" / "devcluster"
T = TypeVar("T")

TOKENS = {"admin": "admin-secret-0123", "write": "writer-secret-4567", "read": "reader-secret-89"}


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections: a port above it can
    be taken by any client socket between the check and the bind."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(size: int) -> int:
    top = min(40000, _ephemeral_low()) - size - 1
    for _ in range(200):
        base = random.randint(15000, top)
        ok = True
        for port in range(base, base + size):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, every: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


@dataclass
class Instance:
    """A second (third, ...) shardd instance on the same catalog."""

    port: int
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@dataclass
class RunningCluster:
    dir: Path
    port: int
    env: dict[str, str]
    _ports: dict[str, int] = field(default_factory=dict, repr=False)

    def devcluster(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(DEVCLUSTER), *args, "--dir", str(self.dir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"devcluster {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.devcluster("status", "--json").stdout)
        return data

    def node_port(self, name: str) -> int:
        # A node keeps its port for life; `devcluster status` is asked only for new ones.
        if name not in self._ports:
            self._ports.update({n["name"]: int(n["port"]) for n in self.status()["nodes"]})
        return self._ports[name]

    def catalog_dsn(self) -> str:
        """The catalog; with ``ha``, every Patroni member (the client finds the primary)."""
        ha = json.loads((self.dir / "cluster.json").read_text()).get("ha")
        if ha:
            return Ha(self.dir, ha).dsn()
        return f"postgresql://shardd@127.0.0.1:{self.node_port('catalog')}/shardd"

    def node_dsn(self, name: str) -> str:
        if name == "catalog":
            return self.catalog_dsn()
        return f"postgresql://shardd@127.0.0.1:{self.node_port(name)}/shardd"

    def sql(self, node: str, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run one query on a node directly (to check what physically happened)."""

        async def go() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.node_dsn(node))
            try:
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return asyncio.run(go())

    def move(self, source: str, target: str, slots: list[int]) -> reshard.Move:
        """Move ``slots`` from ``source`` to ``target`` now, as ``shardctl rebalance``
        does; returns the finished move."""

        async def go() -> reshard.Move:
            async with admin.connect(self.catalog_dsn()) as cat:
                [move] = await reshard.create_run(
                    cat, [reshard.PlannedMove(source, target, tuple(slots))], reason="test"
                )
            [done] = await reshard.run_moves(
                reshard.Mover(self.catalog_dsn(), lease=2.0), [move], max_parallel=1
            )
            return done

        return asyncio.run(go())

    def on_primaries(self, work: Callable[[asyncpg.Connection], Any]) -> list[Any]:
        """``await work(conn)`` on each shard's primary, directly (as the monitor does)."""

        async def go(dsn: str) -> Any:
            conn = await asyncpg.connect(dsn)
            try:
                return await work(conn)
            finally:
                await conn.close()

        rows = self.sql("catalog", "SELECT name FROM shardd_shards ORDER BY name")
        shards = [row["name"] for row in rows]
        return [asyncio.run(go(self.node_dsn(self.primary_of(shard)))) for shard in shards]

    def redis_url(self) -> str:
        state = json.loads((self.dir / "cluster.json").read_text())
        return f"redis://127.0.0.1:{state['redis_port']}/0"

    def slot_map(self) -> dict[int, str]:
        """slot -> owning shard, as the catalog records it now."""
        rows = self.sql("catalog", "SELECT slot, shard FROM shardd_slot_map")
        return {row["slot"]: row["shard"] for row in rows}

    def metric(self, name: str, *, port: int | None = None, **labels: str) -> float | None:
        """The value of one sample of an instance's /metrics (this cluster's, or the one
        on ``port``), or None when absent."""
        api = self.api(None) if port is None else Api(port)
        for line in api.request("GET", "/metrics").raw.decode().splitlines():
            sample, _, value = line.rpartition(" ")
            metric, _, rest = sample.partition("{")
            if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                return float(value)
        return None

    def keys_on(self, shard: str, prefix: str, count: int) -> list[str]:
        """``count`` keys ``{prefix}-{n}`` whose slots the catalog maps to ``shard`` now."""
        slot_map = self.slot_map()
        keys = (f"{prefix}-{i}" for i in range(100_000))
        found = list(
            itertools.islice((k for k in keys if slot_map[slot_of(k, SLOTS)] == shard), count)
        )
        assert len(found) == count, f"not {count} keys with prefix {prefix} on {shard}"
        return found

    def primary_of(self, shard: str) -> str:
        """The shard's primary as the catalog records it now."""
        rows = self.sql(
            "catalog",
            "SELECT name FROM shardd_nodes WHERE shard = $1 AND role = 'primary' AND NOT fenced",
            shard,
        )
        return str(rows[0]["name"]) if rows else ""

    def replicas_of(self, shard: str) -> list[str]:
        rows = self.sql(
            "catalog",
            "SELECT name FROM shardd_nodes WHERE shard = $1 AND role = 'replica' AND NOT fenced"
            " ORDER BY name",
            shard,
        )
        return [str(row["name"]) for row in rows]

    def monitor(self) -> str:
        """The instance id ("host:port:pid") holding the failover monitor lease."""
        rows = self.sql("catalog", "SELECT holder FROM shardd_leases WHERE name = 'monitor'")
        return str(rows[0]["holder"]) if rows else ""

    @contextlib.contextmanager
    def paused(self, node: str) -> Iterator[None]:
        """SIGSTOP a node's postmaster and all its processes: a Postgres that hangs (its
        port still accepts TCP connections) rather than dies.  SIGCONT on the way out."""
        postmaster = pgctl.postmaster_pid(self.dir / node)
        assert postmaster is not None, f"{node} is not running"
        stopped = [postmaster]
        os.kill(postmaster, signal.SIGSTOP)  # first, so it forks no new backends meanwhile
        try:
            for child in _children(postmaster):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGSTOP)
                    stopped.append(child)
            yield
        finally:
            for pid in reversed(stopped):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def heal(self) -> None:
        """Bring every fenced former primary back as a replica (started if needed)."""
        for row in self.sql("catalog", "SELECT name FROM shardd_nodes WHERE fenced"):
            self.devcluster("rejoin", row["name"])

    @contextlib.contextmanager
    def instance(self, **settings: str) -> Iterator[Instance]:
        """:meth:`start_instance`, stopped on the way out."""
        started = self.start_instance(**settings)
        try:
            yield started
        finally:
            started.stop()

    def start_instance(self, **settings: str) -> Instance:
        """Another shardd instance on this cluster's catalog, on a free port; ``settings``
        override this cluster's (``max_response_bytes="4000"``)."""
        port = free_port_block(1)
        env = {**self.env, "SHARDD_CATALOG_DSN": self.catalog_dsn(), "SHARDD_PORT": str(port)}
        env.update({f"SHARDD_{name.upper()}": value for name, value in settings.items()})
        log = open(self.dir / f"shardd-{port}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "shardd.server"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        instance = Instance(port, process)
        wait_for(
            lambda: _ready(port) or process.poll() is not None, timeout=30, what="shardd ready"
        )
        if process.poll() is not None:
            raise RuntimeError(f"shardd on port {port} exited; see {log.name}")
        return instance

    def api(self, scope: str | None = "admin") -> Api:
        return Api(self.port, token=TOKENS[scope] if scope else None)

    def shardctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SHARDD_CATALOG_DSN": self.catalog_dsn()}
        return subprocess.run(
            [str(ROOT / ".venv" / "bin" / "shardctl"), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            env=env,
        )

    def down(self) -> None:
        """Stop everything; SHARDD_TEST_KEEP=1 keeps the folder (logs) for a post-mortem."""
        keep = os.environ.get("SHARDD_TEST_KEEP") == "1"
        self.devcluster("down", *(() if keep else ("--purge",)), check=False)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_cluster(
    *,
    shards: int = 3,
    replicas: int = 1,
    sync: bool = False,
    failover: bool = True,
    write_buffer: float = 1.0,
    settings: dict[str, object] | None = None,
    redis: bool = False,
    instances: int = 1,
    zones: str = "",
    ha: bool = False,
) -> RunningCluster:
    """A devcluster in a temporary folder; ``failover=False`` leaves dead primaries dead.
    ``zones`` ("a,b,c") spreads each shard's nodes over those zones (``up --zones``);
    ``ha`` runs the catalog on Patroni and etcd (``up --ha``).

    ``settings`` overrides shardd settings by name (``{"topology_lease": 2.0}``).  With
    ``redis`` the cluster runs a redis-server too (:meth:`RunningCluster.redis_url`); its
    shardd keeps the in-process cache unless ``settings`` say otherwise.
    """
    directory = Path(tempfile.mkdtemp(prefix="shardd-test-"))
    os.chmod(directory, 0o755)
    # Instances behind HAProxy listen after --port + 100 (see tools/devcluster).
    port = free_port_block(
        max(
            2 + (1 + replicas) * shards,
            101 + instances if instances > 1 else 0,
            320 if ha else 0,  # Patroni and etcd after --port + 200 (tools/ha.py)
        )
    )
    env = {
        **os.environ,
        "SHARDD_TOKENS": ";".join(f"{secret}:{scope}" for scope, secret in TOKENS.items()),
        "SHARDD_HEALTH_INTERVAL": "0.2",
        "SHARDD_TOPOLOGY_POLL_INTERVAL": "1.0",
        "SHARDD_ACCESS_LOG": "false",
        "SHARDD_FAILOVER": str(failover).lower(),
        "SHARDD_WRITE_BUFFER_TIMEOUT": str(write_buffer),
        **{f"SHARDD_{name.upper()}": str(value) for name, value in (settings or {}).items()},
    }
    cluster = RunningCluster(directory, port, env)
    options = ["--port", str(port), "--shards", str(shards), "--replicas", str(replicas)]
    options += ["--sync"] if sync else []
    options += ["--instances", str(instances)] if instances > 1 else []
    options += ["--zones", zones] if zones else []
    options += ["--ha"] if ha else []
    if redis:
        options += ["--redis", "--redis-port", str(free_port_block(1))]
        env.setdefault("SHARDD_CACHE_BACKEND", "local")
    result = subprocess.run(
        [str(DEVCLUSTER), "up", "--dir", str(directory), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if result.returncode != 0:
        log = directory / "shardd.log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        cluster.down()
        raise RuntimeError(f"devcluster up failed:\n{result.stdout}\n{result.stderr}\n{tail}")
    return cluster


class Holding:
    """An open transaction on a node that ran ``statement`` and holds its locks until
    ``release()``: how a test makes a step of the system wait at a known point."""

    def __init__(self, dsn: str, statement: str, *args: Any) -> None:
        self._ready = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._hold(dsn, statement, args)), daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._error is not None:
            raise RuntimeError(f"could not hold {statement!r}: {self._error}")

    async def _hold(self, dsn: str, statement: str, args: tuple[Any, ...]) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(statement, *args)
                self._ready.set()
                await asyncio.to_thread(self._release.wait)
                raise _Rollback
        except _Rollback:
            pass
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            await conn.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(timeout=30)


class _Rollback(Exception):
    pass
