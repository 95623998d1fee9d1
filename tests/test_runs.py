"""A run's ledger and its finish line (#23): ``GET /runs/{id}``, ``POST /runs/{id}/close``,
``handrail runs``; every call of a run in order, classified, with totals."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.http.keys import CONFIG
from proxy.runs.commands import runs_command
from proxy.runs.ledger import OutcomeClass, classify
from tests.conftest import ProxyFactory, Seen

POLICY = """package handrail

import rego.v1

default allow := true

default visible := true

allow := false if count(reasons) > 0

reasons contains "deletes are not allowed here" if input.request.method == "DELETE"

reasons contains "run closed" if {
	input.run.closed
	input.request.method != "GET"
}

decision := {"allow": allow, "reasons": reasons, "require_approval": false}
"""

AdminFactory = Callable[[TestClient], Awaitable[TestClient]]
RUN = {"X-Agent-Id": "worker", "X-Run-Id": "run-ledger"}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(POLICY)
    return directory


@pytest.fixture
async def rig(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tool: tuple[TestServer, Seen]
) -> tuple[TestClient, TestClient, Seen]:
    server, seen = tool
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url("/")), "timeout_s": 0.5}},
    )
    return proxy, await make_admin(proxy), seen


async def ledger(admin: TestClient, run: str = "run-ledger") -> dict[str, Any]:
    async with admin.get(f"/runs/{run}") as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_the_ledger_lists_a_mixed_run_in_order_with_its_totals(
    rig: tuple[TestClient, TestClient, Seen],
) -> None:
    proxy, admin, _ = rig
    steps = [
        ("GET", "/tools/crm/contacts", None),  # ok
        ("POST", "/tools/crm/contacts", {"name": "Ada"}),  # ok, a write
        ("POST", "/tools/crm/contacts", {"name": "Ada"}),  # replayed
        ("DELETE", "/tools/crm/contacts/1", None),  # refused by policy
        ("POST", "/tools/crm/contacts?status=422", {"name": ""}),  # the tool says: invalid
        ("POST", "/tools/crm/contacts?status=503", {"name": "x"}),  # a tool failure
        ("POST", "/tools/crm/contacts?sleep=2", {"name": "slow"}),  # timeout: unknown
    ]
    statuses = []
    for method, path, body in steps:
        async with proxy.request(method, path, json=body, headers=RUN) as response:
            statuses.append(response.status)
    assert statuses == [200, 200, 200, 403, 422, 503, 504]
    data = await ledger(admin)
    calls = data["calls"]
    assert [c["outcome"] for c in calls] == [
        "ok",
        "ok",
        "ok",
        "refused",
        "invalid_call",
        "tool_failure",
        "unknown",
    ]
    assert [c["status"] for c in calls] == statuses
    assert calls[2]["replayed"] and calls[2]["idempotency_key"] == calls[1]["idempotency_key"]
    assert calls[3]["decision"] == "deny" and calls[3]["reasons"] == [
        "deletes are not allowed here"
    ]
    totals = data["totals"]
    assert totals["calls"] == 7 and totals["replayed"] == 1
    assert totals["outcomes"] == {
        "ok": 3,
        "refused": 1,
        "invalid_call": 1,
        "tool_failure": 1,
        "unknown": 1,
    }
    assert totals["writes"] == 1  # the one write that ran and was not a replay
    assert data["closed"] is False


async def test_after_close_a_write_is_refused_and_never_reaches_the_tool(
    rig: tuple[TestClient, TestClient, Seen],
) -> None:
    proxy, admin, seen = rig
    assert (await proxy.post("/tools/crm/notes", json={"n": 1}, headers=RUN)).status == 200
    async with admin.post("/runs/run-ledger/close", json={"by": "orchestrator"}) as response:
        assert response.status == 200
        closed = await response.json()
    assert closed["closed"] and closed["by"] == "orchestrator" and closed["was_open"]
    refused = await proxy.post("/tools/crm/notes", json={"n": 2}, headers=RUN)
    assert refused.status == 403
    assert (await refused.json())["error"]["reasons"] == ["run closed"]
    other_agent = {**RUN, "X-Agent-Id": "helper"}  # closed for every agent of the run
    assert (await proxy.post("/tools/crm/notes", json={"n": 3}, headers=other_agent)).status == 403
    assert (await proxy.get("/tools/crm/notes", headers=RUN)).status == 200  # reads stay
    assert seen.count("/notes") == 2
    data = await ledger(admin)
    assert data["closed"] and data["closed_by"] == "orchestrator"
    assert [c["outcome"] for c in data["calls"]] == ["ok", "refused", "refused", "ok"]


async def test_the_cli_prints_the_ledger_and_closes_a_run(
    rig: tuple[TestClient, TestClient, Seen],
) -> None:
    proxy, admin, _ = rig
    await proxy.post("/tools/crm/notes", json={"n": 1}, headers=RUN)
    await ledger(admin)  # flushed to the journal
    config = proxy.server.app[CONFIG]

    def cli(action: str | None, run: str | None, as_json: bool = False) -> tuple[int, str]:
        out = io.StringIO()
        return runs_command(config, action, run, as_json=as_json, out=out, err=out), out.getvalue()

    code, text = await asyncio.to_thread(cli, None, "run-ledger")
    assert code == 0 and "run run-ledger" in text and "1 calls (ok 1)" in text
    code, text = await asyncio.to_thread(cli, None, None)
    assert code == 0 and "run-ledger" in text
    code, text = await asyncio.to_thread(cli, "close", "run-ledger")
    assert code == 0 and "closed" in text
    assert (await proxy.post("/tools/crm/notes", json={"n": 2}, headers=RUN)).status == 403
    code, text = await asyncio.to_thread(cli, None, "unknown-run")
    assert code == 2


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"error": None, "status": 200}, OutcomeClass.OK),
        ({"error": None, "status": 200, "tool_error": True}, OutcomeClass.INVALID_CALL),
        ({"error": None, "status": 200, "failed": True}, OutcomeClass.TOOL_FAILURE),
        ({"error": None, "status": 404}, OutcomeClass.INVALID_CALL),
        ({"error": None, "status": 500}, OutcomeClass.TOOL_FAILURE),
        ({"error": "policy_denied", "status": 403}, OutcomeClass.REFUSED),
        ({"error": "approval_pending", "status": 403}, OutcomeClass.REFUSED),
        ({"error": "result_blocked", "status": 502}, OutcomeClass.REFUSED),
        ({"error": "upstream_timeout", "status": 504}, OutcomeClass.TOOL_FAILURE),
        ({"error": "upstream_unavailable", "status": 502}, OutcomeClass.TOOL_FAILURE),
        ({"error": "outcome_unknown", "status": 409}, OutcomeClass.UNKNOWN),
        ({"error": "bad_request", "status": 400}, OutcomeClass.INVALID_CALL),
        ({"error": None, "status": 200, "unknown": True}, OutcomeClass.UNKNOWN),
    ],
)
def test_each_outcome_is_classified(facts: dict[str, Any], expected: OutcomeClass) -> None:
    assert classify(**facts) is expected


async def test_the_admin_plane_verifies_the_journal_chain(
    rig: tuple[TestClient, TestClient, Seen],
) -> None:
    proxy, admin, _ = rig
    for n in range(3):
        await proxy.post("/tools/crm/notes", json={"n": n}, headers=RUN)
    async with admin.get("/calls/verify") as response:
        report = await response.json()
        assert response.status == 200, report
    assert report["intact"] is True and report["rows"] == 3
