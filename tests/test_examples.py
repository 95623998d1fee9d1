"""examples/: the runnable config, its sample tool and MCP server, served for real."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.support_idempotency import start_proxy
from tests.test_mcp import connect, text_of

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
AGENT = {"X-Agent-Id": "sales-bot", "X-Run-Id": "r-example"}


async def _serve(script: str, port: int) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / script),
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return process
        except OSError:
            await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError(f"{script} did not start")


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[str]:
    tool_port, mcp_port = free_port(), free_port()
    tool = await _serve("sample_tool.py", tool_port)
    server = await _serve("sample_mcp_server.py", mcp_port)
    text = (EXAMPLES / "handrail.yaml").read_text()
    text = text.replace("port: 8787", "port: 0").replace("port: 8788", "port: 0")
    text = text.replace("127.0.0.1:9001", f"127.0.0.1:{tool_port}")
    text = text.replace("127.0.0.1:9002", f"127.0.0.1:{mcp_port}")
    text = text.replace("path: ../policies", f"path: {ROOT / 'policies'}")
    config = tmp_path / "handrail.yaml"
    config.write_text(text)
    proxy = await start_proxy(config)
    try:
        yield proxy.url
    finally:
        await proxy.stop()
        for process in (tool, server):
            process.terminate()
            await process.wait()


async def test_the_example_guards_its_http_tool(example: str) -> None:
    async with aiohttp.ClientSession(headers=AGENT) as http:
        note = {"text": "buy milk"}
        first = await http.post(f"{example}/tools/notes/notes", json=note)
        retry = await http.post(f"{example}/tools/notes/notes", json=note)
        listed = await (await http.get(f"{example}/tools/notes/notes")).json()
        wipe = await http.delete(f"{example}/tools/notes/notes")
    assert first.status == 201 and retry.headers.get("Idempotent-Replayed") == "true"
    assert await first.json() == await retry.json()
    assert len(listed["notes"]) == 1  # the retry never reached the tool
    assert wipe.status == 403  # the shipped policy refuses a collection delete
    assert "example-notes-token" not in json.dumps(listed)


async def test_the_example_guards_its_mcp_server(example: str) -> None:
    async with connect(f"{example}/tools/calc") as session:
        names = {tool.name for tool in (await session.list_tools()).tools}
        added = await session.call_tool("add", {"a": 1, "b": 2})
        wiped = await session.call_tool("wipe", {})
    assert names == {"add"}  # the destructive tool is hidden
    assert text_of(added) == "3.0" or text_of(added) == "3"
    assert wiped.is_error and "destructive" in text_of(wiped)
