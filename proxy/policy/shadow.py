"""Shadow policies (``policy.shadow``): candidate policies decide every live call too.

The candidate's decision is asked for at the same moment as the live one, on the same input
document, by an engine of its own (one evaluator); it is never waited for on the call's path:
the call's record (span attributes, journal row) is written once it is in, or after
``WAIT_S`` without it. The live decision is the one enforced. What the shadow decided is
recorded beside it (``handrail.shadow.decision`` on the span, the journal's ``shadow``
column) and every difference is counted (``handrail_shadow_differences_total``), compared
the way ``handrail replay`` compares a recorded run against candidate policies.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.call import Decision
from proxy.errors import HandrailError
from proxy.replay.compare import Verdict, compare

WAIT_S = 2.0
"""How long a call's record waits for its shadow decision."""


def shadow_record(live: Decision | None, task: asyncio.Task[Decision]) -> dict[str, Any]:
    """What the journal and the span keep of the shadow's decision of one call."""
    if not task.done():
        task.cancel()
        return {"decision": None, "error": "not decided in time"}
    if task.cancelled():
        return {"decision": None, "error": "cancelled"}
    exc = task.exception()
    if exc is not None:
        code = exc.code if isinstance(exc, HandrailError) else type(exc).__name__
        return {"decision": None, "error": code}
    shadow = task.result()
    record: dict[str, Any] = {
        "decision": shadow.kind.value,
        "reasons": list(shadow.reasons),
    }
    if live is not None:
        change = compare(Verdict.of(live), Verdict.of(shadow))
        record["change"] = change.kind.value if change is not None else None
    return record
