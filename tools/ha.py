"""The dev cluster on Patroni and etcd (``tools/devcluster up --ha``).

Three etcd members (``etcd-1`` ...) form the consensus store.  Three Patroni members
(``catalog-1`` ...) run the catalog's Postgres, one primary and two replicas, in
Patroni's synchronous mode (a commit waits for one standby, so a failover loses no
acknowledged catalog write).  Each shard is a Patroni cluster of its own on the same
etcd (scope ``shardd-<shard>-<port>``), its members named as the catalog knows its
nodes (``s1-primary``, ``s1-replica1`` ...: the names they were created with, whatever
their role now), synchronous when the cluster is (``--sync``); shardd follows the
leader Patroni elects (``failover_mode = 'patroni'``, see shardd/failover/patroni.py).
Everything listens on 127.0.0.1 and lives under the cluster's folder.  Patroni runs
Postgres, so as root it runs as the ``postgres`` user; etcd runs as the caller.

Ports, from the cluster's first Postgres port Q: the catalog members' Postgres on Q,
Q+1, Q+2, shard members' after them; each member's Patroni REST API on its Postgres
port + 200; etcd clients on Q+300 ..., etcd peers on Q+310 ....

Timings (in the DCS section Patroni bootstraps with): ``ttl`` 10 s (how long a leader
key outlives a dead leader), ``loop_wait`` 1 s (a member's cycle), ``retry_timeout`` 3 s
(how long a member retries the DCS and Postgres before it demotes itself).  A dead
primary is so replaced within about ttl + loop_wait: 11 s; Patroni's defaults (30, 10,
10) would take 40 s.  ttl >= loop_wait + 2 x retry_timeout keeps a live leader from
losing its key to one slow cycle.  ``failsafe_mode`` keeps a leader that cannot reach
etcd (an etcd member lost while it was etcd's leader: requests time out for the second
an election takes, and retries use up ``retry_timeout``) in place while every other
member confirms it over the REST API, instead of demoting it: without it, losing one
etcd member restarted primaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MEMBERS = 3
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 1, 3


class HaError(Exception):
    pass


def _pids(needle: str) -> list[int]:
    """Live processes whose command line holds ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


class Ha:
    """etcd + Patroni for one dev cluster; ``state`` is the cluster's ``ha`` record:
    ``catalog`` and ``etcd`` members, and ``shards``: shard -> its Patroni members."""

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.dir = directory
        self.state = state

    @staticmethod
    def plan(pg_port: int) -> dict[str, Any]:
        """The ``ha`` record of a new cluster whose first Postgres port is ``pg_port``."""
        return {
            "catalog": [
                {"name": f"catalog-{i}", "port": pg_port + i - 1, "rest": pg_port + 199 + i}
                for i in range(1, MEMBERS + 1)
            ],
            "etcd": [
                {"name": f"etcd-{i}", "client": pg_port + 299 + i, "peer": pg_port + 309 + i}
                for i in range(1, MEMBERS + 1)
            ],
            "scope": f"shardd-catalog-{pg_port}",
        }

    def add_shard(
        self, shard: str, ports: list[int], *, synchronous: bool, zones: list[str]
    ) -> None:
        """Plan shard ``shard``'s Patroni members on ``ports`` (its first member the
        leader it bootstraps with)."""
        self.state.setdefault("shards", {})[shard] = [
            {
                "name": f"{shard}-primary" if i == 0 else f"{shard}-replica{i}",
                "shard": shard,
                "port": port,
                "rest": port + 200,
                "scope": f"shardd-{shard}-{self.state['catalog'][0]['port']}",
                "synchronous": synchronous,
                "zone": zones[i] if zones else "",
            }
            for i, port in enumerate(ports)
        ]

    # -- names and addresses

    def shard_members(self, shard: str | None = None) -> list[dict[str, Any]]:
        shards = self.state.get("shards", {})
        return [m for name, group in shards.items() if shard in (None, name) for m in group]

    def patroni_members(self) -> list[dict[str, Any]]:
        return [*self.state["catalog"], *self.shard_members()]

    def names(self) -> list[str]:
        return [m["name"] for m in self.patroni_members() + self.state["etcd"]]

    def member(self, name: str) -> dict[str, Any]:
        for member in self.patroni_members() + self.state["etcd"]:
            if member["name"] == name:
                return member
        raise HaError(f"no member {name!r}")

    @staticmethod
    def rest_url(member: dict[str, Any]) -> str:
        return f"http://127.0.0.1:{member['rest']}"

    def dsn(self, dbname: str = "shardd") -> str:
        """Every catalog member; the client keeps to the one that takes writes."""
        hosts = ",".join(f"127.0.0.1:{m['port']}" for m in self.state["catalog"])
        return f"postgresql://shardd@{hosts}/{dbname}?target_session_attrs=read-write"

    def _etcd_hosts(self) -> list[str]:
        return [f"127.0.0.1:{m['client']}" for m in self.state["etcd"]]

    # -- etcd

    def _etcd_cmd(self, member: dict[str, Any], etcd: str) -> list[str]:
        cluster = ",".join(f"{m['name']}=http://127.0.0.1:{m['peer']}" for m in self.state["etcd"])
        return [
            etcd,
            "--name",
            member["name"],
            "--data-dir",
            str(self.dir / member["name"]),
            "--listen-client-urls",
            f"http://127.0.0.1:{member['client']}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{member['client']}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{member['peer']}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{member['peer']}",
            "--initial-cluster",
            cluster,
            "--initial-cluster-token",
            self.state["scope"],
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
        ]

    def etcd_pid(self, member: dict[str, Any]) -> int | None:
        pids = _pids(f"--data-dir {self.dir / member['name']} ")
        return pids[0] if pids else None

    def start_etcd(self, member: dict[str, Any], etcd: str) -> None:
        if self.etcd_pid(member) is not None:
            return
        log = open(self.dir / f"{member['name']}.log", "ab")
        subprocess.Popen(
            self._etcd_cmd(member, etcd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_etcd(self, timeout: float = 30) -> None:
        """Until a member answers with a leader elected (a quorum is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for host in self._etcd_hosts():
                try:
                    request = urllib.request.Request(
                        f"http://{host}/v3/maintenance/status", data=b"{}", method="POST"
                    )
                    with urllib.request.urlopen(request, timeout=1) as resp:
                        if json.loads(resp.read()).get("leader"):
                            return
                except (OSError, urllib.error.URLError, ValueError):
                    continue
            time.sleep(0.1)
        raise HaError(f"etcd has no leader after {timeout:.0f}s; see {self.dir}/etcd-*.log")

    # -- Patroni

    def config(self, member: dict[str, Any], bindir: Path) -> dict[str, Any]:
        data_dir = self.dir / member["name"]
        # A shard's members get what the built-in dev cluster's nodes get (see devcluster).
        shard_parameters = (
            {
                "max_connections": 200,
                "hot_standby_feedback": "on",
                "wal_keep_size": "256MB",
                "fsync": "off",
                "shared_buffers": "64MB",
            }
            if member.get("shard")
            else {}
        )
        return {
            "scope": member.get("scope", self.state["scope"]),
            "namespace": "/shardd/",
            "name": member["name"],
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"127.0.0.1:{member['rest']}",
                "connect_address": f"127.0.0.1:{member['rest']}",
            },
            "etcd3": {"hosts": self._etcd_hosts()},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    # A leader that cannot reach etcd (a member lost mid-election: its
                    # requests time out past retry_timeout) stays leader while every
                    # other member answers it, instead of demoting itself.
                    "failsafe_mode": True,
                    "synchronous_mode": member.get("synchronous", True),
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "hot_standby": "on",
                            **shard_parameters,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{member['port']}",
                "connect_address": f"127.0.0.1:{member['port']}",
                "data_dir": str(data_dir),
                "bin_dir": str(bindir),
                "pgpass": str(self.dir / f"{member['name']}.pgpass"),
                "authentication": {
                    "superuser": {"username": "shardd"},
                    "replication": {"username": "shardd"},
                    "rewind": {"username": "shardd"},
                },
                "parameters": {
                    "unix_socket_directories": str(self.dir),
                    "cluster_name": f"{member['name']}-{member['port']}",
                },
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }

    def patroni_pids(self, member: dict[str, Any]) -> list[int]:
        """Patroni's process (and, as root, the runuser that started it)."""
        return _pids(f"patroni {self.dir / member['name']}.yml ")  # the end of the argument

    def patroni_pid(self, member: dict[str, Any]) -> int | None:
        pids = self.patroni_pids(member)
        return max(pids) if pids else None  # Patroni itself, started after runuser

    def postmaster_pid(self, member: dict[str, Any]) -> int | None:
        """The member's postmaster, if it runs: the pid file's process, working in the data
        directory and not a zombie (a stale pid file's pid may belong to anything now)."""
        data_dir = self.dir / member["name"]
        try:
            pid = int((data_dir / "postmaster.pid").read_text().split()[0])
            if Path(f"/proc/{pid}/cwd").resolve() != data_dir.resolve():
                return None
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def start_patroni(
        self, member: dict[str, Any], bindir: Path, as_user: Any, owner: Any = None
    ) -> None:
        if self.patroni_pid(member) is not None:
            return
        conf = self.dir / f"{member['name']}.yml"
        # YAML is a superset of JSON: Patroni reads this as its configuration.
        conf.write_text(json.dumps(self.config(member, bindir), indent=2))
        if owner is not None:
            owner(conf)
        log = open(self.dir / f"{member['name']}.log", "ab")
        subprocess.Popen(
            as_user(["patroni", str(conf)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def role(self, member: dict[str, Any]) -> str | None:
        """``primary`` or ``replica`` as Patroni reports it; None when it does not answer."""
        try:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{member['rest']}/patroni", timeout=1
                ) as resp:
                    data = json.loads(resp.read())
            except urllib.error.HTTPError as exc:  # 503 from a member without Postgres
                data = json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return None
        role = data.get("role")
        if data.get("state") != "running":
            return None
        return "primary" if role in ("master", "primary") else "replica"

    def wait_members(
        self, members: list[dict[str, Any]] | None = None, timeout: float = 90
    ) -> dict[str, Any]:
        """Until a leader runs and every member answers (the catalog's unless
        ``members`` are given); returns the leader."""
        members = self.state["catalog"] if members is None else members
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            roles = [self.role(m) for m in members]
            if roles.count("primary") == 1 and None not in roles:
                return members[roles.index("primary")]
            time.sleep(0.2)
        names = ", ".join(m["name"] for m in members)
        raise HaError(f"Patroni members {names} are not up after {timeout:.0f}s; see {self.dir}")

    def kill(self, name: str) -> int:
        """SIGKILL a member as a lost machine: Patroni and its Postgres (or etcd)."""
        member = self.member(name)
        if name.startswith("etcd-"):
            pids = [p for p in [self.etcd_pid(member)] if p is not None]
        else:
            postmaster = self.postmaster_pid(member)
            pids = sorted(self.patroni_pids(member), reverse=True)  # Patroni, then runuser
            pids += [postmaster] if postmaster else []
        if not pids:
            raise HaError(f"{name} is not running")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids[0]

    def stop(self, *, kill: bool = False) -> None:
        """Patroni members first (they stop their Postgres), then etcd.  ``kill``: at
        once (SIGKILL Patroni, an immediate shutdown of its Postgres), for a cluster
        whose data is thrown away next."""
        members = self.patroni_members()
        for member in members:
            for pid in self.patroni_pids(member):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            postmaster = self.postmaster_pid(member) if kill else None
            if postmaster is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(postmaster, signal.SIGQUIT)  # Postgres's immediate shutdown
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            self.patroni_pid(m) or self.postmaster_pid(m) for m in members
        ):
            time.sleep(0.1)
        for member in members:
            postmaster = self.postmaster_pid(member)
            for pid in [*self.patroni_pids(member), *([postmaster] if postmaster else [])]:
                os.kill(pid, signal.SIGKILL)
        for member in self.state["etcd"]:
            etcd = self.etcd_pid(member)
            if etcd is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(etcd, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(self.etcd_pid(m) for m in self.state["etcd"]):
            time.sleep(0.1)
        for member in self.state["etcd"]:
            etcd = self.etcd_pid(member)
            if etcd is not None:
                os.kill(etcd, signal.SIGKILL)

    def rows(self, roles: dict[str, str]) -> list[dict[str, Any]]:
        """``devcluster status`` rows for every member; a shard member's role is the
        catalog's (``roles``, as for every shard node) when it answers, its pid its
        postmaster's."""

        def row(member: dict[str, Any], role: str, pid: int | None, up: bool) -> dict[str, Any]:
            return {
                "name": member["name"],
                "shard": member.get("shard"),
                "role": role,
                "zone": member.get("zone", ""),
                "port": member.get("port", member.get("client")),
                "datadir": str(self.dir / member["name"]),
                "pid": pid,
                "up": up,
            }

        rows = []
        for member in self.shard_members():
            pid = self.postmaster_pid(member)
            role = roles.get(member["name"]) or self.role(member) or "down"
            rows.append(row(member, role, pid, pid is not None and bool(self.patroni_pid(member))))
        for member in self.state["catalog"]:
            pid = self.patroni_pid(member)
            role = self.role(member) or "down"
            rows.append(
                row(member, role, pid, pid is not None and bool(self.postmaster_pid(member)))
            )
        for member in self.state["etcd"]:
            pid = self.etcd_pid(member)
            rows.append(row(member, "etcd", pid, pid is not None))
        return rows
