"""Never twice, never lost: agents that hang up, tools that time out, refuse, fail or drop
the connection, with real sockets on loopback.

Every test asserts what the agent saw (status, error code, ``Idempotent-Replayed``, body)
and how many times the tool ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config
from tests.conftest import Seen, free_port
from tests.support_faults import (
    ALLOW_ALL,
    Break,
    Cut,
    HangUpTool,
    Proxy,
    StartProxy,
    fault_tool_app,
    hang_up,
    http_request,
    metric,
    proxy_starter,
    running_app,
    until,
)
from tests.support_idempotency import Answer, send

KEY = "order-7f3a"
BODY = json.dumps({"amount": 42, "currency": "EUR"}).encode()
HEADERS = {"Content-Type": "application/json", "Idempotency-Key": KEY, "X-Agent-Id": "billing"}


@dataclass
class Tool:
    url: str
    seen: Seen


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(ALLOW_ALL)
    return directory


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exits:
        yield exits


@pytest.fixture
async def fault_tool(stack: contextlib.AsyncExitStack) -> Tool:
    seen = Seen()
    url = await stack.enter_async_context(running_app(fault_tool_app(seen)))
    return Tool(url + "/api", seen)


@pytest.fixture
def start_proxy(stack: contextlib.AsyncExitStack, make_config: Callable[..., Config]) -> StartProxy:
    return proxy_starter(stack, make_config)


def tools(upstream: str, timeout_s: float = 5.0, **idempotency: Any) -> dict[str, Any]:
    return {
        "crm": {
            "upstream": upstream,
            "timeout_s": timeout_s,
            "idempotency": {"mode": "enforce", **idempotency},
        }
    }


async def ask(proxy: Proxy, path: str, method: str = "POST") -> Answer:
    return await send(
        proxy.session, method, proxy.tool_url("crm", path), data=BODY, headers=HEADERS
    )


async def ask_until_settled(proxy: Proxy, path: str, method: str = "POST") -> Answer:
    """The retry: while the first call is still being read and settled it is in flight
    (409 idempotency_key_in_use); past that, whatever the proxy answers."""
    deadline = time.monotonic() + 5
    while True:
        answer = await ask(proxy, path, method)
        if answer.error_code != "idempotency_key_in_use" or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.05)


def reason(answer: Answer) -> str | None:
    why = json.loads(answer.body)["error"].get("reason")
    return str(why) if why is not None else None


# -- 1. agents that hang up ---------------------------------------------------------------


@dataclass(frozen=True)
class HangUp:
    query: str
    cut: Cut
    body_bytes: int = 0
    rst: bool = True
    ready: str = "received"  # BEFORE_ANSWER: "received" the request, or "answering"

    def __str__(self) -> str:
        return f"{self.query}-{self.cut}-{'rst' if self.rst else 'fin'}-{self.ready}"


SIZE = 64 * 1024
HANG_UPS = [
    # small answers (< 256 KiB, with a Content-Length)
    HangUp("?sleep=0.4", Cut.BEFORE_ANSWER),
    HangUp("?sleep=0.4", Cut.BEFORE_ANSWER, rst=False),
    HangUp("?paced=4&size=16384&gap=0.2", Cut.BEFORE_ANSWER, ready="answering"),
    # large answers with a Content-Length (300 KiB, paced)
    HangUp(f"?paced=5&size={SIZE}&gap=0.2", Cut.BEFORE_ANSWER, ready="answering"),
    HangUp(f"?paced=5&size={SIZE}&gap=0.2", Cut.AFTER_HEADERS),
    HangUp(f"?paced=5&size={SIZE}&gap=0.2", Cut.MID_BODY, body_bytes=SIZE + 10),
    HangUp(f"?paced=5&size={SIZE}&gap=0.2", Cut.BEFORE_END, body_bytes=4 * SIZE),
    # streamed answers without a Content-Length (chunked)
    HangUp("?stream=4&size=16384&gap=0.2", Cut.AFTER_HEADERS),
    HangUp("?stream=4&size=16384&gap=0.2", Cut.MID_BODY, body_bytes=100),
    HangUp("?stream=4&size=16384&gap=0.2", Cut.MID_BODY, body_bytes=100, rst=False),
    HangUp("?stream=4&size=16384&gap=0.2", Cut.BEFORE_END, body_bytes=3 * 16384),
]


@pytest.mark.parametrize("case", HANG_UPS, ids=str)
async def test_agent_hang_up_keeps_the_answer_for_the_retry(
    fault_tool: Tool, start_proxy: StartProxy, case: HangUp
) -> None:
    seen = fault_tool.seen
    proxy = await start_proxy(tools(fault_tool.url))
    host, port = proxy.host, proxy.port
    request = http_request("POST", host, port, f"/tools/crm/charges{case.query}", BODY, HEADERS)

    def ready() -> bool:
        if not seen.requests:
            return False
        return case.ready == "received" or bool(seen.requests[0]["sent"])

    heard = await hang_up(
        host, port, request, case.cut, ready=ready, body_bytes=case.body_bytes, rst=case.rst
    )
    await until(lambda: bool(seen.requests) and seen.requests[0]["done"])
    original = seen.requests[0]["sent"]
    if case.cut is not Cut.BEFORE_ANSWER:
        assert heard.status == 200
    assert len(heard.body) < len(original)  # the agent really missed part of its answer

    retry = await ask_until_settled(proxy, f"/charges{case.query}")

    assert (retry.status, retry.error_code) == (200, None)
    assert retry.replayed
    assert retry.body == original
    assert seen.count() == 1
    text = await proxy.metrics()
    assert metric(text, "handrail_errors_total", code="internal_error") == 0
    assert metric(text, "handrail_client_disconnects_total", tool="crm") == 1


async def test_agent_hang_up_of_a_4xx_answer_replays_the_4xx(
    fault_tool: Tool, start_proxy: StartProxy
) -> None:
    seen = fault_tool.seen
    proxy = await start_proxy(tools(fault_tool.url))
    host, port = proxy.host, proxy.port
    query = "?status=409&stream=3&size=8192&gap=0.2"
    request = http_request("POST", host, port, f"/tools/crm/charges{query}", BODY, HEADERS)

    heard = await hang_up(host, port, request, Cut.MID_BODY, body_bytes=50)
    await until(lambda: bool(seen.requests) and seen.requests[0]["done"])
    retry = await ask_until_settled(proxy, f"/charges{query}")

    assert heard.status == 409
    assert (retry.status, retry.replayed) == (409, True)
    assert retry.body == seen.requests[0]["sent"]
    assert seen.count() == 1


# -- 3. tools that time out, refuse, fail or drop the connection --------------------------


@pytest.mark.parametrize(
    "query",
    ["?sleep=1.5", "?stream=5&size=1024&gap=0.4"],
    ids=["no-answer-yet", "answer-streaming"],
)
async def test_tool_timeout_is_504_and_the_retry_gets_outcome_unknown(
    fault_tool: Tool, start_proxy: StartProxy, query: str
) -> None:
    seen = fault_tool.seen
    proxy = await start_proxy(tools(fault_tool.url, timeout_s=0.6))

    url = proxy.tool_url("crm", f"/charges{query}")
    broken = False
    try:
        first = await send(proxy.session, "POST", url, data=BODY, headers=HEADERS)
    except aiohttp.ClientPayloadError:
        broken = True  # the head was sent already: the broken stream is the failure
    retry = await ask(proxy, f"/charges{query}")  # at once: the tool is still working
    working = not seen.requests[0]["ended"]
    await until(lambda: seen.requests[0]["ended"], timeout_s=5)
    later = await ask(proxy, f"/charges{query}")

    if not broken:
        assert (first.status, first.error_code) == (504, "upstream_timeout")
    assert working
    assert (retry.status, retry.error_code, reason(retry)) == (409, "outcome_unknown", "timeout")
    assert (later.status, later.error_code) == (409, "outcome_unknown")
    assert seen.count() == 1


async def test_refused_connection_is_502_and_frees_the_key(
    stack: contextlib.AsyncExitStack, start_proxy: StartProxy
) -> None:
    port = free_port()
    proxy = await start_proxy(tools(f"http://127.0.0.1:{port}/api"))

    first = await ask(proxy, "/charges")
    seen = Seen()
    await stack.enter_async_context(running_app(fault_tool_app(seen), port))  # it comes up
    retry = await ask(proxy, "/charges")

    assert (first.status, first.error_code) == (502, "upstream_unavailable")
    assert (retry.status, retry.replayed) == (200, False)
    assert seen.count() == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_tool_5xx_frees_the_key_and_the_retry_runs(
    fault_tool: Tool, start_proxy: StartProxy, status: int
) -> None:
    seen = fault_tool.seen
    proxy = await start_proxy(tools(fault_tool.url))

    first = await ask(proxy, f"/charges?status={status}")
    retry = await ask(proxy, f"/charges?status={status}")

    assert (first.status, first.replayed) == (status, False)
    assert (retry.status, retry.replayed) == (status, False)
    assert seen.count() == 2


@pytest.mark.parametrize("query", ["?status=503", "?status=500&stream=3&size=1024&gap=0.05"])
async def test_tool_5xx_is_replayed_when_release_on_5xx_is_off(
    fault_tool: Tool, start_proxy: StartProxy, query: str
) -> None:
    seen = fault_tool.seen
    proxy = await start_proxy(tools(fault_tool.url, release_on_5xx=False))

    first = await ask(proxy, f"/charges{query}")
    retry = await ask(proxy, f"/charges{query}")

    assert first.status >= 500 and not first.replayed
    assert (retry.status, retry.replayed) == (first.status, True)
    assert retry.body == first.body == seen.requests[0]["sent"]
    assert seen.count() == 1


@pytest.mark.parametrize(
    ("behaviour", "method", "why"),
    [
        (Break.CLOSE, "POST", "connection_lost"),
        (Break.RESET, "POST", "connection_lost"),
        (Break.CLOSE, "PUT", "connection_lost"),
        (Break.RESET, "DELETE", "connection_lost"),
        (Break.PARTIAL_BODY, "POST", "answer_broken"),
        (Break.PARTIAL_CHUNKED, "POST", "answer_broken"),
    ],
)
async def test_tool_dropping_the_connection_is_never_run_again(
    start_proxy: StartProxy, behaviour: Break, method: str, why: str
) -> None:
    tool = HangUpTool(behaviour)
    upstream = await tool.start()
    try:
        proxy = await start_proxy(tools(upstream + "/api"))
        url = proxy.tool_url("crm", "/charges")
        broken = False
        try:
            first = await send(proxy.session, method, url, data=BODY, headers=HEADERS)
        except aiohttp.ClientPayloadError:
            broken = True  # the head was on its way already
        retry = await ask(proxy, "/charges", method)
    finally:
        await tool.stop()

    if behaviour is Break.PARTIAL_CHUNKED:
        assert broken
    else:
        assert (first.status, first.error_code) == (502, "upstream_unavailable")
    assert (retry.status, retry.error_code, reason(retry)) == (409, "outcome_unknown", why)
    assert tool.requests == 1


# -- 6. counting -------------------------------------------------------------------------


async def test_each_error_is_counted_once(fault_tool: Tool, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(tools(fault_tool.url, timeout_s=0.3))

    timeout = await ask(proxy, "/charges?sleep=1")
    unknown = await ask(proxy, "/charges?sleep=1")
    missing = await send(proxy.session, "POST", proxy.tool_url("crm", "/x"), data=BODY)
    no_tool = await send(proxy.session, "POST", proxy.tool_url("nope", "/x"), data=BODY)

    assert [a.error_code for a in (timeout, unknown, missing, no_tool)] == [
        "upstream_timeout",
        "outcome_unknown",
        "idempotency_key_missing",
        "unknown_tool",
    ]
    text = await proxy.metrics()
    for code in ("upstream_timeout", "outcome_unknown", "idempotency_key_missing", "unknown_tool"):
        assert metric(text, "handrail_errors_total", code=code) == 1, code
    assert metric(text, "handrail_errors_total", code="internal_error") == 0
