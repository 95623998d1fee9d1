"""``handrail check``: is this config ready to serve? One line per problem, exit 2 if any.

It loads the config (a bad key stops it as ``serve`` would), compiles the policies in a
throwaway worker, opens the store, and reaches every tool: a TCP connection for an HTTP tool
(nothing is sent that could act), an MCP ``initialize`` for an MCP server, which must answer
in JSON-RPC. Nothing is left running.
"""

from __future__ import annotations

import asyncio
import json
from typing import TextIO
from urllib.parse import urlsplit

import aiohttp

from proxy.config import Config, ToolConfig, redact_url
from proxy.errors import HandrailError
from proxy.mcp import jsonrpc
from proxy.policy import engine_from_config
from proxy.store import store_from_config

TIMEOUT_S = 5.0
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": "handrail-check",
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "handrail-check", "version": "1"},
    },
}


def check_command(config: Config, out: TextIO) -> int:
    problems = asyncio.run(_check(config))
    for problem in problems:
        out.write(f"handrail check: {problem}\n")
    if problems:
        return 2
    out.write(f"handrail check: ok ({len(config.tools)} tools, store and policies ready)\n")
    return 0


async def _check(config: Config) -> list[str]:
    results = await asyncio.gather(
        _policies(config),
        _store(config),
        *(_tool(name, tool) for name, tool in config.tools.items()),
    )
    return [problem for result in results for problem in result]


async def _policies(config: Config) -> list[str]:
    engine = engine_from_config(config.policy)
    try:
        await engine.start()
    except HandrailError as exc:
        return [f"policy.path ({config.policy.path}): {exc.message}"]
    finally:
        await engine.close()
    return []


async def _store(config: Config) -> list[str]:
    store = store_from_config(config.store)
    try:
        await store.open()
        await store.ping()
    except HandrailError as exc:
        return [f"store.url ({redact_url(config.store.url)}): {exc.message}"]
    finally:
        await store.close()
    return []


async def _tool(name: str, tool: ToolConfig) -> list[str]:
    where = f"tools.{name}.upstream ({tool.upstream})"
    parts = urlsplit(tool.upstream)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), TIMEOUT_S)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return [f"{where}: cannot connect ({exc or 'timed out'}); is the tool running?"]
    if tool.kind != "mcp":
        return []
    return await _speaks_mcp(where, tool)


async def speaks_mcp(name: str, tool: ToolConfig) -> tuple[bool | None, str]:
    """``(True, ...)`` it answers in JSON-RPC, ``(False, why)`` it answers something else,
    ``(None, why)`` it did not answer: what ``/readyz`` keeps per MCP tool."""
    problems = await _speaks_mcp(f"tools.{name}.upstream ({tool.upstream})", tool)
    if not problems:
        return True, "answers MCP"
    return (None if "no answer" in problems[0] else False), problems[0]


async def _speaks_mcp(where: str, tool: ToolConfig) -> list[str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **tool.headers,
    }
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                tool.upstream,
                data=json.dumps(INITIALIZE),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            ) as response:
                raw = await response.content.read(1 << 20)
                content_type = response.headers.get("Content-Type", "")
                session = response.headers.get("Mcp-Session-Id")
            if session:  # leave no session behind
                await http.delete(tool.upstream, headers={**headers, "Mcp-Session-Id": session})
    except (aiohttp.ClientError, TimeoutError) as exc:
        return [f"{where}: no answer to an MCP initialize ({exc or 'timed out'})"]
    answer = jsonrpc.response_in(raw, content_type, "handrail-check")
    if answer is None:
        try:
            message = json.loads(raw)
        except ValueError:
            message = None
        if not (isinstance(message, dict) and message.get("jsonrpc") == "2.0"):
            return [
                f"{where}: this is kind: mcp, but the server does not answer in JSON-RPC "
                f"(HTTP {response.status}, {content_type or 'no Content-Type'}); is it an MCP "
                "endpoint (often .../mcp)?"
            ]
    return []
