"""Span attribute names (the contract's) and the attributes of a finished call.

The call span speaks three conventions at once, so that any backend shows it well:
OpenTelemetry GenAI (``gen_ai.*``, ``execute_tool``), OpenInference (Phoenix, Arize:
``openinference.span.kind=TOOL``, ``input.value``, ``session.id``) and, for MCP calls,
the OpenTelemetry MCP conventions (``mcp.*``, ``jsonrpc.*``). Handrail's own facts are
under ``handrail.*``.

A deny is a decision, not an error: it is recorded as ``handrail.decision=deny`` with
its reasons and leaves the span status unset. Only failures (5xx: the tool unreachable or
too slow, the policy engine or store down, or the tool's own 5xx) set status ERROR and
``error.type``.
"""

from __future__ import annotations

from functools import lru_cache

from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from proxy.call import Call
from proxy.config import CaptureConfig
from proxy.tracing.redact import Redactor, capture_body, capture_json

GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
TOOL_NAME = "tool.name"
SESSION_ID = "session.id"
AGENT_NAME = "agent.name"
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
DECISION = "handrail.decision"
DECISION_REASONS = "handrail.decision.reasons"
DECISION_ID = "handrail.decision.id"
DECISION_CACHED = "handrail.decision.cached"
IDEMPOTENCY_KEY = "handrail.idempotency.key"
IDEMPOTENCY_KEY_DERIVED = "handrail.idempotency.key_derived"
IDEMPOTENCY_REPLAYED = "handrail.idempotency.replayed"
ERROR_CODE = "handrail.error.code"
RUN_ID = "handrail.run.id"
TOOL = "handrail.tool"
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
ERROR_TYPE = "error.type"
MCP_METHOD_NAME = "mcp.method.name"
MCP_SESSION_ID = "mcp.session.id"
MCP_PROTOCOL_VERSION = "mcp.protocol.version"
JSONRPC_REQUEST_ID = "jsonrpc.request.id"
JSONRPC_PROTOCOL_VERSION = "jsonrpc.protocol.version"

OPERATION = "execute_tool"
SPAN_KIND_TOOL = "TOOL"
SPAN_KIND_GUARDRAIL = "GUARDRAIL"
"""The policy's decision (and, later, result checks): what Phoenix shows as a guardrail."""
SPAN_KIND_CHAIN = "CHAIN"
"""Handrail's own steps (the idempotency key)."""
USER_ID = "user.id"
"""OpenInference's user: the agent."""
JSON_MIME = "application/json"
TEXT_MIME = "text/plain"

_CAPTURED = "tracing.captured"
"""``call.extra`` key: the captured input and output, computed once for span and journal."""


def span_name(call: Call) -> str:
    """``execute_tool {tool}``, or ``execute_tool {tool}.{call}`` for an MCP tools/call."""
    return f"{OPERATION} {call.call_name}"


@lru_cache(maxsize=256)
def _redactor(keys: tuple[str, ...], secrets: tuple[str, ...]) -> Redactor:
    return Redactor.build(keys, secrets)


def redactor_for(call: Call, capture: CaptureConfig) -> Redactor:
    """The capture's redact keys, plus the tool's configured header values (credentials)."""
    return _redactor(tuple(capture.redact), tuple(sorted(call.tool.headers.values())))


def _mime(text: str) -> str:
    return JSON_MIME if text[:1] in ("{", "[", '"') else TEXT_MIME


def _capture_input(call: Call, capture: CaptureConfig, redactor: Redactor) -> str | None:
    if not capture.arguments:
        return None
    if call.mcp is not None:
        return capture_json(call.mcp.arguments, redactor, capture.max_bytes)
    return capture_body(call.body, redactor, capture.max_bytes, call.json_body)


def _capture_output(call: Call, capture: CaptureConfig, redactor: Redactor) -> str | None:
    if not capture.results:
        return None
    if call.error is not None and call.response is None and not call.captured_body:
        # The proxy answered itself (deny, bad key, tool down): its error body is the output.
        return capture_json(call.error.body(call.trace_id), redactor, capture.max_bytes)
    body = call.response.body if call.response is not None else bytes(call.captured_body)
    return capture_body(body, redactor, capture.max_bytes)


def captured(call: Call, capture: CaptureConfig) -> tuple[str | None, str | None]:
    """The call's input and output as they may leave the proxy: redacted and truncated.

    Computed once per call (the span and the journal share it); ``None`` when not captured.
    """
    cached = call.extra.get(_CAPTURED)
    if cached is None:
        redactor = redactor_for(call, capture)
        cached = (_capture_input(call, capture, redactor), _capture_output(call, capture, redactor))
        call.extra[_CAPTURED] = cached
    return cached


NOT_FAILURES = frozenset({"result_blocked"})
"""5xx codes that are the policy's verdict on a result, recorded like a deny, not as errors."""


def final_status(call: Call) -> int | None:
    """The status the agent saw: the proxy's error status, else the tool's (or replayed)."""
    return call.reply.error_status(call.error) if call.error is not None else call.status


def error_type(call: Call) -> str | None:
    """``error.type`` for a failed call (5xx), else ``None``: a deny or a 4xx is no failure."""
    status = final_status(call)
    if status is None or status < 500:
        return None
    if call.error is not None:
        return None if call.error.code in NOT_FAILURES else call.error.code
    return str(status)


def tool_call_id(call: Call) -> str:
    if call.mcp is not None and call.mcp.request_id is not None:
        return str(call.mcp.request_id)
    return call.idempotency_key or call.span_id


def call_attributes(call: Call, capture: CaptureConfig) -> dict[str, AttributeValue]:
    """Every attribute of the call span, from the finished call: pure."""
    tool_name = call.mcp.name if call.mcp is not None else call.tool_name
    attrs: dict[str, AttributeValue] = {
        GEN_AI_OPERATION_NAME: OPERATION,
        GEN_AI_TOOL_NAME: tool_name,
        GEN_AI_TOOL_TYPE: "extension",
        GEN_AI_TOOL_CALL_ID: tool_call_id(call),
        GEN_AI_AGENT_ID: call.agent_id,
        GEN_AI_CONVERSATION_ID: call.run_id,
        OPENINFERENCE_SPAN_KIND: SPAN_KIND_TOOL,
        TOOL_NAME: tool_name,
        AGENT_NAME: call.agent_id,
        USER_ID: call.agent_id,
        SESSION_ID: call.run_id,
        RUN_ID: call.run_id,
        TOOL: call.tool_name,
        HTTP_REQUEST_METHOD: call.method,
        URL_PATH: call.path,
        IDEMPOTENCY_REPLAYED: call.replayed,
    }
    if call.idempotency_key:
        attrs[IDEMPOTENCY_KEY] = call.idempotency_key
        attrs[IDEMPOTENCY_KEY_DERIVED] = call.key_derived
    decision = call.decision
    if decision is not None:
        attrs[DECISION] = decision.kind.value
        if decision.reasons:
            attrs[DECISION_REASONS] = list(decision.reasons)
        if decision.decision_id:
            attrs[DECISION_ID] = decision.decision_id
        if decision.cached:
            attrs[DECISION_CACHED] = True
    status = final_status(call)
    if status is not None:
        attrs[HTTP_RESPONSE_STATUS_CODE] = status
    if call.error is not None:
        attrs[ERROR_CODE] = call.error.code
    failure = error_type(call)
    if failure is not None:
        attrs[ERROR_TYPE] = failure
    mcp = call.mcp
    if mcp is not None:
        attrs[MCP_METHOD_NAME] = mcp.method
        attrs[JSONRPC_PROTOCOL_VERSION] = "2.0"
        if mcp.session_id:
            attrs[MCP_SESSION_ID] = mcp.session_id
        if mcp.protocol_version:
            attrs[MCP_PROTOCOL_VERSION] = mcp.protocol_version
        if mcp.request_id is not None:
            attrs[JSONRPC_REQUEST_ID] = str(mcp.request_id)
    input_value, output_value = captured(call, capture)
    if input_value:
        attrs[INPUT_VALUE] = input_value
        attrs[INPUT_MIME_TYPE] = _mime(input_value)
    if output_value:
        attrs[OUTPUT_VALUE] = output_value
        attrs[OUTPUT_MIME_TYPE] = _mime(output_value)
    return attrs


def record_span(call: Call, span: Span, capture: CaptureConfig) -> None:
    """Name the call span and set the contract's attributes once the call has ended."""
    if not span.is_recording():
        return
    span.update_name(span_name(call))
    span.set_attributes(call_attributes(call, capture))
    failure = error_type(call)
    if failure is not None:
        message = call.error.message if call.error is not None else f"the tool answered {failure}"
        span.set_status(Status(StatusCode.ERROR, message))
