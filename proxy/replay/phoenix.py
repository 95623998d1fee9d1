"""A recorded run read back from Arize Phoenix, for when the journal no longer holds it.

Best effort: a call span carries the decision, the captured input (``input.value``:
redacted, truncated) and the call's facts, but not the policy input as decided. The input
is rebuilt from them: the run's counters are counted again from the run's earlier spans
(as the store counts them: a refused call gives its write back and counts as denied); what
no span keeps (request headers, query, content type and size, the run's repeats and
whether it was closed, MCP annotations) is marked missing, so a policy that reads it
reports the call not replayable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import aiohttp

from proxy.call import UNSAFE_METHODS, DecisionKind
from proxy.config import Config
from proxy.policy.input import INPUT_VERSION, rfc3339
from proxy.replay.compare import Verdict
from proxy.replay.record import Kept
from proxy.replay.source import InputPath, Missing, RecordedCall, RecordedRun, UnknownRun
from proxy.tracing import attributes as attr
from proxy.tracing.phoenix import PhoenixClient, PhoenixSpan, phoenix_url
from proxy.tracing.redact import REDACTED
from proxy.tracing.setup import project_name

MAX_SPANS = 100_000
NOT_IN_TRACE = "not in the trace"
_UNKEPT: tuple[InputPath, ...] = (
    ("request", "headers"),
    ("request", "query"),
    ("request", "content_type"),
    ("request", "body_size"),
    ("run", "repeats"),
    ("run", "closed"),
)
_UNKEPT_MCP: tuple[InputPath, ...] = (("call", "annotations"), ("call", "definition_changed"))
_REFUNDED = frozenset({"policy_denied", "approval_pending", "policy_unavailable"})
"""Errors of a counted call that gave its write back and counted it as denied."""


async def phoenix_runs(
    config: Config, runs: Sequence[str], since: float | None
) -> list[RecordedRun]:
    """Like ``source.journal_runs``, from the call spans in Phoenix (``PhoenixUnavailable``
    when it cannot be reached)."""
    base, project = phoenix_url(config.tracing), project_name(config.tracing)
    calls = {attr.GEN_AI_OPERATION_NAME: attr.OPERATION}
    captured = config.tracing.capture.arguments
    found: list[RecordedRun] = []
    async with aiohttp.ClientSession() as session:
        client = PhoenixClient(base, session)
        for run in dict.fromkeys(runs):
            spans = await client.spans(
                project,
                span_kinds=[attr.SPAN_KIND_TOOL],
                attributes={**calls, attr.SESSION_ID: run},
                limit=MAX_SPANS,
            )
            if not spans:
                raise UnknownRun(f"run {run!r} has no call spans in Phoenix project {project!r}")
            found += runs_from_spans(spans, captured)
        if since is not None:
            spans = await client.spans(
                project, span_kinds=[attr.SPAN_KIND_TOOL], attributes=calls, limit=MAX_SPANS
            )
            named = set(runs)
            found += runs_from_spans(
                [
                    s
                    for s in spans
                    if _seconds(s.start_time) >= since
                    and s.attributes.get(attr.SESSION_ID) not in named
                ],
                captured,
            )
    return found


def runs_from_spans(spans: Sequence[PhoenixSpan], captured: bool = True) -> list[RecordedRun]:
    """Call spans grouped by run, in the order they began, each run's counters recounted.

    ``captured``: inputs were captured (``tracing.capture.arguments``), so a span without
    ``input.value`` had an empty one."""
    by_run: dict[str, list[PhoenixSpan]] = {}
    for span in sorted(spans, key=lambda s: (_seconds(s.start_time), s.span_id)):
        by_run.setdefault(str(span.attributes.get(attr.SESSION_ID, "")), []).append(span)
    runs = []
    for run, found in by_run.items():
        counters: dict[str, list[int]] = {}  # agent -> [calls, writes, denied]
        calls = []
        for position, span in enumerate(found, 1):
            agent = str(span.attributes.get(attr.GEN_AI_AGENT_ID) or "")
            counts = counters.setdefault(agent, [0, 0, 0])
            calls.append(call_from_span(span, position, tuple(counts), captured))
            _count(span.attributes, counts)
        runs.append(RecordedRun(run, tuple(calls)))
    return runs


def _count(a: Mapping[str, Any], counts: list[int]) -> None:
    decided = a.get(attr.DECISION) is not None or a.get(attr.ERROR_CODE) == "policy_unavailable"
    if not decided:
        return  # refused before the run was counted
    unsafe = attr.MCP_METHOD_NAME in a or a.get(attr.HTTP_REQUEST_METHOD) in UNSAFE_METHODS
    counts[0] += 1
    refunded = a.get(attr.DECISION) == DecisionKind.DENY or a.get(attr.ERROR_CODE) in _REFUNDED
    if refunded:
        counts[2] += 1
    elif unsafe:
        counts[1] += 1


def call_from_span(
    span: PhoenixSpan, position: int, counts: tuple[int, ...], captured: bool = True
) -> RecordedCall:
    a = span.attributes
    mcp = attr.MCP_METHOD_NAME in a
    agent = a.get(attr.GEN_AI_AGENT_ID)
    tool = str(a.get(attr.TOOL) or a.get(attr.TOOL_NAME) or "")
    method, path = str(a.get(attr.HTTP_REQUEST_METHOD) or "POST"), str(a.get(attr.URL_PATH) or "")
    name = str(a.get(attr.GEN_AI_TOOL_NAME)) if mcp else None
    input_value = a.get(attr.INPUT_VALUE, "" if captured else None)
    value, missing = _input(input_value, ("call", "arguments") if mcp else ("request", "body"))
    missing += [Missing(p, NOT_IN_TRACE) for p in (*_UNKEPT, *(_UNKEPT_MCP if mcp else ()))]
    calls, writes, denied = counts
    document: dict[str, Any] = {
        "version": INPUT_VERSION,
        "tool": {"name": tool, "kind": "mcp" if mcp else "http"},
        "request": {"method": method, "path": path, "body": None if mcp else value},
        "call": {"name": name, "arguments": value or {}} if mcp else None,
        "agent": {"id": agent},
        "run": {"id": a.get(attr.SESSION_ID), "calls": calls, "writes": writes, "denied": denied},
        "idempotency_key": a.get(attr.IDEMPOTENCY_KEY),
        "time": rfc3339(_seconds(span.start_time)),
    }
    decision = a.get(attr.DECISION)
    reasons = a.get(attr.DECISION_REASONS) or ()
    return RecordedCall(
        position=position,
        run=str(a.get(attr.SESSION_ID, "")),
        agent=str(agent) if agent is not None else None,
        time=span.start_time,
        tool=tool,
        kind="mcp" if mcp else "http",
        method=method,
        path=path,
        query=None,
        call=name,
        verdict=Verdict.parse(decision, [reasons] if isinstance(reasons, str) else reasons)
        if decision in set(DecisionKind)
        else None,
        status=a.get(attr.HTTP_RESPONSE_STATUS_CODE),
        error=a.get(attr.ERROR_CODE),
        idempotency_key=a.get(attr.IDEMPOTENCY_KEY),
        replayed=bool(a.get(attr.IDEMPOTENCY_REPLAYED)),
        input=input_value,
        output=a.get(attr.OUTPUT_VALUE),
        kept=Kept(document, (), ()),
        missing=tuple(missing),
        notes=("read from Phoenix: the run's counters recounted from its spans",),
    )


def _input(text: Any, where: InputPath) -> tuple[Any, list[Missing]]:
    """The captured input parsed back, and what of it is missing."""
    if text is None:
        return None, [Missing(where, NOT_IN_TRACE)]
    if not isinstance(text, str) or not text:
        return None, []
    try:
        value = json.loads(text)
    except ValueError:
        if "...[truncated " in text:
            return None, [Missing(where, "truncated")]
        return None, []  # not JSON: the policy saw no parsed body either
    return value, [Missing(p, "redacted") for p in _redacted(value, where)]


def _redacted(value: Any, path: InputPath) -> list[InputPath]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _redacted(v, (*path, str(k)))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _redacted(v, (*path, str(i)))]
    return [path] if isinstance(value, str) and REDACTED in value else []


def _seconds(moment: str) -> float:
    try:
        return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
