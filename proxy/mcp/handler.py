"""MCP Streamable HTTP through the proxy: ``tools/call`` guarded, ``tools/list`` filtered.

Every other message passes through as it came: POSTs (JSON or SSE answers, streamed as
they arrive), the server-to-client GET event stream and ``subscriptions/listen`` (no total
timeout), DELETE, and the 202 answers to notifications. A ``tools/call`` runs the pipeline
like an HTTP call; what it keeps for replay and traces is the JSON-RPC response message
itself (JSON), whether the server answered with JSON or an SSE stream, so a retry gets that
message back under its own JSON-RPC id with the ``result`` bytes unchanged.

Every revision a current SDK speaks shares the endpoint, chosen per request as servers do
(``proxy.mcp.headers.protocol_version``): the handshake revisions with ``Mcp-Session-Id``,
and 2026-07-28, stateless, with its envelope in each request's ``params._meta`` and
routing headers that must agree with the body.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from opentelemetry.trace import Span, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import pipeline
from proxy.approvals.model import BadToken, is_ours, verify
from proxy.call import McpCall
from proxy.deps import Deps
from proxy.errors import ApprovalPending, HandrailError
from proxy.ingress.request import Identity, capture_limit, new_call, read_body
from proxy.mcp import jsonrpc
from proxy.mcp.approval import REQUEST_STATE_PURPOSE, approval_round, url_elicitation
from proxy.mcp.headers import header_mismatch, is_modern, protocol_version
from proxy.mcp.inflight import in_flight
from proxy.mcp.listing import annotations_for
from proxy.mcp.relay import Passage, endpoint_path, identity_encoding, pass_through
from proxy.mcp.render import json_response, render_error, render_invalid
from proxy.mcp.reply import SESSION_HEADER, McpReply
from proxy.store.keys import parse_key_header
from proxy.tracing.attributes import (
    JSONRPC_REQUEST_ID,
    MCP_METHOD_NAME,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
    SESSION_ID,
    USER_ID,
)

logger = logging.getLogger(__name__)

VERSION_HEADER = "MCP-Protocol-Version"
KEY_META = "io.handrail/idempotencyKey"
"""A ``params._meta`` member that is the call's Idempotency-Key, for clients that cannot set
a header per call: a new value makes a deliberate repeat of the same call run again."""
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request its client closed: logged, never seen by anyone."""
STREAM_METHODS = frozenset({"subscriptions/listen"})
"""POSTs whose answer is an event stream that lives as long as the client wants it."""


async def handle_mcp(request: web.Request, deps: Deps, ident: Identity) -> web.StreamResponse:
    session = request.headers.get(SESSION_HEADER)
    if session:
        ident.span.set_attribute(MCP_SESSION_ID, session)
    # Every MCP message's span belongs to the run (Phoenix groups a session's spans by it),
    # not only the tools/call ones: initialize, lists, notifications, the event stream.
    ident.span.set_attribute(SESSION_ID, ident.run_id_hint or session or ident.trace_id)
    if ident.agent_id:
        ident.span.set_attribute(USER_ID, ident.agent_id)
    calls = in_flight(request)
    if request.method != "POST":
        ident.span.update_name(f"{request.method} {ident.tool_name}")
        ident.span.set_attribute(MCP_PROTOCOL_VERSION, protocol_version(None, request.headers))
        if request.method != "GET":
            return await pass_through(request, deps, ident, b"", None, Passage(session))
        with calls.stream(ident.tool_name, ident.agent_id, ident.tool):
            async with calls.opening(ident.tool_name, session) as opened:
                passage = Passage(session, long_lived=True, on_open=opened.set)
                return await pass_through(request, deps, ident, b"", None, passage)
    body = await read_body(request, ident.tool.max_body_bytes)
    try:
        parsed = jsonrpc.parse_body(body)
        _check_batch(parsed, request.headers.get(VERSION_HEADER))
    except jsonrpc.JsonRpcError as err:
        ident.span.set_attribute("handrail.error.code", "bad_request")
        return json_response(*render_invalid(err, ident.trace_id))
    first = parsed.messages[0]
    version = protocol_version(None if parsed.batch else first, request.headers)
    ident.span.set_attribute(MCP_PROTOCOL_VERSION, version)
    passage = Passage(session, modern=is_modern(version))
    if not parsed.batch and first.method is not None:
        mismatch = header_mismatch(first, request.headers)
        if mismatch is not None:
            ident.span.set_attribute("handrail.error.code", "bad_request")
            refusal = jsonrpc.JsonRpcError(jsonrpc.HEADER_MISMATCH, mismatch, first.id)
            return json_response(*render_invalid(refusal, ident.trace_id))
        ident.span.set_attribute(MCP_METHOD_NAME, first.method)
        if first.id is not None:
            ident.span.set_attribute(JSONRPC_REQUEST_ID, str(first.id))
        await calls.streams_opened(ident.tool_name, session)
        if first.method == "tools/call":
            return await _tools_call(request, deps, ident, body, first, passage, version)
        ident.span.update_name(f"{first.method} {ident.tool_name}")
        if first.method in STREAM_METHODS:
            with calls.stream(ident.tool_name, ident.agent_id, ident.tool):
                listen = Passage(session, modern=passage.modern, long_lived=True)
                return await pass_through(request, deps, ident, body, parsed, listen)
    else:
        ident.span.update_name(f"POST {ident.tool_name}")
        await calls.streams_opened(ident.tool_name, session)
    for message in parsed.messages:
        if message.method == "notifications/cancelled":
            request_id = message.params.get("requestId")
            calls.note_cancel(ident.tool_name, ident.agent_id, session, request_id)
    return await pass_through(request, deps, ident, body, parsed, passage)


def _check_batch(parsed: jsonrpc.Body, version: str | None) -> None:
    if not parsed.batch:
        return
    if not jsonrpc.batches_allowed(version):
        raise jsonrpc.JsonRpcError(
            jsonrpc.INVALID_REQUEST, f"JSON-RPC batches are not part of MCP {version}"
        )
    if any(m.method == "tools/call" for m in parsed.messages):  # notifications too
        raise jsonrpc.JsonRpcError(
            jsonrpc.INVALID_REQUEST,
            "Handrail checks each tools/call on its own: send it alone, not in a batch",
        )


# -- tools/call: the guarded path -----------------------------------------------------


async def _tools_call(
    request: web.Request,
    deps: Deps,
    ident: Identity,
    body: bytes,
    message: jsonrpc.Message,
    passage: Passage,
    version: str,
) -> web.StreamResponse:
    params = message.params
    name, arguments = params.get("name"), params.get("arguments")
    if not isinstance(name, str) or not name or not isinstance(arguments, dict | None):
        err = jsonrpc.JsonRpcError(
            jsonrpc.INVALID_PARAMS,
            "tools/call needs params.name (a string) and params.arguments (an object)",
            message.id,
        )
        return json_response(*render_invalid(err, ident.trace_id))
    try:
        meta_key = _meta_key(params, ident.idempotency_key)
    except jsonrpc.JsonRpcError as err:
        err.request_id = message.id
        return json_response(*render_invalid(err, ident.trace_id))
    try:
        bound, body, payload = _approval_round(deps, ident, message, body)
    except jsonrpc.JsonRpcError as err:
        return json_response(*render_invalid(err, ident.trace_id))
    session = passage.session
    link_meta_context(ident.span, params)
    meta = params.get("_meta")
    annotations = await annotations_for(request, deps, ident, name, session, meta)
    reply = McpReply(request, capture_limit(deps.config), message.id, modern=passage.modern)
    call = new_call(
        request,
        ident,
        body=body,
        json_body=payload,
        reply=reply,
        method="POST",
        path=endpoint_path(ident),
        mcp=McpCall(
            name,
            arguments or {},
            annotations,
            message.id,
            session,
            "tools/call",
            version,
            definition_changed=deps.pinning.changed(ident.tool_name, name) is not None,
        ),
        run_id=session,
    )
    if meta_key is not None:
        call.idempotency_key = meta_key
    if bound is not None:
        call.extra["approval_bound"] = bound
    if ident.run_id_hint is None:
        # A later round of a multi round-trip call is the same logical call: its run (and
        # so its derived key) is the first round's, whatever trace context it carries.
        state = params.get("requestState")
        first_run = in_flight(request).round_run(ident.tool_name, ident.agent_id, state)
        if first_run is not None:
            call.run_id = first_run
    identity_encoding(call)
    try:
        if passage.modern:  # closing the stream is how a 2026-07-28 client cancels
            await pipeline.run_while_connected(call, deps, lambda: _connected(request))
        else:  # the handshake revisions cancel by notification; a hang-up is not one
            await pipeline.run_to_the_end(call, deps)
    except HandrailError as exc:
        if reply.response is not None and reply.response.prepared:
            # The stream has begun: break it so the agent sees the failure.
            if request.transport is not None:
                request.transport.close()
            return reply.response
        if isinstance(exc, ApprovalPending) and passage.modern and url_elicitation(meta):
            held = approval_round(deps, call, exc)
            return json_response(200, jsonrpc.result_message(message.id, held))
        rendered = render_error(exc, message.id, ident.trace_id, modern=passage.modern)
        return json_response(*rendered)
    if reply.response is None:  # cancelled by the agent before any answer: nobody to tell
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    return reply.response


def _approval_round(
    deps: Deps, ident: Identity, message: jsonrpc.Message, body: bytes
) -> tuple[tuple[str, str] | None, bytes, dict[str, Any]]:
    """A retry answering Handrail's own ``input_required`` (a held call): the approval its
    signed ``requestState`` names (with the fingerprint it is bound to), and the request as
    the server will get it, without the round's fields it never issued. Others pass as
    they are."""
    state = message.params.get("requestState")
    if not is_ours(state):
        return None, body, message.payload
    try:
        claims = verify(deps.approvals.key, REQUEST_STATE_PURPOSE, state)
    except BadToken as exc:
        raise jsonrpc.JsonRpcError(
            jsonrpc.INVALID_PARAMS,
            f"requestState refused ({exc}): send the call again without it for a new approval",
            message.id,
        ) from None
    if claims.get("agent") != ident.agent_id or claims.get("tool") != ident.tool_name:
        raise jsonrpc.JsonRpcError(
            jsonrpc.INVALID_PARAMS, "requestState was issued to another agent or tool", message.id
        )
    params = {
        k: v for k, v in message.params.items() if k not in ("requestState", "inputResponses")
    }
    payload = {**message.payload, "params": params}
    return (str(claims["id"]), str(claims["fp"])), jsonrpc.dumps(payload), payload


def _connected(request: web.Request) -> bool:
    return request.transport is not None and not request.transport.is_closing()


def _meta_key(params: dict[str, Any], header_key: str | None) -> str | None:
    """The key a client put in ``params._meta`` (``KEY_META``); refused when it is not a
    valid key, or when an ``Idempotency-Key`` header names another one."""
    meta = params.get("_meta")
    if not isinstance(meta, dict) or KEY_META not in meta:
        return None
    value = meta[KEY_META]
    try:
        key = parse_key_header(value) if isinstance(value, str) else None
    except ValueError as exc:
        raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, f"_meta {KEY_META} {exc}") from None
    if key is None:
        raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, f"_meta {KEY_META} must be a string")
    if header_key is not None and header_key != key:
        raise jsonrpc.JsonRpcError(
            jsonrpc.INVALID_PARAMS,
            f"the Idempotency-Key header and _meta {KEY_META} name different keys",
        )
    return key


def link_meta_context(span: Span, params: dict[str, Any]) -> None:
    """``params._meta.traceparent`` names the agent's span for this call.

    Without an HTTP ``traceparent`` it is already the call's parent (see
    ``proxy.ingress.request.mcp_meta_parent``); when both are there and name different traces,
    the ``_meta`` one becomes a link.
    """
    meta = params.get("_meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return
    carrier = {"traceparent": meta["traceparent"]}
    if isinstance(meta.get("tracestate"), str):
        carrier["tracestate"] = meta["tracestate"]
    linked = get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    own = span.get_span_context()
    if linked.is_valid and linked.trace_id != own.trace_id:
        span.add_link(linked, {"handrail.link.source": "mcp.params._meta"})
