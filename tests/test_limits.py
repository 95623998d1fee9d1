"""Bounded resources (#22, class 11): one tool's load cannot starve another's."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import ProxyFactory, Seen

STREAM = "?stream=40&size=16&gap=0.2"  # an event stream that stays open for ~8 s


async def test_open_event_streams_of_one_tool_do_not_starve_another(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    base = str(server.make_url(""))
    proxy = await make_proxy(
        {
            "events": {"upstream": base, "kind": "mcp", "max_connections": 2, "timeout_s": 1.0},
            "crm": {"upstream": base, "max_connections": 2},
        }
    )
    streams = [await proxy.get(f"/tools/events/s{i}{STREAM}") for i in range(2)]
    assert [s.status for s in streams] == [200, 200]  # both connections now held open

    other = await proxy.get("/tools/crm/contacts")
    assert other.status == 200  # another tool's pool is its own

    starved = await proxy.get(f"/tools/events/s3{STREAM}")
    assert starved.status == 504  # no connection within timeout_s: refused, not queued forever
    assert (await starved.json())["error"]["code"] == "upstream_timeout"
    assert seen.count("/s3") == 0
    for each in streams:
        each.close()
    await asyncio.sleep(0)


async def test_a_request_head_sent_too_slowly_is_cut_off(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url(""))}}, listen={"read_timeout_s": 0.5}
    )
    held = []
    for _ in range(20):  # slowloris: heads that never end
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(f"GET /tools/crm/x HTTP/1.1\r\nHost: {proxy.host}\r\nX-A: ".encode())
        held.append((reader, writer))
    await asyncio.sleep(1.5)
    for reader, writer in held:
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the proxy
        writer.close()
    assert (await proxy.get("/tools/crm/ok")).status == 200  # the proxy still serves
    assert seen.count("/x") == 0


async def test_a_body_sent_too_slowly_is_refused_and_never_reaches_the_tool(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url(""))}}, listen={"read_timeout_s": 0.5}
    )
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        f"POST /tools/crm/x HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Type: application/json"
        '\r\nContent-Length: 100\r\n\r\n{"a":'.encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.read(200), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in body
    assert seen.count() == 0


async def test_an_agent_may_hold_only_so_many_event_streams(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    server, _ = tool
    proxy = await make_proxy(
        {
            "events": {
                "upstream": str(server.make_url("")),
                "kind": "mcp",
                "max_streams_per_agent": 2,
            }
        }
    )
    mine = {"X-Agent-Id": "greedy"}
    held = [await proxy.get(f"/tools/events/s{i}{STREAM}", headers=mine) for i in range(2)]
    assert [h.status for h in held] == [200, 200]

    refused = await proxy.get(f"/tools/events/s3{STREAM}", headers=mine)
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "too_many_streams"
    other = await proxy.get(f"/tools/events/s4{STREAM}", headers={"X-Agent-Id": "polite"})
    assert other.status == 200

    held[0].close()
    await asyncio.sleep(0.3)  # the proxy notices the stream is gone
    again = await proxy.get(f"/tools/events/s5{STREAM}", headers=mine)
    assert again.status == 200
    for each in (held[1], other, again):
        each.close()
