"""What a run did, call by call, classified so a model's mistake is told from a fault: pure.

Each call's outcome is one of:

- ``ok``: the tool answered and the answer was the agent's (2xx/3xx, an MCP result);
- ``refused``: it did not run: the policy denied or held it, a person rejected it, its result
  was blocked, its run was closed, its key was in use;
- ``invalid_call``: the call itself was wrong: the tool or MCP server rejected its arguments
  (a 4xx, a JSON-RPC invalid-params error, a tool result with ``isError``), or the proxy
  refused the request as malformed;
- ``tool_failure``: infrastructure: a 5xx, a timeout, a connection refused or broken, the
  policy engine or store unavailable;
- ``unknown``: the call may have run and its outcome was lost (``outcome_unknown``).

An orchestrator reads the ledger (``GET /runs/{id}``) to verify a run before it reports the
task done: every call in order, and the totals per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class OutcomeClass(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    INVALID_CALL = "invalid_call"
    TOOL_FAILURE = "tool_failure"
    UNKNOWN = "unknown"


REFUSED = frozenset(
    {
        "policy_denied",
        "approval_pending",
        "result_blocked",
        "idempotency_key_in_use",
        "too_many_streams",
        "response_not_replayable",
    }
)
INVALID = frozenset(
    {
        "bad_request",
        "idempotency_key_missing",
        "idempotency_key_reused",
        "payload_too_large",
        "request_timeout",
        "unknown_tool",
        "misdirected_request",
        "origin_not_allowed",
    }
)
UNKNOWN = frozenset({"outcome_unknown", "interrupted"})


def classify(
    *,
    error: str | None,
    status: int | None,
    tool_error: bool = False,
    failed: bool = False,
    unknown: bool = False,
) -> OutcomeClass:
    """The outcome class of one call from what the journal keeps of it.

    ``tool_error``: the tool said the arguments were wrong in its answer (an MCP result with
    ``isError``, a JSON-RPC invalid-params error). ``failed``: the tool answered that it
    failed without a 5xx (an MCP JSON-RPC internal error). ``unknown``: its key's outcome is
    unknown.
    """
    if unknown or error in UNKNOWN:
        return OutcomeClass.UNKNOWN
    if error in REFUSED:
        return OutcomeClass.REFUSED
    if error in INVALID:
        return OutcomeClass.INVALID_CALL
    if error is not None:
        return OutcomeClass.TOOL_FAILURE  # upstream_*, policy_/store_unavailable, internal
    if status is None:
        return OutcomeClass.UNKNOWN
    if status >= 500 or failed:
        return OutcomeClass.TOOL_FAILURE
    if status >= 400 or tool_error:
        return OutcomeClass.INVALID_CALL
    return OutcomeClass.OK


@dataclass(slots=True)
class Ledger:
    run_id: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    closed: dict[str, Any] | None = None

    def totals(self) -> dict[str, Any]:
        counts = dict.fromkeys([c.value for c in OutcomeClass], 0)
        decisions: dict[str, int] = {}
        for entry in self.entries:
            counts[entry["outcome"]] += 1
            decision = entry.get("decision") or "none"
            decisions[decision] = decisions.get(decision, 0) + 1
        return {
            "calls": len(self.entries),
            "writes": sum(
                1
                for e in self.entries
                if e["outcome"] == OutcomeClass.OK and e["write"] and not e["replayed"]
            ),
            "replayed": sum(1 for e in self.entries if e["replayed"]),
            "outcomes": counts,
            "decisions": decisions,
            "result_checks": _count(e.get("result_check") for e in self.entries),
            "approvals": sum(1 for e in self.entries if e.get("approval_id")),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "closed": self.closed is not None,
            "closed_at": self.closed["at"] if self.closed else None,
            "closed_by": self.closed["by"] if self.closed else None,
            "calls": self.entries,
            "totals": self.totals(),
        }


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def entry(row: dict[str, Any]) -> dict[str, Any]:
    """One journal row (``row_dict``) as a ledger entry, oldest first in the ledger."""
    outcome = row.get("outcome") or classify(error=row.get("error"), status=row.get("status"))
    return {
        "id": row["id"],
        "time": row["time"],
        "tool": row["tool"],
        "agent": row["agent"],
        "method": row["method"],
        "path": row["path"],
        "call": row["call"],
        "write": row["call"] is not None or row["method"] in WRITES,
        "decision": row["decision"],
        "reasons": row["reasons"],
        "idempotency_key": row["idempotency_key"],
        "replayed": row["replayed"],
        "approval_id": row.get("approval_id"),
        "result_check": row.get("result_check"),
        "result_reasons": row.get("result_reasons") or [],
        "status": row["status"],
        "error": row["error"],
        "outcome": str(outcome),
        "trace_id": row["trace_id"],
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        if value:
            out[value] = out.get(value, 0) + 1
    return out
