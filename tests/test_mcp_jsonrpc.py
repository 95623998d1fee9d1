"""The pure JSON-RPC and SSE layer under the MCP proxy."""

from __future__ import annotations

import json

import pytest

from proxy.errors import IdempotencyKeyInUse, PolicyDenied
from proxy.mcp.jsonrpc import (
    INVALID_REQUEST,
    PARSE_ERROR,
    JsonRpcError,
    MessageKind,
    SseParser,
    batches_allowed,
    parse_body,
    raw_members,
    render_event,
    response_in,
    with_id,
)
from proxy.mcp.render import render_error


def test_request_notification_and_response_are_told_apart() -> None:
    body = parse_body(
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},'
        b'{"jsonrpc":"2.0","method":"notifications/initialized"},'
        b'{"jsonrpc":"2.0","id":"s-1","result":{}},'
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"x"}}]'
    )
    assert body.batch
    assert [m.kind for m in body.messages] == [
        MessageKind.REQUEST,
        MessageKind.NOTIFICATION,
        MessageKind.RESPONSE,
        MessageKind.ERROR,
    ]
    assert body.messages[0].id == 1 and body.messages[0].method == "tools/list"
    assert body.messages[2].id == "s-1"


def test_single_tools_call_exposes_its_params() -> None:
    body = parse_body(
        b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}'
    )
    assert not body.batch
    (message,) = body.messages
    assert message.params == {"name": "echo", "arguments": {"text": "hi"}}


@pytest.mark.parametrize(
    "data", [b"{not json", b"", b'{"jsonrpc":"2.0","id":1,"method":"x"', b"NaN"]
)
def test_invalid_json_is_a_parse_error(data: bytes) -> None:
    with pytest.raises(JsonRpcError) as info:
        parse_body(data)
    assert info.value.code == PARSE_ERROR
    assert info.value.payload()["id"] is None


@pytest.mark.parametrize(
    "obj",
    [
        [],
        "hello",
        {"id": 1, "method": "tools/list"},
        {"jsonrpc": "1.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": True, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": None, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1.5, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": [1, 2]},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "m"}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": "m"}},
        {"jsonrpc": "2.0", "result": {}},
        [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, 3],
    ],
)
def test_bad_shapes_are_invalid_requests(obj: object) -> None:
    with pytest.raises(JsonRpcError) as info:
        parse_body(json.dumps(obj).encode())
    assert info.value.code == INVALID_REQUEST


def test_invalid_request_keeps_a_usable_id() -> None:
    with pytest.raises(JsonRpcError) as info:
        parse_body(b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":"x"}')
    assert info.value.payload()["id"] == 9


def test_batches_only_before_2025_06_18() -> None:
    assert batches_allowed(None)
    assert batches_allowed("2025-03-26")
    assert not batches_allowed("2025-06-18")
    assert not batches_allowed("2025-11-25")


def test_with_id_keeps_the_result_bytes() -> None:
    original = b'{"jsonrpc": "2.0", "id": 3, "result": {"b": 1.50, "a": "\\u00e9t\xc3\xa9"}}'
    rewritten = with_id(original, "retry-1")
    assert json.loads(rewritten)["id"] == "retry-1"
    assert b'"result":{"b": 1.50, "a": "\\u00e9t\xc3\xa9"}' in rewritten


def test_raw_members_rejects_trailing_data() -> None:
    with pytest.raises(ValueError):
        raw_members('{"a": 1} x')


def test_sse_parser_handles_events_split_across_chunks() -> None:
    stream = (
        b"event: message\r\nid: e1\r\n"
        b'data: {"jsonrpc":"2.0","method":"notifications/progress"}\r\n\r\n'
        b": keepalive\n\n"
        b'data: {"jsonrpc":"2.0",\ndata: "id":1,"result":{}}\n\n'
    )
    parser = SseParser()
    events = []
    for i in range(len(stream)):
        events += parser.feed(stream[i : i + 1])
    events += parser.close()
    assert [e.has_data for e in events] == [True, False, True]
    assert events[0].id == "e1"
    assert json.loads(events[2].data) == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert b"".join(e.raw for e in events) == stream


def test_sse_parser_accepts_lone_carriage_returns() -> None:
    parser = SseParser()
    events = parser.feed(b"data: a\r\rdata: b\r")
    events += parser.close()
    assert [e.data for e in events] == ["a"]
    assert parser.pending == b"data: b\r"


def test_rendered_event_parses_back() -> None:
    block = render_event("line1\nline2", event_id="7")
    (event,) = SseParser().feed(block)
    assert (event.data, event.id, event.event) == ("line1\nline2", "7", "message")


def test_response_is_found_in_an_sse_body() -> None:
    body = render_event(
        '{"jsonrpc":"2.0","method":"notifications/progress","params":{}}'
    ) + render_event('{"jsonrpc":"2.0","id":4,"result":{"content":[]}}')
    assert (
        response_in(body, "text/event-stream", 4)
        == b'{"jsonrpc":"2.0","id":4,"result":{"content":[]}}'
    )
    assert response_in(body, "text/event-stream", 5) is None


def test_response_is_found_in_a_json_body() -> None:
    body = b'{"jsonrpc":"2.0","id":"a","result":{}}'
    assert response_in(body, "application/json", "a") == body


def test_policy_deny_renders_as_a_tool_error_result() -> None:
    denied = PolicyDenied("denied by policy", reasons=["too risky", "after hours"])
    status, message = render_error(denied, 7, "t" * 32)
    assert status == 200
    assert message["id"] == 7
    assert message["result"]["isError"] is True
    assert message["result"]["content"] == [
        {"type": "text", "text": "Denied by policy: too risky; after hours"}
    ]


def test_other_errors_render_as_json_rpc_errors_with_the_contract_body() -> None:
    status, message = render_error(IdempotencyKeyInUse("still in flight"), "a", "t" * 32)
    assert status == 409
    assert message["error"]["code"] == -32000
    assert message["error"]["data"] == {
        "code": "idempotency_key_in_use",
        "message": "still in flight",
        "trace_id": "t" * 32,
    }
