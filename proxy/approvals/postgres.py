"""Approvals and pins in the PostgreSQL store's database, shared by every replica.

Times are epoch seconds (``double precision``): the rows are read as the ``Approval``
model has them. A small pool of its own; every state change is one conditional statement.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy.approvals.model import Approval, State
from proxy.approvals.rows import COLUMNS, OPEN, from_row, to_row
from proxy.errors import StoreUnavailable
from proxy.migrations import Migrations, migrate_postgres

COMPONENT = "approvals"
TIMEOUT_S = 5.0
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
MIGRATIONS: Migrations = (
    (
        1,
        (
            """CREATE TABLE handrail_approvals (
                id text PRIMARY KEY,
                kind text NOT NULL,
                tool text NOT NULL,
                agent text NOT NULL,
                run_id text NOT NULL,
                fingerprint text NOT NULL,
                input text NOT NULL,
                reasons text NOT NULL,
                state text NOT NULL,
                created double precision NOT NULL,
                expires double precision NOT NULL,
                idempotency_key text,
                trace_id text,
                decided_by text,
                decided_at double precision,
                reason text,
                used_at double precision,
                extra text
            )""",
            f"""CREATE UNIQUE INDEX handrail_approvals_open
                ON handrail_approvals (kind, tool, agent, fingerprint) WHERE {OPEN}""",
            "CREATE INDEX handrail_approvals_created ON handrail_approvals (created)",
            """CREATE TABLE handrail_pins (
                server text NOT NULL,
                name text NOT NULL,
                digest text NOT NULL,
                definition text NOT NULL,
                pinned_at double precision NOT NULL,
                PRIMARY KEY (server, name)
            )""",
        ),
    ),
)
IDENTITY = "kind = $1 AND tool = $2 AND agent = $3 AND fingerprint = $4"


class PostgresApprovals:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return "PostgresApprovals(...)"  # the DSN may hold a password

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=4, command_timeout=TIMEOUT_S, timeout=TIMEOUT_S
            )
            async with self._connection() as conn:
                await migrate_postgres(conn, COMPONENT, MIGRATIONS, "approvals")
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"cannot open the PostgreSQL approvals: {exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), TIMEOUT_S)
            except _DRIVER_ERRORS:
                pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL approvals store is not open")
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async with self._pool.acquire() as conn:
                    yield conn
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the PostgreSQL approvals store failed: {exc!r}") from exc

    async def request(self, approval: Approval) -> Approval:
        identity = (approval.kind.value, approval.tool, approval.agent, approval.fingerprint)
        row = to_row(approval)
        placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
        async with self._connection() as conn, conn.transaction():
            rejected = await conn.fetchrow(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE {IDENTITY} "
                "AND state = 'rejected' AND expires > $5 ORDER BY decided_at DESC LIMIT 1",
                *identity,
                time.time(),
            )
            if rejected is not None:
                return from_row(rejected)
            await conn.execute(
                f"UPDATE handrail_approvals SET state = 'expired' "
                f"WHERE {IDENTITY} AND {OPEN} AND expires <= $5",
                *identity,
                time.time(),
            )
            await conn.execute(
                f"INSERT INTO handrail_approvals ({COLUMNS}) VALUES ({placeholders}) "
                "ON CONFLICT DO NOTHING",
                *row,
            )
            found = await conn.fetchrow(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE {IDENTITY} AND {OPEN}",
                *identity,
            )
        return from_row(found)

    async def get(self, approval_id: str) -> Approval | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE id = $1", approval_id
            )
        return None if row is None else from_row(row)

    async def list(self, state: State | None, limit: int) -> list[Approval]:
        now = time.time()
        if state is None:
            where, params = "true", ()
        elif state is State.EXPIRED:
            where, params = f"(state = 'expired' OR ({OPEN} AND expires <= $1))", (now,)
        elif state in (State.PENDING, State.APPROVED):
            where, params = "state = $1 AND expires > $2", (state.value, now)
        else:
            where, params = "state = $1", (state.value,)
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE {where} "
                f"ORDER BY created DESC LIMIT ${len(params) + 1}",
                *params,
                limit,
            )
        return [from_row(r) for r in rows]

    async def decide(
        self, approval_id: str, approve: bool, by: str, reason: str | None
    ) -> tuple[Approval | None, bool]:
        state = State.APPROVED if approve else State.REJECTED
        now = time.time()
        async with self._connection() as conn:
            changed = await conn.execute(
                "UPDATE handrail_approvals SET state = $1, decided_by = $2, decided_at = $3, "
                "reason = $4 WHERE id = $5 AND state = 'pending' AND expires > $3",
                state.value,
                by,
                now,
                reason,
                approval_id,
            )
            row = await conn.fetchrow(
                f"SELECT {COLUMNS} FROM handrail_approvals WHERE id = $1", approval_id
            )
        return (None if row is None else from_row(row)), changed.endswith(" 1")

    async def use(self, approval_id: str) -> bool:
        now = time.time()
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE handrail_approvals SET state = 'used', used_at = $1 "
                "WHERE id = $2 AND state = 'approved' AND expires > $1",
                now,
                approval_id,
            )
        return bool(status.endswith(" 1"))

    async def pin(self, server: str, name: str, digest: str, definition: dict[str, Any]) -> str:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO handrail_pins (server, name, digest, definition, pinned_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                server,
                name,
                digest,
                json.dumps(definition, sort_keys=True),
                time.time(),
            )
            return str(
                await conn.fetchval(
                    "SELECT digest FROM handrail_pins WHERE server = $1 AND name = $2",
                    server,
                    name,
                )
            )

    async def pinned(self, server: str, name: str) -> tuple[str, dict[str, Any]] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT digest, definition FROM handrail_pins WHERE server = $1 AND name = $2",
                server,
                name,
            )
        return None if row is None else (str(row[0]), json.loads(row[1]))

    async def repin(self, server: str, name: str, digest: str, definition: dict[str, Any]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO handrail_pins (server, name, digest, definition, pinned_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server, name) DO UPDATE SET "
                "digest = EXCLUDED.digest, definition = EXCLUDED.definition, "
                "pinned_at = EXCLUDED.pinned_at",
                server,
                name,
                digest,
                json.dumps(definition, sort_keys=True),
                time.time(),
            )
