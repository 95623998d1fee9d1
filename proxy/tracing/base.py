"""The local journal seams: every call is written down, whatever the OTLP exporter does.

``Journal`` is what the pipeline sees; ``JournalDb`` is one database driver's part of it
(``journal_sqlite``, ``journal_postgres``); the row they share is built here (pure).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from proxy.call import Call
from proxy.config import CaptureConfig
from proxy.tracing.attributes import captured, final_status, redactor_for

if TYPE_CHECKING:
    from proxy.tracing.chain import VerifyReport

COMPONENT = "journal"
TABLE = "handrail_journal"
META_TABLE = "handrail_journal_meta"
"""One row: the journal's random id, which the write-ahead spool's files name."""

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
    "approval_id",
    "outcome",
    "result_check",
    "result_reasons",
    "policy_input",
    "shadow",
)
"""The row's columns in order; ``id`` (insertion order) is added by the database, and the
hash chain's (``chain.CHAIN_COLUMNS``) by the writer as it inserts."""

OUTCOMES = frozenset({"ok", "refused", "invalid_call", "tool_failure", "unknown"})
"""What ``outcome`` holds (``call.extra["outcome_class"]``); NULL: the call never ended."""
RESULT_CHECKS = frozenset({"passed", "redacted", "blocked", "unchecked"})
"""What ``result_check`` holds (``call.extra["result_check"]``); NULL: not recorded."""

INSERT_COLUMNS: tuple[str, ...] = ("uid", *COLUMNS)
"""What ``JournalDb.insert`` gets: the row's unique id (its spool entry's), then ``COLUMNS``."""

Row = tuple[Any, ...]


def padded(row: Row) -> Row:
    """A row written by an older proxy (a spool recovered after an upgrade) gets the
    columns added since as NULL."""
    missing = len(INSERT_COLUMNS) - len(row)
    return row + (None,) * missing if missing > 0 else row


INTERRUPTED = "interrupted"
"""The error code of a call whose proxy died before it ended (recovered from its begin)."""


@dataclass(frozen=True, slots=True)
class CallQuery:
    run_id: str | None = None
    tool: str | None = None
    decision: str | None = None
    since: float | None = None
    """Unix seconds."""
    limit: int = 100


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


class Journal(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None:
        """Flush what is queued, then close."""

    def begin(self, call: Call) -> None:
        """Write the call's entry ahead, once it is decided: it survives a crash mid-call."""

    def append(self, call: Call) -> None:
        """Queue the call's record; never blocks the call path."""

    async def flush(self) -> None: ...

    async def query(self, query: CallQuery) -> list[dict[str, Any]]:
        """Recorded calls, newest first, as JSON-ready dicts."""

    async def verify(self) -> VerifyReport:
        """Walk every hash chain: which rows were altered or deleted since they were written."""


class JournalDb(Protocol):
    """One database driver's part: schema, batched insert, query, retention, verification."""

    chain: str
    """The hash chain this instance writes (``chain.new_chain_id``): one per writer."""

    async def open(self, *, create: bool) -> bool:
        """Connect (and with ``create``, make or migrate the schema); false: nothing there."""

    async def close(self) -> None: ...

    async def identity(self) -> str:
        """The journal's id (``META_TABLE``): spool files are only replayed into their own."""

    async def insert(self, rows: Sequence[Row]) -> None:
        """Insert ``INSERT_COLUMNS`` rows in one transaction, linked in this order onto this
        writer's hash chain; a ``uid`` already there is skipped (and takes no link)."""

    def refuses(self, exc: BaseException) -> bool:
        """True when ``exc`` says the rows themselves are refused: retrying cannot help."""

    async def select(self, where: Where) -> list[dict[str, Any]]:
        """Rows matching ``where``, newest first, as ``row_dict`` gives them."""

    async def purge(self, older_than: float, max_rows: int) -> int:
        """Delete rows older than ``older_than`` and all but the newest ``max_rows``, each
        chain from its start only, keeping the last deleted row's hash as its anchor."""

    async def verify(self) -> VerifyReport:
        """Walk every chain from its anchor (one consistent snapshot)."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _head(call: Call, query: str | None) -> Row:
    """The columns a call has once it is decided, whether or not it ever ends."""
    decision = call.decision
    timings = call.timings
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
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value.value) if isinstance(value, Enum) else str(value)


def _reasons(value: Any) -> str | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return json.dumps([_text(item) for item in items])


def journal_row(call: Call, capture: CaptureConfig) -> Row:
    """The journal's facts about a finished call, in ``COLUMNS`` order: pure."""
    input_value, output_value = captured(call, capture)
    timings = call.timings
    query = redactor_for(call, capture).text(call.query_string) if call.query_string else None
    return (
        *_head(call, query),
        call.replayed,
        final_status(call),
        call.error.code if call.error is not None else None,
        _ms(timings.total_s),
        _ms(timings.policy_s),
        _ms(timings.upstream_s),
        input_value,
        output_value,
        call.extra.get("approval_id"),
        _text(call.extra.get("outcome_class")),
        _text(call.extra.get("result_check")),
        _reasons(call.extra.get("result_reasons")),
        _kept_input(call, capture),
        _shadow(call.extra.get("shadow")),
    )


def _kept_input(call: Call, capture: CaptureConfig) -> str | None:
    """The policy input as decided, for ``handrail replay`` (``proxy.replay.record``)."""
    document = call.extra.get("policy_input")
    if document is None:
        return None
    from proxy.replay.record import keep

    return keep(document, redactor_for(call, capture))


def _shadow(shadow: Any) -> str | None:
    return json.dumps(shadow, ensure_ascii=False) if shadow is not None else None


def begin_row(call: Call) -> Row:
    """The row a decided call leaves if it never ends: no status, ``interrupted``: pure."""
    return (
        *_head(call, None),
        False,
        None,
        INTERRUPTED,
        0.0,
        _ms(call.timings.policy_s),
        0.0,
        None,
        None,
        call.extra.get("approval_id"),
        None,
        None,
        None,
        None,
        None,
    )


def iso_time(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def row_dict(record: Any) -> dict[str, Any]:
    """A stored row (mapping of column to value, plus ``id``) as the JSON that users see."""
    reasons = record["reasons"]
    result_reasons = record["result_reasons"]
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
        "approval_id": record["approval_id"],
        "outcome": record["outcome"],
        "result_check": record["result_check"],
        "result_reasons": json.loads(result_reasons) if result_reasons else [],
        "policy_input": record["policy_input"],
        "shadow": json.loads(record["shadow"]) if record["shadow"] else None,
    }
