"""Held MCP calls (#17): in-band for 2026-07-28 clients (an ``input_required`` URL
elicitation with a signed ``requestState``), ``isError`` text for older ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient
from mcp import Client
from mcp_types import ElicitResult, methods

from tests.conftest import ProxyFactory
from tests.mcp_server import McpServer
from tests.test_mcp import endpoint
from tests.test_mcp_2026 import MODERN, call_params, post

HOLD_MCP_POLICY = """package handrail

import rego.v1

default allow := true

default visible := true

hold if input.call.name == "send_email"

reasons contains "mail needs a person" if hold

decision := {"allow": allow, "reasons": reasons, "require_approval": hold}
"""

MAIL = {"to": "a@example.com", "body": "hello"}
AdminFactory = Callable[[TestClient], Awaitable[TestClient]]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(HOLD_MCP_POLICY)
    return directory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, mcp_server: McpServer) -> TestClient:
    return await make_proxy(
        {"mcp": {"upstream": mcp_server.url, "kind": "mcp", "timeout_s": 10}},
        approvals={"wait_s": 0.3},
    )


async def approve(admin: TestClient, approval_id: str, approve: bool = True) -> None:
    body = {"approve": approve, "reason": "checked", "by": "bob"}
    async with admin.post(f"/approvals/{approval_id}", json=body) as response:
        assert response.status == 200, await response.text()


async def test_a_2026_client_is_held_in_band_and_runs_once_approved(
    proxy: TestClient, mcp_server: McpServer, make_admin: AdminFactory
) -> None:
    """The SDK's client gets a URL elicitation naming the approval page; the person approves
    there (the admin API here); the client's retry with the signed requestState runs once."""
    admin = await make_admin(proxy)
    asked: list[Any] = []

    async def person(context: Any, params: Any) -> ElicitResult:
        asked.append(params)
        await approve(admin, params.elicitation_id)
        return ElicitResult(action="accept")

    with anyio.fail_after(20):
        async with Client(endpoint(proxy), mode=MODERN, elicitation_callback=person) as client:
            result = await client.call_tool("send_email", MAIL)
    assert not result.is_error, result
    assert result.content[0].text == "sent #1 to a@example.com"  # type: ignore[union-attr]
    (params,) = asked
    assert params.mode == "url"
    assert f"/ui/approvals/{params.elicitation_id}?t=" in params.url
    assert mcp_server.executions["send_email"] == 1


async def test_the_held_round_is_valid_for_the_revision_and_its_state_is_bound(
    proxy: TestClient, mcp_server: McpServer, make_admin: AdminFactory
) -> None:
    capable = {"elicitation": {"form": {}, "url": {}}}
    params = call_params("send_email", MAIL)
    params["_meta"]["io.modelcontextprotocol/clientCapabilities"] = capable
    status, held = await post(proxy, "tools/call", params, name="send_email")
    assert status == 200
    result = held["result"]
    methods.validate_server_result("tools/call", MODERN, result)
    assert result["resultType"] == "input_required"
    state = result["requestState"]
    (request,) = result["inputRequests"].values()
    approval_id = request["params"]["elicitationId"]

    def retry(arguments: dict[str, Any], request_state: str) -> dict[str, Any]:
        again = call_params("send_email", arguments)
        again["_meta"]["io.modelcontextprotocol/clientCapabilities"] = capable
        again["inputResponses"] = {"handrail.approval": {"action": "accept"}}
        again["requestState"] = request_state
        return again

    # Still pending: another round, the same approval.
    _, pending = await post(
        proxy, "tools/call", retry(MAIL, state), request_id=2, name="send_email"
    )
    assert pending["result"]["resultType"] == "input_required"
    again = next(iter(pending["result"]["inputRequests"].values()))
    assert again["params"]["elicitationId"] == approval_id
    await approve(await make_admin(proxy), approval_id)
    # Tampered, or carried over to other arguments: refused, nothing runs.
    tampered = state[:-3] + ("AAA" if not state.endswith("AAA") else "BBB")
    status, refused = await post(
        proxy, "tools/call", retry(MAIL, tampered), request_id=3, name="send_email"
    )
    assert (status, refused["error"]["code"]) == (400, -32602)
    other = {**MAIL, "to": "boss@example.com"}
    status, refused = await post(
        proxy, "tools/call", retry(other, state), request_id=4, name="send_email"
    )
    assert status == 400 and "other arguments" in refused["error"]["message"]
    assert mcp_server.executions["send_email"] == 0
    # The real retry: the server never sees the round's fields, and the call runs once.
    _, done = await post(proxy, "tools/call", retry(MAIL, state), request_id=5, name="send_email")
    assert done["result"]["content"][0]["text"] == "sent #1 to a@example.com"
    assert mcp_server.executions["send_email"] == 1


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_a_client_without_url_elicitation_reads_what_to_do(
    proxy: TestClient, mcp_server: McpServer, make_admin: AdminFactory, mode: str
) -> None:
    with anyio.fail_after(20):
        async with Client(endpoint(proxy), mode=mode) as client:
            held = await client.call_tool("send_email", MAIL)
            assert held.is_error
            text = held.content[0].text  # type: ignore[union-attr]
            facts = (held.meta or {})["handrail"]
            assert facts["code"] == "approval_pending"
            assert facts["approval_id"] in text and "/ui/approvals/" in text
            assert "mail needs a person" in text
            await approve(await make_admin(proxy), facts["approval_id"])
            done = await client.call_tool("send_email", MAIL)
    assert not done.is_error
    assert mcp_server.executions["send_email"] == 1


async def test_a_rejected_mcp_call_reads_the_approvers_reason(
    proxy: TestClient, mcp_server: McpServer, make_admin: AdminFactory
) -> None:
    async with Client(endpoint(proxy), mode="legacy") as client:
        held = await client.call_tool("send_email", MAIL)
        approval_id = (held.meta or {})["handrail"]["approval_id"]
        await approve(await make_admin(proxy), approval_id, approve=False)
        rejected = await client.call_tool("send_email", MAIL)
    assert rejected.is_error
    assert "checked" in rejected.content[0].text  # type: ignore[union-attr]
    assert mcp_server.executions["send_email"] == 0
    await asyncio.sleep(0)
    assert json.dumps(rejected.meta)  # machine-readable facts ride along
