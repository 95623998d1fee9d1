"""Tool annotations as each MCP server listed them, remembered per session and per server.

Policies see a ``tools/call``'s ``annotations`` (``readOnlyHint``, ``destructiveHint``, ...);
the server only states them in ``tools/list``. The catalog keeps what the last listing
said, first for the agent's own ``Mcp-Session-Id`` (servers may list different tools per
session), then for the server as a whole. It also remembers which JSON-RPC ids of a
session were ``tools/list`` requests, so an answer that arrives on a resumed stream is
filtered as well. Bounded: least recently used sessions are forgotten first.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

from aiohttp import web

Annotations = dict[str, Any]

MAX_SESSIONS = 4096
"""tools/list ids remembered per session until answered."""


class ToolCatalog:
    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple[str, str], dict[str, Annotations | None]] = OrderedDict()
        self._servers: dict[str, dict[str, Annotations | None]] = {}

    def remember(self, server: str, session: str | None, tools: list[dict[str, Any]]) -> None:
        """Record one page of a tools/list result (pages add up; a later listing overrides)."""
        listed: dict[str, Annotations | None] = {}
        for tool in tools:
            name = tool.get("name")
            if isinstance(name, str):
                annotations = tool.get("annotations")
                # Listed without annotations: known to have none ({}), unlike an unlisted
                # tool (None), which policies must read as the riskiest case.
                listed[name] = dict(annotations) if isinstance(annotations, dict) else {}
        targets = [self._server(server)]
        if session is not None:
            targets.append(self._session(server, session))
        for target in targets:
            target.update(listed)

    def lookup(
        self, server: str, session: str | None, name: str
    ) -> tuple[bool, Annotations | None]:
        """``(known, annotations)``: known is false when no listing named the tool."""
        if session is not None:
            tools = self._sessions.get((server, session))
            if tools is not None:
                self._sessions.move_to_end((server, session))
                if name in tools:
                    return True, tools[name]
        tools = self._servers.get(server, {})
        if name in tools:
            return True, tools[name]
        return False, None

    def mark_unknown(self, server: str, session: str | None, name: str) -> None:
        """A listing did not name the tool: do not list again for every call to it."""
        if session is not None:
            self._session(server, session).setdefault(name, None)
        else:
            self._server(server).setdefault(name, None)

    def forget(self, server: str, session: str) -> None:
        self._sessions.pop((server, session), None)

    def _server(self, server: str) -> dict[str, Annotations | None]:
        return self._servers.setdefault(server, {})

    def _session(self, server: str, session: str) -> dict[str, Annotations | None]:
        key = (server, session)
        if key not in self._sessions:
            self._sessions[key] = {}
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return self._sessions[key]


MCP_CATALOG = web.AppKey("mcp_catalog", ToolCatalog)
_FALLBACK_CATALOGS: weakref.WeakKeyDictionary[web.Application, ToolCatalog] = (
    weakref.WeakKeyDictionary()
)


def catalog(request: web.Request) -> ToolCatalog:
    """The app's catalog (``MCP_CATALOG``), else one kept beside the app for its lifetime."""
    app = request.app
    if MCP_CATALOG in app:
        return app[MCP_CATALOG]
    return _FALLBACK_CATALOGS.setdefault(app, ToolCatalog())
