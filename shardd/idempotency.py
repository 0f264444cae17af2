"""Idempotency keys: a write may carry ``Idempotency-Key`` so that a retry of it (after a
504 ``outcome_unknown``, a dropped connection, a dead instance) has exactly one effect.

What the shards keep (shard migration 0012) is items of the internal table ``~idem``:

- a **claim** per key and caller, pk ``<caller>:<key>`` (placed by that pk like any
  item): the digest of the first request that used the key.  A later request with the
  same key and another digest is refused with 422 ``idempotency_key_reused``, whatever
  items it names.  The claim is its own transaction, before the write: a claim whose
  write never happened only means the retry performs it.
- a **record** per op, in the written item's slot and in the write's own transaction:
  pk the item's pk, sk ``<caller>:<op index>:<key>``, holding the op's outcome.  A retry
  finds it and returns the outcome (``Idempotent-Replayed: true``) instead of writing.
  Because the record is an item of the same slot, it is replicated with the write,
  moves with the slot, and survives a failover exactly as the write does.

While a request with a key is applied on a shard, its transaction holds an advisory
lock on the key: a duplicate arriving meanwhile gets 409 ``idempotency_in_flight`` (and
retries), never a second effect.  The caller is a digest of the bearer token, so two
callers' keys never meet.  Claims and records are dropped after
``idempotency_retention`` seconds by the monitor (:func:`trim`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import asyncpg

from . import errors

TABLE = "~idem"  # user table names cannot start with "~"
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # visible ASCII, as Stripe's keys and UUIDs are
_KEY = re.compile(KEY_PATTERN)


@dataclass(frozen=True)
class Once:
    """One request's idempotency key, as the shards store it."""

    caller: str  # digest of the bearer token ("" without tokens)
    key: str
    digest: str  # of the request: method, path, conditions and body

    @property
    def claim(self) -> str:
        """The claim's pk (and the name of the in-flight lock)."""
        return f"{self.caller}:{self.key}"

    def record(self, index: int) -> str:
        """The sk of the record of the request's op ``index`` (0 for a single write)."""
        return f"{self.caller}:{index}:{self.key}"


def parse(
    header: str | None,
    *,
    authorization: str | None,
    method: str,
    path: str,
    conditions: tuple[str | None, ...],
    body: bytes,
) -> Once | None:
    """The request's key (None: it carries none); 400 for a malformed one."""
    if header is None:
        return None
    if not _KEY.match(header):
        raise errors.BadRequest(
            f"{HEADER} is 1 to 255 visible ASCII characters", code="invalid_idempotency_key"
        )
    caller = hashlib.sha256((authorization or "").encode()).hexdigest()[:32]
    digest = hashlib.sha256()
    for part in (method, path, *(c or "" for c in conditions)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(body)
    return Once(caller, header, digest.hexdigest())


async def claim(conn: asyncpg.Connection, *, slot: int, once: Once) -> None:
    """Claim the key for this request's digest on the shard owning ``once.claim``'s slot
    (``slot``); SD422 when another request claimed it."""
    await conn.execute("SELECT shardd_once_claim($1, $2, $3)", slot, once.claim, once.digest)


async def trim(conn: asyncpg.Connection, *, keep_seconds: float, batch: int = 10_000) -> int:
    """Drop claims and records older than ``keep_seconds`` of the slots ``conn``'s node
    owns; returns how many."""
    removed = 0
    while True:
        n = await conn.fetchval(
            "SELECT shardd_trim_once(now() - make_interval(secs => $1), $2)", keep_seconds, batch
        )
        removed += n
        if n < batch:
            return removed
