"""The shared store: idempotency records and run counters in PostgreSQL, for many replicas.

Every operation is one statement (CTEs, ``INSERT ... ON CONFLICT ... RETURNING``), so it
is atomic and costs one round trip; asyncpg prepares and caches each statement per
connection. Timestamps come from the server's clock (``now()``) so replicas agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy.call import Claim, ClaimState, RunCounters, StoredResponse, UnknownReason
from proxy.errors import StoreUnavailable
from proxy.migrations import migrate_postgres
from proxy.store import postgres_schema as sql
from proxy.store.records import KeyRecord, Next, Record, encode_headers, read_claim

logger = logging.getLogger(__name__)

RUN_TTL_S = 7 * 86400.0
_CLAIM_ATTEMPTS = 5

_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


def _affected(status: str) -> int:
    """asyncpg's command tag, e.g. ``UPDATE 1``: how many rows the statement touched."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def _keep_session(conn: Any) -> None:
    """No reset query when a connection goes back to the pool: it saves a round trip per
    operation, and the store leaves no session state behind (no SET, LISTEN or session locks);
    asyncpg still rolls back a transaction left open."""


class PostgresStore:
    """The shared store: every replica pointed at one database gives the same guarantees."""

    def __init__(
        self,
        dsn: str,
        *,
        run_ttl_s: float = RUN_TTL_S,
        min_size: int = 2,
        max_size: int = 10,
        timeout_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.run_ttl_s = run_ttl_s
        self.min_size = min_size
        self.max_size = max_size
        self.timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return "PostgresStore(...)"  # the DSN may hold a password

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.timeout_s,
                timeout=self.timeout_s,
                max_inactive_connection_lifetime=300.0,
                reset=_keep_session,
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"cannot connect to the PostgreSQL store: {exc}") from exc
        self._pool = pool
        try:
            async with self._connection() as conn:
                await migrate_postgres(conn, sql.COMPONENT, sql.MIGRATIONS, "PostgreSQL store")
        except BaseException:
            self._pool = None
            pool.terminate()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout_s)
        except _DRIVER_ERRORS:
            pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; every driver failure inside becomes ``StoreUnavailable``.

        One deadline, ``timeout_s``, covers the wait for a connection and the statements
        made on it: an operation never waits twice the store's timeout."""
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._pool.acquire() as conn:
                    yield conn
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the PostgreSQL store failed: {exc!r}") from exc

    async def ping(self) -> None:
        """A real write: a database that refuses writes makes the store not ready."""
        async with self._connection() as conn:
            await conn.execute(sql.PING)

    async def claim(
        self,
        tool: str,
        key: str,
        fingerprint: str,
        *,
        lease_s: float,
        ttl_s: float,
        takeover: bool = False,
        owner: str | None = None,
    ) -> Claim:
        owner = owner or uuid.uuid4().hex
        args = (tool, key, fingerprint, owner, float(lease_s), float(ttl_s), takeover)
        failure: StoreUnavailable | None = None
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                async with self._connection() as conn:
                    row = await conn.fetchrow(sql.CLAIM, *args)
            except StoreUnavailable as exc:
                # The statement may have reached the database with its answer lost: try once
                # more under the same owner, which recognises the record as this claim's own.
                if failure is not None:
                    raise
                failure = exc
                continue
            if row is not None and row["owned"]:
                return Claim(ClaimState.OWNED, owner=owner, resent=row["attempts"] > 1)
            record = None if row is None else Record(*tuple(row)[2:])
            answer = read_claim(record, fingerprint, owner, takeover)
            if answer is Next.MARK_STALE:
                assert record is not None
                async with self._connection() as conn:
                    changed = _affected(await conn.execute(sql.MARK_STALE, tool, key, record.owner))
                if changed:
                    return Claim(ClaimState.UNKNOWN, reason=UnknownReason.LEASE_EXPIRED)
                continue
            if isinstance(answer, Claim):
                return answer
        raise StoreUnavailable(f"could not settle a claim on key {key!r} (too much contention)")

    async def _change(self, sql: str, *args: Any) -> bool:
        async with self._connection() as conn:
            return bool(_affected(await conn.execute(sql, *args)))

    async def complete(
        self,
        tool: str,
        key: str,
        owner: str,
        response: StoredResponse,
        *,
        keep_s: float | None = None,
    ) -> bool:
        return await self._change(
            sql.COMPLETE,
            tool,
            key,
            owner,
            response.status,
            encode_headers(response.headers),
            response.body,
            response.complete,
            keep_s,
        )

    async def release(self, tool: str, key: str, owner: str) -> bool:
        return await self._change(sql.RELEASE, tool, key, owner)

    async def mark_unknown(self, tool: str, key: str, owner: str, reason: str) -> bool:
        return await self._change(sql.MARK_UNKNOWN, tool, key, owner, reason)

    async def extend(self, tool: str, key: str, owner: str, lease_s: float) -> bool:
        return await self._change(sql.EXTEND, tool, key, owner, float(lease_s))

    async def inspect(self, tool: str, key: str) -> KeyRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.INSPECT, tool, key)
        return KeyRecord(*tuple(row)) if row is not None else None

    async def unknown_keys(self, limit: int) -> list[KeyRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(sql.UNKNOWN_KEYS, limit)
        return [KeyRecord(*tuple(row)) for row in rows]

    async def resolve(self, tool: str, key: str, response: StoredResponse | None) -> str | None:
        before = await self.inspect(tool, key)
        if before is None or before.state != "unknown":
            return before.state if before is not None else None
        if response is None:
            await self._change(sql.RESOLVE_FAILED, tool, key)
        else:
            await self._change(
                sql.RESOLVE_ANSWER,
                tool,
                key,
                response.status,
                encode_headers(response.headers),
                response.body,
            )
        return before.state

    async def purge_expired(self) -> int:
        """Delete expired idempotency records (returned) and runs idle for ``run_ttl_s``."""
        purged = {"records": 0, "runs": 0, "run_calls": 0}
        batches = (
            ("records", sql.PURGE_RECORDS, ()),
            ("runs", sql.PURGE_RUNS, (float(self.run_ttl_s),)),
            ("run_calls", sql.PURGE_RUN_CALLS, (float(self.run_ttl_s),)),
        )
        for name, statement, args in batches:
            while True:
                async with self._connection() as conn:
                    deleted = int(await conn.fetchval(statement, *args))
                purged[name] += deleted
                if deleted < sql.PURGE_BATCH:
                    break
        if any(purged.values()):
            logger.info("purged expired store records: %s", purged)
        return purged["records"]

    async def run_counters(self, run_id: str, call_fingerprint: str) -> RunCounters:
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.RUN_COUNTERS, run_id, call_fingerprint)
        return RunCounters(
            calls=row[0] or 0, writes=row[1] or 0, denied=row[2] or 0, repeats=row[3] or 0
        )

    async def reserve_call(
        self, run_id: str, call_fingerprint: str, *, write: bool, run: str = ""
    ) -> RunCounters:
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.RESERVE, run_id, call_fingerprint, int(write), run)
        return RunCounters(
            calls=row[0], writes=row[1], denied=row[2], repeats=row[3], closed=bool(row[4])
        )

    async def close_run(self, run: str, by: str) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(sql.CLOSE_RUN, run, time.time(), by)
        return bool(status.endswith(" 1"))

    async def closed_run(self, run: str) -> tuple[float, str] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.CLOSED_RUN, run)
        return (float(row[0]), str(row[1])) if row else None

    async def refund_call(self, run_id: str, *, write: bool) -> None:
        async with self._connection() as conn:
            await conn.execute(sql.REFUND, run_id, int(write))
