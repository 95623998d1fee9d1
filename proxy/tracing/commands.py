"""``handrail calls`` (the local journal), ``handrail calls verify`` (its hash chains) and
``handrail traces`` (the trace backend).

Each runs its own event loop. People get a readable table or tree; ``--json`` gives
scripts a JSON array (an object for ``verify``). Exit 0 on success (also when nothing
matched), 1 when ``verify`` finds rows altered or missing, 2 with a one-line message on a
usage error or when the journal or the backend cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

from proxy.config import Config
from proxy.metrics import Metrics
from proxy.tracing import attributes as attr
from proxy.tracing.base import CallQuery, iso_time
from proxy.tracing.chain import BreakKind, ChainBreak, RowRef, VerifyReport
from proxy.tracing.phoenix import PhoenixClient, PhoenixSpan, PhoenixUnavailable, phoenix_url
from proxy.tracing.setup import project_name

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class UsageError(Exception):
    pass


def parse_since(value: str, now: float | None = None) -> float:
    """``300`` / ``10m`` / ``2h`` / ``1d`` ago, or an ISO 8601 time; unix seconds."""
    now = time.time() if now is None else now
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since: {value!r} is neither a duration (300, 10m, 2h, 1d) nor an ISO time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def journal_location(config: Config) -> str:
    """Where ``handrail calls`` reads: the SQLite file beside the store's, or PostgreSQL."""
    url = config.store.url
    if url.startswith("sqlite:"):
        from proxy.store import sqlite_path
        from proxy.tracing.journal_sqlite import journal_path

        return f"at {journal_path(sqlite_path(url))}"
    return "in the store's PostgreSQL database (table handrail_journal)"


def _fail(message: str) -> int:
    print(f"handrail: {message}", file=sys.stderr)
    return 2


# -- handrail calls ---------------------------------------------------------------------


def calls_command(
    config: Config,
    *,
    run: str | None,
    tool: str | None,
    decision: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
    out: TextIO,
) -> int:
    """List recorded calls from the local journal, oldest first (the newest ``limit``)."""
    print(f"handrail: reading the journal {journal_location(config)}", file=sys.stderr)
    try:
        query = CallQuery(
            run_id=run,
            tool=tool,
            decision=decision,
            since=parse_since(since) if since else None,
            limit=max(1, limit),
        )
    except UsageError as exc:
        return _fail(str(exc))
    try:
        rows = asyncio.run(_read_journal(config, query))
    except Exception as exc:
        return _fail(f"cannot read the journal in {_where(config.store.url)}: {exc}")
    rows.reverse()
    if as_json:
        json.dump(rows, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(render_calls(rows))
    return 0


def _where(url: str) -> str:
    """The store URL without credentials, for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


async def _read_journal(config: Config, query: CallQuery) -> list[dict[str, Any]]:
    from proxy.tracing import journal_from_config

    journal = journal_from_config(config, Metrics(), writer=False)
    await journal.open()
    try:
        return await journal.query(query)
    finally:
        await journal.close()


def _note(row: Mapping[str, Any]) -> str:
    notes: list[str] = []
    if row.get("replayed"):
        notes.append("replayed")
    if row.get("error") and row.get("error") != "policy_denied":
        notes.append(str(row["error"]))
    reasons = row.get("reasons") or []
    if reasons:
        notes.append("; ".join(str(r) for r in reasons))
    return ", ".join(notes)


def render_calls(rows: Sequence[Mapping[str, Any]]) -> str:
    """A table for people: one line per call."""
    if not rows:
        return "no calls recorded\n"
    header = ("TIME", "RUN", "AGENT", "CALL", "REQUEST", "DECISION", "STATUS", "MS", "NOTE")
    lines = [header]
    for row in rows:
        call = row["tool"] + (f".{row['call']}" if row.get("call") else "")
        lines.append(
            (
                str(row["time"]).replace("T", " ").removesuffix("Z"),
                str(row["run"]),
                str(row["agent"] or "-"),
                call,
                f"{row['method']} {row['path']}",
                str(row["decision"] or "-"),
                str(row["status"] if row["status"] is not None else "-"),
                f"{row['total_ms']:.1f}",
                _note(row),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ""
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        text += "  ".join([*cells, line[-1]]).rstrip() + "\n"
    return text


# -- handrail calls verify --------------------------------------------------------------


def verify_command(config: Config, *, out: TextIO, as_json: bool) -> int:
    """Walk every hash chain of the journal: 0 intact, 1 rows altered or missing, 2 error."""
    print(f"handrail: verifying the journal {journal_location(config)}", file=sys.stderr)
    try:
        report = asyncio.run(_verify_journal(config))
    except Exception as exc:
        return _fail(f"cannot read the journal in {_where(config.store.url)}: {exc}")
    if as_json:
        json.dump(report.to_json(), out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(render_verify(report))
    return 0 if report.intact else 1


async def _verify_journal(config: Config) -> VerifyReport:
    from proxy.tracing import journal_from_config

    journal = journal_from_config(config, Metrics(), writer=False)
    await journal.open()
    try:
        return await journal.verify()
    finally:
        await journal.close()


def _row_text(row: RowRef) -> str:
    return f"row {row.id}  {iso_time(row.time)}  tool {row.tool}  run {row.run}"


def _break_text(item: ChainBreak) -> str:
    seqs = str(item.seq) if item.seq == item.last_seq else f"{item.seq}-{item.last_seq}"
    where = f"(chain {item.chain}, seq {seqs})"
    if item.kind is BreakKind.ALTERED and item.row is not None:
        return f"ALTERED  {_row_text(item.row)}  {where}: {item.detail}"
    if item.row is not None:
        return f"MISSING  before {_row_text(item.row)}  {where}: {item.detail}"
    if item.before is not None:
        return f"MISSING  after {_row_text(item.before)}  {where}: {item.detail}"
    return f"MISSING  {where}: {item.detail}"


def render_verify(report: VerifyReport) -> str:
    """One summary line, then each altered row or run of missing rows, the first first."""
    chains = f"{len(report.chains)} chain{'s' if len(report.chains) != 1 else ''}"
    older = (
        f"; {report.unchained} older rows from before the chain are not covered"
        if report.unchained
        else ""
    )
    if report.intact:
        return f"journal intact: {report.rows} rows in {chains}{older}\n"
    problems = len(report.breaks)
    lines = [
        f"journal BROKEN: {problems}{'+' if report.truncated else ''} "
        f"problem{'s' if problems != 1 else ''} in {report.rows} rows, {chains}{older}",
        *(_break_text(item) for item in report.breaks),
    ]
    if report.truncated:
        lines.append("(more problems not listed)")
    return "\n".join(lines) + "\n"


# -- handrail traces --------------------------------------------------------------------


def traces_command(
    config: Config,
    *,
    run: str | None,
    trace_id: str | None,
    tool: str | None,
    decision: str | None,
    limit: int,
    as_json: bool,
    out: TextIO,
) -> int:
    """Query Phoenix for the proxy's call spans and print each with its child spans."""
    base = phoenix_url(config.tracing)
    project = project_name(config.tracing)
    try:
        trees = asyncio.run(
            fetch_call_trees(
                base,
                project,
                run=run,
                trace_id=trace_id,
                tool=tool,
                decision=decision,
                limit=max(1, limit),
            )
        )
    except PhoenixUnavailable as exc:
        return _fail(str(exc))
    if as_json:
        json.dump([tree_json(t) for t in trees], out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(render_trees(trees, project, base))
    return 0


SpanTree = tuple[PhoenixSpan, list["SpanTree"]]


async def fetch_call_trees(
    base_url: str,
    project: str,
    *,
    run: str | None = None,
    trace_id: str | None = None,
    tool: str | None = None,
    decision: str | None = None,
    limit: int = 50,
) -> list[SpanTree]:
    """The matching call spans (oldest first), each with its descendants."""
    filters: dict[str, str | bool | int] = {attr.GEN_AI_OPERATION_NAME: attr.OPERATION}
    if run:
        filters[attr.SESSION_ID] = run
    if tool:
        filters[attr.TOOL] = tool
    if decision:
        filters[attr.DECISION] = decision
    async with aiohttp.ClientSession() as session:
        client = PhoenixClient(base_url, session)
        calls = await client.spans(
            project,
            trace_ids=[trace_id] if trace_id else (),
            span_kinds=[attr.SPAN_KIND_TOOL],
            attributes=filters,
            limit=limit,
        )
        trace_ids = sorted({c.trace_id for c in calls})
        everything: list[PhoenixSpan] = []
        for start in range(0, len(trace_ids), 50):
            everything += await client.spans(
                project, trace_ids=trace_ids[start : start + 50], limit=100_000
            )
    return build_trees(calls, everything)


def build_trees(calls: Sequence[PhoenixSpan], spans: Sequence[PhoenixSpan]) -> list[SpanTree]:
    children: dict[str, list[PhoenixSpan]] = {}
    for span in spans:
        if span.parent_id:
            children.setdefault(span.parent_id, []).append(span)

    def tree(span: PhoenixSpan, depth: int = 0) -> SpanTree:
        kids = sorted(children.get(span.span_id, []), key=lambda s: s.start_time)
        return span, [tree(k, depth + 1) for k in kids if depth < 32]

    return [tree(c) for c in sorted(calls, key=lambda s: s.start_time)]


def _duration_ms(span: PhoenixSpan) -> float | None:
    try:
        start = datetime.fromisoformat(span.start_time.replace("Z", "+00:00"))
        end = datetime.fromisoformat(span.end_time.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (end - start).total_seconds() * 1000.0


def _span_facts(span: PhoenixSpan) -> str:
    a = span.attributes
    facts: list[str] = []
    for label, key in (
        ("decision", attr.DECISION),
        ("key", "handrail.idempotency.state"),
        ("status", attr.HTTP_RESPONSE_STATUS_CODE),
    ):
        if key in a:
            facts.append(f"{label}={a[key]}")
    if a.get(attr.IDEMPOTENCY_REPLAYED):
        facts.append("replayed")
    if attr.ERROR_CODE in a and a.get(attr.DECISION) != "deny":
        facts.append(f"error={a[attr.ERROR_CODE]}")
    if span.status_code == "ERROR":
        facts.append(f"ERROR {span.status_message}".rstrip())
    took = _duration_ms(span)
    if took is not None:
        facts.append(f"{took:.1f} ms")
    return "  ".join(facts)


def render_trees(trees: Sequence[SpanTree], project: str, base_url: str) -> str:
    if not trees:
        return f"no spans found in Phoenix project {project!r} at {base_url}\n"
    lines: list[str] = []
    for call, kids in trees:
        a = call.attributes
        lines.append(
            f"{call.start_time}  trace {call.trace_id}  run {a.get(attr.SESSION_ID, '-')}"
            f"  agent {a.get(attr.GEN_AI_AGENT_ID) or '-'}"
        )
        lines.append(f"  {call.name}  {_span_facts(call)}")
        reasons = a.get(attr.DECISION_REASONS)
        if reasons:
            text = "; ".join(reasons) if isinstance(reasons, list) else str(reasons)
            lines.append(f"    reasons: {text}")
        _render_children(kids, "    ", lines)
        lines.append("")
    return "\n".join(lines)


def _render_children(kids: Sequence[SpanTree], indent: str, lines: list[str]) -> None:
    for span, grandchildren in kids:
        lines.append(f"{indent}{span.name}  {_span_facts(span)}".rstrip())
        _render_children(grandchildren, indent + "  ", lines)


def tree_json(tree: SpanTree) -> dict[str, Any]:
    span, kids = tree
    return {
        "name": span.name,
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_id": span.parent_id,
        "span_kind": span.span_kind,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status_code": span.status_code,
        "status_message": span.status_message,
        "attributes": dict(span.attributes),
        "children": [tree_json(k) for k in kids],
    }
