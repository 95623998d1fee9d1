"""Span attribute names (the contract's) and the attributes of a finished call."""

from __future__ import annotations

import json

from opentelemetry.trace import Span, Status, StatusCode

from proxy.call import Call
from proxy.config import CaptureConfig
from proxy.tracing.redact import capture_body, capture_json

GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
TOOL_NAME = "tool.name"
SESSION_ID = "session.id"
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
DECISION = "handrail.decision"
DECISION_REASONS = "handrail.decision.reasons"
DECISION_ID = "handrail.decision.id"
IDEMPOTENCY_KEY = "handrail.idempotency.key"
IDEMPOTENCY_REPLAYED = "handrail.idempotency.replayed"
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
ERROR_TYPE = "error.type"
MCP_METHOD_NAME = "mcp.method.name"
MCP_SESSION_ID = "mcp.session.id"
JSONRPC_REQUEST_ID = "jsonrpc.request.id"
RUN_ID = "handrail.run.id"


def span_name(call: Call) -> str:
    return f"execute_tool {call.call_name}"


def captured_input(call: Call, capture: CaptureConfig) -> str | None:
    if not capture.arguments:
        return None
    keys = frozenset(k.lower() for k in capture.redact)
    if call.mcp is not None:
        return capture_json(call.mcp.arguments, keys, capture.max_bytes)
    return capture_body(call.body, keys, capture.max_bytes)


def captured_output(call: Call, capture: CaptureConfig) -> str | None:
    if not capture.results:
        return None
    keys = frozenset(k.lower() for k in capture.redact)
    if call.error is not None:
        return json.dumps(call.error.body(call.trace_id))
    body = call.response.body if call.response is not None else bytes(call.captured_body)
    return capture_body(body, keys, capture.max_bytes)


def record_span(call: Call, span: Span, capture: CaptureConfig) -> None:
    """Set the contract's attributes on the call's span once the call has ended."""
    span.update_name(span_name(call))
    tool_name = call.mcp.name if call.mcp else call.tool_name
    attrs: dict[str, str | bool | int] = {
        GEN_AI_OPERATION_NAME: "execute_tool",
        GEN_AI_TOOL_NAME: tool_name,
        TOOL_NAME: tool_name,
        OPENINFERENCE_SPAN_KIND: "TOOL",
        SESSION_ID: call.run_id,
        RUN_ID: call.run_id,
        GEN_AI_AGENT_ID: call.agent_id,
        HTTP_REQUEST_METHOD: call.method,
        URL_PATH: call.path,
        IDEMPOTENCY_REPLAYED: call.replayed,
    }
    attrs[GEN_AI_TOOL_CALL_ID] = (
        str(call.mcp.request_id) if call.mcp and call.mcp.request_id is not None
        else call.idempotency_key or call.span_id
    )
    if call.idempotency_key:
        attrs[IDEMPOTENCY_KEY] = call.idempotency_key
    if call.decision is not None:
        attrs[DECISION] = call.decision.kind.value
        if call.decision.decision_id:
            attrs[DECISION_ID] = call.decision.decision_id
    status = call.error.status if call.error is not None else call.status
    if status is not None:
        attrs[HTTP_RESPONSE_STATUS_CODE] = status
    if call.mcp is not None:
        attrs[MCP_METHOD_NAME] = call.mcp.method
        if call.mcp.session_id:
            attrs[MCP_SESSION_ID] = call.mcp.session_id
        if call.mcp.request_id is not None:
            attrs[JSONRPC_REQUEST_ID] = str(call.mcp.request_id)
    value = captured_input(call, capture)
    if value is not None:
        attrs[INPUT_VALUE] = value
        attrs[INPUT_MIME_TYPE] = "application/json"
    value = captured_output(call, capture)
    if value is not None:
        attrs[OUTPUT_VALUE] = value
        attrs[OUTPUT_MIME_TYPE] = "application/json"
    span.set_attributes(attrs)
    if call.decision is not None and call.decision.reasons:
        span.set_attribute(DECISION_REASONS, list(call.decision.reasons))
    error = call.error
    if error is not None and error.status >= 500:
        span.set_attribute(ERROR_TYPE, error.code)
        span.set_status(Status(StatusCode.ERROR, error.message))
    elif error is not None:
        span.set_attribute("handrail.error.code", error.code)
