"""The running service's view of the cluster: its parts, built and stopped together.

* :class:`~shardd.watcher.TopologyWatcher` keeps the topology current (catalog, LISTEN,
  poll, lease, epoch reports);
* :class:`~shardd.nodes.HealthMonitor` checks every node on connections of its own;
* :class:`~shardd.executor.Executor` runs work on nodes over the request pools;
* :class:`~shardd.dataplane.DataPlane` is what the HTTP handlers call;
* :class:`~shardd.hotkeys.Reporter` reports this instance's traffic and keeps the merged
  hot-key view; :class:`~shardd.cache.Invalidator` follows the change logs for the item
  cache;
* :class:`~shardd.views.keeper.ViewKeeper` maintains the views of the source shards
  whose lease this instance holds, and knows every view's lag (for back-pressure);
* :class:`~shardd.monitor.Monitor` is the control loop (failover, switchovers,
  housekeeping); the application starts it, the reporter, the invalidator and the view
  keeper once the data plane serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from . import config
from .cache import Cache, Invalidator
from .config import Settings
from .dataplane import DataPlane
from .executor import Executor
from .hotkeys import Reporter, Traffic
from .monitor import Monitor
from .nodes import HealthMonitor, NodePools, session_settings
from .topology import set_routes
from .views.keeper import ViewKeeper
from .watcher import TopologyWatcher


class Cluster:
    def __init__(self, settings: Settings) -> None:
        set_routes(config.node_routes(settings))
        self.settings = settings
        self.instance = f"{socket.gethostname()}:{settings.port}:{os.getpid()}"
        self.watcher = TopologyWatcher(settings, self.instance)
        sessions = session_settings(
            statement_timeout=settings.statement_timeout,
            lock_timeout=settings.lock_timeout,
            idle_in_transaction_timeout=settings.idle_in_transaction_session_timeout,
        )
        connect_timeout = min(2.0, settings.request_timeout)
        # One connection per node for health checks, apart from the request pools.
        self._health_pools = NodePools(
            pool_size=1, connect_timeout=connect_timeout, server_settings=sessions
        )
        self.health = HealthMonitor(
            self._health_pools, lambda: self.watcher.topology, interval=settings.health_interval
        )
        self.executor = Executor(
            settings,
            watcher=self.watcher,
            health=self.health,
            pools=NodePools(
                pool_size=settings.pool_size,
                connect_timeout=connect_timeout,
                server_settings=sessions,
            ),
        )
        self.traffic = (
            Traffic(capacity=settings.hotkeys_capacity, window=settings.hotkeys_window)
            if settings.hotkeys
            else None
        )
        self.reporter = (
            Reporter(settings, self.watcher, self.traffic) if self.traffic is not None else None
        )
        self.cache = Cache(settings) if settings.cache_backend != "off" else None
        # The change-log follower's own connections (one per primary), like the health
        # checks': a busy request pool never holds up invalidation.
        self._follow_pools = NodePools(
            pool_size=1, connect_timeout=connect_timeout, server_settings=sessions
        )
        self.invalidator = (
            Invalidator(
                settings,
                self.cache,
                topology=lambda: self.watcher.topology,
                pools=self._follow_pools,
                any_hot=lambda: self.reporter is not None and bool(self.reporter.hot),
            )
            if self.cache is not None
            else None
        )
        self.data = DataPlane(
            settings,
            watcher=self.watcher,
            executor=self.executor,
            traffic=self.traffic,
            reporter=self.reporter,
            cache=self.cache,
        )
        self.monitor = Monitor(settings, self.instance, self.health, lambda: self.watcher.topology)
        self.views = ViewKeeper(
            settings, self.instance, watcher=self.watcher, executor=self.executor, data=self.data
        )
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the topology (or keep trying in the background) and check every node once
        it is there, so that reads use replicas from the first request on."""
        await self.watcher.start()
        if self.watcher.topology is not None:
            with contextlib.suppress(Exception):  # the checks go on in the background
                await self.health.check_all()
        self._health_task = asyncio.create_task(self._check_health(), name="health")

    async def _check_health(self) -> None:
        while self.watcher.topology is None:
            await self.watcher.changed().wait()
        await self.health.run()

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.views.close()
        if self.reporter is not None:
            await self.reporter.close()
        await self.watcher.close()
        if self.cache is not None:
            await self.cache.close()
        await self.executor.close()
        await self._health_pools.close()
        await self._follow_pools.close()
