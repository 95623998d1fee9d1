"""What ``handrail replay`` prints: a table for people, a JSON document for scripts. Pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from proxy.replay.answers import Outcome
from proxy.replay.compare import Change, Verdict
from proxy.replay.execute import Reissued
from proxy.replay.source import RecordedCall
from proxy.replay.whatif import Redecided, Status

DecidedRun = tuple[str, Sequence[Redecided]]
ExecutedRun = tuple[str, str, Sequence[Reissued]]
"""The run, its replay id, and its calls."""


def _call_json(call: RecordedCall) -> dict[str, Any]:
    return {
        "position": call.position,
        "time": call.time,
        "tool": call.tool,
        "call": call.call,
        "method": call.method,
        "path": call.path,
        "agent": call.agent,
        "recorded": {
            **(call.verdict.to_json() if call.verdict else {"decision": None, "reasons": []}),
            "status": call.status,
            "error": call.error,
        },
        "notes": list(call.notes),
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _lines(calls: Sequence[RecordedCall], texts: Sequence[str]) -> list[str]:
    """One aligned line per call: position, time of day, what was called, then ``texts``."""
    width = max((len(call.label) for call in calls), default=0)
    return [
        f"  #{call.position:<3} {call.time[11:23]}  {call.label:<{width}}  {text}".rstrip()
        for call, text in zip(calls, texts, strict=True)
    ]


def _verdict(verdict: Verdict | None) -> str:
    return verdict.kind.value if verdict is not None else "-"


# -- decisions only -------------------------------------------------------------------------


def decided_json(label: str, runs: Sequence[DecidedRun]) -> dict[str, Any]:
    items = [r for _, found in runs for r in found]
    return {
        "mode": "decide",
        "policies": label,
        "runs": [
            {
                "run": run,
                "calls": [
                    {
                        **_call_json(r.call),
                        "status": r.status.value,
                        "new": r.new.to_json() if r.new else None,
                        "change": r.change.to_json() if r.change else None,
                        "lacks": [{"path": ".".join(m.path), "why": m.why} for m in r.lacks],
                        "why": r.why,
                    }
                    for r in found
                ],
            }
            for run, found in runs
        ],
        "summary": {
            "runs": len(runs),
            "calls": len(items),
            **{status.value: sum(1 for r in items if r.status is status) for status in Status},
            "changes": dict(Counter(r.change.kind.value for r in items if r.change)),
        },
    }


def _decided_text(r: Redecided) -> str:
    before = _verdict(r.call.verdict)
    if r.status is Status.NOT_REPLAYABLE:
        return f"{before:<8}    NOT REPLAYABLE: {r.why}"
    if r.status is Status.FAILED:
        return f"{before:<8} -> FAILED: {r.why}"
    text = f"{before:<8} -> {_verdict(r.new):<8}"
    if r.change is not None:
        text += f"  {_marked(r.change)}"
    return text


def _marked(change: Change) -> str:
    """``NEWLY DENIED: the new reasons``."""
    reasons = "; ".join(change.new.reasons)
    return change.kind.label.upper() + (f": {reasons}" if reasons else "")


def decided_text(label: str, runs: Sequence[DecidedRun]) -> str:
    lines = [f"re-deciding against {label} (no tool is called)"]
    for run, found in runs:
        lines.append(f"run {run}: {_plural(len(found), 'call')}")
        lines += [f"  note: {note}" for note in (found[0].call.notes if found else ())]
        lines += _lines([r.call for r in found], [_decided_text(r) for r in found])
    items = [r for _, found in runs for r in found]
    changed = [r for r in items if r.counts_as_change]
    kinds = Counter(r.change.kind.label for r in changed if r.change is not None)
    failed = sum(1 for r in changed if r.status is Status.FAILED)
    if failed:
        kinds["policy failed"] = failed
    detail = f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if kinds else ""
    unreplayable = sum(1 for r in items if r.status is Status.NOT_REPLAYABLE)
    lines.append(
        f"summary: {_plural(len(items), 'call')} in {_plural(len(runs), 'run')}: "
        f"{len(changed)} changed{detail}, {unreplayable} not replayable"
    )
    return "\n".join(lines) + "\n"


# -- re-executed ----------------------------------------------------------------------------


def _answered(r: Reissued) -> dict[str, Any] | None:
    if r.answer is None:
        return None
    kind, reasons = r.answer.verdict()
    return {
        "decision": kind.value if kind else None,
        "reasons": list(reasons) if reasons is not None else None,
        "status": r.answer.status,
        "error": r.answer.error,
        "replayed": r.answer.replayed,
        "output": r.new_output,
    }


def executed_json(against: str, runs: Sequence[ExecutedRun]) -> dict[str, Any]:
    items = [r for _, _, found in runs for r in found]
    return {
        "mode": "execute",
        "against": against,
        "runs": [
            {
                "run": run,
                "replay_id": rid,
                "replay_run": f"replay-{rid}",
                "calls": [
                    {
                        **_call_json(r.call),
                        "outcome": r.judgement.outcome.value,
                        "idempotency_key": r.key,
                        "new": _answered(r),
                        "change": r.judgement.change.to_json() if r.judgement.change else None,
                        "differences": list(r.judgement.differences),
                        "why": r.why,
                    }
                    for r in found
                ],
            }
            for run, rid, found in runs
        ],
        "summary": {
            "runs": len(runs),
            "calls": len(items),
            **{o.value: sum(1 for r in items if r.judgement.outcome is o) for o in Outcome},
        },
    }


def _executed_text(r: Reissued) -> str:
    call, outcome = r.call, r.judgement.outcome
    before = f"{_verdict(call.verdict)} {call.status if call.status is not None else '-'}"
    if outcome is Outcome.NOT_EXECUTABLE or r.answer is None:
        return f"{before:<12}    NOT EXECUTABLE: {r.why}"
    kind, _ = r.answer.verdict()
    after = f"{kind.value if kind else '-'} {r.answer.status}"
    text = f"{before:<12} -> {after:<12}"
    if r.answer.replayed:
        text += "  (answered from the idempotency store)"
    change = r.judgement.change
    if outcome is Outcome.POLICY and change is not None:
        text += f"  POLICY CHANGE, {_marked(change)}"
    elif outcome is Outcome.TOOL:
        text += f"  TOOL CHANGE: {'; '.join(r.judgement.differences)}"
    elif outcome is Outcome.REFUSED:
        text += f"  REFUSED BY THE PROXY: {'; '.join(r.judgement.differences)}"
    elif outcome is Outcome.HELD:
        text += "  HELD: waiting for a person, not run (nothing to compare)"
    return text


def executed_text(against: str, runs: Sequence[ExecutedRun]) -> str:
    lines = [f"re-issuing through {against}"]
    for run, rid, found in runs:
        lines.append(f"run {run} as replay-{rid}: {_plural(len(found), 'call')}")
        lines += [f"  note: {note}" for note in (found[0].call.notes if found else ())]
        lines += _lines([r.call for r in found], [_executed_text(r) for r in found])
    items = [r for _, _, found in runs for r in found]
    counts = Counter(r.judgement.outcome for r in items)
    lines.append(
        f"summary: {_plural(len(items), 'call')} in {_plural(len(runs), 'run')}: "
        f"{counts[Outcome.POLICY]} policy changes, {counts[Outcome.TOOL]} tool-side changes, "
        f"{counts[Outcome.REFUSED]} refused by the proxy, {counts[Outcome.HELD]} held, "
        f"{counts[Outcome.NOT_EXECUTABLE]} not executable"
    )
    return "\n".join(lines) + "\n"
