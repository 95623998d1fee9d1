"""Who the agent is: ``listen.agent_id`` binds a sidecar's one agent, so a header cannot
claim another's rights (or budget)."""

from __future__ import annotations

from typing import Any

import pytest

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


# Host and Origin, against DNS rebinding


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Host": "evil.example"}, 421, "misdirected_request"),
        ({"Host": "evil.example:8787"}, 421, "misdirected_request"),
        ({"Host": "127.0.0.1.evil.example"}, 421, "misdirected_request"),
        ({"Origin": "http://evil.example"}, 403, "origin_not_allowed"),
        ({"Origin": "http://127.0.0.1.nip.io:8787"}, 403, "origin_not_allowed"),
        ({"Origin": "null"}, 403, "origin_not_allowed"),
    ],
)
async def test_a_foreign_host_or_origin_never_reaches_the_tool(
    tool: tuple[Any, Seen],
    make_proxy: ProxyFactory,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    server, seen = tool
    proxy = await make_proxy({"crm": {"upstream": str(server.make_url(""))}})
    answer = await proxy.post("/tools/crm/contacts", json={}, headers=headers)
    assert answer.status == status
    assert (await answer.json())["error"]["code"] == code
    assert seen.count() == 0


@pytest.mark.parametrize(
    ("listen", "headers"),
    [
        ({}, {"Origin": "http://localhost:3000"}),
        ({}, {"Host": "localhost"}),
        ({"allowed_hosts": ["crm-agent.internal"]}, {"Host": "crm-agent.internal:8787"}),
        ({"allowed_hosts": ["*"]}, {"Host": "anything.example"}),
    ],
)
async def test_own_and_allowed_hosts_and_origins_pass(
    tool: tuple[Any, Seen],
    make_proxy: ProxyFactory,
    listen: dict[str, Any],
    headers: dict[str, str],
) -> None:
    server, seen = tool
    proxy = await make_proxy({"crm": {"upstream": str(server.make_url(""))}}, listen=listen)
    answer = await proxy.get("/tools/crm/contacts", headers=headers)
    assert answer.status == 200
    assert seen.count() == 1


BUDGET_POLICY = """package handrail

import rego.v1

default allow := false

allow if input.run.writes < 2

decision := {"allow": allow, "reasons": [r | not allow; r := "budget"], "require_approval": false}

visible := true
"""


async def test_one_agent_cannot_spend_another_agents_run_budget(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    server, seen = tool
    policies = tmp_path / "budget"
    policies.mkdir()
    (policies / "p.rego").write_text(BUDGET_POLICY)
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url("")), "idempotency": {"mode": "off"}}},
        policy={"path": str(policies), "watch": False},
    )

    async def write(agent: str, n: int) -> int:
        headers = {"X-Agent-Id": agent, "X-Run-Id": "shared-run"}
        return (await proxy.post("/tools/crm/x", json={"n": n}, headers=headers)).status

    assert [await write("mallory", n) for n in range(3)] == [200, 200, 403]
    assert [await write("alice", n) for n in range(3)] == [200, 200, 403]
    assert seen.count() == 4
