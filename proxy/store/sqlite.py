"""The single-node store: idempotency records and run counters in one SQLite file.

Statements run synchronously on the event loop's thread (stdlib ``sqlite3``, one connection,
autocommit, WAL, ``synchronous=NORMAL``). That is deliberate: each hot-path operation is one
small statement on an indexed row whose commit only appends to the WAL (no fsync), 5-20 µs,
while a hop to a worker thread (aiosqlite) costs ~45 µs and far more under load, as the
threads fight over the GIL. What bounds the time one statement can hold the loop:

- ``busy_timeout=0``: a lock held elsewhere (another process, a purge, a checkpoint) fails
  the statement at once with SQLITE_BUSY; it is retried after ``asyncio.sleep`` (1 ms,
  doubling to 50 ms) for ``busy_timeout_ms`` in all, then ``StoreUnavailable``. The loop
  never waits inside SQLite.
- ``wal_autocheckpoint=0``: a commit never copies the WAL into the database. A daemon thread
  with its own connection checkpoints every ``checkpoint_every_s`` (PASSIVE; TRUNCATE once
  the WAL passes ``wal_limit_bytes``).
- Opening (migrations), purging (batched deletes) and storing a response larger than
  ``SIDE_BODY_BYTES`` run in one worker thread on a connection of its own.

So a statement costs its own work: a few B-tree pages and at most one stored response of up
to ``SIDE_BODY_BYTES`` written, or ``max_stored_bytes`` read back on a replay, from the OS
page cache. Every operation is one statement, atomic on its own; several processes may share
the file. Timestamps are this host's ``time.time()``.

Group commit: a commit's fixed cost (WAL frame writes, lock calls) is most of a small
statement's. The first statement in a turn of the event loop runs at once, in its own
transaction, as above (and so do the next ones of the same task); the statements that other
calls issue later in the same turn wait for the turn's end and run together in one
``BEGIN IMMEDIATE`` ... ``COMMIT`` (``_end_turn``).
None of them sees its result before that commit: a claim is never acted on before it is
durable. A busy lock or a failed commit sends the batch back to one statement at a time,
with the waiting described above. At one call at a time no batch forms and nothing changes;
at 32 concurrent calls the store's work per call falls by about a half
(``bench/store_bench.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from proxy.call import Claim, ClaimState, RunCounters, StoredResponse, UnknownReason
from proxy.errors import StoreUnavailable
from proxy.store.records import KeyRecord, Next, Record, encode_headers, read_claim
from proxy.store.sqlite_schema import (
    CLAIM,
    CLOSE_RUN,
    CLOSED_RUN,
    COMPLETE,
    EXTEND,
    INSPECT,
    MARK_STALE,
    MARK_UNKNOWN,
    PING,
    READ,
    REFUND,
    RELEASE,
    RESERVE,
    RESOLVE_ANSWER,
    RESOLVE_FAILED,
    RUN_COUNTERS,
    UNKNOWN_KEYS,
    migrate,
    purge,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Params = Sequence[Any] | dict[str, Any]
_Op = tuple[str, "Params", Callable[[sqlite3.Cursor], Any], "asyncio.Future[Any]"]

RUN_TTL_S = 7 * 86400.0
BUSY_TIMEOUT_MS = 5000
CHECKPOINT_EVERY_S = 0.5
WAL_LIMIT_BYTES = 64 * 1024 * 1024
SIDE_BODY_BYTES = 64 * 1024
_CLAIM_ATTEMPTS = 5
_BUSY_FIRST_S = 0.001
_BUSY_MAX_S = 0.05
_CHECKPOINT_BUSY_MS = 100
_RESTART_FRAMES = 1000  # SQLite's own autocheckpoint size, 4 MB of 4 KB pages
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


@contextmanager
def _mapped() -> Iterator[None]:
    """Driver failures become ``StoreUnavailable``: the call is refused, never run unguarded."""
    try:
        yield
    except (sqlite3.Error, ValueError, OSError) as exc:
        raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _BUSY_CODES


def _rows(cursor: sqlite3.Cursor) -> list[Any]:
    return cursor.fetchall()


def _rowcount(cursor: sqlite3.Cursor) -> int:
    return cursor.rowcount


def _settle(future: asyncio.Future[Any], value: Any, failure: BaseException | None) -> None:
    """Hand a batched statement's outcome to its caller (gone already if it was cancelled)."""
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(value)


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch to WAL, retrying while another opener holds the lock.

    SQLite answers a concurrent journal-mode change with "database is locked" at once,
    without its busy handler, so replicas starting together would fail. This runs in the
    open thread, so sleeping here never stalls the event loop.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database off the loop, so the WAL stays small."""

    def __init__(self, path: str, every_s: float, wal_limit_bytes: int) -> None:
        super().__init__(name="handrail-store-checkpoint", daemon=True)
        self.path = path
        self.every_s = every_s
        self.wal_limit_bytes = wal_limit_bytes
        self._stopping = threading.Event()
        self._failing = False

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stopping.wait(self.every_s):
                try:
                    conn = conn or _connect(self.path, _CHECKPOINT_BUSY_MS)
                    self.checkpoint(conn)
                    self._failing = False
                except sqlite3.Error as exc:
                    if not self._failing:
                        logger.warning("could not checkpoint the SQLite store's WAL: %s", exc)
                    self._failing = True
        finally:
            if conn is not None:
                conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        """PASSIVE copies the WAL without blocking writers; what they appended meanwhile is
        then copied by a RESTART (TRUNCATE past ``wal_limit_bytes``), which holds writers off
        for that short rest only and lets the next commit start the WAL from its beginning."""
        _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        try:
            wal_bytes = os.path.getsize(self.path + "-wal")
        except OSError:
            wal_bytes = 0
        if wal_bytes > self.wal_limit_bytes:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        elif copied < frames or frames >= _RESTART_FRAMES:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()


class SqliteStore:
    """The default store, for one host (several processes may share the file)."""

    def __init__(
        self,
        path: str | Path,
        *,
        run_ttl_s: float = RUN_TTL_S,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        checkpoint_every_s: float = CHECKPOINT_EVERY_S,
        wal_limit_bytes: int = WAL_LIMIT_BYTES,
    ) -> None:
        self.path = str(path)
        self.run_ttl_s = run_ttl_s
        self.busy_timeout_ms = busy_timeout_ms
        self.checkpoint_every_s = checkpoint_every_s
        self.wal_limit_bytes = wal_limit_bytes
        self._memory = self.path == ":memory:"
        self._conn: sqlite3.Connection | None = None
        self._side: ThreadPoolExecutor | None = None
        self._side_conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._turn_open = False
        """A statement already ran in this turn of the loop: other tasks' join ``_batch``."""
        self._turn_task: asyncio.Task[Any] | None = None
        self._batch: list[_Op] = []
        self._retries: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    async def open(self) -> None:
        if self._conn is not None:
            return
        side = ThreadPoolExecutor(1, thread_name_prefix="handrail-store")
        try:
            with _mapped():
                conn = await asyncio.get_running_loop().run_in_executor(side, self._open_sync)
        except BaseException:
            side.shutdown(wait=False)
            raise
        self._conn, self._side = conn, side
        if not self._memory:
            self._checkpointer = _Checkpointer(
                self.path, self.checkpoint_every_s, self.wal_limit_bytes
            )
            self._checkpointer.start()

    def _open_sync(self) -> sqlite3.Connection:
        if not self._memory and not self.path.startswith("file:"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path, self.busy_timeout_ms)
        try:
            _enable_wal(conn, self.busy_timeout_ms / 1000)
            conn.execute("PRAGMA synchronous = NORMAL")
            migrate(conn)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA busy_timeout = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        for retry in list(self._retries):  # statements still waiting for a lock: refused
            retry.cancel()
        conn, self._conn = self._conn, None
        side, self._side = self._side, None
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
            await asyncio.to_thread(checkpointer.join)
        if side is not None:
            await asyncio.get_running_loop().run_in_executor(side, self._close_side_sync, conn)
            side.shutdown(wait=False)

    def _close_side_sync(self, conn: sqlite3.Connection | None) -> None:
        side_conn, self._side_conn = self._side_conn, None
        for each in (side_conn, conn):
            if each is not None:
                try:
                    each.close()
                except sqlite3.Error as exc:
                    logger.warning("closing the SQLite store: %s", exc)

    def _loop_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        return self._conn

    async def _fetch(self, sql: str, params: Params) -> list[Any]:
        return await self._run(sql, params, _rows)

    async def _changes(self, sql: str, params: Params) -> int:
        """How many rows an UPDATE or DELETE touched: one step, no RETURNING rows to fetch."""
        return await self._run(sql, params, _rowcount)

    async def _run(self, sql: str, params: Params, read: Callable[[sqlite3.Cursor], T]) -> T:
        """One statement on the loop's connection; a busy database is waited for, asleep.

        The turn's first statement runs now; later ones in the same turn are committed
        together when it ends (the module's "group commit").
        """
        task = asyncio.current_task()
        if self._turn_open and task is not self._turn_task:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._batch.append((sql, params, read, future))
            return await future
        self._turn_task = task  # its next statement in this turn may run at once too
        if not self._turn_open:
            self._turn_open = True
            asyncio.get_running_loop().call_soon(self._end_turn)
        try:
            return read(self._loop_conn().execute(sql, params))
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc
        except (ValueError, OSError) as exc:
            raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc
        return await self._run_when_free(sql, params, read)

    async def _run_when_free(
        self, sql: str, params: Params, read: Callable[[sqlite3.Cursor], T]
    ) -> T:
        deadline = time.monotonic() + self.busy_timeout_ms / 1000.0
        delay = _BUSY_FIRST_S
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, _BUSY_MAX_S)
            try:
                return read(self._loop_conn().execute(sql, params))
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc
            except (ValueError, OSError) as exc:
                raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc
        raise StoreUnavailable(
            f"the SQLite store stayed locked for {self.busy_timeout_ms} ms (busy)"
        )

    def _end_turn(self) -> None:
        self._turn_open = False
        self._turn_task = None
        batch, self._batch = self._batch, []
        if len(batch) == 1:
            self._run_one(batch[0])
        elif batch:
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Op]) -> None:
        """The batch in one transaction; results are handed out only once it is committed."""
        conn = self._conn
        if conn is None:
            for op in batch:
                _settle(op[3], None, StoreUnavailable("the SQLite store is not open"))
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, ValueError, OSError):
            for op in batch:  # locked elsewhere (or worse): one at a time, each with its wait
                self._run_one(op)
            return
        outcomes: list[tuple[asyncio.Future[Any], Any, StoreUnavailable | None]] = []
        try:
            for sql, params, read, future in batch:
                try:
                    outcomes.append((future, read(conn.execute(sql, params)), None))
                except sqlite3.Error as exc:
                    if _is_busy(exc) or not conn.in_transaction:
                        raise  # the transaction is lost: start over without it
                    failure = StoreUnavailable(f"the SQLite store failed: {exc}")
                    outcomes.append((future, None, failure))
                except (ValueError, OSError) as exc:
                    failure = StoreUnavailable(f"the SQLite store failed: {exc}")
                    outcomes.append((future, None, failure))
            conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, OSError):
            with contextlib.suppress(sqlite3.Error, ValueError, OSError):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for op in batch:
                self._run_one(op)
            return
        for future, value, outcome in outcomes:
            _settle(future, value, outcome)

    def _run_one(self, op: _Op) -> None:
        """One batched statement on its own, as ``_run`` runs the turn's first one."""
        sql, params, read, future = op
        try:
            _settle(future, read(self._loop_conn().execute(sql, params)), None)
            return
        except StoreUnavailable as exc:
            _settle(future, None, exc)
            return
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                _settle(future, None, StoreUnavailable(f"the SQLite store failed: {exc}"))
                return
        except (ValueError, OSError) as exc:
            _settle(future, None, StoreUnavailable(f"the SQLite store failed: {exc}"))
            return
        retry = asyncio.ensure_future(self._run_when_free(sql, params, read))
        self._retries.add(retry)
        retry.add_done_callback(lambda task: self._retried(task, future))

    def _retried(self, task: asyncio.Task[Any], future: asyncio.Future[Any]) -> None:
        self._retries.discard(task)
        if task.cancelled():
            _settle(future, None, StoreUnavailable("the SQLite store is closing"))
        elif (exc := task.exception()) is not None:
            failure = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            _settle(future, None, failure)
        else:
            _settle(future, task.result(), None)

    async def _aside(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in the worker thread on its own connection (which may wait when busy)."""
        if self._memory:  # another connection would be another database
            with _mapped():
                return work(self._loop_conn())
        side = self._side
        if side is None or self._conn is None:
            raise StoreUnavailable("the SQLite store is not open")

        def run() -> T:
            if self._side_conn is None:
                self._side_conn = _connect(self.path, self.busy_timeout_ms)
            return work(self._side_conn)

        with _mapped():
            return await asyncio.get_running_loop().run_in_executor(side, run)

    async def ping(self) -> None:
        """A real write: a full disk or a read-only file makes the store not ready."""
        await self._changes(PING, (time.time(),))

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
                "takeover": int(takeover),
            }
            if rows := await self._fetch(CLAIM, params):
                return Claim(ClaimState.OWNED, owner=owner, resent=rows[0][0] > 1)
            rows = await self._fetch(READ, {"tool": tool, "key": key, "now": now})
            record = Record(*rows[0]) if rows else None
            answer = read_claim(record, fingerprint, owner, takeover)
            if answer is Next.MARK_STALE:
                assert record is not None
                if await self._changes(MARK_STALE, (tool, key, record.owner, now)):
                    return Claim(ClaimState.UNKNOWN, reason=UnknownReason.LEASE_EXPIRED)
                continue
            if isinstance(answer, Claim):
                return answer
        raise StoreUnavailable(f"could not settle a claim on key {key!r} (too much contention)")

    async def complete(
        self,
        tool: str,
        key: str,
        owner: str,
        response: StoredResponse,
        *,
        keep_s: float | None = None,
    ) -> bool:
        params = (
            response.status,
            encode_headers(response.headers),
            response.body,
            int(response.complete),
            None if keep_s is None else time.time() + keep_s,
            tool,
            key,
            owner,
        )
        if len(response.body) > SIDE_BODY_BYTES:
            done = await self._aside(lambda conn: conn.execute(COMPLETE, params).rowcount)
        else:
            done = await self._changes(COMPLETE, params)
        return bool(done)

    async def release(self, tool: str, key: str, owner: str) -> bool:
        return bool(await self._changes(RELEASE, (tool, key, owner)))

    async def mark_unknown(self, tool: str, key: str, owner: str, reason: str) -> bool:
        return bool(await self._changes(MARK_UNKNOWN, (reason, tool, key, owner)))

    async def extend(self, tool: str, key: str, owner: str, lease_s: float) -> bool:
        return bool(await self._changes(EXTEND, (time.time() + lease_s, tool, key, owner)))

    async def inspect(self, tool: str, key: str) -> KeyRecord | None:
        rows = await self._fetch(INSPECT, {"tool": tool, "key": key, "now": time.time()})
        return KeyRecord(*rows[0]) if rows else None

    async def unknown_keys(self, limit: int) -> list[KeyRecord]:
        rows = await self._fetch(UNKNOWN_KEYS, {"now": time.time(), "limit": limit})
        return [KeyRecord(*row) for row in rows]

    async def resolve(self, tool: str, key: str, response: StoredResponse | None) -> str | None:
        before = await self.inspect(tool, key)
        if before is None or before.state != "unknown":
            return before.state if before is not None else None
        params: dict[str, Any] = {"tool": tool, "key": key, "now": time.time()}
        if response is None:
            await self._changes(RESOLVE_FAILED, params)
        else:
            params.update(
                status=response.status,
                headers=encode_headers(response.headers),
                body=response.body,
            )
            await self._changes(RESOLVE_ANSWER, params)
        return before.state

    async def purge_expired(self) -> int:
        """Delete expired idempotency records (returned) and runs idle for ``run_ttl_s``."""
        now = time.time()
        cutoffs = {
            "handrail_idempotency": now,
            "handrail_runs": now - self.run_ttl_s,
            "handrail_run_calls": now - self.run_ttl_s,
        }
        purged = await self._aside(lambda conn: purge(conn, cutoffs))
        if any(purged.values()):
            logger.info("purged expired store records: %s", purged)
        return purged["handrail_idempotency"]

    async def run_counters(self, run_id: str, call_fingerprint: str) -> RunCounters:
        rows = await self._fetch(RUN_COUNTERS, {"run": run_id, "fp": call_fingerprint})
        calls, writes, denied, repeats = rows[0]
        return RunCounters(
            calls=calls or 0, writes=writes or 0, denied=denied or 0, repeats=repeats or 0
        )

    async def reserve_call(
        self, run_id: str, call_fingerprint: str, *, write: bool, run: str = ""
    ) -> RunCounters:
        params = {
            "run": run_id,
            "write": int(write),
            "now": time.time(),
            "fp": call_fingerprint,
            "closed": run,
        }
        calls, writes, denied, repeats, closed = (await self._fetch(RESERVE, params))[0]
        return RunCounters(
            calls=calls, writes=writes, denied=denied, repeats=repeats or 0, closed=bool(closed)
        )

    async def close_run(self, run: str, by: str) -> bool:
        return bool(await self._changes(CLOSE_RUN, (run, time.time(), by)))

    async def closed_run(self, run: str) -> tuple[float, str] | None:
        rows = await self._fetch(CLOSED_RUN, (run,))
        return (float(rows[0][0]), str(rows[0][1])) if rows else None

    async def refund_call(self, run_id: str, *, write: bool) -> None:
        await self._changes(REFUND, (int(write), time.time(), run_id))
