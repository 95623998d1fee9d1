"""MCP 2026-07-28 through Handrail (#21), beside the handshake revisions on the same endpoint.

A FastMCP server that speaks both eras, the official Python SDK's client pinned to a
revision, and raw JSON-RPC where the test needs to say exactly what goes on the wire.
Every message Handrail makes itself is parsed with the SDK's own types for the revision.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from mcp import Client
from mcp_types import methods
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import Config
from proxy.errors import PolicyDenied
from proxy.mcp.jsonrpc import SseParser, event_message
from proxy.mcp.render import render_error
from tests.conftest import ProxyFactory
from tests.mcp_server import McpServer
from tests.support_faults import running_proxy
from tests.test_mcp import MCP_POLICY, endpoint

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(MCP_POLICY)
    return directory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, mcp_server: McpServer) -> TestClient:
    return await make_proxy({"mcp": {"upstream": mcp_server.url, "kind": "mcp", "timeout_s": 10}})


def envelope(**extra: Any) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
        "io.modelcontextprotocol/clientInfo": {"name": "raw-test", "version": "1"},
        **extra,
    }


def traceparent(span: int) -> str:
    return f"00-{TRACE}-{span:016x}-01"


async def post(
    client: TestClient | Served,
    method: str,
    params: dict[str, Any],
    *,
    request_id: int | str = 1,
    name: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One 2026-07-28 request; the JSON-RPC response, whether it came as JSON or SSE."""
    sent = {
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method,
        **({"Mcp-Name": name} if name is not None else {}),
        **(headers or {}),
    }
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    async with client.post("/tools/mcp", json=body, headers=sent) as response:
        raw = await response.read()
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            parser = SseParser()
            messages = [event_message(e) for e in parser.feed(raw) + parser.close()]
            answers = [m for m in messages if isinstance(m, dict) and "method" not in m]
            return response.status, answers[-1]
        return response.status, json.loads(raw)


def call_params(name: str, arguments: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments, "_meta": envelope(**meta)}


# -- the SDK's own client, pinned to each revision -------------------------------------


@pytest.mark.parametrize("mode", [MODERN, "legacy"])
async def test_sdk_client_lists_calls_and_reads_a_deny(
    proxy: TestClient,
    mcp_server: McpServer,
    mode: str,
) -> None:
    with anyio.fail_after(20):
        async with Client(endpoint(proxy), mode=mode) as client:
            assert client.protocol_version == (MODERN if mode == MODERN else HANDSHAKE)
            names = [t.name for t in (await client.list_tools()).tools]
            echoed = await client.call_tool("echo", {"text": "hi"})
            denied = await client.call_tool("send_email", {"to": "x@evil.com", "body": "b"})
    assert "delete_everything" not in names and "echo" in names
    assert not echoed.is_error
    # The SDK validated the deny against its types for the revision: the model reads it.
    assert denied.is_error
    assert "mail may only go to example.com" in denied.content[0].text  # type: ignore[union-attr]
    assert mcp_server.executions["send_email"] == 0


async def test_an_unlisted_destructive_tool_is_denied_by_its_annotations(
    proxy: TestClient,
    mcp_server: McpServer,
) -> None:
    """No listing first: Handrail lists the tools itself, with the agent's envelope."""
    status, answer = await post(
        proxy, "tools/call", call_params("delete_everything", {}), name="delete_everything"
    )
    assert status == 200
    assert answer["result"]["isError"] is True
    assert "destructive tools are not allowed" in answer["result"]["content"][0]["text"]
    assert answer["result"]["resultType"] == "complete"
    assert mcp_server.executions["delete_everything"] == 0


@pytest.mark.parametrize("version", ["2025-06-18", HANDSHAKE, MODERN])
@pytest.mark.parametrize("approval", [False, True])
def test_handrails_own_results_are_valid_for_each_revision(version: str, approval: bool) -> None:
    details = {"reasons": ["no"], "require_approval": approval}
    _, message = render_error(
        PolicyDenied("denied by policy: no", details=details),
        7,
        TRACE,
        modern=version >= MODERN,
    )
    methods.validate_server_result("tools/call", version, message["result"])


async def test_list_results_keep_their_cache_fields(
    proxy: TestClient,
) -> None:
    status, answer = await post(proxy, "tools/list", {"_meta": envelope()})
    assert status == 200
    result = answer["result"]
    assert result["resultType"] == "complete"
    assert result["cacheScope"] == "private"  # as the server said (a public one hiding
    assert "delete_everything" not in [t["name"] for t in result["tools"]]  # tools: private)


async def test_server_discover_passes_through(proxy: TestClient) -> None:
    status, answer = await post(proxy, "server/discover", {"_meta": envelope()})
    assert status == 200
    assert MODERN in answer["result"]["supportedVersions"]


# -- headers, and refusals that mean the tool did not run -------------------------------


async def test_a_header_that_disagrees_with_the_body_is_refused_before_the_tool(
    proxy: TestClient,
    mcp_server: McpServer,
) -> None:
    params = call_params("send_email", {"to": "a@example.com", "body": "b"})
    status, answer = await post(proxy, "tools/call", params, name="echo")
    assert status == 400
    assert answer["error"]["code"] == -32020
    status, answer = await post(proxy, "tools/call", params, name="send_email")
    assert status == 200 and not answer["result"]["isError"]
    assert mcp_server.executions["send_email"] == 1


def refusing_server(answers: list[tuple[int, dict[str, Any]]], ran: list[str]) -> web.Application:
    """An MCP server that refuses the first requests as given, then runs the tool."""

    async def handle(request: web.Request) -> web.Response:
        message = await request.json()
        if message.get("method") == "tools/list":
            result = {"tools": [{"name": "pay", "inputSchema": {"type": "object"}}]}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if answers:
            status, error = answers.pop(0)
            body = {"jsonrpc": "2.0", "id": message["id"], "error": error}
            return web.json_response(body, status=status)
        ran.append(message["params"]["name"])
        result = {"content": [{"type": "text", "text": f"paid #{len(ran)}"}]}
        result["resultType"] = "complete"
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    app = web.Application()
    app.router.add_post("/mcp", handle)
    return app


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, -32020), (200, -32602), (400, -32022), (200, -32021), (200, -32600)],
)
async def test_a_protocol_refusal_by_the_server_is_never_replayed(
    make_proxy: ProxyFactory,
    aiohttp_server: Callable[..., Any],
    status: int,
    code: int,
) -> None:
    """The server refused the request before its tool ran: the key is released, so the
    same call sent again runs (it is not answered with the stored refusal)."""
    ran: list[str] = []
    refusal = {"code": code, "message": "refused before the tool ran"}
    server: TestServer = await aiohttp_server(refusing_server([(status, refusal)], ran))
    proxy = await make_proxy({"mcp": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"}})
    params = call_params("pay", {"amount": 5}, traceparent=traceparent(1))
    first_status, first = await post(proxy, "tools/call", params, name="pay")
    assert (first_status, first["error"]["code"]) == (status, code)
    _, second = await post(proxy, "tools/call", params, request_id=2, name="pay")
    assert second["result"]["content"][0]["text"] == "paid #1"
    assert ran == ["pay"]
    _, third = await post(proxy, "tools/call", params, request_id=3, name="pay")
    assert third["result"]["content"][0]["text"] == "paid #1"  # now replayed
    assert ran == ["pay"]


# -- retries and repeats without sessions ----------------------------------------------


async def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@dataclass
class Served:
    """A proxy as an agent reaches it: the aiohttp test server (which cancels the handler
    of a closed connection) or the production server (which does not)."""

    host: str
    port: int
    session: aiohttp.ClientSession

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(f"http://{self.host}:{self.port}{path}", **kwargs)


@pytest.fixture(params=["test-server", "production"])
async def served(
    request: pytest.FixtureRequest,
    make_config: Callable[..., Config],
    mcp_server: McpServer,
    make_proxy: ProxyFactory,
) -> AsyncIterator[Served]:
    tools = {"mcp": {"upstream": mcp_server.url, "kind": "mcp", "timeout_s": 10}}
    if request.param == "test-server":
        client = await make_proxy(tools)
        yield Served(str(client.server.host), int(client.server.port or 0), client.session)
        return
    async with aiohttp.ClientSession() as session:
        async with running_proxy(make_config(tools), session) as running:
            yield Served(running.host, running.port, session)


def raw_call(proxy: Served, request_id: int, params: dict[str, Any], name: str) -> bytes:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
    ).encode()
    head = (
        f"POST /tools/mcp HTTP/1.1\r\nHost: {proxy.host}:{proxy.port}\r\n"
        f"Accept: {ACCEPT}\r\nContent-Type: application/json\r\n"
        f"MCP-Protocol-Version: {MODERN}\r\nMcp-Method: tools/call\r\nMcp-Name: {name}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def reissue(proxy: Served, params: dict[str, Any], name: str) -> tuple[int, Any]:
    """The client's re-issue under new ids; 409 while the first attempt is still held."""
    for attempt in range(100):
        status, answer = await post(
            proxy, "tools/call", params, request_id=100 + attempt, name=name
        )
        if status != 409 or answer["error"]["data"]["code"] != "idempotency_key_in_use":
            return status, answer
        await asyncio.sleep(0.05)
    raise AssertionError("the first attempt never settled")


async def test_an_answer_in_hand_when_the_stream_breaks_is_replayed_to_the_reissued_call(
    served: Served, mcp_server: McpServer
) -> None:
    """The tool answered, Handrail has the answer, the agent's connection breaks before it
    read it: the client re-issues the call (new id, same turn's trace) and gets the answer
    the tool gave, which ran once."""
    arguments = {"to": "a@example.com", "body": "once"}
    params = call_params("send_email", arguments, traceparent=traceparent(1))
    _, writer = await asyncio.open_connection(served.host, served.port)
    writer.write(raw_call(served, 1, params, "send_email"))
    await writer.drain()
    await wait_for(lambda: mcp_server.executions["send_email"] == 1)
    await asyncio.sleep(0.3)  # the answer is on its way into the agent's socket, unread
    writer.transport.abort()  # the stream breaks (RST) before the agent read a byte
    again = call_params("send_email", arguments, traceparent=traceparent(2))
    status, answer = await reissue(served, again, "send_email")
    assert status == 200, answer
    assert answer["result"]["content"][0]["text"] == "sent #1 to a@example.com"
    assert mcp_server.executions["send_email"] == 1


async def test_closing_the_stream_cancels_the_call_and_a_reissue_does_not_run_it_again(
    served: Served, mcp_server: McpServer
) -> None:
    """2026-07-28: a client cancels by closing its stream. Handrail closes its own request,
    so the server stops the tool as it would direct; whether the tool did its work before
    the cancel is unknown, so the re-issued call gets 409 ``outcome_unknown``."""
    params = call_params("count_slowly", {"n": 200}, traceparent=traceparent(1), progressToken=1)
    reader, writer = await asyncio.open_connection(served.host, served.port)
    writer.write(raw_call(served, 1, params, "count_slowly"))
    await writer.drain()
    assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")  # the stream has begun
    writer.transport.abort()
    again = call_params("count_slowly", {"n": 200}, traceparent=traceparent(2), progressToken=2)
    status, answer = await reissue(served, again, "count_slowly")
    assert status == 409, answer
    assert answer["error"]["data"]["code"] == "outcome_unknown"
    assert answer["error"]["data"]["reason"] == "cancelled"
    assert mcp_server.executions["count_slowly"] == 1


async def test_the_sdk_client_reissuing_a_call_in_the_same_agent_turn_is_replayed(
    proxy: TestClient,
    mcp_server: McpServer,
    spans: InMemorySpanExporter,
) -> None:
    """The SDK puts the agent's trace context in ``params._meta``: a second attempt inside
    the same agent span (a retry) is recognised; a call in a new turn is a new call."""
    agent = TracerProvider().get_tracer("agent")
    arguments = {"to": "a@example.com", "body": "hello"}
    async with Client(endpoint(proxy), mode=MODERN) as client:
        with agent.start_as_current_span("turn 1"):
            first = await client.call_tool("send_email", arguments)
            again = await client.call_tool("send_email", arguments)
        with agent.start_as_current_span("turn 2"):
            later = await client.call_tool("send_email", arguments)
    assert first.content[0].text == again.content[0].text  # type: ignore[union-attr]
    assert later.content[0].text != first.content[0].text  # type: ignore[union-attr]
    assert mcp_server.executions["send_email"] == 2


async def test_a_new_meta_key_repeats_a_call_deliberately(
    proxy: TestClient,
    mcp_server: McpServer,
) -> None:
    arguments = {"to": "a@example.com", "body": "toggle"}
    answers = []
    for request_id, key in enumerate(["toggle-1", "toggle-1", "toggle-2"]):
        params = call_params(
            "send_email",
            arguments,
            traceparent=traceparent(1),
            **{"io.handrail/idempotencyKey": key},
        )
        _, answer = await post(
            proxy, "tools/call", params, request_id=request_id, name="send_email"
        )
        answers.append(answer["result"]["content"][0]["text"])
    assert answers[0] == answers[1] != answers[2]
    assert mcp_server.executions["send_email"] == 2


async def test_a_meta_key_that_disagrees_with_the_header_is_refused(
    proxy: TestClient,
    mcp_server: McpServer,
) -> None:
    params = call_params(
        "send_email", {"to": "a@example.com", "body": "b"}, **{"io.handrail/idempotencyKey": "a"}
    )
    status, answer = await post(
        proxy, "tools/call", params, name="send_email", headers={"Idempotency-Key": "b"}
    )
    assert status == 400 and answer["error"]["code"] == -32602
    assert mcp_server.executions["send_email"] == 0


async def test_a_derived_key_stops_replaying_after_its_window(
    make_proxy: ProxyFactory,
    mcp_server: McpServer,
) -> None:
    proxy = await make_proxy(
        {
            "mcp": {
                "upstream": mcp_server.url,
                "kind": "mcp",
                "idempotency": {"derived_ttl_s": 0.5},
            }
        }
    )
    params = call_params(
        "send_email", {"to": "a@example.com", "body": "b"}, **{"traceparent": traceparent(1)}
    )
    texts = []
    for request_id in range(2):
        _, answer = await post(
            proxy, "tools/call", params, request_id=request_id, name="send_email"
        )
        texts.append(answer["result"]["content"][0]["text"])
    await asyncio.sleep(0.7)
    _, answer = await post(proxy, "tools/call", params, request_id=9, name="send_email")
    assert texts[0] == texts[1] != answer["result"]["content"][0]["text"]
    assert mcp_server.executions["send_email"] == 2


# -- multi round-trip requests ---------------------------------------------------------


async def test_an_input_required_round_is_interim_and_its_retry_is_the_same_call(
    proxy: TestClient,
    mcp_server: McpServer,
    spans: InMemorySpanExporter,
) -> None:
    """Round one's ``input_required`` is passed on, never stored as the answer; round two
    (``inputResponses`` + ``requestState``, no trace context) keeps round one's run and
    key, runs the tool's action once, and a re-sent round two is replayed."""
    status, first = await post(
        proxy, "tools/call", call_params("transfer", {"amount": 5}), name="transfer"
    )
    assert status == 200
    assert first["result"]["resultType"] == "input_required"
    state = first["result"]["requestState"]
    answer = {"confirm": {"action": "accept", "content": {"confirm": True}}}
    second_params = {**call_params("transfer", {"amount": 5}), "inputResponses": answer}
    second_params["requestState"] = state
    _, second = await post(proxy, "tools/call", second_params, request_id=2, name="transfer")
    _, third = await post(proxy, "tools/call", second_params, request_id=3, name="transfer")
    assert second["result"]["content"][0]["text"] == "transfer #1 of 5 done"
    assert third["result"]["content"][0]["text"] == "transfer #1 of 5 done"
    assert third["id"] == 3
    assert mcp_server.executions["transfer.asked"] == 1
    assert mcp_server.executions["transfer"] == 1
    calls = [s for s in spans.get_finished_spans() if s.name == "execute_tool mcp.transfer"]
    runs = {s.attributes["handrail.run.id"] for s in calls}  # type: ignore[index]
    keys = {s.attributes["handrail.idempotency.key"] for s in calls}  # type: ignore[index]
    assert len(calls) == 3 and len(runs) == 1 and len(keys) == 1


async def test_the_sdk_client_drives_an_input_required_call_through_the_proxy(
    proxy: TestClient,
    mcp_server: McpServer,
) -> None:
    asked: list[str] = []

    async def confirm(context: Any, params: Any) -> Any:
        from mcp_types import ElicitResult

        asked.append(params.message)
        return ElicitResult(action="accept", content={"confirm": True})

    async with Client(endpoint(proxy), mode=MODERN, elicitation_callback=confirm) as client:
        result = await client.call_tool("transfer", {"amount": 7})
    assert not result.is_error
    assert result.content[0].text == "transfer #1 of 7 done"  # type: ignore[union-attr]
    assert asked == ["Transfer 7?"]
    assert mcp_server.executions["transfer"] == 1


# -- spans -----------------------------------------------------------------------------


async def test_spans_name_the_method_and_the_revision(
    proxy: TestClient,
    spans: InMemorySpanExporter,
) -> None:
    await post(proxy, "tools/call", call_params("echo", {"text": "x"}), name="echo")
    await post(proxy, "tools/list", {"_meta": envelope()})
    for name in ("execute_tool mcp.echo", "tools/list mcp"):
        await wait_for(lambda n=name: any(s.name == n for s in spans.get_finished_spans()))
    by_name = {s.name: s for s in spans.get_finished_spans()}
    call = by_name["execute_tool mcp.echo"].attributes or {}
    listing = by_name["tools/list mcp"].attributes or {}
    assert call["mcp.method.name"] == "tools/call"
    assert call["mcp.protocol.version"] == MODERN
    assert listing["mcp.method.name"] == "tools/list"
    assert listing["mcp.protocol.version"] == MODERN


async def test_trace_context_in_meta_parents_the_call(
    proxy: TestClient,
    spans: InMemorySpanExporter,
) -> None:
    params = call_params("echo", {"text": "x"}, traceparent=traceparent(0xAB))
    await post(proxy, "tools/call", params, name="echo")
    await wait_for(
        lambda: any(s.name == "execute_tool mcp.echo" for s in spans.get_finished_spans())
    )
    (call,) = [s for s in spans.get_finished_spans() if s.name == "execute_tool mcp.echo"]
    assert format(call.context.trace_id, "032x") == TRACE
    assert call.parent is not None and call.parent.span_id == 0xAB
    assert (
        trace.format_trace_id(call.context.trace_id) == (call.attributes or {})["handrail.run.id"]
    )


# -- the handshake revisions: the session's GET stream -----------------------------------


def stream_first_server(opened: asyncio.Event, seen: list[bool]) -> web.Application:
    """A server slow to accept a session's GET stream, which notes whether that stream was
    open when a tools/call arrived (a server request sent on it would otherwise be lost)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        opened.set()
        await asyncio.sleep(5)
        return response

    async def call(request: web.Request) -> web.Response:
        message = await request.json()
        if message.get("method") == "tools/list":
            result: dict[str, Any] = {"tools": [{"name": "ask", "inputSchema": {"type": "object"}}]}
        else:
            seen.append(opened.is_set())
            result = {"content": [{"type": "text", "text": "asked"}]}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    app = web.Application()
    app.router.add_get("/mcp", stream)
    app.router.add_post("/mcp", call)
    return app


async def test_a_post_waits_for_the_session_stream_the_agent_opened_first(
    make_proxy: ProxyFactory, aiohttp_server: Callable[..., Any]
) -> None:
    opened, seen = asyncio.Event(), []
    server: TestServer = await aiohttp_server(stream_first_server(opened, seen))
    proxy = await make_proxy({"mcp": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"}})
    session = {"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": HANDSHAKE}
    get = asyncio.ensure_future(
        proxy.get("/tools/mcp", headers={**session, "Accept": "text/event-stream"})
    )
    await asyncio.sleep(0.05)  # the GET has reached Handrail; the server has not taken it
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    body["params"] = {"name": "ask", "arguments": {}}
    headers = {**session, "Accept": ACCEPT, "Content-Type": "application/json"}
    async with proxy.post("/tools/mcp", json=body, headers=headers) as response:
        assert response.status == 200
    assert seen == [True]
    (await get).close()


async def test_an_answer_kept_under_a_handshake_revision_replays_valid_for_2026(
    proxy: TestClient, mcp_server: McpServer
) -> None:
    """One key, two revisions: the 2025-11-25 answer (no ``resultType``) is replayed to the
    2026-07-28 retry with the field that revision requires."""
    headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
    hello = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }
    async with proxy.post("/tools/mcp", json=hello, headers=headers) as response:
        session = response.headers["Mcp-Session-Id"]
    legacy = {**headers, "Mcp-Session-Id": session, "MCP-Protocol-Version": HANDSHAKE}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with proxy.post("/tools/mcp", json=initialized, headers=legacy) as response:
        assert response.status == 202
    arguments = {"to": "a@example.com", "body": "once"}
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    call["params"] = {"name": "send_email", "arguments": arguments}
    keyed = {**legacy, "Idempotency-Key": "k-both-eras"}
    async with proxy.post("/tools/mcp", json=call, headers=keyed) as response:
        raw = await response.read()
    parser = SseParser()
    first = [event_message(e) for e in parser.feed(raw) + parser.close()] or [json.loads(raw)]
    assert "resultType" not in first[-1]["result"]
    params = call_params("send_email", arguments)
    _, again = await post(
        proxy,
        "tools/call",
        params,
        request_id=2,
        name="send_email",
        headers={"Idempotency-Key": "k-both-eras"},
    )
    assert again["result"]["resultType"] == "complete"
    methods.validate_server_result("tools/call", MODERN, again["result"])
    assert mcp_server.executions["send_email"] == 1


@pytest.mark.parametrize("served", ["production"], indirect=True)  # no handler cancellation
async def test_an_event_stream_the_agent_left_frees_its_place_at_once(
    served: Served, mcp_server: McpServer
) -> None:
    """A GET stream whose agent has gone is closed upstream within a moment, so the agent's
    next stream is neither refused by the server (one per session) nor by Handrail's
    ``max_streams_per_agent``."""
    hello = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }
    headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
    async with served.post("/tools/mcp", json=hello, headers=headers) as response:
        session = response.headers["Mcp-Session-Id"]
    head = (
        f"GET /tools/mcp HTTP/1.1\r\nHost: {served.host}:{served.port}\r\n"
        f"Accept: text/event-stream\r\nMcp-Session-Id: {session}\r\n"
        f"MCP-Protocol-Version: {HANDSHAKE}\r\n\r\n"
    ).encode()
    for _ in range(9):  # more than max_streams_per_agent (8)
        reader, writer = await asyncio.open_connection(served.host, served.port)
        writer.write(head)
        status = await reader.readuntil(b"\r\n")
        assert b" 200 " in status, status
        writer.transport.abort()
        await asyncio.sleep(0.6)
