"""What HTTP and MCP share before the pipeline: who calls which tool, the request's path and
body within their limits, and the ``Call`` made of them."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import baggage
from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.trace import Span

from proxy.call import Call, McpCall, Reply
from proxy.config import Config, ToolConfig
from proxy.errors import BadRequest, PayloadTooLarge, RequestTimeout
from proxy.ingress.canonical import canonical_path
from proxy.store.keys import parse_key_header

logger = logging.getLogger(__name__)

_MAX_ID_LENGTH = 256
METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
"""Headers some frameworks read as the real method: the policy would decide another one."""

BODY = web.RequestKey("body", bytes)
READ_TIMEOUT_S = web.AppKey("read_timeout_s", float)
"""``listen.read_timeout_s``, on the data-plane app."""
"""A body read before the call's span started (MCP ``_meta`` trace context)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling which tool, known before the body is read."""

    tool_name: str
    tool: ToolConfig
    rest: str
    query_string: str
    agent_id: str
    run_id_hint: str | None
    idempotency_key: str | None
    trace_id: str
    span_id: str
    span: Span
    parent: Context


def _id_header(request: web.Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_ID_LENGTH or not value.isprintable():
        raise BadRequest(f"header {name} must be 1 to {_MAX_ID_LENGTH} printable characters")
    return value


def _raw_rest(request: web.Request, tool_name: str) -> str:
    raw_path = request.raw_path.split("?", 1)[0]
    prefix = f"/tools/{tool_name}"
    if not raw_path.startswith(prefix) or raw_path[len(prefix) : len(prefix) + 1] not in ("", "/"):
        raise BadRequest("the request path does not name the tool plainly")
    return canonical_path(raw_path[len(prefix) :])


def _query_string(request: web.Request) -> str:
    parts = request.raw_path.split("?", 1)
    return parts[1] if len(parts) == 2 else ""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over ``limit``, and
    with 408 if it does not arrive within the listener's ``read_timeout_s``."""
    if BODY in request:
        return request[BODY]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is over this tool's limit of {limit} bytes")
    if not request.body_exists:
        return b""
    if request.content.is_eof():  # all of it came with the head: nothing to wait for
        data = await request.content.read()
        if len(data) > limit:
            raise PayloadTooLarge(f"the request body is over this tool's limit of {limit} bytes")
        return data
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(request.app[READ_TIMEOUT_S]):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"the request body is over this tool's limit of {limit} bytes"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {request.app[READ_TIMEOUT_S]:g}s"
        ) from None
    return b"".join(chunks)


async def mcp_meta_parent(request: web.Request, tool: ToolConfig, parent: Context) -> Context:
    """MCP puts trace context in ``params._meta``; it parents the call when headers carry none.

    The body is read (bounded) before the call's span starts and kept for ``read_body``.
    """
    if tool.kind != "mcp" or request.method != "POST" or "traceparent" in request.headers:
        return parent
    body = await read_body(request, tool.max_body_bytes)
    request[BODY] = body
    if b'"traceparent"' not in body:  # most calls: no second parse of the body
        return parent
    try:
        message = json.loads(body)
    except ValueError:
        return parent  # the MCP handler answers -32700
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return parent
    carrier = {k: meta[k] for k in ("traceparent", "tracestate") if isinstance(meta.get(k), str)}
    return extract(carrier, context=parent)


def new_call(
    request: web.Request,
    ident: Identity,
    *,
    body: bytes,
    json_body: Any,
    reply: Reply,
    method: str | None = None,
    path: str | None = None,
    mcp: McpCall | None = None,
    run_id: str | None = None,
) -> Call:
    """A Call for this request; the run is X-Run-Id, baggage ``run.id``, ``run_id``, the trace."""
    return Call(
        tool_name=ident.tool_name,
        tool=ident.tool,
        method=method or request.method,
        path=path if path is not None else (ident.rest or "/"),
        query=list(request.query.items()),
        query_string=ident.query_string,
        headers=list(request.headers.items()),
        body=body,
        json_body=json_body,
        agent_id=ident.agent_id,
        run_id=ident.run_id_hint or run_id or ident.trace_id,
        trace_id=ident.trace_id,
        span_id=ident.span_id,
        reply=reply,
        mcp=mcp,
        idempotency_key=ident.idempotency_key,
        span=ident.span,
    )


def keep_limit(call: Call, capture_bytes: int) -> int:
    """How much of the answer to keep: what the store replays and what the trace captures."""
    stored = call.tool.idempotency.max_stored_bytes if call.claim is not None else 0
    return max(stored, capture_bytes)


def capture_limit(config: Config) -> int:
    capture = config.tracing.capture
    return capture.max_bytes + 1 if capture.results else 0


def tee(call: Call, chunk: bytes, keep: int) -> None:
    room = keep - len(call.captured_body)
    if len(chunk) > room:
        call.body_overflow = True
        chunk = chunk[: max(room, 0)]
    if chunk:
        call.captured_body += chunk


def identify(
    request: web.Request,
    tool_name: str,
    tool: ToolConfig,
    span: Span,
    parent: Context,
    agent_id: str | None = None,
) -> Identity:
    """Who calls which tool; ``agent_id`` (``listen.agent_id``) binds the agent, else
    ``X-Agent-Id`` names it."""
    ctx = span.get_span_context()
    key_header = request.headers.get("Idempotency-Key")
    try:
        key = parse_key_header(key_header) if key_header is not None else None
    except ValueError as exc:
        raise BadRequest(f"header Idempotency-Key {exc}") from None
    for name in METHOD_OVERRIDES:
        if name in request.headers:
            raise BadRequest(
                f"header {name} is refused: send the method itself, so that the policy "
                "decides the method the tool will run"
            )
    run_hint = _id_header(request, "X-Run-Id")
    if run_hint is None:
        run_baggage = baggage.get_baggage("run.id", parent)
        run_hint = str(run_baggage) if run_baggage else None
    return Identity(
        tool_name=tool_name,
        tool=tool,
        rest=_raw_rest(request, tool_name),
        query_string=_query_string(request),
        agent_id=agent_id if agent_id is not None else _id_header(request, "X-Agent-Id") or "",
        run_id_hint=run_hint,
        idempotency_key=key,
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        span=span,
        parent=parent,
    )
