"""The official MCP client through Handrail to a FastMCP server on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_types import ToolListChangedNotification
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.mcp.jsonrpc import SseParser
from tests.conftest import ProxyFactory
from tests.mcp_server import McpServer, start_mcp_server

MCP_POLICY = """package handrail

import rego.v1

default allow := true

allow := false if count(reasons) > 0

reasons contains "mail may only go to example.com" if {
	input.call.name == "send_email"
	not endswith(input.call.arguments.to, "@example.com")
}

reasons contains "destructive tools are not allowed" if {
	input.call.annotations.destructiveHint == true
}

default visible := true

visible := false if input.call.name == "delete_everything"

decision := {"allow": allow, "reasons": reasons, "require_approval": false}
"""

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(MCP_POLICY)
    return directory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, mcp_server: McpServer) -> TestClient:
    return await make_proxy({"mcp": {"upstream": mcp_server.url, "kind": "mcp", "timeout_s": 10}})


def endpoint(proxy: TestClient) -> str:
    return str(proxy.make_url("/tools/mcp"))


@asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[ClientSession]:
    with anyio.fail_after(20):
        async with streamable_http_client(url) as (read, write):
            async with ClientSession(read, write, **kwargs) as session:
                await session.initialize()
                yield session


async def finished_span(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The call's span ends just after its answer is sent: wait a moment for it."""
    for _ in range(200):
        found = [s for s in spans.get_finished_spans() if s.name == name]
        if found:
            (span,) = found
            return span
        await anyio.sleep(0.01)
    raise AssertionError(
        f"no finished span named {name!r}: {[s.name for s in spans.get_finished_spans()]}"
    )


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def test_tools_list_hides_what_visible_rejects(proxy: TestClient) -> None:
    async with connect(endpoint(proxy)) as session:
        names = [t.name for t in (await session.list_tools()).tools]
    assert "delete_everything" not in names
    assert {"echo", "send_email", "count_slowly"} <= set(names)


async def test_allowed_call_reaches_the_server(proxy: TestClient, mcp_server: McpServer) -> None:
    async with connect(endpoint(proxy)) as session:
        result = await session.call_tool("echo", {"text": "hello"})
    assert not result.is_error
    assert text_of(result) == "hello"
    assert mcp_server.executions["echo"] == 1


async def test_denied_call_returns_is_error_with_the_reason(
    proxy: TestClient, mcp_server: McpServer
) -> None:
    # Never listed by the client: the proxy learns destructiveHint from the server itself.
    async with connect(endpoint(proxy)) as session:
        result = await session.call_tool("delete_everything", {})
    assert result.is_error
    assert text_of(result) == "Denied by policy: destructive tools are not allowed"
    assert mcp_server.executions["delete_everything"] == 0


async def test_a_denied_call_is_journaled_with_the_status_the_agent_saw(
    proxy: TestClient, mcp_server: McpServer, spans: InMemorySpanExporter
) -> None:
    from proxy.http.keys import DEPS
    from proxy.tracing.base import CallQuery

    async with connect(endpoint(proxy)) as session:
        result = await session.call_tool("delete_everything", {})
    assert result.is_error
    deps = proxy.server.app[DEPS]
    await deps.journal.flush()
    rows = [r for r in await deps.journal.query(CallQuery()) if r["call"] == "delete_everything"]
    assert [(r["status"], r["decision"]) for r in rows] == [(200, "deny")]
    call_span = next(s for s in spans.get_finished_spans() if s.name.endswith("delete_everything"))
    assert (call_span.attributes or {})["http.response.status_code"] == 200
    assert (call_span.attributes or {})["handrail.decision"] == "deny"


async def test_call_denied_by_its_arguments(proxy: TestClient, mcp_server: McpServer) -> None:
    async with connect(endpoint(proxy)) as session:
        denied = await session.call_tool("send_email", {"to": "eve@evil.test", "body": "hi"})
        allowed = await session.call_tool("send_email", {"to": "bob@example.com", "body": "hi"})
    assert denied.is_error
    assert "mail may only go to example.com" in text_of(denied)
    assert not allowed.is_error
    assert mcp_server.executions["send_email"] == 1


async def test_identical_retry_is_replayed_without_running_twice(
    proxy: TestClient, mcp_server: McpServer
) -> None:
    async with connect(endpoint(proxy)) as session:
        first = await session.call_tool("send_email", {"to": "bob@example.com", "body": "once"})
        retry = await session.call_tool("send_email", {"to": "bob@example.com", "body": "once"})
    assert text_of(first) == "sent #1 to bob@example.com"
    assert retry == first
    assert mcp_server.executions["send_email"] == 1


async def test_read_only_tools_can_skip_the_key(
    make_proxy: ProxyFactory, mcp_server: McpServer
) -> None:
    tool = {"upstream": mcp_server.url, "kind": "mcp", "idempotency": {"exempt_read_only": True}}
    proxy = await make_proxy({"mcp": tool})
    async with connect(endpoint(proxy)) as session:
        await session.call_tool("echo", {"text": "again"})
        await session.call_tool("echo", {"text": "again"})
        await session.call_tool("send_email", {"to": "a@example.com", "body": "x"})
        await session.call_tool("send_email", {"to": "a@example.com", "body": "x"})
    assert (mcp_server.executions["echo"], mcp_server.executions["send_email"]) == (2, 1)


async def post(
    proxy: TestClient,
    message: Any,
    session: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    headers = {**ACCEPT, **(headers or {})}
    if session:
        headers["Mcp-Session-Id"] = session
        headers["MCP-Protocol-Version"] = "2025-11-25"
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    response = await proxy.post("/tools/mcp", data=data, headers=headers)
    body = await response.read()
    if response.content_type == "text/event-stream":
        events = SseParser().feed(body)
        parsed = [json.loads(e.data) for e in events if e.data]
        return response.status, response.headers, parsed[-1]
    return response.status, response.headers, json.loads(body) if body else None


async def raw_session(proxy: TestClient) -> str:
    status, headers, _ = await post(
        proxy,
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        },
    )
    assert status == 200
    session = headers["Mcp-Session-Id"]
    status, _, _ = await post(
        proxy, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session
    )
    assert status == 202
    return session


async def test_replay_has_the_retry_id_and_the_original_result_bytes(
    proxy: TestClient, mcp_server: McpServer
) -> None:
    session = await raw_session(proxy)
    call = {
        "jsonrpc": "2.0",
        "method": "tools/call",
        "params": {"name": "send_email", "arguments": {"to": "a@example.com", "body": "x"}},
    }
    _, _, first = await post(proxy, {**call, "id": 1}, session)
    response = await proxy.post(
        "/tools/mcp",
        data=json.dumps({**call, "id": "retry-2"}),
        headers={**ACCEPT, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"},
    )
    raw = await response.read()
    assert response.headers["Idempotent-Replayed"] == "true"
    assert json.loads(raw)["id"] == "retry-2"
    assert json.dumps(first["result"], separators=(",", ":")).encode() in raw
    assert mcp_server.executions["send_email"] == 1


async def test_progress_notifications_stream_through(proxy: TestClient) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async with connect(endpoint(proxy)) as session:
        result = await session.call_tool("count_slowly", {"n": 3}, progress_callback=on_progress)
    assert text_of(result) == "counted to 3"
    assert progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_relisting_after_list_changed_is_filtered_too(proxy: TestClient) -> None:
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    async with connect(endpoint(proxy), message_handler=on_message) as session:
        await session.call_tool("announce_change", {})
        with anyio.fail_after(5):
            await changed.wait()
        names = [t.name for t in (await session.list_tools()).tools]
    assert "delete_everything" not in names and "echo" in names


async def test_server_events_reach_the_client_on_the_get_stream(proxy: TestClient) -> None:
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    async with connect(endpoint(proxy), message_handler=on_message) as session:
        await session.call_tool("announce_on_stream", {})
        with anyio.fail_after(5):
            await changed.wait()


async def test_delete_ends_the_session_upstream(proxy: TestClient) -> None:
    session = await raw_session(proxy)
    deleted = await proxy.delete(
        "/tools/mcp", headers={"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    )
    assert deleted.status == 200
    status, _, _ = await post(proxy, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, session)
    assert status == 404


async def test_meta_traceparent_parents_the_call_span(
    proxy: TestClient, spans: InMemorySpanExporter
) -> None:
    session = await raw_session(proxy)
    agent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    meta = {"traceparent": f"00-{agent_trace}-00f067aa0ba902b7-01"}
    params = {"name": "echo", "arguments": {"text": "x"}, "_meta": meta}
    status, _, body = await post(
        proxy, {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}, session
    )
    assert status == 200 and body["result"]["isError"] is False
    span = await finished_span(spans, "execute_tool mcp.echo")
    assert format(span.context.trace_id, "032x") == agent_trace
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"


async def test_meta_traceparent_of_another_trace_is_linked(
    proxy: TestClient, spans: InMemorySpanExporter
) -> None:
    session = await raw_session(proxy)
    header_trace, meta_trace = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "5cf92f3577b34da6a3ce929d0e0e4737",
    )
    meta = {"traceparent": f"00-{meta_trace}-00f067aa0ba902b7-01"}
    params = {"name": "echo", "arguments": {"text": "x"}, "_meta": meta}
    await post(
        proxy,
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params},
        session,
        headers={"traceparent": f"00-{header_trace}-00f067aa0ba902b8-01"},
    )
    span = await finished_span(spans, "execute_tool mcp.echo")
    assert format(span.context.trace_id, "032x") == header_trace
    assert [format(link.context.trace_id, "032x") for link in span.links] == [meta_trace]


async def test_json_answering_server_is_guarded_too(make_proxy: ProxyFactory) -> None:
    with start_mcp_server(json_response=True) as server:
        proxy = await make_proxy({"mcp": {"upstream": server.url, "kind": "mcp"}})
        async with connect(endpoint(proxy)) as session:
            names = [t.name for t in (await session.list_tools()).tools]
            denied = await session.call_tool("send_email", {"to": "eve@evil.test", "body": "x"})
            first = await session.call_tool("send_email", {"to": "a@example.com", "body": "x"})
            retry = await session.call_tool("send_email", {"to": "a@example.com", "body": "x"})
    assert "delete_everything" not in names
    assert denied.is_error and retry == first
    assert server.executions["send_email"] == 1


async def test_invalid_json_is_a_parse_error(proxy: TestClient) -> None:
    status, _, body = await post(proxy, b'{"jsonrpc": "2.0", "id": 1, "method": ')
    assert status == 400
    assert body["error"]["code"] == -32700
    assert body["id"] is None


async def test_bad_message_shape_is_an_invalid_request(proxy: TestClient) -> None:
    status, _, body = await post(
        proxy, {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": 7}
    )
    assert status == 400
    assert (body["error"]["code"], body["id"]) == (-32600, 5)


async def test_batches_are_refused_after_2025_03_26(proxy: TestClient) -> None:
    session = await raw_session(proxy)
    status, _, body = await post(proxy, [{"jsonrpc": "2.0", "id": 1, "method": "ping"}], session)
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_call_span_carries_the_mcp_attributes(
    proxy: TestClient, spans: InMemorySpanExporter
) -> None:
    async with connect(endpoint(proxy)) as session:
        await session.call_tool("echo", {"text": "traced"})
    span = await finished_span(spans, "execute_tool mcp.echo")
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.tool.name"] == "echo"
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["mcp.session.id"] == attrs["session.id"]
    assert attrs["jsonrpc.request.id"] == attrs["gen_ai.tool.call.id"]
    assert attrs["handrail.decision"] == "allow"


def test_meta_trace_context_is_passed_on_as_the_proxys_own() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from proxy.upstream import upstream_body

    agent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "echo",
            "arguments": {"text": "x"},
            "_meta": {"traceparent": agent, "progressToken": 3},
        },
    }
    call = SimpleNamespace(mcp=object(), body=json.dumps(message).encode())
    span = TracerProvider().get_tracer("t").start_span("POST")
    sent = json.loads(upstream_body(call, span))  # type: ignore[arg-type]
    meta = sent["params"]["_meta"]
    own = span.get_span_context()
    assert meta["traceparent"].startswith(f"00-{own.trace_id:032x}-{own.span_id:016x}-")
    assert meta["progressToken"] == 3 and sent["params"]["arguments"] == {"text": "x"}
