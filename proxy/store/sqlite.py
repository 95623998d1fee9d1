"""The single-node store: idempotency records and run counters in one SQLite file.

One aiosqlite connection (one worker thread) in autocommit mode, WAL and
``synchronous=NORMAL``: every operation is one statement, so it is atomic on its own and
costs one hop to the worker thread. Several processes may share the file (``busy_timeout``).
Timestamps are this host's ``time.time()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.call import Claim, ClaimState, RunCounters, StoredResponse
from proxy.errors import StoreUnavailable

logger = logging.getLogger(__name__)

COMPONENT = "store"
RUN_TTL_S = 7 * 86400.0
PURGE_BATCH = 1000
_CLAIM_ATTEMPTS = 5

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE handrail_idempotency (
                tool TEXT NOT NULL,
                key TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                state TEXT NOT NULL,
                owner TEXT NOT NULL,
                lease_until REAL NOT NULL,
                expires_at REAL NOT NULL,
                created_at REAL NOT NULL,
                status INTEGER,
                headers TEXT,
                body BLOB,
                complete INTEGER,
                PRIMARY KEY (tool, key)
            )""",
            "CREATE INDEX handrail_idempotency_expires ON handrail_idempotency (expires_at)",
            # last_fingerprint feeds the trigger below, so count_call is one statement.
            """CREATE TABLE handrail_runs (
                run_id TEXT PRIMARY KEY,
                calls INTEGER NOT NULL,
                writes INTEGER NOT NULL,
                denied INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                last_fingerprint TEXT NOT NULL
            )""",
            "CREATE INDEX handrail_runs_updated ON handrail_runs (updated_at)",
            """CREATE TABLE handrail_run_calls (
                run_id TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                n INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (run_id, fingerprint)
            )""",
            "CREATE INDEX handrail_run_calls_updated ON handrail_run_calls (updated_at)",
            """CREATE TRIGGER handrail_runs_count_insert AFTER INSERT ON handrail_runs
            BEGIN
                INSERT INTO handrail_run_calls (run_id, fingerprint, n, updated_at)
                VALUES (NEW.run_id, NEW.last_fingerprint, 1, NEW.updated_at)
                ON CONFLICT (run_id, fingerprint)
                DO UPDATE SET n = n + 1, updated_at = excluded.updated_at;
            END""",
            """CREATE TRIGGER handrail_runs_count_update AFTER UPDATE OF calls ON handrail_runs
            BEGIN
                INSERT INTO handrail_run_calls (run_id, fingerprint, n, updated_at)
                VALUES (NEW.run_id, NEW.last_fingerprint, 1, NEW.updated_at)
                ON CONFLICT (run_id, fingerprint)
                DO UPDATE SET n = n + 1, updated_at = excluded.updated_at;
            END""",
        ),
    ),
)

_CLAIM = """
INSERT INTO handrail_idempotency AS r
    (tool, key, fingerprint, state, owner, lease_until, expires_at, created_at)
VALUES (:tool, :key, :fp, 'in_flight', :owner, :lease_until, :expires_at, :now)
ON CONFLICT (tool, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'in_flight', owner = excluded.owner,
    lease_until = excluded.lease_until, expires_at = excluded.expires_at,
    created_at = excluded.created_at,
    status = NULL, headers = NULL, body = NULL, complete = NULL
WHERE (r.state = 'completed' AND r.expires_at <= :now)
   OR (r.state = 'in_flight' AND r.lease_until <= :now)
RETURNING 1
"""

_READ = """
SELECT fingerprint, state, lease_until, expires_at, status, headers, body, complete
FROM handrail_idempotency WHERE tool = ? AND key = ?
"""

_COMPLETE = """
UPDATE handrail_idempotency
SET state = 'completed', status = ?, headers = ?, body = ?, complete = ?
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight'
RETURNING 1
"""

_RELEASE = """
DELETE FROM handrail_idempotency
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight'
RETURNING 1
"""

_RUN_COUNTERS = """
SELECT r.calls, r.writes, r.denied, c.n
FROM (SELECT 1) AS one
LEFT JOIN handrail_runs AS r ON r.run_id = :run
LEFT JOIN handrail_run_calls AS c ON c.run_id = :run AND c.fingerprint = :fp
"""

_COUNT_CALL = """
INSERT INTO handrail_runs AS r (run_id, calls, writes, denied, updated_at, last_fingerprint)
VALUES (?, 1, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    calls = r.calls + 1, writes = r.writes + excluded.writes,
    denied = r.denied + excluded.denied, updated_at = excluded.updated_at,
    last_fingerprint = excluded.last_fingerprint
"""

_PURGE = {
    "handrail_idempotency": "expires_at <= ?1 AND (state = 'completed' OR lease_until <= ?1)",
    "handrail_runs": "updated_at <= ?",
    "handrail_run_calls": "updated_at <= ?",
}


@contextmanager
def _mapped() -> Iterator[None]:
    """Driver failures become ``StoreUnavailable``: the call is refused, never run unguarded."""
    try:
        yield
    except (sqlite3.Error, ValueError, OSError) as exc:
        raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc


def _encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    return json.dumps([[k, v] for k, v in headers], separators=(",", ":"))


def _decode_headers(raw: str | None) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(raw or "[]"))


class SqliteStore:
    """The default store, for one host (several processes may share the file)."""

    def __init__(
        self,
        path: str | Path,
        *,
        run_ttl_s: float = RUN_TTL_S,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = str(path)
        self.run_ttl_s = run_ttl_s
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    async def open(self) -> None:
        if self._conn is not None:
            return
        if self.path != ":memory:" and not self.path.startswith("file:"):
            parent = Path(self.path).parent
            with _mapped():
                await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
        with _mapped():
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            with _mapped():
                await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = NORMAL")
                await self._migrate(conn)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        """Apply the migrations above the recorded version, in one immediate transaction."""
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS handrail_schema "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            rows = list(
                await conn.execute_fetchall(
                    "SELECT version FROM handrail_schema WHERE component = ?", (COMPONENT,)
                )
            )
            current = int(rows[0][0]) if rows else 0
            latest = MIGRATIONS[-1][0]
            if current > latest:
                logger.warning(
                    "the SQLite store's schema is version %d, newer than this proxy's %d",
                    current,
                    latest,
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO handrail_schema (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (COMPONENT, version),
                )
                logger.info("migrated the SQLite store to schema version %d", version)
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with _mapped():
                await conn.close()

    async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        if self._conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        with _mapped():
            return list(await self._conn.execute_fetchall(sql, params))

    async def ping(self) -> None:
        await self._fetch("SELECT version FROM handrail_schema WHERE component = ?", (COMPONENT,))

    async def claim(
        self, tool: str, key: str, fingerprint: str, *, lease_s: float, ttl_s: float
    ) -> Claim:
        owner = uuid.uuid4().hex
        for _ in range(_CLAIM_ATTEMPTS):
            now = time.time()
            params = {
                "tool": tool,
                "key": key,
                "fp": fingerprint,
                "owner": owner,
                "now": now,
                "lease_until": now + lease_s,
                "expires_at": now + ttl_s,
            }
            if await self._fetch(_CLAIM, params):
                return Claim(ClaimState.OWNED, owner=owner)
            rows = await self._fetch(_READ, (tool, key))
            if not rows:
                continue  # released between the two statements: claim again
            fp, state, lease_until, expires_at, status, headers, body, complete = rows[0]
            if lease_until <= now if state == "in_flight" else expires_at <= now:
                continue  # went stale between the two statements: take it over
            if fp != fingerprint:
                return Claim(ClaimState.MISMATCH)
            if state == "in_flight":
                return Claim(ClaimState.IN_FLIGHT)
            response = StoredResponse(
                status=int(status),
                headers=_decode_headers(headers),
                body=bytes(body or b""),
                complete=bool(complete),
            )
            return Claim(ClaimState.COMPLETED, response=response)
        raise StoreUnavailable(f"could not settle a claim on key {key!r} (too much contention)")

    async def complete(self, tool: str, key: str, owner: str, response: StoredResponse) -> None:
        params = (
            response.status,
            _encode_headers(response.headers),
            response.body,
            int(response.complete),
            tool,
            key,
            owner,
        )
        if not await self._fetch(_COMPLETE, params):
            logger.warning(
                "idempotency key %r was no longer ours to complete (lease ran out)",
                key,
                extra={"tool": tool},
            )

    async def release(self, tool: str, key: str, owner: str) -> None:
        if not await self._fetch(_RELEASE, (tool, key, owner)):
            logger.info(
                "idempotency key %r was no longer ours to release", key, extra={"tool": tool}
            )

    async def purge_expired(self) -> int:
        """Delete expired idempotency records (returned) and runs idle for ``run_ttl_s``."""
        now = time.time()
        cutoffs = {
            "handrail_idempotency": now,
            "handrail_runs": now - self.run_ttl_s,
            "handrail_run_calls": now - self.run_ttl_s,
        }
        purged = dict.fromkeys(_PURGE, 0)
        for table, condition in _PURGE.items():
            sql = (
                f"DELETE FROM {table} WHERE rowid IN "
                f"(SELECT rowid FROM {table} WHERE {condition} LIMIT {PURGE_BATCH}) RETURNING 1"
            )
            while True:
                deleted = len(await self._fetch(sql, (cutoffs[table],)))
                purged[table] += deleted
                if deleted < PURGE_BATCH:
                    break
        if any(purged.values()):
            logger.info("purged expired store records: %s", purged)
        return purged["handrail_idempotency"]

    async def run_counters(self, run_id: str, call_fingerprint: str) -> RunCounters:
        rows = await self._fetch(_RUN_COUNTERS, {"run": run_id, "fp": call_fingerprint})
        calls, writes, denied, repeats = rows[0]
        return RunCounters(
            calls=calls or 0, writes=writes or 0, denied=denied or 0, repeats=repeats or 0
        )

    async def count_call(
        self, run_id: str, call_fingerprint: str, *, write: bool, denied: bool
    ) -> None:
        params = (run_id, int(write), int(denied), time.time(), call_fingerprint)
        await self._fetch(_COUNT_CALL, params)
