"""The journal in the shared PostgreSQL database (the store's URL), on a small asyncpg pool."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from proxy.migrations import Migrations, migrate_postgres
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

TIMEOUT_S = 5.0
"""The advisory lock every component's migrations take (the store's too): one at a time."""

MIGRATIONS: Migrations = (
    (
        1,
        (
            f"""CREATE TABLE {TABLE} (
                id bigserial PRIMARY KEY,
                time double precision NOT NULL,
                tool text NOT NULL,
                kind text NOT NULL,
                agent text NOT NULL,
                run_id text NOT NULL,
                trace_id text NOT NULL,
                span_id text NOT NULL,
                method text NOT NULL,
                path text NOT NULL,
                query text,
                call_name text,
                decision text,
                reasons text,
                decision_id text,
                idempotency_key text,
                fingerprint text,
                replayed boolean NOT NULL,
                status integer,
                error_code text,
                total_ms double precision NOT NULL,
                policy_ms double precision NOT NULL,
                upstream_ms double precision NOT NULL,
                input text,
                output text
            )""",
            f"CREATE INDEX {TABLE}_run ON {TABLE} (run_id, id)",
            f"CREATE INDEX {TABLE}_tool ON {TABLE} (tool, id)",
            f"CREATE INDEX {TABLE}_time ON {TABLE} (time)",
        ),
    ),
    (
        2,
        (  # each row's spool uid, so that recovery may insert a row again; older rows: NULL
            f"ALTER TABLE {TABLE} ADD COLUMN uid text",
            f"CREATE UNIQUE INDEX {TABLE}_uid ON {TABLE} (uid)",
            f"CREATE TABLE {META_TABLE} (id text NOT NULL)",
            f"INSERT INTO {META_TABLE} (id) "
            "VALUES (md5(random()::text || clock_timestamp()::text))",
        ),
    ),
    (3, (f"ALTER TABLE {TABLE} ADD COLUMN approval_id text",)),  # the approval a call waited on
)

_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(INSERT_COLUMNS) + 1))}) "
    "ON CONFLICT (uid) DO NOTHING"
)
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class PostgresJournalDb:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return "PostgresJournalDb(...)"  # the DSN may hold a password

    async def open(self, *, create: bool) -> bool:
        pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=2, command_timeout=TIMEOUT_S, timeout=TIMEOUT_S
        )
        try:
            async with pool.acquire() as conn:
                if create:
                    await migrate_postgres(conn, COMPONENT, MIGRATIONS, "PostgreSQL journal")
                    present = True
                else:
                    present = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool
        return bool(present)

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the journal is not open")
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def identity(self) -> str:
        return str(await self._pool_or_fail().fetchval(f"SELECT id FROM {META_TABLE}"))

    async def insert(self, rows: Sequence[Row]) -> None:
        async with self._pool_or_fail().acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT, [padded(r) for r in rows])

    def refuses(self, exc: BaseException) -> bool:
        """A value or constraint the server (or asyncpg's encoder) rejects; not an outage."""
        return isinstance(exc, _REFUSED)

    async def select(self, where: Where) -> list[dict[str, Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("run_id", where.run_id),
            ("tool", where.tool),
            ("decision", where.decision),
            ("time", where.since),
        ):
            if value is not None:
                params.append(value)
                operator = ">=" if column == "time" else "="
                clauses.append(f"{column} {operator} ${len(params)}")
        sql = f"SELECT * FROM {TABLE}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        params.append(where.limit)
        sql += f" ORDER BY id DESC LIMIT ${len(params)}"
        rows = await self._pool_or_fail().fetch(sql, *params)
        return [row_dict(row) for row in rows]

    async def purge(self, older_than: float, max_rows: int) -> int:
        pool = self._pool_or_fail()
        aged = await pool.execute(f"DELETE FROM {TABLE} WHERE time < $1", older_than)
        over = await pool.execute(
            f"DELETE FROM {TABLE} WHERE id <= "
            f"(SELECT id FROM {TABLE} ORDER BY id DESC LIMIT 1 OFFSET $1)",
            max_rows,
        )
        return _count(aged) + _count(over)


def _count(status: str) -> int:
    """``DELETE 12`` -> 12."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0
