"""2026-07-28 routing headers must say what the body says (#22, class 3; #21): the proxy
decides on the body, a server or router may act on the headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory
from tests.mcp_server import McpServer

MODERN = "2026-07-28"


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, mcp_server: McpServer) -> TestClient:
    return await make_proxy({"mcp": {"upstream": mcp_server.url, "kind": "mcp", "timeout_s": 10}})


def call(name: str, arguments: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {
            "name": name,
            "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }


def headers(**overrides: str) -> dict[str, str]:
    base = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
        "X-Agent-Id": "a",
        "X-Run-Id": "r-headers",
    }
    return {**base, **overrides}


@pytest.mark.parametrize(
    "bad",
    [
        {"Mcp-Name": "delete_everything"},
        {"Mcp-Name": "=?base64?ZGVsZXRlX2V2ZXJ5dGhpbmc=?="},
        {"Mcp-Method": "tools/list"},
        {"MCP-Protocol-Version": "2025-11-25"},
        {"Mcp-Name": "=?base64?not base64?="},
    ],
)
async def test_a_header_that_disagrees_with_the_body_is_refused(
    proxy: TestClient, mcp_server: McpServer, bad: dict[str, str]
) -> None:
    answer = await proxy.post(
        "/tools/mcp", data=json.dumps(call("echo", {"text": "hi"})), headers=headers(**bad)
    )
    message = json.loads(await answer.read())
    assert answer.status == 400
    assert message["error"]["code"] == -32020
    assert mcp_server.executions["echo"] == 0


async def test_a_missing_method_header_is_refused_under_2026_07_28(
    proxy: TestClient, mcp_server: McpServer
) -> None:
    plain = headers()
    del plain["Mcp-Method"]
    answer = await proxy.post(
        "/tools/mcp", data=json.dumps(call("echo", {"text": "hi"})), headers=plain
    )
    assert json.loads(await answer.read())["error"]["code"] == -32020


def test_a_legacy_request_with_a_lying_method_header_is_refused() -> None:
    from proxy.mcp import jsonrpc
    from proxy.mcp.headers import header_mismatch

    message = jsonrpc.parse_message(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    )
    assert header_mismatch(message, {"Mcp-Method": "tools/list"}) is not None
    assert header_mismatch(message, {"Mcp-Name": "other"}) is not None
    assert header_mismatch(message, {}) is None
    assert header_mismatch(message, {"Mcp-Name": "=?base64?ZWNobw==?="}) is None


async def test_agreeing_headers_pass_and_the_tool_runs(
    proxy: TestClient, mcp_server: McpServer
) -> None:
    answer = await proxy.post(
        "/tools/mcp", data=json.dumps(call("echo", {"text": "hi"})), headers=headers()
    )
    body = await answer.text()
    assert answer.status == 200, body
    assert "hi" in body
    assert mcp_server.executions["echo"] == 1


@pytest.fixture
async def shipped_proxy(make_proxy: ProxyFactory, mcp_server: McpServer) -> TestClient:
    from proxy.config import shipped_policies

    return await make_proxy(
        {"mcp": {"upstream": mcp_server.url, "kind": "mcp", "timeout_s": 10}},
        policy={"path": str(shipped_policies()), "watch": False},
    )


@pytest.mark.parametrize(
    ("tool", "arguments", "runs", "reason"),
    [
        ("delete_everything", {}, 0, "is marked destructive"),
        ("send_email", {"to": "a@example.com", "body": "hi"}, 1, None),
    ],
)
async def test_a_2026_call_gets_its_annotations_without_a_listing_first(
    shipped_proxy: TestClient,
    mcp_server: McpServer,
    tool: str,
    arguments: dict[str, Any],
    runs: int,
    reason: str | None,
) -> None:
    """No tools/list passed by yet: Handrail lists the tools itself, in the agent's revision,
    so the policy decides on the server's annotations, not on 'unknown'."""
    answer = await shipped_proxy.post(
        "/tools/mcp",
        data=json.dumps(call(tool, arguments)),
        headers=headers(**{"Mcp-Name": tool, "X-Agent-Id": "sales-bot"}),
    )
    text = await answer.text()
    assert answer.status == 200, text
    assert mcp_server.executions[tool] == runs
    if reason is not None:
        assert reason in text and "unknown annotations" not in text
