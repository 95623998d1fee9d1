"""MCP messages that pass through unguarded, and the tools/list answers they may carry.

Everything but ``tools/call`` is relayed as it came: POST answers (JSON, or SSE streamed
event by event), the server's GET event stream (no total timeout; it ends when either
side leaves), DELETE, and the 202 answers to notifications. Any ``tools/list`` answer on
the way, in JSON, in an SSE event or in a batch, loses the tools that the policy's
``visible`` rule rejects, and its annotations are remembered for later calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call, McpCall, RunCounters, StoredResponse, Upstream
from proxy.deps import Deps
from proxy.errors import HandrailError, UpstreamTimeout, UpstreamUnavailable
from proxy.idempotency import settle_key
from proxy.ingress.request import Identity, new_call
from proxy.mcp import jsonrpc
from proxy.mcp.annotations import catalog
from proxy.mcp.inflight import in_flight, settle_on_response
from proxy.mcp.render import json_response, render_error
from proxy.policy.input import policy_input
from proxy.upstream import response_headers, upstream_headers, upstream_url

logger = logging.getLogger(__name__)

MAX_JSON_ANSWER = 32 * 1024 * 1024
"""A tools/list answer read whole to be filtered is refused beyond this size."""
DISCONNECT_POLL_S = 0.5
"""An idle event stream checks this often whether the agent is still there."""
SMALL_BODY = 256 * 1024
SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Content-Type")


class NoReply:
    """For Calls that only carry a request's facts (headers, policy input), never answered."""

    async def replay(self, call: Call, stored: StoredResponse) -> None:
        raise NotImplementedError

    async def stream(self, call: Call, upstream: Upstream) -> None:
        raise NotImplementedError

    def error_status(self, exc: HandrailError) -> int:
        return exc.status


def endpoint_path(ident: Identity) -> str:
    """``/tools/{tool}`` is the MCP endpoint itself (no trailing slash); deeper paths append."""
    return "" if ident.rest in ("", "/") else ident.rest


def bare_call(request: web.Request, ident: Identity, body: bytes, session: str | None) -> Call:
    call = new_call(
        request,
        ident,
        body=body,
        json_body=None,
        reply=NoReply(),
        path=endpoint_path(ident),
        run_id=session,
    )
    identity_encoding(call)
    return call


def identity_encoding(call: Call) -> None:
    """Answers the proxy must read (lists, SSE) come back uncompressed."""
    call.headers = [(k, v) for k, v in call.headers if k.lower() != "accept-encoding"]


class ListFilter:
    """Rewrites tools/list answers: tools the policy's ``visible`` rule rejects are removed."""

    def __init__(
        self,
        request: web.Request,
        deps: Deps,
        ident: Identity,
        session: str | None,
        *,
        modern: bool = False,
    ):
        self.request, self.deps, self.ident, self.session = request, deps, ident, session
        self.modern = modern
        self.catalog = catalog(request)

    async def message(self, obj: Any) -> Any | None:
        """The rewritten message (or batch), or ``None`` when it is not a tools/list answer."""
        if isinstance(obj, list):
            rewritten = [await self.message(item) for item in obj]
            if all(r is None for r in rewritten):
                return None
            return [
                new if new is not None else old for new, old in zip(rewritten, obj, strict=True)
            ]
        if not isinstance(obj, dict) or "method" in obj:
            return None
        result = obj.get("result")
        # By its shape, whatever its id or stream: a pending-request table can be evicted,
        # replayed around or answered on a resumed stream.
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return None
        if "content" in result:  # a tools/call result that happens to carry "tools"
            return None
        tools = [t for t in result["tools"] if isinstance(t, dict)]
        self.catalog.remember(self.ident.tool_name, self.session, tools)
        try:
            changed = await self.deps.pinning.review(self.ident.tool_name, tools)
            shown = await self.visible([t for t in tools if t.get("name") not in changed])
        except HandrailError as exc:
            return render_error(exc, obj.get("id"), self.ident.trace_id, modern=self.modern)[1]
        hidden = len(tools) - len(shown)
        self.ident.span.set_attribute("handrail.mcp.tools.hidden", hidden)
        rewritten = {**result, "tools": shown}
        if hidden and rewritten.get("cacheScope") == "public":
            # What this agent may see is not what every caller may: keep it out of shared
            # caches (2026-07-28 cacheable lists); every other cache field stays as sent.
            rewritten["cacheScope"] = "private"
        return {**obj, "result": rewritten}

    def late_answer(self, message: Any, data: str) -> None:
        """A tools/call response arriving on a resumed stream settles that call's key."""
        if not isinstance(message, dict) or "method" in message or "id" not in message:
            return
        pending = in_flight(self.request).answered(
            self.ident.tool_name, self.session, message["id"]
        )
        if pending is None:
            return
        call = pending.call
        call.captured_body = bytearray(data.encode())
        call.body_overflow = len(call.captured_body) > call.tool.idempotency.max_stored_bytes
        call.status, call.delivered = 200, True
        settle_on_response(call, message)
        self.deps.background.spawn(settle_key(call, self.deps))

    async def visible(self, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        base = bare_call(self.request, self.ident, b"", self.session)
        redact = self.deps.config.tracing.capture.redact
        fields = self.deps.engine.request_fields
        documents = []
        for tool in tools:
            name = tool.get("name")
            annotations = tool.get("annotations")
            mcp = McpCall(
                name if isinstance(name, str) else "",
                {},
                annotations if isinstance(annotations, dict) else {},  # listed: known
                None,
                self.session,
                method="tools/list",
            )
            call = dataclasses.replace(base, mcp=mcp)
            documents.append(policy_input(call, RunCounters(), redact, request_fields=fields))
        with self.deps.tracer.start_as_current_span("handrail.policy.visible"):
            shown = await asyncio.gather(*(self.deps.engine.visible(d) for d in documents))
        return [tool for tool, ok in zip(tools, shown, strict=True) if ok]

    async def event(self, event: jsonrpc.SseEvent) -> bytes:
        message = jsonrpc.event_message(event)
        self.late_answer(message, event.data)
        rewritten = await self.message(message)
        if rewritten is None:
            return event.raw
        data = jsonrpc.dumps(rewritten).decode()
        return jsonrpc.render_event(data, event=event.event, event_id=event.id)


def _timeout(long_lived: bool, timeout_s: float) -> aiohttp.ClientTimeout:
    # ``connect`` bounds the wait for a connection from the tool's pool, too.
    if long_lived:  # an event stream (GET, subscriptions/listen) may stay quiet for hours
        return aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=None
        )
    return aiohttp.ClientTimeout(
        total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Passage:
    """How one unguarded message travels: its session and revision, whether its answer is
    an event stream that may stay quiet for hours, and who to tell once the server took it."""

    session: str | None
    modern: bool = False
    long_lived: bool = False
    on_open: Callable[[], None] | None = None


async def pass_through(
    request: web.Request,
    deps: Deps,
    ident: Identity,
    body: bytes,
    parsed: jsonrpc.Body | None,
    passage: Passage,
) -> web.StreamResponse:
    single = parsed.messages[0] if parsed is not None and not parsed.batch else None
    try:
        return await _forward(request, deps, ident, body, passage)
    except HandrailError as exc:
        if single is None or not single.is_request:
            raise
        return json_response(*render_error(exc, single.id, ident.trace_id, modern=passage.modern))


async def _forward(
    request: web.Request, deps: Deps, ident: Identity, body: bytes, passage: Passage
) -> web.StreamResponse:
    session = passage.session
    call = bare_call(request, ident, body, session)
    url = upstream_url(ident.tool.upstream, call.path, call.query_string)
    try:
        upstream = await deps.pools.session(ident.tool_name).request(
            request.method,
            url,
            headers=upstream_headers(call, None),
            data=body or None,
            timeout=_timeout(passage.long_lived, ident.tool.timeout_s),
            allow_redirects=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
    except TimeoutError as exc:
        raise UpstreamTimeout(f"MCP server {ident.tool_name!r} did not answer in time") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"MCP server {ident.tool_name!r} is unreachable: {exc}") from exc
    if passage.on_open is not None:
        passage.on_open()
    try:
        headers = CIMultiDict(response_headers(list(upstream.headers.items())))
        if request.method == "DELETE" and upstream.status < 300 and session:
            catalog(request).forget(ident.tool_name, session)
        content_type = upstream.headers.get("Content-Type", "").lower()
        lists = ListFilter(request, deps, ident, session, modern=passage.modern)
        if content_type.startswith("text/event-stream"):
            return await _relay_events(request, upstream, headers, lists)
        if "json" in content_type and upstream.status == 200 and request.method == "POST":
            raw = await _read_limited(upstream)
            try:
                rewritten = await lists.message(jsonrpc.loads_answer(raw))
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
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamUnavailable(f"the MCP server's answer broke off: {exc}") from exc
    return b"".join(chunks)


async def _chunks(request: web.Request, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; stops when the agent has gone away."""
    while True:
        try:
            chunk = await asyncio.wait_for(upstream.content.readany(), DISCONNECT_POLL_S)
        except TimeoutError:
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
    try:
        await response.prepare(request)  # the agent may have left while the server answered
        async for chunk in _chunks(request, upstream):
            out = await transform(chunk) if transform is not None else chunk
            if out:
                await response.write(out)
        if tail is not None and (rest := tail()):
            await response.write(rest)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        upstream.close()  # the agent left: drop the upstream stream too
    except (TimeoutError, aiohttp.ClientError):
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
    if upstream.content_length is not None and upstream.content_length <= SMALL_BODY:
        body = await _read_limited(upstream)
        return web.Response(status=upstream.status, body=body, headers=headers)
    return await _relay(request, upstream, headers, None, None)
