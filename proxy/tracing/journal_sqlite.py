"""The journal on SQLite: a file of its own beside the store's, ``handrail.db`` ->
``handrail-journal.db`` (``journal_path``), on an aiosqlite connection (WAL).

Its own file, so that a batch insert (one write transaction every ``FLUSH_S``) never holds
the write lock the store's statements on the event loop need: a database file has one.
``handrail calls`` and the admin ``/calls`` read the same file, by the same derivation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from proxy.tracing.chain import (
    CHAIN_COLUMNS,
    CHAIN_TABLE,
    GENESIS,
    ChainWalk,
    Head,
    VerifyReport,
    entries_from,
    link,
    new_chain_id,
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
    (
        4,
        (  # the call's outcome and result check; the hash chain (older rows: NULL, unchained)
            f"ALTER TABLE {TABLE} ADD COLUMN outcome TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN result_check TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN result_reasons TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN chain TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN seq INTEGER",
            f"ALTER TABLE {TABLE} ADD COLUMN prev_hash TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN hash TEXT",
            f"CREATE UNIQUE INDEX {TABLE}_chain_seq ON {TABLE} (chain, seq)",
            f"""CREATE TABLE {CHAIN_TABLE} (
                chain TEXT PRIMARY KEY,
                started REAL NOT NULL,
                updated REAL NOT NULL,
                head_seq INTEGER NOT NULL,
                head_hash TEXT NOT NULL,
                anchor_seq INTEGER NOT NULL,
                anchor_hash TEXT NOT NULL
            )""",
        ),
    ),
    (
        5,
        (  # what replay needs: the policy input as decided; the shadow policy's decision
            f"ALTER TABLE {TABLE} ADD COLUMN policy_input TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN shadow TEXT",
        ),
    ),
)

_STORED = (*INSERT_COLUMNS, *CHAIN_COLUMNS)
_INSERT = f"INSERT INTO {TABLE} ({', '.join(_STORED)}) VALUES ({', '.join('?' for _ in _STORED)})"
_EXISTING = f"SELECT uid FROM {TABLE} WHERE uid IN (SELECT value FROM json_each(?))"
_HEAD = f"SELECT head_seq, head_hash FROM {CHAIN_TABLE} WHERE chain = ?"
_REGISTER = (
    f"INSERT INTO {CHAIN_TABLE} "
    "(chain, started, updated, head_seq, head_hash, anchor_seq, anchor_hash) "
    "VALUES (?, ?, ?, 0, ?, 0, ?)"
)
_MOVE_HEAD = (
    f"UPDATE {CHAIN_TABLE} SET head_seq = ?, head_hash = ?, updated = ? "
    "WHERE chain = ? AND head_seq = ?"
)
_CHAINED = (
    f"SELECT id, {', '.join(_STORED)} FROM {TABLE} WHERE chain IS NOT NULL ORDER BY chain, seq"
)
_LAST = f"SELECT seq, hash FROM {TABLE} WHERE chain = ? ORDER BY seq DESC LIMIT 1"
_LAST_BEFORE = (
    f"SELECT seq, hash FROM {TABLE} WHERE chain = ? AND seq < ? ORDER BY seq DESC LIMIT 1"
)
VERIFY_CHUNK = 500
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
        self.chain = new_chain_id()
        """This writer's hash chain."""
        self._conn: aiosqlite.Connection | None = None
        self._head: Head | None = None
        """The chain's head after this writer's last commit; None: read it in the next."""
        self._lock = asyncio.Lock()
        """One transaction at a time on the connection: the writer's and retention's."""

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
        """One ``BEGIN IMMEDIATE`` transaction: skip uids already there, link the rest onto
        the chain's head (compare-and-set), insert them."""
        async with self._lock:
            conn = self._connection()
            if conn.in_transaction:  # a failed batch's, which SQLite may keep open
                await conn.execute("ROLLBACK")
            await conn.execute("BEGIN IMMEDIATE")
            try:
                head = await self._insert_new(conn, [padded(r) for r in rows])
                await conn.execute("COMMIT")
            except BaseException:
                self._head = None
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise
            if head is not None:
                self._head = head

    async def _insert_new(self, conn: aiosqlite.Connection, rows: list[Row]) -> Head | None:
        uids = [row[0] for row in rows]
        there = {r[0] for r in await conn.execute_fetchall(_EXISTING, (json.dumps(uids),))}
        new = _unseen(rows, there)
        if not new:
            return None
        head = self._head or await self._read_head(conn)
        linked, after = link(self.chain, head, new)
        if not await self._move_head(conn, head, after):  # pruned away meanwhile: read it
            head = await self._read_head(conn)
            linked, after = link(self.chain, head, new)
            if not await self._move_head(conn, head, after):
                raise RuntimeError(f"the journal's chain {self.chain} moved under its writer")
        await conn.executemany(_INSERT, linked)
        return after

    async def _read_head(self, conn: aiosqlite.Connection) -> Head:
        rows = list(await conn.execute_fetchall(_HEAD, (self.chain,)))
        if rows:
            return Head(int(rows[0][0]), str(rows[0][1]))
        now = time.time()
        await conn.execute(_REGISTER, (self.chain, now, now, GENESIS, GENESIS))
        return Head()

    async def _move_head(self, conn: aiosqlite.Connection, head: Head, after: Head) -> bool:
        cursor = await conn.execute(
            _MOVE_HEAD, (after.seq, after.hash, time.time(), self.chain, head.seq)
        )
        return cursor.rowcount == 1

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
        """In one transaction: rows from before the chain by age and count, then each
        chain's longest prefix past either limit, its last row becoming the chain's anchor."""
        async with self._lock:
            conn = self._connection()
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            await conn.execute("BEGIN IMMEDIATE")
            try:
                removed = await self._purge(conn, older_than, max_rows)
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise
        return removed

    async def _purge(self, conn: aiosqlite.Connection, older_than: float, max_rows: int) -> int:
        rows = list(
            await conn.execute_fetchall(
                f"SELECT id FROM {TABLE} ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)
            )
        )
        over = int(rows[0][0]) if rows else 0  # rows up to this id are past max_rows
        cursor = await conn.execute(
            f"DELETE FROM {TABLE} WHERE chain IS NULL AND (time < ? OR id <= ?)",
            (older_than, over),
        )
        removed = max(cursor.rowcount, 0)
        chains = await conn.execute_fetchall(
            f"SELECT DISTINCT chain FROM {TABLE} WHERE chain IS NOT NULL AND (time < ? OR id <= ?)",
            (older_than, over),
        )
        for (chain,) in list(chains):
            kept = list(
                await conn.execute_fetchall(
                    f"SELECT seq FROM {TABLE} WHERE chain = ? AND time >= ? AND id > ? "
                    "ORDER BY seq LIMIT 1",
                    (chain, older_than, over),
                )
            )
            bound = int(kept[0][0]) if kept else None
            params: tuple[Any, ...] = (chain,) if bound is None else (chain, bound)
            sql = _LAST if bound is None else _LAST_BEFORE  # None: the whole chain goes
            last = list(await conn.execute_fetchall(sql, params))
            if not last:
                continue  # its oldest row is held back by a newer one before it
            seq, digest = int(last[0][0]), str(last[0][1])
            await conn.execute(
                f"UPDATE {CHAIN_TABLE} SET anchor_seq = ?, anchor_hash = ? "
                "WHERE chain = ? AND anchor_seq < ?",
                (seq, digest, chain, seq),
            )
            cursor = await conn.execute(
                f"DELETE FROM {TABLE} WHERE chain = ? AND seq <= ?", (chain, seq)
            )
            removed += max(cursor.rowcount, 0)
        await conn.execute(  # chains with nothing left, long idle
            f"DELETE FROM {CHAIN_TABLE} WHERE anchor_seq = head_seq AND updated < ?",
            (older_than,),
        )
        return removed

    async def verify(self) -> VerifyReport:
        """Walk the chains in one read transaction, on a connection of its own (the writer
        goes on meanwhile: WAL); hashing runs off the event loop."""
        memory = self.path == ":memory:" or self.path.startswith("file:")
        if memory:
            async with self._lock:
                return await _verify(self._connection())
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return await _verify(conn)
        finally:
            await conn.close()


def _unseen(rows: Sequence[Row], there: set[str]) -> list[Row]:
    """The rows whose uid the database does not have, each uid once."""
    new: list[Row] = []
    for row in rows:
        if row[0] not in there:
            there.add(row[0])
            new.append(row)
    return new


async def _verify(conn: aiosqlite.Connection) -> VerifyReport:
    await conn.execute("BEGIN")
    try:
        chained = list(
            await conn.execute_fetchall(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (CHAIN_TABLE,)
            )
        )
        if not chained:  # a journal from before the chain: nothing to check
            (count,) = list(await conn.execute_fetchall(f"SELECT count(*) FROM {TABLE}"))
            return VerifyReport(unchained=int(count[0]))
        entries = entries_from(await conn.execute_fetchall(f"SELECT * FROM {CHAIN_TABLE}"))
        (count,) = list(
            await conn.execute_fetchall(f"SELECT count(*) FROM {TABLE} WHERE chain IS NULL")
        )
        walk = ChainWalk.over(entries)
        cursor = await conn.execute(_CHAINED)
        while chunk := await cursor.fetchmany(VERIFY_CHUNK):
            await asyncio.to_thread(walk.feed_all, chunk)
        await cursor.close()
        return walk.report(unchained=int(count[0]))
    finally:
        await conn.execute("ROLLBACK")


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
