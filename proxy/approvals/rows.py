"""An approval as a database row (both backends): the columns, and the conversions: pure."""

from __future__ import annotations

import json
from typing import Any

from proxy.approvals.model import Approval, Kind, State

OPEN = "state IN ('pending', 'approved')"
"""An open request: one per call (a partial unique index), until decided, spent or expired."""

COLUMNS = (
    "id, kind, tool, agent, run_id, fingerprint, input, reasons, state, created, expires, "
    "idempotency_key, trace_id, decided_by, decided_at, reason, used_at, extra"
)


def from_row(row: Any) -> Approval:
    """An ``Approval`` from a row in ``COLUMNS`` order (JSON columns as text)."""
    return Approval(
        id=row[0],
        kind=Kind(row[1]),
        tool=row[2],
        agent=row[3],
        run_id=row[4],
        fingerprint=row[5],
        input=json.loads(row[6]),
        reasons=tuple(json.loads(row[7])),
        state=State(row[8]),
        created=float(row[9]),
        expires=float(row[10]),
        idempotency_key=row[11],
        trace_id=row[12],
        decided_by=row[13],
        decided_at=None if row[14] is None else float(row[14]),
        reason=row[15],
        used_at=None if row[16] is None else float(row[16]),
        extra=json.loads(row[17]) if row[17] else {},
    )


def to_row(a: Approval) -> tuple[Any, ...]:
    return (
        a.id,
        a.kind.value,
        a.tool,
        a.agent,
        a.run_id,
        a.fingerprint,
        json.dumps(a.input, ensure_ascii=False, sort_keys=True),
        json.dumps(list(a.reasons), ensure_ascii=False),
        a.state.value,
        a.created,
        a.expires,
        a.idempotency_key,
        a.trace_id,
        a.decided_by,
        a.decided_at,
        a.reason,
        a.used_at,
        json.dumps(a.extra, ensure_ascii=False, sort_keys=True),
    )
