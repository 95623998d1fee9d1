"""End to end: a real proxy exports its spans to a real Arize Phoenix over OTLP/HTTP.

One scripted run (an allowed write carrying a password, a denied delete, and a retried
write that is replayed) goes through the real proxy to a real aiohttp tool; the tests
then read what Phoenix stored through its REST API, ``handrail traces`` and ``handrail calls``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import Config, parse_config
from proxy.http.app import build_app
from proxy.metrics import Metrics
from proxy.tracing import tracer_provider_from_config
from proxy.tracing.commands import calls_command, traces_command
from proxy.tracing.phoenix import PhoenixClient, PhoenixSpan
from tests.conftest import TEST_POLICY, Seen, free_port, tool_app

pytestmark = pytest.mark.phoenix

# arize-phoenix-client ships a pytest plugin that also claims the ``phoenix`` marker and, by
# default, records marked tests as experiments on a Phoenix server. Keep it offline (the
# plugin reads this while collecting, after this module is imported); pyproject's
# ``-p no:phoenix`` disables it altogether.
os.environ.setdefault("PHOENIX_TEST_TRACKING", "false")

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"
PASSWORD = "hunter2-do-not-leak"


@dataclass
class RecordedRun:
    config: Config
    project: str
    run_id: str
    statuses: list[int]
    replayed: list[str | None]
    tool_requests: int
    phoenix: str


async def _drive(
    config: Config, tool_seen: Seen, run_id: str
) -> tuple[list[int], list[str | None]]:
    tool = TestServer(tool_app(tool_seen), host="127.0.0.1")
    await tool.start_server()
    tools = {"crm": {"upstream": str(tool.make_url("/api"))}}
    config = config.model_copy(update={"tools": parse_config({"tools": tools}).tools})
    provider = tracer_provider_from_config(config.tracing, Metrics())
    client = TestClient(TestServer(build_app(config, tracer_provider=provider), host="127.0.0.1"))
    await client.start_server()
    headers = {"traceparent": TRACEPARENT, "X-Agent-Id": "sales-bot", "X-Run-Id": run_id}
    statuses: list[int] = []
    replayed: list[str | None] = []
    try:
        requests = [
            ("POST", "/tools/crm/login", {"user": "ada", "password": PASSWORD}, {}),
            ("DELETE", "/tools/crm/contacts/42", None, {}),
            ("POST", "/tools/crm/orders", {"sku": "a-1"}, {"Idempotency-Key": "order-1"}),
            ("POST", "/tools/crm/orders", {"sku": "a-1"}, {"Idempotency-Key": "order-1"}),
        ]
        for method, path, body, extra in requests:
            resp = await client.request(method, path, json=body, headers={**headers, **extra})
            await resp.read()
            statuses.append(resp.status)
            replayed.append(resp.headers.get("Idempotent-Replayed"))
    finally:
        await client.close()  # the app's cleanup closes the journal: every call is written
        await tool.close()
        await asyncio.to_thread(provider.shutdown)  # sends what is queued to Phoenix
    return statuses, replayed


@pytest.fixture(scope="module")
def recorded(phoenix: str, tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    work = tmp_path_factory.mktemp("run")
    policies = work / "policies"
    policies.mkdir()
    (policies / "handrail.rego").write_text(TEST_POLICY)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    project = f"handrail-e2e-{uuid.uuid4().hex[:6]}"
    config = parse_config(
        {
            "policy": {"path": str(policies), "watch": False},
            "store": {"url": f"sqlite:///{work}/handrail.db"},
            "tracing": {
                "exporter": "otlp",
                "endpoint": phoenix,
                "project_name": project,
            },
        }
    )
    seen = Seen()
    with ThreadPoolExecutor(1) as pool:
        statuses, replayed = pool.submit(asyncio.run, _drive(config, seen, run_id)).result()
    run = RecordedRun(config, project, run_id, statuses, replayed, len(seen.requests), phoenix)
    _wait_for_calls(run, 4)
    return run


def _spans(run: RecordedRun, project: str | None = None, **filters: Any) -> list[PhoenixSpan]:
    async def fetch() -> list[PhoenixSpan]:
        async with aiohttp.ClientSession() as session:
            client = PhoenixClient(run.phoenix, session)
            return await client.spans(project or run.project, **filters)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fetch()).result()


def _wait_for_calls(run: RecordedRun, count: int) -> None:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        calls = _spans(run, span_kinds=["TOOL"], attributes={"session.id": run.run_id})
        if len(calls) >= count:
            return
        time.sleep(0.25)
    raise AssertionError(f"Phoenix did not store {count} call spans for {run.run_id} in 30 s")


def _calls(run: RecordedRun) -> list[PhoenixSpan]:
    found = _spans(run, span_kinds=["TOOL"], attributes={"session.id": run.run_id})
    return sorted(found, key=lambda s: s.start_time)


def test_the_scripted_run_behaved(recorded: RecordedRun) -> None:
    assert recorded.statuses == [200, 403, 200, 200]
    assert recorded.replayed == [None, None, None, "true"]
    assert recorded.tool_requests == 2


def test_call_spans_are_children_of_the_agents_span(recorded: RecordedRun) -> None:
    calls = _calls(recorded)
    assert len(calls) == 4
    assert {c.trace_id for c in calls} == {AGENT_TRACE}
    assert {c.parent_id for c in calls} == {AGENT_SPAN}
    assert {c.name for c in calls} == {"execute_tool crm"}


def test_call_spans_have_policy_idempotency_and_upstream_children(recorded: RecordedRun) -> None:
    everything = _spans(recorded, trace_ids=[AGENT_TRACE])
    calls = _calls(recorded)
    children = {
        c.span_id: sorted(s.name for s in everything if s.parent_id == c.span_id) for c in calls
    }
    allowed, denied, first_order, replay = (children[c.span_id] for c in calls)
    assert allowed == ["POST", "handrail.idempotency", "handrail.policy"]
    # The key is asked for while the policy decides; the deny releases it.
    assert denied == ["handrail.idempotency", "handrail.policy"]
    assert first_order == ["POST", "handrail.idempotency", "handrail.policy"]
    assert replay == ["handrail.idempotency", "handrail.policy"]


def test_phoenix_stores_the_contract_attributes(recorded: RecordedRun) -> None:
    allowed, _denied, _first, replay = _calls(recorded)
    a = allowed.attributes
    assert allowed.span_kind == "TOOL"
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["gen_ai.tool.name"] == a["tool.name"] == "crm"
    assert a["gen_ai.agent.id"] == "sales-bot"
    assert a["session.id"] == recorded.run_id
    assert a["handrail.decision"] == "allow"
    assert a["http.request.method"] == "POST"
    assert a["http.response.status_code"] == 200
    assert a["handrail.idempotency.replayed"] is False
    assert a["handrail.idempotency.key"]
    assert json.loads(a["input.value"])["user"] == "ada"
    assert replay.attributes["handrail.idempotency.replayed"] is True
    assert replay.attributes["handrail.idempotency.key"] == "order-1"


def test_a_deny_is_exported_as_a_decision_with_reasons_not_an_error(recorded: RecordedRun) -> None:
    denied = _calls(recorded)[1]
    assert denied.attributes["handrail.decision"] == "deny"
    assert denied.attributes["handrail.decision.reasons"] == ["deletes are not allowed here"]
    assert denied.attributes["http.response.status_code"] == 403
    assert denied.status_code != "ERROR"


def test_a_password_in_the_arguments_never_reaches_phoenix(recorded: RecordedRun) -> None:
    everything = _spans(recorded, trace_ids=[AGENT_TRACE])
    dumped = json.dumps([dict(s.attributes) for s in everything])
    assert PASSWORD not in dumped
    assert "[REDACTED]" in dumped


def test_phoenix_files_the_spans_under_the_configured_project(recorded: RecordedRun) -> None:
    # Four call spans, then each call's children: the denied call has two, as its key is
    # claimed while the policy decides (and then released).
    assert len(_spans(recorded, trace_ids=[AGENT_TRACE])) == 4 + 3 + 2 + 3 + 2
    assert _spans(recorded, project="default", trace_ids=[AGENT_TRACE]) == []


def _command(function: Any, config: Config, **options: Any) -> tuple[int, str]:
    out = io.StringIO()
    with ThreadPoolExecutor(1) as pool:
        code = pool.submit(lambda: function(config, out=out, **options)).result()
    return code, out.getvalue()


def test_handrail_traces_prints_the_run_as_trees(recorded: RecordedRun) -> None:
    code, text = _command(
        traces_command,
        recorded.config,
        run=recorded.run_id,
        trace_id=None,
        tool=None,
        decision=None,
        limit=50,
        as_json=False,
    )
    assert code == 0
    assert text.count("execute_tool crm") == 4
    assert text.count(f"trace {AGENT_TRACE}") == 4
    assert "decision=deny" in text and "reasons: deletes are not allowed here" in text
    assert "replayed" in text
    assert "\n    handrail.policy" in text  # children indented under their call


def test_handrail_traces_filters_by_decision_and_prints_json(recorded: RecordedRun) -> None:
    code, text = _command(
        traces_command,
        recorded.config,
        run=recorded.run_id,
        trace_id=None,
        tool="crm",
        decision="deny",
        limit=50,
        as_json=True,
    )
    trees = json.loads(text)
    assert code == 0
    assert [t["attributes"]["handrail.decision"] for t in trees] == ["deny"]
    assert sorted(c["name"] for c in trees[0]["children"]) == [
        "handrail.idempotency",
        "handrail.policy",
    ]


def test_handrail_traces_without_a_backend_exits_2(
    recorded: RecordedRun, capsys: pytest.CaptureFixture[str]
) -> None:
    tracing = recorded.config.tracing.model_copy(
        update={"phoenix_url": f"http://127.0.0.1:{free_port()}"}
    )
    config = recorded.config.model_copy(update={"tracing": tracing})
    code, text = _command(
        traces_command,
        config,
        run=None,
        trace_id=None,
        tool=None,
        decision=None,
        limit=5,
        as_json=False,
    )
    err = capsys.readouterr().err
    assert code == 2 and text == ""
    assert "cannot reach Phoenix" in err and len(err.strip().splitlines()) == 1


def test_the_journal_lists_the_same_calls(recorded: RecordedRun) -> None:
    code, text = _command(
        calls_command,
        recorded.config,
        run=recorded.run_id,
        tool=None,
        decision=None,
        since=None,
        limit=50,
        as_json=True,
    )
    rows = json.loads(text)
    calls = _calls(recorded)
    assert code == 0
    assert [r["span_id"] for r in rows] == [c.span_id for c in calls]
    assert [r["trace_id"] for r in rows] == [AGENT_TRACE] * 4
    assert [(r["decision"], r["status"], r["replayed"]) for r in rows] == [
        ("allow", 200, False),
        ("deny", 403, False),
        ("allow", 200, False),
        ("allow", 200, True),
    ]
    assert PASSWORD not in text


def test_a_dead_phoenix_does_not_fail_or_slow_calls(tmp_path: Path) -> None:
    """The proxy with its OTLP endpoint on a closed port still answers, and quickly."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "handrail.rego").write_text(TEST_POLICY)
    config = parse_config(
        {
            "policy": {"path": str(policies), "watch": False},
            "store": {"url": f"sqlite:///{tmp_path}/handrail.db"},
            "tracing": {"exporter": "otlp", "endpoint": f"http://127.0.0.1:{free_port()}"},
        }
    )
    seen = Seen()
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        statuses, _ = pool.submit(asyncio.run, _drive(config, seen, "dead")).result()
    assert statuses == [200, 403, 200, 200]
    assert time.monotonic() - started < 8.0
