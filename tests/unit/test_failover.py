"""Failover decisions on immutable snapshots (no Postgres)."""

from __future__ import annotations

from shardd.failover import (
    Candidate,
    Decision,
    ShardView,
    choose_candidate,
    decide,
    eligible,
    lost_bytes,
    shard_view,
)
from shardd.failover.patroni import (
    MemberState,
    _member_state,
    leader_of,
    rejoined,
    sync_standbys,
)
from shardd.nodes import HealthSnapshot, NodeHealth
from shardd.topology import Node, Shard

MIB = 1024 * 1024
SEEN = 100.0  # when the primary last answered (monotonic seconds)


def view(
    *candidates: Candidate, failures: int = 3, primary: str | None = "p", position: int = 1000
) -> ShardView:
    return ShardView("s1", primary, failures, position, tuple(candidates), primary_seen_at=SEEN)


def streaming(name: str, position: int | None, *, at: float = SEEN) -> Candidate:
    """A replica last seen streaming at ``at``."""
    return Candidate(name, position, streamed_at=at)


def decide_(v: ShardView, *, failures_needed: int = 3, max_lag: int = MIB) -> Decision:
    return decide(v, failures_needed=failures_needed, max_lag_bytes=max_lag, tolerance=0.5)


def test_the_replica_with_the_most_wal_is_chosen() -> None:
    chosen = choose_candidate([Candidate("r1", 900), Candidate("r2", 1000), Candidate("r3", 950)])
    assert chosen is not None and chosen.name == "r2"


def test_a_lagging_replica_loses_to_a_caught_up_one() -> None:
    decision = decide_(view(streaming("a-lagging", 10), streaming("b-current", 1000)))
    assert decision.promote is not None and decision.promote.name == "b-current"


def test_equal_positions_break_the_tie_by_name_every_time() -> None:
    for order in (
        [Candidate("r2", 500), Candidate("r1", 500)],
        [Candidate("r1", 500), Candidate("r2", 500)],
    ):
        chosen = choose_candidate(order)
        assert chosen is not None and chosen.name == "r1"


def test_a_replica_with_unknown_position_is_never_chosen() -> None:
    assert choose_candidate([Candidate("r1", None)]) is None
    chosen = choose_candidate([Candidate("r1", None), Candidate("r2", 1)])
    assert chosen is not None and chosen.name == "r2"


def test_an_already_promoted_replica_wins_so_the_shard_never_forks() -> None:
    chosen = choose_candidate([Candidate("r1", 5000), Candidate("r2", 10, promoted=True)])
    assert chosen is not None and chosen.name == "r2"


def test_no_candidate_means_no_promotion() -> None:
    decision = decide_(view())
    assert decision.promote is None and decision.blocked
    assert "no healthy replica" in decision.reason


def test_a_primary_is_replaced_only_after_enough_failed_checks() -> None:
    replica = streaming("r1", 1000)
    assert decide_(view(replica, failures=2)).promote is None
    assert not decide_(view(replica, failures=2)).blocked
    assert decide_(view(replica, failures=3)).promote == replica


def test_a_shard_left_without_primary_is_completed_at_once() -> None:
    replica = streaming("r1", 1000)
    decision = decide_(view(replica, failures=0, primary=None))
    assert decision.promote == replica


def test_async_promotion_needs_a_replica_within_max_lag_on_failover() -> None:
    behind = streaming("r1", 1000)
    decision = decide_(view(behind, position=1000 + 2 * MIB))
    assert decision.promote is None and decision.blocked
    assert "lags" in decision.reason and str(2 * MIB) in decision.reason
    assert decide_(view(behind, position=1000 + MIB)).promote == behind


def test_a_replica_that_was_not_streaming_when_the_primary_was_last_seen_never_qualifies() -> None:
    # Its byte lag looks small, but its WAL receiver had stopped long before.
    stale = streaming("r1", 1000, at=SEEN - 30)
    decision = decide_(view(stale, position=1000))
    assert decision.promote is None and decision.blocked
    assert "not streaming" in decision.reason
    never = Candidate("r2", 1000)
    assert decide_(view(never)).promote is None


def test_only_qualifying_replicas_are_eligible_and_the_best_of_them_wins() -> None:
    v = view(
        streaming("r1", 900),
        streaming("r2", 990, at=SEEN - 30),  # more WAL, but stopped streaming
        streaming("r3", 950),
        position=1000,
    )
    assert [c.name for c in eligible(v, max_lag_bytes=MIB, tolerance=0.5)] == ["r1", "r3"]
    decision = decide_(v)
    assert decision.promote is not None and decision.promote.name == "r3"


def test_an_unknown_primary_position_blocks_automatic_promotion() -> None:
    v = ShardView("s1", "p", 3, None, (streaming("r1", 1000),), primary_seen_at=SEEN)
    decision = decide_(v)
    assert decision.promote is None and "unknown" in decision.reason


def test_the_view_takes_only_healthy_replicas_and_their_furthest_position() -> None:
    nodes = (
        Node("p", "s1", "primary", "h", 1, "d", "u"),
        Node("r1", "s1", "replica", "h", 2, "d", "u"),
        Node("r2", "s1", "replica", "h", 3, "d", "u"),
        Node("old", "s1", "primary", "h", 4, "d", "u", fenced=True),
    )
    health = HealthSnapshot(
        {
            "p": NodeHealth(healthy=False, failures=4, lsn=700, last_ok_at=9.0),
            "r1": NodeHealth(
                healthy=True, in_recovery=True, lsn=600, received_lsn=650, streamed_at=9.5
            ),
            "r2": NodeHealth(healthy=False, failures=1),
            "old": NodeHealth(healthy=True, in_recovery=False, lsn=9999),
        }
    )
    summary = shard_view(Shard("s1", 1, nodes), health)
    assert summary.primary == "p" and summary.primary_failures == 4
    assert summary.primary_position == 700 and summary.primary_seen_at == 9.0
    assert summary.candidates == (Candidate("r1", 650, streamed_at=9.5),)


def test_lost_bytes_is_what_the_new_primary_had_not_received() -> None:
    assert lost_bytes(1000, 900) == 100
    assert lost_bytes(900, 1000) == 0
    assert lost_bytes(None, 5) is None


def test_the_old_primarys_zone_wins_a_tie_but_never_costs_wal() -> None:
    tied = [Candidate("r1", 1000), Candidate("r2", 1000), Candidate("r3", 990)]
    assert choose_candidate(tied).name == "r1"  # type: ignore[union-attr]
    assert choose_candidate(tied, preferred={"r2"}).name == "r2"  # type: ignore[union-attr]
    # r3 is in the zone but behind: the most WAL wins.
    assert choose_candidate(tied, preferred={"r3"}).name == "r1"  # type: ignore[union-attr]


def test_the_view_prefers_the_replicas_in_the_old_primarys_zone() -> None:
    nodes = (
        Node("p", "s1", "primary", "h", 1, "d", "u", zone="a"),
        Node("r1", "s1", "replica", "h", 2, "d", "u", zone="b"),
        Node("r2", "s1", "replica", "h", 3, "d", "u", zone="a"),
    )
    health = HealthSnapshot(
        {
            "p": NodeHealth(healthy=False, failures=4, lsn=700, last_ok_at=9.0),
            "r1": NodeHealth(healthy=True, in_recovery=True, lsn=700, streamed_at=9.5),
            "r2": NodeHealth(healthy=True, in_recovery=True, lsn=700, streamed_at=9.5),
        }
    )
    summary = shard_view(Shard("s1", 1, nodes), health)
    assert summary.preferred == {"r2"}
    decision = decide_(summary)
    assert decision.promote is not None and decision.promote.name == "r2"
    unzoned = tuple(Node(n.name, "s1", n.role, "h", n.port, "d", "u") for n in nodes)
    assert shard_view(Shard("s1", 1, unzoned), health).preferred == frozenset()


# -- shards whose primary Patroni chooses (shardd/failover/patroni.py) -------------------


def patroni_node(name: str, *, role: str = "replica", fenced: bool = False) -> Node:
    return Node(
        name,
        "s1",
        role,
        "127.0.0.1",
        5432,
        "shardd",
        "shardd",
        fenced=fenced,
        patroni_url=f"http://127.0.0.1:8{len(name)}",
    )


def test_patroni_leadership_is_the_leader_key_not_the_role() -> None:
    primary = {"state": "running", "role": "master", "timeline": 3}
    assert _member_state(primary, holds_lock=True).role == "leader"
    assert _member_state({**primary, "role": "primary"}, holds_lock=True).role == "leader"
    # Out of recovery without the key (paused, promoted by hand, losing its key): no leader.
    assert _member_state(primary, holds_lock=False).role == "master"
    assert _member_state({"state": "starting", "role": "replica"}, holds_lock=False) == (
        MemberState("replica", False)
    )
    assert _member_state({}, holds_lock=True) == MemberState("unknown", False)


def test_synchronous_standbys_are_the_replicas_the_dcs_names() -> None:
    shard = Shard("s1", 1, (patroni_node("a"), patroni_node("b"), patroni_node("c")))
    states = {
        "a": _member_state({"state": "running", "role": "master"}, holds_lock=True),
        "b": _member_state(
            {"state": "running", "role": "replica", "sync_standby": True}, holds_lock=False
        ),
        "c": _member_state({"state": "running", "role": "replica"}, holds_lock=False),
    }
    assert sync_standbys(shard, states) == 1
    assert sync_standbys(shard, {**states, "b": MemberState("replica", False, True)}) == 0
    assert sync_standbys(shard, {"a": states["a"]}) == 0


def test_the_leader_is_followed_only_when_exactly_one_running_member_claims_it() -> None:
    lead, rep = MemberState("leader", True), MemberState("replica", True)
    assert leader_of({"a": lead, "b": rep}) == "a"
    assert leader_of({"a": rep, "b": rep}) is None  # an election in progress
    assert leader_of({"a": lead, "b": lead}) is None  # a transition: wait until one remains
    assert leader_of({"a": MemberState("leader", False), "b": rep}) is None  # not running
    assert leader_of({}) is None


def test_fenced_nodes_patroni_runs_as_replicas_are_rejoin_candidates() -> None:
    shard = Shard(
        "s1",
        1,
        (
            patroni_node("old", role="primary", fenced=True),
            patroni_node("new", role="primary"),
            patroni_node("gone", fenced=True),
            patroni_node("r1"),
        ),
        failover_mode="patroni",
    )
    states = {
        "old": MemberState("replica", True),
        "new": MemberState("leader", True),
        "gone": MemberState("replica", False),  # not running yet
        "r1": MemberState("replica", True),  # not fenced: nothing to record
    }
    assert rejoined(shard, states) == ["old"]
    assert rejoined(shard, {**states, "old": MemberState("leader", True)}) == []
