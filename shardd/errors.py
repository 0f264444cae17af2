"""Every error shardd reports, and the one table that maps Postgres errors to them.

An :class:`ApiError` carries the HTTP status, a stable machine-readable ``code`` and a
message; the API renders all of them in one shape::

    {"error": {"code": "...", "message": "...", "request_id": "..."}}

Some errors never reach a client: :class:`StaleMap` means "refresh the slot map and
retry", raised when a shard refuses a slot it does not own (SQLSTATE ``SD001``), a
fenced former primary refuses a write (``SD002``), or a node refuses a write because it
is a replica (``25006``).
"""

from __future__ import annotations

import asyncio

import asyncpg


class ApiError(Exception):
    status = 500
    code = "internal"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="shardd"'})


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PreconditionFailed(ApiError):
    status = 412
    code = "precondition_failed"

    def __init__(self, message: str, *, current_version: int | None) -> None:
        super().__init__(message)
        self.current_version = current_version


class PayloadTooLarge(ApiError):
    status = 413
    code = "body_too_large"


class ShardUnavailable(ApiError):
    """Nothing was written: the shard could not be reached (or has no primary)."""

    status = 503

    def __init__(self, shard: str, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(
            f"shard {shard} is unavailable: {detail}",
            code=f"shard_unavailable:{shard}",
            headers={"Retry-After": str(retry_after)},
        )
        self.shard = shard


class NotReady(ApiError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class OutcomeUnknown(ApiError):
    """The write was sent but its commit was not confirmed: it may or may not have happened."""

    status = 504
    code = "outcome_unknown"


class Timeout(ApiError):
    status = 504
    code = "timeout"


class StaleMap(Exception):
    """The node refused the operation for its slot or role: refresh topology and retry."""


# SQLSTATE -> how to treat it.  Connection-level failures are handled by the callers,
# which know whether a write was in flight (ambiguous) or not.
STALE_SQLSTATES = frozenset({"SD001", "SD002", "25006"})
PRECONDITION_SQLSTATE = "SD412"
CONNECT_ERRORS = (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)
LOST_CONNECTION_ERRORS = (
    ConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection left mid-protocol by a dead server
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncio.IncompleteReadError,
)


def from_postgres(exc: asyncpg.PostgresError) -> Exception:
    """Translate a server-side error from a shard into what shardd does about it."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in STALE_SQLSTATES:
        return StaleMap(str(exc))
    if sqlstate == PRECONDITION_SQLSTATE:
        detail = getattr(exc, "detail", None)
        current = int(detail) if detail and detail.isdigit() and detail != "0" else None
        return PreconditionFailed(str(exc), current_version=current)
    return ApiError(f"shard error {sqlstate}: {exc}")
