"""A FastMCP server on loopback for the MCP proxy tests; counts how often each tool ran.

It runs under uvicorn in a thread with its own event loop, so tests can read
``executions`` directly; ``start_mcp_server()`` returns once it is listening.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mcp_types
import uvicorn
from fastmcp import Context, FastMCP
from mcp_types import ToolListChangedNotification


@dataclass
class McpServer:
    url: str
    """The Streamable HTTP endpoint, e.g. ``http://127.0.0.1:PORT/mcp``."""
    executions: Counter[str] = field(default_factory=Counter)


def build_server(executions: Counter[str]) -> FastMCP[Any]:
    mcp: FastMCP[Any] = FastMCP("handrail-test")

    @mcp.tool(annotations={"readOnlyHint": True})
    def echo(text: str) -> str:
        """Say the text back."""
        executions["echo"] += 1
        return text

    @mcp.tool(annotations={"destructiveHint": False, "idempotentHint": False})
    def send_email(to: str, body: str) -> str:
        """Send one email (counts every execution)."""
        executions["send_email"] += 1
        return f"sent #{executions['send_email']} to {to}"

    @mcp.tool(annotations={"readOnlyHint": True})
    def read_config(name: str) -> str:
        """A tool that leaks a credential in its answer (result checks withhold it)."""
        executions["read_config"] += 1
        return f"{name}: aws_access_key_id=AKIAIOSFODNN7EXAMPLE"

    @mcp.tool(annotations={"destructiveHint": True})
    def delete_everything() -> str:
        """Hidden from agents by the test policy."""
        executions["delete_everything"] += 1
        return "deleted"

    @mcp.tool
    async def count_slowly(n: int, ctx: Context) -> str:
        """Reports progress n times before it answers."""
        executions["count_slowly"] += 1
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"step {i}")
            await asyncio.sleep(0.01)
        return f"counted to {n}"

    @mcp.tool
    async def announce_change(ctx: Context) -> str:
        """Sends notifications/tools/list_changed on its own response stream."""
        executions["announce_change"] += 1
        await ctx.send_notification(ToolListChangedNotification())
        return "changed"

    @mcp.tool
    async def announce_on_stream(ctx: Context) -> str:
        """Sends notifications/tools/list_changed on the session's GET event stream."""
        executions["announce_on_stream"] += 1
        await ctx.session.send_notification(ToolListChangedNotification())
        return "announced"

    @mcp.tool(annotations={"destructiveHint": False})
    async def transfer(amount: int, ctx: Context) -> str | mcp_types.InputRequiredResult:
        """2026-07-28 multi round-trip: asks for a confirmation, then moves the money."""
        responses = ctx.input_responses
        if not responses or "confirm" not in responses:
            executions["transfer.asked"] += 1
            question = mcp_types.ElicitRequest(
                params=mcp_types.ElicitRequestFormParams(
                    message=f"Transfer {amount}?",
                    requested_schema={  # type: ignore[arg-type]
                        "type": "object",
                        "properties": {"confirm": {"type": "boolean"}},
                        "required": ["confirm"],
                    },
                )
            )
            return mcp_types.InputRequiredResult(
                input_requests={"confirm": question}, request_state=f"transfer:{amount}"
            )
        executions["transfer"] += 1
        return f"transfer #{executions['transfer']} of {amount} done"

    return mcp


@contextmanager
def start_mcp_server(*, json_response: bool = False) -> Iterator[McpServer]:
    executions: Counter[str] = Counter()
    app = build_server(executions).http_app(path="/mcp", json_response=json_response)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="mcp-test-server", daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("the MCP test server did not start in time")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield McpServer(url=f"http://127.0.0.1:{port}/mcp", executions=executions)
    finally:
        server.should_exit = True
        thread.join(timeout=5)
