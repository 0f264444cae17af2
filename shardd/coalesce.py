"""Request coalescing: concurrent reads of the same thing share one query (single flight),
and concurrent writes to one place share one transaction (group commit).

Only reads that may be answered by any recent state share a query: an ``eventual`` read
that arrives while the same read is in flight takes that read's answer, which is at
most as old as the answer it would have got itself.  ``strong`` and ``session`` reads
never share one: a strong read must see every write acknowledged before it started, and
a read that joined a query started earlier might not.

Writes are grouped by :class:`Groups` without waiting on purpose: a group takes every
write that arrives while it waits for its turn (in shardd: a connection to the shard's
primary), and closes when it starts.  Under light load each write runs alone as soon
as it comes; under load, the writes that would have queued for a connection share one
transaction instead, which costs the shard one commit rather than one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from prometheus_client import Gauge, Histogram

from . import metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
I = TypeVar("I")  # noqa: E741 - an item of a group


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


class GroupFailed(Exception):
    """The group an item ran in failed (the cause is ``__cause__``), and the group held
    other items too: the failure may belong to one of them.  ``sent``: whether the group
    was sent at all (``take()`` called); if not, none of it reached the shard.
    ``deadline``: the group's, which may be earlier than the item's."""

    def __init__(self, message: str, *, sent: bool, deadline: float) -> None:
        super().__init__(message)
        self.sent = sent
        self.deadline = deadline


class _Group(Generic[I, V]):
    __slots__ = ("counted", "deadline", "done", "items", "sent", "weight")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # its first item's, the earliest of its items'
        self.items: list[I] = []
        self.weight = 0
        self.sent = False
        self.counted = False  # out of the waiting items
        self.done: asyncio.Future[V] = asyncio.get_running_loop().create_future()


class Groups(Generic[K, I, V]):
    """Items submitted under one key while that key's open group has not been sent yet
    run together, by one call of the ``run`` its first item came with (the ``run`` of
    the items that join it is not called: it must do the same for them).

    ``run(take)`` calls ``take()`` at the moment it sends the group (it may call it again
    when it has to send again: the same items come back); from then on, the key's next
    item opens a new group.  A group also closes when it holds ``max_size`` items or
    ``max_weight`` (their weights added up), and an item that would take it past
    ``max_weight`` opens a new one.  An item whose deadline is earlier than the
    open group's opens a group of its own, which later items join: so a group runs under
    the earliest deadline of its items.  The group runs as a task of its own, so a caller
    that goes away does not cancel it for the others.
    """

    def __init__(self, *, max_size: int, max_weight: int, waiting: Gauge, sizes: Histogram) -> None:
        self.max_size = max_size
        self.max_weight = max_weight
        self._open: dict[K, _Group[I, V]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._waiting = waiting  # items in groups not sent yet
        self._sizes = sizes  # items per group, as each is sent

    async def submit(
        self,
        key: K,
        item: I,
        run: Callable[[Callable[[], list[I]]], Awaitable[V]],
        *,
        deadline: float,
        weight: int = 0,
    ) -> tuple[V, int]:
        """The result of the group ``item`` ran in, and ``item``'s place in it.

        Raises the group's failure as it is when ``item`` was alone in it, and
        :class:`GroupFailed` from it otherwise.
        """
        group = self._open.get(key)
        if (
            group is None
            or group.deadline > deadline
            or (group.items and group.weight + weight > self.max_weight)
        ):
            group = _Group(deadline)
            self._open[key] = group
            task = asyncio.ensure_future(self._run(key, group, run))
            self._tasks.add(task)
            task.add_done_callback(lambda done: self._ended(key, group, done))
        index = len(group.items)
        group.items.append(item)
        group.weight += weight
        self._waiting.inc()
        if len(group.items) >= self.max_size or group.weight >= self.max_weight:
            self._close(key, group, full=True)
        try:
            result = await asyncio.shield(group.done)
        except Exception as exc:
            if len(group.items) > 1:
                raise GroupFailed(str(exc), sent=group.sent, deadline=group.deadline) from exc
            raise
        return result, index

    async def _run(
        self, key: K, group: _Group[I, V], run: Callable[[Callable[[], list[I]]], Awaitable[V]]
    ) -> None:
        def take() -> list[I]:
            if not group.sent:
                group.sent = True
                self._close(key, group)
                self._sizes.observe(len(group.items))
            return group.items

        try:
            result = await run(take)
        except Exception as exc:  # every item's caller gets it
            self._close(key, group)
            group.done.set_exception(exc)
        else:
            self._close(key, group)  # (taken already, unless run never sent it)
            group.done.set_result(result)

    def _ended(self, key: K, group: _Group[I, V], task: asyncio.Future[None]) -> None:
        """The group's task ended, however (cancelled before it began, too)."""
        self._tasks.discard(task)
        self._close(key, group)
        if not group.done.done():  # cancelled (shutdown)
            group.done.cancel()

    def _close(self, key: K, group: _Group[I, V], *, full: bool = False) -> None:
        """No more items join ``group``; unless it is only ``full``, its items no longer
        wait either (it is sent, or failed or ended before)."""
        if self._open.get(key) is group:
            del self._open[key]
        if not full and not group.counted:
            group.counted = True
            self._waiting.dec(len(group.items))
