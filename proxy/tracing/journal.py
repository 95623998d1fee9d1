"""The local journal: every call written down beside the store, whatever OTLP does.

``append`` runs on the call path, so it only builds the row and puts it on a bounded
queue; a background task writes batches (one transaction each) every ``FLUSH_S`` or
``BATCH`` rows. A full queue drops the row and counts it
(``handrail_trace_export_dropped{sink="journal"}``): the journal never slows a call down.
Retention (``tracing.journal``: ``retention_days``, ``max_rows``) is enforced by the same
task. The database itself is one backend module per driver: ``journal_sqlite`` (a file of
its own beside the store's, ``handrail-journal.db``, so journal batches never take the
store's write lock) and ``journal_postgres`` (the store's database); ``journal_from_config``
in the package picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from proxy.call import Call
from proxy.config import CaptureConfig, JournalConfig
from proxy.metrics import Metrics
from proxy.tracing.attributes import captured, final_status, redactor_for
from proxy.tracing.base import CallQuery

logger = logging.getLogger(__name__)

COMPONENT = "journal"
TABLE = "handrail_journal"
JOURNAL_SINK = "journal"

QUEUE_SIZE = 10_000
BATCH = 256
FLUSH_S = 0.1
RETENTION_EVERY_S = 60.0
CLOSE_TIMEOUT_S = 5.0
WARN_EVERY_S = 60.0

COLUMNS: tuple[str, ...] = (
    "time",
    "tool",
    "kind",
    "agent",
    "run_id",
    "trace_id",
    "span_id",
    "method",
    "path",
    "query",
    "call_name",
    "decision",
    "reasons",
    "decision_id",
    "idempotency_key",
    "fingerprint",
    "replayed",
    "status",
    "error_code",
    "total_ms",
    "policy_ms",
    "upstream_ms",
    "input",
    "output",
)
"""The row's columns in order; ``id`` (insertion order) is added by the database."""

Row = tuple[Any, ...]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def journal_row(call: Call, capture: CaptureConfig) -> Row:
    """The journal's facts about a finished call, in ``COLUMNS`` order: pure."""
    input_value, output_value = captured(call, capture)
    decision = call.decision
    timings = call.timings
    query = redactor_for(call, capture).text(call.query_string) if call.query_string else None
    return (
        timings.started_wall,
        call.tool_name,
        call.tool.kind,
        call.agent_id,
        call.run_id,
        call.trace_id,
        call.span_id,
        call.method,
        call.path,
        query,
        call.mcp.name if call.mcp is not None else None,
        decision.kind.value if decision is not None else None,
        json.dumps(list(decision.reasons)) if decision is not None else None,
        decision.decision_id if decision is not None else None,
        call.idempotency_key,
        call.fingerprint,
        call.replayed,
        final_status(call),
        call.error.code if call.error is not None else None,
        _ms(timings.total_s),
        _ms(timings.policy_s),
        _ms(timings.upstream_s),
        input_value,
        output_value,
    )


def iso_time(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def row_dict(record: Any) -> dict[str, Any]:
    """A stored row (mapping of column to value, plus ``id``) as the JSON that users see."""
    reasons = record["reasons"]
    return {
        "id": record["id"],
        "time": iso_time(record["time"]),
        "tool": record["tool"],
        "kind": record["kind"],
        "agent": record["agent"],
        "run": record["run_id"],
        "trace_id": record["trace_id"],
        "span_id": record["span_id"],
        "method": record["method"],
        "path": record["path"],
        "query": record["query"],
        "call": record["call_name"],
        "decision": record["decision"],
        "reasons": json.loads(reasons) if reasons else [],
        "decision_id": record["decision_id"],
        "idempotency_key": record["idempotency_key"],
        "fingerprint": record["fingerprint"],
        "replayed": bool(record["replayed"]),
        "status": record["status"],
        "error": record["error_code"],
        "total_ms": record["total_ms"],
        "policy_ms": record["policy_ms"],
        "upstream_ms": record["upstream_ms"],
        "input": record["input"],
        "output": record["output"],
    }


@dataclass(frozen=True, slots=True)
class Where:
    """A query's filters, in ``COLUMNS`` terms, for the backends to render."""

    run_id: str | None
    tool: str | None
    decision: str | None
    since: float | None
    limit: int

    @classmethod
    def of(cls, query: CallQuery) -> Where:
        return cls(query.run_id, query.tool, query.decision, query.since, max(1, query.limit))


class JournalDb(Protocol):
    """One database driver's part: schema, batched insert, query, retention."""

    async def open(self, *, create: bool) -> bool:
        """Connect (and with ``create``, make or migrate the schema); false: nothing there."""

    async def close(self) -> None: ...

    async def insert(self, rows: Sequence[Row]) -> None:
        """Insert every row in one transaction."""

    async def select(self, where: Where) -> list[dict[str, Any]]:
        """Rows matching ``where``, newest first, as ``row_dict`` gives them."""

    async def purge(self, older_than: float, max_rows: int) -> int:
        """Delete rows older than ``older_than`` and all but the newest ``max_rows``."""


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
    """The ``Journal``: a bounded queue in front of a ``JournalDb``, written in batches."""

    def __init__(
        self,
        db: JournalDb,
        capture: CaptureConfig,
        retention: JournalConfig,
        metrics: Metrics,
        *,
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
        self._queue: asyncio.Queue[Row] = asyncio.Queue(maxsize=queue_size)
        self._batch = batch
        self._flush_s = flush_s
        self._wants_writer = writer
        self._wake = asyncio.Event()
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
            await self.purge()
            self._task = asyncio.create_task(self._write_forever(), name="handrail-journal")
            self._purge_task = asyncio.create_task(
                self._purge_forever(), name="handrail-journal-retention"
            )

    async def close(self) -> None:
        """Write what is queued (for up to ``CLOSE_TIMEOUT_S``), then disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._purge_task is not None:
            self._purge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge_task
            self._purge_task = None
        if self._task is not None:
            try:
                await asyncio.wait_for(self.flush(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                self._warner.warn("journal: could not write every queued call before closing")
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lost = self._queue.qsize()
        if lost:
            self._drop(lost)
        if self._opened:
            await self.db.close()

    def begin(self, call: Call) -> None:
        """The call's write-ahead entry (not yet durable: see the spool)."""

    def append(self, call: Call) -> None:
        """Queue the call's row; never blocks or raises on the call path."""
        if self._closed:
            self._drop(1)
            return
        try:
            row = journal_row(call, self._capture)
        except Exception:  # a bug here must not fail the call
            logger.exception("journal: could not build the row for a call")
            self._drop(1)
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self._drop(1)
            self._warner.warn("journal: the write queue is full, dropping calls")
            return
        if self._queue.qsize() >= self._batch:
            self._wake.set()

    async def flush(self) -> None:
        """Return once everything queued so far is written (or dropped)."""
        if self._task is None or self._task.done():
            return
        self._wake.set()
        await self._queue.join()

    async def query(self, query: CallQuery) -> list[dict[str, Any]]:
        """Recorded calls, newest first, as JSON-ready dicts."""
        if not self._opened:
            await self.open()
        if not self._present:
            return []
        return await self.db.select(Where.of(query))

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

    async def _write_forever(self) -> None:
        while True:
            first = await self._queue.get()
            if self._queue.qsize() + 1 < self._batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_s)
            rows = [first]
            while len(rows) < self._batch and not self._queue.empty():
                rows.append(self._queue.get_nowait())
            try:
                await self.db.insert(rows)
            except asyncio.CancelledError:
                self._drop(len(rows))
                raise
            except Exception as exc:
                self._drop(len(rows))
                self._warner.warn("journal: could not write %d calls: %s", len(rows), exc)
            finally:
                for _ in rows:
                    self._queue.task_done()

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(self._purge_every_s)
            await self.purge()
