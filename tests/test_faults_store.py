"""Never twice, never lost, when the proxy or its store fails: ``kill -9`` of a proxy mid-call
(SQLite, PostgreSQL, two proxies on one PostgreSQL), an operator resolving the key it left
(admin plane and ``handrail keys``), a store that is unreachable when the answer is recorded
(a PostgreSQL relay pulled out), and a full disk under a SQLite store (``prlimit --fsize``).

Every test asserts what the agent saw and how many times the tool ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config
from proxy.idempotency import SETTLE_DELAYS_S
from tests.conftest import Seen
from tests.support_faults import (
    ALLOW_ALL,
    PinnedRelay,
    StartProxy,
    fault_tool_app,
    handrail_cli,
    metric,
    proxy_starter,
    running_app,
    serving,
    set_fsize,
    start_serve,
    until,
    with_port,
    write_json_config,
)
from tests.support_idempotency import Answer, pg_schema, send

KEY = "charge-5f1c"
BODY = json.dumps({"amount": 42, "currency": "EUR"}).encode()
HEADERS = {"Content-Type": "application/json", "Idempotency-Key": KEY, "X-Agent-Id": "billing"}
TIMEOUT_S, MARGIN_S = 1.0, 0.5
LEASE_S = TIMEOUT_S + MARGIN_S
ANSWER = {"status": 201, "headers": {"Content-Type": "application/json"}, "body": '{"id": 1}'}


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


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with pg_schema() as url:
        yield url


def tools(upstream: str, timeout_s: float = TIMEOUT_S, **idempotency: Any) -> dict[str, Any]:
    idem = {"mode": "enforce", "lease_margin_s": MARGIN_S, **idempotency}
    return {"crm": {"upstream": upstream, "timeout_s": timeout_s, "idempotency": idem}}


def process_config(path: Path, policy_dir: Path, store: str, tool_map: dict[str, Any]) -> Path:
    raw = {"tools": tool_map, "policy": {"path": str(policy_dir), "watch": False}}
    return write_json_config(path, {**raw, "store": {"url": store}})


async def ask(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> Answer:
    return await send(session, "POST", url, data=BODY, headers={**HEADERS, **(headers or {})})


async def ask_until_settled(session: aiohttp.ClientSession, url: str) -> Answer:
    """The retry; while the first call is still settling it is in flight (409)."""
    deadline = time.monotonic() + 8
    while True:
        answer = await ask(session, url)
        if answer.error_code != "idempotency_key_in_use" or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.05)


def error(answer: Answer) -> dict[str, Any]:
    return dict(json.loads(answer.body)["error"])


async def crash_mid_call(url: str, session: aiohttp.ClientSession, tool: Tool, kill: Any) -> float:
    """Send the keyed write through ``url``; once the (slow) tool has it, ``kill()`` the proxy.
    Returns when the call was claimed at the latest."""
    pending = asyncio.ensure_future(ask(session, url, {"X-Tool-Sleep": "1.2"}))
    await until(lambda: tool.seen.count() == 1)
    claimed_by = time.monotonic()
    kill()
    with pytest.raises(aiohttp.ClientError):
        await pending
    return claimed_by


async def past_lease(claimed_by: float) -> None:
    await asyncio.sleep(max(0.0, claimed_by + LEASE_S + 0.2 - time.monotonic()))


# -- 2. the proxy is killed mid-call ---------------------------------------------------------


@pytest.fixture
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The store's URL: ``sqlite`` (a file under tmp_path) or ``postgresql`` (a fresh schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/crash.db"
        return
    async with pg_schema() as url:
        yield url


@pytest.mark.parametrize(
    ("store", "resolution"),
    [("sqlite", "failed"), pytest.param("postgresql", "answer", marks=pytest.mark.postgres)],
    indirect=["store"],
)
async def test_kill_9_mid_call_gives_outcome_unknown_until_an_operator_resolves_it(
    store: str,
    fault_tool: Tool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    policy_dir: Path,
    tmp_path: Path,
    resolution: str,
) -> None:
    config = process_config(tmp_path / "doomed.yaml", policy_dir, store, tools(fault_tool.url))
    async with serving(config) as doomed:
        claimed_by = await crash_mid_call(
            doomed.tool_url("crm", "/charges"), session, fault_tool, doomed.kill
        )
    survivor = await start_proxy(tools(fault_tool.url), store={"url": store})
    url = survivor.tool_url("crm", "/charges")

    early = await ask(session, url)  # its lease still runs: nobody may run it meanwhile
    await past_lease(claimed_by)
    late = await ask(session, url)
    listed_status, listed = await survivor.admin("GET", "/keys")
    body = {"failed": True} if resolution == "failed" else {"answer": ANSWER}
    resolved_status, resolved = await survivor.admin("POST", f"/keys/crm/{KEY}", body)
    after = await ask(session, url)

    assert (early.status, early.error_code) == (409, "idempotency_key_in_use")
    assert (late.status, late.error_code, error(late)["reason"]) == (
        409,
        "outcome_unknown",
        "lease_expired",
    )
    assert listed_status == 200
    assert [(k["tool"], k["key"], k["state"]) for k in listed["keys"]] == [("crm", KEY, "unknown")]
    assert resolved_status == 200 and resolved["was"] == "unknown"
    if resolution == "failed":
        assert (after.status, after.replayed) == (200, False)  # it runs again, on purpose
        assert fault_tool.seen.count() == 2
    else:
        assert (after.status, after.replayed, after.body) == (201, True, b'{"id": 1}')
        assert after.headers["Content-Type"] == "application/json"
        assert fault_tool.seen.count() == 1


@pytest.mark.parametrize(
    ("store", "resolution"),
    [
        ("sqlite", "--answer"),
        pytest.param("postgresql", "--failed", marks=pytest.mark.postgres),
    ],
    indirect=["store"],
)
async def test_keys_cli_lists_and_resolves_with_the_proxy_stopped(
    store: str,
    fault_tool: Tool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    policy_dir: Path,
    tmp_path: Path,
    resolution: str,
) -> None:
    config = process_config(tmp_path / "doomed.yaml", policy_dir, store, tools(fault_tool.url))
    async with serving(config) as doomed:
        claimed_by = await crash_mid_call(
            doomed.tool_url("crm", "/charges"), session, fault_tool, doomed.kill
        )
    await past_lease(claimed_by)

    # No proxy runs now: the operator works on the store with the proxy's config.
    listed = await handrail_cli("keys", "list", "-c", str(config))
    how = ["--failed"]
    if resolution == "--answer":
        answer_file = tmp_path / "answer.json"
        answer_file.write_text(json.dumps(ANSWER))
        how = ["--answer", str(answer_file)]
    resolved = await handrail_cli("keys", "resolve", "crm", KEY, *how, "-c", str(config))
    survivor = await start_proxy(tools(fault_tool.url), store={"url": store})
    after = await ask(session, survivor.tool_url("crm", "/charges"))
    _, left = await survivor.admin("GET", "/keys")

    assert listed.code == 0, listed.err
    assert f"crm  {KEY}  unknown (lease_expired)" in listed.out
    assert resolved.code == 0, resolved.err
    assert left == {"keys": []}
    if resolution == "--failed":
        assert "released" in resolved.out
        assert (after.status, after.replayed) == (200, False)
        assert fault_tool.seen.count() == 2
    else:
        assert (after.status, after.replayed, after.body) == (201, True, b'{"id": 1}')
        assert fault_tool.seen.count() == 1


@pytest.mark.postgres
async def test_owner_killed_retry_on_the_other_proxy_gets_outcome_unknown(
    pg_url: str,
    fault_tool: Tool,
    session: aiohttp.ClientSession,
    policy_dir: Path,
    tmp_path: Path,
) -> None:
    configs = [
        process_config(tmp_path / f"proxy{i}.yaml", policy_dir, pg_url, tools(fault_tool.url))
        for i in (1, 2)
    ]
    started = await asyncio.gather(*(start_serve(c) for c in configs), return_exceptions=True)
    running = [p for p in started if not isinstance(p, BaseException)]
    if len(running) < 2:
        await asyncio.gather(*(p.stop() for p in running))
        raise AssertionError(f"a proxy did not start: {started}")
    owner, other = running
    try:
        claimed_by = await crash_mid_call(
            owner.tool_url("crm", "/charges"), session, fault_tool, owner.kill
        )
        url = other.tool_url("crm", "/charges")
        early = await ask(session, url)
        await past_lease(claimed_by)
        late = await ask(session, url)
        again = await ask(session, url)
        async with session.post(f"{other.admin_url}/keys/crm/{KEY}", json={"failed": True}) as r:
            resolved = r.status
        after = await ask(session, url)
    finally:
        await asyncio.gather(owner.stop(), other.stop())

    assert (early.status, early.error_code) == (409, "idempotency_key_in_use")
    assert (late.status, late.error_code, error(late)["reason"]) == (
        409,
        "outcome_unknown",
        "lease_expired",
    )
    assert (again.status, again.error_code) == (409, "outcome_unknown")
    assert resolved == 200
    assert (after.status, after.replayed) == (200, False)
    assert fault_tool.seen.count() == 2  # once before the crash, once after the resolution


async def test_tool_that_dedupes_gets_the_same_key_again_after_the_lease(
    fault_tool: Tool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    policy_dir: Path,
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/crash.db"
    tool_map = tools(fault_tool.url, upstream_dedupes=True)
    config = process_config(tmp_path / "doomed.yaml", policy_dir, url, tool_map)
    async with serving(config) as doomed:
        claimed_by = await crash_mid_call(
            doomed.tool_url("crm", "/charges"), session, fault_tool, doomed.kill
        )
    survivor = await start_proxy(tool_map, store={"url": url})
    charges = survivor.tool_url("crm", "/charges")

    early = await ask(session, charges)  # never two at once, even for a deduplicating tool
    await past_lease(claimed_by)
    resent = await ask(session, charges)
    replayed = await ask(session, charges)

    assert (early.status, early.error_code) == (409, "idempotency_key_in_use")
    assert (resent.status, resent.replayed) == (200, False)
    assert (replayed.status, replayed.replayed, replayed.body) == (200, True, resent.body)
    assert fault_tool.seen.count() == 2
    keys = [r["headers"].get("Idempotency-Key") for r in fault_tool.seen.requests]
    assert keys == [KEY, KEY]


# -- 4. the store fails when the answer is recorded -------------------------------------------


@pytest.mark.postgres
async def test_answer_recorded_by_the_background_settle_once_the_store_is_back(
    pg_url: str,
    stack: contextlib.AsyncExitStack,
    fault_tool: Tool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
) -> None:
    relay, back = PinnedRelay(), PinnedRelay()
    port = await relay.start()
    stack.push_async_callback(back.stop)  # after the proxy has stopped
    stack.push_async_callback(relay.stop)
    proxy = await start_proxy(
        tools(fault_tool.url, timeout_s=3.0), store={"url": with_port(pg_url, port)}
    )
    url = proxy.tool_url("crm", "/charges?status=201")
    pending = asyncio.ensure_future(ask(session, url, {"X-Tool-Sleep": "0.6"}))
    await until(lambda: fault_tool.seen.count() == 1)
    await relay.stop()  # the store goes away while the tool works
    first = await pending
    await asyncio.sleep(0.4)
    await back.start(port)  # and comes back on the same address
    retry = await ask_until_settled(session, url)
    metrics = await proxy.metrics()

    assert (first.status, first.replayed) == (201, False)  # the agent had its answer
    assert (retry.status, retry.replayed, retry.body) == (201, True, first.body)
    assert fault_tool.seen.count() == 1
    assert metric(metrics, "handrail_idempotency_settle_retries_total") >= 1


@pytest.mark.postgres
async def test_store_away_past_the_lease_gives_outcome_unknown_never_a_second_run(
    pg_url: str,
    stack: contextlib.AsyncExitStack,
    fault_tool: Tool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
) -> None:
    attempts = list(itertools.accumulate(SETTLE_DELAYS_S))  # after the failed settle
    relay, back = PinnedRelay(), PinnedRelay()
    port = await relay.start()
    stack.push_async_callback(back.stop)  # after the proxy has stopped
    stack.push_async_callback(relay.stop)
    proxy = await start_proxy(tools(fault_tool.url), store={"url": with_port(pg_url, port)})
    url = proxy.tool_url("crm", "/charges?status=201")
    pending = asyncio.ensure_future(ask(session, url, {"X-Tool-Sleep": "0.3"}))
    await until(lambda: fault_tool.seen.count() == 1)
    await relay.stop()
    first = await pending
    answered = time.monotonic()
    # Back after the lease ran out and after the third settle attempt failed, well
    # before the fourth.
    back_at = answered + attempts[2] + 0.25
    assert back_at > answered + LEASE_S and back_at < answered + attempts[3] - 1.0
    await asyncio.sleep(back_at - time.monotonic())
    await back.start(port)
    retry = await ask(session, url)
    await asyncio.sleep(answered + attempts[3] + 0.5 - time.monotonic())
    late = await ask(session, url)

    assert first.status == 201
    assert (retry.status, retry.error_code, error(retry)["reason"]) == (
        409,
        "outcome_unknown",
        "lease_expired",
    )
    assert fault_tool.seen.count() == 1
    # The owner's late settle records the answer it had: the next retry is replayed.
    assert (late.status, late.replayed, late.body) == (201, True, first.body)


async def test_full_disk_under_sqlite_refuses_calls_and_reports_not_ready(
    fault_tool: Tool,
    session: aiohttp.ClientSession,
    policy_dir: Path,
    tmp_path: Path,
) -> None:
    db = tmp_path / "store" / "handrail.db"
    config = process_config(
        tmp_path / "disk.yaml", policy_dir, f"sqlite:///{db}", tools(fault_tool.url)
    )
    first = await start_serve(config)  # creates and migrates the store's files
    await first.stop()
    largest = max(p.stat().st_size for p in db.parent.iterdir())

    async with serving(config, fsize=largest + 8192) as proxy:  # it starts within the limit
        url = proxy.tool_url("crm", "/charges")
        ready_before = await ready(session, proxy.admin_url)
        # The files may not grow: whatever runs is recorded, whatever is refused never ran.
        outcomes = []
        for i in range(20):
            outcomes.append(await ask(session, url, {"Idempotency-Key": f"fill-{i}"}))
            await asyncio.sleep(0.02)
        ran_before = fault_tool.seen.count()
        await set_fsize(proxy.pid, 0)  # the disk is full now
        await asyncio.sleep(0.1)
        ready_full = await ready(session, proxy.admin_url)
        refused = await ask(session, url)
        ran_full = fault_tool.seen.count()
        alive = proxy.alive
        await set_fsize(proxy.pid, "unlimited")  # space again
        await until_ready(session, proxy.admin_url)
        after = await ask(session, url)
        replayed = await ask(session, url)

    assert alive, f"handrail serve died on a full disk (SIGXFSZ?): {proxy.text()[-2000:]}"
    assert ready_before == 200
    for answer in outcomes:
        assert answer.status == 200 or answer.error_code == "store_unavailable"
    assert any(a.error_code == "store_unavailable" for a in outcomes)  # the limit bites
    assert ran_before == sum(1 for a in outcomes if a.status == 200)
    assert ready_full == 503
    assert (refused.status, refused.error_code) == (503, "store_unavailable")
    assert ran_full == ran_before  # a refused call never reached the tool
    assert (after.status, after.replayed) == (200, False)  # no key was left stuck
    assert (replayed.status, replayed.replayed) == (200, True)
    assert fault_tool.seen.count() == ran_before + 1


async def ready(session: aiohttp.ClientSession, admin_url: str) -> int:
    async with session.get(f"{admin_url}/readyz") as response:
        await response.read()
        return response.status


async def until_ready(session: aiohttp.ClientSession, admin_url: str) -> None:
    deadline = time.monotonic() + 5
    while await ready(session, admin_url) != 200:
        assert time.monotonic() < deadline, "the store did not become ready again"
        await asyncio.sleep(0.05)


# -- 6. a refused claim leaves no key behind ---------------------------------------------------


@pytest.mark.postgres
async def test_store_unavailable_during_a_relay_cut_leaves_no_key_stuck(
    pg_url: str,
    stack: contextlib.AsyncExitStack,
    fault_tool: Tool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
) -> None:
    relay, back = PinnedRelay(), PinnedRelay()
    port = await relay.start()
    stack.push_async_callback(back.stop)  # after the proxy has stopped
    stack.push_async_callback(relay.stop)
    proxy = await start_proxy(tools(fault_tool.url), store={"url": with_port(pg_url, port)})
    url = proxy.tool_url("crm", "/charges")
    await relay.stop()
    refused = await ask(session, url)
    ready_cut = await ready(session, proxy.admin_url)
    await back.start(port)
    after = await ask(session, url)
    replayed = await ask(session, url)
    ready_back = await ready(session, proxy.admin_url)
    metrics = await proxy.metrics()

    assert (refused.status, refused.error_code) == (503, "store_unavailable")
    assert ready_cut == 503 and ready_back == 200
    assert (after.status, after.replayed) == (200, False)  # runs: no 409 left behind
    assert (replayed.status, replayed.replayed) == (200, True)
    assert fault_tool.seen.count() == 1
    assert metric(metrics, "handrail_errors_total", code="store_unavailable") == 1
