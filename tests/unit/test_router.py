"""Read routing and session tokens, decided on immutable snapshots."""

from __future__ import annotations

import pytest

from shardd.errors import BadRequest
from shardd.nodes import HealthSnapshot, NodeHealth
from shardd.router import SessionToken, read_candidates, resolve_consistency
from shardd.topology import Node, Shard


def node(name: str, role: str, *, fenced: bool = False) -> Node:
    return Node(name, "s1", role, "127.0.0.1", 1, "db", "u", fenced=fenced)


PRIMARY = node("p", "primary")
R1 = node("r1", "replica")
R2 = node("r2", "replica")
SHARD = Shard("s1", 1, (PRIMARY, R1, R2))


def health(**replicas: NodeHealth) -> HealthSnapshot:
    return HealthSnapshot({"p": NodeHealth(True, False, 1000, 0), **replicas})


def up(lsn: int, lag: int | None) -> NodeHealth:
    return NodeHealth(True, True, lsn, lag)


def candidates(
    snapshot: HealthSnapshot, consistency: str, min_lsn: int | None = None
) -> tuple[str, ...]:
    chosen = read_candidates(
        SHARD,
        snapshot,
        consistency=consistency,
        min_lsn=min_lsn,
        max_lag_bytes=100,
        max_lag_seconds=5.0,
    )
    return tuple(n.name for n in chosen)


def test_strong_reads_only_the_primary() -> None:
    assert candidates(health(r1=up(1000, 0), r2=up(1000, 0)), "strong") == ("p",)


def test_eventual_spreads_over_healthy_replicas_then_primary() -> None:
    snapshot = health(r1=up(1000, 0), r2=up(990, 10))
    firsts = {candidates(snapshot, "eventual")[0] for _ in range(4)}
    assert firsts == {"r1", "r2"}
    assert all(candidates(snapshot, "eventual")[-1] == "p" for _ in range(3))


def test_lagging_or_dead_replicas_drop_out() -> None:
    snapshot = health(r1=up(500, 500), r2=NodeHealth(False, error="refused"))
    assert candidates(snapshot, "eventual") == ("p",)


def test_replicas_behind_in_seconds_drop_out_of_eventual_reads() -> None:
    late = NodeHealth(True, True, 1000, 0, lag_seconds=30.0)
    assert candidates(health(r1=late, r2=up(1000, 0)), "eventual") == ("r2", "p")


def test_a_replica_that_is_really_a_primary_is_not_used_for_reads() -> None:
    snapshot = health(r1=NodeHealth(True, False, 1000, 0), r2=up(1000, 0))
    assert candidates(snapshot, "eventual") == ("r2", "p")


def test_unknown_lag_still_serves_eventual_reads() -> None:
    snapshot = HealthSnapshot({"p": NodeHealth(False), "r1": up(900, None)})
    assert candidates(snapshot, "eventual") == ("r1", "p")


def test_session_reads_prefer_replicas_that_replayed_the_token() -> None:
    snapshot = health(r1=up(1000, 0), r2=up(900, 100))
    assert candidates(snapshot, "session", min_lsn=950) == ("r1", "p")
    assert candidates(snapshot, "session", min_lsn=2000) == ("p",)


def test_fenced_nodes_are_never_candidates() -> None:
    shard = Shard("s1", 1, (node("p", "primary", fenced=True), R1))
    chosen = read_candidates(
        shard,
        health(r1=up(1000, 0)),
        consistency="strong",
        min_lsn=None,
        max_lag_bytes=100,
        max_lag_seconds=5.0,
    )
    assert chosen == ()


def test_consistency_defaults_and_validation() -> None:
    token = SessionToken({"s1": 5})
    assert resolve_consistency(None, None) == "eventual"
    assert resolve_consistency(None, token) == "session"
    assert resolve_consistency("strong", token) == "strong"
    with pytest.raises(BadRequest):
        resolve_consistency("linearizable", None)


def test_session_token_round_trip_and_merge() -> None:
    token = SessionToken.parse("s2:10,s1:7,s2:12")
    assert dict(token.positions) == {"s1": 7, "s2": 12}
    assert str(token.merged("s1", 9).merged("s3", 1)) == "s1:9,s2:12,s3:1"
    assert str(token.merged("s1", 3)) == "s1:7,s2:12"
    for bad in ("", "s1", "s1:", ":5", "s1:-1", "s1:x", "s1:" + "9" * 30):
        with pytest.raises(BadRequest):
            SessionToken.parse(bad)
    with pytest.raises(BadRequest) as refused:
        SessionToken.parse("T", what="wait_for")
    assert refused.value.message.startswith("wait_for must")


def test_session_token_union_takes_every_shard_at_its_later_position() -> None:
    union = SessionToken.parse("s1:7,s2:12").union(SessionToken.parse("s2:20,s3:1,s1:2"))
    assert str(union) == "s1:7,s2:20,s3:1"


def test_reads_prefer_replicas_in_the_instances_zone() -> None:
    zoned = Shard(
        "s1",
        1,
        (
            Node("p", "s1", "primary", "h", 1, "db", "u", zone="a"),
            Node("r1", "s1", "replica", "h", 2, "db", "u", zone="b"),
            Node("r2", "s1", "replica", "h", 3, "db", "u", zone="a"),
            Node("r3", "s1", "replica", "h", 4, "db", "u", zone="a"),
        ),
    )
    snapshot = health(r1=up(1000, 0), r2=up(1000, 0), r3=up(1000, 0))

    def order(consistency: str, zone: str, *, spread: bool = False) -> tuple[str, ...]:
        chosen = read_candidates(
            zoned,
            snapshot,
            consistency=consistency,
            min_lsn=1000 if consistency == "session" else None,
            max_lag_bytes=100,
            max_lag_seconds=5.0,
            spread=spread,
            zone=zone,
        )
        return tuple(n.name for n in chosen)

    for consistency in ("eventual", "session"):
        seen = [order(consistency, "a") for _ in range(4)]
        firsts = [s[0] for s in seen]
        assert sorted(firsts) == ["r2", "r2", "r3", "r3"]  # even turns within the zone
        assert all(s[2:] == ("r1", "p") for s in seen)  # then other zones, then the primary
    assert {order("eventual", "b")[0] for _ in range(4)} == {"r1"}
    assert {order("eventual", "")[0] for _ in range(6)} == {"r1", "r2", "r3"}
    assert order("strong", "a") == ("p",)
    # A hot key's eventual reads spread over every node, whatever the zone; its session
    # reads do not spread, and keep to the zone.
    assert {order("eventual", "a", spread=True)[0] for _ in range(8)} == {"p", "r1", "r2", "r3"}
    assert {order("session", "a", spread=True)[0] for _ in range(8)} == {"r2", "r3"}
