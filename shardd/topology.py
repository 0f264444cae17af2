"""The immutable snapshot of the cluster that every decision is made on.

A :class:`Topology` is loaded from the catalog as a whole (one transaction) and never
changed; a newer epoch replaces it.  Routing, planning and health decisions are pure
functions over these values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .views.definition import ViewDef, rows_table


@dataclass(frozen=True)
class Node:
    name: str
    shard: str
    role: str  # 'primary' | 'replica'
    host: str
    port: int
    dbname: str
    username: str
    password: str | None = None
    fenced: bool = False
    zone: str = ""  # '' when the node has none
    patroni_url: str | None = None  # its Patroni REST API (a 'patroni' shard's node)

    @property
    def is_primary(self) -> bool:
        return self.role == "primary" and not self.fenced

    def dsn(self) -> str:
        auth = self.username if self.password is None else f"{self.username}:{self.password}"
        host, port = _routes.get(self.name, (self.host, self.port))
        return f"postgresql://{auth}@{host}:{port}/{self.dbname}"


# This process's own way to some nodes, by name (setting ``node_addresses``), where it
# reaches them at another address than the one the catalog records: through a NAT, a
# local connection pooler, a proxy.  Set once at startup, before any connection.
_routes: dict[str, tuple[str, int]] = {}


def set_routes(routes: Mapping[str, tuple[str, int]]) -> None:
    _routes.clear()
    _routes.update(routes)


@dataclass(frozen=True)
class Shard:
    name: str
    weight: int
    nodes: tuple[Node, ...]
    term: int = 0  # grows with every promotion recorded for the shard
    write_block: str | None = None  # why writes are refused at once (see catalog 0004)
    degraded: bool = False  # running asynchronously although the cluster is synchronous
    failover_mode: str = "builtin"  # 'patroni': Patroni chooses the primary, shardd follows

    @functools.cached_property
    def primary(self) -> Node | None:
        return next((node for node in self.nodes if node.is_primary), None)

    @functools.cached_property
    def replicas(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == "replica" and not n.fenced)


@dataclass(frozen=True)
class TableInfo:
    name: str
    description: str
    created_at: str
    updated_at: str
    state: str = "active"  # 'deleting' while its items are being deleted
    cache: str = "hot"  # what the item cache keeps: off | hot | all
    cache_ttl: float = 1.0  # seconds an entry lives
    max_age: int = 0  # Cache-Control max-age of item reads

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "state": self.state,
            "cache": self.cache,
            "cache_ttl": self.cache_ttl,
            "max_age": self.max_age,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class ViewInfo:
    """A view as the catalog declares it (its definition parsed)."""

    definition: ViewDef
    description: str
    state: str  # backfilling | active | deleting
    created_at: str
    generation: int = 0

    @property
    def rows_table(self) -> str:
        """The internal item table of this declaration's rows."""
        return rows_table(self.name, self.generation)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def source(self) -> str:
        return self.definition.source

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "table": self.source,
            "description": self.description,
            **self.definition.as_json(),
            "state": self.state,
            "created_at": self.created_at,
        }


def _frozen(mapping: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Topology:
    epoch: int
    slot_count: int
    shards: Mapping[str, Shard]
    slot_map: tuple[str | None, ...]  # slot -> owning shard
    tables: Mapping[str, TableInfo] = field(default_factory=dict)
    views: Mapping[str, ViewInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", _frozen(self.shards))
        object.__setattr__(self, "tables", _frozen(self.tables))
        object.__setattr__(self, "views", _frozen(self.views))

    def views_of(self, table: str) -> tuple[ViewInfo, ...]:
        """The live views whose source is ``table`` or that join it."""
        return tuple(
            view
            for view in self.views.values()
            if view.state != "deleting"
            and (view.source == table or table in view.definition.join_tables())
        )

    def shard_for_slot(self, slot: int) -> Shard | None:
        owner = self.slot_map[slot]
        return None if owner is None else self.shards.get(owner)

    def nodes(self) -> tuple[Node, ...]:
        return tuple(node for shard in self.shards.values() for node in shard.nodes)

    @functools.cached_property
    def primaries(self) -> frozenset[str]:
        """The names of the nodes writes may go to."""
        return frozenset(node.name for node in self.nodes() if node.is_primary)

    def slot_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.shards, 0)
        for owner in self.slot_map:
            if owner is not None:
                counts[owner] = counts.get(owner, 0) + 1
        return counts
