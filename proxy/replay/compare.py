"""Whether two decisions on the same call differ, and how: pure.

``handrail replay`` compares a call's recorded decision with a candidate policy's, and the
shadow policies compare the live decision with theirs; both use ``compare`` so that a
change means the same thing everywhere (the same kinds, the same ``/metrics`` labels).
Reasons are compared as sets: Rego gathers them in a set, and their order means nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.call import Decision, DecisionKind


@dataclass(frozen=True, slots=True)
class Verdict:
    """One side of a comparison: the decision's kind and its reasons."""

    kind: DecisionKind
    reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        return cls(decision.kind, tuple(decision.reasons))

    @classmethod
    def parse(cls, kind: str | DecisionKind, reasons: Iterable[Any] = ()) -> Verdict:
        """From the journal's (or a span's) text: ``ValueError`` for an unknown kind."""
        return cls(DecisionKind(kind), tuple(str(r) for r in reasons))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Verdict | None:
        """``{"decision": "deny", "reasons": [...]}`` (the journal's ``shadow`` column), or
        ``None`` when there is none or it names no known decision."""
        if not data or not isinstance(data.get("decision"), str):
            return None
        try:
            return cls.parse(data["decision"], data.get("reasons") or ())
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.kind.value, "reasons": list(self.reasons)}


class ChangeKind(StrEnum):
    """How a decision changed, named for what the call now gets."""

    NEWLY_DENIED = "newly_denied"  # allowed or held before, denied now
    NEWLY_ALLOWED = "newly_allowed"  # denied before, allowed now
    APPROVAL_REQUIRED = "approval_required"  # allowed or denied before, held for a person now
    APPROVAL_DROPPED = "approval_dropped"  # held before, allowed without a person now
    REASONS_CHANGED = "reasons_changed"  # the same decision, other reasons

    @property
    def label(self) -> str:
        """For people: ``newly denied``, ``approval now required``..."""
        return _LABELS[self]


_LABELS = {
    ChangeKind.NEWLY_DENIED: "newly denied",
    ChangeKind.NEWLY_ALLOWED: "newly allowed",
    ChangeKind.APPROVAL_REQUIRED: "approval now required",
    ChangeKind.APPROVAL_DROPPED: "approval no longer required",
    ChangeKind.REASONS_CHANGED: "reasons changed",
}


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    recorded: Verdict
    new: Verdict

    @property
    def added_reasons(self) -> tuple[str, ...]:
        return tuple(r for r in self.new.reasons if r not in set(self.recorded.reasons))

    @property
    def dropped_reasons(self) -> tuple[str, ...]:
        return tuple(r for r in self.recorded.reasons if r not in set(self.new.reasons))

    def describe(self) -> str:
        """One line: ``newly denied: deletes are not allowed here``."""
        reasons = "; ".join(self.new.reasons) or "no reasons"
        return f"{self.kind.label}: {reasons}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "recorded": self.recorded.to_json(),
            "new": self.new.to_json(),
            "added_reasons": list(self.added_reasons),
            "dropped_reasons": list(self.dropped_reasons),
        }


def compare(recorded: Verdict, new: Verdict) -> Change | None:
    """The change from ``recorded`` to ``new``, or ``None`` when they are the same decision
    with the same reasons."""
    if recorded.kind is new.kind:
        if set(recorded.reasons) == set(new.reasons):
            return None
        return Change(ChangeKind.REASONS_CHANGED, recorded, new)
    if new.kind is DecisionKind.DENY:
        kind = ChangeKind.NEWLY_DENIED
    elif new.kind is DecisionKind.APPROVAL:
        kind = ChangeKind.APPROVAL_REQUIRED
    elif recorded.kind is DecisionKind.APPROVAL:
        kind = ChangeKind.APPROVAL_DROPPED
    else:
        kind = ChangeKind.NEWLY_ALLOWED
    return Change(kind, recorded, new)


def change_kind(
    recorded_kind: str | DecisionKind,
    recorded_reasons: Iterable[Any],
    new_kind: str | DecisionKind,
    new_reasons: Iterable[Any],
) -> ChangeKind | None:
    """``compare`` on plain values (``ValueError`` for an unknown kind): just the change's kind,
    e.g. for a metric's label."""
    change = compare(
        Verdict.parse(recorded_kind, recorded_reasons), Verdict.parse(new_kind, new_reasons)
    )
    return change.kind if change is not None else None
