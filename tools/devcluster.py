"""A real local shardd cluster on loopback: catalog + N shards x (primary + R replicas) + shardd.

Everything lives under --dir (default ./.devcluster): one data directory per Postgres
node, their logs, shardd's log, and cluster.json, which records what was created.  As
root, Postgres runs as the unprivileged ``postgres`` user (Postgres refuses root).

Ports: shardd on --port; Postgres nodes from --pg-port upwards (catalog first).  With
``--instances N`` (N > 1), HAProxy listens on --port (deploy/haproxy.cfg) in front of N
shardd instances, ``shardd-1`` ... ``shardd-N``, on the ports after --port + 100.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardd import admin, config, failover, pgctl  # noqa: E402
from tools.ha import Ha, HaError  # noqa: E402

PG_USER = "postgres"
DB = "shardd"
STATE = "cluster.json"


# -- Postgres binaries and running as the right user ------------------------------------


def pg_bindir() -> Path:
    """Newest /usr/lib/postgresql/<version>/bin with initdb; install it when root."""
    bindir = pgctl.bindir()
    if bindir is None and os.geteuid() == 0:
        click.echo("PostgreSQL server binaries not found; installing with apt-get ...", err=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env)
        bindir = pgctl.bindir()
    if bindir is None:
        raise click.ClickException(
            "PostgreSQL server binaries not found. Install them with:\n"
            "    sudo apt-get install -y postgresql"
        )
    return bindir


def apt_binary(name: str, package: str) -> str:
    """A server binary (on the PATH or in /usr/sbin, /usr/bin); installed with apt-get
    when missing and root, else a message saying what to install."""

    def find() -> str | None:
        return shutil.which(name) or next(
            (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()),
            None,
        )

    found = find()
    if found is None and os.geteuid() == 0:
        click.echo(f"{name} not found; installing {package} with apt-get ...", err=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, env=env)
        found = find()
    if found is None:
        raise click.ClickException(
            f"{name} not found. Install it with:\n    sudo apt-get install -y {package}"
        )
    return found


def redis_server() -> str:
    return apt_binary("redis-server", "redis-server")


def haproxy_bin() -> str:
    return apt_binary("haproxy", "haproxy")


def as_pg_user(cmd: list[str]) -> list[str]:
    return pgctl.as_user(cmd, PG_USER)


def run_pg(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(as_pg_user(cmd), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise click.ClickException(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result


def _pg_owns(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def own_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        check = subprocess.run(as_pg_user(["test", "-w", str(path)]))
        if check.returncode != 0:
            raise click.ClickException(
                f"user {PG_USER} cannot write to {path}; choose a --dir whose parents it can"
                " enter (for example under /tmp)"
            )


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def title(node: dict[str, Any]) -> str:
    """The node's cluster_name, unique on this machine (its port is part of it)."""
    return f"{node['name']}-{node['port']}"


def backends_of(cluster_name: str) -> list[int]:
    """Live processes titled "postgres: <cluster_name>: ..." (set by cluster_name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(f"postgres: {cluster_name}: ".encode()) and pgctl.alive(
            int(entry.name)
        ):
            found.append(int(entry.name))
    return found


# -- cluster state ------------------------------------------------------------------


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()
        self.state_file = self.dir / STATE
        self.state: dict[str, Any] = {}
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    @property
    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.state.setdefault("nodes", [])
        return nodes

    def node(self, name: str) -> dict[str, Any]:
        for node in self.nodes:
            if node["name"] == name:
                return node
        names = ", ".join(n["name"] for n in self.nodes)
        raise click.ClickException(f"no node {name!r}; nodes are: {names}, shardd")

    def dsn(self, node: dict[str, Any]) -> str:
        return f"postgresql://shardd@127.0.0.1:{node['port']}/{DB}"

    @property
    def ha(self) -> Ha | None:
        """The catalog's Patroni cluster on etcd (``up --ha``); None for a plain catalog."""
        return Ha(self.dir, self.state["ha"]) if self.state.get("ha") else None

    @property
    def catalog_dsn(self) -> str:
        if self.ha is not None:
            return self.ha.dsn()
        return self.dsn(self.node("catalog"))

    def start_ha(self) -> None:
        """etcd, then the Patroni members (the catalog's and the shards'); returns once
        each runs a leader and every member has the database."""
        ha = self.ha
        assert ha is not None
        etcd = apt_binary("etcd", "etcd-server")
        for member in ha.state["etcd"]:
            ha.start_etcd(member, etcd)
        try:
            ha.wait_etcd()
        except HaError as exc:
            raise click.ClickException(str(exc)) from exc
        self.start_patroni(ha.state["catalog"], new=False)
        for shard in ha.state.get("shards", {}).values():
            self.start_patroni(shard, new=False)

    def start_patroni(self, members: list[dict[str, Any]], *, new: bool = True) -> None:
        """Start one Patroni cluster's members (a ``new`` one: the first, which
        bootstraps it, then the others); returns once every member has the database."""
        ha = self.ha
        assert ha is not None
        patroni = apt_binary("patroni", "patroni")
        bindir = pg_bindir()
        try:
            for count in (1, len(members)) if new else (len(members),):
                for member in members[:count]:
                    ha.start_patroni(
                        member, bindir, lambda cmd: as_pg_user([patroni, *cmd[1:]]), _pg_owns
                    )
                leader = ha.wait_members(members[:count])
        except HaError as exc:
            raise click.ClickException(str(exc)) from exc
        asyncio.run(_create_database(f"postgresql://shardd@127.0.0.1:{leader['port']}/postgres"))
        # A client trying the members in turn stops at one that lacks the database
        # (asyncpg does): wait until every member has replayed its creation.
        asyncio.run(_database_everywhere([m["port"] for m in members]))

    def datadir(self, node: dict[str, Any]) -> Path:
        return self.dir / node["name"]

    def next_port(self) -> int:
        """The first port above every node's that nothing else listens on now (a node
        added later may find the next port taken by some other process)."""
        used = [n["port"] for n in self.nodes]
        used += [m["port"] for m in self.ha.patroni_members()] if self.ha else []
        port = max(used) + 1 if used else int(self.state["pg_port"])
        if used:  # the first node keeps the port asked for, or fails on it
            while not port_free(port):
                port += 1
        return port

    # -- Postgres nodes

    def pid(self, node: dict[str, Any]) -> int | None:
        return pgctl.postmaster_pid(self.datadir(node))

    def start_node(self, node: dict[str, Any]) -> None:
        if self.pid(node) is not None:
            return
        # After a SIGKILL the old backends linger until they notice; starting before they
        # are gone would let two generations share the data directory.
        deadline = time.monotonic() + 30
        while backends_of(title(node)) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            (self.datadir(node) / "postmaster.pid").unlink()
        pg_bindir()
        try:
            pgctl.start(self.datadir(node), logfile=self.dir / f"{node['name']}.log", user=PG_USER)
        except pgctl.PgCtlError as exc:
            raise click.ClickException(str(exc)) from exc

    def stop_node(self, node: dict[str, Any], *, mode: str = "fast") -> None:
        if self.pid(node) is None:
            return
        try:
            pgctl.stop(self.datadir(node), user=PG_USER, mode=mode)
        except pgctl.PgCtlError as exc:
            raise click.ClickException(str(exc)) from exc

    def create_primary(self, node: dict[str, Any]) -> None:
        datadir = self.datadir(node)
        if not port_free(node["port"]):
            raise click.ClickException(f"port {node['port']} is in use")
        run_pg(
            [
                str(pg_bindir() / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "shardd",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        with open(datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\n# shardd devcluster\nport = {node['port']}\n"
                "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\n"
                "hot_standby = on\nhot_standby_feedback = on\nwal_keep_size = '256MB'\n"
                "fsync = off\nshared_buffers = '64MB'\nmax_connections = 200\n"
                f"cluster_name = '{title(node)}'\n"
            )
        self.start_node(node)
        asyncio.run(_create_database(f"postgresql://shardd@127.0.0.1:{node['port']}/postgres"))

    def create_replica(self, node: dict[str, Any], primary: dict[str, Any]) -> None:
        datadir = self.datadir(node)
        if not port_free(node["port"]):
            raise click.ClickException(f"port {node['port']} is in use")
        slot_name = node["name"].replace("-", "_")
        run_pg(
            [
                str(pg_bindir() / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary["port"]),
                "-U",
                "shardd",
                "-D",
                str(datadir),
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                slot_name,
                "--no-sync",
                "--checkpoint=fast",
            ]
        )
        with open(datadir / "postgresql.auto.conf", "a") as conf:
            conf.write(
                f"port = {node['port']}\ncluster_name = '{title(node)}'\n"
                "synchronous_standby_names = ''\n"
            )
        self.start_node(node)

    def zones_of(self, shard_index: int, count: int) -> list[str]:
        """Zones of a shard's ``count`` nodes, primary first: spread round-robin from the
        shard's own place, so primaries spread over the zones too ([] without zones)."""
        zones = self.state.get("zones") or []
        return [zones[(shard_index + j) % len(zones)] for j in range(count)] if zones else []

    def instance_zone(self, name: str) -> str:
        zones = self.state.get("zones") or []
        index = 0 if name == "shardd" else int(name.rsplit("-", 1)[1]) - 1
        return zones[index % len(zones)] if zones else ""

    def create_shard(self, name: str, replicas: int) -> None:
        self.create_shards([name], replicas)

    def create_shards(self, names: list[str], replicas: int) -> None:
        """Shards ``names``, each a primary and ``replicas`` replicas, registered in the
        catalog in order.  The nodes of different shards are made at the same time
        (initdb and pg_basebackup wait on the disk and on checkpoints as much as on a
        core); the cluster's state is written only from this thread."""
        planned: list[tuple[str, list[str], dict[str, Any], list[dict[str, Any]]]] = []
        for name in names:
            index = len({n["shard"] for n in self.nodes if n["shard"]})
            index += len((self.state.get("ha") or {}).get("shards", {}))
            zones = self.zones_of(index, 1 + replicas)
            if self.ha is not None:
                self.create_patroni_shard(name, replicas, zones)
                continue
            primary = {
                "name": f"{name}-primary",
                "shard": name,
                "role": "primary",
                "port": self.next_port(),
                "zone": zones[0] if zones else "",
            }
            self.nodes.append(primary)
            copies = []
            for i in range(1, replicas + 1):
                replica = {
                    "name": f"{name}-replica{i}",
                    "shard": name,
                    "role": "replica",
                    "port": self.next_port(),
                    "zone": zones[i] if zones else "",
                }
                self.nodes.append(replica)
                copies.append(replica)
            planned.append((name, zones, primary, copies))
        self.save()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(planned))) as pool:
            for done in [pool.submit(self._make_nodes, p, c) for _, _, p, c in planned]:
                done.result()
        for name, zones, primary, copies in planned:
            asyncio.run(
                admin.add_shard(
                    self.catalog_dsn,
                    name=name,
                    primary_dsn=self.dsn(primary),
                    replica_dsns=[self.dsn(replica) for replica in copies],
                    zones=zones,
                )
            )

    def _make_nodes(self, primary: dict[str, Any], replicas: list[dict[str, Any]]) -> None:
        """One shard's primary and replicas, running (synchronous once it has a standby)."""
        self.create_primary(primary)
        for replica in replicas:
            self.create_replica(replica, primary)
        if self.state.get("sync") and replicas:
            # Only now: a synchronous primary without a standby blocks every commit.
            node = admin.node_from_dsn(
                self.dsn(primary), name=primary["name"], shard=primary["shard"], role="primary"
            )
            asyncio.run(failover.set_sync_standbys(node, synchronous=True))

    def create_patroni_shard(self, name: str, replicas: int, zones: list[str]) -> None:
        """Shard ``name`` as a Patroni cluster on the cluster's etcd, registered with
        each member's REST API: Patroni chooses its primary, shardd follows."""
        ha = self.ha
        assert ha is not None
        ports: list[int] = []
        for _ in range(1 + replicas):
            port = self.next_port()
            while port in ports or not port_free(port) or not port_free(port + 200):
                port += 1
            ports.append(port)
        ha.add_shard(name, ports, synchronous=bool(self.state.get("sync")), zones=zones)
        self.save()
        members = ha.shard_members(name)
        self.start_patroni(members)
        asyncio.run(
            admin.add_shard(
                self.catalog_dsn,
                name=name,
                primary_dsn=self.dsn(members[0]),
                replica_dsns=[self.dsn(m) for m in members[1:]],
                zones=zones,
                patroni_urls=[ha.rest_url(m) for m in members],
            )
        )

    # -- shardd

    def instances(self) -> list[str]:
        """The shardd instances: ``shardd``, or ``shardd-1`` ... behind HAProxy."""
        count = int(self.state.get("instances", 1))
        return ["shardd"] if count == 1 else [f"shardd-{i}" for i in range(1, count + 1)]

    def instance_port(self, name: str) -> int:
        if name == "shardd":
            return int(self.state["port"])
        return int(self.state["port"]) + 100 + int(name.rsplit("-", 1)[1])

    def shardd_pid(self, name: str = "shardd") -> int | None:
        pid = self.state.get("shardd_pid" if name == "shardd" else f"pid:{name}")
        return int(pid) if pid and pgctl.alive(int(pid)) else None

    def shardd_env(self, name: str = "shardd") -> dict[str, str]:
        """shardd's environment: the cache on this cluster's Redis (if it has one), the
        SHARDD_* settings given to `up`, then the cluster's.  Instances behind HAProxy
        drain for 3 s when stopped (more than its checks need to take them out)."""
        redis = {}
        if self.state.get("redis_port"):
            redis = {
                "SHARDD_CACHE_BACKEND": "redis",
                "SHARDD_REDIS_URL": f"redis://127.0.0.1:{self.state['redis_port']}/0",
            }
        drain = {} if name == "shardd" else {"SHARDD_SHUTDOWN_DRAIN": "3"}
        zone = self.instance_zone(name)
        return {
            **os.environ,
            **redis,
            **drain,
            **({"SHARDD_ZONE": zone} if zone else {}),
            **self.state.get("shardd_settings", {}),
            "SHARDD_CATALOG_DSN": self.catalog_dsn,
            "SHARDD_PORT": str(self.instance_port(name)),
            "SHARDD_HOST": "127.0.0.1",
        }

    def start_shardd(self, name: str = "shardd") -> None:
        if self.shardd_pid(name) is not None:
            return
        port = self.instance_port(name)
        if not port_free(port):
            raise click.ClickException(f"port {port} is in use")
        log = open(self.dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardd.server"],
            cwd=ROOT,
            env=self.shardd_env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state["shardd_pid" if name == "shardd" else f"pid:{name}"] = proc.pid
        self.save()
        wait_ready(port, proc, self.dir / f"{name}.log")

    def stop_shardd(self, name: str = "shardd", *, kill: bool = False) -> None:
        """SIGTERM (it drains, then exits; SIGKILL after 20 s), or SIGKILL at once."""
        pid = self.shardd_pid(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.shardd_pid(name) is not None:
            time.sleep(0.05)
        if self.shardd_pid(name) is not None:
            os.kill(pid, signal.SIGKILL)

    # -- HAProxy (with `up --instances N`)

    def haproxy_pid(self) -> int | None:
        pid = self.state.get("haproxy_pid")
        return int(pid) if pid and pgctl.alive(int(pid)) else None

    def start_haproxy(self) -> None:
        if len(self.instances()) == 1 or self.haproxy_pid() is not None:
            return
        servers = self.dir / "haproxy-servers.cfg"
        servers.write_text(
            # HAProxy's own view of each instance (UP, DOWN, ...) for `status`.
            f"global\n    stats socket {self.haproxy_socket} mode 600 level user\n\n"
            "backend shardd\n"
            + "".join(
                f"    server {name} 127.0.0.1:{self.instance_port(name)} check\n"
                for name in self.instances()
            )
        )
        log = open(self.dir / "haproxy.log", "ab")
        proc = subprocess.Popen(
            [haproxy_bin(), "-db", "-f", str(ROOT / "deploy" / "haproxy.cfg"), "-f", str(servers)],
            env={**os.environ, "SHARDD_LISTEN": f"127.0.0.1:{self.state['port']}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state["haproxy_pid"] = proc.pid
        self.save()
        wait_ready(int(self.state["port"]), proc, self.dir / "haproxy.log")

    @property
    def haproxy_socket(self) -> Path:
        """In the cluster's folder, unless its path is too long for a unix socket
        (HAProxy binds through a longer temporary name): then a short one under /tmp
        named after the folder."""
        inside = self.dir / "haproxy.sock"
        if len(str(inside)) <= 80:
            return inside
        digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"shardd-haproxy-{digest}.sock"

    def balancer_states(self) -> dict[str, str]:
        """instance -> its state in HAProxy's backend ("UP", "DOWN", "UP 1/2", ...);
        {} without a running HAProxy."""
        if self.haproxy_pid() is None:
            return {}
        deadline = time.monotonic() + 2.0
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stats:
                stats.settimeout(2.0)
                stats.connect(str(self.haproxy_socket))
                stats.sendall(b"show stat\n")
                answer = b""
                while chunk := stats.recv(65536):
                    answer += chunk
                    if time.monotonic() > deadline:
                        return {}
        except OSError:
            return {}
        lines = answer.decode().lstrip("# ").splitlines()
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(lines)
            if row.get("pxname") == "shardd" and row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    def stop_haproxy(self) -> None:
        pid = self.haproxy_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.haproxy_pid() is not None:
                time.sleep(0.05)

    # -- Redis (the shared cache tier, with `up --redis`)

    def redis_pid(self) -> int | None:
        """redis-server's own pid (from its pidfile; as root it runs under runuser)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.dir / "redis" / "redis.pid").read_text().strip())
            return pid if pgctl.alive(pid) else None
        return None

    def start_redis(self) -> None:
        port = self.state.get("redis_port")
        if not port or self.redis_pid() is not None:
            return
        data = self.dir / "redis"
        own_dir(data)
        log = open(self.dir / "redis.log", "ab")
        cmd = [
            redis_server(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data),
            "--pidfile", str(data / "redis.pid"),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", "256mb",
            "--maxmemory-policy", "allkeys-lru",
        ]  # fmt: skip
        proc = subprocess.Popen(
            as_pg_user(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"redis-server exited; see {self.dir / 'redis.log'}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            time.sleep(0.05)
        raise click.ClickException(f"redis-server not ready after 15s; see {self.dir}/redis.log")

    def stop_redis(self) -> None:
        pid = self.redis_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.redis_pid() is not None:
                time.sleep(0.05)


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/readyz`` on ``port`` answers 200 (30 s at most)."""
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{log.stem} exited; see {log}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise click.ClickException(f"{log.stem} not ready after 30s; see {log}")


async def _create_database(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", DB):
            await conn.execute(f"CREATE DATABASE {DB}")
    finally:
        await conn.close()


async def _database_everywhere(ports: list[int]) -> None:
    import asyncpg

    deadline = time.monotonic() + 60
    for port in ports:
        while True:
            try:
                conn = await asyncpg.connect(f"postgresql://shardd@127.0.0.1:{port}/{DB}")
                await conn.close()
                break
            except (OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise click.ClickException(f"catalog member on {port}: {exc}") from exc
                await asyncio.sleep(0.1)


# -- commands -----------------------------------------------------------------------

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=Path(".devcluster"),
    show_default=True,
    help="Folder holding the cluster's data and logs.",
)


@click.group()
def cli() -> None:
    """Run a real local shardd cluster on loopback for development, tests and benchmarks."""


@cli.command()
@dir_option
@click.option("--shards", default=3, show_default=True)
@click.option("--replicas", default=1, show_default=True)
@click.option("--port", default=8080, show_default=True, help="shardd HTTP port.")
@click.option("--pg-port", type=int, default=None, help="First Postgres port [port+1].")
@click.option("--sync", is_flag=True, help="Synchronous replication (ANY 1).")
@click.option("--slots", default=4096, show_default=True, help="Slot count of a new cluster.")
@click.option(
    "--redis",
    is_flag=True,
    help="Also run redis-server and use it as shardd's shared cache.",
)
@click.option("--redis-port", type=int, default=None, help="Redis port [--port + 1000].")
@click.option(
    "--instances",
    default=1,
    show_default=True,
    help="shardd instances; more than one run behind HAProxy on --port.",
)
@click.option(
    "--ha",
    is_flag=True,
    help="The catalog as a Patroni cluster (3 members, synchronous) on a 3-member etcd,"
    " and each shard as a Patroni cluster on it (shardd follows Patroni's leader).",
)
@click.option(
    "--zones",
    default="",
    help="Zone labels (a,b,c): each shard's nodes spread over them round-robin, its"
    " primary in a different zone per shard; instance N in zone N (mod the count).",
)
def up(
    directory: Path,
    shards: int,
    replicas: int,
    port: int,
    pg_port: int | None,
    sync: bool,
    slots: int,
    redis: bool,
    redis_port: int | None,
    instances: int,
    ha: bool,
    zones: str,
) -> None:
    """Create (first time) or start the cluster and shardd; idempotent."""
    cluster = Cluster(directory)
    labels = [z.strip() for z in zones.split(",") if z.strip()]
    for label in labels:
        if not config.ZONE.match(label):
            raise click.BadParameter(f"a zone matches {config.ZONE.pattern}", param_hint="--zones")
    if not cluster.state.get("ready"):
        if cluster.dir.exists() and any(cluster.dir.iterdir()):
            shutil.rmtree(cluster.dir)  # a half-created cluster: start over
        own_dir(cluster.dir)
        settings = {k: v for k, v in os.environ.items() if k.startswith("SHARDD_")}
        cluster.state = {
            "shardd_settings": settings,
            "port": port,
            "pg_port": pg_port or port + 1,
            "sync": sync,
            "slots": slots,
            "instances": instances,
            "zones": labels,
            "nodes": [],
        }
        if ha:
            cluster.state["ha"] = Ha.plan(pg_port or port + 1)
            cluster.save()
            cluster.start_ha()
        else:
            catalog = {
                "name": "catalog",
                "shard": None,
                "role": "catalog",
                "port": cluster.next_port(),
            }
            cluster.nodes.append(catalog)
            cluster.save()
            cluster.create_primary(catalog)
        asyncio.run(admin.migrate_all(cluster.catalog_dsn, slot_count=slots, synchronous=sync))
        cluster.create_shards([f"s{i}" for i in range(1, shards + 1)], replicas)
        asyncio.run(admin.init_slots(cluster.catalog_dsn))
        cluster.state["ready"] = True
        cluster.save()
    else:
        if cluster.ha is not None:
            cluster.start_ha()
        for node in cluster.nodes:
            cluster.start_node(node)
    if redis and not cluster.state.get("redis_port"):
        cluster.state["redis_port"] = redis_port or cluster.state["port"] + 1000
        cluster.save()
    cluster.start_redis()
    for name in cluster.instances():
        cluster.start_shardd(name)
    cluster.start_haproxy()
    url = f"http://127.0.0.1:{cluster.state['port']}"
    click.echo(f"shardd is up at {url} (cluster in {cluster.dir})\n")
    click.echo("Try:")
    click.echo(f"  curl -X PUT {url}/v1/tables/users")
    click.echo(f'  curl -X PUT {url}/v1/tables/users/items/alice -d \'{{"name": "Alice"}}\'')
    click.echo(f"  curl {url}/v1/tables/users/items/alice")
    click.echo(f"  curl {url}/v1/topology")
    click.echo(f'  eval "$(tools/devcluster env --dir {directory})" && .venv/bin/shardctl status')


@cli.command()
@dir_option
@click.option("--purge", is_flag=True, help="Also delete the data directory.")
def down(directory: Path, purge: bool) -> None:
    """Stop shardd and every Postgres node (with --purge, at once: the data goes next)."""
    cluster = Cluster(directory)
    cluster.stop_haproxy()
    for name in cluster.instances() if cluster.state else []:
        cluster.stop_shardd(name, kill=purge)
    cluster.stop_redis()
    for node in reversed(cluster.nodes):
        with contextlib.suppress(click.ClickException):
            cluster.stop_node(node, mode="immediate" if purge else "fast")
    if cluster.ha is not None:
        cluster.ha.stop(kill=purge)
    if purge and cluster.dir.exists():
        shutil.rmtree(cluster.dir)
    click.echo("cluster stopped" + (" and deleted" if purge else ""))


@cli.command()
@dir_option
@click.option("--json", "as_json", is_flag=True)
def status(directory: Path, as_json: bool) -> None:
    """Every node: shard, role, port, data dir, pid, up/down.

    Roles come from the catalog when it answers (failovers change them), else they are
    the roles the nodes were created with.
    """
    cluster = Cluster(directory)
    roles = _live_roles(cluster)
    rows = cluster.ha.rows(roles) if cluster.ha is not None else []
    for node in cluster.nodes:
        pid = cluster.pid(node)
        rows.append(
            {
                "name": node["name"],
                "shard": node["shard"],
                "role": roles.get(node["name"], node["role"]),
                "zone": node.get("zone", ""),
                "port": node["port"],
                "datadir": str(cluster.datadir(node)),
                "pid": pid,
                "up": pid is not None,
            }
        )
    balancer = cluster.balancer_states() if cluster.state else {}
    for name in cluster.instances() if cluster.state else ["shardd"]:
        pid = cluster.shardd_pid(name) if cluster.state else None
        row = {
            "name": name,
            "shard": None,
            "role": "shardd",
            "zone": cluster.instance_zone(name) if cluster.state else "",
            "port": cluster.instance_port(name) if cluster.state else None,
            "datadir": None,
            "pid": pid,
            "up": pid is not None,
        }
        if name in balancer:
            row["balancer"] = balancer[name]  # HAProxy's state of it
        rows.append(row)
    if cluster.state and len(cluster.instances()) > 1:
        pid = cluster.haproxy_pid()
        rows.append(
            {
                "name": "haproxy",
                "shard": None,
                "role": "balancer",
                "zone": "",
                "port": cluster.state.get("port"),
                "datadir": None,
                "pid": pid,
                "up": pid is not None,
            }
        )
    if as_json:
        click.echo(json.dumps({"dir": str(cluster.dir), "nodes": rows}, indent=2))
        return
    for row in rows:
        click.echo(
            f"{row['name']:<16} {row['shard'] or '-':<6} {row['role']:<8} "
            f"{row['zone'] or '-':<6} {row['port']!s:<6} {'up' if row['up'] else 'down':<5} "
            f"pid={row['pid'] or '-'} {row['datadir'] or ''}"
            + (f"balancer={str(row['balancer']).replace(' ', '_')}" if "balancer" in row else "")
        )


def _live_roles(cluster: Cluster) -> dict[str, str]:
    """node -> role in the catalog ("fenced" for a replaced primary); {} when unreachable."""
    catalog = next((n for n in cluster.nodes if n["name"] == "catalog"), None)
    if cluster.ha is None and (catalog is None or cluster.pid(catalog) is None):
        return {}
    try:
        topology = asyncio.run(admin.topology(cluster.catalog_dsn))
    except Exception:
        return {}
    return {n.name: "fenced" if n.fenced else n.role for n in topology.nodes()}


@cli.command()
@dir_option
@click.argument("node")
def kill(directory: Path, node: str) -> None:
    """SIGKILL a node's postmaster (or a shardd instance, haproxy, redis), for fault tests."""
    cluster = Cluster(directory)
    if cluster.ha is not None and node in cluster.ha.names():
        try:
            killed = cluster.ha.kill(node)
        except HaError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"killed {node} (pid {killed})")
        return
    pid: int | None
    if node in cluster.instances():
        pid = cluster.shardd_pid(node)
    elif node == "haproxy":
        pid = cluster.haproxy_pid()
    elif node == "redis":
        pid = cluster.redis_pid()
    else:
        pid = cluster.pid(cluster.node(node))
    if pid is None:
        raise click.ClickException(f"{node} is not running")
    os.kill(pid, signal.SIGKILL)
    click.echo(f"killed {node} (pid {pid})")


@cli.command()
@dir_option
@click.argument("node")
def start(directory: Path, node: str) -> None:
    """Start a node (or a shardd instance, haproxy, redis) again."""
    cluster = Cluster(directory)
    ha = cluster.ha
    if ha is not None and node in ha.names():
        member = ha.member(node)
        if node.startswith("etcd-"):
            ha.start_etcd(member, apt_binary("etcd", "etcd-server"))
        else:
            patroni = apt_binary("patroni", "patroni")
            ha.start_patroni(
                member, pg_bindir(), lambda cmd: as_pg_user([patroni, *cmd[1:]]), _pg_owns
            )
    elif node in cluster.instances():
        cluster.start_shardd(node)
    elif node == "haproxy":
        cluster.start_haproxy()
    elif node == "redis":
        cluster.start_redis()
    else:
        cluster.start_node(cluster.node(node))
    click.echo(f"started {node}")


@cli.command()
@dir_option
@click.argument("instance")
def stop(directory: Path, instance: str) -> None:
    """Stop a shardd instance gracefully (SIGTERM: it drains, then exits)."""
    cluster = Cluster(directory)
    if instance not in cluster.instances():
        raise click.ClickException(f"no shardd instance {instance}")
    cluster.stop_shardd(instance)
    click.echo(f"stopped {instance}")


@cli.command("add-shard")
@dir_option
@click.argument("name")
@click.option("--replicas", default=1, show_default=True)
def add_shard(directory: Path, name: str, replicas: int) -> None:
    """Create a primary and replicas and register them as shard NAME (moves no data)."""
    cluster = Cluster(directory)
    if not cluster.state.get("ready"):
        raise click.ClickException("no cluster here; run `tools/devcluster up` first")
    if any(n["shard"] == name for n in cluster.nodes):
        raise click.ClickException(f"shard {name} exists")
    cluster.create_shard(name, replicas)
    click.echo(f"shard {name} registered; it owns no slots until a rebalance")


@cli.command()
@dir_option
@click.argument("node")
def rejoin(directory: Path, node: str) -> None:
    """Rebuild a fenced former primary as a replica of its shard (shardctl node rejoin)."""
    cluster = Cluster(directory)
    if cluster.ha is not None and node in cluster.ha.names():
        raise click.ClickException(f"Patroni rejoins {node}; shardd records it once it streams")
    target = cluster.node(node)
    try:
        epoch = asyncio.run(
            failover.rejoin(
                cluster.catalog_dsn,
                node,
                datadir=str(cluster.datadir(target)),
                logfile=str(cluster.dir / f"{node}.log"),
            )
        )
    except failover.FailoverError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{node} rejoined as a replica (epoch {epoch})")


@cli.command()
@dir_option
def env(directory: Path) -> None:
    """Print export lines pointing shardctl at this cluster."""
    cluster = Cluster(directory)
    if not cluster.state.get("ready"):
        raise click.ClickException("no cluster here; run `tools/devcluster up` first")
    click.echo(f"export SHARDD_CATALOG_DSN={shlex.quote(cluster.catalog_dsn)}")
    click.echo(f"export SHARDD_URL=http://127.0.0.1:{cluster.state['port']}")


if __name__ == "__main__":
    cli()
