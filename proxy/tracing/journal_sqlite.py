"""The journal on SQLite: a file of its own beside the store's, ``handrail.db`` ->
``handrail-journal.db`` (``journal_path``), on an aiosqlite connection (WAL).

Its own file, so that a batch insert (one write transaction every ``FLUSH_S``) never holds
the write lock the store's statements on the event loop need: a database file has one.
``handrail calls`` and the admin ``/calls`` read the same file, by the same derivation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.migrations import Migrations, migrate_sqlite
from proxy.tracing.base import (
    COMPONENT,
    INSERT_COLUMNS,
    META_TABLE,
    TABLE,
    Row,
    Where,
    padded,
    row_dict,
)

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000

MIGRATIONS: Migrations = (
    (
        1,
        (
            f"""CREATE TABLE {TABLE} (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                time REAL NOT NULL,
                tool TEXT NOT NULL,
                kind TEXT NOT NULL,
                agent TEXT NOT NULL,
                run_id TEXT NOT NULL,
                trace_id TEXT NOT NULL,
                span_id TEXT NOT NULL,
                method TEXT NOT NULL,
                path TEXT NOT NULL,
                query TEXT,
                call_name TEXT,
                decision TEXT,
                reasons TEXT,
                decision_id TEXT,
                idempotency_key TEXT,
                fingerprint TEXT,
                replayed INTEGER NOT NULL,
                status INTEGER,
                error_code TEXT,
                total_ms REAL NOT NULL,
                policy_ms REAL NOT NULL,
                upstream_ms REAL NOT NULL,
                input TEXT,
                output TEXT
            )""",
            f"CREATE INDEX {TABLE}_run ON {TABLE} (run_id, id)",
            f"CREATE INDEX {TABLE}_tool ON {TABLE} (tool, id)",
            f"CREATE INDEX {TABLE}_time ON {TABLE} (time)",
        ),
    ),
    (
        2,
        (  # each row's spool uid, so that recovery may insert a row again; older rows: NULL
            f"ALTER TABLE {TABLE} ADD COLUMN uid TEXT",
            f"CREATE UNIQUE INDEX {TABLE}_uid ON {TABLE} (uid)",
            f"CREATE TABLE {META_TABLE} (id TEXT NOT NULL)",
            f"INSERT INTO {META_TABLE} (id) VALUES (lower(hex(randomblob(16))))",
        ),
    ),
    (3, (f"ALTER TABLE {TABLE} ADD COLUMN approval_id TEXT",)),  # the approval a call waited on
)

_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)}) ON CONFLICT (uid) DO NOTHING"
)
_REFUSED = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError)


def journal_path(store_path: Path | str) -> Path | str:
    """The journal's file beside the store's: ``dir/handrail.db`` -> ``dir/handrail-journal.db``.

    Without a suffix, ``handrail`` -> ``handrail-journal.db`` (``handrail-journal`` would be
    SQLite's own rollback journal of ``handrail``). An in-memory store gets an in-memory journal.
    """
    if store_path == ":memory:":
        return store_path
    path = Path(store_path)
    return path.with_name(f"{path.stem}-journal{path.suffix or '.db'}")


class SqliteJournalDb:
    """The journal's table in its own file, derived from the store's path (``journal_path``)."""

    def __init__(self, store_path: Path | str) -> None:
        self.path = str(journal_path(store_path))
        self._conn: aiosqlite.Connection | None = None

    async def open(self, *, create: bool) -> bool:
        memory = self.path == ":memory:" or self.path.startswith("file:")
        if not create and not memory and not await asyncio.to_thread(Path(self.path).exists):
            return False
        if create and not memory:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if create:
                await _enable_wal(conn)
                await conn.execute("PRAGMA synchronous = NORMAL")
                if memory:  # a private database: nothing to version or race with
                    for _, statements in MIGRATIONS:
                        for statement in statements:
                            await conn.execute(statement)
                else:
                    await asyncio.to_thread(_migrate_file, self.path)
                present = True
            else:
                rows = await conn.execute_fetchall(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
                )
                present = bool(list(rows))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return present

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the journal is not open")
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def identity(self) -> str:
        rows = list(await self._connection().execute_fetchall(f"SELECT id FROM {META_TABLE}"))
        return str(rows[0][0])

    async def insert(self, rows: Sequence[Row]) -> None:
        conn = self._connection()
        if conn.in_transaction:  # a failed batch's, which SQLite may keep open
            await conn.execute("ROLLBACK")
        await conn.execute("BEGIN")
        try:
            await conn.executemany(_INSERT, [padded(r) for r in rows])
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise

    def refuses(self, exc: BaseException) -> bool:
        """A constraint or a value SQLite cannot bind; "database is locked" and I/O errors pass."""
        if isinstance(exc, sqlite3.ProgrammingError):
            return "binding" in str(exc)
        return isinstance(exc, _REFUSED)

    async def select(self, where: Where) -> list[dict[str, Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("run_id", where.run_id),
            ("tool", where.tool),
            ("decision", where.decision),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where.since is not None:
            clauses.append("time >= ?")
            params.append(where.since)
        sql = f"SELECT * FROM {TABLE}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(where.limit)
        rows = await self._connection().execute_fetchall(sql, params)
        return [row_dict(row) for row in rows]

    async def purge(self, older_than: float, max_rows: int) -> int:
        conn = self._connection()
        removed = 0
        cursor = await conn.execute(f"DELETE FROM {TABLE} WHERE time < ?", (older_than,))
        removed += max(cursor.rowcount, 0)
        cursor = await conn.execute(
            f"DELETE FROM {TABLE} WHERE id <= "
            f"(SELECT id FROM {TABLE} ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (max_rows,),
        )
        removed += max(cursor.rowcount, 0)
        return removed


async def _enable_wal(conn: aiosqlite.Connection) -> None:
    """Switch to WAL; SQLite refuses a concurrent switch at once, so retry for a while."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


def _migrate_file(path: str) -> None:
    """Migrations on a connection of their own: the shared code is synchronous."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        migrate_sqlite(conn, COMPONENT, MIGRATIONS, "SQLite journal")
    finally:
        conn.close()
