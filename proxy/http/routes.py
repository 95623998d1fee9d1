"""The data plane: ``ANY /tools/{tool}/{rest...}`` becomes a Call and runs the pipeline."""

from __future__ import annotations

import logging

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind

from proxy import pipeline
from proxy.call import Call, Outcome, StoredResponse, Upstream
from proxy.credentials import StreamScrubber, answer_forms, scrub
from proxy.errors import HandrailError, UnknownTool
from proxy.http.keys import DEPS, TRACE_IDS, TraceIds
from proxy.ingress import canonical
from proxy.ingress.reply import AgentStream, note_gone
from proxy.ingress.request import (
    capture_limit,
    identify,
    keep_limit,
    mcp_meta_parent,
    new_call,
    read_body,
    tee,
)
from proxy.mcp.handler import handle_mcp

logger = logging.getLogger(__name__)

SMALL_BODY = 256 * 1024
"""Answers up to this size (with a Content-Length) are read whole and sent in one write."""


class HttpReply:
    """Plain HTTP: the tool's answer streams to the agent, teed into the call for the store."""

    def __init__(self, request: web.Request, capture_bytes: int) -> None:
        self.request = request
        self.capture_bytes = capture_bytes
        self.response: web.StreamResponse | None = None

    async def replay(self, call: Call, stored: StoredResponse) -> None:
        headers = CIMultiDict(stored.headers)
        headers["Idempotent-Replayed"] = "true"
        call.response_headers = list(stored.headers)
        self.response = web.Response(status=stored.status, body=stored.body, headers=headers)
        call.delivered = True

    def error_status(self, exc: HandrailError) -> int:
        return exc.status

    async def stream(self, call: Call, upstream: Upstream) -> None:
        call.response_headers = upstream.headers
        keep = keep_limit(call, self.capture_bytes)
        forms = answer_forms(call.tool)  # the tool's credentials: never sent to the agent
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY:
            body = b"".join([chunk async for chunk in upstream.body])
            body = scrub(body, forms) if forms else body
            tee(call, body, keep)
            call.delivered, call.outcome = True, Outcome.ANSWERED
            note_gone(self.request, call)
            self.response = web.Response(
                status=upstream.status, body=body, headers=CIMultiDict(upstream.headers)
            )
            return
        response = web.StreamResponse(status=upstream.status, headers=CIMultiDict(upstream.headers))
        if length is not None and not forms:  # scrubbing may change the length
            response.content_length = length
        self.response = response
        agent = AgentStream(self.request, response, call)
        scrubber = StreamScrubber(forms) if forms else None
        await agent.start()
        async for chunk in upstream.body:  # read to the end even if the agent has gone
            if scrubber is not None:
                chunk = scrubber.feed(chunk)
            tee(call, chunk, keep)
            await agent.write(chunk)
        if scrubber is not None and (rest := scrubber.flush()):
            tee(call, rest, keep)
            await agent.write(rest)
        call.delivered, call.outcome = True, Outcome.ANSWERED
        await agent.finish()


async def handle_tool(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    tool_name = request.match_info["tool"]
    parent = extract(request.headers)
    tool = deps.config.tools.get(tool_name)
    if tool is not None:
        parent = await mcp_meta_parent(request, tool, parent)
    with deps.tracer.start_as_current_span(
        f"execute_tool {tool_name}",
        context=parent,
        kind=SpanKind.SERVER,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        ctx = span.get_span_context()
        request[TRACE_IDS] = TraceIds(
            format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags)
        )
        if tool is None:
            span.set_attribute("handrail.error.code", UnknownTool.code)
            raise UnknownTool(f"no tool named {tool_name!r} is configured")
        ident = identify(request, tool_name, tool, span, parent, deps.config.listen.agent_id)
        if tool.kind == "mcp":
            return await handle_mcp(request, deps, ident)
        body = await read_body(request, tool.max_body_bytes)
        json_body = canonical.json_body(
            request.headers.get("Content-Type", ""),
            request.headers.get("Content-Encoding", ""),
            body,
        )
        reply = HttpReply(request, capture_limit(deps.config))
        call = new_call(request, ident, body=body, json_body=json_body, reply=reply)
        try:
            await pipeline.run_to_the_end(call, deps)
        except HandrailError:
            if reply.response is not None and reply.response.prepared:
                # Headers are gone already: break the connection so the agent sees a failure.
                if request.transport is not None:
                    request.transport.close()
                return reply.response
            raise
        assert reply.response is not None
        return reply.response
