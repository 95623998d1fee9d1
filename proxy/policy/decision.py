"""Validate the raw value a policy returned into a ``Decision`` or a ``ResultDecision``:
pure, engine-agnostic.

A value of the wrong shape is a deny (or a blocked answer) whose reason says what was
wrong, so a broken policy never lets a call or an answer through; an undefined decision is
the engines' business (fail closed, 503), an undefined ``result`` passes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.call import Decision

MALFORMED = "malformed decision"
MALFORMED_RESULT = "malformed result"


@dataclass(frozen=True, slots=True)
class ResultDecision:
    """The ``result`` rule's verdict on a tool's answer, validated.

    ``allow: False`` withholds the answer (502 ``result_blocked``); ``reasons`` go to the
    agent when blocked and to the trace either way; ``redact`` names the body's fields
    (dotted paths, ``*`` for every element of an array) to replace with ``"[REDACTED]"``.
    """

    allow: bool
    reasons: tuple[str, ...] = ()
    redact: tuple[str, ...] = ()
    decision_id: str | None = None


def _malformed(why: str, decision_id: str | None) -> Decision:
    return Decision(allow=False, reasons=(f"{MALFORMED}: {why}",), decision_id=decision_id)


def decision_from_value(value: Any, decision_id: str | None = None) -> Decision:
    """``{"allow": bool, "reasons": [string], "require_approval": bool}`` -> ``Decision``.

    ``reasons`` and ``require_approval`` may be left out; anything else malformed is a deny.
    """
    if not isinstance(value, dict):
        return _malformed(f"expected an object, got {_kind(value)}", decision_id)
    allow = value.get("allow")
    if not isinstance(allow, bool):
        what = "missing" if "allow" not in value else f"a {_kind(allow)}"
        return _malformed(f'"allow" must be a boolean, is {what}', decision_id)
    raw_reasons = value.get("reasons", [])
    if raw_reasons is None:
        raw_reasons = []
    if not isinstance(raw_reasons, list) or not all(isinstance(r, str) for r in raw_reasons):
        return _malformed('"reasons" must be a list of strings', decision_id)
    approval = value.get("require_approval", False)
    if not isinstance(approval, bool):
        return _malformed(
            f'"require_approval" must be a boolean, is a {_kind(approval)}', decision_id
        )
    return Decision(
        allow=allow,
        reasons=tuple(raw_reasons),
        require_approval=approval,
        decision_id=decision_id,
    )


def result_from_value(value: Any, decision_id: str | None = None) -> ResultDecision:
    """``{"allow": bool, "reasons": [string], "redact": [string]}`` -> ``ResultDecision``.

    ``reasons`` and ``redact`` may be left out (or null); anything else malformed blocks the
    answer, with a reason saying what was wrong. ``redact`` keeps its first occurrences.
    """

    def malformed(why: str) -> ResultDecision:
        return ResultDecision(
            allow=False, reasons=(f"{MALFORMED_RESULT}: {why}",), decision_id=decision_id
        )

    if not isinstance(value, dict):
        return malformed(f"expected an object, got {_kind(value)}")
    allow = value.get("allow")
    if not isinstance(allow, bool):
        what = "missing" if "allow" not in value else f"a {_kind(allow)}"
        return malformed(f'"allow" must be a boolean, is {what}')
    reasons = _list(value, "reasons")
    if reasons is None or not all(isinstance(r, str) for r in reasons):
        return malformed('"reasons" must be a list of strings')
    redact = _list(value, "redact")
    if redact is None or not all(isinstance(p, str) and p for p in redact):
        return malformed('"redact" must be a list of field paths (non-empty strings)')
    return ResultDecision(
        allow=allow,
        reasons=tuple(reasons),
        redact=tuple(dict.fromkeys(redact)),
        decision_id=decision_id,
    )


def _list(document: dict[str, Any], key: str) -> list[Any] | None:
    """The list at ``key``; absent or null is empty; ``None`` when it is not a list."""
    value = document.get(key)
    if value is None:
        return []
    return value if isinstance(value, list) else None


def visible_from_value(defined: bool, value: Any) -> bool:
    """``visible``: undefined means visible; anything but a boolean hides the tool."""
    if not defined:
        return True
    return value is True


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
