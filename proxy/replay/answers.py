"""What a re-issued call's answer says, beside the recorded one: pure.

The decision is read back from the answer the proxy gave (its error body for HTTP, the
refusal's ``_meta.handrail`` for MCP); an allowed call's reasons are not in its answer, so
for it only the decision's kind is compared. Bodies are compared as the journal keeps
them (redacted and truncated the same way), as JSON when both sides parse, and only when
both answers came from the tool: a refusal's body differs every time (trace ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.call import DecisionKind
from proxy.replay.compare import Change, Verdict, compare
from proxy.replay.source import RecordedCall

UNDECIDED_CODES = frozenset(
    {
        "bad_request",
        "unknown_tool",
        "payload_too_large",
        "idempotency_key_missing",
        "policy_unavailable",
        "store_unavailable",
    }
)
"""Refusals made before the policy decided."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A re-issued call's answer: what the agent would have seen."""

    status: int
    body: bytes
    message: dict[str, Any] | None = None
    """MCP: the JSON-RPC response message (from JSON or an SSE stream)."""
    replayed: bool = False
    """``Idempotent-Replayed``: answered from the idempotency store, the tool not called."""

    @property
    def facts(self) -> dict[str, Any] | None:
        """The proxy's own error object, when the proxy (not the tool) answered."""
        if self.message is not None:
            result = self.message.get("result")
            if isinstance(result, dict) and result.get("isError"):
                meta = result.get("_meta")
                found = meta.get("handrail") if isinstance(meta, dict) else None
                return found if isinstance(found, dict) else None
            error = self.message.get("error")
            data = error.get("data") if isinstance(error, dict) else None
            return data if isinstance(data, dict) and "code" in data else None
        if self.status < 400:
            return None
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return None
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict) and "code" in error and "trace_id" in error:
            return error
        return None

    @property
    def error(self) -> str | None:
        facts = self.facts
        return str(facts["code"]) if facts is not None else None

    def verdict(self) -> tuple[DecisionKind | None, tuple[str, ...] | None]:
        """The decision the answer shows, and its reasons (``None``: not shown)."""
        facts = self.facts
        code = facts.get("code") if facts is not None else None
        if facts is None or code is None:
            return DecisionKind.ALLOW, None
        reasons = facts.get("reasons")
        shown = tuple(str(r) for r in reasons) if isinstance(reasons, list) else ()
        if code == "approval_pending":
            return DecisionKind.APPROVAL, shown
        if code == "policy_denied":
            # A person's rejection of a held call: held by the policy, its reasons the person's.
            if facts.get("approval_id"):
                return DecisionKind.APPROVAL, None
            return DecisionKind.DENY, shown
        if code in UNDECIDED_CODES:
            return None, None
        return DecisionKind.ALLOW, None


class Outcome(StrEnum):
    SAME = "same"
    POLICY = "policy_change"  # the decision differs
    TOOL = "tool_change"  # the same decision, another answer
    REFUSED = "refused"  # refused before the policy decided, on one side only
    HELD = "held"  # held for a person now, so there is no answer to compare yet
    NOT_EXECUTABLE = "not_executable"

    @property
    def differs(self) -> bool:
        return self in (Outcome.POLICY, Outcome.TOOL, Outcome.REFUSED)


@dataclass(frozen=True, slots=True)
class Judgement:
    outcome: Outcome
    change: Change | None = None
    differences: tuple[str, ...] = ()


def judge(call: RecordedCall, answer: Answer, new_output: str | None) -> Judgement:
    """Compare the recorded call with its re-issued answer (``new_output``: that answer
    captured as the journal captures outputs)."""
    kind, reasons = answer.verdict()
    recorded = call.verdict
    if recorded is None or kind is None:
        if recorded is None and kind is None and call.error == answer.error:
            return Judgement(Outcome.SAME)
        before = call.error if recorded is None else recorded.kind.value
        after = answer.error if kind is None else kind.value
        return Judgement(Outcome.REFUSED, differences=(f"{before} -> {after}",))
    if reasons is None:  # reasons not shown: compare the decision's kind alone
        change = compare(Verdict(recorded.kind), Verdict(kind))
    else:
        change = compare(recorded, Verdict(kind, reasons))
    if change is not None:
        return Judgement(Outcome.POLICY, change=change)
    if answer.error == "approval_pending" and call.error != "approval_pending":
        return Judgement(Outcome.HELD, differences=("held for a person: not run",))
    differences: list[str] = []
    if call.status != answer.status:
        differences.append(f"status {call.status} -> {answer.status}")
    if call.error != answer.error:
        differences.append(f"error {call.error or 'none'} -> {answer.error or 'none'}")
    if call.error is None and answer.error is None and call.output is not None:
        differs = _bodies_differ(call.output, new_output, mcp=call.call is not None)
        if differs:
            differences.append(differs)
    return Judgement(Outcome.TOOL if differences else Outcome.SAME, differences=tuple(differences))


def _parsed(text: str | None, mcp: bool) -> Any:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return _UNPARSED
    if mcp and isinstance(value, dict):  # the JSON-RPC id is the request's own
        value = {k: v for k, v in value.items() if k != "id"}
    return value


_UNPARSED = object()


def _bodies_differ(recorded: str, new: str | None, *, mcp: bool) -> str | None:
    before, after = _parsed(recorded, mcp), _parsed(new, mcp)
    if before is not _UNPARSED and after is not _UNPARSED:
        return None if before == after else _first_difference(before, after, ())
    if mcp:
        return None if recorded == new else "body not comparable (cut at the capture limit)"
    return None if recorded == new else f"body {_preview(recorded)} -> {_preview(new)}"


def _first_difference(before: Any, after: Any, path: tuple[str, ...]) -> str:
    """Where two JSON values first differ: ``body result.content.0.text: "a" -> "b"``."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in [*before, *(k for k in after if k not in before)]:
            if before.get(key, _UNPARSED) != after.get(key, _UNPARSED):
                return _first_difference(
                    before.get(key, _UNPARSED), after.get(key, _UNPARSED), (*path, str(key))
                )
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            if a != b:
                return _first_difference(a, b, (*path, str(i)))
    where = f"body {'.'.join(path)}" if path else "body"
    return f"{where}: {_shown(before)} -> {_shown(after)}"


def _shown(value: Any) -> str:
    if value is _UNPARSED:
        return "(absent)"
    return _preview(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _preview(text: str | None, size: int = 80) -> str:
    if not text:
        return "(empty)"
    return text if len(text) <= size else text[: size - 3] + "..."
