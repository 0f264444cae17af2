"""The SQLSTATE table: what each Postgres error becomes for a client."""

from __future__ import annotations

import asyncpg
import pytest

from shardd import errors


@pytest.mark.parametrize(
    "exc", [asyncpg.DeadlockDetectedError("deadlock"), asyncpg.SerializationError("conflict")]
)
def test_transaction_conflicts_are_a_retryable_503(exc: asyncpg.PostgresError) -> None:
    translated = errors.from_postgres(exc)
    assert isinstance(translated, errors.ApiError)
    assert (translated.status, translated.code) == (503, "conflict_retry")
    assert translated.headers["Retry-After"] == "1"
    assert errors.is_transient(exc)


def test_stale_and_shardd_sqlstates() -> None:
    def raised(sqlstate: str) -> Exception:
        exc = asyncpg.PostgresError(f"state {sqlstate}")
        exc.sqlstate = sqlstate  # type: ignore[attr-defined]
        return errors.from_postgres(exc)

    assert isinstance(raised("SD001"), errors.StaleMap)
    too_large = raised("SD413")
    assert isinstance(too_large, errors.ApiError)
    assert (too_large.status, too_large.code) == (413, "item_too_large")
    deleting = raised("SD410")
    assert isinstance(deleting, errors.ApiError)
    assert (deleting.status, deleting.code) == (409, "table_deleting")
    unknown = raised("XX000")
    assert isinstance(unknown, errors.ApiError) and unknown.status == 500
    assert not errors.is_transient(asyncpg.UniqueViolationError("dup"))
