"""Every setting shardd and shardctl read, declared once.

The :class:`Settings` dataclass *is* the declaration: each field carries its type,
default and help text.  The command-line flags of ``shardd``, the ``SHARDD_*``
environment variables, the TOML config file and the README's settings table all come
from these fields (a test fails when a setting is missing from the README).

Precedence, lowest first: default, config file (``--config`` or ``SHARDD_CONFIG``),
environment, command-line flag.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "SHARDD_"
ZONE = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")  # a zone label, as the catalog checks it
TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")  # a user table's name, likewise


CHOICES = {
    "cache_backend": ("local", "redis", "off"),
    "cache_policy": ("lru", "lfu", "fifo"),
    "view_backpressure": ("delay", "refuse", "off"),
    "event_loop": ("uvloop", "asyncio"),
}


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    catalog_dsn: str = _setting(
        "postgresql://shardd@127.0.0.1:5432/shardd",
        "DSN of the catalog database (topology, slot map, tables).",
    )
    host: str = _setting(
        "127.0.0.1",
        "Address the HTTP API listens on. Without tokens only a loopback address is allowed.",
    )
    port: int = _setting(8080, "Port the HTTP API listens on.")
    tokens: tuple[str, ...] = _setting(
        (),
        "Bearer tokens as SECRET:SCOPE[,SCOPE] (scopes read, write, admin; admin implies "
        "write, write implies read). Separate several with ';' in the environment.",
    )
    slot_count: int = _setting(4096, "Number of slots; fixed when the cluster is created.")
    pool_size: int = _setting(10, "Maximum connections per Postgres node and shardd instance.")
    health_interval: float = _setting(1.0, "Seconds between health checks of every node.")
    max_replica_lag_bytes: int = _setting(
        16 * 1024 * 1024, "Replicas further behind their primary serve no eventual reads."
    )
    max_replica_lag_seconds: float = _setting(
        10.0, "Replicas whose replay is this many seconds behind serve no eventual reads."
    )
    topology_poll_interval: float = _setting(
        2.0, "Seconds between catalog polls (LISTEN/NOTIFY usually reports changes sooner)."
    )
    request_timeout: float = _setting(5.0, "Deadline in seconds for one API request.")
    catalog_timeout: float = _setting(
        2.0,
        "Seconds one catalog connect or query may take; a catalog that does not answer in "
        "time counts as unavailable.",
    )
    statement_timeout: float = _setting(
        2.0,
        "Server-side limit in seconds on one statement of shardd's shard sessions. Must be "
        "shorter than topology_lease: a write is sent only while at least this much of the "
        "lease is left, so none commits after the lease ends.",
    )
    lock_timeout: float = _setting(
        1.0, "Server-side limit in seconds on one lock wait in shardd's shard sessions."
    )
    idle_in_transaction_session_timeout: float = _setting(
        10.0,
        "Seconds a shard session of shardd may sit idle inside a transaction before the "
        "server ends it (and rolls the transaction back).",
    )
    failover: bool = _setting(
        True, "Promote a replica automatically when a shard's primary is down (monitor)."
    )
    max_lag_on_failover: int = _setting(
        1024 * 1024,
        "Automatic failover promotes only a replica that was streaming and is at most this "
        "many bytes of WAL behind the failed primary; otherwise the shard refuses writes "
        "(503 no_failover_candidate) until `shardctl failover --force`.",
    )
    failover_after_checks: int = _setting(
        3, "Consecutive failed health checks after which a primary is declared down."
    )
    topology_lease: float = _setting(
        5.0,
        "An instance that could not confirm its topology with the catalog for this many "
        "seconds stops writing; a failover waits at most this long for instances to see "
        "the old primary fenced. Same value on every instance.",
    )
    changelog_retention: float = _setting(
        3600.0,
        "Seconds change-log entries are kept (longer while a registered consumer, such as "
        "a slot move, has not read them). The monitor trims once a minute (or once per "
        "retention, if shorter), whether or not failover is enabled.",
    )
    idempotency_retention: float = _setting(
        86400.0,
        "Seconds an Idempotency-Key's claim and recorded outcomes are kept; a retry after "
        "that is a new request. The monitor trims them with the change log.",
    )
    consumer_expiry: float = _setting(
        86400.0,
        "Seconds after which a change-log consumer that stopped advancing (a failed move "
        "nobody resumed) is dropped, so it no longer holds back trimming; a move whose "
        "consumer expired aborts.",
    )
    views: bool = _setting(
        True, "Take part in view maintenance (each source shard is followed by one instance)."
    )
    view_interval: float = _setting(
        0.1, "Seconds between view-maintenance rounds of a followed source shard."
    )
    view_lease: float = _setting(
        5.0,
        "Seconds an instance's hold on a source shard's view maintenance lasts unless "
        "renewed; another instance takes over a dead one's shards within about this long. "
        "Applies stop statement_timeout + 0.5 s before it ends, so at least "
        "statement_timeout + 3 s is used.",
    )
    view_backfill_timeout: float = _setting(
        600.0, "Deadline in seconds of copying one source shard into a new view."
    )
    max_view_lag: float = _setting(
        10.0,
        "Seconds a view may lag behind a source shard before writes to its source table "
        "are slowed or refused (view_backpressure).",
    )
    view_backpressure: str = _setting(
        "delay",
        "What writes to a table whose view lags past max_view_lag get: delay (each write "
        "waits up to view_backpressure_wait for the lag to drop), refuse (503 view_lag), "
        "or off.",
    )
    view_backpressure_wait: float = _setting(
        1.0, "Seconds a delayed write waits for a lagging view (view_backpressure = delay)."
    )
    feed_retention_cap: float = _setting(
        86400.0,
        "Seconds a registered change-feed consumer that has not committed a cursor keeps "
        "holding back the trimming of the change log; past it the monitor drops its "
        "positions on the shards, and its cursor gets 410 cursor_expired once entries it "
        "had not read are trimmed.",
    )
    write_buffer_timeout: float = _setting(
        5.0,
        "Seconds a write waits for a shard without a reachable primary to get one "
        "(within the request deadline) before failing with 503.",
    )
    max_body_bytes: int = _setting(
        1024 * 1024,
        "Largest accepted request body (413 above); no PATCH grows an item past it either.",
    )
    max_response_bytes: int = _setting(
        4 * 1024 * 1024,
        "Most bytes of items in one scan, partition-query or batch-get response; the rest "
        "comes with the next page's position (batch get: as unprocessed keys). One item is always"
        " returned.",
    )
    max_key_bytes: int = _setting(1024, "Largest partition or sort key, in UTF-8 bytes.")
    max_json_depth: int = _setting(32, "Deepest nesting of arrays and objects in an item.")
    max_batch_keys: int = _setting(
        100, "Most keys in one batch get, and most puts and most deletes in one batch write."
    )
    max_page_size: int = _setting(1000, "Largest `limit` for partition queries and scans.")
    default_page_size: int = _setting(100, "`limit` when a query or scan gives none.")
    shutdown_timeout: float = _setting(
        10.0, "Seconds a stopping server waits for in-flight requests to finish."
    )
    shutdown_drain: float = _setting(
        0.0,
        "Seconds a stopping server keeps serving with /readyz answering 503 before it "
        "closes its listener: behind a load balancer, more than its health check's "
        "interval x failures (deploy/haproxy.cfg: 2 s).",
    )
    node_addresses: tuple[str, ...] = _setting(
        (),
        "This instance's own addresses for some nodes, as NODE=HOST:PORT, where it reaches "
        "them other than at the address the catalog records (a NAT, a local pooler). "
        "Separate several with ';' in the environment.",
    )
    zone: str = _setting(
        "",
        "This instance's zone (a data center, an availability zone): eventual and session "
        "reads prefer replicas labelled with it (shardctl shard add --zone, shardctl node "
        "zone). Empty: no preference.",
    )
    log_level: str = _setting("info", "Log level: debug, info, warning or error.")
    event_loop: str = _setting(
        "uvloop",
        "The event loop: uvloop (libuv; cheaper socket I/O and scheduling) or asyncio "
        "(the standard library's).",
    )
    access_log: bool = _setting(True, "Log one JSON line per request.")
    coalesce_reads: bool = _setting(
        True,
        "Concurrent eventual reads of the same item on one instance share one query.",
    )
    coalesce_writes: bool = _setting(
        True,
        "Unconditional single-item puts and deletes that wait for a connection to the same "
        "shard's primary run together, in one transaction (group commit); each keeps its "
        "own answer.",
    )
    hotkeys: bool = _setting(
        True, "Count requests per key, slot and shard and report them (hot-key detection)."
    )
    hotkeys_capacity: int = _setting(
        1000,
        "Counters of the per-instance Space-Saving summary of keys (memory bound: about "
        "200 bytes each); every key above 1/capacity of the traffic is in it.",
    )
    hotkeys_window: float = _setting(
        1.0, "Time constant in seconds over which request counts decay into rates."
    )
    hotkeys_report_interval: float = _setting(
        0.5, "Seconds between an instance's traffic reports to the catalog."
    )
    hot_key_share: float = _setting(
        0.05,
        "Share of all traffic above which a key is hot: logged, counted, cached by tables "
        "with cache = hot, and read from every node of its shard.",
    )
    hot_key_min_rate: float = _setting(
        50.0, "Requests per second (all instances) below which no key counts as hot."
    )
    cache_backend: str = _setting(
        "local",
        "Where the item cache keeps entries: local (in process), redis (shared, at "
        "redis_url) or off. Tables choose what is cached (cache = off | hot | all).",
    )
    cache_policy: str = _setting("lru", "Eviction policy of the local cache: lru, lfu or fifo.")
    cache_max_entries: int = _setting(100_000, "Most entries in the local cache.")
    cache_max_bytes: int = _setting(
        64 * 1024 * 1024, "Most bytes (documents, keys and overhead) in the local cache."
    )
    cache_invalidation_interval: float = _setting(
        0.1,
        "Seconds between reads of every shard's change log for cache invalidation (the "
        "staleness bound for writes through other instances).",
    )
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis for cache_backend = redis.")
    redis_timeout: float = _setting(
        0.05, "Seconds a Redis operation may take before the read goes to Postgres instead."
    )

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"setting {name}: expected one of {', '.join(allowed)}")
        if not ZONE.fullmatch(self.zone):
            raise ValueError(f"setting zone: expected {ZONE.pattern}, got {self.zone!r}")

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        return dataclasses.fields(cls)


def field_type(f: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(Settings)
    return hints[f.name]


def parse_value(f: dataclasses.Field[Any], raw: Any) -> Any:
    """Convert a raw value (string from env/flags, or TOML value) to the field's type."""
    kind = field_type(f)
    if typing.get_origin(kind) is tuple:
        if isinstance(raw, str):
            return tuple(part.strip() for part in raw.split(";") if part.strip())
        if isinstance(raw, list | tuple):
            return tuple(str(part) for part in raw)
        raise ValueError(f"setting {f.name}: expected a list, got {raw!r}")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"setting {f.name}: expected a boolean, got {raw!r}")
    if isinstance(kind, type) and not isinstance(kind, types.GenericAlias):
        try:
            return kind(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"setting {f.name}: expected {kind.__name__}, got {raw!r}") from exc
    raise TypeError(f"unsupported setting type {kind!r}")


def node_routes(settings: Settings) -> dict[str, tuple[str, int]]:
    """``node_addresses`` as node name -> (host, port); ValueError when malformed."""
    routes = {}
    for entry in settings.node_addresses:
        name, _, address = entry.partition("=")
        host, _, port = address.rpartition(":")
        if not (name.strip() and host and port.isdigit()):
            raise ValueError(f"setting node_addresses: expected NODE=HOST:PORT, got {entry!r}")
        routes[name.strip()] = (host, int(port))
    return routes


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from file, environment and explicit overrides (flags)."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    by_name = {f.name: f for f in Settings.fields()}
    values: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
        for key, raw in data.items():
            if key not in by_name:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
            values[key] = parse_value(by_name[key], raw)
    for name, f in by_name.items():
        if env_name(name) in environ:
            values[name] = parse_value(f, environ[env_name(name)])
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = parse_value(by_name[name], raw)
    return Settings(**values)


def documentation_rows() -> Iterator[tuple[str, str, str, str]]:
    """(name, environment variable, default, help) for every setting, for docs."""
    for f in Settings.fields():
        yield f.name, env_name(f.name), repr(f.default), f.metadata["help"]
