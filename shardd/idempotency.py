"""Idempotency keys: a write may carry ``Idempotency-Key`` so that a retry of it (after a
504 ``outcome_unknown``, a dropped connection, a dead instance) has exactly one effect.

What the shards keep (shard migration 0012) is items of internal tables
``~idem:<window>:<bucket>`` (time buckets as wide as ``idempotency_retention``; a lookup
reads the current one and the one before, and the trim drops whole buckets):

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
import math
import re
from dataclasses import dataclass

import asyncpg
import orjson

from . import errors

TABLES = "~idem:"  # the prefix of the buckets' tables; user table names cannot start with "~"
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # visible ASCII, as Stripe's keys and UUIDs are
_KEY = re.compile(KEY_PATTERN)


@dataclass(frozen=True)
class Once:
    """One request's idempotency key, as the shards store it."""

    caller: str  # digest of the bearer token (without tokens: one for everybody)
    key: str
    digest: str  # of the request: what it writes, where, under which condition
    window: int  # seconds: the width of the records' time buckets (the retention)

    @property
    def claim(self) -> str:
        """The claim's pk (and the name of the in-flight lock)."""
        return f"{self.caller}:{self.key}"

    def record(self, index: int) -> str:
        """The sk of the record of the request's op ``index`` (0 for a single write)."""
        return f"{self.caller}:{index}:{self.key}"


def caller_of(authorization: str | None) -> str:
    """Whose keys: a digest of the bearer token as authentication reads it."""
    token = (authorization or "").removeprefix("Bearer ").strip()
    return hashlib.sha256(b"shardd idempotency caller\0" + token.encode()).hexdigest()[:32]


def parse(
    header: str | None,
    *,
    authorization: str | None,
    request: tuple[object, ...],
    window: float,
) -> Once | None:
    """The request's key (None: it carries none); 400 for a malformed one.  ``request``:
    what makes two requests the same one, parsed (operation, table, keys, condition, the
    body as canonical JSON), so a retry that spells it differently is still the same."""
    if header is None:
        return None
    if not _KEY.fullmatch(header):
        raise errors.BadRequest(
            f"{HEADER} is 1 to 255 visible ASCII characters", code="invalid_idempotency_key"
        )
    digest = hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return Once(caller_of(authorization), header, digest, max(1, math.ceil(window)))


async def claim(conn: asyncpg.Connection, *, slot: int, once: Once) -> None:
    """Claim the key for this request's digest on the shard owning ``once.claim``'s slot
    (``slot``); SD422 when another request claimed it."""
    await conn.execute(
        "SELECT shardd_once_claim($1, $2, $3, $4)", slot, once.claim, once.digest, once.window
    )


async def trim(conn: asyncpg.Connection, *, keep_seconds: float, batch: int = 5_000) -> int:
    """Drop the buckets of claims and records older than ``keep_seconds``, a batch per
    transaction (never waiting for a standby: a trim lost in a failover is done again);
    returns how many rows went."""
    removed = 0
    while True:
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = local")
            n = await conn.fetchval("SELECT shardd_trim_once($1, $2)", keep_seconds, batch)
        removed += n
        if n == 0:
            return removed
