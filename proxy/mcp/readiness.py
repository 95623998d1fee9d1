"""Whether each ``kind: mcp`` upstream speaks MCP, for ``/readyz``.

A tool configured as MCP whose upstream answers something else (a web page, a REST API: a
wrong URL) would have every call forwarded unguarded by MCP's rules; the proxy reports not
ready until it answers in JSON-RPC (an ``initialize``, its session deleted at once). An
upstream that does not answer at all is reported but leaves the proxy ready: the agent's
calls get 502 until it is back, and a sidecar that went unready with its tool would take the
agent's other tools down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web

from proxy.check import speaks_mcp
from proxy.config import Config

logger = logging.getLogger(__name__)

PROBE_EVERY_S = 30.0


class McpReadiness:
    """Probed when ``/readyz`` asks, at most every ``PROBE_EVERY_S`` (no traffic of its own
    to the servers otherwise)."""

    def __init__(self, config: Config) -> None:
        self.tools = {n: t for n, t in config.tools.items() if t.kind == "mcp"}
        self.state: dict[str, tuple[bool | None, str]] = {}
        self._probed_at = -PROBE_EVERY_S
        self._lock = asyncio.Lock()

    async def probe(self) -> None:
        for name, tool in self.tools.items():
            was = self.state.get(name)
            now = await speaks_mcp(name, tool)
            self.state[name] = now
            if now[0] is False and (was is None or was[0] is not False):
                logger.error("%s; /readyz reports not ready", now[1])

    async def checks(self) -> dict[str, dict[str, object]]:
        if self.tools:
            async with self._lock:
                if time.monotonic() - self._probed_at >= PROBE_EVERY_S:
                    with contextlib.suppress(Exception):
                        await self.probe()
                    self._probed_at = time.monotonic()
        return {
            f"mcp:{name}": {"ready": speaks is not False, "detail": detail}
            for name, (speaks, detail) in self.state.items()
        }


MCP_READINESS = web.AppKey("mcp_readiness", McpReadiness)
