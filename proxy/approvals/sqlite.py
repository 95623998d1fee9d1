"""Approvals and pins in the SQLite store's file: their own connection and schema component.

Few and small writes (one per held call, one per decision), so one connection used from a
worker thread under a lock is enough; the store's file is in WAL mode, and a busy timeout
rides out the store's own writes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from proxy.approvals.model import Approval, State
from proxy.approvals.rows import COLUMNS, OPEN, from_row, to_row
from proxy.errors import StoreUnavailable
from proxy.migrations import Migrations, migrate_sqlite

T = TypeVar("T")

COMPONENT = "approvals"
MIGRATIONS: Migrations = (
    (
        1,
        (
            """CREATE TABLE handrail_approvals (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                tool TEXT NOT NULL,
                agent TEXT NOT NULL,
                run_id TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                input TEXT NOT NULL,
                reasons TEXT NOT NULL,
                state TEXT NOT NULL,
                created REAL NOT NULL,
                expires REAL NOT NULL,
                idempotency_key TEXT,
                trace_id TEXT,
                decided_by TEXT,
                decided_at REAL,
                reason TEXT,
                used_at REAL,
                extra TEXT
            )""",
            # One open request per call: replicas racing to hold the same call share it.
            f"""CREATE UNIQUE INDEX handrail_approvals_open
                ON handrail_approvals (kind, tool, agent, fingerprint) WHERE {OPEN}""",
            "CREATE INDEX handrail_approvals_created ON handrail_approvals (created)",
            """CREATE TABLE handrail_pins (
                server TEXT NOT NULL,
                name TEXT NOT NULL,
                digest TEXT NOT NULL,
                definition TEXT NOT NULL,
                pinned_at REAL NOT NULL,
                PRIMARY KEY (server, name)
            )""",
        ),
    ),
)

IDENTITY = "kind = ? AND tool = ? AND agent = ? AND fingerprint = ?"


class SqliteApprovals:
    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=10
            )
            conn.execute("PRAGMA busy_timeout = 10000")
            migrate_sqlite(conn, COMPONENT, MIGRATIONS, "approvals")
            return conn

        try:
            self._conn = await asyncio.to_thread(connect)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the approvals tables could not be opened: {exc}") from None

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            if self._conn is None:
                raise StoreUnavailable("the approvals store is not open")
            with self._lock:
                return work(self._conn)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the approvals store failed: {exc}") from None

    async def request(self, approval: Approval) -> Approval:
        identity = (approval.kind.value, approval.tool, approval.agent, approval.fingerprint)

        def work(conn: sqlite3.Connection) -> Approval:
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                rejected = conn.execute(
                    f"SELECT {COLUMNS} FROM handrail_approvals WHERE {IDENTITY} "
                    "AND state = 'rejected' AND expires > ? ORDER BY decided_at DESC LIMIT 1",
                    (*identity, now),
                ).fetchone()
                if rejected is not None:
                    conn.execute("COMMIT")
                    return from_row(rejected)
                conn.execute(
                    f"UPDATE handrail_approvals SET state = 'expired' "
                    f"WHERE {IDENTITY} AND {OPEN} AND expires <= ?",
                    (*identity, now),
                )
                placeholders = ", ".join("?" * len(COLUMNS.split(", ")))
                conn.execute(
                    f"INSERT INTO handrail_approvals ({COLUMNS}) VALUES ({placeholders}) "
                    "ON CONFLICT DO NOTHING",
                    to_row(approval),
                )
                row = conn.execute(
                    f"SELECT {COLUMNS} FROM handrail_approvals WHERE {IDENTITY} AND {OPEN}",
                    identity,
                ).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return from_row(row)

        return await self._run(work)

    async def get(self, approval_id: str) -> Approval | None:
        def work(conn: sqlite3.Connection) -> Approval | None:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE id = ?", (approval_id,)
            ).fetchone()
            return None if row is None else from_row(row)

        return await self._run(work)

    async def list(self, state: State | None, limit: int) -> list[Approval]:
        now = time.time()
        where, params = _state_filter(state, now)

        def work(conn: sqlite3.Connection) -> list[Approval]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE {where} "
                "ORDER BY created DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [from_row(r) for r in rows]

        return await self._run(work)

    async def decide(
        self, approval_id: str, approve: bool, by: str, reason: str | None
    ) -> tuple[Approval | None, bool]:
        state = State.APPROVED if approve else State.REJECTED

        def work(conn: sqlite3.Connection) -> tuple[Approval | None, bool]:
            now = time.time()
            changed = conn.execute(
                "UPDATE handrail_approvals SET state = ?, decided_by = ?, decided_at = ?, "
                "reason = ? WHERE id = ? AND state = 'pending' AND expires > ?",
                (state.value, by, now, reason, approval_id, now),
            ).rowcount
            row = conn.execute(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE id = ?", (approval_id,)
            ).fetchone()
            return (None if row is None else from_row(row)), bool(changed)

        return await self._run(work)

    async def use(self, approval_id: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            return bool(
                conn.execute(
                    "UPDATE handrail_approvals SET state = 'used', used_at = ? "
                    "WHERE id = ? AND state = 'approved' AND expires > ?",
                    (now, approval_id, now),
                ).rowcount
            )

        return await self._run(work)

    async def pin(self, server: str, name: str, digest: str, definition: dict[str, Any]) -> str:
        def work(conn: sqlite3.Connection) -> str:
            conn.execute(
                "INSERT INTO handrail_pins (server, name, digest, definition, pinned_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (server, name, digest, json.dumps(definition, sort_keys=True), time.time()),
            )
            row = conn.execute(
                "SELECT digest FROM handrail_pins WHERE server = ? AND name = ?", (server, name)
            ).fetchone()
            return str(row[0])

        return await self._run(work)

    async def pinned(self, server: str, name: str) -> tuple[str, dict[str, Any]] | None:
        def work(conn: sqlite3.Connection) -> tuple[str, dict[str, Any]] | None:
            row = conn.execute(
                "SELECT digest, definition FROM handrail_pins WHERE server = ? AND name = ?",
                (server, name),
            ).fetchone()
            return None if row is None else (str(row[0]), json.loads(row[1]))

        return await self._run(work)

    async def repin(self, server: str, name: str, digest: str, definition: dict[str, Any]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO handrail_pins (server, name, digest, definition, pinned_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (server, name) DO UPDATE SET "
                "digest = excluded.digest, definition = excluded.definition, "
                "pinned_at = excluded.pinned_at",
                (server, name, digest, json.dumps(definition, sort_keys=True), time.time()),
            )

        await self._run(work)


def _state_filter(state: State | None, now: float) -> tuple[str, tuple[Any, ...]]:
    """SQL for the state a reader sees (``?`` placeholders)."""
    if state is None:
        return "1 = 1", ()
    if state is State.EXPIRED:
        return f"(state = 'expired' OR ({OPEN} AND expires <= ?))", (now,)
    if state in (State.PENDING, State.APPROVED):
        return "state = ? AND expires > ?", (state.value, now)
    return "state = ?", (state.value,)
