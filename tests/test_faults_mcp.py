"""Never twice, never lost, for MCP: a FastMCP server over Streamable HTTP behind the proxy
(``kind: mcp``), with agents that hang up, calls that are cancelled, streams that end
without their response, idle and total timeouts, and protocol errors.

Every test asserts what the agent saw (the JSON-RPC answer, ``Idempotent-Replayed``) and
how many times the tool ran (the server counts executions of each tool).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from proxy.config import Config
from tests.support_faults import (
    ALLOW_ALL,
    MCP_HEADERS,
    Cut,
    FaultMcp,
    Proxy,
    StartProxy,
    hang_up,
    http_request,
    jsonrpc_messages,
    metric,
    proxy_starter,
    start_fault_mcp,
    tools_call,
    until,
)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(ALLOW_ALL)
    return directory


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exits:
        yield exits


@pytest.fixture
def start_proxy(stack: contextlib.AsyncExitStack, make_config: Callable[..., Config]) -> StartProxy:
    return proxy_starter(stack, make_config)


@pytest.fixture
def server() -> Iterator[FaultMcp]:
    with start_fault_mcp() as running:
        yield running


@pytest.fixture
def stateful_server() -> Iterator[FaultMcp]:
    with start_fault_mcp(stateless=False) as running:
        yield running


def mcp_tool(url: str, timeout_s: float = 5.0, **extra: Any) -> dict[str, Any]:
    idempotency = {"lease_margin_s": 0.5, **extra.pop("idempotency", {})}
    return {
        "m": {
            "upstream": url,
            "kind": "mcp",
            "timeout_s": timeout_s,
            **extra,
            "idempotency": idempotency,
        }
    }


@dataclass
class Reply:
    """What the agent saw of one JSON-RPC request."""

    status: int
    headers: dict[str, str]
    raw: bytes
    messages: list[Any]
    broken: bool = False

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    @property
    def response(self) -> dict[str, Any] | None:
        found = [m for m in self.messages if isinstance(m, dict) and "method" not in m]
        return found[-1] if found else None

    @property
    def error_code(self) -> str | None:
        response = self.response or {}
        data = (response.get("error") or {}).get("data") or {}
        if not data and isinstance(response.get("result"), dict):
            data = response["result"].get("_meta", {}).get("handrail", {})
        return data.get("code") if isinstance(data, dict) else None

    @property
    def reason(self) -> str | None:
        response = self.response or {}
        data = (response.get("error") or {}).get("data") or {}
        return data.get("reason") if isinstance(data, dict) else None

    @property
    def text(self) -> str:
        result = (self.response or {}).get("result") or {}
        return "".join(c.get("text", "") for c in result.get("content", []))


class Agent:
    """A raw MCP client over HTTP through the proxy: one run, optionally one session."""

    def __init__(self, proxy: Proxy, run: str, session: str | None = None) -> None:
        self.proxy = proxy
        self.run = run
        self.session = session

    @property
    def headers(self) -> dict[str, str]:
        headers = {**MCP_HEADERS, "X-Run-Id": self.run}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        return headers

    async def post(self, body: bytes, headers: dict[str, str] | None = None) -> Reply:
        url = self.proxy.tool_url("m")
        async with self.proxy.session.post(
            url, data=body, headers={**self.headers, **(headers or {})}
        ) as response:
            content_type = response.headers.get("Content-Type", "")
            try:
                raw = await response.read()
                broken = False
            except aiohttp.ClientPayloadError:
                raw, broken = b"", True  # the stream was broken off
            messages = [] if broken else jsonrpc_messages(content_type, raw)
            return Reply(response.status, dict(response.headers), raw, messages, broken)

    async def call(self, name: str, arguments: dict[str, Any], **meta: Any) -> Reply:
        return await self.post(tools_call(uuid.uuid4().hex[:8], name, arguments, **meta))

    async def call_until_settled(self, name: str, arguments: dict[str, Any], **meta: Any) -> Reply:
        """The retry; while the first call is still settling it is in flight (409)."""
        deadline = time.monotonic() + 5
        while True:
            reply = await self.call(name, arguments, **meta)
            if reply.error_code != "idempotency_key_in_use" or time.monotonic() > deadline:
                return reply
            await asyncio.sleep(0.05)

    async def initialize(self) -> None:
        message = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        }
        reply = await self.post(json.dumps(message).encode())
        assert reply.status == 200
        self.session = reply.headers["mcp-session-id"]
        done = await self.post(
            json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        )
        assert done.status == 202


@contextlib.asynccontextmanager
async def sdk_session(proxy: Proxy, run: str) -> AsyncIterator[ClientSession]:
    """The official MCP client through the proxy, in run ``run``."""
    with anyio.fail_after(20):
        async with httpx2.AsyncClient(headers={"X-Run-Id": run}, timeout=30) as http:
            async with streamable_http_client(proxy.tool_url("m"), http_client=http) as (
                read,
                write,
            ):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    yield session


def sdk_text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


# -- 1. agents that hang up on an SSE answer ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arguments", "cut", "body_bytes", "rst"),
    [
        ("charge", {"amount": 5, "wait": 0.5}, Cut.BEFORE_ANSWER, 0, True),
        ("charge", {"amount": 5, "wait": 0.5}, Cut.BEFORE_ANSWER, 0, False),
        ("charge", {"amount": 5, "wait": 0.5}, Cut.AFTER_HEADERS, 0, True),
        ("progressing", {"seconds": 1.0, "every": 0.25}, Cut.MID_BODY, 20, True),
    ],
    ids=["before-answer-rst", "before-answer-fin", "after-headers", "mid-stream"],
)
@pytest.mark.parametrize("retry_with", ["raw", "sdk"])
async def test_agent_hang_up_on_an_sse_answer_keeps_the_result_for_the_retry(
    server: FaultMcp,
    start_proxy: StartProxy,
    name: str,
    arguments: dict[str, Any],
    cut: Cut,
    body_bytes: int,
    rst: bool,
    retry_with: str,
) -> None:
    proxy = await start_proxy(mcp_tool(server.url))
    run = run_id()
    agent = Agent(proxy, run)
    body = tools_call(1, name, arguments, progressToken="p-1")
    request = http_request("POST", proxy.host, proxy.port, "/tools/m", body, agent.headers)

    heard = await hang_up(
        proxy.host,
        proxy.port,
        request,
        cut,
        ready=lambda: server.executions[name] == 1,
        body_bytes=body_bytes,
        rst=rst,
    )
    assert b'"result"' not in heard.body  # the agent never saw its result
    if cut is not Cut.BEFORE_ANSWER:
        assert heard.status == 200

    if retry_with == "raw":
        # The same params (and run), under a new JSON-RPC id.
        retry = await agent.call_until_settled(name, arguments, progressToken="p-1")
        assert (retry.status, retry.replayed, retry.error_code) == (200, True, None)
        assert retry.response is not None and retry.response["id"] != 1
        text = retry.text
    else:
        await until(lambda: server.executions[name] == 1)
        await asyncio.sleep(arguments.get("wait", arguments.get("seconds", 0)) + 0.3)
        async with sdk_session(proxy, run) as session:
            result = await session.call_tool(name, arguments)
        assert not result.is_error
        text = sdk_text(result)

    expected = "charged 5 (execution #1)" if name == "charge" else "progressed 4 steps"
    assert text == expected
    assert server.executions[name] == 1
    metrics = await proxy.metrics()
    assert metric(metrics, "handrail_errors_total", code="internal_error") == 0
    assert metric(metrics, "handrail_client_disconnects_total", tool="m") == 1


# -- 5. cancels, streams without a response, timeouts, protocol errors -----------------------


async def test_cancelled_call_is_never_run_again(
    stateful_server: FaultMcp, start_proxy: StartProxy
) -> None:
    server = stateful_server
    proxy = await start_proxy(mcp_tool(server.url))
    agent = Agent(proxy, run_id())
    await agent.initialize()

    pending = asyncio.ensure_future(agent.post(tools_call(11, "slow", {"seconds": 0.6})))
    await until(lambda: server.executions["slow"] == 1)
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 11}}
    cancelled = await agent.post(json.dumps(cancel).encode())
    first = await pending
    await asyncio.sleep(0.8)  # past the time the tool would have needed
    again = await agent.call_until_settled("slow", {"seconds": 0.6})

    assert cancelled.status == 202
    assert first.response is not None and "result" not in first.response
    assert server.executions["slow"] == 1, f"the cancelled call ran again: {again.raw!r}"
    assert (again.status, again.error_code, again.reason) == (409, "outcome_unknown", "cancelled")
    assert b"too large to keep" not in again.raw


async def test_call_cancelled_by_the_sdk_client_is_never_run_again(
    stateful_server: FaultMcp, start_proxy: StartProxy
) -> None:
    server = stateful_server
    proxy = await start_proxy(mcp_tool(server.url))
    run = run_id()

    async with sdk_session(proxy, run) as session:
        with anyio.move_on_after(5) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(session.call_tool, "slow", {"seconds": 0.6})
                await until(lambda: server.executions["slow"] == 1)
                group.cancel_scope.cancel()  # the SDK sends notifications/cancelled
        assert not scope.cancelled_caught
        await asyncio.sleep(0.8)  # past the time the tool would have needed
        refused: MCPError | None = None
        try:
            await session.call_tool("slow", {"seconds": 0.6})
        except MCPError as exc:
            refused = exc

    assert server.executions["slow"] == 1, "the cancelled call ran a second time"
    assert refused is not None
    assert isinstance(refused.error.data, dict)
    assert (refused.error.data["code"], refused.error.data["reason"]) == (
        "outcome_unknown",
        "cancelled",
    )
    assert "too large to keep" not in refused.message


@pytest.mark.parametrize("stateless", [True, False], ids=["stateless", "session"])
async def test_stream_ended_without_the_response_is_never_run_again(
    start_proxy: StartProxy, stateless: bool
) -> None:
    with start_fault_mcp(stateless=stateless) as server:
        server.vanish.add("vanish")
        proxy = await start_proxy(mcp_tool(server.url))
        agent = Agent(proxy, run_id())
        if not stateless:
            await agent.initialize()

        first = await agent.call("vanish", {"amount": 3})
        again = await agent.call_until_settled("vanish", {"amount": 3})
        metrics = await proxy.metrics()

    assert first.response is None  # the stream ended without it
    assert again.status == 409
    assert (again.error_code, again.reason) == ("outcome_unknown", "no_response")
    assert b"too large to keep" not in again.raw
    assert server.executions["vanish"] == 1
    assert (
        metric(metrics, "handrail_idempotency_unknown_total", tool="m", reason="no_response") == 1
    )


async def test_progress_keeps_a_long_call_alive_past_timeout_and_lease(
    server: FaultMcp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(mcp_tool(server.url, timeout_s=0.8))  # lease: 1.3 s
    agent = Agent(proxy, run_id())
    arguments = {"seconds": 2.4, "every": 0.3}

    pending = asyncio.ensure_future(agent.call("progressing", arguments, progressToken="p"))
    await asyncio.sleep(1.8)  # past timeout_s and past the first lease
    meanwhile = await agent.call("progressing", arguments)
    first = await pending
    retry = await agent.call_until_settled("progressing", arguments)

    assert (first.status, first.broken) == (200, False)
    assert first.text == "progressed 8 steps"
    assert sum(1 for m in first.messages if m.get("method") == "notifications/progress") == 8
    assert meanwhile.error_code == "idempotency_key_in_use"  # its lease was kept alive
    assert (retry.replayed, retry.text) == (True, "progressed 8 steps")
    assert server.executions["progressing"] == 1


@pytest.mark.parametrize(
    ("name", "arguments", "limits"),
    [
        ("silent", {"seconds": 1.8}, {"timeout_s": 0.7}),
        ("progressing", {"seconds": 2.0, "every": 0.25}, {"timeout_s": 0.7, "max_duration_s": 0.9}),
    ],
    ids=["silent-past-timeout", "past-max-duration"],
)
async def test_cut_call_is_never_run_again(
    server: FaultMcp,
    start_proxy: StartProxy,
    name: str,
    arguments: dict[str, Any],
    limits: dict[str, float],
) -> None:
    proxy = await start_proxy(mcp_tool(server.url, **limits))
    agent = Agent(proxy, run_id())

    started = time.monotonic()
    first = await agent.call(name, arguments, progressToken="p")
    cut_after = time.monotonic() - started
    again = await agent.call(name, arguments)  # the tool is still working
    await asyncio.sleep(arguments["seconds"] - cut_after + 0.3)
    later = await agent.call(name, arguments)
    metrics = await proxy.metrics()

    assert first.broken or first.error_code == "upstream_timeout"
    assert cut_after < arguments["seconds"] - 0.5
    assert (again.status, again.error_code, again.reason) == (409, "outcome_unknown", "timeout")
    assert later.error_code == "outcome_unknown"
    assert server.executions[name] == 1
    assert metric(metrics, "handrail_errors_total", code="outcome_unknown") == 2
    assert metric(metrics, "handrail_errors_total", code="internal_error") == 0


@pytest.mark.parametrize(
    ("first_call", "second_call", "key"),
    [
        (("picky", {"n": "three"}), ("picky", {"n": "three"}), None),
        (("nope", {"n": 1}), ("nope", {"n": 1}), None),
        (("picky", {"n": "three"}), ("picky", {"n": 3}), "pick-1"),
    ],
    ids=["invalid-params-again", "unknown-tool-again", "corrected-under-the-same-key"],
)
async def test_protocol_error_frees_the_key(
    server: FaultMcp,
    start_proxy: StartProxy,
    first_call: tuple[str, dict[str, Any]],
    second_call: tuple[str, dict[str, Any]],
    key: str | None,
) -> None:
    proxy = await start_proxy(mcp_tool(server.url))
    agent = Agent(proxy, run_id())
    headers = {"Idempotency-Key": key} if key else None

    first = await agent.post(tools_call(1, *first_call), headers)
    second = await agent.post(tools_call(2, *second_call), headers)

    assert first.response is not None and first.response["error"]["code"] == -32602
    assert not second.replayed
    assert second.response is not None and second.response["id"] == 2
    if second_call == first_call:
        assert second.response["error"]["code"] == -32602
        assert server.arrivals[first_call[0]] == 2  # it reached the server again
    else:
        assert second.text == "picked 3"
        assert server.executions["picky"] == 1
