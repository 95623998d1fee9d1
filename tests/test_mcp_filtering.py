"""tools/list answers are filtered by their shape, wherever they come from, and a batch can
hide no tools/call (#22, class 4)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory

HIDING_POLICY = """package handrail

import rego.v1

decision := {"allow": true, "reasons": [], "require_approval": false}

default visible := false

visible if input.call.name != "wipe_everything"
"""

TOOLS = [
    {"name": "read_notes", "inputSchema": {"type": "object"}},
    {"name": "wipe_everything", "inputSchema": {"type": "object"}},
]


def listing(request_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS}}


def server_app(seen: list[dict[str, Any]]) -> web.Application:
    async def post(request: web.Request) -> web.StreamResponse:
        message = await request.json()
        seen.append(message)
        if isinstance(message, list):
            return web.json_response([listing(m.get("id")) for m in message if "id" in m])
        if message.get("method") == "tools/list":
            # The answer comes on an SSE stream, under an id the proxy never saw.
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            data = json.dumps(listing("unrelated-id"))
            await response.write(f"event: message\ndata: {data}\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": {}})

    async def get(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"id: 5\ndata: {json.dumps(listing(42))}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get)
    return app


HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-03-26",
    "Mcp-Session-Id": "s-filter",
}


@pytest.fixture
async def proxy(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_proxy: ProxyFactory,
    tmp_path: Path,
) -> tuple[Any, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    server = await aiohttp_server(server_app(seen))
    policies = tmp_path / "hiding"
    policies.mkdir()
    (policies / "p.rego").write_text(HIDING_POLICY)
    client = await make_proxy(
        {"m": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"}},
        policy={"path": str(policies), "watch": False},
    )
    return client, seen


async def test_a_listing_under_an_unknown_id_is_filtered(proxy: Any) -> None:
    client, _ = proxy
    answer = await client.post(
        "/tools/m",
        data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        headers=HEADERS,
    )
    text = await answer.text()
    assert "read_notes" in text and "wipe_everything" not in text


async def test_a_listing_on_the_get_stream_is_filtered(proxy: Any) -> None:
    client, _ = proxy
    answer = await client.get("/tools/m", headers={**HEADERS, "Accept": "text/event-stream"})
    text = await answer.text()
    assert "read_notes" in text and "wipe_everything" not in text


@pytest.mark.parametrize(
    "batch",
    [
        [{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "wipe_everything"}}],
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "wipe_everything"}},
        ],
        [
            {"jsonrpc": "2.0", "id": 1, "method": "ping"},
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "wipe_everything", "arguments": {}},
            },
        ],
    ],
)
async def test_a_batch_holding_a_tools_call_never_reaches_the_server(
    proxy: Any, batch: list[dict[str, Any]]
) -> None:
    client, seen = proxy
    answer = await client.post("/tools/m", data=json.dumps(batch), headers=HEADERS)
    message = json.loads(await answer.read())
    assert message["error"]["code"] == -32600
    assert seen == []


def unlisted_server(seen: list[dict[str, Any]]) -> web.Application:
    """A server whose tools/list fails: the proxy cannot learn any tool's annotations."""

    async def post(request: web.Request) -> web.StreamResponse:
        message = await request.json()
        seen.append(message)
        if message.get("method") == "tools/list":
            return web.json_response({"error": "listing is down"}, status=500)
        return web.json_response(
            {"jsonrpc": "2.0", "id": message.get("id"), "result": {"content": []}}
        )

    app = web.Application()
    app.router.add_post("/mcp", post)
    return app


async def test_a_call_whose_annotations_are_unknown_is_refused_by_the_shipped_policy(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_proxy: ProxyFactory
) -> None:
    from proxy.config import shipped_policies

    seen: list[dict[str, Any]] = []
    server = await aiohttp_server(unlisted_server(seen))
    client = await make_proxy(
        {"m": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"}},
        policy={"path": str(shipped_policies()), "watch": False},
    )
    call = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {"name": "publish", "arguments": {}},
    }
    answer = await client.post(
        "/tools/m", data=json.dumps(call), headers={**HEADERS, "X-Agent-Id": "sales-bot"}
    )
    message = json.loads(await answer.read())
    assert message["result"]["isError"] is True
    assert "unknown annotations" in json.dumps(message)
    assert [m.get("method") for m in seen] == ["tools/list"]  # the call never went through
