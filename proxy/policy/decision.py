"""Validate the raw value a policy returned into a ``Decision``: pure, engine-agnostic.

A value of the wrong shape is a deny whose reason says what was wrong, so a broken policy
never lets a call through; an undefined value is the engines' business (fail closed, 503).
"""

from __future__ import annotations

from typing import Any

from proxy.call import Decision

MALFORMED = "malformed decision"


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
