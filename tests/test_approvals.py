"""Human approval of held calls over plain HTTP (#17): the proxy, its admin API and store.

A policy holds every POST to ``/refunds``; the fake tool counts what reached it. Decisions
are made through the admin API as a person's tool would, while the agent's call waits or
after it was told ``approval_pending``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.approvals.model import BadToken, sign, verify
from tests.conftest import ProxyFactory, Seen
from tests.support_idempotency import pg_schema

HOLD_POLICY = """package handrail

import rego.v1

default allow := true

default visible := true

default hold := false

hold if {
	input.request.method == "POST"
	startswith(input.request.path, "/refunds")
}

reasons contains "refunds need a person" if hold

decision := {"allow": allow, "reasons": reasons, "require_approval": hold}
"""

REFUND = {"order": "o-17", "amount": 40}
AGENT = {"X-Agent-Id": "support-bot", "X-Run-Id": "run-1"}

AdminFactory = Callable[[TestClient], Awaitable[TestClient]]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(HOLD_POLICY)
    return directory


async def start(
    make_proxy: ProxyFactory,
    tool: tuple[TestServer, Seen],
    wait_s: float = 0.3,
    store: dict[str, Any] | None = None,
    **approvals: Any,
) -> TestClient:
    server, _ = tool
    sections: dict[str, Any] = {"approvals": {"wait_s": wait_s, **approvals}}
    if store is not None:
        sections["store"] = store
    return await make_proxy({"pay": {"upstream": str(server.make_url("/"))}}, **sections)


async def pending(admin: TestClient) -> list[dict[str, Any]]:
    async with admin.get("/approvals") as response:
        assert response.status == 200
        return list((await response.json())["approvals"])


async def first_pending(admin: TestClient) -> dict[str, Any]:
    for _ in range(200):
        found = await pending(admin)
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no approval request appeared")


async def decide(
    admin: TestClient, approval_id: str, approve: bool, reason: str | None = None
) -> dict[str, Any]:
    body = {"approve": approve, "reason": reason, "by": "alice"}
    async with admin.post(f"/approvals/{approval_id}", json=body) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def refund(proxy: TestClient, body: dict[str, Any] = REFUND, **headers: str) -> Any:
    return await proxy.post("/tools/pay/refunds", json=body, headers={**AGENT, **headers})


async def test_a_call_approved_while_it_waits_runs_once(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    proxy = await start(make_proxy, tool, wait_s=10)
    admin = await make_admin(proxy)
    call = asyncio.ensure_future(refund(proxy))
    held = await first_pending(admin)
    assert held["tool"] == "pay" and held["agent"] == "support-bot"
    assert held["reasons"] == ["refunds need a person"]
    assert held["input"]["path"] == "/refunds" and held["input"]["input"] == REFUND
    assert tool[1].count() == 0
    decided = await decide(admin, held["id"], True, "customer verified")
    assert decided["state"] == "approved" and decided["decided_by"] == "alice"
    response = await call
    assert response.status == 200
    assert tool[1].count() == 1
    after = (await (await admin.get(f"/approvals/{held['id']}")).json())["state"]
    assert after == "used"
    for _ in range(100):  # the journal's rows land in batches
        calls = (await (await admin.get("/calls?run=run-1")).json())["calls"]
        if calls:
            break
        await asyncio.sleep(0.02)
    assert [(c["decision"], c["status"], c["approval_id"]) for c in calls] == [
        ("approval", 200, held["id"])
    ]


async def test_approval_after_the_wait_lets_the_retry_run_once(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    proxy = await start(make_proxy, tool)
    admin = await make_admin(proxy)
    first = await refund(proxy)
    assert first.status == 403
    error = (await first.json())["error"]
    assert error["code"] == "approval_pending"
    assert error["approval_id"].startswith("apr_")
    assert f"/ui/approvals/{error['approval_id']}?t=" in error["approval_url"]
    again = await refund(proxy)  # still undecided: the same request, not a new one
    assert (await again.json())["error"]["approval_id"] == error["approval_id"]
    assert len(await pending(admin)) == 1
    await decide(admin, error["approval_id"], True)
    retried = await refund(proxy)
    assert retried.status == 200
    replayed = await refund(proxy)
    assert replayed.status == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    assert tool[1].count() == 1


async def test_a_rejection_is_a_deny_with_the_approvers_reason(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    proxy = await start(make_proxy, tool)
    admin = await make_admin(proxy)
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    await decide(admin, approval_id, False, "refund already issued by phone")
    response = await refund(proxy)
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "policy_denied"
    assert error["reasons"] == ["refund already issued by phone"]
    assert error["decided_by"] == "alice"
    assert tool[1].count() == 0
    async with admin.post(f"/approvals/{approval_id}", json={"approve": True}) as late:
        assert late.status == 409  # decided once
        assert (await late.json())["error"]["code"] == "already_decided"


async def test_an_expired_approval_lets_nothing_through(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    proxy = await start(make_proxy, tool, ttl_s=0.4)
    admin = await make_admin(proxy)
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    await decide(admin, approval_id, True)
    await asyncio.sleep(0.5)
    response = await refund(proxy)
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "approval_pending" and error["approval_id"] != approval_id
    shown = await (await admin.get(f"/approvals/{approval_id}")).json()
    assert shown["state"] == "expired"
    assert tool[1].count() == 0


async def test_a_changed_payload_needs_its_own_approval(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    proxy = await start(make_proxy, tool)
    admin = await make_admin(proxy)
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    await decide(admin, approval_id, True)
    bigger = await refund(proxy, {**REFUND, "amount": 4000})
    assert bigger.status == 403
    assert (await bigger.json())["error"]["approval_id"] != approval_id
    assert tool[1].count() == 0
    other_agent = await refund(proxy, **{"X-Agent-Id": "sales-bot"})
    assert other_agent.status == 403  # bound to the agent too
    assert tool[1].count() == 0
    assert (await refund(proxy)).status == 200
    assert tool[1].count() == 1


async def test_concurrent_retries_after_approval_run_the_tool_once(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    proxy = await start(make_proxy, tool)
    admin = await make_admin(proxy)
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    await decide(admin, approval_id, True)
    answers = await asyncio.gather(*(refund(proxy) for _ in range(8)))
    statuses = sorted(r.status for r in answers)
    assert tool[1].count() == 1
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}


async def test_two_proxies_on_postgresql_share_requests_and_spend_an_approval_once(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    async with pg_schema() as url:
        one = await start(make_proxy, tool, store={"url": url})
        two = await start(make_proxy, tool, store={"url": url})
        first = (await (await refund(one)).json())["error"]["approval_id"]
        second = (await (await refund(two)).json())["error"]["approval_id"]
        assert first == second  # one request for the call, whichever replica held it
        await decide(await make_admin(two), first, True)
        # Distinct keys: only the approval stands between these and the tool.
        answers = await asyncio.gather(
            *(refund(p, **{"Idempotency-Key": f"k-{i}"}) for i, p in enumerate([one, two] * 4))
        )
        assert tool[1].count() == 1
        assert sorted(r.status for r in answers).count(200) == 1
        for proxy in (one, two):
            await proxy.close()  # before the schema goes


async def test_the_admin_api_needs_the_token(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    server, _ = tool
    proxy = await make_proxy(
        {"pay": {"upstream": str(server.make_url("/"))}},
        approvals={"wait_s": 0.1},
        admin={"token": "s3cret-token"},
    )
    admin = await make_admin(proxy)
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    async with admin.post(f"/approvals/{approval_id}", json={"approve": True}) as response:
        assert response.status == 401
    async with admin.get("/approvals") as response:
        assert response.status == 401
    bearer = {"Authorization": "Bearer s3cret-token"}
    async with admin.post(
        f"/approvals/{approval_id}", json={"approve": True}, headers=bearer
    ) as response:
        assert response.status == 200
    assert (await refund(proxy)).status == 200


async def test_a_new_request_is_posted_to_the_webhook(
    make_proxy: ProxyFactory,
    tool: tuple[TestServer, Seen],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    relay = await aiohttp_server(app)
    proxy = await start(make_proxy, tool, notify={"url": str(relay.make_url("/hook"))})
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    await refund(proxy)  # the same request again: no second notification
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    (message,) = received
    assert message["id"] == approval_id
    assert message["agent"] == "support-bot" and message["tool"] == "pay"
    assert approval_id in message["url"] and message["url"] in message["text"]
    assert "refunds need a person" in message["text"]


def test_tokens_are_bound_to_their_purpose_and_cannot_be_altered() -> None:
    key = b"k" * 32
    token = sign(key, "mcp-approval", {"id": "apr_1", "agent": "a"}, 60)
    assert verify(key, "mcp-approval", token)["id"] == "apr_1"
    for bad in (
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token.replace("hr1.", "hr1.x", 1),
        sign(b"other" * 8, "mcp-approval", {"id": "apr_1"}, 60),
        sign(key, "approval-page", {"id": "apr_1"}, 60),
        sign(key, "mcp-approval", {"id": "apr_1"}, -1),
        "not-a-token",
    ):
        with pytest.raises(BadToken):
            verify(key, "mcp-approval", bad)


async def test_a_request_survives_a_restart_of_the_proxy(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    before = await start(make_proxy, tool)
    approval_id = (await (await refund(before)).json())["error"]["approval_id"]
    await before.close()
    after = await start(make_proxy, tool)  # the same store file
    await decide(await make_admin(after), approval_id, True)
    assert (await refund(after)).status == 200
    assert tool[1].count() == 1


async def test_the_cli_lists_and_decides_through_the_admin_api(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> None:
    import io

    from proxy.approvals.commands import approvals_command
    from proxy.http.keys import CONFIG

    proxy = await start(make_proxy, tool)
    admin = await make_admin(proxy)
    approval_id = (await (await refund(proxy)).json())["error"]["approval_id"]
    config = proxy.server.app[CONFIG]
    url = str(admin.make_url("")).rstrip("/")

    def cli(*args: str, reason: str | None = None) -> tuple[int, str]:
        out = io.StringIO()
        code = approvals_command(
            config,
            args[0],
            args[1] if len(args) > 1 else None,
            reason=reason,
            state="pending",
            admin_url=url,
            as_json=False,
            out=out,
            err=out,
        )
        return code, out.getvalue()

    code, listed = await asyncio.to_thread(cli, "list")
    assert code == 0 and approval_id in listed and "refunds need a person" in listed
    code, decided = await asyncio.to_thread(cli, "reject", approval_id, reason="duplicate")
    assert code == 0 and "rejected" in decided
    code, again = await asyncio.to_thread(cli, "approve", approval_id)
    assert code == 1 and "already_decided" in again
    assert (await refund(proxy)).status == 403
    assert tool[1].count() == 0
