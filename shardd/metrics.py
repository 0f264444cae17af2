"""Prometheus metrics, all declared here (scraped at ``GET /metrics``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .nodes import HealthSnapshot, NodePools
    from .topology import Topology

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

REQUESTS = Counter(
    "shardd_http_requests_total",
    "HTTP requests by route, method and status",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "shardd_http_request_seconds",
    "HTTP request latency by route",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
QUERY_SECONDS = Histogram(
    "shardd_shard_query_seconds",
    "Latency of queries sent to shard nodes",
    ["shard", "node"],
    buckets=LATENCY_BUCKETS,
)
# Labelled children by label values, looked up once per label set rather than on every
# request (the label sets are few: routes x methods x statuses, shards x nodes).
_request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_query_children: dict[tuple[str, str], Any] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    key = (route, method, status)
    children = _request_children.get(key)
    if children is None:
        children = (REQUESTS.labels(route, method, status), REQUEST_SECONDS.labels(route, method))
        _request_children[key] = children
    children[0].inc()
    children[1].observe(seconds)


def observe_query(shard: str, node: str, seconds: float) -> None:
    child = _query_children.get((shard, node))
    if child is None:
        child = _query_children[(shard, node)] = QUERY_SECONDS.labels(shard, node)
    child.observe(seconds)


QUERY_ERRORS = Counter(
    "shardd_shard_query_errors_total",
    "Failed queries to shard nodes by kind",
    ["shard", "node", "kind"],
)
READS_COALESCED = Counter(
    "shardd_reads_coalesced_total",
    "Eventual point reads answered by the same read already in flight on this instance",
)
WRITE_GROUP_SIZE = Histogram(
    "shardd_write_group_size",
    "Single-item writes committed together in one transaction (coalesce_writes), per group"
    " as it is sent",
    buckets=(1, 2, 4, 8, 16, 32, 64, 100),
)
WRITES_GROUPING = Gauge(
    "shardd_writes_grouping",
    "Single-item writes in a group that waits for a connection to its shard's primary",
)
SHARD_REQUEST_RATE = Gauge(
    "shardd_shard_requests_per_second",
    "Requests per second to each shard through all instances (merged hot-key reports)",
    ["shard"],
)
SHARD_IMBALANCE = Gauge(
    "shardd_shard_imbalance_ratio", "The busiest shard's request rate over the mean shard's"
)
TOP_KEY_SHARE = Gauge(
    "shardd_hot_key_top_share", "Share of all traffic taken by the single busiest key"
)
HOT_KEYS = Gauge("shardd_hot_keys", "Keys whose share of all traffic is at least hot_key_share")
HOT_KEY_DETECTIONS = Counter(
    "shardd_hot_key_detections_total", "Keys that crossed hot_key_share (counted by one instance)"
)
TRAFFIC_REPORT_FAILURES = Counter(
    "shardd_traffic_report_failures_total",
    "Hot-key reports that could not be written to or read from the catalog",
)
CACHE_LOOKUPS = Counter("shardd_cache_lookups_total", "Item cache lookups by result", ["result"])
CACHE_FILLS = Counter(
    "shardd_cache_fills_total",
    "Item cache fills: stored, or refused because the key was invalidated during the read",
    ["result"],
)
CACHE_EVICTIONS = Counter(
    "shardd_cache_evictions_total", "Item cache entries evicted, by reason", ["reason"]
)
CACHE_INVALIDATIONS = Counter(
    "shardd_cache_invalidations_total",
    "Item cache keys invalidated, by source (write: this instance; changelog: any)",
    ["source"],
)
CACHE_INVALIDATION_LAG = Histogram(
    "shardd_cache_invalidation_lag_seconds",
    "From a change's commit on its shard to its invalidation in this instance's cache (the"
    " staleness bound across instances)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
CACHE_ENTRIES = Gauge("shardd_cache_entries", "Entries in this instance's item cache")
CACHE_BYTES = Gauge("shardd_cache_bytes", "Approximate bytes of this instance's item cache")
CACHE_BACKEND_ERRORS = Counter(
    "shardd_cache_backend_errors_total",
    "Redis operations that failed or timed out (the read went to Postgres)",
)
CACHE_BACKEND_UP = Gauge("shardd_cache_backend_up", "1 while the last Redis operation worked")
CACHE_FOLLOW_FAILURES = Counter(
    "shardd_cache_follow_failures_total",
    "Rounds in which a shard's change log could not be followed (local entries dropped)",
)
VIEW_LAG_SECONDS = Gauge(
    "shardd_view_lag_seconds",
    "Age of the change-log snapshot a view has applied, per source shard",
    ["view", "shard"],
)
VIEW_LAG_ENTRIES = Gauge(
    "shardd_view_lag_entries",
    "Changes in the last batch a view applied from a source shard",
    ["view", "shard"],
)
VIEW_PROPAGATION_SECONDS = Histogram(
    "shardd_view_propagation_seconds",
    "From a source change being written to its view rows being applied",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
VIEW_ROWS_APPLIED = Counter(
    "shardd_view_rows_applied_total", "View rows written or removed by maintenance", ["view"]
)
VIEW_ROUND_FAILURES = Counter(
    "shardd_view_round_failures_total",
    "Maintenance rounds of a source shard that failed (retried from the same position)",
    ["shard"],
)
VIEW_HOLD_TIMEOUTS = Counter(
    "shardd_view_hold_timeouts_total",
    "Rounds that stopped waiting for a shard slots were moved from (order not ensured)",
    ["shard"],
)
VIEW_BACKPRESSURE = Counter(
    "shardd_view_backpressure_total",
    "Writes slowed or refused because a view of their table lagged past max_view_lag",
    ["action"],
)
CHANGEFEED_CHANGES = Counter(
    "shardd_changefeed_changes_total", "Changes delivered by the change feed, by shard", ["shard"]
)
CHANGEFEED_WAITING = Gauge(
    "shardd_changefeed_waiting",
    "Change-feed long polls waiting for a change (a round found none; the next is due)",
)
CHANGEFEED_CURSORS_EXPIRED = Counter(
    "shardd_changefeed_cursors_expired_total",
    "Change-feed reads refused because the cursor was older than what the shards keep (410)",
)
STALE_MAP_RETRIES = Counter(
    "shardd_stale_map_retries_total", "Operations refused by a shard for a stale map, retried"
)
READ_RETRIES = Counter(
    "shardd_read_retries_total", "Reads retried on another node after a connection failure"
)
FAILOVERS = Counter(
    "shardd_failovers_total", "Primaries replaced, by shard and kind", ["shard", "kind"]
)
FAILOVER_SECONDS = Histogram(
    "shardd_failover_seconds",
    "From detection (or the operator's command) to the new primary on record",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60),
)
MONITOR_LEADER = Gauge("shardd_monitor_leader", "1 while this instance is the failover monitor")
BUFFERED_WRITES = Gauge(
    "shardd_buffered_writes", "Writes waiting for their shard to have a reachable primary"
)
BUFFERED_READS = Gauge(
    "shardd_buffered_reads", "Reads waiting for their shard to have a node that can serve them"
)
WRITES_NO_PRIMARY = Counter(
    "shardd_writes_failed_no_primary_total",
    "Writes that failed because their shard had no reachable primary in time",
    ["shard"],
)
WRITE_BLOCKED = Gauge(
    "shardd_shard_writes_blocked",
    "1 while the monitor refuses a shard's writes, by reason (no_failover_candidate:"
    " no replica qualifies for promotion; no_sync_standby: strict synchronous mode)",
    ["shard", "reason"],
)
DEGRADED = Gauge(
    "shardd_shard_degraded",
    "1 while a shard of a synchronous cluster runs asynchronously (degrade mode)",
    ["shard"],
)
POOL_CONNECTIONS = Gauge("shardd_pool_connections", "Open connections per node pool", ["node"])
POOL_IN_USE = Gauge("shardd_pool_connections_in_use", "Connections in use per node", ["node"])
TOPOLOGY_EPOCH = Gauge("shardd_topology_epoch", "Epoch of the topology this instance uses")
NODE_UP = Gauge(
    "shardd_node_up", "1 when the last health check of the node passed", ["shard", "node", "role"]
)
REPLICA_LAG_BYTES = Gauge(
    "shardd_replica_lag_bytes", "Replica lag behind its primary, bytes", ["shard", "node"]
)
REPLICA_LAG_SECONDS = Gauge(
    "shardd_replica_lag_seconds", "Replica replay delay, seconds", ["shard", "node"]
)


def observe_health(topology: Topology, health: HealthSnapshot) -> None:
    TOPOLOGY_EPOCH.set(topology.epoch)
    for node in topology.nodes():
        state = health.get(node.name)
        up = bool(state and state.healthy)
        NODE_UP.labels(node.shard, node.name, node.role).set(1 if up else 0)
        if node.role == "replica" and state and state.healthy:
            if state.lag_bytes is not None:
                REPLICA_LAG_BYTES.labels(node.shard, node.name).set(state.lag_bytes)
            if state.lag_seconds is not None:
                REPLICA_LAG_SECONDS.labels(node.shard, node.name).set(state.lag_seconds)


def observe_pools(pools: NodePools) -> None:
    for node, (size, in_use) in pools.usage().items():
        POOL_CONNECTIONS.labels(node).set(size)
        POOL_IN_USE.labels(node).set(in_use)


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
