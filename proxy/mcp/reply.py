"""A ``tools/call``'s answer on its way to the agent: streamed as it arrives (JSON or SSE),
with only its JSON-RPC response message kept for the record and for replay.

The response message says what happened to the tool (``settle_on_response``): a result
(``isError`` included) means it ran; a protocol-level refusal means it did not; an
``input_required`` result (2026-07-28) is interim, never the call's answer: the client
retries the same call with ``inputResponses``, and that retry is remembered as the same
logical call (its run follows the first round's).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call, Outcome, StoredResponse, UnknownReason, Upstream
from proxy.credentials import StreamScrubber, answer_forms, scrub
from proxy.errors import HandrailError
from proxy.ingress.reply import AgentStream, note_gone
from proxy.ingress.request import keep_limit, tee
from proxy.mcp import jsonrpc
from proxy.mcp.inflight import in_flight, settle_on_response
from proxy.mcp.render import render_error

logger = logging.getLogger(__name__)

SESSION_HEADER = "Mcp-Session-Id"


class McpReply:
    """Streams a tools/call answer to the agent; keeps only its JSON-RPC response message."""

    def __init__(
        self, request: web.Request, capture_bytes: int, request_id: Any, *, modern: bool = False
    ) -> None:
        self.request = request
        self.capture_bytes = capture_bytes
        self.request_id = request_id
        self.modern = modern
        self.response: web.StreamResponse | None = None

    async def replay(self, call: Call, stored: StoredResponse) -> None:
        body = stored.body
        try:
            body = jsonrpc.with_id(stored.body, self.request_id)
            if self.modern:
                body = _with_result_type(body)
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
                    self._settle(call, message)
                    if call.on_answer is not None:  # the record is complete: settle now
                        call.on_answer()
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

    def _settle(self, call: Call, message: dict[str, Any]) -> None:
        calls = in_flight(self.request)
        settle_on_response(call, message, cancelled=calls.was_cancelled(call, self.request_id))
        if call.outcome is Outcome.INTERIM:
            calls.remember_round(call, message["result"].get("requestState"))

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
            self._settle(call, message)
        elif isinstance(message, dict) and "error" in message and message.get("id") is None:
            call.outcome = Outcome.NOT_RUN  # the server could not read the request at all
        else:
            call.outcome, call.unknown_reason = Outcome.UNKNOWN, UnknownReason.NO_RESPONSE


def _with_result_type(message: bytes) -> bytes:
    """A result kept from an earlier revision, replayed to a 2026-07-28 request, names its
    ``resultType`` as that revision requires (kept answers are complete, never interim)."""
    if b'"resultType"' in message or b'"result"' not in message:
        return message
    obj = jsonrpc.loads_answer(message)
    result = obj.get("result") if isinstance(obj, dict) else None
    if not isinstance(result, dict) or "resultType" in result:
        return message
    return jsonrpc.dumps({**obj, "result": {**result, "resultType": "complete"}})


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
