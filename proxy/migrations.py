"""Versioned schema migrations, shared by the store and the journal on both databases.

Each component (``store``, ``journal``) records its schema version in one row of
``handrail_schema`` and applies, in one transaction, the migrations above it. On
PostgreSQL an advisory lock serialises replicas that start together.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

logger = logging.getLogger(__name__)

Migrations = tuple[tuple[int, tuple[str, ...]], ...]
"""(version, statements) pairs in ascending order."""

SCHEMA_LOCK = 0x68616E6472616C
"""``pg_advisory_xact_lock`` key held by every component's migrations ("handral")."""

_CREATE = (
    "CREATE TABLE IF NOT EXISTS handrail_schema "
    "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)


def _pending(current: int, migrations: Migrations, what: str) -> Migrations:
    latest = migrations[-1][0]
    if current > latest:
        logger.warning(
            "the %s schema is version %d, newer than this proxy's %d", what, current, latest
        )
    return tuple(m for m in migrations if m[0] > current)


def migrate_sqlite(
    conn: sqlite3.Connection, component: str, migrations: Migrations, what: str
) -> None:
    """Apply pending migrations in one ``BEGIN IMMEDIATE`` transaction (autocommit conn)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE)
        rows = conn.execute(
            "SELECT version FROM handrail_schema WHERE component = ?", (component,)
        ).fetchall()
        for version, statements in _pending(int(rows[0][0]) if rows else 0, migrations, what):
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO handrail_schema (component, version) VALUES (?, ?) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (component, version),
            )
            logger.info("migrated the %s to schema version %d", what, version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


async def migrate_postgres(conn: Any, component: str, migrations: Migrations, what: str) -> None:
    """Apply pending migrations on an asyncpg connection, in one transaction, under the lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute(_CREATE)
        current = await conn.fetchval(
            "SELECT version FROM handrail_schema WHERE component = $1", component
        )
        for version, statements in _pending(int(current or 0), migrations, what):
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO handrail_schema (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                component,
                version,
            )
            logger.info("migrated the %s to schema version %d", what, version)
