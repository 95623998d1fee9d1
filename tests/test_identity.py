"""Who the agent is: ``listen.agent_id`` binds a sidecar's one agent, so a header cannot
claim another's rights (or budget)."""

from __future__ import annotations

from typing import Any

from tests.conftest import ProxyFactory, Seen


async def test_a_bound_agent_cannot_be_claimed_by_a_header(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    tools = {"crm": {"upstream": str(server.make_url(""))}}
    free = await make_proxy(tools)
    bound = await make_proxy(tools, listen={"agent_id": "blocked"})

    claimed = await free.get("/tools/crm/contacts", headers={"X-Agent-Id": "blocked"})
    assert claimed.status == 403  # the test policy refuses the agent named "blocked"
    pretended = await bound.get("/tools/crm/contacts", headers={"X-Agent-Id": "sales-bot"})
    assert pretended.status == 403  # bound: the header is ignored
    assert (await pretended.json())["error"]["reasons"] == ["agent is blocked"]
    assert seen.count() == 0
