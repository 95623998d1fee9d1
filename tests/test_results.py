"""Result checks through the proxy (#23): the shipped ``result`` rules on real tools' answers.

The policy directory holds the shipped ``result.rego`` beside an allow-all decision, so what
is tested is what ships: credentials withheld, personal fields blanked for agents not cleared
to see them, and answers that cannot be checked marked (or blocked when a tool requires it).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from mcp import Client

from proxy.config import shipped_policies
from tests.conftest import ProxyFactory
from tests.mcp_server import McpServer

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AdminFactory = Callable[[TestClient], Awaitable[TestClient]]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """The shipped policies as they are (their tests left out)."""
    directory = tmp_path / "policies"
    shutil.copytree(shipped_policies(), directory, ignore=shutil.ignore_patterns("*_test.rego"))
    return directory


class Crm:
    """A tool whose answers a test sets; counts what ran."""

    def __init__(self) -> None:
        self.ran = 0
        self.answer: Any = {"id": "c-1"}

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.ran += 1
            if request.path == "/stream":
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await response.write(f"data: {AWS_KEY}\n\n".encode())
                return response
            return web.json_response(self.answer)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
async def crm(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[Crm, str]:
    tool = Crm()
    server = await aiohttp_server(tool.app())
    return tool, str(server.make_url("/"))


async def journal_rows(admin: TestClient, run: str) -> list[dict[str, Any]]:
    for _ in range(100):
        rows = (await (await admin.get(f"/calls?run={run}")).json())["calls"]
        if rows:
            return list(reversed(rows))
        await asyncio.sleep(0.02)
    raise AssertionError("nothing journaled")


async def test_a_leaked_key_is_withheld_and_the_tool_ran_once_after_retries(
    make_proxy: ProxyFactory, make_admin: AdminFactory, crm: tuple[Crm, str]
) -> None:
    tool, url = crm
    tool.answer = {"id": "c-9", "note": f"use {AWS_KEY} to sync"}
    proxy = await make_proxy({"crm": {"upstream": url}})
    headers = {"X-Agent-Id": "sales-bot", "X-Run-Id": "r-leak"}
    answers = []
    for _ in range(4):  # the call and three retries
        response = await proxy.post("/tools/crm/contacts", json={"name": "A"}, headers=headers)
        answers.append((response.status, await response.text()))
    assert all(status == 502 for status, _ in answers)
    assert all(AWS_KEY not in text for _, text in answers)
    assert "result_blocked" in answers[0][1] and "AWS access key" in answers[0][1]
    assert tool.ran == 1
    rows = await journal_rows(await make_admin(proxy), "r-leak")
    assert [r["result_check"] for r in rows] == ["blocked"] * 4
    assert [r["replayed"] for r in rows] == [False, True, True, True]
    assert all("AWS access key" in r["result_reasons"][0] for r in rows)


async def test_personal_fields_are_blanked_for_an_agent_not_cleared(
    make_proxy: ProxyFactory, make_admin: AdminFactory, crm: tuple[Crm, str]
) -> None:
    tool, url = crm
    tool.answer = {"contacts": [{"name": "Ada", "email": "ada@example.com"}]}
    proxy = await make_proxy({"crm": {"upstream": url}})
    shown = await (await proxy.get("/tools/crm/contacts", headers={"X-Run-Id": "r-p"})).json()
    assert shown == {"contacts": [{"name": "Ada", "email": "[REDACTED]"}]}
    cleared = {"X-Agent-Id": "sales-bot", "X-Run-Id": "r-q"}
    full = await (await proxy.get("/tools/crm/contacts", headers=cleared)).json()
    assert full["contacts"][0]["email"] == "ada@example.com"
    (row,) = await journal_rows(await make_admin(proxy), "r-p")
    assert row["result_check"] == "redacted"


async def test_a_streamed_answer_is_marked_unchecked_or_blocked_when_checks_are_required(
    make_proxy: ProxyFactory, make_admin: AdminFactory, crm: tuple[Crm, str]
) -> None:
    _, url = crm
    proxy = await make_proxy(
        {"open": {"upstream": url}, "strict": {"upstream": url, "result_checks": "required"}}
    )
    headers = {"X-Run-Id": "r-s"}
    passed = await proxy.get("/tools/open/stream", headers=headers)
    assert passed.status == 200 and AWS_KEY in await passed.text()
    blocked = await proxy.get("/tools/strict/stream", headers=headers)
    assert blocked.status == 502
    assert "could not be checked" in await blocked.text()
    rows = await journal_rows(await make_admin(proxy), "r-s")
    assert [r["result_check"] for r in rows] == ["unchecked", "blocked"]


async def test_an_mcp_answer_is_withheld_as_is_error_through_the_sdk_client(
    make_proxy: ProxyFactory, mcp_server: McpServer
) -> None:
    proxy = await make_proxy({"mcp": {"upstream": mcp_server.url, "kind": "mcp"}})
    async with Client(str(proxy.make_url("/tools/mcp")), mode="2026-07-28") as client:
        fine = await client.call_tool("echo", {"text": "hello"})
        leaked = await client.call_tool("read_config", {"name": "sync"})
    assert not fine.is_error
    assert leaked.is_error
    text = leaked.content[0].text  # type: ignore[union-attr]
    assert "AWS access key" in text and AWS_KEY not in text
    assert mcp_server.executions["read_config"] == 1
