"""Request coalescing: concurrent reads of the same thing share one query (single flight).

Only reads that may be answered by any recent state share a query: an ``eventual`` read
that arrives while the same read is in flight takes that read's answer, which is at
most as old as the answer it would have got itself.  ``strong`` and ``session`` reads
never share one: a strong read must see every write acknowledged before it started, and
a read that joined a query started earlier might not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from . import metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, start: Callable[[], Awaitable[V]]) -> V:
        """``start()``'s result, shared with every call for ``key`` while it runs.

        The query runs as a task of its own, so a caller that goes away does not cancel
        it for the others; it ends by the deadline of the request that started it, which
        is the earliest of theirs.
        """
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(start())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        else:
            metrics.READS_COALESCED.inc()
        return await asyncio.shield(flight)

    def forget(self, key: K) -> None:
        """Calls for ``key`` from now on start a query of their own (``key`` was written:
        the one in flight may have started before)."""
        self._flights.pop(key, None)

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
