"""The one place that renders Handrail's errors as JSON-RPC for MCP clients.

A refusal the model should read and act on (a policy deny, a hold for approval, a blocked
result) becomes a ``tools/call`` *result* with ``isError: true`` and HTTP 200, as the MCP
spec asks for tool execution errors, so the reasons reach the model. Every other error
becomes a JSON-RPC error object whose ``data`` is the contract's error object
(``{"code", "message", "trace_id", ...}``), sent with the contract's HTTP status.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import (
    ApprovalPending,
    BadRequest,
    HandrailError,
    IdempotencyKeyMissing,
    PayloadTooLarge,
    PolicyDenied,
    ResultBlocked,
)
from proxy.mcp.jsonrpc import (
    INVALID_REQUEST,
    SERVER_ERROR,
    JsonRpcError,
    RequestId,
    dumps,
    error_message,
    result_message,
)

_INVALID_REQUEST_ERRORS = (BadRequest, IdempotencyKeyMissing, PayloadTooLarge)


def _reasons(exc: HandrailError) -> list[str]:
    reasons = exc.details.get("reasons")
    if isinstance(reasons, (list, tuple)) and reasons:
        return [str(r) for r in reasons]
    return []


def refusal_text(exc: HandrailError) -> str:
    """What the model reads: why the call did not run (or why its result is withheld)."""
    reasons = "; ".join(_reasons(exc)) or "no reason given"
    if isinstance(exc, ResultBlocked):
        return f"Result blocked by policy: {reasons}"
    if isinstance(exc, ApprovalPending):
        return (
            f"Held for human approval ({exc.details.get('approval_id')}): {reasons}. A person "
            f"must approve it at {exc.details.get('approval_url')}; then call the same tool "
            "with the same arguments again and it runs once. Do not change the arguments: "
            "that needs a new approval."
        )
    if exc.details.get("require_approval"):
        return f"Denied by policy (held for human approval): {reasons}"
    return f"Denied by policy: {reasons}"


def is_tool_refusal(exc: HandrailError) -> bool:
    return isinstance(exc, (PolicyDenied, ResultBlocked, ApprovalPending))


def refusal_result(
    exc: HandrailError, trace_id: str | None, *, modern: bool = False
) -> dict[str, Any]:
    """A CallToolResult with ``isError``; ``_meta.handrail`` keeps the machine-readable facts.

    ``modern`` (2026-07-28 on): every result names its ``resultType``, without which the
    client's SDK rejects the message and the model never reads the reasons.
    """
    facts = exc.body(trace_id)["error"]
    result: dict[str, Any] = {
        "content": [{"type": "text", "text": refusal_text(exc)}],
        "isError": True,
        "_meta": {"handrail": facts},
    }
    if modern:
        result["resultType"] = "complete"
    return result


def render_error(
    exc: HandrailError,
    request_id: RequestId | None,
    trace_id: str | None,
    *,
    modern: bool = False,
) -> tuple[int, dict[str, Any]]:
    """``(http_status, message)`` for an error that ended a JSON-RPC request."""
    if is_tool_refusal(exc):
        return 200, result_message(request_id, refusal_result(exc, trace_id, modern=modern))
    code = INVALID_REQUEST if isinstance(exc, _INVALID_REQUEST_ERRORS) else SERVER_ERROR
    data = exc.body(trace_id)["error"]
    return exc.status, error_message(request_id, code, exc.message, data)


def render_invalid(err: JsonRpcError, trace_id: str | None) -> tuple[int, dict[str, Any]]:
    """A message that is not JSON-RPC: HTTP 400 with -32700 or -32600."""
    data = {"code": BadRequest.code, "message": err.message, "trace_id": trace_id}
    return 400, error_message(err.request_id, err.code, err.message, data)


def json_response(status: int, payload: Any) -> web.Response:
    headers = CIMultiDict({"Content-Type": "application/json"})
    return web.Response(status=status, body=dumps(payload), headers=headers)
