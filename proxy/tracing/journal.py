"""The local journal: every call written down beside the store, whatever OTLP does.

No call is lost to a crash or to the database being away. ``begin`` (the call is decided)
and ``append`` (it ended) each write one line to the write-ahead spool (``spool``: files of
this process's own, one ``os.write`` each, no fsync: a power loss may lose the last ones);
``append`` then queues the row for a background task that inserts batches every ``FLUSH_S``
or ``BATCH`` rows, idempotently (``ON CONFLICT (uid) DO NOTHING``). A failed insert is
retried with backoff, never dropped (``handrail_journal_write_retries``); when the bounded
queue is full the row waits in the spool and is read back later. At start-up (and every
``RECOVER_EVERY_S``) a proxy inserts what dead proxies left in the spool, a call that never
ended as ``interrupted`` (``handrail_journal_recovered``). Only rows truly lost count in
``handrail_trace_export_dropped{sink="journal"}``: a torn spool line, a row the database
refuses, a row neither the spool nor the database took.

Cost on the call path, begin + append (timeit): ~3 µs before the spool, ~15 µs with it
for a 200-byte body, ~25 µs for a 4 KB one (the end line JSON-escapes the captured input
again), the captured input and output being already built for the span; counting their
capture and redaction too, ~17 -> ~31 µs and ~29 -> ~51 µs.

Each row carries the hash of the row before it (``chain``): the database part links each batch
onto this writer's chain as it inserts it, in insert order (recovered rows too), in the same
transaction, with one extra query per batch (the uids already there: a row taken twice must
not take two links); hashing costs a few µs per row, in the writer, off the call path.
``verify`` walks every chain.

Retention (``tracing.journal``) runs in a task of its own and prunes each chain from its start.
The database is one backend per driver: ``journal_sqlite`` (``handrail-journal.db`` beside the
store's file, so batches never take the store's write lock) and ``journal_postgres`` (the
store's database).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

from proxy.call import Call
from proxy.config import CaptureConfig, JournalConfig
from proxy.metrics import Metrics
from proxy.tracing.base import CallQuery, JournalDb, Row, Where, begin_row, journal_row
from proxy.tracing.chain import VerifyReport
from proxy.tracing.spool import (
    BEGIN,
    END,
    Segment,
    Spool,
    commit_entry,
    entry,
    read_uncommitted,
    take_dead,
)

logger = logging.getLogger(__name__)

JOURNAL_SINK = "journal"

QUEUE_SIZE = 10_000
BATCH = 256
FLUSH_S = 0.1
FLUSH_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
IDLE_S = 1.0
RETENTION_EVERY_S = 60.0
RECOVER_EVERY_S = 60.0
"""How often a running proxy looks for the spool of a proxy that died beside it."""
WARN_EVERY_S = 60.0

Pending = tuple[str, Row, Segment | None]
"""A queued row: its uid, its ``COLUMNS`` values, the spool segment holding it (if any)."""


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("journal: the writer stopped", exc_info=task.exception())


class _Warner:
    """Rate-limited warnings: a broken database must not flood the log."""

    def __init__(self) -> None:
        self._last = float("-inf")
        self._suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < WARN_EVERY_S:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        more = f" ({suppressed} similar warnings suppressed)" if suppressed else ""
        logger.warning(message + more, *args)


class SqlJournal:
    """The ``Journal``: a spool and a bounded queue in front of a ``JournalDb``.

    ``spool_dir`` None: no spool (an in-memory database, or a reader): a crash loses the
    queue, and a full queue drops rows, as the journal did before it had one.
    """

    def __init__(
        self,
        db: JournalDb,
        capture: CaptureConfig,
        retention: JournalConfig,
        metrics: Metrics,
        *,
        spool_dir: Path | None = None,
        queue_size: int = QUEUE_SIZE,
        batch: int = BATCH,
        flush_s: float = FLUSH_S,
        writer: bool = True,
        purge_every_s: float = RETENTION_EVERY_S,
    ) -> None:
        self.db = db
        self._capture = capture
        self._retention = retention
        self._dropped = metrics.export_dropped.labels(JOURNAL_SINK)
        self._retries = metrics.journal_retries
        self._recovered_rows = metrics.journal_recovered
        self._queue: deque[Pending] = deque()
        self._queue_size = queue_size
        self._inflight: list[Pending] = []
        self._batch = batch
        self._flush_s = flush_s
        self._wants_writer = writer
        self._spool_dir = spool_dir if writer else None
        self._spool: Spool | None = None
        self._begun: dict[str, bytes] = {}
        """Begin lines of calls in flight, carried into each new spool segment."""
        self._uid_prefix = secrets.token_hex(8) + "."
        self._uids = itertools.count(1)
        self._accepted = 0
        self._settled = 0
        self._has_rows = asyncio.Event()
        self._wake = asyncio.Event()
        self._urgent = False
        self._progress = asyncio.Event()
        self._recovered = asyncio.Event()
        self._next_recovery = 0.0
        self._task: asyncio.Task[None] | None = None
        self._purge_task: asyncio.Task[None] | None = None
        self._purge_every_s = purge_every_s
        self._opened = False
        self._present = False
        self._closed = False
        self._warner = _Warner()

    async def open(self) -> None:
        """Connect; the proxy creates or migrates the table, the CLI only reads what is there."""
        if self._opened:
            return
        self._present = await self.db.open(create=self._wants_writer)
        self._opened = True
        if self._wants_writer:
            if self._spool_dir is not None:
                await self._open_spool(self._spool_dir)
            await self.purge()
            self._task = asyncio.create_task(self._write_forever(), name="handrail-journal")
            self._task.add_done_callback(_report_crash)
            self._purge_task = asyncio.create_task(
                self._purge_forever(), name="handrail-journal-retention"
            )

    async def close(self) -> None:
        """Write what is queued (for up to ``CLOSE_TIMEOUT_S``), then disconnect; whatever
        the database does not have by then stays in the spool for the next proxy."""
        if self._closed:
            return
        self._closed = True
        if self._purge_task is not None:
            self._purge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge_task
            self._purge_task = None
        if self._task is not None:
            await self._flush(CLOSE_TIMEOUT_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lost = sum(1 for *_, segment in (*self._inflight, *self._queue) if segment is None)
        if lost:
            self._drop(lost)
        if self._spool is not None:
            spool, self._spool = self._spool, None
            await asyncio.to_thread(spool.close, calls_in_flight=bool(self._begun))
        if self._opened:
            await self.db.close()

    def begin(self, call: Call) -> None:
        """Write the call's entry ahead (one ``os.write``): from here it survives kill -9."""
        spool = self._spool
        if spool is None or self._closed:
            return
        try:
            uid = f"{self._uid_prefix}{next(self._uids):x}"
            line = entry(BEGIN, uid, begin_row(call))
        except Exception:  # a bug here must not fail the call
            logger.exception("journal: could not build the begin entry for a call")
            return
        call.journal_entry = uid
        spool.write(line)
        self._begun[uid] = line

    def append(self, call: Call) -> None:
        """Spool the call's row and queue it for the database; never blocks or raises."""
        if self._closed:
            self._drop(1)
            return
        uid = call.journal_entry
        if not isinstance(uid, str):  # refused before the policy: no begin
            uid = f"{self._uid_prefix}{next(self._uids):x}"
        try:
            row = journal_row(call, self._capture)
            line = entry(END, uid, row) if self._spool is not None else None
        except Exception:  # a bug here must not fail the call
            logger.exception("journal: could not build the row for a call")
            self._drop(1)
            return
        segment = None
        if line is not None and self._spool is not None:
            self._begun.pop(uid, None)
            segment = self._spool.write(line)
            if segment is not None:
                segment.rows += 1
        if len(self._queue) >= self._queue_size:
            if segment is None:
                self._drop(1)
                self._warner.warn("journal: the write queue is full, dropping calls")
                return
            segment.spilled += 1  # read back from the spool once the queue drains
        else:
            self._queue.append((uid, row, segment))
            self._has_rows.set()
            if len(self._queue) >= self._batch:
                self._wake.set()
        self._accepted += 1

    async def flush(self) -> None:
        """Return once every call appended so far is in the database, or after
        ``FLUSH_TIMEOUT_S`` (the database is away: the rows arrive later)."""
        await self._flush(FLUSH_TIMEOUT_S)

    async def query(self, query: CallQuery) -> list[dict[str, Any]]:
        """Recorded calls, newest first, as JSON-ready dicts."""
        if not self._opened:
            await self.open()
        if not self._present:
            return []
        return await self.db.select(Where.of(query))

    async def verify(self) -> VerifyReport:
        """Walk every hash chain in the database: the rows altered or deleted, if any."""
        if not self._opened:
            await self.open()
        if not self._present:
            return VerifyReport()
        return await self.db.verify()

    async def purge(self) -> int:
        """Apply the retention limits now; returns how many rows went."""
        if not self._present:
            return 0
        older_than = time.time() - self._retention.retention_days * 86400.0
        try:
            removed = await self.db.purge(older_than, self._retention.max_rows)
        except Exception as exc:
            self._warner.warn("journal: retention purge failed: %s", exc)
            return 0
        if removed:
            logger.info("journal: purged %d rows past retention", removed)
        return removed

    def _drop(self, count: int) -> None:
        self._dropped.inc(count)

    async def _open_spool(self, directory: Path) -> None:
        spool = Spool(directory, await self.db.identity(), self._begun.values)
        try:
            await asyncio.to_thread(spool.open)
        except OSError as exc:
            logger.error(
                "journal: no write-ahead spool in %s (calls may be lost): %s", directory, exc
            )
            return
        self._spool = spool

    async def _flush(self, timeout_s: float) -> None:
        if self._task is None or self._task.done():
            return
        target = self._accepted
        self._urgent = True
        self._wake.set()
        self._has_rows.set()
        try:
            async with asyncio.timeout(timeout_s):
                await self._recovered.wait()
                while self._settled < target:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            self._warner.warn("journal: %d calls not yet written", target - self._settled)

    async def _write_forever(self) -> None:
        try:
            await self._recover_dead()
        finally:
            self._recovered.set()
        while True:
            if not self._queue:
                self._has_rows.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_S):
                        await self._has_rows.wait()
            if self._queue and len(self._queue) < self._batch and not self._urgent:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_s):
                        await self._wake.wait()
            self._urgent = False
            if self._queue:
                count = min(len(self._queue), self._batch)
                self._inflight = [self._queue.popleft() for _ in range(count)]
                await self._insert([(uid, *row) for uid, row, _ in self._inflight])
                for _, _, segment in self._inflight:
                    if segment is not None:
                        segment.settled += 1
                self._settled_rows([uid for uid, _, _ in self._inflight], len(self._inflight))
                self._inflight = []
            try:
                await self._tend_spool()
            except OSError as exc:  # the spool's directory is unwell; the writer goes on
                self._warner.warn("journal: spool housekeeping failed: %s", exc)

    async def _insert(self, rows: list[Row]) -> None:
        """Insert until the database has the rows; only rows it refuses for good are lost."""
        delay = RETRY_FIRST_S
        while True:
            try:
                await self.db.insert(rows)
                return
            except Exception as exc:
                if self.db.refuses(exc):
                    if len(rows) == 1:
                        self._drop(1)
                        self._warner.warn("journal: the database refused a call's row: %s", exc)
                    else:  # find the culprit; the others go in
                        for row in rows:
                            await self._insert([row])
                    return
                self._retries.inc()
                self._warner.warn("journal: could not write %d calls, retrying: %s", len(rows), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _insert_spooled(self, rows: list[tuple[str, Row]]) -> None:
        """Insert rows read from the spool in batches, each marked committed once it is."""
        for start in range(0, len(rows), self._batch):
            chunk = rows[start : start + self._batch]
            await self._insert([(uid, *row) for uid, row in chunk])
            self._settled_rows([uid for uid, _ in chunk], 0)

    def _settled_rows(self, uids: list[str], count: int) -> None:
        """Mark rows committed in the spool (recovery skips them) and wake ``flush``."""
        if self._spool is not None and uids:
            self._spool.write(commit_entry(uids))
        self._settled += count
        self._progress.set()

    async def _tend_spool(self) -> None:
        """Read back spilled rows, delete finished segments, adopt the spool of dead proxies."""
        spool = self._spool
        if spool is None:
            return
        current = spool.current
        if current is not None and current.spilled and len(self._queue) < self._queue_size // 2:
            spool.rotate()  # so the spilled rows can be read back from a closed segment
        for segment in list(spool.segments):
            queued_settled = segment.settled + segment.spilled >= segment.rows
            if segment.closed and segment.spilled and queued_settled:
                await self._read_back(spool, segment)
        spool.collect(calls_in_flight=bool(self._begun))
        if time.monotonic() >= self._next_recovery:
            await self._recover_dead()

    async def _read_back(self, spool: Spool, segment: Segment) -> None:
        """Insert a closed segment's rows that never made it into the queue."""
        try:
            rows = await asyncio.to_thread(read_uncommitted, segment.path, spool.journal_id)
        except OSError as exc:
            logger.error("journal: cannot read back %s: %s", segment.path, exc)
            self._drop(segment.spilled)
        else:
            await self._insert_spooled(rows)
            self._recovered_rows.inc(segment.spilled)
        spilled, segment.spilled = segment.spilled, 0
        segment.settled += spilled
        self._settled_rows([], spilled)

    async def _recover_dead(self) -> None:
        """Insert the rows of proxies that died (with their calls in flight as interrupted)."""
        self._next_recovery = time.monotonic() + RECOVER_EVERY_S
        spool = self._spool
        if spool is None:
            return
        try:
            dead = await asyncio.to_thread(
                take_dead, spool.directory, spool.journal_id, spool.owner
            )
        except OSError as exc:
            self._warner.warn("journal: cannot look for spools to recover: %s", exc)
            return
        if dead is None:
            return
        done = False
        try:
            await self._insert_spooled(dead.rows)
            done = True
        finally:
            dead.release(delete=done)
        if dead.rows:
            self._recovered_rows.inc(len(dead.rows))
            logger.warning(
                "journal: recovered %d calls from the spool of a stopped proxy (%d interrupted)",
                len(dead.rows),
                dead.interrupted,
            )
        if dead.torn:
            self._drop(dead.torn)
            logger.warning("journal: %d torn spool entries could not be recovered", dead.torn)

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(self._purge_every_s)
            await self.purge()
