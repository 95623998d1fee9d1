"""The embedded engine's worker processes (isolation="process"): real children, real kills.

What a user relies on: the same decisions as in-process evaluation, fail-closed 503s when a
worker dies or hangs (the tool is never called), recovery afterwards, and reloads that
switch every worker or none.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.errors import PolicyUnavailable
from proxy.policy.embedded import EmbeddedEngine
from tests.conftest import ProxyFactory, Seen
from tests.test_policy_engines import ALLOW_ALL, BROKEN, CASES, DENY_ALL, SHIPPED, doc, mcp

# Agent "slow" makes the decision take seconds (about 4 s of regorus work): a hung worker.
SLOW = """package handrail

import rego.v1

default _slow := false

_slow if input.agent.id == "slow"

_n := count([1 | some x in numbers.range(1, 4000); some y in numbers.range(1, 2000); x % 7 == y % 5]) if _slow

else := 0

default allow := true

allow := false if input.request.method == "DELETE"

decision := {"allow": allow, "reasons": [], "require_approval": _n < 0}
"""


def worker_pids() -> list[int]:
    """This process's live policy worker children, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == os.getpid() and b"proxy.policy.worker" in cmdline:
            found.append(int(entry))
    return found


def policy_path(tmp_path: Path, source: str) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "handrail.rego").write_text(source)
    return directory


async def started(path: Path, **options: object) -> EmbeddedEngine:
    engine = EmbeddedEngine(path, "handrail/decision", watch=False, **options)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def wait_until_deciding(engine: EmbeddedEngine, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        try:
            await engine.decide(doc())
            return
        except PolicyUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


@pytest.fixture
async def slow_engine(tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    engine = await started(policy_path(tmp_path, SLOW), workers=1, timeout_s=0.3)
    yield engine
    await engine.close()


async def test_decisions_match_in_process_evaluation() -> None:
    processes = await started(SHIPPED)
    threads = await started(SHIPPED, isolation="thread")
    try:
        for _, document, *_ in CASES:
            ours, theirs = await processes.decide(document), await threads.decide(document)
            assert (ours.allow, ours.require_approval, ours.reasons) == (
                theirs.allow,
                theirs.require_approval,
                theirs.reasons,
            )
            assert await processes.visible(document) == await threads.visible(document)
    finally:
        await processes.close()
        await threads.close()


async def test_two_hundred_concurrent_decisions_over_two_workers_are_all_right() -> None:
    engine = await started(SHIPPED, workers=2)
    try:
        cases = [CASES[i % len(CASES)] for i in range(200)]
        decisions = await asyncio.gather(*(engine.decide(c[1]) for c in cases))
    finally:
        await engine.close()
    assert [(d.allow, d.require_approval, list(d.reasons)) for d in decisions] == [
        (c[2], c[3], c[4]) for c in cases
    ]


async def test_killed_worker_fails_its_calls_closed_then_recovers() -> None:
    engine = await started(SHIPPED, workers=1)
    try:
        calls = [asyncio.ensure_future(engine.decide(doc())) for _ in range(100)]
        await asyncio.sleep(0)  # the requests are written to the worker
        (pid,) = worker_pids()
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, PolicyUnavailable)]
        assert failed, "the kill landed after every call was answered"
        assert all(isinstance(r, PolicyUnavailable) or r.allow for r in results)  # type: ignore[union-attr]
        assert "killed by signal 9" in failed[0].message
        await wait_until_deciding(engine)
        assert worker_pids() != [pid]
        assert engine.status().ready is True
    finally:
        await engine.close()


async def test_hung_evaluation_fails_closed_within_the_bound(
    slow_engine: EmbeddedEngine,
) -> None:
    loop = asyncio.get_running_loop()
    begun = loop.time()
    with pytest.raises(PolicyUnavailable, match=r"took longer than 0\.3 s"):
        await slow_engine.decide(doc(agent={"id": "slow"}))
    assert loop.time() - begun < 1.0


async def test_no_worker_up_shows_in_status_until_one_is_back(
    slow_engine: EmbeddedEngine,
) -> None:
    with pytest.raises(PolicyUnavailable):
        await slow_engine.decide(doc(agent={"id": "slow"}))
    status = slow_engine.status()
    assert (status.ready, "no policy worker is running" in status.detail) == (False, True)
    with pytest.raises(PolicyUnavailable, match="no policy worker is running"):
        await slow_engine.decide(doc())
    await wait_until_deciding(slow_engine)
    assert slow_engine.status().ready is True


async def test_calls_queued_behind_a_hung_one_fail_closed_then_the_worker_recovers(
    slow_engine: EmbeddedEngine,
) -> None:
    hung = asyncio.ensure_future(slow_engine.decide(doc(agent={"id": "slow"})))
    queued = asyncio.ensure_future(slow_engine.decide(doc()))
    for call in (hung, queued):
        with pytest.raises(PolicyUnavailable):
            await call
    await wait_until_deciding(slow_engine)
    assert (await slow_engine.decide(doc())).allow is True


async def test_reload_switches_every_worker(tmp_path: Path) -> None:
    path = policy_path(tmp_path, ALLOW_ALL)
    engine = await started(path, workers=2)
    try:
        (path / "handrail.rego").write_text(DENY_ALL)
        await engine.reload()
        decisions = await asyncio.gather(*(engine.decide(doc()) for _ in range(40)))
        pids = worker_pids()
    finally:
        await engine.close()
    assert len(pids) == 2
    assert {d.reasons for d in decisions} == {("closed for maintenance",)}


async def test_broken_reload_keeps_the_old_policy_in_every_worker(tmp_path: Path) -> None:
    path = policy_path(tmp_path, DENY_ALL)
    engine = await started(path, workers=2)
    try:
        (path / "handrail.rego").write_text(BROKEN)
        status = await engine.reload()
        decisions = await asyncio.gather(*(engine.decide(doc()) for _ in range(40)))
    finally:
        await engine.close()
    assert "reload failed" in status.detail and "handrail.rego:" in status.detail
    assert {d.reasons for d in decisions} == {("closed for maintenance",)}


async def test_close_stops_every_worker() -> None:
    engine = await started(SHIPPED, workers=2)
    assert len(worker_pids()) == 2
    await engine.close()
    assert worker_pids() == []


async def test_input_that_is_not_json_fails_closed() -> None:
    engine = await started(SHIPPED, workers=1)
    try:
        with pytest.raises(PolicyUnavailable, match="not JSON"):
            await engine.decide(doc(request={"body": {"x": object()}}))
        assert (await engine.decide(doc())).allow is True
    finally:
        await engine.close()


async def test_visible_is_answered_by_the_workers() -> None:
    engine = await started(SHIPPED, workers=1)
    try:
        assert await engine.visible(mcp("payments", "refund", {}, "support-bot")) is True
        assert await engine.visible(mcp("billing", "charge", {}, "support-bot")) is False
    finally:
        await engine.close()


# --- through the proxy: a dead or hung worker is a 503 and the tool is never called -----


def crm(server: TestServer) -> dict[str, Any]:
    return {"crm": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "off"}}}


async def test_worker_killed_mid_call_is_503_and_the_tool_is_not_called(
    tool: tuple[TestServer, Seen], make_proxy: ProxyFactory, policy_dir: Path
) -> None:
    server, seen = tool
    (policy_dir / "handrail.rego").write_text(SLOW)
    proxy = await make_proxy(crm(server), policy={"workers": 1})
    (pid,) = worker_pids()
    request = asyncio.ensure_future(
        proxy.get("/tools/crm/contacts/42", headers={"X-Agent-Id": "slow"})
    )
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    resp = await request
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "policy_unavailable"
    assert seen.count() == 0
    for _ in range(100):
        resp = await proxy.get("/tools/crm/contacts/42")
        if resp.status != 503:
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200
    assert seen.count() == 1


async def test_hung_worker_is_503_within_the_bound_and_the_tool_is_not_called(
    tool: tuple[TestServer, Seen], make_proxy: ProxyFactory, policy_dir: Path
) -> None:
    server, seen = tool
    (policy_dir / "handrail.rego").write_text(SLOW)
    proxy = await make_proxy(crm(server), policy={"workers": 1})
    loop = asyncio.get_running_loop()
    begun = loop.time()
    resp = await proxy.get("/tools/crm/contacts/42", headers={"X-Agent-Id": "slow"})
    assert resp.status == 503
    assert "took longer than 1 s" in (await resp.json())["error"]["message"]
    assert loop.time() - begun < 2.0
    assert seen.count() == 0


async def test_calls_queued_behind_a_hung_one_are_decided_by_another_worker(
    tmp_path: Path,
) -> None:
    engine = await started(policy_path(tmp_path, SLOW), workers=2, timeout_s=0.5)
    try:
        hung = asyncio.ensure_future(engine.decide(doc(agent={"id": "slow"})))
        await asyncio.sleep(0.05)
        bystanders = [asyncio.ensure_future(engine.decide(doc())) for _ in range(8)]
        with pytest.raises(PolicyUnavailable, match="took longer"):
            await hung
        decisions = await asyncio.gather(*bystanders)
    finally:
        await engine.close()
    assert all(d.allow for d in decisions)
