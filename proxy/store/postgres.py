"""The shared store: idempotency records and run counters in PostgreSQL, for many replicas.

Every operation is one statement (CTEs, ``INSERT ... ON CONFLICT ... RETURNING``), so it
is atomic and costs one round trip; asyncpg prepares and caches each statement per
connection. Timestamps come from the server's clock (``now()``) so replicas agree.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy.call import Claim, ClaimState, RunCounters, StoredResponse, UnknownReason
from proxy.errors import StoreUnavailable
from proxy.migrations import Migrations, migrate_postgres
from proxy.store.records import KeyRecord, Next, Record, encode_headers, read_claim

logger = logging.getLogger(__name__)

COMPONENT = "store"
RUN_TTL_S = 7 * 86400.0
PURGE_BATCH = 1000
_CLAIM_ATTEMPTS = 5

MIGRATIONS: Migrations = (
    (
        1,
        (
            """CREATE TABLE handrail_idempotency (
                tool text NOT NULL,
                key text NOT NULL,
                fingerprint text NOT NULL,
                state text NOT NULL,
                owner text NOT NULL,
                lease_until timestamptz NOT NULL,
                expires_at timestamptz NOT NULL,
                created_at timestamptz NOT NULL,
                status integer,
                headers text,
                body bytea,
                complete boolean,
                PRIMARY KEY (tool, key)
            )""",
            "CREATE INDEX handrail_idempotency_expires ON handrail_idempotency (expires_at)",
            """CREATE TABLE handrail_runs (
                run_id text PRIMARY KEY,
                calls bigint NOT NULL,
                writes bigint NOT NULL,
                denied bigint NOT NULL,
                updated_at timestamptz NOT NULL
            )""",
            "CREATE INDEX handrail_runs_updated ON handrail_runs (updated_at)",
            """CREATE TABLE handrail_run_calls (
                run_id text NOT NULL,
                fingerprint text NOT NULL,
                n bigint NOT NULL,
                updated_at timestamptz NOT NULL,
                PRIMARY KEY (run_id, fingerprint)
            )""",
            "CREATE INDEX handrail_run_calls_updated ON handrail_run_calls (updated_at)",
        ),
    ),
    (
        2,
        (
            # unknown: the call may have run and its outcome was lost (see store/records.py).
            "ALTER TABLE handrail_idempotency ADD COLUMN reason text",
            "ALTER TABLE handrail_idempotency ADD COLUMN attempts integer NOT NULL DEFAULT 1",
            "CREATE INDEX handrail_idempotency_unsettled ON handrail_idempotency (created_at) "
            "WHERE state <> 'completed'",
            "CREATE TABLE handrail_health (id integer PRIMARY KEY, at timestamptz NOT NULL)",
        ),
    ),
)

# Owned: the first branch returns a row. Otherwise the second returns the record as this
# statement's snapshot sees it (``records.read_claim`` reads it); no row means a concurrent
# change we could not see yet, and the claim is simply tried again. A record is taken over
# when it expired (and is not in flight under a live lease), or, with $7 (the tool
# deduplicates the key itself), when it is unknown or its lease ran out.
_CLAIM = """
WITH claimed AS (
    INSERT INTO handrail_idempotency AS r
        (tool, key, fingerprint, state, owner, lease_until, expires_at, created_at, attempts)
    VALUES ($1, $2, $3, 'in_flight', $4, now() + make_interval(secs => $5),
            now() + make_interval(secs => $6), now(), 1)
    ON CONFLICT (tool, key) DO UPDATE SET
        fingerprint = EXCLUDED.fingerprint, state = 'in_flight', owner = EXCLUDED.owner,
        lease_until = EXCLUDED.lease_until, expires_at = EXCLUDED.expires_at,
        created_at = EXCLUDED.created_at,
        status = NULL, headers = NULL, body = NULL, complete = NULL, reason = NULL,
        attempts = CASE WHEN r.expires_at <= now() THEN 1 ELSE r.attempts + 1 END
    WHERE (r.expires_at <= now() AND (r.state <> 'in_flight' OR r.lease_until <= now()))
       OR ($7 AND r.fingerprint = EXCLUDED.fingerprint
           AND (r.state = 'unknown' OR (r.state = 'in_flight' AND r.lease_until <= now())))
    RETURNING r.attempts
)
SELECT true AS owned, attempts, NULL::text AS fingerprint, NULL::text AS state,
       NULL::text AS owner, false AS lease_over, false AS expired,
       NULL::integer AS status, NULL::text AS headers, NULL::bytea AS body,
       NULL::boolean AS complete, NULL::text AS reason
FROM claimed
UNION ALL
SELECT false, attempts, fingerprint, state, owner, lease_until <= now(), expires_at <= now(),
       status, headers, body, complete, reason
FROM handrail_idempotency
WHERE tool = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM claimed)
"""

_MARK_STALE = """
UPDATE handrail_idempotency SET state = 'unknown', reason = 'lease_expired'
WHERE tool = $1 AND key = $2 AND owner = $3 AND state = 'in_flight' AND lease_until <= now()
"""

_COMPLETE = """
UPDATE handrail_idempotency
SET state = 'completed', status = $4, headers = $5, body = $6, complete = $7, reason = NULL
WHERE tool = $1 AND key = $2 AND owner = $3 AND state IN ('in_flight', 'unknown')
"""

_RELEASE = """
DELETE FROM handrail_idempotency
WHERE tool = $1 AND key = $2 AND owner = $3 AND state IN ('in_flight', 'unknown')
"""

_MARK_UNKNOWN = """
UPDATE handrail_idempotency SET state = 'unknown', reason = $4
WHERE tool = $1 AND key = $2 AND owner = $3 AND state = 'in_flight'
"""

_EXTEND = """
UPDATE handrail_idempotency
SET lease_until = greatest(lease_until, now() + make_interval(secs => $4))
WHERE tool = $1 AND key = $2 AND owner = $3 AND state = 'in_flight'
"""

# What an operator may resolve: unknown, or in flight past its lease (its proxy is gone).
_UNSETTLED = "(state = 'unknown' OR (state = 'in_flight' AND lease_until <= now()))"

_KEY_COLUMNS = f"""
tool, key, CASE WHEN {_UNSETTLED} THEN 'unknown' ELSE state END AS state,
CASE WHEN state = 'in_flight' AND lease_until <= now() THEN 'lease_expired' ELSE reason END
    AS reason,
attempts, extract(epoch FROM created_at)::float8 AS created_at,
extract(epoch FROM expires_at)::float8 AS expires_at, status
"""

_INSPECT = f"SELECT {_KEY_COLUMNS} FROM handrail_idempotency WHERE tool = $1 AND key = $2"

_UNKNOWN_KEYS = f"""
SELECT {_KEY_COLUMNS} FROM handrail_idempotency
WHERE state <> 'completed' AND {_UNSETTLED} ORDER BY created_at LIMIT $1
"""

_RESOLVE_FAILED = f"DELETE FROM handrail_idempotency WHERE tool = $1 AND key = $2 AND {_UNSETTLED}"

_RESOLVE_ANSWER = f"""
UPDATE handrail_idempotency
SET state = 'completed', status = $3, headers = $4, body = $5, complete = true, reason = NULL
WHERE tool = $1 AND key = $2 AND {_UNSETTLED}
"""

_PING = """
INSERT INTO handrail_health (id, at) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at = now()
"""

_RUN_COUNTERS = """
SELECT r.calls, r.writes, r.denied, c.n
FROM (SELECT 1) AS one
LEFT JOIN handrail_runs AS r ON r.run_id = $1
LEFT JOIN handrail_run_calls AS c ON c.run_id = $1 AND c.fingerprint = $2
"""

# Both rows are locked in the same order by every caller: no deadlocks. One statement, so
# calls made at once each see the counts before them (RETURNING gives the rows after it).
_RESERVE = """
WITH run AS (
    INSERT INTO handrail_runs AS r (run_id, calls, writes, denied, updated_at)
    VALUES ($1, 1, $3, 0, now())
    ON CONFLICT (run_id) DO UPDATE SET
        calls = r.calls + 1, writes = r.writes + EXCLUDED.writes,
        updated_at = EXCLUDED.updated_at
    RETURNING r.calls, r.writes, r.denied
), seen AS (
    INSERT INTO handrail_run_calls AS c (run_id, fingerprint, n, updated_at)
    VALUES ($1, $2, 1, now())
    ON CONFLICT (run_id, fingerprint) DO UPDATE SET n = c.n + 1, updated_at = EXCLUDED.updated_at
    RETURNING c.n
)
SELECT run.calls - 1, run.writes - $3, run.denied, seen.n - 1 FROM run, seen
"""

_REFUND = """
UPDATE handrail_runs SET writes = writes - $2, denied = denied + 1, updated_at = now()
WHERE run_id = $1
"""

_PURGE_RECORDS = f"""
WITH gone AS (
    DELETE FROM handrail_idempotency
    WHERE (tool, key) IN (
        SELECT tool, key FROM handrail_idempotency
        WHERE expires_at <= now() AND (state <> 'in_flight' OR lease_until <= now())
        LIMIT {PURGE_BATCH}
    ) AND expires_at <= now() AND (state <> 'in_flight' OR lease_until <= now())
    RETURNING 1
)
SELECT count(*) FROM gone
"""

_PURGE_RUNS = f"""
WITH gone AS (
    DELETE FROM handrail_runs
    WHERE run_id IN (
        SELECT run_id FROM handrail_runs
        WHERE updated_at <= now() - make_interval(secs => $1) LIMIT {PURGE_BATCH}
    ) AND updated_at <= now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT count(*) FROM gone
"""

_PURGE_RUN_CALLS = f"""
WITH gone AS (
    DELETE FROM handrail_run_calls
    WHERE (run_id, fingerprint) IN (
        SELECT run_id, fingerprint FROM handrail_run_calls
        WHERE updated_at <= now() - make_interval(secs => $1) LIMIT {PURGE_BATCH}
    ) AND updated_at <= now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT count(*) FROM gone
"""

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
                await migrate_postgres(conn, COMPONENT, MIGRATIONS, "PostgreSQL store")
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
            await conn.execute(_PING)

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
                    row = await conn.fetchrow(_CLAIM, *args)
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
                    changed = _affected(await conn.execute(_MARK_STALE, tool, key, record.owner))
                if changed:
                    return Claim(ClaimState.UNKNOWN, reason=UnknownReason.LEASE_EXPIRED)
                continue
            if isinstance(answer, Claim):
                return answer
        raise StoreUnavailable(f"could not settle a claim on key {key!r} (too much contention)")

    async def _change(self, sql: str, *args: Any) -> bool:
        async with self._connection() as conn:
            return bool(_affected(await conn.execute(sql, *args)))

    async def complete(self, tool: str, key: str, owner: str, response: StoredResponse) -> bool:
        return await self._change(
            _COMPLETE,
            tool,
            key,
            owner,
            response.status,
            encode_headers(response.headers),
            response.body,
            response.complete,
        )

    async def release(self, tool: str, key: str, owner: str) -> bool:
        return await self._change(_RELEASE, tool, key, owner)

    async def mark_unknown(self, tool: str, key: str, owner: str, reason: str) -> bool:
        return await self._change(_MARK_UNKNOWN, tool, key, owner, reason)

    async def extend(self, tool: str, key: str, owner: str, lease_s: float) -> bool:
        return await self._change(_EXTEND, tool, key, owner, float(lease_s))

    async def inspect(self, tool: str, key: str) -> KeyRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_INSPECT, tool, key)
        return KeyRecord(*tuple(row)) if row is not None else None

    async def unknown_keys(self, limit: int) -> list[KeyRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(_UNKNOWN_KEYS, limit)
        return [KeyRecord(*tuple(row)) for row in rows]

    async def resolve(self, tool: str, key: str, response: StoredResponse | None) -> str | None:
        before = await self.inspect(tool, key)
        if before is None or before.state != "unknown":
            return before.state if before is not None else None
        if response is None:
            await self._change(_RESOLVE_FAILED, tool, key)
        else:
            await self._change(
                _RESOLVE_ANSWER,
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
            ("records", _PURGE_RECORDS, ()),
            ("runs", _PURGE_RUNS, (float(self.run_ttl_s),)),
            ("run_calls", _PURGE_RUN_CALLS, (float(self.run_ttl_s),)),
        )
        for name, sql, args in batches:
            while True:
                async with self._connection() as conn:
                    deleted = int(await conn.fetchval(sql, *args))
                purged[name] += deleted
                if deleted < PURGE_BATCH:
                    break
        if any(purged.values()):
            logger.info("purged expired store records: %s", purged)
        return purged["records"]

    async def run_counters(self, run_id: str, call_fingerprint: str) -> RunCounters:
        async with self._connection() as conn:
            row = await conn.fetchrow(_RUN_COUNTERS, run_id, call_fingerprint)
        return RunCounters(
            calls=row[0] or 0, writes=row[1] or 0, denied=row[2] or 0, repeats=row[3] or 0
        )

    async def reserve_call(self, run_id: str, call_fingerprint: str, *, write: bool) -> RunCounters:
        async with self._connection() as conn:
            row = await conn.fetchrow(_RESERVE, run_id, call_fingerprint, int(write))
        return RunCounters(calls=row[0], writes=row[1], denied=row[2], repeats=row[3])

    async def refund_call(self, run_id: str, *, write: bool) -> None:
        async with self._connection() as conn:
            await conn.execute(_REFUND, run_id, int(write))
