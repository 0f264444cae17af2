"""Failover decisions on immutable snapshots (no Postgres)."""

from __future__ import annotations

from shardd.failover import Candidate, ShardView, choose_candidate, decide, lost_bytes, shard_view
from shardd.nodes import HealthSnapshot, NodeHealth
from shardd.topology import Node, Shard


def view(*candidates: Candidate, failures: int = 3, primary: str | None = "p") -> ShardView:
    return ShardView("s1", primary, failures, 1000, tuple(candidates))


def test_the_replica_with_the_most_wal_is_chosen() -> None:
    chosen = choose_candidate([Candidate("r1", 900), Candidate("r2", 1000), Candidate("r3", 950)])
    assert chosen is not None and chosen.name == "r2"


def test_a_lagging_replica_loses_to_a_caught_up_one() -> None:
    decision = decide(
        view(Candidate("a-lagging", 10), Candidate("b-current", 1000)), failures_needed=3
    )
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
    decision = decide(view(), failures_needed=3)
    assert decision.promote is None
    assert "no healthy replica" in decision.reason


def test_a_primary_is_replaced_only_after_enough_failed_checks() -> None:
    replica = Candidate("r1", 1000)
    assert decide(view(replica, failures=2), failures_needed=3).promote is None
    assert decide(view(replica, failures=3), failures_needed=3).promote == replica


def test_a_shard_left_without_primary_is_completed_at_once() -> None:
    replica = Candidate("r1", 1000)
    decision = decide(view(replica, failures=0, primary=None), failures_needed=3)
    assert decision.promote == replica


def test_the_view_takes_only_healthy_replicas_and_their_furthest_position() -> None:
    nodes = (
        Node("p", "s1", "primary", "h", 1, "d", "u"),
        Node("r1", "s1", "replica", "h", 2, "d", "u"),
        Node("r2", "s1", "replica", "h", 3, "d", "u"),
        Node("old", "s1", "primary", "h", 4, "d", "u", fenced=True),
    )
    health = HealthSnapshot(
        {
            "p": NodeHealth(healthy=False, failures=4, lsn=700),
            "r1": NodeHealth(healthy=True, in_recovery=True, lsn=600, received_lsn=650),
            "r2": NodeHealth(healthy=False, failures=1),
            "old": NodeHealth(healthy=True, in_recovery=False, lsn=9999),
        }
    )
    summary = shard_view(Shard("s1", 1, nodes), health)
    assert summary.primary == "p" and summary.primary_failures == 4
    assert summary.primary_position == 700
    assert summary.candidates == (Candidate("r1", 650),)


def test_lost_bytes_is_what_the_new_primary_had_not_received() -> None:
    assert lost_bytes(1000, 900) == 100
    assert lost_bytes(900, 1000) == 0
    assert lost_bytes(None, 5) is None
