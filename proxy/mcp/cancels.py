"""``notifications/cancelled`` seen on the way, so that a tools/call whose stream then ends
without a response is settled as cancelled (its outcome is still unknown: a cancelled tool
may have done its work before the cancel reached it)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from aiohttp import web

from proxy.call import Call

MAX_REMEMBERED = 4096

Key = tuple[str, str, str, str]


class Cancellations:
    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._seen: OrderedDict[Key, None] = OrderedDict()
        self._limit = limit

    def note(self, tool: str, agent: str, session: str | None, request_id: Any) -> None:
        self._seen[(tool, agent, session or "", repr(request_id))] = None
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def seen(self, call: Call, request_id: Any) -> bool:
        session = call.mcp.session_id if call.mcp is not None else None
        key = (call.tool_name, call.agent_id, session or "", repr(request_id))
        return self._seen.pop(key, 0) is None


MCP_CANCELS = web.AppKey("mcp_cancels", Cancellations)


def cancellations(request: web.Request) -> Cancellations:
    return request.app[MCP_CANCELS]
