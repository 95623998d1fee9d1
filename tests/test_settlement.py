"""How a keyed call's record is settled from what the proxy knows (pure), and the MCP case
where the missing response arrives later on the session's resumed GET stream."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.call import Call, Outcome, UnknownReason
from proxy.config import ToolConfig
from proxy.idempotency import settlement
from proxy.mcp import jsonrpc
from proxy.mcp.inflight import settle_on_response
from proxy.mcp.relay import NoReply
from tests.conftest import ProxyFactory


def _call(**fields: Any) -> Call:
    tool = ToolConfig.model_validate(
        {"upstream": "http://127.0.0.1:9", "idempotency": fields.pop("idempotency", {})}
    )
    call = Call(
        tool_name="crm",
        tool=tool,
        method="POST",
        path="/x",
        query=[],
        query_string="",
        headers=[],
        body=b"",
        agent_id="a",
        run_id="r",
        trace_id="t" * 32,
        span_id="s" * 16,
        reply=NoReply(),
    )
    for name, value in fields.items():
        setattr(call, name, value)
    return call


@pytest.mark.parametrize(
    ("fields", "action", "reason"),
    [
        ({"outcome": Outcome.ANSWERED, "status": 201}, "complete", None),
        ({"outcome": Outcome.ANSWERED, "status": 404}, "complete", None),
        ({"outcome": Outcome.ANSWERED, "status": 503}, "release", None),
        (
            {"outcome": Outcome.ANSWERED, "status": 503, "idempotency": {"release_on_5xx": False}},
            "complete",
            None,
        ),
        ({"outcome": Outcome.ANSWERED, "status": 200, "server_error": True}, "release", None),
        ({"outcome": Outcome.NOT_RUN}, "release", None),
        ({"outcome": Outcome.INTERIM, "status": 200}, "release", None),
        (
            {"outcome": Outcome.UNKNOWN, "unknown_reason": UnknownReason.TIMEOUT, "sent": True},
            "unknown",
            UnknownReason.TIMEOUT,
        ),
        (
            {
                "outcome": Outcome.UNKNOWN,
                "unknown_reason": UnknownReason.ANSWER_BROKEN,
                "status": 200,
            },
            "unknown",
            UnknownReason.ANSWER_BROKEN,
        ),
        (
            {
                "outcome": Outcome.UNKNOWN,
                "unknown_reason": UnknownReason.ANSWER_BROKEN,
                "status": 502,
            },
            "release",
            None,
        ),
        ({"sent": True}, "unknown", UnknownReason.INTERRUPTED),
        ({"sent": False}, "release", None),
    ],
)
def test_a_keyed_call_is_settled_by_what_the_proxy_knows(
    fields: dict[str, Any], action: str, reason: UnknownReason | None
) -> None:
    settle = settlement(_call(**fields))
    assert settle.action == action
    assert settle.reason == reason


def test_an_answer_over_the_store_limit_is_kept_as_not_replayable() -> None:
    call = _call(
        outcome=Outcome.ANSWERED,
        status=200,
        body_overflow=True,
        idempotency={"max_stored_bytes": 4},
    )
    settle = settlement(call)
    assert settle.action == "complete"
    assert settle.response is not None and not settle.response.complete


@pytest.mark.parametrize(
    ("message", "outcome", "server_error"),
    [
        ({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, Outcome.ANSWERED, False),
        (
            {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}},
            Outcome.ANSWERED,
            False,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "error": {"code": jsonrpc.INVALID_PARAMS, "message": "x"}},
            Outcome.NOT_RUN,
            False,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "error": {"code": jsonrpc.METHOD_NOT_FOUND, "message": ""}},
            Outcome.NOT_RUN,
            False,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "error": {"code": jsonrpc.INTERNAL_ERROR, "message": ""}},
            Outcome.ANSWERED,
            True,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required"}},
            Outcome.INTERIM,
            False,
        ),
    ],
)
def test_an_mcp_response_says_whether_the_tool_ran(
    message: dict[str, Any], outcome: Outcome, server_error: bool
) -> None:
    call = _call()
    settle_on_response(call, message)
    assert call.outcome is outcome
    assert call.server_error is server_error


@pytest.mark.parametrize(
    ("message", "cancelled"),
    [
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": -32800, "message": "cancelled"}}, False),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": -32800, "message": "cancelled"}}, True),
        (
            {"jsonrpc": "2.0", "id": 1, "error": {"code": jsonrpc.INTERNAL_ERROR, "message": ""}},
            True,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "error": {"code": jsonrpc.INVALID_PARAMS, "message": ""}},
            True,
        ),
    ],
)
def test_an_error_after_a_cancel_leaves_the_outcome_unknown(
    message: dict[str, Any], cancelled: bool
) -> None:
    call = _call()
    settle_on_response(call, message, cancelled=cancelled)
    assert call.outcome is Outcome.UNKNOWN
    assert call.unknown_reason is UnknownReason.CANCELLED


def test_a_result_after_a_cancel_is_the_answer() -> None:
    call = _call()
    message = {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}
    settle_on_response(call, message, cancelled=True)
    assert call.outcome is Outcome.ANSWERED


# A response delivered on the resumed GET stream settles the key


def resumable_server(executions: list[str]) -> web.Application:
    """A 2025-11-25 server whose tools/call stream closes before the response, which it then
    delivers on the session's GET stream (``Last-Event-ID``), as SSE resumption does."""
    pending: dict[str, Any] = {}

    async def post(request: web.Request) -> web.StreamResponse:
        message = await request.json()
        if message.get("method") != "tools/call":
            return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": {}})
        executions.append(message["params"]["name"])
        pending["answer"] = {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {"content": [{"type": "text", "text": "done"}], "isError": False},
        }
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: 1\nretry: 10\ndata: \n\n")  # priming event, then close
        await response.write_eof()
        return response

    async def get(request: web.Request) -> web.StreamResponse:
        assert request.headers.get("Last-Event-ID") == "1"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        data = json.dumps(pending["answer"])
        await response.write(f"id: 2\nevent: message\ndata: {data}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get)
    return app


async def test_a_response_on_the_resumed_stream_is_replayed_to_the_retry(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_proxy: ProxyFactory
) -> None:
    executions: list[str] = []
    server = await aiohttp_server(resumable_server(executions))
    proxy = await make_proxy({"mcp": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"}})
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Mcp-Session-Id": "s-1",
        "MCP-Protocol-Version": "2025-11-25",
        "X-Run-Id": "r-resume",
    }
    catalog = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    await proxy.post("/tools/mcp", json=catalog, headers=headers)
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "publish", "arguments": {"post": 1}},
    }
    first = await proxy.post("/tools/mcp", data=json.dumps(call), headers=headers)
    assert first.status == 200
    assert b'"result"' not in await first.read()  # the stream closed before the response

    resumed = await proxy.get(
        "/tools/mcp", headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": "1"}
    )
    assert b'"done"' in await resumed.read()

    retry = {**call, "id": 8}
    for _ in range(50):  # the settle runs in the background, right after the event
        again = await proxy.post("/tools/mcp", data=json.dumps(retry), headers=headers)
        body = await again.read()
        if again.headers.get("Idempotent-Replayed") == "true":
            break
    assert again.headers.get("Idempotent-Replayed") == "true"
    answer = json.loads(body)
    assert answer["id"] == 8
    assert answer["result"]["content"][0]["text"] == "done"
    assert executions == ["publish"]
