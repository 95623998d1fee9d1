"""Policy decisions seen through the real HTTP proxy, on both engines.

The ``opa`` engine talks to tests/opa_api_server.py, which stands in for the OPA binary
(the package registries do not carry it) and evaluates the shipped policies with real OPA
(``opa_bindings``) when installed, else with the embedded evaluator.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory, free_port
from tests.opa_api_server import build_opa_app

SHIPPED = Path(__file__).resolve().parent.parent / "policies"


NAMED = {"X-Agent-Id": "sales-bot"}
"""A named agent: the shipped policy lets an unnamed one read only."""


def crm(server: TestServer) -> dict[str, Any]:
    return {"crm": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "off"}}}


@pytest.fixture
def shipped(policy_dir: Path) -> Path:
    """The shipped starter policies in place of conftest's small test policy."""
    shutil.rmtree(policy_dir)
    shutil.copytree(SHIPPED, policy_dir)
    return policy_dir


@pytest.fixture(params=["embedded", "opa"])
async def policy_section(
    request: pytest.FixtureRequest,
    shipped: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    server = await aiohttp_server(build_opa_app(shipped))
    return {
        "engine": "opa",
        "opa": {"url": str(server.make_url("")).rstrip("/"), "timeout_ms": 2000},
    }


async def test_denied_call_never_reaches_the_tool(
    tool, make_proxy: ProxyFactory, policy_section
) -> None:  # type: ignore[no-untyped-def]
    server, seen = tool
    proxy = await make_proxy(crm(server), policy=policy_section)
    resp = await proxy.delete("/tools/crm/contacts", headers=NAMED)
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["code"] == "policy_denied"
    assert body["error"]["reasons"] == ["DELETE /contacts would delete a whole collection"]
    assert body["error"]["decision_id"]
    assert seen.count() == 0


async def test_allowed_call_reaches_the_tool(
    tool, make_proxy: ProxyFactory, policy_section
) -> None:  # type: ignore[no-untyped-def]
    server, seen = tool
    proxy = await make_proxy(crm(server), policy=policy_section)
    resp = await proxy.delete("/tools/crm/contacts/42", headers=NAMED)
    assert resp.status == 200
    assert seen.count() == 1


async def test_secret_in_body_is_denied(tool, make_proxy: ProxyFactory, policy_section) -> None:  # type: ignore[no-untyped-def]
    server, seen = tool
    proxy = await make_proxy(crm(server), policy=policy_section)
    resp = await proxy.post(
        "/tools/crm/notes", json={"text": "AKIAABCDEFGHIJKLMNOP"}, headers=NAMED
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["reasons"] == [
        "argument text looks like an AWS access key id; secrets must not be sent to tools"
    ]
    assert seen.count() == 0


async def test_opa_down_is_503_and_never_reaches_the_tool(
    tool, make_proxy: ProxyFactory, shipped
) -> None:  # type: ignore[no-untyped-def]
    server, seen = tool
    url = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy(
        crm(server), policy={"engine": "opa", "opa": {"url": url, "timeout_ms": 300}}
    )
    resp = await proxy.get("/tools/crm/contacts/42")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "policy_unavailable"
    assert seen.count() == 0


async def test_admin_reload_serves_a_changed_policy(
    tool, make_proxy: ProxyFactory, make_admin, shipped
) -> None:  # type: ignore[no-untyped-def]
    server, seen = tool
    proxy = await make_proxy(crm(server))
    assert (await proxy.get("/tools/crm/contacts/42")).status == 200
    (shipped / "handrail.rego").write_text(
        "package handrail\n\nimport rego.v1\n\n"
        'decision := {"allow": false, "reasons": ["closed"], "require_approval": false}\n'
    )
    (shipped / "result.rego").unlink()  # it reads settings the new handrail.rego dropped
    admin = await make_admin(proxy)
    reloaded = await admin.post("/policies/reload")
    assert reloaded.status == 200
    resp = await proxy.get("/tools/crm/contacts/42")
    assert resp.status == 403
    assert (await resp.json())["error"]["reasons"] == ["closed"]
    assert seen.count() == 1


async def test_admin_reload_of_a_broken_policy_keeps_serving(
    tool, make_proxy: ProxyFactory, make_admin, shipped
) -> None:  # type: ignore[no-untyped-def]
    server, _ = tool
    proxy = await make_proxy(crm(server))
    (shipped / "handrail.rego").write_text("package handrail\n\ndecision := {\n")
    admin = await make_admin(proxy)
    reloaded = await admin.post("/policies/reload")
    status = await reloaded.json()
    assert "reload failed" in status["detail"] and "handrail.rego:" in status["detail"]
    assert (await proxy.get("/tools/crm/contacts/42")).status == 200


async def test_parallel_writes_cannot_overrun_the_run_write_budget(
    tool, make_proxy: ProxyFactory, shipped
) -> None:  # type: ignore[no-untyped-def]
    # support-bot may write 20 times a run (policies/data.json); an agent calling tools in
    # parallel sends 30 writes at once: exactly 20 reach the tool, the rest are refused.
    import asyncio

    server, seen = tool
    proxy = await make_proxy(crm(server))
    headers = {"X-Agent-Id": "support-bot", "X-Run-Id": "parallel-run"}
    answers = await asyncio.gather(
        *(proxy.post("/tools/crm/contacts", json={"n": i}, headers=headers) for i in range(30))
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 20 + [403] * 10
    assert seen.count() == 20
    # Each refused call saw the writes reserved before it, by calls still being decided too.
    spent = []
    for answer in answers:
        if answer.status == 403:
            (reason,) = (await answer.json())["error"]["reasons"]
            words = reason.split()
            assert words[:4] == ["run", "write", "budget", "spent:"] and words[5:] == [
                "of",
                "20",
                "writes",
            ]
            spent.append(int(words[4]))
    assert min(spent) == 20
