"""The data-plane operations: items, batches, partitions and scans, over every shard.

Each operation takes plain arguments and returns plain results; the HTTP layer
(:mod:`shardd.api.handlers`) only parses requests and shapes responses around them.
Here an operation is routed (a key's slot and its owner under the current topology),
split per shard and fanned out (batches, scans, table-wide work), merged (the scan's
global order), and run on nodes by the :class:`~shardd.executor.Executor`.

When a shard refuses a slot because this instance's map is stale, the operation is
routed again (a batch: only the refused groups, regrouped) after the executor has paced
the retry, until the request's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from . import catalog, changelog, errors, idempotency, metrics, store
from .cache import Cache, Entry, entry_size
from .coalesce import GroupFailed, Groups, SingleFlight
from .config import Settings
from .executor import Executor, Served, Work
from .hotkeys import Reporter, Traffic
from .placement import slot_of
from .router import SessionToken
from .topology import Shard, Topology
from .watcher import TopologyWatcher

T = TypeVar("T")
Key = tuple[str, str]  # (pk, sk)
CACHE_NODE = "cache"  # Served.node of an answer from the item cache
VIEW_POLL = 0.02  # seconds between looks at a view's positions while a session read waits
VIEW_MARGIN = 0.2  # seconds of the deadline a waiting view read leaves for the read itself


@dataclass(frozen=True)
class KeyOutcome:
    """One key of a batch write: the new version of a put, the deleted version of a
    delete (None: it was absent), or the error that stopped its shard's group."""

    version: int | None = None
    error: errors.ApiError | None = None
    replayed: bool = False  # recorded under the request's idempotency key, not written now


@dataclass(frozen=True)
class ViewRowWrite:
    """One row of a view to write: a put (``doc`` set) or a removal (``doc`` None), done
    where the stored row was built from source version ``version`` or an older one, or
    in any case with ``force``."""

    pk: str
    sk: str
    doc: Any
    version: int
    force: bool = False


@dataclass
class BatchWritten:
    outcomes: list[KeyOutcome]  # in the order of puts, then deletes
    session: SessionToken
    served: list[Served] = field(default_factory=list)


def _position(token: SessionToken | None, shard: Shard) -> int | None:
    return token.positions.get(shard.name) if token is not None else None


def _again_alone(failed: GroupFailed, deadline: float) -> bool:
    """Whether a write whose group failed goes again on its own (its deadline
    ``deadline``): when nothing of the group was written, and the failure may be another
    write's own (a slot moving, a refused statement) or came under the group's deadline,
    which is earlier than this write's (no primary until then, say).  Otherwise (an
    ambiguous outcome, or the shard's answer within this write's own time) the failure
    is this write's answer as it is."""
    cause = failed.__cause__
    if isinstance(cause, errors.StaleMap):
        return True
    if not isinstance(cause, errors.ApiError) or isinstance(cause, errors.OutcomeUnknown):
        return not failed.sent  # unless never sent, it may have been written
    whole_shard = (
        errors.Timeout,
        errors.ShardUnavailable,
        errors.WritesRefused,
        errors.CatalogUnavailable,
        errors.NotReady,
    )
    return not isinstance(cause, whole_shard) or deadline > failed.deadline


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        *,
        watcher: TopologyWatcher,
        executor: Executor,
        traffic: Traffic | None = None,
        reporter: Reporter | None = None,
        cache: Cache | None = None,
    ):
        self.settings = settings
        self.watcher = watcher
        self.executor = executor
        self.traffic = traffic  # hot-key counting (None: off)
        self.reporter = reporter  # the merged view and its hot set
        self.cache = cache
        # (table, pk, sk) -> the eventual read of that item in flight
        self._item_reads: SingleFlight[tuple[str, str, str], tuple[store.Item | None, Served]] = (
            SingleFlight()
        )
        if cache is not None:
            cache.on_invalidate.append(self._item_reads.forget)
        # (shard, table, epoch) -> single-item writes sharing one transaction (coalesce_writes):
        # the writes of a group were all routed under the topology its shard is from
        self._write_groups: Groups[
            tuple[str, str, int], store.BatchWrite, tuple[store.BatchResult, Served]
        ] = Groups(
            max_size=settings.max_batch_keys,
            max_weight=settings.max_body_bytes,  # bytes of documents, as a batch request's
            waiting=metrics.WRITES_GROUPING,
            sizes=metrics.WRITE_GROUP_SIZE,
        )
        # Per source table and shard, the largest lag of the table's views there, and
        # what a write to a lagging one waits for or raises (set by the view keeper; see
        # shardd.views.keeper).
        self.view_lags: dict[tuple[str, str], float] = {}  # (table, shard) -> seconds
        self.admit_write: Callable[[str, str, float], Awaitable[None]] | None = None

    # -- tables ------------------------------------------------------------------

    async def declared_table(self, name: str) -> str:
        """``name`` if the table is declared; 404 otherwise."""
        if name not in self.watcher.require_topology().tables:
            # Created moments ago through another instance?  Look once before saying no.
            await self.watcher.refresh()
            if name not in self.watcher.require_topology().tables:
                raise errors.NotFound(f"table {name} does not exist", code="table_not_found")
        return name

    async def active_table(self, name: str) -> str:
        """``name`` if its items may be read and written: 404 unless declared, 409 while
        it is being deleted."""
        await self.declared_table(name)
        if self.watcher.require_topology().tables[name].state != catalog.TABLE_ACTIVE:
            raise errors.TableDeleting(f"table {name} is being deleted")
        return name

    # -- one key -----------------------------------------------------------------

    async def get(
        self, *, table: str, pk: str, sk: str, consistency: str, token: SessionToken | None
    ) -> tuple[store.Item | None, Served]:
        """One item (None: absent).

        Every read is counted for hot-key detection.  Reads that allow it are answered
        from the item cache when the table caches this key (:mod:`shardd.cache`);
        concurrent eventual reads of one item share one query (``coalesce_reads``, see
        :mod:`shardd.coalesce`), and eventual reads of a hot key spread over every node
        of its shard, the primary included.
        """
        topology = self.watcher.require_topology()
        slot = slot_of(pk, topology.slot_count)
        if self.traffic is not None:
            self.traffic.record(table, pk, slot)
        hot = self.reporter is not None and (table, pk) in self.reporter.hot
        key = (table, pk, sk)
        info = topology.tables.get(table)
        cached = (
            self.cache is not None
            and consistency != "strong"
            and info is not None
            and (info.cache == "all" or (info.cache == "hot" and hot))
        )
        owner = topology.shard_for_slot(slot)
        if cached:
            assert self.cache is not None
            entry = await self.cache.lookup(key)
            if entry is not None and entry.serves(
                consistency=consistency,
                shard=owner.name if owner else None,
                primary=owner.primary.name if owner and owner.primary else None,
                token=token,
            ):
                return entry.item, Served(entry.shard, CACHE_NODE)

        def work(slot: int, min_lsn: int | None) -> Work[store.Item | None]:
            return lambda conn: store.get(
                conn, slot=slot, table=table, pk=pk, sk=sk, min_lsn=min_lsn
            )

        async def read() -> tuple[store.Item | None, Served]:
            if not cached:
                return await self._read_owner(
                    pk, work, consistency=consistency, token=token, spread=hot
                )
            assert self.cache is not None and info is not None
            lease = self.cache.lease(key)
            health = self.executor.health.snapshot  # positions known before the read
            try:
                item, served = await self._read_owner(
                    pk, work, consistency=consistency, token=token, spread=hot
                )
                primary = owner.primary if owner is not None else None
                if (
                    lease is not None
                    and owner is not None
                    and primary is not None
                    and served.shard == owner.name
                ):
                    state = health.get(served.node)
                    position = state.lsn if state is not None and state.lsn is not None else 0
                    if served.node == primary.name and position:
                        # The primary's WAL passes a commit before it is visible (while
                        # a synchronous standby confirms it): a token of exactly this
                        # position may be a write the read did not see.
                        position -= 1
                    entry = Entry(
                        item,
                        served.shard,
                        primary.name,
                        position,
                        self.cache.clock() + info.cache_ttl,
                        entry_size(key, item),
                    )
                    await self.cache.fill(
                        key,
                        lease,
                        entry,
                        ttl=info.cache_ttl,
                        from_primary=served.node == primary.name,
                    )
            finally:
                self.cache.release(key, lease)
            return item, served

        if consistency == "eventual" and self.settings.coalesce_reads:
            return await self._item_reads.run(key, read)
        return await read()

    async def write(
        self,
        *,
        op: str,
        table: str,
        pk: str,
        sk: str,
        doc: Any,
        if_version: int | None,
        once: idempotency.Once | None = None,
        size: int = 0,
    ) -> tuple[store.WriteResult, Served]:
        """A put, patch or delete of one item (``op``), conditional on ``if_version``
        (0: only if absent); with ``once``, at most once per idempotency key.  ``size``:
        the document's bytes as sent (how much of a group of writes it fills)."""
        deadline = self.executor.deadline()

        def alone(
            topology: Topology, shard: Shard, slot: int
        ) -> Awaitable[tuple[store.WriteResult, Served]]:
            return self.executor.write(
                shard,
                lambda conn: store.write(
                    conn,
                    op=op,
                    slot=slot,
                    table=table,
                    pk=pk,
                    sk=sk,
                    doc=doc,
                    if_version=if_version,
                    max_item_bytes=self.settings.max_body_bytes,
                    once=once,
                ),
                epoch=topology.epoch,
                deadline=deadline,
            )

        async def grouped(
            topology: Topology, shard: Shard, slot: int
        ) -> tuple[store.WriteResult, Served]:
            (result, served), index = await self._write_groups.submit(
                (shard.name, table, topology.epoch),
                store.BatchWrite(slot, pk, sk, doc if op == "put" else None),
                lambda take: self._write_group(topology, shard, table, take, deadline),
                deadline=deadline,
                weight=size,
            )
            version = result.versions[index]
            created = op == "put" and version == 1  # as a put alone says it
            return store.WriteResult(version, created, None, result.lsn), served

        async def apply() -> tuple[store.WriteResult, Served]:
            if (
                self.settings.coalesce_writes
                and op in ("put", "delete")
                and if_version is None
                and once is None
            ):
                try:
                    return await self._on_owner(pk, grouped, deadline=deadline)
                except GroupFailed as failed:
                    if not _again_alone(failed, deadline):
                        assert failed.__cause__ is not None
                        raise failed.__cause__  # noqa: B904 - the group's own answer
                    # Nothing of the group was written: this one goes again on its own.
            return await self._on_owner(pk, alone, deadline=deadline)

        await self._admit(table, [pk], deadline)
        if once is not None:
            await self._claim(once, deadline)
        if self.traffic is not None:
            slot = slot_of(pk, self.watcher.require_topology().slot_count)
            self.traffic.record(table, pk, slot, write=True)
        if self.cache is None:
            return await apply()
        key = (table, pk, sk)
        try:
            written = await apply()
        except BaseException:  # it may have been applied all the same
            await self._invalidate([key])
            raise
        # The floor before the invalidation: no fill in between.
        self.cache.note(key, written[1].shard, written[0].lsn)
        await self._invalidate([key])
        return written

    def _write_group(
        self,
        topology: Topology,
        shard: Shard,
        table: str,
        take: Callable[[], list[store.BatchWrite]],
        deadline: float,
    ) -> Awaitable[tuple[store.BatchResult, Served]]:
        """One group of single-item writes to ``table`` on ``shard``, as a batch write:
        the group is taken when a connection to the primary is in hand."""
        return self.executor.write(
            shard,
            lambda conn: store.write_batch(conn, table=table, ops=take()),
            epoch=topology.epoch,
            deadline=deadline,
        )

    async def query(
        self,
        *,
        table: str,
        pk: str,
        prefix: str | None,
        after: str | None,
        limit: int,
        consistency: str,
        token: SessionToken | None,
    ) -> tuple[list[store.Item], Served]:
        """Up to ``limit`` items of one partition in sort-key order, after ``after``."""
        if self.traffic is not None:
            self.traffic.record(table, pk, slot_of(pk, self.watcher.require_topology().slot_count))

        def work(slot: int, min_lsn: int | None) -> Work[list[store.Item]]:
            return lambda conn: store.query_partition(
                conn,
                slot=slot,
                table=table,
                pk=pk,
                prefix=prefix,
                after=after,
                limit=limit,
                min_lsn=min_lsn,
            )

        return await self._read_owner(pk, work, consistency=consistency, token=token)

    async def _read_owner(
        self,
        pk: str,
        work: Callable[[int, int | None], Work[T]],
        *,
        consistency: str,
        token: SessionToken | None,
        spread: bool = False,
    ) -> tuple[T, Served]:
        """A read of ``pk``'s slot: ``work(slot, min_lsn)`` on its owner's best node
        (``spread``: on any of its nodes the consistency allows, primary included)."""
        deadline = self.executor.deadline()

        def read(topology: Topology, shard: Shard, slot: int) -> Awaitable[tuple[T, Served]]:
            return self._read(
                shard,
                lambda min_lsn: work(slot, min_lsn),
                consistency=consistency,
                token=token,
                deadline=deadline,
                spread=spread,
            )

        return await self._on_owner(pk, read, deadline=deadline)

    def _read(
        self,
        shard: Shard,
        work: Callable[[int | None], Work[T]],
        *,
        consistency: str,
        token: SessionToken | None,
        deadline: float,
        spread: bool = False,
    ) -> Awaitable[tuple[T, Served]]:
        """``work(min_lsn)`` on the best node of ``shard``, ``min_lsn`` being the position
        the caller's session token asks of it."""
        min_lsn = _position(token, shard)
        return self.executor.read(
            shard,
            work(min_lsn),
            consistency=consistency,
            min_lsn=min_lsn,
            deadline=deadline,
            spread=spread,
        )

    async def _on_owner(
        self, pk: str, run: Callable[[Topology, Shard, int], Awaitable[T]], *, deadline: float
    ) -> T:
        """``run(topology, shard, slot)`` on the owner of ``pk``'s slot, following the map
        as it moves."""
        attempt = 0
        while True:
            topology = self.watcher.require_topology()
            slot = slot_of(pk, topology.slot_count)
            shard = topology.shard_for_slot(slot)
            if shard is None:
                raise errors.ShardUnavailable("none", f"slot {slot} has no owner")
            try:
                return await run(topology, shard, slot)
            except errors.StaleMap:
                await self.executor.after_stale(
                    topology, attempt=attempt, deadline=deadline, shard=shard.name
                )
                attempt += 1

    # -- views -------------------------------------------------------------------

    async def view_rows(
        self,
        *,
        view: str,
        table: str,
        pk: str,
        prefix: str,
        after: str | None,
        limit: int,
        consistency: str,
        token: SessionToken | None,
    ) -> tuple[list[store.Item], Served]:
        """Rows of a view partition (kept in the item table ``table``) in row sort-key
        order (``prefix`` and ``after`` are row sort keys, see
        :mod:`shardd.views.definition`).

        With a session token the read first waits until the view has applied, on each
        source shard the token names, every change that shard had committed when the
        read began; the rows are then read from their primary.
        """
        if token is not None:
            await self.view_caught_up(view, token, deadline=self.executor.deadline())
            consistency = "strong"
        return await self.query(
            table=table,
            pk=pk,
            prefix=prefix or None,
            after=after,
            limit=limit,
            consistency=consistency,
            token=None,
        )

    async def view_caught_up(self, view: str, token: SessionToken, *, deadline: float) -> None:
        """Wait until ``view`` has applied every change that the token's shards had
        committed now (so the token's writes too); 504 ``view_behind`` at the deadline."""
        topology = self.watcher.require_topology()
        targets: dict[str, tuple[str, str]] = {}
        for name in token.positions:
            shard = topology.shards.get(name)
            if shard is not None:
                targets[name], _ = await self.executor.read(
                    shard,
                    changelog.position_and_origin,
                    consistency="strong",
                    min_lsn=None,
                    deadline=deadline,
                )
        while targets:
            async with self.watcher.catalog_connection() as conn:
                applied = {
                    str(row["shard"]): (str(row["position"]), str(row["origin"]))
                    for row in await catalog.view_positions(conn, view=view)
                }
            for name, (position, origin) in list(targets.items()):
                done = applied.get(name)
                if done is not None and done[1] == origin and changelog.covers(done[0], position):
                    del targets[name]
            if not targets:
                return
            if time.monotonic() + VIEW_POLL >= deadline - VIEW_MARGIN:
                raise errors.ApiError(
                    f"view {view} has not yet applied the session's writes on"
                    f" {', '.join(sorted(targets))}",
                    status=504,
                    code="view_behind",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(VIEW_POLL)

    # -- every shard -------------------------------------------------------------

    async def scan(
        self,
        *,
        table: str,
        after: Key | None,
        limit: int,
        consistency: str,
        token: SessionToken | None,
    ) -> tuple[list[store.Item], list[Served]]:
        """The first ``limit`` + 1 items of ``table`` after ``after`` in global (pk, sk)
        order, merged from every shard (one more than asked tells the caller that there
        are more).

        The position is a key, not a place on a shard: every page asks every shard for
        the items after it, so slots that move between shards during a long scan are
        neither skipped nor repeated.  Each shard is asked only for the slots this
        instance's topology gives it, and answers only from a node that owns every one
        of them (a replica that has not replayed a cutover passes the page on; a primary
        that has handed slots over means the topology is stale: refresh and read the page
        again), so at any consistency each slot is read exactly once.
        """
        deadline = self.executor.deadline()
        attempt = 0
        while True:
            topology = self.watcher.require_topology()
            slots = _slots_by_shard(topology)
            try:
                pages = await asyncio.gather(
                    *(
                        self._read(
                            shard,
                            _scan_page(table, slots.get(name, []), after, limit + 1),
                            consistency=consistency,
                            token=token,
                            deadline=deadline,
                        )
                        for name, shard in sorted(topology.shards.items())
                    )
                )
                break
            except errors.StaleMap:
                await self.executor.after_stale(
                    topology, attempt=attempt, deadline=deadline, shard="scan"
                )
                attempt += 1
        merged: dict[Key, store.Item] = {}
        for page, _ in pages:
            for item in page:
                merged.setdefault((item.pk, item.sk), item)
        ordered = [merged[key] for key in sorted(merged)]
        return ordered[: limit + 1], [served for _, served in pages]

    async def on_every_primary(self, work: Work[T], *, deadline: float | None = None) -> list[T]:
        """``work`` on every shard's primary in parallel; the first failure once all ended."""
        topology = self.watcher.require_topology()
        until = self.executor.deadline() if deadline is None else deadline
        outcomes = await asyncio.gather(
            *(
                self.executor.write(shard, work, epoch=topology.epoch, deadline=until)
                for shard in topology.shards.values()
            ),
            return_exceptions=True,
        )
        results = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome[0])
        return results

    # -- batches -----------------------------------------------------------------

    async def batch_get(
        self,
        *,
        table: str,
        keys: Sequence[Key],
        consistency: str,
        token: SessionToken | None,
    ) -> tuple[list[store.Item | None], list[Served]]:
        """Each key's item (None: absent) in the order of ``keys``; one query per shard."""
        deadline = self.executor.deadline()
        slotted = self._slotted(keys)
        self._record(table, slotted, write=False)
        found: list[store.Item | None] = [None] * len(keys)
        touched: list[Served] = []

        async def read(topology: Topology, shard: Shard, indexes: list[int]) -> None:
            keys = [slotted[i] for i in indexes]
            items, served = await self._read(
                shard,
                lambda min_lsn: (
                    lambda conn: store.get_many(conn, table=table, keys=keys, min_lsn=min_lsn)
                ),
                consistency=consistency,
                token=token,
                deadline=deadline,
            )
            touched.append(served)
            for i, item in zip(indexes, items, strict=True):
                found[i] = item

        await self._per_shard(slotted, read, deadline=deadline)
        return found, touched

    async def batch_write(
        self,
        *,
        table: str,
        puts: Sequence[tuple[str, str, Any]],
        deletes: Sequence[Key],
        token: SessionToken | None,
        once: idempotency.Once | None = None,
    ) -> BatchWritten:
        """Puts (pk, sk, doc) and deletes (pk, sk), atomically per shard: each shard's
        group commits or fails as a whole, and a group's failure is its keys' outcome.

        Once one group has committed, a later failure (a refused group that cannot be
        routed again in time) is the outcome of the keys not written, never of the whole
        request: the caller learns which keys were written.  With ``once`` (an
        idempotency key) each key is written at most once per key, and a key whose outcome
        was recorded returns it (``KeyOutcome.replayed``).
        """
        deadline = self.executor.deadline()
        slotted = self._slotted([(pk, sk) for pk, sk, _ in puts] + list(deletes))
        await self._admit(table, [pk for _, pk, _ in slotted], deadline)
        if once is not None:
            await self._claim(once, deadline)
        self._record(table, slotted, write=True)
        docs = [doc for _, _, doc in puts]
        outcomes: list[KeyOutcome | None] = [None] * len(slotted)
        written = BatchWritten([], token or SessionToken({}))

        async def write(topology: Topology, shard: Shard, indexes: list[int]) -> None:
            ops = [
                store.BatchWrite(*slotted[i], docs[i] if i < len(docs) else None, index=i)
                for i in indexes
            ]
            try:
                result, served = await self.executor.write(
                    shard,
                    lambda conn: store.write_batch(conn, table=table, ops=ops, once=once),
                    epoch=topology.epoch,
                    deadline=deadline,
                )
            except errors.ApiError as exc:
                for i in indexes:
                    outcomes[i] = KeyOutcome(error=exc)
                return
            lsn = result.lsn
            written.session = written.session.merged(served.shard, lsn)
            written.served.append(served)
            for i, version, replayed in zip(indexes, result.versions, result.replayed, strict=True):
                outcomes[i] = KeyOutcome(version=version, replayed=replayed)
                if self.cache is not None:
                    _, pk, sk = slotted[i]
                    self.cache.note((table, pk, sk), served.shard, lsn)

        failure: errors.ApiError | None = None  # every key has its outcome without one
        try:
            await self._per_shard(slotted, write, deadline=deadline)
        except errors.ApiError as exc:
            if not written.served:
                raise
            failure = exc
        finally:
            await self._invalidate([(table, pk, sk) for _, pk, sk in slotted])
        written.outcomes = [KeyOutcome(error=failure) if o is None else o for o in outcomes]
        return written

    async def apply_view_rows(
        self,
        *,
        table: str,
        rows: Sequence[ViewRowWrite],
        deadline: float,
        not_after: datetime | None = None,
    ) -> int:
        """Apply view rows to the item table ``table`` of a view, one transaction per
        shard (see :func:`store.view_apply`), refused past ``not_after`` (a maintainer's
        lease).  Raises the first shard's failure once every shard has been tried."""
        slotted = self._slotted([(r.pk, r.sk) for r in rows])
        written = 0

        async def apply(topology: Topology, shard: Shard, indexes: list[int]) -> None:
            nonlocal written
            ops = [
                store.ViewRowWrite(*slotted[i], rows[i].doc, rows[i].version, rows[i].force)
                for i in indexes
            ]
            count, _ = await self.executor.write(
                shard,
                lambda conn: store.view_apply(conn, table=table, rows=ops, not_after=not_after),
                epoch=topology.epoch,
                deadline=deadline,
            )
            written += count

        await self._per_shard(slotted, apply, deadline=deadline)
        return written

    async def _claim(self, once: idempotency.Once, deadline: float) -> None:
        """Claim an idempotency key for the request's digest (422 when another request
        holds it), on the owner of the claim's slot, before the write."""

        def claim(topology: Topology, shard: Shard, slot: int) -> Awaitable[tuple[None, Served]]:
            return self.executor.write(
                shard,
                lambda conn: idempotency.claim(conn, slot=slot, once=once),
                epoch=topology.epoch,
                deadline=deadline,
            )

        await self._on_owner(once.claim, claim, deadline=deadline)

    async def _admit(self, table: str, pks: Sequence[str], deadline: float) -> None:
        """Back-pressure: wait for (or refuse) a write while a view of ``table`` lags
        on a shard the write goes to."""
        if self.admit_write is None or not self.view_lags:
            return
        topology = self.watcher.require_topology()
        limit = self.settings.max_view_lag
        for shard in {topology.slot_map[slot_of(pk, topology.slot_count)] for pk in pks}:
            if shard is not None and self.view_lags.get((table, shard), 0.0) > limit:
                await self.admit_write(table, shard, deadline)

    async def _invalidate(self, keys: list[tuple[str, str, str]]) -> None:
        """After writes of ``keys``: no cached value, and no read in flight before the
        writes, answers for them any more."""
        if self.cache is not None:  # which ends the coalesced reads too (on_invalidate)
            await self.cache.invalidate(keys, source="write")
        else:
            for key in keys:
                self._item_reads.forget(key)

    def _record(self, table: str, keys: list[tuple[int, str, str]], *, write: bool) -> None:
        if self.traffic is not None:
            for slot, pk, _ in keys:
                self.traffic.record(table, pk, slot, write=write)

    def _slotted(self, keys: Sequence[Key]) -> list[tuple[int, str, str]]:
        slot_count = self.watcher.require_topology().slot_count
        return [(slot_of(pk, slot_count), pk, sk) for pk, sk in keys]

    async def _per_shard(
        self,
        keys: list[tuple[int, str, str]],
        run: Callable[[Topology, Shard, list[int]], Awaitable[None]],
        *,
        deadline: float,
    ) -> None:
        """``run(topology, shard, indexes)`` for each shard's share of ``keys`` (slot, pk, sk), in
        parallel; the groups a shard refused are regrouped and run again."""
        pending = list(range(len(keys)))
        attempt = 0
        while pending:
            topology = self.watcher.require_topology()
            groups = _group(topology, [keys[i] for i in pending])
            outcomes = await asyncio.gather(
                *(
                    run(topology, topology.shards[name], [pending[i] for i in indexes])
                    for name, indexes in groups.items()
                ),
                return_exceptions=True,
            )
            retry: list[int] = []
            refused = []
            for (name, indexes), outcome in zip(groups.items(), outcomes, strict=True):
                if isinstance(outcome, errors.StaleMap):
                    retry.extend(pending[i] for i in indexes)
                    refused.append(name)
                elif isinstance(outcome, BaseException):
                    raise outcome
            pending = sorted(retry)
            if pending:
                await self.executor.after_stale(
                    topology, attempt=attempt, deadline=deadline, shard=",".join(refused)
                )
                attempt += 1


def _scan_page(
    table: str, slots: list[int], after: Key | None, limit: int
) -> Callable[[int | None], Work[list[store.Item]]]:
    def work(min_lsn: int | None) -> Work[list[store.Item]]:
        return lambda conn: store.scan(
            conn, table=table, slots=slots, after=after, limit=limit, min_lsn=min_lsn
        )

    return work


def _slots_by_shard(topology: Topology) -> dict[str, list[int]]:
    slots: dict[str, list[int]] = {}
    for slot, owner in enumerate(topology.slot_map):
        if owner is not None:
            slots.setdefault(owner, []).append(slot)
    return slots


def _group(topology: Topology, keys: list[tuple[int, str, str]]) -> dict[str, list[int]]:
    """shard name -> indexes of ``keys`` (slot, pk, sk) it owns."""
    groups: dict[str, list[int]] = {}
    for index, (slot, _, _) in enumerate(keys):
        owner = topology.slot_map[slot]
        if owner is None:
            raise errors.ShardUnavailable("none", f"slot {slot} has no owner")
        groups.setdefault(owner, []).append(index)
    return groups
