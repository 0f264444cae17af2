"""Versioned SQL migrations for the catalog and for every shard primary.

Files live in ``migrations/<kind>/NNNN_name.sql``.  Each is applied once, in its own
transaction, under an advisory lock, and recorded in ``shardd_migrations``; running
again applies only what is new, so ``shardctl migrate`` is idempotent and safe to run
from several places at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from . import fencing

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
KINDS = ("catalog", "shard")
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available(kind: str) -> tuple[Migration, ...]:
    if kind not in KINDS:
        raise ValueError(f"unknown migration kind {kind!r}")
    found = []
    for path in sorted((MIGRATIONS_DIR / kind).iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text()))
    return tuple(found)


async def apply(conn: asyncpg.Connection, kind: str) -> list[int]:
    """Apply pending migrations of ``kind``; returns the versions applied now."""
    applied_now = []
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS shardd_migrations (
               kind text NOT NULL, version integer NOT NULL, name text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (kind, version))"""
    )
    for migration in available(kind):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", fencing.MIGRATION_LOCK)
            done = await conn.fetchval(
                "SELECT true FROM shardd_migrations WHERE kind = $1 AND version = $2",
                kind,
                migration.version,
            )
            if done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO shardd_migrations (kind, version, name) VALUES ($1, $2, $3)",
                kind,
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    return applied_now
