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

import asyncio
import dataclasses
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import Span, SpanKind, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import pipeline
from proxy.call import Call, McpCall, RunCounters, StoredResponse, Upstream
from proxy.deps import Deps
from proxy.errors import HandrailError, UpstreamTimeout, UpstreamUnavailable
from proxy.http.forward import response_headers, upstream_headers, upstream_url
from proxy.http.routes import Identity, capture_limit, keep_limit, new_call, read_body, tee
from proxy.mcp import jsonrpc
from proxy.mcp.annotations import MCP_CATALOG, Annotations, ToolCatalog
from proxy.mcp.render import render_error, render_invalid
from proxy.policy.input import policy_input
from proxy.tracing.attributes import JSONRPC_REQUEST_ID, MCP_METHOD_NAME, MCP_SESSION_ID

logger = logging.getLogger(__name__)

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
MAX_LIST_PAGES = 20
MAX_JSON_ANSWER = 32 * 1024 * 1024
"""A tools/list answer read whole to be filtered is refused beyond this size."""
DISCONNECT_POLL_S = 15.0
"""An idle event stream checks this often whether the agent is still there."""

_SKIP_AUTO = ("User-Agent", "Accept-Encoding", "Content-Type")
_FALLBACK_CATALOGS: weakref.WeakKeyDictionary[web.Application, ToolCatalog] = (
    weakref.WeakKeyDictionary()
)


def catalog(request: web.Request) -> ToolCatalog:
    """The app's catalog (``MCP_CATALOG``), else one kept beside the app for its lifetime."""
    app = request.app
    if MCP_CATALOG in app:
        return app[MCP_CATALOG]
    return _FALLBACK_CATALOGS.setdefault(app, ToolCatalog())


def _json(status: int, payload: Any, headers: CIMultiDict[str] | None = None) -> web.Response:
    out = CIMultiDict(headers or {})
    out["Content-Type"] = "application/json"
    return web.Response(status=status, body=jsonrpc.dumps(payload), headers=out)


class _NoReply:
    """For Calls that only carry a request's facts (headers, policy input), never answered."""

    async def replay(self, call: Call, stored: StoredResponse) -> None:
        raise NotImplementedError

    async def stream(self, call: Call, upstream: Upstream) -> None:
        raise NotImplementedError


def _endpoint_path(ident: Identity) -> str:
    """``/tools/{tool}`` is the MCP endpoint itself (no trailing slash); deeper paths append."""
    return "" if ident.rest in ("", "/") else ident.rest


def _bare_call(request: web.Request, ident: Identity, body: bytes, session: str | None) -> Call:
    call = new_call(
        request, ident, body=body, json_body=None, reply=_NoReply(), path=_endpoint_path(ident),
        run_id=session,
    )
    _identity_encoding(call)
    return call


def _identity_encoding(call: Call) -> None:
    """Answers the proxy must read (lists, SSE) come back uncompressed."""
    call.headers = [(k, v) for k, v in call.headers if k.lower() != "accept-encoding"]


async def handle_mcp(request: web.Request, deps: Deps, ident: Identity) -> web.StreamResponse:
    session = request.headers.get(SESSION_HEADER)
    if session:
        ident.span.set_attribute(MCP_SESSION_ID, session)
    if request.method != "POST":
        ident.span.update_name(f"{request.method} {ident.tool_name}")
        return await _pass_through(request, deps, ident, b"", None, session)
    body = await read_body(request, ident.tool.max_body_bytes)
    try:
        parsed = jsonrpc.parse_body(body)
        _check_batch(parsed, request.headers.get(VERSION_HEADER))
    except jsonrpc.JsonRpcError as err:
        ident.span.set_attribute("handrail.error.code", "bad_request")
        return _json(*render_invalid(err, ident.trace_id))
    first = parsed.messages[0]
    if not parsed.batch and first.method is not None:
        ident.span.set_attribute(MCP_METHOD_NAME, first.method)
        if first.id is not None:
            ident.span.set_attribute(JSONRPC_REQUEST_ID, str(first.id))
        if first.method == "tools/call":
            return await _tools_call(request, deps, ident, body, first, session)
        ident.span.update_name(f"{first.method} {ident.tool_name}")
    else:
        ident.span.update_name(f"POST {ident.tool_name}")
    for message in parsed.requests:
        if message.method == "tools/list" and message.id is not None:
            catalog(request).expect_list(ident.tool_name, session, message.id)
    return await _pass_through(request, deps, ident, body, parsed, session)


def _check_batch(parsed: jsonrpc.Body, version: str | None) -> None:
    if not parsed.batch:
        return
    if not jsonrpc.batches_allowed(version):
        raise jsonrpc.JsonRpcError(
            jsonrpc.INVALID_REQUEST, f"JSON-RPC batches are not part of MCP {version}"
        )
    if any(m.method == "tools/call" for m in parsed.requests):
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
        return _json(*render_invalid(err, ident.trace_id))
    link_meta_context(ident.span, params)
    annotations = await _annotations(request, deps, ident, name, session)
    reply = McpReply(request, capture_limit(deps.config), message.id)
    call = new_call(
        request,
        ident,
        body=body,
        json_body=message.payload,
        reply=reply,
        method="POST",
        path=_endpoint_path(ident),
        mcp=McpCall(name, arguments or {}, annotations, message.id, session),
        run_id=session,
    )
    _identity_encoding(call)
    try:
        await pipeline.run(call, deps)
    except HandrailError as exc:
        if reply.response is not None and reply.response.prepared:
            # The stream has begun: break it so the agent sees the failure.
            if request.transport is not None:
                request.transport.close()
            return reply.response
        return _json(*render_error(exc, message.id, ident.trace_id))
    assert reply.response is not None
    return reply.response


def link_meta_context(span: Span, params: dict[str, Any]) -> None:
    """``params._meta.traceparent`` names the agent's span for this call: link to it.

    The call's span already exists (parented by the HTTP ``traceparent``) when the body is
    read, so a context that only travels in ``_meta`` becomes a link, not the parent.
    """
    meta = params.get("_meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return
    carrier = {"traceparent": meta["traceparent"]}
    if isinstance(meta.get("tracestate"), str):
        carrier["tracestate"] = meta["tracestate"]
    linked = get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    own = span.get_span_context()
    if linked.is_valid and (linked.trace_id, linked.span_id) != (own.trace_id, own.span_id):
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

    async def stream(self, call: Call, upstream: Upstream) -> None:
        keep = keep_limit(call, self.capture_bytes)
        content_type = _header(upstream.headers, "content-type")
        if not content_type.lower().startswith("text/event-stream"):
            call.response_headers = upstream.headers
            body = b"".join([chunk async for chunk in upstream.body])
            tee(call, body, keep)
            call.delivered = True
            self.response = web.Response(
                status=upstream.status, body=body, headers=CIMultiDict(upstream.headers)
            )
            return
        call.response_headers = [
            (k, v) for k, v in upstream.headers if k.lower() != "content-type"
        ] + [("Content-Type", "application/json")]
        response = web.StreamResponse(status=upstream.status, headers=CIMultiDict(upstream.headers))
        self.response = response
        await response.prepare(self.request)
        parser = jsonrpc.SseParser()
        found = client_gone = False
        async for chunk in upstream.body:
            if not found:
                for event in parser.feed(chunk):
                    if _answers(jsonrpc.event_message(event), self.request_id):
                        tee(call, event.data.encode(), keep)
                        found = True
            if not client_gone:
                try:
                    await response.write(chunk)
                except (ConnectionError, RuntimeError):
                    client_gone = True  # keep reading: the record must be whole
        call.delivered = found  # no response message: not replayable, and never re-run
        if not client_gone:
            await response.write_eof()


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
    request: web.Request, deps: Deps, ident: Identity, name: str, session: str | None
) -> Annotations | None:
    cat = catalog(request)
    known, annotations = cat.lookup(ident.tool_name, session, name)
    if known:
        return annotations
    tools = await _list_tools(request, deps, ident, session)
    if tools is None:
        return None
    cat.remember(ident.tool_name, session, tools)
    known, annotations = cat.lookup(ident.tool_name, session, name)
    if not known:
        cat.mark_unknown(ident.tool_name, session, name)
    return annotations


async def _list_tools(
    request: web.Request, deps: Deps, ident: Identity, session: str | None
) -> list[dict[str, Any]] | None:
    """Ask the server for its tools in the agent's session; ``None`` when that fails."""
    call = _bare_call(request, ident, b"", session)
    call.idempotency_key = None
    url = upstream_url(ident.tool.upstream, call.path, call.query_string)
    timeout = aiohttp.ClientTimeout(total=ident.tool.timeout_s)
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    with deps.tracer.start_as_current_span("tools/list", kind=SpanKind.CLIENT) as span:
        headers = upstream_headers(call, span)
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "application/json, text/event-stream"
        for _ in range(MAX_LIST_PAGES):
            request_id = f"handrail-{uuid.uuid4().hex}"
            message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": "tools/list"}
            if cursor:
                message["params"] = {"cursor": cursor}
            try:
                async with deps.session.post(
                    url, data=jsonrpc.dumps(message), headers=headers, timeout=timeout,
                    allow_redirects=False, skip_auto_headers=_SKIP_AUTO,
                ) as response:
                    raw = await response.read()
                    content_type = response.headers.get("Content-Type", "")
                    status = response.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                logger.warning("listing tools of %s failed: %s", ident.tool_name, exc,
                               extra={"tool": ident.tool_name, "trace_id": ident.trace_id})
                return None
            answer = jsonrpc.response_in(raw, content_type, request_id) if status == 200 else None
            result = jsonrpc.loads(answer).get("result") if answer else None
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                logger.warning("tools/list of %s gave no usable answer (HTTP %d)", ident.tool_name,
                               status, extra={"tool": ident.tool_name, "trace_id": ident.trace_id})
                return None
            tools += [t for t in result["tools"] if isinstance(t, dict)]
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                break
            cursor = next_cursor
        span.set_attribute("handrail.mcp.tools", len(tools))
    return tools


# -- tools/list filtering -------------------------------------------------------------


class ListFilter:
    """Rewrites tools/list answers: tools the policy's ``visible`` rule rejects are removed."""

    def __init__(self, request: web.Request, deps: Deps, ident: Identity, session: str | None):
        self.request, self.deps, self.ident, self.session = request, deps, ident, session
        self.catalog = catalog(request)

    async def message(self, obj: Any) -> Any | None:
        """The rewritten message (or batch), or ``None`` when it is not a tools/list answer."""
        if isinstance(obj, list):
            rewritten = [await self.message(item) for item in obj]
            if all(r is None for r in rewritten):
                return None
            return [new if new is not None else old for new, old in zip(rewritten, obj, strict=True)]
        if not isinstance(obj, dict) or "method" in obj:
            return None
        result = obj.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return None
        if not self.catalog.is_list_answer(self.ident.tool_name, self.session, obj.get("id")):
            return None
        tools = [t for t in result["tools"] if isinstance(t, dict)]
        self.catalog.remember(self.ident.tool_name, self.session, tools)
        try:
            shown = await self.visible(tools)
        except HandrailError as exc:
            return render_error(exc, obj.get("id"), self.ident.trace_id)[1]
        self.ident.span.set_attribute("handrail.mcp.tools.hidden", len(tools) - len(shown))
        return {**obj, "result": {**result, "tools": shown}}

    async def visible(self, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        base = _bare_call(self.request, self.ident, b"", self.session)
        redact = self.deps.config.tracing.capture.redact
        documents = []
        for tool in tools:
            name = tool.get("name")
            annotations = tool.get("annotations")
            mcp = McpCall(
                name if isinstance(name, str) else "",
                {},
                annotations if isinstance(annotations, dict) else None,
                None,
                self.session,
                method="tools/list",
            )
            call = dataclasses.replace(base, mcp=mcp)
            documents.append(policy_input(call, RunCounters(), redact))
        with self.deps.tracer.start_as_current_span("handrail.policy.visible"):
            shown = await asyncio.gather(*(self.deps.engine.visible(d) for d in documents))
        return [tool for tool, ok in zip(tools, shown, strict=True) if ok]

    async def event(self, event: jsonrpc.SseEvent) -> bytes:
        rewritten = await self.message(jsonrpc.event_message(event))
        if rewritten is None:
            return event.raw
        data = jsonrpc.dumps(rewritten).decode()
        return jsonrpc.render_event(data, event=event.event, event_id=event.id)


# -- pass-through ---------------------------------------------------------------------


def _timeout(method: str, timeout_s: float) -> aiohttp.ClientTimeout:
    if method == "GET":  # the server's event stream may stay open and quiet for hours
        return aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=None)
    return aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)


async def _pass_through(
    request: web.Request,
    deps: Deps,
    ident: Identity,
    body: bytes,
    parsed: jsonrpc.Body | None,
    session: str | None,
) -> web.StreamResponse:
    single = parsed.messages[0] if parsed is not None and not parsed.batch else None
    try:
        return await _forward(request, deps, ident, body, session)
    except HandrailError as exc:
        if single is None or not single.is_request:
            raise
        return _json(*render_error(exc, single.id, ident.trace_id))


async def _forward(
    request: web.Request, deps: Deps, ident: Identity, body: bytes, session: str | None
) -> web.StreamResponse:
    call = _bare_call(request, ident, body, session)
    url = upstream_url(ident.tool.upstream, call.path, call.query_string)
    try:
        upstream = await deps.session.request(
            request.method, url, headers=upstream_headers(call, None), data=body or None,
            timeout=_timeout(request.method, ident.tool.timeout_s), allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO,
        )
    except asyncio.TimeoutError as exc:
        raise UpstreamTimeout(f"MCP server {ident.tool_name!r} did not answer in time") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"MCP server {ident.tool_name!r} is unreachable: {exc}") from exc
    try:
        headers = CIMultiDict(response_headers(list(upstream.headers.items())))
        if request.method == "DELETE" and upstream.status < 300 and session:
            catalog(request).forget(ident.tool_name, session)
        content_type = upstream.headers.get("Content-Type", "").lower()
        lists = ListFilter(request, deps, ident, session)
        if content_type.startswith("text/event-stream"):
            return await _relay_events(request, upstream, headers, lists)
        if "json" in content_type and upstream.status == 200 and request.method == "POST":
            raw = await _read_limited(upstream)
            try:
                rewritten = await lists.message(jsonrpc.loads(raw))
            except ValueError:
                rewritten = None
            if rewritten is not None:
                raw = jsonrpc.dumps(rewritten)
            return web.Response(status=upstream.status, body=raw, headers=headers)
        return await _relay_bytes(request, upstream, headers)
    finally:
        upstream.release()


async def _read_limited(upstream: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in upstream.content.iter_any():
            size += len(chunk)
            if size > MAX_JSON_ANSWER:
                raise UpstreamUnavailable("the MCP server's answer is too large to filter")
            chunks.append(chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamUnavailable(f"the MCP server's answer broke off: {exc}") from exc
    return b"".join(chunks)


async def _chunks(request: web.Request, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; stops when the agent has gone away."""
    while True:
        try:
            chunk = await asyncio.wait_for(upstream.content.readany(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if request.transport is None or request.transport.is_closing():
                return
            continue
        if not chunk:
            return
        yield chunk


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    transform: Callable[[bytes], Awaitable[bytes]] | None,
    tail: Callable[[], bytes] | None,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in _chunks(request, upstream):
            out = await transform(chunk) if transform is not None else chunk
            if out:
                await response.write(out)
        if tail is not None and (rest := tail()):
            await response.write(rest)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        upstream.close()  # the agent left: drop the upstream stream too
    except (aiohttp.ClientError, asyncio.TimeoutError):
        if request.transport is not None:  # the server's stream broke: break the agent's
            request.transport.close()
    return response


async def _relay_events(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    lists: ListFilter,
) -> web.StreamResponse:
    parser = jsonrpc.SseParser()

    async def transform(chunk: bytes) -> bytes:
        return b"".join([await lists.event(event) for event in parser.feed(chunk)])

    return await _relay(request, upstream, headers, transform, lambda: parser.pending)


async def _relay_bytes(
    request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
) -> web.StreamResponse:
    if upstream.content_length is not None and upstream.content_length <= 256 * 1024:
        body = await _read_limited(upstream)
        return web.Response(status=upstream.status, body=body, headers=headers)
    return await _relay(request, upstream, headers, None, None)
