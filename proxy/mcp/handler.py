"""MCP Streamable HTTP through the proxy: ``tools/call`` guarded, ``tools/list`` filtered.

Every other message passes through as it came: POSTs (JSON or SSE answers, streamed as
they arrive), the server-to-client GET event stream (no total timeout), DELETE, and the
202 answers to notifications. A ``tools/call`` runs the pipeline like an HTTP call; what
it keeps for replay and traces is the JSON-RPC response message itself (JSON), whether the
server answered with JSON or an SSE stream, so a retry gets that message back under its
own JSON-RPC id with the ``result`` bytes unchanged.

Annotations for the policy come from the server's ``tools/list`` answers seen on the way
(per session, then per server). When a call names a tool no listing has shown yet, the
proxy lists the tools itself once, in the agent's session, before deciding.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import Span, SpanKind, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import pipeline
from proxy.call import Call, McpCall, Outcome, StoredResponse, UnknownReason, Upstream
from proxy.credentials import StreamScrubber, answer_forms, scrub
from proxy.deps import Deps
from proxy.errors import HandrailError
from proxy.ingress.reply import AgentStream, note_gone
from proxy.ingress.request import Identity, capture_limit, keep_limit, new_call, read_body, tee
from proxy.mcp import jsonrpc
from proxy.mcp.annotations import Annotations, catalog
from proxy.mcp.headers import (
    CLIENT_CAPABILITIES_META,
    CLIENT_INFO_META,
    HEADER_MISMATCH,
    PROTOCOL_VERSION_META,
    header_mismatch,
)
from proxy.mcp.inflight import in_flight, settle_on_response
from proxy.mcp.relay import (
    SKIP_AUTO_HEADERS,
    bare_call,
    endpoint_path,
    identity_encoding,
    pass_through,
)
from proxy.mcp.render import json_response, render_error, render_invalid
from proxy.tracing.attributes import JSONRPC_REQUEST_ID, MCP_METHOD_NAME, MCP_SESSION_ID
from proxy.upstream import upstream_headers, upstream_url

logger = logging.getLogger(__name__)

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
MAX_LIST_PAGES = 20


async def handle_mcp(request: web.Request, deps: Deps, ident: Identity) -> web.StreamResponse:
    session = request.headers.get(SESSION_HEADER)
    if session:
        ident.span.set_attribute(MCP_SESSION_ID, session)
    if request.method != "POST":
        ident.span.update_name(f"{request.method} {ident.tool_name}")
        if request.method != "GET":
            return await pass_through(request, deps, ident, b"", None, session)
        with in_flight(request).stream(ident.tool_name, ident.agent_id, ident.tool):
            return await pass_through(request, deps, ident, b"", None, session)
    body = await read_body(request, ident.tool.max_body_bytes)
    try:
        parsed = jsonrpc.parse_body(body)
        _check_batch(parsed, request.headers.get(VERSION_HEADER))
    except jsonrpc.JsonRpcError as err:
        ident.span.set_attribute("handrail.error.code", "bad_request")
        return json_response(*render_invalid(err, ident.trace_id))
    first = parsed.messages[0]
    if not parsed.batch and first.method is not None:
        mismatch = header_mismatch(first, request.headers)
        if mismatch is not None:
            ident.span.set_attribute("handrail.error.code", "bad_request")
            refusal = jsonrpc.JsonRpcError(HEADER_MISMATCH, mismatch, first.id)
            return json_response(*render_invalid(refusal, ident.trace_id))
        ident.span.set_attribute(MCP_METHOD_NAME, first.method)
        if first.id is not None:
            ident.span.set_attribute(JSONRPC_REQUEST_ID, str(first.id))
        if first.method == "tools/call":
            return await _tools_call(request, deps, ident, body, first, session)
        ident.span.update_name(f"{first.method} {ident.tool_name}")
    else:
        ident.span.update_name(f"POST {ident.tool_name}")
    for message in parsed.messages:
        if message.method == "notifications/cancelled":
            request_id = message.params.get("requestId")
            in_flight(request).note_cancel(ident.tool_name, ident.agent_id, session, request_id)
    return await pass_through(request, deps, ident, body, parsed, session)


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
    session: str | None,
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
    link_meta_context(ident.span, params)
    annotations = await _annotations(request, deps, ident, name, session, params.get("_meta"))
    reply = McpReply(request, capture_limit(deps.config), message.id)
    call = new_call(
        request,
        ident,
        body=body,
        json_body=message.payload,
        reply=reply,
        method="POST",
        path=endpoint_path(ident),
        mcp=McpCall(name, arguments or {}, annotations, message.id, session),
        run_id=session,
    )
    identity_encoding(call)
    try:
        await pipeline.run(call, deps)
    except HandrailError as exc:
        if reply.response is not None and reply.response.prepared:
            # The stream has begun: break it so the agent sees the failure.
            if request.transport is not None:
                request.transport.close()
            return reply.response
        return json_response(*render_error(exc, message.id, ident.trace_id))
    assert reply.response is not None
    return reply.response


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


class McpReply:
    """Streams a tools/call answer to the agent; keeps only its JSON-RPC response message."""

    def __init__(self, request: web.Request, capture_bytes: int, request_id: Any) -> None:
        self.request = request
        self.capture_bytes = capture_bytes
        self.request_id = request_id
        self.response: web.StreamResponse | None = None

    async def replay(self, call: Call, stored: StoredResponse) -> None:
        body = stored.body
        try:
            body = jsonrpc.with_id(stored.body, self.request_id)
        except ValueError:
            logger.warning("stored MCP answer is not a JSON-RPC message; replaying it as kept")
        headers = CIMultiDict((k, v) for k, v in stored.headers if k.lower() != "mcp-session-id")
        session = self.request.headers.get(SESSION_HEADER)
        if session:
            headers[SESSION_HEADER] = session
        headers["Idempotent-Replayed"] = "true"
        call.response_headers = list(stored.headers)
        self.response = web.Response(status=stored.status, body=body, headers=headers)
        call.delivered = True

    def error_status(self, exc: HandrailError) -> int:
        """A refusal is a tool result the model reads (200); other errors keep theirs."""
        return render_error(exc, self.request_id, None)[0]

    async def stream(self, call: Call, upstream: Upstream) -> None:
        keep = keep_limit(call, self.capture_bytes)
        forms = answer_forms(call.tool)  # the server's credentials: never sent to the agent
        content_type = _header(upstream.headers, "content-type")
        if not content_type.lower().startswith("text/event-stream"):
            call.response_headers = upstream.headers
            body = b"".join([chunk async for chunk in upstream.body])
            body = scrub(body, forms) if forms else body
            tee(call, body, keep)
            call.delivered = True
            note_gone(self.request, call)
            self._settle_on_json(call, upstream.status, body)
            self.response = web.Response(
                status=upstream.status, body=body, headers=CIMultiDict(upstream.headers)
            )
            return
        call.response_headers = [
            (k, v) for k, v in upstream.headers if k.lower() != "content-type"
        ] + [("Content-Type", "application/json")]
        response = web.StreamResponse(status=upstream.status, headers=CIMultiDict(upstream.headers))
        self.response = response
        agent = AgentStream(self.request, response, call)
        await agent.start()
        parser = jsonrpc.SseParser()
        found = False
        scrubber = StreamScrubber(forms) if forms else None
        chunks = upstream.body if scrubber is None else _scrubbed(upstream.body, scrubber)
        async for chunk in chunks:  # read to the end even if the agent has gone
            for event in parser.feed(chunk):
                if call.on_progress is not None:
                    call.on_progress()  # progress, server requests: the call is alive
                message = jsonrpc.event_message(event)
                if not found and _answers(message, self.request_id):
                    # The response message is the whole answer: once it is here the
                    # record is complete, even if the agent hangs up on the rest.
                    tee(call, event.data.encode(), keep)
                    found = call.delivered = True
                    cancelled = in_flight(self.request).was_cancelled(call, self.request_id)
                    settle_on_response(call, message, cancelled=cancelled)
            await agent.write(chunk)
        if not found:
            # The stream ended without the call's response: it may have run.
            call.outcome = Outcome.UNKNOWN
            calls = in_flight(self.request)
            if calls.was_cancelled(call, self.request_id):
                call.unknown_reason = UnknownReason.CANCELLED
            else:
                call.unknown_reason = UnknownReason.NO_RESPONSE
                calls.expect_answer(call, self.request_id)
        await agent.finish()

    def _settle_on_json(self, call: Call, status: int, body: bytes) -> None:
        if 400 <= status < 500:
            call.outcome = Outcome.NOT_RUN  # refused at the protocol level (session, headers)
            return
        if status >= 500:
            call.outcome = Outcome.ANSWERED
            return
        try:
            message = jsonrpc.loads_answer(body)
        except ValueError:
            message = None
        if _answers(message, self.request_id):
            cancelled = in_flight(self.request).was_cancelled(call, self.request_id)
            settle_on_response(call, message, cancelled=cancelled)
        elif isinstance(message, dict) and "error" in message and message.get("id") is None:
            call.outcome = Outcome.NOT_RUN  # the server could not read the request at all
        else:
            call.outcome, call.unknown_reason = Outcome.UNKNOWN, UnknownReason.NO_RESPONSE


async def _scrubbed(body: AsyncIterator[bytes], scrubber: StreamScrubber) -> AsyncIterator[bytes]:
    async for chunk in body:
        yield scrubber.feed(chunk)
    if rest := scrubber.flush():
        yield rest


def _answers(obj: Any, request_id: Any) -> bool:
    return (
        isinstance(obj, dict)
        and "method" not in obj
        and ("result" in obj or "error" in obj)
        and obj.get("id") == request_id
        and type(obj.get("id")) is type(request_id)
    )


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


# -- annotations ----------------------------------------------------------------------


async def _annotations(
    request: web.Request,
    deps: Deps,
    ident: Identity,
    name: str,
    session: str | None,
    meta: Any,
) -> Annotations | None:
    cat = catalog(request)
    known, annotations = cat.lookup(ident.tool_name, session, name)
    if known:
        return annotations
    tools = await _list_tools(request, deps, ident, session, meta)
    if tools is None:
        return None
    cat.remember(ident.tool_name, session, tools)
    known, annotations = cat.lookup(ident.tool_name, session, name)
    if not known:
        cat.mark_unknown(ident.tool_name, session, name)
    return annotations


def _list_envelope(meta: Any) -> dict[str, Any] | None:
    """2026-07-28: a tools/list of our own carries the agent's protocol envelope."""
    if not isinstance(meta, dict) or PROTOCOL_VERSION_META not in meta:
        return None
    envelope = {PROTOCOL_VERSION_META: meta[PROTOCOL_VERSION_META]}
    for key in (CLIENT_CAPABILITIES_META, CLIENT_INFO_META):
        if key in meta:
            envelope[key] = meta[key]
    envelope.setdefault(CLIENT_CAPABILITIES_META, {})
    return envelope


async def _list_tools(
    request: web.Request, deps: Deps, ident: Identity, session: str | None, meta: Any
) -> list[dict[str, Any]] | None:
    """Ask the server for its tools in the agent's session (2026-07-28: with the agent's
    protocol envelope and the routing headers of a tools/list); ``None`` when that fails."""
    envelope = _list_envelope(meta)
    call = bare_call(request, ident, b"", session)
    call.idempotency_key = None
    url = upstream_url(ident.tool.upstream, call.path, call.query_string)
    timeout = aiohttp.ClientTimeout(total=ident.tool.timeout_s)
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    with deps.tracer.start_as_current_span("tools/list", kind=SpanKind.CLIENT) as span:
        headers = upstream_headers(call, span)
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "application/json, text/event-stream"
        headers.popall("Mcp-Name", None)  # the agent's call named a tool; a listing names none
        if envelope is not None:
            headers["Mcp-Method"] = "tools/list"
            headers["MCP-Protocol-Version"] = str(envelope[PROTOCOL_VERSION_META])
        else:
            headers.popall("Mcp-Method", None)
        for _ in range(MAX_LIST_PAGES):
            request_id = f"handrail-{uuid.uuid4().hex}"
            message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": "tools/list"}
            params: dict[str, Any] = {}
            if cursor:
                params["cursor"] = cursor
            if envelope is not None:
                params["_meta"] = envelope
            if params:
                message["params"] = params
            try:
                async with deps.pools.session(ident.tool_name).post(
                    url,
                    data=jsonrpc.dumps(message),
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                ) as response:
                    raw = await response.read()
                    content_type = response.headers.get("Content-Type", "")
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                logger.warning(
                    "listing tools of %s failed: %s",
                    ident.tool_name,
                    exc,
                    extra={"tool": ident.tool_name, "trace_id": ident.trace_id},
                )
                return None
            answer = jsonrpc.response_in(raw, content_type, request_id) if status == 200 else None
            result = jsonrpc.loads_answer(answer).get("result") if answer else None
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                logger.warning(
                    "tools/list of %s gave no usable answer (HTTP %d)",
                    ident.tool_name,
                    status,
                    extra={"tool": ident.tool_name, "trace_id": ident.trace_id},
                )
                return None
            tools += [t for t in result["tools"] if isinstance(t, dict)]
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                break
            cursor = next_cursor
        span.set_attribute("handrail.mcp.tools", len(tools))
    return tools
