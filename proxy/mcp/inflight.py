"""What the proxy remembers of MCP tools/calls past their own stream, per app.

- ``notifications/cancelled`` seen on the way: a tools/call whose stream then ends without a
  response is settled as ``cancelled`` (still unknown: a cancelled tool may have done its
  work before the cancel reached it).
- Calls whose stream ended without their response (2025 revisions resume a broken stream
  on the session's GET stream, ``Last-Event-ID``): when the response comes by that way,
  the key is settled with it, so the retry is replayed instead of refused.
- Multi round-trip calls (2026-07-28): the ``requestState`` of an ``input_required`` result
  names the call's run, so the client's retry carrying it is the same logical call (same
  run, hence the same derived key) even when it carries no trace context of its own.
- GET event streams being opened: a POST of the same session waits (briefly) until the
  server has accepted the stream the agent opened first, so a server message sent on that
  stream is not lost to a race the agent did not make.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.call import Call, Outcome, UnknownReason
from proxy.config import ToolConfig
from proxy.errors import TooManyStreams
from proxy.mcp import jsonrpc

MAX_REMEMBERED = 4096
ROUND_TTL_S = 3600.0
"""How long an ``input_required`` round is remembered for the client's retry."""
STREAM_OPEN_WAIT_S = 2.0
"""The most a POST waits for its session's GET stream to be accepted upstream."""

Key = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A keyed call whose answer may still come on the session's GET stream."""

    key: str
    owner: str
    call: Call


class McpInFlight:
    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._cancelled: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._unanswered: OrderedDict[Key, Unanswered] = OrderedDict()
        self._limit = limit
        self._streams: Counter[tuple[str, str]] = Counter()
        self._rounds: OrderedDict[tuple[str, str, str], tuple[str, float]] = OrderedDict()
        self._opening: dict[tuple[str, str], set[asyncio.Event]] = {}

    @contextmanager
    def stream(self, tool: str, agent: str, config: ToolConfig) -> Iterator[None]:
        """One open GET event stream of ``agent`` to ``tool``: at most
        ``max_streams_per_agent`` at once (each holds one of the tool's connections)."""
        key = (tool, agent)
        if self._streams[key] >= config.max_streams_per_agent:
            raise TooManyStreams(
                f"agent {agent or '(anonymous)'} already has {self._streams[key]} event "
                f"streams open to {tool!r} (max_streams_per_agent); close one first"
            )
        self._streams[key] += 1
        try:
            yield
        finally:
            self._streams[key] -= 1
            if not self._streams[key]:
                del self._streams[key]

    def note_cancel(self, tool: str, agent: str, session: str | None, request_id: Any) -> None:
        self._cancelled[(tool, agent, session or "", repr(request_id))] = None
        _bound(self._cancelled, self._limit)

    def was_cancelled(self, call: Call, request_id: Any) -> bool:
        session = call.mcp.session_id if call.mcp is not None else None
        key = (call.tool_name, call.agent_id, session or "", repr(request_id))
        return self._cancelled.pop(key, 0) is None

    def expect_answer(self, call: Call, request_id: Any) -> None:
        """The call's stream ended without its response; it may come on the GET stream."""
        session = call.mcp.session_id if call.mcp is not None else None
        claim = call.claim
        if not session or claim is None or not claim.owner or call.idempotency_key is None:
            return
        entry = Unanswered(call.idempotency_key, claim.owner, call)
        self._unanswered[(call.tool_name, session, repr(request_id))] = entry
        _bound(self._unanswered, self._limit)

    def answered(self, tool: str, session: str | None, request_id: Any) -> Unanswered | None:
        if not session or not self._unanswered:
            return None
        return self._unanswered.pop((tool, session, repr(request_id)), None)

    def remember_round(self, call: Call, request_state: Any) -> None:
        """An ``input_required`` result was relayed: its ``requestState`` names this run."""
        if not isinstance(request_state, str) or not request_state:
            return
        key = (call.tool_name, call.agent_id, _digest(request_state))
        self._rounds[key] = (call.run_id, time.monotonic() + ROUND_TTL_S)
        _bound(self._rounds, self._limit)

    def round_run(self, tool: str, agent: str, request_state: Any) -> str | None:
        """The run of the call whose earlier round issued ``request_state``, if remembered."""
        if not isinstance(request_state, str) or not request_state:
            return None
        entry = self._rounds.get((tool, agent, _digest(request_state)))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    @asynccontextmanager
    async def opening(self, tool: str, session: str | None) -> AsyncIterator[asyncio.Event]:
        """A GET stream on its way upstream: set the event once the server accepted it."""
        opened = asyncio.Event()
        if not session:
            yield opened
            return
        waiting = self._opening.setdefault((tool, session), set())
        waiting.add(opened)
        try:
            yield opened
        finally:
            opened.set()
            waiting.discard(opened)
            if not waiting:
                self._opening.pop((tool, session), None)

    async def streams_opened(self, tool: str, session: str | None) -> None:
        """Wait until the session's GET streams already on their way are accepted upstream
        (bounded: a slow server delays the POST, never blocks it)."""
        waiting = self._opening.get((tool, session)) if session else None
        if not waiting:
            return
        pending = [asyncio.ensure_future(event.wait()) for event in waiting]
        try:
            await asyncio.wait(pending, timeout=STREAM_OPEN_WAIT_S)
        finally:
            for task in pending:
                task.cancel()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _bound(entries: OrderedDict[Any, Any], limit: int) -> None:
    while len(entries) > limit:
        entries.popitem(last=False)


MCP_IN_FLIGHT = web.AppKey("mcp_in_flight", McpInFlight)


def in_flight(request: web.Request) -> McpInFlight:
    return request.app[MCP_IN_FLIGHT]


def settle_on_response(call: Call, message: dict[str, Any], *, cancelled: bool = False) -> None:
    """What a tools/call's JSON-RPC response says of the tool, for settling its key.

    ``cancelled``: the client cancelled the call. An error answered after that (or the
    cancellation error itself) does not say the tool did nothing: it may have done its work
    before the cancel reached it, so the outcome is unknown. A result means it finished.
    """
    kind = jsonrpc.response_kind(message)
    if kind is jsonrpc.ResponseKind.CANCELLED or (cancelled and "error" in message):
        call.outcome, call.unknown_reason = Outcome.UNKNOWN, UnknownReason.CANCELLED
    elif kind is jsonrpc.ResponseKind.REFUSED:
        call.outcome = Outcome.NOT_RUN
        call.extra["tool_error"] = True  # the server refused the call as sent
    elif kind is jsonrpc.ResponseKind.INTERIM:
        call.outcome = Outcome.INTERIM
    else:
        call.outcome = Outcome.ANSWERED
        call.server_error = kind is jsonrpc.ResponseKind.FAILED
        result = message.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            call.extra["tool_error"] = True  # the tool ran and said the call was wrong
