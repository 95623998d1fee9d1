"""A recorded run read back from the local journal, as typed calls in the order they began.

Each call carries what replay needs and says what it lacks: the policy input as decided
(``proxy.replay.record``), and the parts of it that were redacted, truncated or never
recorded (``Missing``), so that neither a what-if nor a re-execution works on partial data
without saying so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Config
from proxy.metrics import Metrics
from proxy.policy.refs import OPTIONAL_REQUEST_FIELDS
from proxy.replay.compare import Verdict
from proxy.replay.record import Kept, load
from proxy.tracing.base import INTERRUPTED, CallQuery

MAX_CALLS = 1_000_000
"""The most calls one query reads back."""

InputPath = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Missing:
    """A part of a call's policy input that replay does not have, and why."""

    path: InputPath
    why: str  # "redacted" | "truncated" | "not recorded" | "not in the trace"

    def describe(self) -> str:
        return f"input.{'.'.join(self.path)} ({self.why})" if self.path else f"input ({self.why})"


@dataclass(frozen=True, slots=True)
class RecordedCall:
    position: int
    """1-based, in the order the run's calls began."""
    run: str
    agent: str | None
    time: str
    tool: str
    kind: str
    method: str
    path: str
    query: str | None
    call: str | None
    """The MCP tool called, or ``None`` for plain HTTP."""
    verdict: Verdict | None
    """The live decision, or ``None``: the call was refused before the policy decided."""
    status: int | None
    error: str | None
    idempotency_key: str | None
    replayed: bool
    input: str | None
    """The captured input (body or MCP arguments): redacted, truncated, ``None`` if off."""
    output: str | None
    kept: Kept | None
    """The policy input as decided, or ``None`` (``lost`` says why)."""
    lost: str | None = None
    missing: tuple[Missing, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        """``crm POST /contacts/42`` or ``files.write_file``."""
        if self.call:
            return f"{self.tool}.{self.call}"
        query = f"?{self.query}" if self.query else ""
        return f"{self.tool} {self.method} {self.path}{query}"


@dataclass(frozen=True, slots=True)
class RecordedRun:
    run: str
    calls: tuple[RecordedCall, ...]


class UnknownRun(Exception):
    """A run with no recorded calls."""


def missing_parts(kept: Kept) -> tuple[Missing, ...]:
    """What the kept document lacks: its redacted and truncated paths, and the request's
    ``headers`` and ``query`` when the live policy did not read them (so they were not sent)."""
    parts = [Missing(tuple(p), "redacted") for p in kept.redacted]
    parts += [Missing(tuple(p), "truncated") for p in kept.truncated]
    request = kept.document.get("request")
    for name in sorted(OPTIONAL_REQUEST_FIELDS):
        if not isinstance(request, dict) or name not in request:
            parts.append(Missing(("request", name), "not recorded"))
    return tuple(parts)


def _lost(row: Mapping[str, Any]) -> str:
    if row.get("error") == INTERRUPTED:
        return "interrupted (its proxy stopped mid-call): no policy input was recorded"
    if row.get("policy_input"):
        return "its policy input was too large to keep"
    return "no policy input was recorded (a row from before replay existed)"


def _verdict(row: Mapping[str, Any]) -> Verdict | None:
    decision = row.get("decision")
    if not decision:
        return None
    try:
        return Verdict.parse(decision, row.get("reasons") or ())
    except ValueError:
        return None


def call_from_row(row: Mapping[str, Any], position: int) -> RecordedCall:
    """A journal row (``row_dict``) as a ``RecordedCall``."""
    kept = load(row.get("policy_input"))
    return RecordedCall(
        position=position,
        run=str(row["run"]),
        agent=row.get("agent"),
        time=str(row["time"]),
        tool=str(row["tool"]),
        kind=str(row.get("kind") or "http"),
        method=str(row["method"]),
        path=str(row["path"] or ""),
        query=row.get("query"),
        call=row.get("call"),
        verdict=_verdict(row),
        status=row.get("status"),
        error=row.get("error"),
        idempotency_key=row.get("idempotency_key"),
        replayed=bool(row.get("replayed")),
        input=row.get("input"),
        output=row.get("output"),
        kept=kept,
        lost=None if kept is not None else _lost(row),
        missing=missing_parts(kept) if kept is not None else (),
    )


def runs_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[RecordedRun]:
    """Rows (any order) grouped by run, each run's calls in the order they began."""
    ordered = sorted(rows, key=lambda r: (str(r["time"]), int(r.get("id") or 0)))
    by_run: dict[str, list[Mapping[str, Any]]] = {}
    for row in ordered:
        by_run.setdefault(str(row["run"]), []).append(row)
    return [
        RecordedRun(run, tuple(call_from_row(row, i) for i, row in enumerate(found, 1)))
        for run, found in by_run.items()
    ]


async def journal_runs(
    config: Config, runs: Sequence[str], since: float | None
) -> list[RecordedRun]:
    """Each named run whole, then every call recorded since ``since`` of the other runs;
    ``UnknownRun`` when a named run has no recorded calls."""
    from proxy.tracing import journal_from_config

    journal = journal_from_config(config, Metrics(), writer=False)
    await journal.open()
    try:
        found: list[RecordedRun] = []
        for run in dict.fromkeys(runs):
            rows = await journal.query(CallQuery(run_id=run, limit=MAX_CALLS))
            if not rows:
                raise UnknownRun(f"run {run!r} has no recorded calls in the journal")
            found += runs_from_rows(rows)
        if since is not None:
            rows = await journal.query(CallQuery(since=since, limit=MAX_CALLS))
            named = set(runs)
            found += runs_from_rows([r for r in rows if r["run"] not in named])
        return found
    finally:
        await journal.close()
