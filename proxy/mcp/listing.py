"""Annotations for the policy when no listing the agent made has named the tool: the
proxy lists the server's tools itself, once, in the revision the agent speaks (in its
session before 2026-07-28; with its ``_meta`` envelope and a listing's routing headers
from 2026-07-28 on). When that fails the tool's annotations stay unknown (``None``), which
the shipped policy reads as destructive.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind

from proxy.deps import Deps
from proxy.ingress.request import Identity
from proxy.mcp import jsonrpc
from proxy.mcp.annotations import Annotations, catalog
from proxy.mcp.headers import CLIENT_CAPABILITIES_META, CLIENT_INFO_META, PROTOCOL_VERSION_META
from proxy.mcp.relay import SKIP_AUTO_HEADERS, bare_call
from proxy.upstream import upstream_headers, upstream_url

logger = logging.getLogger(__name__)

MAX_LIST_PAGES = 20


async def annotations_for(
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
    await deps.pinning.review(ident.tool_name, tools)
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
