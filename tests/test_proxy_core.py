"""The HTTP data plane: forwarding, header hygiene, path safety and the proxy's own errors."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from tests.conftest import ProxyFactory, free_port

TRACERESPONSE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def crm(server, **extra):  # type: ignore[no-untyped-def]
    return {
        "crm": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "off"}, **extra}
    }


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "HEAD", "OPTIONS"])
async def test_methods_reach_the_tool_with_path_and_query(
    tool, make_proxy: ProxyFactory, method: str
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.request(
        method,
        "/tools/crm/contacts/42?x=1&y=a%20b",
        data=b'{"a": 1}' if method in ("POST", "PUT", "PATCH") else None,
    )
    assert resp.status == 200
    assert seen.requests[-1]["method"] == method
    assert seen.requests[-1]["path"] == "/api/contacts/42"
    assert seen.requests[-1]["query"] == "x=1&y=a%20b"


async def test_request_body_reaches_the_tool_unchanged(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    payload = json.dumps({"name": "Ada", "tags": ["x"] * 100})
    resp = await proxy.post(
        "/tools/crm/contacts", data=payload, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert seen.requests[-1]["body"] == payload


async def test_tool_status_codes_pass_through(tool, make_proxy: ProxyFactory) -> None:
    server, _ = tool
    proxy = await make_proxy(crm(server))
    for status in (201, 204, 404, 418, 500, 503):
        resp = await proxy.get(f"/tools/crm/x?status={status}")
        assert resp.status == status


async def test_large_response_streams_through_whole(tool, make_proxy: ProxyFactory) -> None:
    server, _ = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.get("/tools/crm/big?stream=64&size=65536")
    assert resp.status == 200
    body = await resp.read()
    assert len(body) == 64 * 65536
    assert body[:1] == b"A" and body[-1:] == bytes([65 + 63 % 26])


async def test_first_bytes_arrive_before_the_tool_finishes(tool, make_proxy: ProxyFactory) -> None:
    server, _ = tool
    proxy = await make_proxy(crm(server))
    started = time.monotonic()
    resp = await proxy.get("/tools/crm/slow?stream=5&size=10&gap=0.3")
    first = await resp.content.readany()
    first_at = time.monotonic() - started
    rest = await resp.read()
    assert first and first_at < 0.9, f"first chunk only after {first_at:.2f}s: buffered"
    assert len(first) + len(rest) == 50


async def test_configured_headers_replace_the_agents(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server, headers={"Authorization": "Bearer tool-secret"}))
    resp = await proxy.get("/tools/crm/me", headers={"Authorization": "Bearer agent-guess"})
    body = await resp.json()
    assert seen.requests[-1]["headers"]["Authorization"] == "Bearer tool-secret"
    assert "tool-secret" not in json.dumps(dict(resp.headers))
    # The tool echoes what it got; its credential is scrubbed from what the agent sees.
    assert body["got"]["headers"]["Authorization"] == "[REDACTED]"


async def test_hop_by_hop_headers_are_dropped_both_ways(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.get(
        "/tools/crm/x",
        headers={
            "Connection": "keep-alive, X-Agent-Hop",
            "X-Agent-Hop": "1",
            "Proxy-Authorization": "p",
            "TE": "trailers",
            "X-Kept": "yes",
        },
    )
    sent = seen.requests[-1]["headers"]
    assert "X-Agent-Hop" not in sent and "Proxy-Authorization" not in sent and "TE" not in sent
    assert sent["X-Kept"] == "yes"
    assert resp.headers["X-Tool"] == "fake"
    assert "X-Secret-Hop" not in resp.headers


async def test_every_response_carries_traceresponse(tool, make_proxy: ProxyFactory) -> None:
    server, _ = tool
    proxy = await make_proxy(crm(server))
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    ok = await proxy.get(
        "/tools/crm/x", headers={"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01"}
    )
    missing = await proxy.get("/tools/nope/x")
    elsewhere = await proxy.get("/not-a-tool")
    for resp in (ok, missing, elsewhere):
        assert TRACERESPONSE.match(resp.headers["traceresponse"])
    assert ok.headers["traceresponse"].split("-")[1] == parent_trace


async def test_agents_trace_continues_upstream(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    await proxy.get(
        "/tools/crm/x",
        headers={"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01", "baggage": "run.id=r-9"},
    )
    sent = seen.requests[-1]["headers"]
    assert sent["traceparent"].split("-")[1] == parent_trace
    assert (
        sent["traceparent"].split("-")[2] != "00f067aa0ba902b7"
    )  # our upstream span is the parent
    assert sent["baggage"] == "run.id=r-9"


async def test_unknown_tool_is_404_with_error_body(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.post("/tools/billing/charge", json={})
    assert resp.status == 404
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["code"] == "unknown_tool"
    assert "billing" in error["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", error["trace_id"])
    assert error["trace_id"] == resp.headers["traceresponse"].split("-")[1]
    assert seen.count() == 0


async def test_body_over_limit_is_413_and_never_reaches_the_tool(
    tool, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server, max_body_bytes=100))
    resp = await proxy.post("/tools/crm/notes", data=b"x" * 101)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(5):
            yield b"y" * 40

    resp = await proxy.post("/tools/crm/notes", data=chunks())  # chunked: no Content-Length
    assert resp.status == 413
    assert seen.count() == 0


async def test_refused_connection_is_502_upstream_unavailable(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        {"crm": {"upstream": f"http://127.0.0.1:{free_port()}", "idempotency": {"mode": "off"}}}
    )
    resp = await proxy.get("/tools/crm/x")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"


async def test_slow_tool_is_504_upstream_timeout(tool, make_proxy: ProxyFactory) -> None:
    server, _ = tool
    proxy = await make_proxy(crm(server, timeout_s=0.2))
    started = time.monotonic()
    resp = await proxy.get("/tools/crm/x?sleep=2")
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 1.5


async def test_bad_header_is_400_bad_request(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.get("/tools/crm/x", headers={"X-Run-Id": "r" * 300})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "bad_request" and "X-Run-Id" in error["message"]
    assert seen.count() == 0


@pytest.mark.parametrize(
    "path",
    [
        "/tools/crm/../admin",
        "/tools/crm/a/../../etc/passwd",
        "/tools/crm/%2e%2e/x",
        "/tools/crm/a%2Fb",
        "/tools/crm/a%5cb",
        "/tools/crm//evil.example/x",
        "/tools/crm/./x",
    ],
)
async def test_path_cannot_escape_the_tools_base_url(
    tool, make_proxy: ProxyFactory, path: str
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    status, head = await raw_request(proxy, f"GET {path} HTTP/1.1")
    assert status in (400, 404), head
    assert "application/json" in head
    assert seen.count() == 0


async def raw_request(proxy, request_line: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Send a request line exactly as given: HTTP clients would normalise these paths."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(f"{request_line}\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head = data.decode(errors="replace").split("\r\n\r\n", 1)[0]
    return int(head.split(" ", 2)[1]), head


async def test_at_sign_in_path_stays_on_the_tools_host(tool, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.get("/tools/crm/@evil.example/x")
    assert resp.status == 200
    assert seen.requests[-1]["path"] == "/api/@evil.example/x"
    assert seen.requests[-1]["host"] == f"{server.host}:{server.port}"


async def test_policy_deny_is_403_and_never_reaches_the_tool(
    tool, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.post("/tools/crm/contacts", json={"a": 1}, headers={"X-Agent-Id": "blocked"})
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "policy_denied"
    assert error["reasons"] == ["agent is blocked"]
    assert "decision_id" in error
    assert seen.count() == 0


async def test_in_flight_call_finishes_during_graceful_shutdown(tool, make_config) -> None:  # type: ignore[no-untyped-def]
    from aiohttp import ClientSession

    from proxy.server import Server

    server, _ = tool
    config = make_config(crm(server), listen={"port": 0}, admin={"port": 0})
    proxy = Server(config, grace_s=5)
    where = await proxy.start()
    async with ClientSession() as session:
        pending = asyncio.ensure_future(session.get(f"{where.data_url}/tools/crm/x?sleep=0.5"))
        await asyncio.sleep(0.2)
        await proxy.stop()
        resp = await pending
        assert resp.status == 200
        assert (await resp.json())["got"]["path"] == "/api/x"


async def test_admin_plane_health_ready_metrics(tool, make_proxy: ProxyFactory, make_admin) -> None:  # type: ignore[no-untyped-def]
    server, _ = tool
    proxy = await make_proxy(crm(server))
    await proxy.get("/tools/crm/x")
    await proxy.post("/tools/crm/x", json={}, headers={"X-Agent-Id": "blocked"})
    admin = await make_admin(proxy)
    assert (await admin.get("/healthz")).status == 200
    ready = await admin.get("/readyz")
    assert ready.status == 200, await ready.text()
    metrics = await (await admin.get("/metrics")).text()
    assert 'handrail_calls_total{decision="allow",status="200",tool="crm"} 1.0' in metrics
    assert 'handrail_calls_total{decision="deny",status="403",tool="crm"} 1.0' in metrics
    assert "handrail_call_duration_seconds_bucket" in metrics


async def test_admin_token_is_required_when_configured(tool, aiohttp_client, make_config) -> None:  # type: ignore[no-untyped-def]
    from proxy.http.app import build_admin_app, build_app

    server, _ = tool
    app = build_app(make_config(crm(server), admin={"token": "s3cret"}))
    proxy = await aiohttp_client(app)
    admin = await aiohttp_client(build_admin_app(proxy.server.app))
    assert (await admin.get("/metrics")).status == 401
    assert (await admin.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await admin.get("/metrics", headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await admin.get("/healthz")).status == 200


async def test_agents_own_key_passes_through_when_the_tool_is_not_keyed(
    tool, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))  # idempotency: off
    await proxy.post("/tools/crm/x", json={}, headers={"Idempotency-Key": "agent-key-1"})
    assert seen.requests[-1]["headers"]["Idempotency-Key"] == "agent-key-1"


async def test_malformed_json_body_is_400_and_never_reaches_the_tool(
    tool, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    resp = await proxy.post(
        "/tools/crm/x",
        data=b'{"note": "sk-live-123",',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "bad_request" and "not valid JSON" in error["message"]
    assert seen.count() == 0
