"""Graceful shutdown: a stopping shardd refuses new connections and finishes in-flight work.

aiohttp stops reading from connections once shutdown begins, so "in flight" means a
request whose body has arrived and whose handler is running (here: blocked in the shard
on the slot lock, exactly as during a freeze).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess

import asyncpg
import orjson

from shardd.placement import slot_of
from tests.harness.cluster import ROOT, SLOTS, TOKENS, RunningCluster, free_port_block, wait_for
from tests.harness.http import Api, item_path


def test_sigterm_drains_an_in_flight_request(cluster: RunningCluster, api: Api, table: str) -> None:
    port = free_port_block(1)
    env = {
        **os.environ,
        "SHARDD_CATALOG_DSN": cluster.catalog_dsn(),
        "SHARDD_PORT": str(port),
        "SHARDD_TOKENS": f"{TOKENS['admin']}:admin",
    }
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "shardd")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        second = Api(port, token=TOKENS["admin"])
        wait_for(lambda: _ready(second), timeout=30, what="second shardd ready")
        path = item_path(table, "drained")
        first = api.request("PUT", path, body={"v": 1})
        shard = first.header("Shardd-Served-By").split("/")[0]
        slot = slot_of("drained", SLOTS)
        body = orjson.dumps({"v": 2})
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['admin']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        loop = asyncio.new_event_loop()
        # Hold the slot's lock exclusively (as a freeze does): the write waits inside the shard.
        locker = loop.run_until_complete(asyncpg.connect(cluster.node_dsn(f"{shard}-primary")))
        tx = locker.transaction()
        loop.run_until_complete(tx.start())
        loop.run_until_complete(
            locker.execute("SELECT pg_advisory_xact_lock(shardd_slot_lock_class(), $1)", slot)
        )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head + body)
                # The handler is now blocked in the shard, waiting for the slot's lock.
                waiting = (
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid = shardd_slot_lock_class()::oid AND objid = $1"
                    " AND objsubid = 2"  # the two-key form
                )
                wait_for(
                    lambda: loop.run_until_complete(locker.fetchval(waiting, slot)) > 0,
                    timeout=10,
                    what="the write waiting for the slot's lock",
                )
                proc.send_signal(signal.SIGTERM)
                wait_for(lambda: not _accepts(port), timeout=10, what="listener closed")
                assert proc.poll() is None  # still draining
                loop.run_until_complete(tx.rollback())
                response = b""
                while chunk := sock.recv(65536):
                    response += chunk
        finally:
            loop.run_until_complete(locker.close())
            loop.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert proc.wait(timeout=30) == 0
        stored = api.request("GET", path + "?consistency=strong")
        assert stored.status == 200 and stored.body["item"] == {"v": 2}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ready(client: Api) -> bool:
    try:
        return client.request("GET", "/readyz").status == 200
    except OSError:
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
