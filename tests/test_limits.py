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
