"""Splitting a multi-host catalog DSN into one DSN per member (pure)."""

from __future__ import annotations

from shardd.catalog import members


def test_a_multi_host_dsn_is_one_dsn_per_member_without_target_session_attrs() -> None:
    dsn = "postgresql://u:p%40x@h1:1,h2:2/db?target_session_attrs=read-write&sslmode=disable"
    assert members(dsn) == [
        "postgresql://u:p%40x@h1:1/db?sslmode=disable",
        "postgresql://u:p%40x@h2:2/db?sslmode=disable",
    ]


def test_a_one_host_dsn_is_kept_as_it_is() -> None:
    for dsn in ("postgresql://shardd@127.0.0.1:5432/shardd", "postgres://h/db?sslmode=require"):
        assert members(dsn) == [dsn]
