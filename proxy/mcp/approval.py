"""A held ``tools/call`` answered in-band to a 2026-07-28 client: a multi round-trip
``input_required`` result whose one input request is a URL-mode elicitation pointing at the
approval's page, and a ``requestState`` Handrail signs (HMAC), binding the round to the
approval, the agent, the tool and the call's payload fingerprint.

The client shows the person the link (or opens it), then retries the same call carrying the
``requestState``; Handrail checks the signature and the binding, takes the round's fields
off the request (the server never issued them) and lets the call through once approved, or
answers another ``input_required`` while the approval is still pending. Clients that cannot
take URL elicitations (older revisions, or no ``elicitation.url`` capability) get an
``isError`` result naming the approval and what to do (``proxy.mcp.render``).
"""

from __future__ import annotations

from typing import Any

from proxy.approvals.gate import REQUEST_STATE_PURPOSE
from proxy.approvals.model import sign
from proxy.call import Call
from proxy.deps import Deps
from proxy.errors import ApprovalPending
from proxy.mcp.headers import CLIENT_CAPABILITIES_META

__all__ = ["REQUEST_STATE_PURPOSE", "approval_round", "url_elicitation"]

INPUT_KEY = "handrail.approval"


def url_elicitation(meta: Any) -> bool:
    """The client said it takes URL-mode elicitations (``elicitation.url``)."""
    if not isinstance(meta, dict):
        return False
    capabilities = meta.get(CLIENT_CAPABILITIES_META)
    elicitation = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
    return isinstance(elicitation, dict) and isinstance(elicitation.get("url"), dict)


def approval_round(deps: Deps, call: Call, exc: ApprovalPending) -> dict[str, Any]:
    approval_id = str(exc.details["approval_id"])
    reasons = "; ".join(exc.details.get("reasons") or []) or "the policy asks for a person"
    claims = {
        "id": approval_id,
        "agent": call.agent_id,
        "tool": call.tool_name,
        "fp": call.fingerprint,
    }
    ttl = max(1.0, float(exc.details.get("expires", 0)) - call.timings.started_wall)
    state = sign(deps.approvals.key, REQUEST_STATE_PURPOSE, claims, ttl)
    return {
        "resultType": "input_required",
        "inputRequests": {
            INPUT_KEY: {
                "method": "elicitation/create",
                "params": {
                    "mode": "url",
                    "url": exc.details["approval_url"],
                    "elicitationId": approval_id,
                    "message": (
                        f"This call waits for a person's approval ({reasons}). Open the "
                        "link to approve or reject it; the call goes on once approved."
                    ),
                },
            }
        },
        "requestState": state,
    }
