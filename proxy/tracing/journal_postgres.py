"""The journal in the shared PostgreSQL database (the store's URL), on a small asyncpg pool."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from proxy.migrations import SCHEMA_LOCK, Migrations, migrate_postgres
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
    (
        4,
        (  # the call's outcome and result check; the hash chain (older rows: NULL, unchained)
            f"ALTER TABLE {TABLE} ADD COLUMN outcome text, ADD COLUMN result_check text, "
            "ADD COLUMN result_reasons text, ADD COLUMN chain text, ADD COLUMN seq bigint, "
            "ADD COLUMN prev_hash text, ADD COLUMN hash text",
            f"CREATE UNIQUE INDEX {TABLE}_chain_seq ON {TABLE} (chain, seq)",
            f"""CREATE TABLE {CHAIN_TABLE} (
                chain text PRIMARY KEY,
                started double precision NOT NULL,
                updated double precision NOT NULL,
                head_seq bigint NOT NULL,
                head_hash text NOT NULL,
                anchor_seq bigint NOT NULL,
                anchor_hash text NOT NULL
            )""",
        ),
    ),
    (
        5,
        (  # what replay needs: the policy input as decided; the shadow policy's decision
            f"ALTER TABLE {TABLE} ADD COLUMN policy_input text",
            f"ALTER TABLE {TABLE} ADD COLUMN shadow text",
        ),
    ),
)

_STORED = (*INSERT_COLUMNS, *CHAIN_COLUMNS)
_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(_STORED)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_STORED) + 1))})"
)
_EXISTING = f"SELECT uid FROM {TABLE} WHERE uid = ANY($1::text[])"
_HEAD = f"SELECT head_seq, head_hash FROM {CHAIN_TABLE} WHERE chain = $1"
_REGISTER = (
    f"INSERT INTO {CHAIN_TABLE} "
    "(chain, started, updated, head_seq, head_hash, anchor_seq, anchor_hash) "
    "VALUES ($1, $2, $2, 0, $3, 0, $3) ON CONFLICT (chain) DO NOTHING"
)
_MOVE_HEAD = (
    f"UPDATE {CHAIN_TABLE} SET head_seq = $1, head_hash = $2, updated = $3 "
    "WHERE chain = $4 AND head_seq = $5"
)
_LAST = f"SELECT seq, hash FROM {TABLE} WHERE chain = $1 ORDER BY seq DESC LIMIT 1"
_LAST_BEFORE = (
    f"SELECT seq, hash FROM {TABLE} WHERE chain = $1 AND seq < $2 ORDER BY seq DESC LIMIT 1"
)
_CHAINED = (
    f"SELECT id, {', '.join(_STORED)} FROM {TABLE} WHERE chain IS NOT NULL ORDER BY chain, seq"
)
PURGE_LOCK = SCHEMA_LOCK + 1
"""``pg_try_advisory_xact_lock`` key: one replica applies retention at a time."""
VERIFY_CHUNK = 500
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class PostgresJournalDb:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.chain = new_chain_id()
        """This writer's hash chain (each replica has its own)."""
        self._pool: asyncpg.Pool | None = None
        self._head: Head | None = None
        """The chain's head after this writer's last commit; None: read it in the next."""

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
        """One transaction: skip uids already there, link the rest onto the chain's head
        (compare-and-set on its entry), insert them."""
        padded_rows = [padded(r) for r in rows]
        try:
            async with self._pool_or_fail().acquire() as conn, conn.transaction():
                head = await self._insert_new(conn, padded_rows)
        except BaseException:
            self._head = None
            raise
        if head is not None:
            self._head = head

    async def _insert_new(self, conn: Any, rows: list[Row]) -> Head | None:
        there = {r[0] for r in await conn.fetch(_EXISTING, [row[0] for row in rows])}
        new: list[Row] = []
        for row in rows:
            if row[0] not in there:
                there.add(row[0])
                new.append(row)
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

    async def _read_head(self, conn: Any) -> Head:
        await conn.execute(_REGISTER, self.chain, time.time(), GENESIS)
        row = await conn.fetchrow(_HEAD, self.chain)
        return Head(int(row["head_seq"]), str(row["head_hash"]))

    async def _move_head(self, conn: Any, head: Head, after: Head) -> bool:
        status = await conn.execute(
            _MOVE_HEAD, after.seq, after.hash, time.time(), self.chain, head.seq
        )
        return _count(status) == 1

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
        """In one transaction, by one replica at a time: rows from before the chain by age
        and count, then each chain's longest prefix past either limit, its last row becoming
        the chain's anchor."""
        async with self._pool_or_fail().acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PURGE_LOCK):
                return 0  # another replica is at it
            over = await conn.fetchval(
                f"SELECT id FROM {TABLE} ORDER BY id DESC LIMIT 1 OFFSET $1", max_rows
            )
            over = int(over or 0)  # rows up to this id are past max_rows
            removed = _count(
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE chain IS NULL AND (time < $1 OR id <= $2)",
                    older_than,
                    over,
                )
            )
            chains = await conn.fetch(
                f"SELECT DISTINCT chain FROM {TABLE} "
                "WHERE chain IS NOT NULL AND (time < $1 OR id <= $2) ORDER BY chain",
                older_than,
                over,
            )
            for (chain,) in chains:
                bound = await conn.fetchval(
                    f"SELECT seq FROM {TABLE} WHERE chain = $1 AND time >= $2 AND id > $3 "
                    "ORDER BY seq LIMIT 1",
                    chain,
                    older_than,
                    over,
                )
                if bound is None:  # the whole chain goes
                    last = await conn.fetchrow(_LAST, chain)
                else:
                    last = await conn.fetchrow(_LAST_BEFORE, chain, bound)
                if last is None:
                    continue  # its oldest row is held back by a newer one before it
                await conn.execute(
                    f"UPDATE {CHAIN_TABLE} SET anchor_seq = $1, anchor_hash = $2 "
                    "WHERE chain = $3 AND anchor_seq < $1",
                    last["seq"],
                    last["hash"],
                    chain,
                )
                removed += _count(
                    await conn.execute(
                        f"DELETE FROM {TABLE} WHERE chain = $1 AND seq <= $2", chain, last["seq"]
                    )
                )
            await conn.execute(  # chains with nothing left, long idle
                f"DELETE FROM {CHAIN_TABLE} WHERE anchor_seq = head_seq AND updated < $1",
                older_than,
            )
        return removed

    async def verify(self) -> VerifyReport:
        """Walk the chains in one read-only snapshot (repeatable read) with a cursor;
        hashing runs off the event loop."""
        async with (
            self._pool_or_fail().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", CHAIN_TABLE):
                count = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
                return VerifyReport(unchained=int(count))  # a journal from before the chain
            entries = entries_from(await conn.fetch(f"SELECT * FROM {CHAIN_TABLE}"))
            count = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE chain IS NULL")
            walk = ChainWalk.over(entries)
            chunk: list[Any] = []
            async for record in conn.cursor(_CHAINED, prefetch=VERIFY_CHUNK):
                chunk.append(record)
                if len(chunk) >= VERIFY_CHUNK:
                    await asyncio.to_thread(walk.feed_all, chunk)
                    chunk = []
            walk.feed_all(chunk)
            return walk.report(unchained=int(count))


def _count(status: str) -> int:
    """``DELETE 12`` -> 12."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0
