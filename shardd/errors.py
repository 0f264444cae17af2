"""Every error shardd reports, and the one table that maps Postgres errors to them.

An :class:`ApiError` carries the HTTP status, a stable machine-readable ``code`` and a
message; the API renders all of them in one shape::

    {"error": {"code": "...", "message": "...", "request_id": "..."}}

Some errors never reach a client: :class:`StaleMap` means "refresh the slot map and
retry", raised when a shard refuses a slot it does not own (SQLSTATE ``SD001``), a
fenced former primary refuses a write (``SD002``), or a node refuses a write because it
is a replica (``25006``).

:func:`from_postgres` is the one table from SQLSTATE to what shardd does about it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)


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


class TableDeleting(ApiError):
    """The table is being deleted: it answers nothing until the deletion completes."""

    status = 409
    code = "table_deleting"


class ConflictRetry(ApiError):
    """Postgres aborted the transaction (deadlock, serialization or recovery conflict):
    nothing was written, and the same request may simply be sent again."""

    status = 503
    code = "conflict_retry"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


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


class WritesRefused(ApiError):
    """Nothing was written: the monitor refuses the shard's writes for ``reason``
    (``no_failover_candidate``: its primary is down and no replica may be promoted
    without losing data; ``no_sync_standby``: strict synchronous mode without a
    standby)."""

    status = 503

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(
            f"shard {shard} refuses writes: {reason.replace('_', ' ')}",
            code=reason,
            headers={"Retry-After": "5"},
        )
        self.shard = shard


class NotReady(ApiError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class CatalogUnavailable(ApiError):
    """The catalog did not answer in time; nothing was written."""

    status = 503
    code = "catalog_unavailable"

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


class NodeFenced(StaleMap):
    """The node is fenced (a failover or switchover is replacing it): it refuses every
    write until the catalog names its replacement."""


class NotCaughtUp(Exception):
    """The node (a replica) has not replayed what the read needs yet: the caller's session
    position, or the cutover that gave it the slots.  Read on another node."""


# Transaction-level conflicts: the transaction was rolled back, so a read may run again
# and a write wrote nothing.  40P01 deadlock; 40001 serialization failure, which is also
# how a replica cancels a query that conflicts with the WAL it replays.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
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


def _message(exc: asyncpg.PostgresError) -> str:
    """The server's primary message only: DETAIL, HINT, SQL text and host names stay in
    the log, never in a response."""
    message = getattr(exc, "message", None)
    return str(message).splitlines()[0] if message else type(exc).__name__


def _precondition_failed(exc: asyncpg.PostgresError) -> Exception:
    detail = getattr(exc, "detail", None)
    current = int(detail) if detail and detail.isdigit() and detail != "0" else None
    return PreconditionFailed(_message(exc), current_version=current)


# SQLSTATE -> how to treat it.  Connection-level failures are handled by the callers,
# which know whether a write was in flight (ambiguous) or not.
_BY_SQLSTATE: dict[str, Callable[[asyncpg.PostgresError], Exception]] = {
    "SD001": lambda exc: StaleMap(_message(exc)),  # the shard does not own the slot
    "SD002": lambda exc: NodeFenced(_message(exc)),  # a fenced (former) primary
    "25006": lambda exc: StaleMap(_message(exc)),  # a replica (read-only transaction)
    "SD412": _precondition_failed,
    "SD413": lambda exc: PayloadTooLarge(_message(exc), code="item_too_large"),
    "SD410": lambda exc: TableDeleting(_message(exc)),
    # Idempotency keys (shardd/idempotency.py): nothing was applied by this request.
    "SD409": lambda exc: ApiError(
        _message(exc), status=409, code="idempotency_in_flight", headers={"Retry-After": "1"}
    ),
    "SD422": lambda exc: ApiError(_message(exc), status=422, code="idempotency_key_reused"),
    # A view apply past its maintainer's lease (shardd/views/keeper.py): nothing applied.
    "SD020": lambda exc: ApiError(_message(exc), status=503, code="view_lease_expired"),
    # Server-side timeouts of shardd's sessions: the statement was rolled back.
    "57014": lambda exc: Timeout(
        f"the shard cancelled the statement; nothing was applied: {_message(exc)}"
    ),
    "55P03": lambda exc: ApiError(
        f"a lock on the shard was not granted in time; nothing was applied: {_message(exc)}",
        status=503,
        code="lock_timeout",
        headers={"Retry-After": "1"},
    ),
    **dict.fromkeys(TRANSIENT_SQLSTATES, lambda exc: ConflictRetry(f"retry: {_message(exc)}")),
}


def is_transient(exc: BaseException) -> bool:
    """A conflict that rolled the transaction back: running it again may succeed."""
    return getattr(exc, "sqlstate", None) in TRANSIENT_SQLSTATES


def from_postgres(exc: asyncpg.PostgresError) -> Exception:
    """Translate a server-side error from a shard into what shardd does about it."""
    sqlstate = getattr(exc, "sqlstate", None)
    translate = _BY_SQLSTATE.get(sqlstate or "")
    if translate is not None:
        return translate(exc)
    log.error("shard error %s: %s", sqlstate, exc)
    return ApiError(f"the shard failed the request (SQLSTATE {sqlstate})")
